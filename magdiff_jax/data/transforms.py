"""Per-example loading: frame sampling, decode-time resizing, cropping, the MagDiff subject, captions, and the
frame-interpolation and super-resolution pairs. Pure functions of (record, spec, rng), so an example depends only
on the seed and its index, never on the worker that loads it.

Images leave the loader as uint8 (cheap to move between worker processes) unless `spec.normalize`;
`normalize_example` scales them (videos to [-1, 1], CLIP inputs to CLIP's mean/std) with array methods only, so the
same function runs in a worker on numpy or on device on a jax batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading

import numpy as np

from magdiff_jax.data.bad_input import BadInput
from magdiff_jax.data.video_io import VideoError, confine, probe, read_frames
from magdiff_jax.utils.images import CLIP_MEAN, CLIP_STD

TASKS = ("video", "interp", "vsr")
SUBJECT_MODES = ("none", "first", "all")  # index = the `subject_mode` value in an example
# example keys holding images in [0, 255] -> [-1, 1] (plus every `subject_<size>`); `subject_clip` -> CLIP's
VIDEO_KEYS = ("video", "frame0", "frame1", "targets", "low_res", "image_video")  # image_video: joint training


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """What one example looks like (built from the data config by `pipeline.loader_spec`)."""

    task: str = "video"  # video (also images: one frame) | interp | vsr
    num_frames: int = 16
    stride: int = 1  # between sampled frames (in valid-frame positions)
    fps: float = 0.0  # > 0: stride from the source fps instead (round(src_fps / fps), at least 1)
    height: int = 256
    width: int = 256
    crop: str = "random"  # random | center (evaluation always crops at the centre)
    train: bool = True  # random start, crop, caption and subject choices; evaluation is fixed
    caption_dropout: float = 0.0
    masks: bool = False  # also output the per-frame subject masks (F, H, W)
    subject: bool = False  # MagDiff subject: entity pyramid + CLIP image inputs
    subject_sizes: tuple[int, ...] = (384, 320, 256)
    clip_size: int = 224
    clip_load_size: int = 448  # the CLIP branch's subject: resized and centre-cropped here, then bicubic to clip_size
    sda_probs: tuple[float, float, float] = (0.0, 0.8, 0.2)  # none, first, all (training)
    sda_eval_mode: str = "first"
    interp_window: int = 7  # septuplets (3: triplets)
    interp_targets: tuple[int, ...] = ()  # window positions to predict (empty: every inner frame)
    vsr_scale: int = 4
    normalize: bool = True
    tokenizer: str = ""  # CLIP tokenizer folder: adds `tokens` (max_length,) int32
    max_length: int = 77

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"data task must be one of {TASKS}, got {self.task!r}")
        if self.crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {self.crop!r}")
        if self.sda_eval_mode not in SUBJECT_MODES:
            raise ValueError(f"sda_eval_mode must be one of {SUBJECT_MODES}, got {self.sda_eval_mode!r}")
        p = np.asarray(self.sda_probs, float)
        if p.shape != (3,) or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
            raise ValueError(f"sda_probs (none, first, all) must be 3 non-negative numbers summing to 1, got "
                             f"{self.sda_probs}")
        if self.clip_load_size < self.clip_size:
            raise ValueError(f"clip_load_size={self.clip_load_size} must be at least clip_size={self.clip_size} (the "
                             "CLIP branch's subject is loaded at clip_load_size and resized down to clip_size)")
        if self.task == "vsr" and (self.height % self.vsr_scale or self.width % self.vsr_scale):
            raise ValueError(f"vsr: {self.height}x{self.width} does not divide by the scale {self.vsr_scale}")
        if self.task == "interp" and self.interp_window < 3:
            raise ValueError(f"interp_window must be at least 3, got {self.interp_window}")

    @property
    def window(self) -> int:
        return self.interp_window if self.task == "interp" else self.num_frames


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def sample_indices(valid, n: int, stride: int, rng: np.random.Generator | None) -> list[int]:
    """n frame indices `stride` apart (in positions of `valid`), from a random start (rng) or the first."""
    span = (n - 1) * stride + 1
    if len(valid) < span:
        raise ValueError(f"{len(valid)} usable frames, {n} frames at stride {stride} need {span}")
    start = int(rng.integers(0, len(valid) - span + 1)) if rng is not None else 0
    return [int(valid[start + k * stride]) for k in range(n)]


def scaled_size(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """The size that covers (out_h, out_w) with the aspect ratio kept (the shorter side fits exactly)."""
    scale = max(out_h / h, out_w / w)
    return max(out_h, round(h * scale)), max(out_w, round(w * scale))


def crop_offset(size: tuple[int, int], out: tuple[int, int], rng: np.random.Generator | None) -> tuple[int, int]:
    dy, dx = size[0] - out[0], size[1] - out[1]
    if rng is None:
        return dy // 2, dx // 2
    return int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1))


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> (N, size[0], size[1][, C]) (box filter when shrinking, bicubic when growing)."""
    from PIL import Image

    if images.shape[1:3] == tuple(size):
        return images
    shrink = size[0] * size[1] < images.shape[1] * images.shape[2]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(im).resize((size[1], size[0]), method)) for im in images])


