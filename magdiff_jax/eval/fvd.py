"""Frechet Video Distance (Unterthiner et al. 2018) with the Kinetics-400 I3D, under named protocols.

    features = I3DFeatures.from_torch("i3d_pretrained_400.pt")     # or I3DFeatures(module, params)
    report = compute_fvd(real_videos, fake_videos, features, protocol="fvd2048_16f", batch_size=8)
    report.fvd, report.num_real, report.num_fake, report.to_dict()  # the JSON a report file holds

Videos are uint8 (N, T, H, W, 3) arrays, or iterables of such batches (or of single (T, H, W, 3) videos), streamed
batch by batch: never all in memory. Per protocol (`FVDProtocol`, frozen): each video's clip (`num_frames` frames
`frame_stride` apart from the first frame) is resized to `resolution` with bilinear interpolation (half-pixel
centres, no antialiasing: torch's `F.interpolate(..., mode="bilinear", align_corners=False)` that cd-fvd's
`preprocess_i3d` applies, equal to `jax.image.resize(..., "linear", antialias=False)`), scaled to [-1, 1] as
2 x / 255 - 1, and run through the I3D; its 400-d logits (or the 1024-d pooled features, `features="pool"`) give
float64 statistics (`magdiff_jax.eval.frechet.FeatureStats`) of `num_videos` real and `num_videos` generated videos,
and FVD is the Frechet distance of the two Gaussians (`frechet_distance`).

Named protocols (StyleGAN-V's `metrics/metric_main.py`, Skorokhodov et al. 2022):
  fvd2048_16f               2048 videos a side, 16 consecutive frames
  fvd2048_128f              2048 videos a side, 128 consecutive frames
  fvd2048_128f_subsample8f  2048 videos a side, 16 frames 8 apart (frames 0, 8, ..., 120 of a 128-frame span)
all at 224 x 224 with the logits. StyleGAN-V takes generated clips from the first frame, and real clips at a random
offset in each video (its dataset's `load_n_consecutive_random_offset`): here every clip starts at the first frame
of what is passed, so a caller who wants StyleGAN-V's real clips cuts them first. A custom protocol is an
`FVDProtocol(...)` passed instead of a name (e.g. fewer videos for a quick check); its name is recorded with its
fields in the report and the statistics files.

Errors rather than a silently different protocol: a video with fewer frames than the protocol's span, a video that
is not uint8 RGB, fewer videos than the protocol needs (`NotEnoughVideosError`; with `allow_fewer=True` a warning and
the real counts in the report), statistics from another network or protocol (`StatsMismatchError`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.eval.fingerprint import network_fingerprint
from magdiff_jax.eval.frechet import FeatureStats, StatsMismatchError, frechet_distance
from magdiff_jax.utils.files import user_path


@dataclasses.dataclass(frozen=True)
class FVDProtocol:
    """`num_videos` real and generated videos; clips of `num_frames` frames `frame_stride` apart from each video's
    first frame; frames resized to `resolution` (H, W); `features` "logits" (400-d, the standard) or "pool"."""

    name: str
    num_videos: int = 2048
    num_frames: int = 16
    frame_stride: int = 1
    resolution: tuple[int, int] = (224, 224)
    features: str = "logits"

    def __post_init__(self):
        for f in ("num_videos", "num_frames", "frame_stride"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"FVDProtocol {self.name!r}: {f} must be a positive integer, got {v!r}")
        if len(self.resolution) != 2 or any(not isinstance(s, int) or s < 1 for s in self.resolution):
            raise ValueError(f"FVDProtocol {self.name!r}: resolution must be (H, W), got {self.resolution!r}")
        if self.features not in ("logits", "pool"):
            raise ValueError(f"FVDProtocol {self.name!r}: features must be 'logits' or 'pool', got {self.features!r}")

    @property
    def span(self) -> int:
        """The frames a video needs: (num_frames - 1) * frame_stride + 1."""
        return (self.num_frames - 1) * self.frame_stride + 1

    @property
    def fingerprint(self) -> str:
        return _digest(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())

    def clip(self, videos: np.ndarray) -> np.ndarray:
        """(B, T, H, W, C) with T >= span -> (B, num_frames, H, W, C), frames 0, stride, 2 stride, ..."""
        return videos[:, : self.span : self.frame_stride]


PROTOCOLS = {
    "fvd2048_16f": FVDProtocol("fvd2048_16f"),
    "fvd2048_128f": FVDProtocol("fvd2048_128f", num_frames=128),
    "fvd2048_128f_subsample8f": FVDProtocol("fvd2048_128f_subsample8f", num_frames=16, frame_stride=8),
}


def get_protocol(protocol: str | FVDProtocol) -> FVDProtocol:
    if isinstance(protocol, FVDProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FVD protocol {protocol!r}; named ones: {sorted(PROTOCOLS)}, or pass an "
                         "FVDProtocol(...)")
    return PROTOCOLS[protocol]


class NotEnoughVideosError(ValueError):
    """Fewer videos than the protocol needs."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def preprocess(videos, resolution: tuple[int, int] = (224, 224)) -> jax.Array:
    """uint8 (B, T, H, W, 3) (values 0..255) -> float32 (B, T, *resolution, 3) in [-1, 1]: bilinear resize (half-pixel
    centres, no antialiasing, as cd-fvd's `preprocess_i3d`) of the 0..255 values, then 2 x / 255 - 1."""
    x = jnp.asarray(videos).astype(jnp.float32)
    b, t, _, _, c = x.shape
    x = jax.image.resize(x, (b, t, *resolution, c), method="linear", antialias=False)
    return 2.0 * x / 255.0 - 1.0


