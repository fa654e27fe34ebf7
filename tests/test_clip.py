"""Parity of the CLIP towers with transformers 5.23, and the `clip_text` / `clip_vision` converters.

Every parity test builds a small random transformers model with every parameter perturbed away from its
init, saves it with `save_pretrained`, loads it with `load_torch` and compares outputs on the same inputs in
float32: max|ours - ref| / max|ref| <= 1e-4 (TOL).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import rel_err
from safetensors.torch import save_file

import magdiff_jax.convert.clip as convert_clip
from magdiff_jax.convert import ConversionError, load_torch, save_torch
from magdiff_jax.models.clip import CLIPTextConfig, CLIPVisionConfig

TOL = 1e-4

# --- helpers ------------------------------------------------------------------------------------------------


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()




def check(name: str, ours, ref) -> float:
    err = rel_err(ours, ref)
    print(f"{name}: max|diff|/max|ref| = {err:.2e}")
    assert err <= TOL, f"{name}: relative error {err:.2e} > {TOL}"
    return err


def assert_round_trip(kind: str, module, params, torch_model, torch_cls, out_dir):
    """save_torch -> torch_cls.from_pretrained: no missing/unexpected keys, bit-identical tensors."""
    save_torch(kind, module, params, out_dir)
    reloaded, info = torch_cls.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref, got = torch_model.state_dict(), reloaded.state_dict()
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


# --- text ---------------------------------------------------------------------------------------------------
VOCAB, MAX_POS = 100, 16

TEXT_CASES = {
    # name: (PyTorch class, config eos_token_id, end-of-text token in the inputs, padding token, hidden_act).
    # eos_token_id 2 is the legacy value of the SD1.5 / SD2.1 configs (argmax pooling; the end-of-text token
    # is the largest id of the vocabulary, padding is that token (SD1.x) or "!" = 0 (SD2.x)); 98 is a "real"
    # eos id (first-eos pooling).
    "plain-eos2": ("CLIPTextModel", 2, 99, 99, "quick_gelu"),
    "proj-eos2": ("CLIPTextModelWithProjection", 2, 99, 0, "gelu"),
    "plain-eos": ("CLIPTextModel", 98, 98, 98, "gelu"),
    "proj-eos": ("CLIPTextModelWithProjection", 98, 98, 0, "quick_gelu"),
}
# The pooled position of each input row: argmax of the ids (legacy) or the first end-of-text token.
EXPECTED_POOLED = {2: [5, 11, 4, 2], 98: [5, 11, MAX_POS - 1, 2]}


def text_inputs(end: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with the end token at varied positions (row 2: the last position, no padding) and padding after
    it; row 2 holds token 99 early (the legacy argmax picks it, first-eos pooling does not), row 3 an early
    end token inside its text."""
    rng = np.random.default_rng(end + pad)
    ids = rng.integers(3, 97, size=(4, MAX_POS)).astype(np.int64)
    ids[:, 0] = 97  # bos
    ends = [5, 11, MAX_POS - 1, 8]
    mask = np.zeros_like(ids)
    for row, last in enumerate(ends):
        ids[row, last] = end
        ids[row, last + 1 :] = pad
        mask[row, : last + 1] = 1
    ids[2, 4] = 99
    ids[3, 2] = end
    return ids, mask


@pytest.fixture(scope="module", params=list(TEXT_CASES))
def text_case(request, tmp_path_factory):
    cls_name, eos, end, pad, act = TEXT_CASES[request.param]
    torch_cls = getattr(transformers, cls_name)
    hf_config = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        hidden_act=act,
        bos_token_id=97,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch_model = perturb(torch_cls(hf_config), seed=len(request.param))
    folder = tmp_path_factory.mktemp(f"text-{request.param}")
    torch_model.save_pretrained(folder, safe_serialization=True)
    module, params = load_torch("clip_text", folder)
    ids, mask = text_inputs(end, pad)
    apply = jax.jit(lambda p, i, m: module.apply({"params": p}, i, attention_mask=m, output_hidden_states=True))
    apply_nomask = jax.jit(lambda p, i: module.apply({"params": p}, i, output_hidden_states=True))
    return dict(
        name=request.param,
        torch_cls=torch_cls,
        torch_model=torch_model,
        module=module,
        params=params,
        ids=ids,
        mask=mask,
        apply=apply,
        apply_nomask=apply_nomask,
        folder=folder,
    )


