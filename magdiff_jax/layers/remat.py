"""Gradient checkpointing (rematerialisation) chosen by a config string.

Models wrap each U-Net block with `remat(BlockClass, policy, static_argnums)`; the parameter tree is unchanged, so
checkpoints and converters do not care which policy trained them. Policies:

  none           keep every activation (fastest, most memory)
  full           keep only each block's inputs; recompute everything inside it in the backward pass
  dots_saveable  keep matmul/conv outputs, recompute the cheap elementwise work (norms, activations)
  dots_no_batch  keep only matmuls without batch dimensions (dense layers); recompute attention and convs
  names          keep only the tensors tagged with `checkpoint_name` whose names are listed in `save_names`
                 (the layers tag "attention" outputs, "mlp" outputs and "resnet" outputs)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

POLICIES = ("none", "full", "dots_saveable", "dots_no_batch", "names")
TAGS = ("attention", "mlp", "resnet")


def checkpoint_policy(name: str, save_names: Sequence[str] = ("attention",)):
    """The `jax.checkpoint` policy for a config string (None for "full": save nothing)."""
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "dots_saveable":
        return cp.dots_saveable
    if name == "dots_no_batch":
        return cp.dots_with_no_batch_dims_saveable
    if name == "names":
        unknown = sorted(set(save_names) - set(TAGS))
        if unknown:
            raise ValueError(f"remat save_names {unknown} are not tags the layers set; tags: {TAGS}")
        return cp.save_only_these_names(*save_names)
    raise ValueError(f"unknown remat policy {name!r}; choose one of {POLICIES}")


def remat(block_cls, policy: str, save_names: Sequence[str] = ("attention",), static_argnums: Sequence[int] = ()):
    """`block_cls` itself for "none", else its `nn.remat` version (static_argnums count `self` as 0)."""
    if policy == "none":
        return block_cls
    return nn.remat(block_cls, policy=checkpoint_policy(policy, save_names), static_argnums=tuple(static_argnums),
                    prevent_cse=True)


def tag(x, name: str):
    """Name an activation so the "names" policy can keep it."""
    return checkpoint_name(x, name)
