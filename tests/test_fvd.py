"""FVD: the Frechet distance, the Kinetics-400 I3D and its converter, preprocessing and the whole metric, against the
`cd-fvd` package (0.1.1): its `InceptionI3d` (pytorch-i3d's port), `preprocess_i3d`, `FeatureStats` and
`cdfvd.compute_fvd`.

The full-width I3D is run once per side on few videos (2 real, 2 generated, 9 frames each: the fewest the final
average pool accepts, at the 224 x 224 that cd-fvd resizes to) under a custom protocol `FVDProtocol("parity",
num_videos=2, num_frames=9)`; the error cases use a CPU-sized I3D (width / 16, pool 1 x 2 x 2, 64 x 64 frames)."""

import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from helpers import perturb_, rel_err

from magdiff_jax.convert.i3d import i3d_from_torch, i3d_state_dict, i3d_to_torch
from magdiff_jax.convert.safetensors_io import read_weights
from magdiff_jax.eval.frechet import FeatureStats, StatsMismatchError, frechet_distance
from magdiff_jax.eval.fvd import (
    PROTOCOLS,
    FVDProtocol,
    I3DFeatures,
    NotEnoughVideosError,
    compute_fvd,
    fvd_from_stats,
    preprocess,
    video_stats,
)
from magdiff_jax.models.i3d import I3D, I3DConfig
from magdiff_jax.models.registry import get_model
from magdiff_jax.utils.errors import ConversionError

PARITY = FVDProtocol("parity", num_videos=2, num_frames=9)


@pytest.fixture(scope="module")
def cdfvd():
    """cd-fvd's modules. `cdfvd.fvd` imports torchvision at module level for its video-folder loader and VideoMAE
    transforms, neither of which FVD with I3D on arrays touches; PyPI's torchvision does not import beside this
    venv's CPU torch, so an empty stand-in is registered for the duration of the import only."""
    stub = types.ModuleType("torchvision")
    stub.transforms = types.ModuleType("torchvision.transforms")
    datasets = types.ModuleType("torchvision.datasets")
    video_utils = types.ModuleType("torchvision.datasets.video_utils")
    video_utils.VideoClips = None
    with pytest.MonkeyPatch.context() as mp:
        for name, mod in (("torchvision", stub), ("torchvision.transforms", stub.transforms),
                          ("torchvision.datasets", datasets), ("torchvision.datasets.video_utils", video_utils)):
            mp.setitem(sys.modules, name, mod)
        from cdfvd import fvd
        from cdfvd.third_party.i3d import pytorch_i3d, utils
        from cdfvd.utils import metric_utils
    return types.SimpleNamespace(fvd=fvd, pytorch_i3d=pytorch_i3d, utils=utils, metric_utils=metric_utils)


@pytest.fixture(scope="module")
def torch_i3d(cdfvd):
    """cd-fvd's `InceptionI3d(400)` with random non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(0)
    model = perturb_(cdfvd.pytorch_i3d.InceptionI3d(400, in_channels=3), scale=0.05).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def weights_file(torch_i3d, tmp_path_factory):
    """The state dict as users have it (`i3d_pretrained_400.pt`: torch.save of a plain state dict)."""
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(torch_i3d.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def features(weights_file):
    return I3DFeatures.from_torch(weights_file)


@pytest.fixture(scope="module")
def videos():
    """uint8 (2, 10, 40, 48, 3) real and generated videos (10 frames: the protocol's 9 are cut from them)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 1, 40, 48, 3))
    real = np.clip(base + rng.integers(-60, 60, (2, 10, 40, 48, 3)), 0, 255).astype(np.uint8)
    fake = np.clip(0.6 * base + 80 + rng.integers(-90, 90, (2, 10, 40, 48, 3)), 0, 255).astype(np.uint8)
    return real, fake


@pytest.fixture(scope="module")
def cdfvd_result(cdfvd, torch_i3d, videos):
    """`cdfvd.compute_fvd` (the package's public entry point) on the protocol's 9-frame clips, run with the random
    network (its constructor would download the released weights): its FVD, the per-video logits its
    FeatureStats keep, and the average-pooled features each forward computes (a hook on `avg_pool`)."""
    real, fake = videos
    metric = cdfvd.fvd.cdfvd.__new__(cdfvd.fvd.cdfvd)
    metric.model, metric.feature_fn, metric.device, metric.model_dtype = (torch_i3d, cdfvd.fvd.get_i3d_logits, "cpu",
                                                                          torch.float32)
    stats = cdfvd.metric_utils.FeatureStats
    metric.real_stats = stats(capture_all=True, capture_mean_cov=True)
    metric.fake_stats = stats(capture_all=True, capture_mean_cov=True)
    pooled = []
    hook = torch_i3d.avg_pool.register_forward_hook(lambda m, i, o: pooled.append(o.mean(dim=2)[:, :, 0, 0].numpy()))
    try:
        value = metric.compute_fvd(real[:, :9], fake[:, :9])
    finally:
        hook.remove()
    logits = np.concatenate([metric.real_stats.get_all(), metric.fake_stats.get_all()])
    return types.SimpleNamespace(fvd=float(value), logits=logits, pooled=np.concatenate(pooled))


@pytest.fixture(scope="module")
def our_result(features, videos):
    """`compute_fvd` on the same videos (the protocol cuts the 9-frame clips), keeping each batch's features."""
    seen = {"logits": [], "pooled": []}

    def observe(side, logits, pooled):
        seen["logits"].append(logits)
        seen["pooled"].append(pooled)

    report = compute_fvd(*videos, features, PARITY, batch_size=2, observe=observe)
    return report, np.concatenate(seen["logits"]), np.concatenate(seen["pooled"])


# --- Frechet distance --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_closed_form_for_diagonal_gaussians(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert abs(got - want) <= 1e-10 * want
    # a rotated pair keeps the distance (the formula holds for any common orthogonal basis)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    got = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T, method=method)
    assert abs(got - want) <= 1e-9 * want


def test_frechet_distance_equals_scipy_sqrtm_route_on_random_features():
    from scipy import linalg

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 24)), rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24)) * 0.5 + 0.3
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    for method in ("eigh", "sqrtm"):
        assert abs(frechet_distance(mu1, s1, mu2, s2, method=method) - ref) <= 1e-9 * ref
    with pytest.raises(ValueError, match="sigma2 has shape"):
        frechet_distance(mu1, s1, mu2, s2[:3])
    with pytest.raises(ValueError, match="unknown method"):
        frechet_distance(mu1, s1, mu2, s2, method="svd")


