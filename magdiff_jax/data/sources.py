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
import dataclasses
import io
import json
import os
import posixpath
import re
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from magdiff_jax.data.synthetic import SyntheticConfig, make_clip
from magdiff_jax.data.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, resolved
from magdiff_jax.utils.files import as_path, atomic_path, is_remote

KNOWN_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES

ANNOTATION_NAMES = ("captions.csv", "captions.jsonl")


def find_annotations(root: str | os.PathLike, names=ANNOTATION_NAMES):
    """The annotation file of a folder dataset (local or a cloud URI, as an epath path)."""
    root = as_path(root)
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
        return as_path(path).read_bytes().decode("utf-8-sig")
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
    path = as_path(path)
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


class PackedStrings:
    """Many strings held as one UTF-8 buffer and an offset array (two objects, not one per string)."""

    def __init__(self, items: Iterable[str]):
        encoded = [s.encode("utf-8", "surrogatepass") for s in items]
        self.offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = b"".join(encoded)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.data[self.offsets[index]:self.offsets[index + 1]].decode("utf-8", "surrogatepass")


SIZE_INDEX = "sizes.csv"  # media,num_frames,height,width of a folder dataset (`magdiff-jax data index`)
SIZE_COLUMNS = ("num_frames", "height", "width")


@dataclasses.dataclass
class RowIndex:
    """The parsed annotations of a folder source: good rows packed as JSON `[media, caption, mask, frames, fps]`,
    the stored sizes (num_frames, height, width; -1 unknown) from annotation columns, and the bad rows."""

    rows: PackedStrings
    sizes: np.ndarray  # (len(rows), 3) int32
    valid: np.ndarray  # (len(rows),) int32: length of the row's `frames` list, -1 where it has none
    bad: list[tuple[str, str]]


