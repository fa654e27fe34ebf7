"""Scores of folders of videos, as `magdiff-jax eval` computes them: streaming, cached on disk, resumable.

    i3d = I3DFeatures.from_torch("i3d_pretrained_400.pt")          # or a folder `convert to-flax --kind i3d` wrote
    rows = evaluate_fvd(i3d, "real/", {"step_1000": "fake_1000/", "step_2000": "fake_2000/"}, cache="out/cache")
    rows = evaluate_is(c3d_module, c3d_params, {"step_2000": "fake_2000/"}, cache="out/cache")
    write_report("out", rows, scores=("fvd", "is"))                 # magdiff_jax.eval.report

Each folder is read one video at a time (`magdiff_jax.eval.videos`) and its features extracted in fixed-size
batches. What is computed is cached in `cache` as it goes, in files named after the network's fingerprint, the
protocol and the folder's listing fingerprint, so an interrupted evaluation resumes where it stopped, the real
videos' statistics are computed once for every generated set (and reused by later evaluations against the same
folder), and a folder that changed is read afresh. Each row records the counts, the protocol, the network's
fingerprint, the skipped videos (with `skip_bad`) and the extraction's throughput (videos per second).

Inception Score (StyleGAN-V's `isv2048_ucf`: 2048 videos, 16 frames from the first, 10 splits, the C3D's class
probabilities): the probabilities of every video are kept (N x 101 floats) and scored at the end
(`inception_score`), so the splits are the reference's whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from magdiff_jax.eval.fingerprint import network_fingerprint
from magdiff_jax.eval.fvd import (
    FVDProtocol,
    I3DFeatures,
    NotEnoughVideosError,
    fvd_from_stats,
    get_protocol,
    video_stats,
)
from magdiff_jax.eval.inception_score import STYLEGAN_V_SEED, inception_score
from magdiff_jax.eval.report import step_of
from magdiff_jax.eval.videos import listing_fingerprint, read_videos, video_files
from magdiff_jax.utils.files import as_path, user_path, write_bytes_whole


@dataclasses.dataclass(frozen=True)
class ISProtocol:
    """`num_videos` generated videos, the first `num_frames` frames of each, `num_splits` splits (StyleGAN-V's
    `isv2048_ucf` by default; TGAN2's is `num_splits=1` with eps 1e-20 and no shuffle, over 10 runs)."""

    name: str = "isv2048_ucf"
    num_videos: int = 2048
    num_frames: int = 16
    num_splits: int = 10
    shuffle_seed: int | None = STYLEGAN_V_SEED
    eps: float = 0.0

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _label_row(label: str, folder) -> dict[str, Any]:
    return {"label": str(label), "step": step_of(label), "folder": os.fspath(folder)}


def _cache_file(cache, *parts: str, suffix: str = ".npz"):
    if cache is None:
        return None
    root = as_path(cache)
    root.mkdir(parents=True, exist_ok=True)
    return root / ("-".join(map(str, parts)) + suffix)


def _fvd_side(features: I3DFeatures, folder, protocol: FVDProtocol, side: str, cache, batch_size: int,
              allow_fewer: bool, skip_bad: bool):
    files = video_files(folder)
    listing = listing_fingerprint(files, folder)
    cache_file = _cache_file(cache, f"fvd_{side}", protocol.name, features.fingerprint, listing)
    skipped: list[dict] = []
    videos = (video[None] for _, video in read_videos(files, min_frames=protocol.span, skip_bad=skip_bad,
                                                       skipped=skipped))
    start = time.perf_counter()
    stats = video_stats(videos, features, protocol, batch_size=batch_size, cache=cache_file,
                        allow_fewer=allow_fewer, what=f"{side} videos in {folder}")
    seconds = time.perf_counter() - start
    logging.info("FVD %s: %d videos of %s (%.1f s)", side, stats.count, folder, seconds)
    return stats, {"listing": listing, "skipped": skipped, "seconds": seconds, "cache": os.fspath(cache_file or "")}


def evaluate_fvd(features: I3DFeatures, real, fakes: Mapping[str, Any], protocol: str | FVDProtocol = "fvd2048_16f",
                 cache=None, batch_size: int = 8, allow_fewer: bool = False, skip_bad: bool = False,
                 method: str = "eigh") -> list[dict[str, Any]]:
    """FVD of each generated folder of `fakes` ({label: folder}) against the real folder, one row each (module
    docstring). The real statistics are computed (or read from the cache) once."""
    protocol = get_protocol(protocol)
    real_stats, real_info = _fvd_side(features, real, protocol, "real", cache, batch_size, allow_fewer, skip_bad)
    rows = []
    for label, folder in fakes.items():
        fake_stats, info = _fvd_side(features, folder, protocol, "fake", cache, batch_size, allow_fewer, skip_bad)
        row = _label_row(label, folder)
        row.update(fvd=fvd_from_stats(real_stats, fake_stats, method), num_videos=fake_stats.count,
                   num_real=real_stats.count, real=os.fspath(real), protocol=dataclasses.asdict(protocol),
                   complete=min(real_stats.count, fake_stats.count) >= protocol.num_videos,
                   network=features.name, network_fingerprint=features.fingerprint,
                   skipped=real_info["skipped"] + info["skipped"],
                   fvd_videos_per_second=_rate(fake_stats.count, info["seconds"]))
        rows.append(row)
    return rows


def _rate(count: int, seconds: float) -> float | None:
    return count / seconds if seconds > 0 and count else None


class C3DProbabilities:
    """The C3D (`magdiff_jax.models.c3d`) as a jitted map of uint8 clips (B, T, H, W, 3) to its class
    probabilities (softmax of fc8), with a fingerprint of its config and weights."""

    def __init__(self, module, params, name: str = "c3d"):
        from flax import linen as nn

        self.module, self.params, self.name = module, nn.meta.unbox(params), name
        self.fingerprint = network_fingerprint(module, self.params)

        def probs(params, clips):
            x = clips.astype(jax.numpy.float32) / 127.5 - 1.0
            return jax.nn.softmax(module.apply({"params": params}, x).logits.astype(jax.numpy.float32), axis=-1)

        self._run = jax.jit(probs)

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(self.params, clips), np.float64)


