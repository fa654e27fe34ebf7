"""VGG16 against torchvision's `vgg16().features` layout, LPIPS against `lpips.LPIPS(net="vgg")`'s forward, their
converters (torchvision's state dict, the lpips linear-head file) and PSNR/SSIM against scikit-image.

Neither torchvision nor lpips imports beside this torch build, so the peers below are written out with the same
layer layout and parameter names: `TorchVGG16` is torchvision's `VGG(make_layers(cfgs["D"]))` (`features` a
Sequential of Conv2d(3x3, padding 1)/ReLU/MaxPool2d(2, 2) at torchvision's indices, `classifier` three Linears),
`TorchLPIPS` is lpips' `LPIPS(net="vgg", version="0.1")` forward (ScalingLayer, `normalize_tensor`, NetLinLayer
heads `lin{k}.model.1`, `spatial_average`). Parity: max|ours - torch| / max|torch| <= 1e-4 in float32 on random
weights (biases non-zero, heads positive), at small widths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import nchw, nhwc, perturb_, rel_err
from safetensors.torch import save_file
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from magdiff_jax.convert import ConversionError
from magdiff_jax.convert.safetensors_io import read_file
from magdiff_jax.convert.vgg import (
    lpips_from_torch,
    lpips_state_dicts,
    vgg16_from_torch,
    vgg16_state_dict,
    vgg16_to_torch,
)
from magdiff_jax.eval import lpips_distance, psnr, ssim
from magdiff_jax.models.registry import ConfigError, get_model
from magdiff_jax.models.vgg import VGG16, LPIPSConfig, VGG16Config, unit_normalise

TOL = 1e-4
WIDTHS = (8, 16, 16, 32, 32)
TAPS = (3, 8, 15, 22, 29)  # torchvision indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class TorchVGG16(nn.Module):
    """torchvision.models.vgg16's module tree (cfg "D") at widths `widths`, with a small classifier."""

    def __init__(self, widths):
        super().__init__()
        cfg = [widths[0]] * 2 + ["M"] + [widths[1]] * 2 + ["M"] + [widths[2]] * 3 + ["M"] + [widths[3]] * 3 + [
            "M"] + [widths[4]] * 3 + ["M"]
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(widths[4] * 4, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 16),
                                        nn.ReLU(), nn.Dropout(), nn.Linear(16, 10))

    def taps(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out


class TorchLPIPS(nn.Module):
    """lpips.LPIPS(net="vgg", lpips=linear, version="0.1").forward(in0, in1) with inputs in [-1, 1]."""

    def __init__(self, vgg: TorchVGG16, linear: bool):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.net, self.linear = vgg, linear
        for k, c in enumerate(WIDTHS):  # NetLinLayer(c, 1, use_dropout=True)
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, stride=1, padding=0,
                                                                                   bias=False))

    def forward(self, in0, in1):
        outs0 = self.net.taps((in0 - self.shift) / self.scale)
        outs1 = self.net.taps((in1 - self.shift) / self.scale)
        val = 0
        for k, (f0, f1) in enumerate(zip(outs0, outs1)):
            f0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
            f1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
            diff = (f0 - f1) ** 2
            d = getattr(self, f"lin{k}").model(diff) if self.linear else diff.sum(dim=1, keepdim=True)
            val = val + d.mean([2, 3], keepdim=True)
        return val[:, 0, 0, 0]


@pytest.fixture(scope="module")
def torch_vgg():
    torch.manual_seed(0)
    return perturb_(TorchVGG16(WIDTHS).eval(), scale=0.05, seed=1)


@pytest.fixture(scope="module")
def files(torch_vgg, tmp_path_factory):
    """torchvision's VGG16 file (.pth, as torch.save writes it, classifier included) and an lpips head file with
    random positive weights."""
    root = tmp_path_factory.mktemp("vgg")
    torch.save(torch_vgg.state_dict(), root / "vgg16.pth")
    g = torch.Generator().manual_seed(2)
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) + 0.1 for k, c in enumerate(WIDTHS)}
    torch.save(lins, root / "lin.pth")
    return root, lins