def resize_region(images: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """The region `box` = (y0, x0, y1, x1) (pixel coordinates, fractional allowed) of uint8 images (N, H, W[, C]),
    resized straight from those pixels to (N, size[0], size[1][, C]): box filter when shrinking, bicubic when growing
    (`resize_images`' filters)."""
    from PIL import Image

    y0, x0, y1, x1 = (float(v) for v in box)
    if (y0, x0, y1, x1) == (0.0, 0.0, *map(float, images.shape[1:3])):
        return resize_images(images, size)
    shrink = size[0] * size[1] < (y1 - y0) * (x1 - x0)
    method = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(im).resize((size[1], size[0]), method, box=(x0, y0, x1, y1)))
                     for im in images])


def clip_preprocess(images: np.ndarray, size: int = 224, load_size: int = 448,
                    box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The CLIP branch's subject without the normalisation (PAPERS.md A.2, the paper's loader and model): the
    region `box` of the images (default: all of them) resized so its shorter side is `load_size` and centre-cropped
    to load_size x load_size, then resized to size x size bicubic with antialiasing (PIL's bicubic filter widens
    with the scale when shrinking). uint8 (N, H, W, 3) -> (N, size, size, 3)."""
    y0, x0, y1, x1 = box if box is not None else (0, 0, *images.shape[1:3])
    sh, sw = scaled_size(round(y1 - y0), round(x1 - x0), load_size, load_size)
    fy, fx = (y1 - y0) / sh, (x1 - x0) / sw  # source pixels per loaded pixel
    y, x = crop_offset((sh, sw), (load_size, load_size), None)
    crop = (y0 + y * fy, x0 + x * fx, y0 + (y + load_size) * fy, x0 + (x + load_size) * fx)
    loaded = resize_region(images, crop, (load_size, load_size))
    if load_size == size:
        return loaded
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in loaded])


def entity_images(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The MagDiff subject: each frame kept inside its mask, black elsewhere."""
    return np.where(masks[..., None], frames, 0).astype(np.uint8)


def normalize_example(example: dict) -> dict:
    """uint8 images -> float32: videos to [-1, 1], `subject_clip` to CLIP's mean/std. Works on numpy and jax
    arrays (a batch on device too); entries that are not uint8 images (already scaled) pass through."""
    out = dict(example)
    for k, v in example.items():
        if getattr(v, "dtype", None) != np.uint8:
            continue
        if k == "subject_clip":
            mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
            out[k] = (v.astype(np.float32) / 255.0 - mean) / std
        elif k in VIDEO_KEYS or (k.startswith("subject_") and k[8:].isdigit()):
            out[k] = v.astype(np.float32) / 127.5 - 1.0
    return out


_TOKENIZER_LOCK = threading.Lock()


@functools.cache
def _cached_tokenizer(folder: str, max_length: int):
    from magdiff_jax.models.tokenizer import CLIPTokenizer

    return CLIPTokenizer.from_folder(folder, max_length=max_length)


def tokenizer(folder: str, max_length: int):
    """The CLIP tokenizer of `folder`, built once per process (under a lock: Grain maps run in threads, and
    importing transformers from two threads at once fails)."""
    with _TOKENIZER_LOCK:
        return _cached_tokenizer(folder, max_length)


# ---------------------------------------------------------------------------------------------------------------
# the loader


def _pick_caption(caption, spec: LoaderSpec, rng) -> str:
    if isinstance(caption, (list, tuple, np.ndarray)):
        caption = str(caption[int(rng.integers(len(caption)))]) if spec.train else str(caption[0])
    if spec.train and spec.caption_dropout > 0 and rng.random() < spec.caption_dropout:
        return ""
    return str(caption)


