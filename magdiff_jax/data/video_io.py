"""Reading and writing videos with PyAV (H.264 mp4), channels-last uint8 (F, H, W, 3).

`read_frames` / `probe` take any video-like source: a video file (mp4, webm, mov, avi, ...), its bytes, a folder or
list of frame images (paths or bytes), or an array of decoded frames.

Writes go through a temporary file in the destination folder and a rename, so an interrupted write never leaves
a half-written video behind. Read errors name the file.

Images are decoded by PIL in full (a truncated file fails when read, never as grey rows), in the formats of
`IMAGE_FORMATS` only (whatever the file's name says), and every decoder error becomes a `VideoError` naming the file.
An image whose declared size passes `PIL.Image.MAX_IMAGE_PIXELS` (about 89 million pixels; PIL itself only warns
up to twice that) is refused before it is decoded, as a possible decompression bomb: no training input needs one,
and a few of them decoded at once in the loader threads can exhaust memory. Raise `PIL.Image.MAX_IMAGE_PIXELS` (or
set it to None) to accept larger images.

`confine(src, root)` checks that every file a video-like source names lies inside the folder `root` once symlinks
are resolved: the folder sources and builders read nothing outside the dataset folder.

Paths may be cloud-storage URIs (gs://, s3://, ...): such files are read whole through `etils.epath` and decoded from
their bytes, frame folders listed through it, and `confine` checks them by their normalised path (no symlinks there).
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
from pathlib import Path

import av
import numpy as np

from magdiff_jax.utils.files import as_path, atomic_path, is_remote


class VideoError(ValueError):
    """A video that cannot be decoded (corrupt, truncated, empty, not a video)."""


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 12) -> Path:
    """Encode (F, H, W, 3) uint8 frames as H.264 (yuv420p; H and W must be even), never half-written; `path` local
    or in an object store (encoded locally, then uploaded as one object)."""
    path = as_path(path) if is_remote(path) else Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"{path}: H.264 needs even height and width, got {frames.shape[1:3]}")
    with atomic_path(path) as tmp, av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame -> (F, H, W, 3) uint8. Raises VideoError naming the file when it cannot."""
    return read_frames(Path(path))


# ---------------------------------------------------------------------------------------------------------------
# Reading any video-like source: a video file, its bytes, a folder or list of frame images, or decoded frames.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")

VideoLike = str | os.PathLike | bytes | list | tuple | np.ndarray


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float | None  # None where the source does not say (frame lists, arrays)
    height: int
    width: int


def _name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {src.shape}>"
    return f"<{len(src)} frame images>"


def _remote(src) -> bool:
    return isinstance(src, (str, os.PathLike)) and is_remote(src)


def fs_path(path: str | os.PathLike):
    """`path` as a path object that reaches its storage: an `etils.epath.Path` for a cloud URI, else a `Path`."""
    return as_path(path) if is_remote(path) else Path(path)


def read_bytes(path: str | os.PathLike) -> bytes:
    """A whole file, local or in cloud storage."""
    return fs_path(path).read_bytes()


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a frame folder, in name order."""
    folder = fs_path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VideoError(f"{folder}: no frame images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def resolved(path: str | os.PathLike) -> str:
    """`path` with `..` (and, locally, symlinks) resolved: a cloud URI is normalised as text (it has no links)."""
    s = os.fspath(path)
    if is_remote(s):
        scheme, rest = s.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(s)


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether `path` lies inside the folder `root` once `..` and symlinks (of both) are resolved; a cloud URI by
    its normalised text (same scheme and bucket, then a prefix of whole path components)."""
    if is_remote(path) or is_remote(root):
        p, r = resolved(path), resolved(root).rstrip("/")
        return p == r or p.startswith(r + "/")
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _inside(path, root):
    if not is_inside(path, root):
        raise VideoError(f"{path}: path leaves the dataset folder {root} (it leads to {resolved(path)})")
    return path


