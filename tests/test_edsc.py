"""EDSC (`magdiff_jax.models.edsc`) against the released EDSC-pytorch `networks.EDSC.Network` and its
`FunctionDSepconv` (tests/torch_edsc.py: the same network with the release's parameter names, the CUDA op in torch
ops), fp32, random perturbed weights; and its converter (`load_torch` / `save_torch` kind `edsc`, the CLI).

Tolerances: max|ours - torch| / max|torch| <= 1e-4 for the network and the op; the op's custom VJP equals plain
autodiff of the same forward to 1e-5 and torch autograd of the reference op to 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_edsc  # noqa: E402
from helpers import assert_same_state_dict, nchw, nhwc, perturb_, rel_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from magdiff_jax.convert import ConversionError, load_torch, save_torch  # noqa: E402
from magdiff_jax.models.edsc import EDSC, EDSCConfig, deformable_separable_conv  # noqa: E402

WIDTHS, HEADS = (8, 8, 8), (8, 8)
B, H, W = 2, 20, 27  # padded to 24 x 32 (a multiple of 2**3)
T = np.array([0.3, 0.8], np.float32)  # two different times in one batch


def _torch_net(seed: int = 0, **kw):
    """A tiny released `Network` with perturbed weights and offset heads scaled up, so that taps move by several
    pixels and leave the frame at its borders."""
    torch.manual_seed(seed)
    net = perturb_(torch_edsc.Network(widths=WIDTHS, head_channels=HEADS, **kw), 0.1, seed)
    with torch.no_grad():
        for name in ("moduleOffset1x", "moduleOffset1y", "moduleOffset2x", "moduleOffset2y"):
            getattr(net, name)[7].weight.mul_(20.0)
            getattr(net, name)[7].bias.mul_(20.0)
    return net.eval()


def _save_released(net, path):
    """The release's checkpoint layout: {"model_state": state_dict}, here with training state beside it."""
    torch.save({"model_state": net.state_dict(), "epoch": 7, "optimizer_state": {"lr": torch.tensor(1e-3)}}, path)
    return path


