"""Pictures for people: contact sheets of clips with their captions, written as PNG atomically (locally or to an
object store); CLIP's pixel normalisation; bicubic upsampling of videos on device.

Used by `magdiff-jax data inspect`, the trainer's preview samples and the demo.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
from etils import epath

from magdiff_jax.utils.files import atomic_path

# the pixel normalisation of every CLIP vision tower (OpenAI's and OpenCLIP's): (x / 255 - mean) / std per channel
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def upscale_video(video, size):
    """Videos (..., H, W, C) in [-1, 1] -> (..., size[0], size[1], C), bicubic (Keys, a = -0.5, as PIL and
    torch's `bicubic`; half-pixel centres) and clipped to [-1, 1], in float32: the super-resolution stage's input
    and the baseline it is measured against."""
    import jax
    import jax.numpy as jnp

    video = jnp.asarray(video, jnp.float32)
    shape = (*video.shape[:-3], int(size[0]), int(size[1]), video.shape[-1])
    return jnp.clip(jax.image.resize(video, shape, "bicubic"), -1.0, 1.0)


def contact_sheet(videos, captions=None, cell: int = 96, max_frames: int = 8, pad: int = 4) -> np.ndarray:
    """One row per clip: up to `max_frames` evenly spaced frames, each scaled to `cell` pixels high, with the
    caption written under the row. `videos`: uint8 (T, H, W, 3) arrays (or floats in [-1, 1]). -> uint8 image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = []
    captions = list(captions) if captions is not None else [""] * len(videos)
    for video, caption in zip(videos, captions, strict=True):
        video = np.asarray(video)
        if video.dtype != np.uint8:
            video = np.clip((video.astype(np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        if video.ndim == 3:
            video = video[None]
        picks = np.unique(np.linspace(0, len(video) - 1, min(max_frames, len(video))).round().astype(int))
        width = max(1, round(video.shape[2] * cell / video.shape[1]))
        frames = [Image.fromarray(video[t]).resize((width, cell), Image.Resampling.BICUBIC) for t in picks]
        lines = textwrap.wrap(str(caption), width=max(20, (width + pad) * len(frames) // 7)) or [""]
        text_h = 12 * len(lines) + pad
        row = Image.new("RGB", ((width + pad) * len(frames) + pad, cell + text_h + pad), (255, 255, 255))
        for k, frame in enumerate(frames):
            row.paste(frame, (pad + k * (width + pad), pad))
        draw = ImageDraw.Draw(row)
        for k, line in enumerate(lines):
            draw.text((pad, cell + pad + 2 + 12 * k), line, fill=(0, 0, 0), font=font)
        rows.append(np.asarray(row))
    if not rows:
        raise ValueError("contact_sheet: no clips")
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def save_png(path: str | os.PathLike, image: np.ndarray) -> epath.Path:
    """Write a uint8 image as PNG, never half-written (`utils.files.atomic_path`); `path` local or in an object
    store."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image)).save(tmp, format="PNG")
    return epath.Path(path)