class _RowSource:
    """Shared parsing of folder annotations into records; subclasses say which column holds the media.

    Nothing but the annotation file is read when the source is made: each row is checked as text (the media
    named, its kind by suffix, no absolute path or `..` leading out, caption, frame list, fps), and whether its
    files exist and stay inside the folder once symlinks are resolved is checked when the record is loaded
    (`transforms.confined`: a missing file is then a bad input, reported by the pipeline). The rows are held
    packed (`RowIndex`), not as a dict each. A pickled source (Grain sends it to every worker process) carries only
    its paths and counts (under 1 kB): on first access in the new process it loads the index from this host's
    cache (written when the source is pickled: `$MAGDIFF_DATA_CACHE`, default `<tmp>/magdiff_data_cache`, a file
    named by a digest of its content), or parses the annotation file again where that cache is not there.

    `root` may be a cloud-storage URI (gs://...): the annotations, and later each file, are read through epath.
    """

    media_column = "video"
    media_suffixes: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike, annotations: str | os.PathLike | None = None):
        self.root = as_path(root)
        self.annotations = as_path(annotations) if annotations is not None else find_annotations(self.root)
        self._lock = threading.Lock()
        self._index: RowIndex | None = None
        self._cache: str | None = None  # this host's copy of the parsed index, for unpickled copies
        index = self.index
        self._len, self._num_bad = len(index.rows), len(index.bad)

    @property
    def index(self) -> RowIndex:
        """The parsed annotations (parsed on first use in each process)."""
        if self._index is None:
            with self._lock:
                if self._index is None:
                    self._index = _load_index(self._cache) if self._cache else None
                    if self._index is None:
                        self._index = self._parse()
        return self._index

    def _parse(self) -> RowIndex:
        rows, sizes, valid, bad = [], [], [], []
        for label, fields, error in read_rows(self.annotations):
            if error is None:
                try:
                    row = self._row(fields)
                    rows.append(json.dumps(row, ensure_ascii=False))
                    sizes.append(_stored_size(fields))
                    valid.append(-1 if row[3] is None else len(row[3]))
                    continue
                except (ValueError, TypeError) as e:
                    error = str(e)
                media = fields.get(self.media_column)
                label = f"{label} ({media})" if media else label
            bad.append((label, error))
        return RowIndex(PackedStrings(rows), np.asarray(sizes, np.int32).reshape(-1, 3), np.asarray(valid, np.int32),
                        bad)

    @property
    def bad(self) -> list[tuple[str, str]]:
        """Rows rejected as text, as (row label, reason)."""
        return self.index.bad

    @property
    def records(self) -> list[dict]:
        """Every record (built on the fly: for small folders and tools, not for the pipeline)."""
        return [self[i] for i in range(len(self))]

    def _check(self, value: str, what: str) -> str:
        """A path of the annotations, checked as text: relative, and not leading out of the folder through `..`."""
        if Path(value).is_absolute() or is_remote(value):
            raise ValueError(f"{what} {value}: path leaves the dataset folder (absolute paths are not allowed)")
        norm = posixpath.normpath(value)
        if norm == ".." or norm.startswith("../"):
            raise ValueError(f"{what} {value}: path leaves the dataset folder (it leads to "
                             f"{resolved(self.root / value)})")
        return value

    def _row(self, fields: dict) -> list:
        media = fields.get(self.media_column)
        if media is None or not str(media).strip():
            raise ValueError(f"no '{self.media_column}' value")
        media = self._check(str(media), self.media_column)
        suffix = Path(media).suffix.lower()
        if suffix in KNOWN_SUFFIXES and suffix not in self.media_suffixes:
            raise ValueError(f"{media}: not a {'/'.join(s[1:] for s in self.media_suffixes)} file")
        caption = _caption(fields.get("caption"))
        if caption is None:
            raise ValueError("no caption")
        mask = fields.get("mask")
        mask = self._check(str(mask), "mask") if mask not in (None, "") else None
        try:
            frames = parse_frames(fields.get("frames"))
            fps = float(fields["fps"]) if fields.get("fps") not in (None, "") else None
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(str(e)) from e
        return [media, caption, mask, frames, fps]

    def _record(self, row: list) -> dict:
        media, caption, mask, frames, fps = row
        path = str(self.root / media)
        # an image is a one-frame list; any other image-column path is a frame folder (checked when loaded)
        single_image = self.media_column != "video" and Path(media).suffix.lower() in self.media_suffixes
        return {"key": media, "video": [path] if single_image else path, "caption": caption,
                "mask": str(self.root / mask) if mask is not None else None, "frames": frames, "fps": fps,
                "root": str(self.root)}

    def sizes(self, indices=None) -> np.ndarray | None:
        """(len(indices), 3) int32 (usable frames, height, width) of records `indices` (all when None), -1 where
        unknown, from the annotations' `num_frames,height,width` columns or the folder's size index
        (`SIZE_INDEX`, written once by `magdiff-jax data index`; never probed here). "Usable frames" is the
        length of a record's `frames` list where it has one."""
        index = self.index
        indices = np.arange(len(self)) if indices is None else np.asarray(list(indices), np.int64)
        out = index.sizes[indices].copy()
        unknown = np.flatnonzero(out[:, 0] < 0)
        if len(unknown) and (table := self._size_table()):
            for j in unknown:
                media = json.loads(index.rows[int(indices[j])])[0]
                if media in table:
                    out[j] = table[media]
        valid = index.valid[indices]
        listed = (valid >= 0) & (out[:, 0] >= 0)
        out[listed, 0] = valid[listed]
        return out

    def _size_table(self) -> dict[str, tuple[int, int, int]]:
        return read_size_index(self.root)

    @property
    def total(self) -> int:
        """Rows in the annotation file, good and bad."""
        return self._len + self._num_bad

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"record {index} of {self._len}")
        return self._record(json.loads(self.index.rows[index]))

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._index is not None and self._cache is None:
            state["_cache"] = self._cache = _save_index(self._index)
        state["_index"], state["_lock"] = None, None
        state["root"], state["annotations"] = os.fspath(self.root), os.fspath(self.annotations)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.root, self.annotations = as_path(self.root), as_path(self.annotations)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root}, {self._len} records, {self._num_bad} bad rows)"


def _index_cache_dir() -> Path:
    import tempfile

    return Path(os.environ.get("MAGDIFF_DATA_CACHE") or Path(tempfile.gettempdir()) / "magdiff_data_cache")


