"""XLA's CPU convolutions on Eigen, matmuls and reductions on YNNPACK (magdiff_jax/utils/xla_cpu.py)."""

import re

import jax
import numpy as np
import pytest

from magdiff_jax.utils import xla_cpu


def test_add_to_xla_flags_appends_once_and_keeps_a_users_choice():
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=1"}
    assert xla_cpu.add_to_xla_flags(env)
    assert env["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=1", xla_cpu.FLAG]
    assert not xla_cpu.add_to_xla_flags(env)  # already there
    mine = {"XLA_FLAGS": f"--{xla_cpu.OPTION}="}  # the user turned YNNPACK off altogether
    assert not xla_cpu.add_to_xla_flags(mine)
    assert mine["XLA_FLAGS"] == f"--{xla_cpu.OPTION}="
    empty = {}
    assert xla_cpu.add_to_xla_flags(empty) and empty["XLA_FLAGS"] == xla_cpu.FLAG


def _ynn_roots(text: str) -> set[str]:
    """The op names that YNNPACK fusions of a compiled CPU program come from."""
    return {m.group(1) for m in re.finditer(r'ynn_fusion[\w.]* = .*?op_name="[^"]*/(\w+)"', text)}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA CPU setting")
def test_options_move_convolutions_off_ynnpack_and_keep_matmuls(monkeypatch):
    """With the options, a convolution's program has no YNNPACK fusion of it while a matmul keeps its own; the
    values equal the default program's (fp32, 1e-5 relative)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the options are the test's subject, not the environment's
    xla_cpu.compiler_options.cache_clear()
    try:
        options = xla_cpu.compiler_options()
    finally:
        xla_cpu.compiler_options.cache_clear()
    assert options == {xla_cpu.OPTION: xla_cpu.VALUE}
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
    want = lowered.compile({xla_cpu.OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"})
    assert "conv_general_dilated" in _ynn_roots(want.as_text())  # the check sees a YNNPACK convolution
    a, b = np.asarray(ours(x, w)), np.asarray(want(x, w))
    assert np.abs(a - b).max() < 1e-5 * np.abs(b).max()


def test_merged_lets_the_callers_options_win(monkeypatch):
    monkeypatch.setattr(xla_cpu, "compiler_options", lambda: {xla_cpu.OPTION: xla_cpu.VALUE})
    assert xla_cpu.merged(None) == {xla_cpu.OPTION: xla_cpu.VALUE}
    assert xla_cpu.merged({xla_cpu.OPTION: "x", "a": 1}) == {xla_cpu.OPTION: "x", "a": 1}
    monkeypatch.setattr(xla_cpu, "compiler_options", dict)
    assert xla_cpu.merged({}) is None
