"""IP-Adapter-Plus files <-> the image-prompt `Resampler` and the U-Nets' decoupled image cross-attention.

An IP-Adapter-Plus file holds

    image_proj.<key>                  the Perceiver resampler (`layers.resampler.Resampler`), in one of two layouts
    ip_adapter.<i>.to_k_ip.weight     (inner, cross_attention_dim), bias-free: image keys of attention processor i
    ip_adapter.<i>.to_v_ip.weight     (inner, cross_attention_dim): its image values

as the flat keys of a `.safetensors` file, or as the nested {"image_proj": {...}, "ip_adapter": {...}} of the original
`.bin` (read through `safetensors_io.read_weights`, i.e. torch.load(weights_only=True)).

The two resampler layouts (either is read; `ip_adapter_to_torch` writes the original one, the only one diffusers'
`load_ip_adapter` converts):

    original (IP-Adapter's `Resampler`)            diffusers (`IPAdapterPlusImageProjection`, `resampler_rules`)
    latents, proj_in, proj_out, norm_out           the same
    layers.{i}.0.norm1 / .0.norm2                  layers.{i}.ln0 / .ln1   (LayerNorms of the features / latents)
    layers.{i}.0.to_q                              layers.{i}.attn.to_q
    layers.{i}.0.to_kv  (2 * inner, dim)           layers.{i}.attn.to_k, .attn.to_v  (rows [:inner], [inner:])
    layers.{i}.0.to_out                            layers.{i}.attn.to_out.0
    layers.{i}.1.0 / .1.1 / .1.3                   layers.{i}.ff.0 / .ff.1.net.0.proj / .ff.1.net.2

The resampler config is inferred from the shapes as diffusers does (`infer_resampler_config`): num_queries and dim
from `latents`, embedding_dim from `proj_in`, output_dim from `proj_out`, depth from the layer indices, ff_mult from
the feed-forward, and heads = inner // dim_head where dim_head cannot be seen in the weights: diffusers assumes 64
(heads = to_q rows // 64), and so does `read_ip_adapter` unless told otherwise. diffusers also builds its
`IPAdapterPlusImageProjection` with depth 4 and ffn_ratio 4 whatever the file holds, so a file diffusers can load
has dim_head 64, depth 4 and ff_mult 4: `ip_adapter_to_torch` refuses any other resampler config.

Processor indices. diffusers' `_convert_ip_adapter_attn_to_diffusers` walks the U-Net's `attn_processors` in module
order (down blocks, up blocks, mid block; inside a block `attentions.{j}.transformer_blocks.{k}`), skips every
self-attention (`attn1`) and every processor of a motion module, and gives the n-th remaining one (a spatial
transformer's cross-attention `attn2`) the file index i = 2n + 1. That is IP-Adapter's own numbering of the SD U-Net,
which counts every attn1 and attn2: one file serves an SD U-Net (UNet2DConditionModel), its AnimateDiff
UNetMotionModel (`pipe.load_ip_adapter` on an AnimateDiff pipeline) and the spatial layers of a UNet3DConditionModel
alike. `spatial_attn2` lists those layers from a conversion table; `unet_motion_attn2` for a `unet_motion` config.

    cfg, state = read_ip_adapter("ip-adapter-plus_sd15.bin")        # or .safetensors, either layout
    unet_params = apply_ip_adapter(unet_config, unet_params, state)  # unet_config.image_attention=True
    tokens = Resampler(cfg).apply({"params": state["image_proj"]}, clip_penultimate_tokens)
    ip_adapter_to_torch(state["image_proj"], cfg, unet_config, unet_params, "out/ip_adapter.safetensors")

Every missing, unexpected and mis-shaped key is reported at once (`ConversionError`), named as the file names it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from magdiff_jax.convert import safetensors_io
from magdiff_jax.convert.core import (
    ConversionError,
    Rule,
    _expected_torch_shape,
    flax_to_torch,
    linear,
    norm,
    param,
    torch_to_flax,
)
from magdiff_jax.convert.unet_motion import unet_motion_rules
from magdiff_jax.layers.resampler import Resampler, ResamplerConfig
from magdiff_jax.models.unet_motion import SPEC as UNET_MOTION
from magdiff_jax.models.unet_motion import UNetMotionConfig, UNetMotionModel
from magdiff_jax.utils.errors import mismatch_message
from magdiff_jax.utils.files import as_path, user_path

# diffusers' `_convert_ip_adapter_image_proj_to_diffusers` and IP-Adapter's Resampler default: heads = inner // 64
DIM_HEAD = 64
# what diffusers' loader builds whatever the file holds (IPAdapterPlusImageProjection's defaults)
DIFFUSERS_DEPTH, DIFFUSERS_FF_MULT = 4, 4
LAYOUTS = ("original", "diffusers")
IP_NAMES = ("to_k_ip", "to_v_ip")

_SPATIAL_ATTN2 = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.attentions\.(\d+)"
                            r"\.transformer_blocks\.(\d+)\.attn2\.to_k\.weight$")
_GROUP_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # the U-Nets' child order (attn_processors')
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_ORIGINAL_LAYER = re.compile(r"^layers\.(\d+)\.[01]\.")
_DIFFUSERS_LAYER = re.compile(r"^layers\.(\d+)\.(ln0|ln1|attn|ff)\.")
_ANY_LAYER = re.compile(r"^layers\.(\d+)\.")


# --- processor order ------------------------------------------------------------------------------------------------
def spatial_attn2(rules: list[Rule]) -> list[tuple[str, tuple[str, ...]]]:
    """(diffusers module path, Flax path) of every spatial transformer's attn2 that the conversion table `rules` of
    a U-Net names (`...attentions.{j}.transformer_blocks.{k}.attn2`: never a motion module or temporal
    transformer), in the order of diffusers' `attn_processors`: down blocks, up blocks, mid block; by block, then
    layer, then transformer block. The n-th has IP-Adapter index `ip_adapter_index(n)`."""
    found = []
    for rule in rules:
        m = _SPATIAL_ATTN2.match(rule.torch)
        if m:
            group, block, layer, sub = m.groups()
            order = (_GROUP_ORDER[group], int(block or 0), int(layer), int(sub))
            found.append((order, rule.torch.removesuffix(".to_k.weight"), rule.flax[:-2]))
    return [(path, flax) for _, path, flax in sorted(found)]


def ip_adapter_index(position: int) -> int:
    """The `ip_adapter.<i>` index of the spatial attn2 at `position` in `spatial_attn2`: IP-Adapter's 2n + 1."""
    return 2 * position + 1


