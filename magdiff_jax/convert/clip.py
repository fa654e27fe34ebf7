"""Model kinds `clip_text` and `clip_vision`: transformers CLIP towers <-> `magdiff_jax.models.clip`.

  clip_text    CLIPTextModel, or CLIPTextModelWithProjection when `with_projection` (from `architectures`)
  clip_vision  CLIPVisionModel, or CLIPVisionModelWithProjection

Checkpoint keys are written with the tower prefix (`text_model.embeddings.token_embedding.weight`,
`text_projection.weight`; `vision_model.pre_layrnorm.weight`, `visual_projection.weight`), which
transformers 4.x and 5.x both load into either class. On import the prefix is optional (transformers 5 saves
a plain CLIPTextModel without it), and the `position_ids` buffers of older files are dropped.
"""

from __future__ import annotations

from magdiff_jax.convert.core import Rule, TorchFormat, attach, conv, embedding, linear, norm, param
from magdiff_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from magdiff_jax.models.registry import ConfigError, config_from_dict

TEXT_PREFIX = "text_model."
VISION_PREFIX = "vision_model."
_TEXT_HEADS = ("text_projection.",)
_VISION_HEADS = ("visual_projection.",)


# --- shared encoder table -----------------------------------------------------------------------------------
def encoder_rules(t: str, f: str, num_layers: int) -> list[Rule]:
    """CLIPEncoder at PyTorch prefix `t` ("text_model.encoder") <-> Flax path `f` ("encoder")."""
    rules: list[Rule] = []
    for i in range(num_layers):
        tl, fl = f"{t}.layers.{i}", f"{f}/layers_{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += linear(f"{tl}.self_attn.{proj}", f"{fl}/self_attn/{proj}")
        rules += norm(f"{tl}.layer_norm1", f"{fl}/layer_norm1")
        rules += linear(f"{tl}.mlp.fc1", f"{fl}/mlp/fc1")
        rules += linear(f"{tl}.mlp.fc2", f"{fl}/mlp/fc2")
        rules += norm(f"{tl}.layer_norm2", f"{fl}/layer_norm2")
    return rules


def _add_prefix(state: dict, prefix: str, heads: tuple[str, ...], drop: tuple[str, ...]) -> dict:
    """Prefix every tower key that lacks it (leaving projection heads alone) and drop legacy buffers."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix) and not key.startswith(heads):
            key = prefix + key
        if key in drop:
            continue
        out[key] = value
    return out


def _torch_common(d: dict, cls) -> dict:
    """Fields shared by both towers, with transformers' defaults for absent keys."""
    defaults = cls()
    return {
        f: d.get(f, getattr(defaults, f))
        for f in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "hidden_act",
            "layer_norm_eps",
        )
    }


def _check_model_type(d: dict, expected: str, kind: str) -> None:
    model_type = d.get("model_type", expected)
    if model_type != expected:
        hint = " (a full CLIPModel config: save its text/vision tower separately)" if model_type == "clip" else ""
        raise ValueError(f"[{kind}] model_type {model_type!r}, expected {expected!r}{hint}")


def _architectures(d: dict) -> list[str]:
    names = d.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"expected a list of class names, got {names!r}", "architectures")
    return names


def _square(value, name: str):
    """One side of a square size given as a number or [h, w]; the value is type-checked with the config."""
    if isinstance(value, list | tuple):
        if not value or any(v != value[0] for v in value):
            raise ConfigError(f"only square sizes are supported, got {value}", name)
        value = value[0]
    return value


