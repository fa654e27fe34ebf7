"""The synthetic dataset, the embedded default: coloured shapes moving over textured backgrounds.

Each clip shows one subject (a square, circle or triangle in one of six colours) moving left, right, up or down
over a low-contrast textured background, with the caption naming all three ("a red square moves left") and a
per-frame subject mask (the MagDiff subject). Everything is a pure function of (seed, index): the same arguments
always give the same clip, on any machine, so it can be generated on the fly by a data pipeline or written once
with `magdiff-jax data synth` in the video-caption folder layout:

    DIR/captions.csv              video,caption,mask  (one row per clip)
    DIR/videos/00000.mp4          H.264 clip
    DIR/masks/00000/000.png ...   one 0/255 PNG per frame
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from magdiff_jax.utils.files import atomic_dir

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 130, 30),
}
SHAPES = ("square", "circle", "triangle")
MOTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) per unit of travel


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_frames: int = 16
    size: int = 64  # height = width, even
    shape_size: float = 0.3  # subject side / diameter as a fraction of the frame
    travel: float = 0.4  # distance the subject travels over the clip, as a fraction of the frame
    seed: int = 0
    # False: the subject starts anywhere its own path fits, so a subject at the left edge always moves right. True:
    # it starts where a path in every direction fits, so its start says nothing of its motion and a model has to
    # read the caption for it (needs shape_size + 2 * travel inside the frame)
    independent_start: bool = False

    def __post_init__(self):
        if self.size % 2 or self.size < 16:
            raise ValueError(f"synthetic clips need an even size >= 16, got {self.size}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {self.num_frames}")
        paths = 2 if self.independent_start else 1  # both ways along an axis fit from the start, or one
        if self.shape_size <= 0 or self.travel < 0 or self.shape_size + paths * self.travel > 1 - 2 / self.size:
            need = "shape_size + 2 * travel" if self.independent_start else "shape_size + travel"
            raise ValueError(f"a subject of shape_size {self.shape_size} cannot travel {self.travel} of a "
                             f"{self.size}-pixel frame inside it{' in every direction' * (paths == 2)}: {need} "
                             f"must be at most {1 - 2 / self.size:.3f}")


@dataclasses.dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # (F, H, W, 3) uint8
    masks: np.ndarray  # (F, H, W) bool: the subject
    caption: str
    shape: str
    color: str
    motion: str


def attributes(index: int, seed: int = 0) -> tuple[str, str, str]:
    """(shape, colour, motion) of clip `index`: every combination appears once in each run of 72 indices."""
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(SHAPES) * len(COLORS) * len(MOTIONS))
    k = int(order[index % len(order)])
    motions = tuple(MOTIONS)
    return SHAPES[k % 3], tuple(COLORS)[(k // 3) % 6], motions[k // 18]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(90, 150, size=3)
    tex = np.zeros((size, size, 3))
    for _ in range(3):
        fy, fx = rng.uniform(1, 6, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        tex += rng.uniform(6, 14) * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)[..., None]
    tex += rng.normal(0, 4, size=(size, size, 1))
    return np.clip(base + tex, 0, 255)


def _shape_mask(shape: str, cy: float, cx: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    # triangle pointing up: inside the band below the apex, narrowing linearly towards it
    top, bottom = cy - r, cy + r
    half = (yy - top) / (2 * r) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def make_clip(index: int, config: SyntheticConfig = SyntheticConfig(), *, motion: str | None = None,
              start: tuple[float, float] | None = None) -> Clip:
    """Clip `index` of the dataset defined by `config` (deterministic). `motion` replaces the clip's own direction
    and `start` its random first position ((y, x) of the subject's centre, as fractions of the frame): for
    evaluation clips, e.g. one subject in the middle of the frame with each of the four motions."""
    shape, color, own_motion = attributes(index, config.seed)
    motion = own_motion if motion is None else motion
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {sorted(MOTIONS)}, got {motion!r}")
    rng = np.random.default_rng([config.seed, index])
    s, f = config.size, config.num_frames
    r = config.shape_size * s / 2
    travel = config.travel * s
    dy, dx = MOTIONS[motion]
    # start so that the whole path stays inside the frame
    lo, hi = r + 1, s - r - 1
    ranges = [(lo + max(0, -d) * travel, hi - max(0, d) * travel) for d in (dy, dx)]
    if start is None:
        draw = [(lo + travel, hi - travel)] * 2 if config.independent_start else ranges
        start_y, start_x = (rng.uniform(a, b) for a, b in draw)
    else:
        start_y, start_x = (v * s for v in start)
        if not all(a - 1e-6 <= v <= b + 1e-6 for v, (a, b) in zip((start_y, start_x), ranges)):
            raise ValueError(f"start {start} puts the path of a subject moving {motion} outside the frame (its "
                             f"centre may start within y {ranges[0][0] / s:.3f}..{ranges[0][1] / s:.3f}, "
                             f"x {ranges[1][0] / s:.3f}..{ranges[1][1] / s:.3f})")
    background = _texture(rng, s)
    rgb = np.asarray(COLORS[color], float) + rng.normal(0, 6, size=3)
    frames, masks = [], []
    for t in range(f):
        u = t / max(f - 1, 1)
        mask = _shape_mask(shape, start_y + dy * travel * u, start_x + dx * travel * u, r, s)
        frame = np.where(mask[..., None], rgb, background)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        masks.append(mask)
    article = "an" if color[0] in "aeiou" else "a"
    caption = f"{article} {color} {shape} moves {motion}"
    return Clip(np.stack(frames), np.stack(masks), caption, shape, color, motion)


def write_synthetic(out_dir: str | os.PathLike, num: int, config: SyntheticConfig = SyntheticConfig(),
                    fps: int = 8, overwrite: bool = False) -> Path:
    """Write `num` clips in the video-caption folder layout (module docstring). The folder is assembled under a
    temporary name and renamed into place: an interrupted run leaves no half-written dataset."""
    from magdiff_jax.data.video_io import write_video

    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass overwrite")
    with atomic_dir(out) as tmp:
        (tmp / "videos").mkdir()
        rows = []
        for i in range(num):
            clip = make_clip(i, config)
            name = f"{i:05d}"
            write_video(tmp / "videos" / f"{name}.mp4", clip.frames, fps=fps)
            (tmp / "masks" / name).mkdir(parents=True)
            for t, m in enumerate(clip.masks):
                buf = io.BytesIO()
                iio.imwrite(buf, (m * 255).astype(np.uint8), extension=".png")
                (tmp / "masks" / name / f"{t:03d}.png").write_bytes(buf.getvalue())
            rows.append({"video": f"videos/{name}.mp4", "caption": clip.caption, "mask": f"masks/{name}"})
        with open(tmp / "captions.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["video", "caption", "mask"])
            writer.writeheader()
            writer.writerows(rows)
    return out


def caption_words() -> list[str]:
    """Every word a synthetic caption can hold."""
    return sorted({"a", "an", "moves", *COLORS, *SHAPES, *MOTIONS})


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merging of one word: repeatedly join the adjacent pair of lowest merge rank."""
    while len(pieces) > 1:
        pair = min(itertools.pairwise(pieces), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def write_tokenizer(folder: str | os.PathLike) -> Path:
    """A CLIP tokenizer folder (vocab.json, merges.txt; the `tokenizer/` layout of an SD pipeline) whose BPE turns
    each synthetic caption word into one token: the embedded default's text vocabulary, no download needed.

    BPE applies merges by rank, across the whole word, so one word's merges can split another ("r i" of "right"
    inside "triangle"). Merges are therefore added as BPE itself needs them: while a word is still in pieces, the
    merge of its first two pieces is appended, last in rank. A merge of last rank only applies where no other does,
    so it never changes a word that already ends as one token."""
    from magdiff_jax.models.tokenizer import write_vocabulary

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz":
            vocab[ch + suffix] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in caption_words():
        while len(pieces := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            ranks[pieces[0], pieces[1]] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    return write_vocabulary(folder, vocab, [f"{a} {b}" for a, b in ranks], bos, eos)
