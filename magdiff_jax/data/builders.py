"""TFDS builders (array_record, no TensorFlow) over local copies of the training and evaluation datasets, and
`TfdsSource`, a random-access source over a built dataset that returns the common record schema (`sources.py`).

Nothing is downloaded: each builder reads a `manual_dir` laid out as the official archive unpacks.

    video_caption   a video-caption folder (captions.csv / .jsonl, see `VideoCaptionFolder`)      split train
    image_caption   an image-caption folder (`ImageCaptionFolder`)                                  split train
    ucf101          UCF-101/<Class>/v_<Class>_gXX_cYY.avi + ucfTrainTestlist/ (split 1)              train, test
    msrvtt          TestVideo/*.mp4 + test_videodatainfo.json, or videos/all/*.mp4 +
                    MSRVTT_JSFUSION_test.csv                                                        test
    davis           DAVIS/JPEGImages/480p/<seq>/*.jpg + Annotations/480p + ImageSets/2017            train, validation
    vimeo90k        vimeo_septuplet/sequences/NNNNN/NNNN/im1..7.png + sep_{train,test}list.txt      train, test

Every builder writes the same features (all readable without TensorFlow):

    key           Text                       unique id: the file or folder relative to the dataset root
    video         Tensor((), object)         the original video file's bytes (any container); b"" for image frames
    video_frames  Tensor((None,), object)    encoded frame images (JPEG/PNG) when the source is a frame folder
    mask          Tensor((), object)         a mask video's bytes, or b""
    mask_frames   Tensor((None,), object)    per-frame mask PNGs (DAVIS: any object -> 255), or empty
    caption       Sequence(Text)             one caption, or several (MSR-VTT)
    frames        Tensor((None,), int32)     frame indices valid for sampling; empty = all
    fps           Scalar(float64)            the annotation's frame rate, else the container's; 0 = unknown
    label         Scalar(int64)              class index (UCF-101), -1 elsewhere
    num_frames, height, width  Scalar(int32) from the probe at build time

Bad input never stops a build by itself: each example is probed before it is written (the video's header and
frame count, its first frame, every frame image, mask count and size against the video, the valid-frame list);
a bad one is skipped, logged and listed with its reason in `<out_dir>/<name>/bad_inputs.json` (copied into the
dataset folder when the build succeeds), together with the annotation rows rejected while indexing. Once the bad
fraction passes `max_bad_fraction`, the build stops with `TooManyBadInputs`. `build` writes into a staging folder
and moves the finished dataset into place, so a failed build leaves no dataset behind and never removes a
previously complete one. Beside the dataset, `build.json` records what it was built from (builder, version, the
resolved manual_dir, the settings that change its content, its bad fraction): `build` reuses an existing dataset only
when that record matches the build asked for, and otherwise refuses (FileExistsError) unless told to overwrite.

`sizes.<split>.npy` beside the dataset holds (usable frames, height, width) int32 per example in the split's
order, so bucketing (`pipeline.assign_buckets`, through `TfdsSource.sizes`) reads no example.

The output may be in cloud storage (gs://...): the dataset is built in a local staging folder, then uploaded
(`dataset_info.json` last: a folder without it is not read as a dataset, so an interrupted upload is never taken
for a complete one). `TfdsSource` reads a dataset there directly (metadata through epath, the array_record files
through array_record's own cloud-storage reader).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils.py_utils import classproperty

from magdiff_jax.data.bad_input import DEFAULT_MAX_BAD_FRACTION, REPORT_NAME, BadInput, BadInputReport
from magdiff_jax.data.sources import (
    ImageCaptionFolder,
    VideoCaptionFolder,
    copy_to,
    find_annotations,
    read_rows,
    read_utf8,
)
from magdiff_jax.data.video_io import IMAGE_SUFFIXES, VideoError, confine, frame_files, open_image, probe, read_frames
from magdiff_jax.utils.files import as_path, is_remote

log = logging.getLogger(__name__)

VERSION = "1.0.0"

# ---------------------------------------------------------------------------------------------------------------
# Examples: what a builder lists (cheap, at index time) and how each becomes a feature dict (probed, in workers).


@dataclasses.dataclass
class Item:
    """One example to build. `video`/`mask`: a video file, a frame folder, or a list of frame image files."""

    key: str
    video: Path | list[Path]
    caption: list[str]
    mask: Path | list[Path] | None = None
    frames: list[int] | None = None
    fps: float | None = None
    label: int = -1
    binarize_mask: bool = False  # palette / id masks -> 0/255 (any object is the subject)


def _features() -> tfds.features.FeaturesDict:
    obj = np.object_
    return tfds.features.FeaturesDict({
        "key": tfds.features.Text(),
        "video": tfds.features.Tensor(shape=(), dtype=obj),
        "video_frames": tfds.features.Tensor(shape=(None,), dtype=obj),
        "mask": tfds.features.Tensor(shape=(), dtype=obj),
        "mask_frames": tfds.features.Tensor(shape=(None,), dtype=obj),
        "caption": tfds.features.Sequence(tfds.features.Text()),
        "frames": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "fps": tfds.features.Scalar(dtype=np.float64),
        "label": tfds.features.Scalar(dtype=np.int64),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "height": tfds.features.Scalar(dtype=np.int32),
        "width": tfds.features.Scalar(dtype=np.int32),
    })


def _binary_png(img) -> bytes:
    """A palette / id / colour mask -> PNG of 0 (background) and 255 (any object)."""
    from PIL import Image

    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    buf = io.BytesIO()
    Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _read_frames_list(files: list[Path], binarize: bool) -> tuple[list[bytes], int, int]:
    """Bytes of frame images (all decodable, all one size) -> (bytes, height, width)."""
    if not files:
        raise VideoError("no frame images")
    out, size = [], None
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise VideoError(f"{path}: cannot read ({e.strerror or e})") from e
        img = open_image(data, str(path))  # in full: a truncated file fails here, not in training
        if size is None:
            size = img.size
        elif img.size != size:
            raise VideoError(f"{path}: frame is {img.width}x{img.height}, the first frame is {size[0]}x{size[1]}")
        out.append(_binary_png(img) if binarize else data)
    return out, size[1], size[0]


def _count_decoded(path: Path) -> int:
    import av

    try:
        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(video=0))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot decode ({e})") from e


def _load(src: Path | list[Path], binarize: bool = False, full_decode: bool = False, root: Path | None = None):
    """A video file, frame folder or list of frames -> (file bytes, frame bytes, num_frames, h, w, fps). With
    `root`, every file must lie inside that folder once symlinks are resolved (VideoError otherwise)."""
    if root is not None:
        src = confine(src, root)
    if isinstance(src, Path) and src.is_dir():
        src = frame_files(src)
    if isinstance(src, list):
        frames, h, w = _read_frames_list(src, binarize)
        return b"", frames, len(frames), h, w, None
    if not src.is_file():
        raise VideoError(f"{src}: does not exist")
    if src.suffix.lower() in IMAGE_SUFFIXES:  # a one-image mask or video
        frames, h, w = _read_frames_list([src], binarize)
        return b"", frames, 1, h, w, None
    if binarize:
        raise VideoError(f"{src}: id masks must be image frames, not a video")
    info = probe(src)
    read_frames(src, [0])  # the header can be fine while the stream is not
    if full_decode:
        n = _count_decoded(src)
        if n != info.num_frames:
            raise VideoError(f"{src}: header says {info.num_frames} frames, {n} decode")
    try:
        data = src.read_bytes()
    except OSError as e:
        raise VideoError(f"{src}: cannot read ({e.strerror or e})") from e
    return data, [], info.num_frames, info.height, info.width, info.fps


def encode_item(item: Item, full_decode: bool = False, root: Path | None = None) -> dict:
    """Probe an item and return its feature dict; raises BadInput (naming the item) when it is unusable, a file of
    it outside the folder `root` included."""
    try:
        video, video_frames, n, h, w, fps = _load(item.video, full_decode=full_decode, root=root)
        mask, mask_frames = b"", []
        if item.mask is not None:
            mask, mask_frames, mn, mh, mw, _ = _load(item.mask, item.binarize_mask, full_decode, root)
            if (mn, mh, mw) != (n, h, w):
                raise BadInput(item.key, f"mask {_rel(item.mask)} has {mn} frames of {mw}x{mh}, the video has {n} "
                                         f"of {w}x{h}")
        if item.frames is not None:
            if not item.frames:
                raise BadInput(item.key, "empty valid-frame list")
            out = [f for f in item.frames if not 0 <= f < n]
            if out:
                raise BadInput(item.key, f"valid frame {out[0]} is out of range: the video has {n} frames")
    except (VideoError, OSError) as e:
        raise BadInput(item.key, str(e)) from e
    if not item.caption:
        raise BadInput(item.key, "no caption")
    return {
        "key": item.key,
        "video": video,
        "video_frames": video_frames,
        "mask": mask,
        "mask_frames": mask_frames,
        "caption": list(item.caption),
        "frames": np.asarray(item.frames or [], np.int32),
        "fps": float(item.fps or fps or 0.0),
        "label": int(item.label),
        "num_frames": n,
        "height": h,
        "width": w,
    }


def _rel(src) -> str:
    if isinstance(src, list):
        return f"{src[0].parent}/ ({len(src)} frames)" if src else "[]"
    return str(src)


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """map(fn, items) on a thread pool, in order, at most 2 * workers ahead of the consumer."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers)
    try:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def unique_keys(items: list[Item]) -> list[Item]:
    """Make keys unique within a list (a video listed twice keeps its key once, then `key#2`, `key#3`, ...)."""
    seen: collections.Counter = collections.Counter()
    for item in items:
        seen[item.key] += 1
        if seen[item.key] > 1:
            item.key = f"{item.key}#{seen[item.key]}"
    return items