def test_feature_stats_stream_save_load_and_equal_cdfvd(cdfvd, tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(130, 20)).astype(np.float32), (rng.normal(size=(90, 20)) * 1.5 + 0.2).astype(np.float32)
    ours = FeatureStats(network="net", network_fingerprint="n1", protocol="p", protocol_fingerprint="p1")
    for chunk in np.array_split(x, 7):
        ours.update(chunk)
    mean, cov = ours.mean_cov()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x64, rowvar=False, bias=True), rtol=1e-9, atol=1e-12)
    # cd-fvd's (StyleGAN-V's) FeatureStats and Frechet distance on the same features
    theirs_x = cdfvd.metric_utils.FeatureStats(capture_mean_cov=True)
    theirs_y = cdfvd.metric_utils.FeatureStats(capture_mean_cov=True)
    theirs_x.append(x), theirs_y.append(y)
    their_mean, their_cov = theirs_x.get_mean_cov()
    np.testing.assert_allclose(mean, their_mean, rtol=1e-12)
    np.testing.assert_allclose(cov, their_cov, rtol=1e-9, atol=1e-12)
    ours_y = FeatureStats(network="net", network_fingerprint="n1", protocol="p", protocol_fingerprint="p1")
    ours_y.update(y)
    ref = cdfvd.fvd.cdfvd.compute_fvd_from_stats(None, fake_stats=theirs_y, real_stats=theirs_x)
    assert abs(fvd_from_stats(ours, ours_y) - ref) <= 1e-6 * ref
    assert abs(fvd_from_stats(ours, ours_y, method="sqrtm") - ref) <= 1e-6 * ref
    # save / load (npz, metadata) and a stream resumed after a save
    half = FeatureStats(network="net", network_fingerprint="n1", protocol="p", protocol_fingerprint="p1")
    half.update(x[:60])
    half.save(tmp_path / "s.npz")
    resumed = FeatureStats.load(tmp_path / "s.npz")
    assert resumed.metadata() == half.metadata() and resumed.count == 60
    resumed.update(x[60:])
    np.testing.assert_allclose(resumed.mean_cov()[1], cov, rtol=1e-12, atol=1e-15)
    other = FeatureStats(network="net", network_fingerprint="n2", protocol="p", protocol_fingerprint="p1")
    other.update(y)
    with pytest.raises(StatsMismatchError, match="another feature network 'net' fingerprint 'n2'"):
        fvd_from_stats(ours, other)
    capped = FeatureStats(max_items=50)
    assert capped.update(x) == 50 and capped.full