def confine(src, root: str | os.PathLike):
    """`src` (a video-like source, or None) with every file it names checked to lie inside the folder `root`; a
    frame folder comes back as the list of its frame files, each checked (so a link inside the folder cannot lead
    out). Bytes, arrays and None pass through. Raises VideoError naming the first path that leaves `root`."""
    if isinstance(src, (str, os.PathLike)):
        _inside(src, root)
        if not fs_path(src).is_dir():
            return src
        # the folder is inside: so is each of its files that is not a symlink (cloud storage has none)
        if _remote(src):
            return [str(p) for p in frame_files(src)]
        return [_inside(p, root) if p.is_symlink() else p for p in frame_files(src)]
    if isinstance(src, (list, tuple)):
        return [_inside(p, root) if isinstance(p, (str, os.PathLike)) else p for p in src]
    return src


def _as_frame_list(src):
    """A frame folder, an image file or a list of image paths/bytes -> list of paths/bytes; None for a video file
    or its bytes."""
    if isinstance(src, (list, tuple)):
        return list(src)
    if isinstance(src, (str, os.PathLike)):
        if Path(src).suffix.lower() in IMAGE_SUFFIXES:  # one image: a one-frame video, decoded by PIL
            return [src]
        if fs_path(src).is_dir():
            return frame_files(src)
    return None


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # PIL's names of the IMAGE_SUFFIXES formats


def open_image(item, name: str | None = None):
    """Decode an image file or its bytes in full -> PIL image. Raises VideoError naming the image (`name`, else the
    path) for every decoder error: a truncated or corrupt file, a format outside IMAGE_FORMATS, or a declared size
    above `PIL.Image.MAX_IMAGE_PIXELS` (refused before decoding: a possible decompression bomb)."""
    from PIL import Image

    name = name or _name(item)
    img = None
    try:
        if _remote(item):
            try:
                item = read_bytes(item)
            except OSError as e:
                raise VideoError(f"{name}: cannot read ({e})") from e
        img = Image.open(io.BytesIO(item) if isinstance(item, bytes) else item, formats=IMAGE_FORMATS)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:  # PIL only warns below twice its limit
            raise VideoError(f"{name}: refused as a possible decompression bomb: {img.width}x{img.height} pixels, "
                             f"more than PIL.Image.MAX_IMAGE_PIXELS ({limit})")
        img.load()
    except Exception as e:  # PIL's format plugins raise many kinds of error on crafted input: all are bad input
        if img is not None:
            img.close()
        if isinstance(e, VideoError):
            raise
        if isinstance(e, Image.DecompressionBombError):
            raise VideoError(f"{name}: refused as a possible decompression bomb ({e})") from e
        raise VideoError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    return img


