"""What identifies a feature network in caches and reports: a hash of its config and weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util


def network_fingerprint(*modules_and_params) -> str:
    """16 hex digits of sha256 over each (module, params) pair given in turn: the module's config (a dataclass, as
    JSON) and every parameter (path and float32 bytes, in path order). Statistics and scores cached under one
    fingerprint are never reused for another network."""
    if len(modules_and_params) % 2:
        raise ValueError("network_fingerprint takes (module, params) pairs")
    h = hashlib.sha256()
    for module, params in zip(modules_and_params[::2], modules_and_params[1::2]):
        config = getattr(module, "config", None)
        described = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
        h.update(json.dumps(described, sort_keys=True, default=str).encode())
        for path, leaf in sorted(traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(params))).items()):
            h.update("/".join(map(str, path)).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()[:16]


__all__ = ["network_fingerprint"]
