"""DINO's self-supervised ViT-S/16 (Caron et al. 2021), the feature network of the DINO subject-fidelity score.

    pixel_values = imagenet_normalise(images)                            # images (B, H, W, 3) in [0, 1]
    cls = DINOViT(DINOViTConfig()).apply({"params": p}, pixel_values)     # (B, 384): the final-norm CLS token

The layout of timm's `VisionTransformer` (`vit_small_patch16_224.dino`) and of the official DINO
`vision_transformer.py` (`dino_deitsmall16_pretrain.pth`), which name their parameters alike: `patch_embed/proj` (a
16x16 stride-16 convolution with bias), `cls_token` (1, 1, D), `pos_embed` (1, 1 + N, D) for the N = (224/16)^2
patches of a 224-pixel image, then `depth` pre-norm blocks

    x <- x + attn.proj(MHSA(attn.qkv(norm1(x))))        qkv: one (D -> 3D) linear with bias, heads of D / num_heads
    x <- x + mlp.fc2(GELU(mlp.fc1(norm2(x))))            exact (erf) GELU, hidden width mlp_ratio * D

and the final `norm`; the output is the class token after it (DINO's `forward`, timm's `forward_head` with
`global_pool="token"` and no head). LayerNorms use eps 1e-6. ViT-S/16: D = 384, 12 blocks, 6 heads, mlp_ratio 4.

Other input sizes (multiples of the patch size or not: the patch convolution drops the remainder) interpolate the
patch position embeddings as DINO's `interpolate_pos_encoding` does: the (n, n) grid is resized bicubically
(PyTorch's `interpolate(mode="bicubic")`: the cubic convolution with A = -0.75, half-pixel centres, edge samples
repeated) by the scale factors ((H // p + 0.1) / n, (W // p + 0.1) / n), so sampling positions are
(i + 0.5) n / (H // p + 0.1) - 0.5; the class token's embedding is kept. As in DINO, a square input with n x n
patches uses the table unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.layers.attention import dot_product_attention
from magdiff_jax.layers.common import compute_dtype, conv, dense, gelu, layer_norm
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC_A = -0.75  # PyTorch's (non-antialiased) bicubic kernel
POS_EMBED_OFFSET = 0.1  # DINO adds it to the target grid size "to avoid floating point error in the interpolation"


@dataclasses.dataclass(frozen=True)
class DINOViTConfig:
    """timm / DINO `VisionTransformer` arguments (ViT-S/16 by default). `img_size` sets the position table (its
    grid is img_size // patch_size on a side); `attention_impl` as in `magdiff_jax.layers.attention`."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
        check_names(self)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}",
                              "num_heads")
        if self.img_size < self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}", "img_size")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"expected a positive ratio, got {self.mlp_ratio}", "mlp_ratio")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def imagenet_normalise(images: jax.Array) -> jax.Array:
    """(..., 3) RGB in [0, 1] -> (x - mean) / std with ImageNet's mean and std, DINO's input normalisation."""
    mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
    std = jnp.asarray(IMAGENET_STD, images.dtype)
    return (images - mean) / std