class I3DFeatures:
    """The I3D (`magdiff_jax.models.i3d`) as a batched, jitted feature extractor of uint8 videos. `fingerprint`
    identifies its config and weights (statistics record it); `name` labels it in reports. One program is compiled
    per input shape: `compute_fvd` pads a short last batch to `batch_size` so that one shape serves a stream."""

    def __init__(self, module, params, name: str = "i3d"):
        params = nn.meta.unbox(params)
        self.module, self.params, self.name = module, params, name
        self.fingerprint = network_fingerprint(module, params)
        self._run = jax.jit(self._forward, static_argnames=("resolution",))

    def _forward(self, params, videos, resolution):
        return self.module.apply({"params": params}, preprocess(videos, resolution))

    @classmethod
    def from_torch(cls, path: str | os.PathLike, name: str = "i3d", **kwargs) -> I3DFeatures:
        """From pytorch-i3d's weights file (`i3d_pretrained_400.pt` or .safetensors; `convert.i3d.i3d_from_torch`),
        or a folder `convert to-flax --kind i3d` wrote."""
        from magdiff_jax.convert.i3d import i3d_from_torch

        p = user_path(path)
        if p.is_dir():
            from magdiff_jax.export import load_model

            _, module, params = load_model(p, kind="i3d")
        else:
            module, params = i3d_from_torch(p, **kwargs)
        return cls(module, params, name=name)

    def extract(self, videos, protocol: str | FVDProtocol = "fvd2048_16f") -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, T, H, W, 3), T >= the protocol's span -> (logits (B, num_classes), pooled (B, feature_dim)),
        float32 numpy, of each video's protocol clip."""
        protocol = get_protocol(protocol)
        videos = _check_videos(np.asarray(videos), protocol, 0, "videos")
        return self.extract_clips(protocol.clip(videos), protocol)

    def extract_clips(self, clips, protocol: FVDProtocol) -> tuple[np.ndarray, np.ndarray]:
        """`extract` of clips already cut: uint8 (B, num_frames, H, W, 3)."""
        logits, pooled = self._run(self.params, clips, resolution=tuple(protocol.resolution))
        return np.asarray(logits), np.asarray(pooled)

    def __call__(self, videos, protocol: str | FVDProtocol = "fvd2048_16f") -> np.ndarray:
        """The protocol's features ((B, 400) logits or (B, 1024) pooled) of uint8 videos (B, T, H, W, 3)."""
        protocol = get_protocol(protocol)
        logits, pooled = self.extract(videos, protocol)
        return logits if protocol.features == "logits" else pooled


