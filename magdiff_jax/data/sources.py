"""Data sources: random-access lists of raw records, one schema for every dataset.

A record is a plain picklable dict (what `source[i]` returns and the Grain pipeline loads):

    key      str                  stable unique id (a relative path, or a builder's key); bad-input reports name it
    video    VideoLike            a video file or frame folder (path str), encoded video bytes, a list of frame
                                  images (paths or bytes), or decoded uint8 frames (F, H, W, 3)   -- see video_io
    caption  str | list[str]      a list means one is picked at random in training (the first in evaluation)
    mask     VideoLike | None     the subject (MagDiff): per-frame PNG folder/list, a mask video, or (F, H, W)
    frames   list[int] | None     frame indices valid for sampling (None: all)
    fps      float | None         frame rate where the annotation gives it (otherwise the container's)
    root     str                  (folder sources) the dataset folder: every file the record names must lie inside
                                  it, symlinks resolved (`transforms.confined` checks before reading)

Sources: `VideoCaptionFolder` (the WebVid/Pexels layout: videos or frame folders + captions.csv/.jsonl),
`ImageCaptionFolder` (images + captions: joint image/video training and the T2I stage; an image is a one-frame
video), `SyntheticSource` (the embedded default, generated on the fly). TFDS builders and pre-encoded latents
provide sources of the same schema (`builders.py`, `encode.py`).

Malformed annotation rows (no video or caption, a file that does not exist, unreadable frame lists, bytes that are
not UTF-8, a path that leaves the dataset folder: absolute, through `..` or through a symlink) never reach the
pipeline: each source lists them in `source.bad` as (key, reason), and `source.total` counts them, so the
pipeline's bad-input report covers them.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from magdiff_jax.data.synthetic import SyntheticConfig, make_clip
from magdiff_jax.data.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, is_inside

ANNOTATION_NAMES = ("captions.csv", "captions.jsonl")


def find_annotations(root: str | os.PathLike, names=ANNOTATION_NAMES) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder does not exist")
    for name in names:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no annotation file (expected one of {', '.join(names)})")


def _not_utf8(error: UnicodeDecodeError) -> str:
    """'byte 0xff at line 3, column 7': where a UTF-8 decoding error is (what a reason or an error names)."""
    data, at = error.object, error.start
    line = data.count(b"\n", 0, at) + 1
    column = at - (data.rfind(b"\n", 0, at) + 1) + 1
    return f"byte 0x{data[at]:02x} at line {line}, column {column}"


def read_utf8(path: str | os.PathLike) -> str:
    """A whole text file, which must be UTF-8: ValueError naming the file, line and byte otherwise."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({_not_utf8(e)})") from e


_ESCAPED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _escaped_byte(text: str) -> int | None:
    m = _ESCAPED.search(text)
    return None if m is None else ord(m.group()) - 0xDC00