def _cubic(t: np.ndarray) -> np.ndarray:
    """The cubic convolution kernel with A = BICUBIC_A at distance t >= 0 (zero beyond 2)."""
    a = BICUBIC_A
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's `interpolate(mode="bicubic", align_corners=False, scale_factor=scale)`
    along one axis: sample position (i + 0.5) / scale - 0.5, four taps at floor - 1 .. floor + 2 clamped to the
    edge, cubic-convolution weights."""
    src = (np.arange(n_out) + 0.5) / scale - 0.5
    base = np.floor(src)
    frac = src - base
    w = np.zeros((n_out, n_in), np.float64)
    for k in range(-1, 3):
        idx = np.clip(base.astype(int) + k, 0, n_in - 1)
        np.add.at(w, (np.arange(n_out), idx), _cubic(np.abs(frac - k)))
    return w


def interpolate_pos_embed(pos_embed: jax.Array, grid: tuple[int, int], image_size: tuple[int, int]) -> jax.Array:
    """DINO's `interpolate_pos_encoding`: the (1, 1 + n^2, D) table for an input of `image_size` (H, W) pixels that
    gives `grid` (H // p, W // p) patches -> (1, 1 + grid_h * grid_w, D) (module docstring)."""
    n_tokens = pos_embed.shape[1] - 1
    n = math.isqrt(n_tokens)
    if n * n != n_tokens:
        raise ValueError(f"DINO ViT: the position table holds {n_tokens} patch positions, not a square grid")
    gh, gw = grid
    if gh * gw == n_tokens and image_size[0] == image_size[1]:
        return pos_embed
    mh = jnp.asarray(bicubic_matrix(n, gh, (gh + POS_EMBED_OFFSET) / n), pos_embed.dtype)
    mw = jnp.asarray(bicubic_matrix(n, gw, (gw + POS_EMBED_OFFSET) / n), pos_embed.dtype)
    table = pos_embed[0, 1:].reshape(n, n, -1)
    hp = jax.lax.Precision.HIGHEST
    table = jnp.einsum("ph,hwd->pwd", mh, table, precision=hp)
    table = jnp.einsum("qw,pwd->pqd", mw, table, precision=hp)
    return jnp.concatenate([pos_embed[:, :1], table.reshape(1, gh * gw, -1)], axis=1)


class DINOAttention(nn.Module):
    config: DINOViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt = compute_dtype(c.dtype)
        b, length, d = x.shape
        qkv = dense(3 * d, axes=("embed", "heads"), dtype=dt, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, length, 3, c.num_heads, d // c.num_heads), 2, 0)
        out = dot_product_attention(q, k, v, implementation=c.attention_impl).reshape(b, length, d)
        return dense(d, axes=("heads", "embed"), dtype=dt, name="proj")(out)


class DINOMlp(nn.Module):
    config: DINOViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt = compute_dtype(c.dtype)
        x = gelu(dense(c.mlp_hidden, axes=("embed", "mlp"), dtype=dt, name="fc1")(x))
        return dense(c.embed_dim, axes=("mlp", "embed"), dtype=dt, name="fc2")(x)


class DINOBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x))."""

    config: DINOViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        ln = dict(epsilon=c.layer_norm_eps, dtype=compute_dtype(c.dtype))
        x = x + DINOAttention(c, name="attn")(layer_norm(name="norm1", **ln)(x))
        return x + DINOMlp(c, name="mlp")(layer_norm(name="norm2", **ln)(x))


class PatchEmbed(nn.Module):
    """`proj`: the patch_size x patch_size convolution of stride patch_size (with bias)."""

    config: DINOViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        p = c.patch_size
        return conv(c.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=compute_dtype(c.dtype), name="proj")(x)


class DINOViT(nn.Module):
    """(B, H, W, in_chans) channels-last, ImageNet-normalised (`imagenet_normalise`) -> (B, embed_dim) float32, the
    class token after the final norm. H and W of at least one patch; others than `img_size` interpolate the position
    table (module docstring)."""

    config: DINOViTConfig

    @nn.compact
    def __call__(self, pixel_values) -> jax.Array:
        c = self.config
        dt = compute_dtype(c.dtype)
        b, h, w, ch = pixel_values.shape
        p = c.patch_size
        if ch != c.in_chans or h < p or w < p:
            raise ValueError(f"DINO ViT: expected (batch, height, width, {c.in_chans}) channels-last images of at "
                             f"least {p} x {p} pixels, got shape {pixel_values.shape}")
        x = PatchEmbed(c, name="patch_embed")(pixel_values.astype(dt))  # (B, H // p, W // p, D)
        grid = x.shape[1:3]
        x = x.reshape(b, -1, c.embed_dim)  # row-major over the patch grid, as torch's flatten(2).transpose(1, 2)
        init = nn.initializers.truncated_normal(0.02)
        cls_token = self.param("cls_token", init, (1, 1, c.embed_dim), jnp.float32)
        pos_embed = self.param("pos_embed", init, (1, c.grid_size**2 + 1, c.embed_dim), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(dt), (b, 1, c.embed_dim)), x], axis=1)
        x = x + interpolate_pos_embed(pos_embed, grid, (h, w)).astype(dt)
        for i in range(c.depth):
            x = DINOBlock(c, name=f"blocks_{i}")(x)
        x = layer_norm(epsilon=c.layer_norm_eps, dtype=dt, name="norm")(x)
        return x[:, 0].astype(jnp.float32)


def example_inputs(config: DINOViTConfig) -> tuple:
    return (jnp.zeros((1, config.img_size, config.img_size, config.in_chans)),)


SPEC = register(ModelSpec("dino_vit", DINOViTConfig, DINOViT, example_inputs))