def base_config(config: UNetMotionConfig) -> UNetMotionConfig:
    """The same U-Net without image attention: the diffusers UNetMotionModel that an IP-Adapter is loaded into."""
    return dataclasses.replace(config, image_attention=False)


def unet_motion_attn2(config: UNetMotionConfig) -> list[tuple[str, tuple[str, ...]]]:
    """`spatial_attn2` of a unet_motion: the layers that carry `to_k_ip`/`to_v_ip` with `image_attention`, in the
    order diffusers' `UNetMotionModel` numbers them."""
    return spatial_attn2(unet_motion_rules(base_config(config)))


# --- diffusers IPAdapterPlusImageProjection state dict <-> Resampler params ----------------------------------------
def resampler_rules(config: ResamplerConfig) -> list[Rule]:
    """The conversion table of diffusers `IPAdapterPlusImageProjection` <-> `layers.resampler.Resampler`."""
    rules = param("latents", "latents") + linear("proj_in", "proj_in")
    for i in range(config.depth):
        t, f = f"layers.{i}", f"layers_{i}"
        rules += norm(f"{t}.ln0", f"{f}/ln0") + norm(f"{t}.ln1", f"{f}/ln1")
        for proj in ("to_q", "to_k", "to_v"):
            rules += linear(f"{t}.attn.{proj}", f"{f}/attn/{proj}", bias=False)
        rules += linear(f"{t}.attn.to_out.0", f"{f}/attn/to_out_0", bias=False)
        rules += norm(f"{t}.ff.0", f"{f}/ff_0")
        rules += linear(f"{t}.ff.1.net.0.proj", f"{f}/ff_1/net_0/proj", bias=False)
        rules += linear(f"{t}.ff.1.net.2", f"{f}/ff_1/net_2", bias=False)
    return rules + linear("proj_out", "proj_out") + norm("norm_out", "norm_out")


def _resampler_abstract(config: ResamplerConfig) -> dict:
    shapes = jax.eval_shape(lambda: Resampler(config).init(jax.random.key(0), jnp.zeros((1, 1, config.embedding_dim))))
    return traverse_util.flatten_dict(nn.meta.unbox(shapes["params"]))


