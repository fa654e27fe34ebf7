"""Building blocks shared by every model: partitioned dense/conv/norm layers and the one attention entry point."""

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