def _save_index(index: RowIndex) -> str | None:
    """Write a parsed index to this host's cache (named by a digest of its content) for the processes a pickled
    source goes to (Grain workers, on this host): they map it rather than parse the annotations again. None when
    it cannot be written (they parse then)."""
    import hashlib

    bad = PackedStrings(json.dumps(b) for b in index.bad)
    digest = hashlib.sha1(index.rows.data)
    for a in (index.rows.offsets, index.sizes, index.valid, bad.offsets):
        digest.update(a.tobytes())
    digest.update(bad.data)
    path = _index_cache_dir() / f"rows-{digest.hexdigest()}.npz"
    if path.is_file():
        return str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.savez(tmp, data=np.frombuffer(index.rows.data, np.uint8), offsets=index.rows.offsets,
                     sizes=index.sizes, valid=index.valid, bad_data=np.frombuffer(bad.data, np.uint8),
                     bad_offsets=bad.offsets)
    except OSError:
        return None
    return str(path)


def _load_index(path: str) -> RowIndex | None:
    try:
        with np.load(path) as z:
            rows, bad = PackedStrings(()), PackedStrings(())
            rows.data, rows.offsets = z["data"].tobytes(), z["offsets"]
            bad.data, bad.offsets = z["bad_data"].tobytes(), z["bad_offsets"]
            return RowIndex(rows, z["sizes"], z["valid"], [tuple(json.loads(bad[i])) for i in range(len(bad))])
    except (OSError, ValueError, KeyError):
        return None


def _stored_size(fields: dict) -> tuple[int, int, int]:
    """(num_frames, height, width) from annotation columns of those names, (-1, -1, -1) when absent."""
    try:
        n, h, w = (int(str(fields[k]).strip()) for k in SIZE_COLUMNS)
    except (KeyError, ValueError, TypeError):
        return (-1, -1, -1)
    return (n, h, w) if min(n, h, w) > 0 else (-1, -1, -1)


def read_size_index(root: str | os.PathLike) -> dict[str, tuple[int, int, int]]:
    """The size index of a folder dataset ({media: (num_frames, height, width)}; empty when it has none)."""
    path = as_path(root) / SIZE_INDEX
    if not path.exists():
        return {}
    table = {}
    for _, fields, error in read_rows(path):
        if error is None and fields.get("media"):
            size = _stored_size(fields)
            if size[0] > 0:
                table[fields["media"]] = size
    return table


def write_size_index(root: str | os.PathLike, workers: int = 8) -> tuple[Path, int, list[tuple[str, str]]]:
    """Probe every file a folder dataset's annotations name (video header, or first frame image) once and write
    `<root>/sizes.csv` (media,num_frames,height,width), which every host then reads instead of probing (bucketing).
    Returns (its path, rows written, [(media, reason)] that could not be probed)."""
    from concurrent.futures import ThreadPoolExecutor

    from magdiff_jax.data.transforms import confined
    from magdiff_jax.data.video_io import VideoError, probe

    root = as_path(root)
    kind = ImageCaptionFolder if _has_column(find_annotations(root), "image") else VideoCaptionFolder
    source = kind(root)
    media = sorted({json.loads(source.index.rows[i])[0] for i in range(len(source))})

    def one(m):
        try:
            record = source._record([m, "", None, None, None])
            info = probe(confined(record)["video"])
            return m, (info.num_frames, info.height, info.width), None
        except (VideoError, ValueError, OSError) as e:
            return m, None, str(e)

    lines, failed = ["media,num_frames,height,width"], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for m, size, error in pool.map(one, media):
            if size is None:
                failed.append((m, error))
            else:
                buf = io.StringIO()
                csv.writer(buf, lineterminator="").writerow([m, *size])
                lines.append(buf.getvalue())
    path = root / SIZE_INDEX
    write_text_whole(path, "\n".join(lines) + "\n")
    return path, len(lines) - 1, failed


def _has_column(annotations, name: str) -> bool:
    for _, fields, error in read_rows(annotations):
        if error is None:
            return name in fields and "video" not in fields
    return False


def copy_to(local: str | os.PathLike, dst) -> None:
    """Copy a local file to `dst` (local or a cloud URI), streamed (shards can be large)."""
    import shutil

    with open(local, "rb") as src, as_path(dst).open("wb") as out:
        shutil.copyfileobj(src, out, 16 << 20)


def write_text_whole(path, text: str) -> None:
    """Write a text file whole: locally through a temporary file and a rename; in cloud storage as one object
    (an object upload is all or nothing)."""
    if is_remote(path):
        as_path(path).write_text(text)
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


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