def _torch_text(case, ids, mask=None):
    with torch.no_grad():
        return case["torch_model"](
            input_ids=torch.from_numpy(ids),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )


def _compare_text(case, ours, ref, tag):
    name = f"{case['name']}[{tag}]"
    check(f"{name} last_hidden_state", ours.last_hidden_state, ref.last_hidden_state)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 4
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        check(f"{name} hidden_states[{i}]", a, b)
    if case["module"].config.with_projection:
        assert ours.pooler_output.shape == (4, 32)
        check(f"{name} text_embeds", ours.text_embeds, ref.text_embeds)
    else:
        assert ours.text_embeds is None
        check(f"{name} pooler_output", ours.pooler_output, ref.pooler_output)


def test_clip_text_parity(text_case):
    """transformers CLIPTextModel / CLIPTextModelWithProjection, causal, no attention mask; fp32, TOL 1e-4."""
    config = text_case["module"].config
    assert config.with_projection == (text_case["torch_cls"] is transformers.CLIPTextModelWithProjection)
    ours = text_case["apply_nomask"](text_case["params"], jnp.asarray(text_case["ids"], jnp.int32))
    _compare_text(text_case, ours, _torch_text(text_case, text_case["ids"]), "no mask")


def test_clip_text_parity_padding_mask(text_case):
    """transformers CLIP text towers with a padding attention_mask (right padding, plus a left-padded row
    whose first queries see no key); fp32, TOL 1e-4."""
    mask = text_case["mask"].copy()
    mask[1, :2] = 0  # left padding: query 0 has every key masked
    ours = text_case["apply"](
        text_case["params"], jnp.asarray(text_case["ids"], jnp.int32), jnp.asarray(mask, jnp.int32)
    )
    ref = _torch_text(text_case, text_case["ids"], mask)
    assert np.isfinite(np.asarray(ours.last_hidden_state)).all()
    _compare_text(text_case, ours, ref, "padding mask")


def test_clip_text_pooled_token_choice(text_case):
    """The pooled position follows transformers: argmax of the ids when eos_token_id == 2, else first eos."""
    config = text_case["module"].config
    ours = text_case["apply_nomask"](text_case["params"], jnp.asarray(text_case["ids"], jnp.int32))
    expected = EXPECTED_POOLED[config.eos_token_id]
    last = np.asarray(ours.last_hidden_state)
    np.testing.assert_array_equal(np.asarray(ours.pooler_output), last[np.arange(4), expected])


def test_clip_text_shorter_sequence(text_case):
    """Sequences shorter than max_position_embeddings use the first positions (transformers CLIP text,
    TOL 1e-4)."""
    ids = text_case["ids"][:, :12].copy()
    ids[:, -1] = TEXT_CASES[text_case["name"]][2]
    module, params = text_case["module"], text_case["params"]
    ours = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    ref = _torch_text(text_case, ids)
    check(f"{text_case['name']}[L=12] last_hidden_state", ours.last_hidden_state, ref.last_hidden_state)


def test_clip_text_round_trip(text_case, tmp_path):
    """save_torch -> transformers CLIPTextModel(WithProjection).from_pretrained: same keys, bit-identical."""
    assert_round_trip(
        "clip_text",
        text_case["module"],
        text_case["params"],
        text_case["torch_model"],
        text_case["torch_cls"],
        tmp_path / "out",
    )
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "clip_text_model"
    assert written["architectures"] == [text_case["torch_cls"].__name__]
    from magdiff_jax.convert.safetensors_io import read_state_dict

    keys = set(read_state_dict(tmp_path / "out", "model"))
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert ("text_projection.weight" in keys) == text_case["module"].config.with_projection
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)


def test_clip_text_legacy_prefixed_file_with_position_ids(text_case, tmp_path):
    """An old-style file (`text_model.` prefixed keys plus `position_ids`) loads to the same params."""
    state = {k: v.contiguous() for k, v in text_case["torch_model"].state_dict().items()}
    state = {(k if k.startswith("text_") else f"text_model.{k}"): v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(MAX_POS)[None]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((text_case["folder"] / "config.json").read_text())
    _, params = load_torch("clip_text", tmp_path)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    want = dict(jax.tree_util.tree_leaves_with_path(text_case["params"]))
    assert len(leaves) == len(want)
    for path, value in leaves:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]))