def _read_masks(record: dict, info, indices, size, crop) -> np.ndarray:
    mask = record.get("mask")
    if mask is None or (isinstance(mask, (bytes, list, tuple, np.ndarray)) and len(mask) == 0):
        raise ValueError("no subject mask")
    minfo = probe(mask)
    if (minfo.height, minfo.width) != (info.height, info.width):
        raise ValueError(f"mask is {minfo.height}x{minfo.width}, video is {info.height}x{info.width}")
    masks = read_frames(mask, indices, resize=size, gray=True)
    if masks.ndim == 4:
        masks = masks[..., 0]
    (y, x), (h, w) = crop
    return masks[:, y:y + h, x:x + w] > 127


def _relative(path: str, root: str) -> str:
    """`path` as the annotations named it (relative to the dataset folder `root`), for reasons in reports."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def _check_exists(record: dict, field: str) -> None:
    """A folder record's file (or each listed file) must exist: checked when the record is loaded, not when the
    source is built (so a source over millions of rows touches no file at start)."""
    from magdiff_jax.data.video_io import fs_path

    value, root = record.get(field), str(record["root"])
    for path in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(path, (str, os.PathLike)) and not fs_path(path).exists():
            raise BadInput(str(record["key"]), f"{field} {_relative(os.fspath(path), root)} does not exist")


def confined(record: dict) -> dict:
    """A folder source's record (one with a `root`) with its video and mask checked to exist and to lie inside the
    dataset folder (symlinks resolved; in cloud storage, by the normalised path), frame folders as lists of their
    (checked) frame files; other records as they are. Raises BadInput naming the record when a file is missing or
    leaves the folder."""
    root = record.get("root")
    if not root:
        return record
    try:
        video = confine(record["video"], root)
        mask = confine(record.get("mask"), root)
    except VideoError as e:
        raise BadInput(str(record["key"]), str(e)) from e
    _check_exists(record, "video")
    _check_exists(record, "mask")
    return {**record, "video": video, "mask": mask}


def load_example(record: dict, spec: LoaderSpec, rng: np.random.Generator) -> dict:
    """One record -> one example (raises BadInput / VideoError / ValueError on unusable input)."""
    record = confined(record)
    info = probe(record["video"])
    stride = spec.stride
    src_fps = record.get("fps") or info.fps
    if spec.fps > 0 and src_fps:
        stride = max(1, round(src_fps / spec.fps))
    valid = record.get("frames")
    if valid is None:
        valid = range(info.num_frames)
    elif max(valid) >= info.num_frames:
        raise ValueError(f"valid frame {max(valid)} is past the video's {info.num_frames} frames")
    random = rng if spec.train else None
    indices = sample_indices(valid, spec.window, stride, random)
    out_hw = (spec.height, spec.width)
    size = scaled_size(info.height, info.width, *out_hw)
    y, x = crop_offset(size, out_hw, random if spec.crop == "random" else None)
    full = read_frames(record["video"], indices, resize=size)
    frames = full[:, y:y + spec.height, x:x + spec.width]
    if frames.shape[1:] != (*out_hw, 3):
        raise ValueError(f"decoded frames have shape {frames.shape[1:]}, expected {(*out_hw, 3)}")

    example = {"key": str(record["key"]), "caption": _pick_caption(record.get("caption", ""), spec, rng)}
    if spec.task == "interp":
        if spec.train and rng.random() < 0.5:  # time reversal: the same targets, seen from the other end
            frames = frames[::-1]
        targets = list(spec.interp_targets) or list(range(1, spec.window - 1))
        example.update(frame0=frames[0], frame1=frames[-1], targets=frames[targets],
                       times=np.asarray([t / (spec.window - 1) for t in targets], np.float32))
    elif spec.task == "vsr":
        low = (spec.height // spec.vsr_scale, spec.width // spec.vsr_scale)
        example.update(video=frames, low_res=resize_images(np.ascontiguousarray(frames), low))
    else:
        example["video"] = frames

    if spec.masks or spec.subject:
        masks = _read_masks(record, info, indices, size, ((y, x), out_hw))
        if spec.masks:
            example["mask"] = masks.astype(np.uint8)
        if spec.subject:
            # the region the video shows, as fractions of the frame
            region = (y / size[0], x / size[1], (y + spec.height) / size[0], (x + spec.width) / size[1])

            def detail(keep):
                return _subject_detail(record, info, [i for i, k in zip(indices, keep) if k], spec, size,
                                       full[keep], region)

            example.update(subject_inputs(frames, masks, spec, rng, detail=detail))
    if spec.tokenizer:
        example["tokens"] = tokenizer(spec.tokenizer, spec.max_length)([example["caption"]])[0]
    return normalize_example(example) if spec.normalize else example


def subject_detail_size(src_hw: tuple[int, int], size: tuple[int, int], spec: LoaderSpec) -> tuple[int, int]:
    """The resolution the subject's frames are decoded at: the source's own (`src_hw`), or smaller where the
    source has more pixels than the largest subject image needs (its pyramid sizes and the CLIP branch's
    `clip_load_size`, on the shorter side of the region the video shows; `size` is the frame size the video is
    cropped from). So the entity pyramid sees the source's detail up to what it uses, and a 4K source costs at most
    about (448 / 256)^2 times the video's pixels per subject frame."""
    need = max(*spec.subject_sizes, spec.clip_load_size) / min(spec.height, spec.width)
    h, w = round(size[0] * need), round(size[1] * need)
    return (h, w) if h * w < src_hw[0] * src_hw[1] else tuple(src_hw)


