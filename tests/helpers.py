"""Test utilities shared by the parity suites."""

from __future__ import annotations

import numpy as np


def perturb_(module, scale: float = 0.1, seed: int = 0):
    """Move every parameter of a PyTorch module away from its init (norm weights != 1, biases != 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nchw(x: np.ndarray):
    """channels-last numpy -> channels-first torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def nhwc(t) -> np.ndarray:
    """channels-first torch tensor -> channels-last numpy."""
    return np.moveaxis(t.detach().numpy(), 1, -1)


def assert_same_state_dict(a: dict, b: dict):
    """Identical key sets and bit-identical tensors."""
    assert set(a) == set(b), (sorted(set(a) - set(b))[:10], sorted(set(b) - set(a))[:10])
    for k in a:
        x, y = a[k].detach().numpy(), b[k].detach().numpy()
        assert x.shape == y.shape, k
        assert np.array_equal(x, y), k