# --- I3D, converter, preprocessing ---------------------------------------------------------------------------------
def test_preprocess_equals_cdfvd_preprocess_i3d(cdfvd):
    rng = np.random.default_rng(3)
    for shape in ((2, 3, 40, 48, 3), (1, 2, 256, 300, 3), (1, 2, 224, 224, 3)):  # up, down, same size
        v = rng.integers(0, 256, shape, dtype=np.uint8)
        ref = cdfvd.utils.preprocess_i3d(v).permute(0, 2, 3, 4, 1).numpy()  # (B, C, T, H, W) -> channels-last
        ours = np.asarray(preprocess(v))
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < 1e-6


def test_i3d_equals_cdfvd_inception_i3d(our_result, cdfvd_result):
    """Logits and average-pooled features of cd-fvd's InceptionI3d on its preprocessed clips (fp32, 1e-4 relative),
    with the weights through the converter: 4 videos, real then generated."""
    _, logits, pooled = our_result
    assert logits.shape == (4, 400) and pooled.shape == (4, 1024)
    assert rel_err(logits, cdfvd_result.logits) < 1e-4
    assert rel_err(pooled, cdfvd_result.pooled) < 1e-4


def test_i3d_time_average_equals_cdfvd_on_small_frames(torch_i3d, features):
    """The body on 2 x 16 x 64 x 64 inputs and the logits' mean over several time positions (as for 128-frame
    clips): cd-fvd's InceptionI3d with its final pool set to (1, 2, 2), against the same weights with
    `pool_size=(1, 2, 2)` (16 frames -> 2 positions), fp32, 1e-4 relative."""
    x = np.random.default_rng(4).uniform(-1, 1, (2, 16, 64, 64, 3)).astype(np.float32)
    pool = torch_i3d.avg_pool
    torch_i3d.avg_pool = torch.nn.AvgPool3d((1, 2, 2), stride=(1, 1, 1))
    try:
        with torch.no_grad():
            ref = torch_i3d(torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous())
    finally:
        torch_i3d.avg_pool = pool
    logits, _ = jax.jit(I3D(I3DConfig(pool_size=(1, 2, 2))).apply)({"params": features.params}, x)
    assert rel_err(logits, ref) < 1e-4


def test_fvd_equals_cdfvd(our_result, cdfvd_result):
    """The whole FVD (preprocessing, I3D logits, statistics, Frechet distance) against `cdfvd.compute_fvd` on the
    same random-weight network and videos, within 1e-3 relative (2 videos a side: a custom protocol)."""
    report = our_result[0]
    assert report.complete and report.num_real == report.num_fake == 2
    assert abs(report.fvd - cdfvd_result.fvd) <= 1e-3 * abs(cdfvd_result.fvd)
    assert report.to_dict()["protocol"]["num_frames"] == 9


def test_i3d_converter_round_trip_and_named_keys(torch_i3d, weights_file, features, cdfvd, tmp_path):
    state = {k: v.numpy() for k, v in torch_i3d.state_dict().items()}
    ours = i3d_state_dict(features.module.config, features.params)
    assert set(ours) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    dst = tmp_path / "i3d.safetensors"
    i3d_to_torch(features.module, features.params, dst)
    back = cdfvd.pytorch_i3d.InceptionI3d(400, in_channels=3)
    back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in read_weights(dst).items()}, strict=True)
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)
    broken = dict(state)
    del broken["Mixed_4c.b1b.bn.running_var"]
    broken["Mixed_5b.b0.conv3d.weight"] = broken["Mixed_5b.b0.conv3d.weight"][:10]
    broken["Mixed_3b.b9.conv3d.weight"] = np.zeros((1,), np.float32)
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in broken.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(ConversionError) as e:
        i3d_from_torch(tmp_path / "broken.safetensors")
    for key in ("Mixed_4c.b1b.bn.running_var", "Mixed_5b.b0.conv3d.weight", "Mixed_3b.b9.conv3d.weight"):
        assert key in str(e.value)


# --- the metric's protocol and errors, on a CPU-sized I3D --------------------------------------------------------
TINY = I3DConfig(width_divisor=16, pool_size=(1, 2, 2))
SMALL = FVDProtocol("small", num_videos=4, num_frames=8, resolution=(64, 64))


@pytest.fixture(scope="module")
def tiny_features():
    """Random parameters drawn from the abstract tree (nothing compiled for the init): He-scaled kernels, BatchNorm
    scales and variances near 1, small shifts."""
    module = I3D(TINY)
    rng = np.random.default_rng(0)

    def draw(path, shape):
        if path[-1] == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        if path[-1] in ("scale", "var"):
            return rng.uniform(0.7, 1.3, shape)
        return rng.normal(0, 0.05, shape)

    flat = {path: draw(path, a.shape).astype(np.float32)
            for path, a in get_model("i3d").abstract_params(module).items()}
    return I3DFeatures(module, traverse_util.unflatten_dict(flat), name="tiny")


