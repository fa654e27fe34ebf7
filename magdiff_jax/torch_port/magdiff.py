"""The MagDiff U-Net in PyTorch, around diffusers: runs a folder written by `magdiff-jax convert to-torch --kind
magdiff` (layout: `magdiff_jax.convert.magdiff`) and computes what `models.magdiff.MagDiffUNet` computes.

    model = load_magdiff_torch("out/magdiff_torch")      # eval mode, fp32
    noise_pred = model(sample, timestep, encoder_hidden_states, entity_latents, image_embeds)

    sample                 (B, C, F, H, W)       noisy latents, as diffusers' UNet3DConditionModel takes them
    timestep               (B,) or scalar
    encoder_hidden_states  (B, L, D)             text tokens
    entity_latents         3 x (B, C, F, h_i, w_i)  the subject's latents at three scales, largest first (the
                                                 smallest at H x W); pyramid "single": one grid, or the last
    image_embeds           (B, F, T, E)          CLIP tokens of each frame's subject
      -> (B, C, F, H, W)

Parts: diffusers `UNet3DConditionModel` (`unet`, in_channels = C + entity_channels), diffusers
`IPAdapterPlusImageProjection` (`image_proj`), `EntityPyramidTorch` (`entity_pyramid`), and a
`MagDiffAttnProcessor` installed on every spatial transformer's attn2. The image tokens reach those processors
through `cross_attention_kwargs={"ip_hidden_states": tokens}`: UNet3DConditionModel hands cross_attention_kwargs to
every attention (transformer_in and the temporal transformers too), and diffusers' `Attention` passes
`ip_hidden_states` on only to processors that take it, without a warning for the others.

Frames: with F > 1 the two frameworks compute the same thing (tests/test_magdiff_export.py); a one-frame input
differs, since the JAX U-Net then skips its temporal layers (models/unet3d.py) while diffusers runs them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from magdiff_jax.utils.errors import ConversionError, mismatch_message
from magdiff_jax.utils.magdiff_layout import (  # the export layout of `magdiff_jax.convert.magdiff` (no JAX)
    FORMAT,
    FORMAT_VERSION,
    IMAGE_TOKEN_MODES,
    IP_ADAPTER_FILE,
    META_FILE,
    PYRAMID_FILE,
    SCALARS,
    UNET_DIR,
)

SPATIAL_ATTN2 = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+"
                           r"\.attn2\.processor$")


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, prefix: str = "") -> None:
    """`module.load_state_dict(state)`, after checking that the keys and shapes match exactly (else an error that
    names `source` and every missing, unexpected and mis-shaped key, as `prefix` + key)."""
    own = module.state_dict()
    missing = sorted(prefix + k for k in own if k not in state)
    unexpected = sorted(prefix + k for k in state if k not in own)
    misshaped = sorted(f"{prefix}{k}: file has {tuple(state[k].shape)}, model expects {tuple(own[k].shape)}"
                       for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or misshaped:
        raise ConversionError(mismatch_message(f"[magdiff] {source} does not match the model", missing, unexpected,
                                               misshaped))
    module.load_state_dict(dict(state))


class EntityPyramidTorch(nn.Module):
    """`models.magdiff.EntityPyramid` (MagDiff's High-Fidelity Alignment) on (B, C, F, h, w) latents:

        p = scale_0(z_large)                          Conv3x3 in -> channels
        p = resize(p, mid) + scale_1(z_mid)           bilinear, align_corners=False, no antialias
        p = fuse(p)                                   Conv3x3
        p = resize(p, small) + scale_2(z_small)
        e = proj_out(p)                               Conv1x1 -> out_channels

    `F.interpolate(mode="bilinear", align_corners=False, antialias=False)` is `jax.image.resize(..., "bilinear",
    antialias=False)`: both sample at half-pixel centres with the plain triangle kernel, down- and upscaling
    (tests/test_magdiff_export.py). Mode "single" returns the smallest grid and has no parameters."""

    def __init__(self, mode: str = "multi", channels: int = 64, in_channels: int = 4, out_channels: int = 4):
        super().__init__()
        if mode not in ("multi", "single"):
            raise ValueError(f"pyramid mode must be 'multi' or 'single', got {mode!r}")
        self.mode, self.out_channels = mode, out_channels
        if mode == "multi":
            self.scale_0 = nn.Conv2d(in_channels, channels, 3, padding=1)
            self.scale_1 = nn.Conv2d(in_channels, channels, 3, padding=1)
            self.fuse = nn.Conv2d(channels, channels, 3, padding=1)
            self.scale_2 = nn.Conv2d(in_channels, channels, 3, padding=1)
            self.proj_out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, latents: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        grids = (latents,) if isinstance(latents, torch.Tensor) else tuple(latents)
        for z in grids:
            if z.ndim != 5:
                raise ValueError(f"entity latents must be (B, C, F, h, w) grids, got shape {tuple(z.shape)}")
        if self.mode == "single":
            if grids[-1].shape[1] != self.out_channels:
                raise ValueError(f"pyramid 'single' passes the latent through: it must have {self.out_channels} "
                                 f"channels, got {tuple(grids[-1].shape)}")
            return grids[-1]
        if len(grids) != 3:
            raise ValueError(f"the entity pyramid takes three latent grids (largest first), got {len(grids)}")
        b, _, f = grids[0].shape[:3]
        frames = [z.permute(0, 2, 1, 3, 4).reshape(b * f, z.shape[1], *z.shape[3:]) for z in grids]  # (B*F, C, h, w)
        resize = lambda p, like: F.interpolate(p, size=tuple(like.shape[-2:]), mode="bilinear", align_corners=False,
                                               antialias=False)
        p = self.scale_0(frames[0])
        p = resize(p, frames[1]) + self.scale_1(frames[1])
        p = self.fuse(p)
        p = resize(p, frames[2]) + self.scale_2(frames[2])
        e = self.proj_out(p)  # (B*F, out, h, w)
        return e.reshape(b, f, *e.shape[1:]).permute(0, 2, 1, 3, 4)


class MagDiffAttnProcessor(nn.Module):
    """diffusers attention processor for a spatial transformer's attn2: `layers.attention.EntityAttention`,

        out = to_out( text_scale * SDPA(Q, K_t, V_t) + image_scale * SDPA(Q, K_ip, V_ip) )
        Q = attn.to_q(x),  K_t, V_t = attn.to_k/to_v(text),  K_ip, V_ip = to_k_ip/to_v_ip(image tokens)

    with the heads of diffusers' `Attention` (inner dim split into attn.heads) shared by both branches. Parameters:
    `to_k_ip`, `to_v_ip` (nn.Linear(cross_attention_dim, hidden_size, bias=False)) and the one-value (shape (1,))
    `text_scale`, `image_scale`. The image tokens come as `ip_hidden_states` (B, N, cross_attention_dim), one set
    per video (frame-major); the processor repeats them for the video's frames as the text is repeated (the
    attention's batch is B*F). `image_token_mode` "all": every frame sees all N tokens; "own_and_first": the tokens
    are F groups of N // F and frame i sees group i and group 0 only. `attention_mask`, when given, masks the text
    branch."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, image_token_mode: str = "all",
                 text_scale: float = 1.0, image_scale: float = 1.5):
        super().__init__()
        if image_token_mode not in IMAGE_TOKEN_MODES:
            raise ValueError(f"image_token_mode must be one of {IMAGE_TOKEN_MODES}, got {image_token_mode!r}")
        self.image_token_mode = image_token_mode
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.text_scale = nn.Parameter(torch.full((1,), float(text_scale)))  # one value, as in ip_adapter.safetensors
        self.image_scale = nn.Parameter(torch.full((1,), float(image_scale)))

    def image_mask(self, batch: int, num_tokens: int, frames: int, device) -> torch.Tensor | None:
        """(batch, 1, 1, N) booleans for "own_and_first" (True keeps a token), None for "all"."""
        if self.image_token_mode == "all":
            return None
        if num_tokens % frames:
            raise ValueError(f"image_token_mode 'own_and_first' needs the N={num_tokens} image tokens to be F={frames} "
                             "equal frame-major groups")
        token_frame = torch.arange(num_tokens, device=device) // (num_tokens // frames)  # (N,)
        frame = torch.arange(batch, device=device) % frames  # attention rows are b * F + f
        keep = (token_frame[None] == frame[:, None]) | (token_frame[None] == 0)
        return keep[:, None, None, :]

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("MagDiffAttnProcessor is a cross-attention processor: encoder_hidden_states are needed")
        if ip_hidden_states is None:
            raise ValueError("MagDiffAttnProcessor needs the image tokens: call the U-Net with "
                             "cross_attention_kwargs={'ip_hidden_states': (B, N, cross_attention_dim) tokens}")
        if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("MagDiffAttnProcessor supports attentions without spatial_norm/norm_q/norm_k")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, text_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        if ip_hidden_states.ndim != 3 or batch % ip_hidden_states.shape[0]:
            raise ValueError(f"ip_hidden_states must be (B, N, D) with B dividing the attention batch {batch} "
                             f"(B * frames), got shape {tuple(ip_hidden_states.shape)}")
        videos, num_tokens = ip_hidden_states.shape[:2]
        frames = batch // videos
        image = ip_hidden_states.to(hidden_states.dtype).repeat_interleave(frames, dim=0)  # (B*F, N, D)

        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        key_ip, value_ip = self.to_k_ip(image), self.to_v_ip(image)
        head_dim = key.shape[-1] // attn.heads
        split = lambda t: t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B*F, heads, L, head_dim)
        query = split(query)
        text = F.scaled_dot_product_attention(query, split(key), split(value), attn_mask=attention_mask)
        mask = self.image_mask(batch, num_tokens, frames, query.device)
        image = F.scaled_dot_product_attention(query, split(key_ip), split(value_ip), attn_mask=mask)
        out = self.text_scale.to(text.dtype) * text + self.image_scale.to(image.dtype) * image
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class MagDiffUNetTorch(nn.Module):
    """`models.magdiff.MagDiffUNet` in PyTorch (module docstring): `unet` (diffusers UNet3DConditionModel with
    `MagDiffAttnProcessor`s on its spatial attn2 layers), `image_proj` (diffusers IPAdapterPlusImageProjection),
    `entity_pyramid` (`EntityPyramidTorch`). `config` is the MagDiffConfig as a dict (magdiff.json's "config")."""

    def __init__(self, unet: nn.Module, image_proj: nn.Module, entity_pyramid: EntityPyramidTorch, config: Mapping):
        super().__init__()
        self.unet, self.image_proj, self.entity_pyramid = unet, image_proj, entity_pyramid
        self.config = dict(config)

    @property
    def processors(self) -> dict[str, MagDiffAttnProcessor]:
        """The installed MagDiffAttnProcessors by their `attn_processors` key, in order."""
        return {k: v for k, v in self.unet.attn_processors.items() if isinstance(v, MagDiffAttnProcessor)}

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                entity_latents: torch.Tensor | Sequence[torch.Tensor], image_embeds: torch.Tensor) -> torch.Tensor:
        latent_channels = self.config["latent_channels"]
        if sample.ndim != 5 or sample.shape[1] != latent_channels:
            raise ValueError(f"sample must be (B, {latent_channels}, F, H, W) noisy latents, got {tuple(sample.shape)}")
        b, _, f, h, w = sample.shape
        entity = self.entity_pyramid(entity_latents)  # (B, entity_channels, F, H, W)
        if entity.shape[0] != b or tuple(entity.shape[2:]) != (f, h, w):
            raise ValueError(f"the entity input {tuple(entity.shape)} does not match the noisy latents "
                             f"{tuple(sample.shape)}: the smallest entity latent grid must have the video's frames "
                             "and latent size")
        x = torch.cat([sample, entity.to(sample.dtype)], dim=1)  # (B, latent + entity, F, H, W)
        embed_dim = self.config["resampler"]["embedding_dim"]
        if image_embeds.ndim != 4 or tuple(image_embeds.shape[:2]) != (b, f) or image_embeds.shape[-1] != embed_dim:
            raise ValueError(f"image_embeds must be (B={b}, F={f}, T, {embed_dim}) CLIP tokens per frame, got "
                             f"{tuple(image_embeds.shape)}")
        tokens = self.image_proj(image_embeds.reshape(b * f, *image_embeds.shape[2:]))  # (B*F, Q, D)
        tokens = tokens.reshape(b, f * tokens.shape[1], tokens.shape[2])  # frame-major, frame 0's tokens first
        return self.unet(x, timestep, encoder_hidden_states, cross_attention_kwargs={"ip_hidden_states": tokens},
                         return_dict=False)[0]


