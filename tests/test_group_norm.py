"""`layers.common.GroupNorm` (per-channel sums, one multiply-add) against `torch.nn.GroupNorm`, with the CPU tuning
off and on (on, a single sample is normalised without its batch axis: `cpu.kernels.group_norm_keeps_batch`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import rel_err

from magdiff_jax import cpu
from magdiff_jax.layers.common import group_norm


def _position_sums(fn, *args) -> set[tuple[int, tuple]]:
    """(rank, axes) of the sums over the positions in `fn`'s jaxpr (a per-channel sum reduces the second-to-last
    axis: the positions; group sums reduce the last)."""
    found = set()
    for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum":
            rank = eqn.invars[0].aval.ndim
            if eqn.params["axes"] == (rank - 2,):
                found.add((rank, eqn.params["axes"]))
    return found


@pytest.mark.parametrize("tuned", [False, True], ids=["plain", "cpu_tuning"])
@pytest.mark.parametrize("shape,groups,eps", [((2, 3, 6, 5, 16), 4, 1e-6), ((3, 7, 7, 12), 3, 1e-5),
                                              ((2, 9, 8), 8, 1e-5), ((1, 3, 6, 5, 16), 4, 1e-6)])
def test_matches_torch_group_norm(shape, groups, eps, tuned):
    """torch.nn.GroupNorm (channels first, statistics over every other non-batch axis), random scale and bias,
    inputs with a non-zero mean: outputs and the gradients of a weighted sum with respect to the input, scale and
    bias, fp32, 1e-5 relative. With the CPU tuning on CPU a single sample (batch 1) takes its own code path (the
    positions summed as the first axis of an (N, C) array); otherwise the batch axis stays ((B, N, C) arrays)."""
    rng = np.random.RandomState(0)
    x = (rng.randn(*shape) * 2.0 + 0.7).astype(np.float32)
    c = shape[-1]
    ref = torch.nn.GroupNorm(groups, c, eps=eps)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.randn(c).astype(np.float32)))
        ref.bias.copy_(torch.from_numpy(rng.randn(c).astype(np.float32)))
        want = ref(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()
    params = {"scale": ref.weight.detach().numpy(), "bias": ref.bias.detach().numpy()}
    norm = group_norm(groups, epsilon=eps)
    weights = rng.randn(*shape).astype(np.float32)
    loss = lambda p, x: jnp.sum(norm.apply({"params": p}, x) * weights)
    with cpu.tuning(tuned):
        got = norm.apply({"params": params}, x)
        grads = jax.grad(loss, argnums=(0, 1))(params, x)
        sums = _position_sums(loss, params, x)
    batchless = tuned and shape[0] == 1 and jax.default_backend() == "cpu"
    assert sums == ({(2, (0,))} if batchless else {(3, (1,))}), sums
    assert got.dtype == jnp.float32
    assert rel_err(got, np.moveaxis(want, 1, -1)) < 1e-5

    tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_(True)
    (ref(tx) * torch.from_numpy(np.moveaxis(weights, -1, 1).copy())).sum().backward()
    assert rel_err(grads[1], np.moveaxis(tx.grad.numpy(), 1, -1)) < 1e-5
    assert rel_err(grads[0]["scale"], ref.weight.grad.numpy()) < 1e-5
    assert rel_err(grads[0]["bias"], ref.bias.grad.numpy()) < 1e-5


def test_dtypes_and_bad_channel_count():
    x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
    norm = group_norm(4)
    params = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, norm.init(jax.random.key(0), x),
                          is_leaf=lambda a: hasattr(a, "value"))
    assert norm.apply(params, x).dtype == jnp.float32  # inferred from input and fp32 parameters, as Flax does
    assert group_norm(4, dtype=jnp.bfloat16).apply(params, x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        norm.init(jax.random.key(0), jnp.ones((1, 2, 2, 6)))