def _subject_detail(record, info, kept_indices, spec, size, frames_at_size, region):
    """The kept frames and masks at `subject_detail_size` and the video's region in their pixels: (frames (K, Hd, Wd,
    3), masks (K, Hd, Wd) bool, box (y0, x0, y1, x1))."""
    hw = subject_detail_size((info.height, info.width), size, spec)
    if tuple(hw) == tuple(size):
        frames = frames_at_size
    else:
        frames = read_frames(record["video"], kept_indices, resize=hw)
    masks = read_frames(record["mask"], kept_indices, resize=hw, gray=True)
    if masks.ndim == 4:
        masks = masks[..., 0]
    box = (region[0] * hw[0], region[1] * hw[1], region[2] * hw[0], region[3] * hw[1])
    return frames, masks > 127, box


def subject_inputs(frames: np.ndarray, masks: np.ndarray, spec: LoaderSpec, rng, *, detail=None) -> dict:
    """The MagDiff subject of a clip (PAPERS.md A.3): the entity (frame x mask on black) of the first frame
    (generation), of every frame (editing) or of none, chosen with `spec.sda_probs` in training; frames without an
    entity are black. `subject_frames` (F,) says which frames carry one.

    frames (F, H, W, 3) and masks (F, H, W) are the clip as the video shows it. `detail(keep)`, when given, returns
    the kept frames at a higher resolution (the source's, `subject_detail_size`) with their masks and the video's
    region in them, (frames (K, Hd, Wd, 3), masks (K, Hd, Wd), box (y0, x0, y1, x1)); without it the clip itself
    is the source. From the entity at that resolution:
    - `subject_<size>` (F, size, size, 3) per pyramid size: the region resized straight from the source's pixels
      (PAPERS.md A.5: the 384, 320 and 256 px inputs are each cut from the source frame, not enlarged from the
      video's crop);
    - `subject_clip` (F, clip_size, clip_size, 3): the region resized and centre-cropped at `clip_load_size`, then
      bicubic with antialias to `clip_size` (`clip_preprocess`, PAPERS.md A.2)."""
    f = frames.shape[0]
    if spec.train:
        mode = int(rng.choice(3, p=np.asarray(spec.sda_probs, float)))
    else:
        mode = SUBJECT_MODES.index(spec.sda_eval_mode)
    keep = np.zeros(f, bool)
    keep[: {0: 0, 1: 1, 2: f}[mode]] = True
    out = {"subject_mode": np.int32(mode), "subject_frames": keep}
    if keep.any() and detail is not None:
        src, src_masks, box = detail(keep)
    else:
        src, src_masks, box = frames[keep], masks[keep], (0, 0, *frames.shape[1:3])
    entity = entity_images(src, src_masks)

    def per_frame(images, size):
        full = np.zeros((f, *size, 3), np.uint8)
        if len(images):
            full[keep] = images
        return full

    for s in spec.subject_sizes:
        out[f"subject_{s}"] = per_frame(resize_region(entity, box, (s, s)) if len(entity) else entity, (s, s))
    clip = clip_preprocess(entity, spec.clip_size, spec.clip_load_size, box) if len(entity) else entity
    out["subject_clip"] = per_frame(clip, (spec.clip_size, spec.clip_size))
    return out


def safe_load(record: dict, spec: LoaderSpec, rng: np.random.Generator) -> dict:
    """`load_example`, with unusable input turned into a marker {"_bad": key, "_reason": why} for the pipeline to
    count and drop (one bad file never stops a run)."""
    try:
        return load_example(record, spec, rng)
    except BadInput as e:
        return {"_bad": e.key, "_reason": e.reason}
    except (VideoError, ValueError, OSError, KeyError, IndexError) as e:
        return {"_bad": str(record.get("key", "?")), "_reason": f"{type(e).__name__}: {e}"}