def read_image(item, resize: tuple[int, int] | None = None, mode: str = "RGB", name: str | None = None) -> np.ndarray:
    """An image file or its bytes -> uint8 (H, W, 3) (mode RGB) or (H, W) (mode L), optionally resized to
    (height, width) (area filter when shrinking, bicubic when growing). Raises VideoError naming the image when it
    cannot (`open_image`)."""
    from PIL import Image

    img = open_image(item, name)
    try:
        if img.mode != mode:
            img = img.convert(mode)
        if resize is not None and (img.height, img.width) != tuple(resize):
            shrink = resize[0] * resize[1] < img.height * img.width
            img = img.resize((resize[1], resize[0]), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
        return np.asarray(img)
    except (OSError, ValueError) as e:  # an image mode PIL cannot convert
        raise VideoError(f"{name or _name(item)}: cannot convert the {img.mode} image to {mode} ({e})") from e


def _open_container(src):
    try:
        if _remote(src):  # read whole through epath, decoded from memory
            return av.open(io.BytesIO(read_bytes(src)))
        return av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{_name(src)}: cannot open ({e})") from e


def probe(src: VideoLike) -> VideoInfo:
    """Frame count, fps and size without decoding more than needed (a container that does not store its frame
    count is decoded once to count). Raises VideoError naming the source when it cannot."""
    if isinstance(src, np.ndarray):
        if src.ndim not in (3, 4):
            raise VideoError(f"{_name(src)}: expected (F, H, W[, C]) frames")
        return VideoInfo(src.shape[0], None, src.shape[1], src.shape[2])
    frames = _as_frame_list(src)
    if frames is not None:
        if not frames:
            raise VideoError("empty frame list")
        img = open_image(frames[0])
        return VideoInfo(len(frames), None, img.height, img.width)
    try:
        with _open_container(src) as container:
            if not container.streams.video:
                raise VideoError(f"{_name(src)}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            n, h, w = stream.frames, stream.codec_context.height, stream.codec_context.width
            if n <= 0 or not h:
                count, shape = 0, None
                for frame in container.decode(video=0):
                    count, shape = count + 1, (frame.height, frame.width)
                if shape is None:
                    raise VideoError(f"{_name(src)}: no frames")
                n, (h, w) = count, shape
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{_name(src)}: cannot decode ({e})") from e
    return VideoInfo(n, fps, h, w)


def read_frames(src: VideoLike, indices=None, resize: tuple[int, int] | None = None, gray: bool = False) -> np.ndarray:
    """Decode the frames at `indices` (all when None) -> uint8 (len(indices), H, W, 3), or (.., H, W) with `gray`.

    `resize` = (height, width) scales each frame while decoding (swscale area filter when shrinking, bicubic when
    growing). Decoding stops after the last index asked for. Raises VideoError naming the source when it cannot
    decode, and when the video has fewer frames than an index asks for.
    """
    want = None if indices is None else [int(i) for i in indices]
    if isinstance(src, np.ndarray):
        out = src if want is None else _take(src, want, src.shape[0], _name(src))
        if resize is not None and out.shape[1:3] != tuple(resize):
            out = np.stack([_resize_array(f, resize) for f in out])
        return out
    frames = _as_frame_list(src)
    if frames is not None:
        picked = frames if want is None else _take(frames, want, len(frames), _name(src))
        return np.stack([read_image(f, resize, "L" if gray else "RGB") for f in picked])
    fmt = "gray" if gray else "rgb24"
    needed = None if want is None else set(want)
    last = None if want is None else max(want)
    got: dict[int, np.ndarray] = {}
    try:
        with _open_container(src) as container:
            if not container.streams.video:
                raise VideoError(f"{_name(src)}: no video stream")
            container.streams.video[0].thread_type = "AUTO"
            kwargs = {"format": fmt}
            for i, frame in enumerate(container.decode(video=0)):
                if last is not None and i > last:
                    break
                if needed is not None and i not in needed:
                    continue
                if resize is not None and (frame.height, frame.width) != tuple(resize):
                    shrink = resize[0] * resize[1] < frame.height * frame.width
                    kwargs.update(height=resize[0], width=resize[1], interpolation="AREA" if shrink else "BICUBIC")
                got[i] = frame.to_ndarray(**kwargs)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{_name(src)}: cannot decode ({e})") from e
    if not got:
        raise VideoError(f"{_name(src)}: no frames")
    if want is None:
        return np.stack([got[i] for i in sorted(got)])
    missing = [i for i in want if i not in got]
    if missing:
        raise VideoError(f"{_name(src)}: has {max(got) + 1} frames, frame {missing[0]} was asked for")
    return np.stack([got[i] for i in want])


def _take(seq, want, n, name):
    bad = [i for i in want if not 0 <= i < n]
    if bad:
        raise VideoError(f"{name}: has {n} frames, frame {bad[0]} was asked for")
    return seq[want] if isinstance(seq, np.ndarray) else [seq[i] for i in want]


def _resize_array(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(frame)
    shrink = size[0] * size[1] < frame.shape[0] * frame.shape[1]
    img = img.resize((size[1], size[0]), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
    return np.asarray(img)