def _load_probs(path, fingerprint: str) -> np.ndarray | None:
    if path is None or not path.exists():
        return None
    with path.open("rb") as f:
        data = np.load(f, allow_pickle=False)
        if str(data["fingerprint"]) != fingerprint:
            from magdiff_jax.eval.frechet import StatsMismatchError

            raise StatsMismatchError(f"{path}: probabilities of another network or protocol "
                                     f"({data['fingerprint']} != {fingerprint})")
        return np.asarray(data["probs"])


def _save_probs(path, probs: np.ndarray, fingerprint: str) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, probs=probs, fingerprint=np.asarray(fingerprint))
    write_bytes_whole(path, buf.getvalue())


def _is_probs(c3d: C3DProbabilities, folder, protocol: ISProtocol, cache, batch_size: int, skip_bad: bool):
    """The class probabilities of the first `protocol.num_videos` videos of a folder (N, num_classes), resumed from
    and saved to the cache after every batch; and what the row records of the pass."""
    files = video_files(folder)
    listing = listing_fingerprint(files, folder)
    key = f"{c3d.fingerprint}-{protocol.fingerprint}"
    cache_file = _cache_file(cache, "is", protocol.name, c3d.fingerprint, listing)
    cached = _load_probs(cache_file, key)
    parts = [] if cached is None else [cached]
    done = 0 if cached is None else len(cached)
    skipped: list[dict] = []
    stream = read_videos(files, min_frames=protocol.num_frames, skip_bad=skip_bad, skipped=skipped)

    def run(batch):
        clips, n = np.stack(batch), len(batch)
        if n < batch_size:  # one compiled shape for the whole stream
            clips = np.concatenate([clips, np.zeros((batch_size - n, *clips.shape[1:]), clips.dtype)])
        parts.append(c3d(clips)[:n])
        if cache_file is not None:
            _save_probs(cache_file, np.concatenate(parts), key)

    start, batch = time.perf_counter(), []
    for index, (_, video) in enumerate(stream):
        if index >= protocol.num_videos:
            break
        if index < done:
            continue
        batch.append(video[: protocol.num_frames])
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    probs = np.concatenate(parts) if parts else np.zeros((0, c3d.module.config.num_classes))
    return probs, {"skipped": skipped, "seconds": time.perf_counter() - start, "computed": len(probs) - done}