def resampler_from_torch(state_dict: Mapping[str, np.ndarray], config: ResamplerConfig) -> dict:
    """An `IPAdapterPlusImageProjection` state dict ({key: numpy array}) -> `Resampler` params (numpy, nested);
    every missing, unexpected or mis-shaped key is reported (`ConversionError`)."""
    return torch_to_flax(state_dict, resampler_rules(config), _resampler_abstract(config), "resampler")


def resampler_to_torch(params, config: ResamplerConfig) -> dict[str, np.ndarray]:
    """`Resampler` params -> an `IPAdapterPlusImageProjection` state dict of numpy arrays (PyTorch layouts)."""
    return flax_to_torch(params, resampler_rules(config), "resampler")


# --- the original IP-Adapter Resampler layout ----------------------------------------------------------------------
def _original_to_diffusers(depth: int) -> dict[str, str | tuple[str, str]]:
    """original key -> diffusers key (`to_kv` -> the pair (to_k, to_v) its rows split into)."""
    names: dict[str, str | tuple[str, str]] = {
        k: k for k in ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
                       "norm_out.weight", "norm_out.bias")}
    for i in range(depth):
        o = d = f"layers.{i}"
        for p in ("weight", "bias"):
            names[f"{o}.0.norm1.{p}"] = f"{d}.ln0.{p}"
            names[f"{o}.0.norm2.{p}"] = f"{d}.ln1.{p}"
            names[f"{o}.1.0.{p}"] = f"{d}.ff.0.{p}"
        names[f"{o}.0.to_q.weight"] = f"{d}.attn.to_q.weight"
        names[f"{o}.0.to_kv.weight"] = (f"{d}.attn.to_k.weight", f"{d}.attn.to_v.weight")
        names[f"{o}.0.to_out.weight"] = f"{d}.attn.to_out.0.weight"
        names[f"{o}.1.1.weight"] = f"{d}.ff.1.net.0.proj.weight"
        names[f"{o}.1.3.weight"] = f"{d}.ff.1.net.2.weight"
    return names