def _clips(n, frames=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, frames, 32, 40, 3), dtype=np.uint8)


def test_named_protocols():
    assert PROTOCOLS["fvd2048_16f"].span == 16 and PROTOCOLS["fvd2048_128f"].span == 128
    sub = PROTOCOLS["fvd2048_128f_subsample8f"]
    assert (sub.num_videos, sub.num_frames, sub.frame_stride, sub.span) == (2048, 16, 8, 121)
    frames = np.arange(130)[None, :, None, None, None]
    np.testing.assert_array_equal(sub.clip(frames)[0, :, 0, 0, 0], np.arange(0, 121, 8))
    assert len({p.fingerprint for p in PROTOCOLS.values()}) == 3
    with pytest.raises(ValueError, match="features must be"):
        FVDProtocol("x", features="probs")


def test_fvd_streams_resumes_and_names_bad_input(tiny_features, tmp_path):
    real, fake = _clips(4), _clips(4, seed=1)
    whole = compute_fvd(real, fake, tiny_features, SMALL, batch_size=2)
    assert whole.fvd > 0 and whole.complete
    # an iterable of single videos (streamed), the same statistics
    streamed = video_stats(iter(list(fake)), tiny_features, SMALL, batch_size=2)
    np.testing.assert_allclose(streamed.sum, whole.fake_stats.sum, rtol=1e-12)

    # an interrupted evaluation resumes from its cache, skipping the videos already counted
    def interrupted():
        yield real[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        video_stats(interrupted(), tiny_features, SMALL, batch_size=2, cache=tmp_path / "real.npz")
    assert FeatureStats.load(tmp_path / "real.npz").count == 2
    resumed = video_stats(real, tiny_features, SMALL, batch_size=2, cache=tmp_path / "real.npz")
    np.testing.assert_allclose(resumed.sum_outer, whole.real_stats.sum_outer, rtol=1e-12)

    # statistics of another protocol are refused by name
    other = FVDProtocol("small_stride2", num_videos=4, num_frames=4, frame_stride=2, resolution=(64, 64))
    with pytest.raises(StatsMismatchError, match="protocol 'small'"):
        video_stats(real, tiny_features, other, batch_size=2, cache=tmp_path / "real.npz")
    # too short, not uint8, too few videos (error, or a warning with allow_fewer and the real count reported)
    with pytest.raises(ValueError, match="video 2 has 5 frames; protocol 'small' needs 8"):
        compute_fvd([real[0], real[1], real[2, :5], real[3]], fake, tiny_features, SMALL, batch_size=2)
    with pytest.raises(ValueError, match="expected uint8 videos"):
        compute_fvd(real.astype(np.float32), fake, tiny_features, SMALL, batch_size=2)
    with pytest.raises(NotEnoughVideosError, match="3 videos, protocol 'small' needs 4"):
        compute_fvd(real[:3], fake, tiny_features, SMALL, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compute_fvd(real[:3], fake, tiny_features, SMALL, batch_size=2, allow_fewer=True)
    assert any("3 videos" in str(w.message) for w in caught)
    assert (report.num_real, report.num_fake, report.complete) == (3, 4, False)


def test_i3d_input_size_is_checked():
    with pytest.raises(ValueError, match=r"at least 9 frames and 193\.\.224 pixels"):
        jax.eval_shape(lambda: I3D(I3DConfig()).init(jax.random.key(0), jnp.zeros((1, 16, 64, 64, 3))))


def test_convert_to_flax_cli_reads_the_weights_file(tiny_features, tmp_path):
    """`magdiff-jax convert to-flax --kind i3d FILE DST` (the config read from the shapes), and I3DFeatures from DST
    holds the same network (same fingerprint)."""
    from magdiff_jax import cli

    src = tmp_path / "tiny_i3d.safetensors"
    i3d_to_torch(tiny_features.module, tiny_features.params, src)
    cli._convert(cli.build_parser().parse_args(["convert", "to-flax", "--kind", "i3d", str(src), str(tmp_path / "f")]))
    # the pool size is not in the weights: the folder holds the default, so the tiny pool is given back by config
    back = I3DFeatures.from_torch(src, config=TINY)
    assert back.fingerprint == tiny_features.fingerprint
    folder = I3DFeatures.from_torch(tmp_path / "f")
    assert folder.module.config.width_divisor == 16 and folder.module.config.pool_size == (2, 7, 7)
    np.testing.assert_array_equal(folder.params["Mixed_4c"]["b1b"]["bn"]["var"],
                                  tiny_features.params["Mixed_4c"]["b1b"]["bn"]["var"])
