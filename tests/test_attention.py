"""The one attention entry point and the diffusers-named `Attention` layer; xla and blockwise attention both as plain
JAX (the CPU tuning off) and as the CPU tuning's kernels (`cpu.kernels`: hand-written backwards, auto's CPU rule)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import rel_err

from magdiff_jax import cpu
from magdiff_jax.cpu import kernels as cpu_kernels
from magdiff_jax.layers import attention as attn_lib


def _reference(q, k, v, mask=None, causal=False):
    """Plain numpy softmax(QK^T / sqrt(d)) V over (B, L, H, D)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.RandomState(0)
    return tuple(rng.randn(2, n, 3, 8).astype(np.float32) for n in (5, 7, 7))


def test_xla_matches_reference_with_mask(qkv):
    q, k, v = qkv
    mask = np.random.RandomState(1).rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    out = attn_lib.dot_product_attention(q, k, v, mask=mask)
    assert out.shape == q.shape
    assert rel_err(out, _reference(q, k, v, mask)) < 1e-5


def test_causal(qkv):
    _, k, v = qkv
    out = attn_lib.dot_product_attention(k, k, v, is_causal=True)
    assert rel_err(out, _reference(k, k, v, causal=True)) < 1e-5
    # a changed future key does not change an earlier output
    k2 = k.copy()
    k2[:, -1] += 5.0
    out2 = attn_lib.dot_product_attention(k2, k2, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(out)[:, :-1], np.asarray(out2)[:, :-1], rtol=0, atol=1e-6)


def test_implementation_switch_is_validated(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="not one of"):
        attn_lib.dot_product_attention(q, k, v, implementation="flash9")
    if not attn_lib.cudnn_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            attn_lib.dot_product_attention(q, k, v, implementation="cudnn")
        # auto falls back to xla where cuDNN is absent
        out = attn_lib.dot_product_attention(q, k, v, implementation="auto")
        assert rel_err(out, _reference(q, k, v)) < 1e-5


def _custom_vjps(fn, *args) -> bool:
    """Whether `fn` traces to a custom VJP (a CPU kernel) now."""
    return "custom_vjp" in str(jax.make_jaxpr(fn)(*args))


def _tuned_on_cpu(tuned: bool) -> bool:
    return tuned and jax.default_backend() == "cpu"


@pytest.mark.parametrize("tuned", [False, True], ids=["plain", "cpu_tuning"])
@pytest.mark.parametrize("tiling", ["pairs", "queries"])
@pytest.mark.parametrize("mask_kind", ["none", "per_query", "shared", "full", "empty_row", "causal"])
def test_blockwise_equals_xla_values_and_gradients(qkv, monkeypatch, mask_kind, tiling, tuned):
    """blockwise computes what xla computes, gradients included, a query with no visible key too, both as plain JAX
    (each block recomputed in the backward) and with the CPU tuning (saved log-sum-exp, probabilities recomputed
    block by block in the backward); the block size is forced down so that the 6 (batch, head) pairs go 2 to a
    block ("pairs"), or each pair's 6 queries split into 3 blocks ("queries", whose key and value gradients are
    summed over the blocks)."""
    q, k, v = qkv
    q = np.concatenate([q, q[:, :1] * 0.5], axis=1)  # 6 queries, 7 keys, B * H = 6 pairs
    block, tiles = {"pairs": (2 * 6 * 7, (2, 1)), "queries": (2 * 7, (1, 3))}[tiling]
    monkeypatch.setattr(attn_lib, "BLOCK_SCORES", block)
    assert attn_lib._blocks(q, k) == tiles
    rng = np.random.RandomState(2)
    mask = {"none": None, "per_query": rng.rand(2, 1, 6, 7) > 0.4, "shared": rng.rand(2, 3, 1, 7) > 0.4,
            "full": rng.rand(2, 3, 6, 7) > 0.4, "empty_row": rng.rand(2, 3, 6, 7) > 0.4, "causal": None}[mask_kind]
    if mask is not None:
        mask[..., 0] = True
        if mask_kind == "empty_row":
            mask[1, 2, 3] = False
    kw = dict(mask=mask, is_causal=mask_kind == "causal")

    def loss(impl):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(jnp.sin(attn_lib.dot_product_attention(q, k, v, implementation=impl, **kw))),
            argnums=(0, 1, 2)))

    with cpu.tuning(tuned):
        (ref, ref_grads), (out, grads) = loss("xla")(q, k, v), loss("blockwise")(q, k, v)
        assert _custom_vjps(lambda q, k, v: attn_lib.dot_product_attention(
            q, k, v, implementation="blockwise", **kw), q, k, v) == _tuned_on_cpu(tuned)
    assert abs(float(out) - float(ref)) < 1e-5 * abs(float(ref))
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5


