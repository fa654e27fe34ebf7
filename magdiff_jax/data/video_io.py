"""Reading and writing videos with PyAV (H.264 mp4), channels-last uint8 (F, H, W, 3).

Writes go through a temporary file in the destination folder and a rename, so an interrupted write never leaves
a half-written video behind. Read errors name the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import av
import numpy as np


class VideoError(ValueError):
    """A video that cannot be decoded (corrupt, truncated, empty, not a video)."""


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 12) -> Path:
    """Encode (F, H, W, 3) uint8 frames as H.264 (yuv420p; H and W must be even)."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"{path}: H.264 needs even height and width, got {frames.shape[1:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame -> (F, H, W, 3) uint8. Raises VideoError naming the file when it cannot."""
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot decode ({e})") from e
    if not frames:
        raise VideoError(f"{path}: no frames")
    return np.stack(frames)
