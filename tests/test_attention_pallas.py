"""The pallas_tpu attention implementation (JAX's splash attention kernel, `layers.pallas_attention`) checked without
a TPU: in Pallas interpret mode on CPU it computes what the xla implementation computes, forward and gradients
(dq, dk, dv), unmasked, under a key-padding mask, causal, with lengths and head_dims that need padding, and under
a mesh of 8 fake CPU devices (its shard_map); auto takes it only on a TPU, and only for long sequences with wide
enough heads."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

from magdiff_jax.layers import attention as attn_lib
from magdiff_jax.layers import pallas_attention as pallas

# The kernel's smallest block, so that a 256-long sequence is 2 x 2 blocks and the online softmax runs over blocks.
BLOCK = 128


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(pallas, "MAX_BLOCK", BLOCK)


def _uses_kernel(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


# (B, Lq, Lk, H, D, causal, mask): 2 x 2 blocks of 128 unmasked; 200 keys padded to 256 under a key-padding mask
# (batch element 1 sees no key at all: zero output); cross-attention 140 x 130 (both padded), causal with a key mask
# that hides the first keys of batch element 0 (its first queries see no key), head_dim 32 padded to 128.
CASES = {
    "unmasked": (1, 256, 256, 2, 64, False, None),
    "key_padding": (2, 200, 200, 2, 64, False, "padding"),
    "causal_cross_masked": (2, 140, 130, 2, 32, True, "leading"),
}


def _mask(kind, batch, length):
    if kind is None:
        return None
    keep = np.ones((batch, 1, 1, length), bool)
    if kind == "padding":
        keep[0, ..., 150:] = False
        keep[1] = False
    else:
        keep[0, ..., :5] = False
        keep[1, ..., 60:] = False
    return keep


@pytest.mark.parametrize("case", list(CASES))
def test_pallas_equals_xla_values_and_gradients(case):
    """pallas_tpu (interpret mode) == xla: outputs and the gradients dq, dk, dv of sum(out * g), fp32, 1e-5 relative;
    queries that see no key get zero outputs and zero gradients, as xla gives them."""
    b, lq, lk, h, d, causal, kind = CASES[case]
    rng = np.random.RandomState(0)
    q, g = (rng.randn(b, lq, h, d).astype(np.float32) for _ in range(2))
    k, v = (rng.randn(b, lk, h, d).astype(np.float32) for _ in range(2))
    mask = _mask(kind, b, lk)
    attend = lambda impl: (
        lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
    )
    value_and_grads = lambda impl: jax.jit(
        lambda q, k, v: (attend(impl)(q, k, v), jax.grad(lambda *a: jnp.sum(attend(impl)(*a) * g), (0, 1, 2))(q, k, v))
    )
    want, want_grads = value_and_grads("xla")(q, k, v)
    with pallas.interpret_mode():
        assert _uses_kernel(attend("pallas_tpu"), q, k, v)
        out, grads = value_and_grads("pallas_tpu")(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want) < 1e-5, rel_err(out, want)
    for name, a, b_ in zip("qkv", grads, want_grads):
        assert rel_err(a, b_) < 1e-5, (name, rel_err(a, b_))
    if kind == "padding":
        assert not np.any(np.asarray(out)[1]) and not np.any(np.asarray(grads[0])[1])


def test_pallas_refuses_without_tpu_or_interpret_mode_and_unsupported_masks():
    """Off a TPU, pallas_tpu outside interpret mode is an error that says why; a mask that varies over queries or
    heads is refused with its shape named, a malformed one too."""
    rng = np.random.RandomState(1)
    q = rng.randn(1, 8, 2, 16).astype(np.float32)
    if not pallas.tpu_available():
        with pytest.raises(RuntimeError, match=r"needs a TPU.*interpret_mode"):
            attn_lib.dot_product_attention(q, q, q, implementation="pallas_tpu")
    with pallas.interpret_mode():
        for shape in ((1, 1, 8, 8), (1, 2, 1, 8), (3, 1, 1, 8), (1, 1, 1, 5)):
            with pytest.raises(ValueError, match="key-padding masks only.*" + re.escape(str(shape))):
                attn_lib.dot_product_attention(q, q, q, mask=np.ones(shape, bool), implementation="pallas_tpu")


def test_auto_takes_pallas_only_on_tpu_for_long_sequences_and_wide_heads(monkeypatch):
    """auto: never the kernel where no TPU is visible (not even traced); on a TPU (simulated: `tpu_available` forced,
    interpret mode) the kernel for lengths >= AUTO_MIN_LENGTH, head_dim that pads to 128 at most twice over and a
    key-padding mask, xla otherwise (short keys, narrow heads, a per-query mask)."""
    rng = np.random.RandomState(2)
    x = lambda length, d: rng.randn(1, length, 2, d).astype(np.float32)
    auto = lambda mask=None: lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask=mask, implementation="auto")
    monkeypatch.setattr(pallas, "AUTO_MIN_LENGTH", 256)
    long, short, narrow = x(256, 64), x(128, 64), x(256, 8)
    if not pallas.tpu_available():
        assert not _uses_kernel(auto(), long, long, long)
    monkeypatch.setattr(pallas, "tpu_available", lambda: True)
    with pallas.interpret_mode():
        assert _uses_kernel(auto(), long, long, long)
        assert _uses_kernel(auto(np.ones((1, 1, 1, 256), bool)), long, long, long)
        assert not _uses_kernel(auto(), long, short, short)
        assert not _uses_kernel(auto(), narrow, narrow, narrow)
        assert not _uses_kernel(auto(np.ones((1, 1, 256, 256), bool)), long, long, long)


def test_tiling_pads_to_128_and_takes_the_largest_dividing_block(monkeypatch):
    """Lengths round up to multiples of 128; the block is the largest multiple of 128 dividing that, at most
    MAX_BLOCK (twice that for 16-bit dtypes); head_dim rounds up to a multiple of 128."""
    monkeypatch.setattr(pallas, "MAX_BLOCK", 512)
    assert pallas.tiling(200, jnp.float32) == (256, 256)
    assert pallas.tiling(640, jnp.float32) == (640, 128)
    assert pallas.tiling(4096, jnp.float32) == (4096, 512)
    assert pallas.tiling(4096, jnp.bfloat16) == (4096, 1024)
    assert pallas.tiling(77, jnp.bfloat16) == (128, 128)
    assert [pallas.padded_head_dim(d) for d in (5, 64, 128, 160)] == [128, 128, 128, 256]


SUBPROCESS_CHECK = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    from magdiff_jax import sharding
    from magdiff_jax.layers import attention as attn_lib, pallas_attention as pallas

    report = {}
    rng = np.random.RandomState(0)
    # auto on CPU, a long sequence: Pallas' TPU kernels are not even imported
    pallas.AUTO_MIN_LENGTH = 128
    x = rng.randn(1, 128, 2, 64).astype(np.float32)
    attn_lib.dot_product_attention(x, x, x, implementation="auto").block_until_ready()
    report["splash_imported"] = any("splash_attention" in m for m in sys.modules)

    # pallas_tpu under a data=2 x tensor=2 mesh: shard_map over batch and heads, the unsharded xla result
    pallas.MAX_BLOCK = 128
    q, k, v, g = (rng.randn(2, 200, 2, 64).astype(np.float32) for _ in range(4))
    keep = np.ones((2, 1, 1, 200), bool)
    keep[0, ..., 150:] = False
    def value_and_grads(impl):
        attend = lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask=keep, implementation=impl)
        return jax.jit(lambda q, k, v: (attend(q, k, v),
                                        jax.grad(lambda *a: jnp.sum(attend(*a) * g), (0, 1, 2))(q, k, v)))
    want = value_and_grads("xla")(q, k, v)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 2, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    place = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", None, "tensor", None)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES), pallas.interpret_mode():
        fn = value_and_grads("pallas_tpu")
        report["shard_map"] = "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        got = fn(place(q), place(k), place(v))
    err = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
    report["errors"] = [err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    print(json.dumps(report))
""")


def test_no_pallas_import_off_tpu_and_sharded_kernel_equals_xla():
    """In a subprocess with 8 fake CPU devices: auto on CPU does not import Pallas' TPU kernels; pallas_tpu under a
    data=2 x tensor=2 mesh (the trainer's `jax.set_mesh` and logical axis rules) runs in shard_map and gives the
    unsharded xla output and gradients (fp32, 1e-5 relative)."""
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_CHECK], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["splash_imported"]
    assert report["shard_map"]
    assert len(report["errors"]) == 4 and max(report["errors"]) < 1e-5, report["errors"]