def _check_videos(videos: np.ndarray, protocol: FVDProtocol, first: int, what: str) -> np.ndarray:
    """A batch of uint8 RGB videos long enough for the protocol, else an error naming the first bad one."""
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 videos (N, T, H, W, 3), got shape {videos.shape} at video {first}")
    if videos.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 videos (values 0..255), got {videos.dtype} at video {first}")
    if videos.shape[1] < protocol.span:
        raise ValueError(f"{what}: video {first} has {videos.shape[1]} frames; protocol {protocol.name!r} needs "
                         f"{protocol.span} ({protocol.num_frames} frames {protocol.frame_stride} apart)")
    return videos


def _clips(videos, protocol: FVDProtocol, batch_size: int, what: str) -> Iterator[np.ndarray]:
    """An array (N, T, H, W, 3) or an iterable of such batches / single (T, H, W, 3) videos -> the protocol's clips
    in arrays of up to `batch_size` videos; each incoming array is checked (`_check_videos`, naming the video's
    index in the stream) and cut to its clips before it is batched, so videos of different lengths mix."""
    if isinstance(videos, np.ndarray | jax.Array):
        videos = [np.asarray(videos)]
    pending: list[np.ndarray] = []
    seen = 0
    for item in videos:
        item = _check_videos(np.asarray(item), protocol, seen, what)
        seen += item.shape[0]
        pending.extend(protocol.clip(item))
        while len(pending) >= batch_size:
            yield np.stack(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield np.stack(pending)


def video_stats(videos: np.ndarray | Iterable, features: I3DFeatures, protocol: str | FVDProtocol = "fvd2048_16f",
                batch_size: int = 8, cache: str | os.PathLike | None = None, allow_fewer: bool = False,
                what: str = "videos", observe: Callable[[np.ndarray, np.ndarray], Any] | None = None) -> FeatureStats:
    """Feature statistics of the first `protocol.num_videos` videos of a stream. With `cache` (.npz), the statistics
    are saved after every batch and an existing file is resumed: its network and protocol must match (else
    `StatsMismatchError`), and the videos it already counts are skipped (the stream must repeat the same order).
    Fewer videos than the protocol needs: `NotEnoughVideosError`, or with `allow_fewer` a warning. `observe`, when
    given, is called with each batch's (logits (n, num_classes), pooled (n, feature_dim)) as they are computed (to
    keep per-video features beside the statistics)."""
    protocol = get_protocol(protocol)
    stats = None
    if cache is not None and user_path(cache).exists():
        stats = FeatureStats.load(cache)
        stats.check_compatible(network_fingerprint=features.fingerprint, protocol_fingerprint=protocol.fingerprint,
                               what=f"{what}: statistics in {cache}")
        stats.max_items = protocol.num_videos
    if stats is None:
        stats = FeatureStats(network=features.name, network_fingerprint=features.fingerprint, protocol=protocol.name,
                             protocol_fingerprint=protocol.fingerprint, max_items=protocol.num_videos)
    skip, seen = stats.count, 0
    for batch in _clips(videos, protocol, batch_size, what):
        if stats.full:
            break
        start, seen = seen, seen + batch.shape[0]
        if seen <= skip:
            continue
        batch = batch[max(skip - start, 0):][: protocol.num_videos - stats.count]
        n = batch.shape[0]
        if n < batch_size:  # one compiled shape for the whole stream
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
        logits, pooled = features.extract_clips(batch, protocol)
        logits, pooled = logits[:n], pooled[:n]
        stats.update(logits if protocol.features == "logits" else pooled)
        if observe is not None:
            observe(logits, pooled)
        if cache is not None:
            stats.save(cache)
    if stats.count < protocol.num_videos:
        message = (f"{what}: {stats.count} videos, protocol {protocol.name!r} needs {protocol.num_videos}")
        if not allow_fewer:
            raise NotEnoughVideosError(message + " (pass allow_fewer=True to score them anyway; the report then "
                                                 "records the real count)")
        warnings.warn(message + "; scoring them anyway (allow_fewer=True)", stacklevel=2)
    return stats


def fvd_from_stats(real: FeatureStats, fake: FeatureStats, method: str = "eigh") -> float:
    """The Frechet distance of two statistics of one network and protocol (else `StatsMismatchError`)."""
    fake.check_compatible(other=real, what="generated-video statistics")
    if real.count < 2 or fake.count < 2:
        raise NotEnoughVideosError(f"FVD needs at least 2 videos a side, got {real.count} real and {fake.count} "
                                   "generated")
    mu1, s1 = real.mean_cov()
    mu2, s2 = fake.mean_cov()
    return frechet_distance(mu1, s1, mu2, s2, method=method)


@dataclasses.dataclass
class FVDReport:
    """An FVD and what it was measured on; `to_dict()` is its JSON form (without the statistics)."""

    fvd: float
    protocol: FVDProtocol
    num_real: int
    num_fake: int
    network: str
    network_fingerprint: str
    complete: bool  # both sides had the protocol's num_videos
    real_stats: FeatureStats = dataclasses.field(repr=False)
    fake_stats: FeatureStats = dataclasses.field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"fvd": self.fvd, "protocol": dataclasses.asdict(self.protocol),
                "protocol_fingerprint": self.protocol.fingerprint, "num_real": self.num_real,
                "num_fake": self.num_fake, "complete": self.complete, "network": self.network,
                "network_fingerprint": self.network_fingerprint}