def evaluate_is(c3d: C3DProbabilities, fakes: Mapping[str, Any], protocol: ISProtocol | None = None, cache=None,
                batch_size: int = 8, allow_fewer: bool = False, skip_bad: bool = False) -> list[dict[str, Any]]:
    """Inception Score of each generated folder ({label: folder}), one row each (module docstring). Fewer videos
    than the protocol's: `NotEnoughVideosError`, or with `allow_fewer` a warning and the real count in the row."""
    protocol = protocol or ISProtocol()
    if protocol.num_frames != c3d.module.config.num_frames:
        raise ValueError(f"protocol {protocol.name!r} takes {protocol.num_frames} frames, the C3D "
                         f"{c3d.module.config.num_frames} (its mean is of that many frames)")
    rows = []
    for label, folder in fakes.items():
        probs, info = _is_probs(c3d, folder, protocol, cache, batch_size, skip_bad)
        count = len(probs)
        if count < protocol.num_videos:
            message = f"{folder}: {count} videos, protocol {protocol.name!r} needs {protocol.num_videos}"
            if not allow_fewer:
                raise NotEnoughVideosError(message + " (allow_fewer to score them anyway)")
            warnings.warn(message + "; scoring them anyway", stacklevel=2)
        mean, std = inception_score(probs, protocol.num_splits, shuffle_seed=protocol.shuffle_seed, eps=protocol.eps)
        row = _label_row(label, folder)
        row.update({"is": mean, "is_std": std, "num_videos": count, "protocol": dataclasses.asdict(protocol),
                    "complete": count >= protocol.num_videos, "network": c3d.name,
                    "network_fingerprint": c3d.fingerprint, "skipped": info["skipped"],
                    "is_videos_per_second": _rate(info["computed"], info["seconds"])})
        rows.append(row)
    return rows


CLIP_SCORES = ("clipsim", "text_alignment", "frame_consistency", "clip_i", "dino")