def original_from_diffusers(state: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """An `IPAdapterPlusImageProjection` state dict -> the original Resampler's (`to_k`, `to_v` stacked as `to_kv`)."""
    out = {}
    for original, name in _original_to_diffusers(depth).items():
        out[original] = (np.concatenate([state[name[0]], state[name[1]]], axis=0) if isinstance(name, tuple)
                         else state[name])
    return out


def diffusers_from_original(state: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """The original Resampler's state dict -> `IPAdapterPlusImageProjection`'s (`to_kv` rows split in halves)."""
    out = {}
    for original, name in _original_to_diffusers(depth).items():
        if isinstance(name, tuple):
            k, v = np.split(np.asarray(state[original]), 2, axis=0)
            out[name[0]], out[name[1]] = k, v
        else:
            out[name] = state[original]
    return out


def _expected_shapes(config: ResamplerConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """{key: PyTorch shape} of the image_proj part of a file of `layout` for `config`."""
    abstract = _resampler_abstract(config)
    shapes = {r.torch: _expected_torch_shape(tuple(abstract[r.flax].shape), r.transform)
              for r in resampler_rules(config)}
    if layout == "diffusers":
        return shapes
    out = {}
    for original, name in _original_to_diffusers(config.depth).items():
        if isinstance(name, tuple):
            k = shapes[name[0]]
            out[original] = (2 * k[0], *k[1:])
        else:
            out[original] = shapes[name]
    return out


def detect_layout(image_proj: Mapping[str, np.ndarray], source: str = "IP-Adapter state") -> str:
    """"original" or "diffusers" (module docstring) from the `image_proj` keys (without their prefix)."""
    original = any(_ORIGINAL_LAYER.match(k) for k in image_proj)
    diffusers = any(_DIFFUSERS_LAYER.match(k) for k in image_proj)
    if original and diffusers:
        raise ConversionError(f"[ip_adapter] {source}: image_proj mixes the original Resampler layout "
                              "(layers.{i}.0.* / layers.{i}.1.*) with diffusers' (layers.{i}.ln0 / attn / ff)")
    if original or diffusers:
        return "original" if original else "diffusers"
    if "proj.weight" in image_proj or "proj.0.weight" in image_proj or "norm.weight" in image_proj:
        kind = "a plain IP-Adapter (image_proj.proj: 4 tokens from the pooled embedding) or a Full/FaceID variant"
    elif "perceiver_resampler.proj_in.weight" in image_proj:
        kind = "an IP-Adapter FaceID-Plus"
    else:
        kind = f"image_proj keys {sorted(image_proj)[:8]}"
    raise ConversionError(f"[ip_adapter] {source}: not an IP-Adapter-Plus resampler ({kind}); only the Perceiver "
                          "Resampler of IP-Adapter-Plus is supported")


def infer_resampler_config(image_proj: Mapping[str, np.ndarray], layout: str | None = None,
                           dim_head: int = DIM_HEAD, source: str = "IP-Adapter state") -> ResamplerConfig:
    """The `ResamplerConfig` of an `image_proj` state dict (keys without the prefix; `layout` detected when None),
    inferred from its shapes as diffusers does (module docstring); heads = to_q rows // `dim_head`."""
    layout = layout or detect_layout(image_proj, source)
    shape = lambda k: tuple(np.shape(image_proj[k]))
    depth = 1 + max((int(m.group(1)) for k in image_proj if (m := _ANY_LAYER.match(k))), default=-1)
    if layout == "original":
        q_keys = [f"layers.{i}.0.to_q.weight" for i in range(depth)]
        ff_keys = [f"layers.{i}.1.1.weight" for i in range(depth)]
    else:
        q_keys = [f"layers.{i}.attn.to_q.weight" for i in range(depth)]
        ff_keys = [f"layers.{i}.ff.1.net.0.proj.weight" for i in range(depth)]
    needed = {"latents": ["latents"], "proj_in.weight": ["proj_in.weight"], "proj_out.weight": ["proj_out.weight"],
              q_keys[0] if q_keys else "layers.0 to_q": q_keys, ff_keys[0] if ff_keys else "layers.0 ff": ff_keys}
    absent = [f"image_proj.{name}" for name, options in needed.items() if not any(k in image_proj for k in options)]
    if absent:
        raise ConversionError(mismatch_message(f"[ip_adapter] {source}: cannot infer the resampler config "
                                               "(keys it is read from are missing):", missing=absent))
    latents = shape("latents")
    q = shape(next(k for k in q_keys if k in image_proj))
    ff = shape(next(k for k in ff_keys if k in image_proj))
    problems = []
    if len(latents) != 3 or latents[0] != 1:
        problems.append(f"image_proj.latents: {latents}, expected (1, num_queries, dim)")
    if len(q) != 2 or q[0] % dim_head:
        problems.append(f"image_proj.{q_keys[0]}: {q}, expected (heads * {dim_head}, dim): dim_head {dim_head} is "
                        "assumed (as diffusers does); pass dim_head= for another width")
    if len(ff) != 2 or len(latents) != 3 or ff[0] % latents[2]:
        problems.append(f"image_proj.{ff_keys[0]}: {ff}, expected (ff_mult * dim, dim)")
    if len(shape("proj_in.weight")) != 2 or len(shape("proj_out.weight")) != 2:
        problems.append(f"image_proj.proj_in.weight {shape('proj_in.weight')} / proj_out.weight "
                        f"{shape('proj_out.weight')}: expected 2-D linear weights")
    if problems:
        raise ConversionError(mismatch_message(f"[ip_adapter] {source}: cannot infer the resampler config:",
                                               misshaped=problems))
    try:
        return ResamplerConfig(dim=latents[2], depth=depth, dim_head=dim_head, heads=q[0] // dim_head,
                               num_queries=latents[1], embedding_dim=shape("proj_in.weight")[1],
                               output_dim=shape("proj_out.weight")[0], ff_mult=ff[0] // latents[2])
    except ValueError as e:
        raise ConversionError(f"[ip_adapter] {source}: the inferred resampler config is invalid: {e}") from e


# --- reading ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Problems:
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    misshaped: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self):
        return bool(self.missing or self.unexpected or self.misshaped)

    def raise_if_any(self, what: str):
        if self:
            raise ConversionError(mismatch_message(what, sorted(self.missing), sorted(self.unexpected),
                                                   sorted(self.misshaped)))


def _split_state(state: Mapping[str, np.ndarray], problems: _Problems) -> tuple[dict, dict]:
    """Flat file keys -> (image_proj, ip_adapter) dicts without their prefixes; other keys are unexpected."""
    image_proj, ip = {}, {}
    for key, value in state.items():
        if key.startswith("image_proj."):
            image_proj[key.removeprefix("image_proj.")] = value
        elif key.startswith("ip_adapter."):
            ip[key.removeprefix("ip_adapter.")] = value
        else:
            problems.unexpected.append(key)
    return image_proj, ip


def _read_image_proj(image_proj, dim_head, source, problems) -> tuple[ResamplerConfig, dict | None]:
    """(config, Resampler params or None where keys do not fit; `problems` gets them, named as in the file)."""
    layout = detect_layout(image_proj, source)
    config = infer_resampler_config(image_proj, layout, dim_head, source)
    expected = _expected_shapes(config, layout)
    bad = _Problems(
        missing=[f"image_proj.{k}" for k in expected if k not in image_proj],
        unexpected=[f"image_proj.{k}" for k in image_proj if k not in expected],
        misshaped=[f"image_proj.{k}: file has {tuple(np.shape(image_proj[k]))}, expected {shape}"
                   for k, shape in expected.items() if k in image_proj and tuple(np.shape(image_proj[k])) != shape])
    for name in ("missing", "unexpected", "misshaped"):
        getattr(problems, name).extend(getattr(bad, name))
    if bad:
        return config, None
    state = {k: np.asarray(v, np.float32) for k, v in image_proj.items()}
    if layout == "original":
        state = diffusers_from_original(state, config.depth)
    return config, resampler_from_torch(state, config)


def _read_ip_layers(ip, problems) -> dict[int, dict[str, np.ndarray]]:
    """{"<i>.to_k_ip.weight": (inner, cross)} -> {i: {"to_k_ip": (cross, inner) kernel, ...}}."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, value in ip.items():
        m = _IP_KEY.match(key)
        if not m:
            problems.unexpected.append(f"ip_adapter.{key}")
            continue
        value = np.asarray(value, np.float32)
        if value.ndim != 2:
            problems.misshaped.append(f"ip_adapter.{key}: file has {value.shape}, expected a 2-D (inner, "
                                      "cross_attention_dim) linear weight")
            continue
        out.setdefault(int(m.group(1)), {})[m.group(2)] = value.T
    for i, pair in out.items():
        for name in IP_NAMES:
            if name not in pair:
                problems.missing.append(f"ip_adapter.{i}.{name}.weight")
        if len(pair) == 2 and pair["to_k_ip"].shape != pair["to_v_ip"].shape:
            problems.misshaped.append(f"ip_adapter.{i}.to_v_ip.weight: file has {pair['to_v_ip'].T.shape}, but "
                                      f"ip_adapter.{i}.to_k_ip.weight has {pair['to_k_ip'].T.shape}")
    return dict(sorted(out.items()))


def _read(path, dim_head, problems) -> tuple[ResamplerConfig, dict, dict, str]:
    source = str(user_path(path))
    state = safetensors_io.read_weights(path)
    image_proj, ip = _split_state(state, problems)
    if not image_proj or not ip:
        missing = [p for p, part in (("image_proj.*", image_proj), ("ip_adapter.*", ip)) if not part]
        raise ConversionError(mismatch_message(f"[ip_adapter] {source}: not an IP-Adapter file (it needs image_proj "
                                               "and ip_adapter tensors)", missing=missing))
    config, params = _read_image_proj(image_proj, dim_head, source, problems)
    return config, params, _read_ip_layers(ip, problems), source


def read_ip_adapter(path: str | os.PathLike, dim_head: int = DIM_HEAD) -> tuple[ResamplerConfig, dict]:
    """An IP-Adapter-Plus file (`.safetensors` with flat keys, or the original nested `.bin`; either resampler
    layout) -> (its inferred `ResamplerConfig`, {"image_proj": Resampler params, "ip_adapter": {i: {"to_k_ip":
    kernel, "to_v_ip": kernel}}}), numpy float32, kernels (cross_attention_dim, inner) as Flax's Dense holds them.
    `dim_head`: the resampler's head width, which the weights do not show (diffusers assumes 64)."""
    problems = _Problems()
    config, params, ip, source = _read(path, dim_head, problems)
    problems.raise_if_any(f"[ip_adapter] {source} is not a consistent IP-Adapter-Plus file:")
    return config, {"image_proj": params, "ip_adapter": ip}


# --- into a unet_motion ---------------------------------------------------------------------------------------------
def _image_config(config: UNetMotionConfig) -> UNetMotionConfig:
    if not config.image_attention:
        raise ValueError("the U-Net config has image_attention=False: IP-Adapter weights need "
                         "dataclasses.replace(config, image_attention=True)")
    return config


def _ip_targets(config, unet_params, abstract, problems, ip) -> dict:
    """The U-Net's params with the file's `to_k_ip`/`to_v_ip` set; file problems into `problems`, U-Net ones
    raised at once."""
    if abstract is None:
        abstract = UNET_MOTION.abstract_params(UNetMotionModel(config))
    flat = {p: v for p, v in traverse_util.flatten_dict(nn.meta.unbox(dict(unet_params))).items()
            if not (len(p) >= 2 and p[-2] in IP_NAMES)}  # any earlier image projections are replaced
    base = {p: a for p, a in abstract.items() if not (len(p) >= 2 and p[-2] in IP_NAMES)}
    unet = _Problems(
        missing=["/".join(p) for p in base if p not in flat],
        unexpected=["/".join(p) for p in flat if p not in base],
        misshaped=[f"{'/'.join(p)}: {tuple(np.shape(v))}, expected {tuple(base[p].shape)}"
                   for p, v in flat.items() if p in base and tuple(np.shape(v)) != tuple(base[p].shape)])
    unet.raise_if_any(f"the U-Net parameters do not match UNetMotionModel({type(config).__name__}(...)) with image "
                      "attention:")
    out = dict(flat)
    layers = unet_motion_attn2(config)
    wanted = {ip_adapter_index(n): (torch_path, flax) for n, (torch_path, flax) in enumerate(layers)}
    for i, (torch_path, flax) in wanted.items():
        for name in IP_NAMES:
            key, path = f"ip_adapter.{i}.{name}.weight", (*flax, name, "kernel")
            want = tuple(abstract[path].shape)
            kernel = ip.get(i, {}).get(name)
            if kernel is None:  # named once, with the layer it belongs to
                problems.missing[:] = [m for m in problems.missing if m != key] + [f"{key} ({torch_path})"]
            elif tuple(kernel.shape) != want:
                problems.misshaped[:] = [m for m in problems.misshaped if not m.startswith(f"{key}:")] + [
                    f"{key}: file has {tuple(kernel.shape[::-1])}, {torch_path} expects {want[::-1]}"]
            else:
                out[path] = kernel
    problems.unexpected.extend(f"ip_adapter.{i}.{name}.weight (the U-Net has {len(layers)} spatial cross-attentions, "
                               f"indices 1..{2 * len(layers) - 1})" for i in ip if i not in wanted
                               for name in IP_NAMES if name in ip[i])
    return out


def apply_ip_adapter(config: UNetMotionConfig, unet_params, ip_state: Mapping, abstract: dict | None = None) -> dict:
    """unet_motion params (with or without image projections) -> those of `UNetMotionModel(config)` (which has
    `image_attention`) with every spatial attn2's `to_k_ip`/`to_v_ip` taken from `ip_state` (`read_ip_adapter`'s
    second result, or anything with its "ip_adapter" entry), by IP-Adapter index (module docstring). Every index the
    U-Net needs must be there with its shape, and no other; `abstract`: the model's flat parameter shapes, when the
    caller has them."""
    config = _image_config(config)
    problems = _Problems()
    flat = _ip_targets(config, unet_params, abstract, problems, ip_state["ip_adapter"])
    problems.raise_if_any("[ip_adapter] the IP-Adapter weights do not fit the U-Net:")
    return traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()})


def load_ip_adapter(path: str | os.PathLike, config: UNetMotionConfig, unet_params, dim_head: int = DIM_HEAD,
                    abstract: dict | None = None) -> tuple[ResamplerConfig, dict, dict]:
    """`read_ip_adapter` + `apply_ip_adapter` in one pass: (resampler config, resampler params, U-Net params with
    the image projections). Every problem of the file, in its resampler and in its attention layers, is reported in
    one `ConversionError`; the resampler's output width must be the U-Net's cross-attention width."""
    config = _image_config(config)
    problems = _Problems()
    rcfg, resampler, ip, source = _read(path, dim_head, problems)
    flat = _ip_targets(config, unet_params, abstract, problems, ip)
    cross = config.per_block("cross_attention_dim")[0]
    if rcfg.output_dim != cross:
        problems.misshaped.append(f"image_proj.proj_out.weight: output width {rcfg.output_dim}, the U-Net's "
                                  f"cross_attention_dim is {cross}")
    problems.raise_if_any(f"[ip_adapter] {source} does not fit the U-Net:")
    return rcfg, resampler, traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()})


