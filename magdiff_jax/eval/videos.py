"""Folders of videos, read one video at a time for feature extraction (videos are never all in memory).

    files = video_files("real/")                          # every video under the folder, in a fixed order
    for name, video in read_videos(files, root="real/", min_frames=16):   # (T, H, W, 3) uint8
        ...

A folder holds video files (`data.video_io.VIDEO_SUFFIXES`, `.gif`) or uint8 arrays (`.npy`: one video
(T, H, W, 3), or a batch (N, T, H, W, 3) whose videos are named `file.npy[i]`), at any depth (UCF-101's class
folders), local or in a bucket. The order is the sorted relative paths, so a resumed evaluation sees the same
stream. `listing_fingerprint` hashes the names and sizes: feature caches are keyed on it, so a folder that changed
is read afresh rather than resumed from another folder's statistics.

A video that cannot be decoded, or is shorter than a protocol needs, is an error naming the file
(`EvalVideoError`), or with `skip_bad` a warning and an entry in the `skipped` list the caller reports: an
evaluation never silently scores a different set of videos.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from magdiff_jax.data.video_io import VIDEO_SUFFIXES, VideoError, read_bytes, read_frames
from magdiff_jax.utils.files import as_path, is_remote, user_path

EVAL_SUFFIXES = (*VIDEO_SUFFIXES, ".gif", ".npy")


class EvalVideoError(ValueError):
    """A video an evaluation cannot use: undecodable, not uint8 (T, H, W, 3), or too short for the protocol."""


def video_files(folder: str | os.PathLike) -> list:
    """Every video file (EVAL_SUFFIXES) under `folder`, at any depth, sorted by relative path. An empty or missing
    folder is an error naming it."""
    root = user_path(folder)
    if not root.is_dir():
        raise EvalVideoError(f"{folder}: not a folder of videos")
    files = [p for p in root.rglob("*") if p.suffix.lower() in EVAL_SUFFIXES and not p.name.startswith(".")]
    files.sort(key=lambda p: os.fspath(p.relative_to(root)))
    if not files:
        raise EvalVideoError(f"{folder}: no videos ({', '.join(EVAL_SUFFIXES)})")
    return files


def listing_fingerprint(files: Sequence, root: str | os.PathLike) -> str:
    """A hash of the files' relative paths and sizes (16 hex digits)."""
    root = user_path(root)
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        size = st.st_size if hasattr(st, "st_size") else st.length  # pathlib's os.stat_result or epath's StatResult
        h.update(f"{os.fspath(f.relative_to(root))}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _check(name: str, video: np.ndarray, min_frames: int) -> np.ndarray:
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise EvalVideoError(f"{name}: expected uint8 frames (T, H, W, 3), got {video.dtype} {video.shape}")
    if video.shape[0] < min_frames:
        raise EvalVideoError(f"{name}: {video.shape[0]} frames, the protocol needs at least {min_frames}")
    return video


def _decode(path) -> list[tuple[str, np.ndarray]]:
    """[(suffix of the name, video)]: one ("", video) for a video file or a (T, H, W, 3) array, ("[i]", video_i)
    for each video of a batch (N, T, H, W, 3) array."""
    name = os.fspath(path)
    if path.suffix.lower() == ".npy":
        try:
            with path.open("rb") as f:
                array = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EvalVideoError(f"{name}: cannot read the array ({e})") from e
        if array.ndim == 5:
            return [(f"[{i}]", video) for i, video in enumerate(array)]
        return [("", array)]
    try:
        frames = read_frames(read_bytes(path) if is_remote(path) else path)
    except VideoError as e:
        raise EvalVideoError(str(e) if name in str(e) else f"{name}: {e}") from e
    return [("", np.asarray(frames))]


def read_videos(files: Sequence, min_frames: int = 1, skip_bad: bool = False, skipped: list | None = None,
                root: str | os.PathLike | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, (T, H, W, 3) uint8) for each video of `files` in order (a batch .npy gives several, named
    `file.npy[i]`); names are the files' paths, or relative to `root` when given. A bad or too short video raises
    `EvalVideoError` naming it; with `skip_bad` it is logged, warned about and appended to `skipped` as
    {"video": path, "reason": ...}."""
    root = None if root is None else user_path(root)
    for path in files:
        path = as_path(path) if is_remote(path) else path
        full = os.fspath(path)
        name = full if root is None else os.fspath(path.relative_to(root))
        try:
            items = [(name + index, _check(full + index, video, min_frames)) for index, video in _decode(path)]
        except EvalVideoError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipped: {e}", stacklevel=2)
            logging.warning("skipped %s", e)
            if skipped is not None:
                skipped.append({"video": full, "reason": str(e)})
            continue
        yield from items


def batches(videos: Iterator[tuple[str, np.ndarray]], size: int) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Groups of up to `size` (names, videos) from a `read_videos` stream."""
    names, arrays = [], []
    for name, video in videos:
        names.append(name)
        arrays.append(video)
        if len(names) == size:
            yield names, arrays
            names, arrays = [], []
    if names:
        yield names, arrays


__all__ = ["EVAL_SUFFIXES", "EvalVideoError", "batches", "listing_fingerprint", "read_videos", "video_files"]