def read_prompts(path) -> dict[str, str]:
    """{video name relative to its folder (`class_a/v0.mp4`, `batch.npy[3]`): prompt} from a JSON object."""
    try:
        prompts = json.loads(user_path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the prompts ({e})") from e
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{path}: expected a JSON object {{video name relative to its folder: prompt}}")
    return {str(k): v for k, v in prompts.items()}


def _subject_image(folder, name: str) -> np.ndarray | None:
    """The subject image of video `name` in `folder`: the same relative path with an image suffix, else None."""
    from magdiff_jax.data.video_io import IMAGE_SUFFIXES, read_image

    stem = name.rsplit(".", 1)[0] if "[" not in name else name.replace(".npy[", "_").rstrip("]")
    for suffix in IMAGE_SUFFIXES:
        path = user_path(folder) / f"{stem}{suffix}"
        if path.exists():
            return read_image(path)
    return None


def evaluate_clip(clip, tokenizer, fakes: Mapping[str, Any], prompts: Mapping[str, Mapping[str, str]] | None = None,
                  subjects: Mapping[str, Any] | None = None, dino=None, cache=None, skip_bad: bool = False,
                  num_frames: int | None = None, max_videos: int | None = None) -> list[dict[str, Any]]:
    """CLIP and DINO scores of each generated folder ({label: folder}), one row each with the mean and standard
    deviation over videos of: `clipsim` (mean frame-prompt cosine of CLIP embeddings) and `text_alignment` (the same
    x100, MagDiff's DAVIS score) where `prompts[label]` gives the video's prompt; `frame_consistency` (x100, the
    mean cosine of consecutive frames); `clip_i` and `dino` (frame-subject cosine, CLIP or DINO features) where
    `subjects[label]` holds an image named as the video (`clip/v0.mp4` -> `clip/v0.png`; `batch.npy[3]` ->
    `batch_3.png`). `clip`: a `CLIPEmbedder`; `tokenizer`: its `CLIPTokenizer`; `dino`: a `DINOEmbedder` or None.
    `num_frames`: score the first frames only; `max_videos`: the first videos only. Per-video values are cached
    (keyed by the networks' fingerprint and the folder's listing) as each video is done, so a rerun resumes. A video
    without a prompt is an error naming it (a score over a different set of videos would not say so)."""
    from magdiff_jax.eval import clip_scores as cs

    fingerprint = clip.fingerprint + ("" if dino is None else f"-{dino.fingerprint}")
    rows = []
    for label, folder in fakes.items():
        files = video_files(folder)
        listing = listing_fingerprint(files, folder)
        want_prompts = (prompts or {}).get(label)
        subject_folder = (subjects or {}).get(label)
        inputs = [want_prompts, None if subject_folder is None else os.fspath(subject_folder)]
        tag = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:8]
        cache_file = _cache_file(cache, "clip", fingerprint, listing, tag, num_frames, suffix=".json")
        done = json.loads(cache_file.read_text()) if cache_file is not None and cache_file.exists() else {}
        skipped: list[dict] = []
        start, computed = time.perf_counter(), 0
        seen = set()
        for name, video in read_videos(files, min_frames=2, skip_bad=skip_bad, skipped=skipped, root=folder):
            if max_videos is not None and len(seen) >= max_videos:
                break
            seen.add(name)
            if name in done:
                continue
            if want_prompts is not None and name not in want_prompts:
                raise ValueError(f"{folder}: no prompt for {name} (the prompts name videos relative to the folder, "
                                 f"e.g. {next(iter(want_prompts), 'none given')!r})")
            x = video[:num_frames] if num_frames else video
            x = (x.astype(np.float32) / 127.5 - 1.0)[None]
            values = {"frame_consistency": float(cs.frame_consistency(clip, x)[0])}
            if want_prompts is not None:
                ids = tokenizer([want_prompts[name]])
                values["clipsim"] = float(cs.clipsim(clip, x, ids)[0])
                values["text_alignment"] = 100.0 * values["clipsim"]
            if subject_folder is not None:
                image = _subject_image(subject_folder, name)
                if image is None:
                    raise ValueError(f"{subject_folder}: no subject image for {name}")
                s = (image.astype(np.float32) / 127.5 - 1.0)[None]
                values["clip_i"] = float(cs.clip_i(clip, x, s)[0])
                if dino is not None:
                    values["dino"] = float(cs.dino_score(dino, x, s)[0])
            done[name] = values
            computed += 1
            if cache_file is not None:
                write_bytes_whole(cache_file, json.dumps(done).encode())
        seconds = time.perf_counter() - start
        row = _label_row(label, folder)
        done = {name: v for name, v in done.items() if name in seen}
        for score in CLIP_SCORES:
            values = [v[score] for v in done.values() if score in v]
            if values:
                row[score], row[f"{score}_std"] = float(np.mean(values)), float(np.std(values))
        row.update(num_videos=len(done), skipped=skipped, network="clip" + ("+dino" if dino is not None else ""),
                   network_fingerprint=fingerprint, clip_videos_per_second=_rate(computed, seconds))
        rows.append(row)
    return rows