@pytest.fixture(scope="module")
def lpips_pair(files):
    root, _ = files
    module, params = lpips_from_torch(root / "vgg16.pth", root / "lin.pth")
    return module, params, jax.jit(lambda p, x, y: lpips_distance(module, p, x, y))


def _images(seed, shape):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_vgg16_taps_match_torchvision_layout(files, torch_vgg):
    """All five taps (relu1_2 .. relu5_3) of the converted .pth, at a size the pools floor (50x38)."""
    root, _ = files
    module, params = vgg16_from_torch(root / "vgg16.pth")
    assert module.config == VGG16Config(widths=WIDTHS)
    x = _images(0, (2, 50, 38, 3))
    ours = jax.jit(module.apply)({"params": params}, x)
    with torch.no_grad():
        ref = torch_vgg.taps(nchw(x))
    assert len(ours) == len(ref) == 5
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == nhwc(b).shape, (k, a.shape, nhwc(b).shape)
        assert rel_err(a, nhwc(b)) < TOL, (k, rel_err(a, nhwc(b)))


@pytest.mark.parametrize("linear", [True, False])
def test_lpips_matches_the_lpips_forward(files, torch_vgg, lpips_pair, linear):
    root, lins = files
    if linear:
        module, params, fn = lpips_pair
    else:
        module, params = lpips_from_torch(root / "vgg16.pth")
        assert not module.config.linear and not any(k.startswith("lin") for k in params)
        fn = jax.jit(lambda p, x, y: lpips_distance(module, p, x, y))
    ref_module = TorchLPIPS(torch_vgg, linear).eval()
    with torch.no_grad():
        for k in range(len(WIDTHS)):
            getattr(ref_module, f"lin{k}").model[1].weight.copy_(lins[f"lin{k}.model.1.weight"])
    x = _images(1, (3, 48, 40, 3))
    y = np.clip(x + 0.3 * _images(2, x.shape), -1, 1)
    ours = np.asarray(fn(params, x, y))
    with torch.no_grad():
        ref = ref_module(nchw(x), nchw(y)).numpy()
    assert ours.shape == (3,) and (ref > 0).all()
    assert rel_err(ours, ref) < TOL, rel_err(ours, ref)


def test_lpips_is_zero_for_identical_images_and_grows_with_noise(lpips_pair):
    _, params, fn = lpips_pair
    x = _images(3, (2, 32, 32, 3))
    noise = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    d = [np.asarray(fn(params, x, np.clip(x + s * noise, -1, 1))) for s in (0.0, 0.05, 0.2, 0.5)]
    assert (d[0] == 0).all()
    assert (d[1] > 0).all() and (d[1] < d[2]).all() and (d[2] < d[3]).all(), d
    # leading axes are batch axes: a (B, F) video batch gives (B, F), pair by pair
    video = np.stack([x, np.clip(x + 0.2 * noise, -1, 1)], axis=1)  # (2, 2, 32, 32, 3)
    out = fn(params, video, np.broadcast_to(x[:, None], video.shape))
    assert out.shape == (2, 2)
    np.testing.assert_allclose(np.asarray(out), np.stack([d[0], d[2]], axis=1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"differ in shape, \(2, 32, 32, 3\) and \(2, 32, 30, 3\)"):
        fn(params, x, x[:, :, :30])


def test_lpips_gradient_is_finite_where_a_tap_is_all_zero(lpips_pair):
    """relu5_3 switched off everywhere (large negative biases): its features are all zero, whose unit
    normalisation must not give NaN gradients (a plain sqrt at 0 does)."""
    module, params, _ = lpips_pair
    params = jax.tree.map(lambda a: a, params)
    params["vgg"]["features_28"]["bias"] = jnp.full_like(params["vgg"]["features_28"]["bias"], -100.0)
    x, y = _images(5, (1, 16, 16, 3)), _images(6, (1, 16, 16, 3))
    g = jax.jit(jax.grad(lambda x: jnp.sum(lpips_distance(module, params, x, y))))(x)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    assert np.isfinite(np.asarray(jax.grad(lambda f: jnp.sum(unit_normalise(f)))(jnp.zeros((2, 4))))).all()


def test_vgg16_round_trip_and_cli(files, torch_vgg, tmp_path):
    from magdiff_jax import cli
    from magdiff_jax.export import load_model

    root, _ = files
    module, params = vgg16_from_torch(root / "vgg16.pth")
    out = vgg16_to_torch(module, params, tmp_path / "vgg16.safetensors")
    back = read_file(out)
    want = {k: v.numpy() for k, v in torch_vgg.state_dict().items() if k.startswith("features.")}
    assert set(back) == set(want) and len(want) == 26
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    with pytest.raises(FileExistsError, match=r"vgg16\.safetensors exists"):
        vgg16_to_torch(module, params, out)
    _, again = vgg16_from_torch(out)  # the written file reads back as a source (no classifier)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    cli._convert(cli.build_parser().parse_args(["convert", "to-flax", "--kind", "vgg16", str(root / "vgg16.pth"),
                                                str(tmp_path / "flax")]))
    _, loaded, restored = load_model(tmp_path / "flax", kind="vgg16")
    assert loaded.config == module.config
    jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_lpips_state_dicts_round_trip(files, lpips_pair):
    _, lins = files
    module, params, _ = lpips_pair
    vgg, heads = lpips_state_dicts(module.config, params)
    assert set(heads) == set(lins)
    for k, v in lins.items():
        np.testing.assert_array_equal(heads[k], v.numpy(), err_msg=k)
    assert set(vgg) == set(vgg16_state_dict(VGG16Config(widths=WIDTHS), params["vgg"]))