def test_clip_text_unprefixed_projection_file(tmp_path):
    """CLIPTextModelWithProjection keys without the `text_model.` prefix load too (as in transformers);
    transformers CLIPTextModelWithProjection parity, TOL 1e-4."""
    hf_config = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        projection_dim=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_POS,
        bos_token_id=97,
        eos_token_id=98,
        pad_token_id=0,
    )
    model = perturb(transformers.CLIPTextModelWithProjection(hf_config), seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = {k.removeprefix("text_model."): v.contiguous() for k, v in model.state_dict().items()}
    assert "embeddings.token_embedding.weight" in state and "text_projection.weight" in state
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    module, params = load_torch("clip_text", tmp_path)
    assert module.config.with_projection
    ids = np.array([[97, 5, 6, 98, 0, 0, 0, 0]])
    ours = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids))
    check("unprefixed projection text_embeds", ours.text_embeds, ref.text_embeds)


@pytest.mark.parametrize("text_case", ["plain-eos2"], indirect=True)
def test_clip_text_checkpoint_errors(text_case, tmp_path):
    """A file missing a layer's weight or holding a stray key is refused with every offending key named."""
    state = {k: v.contiguous() for k, v in text_case["torch_model"].state_dict().items()}
    del state["encoder.layers.1.mlp.fc1.weight"]
    state["encoder.layers.9.mlp.fc1.weight"] = torch.zeros(2)
    state["final_layer_norm.weight"] = torch.zeros(7)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((text_case["folder"] / "config.json").read_text())
    with pytest.raises(ConversionError) as err:
        load_torch("clip_text", tmp_path)
    msg = str(err.value)
    assert "text_model.encoder.layers.1.mlp.fc1.weight" in msg
    assert "text_model.encoder.layers.9.mlp.fc1.weight" in msg
    assert "text_model.final_layer_norm.weight" in msg and "(7,)" in msg


# --- vision -------------------------------------------------------------------------------------------------
VISION_CASES = {
    "plain": ("CLIPVisionModel", "quick_gelu", 48),
    "proj": ("CLIPVisionModelWithProjection", "gelu", 32),
}


@pytest.fixture(scope="module", params=list(VISION_CASES))
def vision_case(request, tmp_path_factory):
    cls_name, act, hidden = VISION_CASES[request.param]
    torch_cls = getattr(transformers, cls_name)
    hf_config = transformers.CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=20,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act=act,
        layer_norm_eps=1e-5,
    )
    torch_model = perturb(torch_cls(hf_config), seed=10 + len(request.param))
    folder = tmp_path_factory.mktemp(f"vision-{request.param}")
    torch_model.save_pretrained(folder, safe_serialization=True)
    module, params = load_torch("clip_vision", folder)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x, output_hidden_states=True))
    return dict(
        name=request.param,
        torch_cls=torch_cls,
        torch_model=torch_model,
        module=module,
        params=params,
        pixels=pixels,
        apply=apply,
        folder=folder,
    )


def test_clip_vision_parity(vision_case):
    """transformers CLIPVisionModel / CLIPVisionModelWithProjection (channels-last input here); fp32,
    TOL 1e-4."""
    name = vision_case["name"]
    pixels = vision_case["pixels"]
    ours = vision_case["apply"](vision_case["params"], jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref = vision_case["torch_model"](pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    check(f"vision-{name} last_hidden_state", ours.last_hidden_state, ref.last_hidden_state)
    assert ours.last_hidden_state.shape == (2, 17, vision_case["module"].config.hidden_size)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 4
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        check(f"vision-{name} hidden_states[{i}]", a, b)
    if vision_case["module"].config.with_projection:
        check(f"vision-{name} image_embeds", ours.image_embeds, ref.image_embeds)
        with torch.no_grad():
            inner = vision_case["torch_model"].vision_model(pixel_values=torch.from_numpy(pixels))
        check(f"vision-{name} pooler_output", ours.pooler_output, inner.pooler_output)
    else:
        assert ours.image_embeds is None
        check(f"vision-{name} pooler_output", ours.pooler_output, ref.pooler_output)


def test_clip_vision_round_trip(vision_case, tmp_path):
    """save_torch -> transformers CLIPVisionModel(WithProjection).from_pretrained: same keys, bit-identical
    tensors."""
    assert_round_trip(
        "clip_vision",
        vision_case["module"],
        vision_case["params"],
        vision_case["torch_model"],
        vision_case["torch_cls"],
        tmp_path / "out",
    )
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "clip_vision_model"
    assert written["architectures"] == [vision_case["torch_cls"].__name__]


def test_clip_vision_legacy_prefixed_file_with_position_ids(vision_case, tmp_path):
    """`vision_model.`-prefixed keys plus the `position_ids` buffer load to the same params."""
    state = {k: v.contiguous() for k, v in vision_case["torch_model"].state_dict().items()}
    state = {(k if k.startswith(("vision_model.", "visual_")) else f"vision_model.{k}"): v for k, v in state.items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((vision_case["folder"] / "config.json").read_text())
    _, params = load_torch("clip_vision", tmp_path)
    want = dict(jax.tree_util.tree_leaves_with_path(vision_case["params"]))
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]))


