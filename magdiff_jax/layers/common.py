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

Dtype = Any
default_kernel_init = nn.initializers.lecun_normal()


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
    """`nn.Dense` with logical names `axes` on its kernel and `axes[1:]` on its bias."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_named(kernel_init, axes),
        bias_init=_named(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


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
        bias_init=_named(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def group_norm(
    num_groups: int = 32,
    *,
    epsilon: float = 1e-5,
    affine: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.GroupNorm:
    """GroupNorm over the channel (last) axis; statistics are computed in float32 by Flax."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_named(nn.initializers.ones_init(), ("norm",)),
        bias_init=_named(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


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


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
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
