"""XLA's CPU convolutions on Eigen, matmuls and reductions on YNNPACK (magdiff_jax/cpu/xla_flags.py), and
`cpu.compiler_options`, which gives that setting while the CPU tuning is on."""

import re

import jax
import numpy as np
import pytest

from magdiff_jax import cpu
from magdiff_jax.cpu import xla_flags


def test_add_to_xla_flags_appends_once_and_keeps_a_users_choice():
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=1"}
    assert xla_flags.add_to_xla_flags(env)
    assert env["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=1", xla_flags.FLAG]
    assert not xla_flags.add_to_xla_flags(env)  # already there
    mine = {"XLA_FLAGS": f"--{xla_flags.OPTION}="}  # the user turned YNNPACK off altogether
    assert not xla_flags.add_to_xla_flags(mine)
    assert mine["XLA_FLAGS"] == f"--{xla_flags.OPTION}="
    empty = {}
    assert xla_flags.add_to_xla_flags(empty) and empty["XLA_FLAGS"] == xla_flags.FLAG


def _ynn_roots(text: str) -> set[str]:
    """The op names that YNNPACK fusions of a compiled CPU program come from."""
    return {m.group(1) for m in re.finditer(r'ynn_fusion[\w.]* = .*?op_name="[^"]*/(\w+)"', text)}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA CPU setting")
def test_options_move_convolutions_off_ynnpack_and_keep_matmuls(monkeypatch):
    """With the options, a convolution's program has no YNNPACK fusion of it while a matmul keeps its own; the
    values equal the default program's (fp32, 1e-5 relative)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the options are the test's subject, not the environment's
    xla_flags.convolution_options.cache_clear()
    try:
        options = xla_flags.convolution_options()
    finally:
        xla_flags.convolution_options.cache_clear()
    assert options == {xla_flags.OPTION: xla_flags.VALUE}
    rng = np.random.RandomState(0)
    # (YNNPACK leaves convolutions as small as 8x8x16 to Eigen anyway)
    x, w = rng.randn(2, 16, 16, 32).astype(np.float32), rng.randn(3, 3, 32, 32).astype(np.float32)

    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(-1, 32) @ w[1, 1]

    lowered = jax.jit(f).lower(x, w)
    ours = lowered.compile(options)
    assert "conv_general_dilated" not in _ynn_roots(ours.as_text())
    assert "dot_general" in _ynn_roots(ours.as_text())
    want = lowered.compile({xla_flags.OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"})
    assert "conv_general_dilated" in _ynn_roots(want.as_text())  # the check sees a YNNPACK convolution
    a, b = np.asarray(ours(x, w)), np.asarray(want(x, w))
    assert np.abs(a - b).max() < 1e-5 * np.abs(b).max()


def test_compiler_options_follow_the_tuning_and_let_the_callers_options_win(monkeypatch):
    """The convolution setting while the tuning is on, nothing of it while off; the caller's options pass through
    either way and win; None when there is nothing to pass."""
    monkeypatch.setattr(xla_flags, "convolution_options", lambda: {xla_flags.OPTION: xla_flags.VALUE})
    with cpu.tuning(True):
        assert cpu.compiler_options() == {xla_flags.OPTION: xla_flags.VALUE}
        assert cpu.compiler_options({xla_flags.OPTION: "x", "a": 1}) == {xla_flags.OPTION: "x", "a": 1}
    with cpu.tuning(False):
        assert cpu.compiler_options() is None
        assert cpu.compiler_options({"a": 1}) == {"a": 1}
    monkeypatch.setattr(xla_flags, "convolution_options", dict)
    with cpu.tuning(True):
        assert cpu.compiler_options({}) is None