def _autodiff_attention(q, k, v, mask):
    """softmax(QK^T / sqrt(d)) V in plain jnp, for autodiff: the reference of xla's hand-written backward."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
    if mask is not None:
        logits = jnp.where(mask, logits, -1e30)
    w = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        w = jnp.where(jnp.any(mask, axis=-1, keepdims=True), w, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("tuned", [False, True], ids=["plain", "cpu_tuning"])
@pytest.mark.parametrize("mask_kind", ["none", "per_query", "shared", "empty_row"])
def test_xla_backward_equals_autodiff(qkv, mask_kind, tuned):
    """xla attention, as plain JAX and as the CPU tuning's custom VJP (saved probabilities, transposed products),
    gives autodiff's gradients of a reference forward, masks included (a query with no visible key: zero output,
    zero gradients), Lq != Lk, fp32, 1e-5 relative."""
    q, k, v = qkv
    rng = np.random.RandomState(3)
    mask = {"none": None, "per_query": rng.rand(2, 1, 5, 7) > 0.4, "shared": rng.rand(2, 3, 1, 7) > 0.4,
            "empty_row": rng.rand(2, 3, 5, 7) > 0.4}[mask_kind]
    if mask is not None:
        mask[..., 0] = True
        if mask_kind == "empty_row":
            mask[1, 2, 3] = False
    g = rng.randn(*q.shape).astype(np.float32)

    def grads(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * g), argnums=(0, 1, 2)))(q, k, v)

    (ref, ref_grads) = grads(lambda q, k, v: _autodiff_attention(q, k, v, mask))
    fn = lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    with cpu.tuning(tuned):
        (out, ours) = grads(fn)
        assert _custom_vjps(fn, q, k, v) == _tuned_on_cpu(tuned)
    assert abs(float(out) - float(ref)) < 1e-5 * abs(float(ref))
    for a, b in zip(ours, ref_grads):
        assert rel_err(a, b) < 1e-5


def test_xla_gradients_match_torch_sdpa(qkv):
    """Gradients of xla attention == those of torch.nn.functional.scaled_dot_product_attention (the math the
    diffusers Attention processors call), causal, fp32, 1e-5 relative."""
    _, k, _ = qkv
    v = k[..., ::-1].copy()
    g = np.random.RandomState(4).randn(*k.shape).astype(np.float32)
    _, ours = jax.value_and_grad(
        lambda q, k, v: jnp.sum(attn_lib.dot_product_attention(q, k, v, is_causal=True) * g), argnums=(0, 1, 2)
    )(k * 0.7, k, v)
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 1, 2))).requires_grad_(True)
                  for a in (k * 0.7, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    (out * torch.from_numpy(np.ascontiguousarray(np.swapaxes(g, 1, 2)))).sum().backward()
    for a, t in zip(ours, (tq, tk, tv)):
        assert rel_err(a, np.swapaxes(t.grad.numpy(), 1, 2)) < 1e-5


def test_auto_takes_blockwise_on_cpu_for_long_sequences(qkv, monkeypatch):
    """auto takes blockwise by the CPU tuning's rule (many scores, or large pairs and enough of them), and never
    with the tuning off."""
    q, k, v = qkv
    if jax.default_backend() != "cpu":
        pytest.skip("the blockwise choice of auto is made on CPU")
    uses_map = lambda: "scan" in str(jax.make_jaxpr(
        lambda q, k, v: attn_lib.dot_product_attention(q, k, v, implementation="auto"))(q, k, v))
    monkeypatch.setattr(attn_lib, "BLOCK_SCORES", 2 * 3 * 7)
    with cpu.tuning(True):
        assert not uses_map()
        # many scores (q, k: 2 x 3 pairs of 5 x 7)
        monkeypatch.setattr(cpu_kernels, "AUTO_BLOCKWISE_MIN_SCORES", 2 * 3 * 5 * 7)
        assert uses_map()
        out = attn_lib.dot_product_attention(q, k, v, implementation="auto")
        assert rel_err(out, _reference(q, k, v)) < 1e-5
    with cpu.tuning(False):
        assert not uses_map()
    with cpu.tuning(True):
        # large pairs, and enough scores in all; either short of its bound keeps xla
        monkeypatch.setattr(cpu_kernels, "AUTO_BLOCKWISE_MIN_SCORES", 2 * 3 * 5 * 7 + 1)
        assert not uses_map()
        for pair, total, expected in ((5 * 7, 2 * 3 * 5 * 7, True), (5 * 7 + 1, 1, False),
                                      (1, 2 * 3 * 5 * 7 + 1, False)):
            monkeypatch.setattr(cpu_kernels, "AUTO_BLOCKWISE_PAIR_SCORES", pair)
            monkeypatch.setattr(cpu_kernels, "AUTO_BLOCKWISE_LARGE_PAIR", total)
            assert uses_map() == expected, (pair, total)


def test_attention_layer_matches_diffusers_attention():
    """magdiff_jax Attention == diffusers.models.attention_processor.Attention (cross-attention, 4 heads of 8,
    no qkv bias, out bias), fp32, 1e-5 relative."""
    from diffusers.models.attention_processor import Attention as TorchAttention

    torch.manual_seed(0)
    ref = TorchAttention(query_dim=32, cross_attention_dim=12, heads=4, dim_head=8).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    t = lambda name: ref.get_submodule(name).weight.detach().numpy().T
    params = {
        "to_q": {"kernel": t("to_q")}, "to_k": {"kernel": t("to_k")}, "to_v": {"kernel": t("to_v")},
        "to_out_0": {"kernel": t("to_out.0"), "bias": ref.to_out[0].bias.detach().numpy()},
    }
    rng = np.random.RandomState(0)
    x, ctx = rng.randn(2, 9, 32).astype(np.float32), rng.randn(2, 6, 12).astype(np.float32)
    ours = attn_lib.Attention(32, 4, 8).apply({"params": params}, x, ctx)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(ctx)).numpy()
    assert rel_err(ours, want) < 1e-5


@pytest.mark.gpu
def test_cudnn_flash_attention_matches_xla_on_gpu():
    """On a CUDA GPU: cuDNN flash attention (bf16) equals the XLA path within bf16 tolerance."""
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(2, 512, 8, 64), jnp.bfloat16) for _ in range(3))
    fast = attn_lib.dot_product_attention(q, k, v, implementation="cudnn")
    slow = attn_lib.dot_product_attention(q, k, v, implementation="xla")
    err = float(jnp.abs(fast.astype(jnp.float32) - slow.astype(jnp.float32)).max())
    assert err < 2e-2, err
    assert jax.default_backend() == "gpu"