# --- clip_text ----------------------------------------------------------------------------------------------
def text_config_from_torch(d: dict) -> CLIPTextConfig:
    _check_model_type(d, "clip_text_model", "clip_text")
    defaults = CLIPTextConfig()
    eos = d.get("eos_token_id", defaults.eos_token_id)
    if isinstance(eos, list):
        if len(eos) != 1:
            raise ConfigError(f"must be a single id, got {eos}", "eos_token_id")
        eos = eos[0]
    with_projection = "CLIPTextModelWithProjection" in _architectures(d)
    projection_dim = d.get("projection_dim", defaults.projection_dim)
    if projection_dim is None:
        if with_projection:
            raise ValueError("[clip_text] CLIPTextModelWithProjection config.json has projection_dim null")
        projection_dim = defaults.projection_dim
    return config_from_dict(CLIPTextConfig, dict(
        vocab_size=d.get("vocab_size", defaults.vocab_size),
        projection_dim=projection_dim,
        max_position_embeddings=d.get("max_position_embeddings", defaults.max_position_embeddings),
        pad_token_id=d.get("pad_token_id", defaults.pad_token_id),
        bos_token_id=d.get("bos_token_id", defaults.bos_token_id),
        eos_token_id=eos,
        with_projection=with_projection,
        **_torch_common(d, CLIPTextConfig),
    ))


def text_torch_class(config: CLIPTextConfig) -> str:
    return "CLIPTextModelWithProjection" if config.with_projection else "CLIPTextModel"


def text_config_to_torch(config: CLIPTextConfig) -> dict:
    return {
        "architectures": [text_torch_class(config)],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "projection_dim": config.projection_dim,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "dtype": "float32",
    }


def text_rules(config: CLIPTextConfig) -> list[Rule]:
    t = TEXT_PREFIX.rstrip(".")
    rules = embedding(f"{t}.embeddings.token_embedding", "embeddings/token_embedding")
    rules += embedding(f"{t}.embeddings.position_embedding", "embeddings/position_embedding")
    rules += encoder_rules(f"{t}.encoder", "encoder", config.num_hidden_layers)
    rules += norm(f"{t}.final_layer_norm", "final_layer_norm")
    if config.with_projection:
        rules += linear("text_projection", "text_projection", bias=False)
    return rules


def text_normalise_keys(state: dict) -> dict:
    return _add_prefix(state, TEXT_PREFIX, _TEXT_HEADS, drop=(f"{TEXT_PREFIX}embeddings.position_ids",))


CLIP_TEXT = attach("clip_text", TorchFormat(
    library="transformers",
    torch_class=text_torch_class,
    config_from_torch=text_config_from_torch,
    config_to_torch=text_config_to_torch,
    rules=text_rules,
    normalise_keys=text_normalise_keys,
))


# --- clip_vision --------------------------------------------------------------------------------------------
def vision_config_from_torch(d: dict) -> CLIPVisionConfig:
    _check_model_type(d, "clip_vision_model", "clip_vision")
    defaults = CLIPVisionConfig()
    return config_from_dict(CLIPVisionConfig, dict(
        projection_dim=d.get("projection_dim", defaults.projection_dim),
        image_size=_square(d.get("image_size", defaults.image_size), "image_size"),
        patch_size=_square(d.get("patch_size", defaults.patch_size), "patch_size"),
        num_channels=d.get("num_channels", defaults.num_channels),
        with_projection="CLIPVisionModelWithProjection" in _architectures(d),
        **_torch_common(d, CLIPVisionConfig),
    ))


def vision_torch_class(config: CLIPVisionConfig) -> str:
    return "CLIPVisionModelWithProjection" if config.with_projection else "CLIPVisionModel"


def vision_config_to_torch(config: CLIPVisionConfig) -> dict:
    return {
        "architectures": [vision_torch_class(config)],
        "model_type": "clip_vision_model",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "projection_dim": config.projection_dim,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_channels": config.num_channels,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "dtype": "float32",
    }