def test_converter_names_every_bad_key(files, torch_vgg, tmp_path):
    root, lins = files
    state = {k: v.clone() for k, v in torch_vgg.state_dict().items()}
    del state["features.12.weight"]
    state["features.7.weight"] = state["features.7.weight"][:, :, :2].contiguous()
    state["features.1.running_mean"] = torch.zeros(WIDTHS[0])  # a BatchNorm model (vgg16_bn) is not VGG16
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        vgg16_from_torch(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "bad.safetensors" in msg and "missing keys (1):\n    features.12.weight" in msg
    assert "unexpected keys (1):\n    features.1.running_mean" in msg
    assert "features.7.weight: checkpoint has (16, 16, 2, 3), model expects (16, 16, 3, 3)" in msg
    assert "classifier" not in msg
    # a head missing from the lpips file, and a config that disagrees with the files
    torch.save({k: v for k, v in lins.items() if not k.startswith("lin3")}, tmp_path / "lin.pth")
    with pytest.raises(ConversionError, match=r"missing keys \(1\):\n    lin3\.model\.1\.weight"):
        lpips_from_torch(root / "vgg16.pth", tmp_path / "lin.pth")
    with pytest.raises(ConversionError, match=r"features\.0\.weight: checkpoint has \(8, 3, 3, 3\), model expects "
                                              r"\(64, 3, 3, 3\)"):
        lpips_from_torch(root / "vgg16.pth", root / "lin.pth", config=LPIPSConfig())
    with pytest.raises(ValueError, match="needs a linear-head file"):
        lpips_from_torch(root / "vgg16.pth", config=LPIPSConfig(vgg=VGG16Config(widths=WIDTHS)))


def test_configs_refuse_bad_values():
    spec = get_model("vgg16")
    with pytest.raises(ConfigError, match=r"widths: expected 5 stage widths, got \[8, 16, 32\]"):
        spec.config_from_dict({"widths": [8, 16, 32]})
    with pytest.raises(ConfigError, match="widths: every entry must be a positive integer"):
        VGG16Config(widths=(8, 0, 16, 16, 16))
    with pytest.raises(ConfigError, match=r"vgg\.in_channels: LPIPS scales RGB inputs"):
        get_model("lpips").config_from_dict({"vgg": {"in_channels": 1}})
    assert isinstance(get_model("vgg16").build(VGG16Config()), VGG16)


# --- PSNR and SSIM against scikit-image (float64 references) ------------------------------------------------------
def _structured(h, w, data_range):
    """Smooth ramps, a sinusoid and a hard-edged square per channel, in [0, data_range] - data_range / 2 style."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    square = ((yy > 0.3) & (yy < 0.7) & (xx > 0.2) & (xx < 0.6)).astype(np.float64)
    img = np.stack([xx, 0.5 + 0.5 * np.sin(12 * yy + 5 * xx), 0.3 + 0.6 * square], axis=-1)
    return img if data_range == 1 else 2 * img - 1


@pytest.mark.parametrize("data_range,hw", [(2.0, (32, 32)), (1.0, (23, 40)), (2.0, (40, 11)), (1.0, (11, 11))])
def test_psnr_ssim_match_scikit_image(data_range, hw):
    lo = -1.0 if data_range == 2 else 0.0
    rng = np.random.default_rng(int(hw[0] * data_range))
    rand = rng.uniform(lo, 1, (2, *hw, 3))
    base = np.concatenate([rand, _structured(*hw, data_range)[None]])
    other = np.clip(base + rng.choice([0.02, 0.1, 0.4]) * rng.standard_normal(base.shape), lo, 1)
    other[-1] = np.clip(_structured(*hw, data_range) * 0.9 + 0.05, lo, 1)  # structured vs a dimmed copy
    ours_ssim = np.asarray(jax.jit(ssim, static_argnums=2)(base.astype(np.float32), other.astype(np.float32),
                                                           data_range))
    ours_psnr = np.asarray(jax.jit(psnr, static_argnums=2)(base.astype(np.float32), other.astype(np.float32),
                                                           data_range))
    ref_ssim = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=data_range, channel_axis=-1) for a, b in zip(base, other)]
    ref_psnr = [peak_signal_noise_ratio(a, b, data_range=data_range) for a, b in zip(base, other)]
    assert ours_ssim.shape == ours_psnr.shape == (3,)
    np.testing.assert_allclose(ours_ssim, ref_ssim, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours_psnr, ref_psnr, rtol=1e-5)


def test_metrics_batch_axes_and_bad_inputs():
    x = _images(7, (2, 3, 16, 12, 3))
    y = np.clip(x + 0.1 * _images(8, x.shape), -1, 1)
    s, p = np.asarray(ssim(x, y)), np.asarray(psnr(x, y))
    assert s.shape == p.shape == (2, 3)
    np.testing.assert_allclose(s[1, 2], np.asarray(ssim(x[1, 2:3], y[1, 2:3]))[0], rtol=1e-6)
    assert np.asarray(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert np.isinf(np.asarray(psnr(x, x))).all()
    with pytest.raises(ValueError, match="ssim: images of 10x12 pixels are smaller than its 11x11 window"):
        ssim(x[..., :10, :, :], y[..., :10, :, :])
    with pytest.raises(ValueError, match=r"psnr: the images differ in shape"):
        psnr(x, y[:1])


def test_lpips_init_heads_are_the_channel_sum():
    """Freshly initialised heads weigh every channel 1: the distance equals the `linear=False` one (non-negative)."""
    spec = get_model("lpips")
    vgg = {"widths": list(WIDTHS)}
    with_heads, plain = spec.build(spec.config_from_dict({"vgg": vgg})), spec.build(spec.config_from_dict(
        {"vgg": vgg, "linear": False}))
    x, y = _images(9, (2, 16, 16, 3)), _images(10, (2, 16, 16, 3))
    params = jax.jit(with_heads.init)(jax.random.key(0), x, y)["params"]
    d = jax.jit(lambda p: (with_heads.apply({"params": p}, x, y),
                           plain.apply({"params": {"vgg": p["vgg"]}}, x, y)))(params)
    assert (np.asarray(d[0]) > 0).all()
    np.testing.assert_allclose(np.asarray(d[0]), np.asarray(d[1]), rtol=1e-6)