def compute_fvd(real_videos, fake_videos, features: I3DFeatures, protocol: str | FVDProtocol = "fvd2048_16f",
                batch_size: int = 8, allow_fewer: bool = False, real_cache: str | os.PathLike | None = None,
                fake_cache: str | os.PathLike | None = None, method: str = "eigh",
                observe: Callable[[str, np.ndarray, np.ndarray], Any] | None = None) -> FVDReport:
    """FVD between real and generated videos (arrays or iterables of uint8 (N, T, H, W, 3) batches) under a protocol
    (module docstring); caches resume as `video_stats` says, and a cache of real statistics alone (a stream that
    is already complete) skips the real videos (pass `real_videos=()`). `observe(side, logits, pooled)`, side
    "real" or "fake", sees each batch's features."""
    protocol = get_protocol(protocol)

    def observer(side):
        return None if observe is None else lambda logits, pooled: observe(side, logits, pooled)

    real = video_stats(real_videos, features, protocol, batch_size, real_cache, allow_fewer, "real videos",
                       observer("real"))
    fake = video_stats(fake_videos, features, protocol, batch_size, fake_cache, allow_fewer, "generated videos",
                       observer("fake"))
    return FVDReport(fvd=fvd_from_stats(real, fake, method), protocol=protocol, num_real=real.count,
                     num_fake=fake.count, network=features.name, network_fingerprint=features.fingerprint,
                     complete=real.count >= protocol.num_videos and fake.count >= protocol.num_videos,
                     real_stats=real, fake_stats=fake)


__all__ = ["PROTOCOLS", "FVDProtocol", "FVDReport", "I3DFeatures", "NotEnoughVideosError", "StatsMismatchError",
           "compute_fvd", "fvd_from_stats", "get_protocol", "preprocess", "video_stats"]
