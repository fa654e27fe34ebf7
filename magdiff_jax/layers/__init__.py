"""Building blocks shared by every model: partitioned dense/conv/norm layers and the one attention entry point.
Importing the package defines the defaults of every override point (`layers.kernels`)."""

from magdiff_jax.layers import temporal  # noqa: F401  (defines the `frame_taps_matmul` default)
from magdiff_jax.layers.attention import Attention, dot_product_attention
from magdiff_jax.layers.common import activation, conv, dense, embedding, group_norm, layer_norm

__all__ = [
    "Attention",
    "activation",
    "conv",
    "dense",
    "dot_product_attention",
    "embedding",
    "group_norm",
    "layer_norm",
]
