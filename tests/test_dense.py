"""`layers.common.dense` (`nn.Dense` through the `matmul` override point) against `torch.nn.Linear`, with the plain
`jnp.dot` and with the CPU tuning's kernel (`cpu.kernels.matmul`, whose backward takes the weight gradient in the
operand layout XLA's CPU matmuls run fastest); `layers.common.gelu` against `torch.nn.GELU`."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import rel_err

from magdiff_jax import cpu
from magdiff_jax.cpu.kernels import matmul, weight_gradient
from magdiff_jax.layers.common import activation, dense, gelu


@pytest.mark.parametrize("tuned", [False, True], ids=["plain", "cpu_tuning"])
@pytest.mark.parametrize("shape,out", [((2, 3, 5, 8), 24), ((2, 7, 24), 8), ((6, 16), 16), ((1, 4, 5, 12), 12)])
def test_matches_torch_linear(shape, out, tuned):
    """torch.nn.Linear with random weight and bias: output and the gradients of a weighted sum with respect to the
    input, kernel and bias, fp32, 1e-5 relative, with the CPU tuning off and on; the three weight-gradient forms
    (in < out, in > out, in == out) and leading axes of any rank."""
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(np.float32)
    ref = torch.nn.Linear(shape[-1], out)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.randn(out, shape[-1]).astype(np.float32)))
        ref.bias.copy_(torch.from_numpy(rng.randn(out).astype(np.float32)))
    params = {"kernel": ref.weight.detach().numpy().T, "bias": ref.bias.detach().numpy()}
    layer = dense(out)
    weights = rng.randn(*shape[:-1], out).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_(True)
    want = ref(tx)
    (want * torch.from_numpy(weights)).sum().backward()
    loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x) * weights)
    with cpu.tuning(tuned):
        got = layer.apply({"params": params}, x)
        grads = jax.grad(loss, argnums=(0, 1))(params, x)
        custom = "custom_vjp" in str(jax.make_jaxpr(loss)(params, x))
    assert custom == (tuned and jax.default_backend() == "cpu")  # the kernel the layer was traced with
    assert rel_err(got, want.detach().numpy()) < 1e-5
    assert rel_err(grads[1], tx.grad.numpy()) < 1e-5
    assert rel_err(grads[0]["kernel"], ref.weight.grad.numpy().T) < 1e-5
    assert rel_err(grads[0]["bias"], ref.bias.grad.numpy()) < 1e-5


def test_weight_gradient_forms_and_dtypes():
    """`weight_gradient` equals x^T dy in each form; the CPU `matmul`'s gradients keep autodiff's dtypes in
    bfloat16; the narrow-input form transposes x behind an optimization barrier (the form XLA would not choose)."""
    rng = np.random.RandomState(1)
    for n_in, n_out in ((4, 12), (12, 4), (8, 8), (256, 256)):
        x, d_y = rng.randn(3, 10, n_in).astype(np.float32), rng.randn(3, 10, n_out).astype(np.float32)
        want = np.einsum("abi,abo->io", x.astype(np.float64), d_y.astype(np.float64))
        assert rel_err(weight_gradient(x, d_y), want) < 1e-5

    x, k = jnp.asarray(rng.randn(2, 5, 4), jnp.bfloat16), jnp.asarray(rng.randn(4, 12), jnp.bfloat16)
    loss = lambda f: lambda x, k: jnp.sum(f(x, k).astype(jnp.float32) ** 2)
    got, want = jax.grad(loss(matmul), (0, 1))(x, k), jax.grad(loss(jnp.dot), (0, 1))(x, k)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == jnp.bfloat16 and g.shape == w.shape
        assert rel_err(g.astype(jnp.float32), w.astype(jnp.float32)) < 2e-2
    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(loss(matmul), 1))(x, k))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the operand layout rule is for XLA's CPU backend")
@pytest.mark.parametrize("n_in,n_out", [(16, 48), (48, 16), (256, 256)])
def test_weight_gradient_product_has_contracted_axis_minor(n_in, n_out):
    """After XLA's optimisations, the product that `weight_gradient` leaves (narrow in, narrow out, wide in == out)
    contracts the minor axis of its left operand (the form XLA's CPU matmul library takes); XLA's own rewrites
    (folding a transpose into the product) would give a product over the major axis of both operands."""
    x, d_y = jnp.ones((64, n_in), jnp.float32), jnp.ones((64, n_out), jnp.float32)
    hlo = jax.jit(weight_gradient).lower(x, d_y).compile().as_text()
    dots = re.findall(r"dot\(.*?lhs_contracting_dims=\{(\d+)\}", hlo)
    assert dots and all(d == "1" for d in dots), dots


def test_gelu_matches_torch():
    """`gelu` (the erf form) against `torch.nn.GELU()` (exact) from -12 to 12, fp32: values within 1e-6 absolute,
    gradients within 1e-6 absolute of PyTorch's and of autodiff through `jax.nn.gelu` (the erfc form); bfloat16 in,
    bfloat16 out; `activation("gelu")` is this function."""
    x = np.concatenate([np.linspace(-12, 12, 2001), np.random.RandomState(0).randn(999) * 3]).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_(True)
    want = torch.nn.GELU()(tx)
    want.sum().backward()
    assert np.max(np.abs(np.asarray(gelu(x)) - want.detach().numpy())) < 1e-6
    grad = np.asarray(jax.grad(lambda v: jnp.sum(gelu(v)))(x))
    assert np.max(np.abs(grad - tx.grad.numpy())) < 1e-6
    assert np.max(np.abs(grad - np.asarray(jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False)))(x)))) < 1e-6
    assert gelu(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
    assert activation("gelu") is gelu