def load_clip(folder, batch_size: int = 32):
    """(CLIPEmbedder, CLIPTokenizer) of a CLIP model folder: a transformers CLIPModel folder (config.json of
    `model_type` "clip", both towers in one model.safetensors, the tokenizer files beside them: what the hub's
    openai/clip-vit-* hold), or a folder with `text_encoder/` and `image_encoder/` (CLIPTextModelWithProjection /
    CLIPVisionModelWithProjection folders, or ones `convert to-flax` wrote) and `tokenizer/`."""
    from magdiff_jax.eval.clip_scores import CLIPEmbedder
    from magdiff_jax.models.tokenizer import CLIPTokenizer

    root = as_path(folder)
    config = root / "config.json"
    if config.exists() and json.loads(config.read_text()).get("model_type") == "clip":
        from magdiff_jax.convert.clip import clip_model_from_torch

        towers, tok_folder = list(clip_model_from_torch(root)), root
    else:
        towers = []
        for name, kind in (("text_encoder", "clip_text"), ("image_encoder", "clip_vision")):
            path = root / name
            if not path.is_dir():
                raise FileNotFoundError(f"{folder}: neither a CLIPModel folder (config.json of model_type 'clip') "
                                        f"nor one with {name}/ (the CLIP {kind} tower with projection)")
            if (path / "params").exists():
                from magdiff_jax.export import load_model

                towers += load_model(path, kind=kind)[1:]
            else:
                from magdiff_jax.convert.core import load_torch

                towers += load_torch(kind, path)
        tok_folder = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    max_length = int(towers[0].config.max_position_embeddings)
    return CLIPEmbedder(*towers, batch_size=batch_size), CLIPTokenizer.from_folder(tok_folder, max_length=max_length)


def load_networks(i3d=None, c3d=None, clip=None, vgg=None, batch_size: int = 32) -> dict[str, Any]:
    """The feature networks an evaluation suite takes (`eval.suite.run_suite`'s keywords) from their paths; None
    skips one. `i3d`: `I3DFeatures` (pytorch-i3d's file or a converted folder); `c3d`: `C3DProbabilities`; `clip`:
    (CLIPEmbedder, CLIPTokenizer) (`load_clip`); `vgg`: the LPIPS (module, params) of a converted folder."""
    nets: dict[str, Any] = {}
    if i3d:
        nets["i3d"] = I3DFeatures.from_torch(i3d)
    if c3d:
        nets["c3d"] = C3DProbabilities(*load_feature_network(c3d, "c3d"))
    if clip:
        nets["clip"] = load_clip(clip, batch_size=batch_size)
    if vgg:
        nets["vgg"] = load_feature_network(vgg, "lpips")
    return nets


def merge_rows(*row_lists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the same label from several scores merged into one row per label (first-seen order); each score's
    own details (protocol, network, counts) kept under the score's name."""
    merged: dict[str, dict] = {}
    for rows in row_lists:
        for row in rows:
            into = merged.setdefault(row["label"], {"label": row["label"], "step": row["step"],
                                                    "folder": row["folder"]})
            score = "fvd" if "fvd" in row else "is" if "is" in row else "clip" if "frame_consistency" in row else None
            details = {k: v for k, v in row.items() if k not in ("label", "step", "folder")}
            for key in ("fvd", "is", "is_std", *CLIP_SCORES, *(f"{s}_std" for s in CLIP_SCORES)):
                if key in details:
                    into[key] = details.pop(key)
            into["num_videos"] = max(into.get("num_videos", 0), details.get("num_videos", 0))
            if score:
                into[f"{score}_details"] = details
    return list(merged.values())


def load_feature_network(path, kind: str):
    """(module, params) of a feature network: a folder `convert to-flax` wrote, or the reference weights file
    (`i3d`: pytorch-i3d's state dict; `c3d`: the PyTorch state-dict layout)."""
    p = user_path(path)
    if p.is_dir():
        from magdiff_jax.export import load_model

        _, module, params = load_model(p, kind=kind)
        return module, params
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such {kind} weights file or folder")
    from magdiff_jax.convert.core import load_torch

    return load_torch(kind, p)


__all__ = ["CLIP_SCORES", "C3DProbabilities", "ISProtocol", "evaluate_clip", "evaluate_fvd", "evaluate_is",
           "load_clip", "load_feature_network", "load_networks", "merge_rows", "read_prompts"]