# ---------------------------------------------------------------------------------------------------------------
# The shared builder machinery.


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders here: a manual_dir layout -> splits of `Item`s -> probed examples.

    Subclasses define `locate(manual_dir)` (the dataset root inside manual_dir; FileNotFoundError naming the path
    and the expected layout when it is not there) and `list_items(root)` -> ({split: [Item]}, [(key, reason)] rows
    rejected while indexing). Every file an example reads must lie inside the root once symlinks are resolved; an
    example with one outside is bad input ("path leaves the dataset folder"). The builders are not registered with
    TFDS by name (several names are taken by TFDS's own catalog); read a built dataset with `TfdsSource` or
    `tfds.builder_from_directory`.
    """

    VERSION = tfds.core.Version(VERSION)
    LAYOUT = ""  # the expected manual_dir layout, for MANUAL_DOWNLOAD_INSTRUCTIONS and error messages

    def __init__(self, *, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 report_path: str | os.PathLike | None = None, full_decode: bool = False,
                 num_workers: int | None = None, **kwargs):
        """`max_bad_fraction`: the build fails past this fraction of bad examples (all splits together).
        `report_path`: where bad_inputs.json goes (default `<data_dir>/<name>/bad_inputs.json`). `full_decode`:
        decode every video in full and check the frame count against the header (slow). `num_workers`: threads
        probing examples (default min(8, cpus))."""
        self.max_bad_fraction = max_bad_fraction
        self.report_path = report_path  # local or a cloud URI
        self.full_decode = full_decode
        self.num_workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        self.report: BadInputReport | None = None
        super().__init__(**kwargs)
        self._original_state.update(max_bad_fraction=max_bad_fraction, report_path=report_path,
                                    full_decode=full_decode, num_workers=num_workers)

    @classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup of a packaged module's file goes through the `importlib_resources` backport, which
        # need not be installed; the module file is all it needs (for the absent checksums file beside it).
        return epath.Path(inspect.getfile(cls))

    # -- subclass API
    @classmethod
    def locate(cls, manual_dir: Path) -> Path:
        raise NotImplementedError

    def list_items(self, root: Path) -> tuple[dict[str, list[Item]], list[tuple[str, str]]]:
        raise NotImplementedError

    # -- TFDS
    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=(self.__doc__ or "").strip(), features=_features())

    def _split_generators(self, dl_manager):
        root = self.locate(Path(os.fspath(dl_manager.manual_dir)))
        splits, index_bad = self.list_items(root)
        total = sum(len(v) for v in splits.values()) + len(index_bad)
        if not total:
            raise ValueError(f"{root}: no examples found (expected {self.LAYOUT})")
        path = self.report_path or Path(os.fspath(self.data_dir_root)) / self.name / REPORT_NAME
        self.report = BadInputReport(total, self.max_bad_fraction, path=path)
        self.report.write()
        for key, reason in index_bad:
            self.report.add(key, reason, check=False)
        self.report.check()
        return {split: self._generate_examples(items=unique_keys(items), root=root) for split, items in splits.items()}

    def _generate_examples(self, items: list[Item], root: Path):
        def encode(item):
            try:
                return item.key, encode_item(item, self.full_decode, root), None
            except BadInput as e:
                return item.key, None, e.reason

        for key, example, reason in _ordered_map(encode, items, self.num_workers):
            if example is None:
                self.report.add(key, reason)  # raises TooManyBadInputs past the threshold
                continue
            yield key, example


def _first_dir(candidates: Iterable[Path], *needed: str) -> Path | None:
    """The first candidate folder holding all of `needed` (relative paths)."""
    for c in candidates:
        if c.is_dir() and all((c / n).exists() for n in needed):
            return c
    return None


def _missing(manual_dir: Path, name: str, layout: str) -> FileNotFoundError:
    if not manual_dir.is_dir():
        return FileNotFoundError(f"{manual_dir}: manual_dir does not exist")
    return FileNotFoundError(f"{manual_dir}: not a {name} folder (expected {layout})")


def _read_lines(path: Path, bad: list[tuple[str, str]] | None = None) -> list[tuple[int, str]]:
    """Non-empty stripped lines (CRLF-safe) with their 1-based numbers. A line that is not UTF-8 goes to `bad` as
    (`<file>:<line>`, reason); without `bad` it is an error naming the file and line."""
    lines = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
        except UnicodeDecodeError as e:
            reason = f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            if bad is None:
                raise ValueError(f"{path}:{n}: {reason}") from e
            bad.append((f"{path.name}:{n}", reason))
            continue
        if line:
            lines.append((n, line))
    return lines


def _find_file(folder: Path, name: str) -> Path | None:
    """`folder/name`, or a case-insensitive match (UCF-101's lists and folders disagree on case in places)."""
    path = folder / name
    if path.exists():
        return path
    if folder.is_dir():
        lower = name.lower()
        for p in folder.iterdir():
            if p.name.lower() == lower:
                return p
    return None


# ---------------------------------------------------------------------------------------------------------------
# Folder datasets.


class _FolderBuilder(ManualBuilder, skip_registration=True):
    source_cls: type = VideoCaptionFolder

    @classmethod
    def locate(cls, manual_dir: Path) -> Path:
        find_annotations(manual_dir)  # FileNotFoundError naming the folder and the file names it looks for
        return manual_dir

    def list_items(self, root):
        source = self.source_cls(root)
        items = []
        for rec in source.records:
            video = rec["video"]
            video = [Path(p) for p in video] if isinstance(video, list) else Path(video)
            caption = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
            mask = Path(rec["mask"]) if rec["mask"] is not None else None
            items.append(Item(rec["key"], video, caption, mask, rec["frames"], rec["fps"]))
        return {"train": items}, list(source.bad)


class VideoCaption(_FolderBuilder, skip_registration=True):
    """A video-caption folder: videos (any container) or frame folders with captions.csv / captions.jsonl."""

    name = "video_caption"
    source_cls = VideoCaptionFolder
    LAYOUT = "captions.csv or captions.jsonl with video,caption[,mask][,frames][,fps] columns"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Point manual_dir at the folder holding {LAYOUT}."


class ImageCaption(_FolderBuilder, skip_registration=True):
    """An image-caption folder: images with captions.csv / captions.jsonl (each image a one-frame video)."""

    name = "image_caption"
    source_cls = ImageCaptionFolder
    LAYOUT = "captions.csv or captions.jsonl with image,caption[,mask] columns"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Point manual_dir at the folder holding {LAYOUT}."


# ---------------------------------------------------------------------------------------------------------------
# UCF-101.


def camel_to_words(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup', 'YoYo' -> 'yo yo'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return " ".join(spaced.replace("_", " ").split()).lower()


class Ucf101(ManualBuilder, skip_registration=True):
    """UCF-101 action recognition, train/test split 1; the caption is the class name in words."""

    name = "ucf101"
    LAYOUT = ("UCF-101/<Class>/v_<Class>_gXX_cYY.avi and ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt, "
              "in manual_dir or manual_dir/UCF101")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip: {LAYOUT}."
    LISTS = ("ucfTrainTestlist/classInd.txt", "ucfTrainTestlist/trainlist01.txt", "ucfTrainTestlist/testlist01.txt")

    @classmethod
    def locate(cls, manual_dir: Path) -> Path:
        root = _first_dir([manual_dir, manual_dir / "UCF101"], "UCF-101", *cls.LISTS)
        if root is None:
            raise _missing(manual_dir, cls.name, cls.LAYOUT)
        return root

    def list_items(self, root):
        lists = root / "ucfTrainTestlist"
        classes: dict[str, int] = {}  # lower-case class name -> 0-based label
        class_names: dict[int, str] = {}
        for n, line in _read_lines(lists / "classInd.txt"):
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{lists / 'classInd.txt'}:{n}: expected '<index> <ClassName>', got {line!r}")
            classes[parts[1].lower()] = int(parts[0]) - 1
            class_names[int(parts[0]) - 1] = parts[1]
        splits, bad = {}, []
        for split, list_name in (("train", "trainlist01.txt"), ("test", "testlist01.txt")):
            items = []
            for n, line in _read_lines(lists / list_name, bad):
                rel = line.split()[0].replace("\\", "/")
                key = f"UCF-101/{rel}"
                cls_dir, _, file_name = rel.rpartition("/")
                label = classes.get(cls_dir.lower())
                if label is None:
                    bad.append((key, f"{list_name}:{n}: unknown class {cls_dir!r}"))
                    continue
                folder = _find_file(root / "UCF-101", cls_dir)
                path = _find_file(folder, file_name) if folder is not None else None
                if path is None:
                    bad.append((key, f"{list_name}:{n}: {root / 'UCF-101' / rel} does not exist"))
                    continue
                items.append(Item(key, path, [camel_to_words(class_names[label])], label=label))
            splits[split] = items
        return splits, bad


# ---------------------------------------------------------------------------------------------------------------
# MSR-VTT (test).


class Msrvtt(ManualBuilder, skip_registration=True):
    """MSR-VTT test videos with all their reference captions."""

    name = "msrvtt"
    LAYOUT = ("TestVideo/videoNNNN.mp4 and test_videodatainfo.json (the official release), or videos/all/videoNNNN.mp4 "
              "and MSRVTT_JSFUSION_test.csv (optionally under msrvtt_data/), in manual_dir or manual_dir/MSRVTT")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract the MSR-VTT test videos and annotations: {LAYOUT}."
    CSV_NAME = "MSRVTT_JSFUSION_test.csv"

    @classmethod
    def _roots(cls, manual_dir: Path) -> list[Path]:
        return [manual_dir, *(manual_dir / n for n in ("MSRVTT", "msrvtt", "MSR-VTT"))]

    @classmethod
    def _layout(cls, manual_dir: Path) -> tuple[Path, Path, Path] | None:
        """(root, annotation file, video folder) of the first layout found."""
        for root in cls._roots(manual_dir):
            if (root / "test_videodatainfo.json").is_file() and (root / "TestVideo").is_dir():
                return root, root / "test_videodatainfo.json", root / "TestVideo"
        for root in cls._roots(manual_dir):
            csv_path = next((p for p in (root / cls.CSV_NAME, root / "msrvtt_data" / cls.CSV_NAME) if p.is_file()),
                            None)
            videos = next((p for p in (root / "videos" / "all", root / "TestVideo") if p.is_dir()), None)
            if csv_path is not None and videos is not None:
                return root, csv_path, videos
        return None

    @classmethod
    def locate(cls, manual_dir: Path) -> Path:
        found = cls._layout(manual_dir)
        if found is None:
            raise _missing(manual_dir, cls.name, cls.LAYOUT)
        return found[0]

    def list_items(self, root):
        _, ann, videos = self._layout(root)
        captions: dict[str, list[str]] = {}
        bad: list[tuple[str, str]] = []
        if ann.suffix == ".json":
            try:
                data = json.loads(read_utf8(ann))
                order = [v["video_id"] for v in data["videos"] if v.get("split", "test") == "test"]
                sentences = sorted(data["sentences"], key=lambda s: s.get("sen_id", 0))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{ann}: not an MSR-VTT annotation file ({e!r})") from e
            wanted = set(order)
            for s in sentences:
                if isinstance(s, dict) and s.get("video_id") in wanted and str(s.get("caption", "")).strip():
                    captions.setdefault(s["video_id"], []).append(str(s["caption"]).strip())
        else:
            order = []
            for label, row, error in read_rows(ann):
                if error is None and not {"video_id", "sentence"} <= set(row):
                    raise ValueError(f"{ann}: expected video_id and sentence columns, got {list(row)}")
                vid, sentence = (row.get("video_id"), row.get("sentence")) if error is None else (None, None)
                if error is None and (not vid or not sentence or not sentence.strip()):
                    error = "malformed row (no video_id or sentence)"
                if error is not None:
                    bad.append((label, error))
                    continue
                if vid not in captions:
                    order.append(vid)
                captions.setdefault(vid, []).append(sentence.strip())
        items = []
        for vid in dict.fromkeys(order):
            key = f"{videos.relative_to(root).as_posix()}/{vid}.mp4"
            path = _find_file(videos, f"{vid}.mp4")
            if path is None:
                bad.append((key, f"{videos / (vid + '.mp4')} does not exist"))
            elif not captions.get(vid):
                bad.append((key, "no caption"))
            else:
                items.append(Item(key, path, captions[vid]))
        return {"test": items}, bad


# ---------------------------------------------------------------------------------------------------------------
# DAVIS 2017.


class Davis(ManualBuilder, skip_registration=True):
    """DAVIS 2017 (480p): frames with binary subject masks (every annotated object); caption = sequence name."""

    name = "davis"
    RESOLUTION = "480p"
    LAYOUT = ("DAVIS/JPEGImages/480p/<seq>/*.jpg, DAVIS/Annotations/480p/<seq>/*.png and "
              "DAVIS/ImageSets/2017/{train,val}.txt, manual_dir being the folder holding DAVIS/ or DAVIS/ itself")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract DAVIS-2017-trainval-480p.zip: {LAYOUT}."
    SPLITS = (("train", "train.txt"), ("validation", "val.txt"))

    @classmethod
    def locate(cls, manual_dir: Path) -> Path:
        need = (f"JPEGImages/{cls.RESOLUTION}", f"Annotations/{cls.RESOLUTION}", "ImageSets/2017")
        root = _first_dir([manual_dir / "DAVIS", manual_dir], *need)
        if root is None:
            raise _missing(manual_dir, cls.name, cls.LAYOUT)
        return root

    def list_items(self, root):
        splits, bad = {}, []
        for split, list_name in self.SPLITS:
            list_path = root / "ImageSets" / "2017" / list_name
            if not list_path.is_file():
                raise FileNotFoundError(f"{list_path}: missing (expected {self.LAYOUT})")
            items = []
            for _, seq in _read_lines(list_path, bad):
                key = f"JPEGImages/{self.RESOLUTION}/{seq}"
                frames_dir = root / key
                masks_dir = root / "Annotations" / self.RESOLUTION / seq
                if not frames_dir.is_dir():
                    bad.append((key, f"{list_name}: {frames_dir} does not exist"))
                elif not masks_dir.is_dir():
                    bad.append((key, f"{masks_dir} does not exist"))
                else:
                    caption = " ".join(re.split(r"[-_\s]+", seq)).strip()
                    items.append(Item(key, frames_dir, [caption], mask=masks_dir, binarize_mask=True))
            splits[split] = items
        return splits, bad


# ---------------------------------------------------------------------------------------------------------------
# Vimeo-90K septuplets.


class Vimeo90k(ManualBuilder, skip_registration=True):
    """Vimeo-90K septuplets: 7-frame PNG clips, no caption."""

    name = "vimeo90k"
    LAYOUT = ("vimeo_septuplet/sequences/NNNNN/NNNN/im1..im7.png with sep_trainlist.txt and sep_testlist.txt, "
              "manual_dir being the folder holding vimeo_septuplet/ or that folder itself")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract vimeo_septuplet.zip: {LAYOUT}."
    SPLITS = (("train", "sep_trainlist.txt"), ("test", "sep_testlist.txt"))
    NUM_FRAMES = 7

    @classmethod
    def locate(cls, manual_dir: Path) -> Path:
        root = _first_dir([manual_dir / "vimeo_septuplet", manual_dir], "sequences", *(n for _, n in cls.SPLITS))
        if root is None:
            raise _missing(manual_dir, cls.name, cls.LAYOUT)
        return root

    def list_items(self, root):
        splits, bad = {}, []
        for split, list_name in self.SPLITS:
            items = []
            for n, line in _read_lines(root / list_name, bad):
                key = f"sequences/{line}"
                if not re.fullmatch(r"[\w.-]+/[\w.-]+", line):
                    bad.append((f"{list_name}:{n}", f"malformed line {line!r}"))
                    continue
                files = [root / key / f"im{i}.png" for i in range(1, self.NUM_FRAMES + 1)]
                missing = [f for f in files if not f.is_file()]
                if missing:
                    bad.append((key, f"{missing[0]} does not exist"))
                    continue
                items.append(Item(key, files, [""]))
            splits[split] = items
        return splits, bad


BUILDERS: dict[str, type[ManualBuilder]] = {
    cls.name: cls for cls in (VideoCaption, ImageCaption, Ucf101, Msrvtt, Davis, Vimeo90k)
}


# ---------------------------------------------------------------------------------------------------------------
# Building.


def _swap_in(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`, replacing an existing `dst` only once `src` is in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old."))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


BUILD_RECORD = "build.json"
_NOT_SETTINGS = ("num_workers",)  # builder arguments that do not change what is built


SIZES_NAME = "sizes.{split}.npy"


def _write_sizes(dataset: Path) -> None:
    """`sizes.<split>.npy` of a finished dataset folder: (usable frames, height, width) per example (one read pass)."""
    b = tfds.builder_from_directory(os.fspath(dataset))
    for split in b.info.splits:
        source = b.as_data_source(split=split)
        sizes = np.zeros((len(source), 3), np.int32)
        for i in range(len(source)):
            ex = source[i]
            n = len(ex["frames"]) or int(ex["num_frames"])
            sizes[i] = (n, int(ex["height"]), int(ex["width"]))
        np.save(dataset / SIZES_NAME.format(split=split), sizes)


def _upload(local: Path, remote) -> None:
    """Copy a finished dataset folder to cloud storage, replacing what is there, `dataset_info.json` last."""
    remote = as_path(remote)
    if remote.exists():
        remote.rmtree()
    remote.mkdir(parents=True, exist_ok=True)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == "dataset_info.json")
    for path in files:
        dst = remote / path.relative_to(local).as_posix()
        dst.parent.mkdir(parents=True, exist_ok=True)
        copy_to(path, dst)


def _build_record(cls: type[ManualBuilder], manual_dir: Path, builder_kwargs: dict) -> dict:
    """What a build is built from: compared with the record of an existing dataset before it is reused."""
    settings = {"full_decode": False, **{k: v for k, v in builder_kwargs.items() if k not in _NOT_SETTINGS}}
    return {"builder": cls.name, "version": str(cls.VERSION), "manual_dir": os.path.realpath(manual_dir),
            **json.loads(json.dumps(settings, default=str))}


def _check_reusable(final: Path, record: dict, max_bad_fraction: float) -> None:
    """Raise FileExistsError (one line) unless the dataset at `final` was built as `record` asks, with no more
    than `max_bad_fraction` of its inputs bad."""
    rebuild = "pass overwrite=True (magdiff-jax data build --overwrite) to rebuild it"
    try:
        old = json.loads((final / BUILD_RECORD).read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise FileExistsError(f"{final}: holds a dataset with no record of what it was built from ({BUILD_RECORD}); "
                              f"{rebuild} from {record['manual_dir']}") from None
    except (OSError, ValueError) as e:
        raise FileExistsError(f"{final}: its {BUILD_RECORD} cannot be read ({e}); {rebuild}") from e
    differs = [f"{k} {old.get(k)!r}, not {v!r}" for k, v in record.items() if old.get(k) != v]
    if differs:
        raise FileExistsError(f"{final}: holds a dataset built from other input ({'; '.join(differs)}); {rebuild}")
    bad = float(old.get("bad_fraction", 0.0))
    if bad > max_bad_fraction:
        raise FileExistsError(f"{final}: {bad:.1%} of the inputs of the existing dataset were bad, more than the "
                              f"allowed {max_bad_fraction:.1%}; {rebuild}")


def dataset_dir(out_dir: str | os.PathLike, builder: str):
    """Where `build` puts a builder's dataset: `<out_dir>/<name>/<version>` (local, or a cloud URI)."""
    cls = _builder_cls(builder)
    return as_path(out_dir) / cls.name / str(cls.VERSION)


def _builder_cls(builder: str) -> type[ManualBuilder]:
    if builder not in BUILDERS:
        raise ValueError(f"unknown builder {builder!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[builder]


def build(builder: str, manual_dir: str | os.PathLike, out_dir: str | os.PathLike,
          max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, overwrite: bool = False, **builder_kwargs) -> Path:
    """Build dataset `builder` (a `BUILDERS` name) from `manual_dir` into `<out_dir>/<name>/<version>` and return
    that folder. An existing complete dataset there is reused when its `build.json` says it was built the same way
    (same builder and version, the same manual_dir, the same settings, few enough bad inputs); otherwise the build
    stops with FileExistsError, unless `overwrite`: then it is replaced, once the new one is complete. The
    bad-input report goes to `<out_dir>/<name>/bad_inputs.json` (and into the dataset folder). Raises
    FileNotFoundError / ValueError when manual_dir lacks the expected layout, TooManyBadInputs when more than
    `max_bad_fraction` of the examples are bad."""
    cls = _builder_cls(builder)
    manual_dir = Path(manual_dir).absolute()
    remote = is_remote(out_dir)
    out_dir = as_path(out_dir) if remote else Path(out_dir).absolute()
    final = out_dir / cls.name / str(cls.VERSION)
    record = _build_record(cls, manual_dir, builder_kwargs)
    if (final / "dataset_info.json").is_file() and not overwrite:
        _check_reusable(final, record, max_bad_fraction)
        log.info("reusing the built dataset %s (built from the same input; pass overwrite=True to rebuild)", final)
        return final
    cls.locate(manual_dir)  # layout errors before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / cls.name / REPORT_NAME
    # cloud storage: built in a local staging folder, uploaded when complete
    staging = Path(tempfile.mkdtemp(prefix=f".{cls.name}.building.", **({} if remote else {"dir": out_dir})))
    try:
        b = cls(data_dir=staging, file_format="array_record", max_bad_fraction=max_bad_fraction,
                report_path=report_path, **builder_kwargs)
        b.download_and_prepare(download_dir=staging / "downloads",
                               download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
        built = staging / cls.name / str(cls.VERSION)
        (built / REPORT_NAME).write_bytes(as_path(report_path).read_bytes())
        (built / BUILD_RECORD).write_text(json.dumps({**record, "bad_fraction": b.report.fraction}, indent=1))
        _write_sizes(built)
        if remote:
            _upload(built, final)
        else:
            _swap_in(built, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = b.report
    if report is not None and report.bad:
        log.warning("%s: %d of %d inputs were bad and skipped (report: %s)", cls.name, len(report.bad),
                    report.total, report_path)
    return final


# ---------------------------------------------------------------------------------------------------------------
# Reading.

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def find_dataset_dir(path: str | os.PathLike, builder: str | None = None):
    """A built dataset folder from itself, `<data_dir>/<name>[/<version>]`, or a data_dir holding one dataset (local
    or a cloud URI; an epath path)."""
    path = as_path(path)
    if (path / "dataset_info.json").is_file():
        return path

    def latest(folder):
        versions = [p for p in folder.iterdir() if _VERSION_RE.match(p.name) and (p / "dataset_info.json").is_file()]
        return max(versions, key=lambda p: tuple(int(x) for x in p.name.split("."))) if versions else None

    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such dataset folder")
    if builder is not None:
        folder = path / _builder_cls(builder).name if builder in BUILDERS else path / builder
        found = latest(folder) if folder.is_dir() else None
        if found is None:
            raise FileNotFoundError(f"{path}: no built {builder} dataset (expected {folder}/<version>/)")
        return found
    found = latest(path)
    if found is not None:
        return found
    datasets = [d for d in (latest(p) for p in sorted(path.iterdir()) if p.is_dir()) if d is not None]
    if len(datasets) != 1:
        names = ", ".join(d.parent.name for d in datasets) or "none"
        raise FileNotFoundError(f"{path}: expected one built dataset, found {names}; pass builder=")
    return datasets[0]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_to_record(ex: dict) -> dict:
    """A decoded TFDS example -> the record schema of `sources.py` (+ `label` where the dataset has classes)."""
    video = ex["video"] if ex["video"] else [bytes(b) for b in ex["video_frames"]]
    if ex["mask"]:
        mask = ex["mask"]
    elif len(ex["mask_frames"]):
        mask = [bytes(b) for b in ex["mask_frames"]]
    else:
        mask = None
    captions = [_text(c) for c in ex["caption"]]
    frames = [int(f) for f in ex["frames"]]
    fps = float(ex["fps"])
    record = {
        "key": _text(ex["key"]),
        "video": video,
        "caption": captions[0] if len(captions) == 1 else captions,
        "mask": mask,
        "frames": frames or None,
        "fps": fps if fps > 0 else None,
    }
    if int(ex.get("label", -1)) >= 0:
        record["label"] = int(ex["label"])
    for k in ("num_frames", "height", "width"):  # probed at build time
        if k in ex:
            record[k] = int(ex[k])
    return record


class TfdsSource:
    """Random access to a dataset built by `build` (array_record), one record (`sources.py` schema) per example.

    `path`: the dataset folder (`<data_dir>/<name>/<version>`), `<data_dir>/<name>`, or a data_dir (with
    `builder` naming the dataset when it holds several). The array_record files are opened on first access, in
    each process, so the source pickles small (Grain workers). `path` may be a cloud URI (gs://...)."""

    def __init__(self, path: str | os.PathLike, builder: str | None = None, split: str = "train"):
        self.dataset_dir = find_dataset_dir(path, builder)
        self.split = split
        info = json.loads((self.dataset_dir / "dataset_info.json").read_text())
        lengths = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])}
        if split not in lengths:
            raise ValueError(f"{self.dataset_dir}: no split {split!r} (has {', '.join(lengths) or 'none'})")
        self.name = info.get("name", self.dataset_dir.parent.name)
        self._len = lengths[split]
        self.bad: list[tuple[str, str]] = []  # bad inputs were dropped at build time (see build_report)
        self._source = None
        self._sizes = None

    def sizes(self, indices=None) -> np.ndarray | None:
        """(len(indices), 3) int32 (usable frames, height, width) from the build's `sizes.<split>.npy` (None for
        a build without one: then each record says its size)."""
        path = self.dataset_dir / SIZES_NAME.format(split=self.split)
        if self._sizes is None:
            if not path.exists():
                return None
            self._sizes = np.load(io.BytesIO(path.read_bytes()))
        return self._sizes if indices is None else self._sizes[np.asarray(list(indices), np.int64)]

    @property
    def build_report(self):
        """The bad-input report of the build, if it was written with the dataset."""
        path = self.dataset_dir / REPORT_NAME
        return path if path.is_file() else None

    def _data_source(self):
        if self._source is None:
            self._source = tfds.builder_from_directory(os.fspath(self.dataset_dir)).as_data_source(split=self.split)
        return self._source

    @property
    def total(self) -> int:
        return self._len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} records")
        return example_to_record(self._data_source()[index])

    def __getitems__(self, indices) -> list[dict]:
        return [self[i] for i in indices]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"], state["_sizes"] = None, None
        state["dataset_dir"] = os.fspath(self.dataset_dir)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.dataset_dir = as_path(self.dataset_dir)

    def __repr__(self) -> str:
        return f"TfdsSource({self.dataset_dir}, split={self.split!r}, {self._len} records)"