@pytest.fixture(scope="module")
def frames():
    rng = np.random.RandomState(0)
    return rng.rand(B, H, W, 3).astype(np.float32), rng.rand(B, H, W, 3).astype(np.float32)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(torch net, path of its released-layout .pth, (module, params) read back by load_torch)."""
    net = _torch_net()
    path = _save_released(net, tmp_path_factory.mktemp("edsc") / "EDSC_m.pth")
    return net, path, load_torch("edsc", path)


def test_config_read_from_the_weights(released):
    _, _, (module, _) = released
    assert module.config == EDSCConfig(block_out_channels=WIDTHS, head_channels=HEADS, kernel_size=5, het_groups=4,
                                       multiple=True, use_bias=True, channel_order="bgr")


def test_forward_matches_released_network(released, frames):
    """EDSC == torch_edsc.Network (the release's `Network(isMultiple=True)`) with run.py's padding and cropping,
    two different t in one batch, at a size that needs padding: 1e-4 relative."""
    net, _, (module, params) = released
    f0, f1 = frames
    ours = np.asarray(jax.jit(module.apply)({"params": params}, f0, f1, T))
    with torch.no_grad():
        ref = nhwc(torch_edsc.interpolate(net, nchw(f0), nchw(f1), T))
    assert ours.shape == (B, H, W, 3)
    assert rel_err(ours, ref) < 1e-4
    # t is read per example: the second example at the first one's time is another frame
    with torch.no_grad():
        other = nhwc(torch_edsc.interpolate(net, nchw(f0), nchw(f1), T[::-1].copy()))
    assert rel_err(other, ref) > 1e-2


def test_midpoint_network_matches(tmp_path, frames):
    """The release's `Network(isMultiple=False, useBias=False)` (EDSC_s layout; no time map, no bias head),
    read from a bare state dict in .safetensors: 1e-4 relative."""
    net = _torch_net(seed=1, multiple=False, use_bias=False)
    path = tmp_path / "edsc_s.safetensors"
    save_file(net.state_dict(), path)
    module, params = load_torch("edsc", path)
    assert not module.config.multiple and not module.config.use_bias
    f0, f1 = frames
    ours = jax.jit(module.apply)({"params": params}, f0[:1], f1[:1])
    with torch.no_grad():
        ref = nhwc(torch_edsc.interpolate(net, nchw(f0[:1]), nchw(f1[:1]), None))
    assert rel_err(ours, ref) < 1e-4


# --- the synthesis op -------------------------------------------------------------------------------------------
def _op_inputs(seed=0, b=2, h=9, w=11, ks=5):
    rng = np.random.RandomState(seed)
    return (rng.rand(b, h, w, 3).astype(np.float32),
            rng.randn(b, h, w, ks).astype(np.float32),
            rng.randn(b, h, w, ks).astype(np.float32),
            (4 * rng.randn(b, h, w, ks * ks)).astype(np.float32),  # rows: several pixels, past the borders
            (4 * rng.randn(b, h, w, ks * ks)).astype(np.float32),  # columns
            rng.rand(b, h, w, ks * ks).astype(np.float32))


def _torch_op(frame, v, h, offset_y, offset_x, mask):
    """The release's FunctionDSepconv on the frame padded as `Network.forward` pads it (replicate, ks // 2)."""
    padded = torch.nn.functional.pad(frame, [v.shape[1] // 2] * 4, mode="replicate")
    return torch_edsc.dsepconv(padded, v, h, offset_y, offset_x, mask)  # its offset_x moves rows


@pytest.mark.parametrize("custom_vjp", [True, False])
def test_synthesis_op_matches_release(custom_vjp):
    args = _op_inputs()
    ours = deformable_separable_conv(*args, custom_vjp=custom_vjp)
    with torch.no_grad():
        ref = nhwc(_torch_op(*(nchw(a) for a in args)))
    assert rel_err(ours, ref) < 1e-5
    # the offsets reach past the padded frame (the release's border handling is exercised)
    assert np.abs(args[3]).max() > 9 and np.abs(args[4]).max() > 11


def test_synthesis_op_gradients():
    """The custom VJP == jax autodiff of the plain forward (1e-5) == torch autograd of the reference op (1e-4),
    for the frame, both kernels, both offsets and the mask."""
    args = [jnp.asarray(a) for a in _op_inputs(seed=1, h=7, w=8)]
    cotangent = jnp.asarray(np.random.RandomState(2).randn(*args[0].shape).astype(np.float32))

    def grads(custom):
        loss = lambda *a: jnp.sum(deformable_separable_conv(*a, custom_vjp=custom) * cotangent)
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)

    custom, plain = grads(True), grads(False)
    leaves = [torch.tensor(nchw(np.asarray(a)).numpy(), requires_grad=True) for a in args]
    (_torch_op(*leaves) * nchw(np.asarray(cotangent))).sum().backward()
    for name, c, p, t in zip(("frame", "vertical", "horizontal", "offset_y", "offset_x", "mask"), custom, plain,
                             leaves):
        assert np.abs(np.asarray(c)).max() > 0, name
        assert rel_err(c, p) < 1e-5, name
        assert rel_err(c, nhwc(t.grad)) < 1e-4, name


def test_synthesis_op_refuses_bad_shapes():
    args = list(_op_inputs(h=6, w=6))
    args[5] = args[5][..., :24]
    with pytest.raises(ValueError, match=r"mask has shape \(2, 6, 6, 24\), expected \(2, 6, 6, 25\)"):
        deformable_separable_conv(*args)


# --- the converter --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ""])
def test_round_trip(released, tmp_path, suffix):
    """load_torch(released .pth) -> save_torch(.safetensors file / folder) -> load_torch: the released `Network`
    loads the written weights strictly and every tensor is bit-identical."""
    net, _, (module, params) = released
    out = save_torch("edsc", module, params, tmp_path / f"edsc{suffix}")
    if suffix:
        state = load_file(out)
    else:
        assert (out / "config.json").exists()
        state = load_file(out / "model.safetensors")
    fresh = torch_edsc.Network(widths=WIDTHS, head_channels=HEADS)
    fresh.load_state_dict(state, strict=True)
    assert_same_state_dict(fresh.state_dict(), net.state_dict())
    module2, params2 = load_torch("edsc", out)
    assert module2.config == module.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_save_refuses_an_existing_file_and_pickles(released, tmp_path):
    _, _, (module, params) = released
    out = save_torch("edsc", module, params, tmp_path / "edsc.safetensors")
    with pytest.raises(FileExistsError, match=r"edsc\.safetensors exists"):
        save_torch("edsc", module, params, out)
    save_torch("edsc", module, params, out, overwrite=True)
    with pytest.raises(ValueError, match=r"edsc\.pth: an EDSC network is written as one \.safetensors file"):
        save_torch("edsc", module, params, tmp_path / "edsc.pth")
    assert not (tmp_path / "edsc.pth").exists()


def test_bad_keys_are_named(released, tmp_path):
    net, _, _ = released
    state = dict(net.state_dict())
    del state["moduleMask2.7.bias"]
    state["moduleOffset1y.4.weight"] = state["moduleOffset1y.4.weight"][:, :4]
    state["moduleExtra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model_state": state}, path)
    with pytest.raises(ConversionError) as e:
        load_torch("edsc", path)
    msg = str(e.value)
    assert "missing keys (1):" in msg and "moduleMask2.7.bias" in msg
    assert "unexpected keys (1):" in msg and "moduleExtra.weight" in msg
    assert "moduleOffset1y.4.weight: checkpoint has (25, 4, 3, 3), model expects (25, 8, 3, 3)" in msg
    assert str(path) in msg


def test_not_an_edsc_file_is_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model_state": {"encoder.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ConversionError, match=r"other.pth: not an EDSC state dict: no 'moduleConv1.0.weight'"):
        load_torch("edsc", path)