def _read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {META_FILE}; expected a folder written by `magdiff-jax convert "
                                "to-torch --kind magdiff`")
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a MagDiff PyTorch export of format {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the MagDiff export")
    return load_file(str(path))


def load_magdiff_torch(folder: str | os.PathLike) -> MagDiffUNetTorch:
    """A MagDiff export (`magdiff-jax convert to-torch --kind magdiff`) -> `MagDiffUNetTorch`, in eval mode.
    Every file's keys and shapes are checked (an error names each missing, unexpected or mis-shaped key)."""
    from diffusers import UNet3DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    folder = Path(folder)
    meta = _read_meta(folder)
    cfg = meta["config"]
    unet = UNet3DConditionModel.from_pretrained(folder / UNET_DIR)
    image_proj = IPAdapterPlusImageProjection(**meta["resampler"])
    pyramid = EntityPyramidTorch(cfg["pyramid"], cfg["pyramid_channels"], cfg["latent_channels"],
                                 cfg["entity_channels"])

    paths = list(meta["processors"])
    found = [k for k in unet.attn_processors if SPATIAL_ATTN2.match(k)]
    if paths != found:
        raise ValueError(f"{folder / META_FILE}: processors {paths} are not the spatial attn2 processors of "
                         f"{folder / UNET_DIR}: {found}")
    ip_file = folder / IP_ADAPTER_FILE
    ip_state = _read_safetensors(ip_file)
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in ip_state.items() if k.startswith(prefix)}
    for k, v in ip_state.items():  # a () scalar is read as the processor's one-value parameter
        if k.endswith(tuple(f".{name}" for name in SCALARS)) and v.ndim == 0:
            ip_state[k] = v.reshape(1)
    other = sorted(k for k in ip_state if not k.startswith(("image_proj.", "ip_adapter.")))
    if other:
        raise ConversionError(mismatch_message(f"[magdiff] {ip_file} does not match the model", unexpected=other))
    load_state_strict(image_proj, part("image_proj."), str(ip_file), "image_proj.")
    modules = dict(unet.named_modules())
    processors = nn.ModuleDict()  # keyed by IP-Adapter's index 2k + 1 (convert.magdiff), as in the file
    for k, path in enumerate(paths):
        attn = modules[path.removesuffix(".processor")]
        processors[str(2 * k + 1)] = MagDiffAttnProcessor(attn.to_k.out_features, attn.to_k.in_features,
                                                          cfg["unet"]["image_token_mode"])
    load_state_strict(processors, part("ip_adapter."), str(ip_file), "ip_adapter.")
    unet.set_attn_processor({**unet.attn_processors, **dict(zip(paths, processors.values()))})

    if cfg["pyramid"] == "multi":
        load_state_strict(pyramid, _read_safetensors(folder / PYRAMID_FILE), str(folder / PYRAMID_FILE))
    elif (folder / PYRAMID_FILE).exists():
        raise ValueError(f"{folder / PYRAMID_FILE}: unexpected file; pyramid 'single' has no weights")
    return MagDiffUNetTorch(unet, image_proj, pyramid, cfg).eval()