def vision_rules(config: CLIPVisionConfig) -> list[Rule]:
    t = VISION_PREFIX.rstrip(".")
    rules = param(f"{t}.embeddings.class_embedding", "embeddings/class_embedding")
    rules += conv(f"{t}.embeddings.patch_embedding", "embeddings/patch_embedding", bias=False)
    rules += embedding(f"{t}.embeddings.position_embedding", "embeddings/position_embedding")
    rules += norm(f"{t}.pre_layrnorm", "pre_layrnorm")
    rules += encoder_rules(f"{t}.encoder", "encoder", config.num_hidden_layers)
    rules += norm(f"{t}.post_layernorm", "post_layernorm")
    if config.with_projection:
        rules += linear("visual_projection", "visual_projection", bias=False)
    return rules


def vision_normalise_keys(state: dict) -> dict:
    return _add_prefix(state, VISION_PREFIX, _VISION_HEADS, drop=(f"{VISION_PREFIX}embeddings.position_ids",))


CLIP_VISION = attach("clip_vision", TorchFormat(
    library="transformers",
    torch_class=vision_torch_class,
    config_from_torch=vision_config_from_torch,
    config_to_torch=vision_config_to_torch,
    rules=vision_rules,
    normalise_keys=vision_normalise_keys,
))


# --- a whole CLIPModel (both towers and their projections, one folder) ----------------------------------------
def clip_model_configs(d: dict) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """The two towers' configs (with projection) of a transformers CLIPModel config.json (`model_type` "clip",
    `text_config`, `vision_config`, `projection_dim`)."""
    if d.get("model_type", "clip") != "clip":
        raise ValueError(f"[clip] model_type {d.get('model_type')!r}, expected 'clip' (a CLIPModel folder)")
    for key in ("text_config", "vision_config"):
        if not isinstance(d.get(key), dict):
            raise ConfigError("missing: a CLIPModel config.json holds both towers' configs", key)
    projection = d.get("projection_dim", CLIPTextConfig().projection_dim)
    text = text_config_from_torch({**d["text_config"], "model_type": "clip_text_model",
                                   "architectures": ["CLIPTextModelWithProjection"], "projection_dim": projection})
    vision = vision_config_from_torch({**d["vision_config"], "model_type": "clip_vision_model",
                                       "architectures": ["CLIPVisionModelWithProjection"],
                                       "projection_dim": projection})
    return text, vision


def clip_model_from_torch(folder, dtype=None):
    """(text module, text params, vision module, vision params) of a transformers CLIPModel folder (config.json +
    model.safetensors, e.g. openai/clip-vit-base-patch32): one file holds both towers under the same key names the
    tower classes use (`text_model.*`, `text_projection.weight`; `vision_model.*`, `visual_projection.weight`), so
    each tower's table reads its half; `logit_scale` is not needed for cosine scores and is ignored."""
    import jax
    import jax.numpy as jnp

    from magdiff_jax.convert import safetensors_io
    from magdiff_jax.convert.core import read_config, torch_to_flax
    from magdiff_jax.models.registry import get_model

    text, vision = clip_model_configs(read_config(folder))
    state = safetensors_io.read_state_dict(folder, "model")
    state = {k: v for k, v in state.items() if not k.endswith("position_ids") and k != "logit_scale"}
    towers = {"clip_text": (text, text_rules, (TEXT_PREFIX, *_TEXT_HEADS)),
              "clip_vision": (vision, vision_rules, (VISION_PREFIX, *_VISION_HEADS))}
    other = sorted(k for k in state if not any(k.startswith(t[2]) for t in towers.values()))
    if other:
        from magdiff_jax.convert.core import ConversionError

        raise ConversionError(f"[clip] {folder}: keys of neither tower: {', '.join(other[:8])}")
    out = []
    for kind, (config, rules, prefixes) in towers.items():
        spec = get_model(kind)
        module = spec.build(config)
        half = {k: v for k, v in state.items() if k.startswith(prefixes)}
        params = torch_to_flax(half, rules(config), spec.abstract_params(module), kind, source=str(folder))
        out += [module, jax.tree.map(lambda x: jnp.asarray(x, dtype or jnp.float32), params)]
    return tuple(out)