def test_clip_vision_rejects_wrong_image_size(vision_case):
    module, params = vision_case["module"], vision_case["params"]
    with pytest.raises(ValueError, match="pixel_values must be"):
        module.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))


# --- configs ------------------------------------------------------------------------------------------------
def test_text_presets_translate_to_transformers():
    """sd15 / sd21 presets -> config.json dicts that transformers' CLIPTextConfig reads with known values."""
    expected = {
        "sd15": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            intermediate_size=3072,
            projection_dim=768,
            eos_token_id=2,
            bos_token_id=0,
            pad_token_id=1,
        ),
        "sd21": dict(
            hidden_size=1024,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            intermediate_size=4096,
            projection_dim=512,
            eos_token_id=2,
            bos_token_id=0,
            pad_token_id=1,
        ),
    }
    for name, want in expected.items():
        config = getattr(CLIPTextConfig, name)()
        d = convert_clip.text_config_to_torch(config)
        assert d["model_type"] == "clip_text_model" and d["architectures"] == ["CLIPTextModel"]
        hf = transformers.CLIPTextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        for key, value in want.items():
            assert getattr(hf, key) == value, (name, key)
        assert hf.vocab_size == 49408 and hf.max_position_embeddings == 77
        assert convert_clip.text_config_from_torch(d) == config
        proj = getattr(CLIPTextConfig, name)(with_projection=True)
        d = convert_clip.text_config_to_torch(proj)
        assert d["architectures"] == ["CLIPTextModelWithProjection"]
        assert convert_clip.text_config_from_torch(d) == proj


def test_vision_presets_translate_to_transformers():
    """vit_h14 / vit_l14 presets -> CLIPVisionModelWithProjection config.json dicts with the known values."""
    expected = {
        "vit_h14": dict(
            hidden_size=1280,
            num_hidden_layers=32,
            num_attention_heads=16,
            intermediate_size=5120,
            projection_dim=1024,
            patch_size=14,
            image_size=224,
            hidden_act="gelu",
        ),
        "vit_l14": dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            projection_dim=768,
            patch_size=14,
            image_size=224,
            hidden_act="quick_gelu",
        ),
    }
    for name, want in expected.items():
        config = getattr(CLIPVisionConfig, name)()
        d = convert_clip.vision_config_to_torch(config)
        assert d["model_type"] == "clip_vision_model" and d["architectures"] == ["CLIPVisionModelWithProjection"]
        hf = transformers.CLIPVisionConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        for key, value in want.items():
            assert getattr(hf, key) == value, (name, key)
        assert convert_clip.vision_config_from_torch(d) == config


def test_config_errors():
    with pytest.raises(ValueError, match="not a multiple"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="model_type 'clip'"):
        convert_clip.text_config_from_torch({"model_type": "clip", "text_config": {}})
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=8)


def test_preset_param_tree_matches_table():
    """The mapping tables cover the full-size towers exactly (abstract init only, nothing allocated)."""
    from magdiff_jax.convert.core import check_table, torch_format
    from magdiff_jax.models.registry import get_model

    for kind, config in (
        ("clip_text", CLIPTextConfig.sd21(with_projection=True)),
        ("clip_vision", CLIPVisionConfig.vit_h14()),
    ):
        spec = get_model(kind)
        abstract = spec.abstract_params(spec.build(config))
        check_table(torch_format(kind).rules(config), abstract, kind)
        n = sum(int(np.prod(v.shape)) for v in abstract.values())
        print(f"{kind} {n / 1e6:.1f}M params")
        assert n > 300e6