# --- writing ----------------------------------------------------------------------------------------------------------
def ip_adapter_state_dict(resampler_params, resampler_config: ResamplerConfig, config: UNetMotionConfig,
                          unet_params, layout: str = "original") -> dict[str, np.ndarray]:
    """The flat tensors of an IP-Adapter-Plus file: `image_proj.*` in `layout` ("original": what diffusers'
    `load_ip_adapter` reads; "diffusers": IPAdapterPlusImageProjection's state dict) and
    `ip_adapter.<2n+1>.to_k_ip.weight` / `.to_v_ip.weight` of the U-Net's spatial attn2 layers (PyTorch layouts)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config = _image_config(config)
    cross = config.per_block("cross_attention_dim")[0]
    if resampler_config.output_dim != cross:
        raise ValueError(f"resampler output_dim={resampler_config.output_dim} must equal the U-Net's "
                         f"cross_attention_dim={cross}")
    proj = resampler_to_torch(jax.device_get(resampler_params), resampler_config)
    if layout == "original":
        proj = original_from_diffusers(proj, resampler_config.depth)
    out = {f"image_proj.{k}": v for k, v in proj.items()}
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(jax.device_get(unet_params))))
    missing = []
    for n, (_, flax) in enumerate(unet_motion_attn2(config)):
        for name in IP_NAMES:
            path = (*flax, name, "kernel")
            if path not in flat:
                missing.append("/".join(path))
                continue
            out[f"ip_adapter.{ip_adapter_index(n)}.{name}.weight"] = np.ascontiguousarray(np.asarray(flat[path]).T)
    if missing:
        raise ConversionError(mismatch_message("[ip_adapter] the U-Net parameters lack image projections:",
                                               missing=missing))
    return {k: v if v.dtype == np.float16 else np.asarray(v, np.float32) for k, v in out.items()}


def check_diffusers_loadable(resampler_config: ResamplerConfig) -> None:
    """diffusers' `load_ip_adapter` rebuilds the resampler from the shapes with dim_head 64, depth 4 and ffn_ratio 4
    (module docstring): any other config would fail there (or load wrongly), so it is refused here."""
    got = dict(dim_head=resampler_config.dim_head, depth=resampler_config.depth, ff_mult=resampler_config.ff_mult)
    want = dict(dim_head=DIM_HEAD, depth=DIFFUSERS_DEPTH, ff_mult=DIFFUSERS_FF_MULT)
    bad = [f"{k}={got[k]} (needs {want[k]})" for k in got if got[k] != want[k]]
    if bad:
        raise ValueError(f"diffusers' load_ip_adapter cannot read this resampler: {', '.join(bad)}; it infers heads "
                         "= inner // 64 and builds IPAdapterPlusImageProjection with depth 4 and ffn_ratio 4")


def ip_adapter_to_torch(resampler_params, resampler_config: ResamplerConfig, config: UNetMotionConfig, unet_params,
                        dst_file: str | os.PathLike, overwrite: bool = False) -> epath.Path:
    """Write `ip_adapter.safetensors`-style DST_FILE (`ip_adapter_state_dict`, original layout) that diffusers'
    `pipe.load_ip_adapter(folder, subfolder="", weight_name=name)` loads into an AnimateDiff pipeline's
    UNetMotionModel (or the SD U-Net it was made from). The resampler must be one diffusers can rebuild
    (`check_diffusers_loadable`); an existing file is refused unless `overwrite`. Written whole or not at all."""
    dst = as_path(dst_file)
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: the IP-Adapter file must be a .safetensors file")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    check_diffusers_loadable(resampler_config)
    state = ip_adapter_state_dict(resampler_params, resampler_config, config, unet_params)
    safetensors_io.write_state_dict(state, dst.parent, dst.name.removesuffix(".safetensors"))
    return dst


__all__ = [
    "DIM_HEAD", "apply_ip_adapter", "base_config", "check_diffusers_loadable", "detect_layout",
    "diffusers_from_original", "infer_resampler_config", "ip_adapter_index", "ip_adapter_state_dict",
    "ip_adapter_to_torch", "load_ip_adapter", "original_from_diffusers", "read_ip_adapter", "resampler_from_torch",
    "resampler_rules", "resampler_to_torch", "spatial_attn2", "unet_motion_attn2",
]
