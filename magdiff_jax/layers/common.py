"""Dense, Conv and normalisation layers whose parameters carry logical axis names.

Every parameter in the project is created through these factories, so every parameter has logical axis names
that `magdiff_jax.sharding` maps to mesh axes. They return plain `flax.linen` layers (no extra nesting level), so
parameter trees read `to_q/kernel`, `conv1/bias`, `norm1/scale`. The logical names are:

  embed     a model-width input dimension of a dense kernel            (-> fsdp)
  mlp       the output dimension of a dense kernel                      (-> tensor)
  heads     the flattened heads*head_dim output of q/k/v projections    (-> tensor)
  conv_in   input channels of a conv kernel                             (-> fsdp)
  conv_out  output channels of a conv kernel                            (replicated: see sharding.py)
  conv_t, conv_h, conv_w   temporal / spatial kernel taps               (replicated)
  norm      scales and biases of normalisation layers                   (replicated)
  vocab     rows of an embedding table                                  (replicated)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magdiff_jax.layers import kernels

Dtype = Any
# Uniform with LeCun's variance (1 / fan_in), as Flax's default truncated normal has: a model trains from it alike, and
# XLA compiles a uniform draw several times faster than a normal one (benchmarks/init_compile.py).
default_kernel_init = nn.initializers.lecun_uniform()


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense`'s product, through `matmul` where it is the plain x (..., in) @ kernel (in, out) product."""
    plain = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
    if plain and precision is None and preferred_element_type is None and lhs.dtype == rhs.dtype:
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def matmul(x, kernel):
    """x (..., in) @ kernel (in, out), the product of every dense layer: the override point `matmul`
    (`layers.kernels`), `jnp.dot` by default."""
    return kernels.get("matmul")(x, kernel)


@kernels.default("matmul")
def plain_matmul(x, kernel):
    return jnp.dot(x, kernel)


def _named(init, names):
    return nn.with_logical_partitioning(init, tuple(names))


def dense(
    features: int,
    *,
    axes: tuple[str, str] = ("embed", "mlp"),
    use_bias: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    name: str | None = None,
) -> nn.Dense:
    """`nn.Dense` with logical names `axes` on its kernel and `axes[1:]` on its bias, its product through `matmul`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_named(kernel_init, axes),
        bias_init=_named(nn.initializers.zeros_init(), axes[1:]),
        dot_general=_dense_dot_general,
        name=name,
    )


_ZEROS = nn.initializers.zeros_init()


def conv(
    features: int,
    kernel_size: Sequence[int] = (3, 3),
    *,
    strides: Sequence[int] | None = None,
    padding: Any = "SAME",
    use_bias: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    bias_init=_ZEROS,
    name: str | None = None,
) -> nn.Conv:
    """Channels-last `nn.Conv` with logical names `([conv_t,] [conv_h,] conv_w, conv_in, conv_out)` on its kernel."""
    if not 1 <= len(kernel_size) <= 3:
        raise ValueError(f"conv kernel_size must have 1 to 3 dims, got {kernel_size}")
    names = (*("conv_t", "conv_h", "conv_w")[-len(kernel_size):], "conv_in", "conv_out")
    return nn.Conv(
        features,
        kernel_size=tuple(kernel_size),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_named(kernel_init, names),
        bias_init=_named(bias_init, ("conv_out",)),
        name=name,
    )


class GroupNorm(nn.Module):
    """GroupNorm over the channel (last) axis with statistics over every other non-batch axis, as
    `torch.nn.GroupNorm` (and `flax.linen.GroupNorm`) compute it; parameters `scale` and `bias`.

    Channels-last, it is computed as per-channel sums over the positions (contiguous along C), combined into group
    statistics, and one multiply-add per element: y = x * a + b with a = scale / sqrt(var + eps) and
    b = bias - mean * a per (sample, channel): several times faster on CPU than `flax.linen.GroupNorm`'s form
    (benchmarks/README.md). Statistics in float32, variance as E[x^2] - E[x]^2 (Flax's default). Whether the batch
    axis stays in the computation is the override point `group_norm_keeps_batch` (`layers.kernels`; by default it
    stays).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    affine: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        if x.ndim < 2 or c % g:
            raise ValueError(f"{self.name or 'GroupNorm'}: {c} channels do not split into {g} groups "
                             f"(input shape {x.shape})")
        lead = (b,) if kernels.get("group_norm_keeps_batch")(x) else ()
        xf = x.reshape(*lead, -1, c).astype(jnp.float32)  # ([B,] N, C)
        pos = len(lead)  # the positions axis
        count = xf.shape[pos] * (c // g)
        group_sum = lambda t: jnp.repeat(t.reshape(*lead, g, c // g).sum(-1), c // g, axis=-1)  # ([B,] C)
        mean = group_sum(jnp.sum(xf, axis=pos)) / count
        var = jnp.maximum(group_sum(jnp.sum(jnp.square(xf), axis=pos)) / count - jnp.square(mean), 0.0)
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            mul = mul * self.param("scale", _named(nn.initializers.ones_init(), ("norm",)), (c,),
                                   self.param_dtype).astype(jnp.float32)
        shift = -mean * mul
        if self.affine:
            shift = shift + self.param("bias", _named(nn.initializers.zeros_init(), ("norm",)), (c,),
                                       self.param_dtype).astype(jnp.float32)
        y = xf * jnp.expand_dims(mul, pos) + jnp.expand_dims(shift, pos)
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        return y.reshape(x.shape).astype(dtype)


def group_norm(
    num_groups: int = 32,
    *,
    epsilon: float = 1e-5,
    affine: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> GroupNorm:
    """`GroupNorm` over the channel (last) axis; statistics in float32."""
    return GroupNorm(num_groups, epsilon, affine, dtype, param_dtype, name=name)


@kernels.default("group_norm_keeps_batch")
def always_keep_batch(x) -> bool:
    return True


def layer_norm(
    *,
    epsilon: float = 1e-5,
    affine: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
    """LayerNorm over the last axis; statistics are computed in float32 by Flax."""
    return nn.LayerNorm(
        epsilon=epsilon,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_named(nn.initializers.ones_init(), ("norm",)),
        bias_init=_named(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def embedding(
    num_embeddings: int,
    features: int,
    *,
    axes: tuple[str, str] = ("vocab", "embed"),
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Embed:
    """`nn.Embed` whose table carries logical names `axes`."""
    return nn.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=_named(nn.initializers.normal(stddev=0.02), axes),
        name=name,
    )


def gelu(x):
    """The exact GELU, x * Phi(x), in PyTorch's form 0.5 * x * (1 + erf(x / sqrt(2))). `jax.nn.gelu(x,
    approximate=False)` takes Phi from erfc instead (more accurate far in the negative tail, where GELU is ~0 anyway),
    which XLA's CPU backend computes as a slower piecewise expansion (benchmarks/README.md); the two agree to 2e-6."""
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def activation(name: str):
    """The activation function named as in diffusers/transformers configs (`silu`, `gelu`, `quick_gelu`, ...)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def compute_dtype(name: str | None):
    """The compute dtype named in a model config ("float32", "bfloat16", "float16"); None keeps input dtypes."""
    if name is None:
        return None
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"unknown compute dtype {name!r}; use float32, bfloat16 or float16") from None