def read_rows(path: str | os.PathLike) -> list[tuple[str, dict | None, str | None]]:
    """Rows of a .csv (with a header) or .jsonl annotation file -> [(row label, fields or None, error or None)].
    A row that cannot be parsed (bytes that are not UTF-8 included) comes back with fields None and the reason,
    never as an exception; a file that cannot be parsed at all (its csv header not UTF-8, a NUL byte or an endless
    quoted field) raises ValueError naming the file and line."""
    path = Path(path)
    data = path.read_bytes()
    rows = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(data.splitlines(), 1):
            if n == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if not line.strip():
                continue
            label = f"{path.name}:{n}"
            try:
                fields = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                rows.append((label, None, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"))
                continue
            except json.JSONDecodeError as e:
                rows.append((label, None, f"not valid JSON ({e.msg})"))
                continue
            except RecursionError:
                rows.append((label, None, "not valid JSON (nested too deeply)"))
                continue
            if not isinstance(fields, dict):
                rows.append((label, None, "not a JSON object"))
                continue
            rows.append((label, fields, None))
        return rows
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        byte = _escaped_byte(",".join(header))
        if byte is not None:
            raise ValueError(f"{path}:1: the header is not UTF-8 (byte 0x{byte:02x})")
        for fields in reader:
            label = f"{path.name}:{reader.line_num}"
            bad = [(k, _escaped_byte(v if isinstance(v, str) else ",".join(map(str, v))))
                   for k, v in fields.items() if v is not None]
            bad = [(k, b) for k, b in bad if b is not None]
            if bad:
                column = "past the header's columns" if bad[0][0] is None else f"in column {bad[0][0]!r}"
                rows.append((label, None, f"not UTF-8 (byte 0x{bad[0][1]:02x} {column})"))
            elif None in fields:
                rows.append((label, None, f"{len(header) + len(fields[None])} fields, header has {len(header)}"))
            elif any(v is None for v in fields.values()):
                rows.append((label, None, f"fewer fields than the header's {len(header)}"))
            else:
                rows.append((label, fields, None))
    except csv.Error as e:  # a NUL byte, a field past csv's size limit: the rows after it cannot be trusted
        raise ValueError(f"{path}:{reader.line_num}: cannot parse the csv ({e})") from e
    return rows


def parse_frames(value) -> list[int] | None:
    """A valid-frame list from an annotation: a JSON list, "0 1 2", "0,1,2" or a range "4-19" (inclusive)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, list):
        frames = [int(v) for v in value]
    else:
        text = str(value).strip()
        if text.startswith("["):
            frames = [int(v) for v in json.loads(text)]
        elif "-" in text and all(p.strip().isdigit() for p in text.split("-", 1)):
            lo, hi = (int(p) for p in text.split("-", 1))
            frames = list(range(lo, hi + 1))
        else:
            frames = [int(v) for v in text.replace(",", " ").split()]
    if not frames or min(frames) < 0:
        raise ValueError(f"bad frame list {value!r}")
    return frames


def _caption(value):
    if isinstance(value, list):
        caps = [str(c) for c in value if str(c).strip()]
        return caps or None
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            return _caption(json.loads(value))
        except json.JSONDecodeError:
            pass
    return str(value) if value is not None and str(value).strip() else None


class _RowSource:
    """Shared parsing of folder annotations into records; subclasses say which column holds the media."""

    media_column = "video"
    media_suffixes: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike, annotations: str | os.PathLike | None = None):
        self.root = Path(root).absolute()
        self.annotations = Path(annotations) if annotations is not None else find_annotations(self.root)
        self.records: list[dict] = []
        self.bad: list[tuple[str, str]] = []
        for label, fields, error in read_rows(self.annotations):
            if error is None:
                try:
                    self.records.append(self._record(fields))
                    continue
                except (ValueError, TypeError) as e:
                    error = str(e)
                media = fields.get(self.media_column)
                label = f"{label} ({media})" if media else label
            self.bad.append((label, error))

    def _resolve(self, value: str, what: str) -> Path:
        """A path of the annotations, which must lie inside the dataset folder (relative, and neither `..` nor a
        symlink leading out of it)."""
        if Path(value).is_absolute():
            raise ValueError(f"{what} {value}: path leaves the dataset folder (absolute paths are not allowed)")
        path = self.root / value
        if not is_inside(path, self.root):
            raise ValueError(f"{what} {value}: path leaves the dataset folder (it leads to {os.path.realpath(path)})")
        if not path.exists():
            raise ValueError(f"{what} {value} does not exist")
        return path

    def _record(self, fields: dict) -> dict:
        media = fields.get(self.media_column)
        if media is None or not str(media).strip():
            raise ValueError(f"no '{self.media_column}' value")
        path = self._resolve(str(media), self.media_column)
        if path.is_file() and path.suffix.lower() not in self.media_suffixes:
            raise ValueError(f"{media}: not a {'/'.join(s[1:] for s in self.media_suffixes)} file")
        caption = _caption(fields.get("caption"))
        if caption is None:
            raise ValueError("no caption")
        mask = fields.get("mask")
        mask = str(self._resolve(str(mask), "mask")) if mask not in (None, "") else None
        try:
            frames = parse_frames(fields.get("frames"))
            fps = float(fields["fps"]) if fields.get("fps") not in (None, "") else None
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(str(e)) from e
        video = str(path) if path.is_dir() or self.media_column == "video" else [str(path)]
        return {"key": str(media), "video": video, "caption": caption, "mask": mask, "frames": frames, "fps": fps,
                "root": str(self.root)}

    @property
    def total(self) -> int:
        """Rows in the annotation file, good and bad."""
        return len(self.records) + len(self.bad)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root}, {len(self)} records, {len(self.bad)} bad rows)"


class VideoCaptionFolder(_RowSource):
    """A folder of videos (mp4, webm, mov, ...) or frame folders with `captions.csv` / `captions.jsonl` holding
    `video,caption` and optionally `mask` (a folder of per-frame PNGs or a mask video), `frames` (valid frame
    indices) and `fps`. Paths are relative to the folder."""

    media_column = "video"
    media_suffixes = VIDEO_SUFFIXES


class ImageCaptionFolder(_RowSource):
    """A folder of images with `captions.csv` / `captions.jsonl` holding `image,caption` (optionally `mask`).
    Each image is a one-frame video record."""

    media_column = "image"
    media_suffixes = IMAGE_SUFFIXES


class SyntheticSource:
    """`num` clips of the synthetic dataset, generated when asked for (deterministic from the config's seed)."""

    def __init__(self, config: SyntheticConfig | None = None, num: int = 72):
        self.config, self.num = config or SyntheticConfig(), num
        self.bad: list[tuple[str, str]] = []

    @property
    def total(self) -> int:
        return self.num

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num:
            raise IndexError(index)
        clip = make_clip(index, self.config)
        return {"key": f"synthetic/{self.config.seed}/{index:05d}", "video": clip.frames, "caption": clip.caption,
                "mask": clip.masks.astype(np.uint8) * 255, "frames": None, "fps": None}

    def __repr__(self) -> str:
        return f"SyntheticSource({self.config}, num={self.num})"
