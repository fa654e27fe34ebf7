"""`layers.common.GroupNorm` (per-channel sums, one multiply-add) against `torch.nn.GroupNorm`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import rel_err

from magdiff_jax.layers.common import group_norm


@pytest.mark.parametrize("shape,groups,eps", [((2, 3, 6, 5, 16), 4, 1e-6), ((3, 7, 7, 12), 3, 1e-5),
                                              ((2, 9, 8), 8, 1e-5)])
def test_matches_torch_group_norm(shape, groups, eps):
    """torch.nn.GroupNorm (channels first, statistics over every other non-batch axis), random scale and bias,
    inputs with a non-zero mean: fp32, 1e-5 relative."""
    rng = np.random.RandomState(0)
    x = (rng.randn(*shape) * 2.0 + 0.7).astype(np.float32)
    c = shape[-1]
    ref = torch.nn.GroupNorm(groups, c, eps=eps)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.randn(c).astype(np.float32)))
        ref.bias.copy_(torch.from_numpy(rng.randn(c).astype(np.float32)))
        want = ref(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()
    params = {"scale": ref.weight.detach().numpy(), "bias": ref.bias.detach().numpy()}
    got = group_norm(groups, epsilon=eps).apply({"params": params}, x)
    assert got.dtype == jnp.float32
    assert rel_err(got, np.moveaxis(want, 1, -1)) < 1e-5


def test_dtypes_and_bad_channel_count():
    x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
    norm = group_norm(4)
    params = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, norm.init(jax.random.key(0), x),
                          is_leaf=lambda a: hasattr(a, "value"))
    assert norm.apply(params, x).dtype == jnp.float32  # inferred from input and fp32 parameters, as Flax does
    assert group_norm(4, dtype=jnp.bfloat16).apply(params, x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        norm.init(jax.random.key(0), jnp.ones((1, 2, 2, 6)))