def test_cli_converts_a_released_file(released, tmp_path):
    """`magdiff-jax convert to-flax --kind edsc SRC.pth DST`, and back: `to-torch --kind edsc DST OUT.safetensors`."""
    from magdiff_jax import cli

    net, path, _ = released
    convert = lambda *argv: cli._convert(cli.build_parser().parse_args(["convert", *argv]))
    convert("to-flax", "--kind", "edsc", str(path), str(tmp_path / "flax"))
    convert("to-torch", "--kind", "edsc", str(tmp_path / "flax"), str(tmp_path / "back.safetensors"))
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(net.state_dict())
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


def test_config_errors_are_named():
    with pytest.raises(ValueError, match=r"block_out_channels \[6\] do not split into het_groups=4"):
        EDSCConfig(block_out_channels=(8, 6))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        EDSCConfig(kernel_size=4)
    module = EDSC(EDSCConfig.tiny())
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"t must be a scalar or one value per example \(1,\)"):
        module.init(jax.random.key(0), x, x, jnp.zeros((2,)))


def test_released_size_layout():
    """The default config is the released EDSC_m `Network()`: its full-size state dict (untrained) is read back
    with that config and converts key for key, shape for shape (no forward at this size)."""
    from magdiff_jax.convert.core import torch_to_flax
    from magdiff_jax.convert.edsc import config_from_state, edsc_rules
    from magdiff_jax.models.registry import get_model

    state = {k: v.numpy() for k, v in torch_edsc.Network().state_dict().items()}
    cfg = config_from_state(state)
    assert cfg == EDSCConfig(channel_order="bgr")  # a bare state dict is taken for the release's (BGR)
    params = torch_to_flax(state, edsc_rules(cfg), get_model("edsc").abstract_params(EDSC(cfg)), "edsc")
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(x.size for x in state.values())


@pytest.mark.parametrize("ks", [5, 3])
def test_blend_init_starts_at_the_blend_of_the_two_frames(ks):
    """`blend_init`: the untrained network outputs (frame0 + frame1) / 2 at any t (centre taps, masks 1/2, no
    offsets, no residual): training from scratch starts at the blending baseline."""
    from magdiff_jax.models.edsc import interpolate

    module = EDSC(EDSCConfig.tiny(blend_init=True, kernel_size=ks))
    rng = np.random.default_rng(0)
    f0, f1 = (jnp.asarray(rng.uniform(-1, 1, (2, 12, 20, 3)), jnp.float32) for _ in range(2))
    params = module.init(jax.random.key(0), f0, f1, jnp.full((2,), 0.3))["params"]
    out = interpolate(module, params, f0, f1, jnp.asarray([0.3, 0.7]))
    np.testing.assert_allclose(np.asarray(out), np.asarray((f0 + f1) / 2), atol=1e-6)
    plain = EDSC(EDSCConfig.tiny())
    p2 = plain.init(jax.random.key(0), f0, f1, jnp.full((2,), 0.3))["params"]
    assert float(jnp.abs(interpolate(plain, p2, f0, f1, 0.3) - (f0 + f1) / 2).max()) > 0.05
