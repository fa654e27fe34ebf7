"""`magdiff-jax data inspect DIR`: what a dataset folder holds (counts, shapes, frame rates, captions, bad rows)
and a contact sheet of sample clips with their captions.

DIR may be a video-caption folder (captions.csv / .jsonl with a `video` column), an image-caption folder
(an `image` column), a dataset written by `magdiff-jax data build` (TFDS, array_record) or by
`magdiff-jax data encode` (latents: statistics only, there are no pixels to show).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from magdiff_jax.data.bad_input import BadInput
from magdiff_jax.data.sources import ANNOTATION_NAMES, ImageCaptionFolder, VideoCaptionFolder, read_rows
from magdiff_jax.data.transforms import confined
from magdiff_jax.data.video_io import VideoError, probe, read_frames
from magdiff_jax.utils.files import user_path


def open_dataset(path: str | os.PathLike):
    """The source for a dataset folder of any kind this package writes or reads (module docstring)."""
    root = user_path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    if (root / "encoded.json").is_file():
        from magdiff_jax.data.encoded import EncodedSource

        return EncodedSource(root)
    for name in ANNOTATION_NAMES:
        if (root / name).is_file():
            rows = [fields for _, fields, err in read_rows(root / name)[:20] if err is None]
            if rows and "image" in rows[0] and "video" not in rows[0]:
                return ImageCaptionFolder(root)
            return VideoCaptionFolder(root)
    if any(root.rglob("dataset_info.json")):
        from magdiff_jax.data.builders import TfdsSource

        return TfdsSource(root)
    raise FileNotFoundError(
        f"{root}: not a dataset folder (no {' or '.join(ANNOTATION_NAMES)}, no encoded.json, no TFDS "
        f"dataset_info.json)"
    )


def inspect_dataset(path: str | os.PathLike, out: str | os.PathLike | None = None, num: int = 8,
                    seed: int = 0) -> dict:
    """Statistics of `num` randomly chosen records (and counts of all), plus a contact sheet PNG at `out`
    (default DIR/contact_sheet.png) for datasets with pixels. Returns the summary dict (also printable)."""
    from magdiff_jax.utils.images import contact_sheet, save_png

    source = open_dataset(path)
    summary = {"dataset": str(path), "kind": type(source).__name__, "records": len(source),
               "bad_rows": len(getattr(source, "bad", [])),
               "first_bad_rows": [f"{k}: {r}" for k, r in list(getattr(source, "bad", []))[:5]]}
    if len(source) == 0:
        return summary
    picks = np.random.default_rng(seed).choice(len(source), size=min(num, len(source)), replace=False)
    if hasattr(source, "metadata"):  # pre-encoded latents
        summary["metadata"] = {k: v for k, v in source.metadata.items() if not isinstance(v, (list, dict))}
        ex = source[int(picks[0])]
        summary["shapes"] = {k: list(np.shape(v)) for k, v in ex.items() if isinstance(v, np.ndarray)}
        return summary
    frames, sizes, fps, words, masks, problems = [], collections.Counter(), [], [], 0, []
    videos, captions = [], []
    for i in picks:
        rec = source[int(i)]
        caption = rec["caption"] if isinstance(rec["caption"], str) else rec["caption"][0]
        words.append(len(caption.split()))
        masks += rec.get("mask") is not None
        try:
            video = confined(rec)["video"]  # nothing read outside a folder dataset
            info = probe(video)
            idx = np.linspace(0, info.num_frames - 1, min(8, info.num_frames)).round().astype(int)
            videos.append(read_frames(video, idx))
            captions.append(caption)
        except (VideoError, BadInput) as e:
            problems.append(f"{rec['key']}: {e}")
            continue
        frames.append(info.num_frames)
        sizes[f"{info.height}x{info.width}"] += 1
        if rec.get("fps") or info.fps:
            fps.append(float(rec.get("fps") or info.fps))
    summary.update(
        sampled=len(picks),
        frames={"min": min(frames), "median": float(np.median(frames)), "max": max(frames)} if frames else None,
        sizes=dict(sizes.most_common(5)),
        fps=sorted(set(round(f, 2) for f in fps)),
        caption_words={"mean": float(np.mean(words)), "max": int(max(words))},
        with_masks=int(masks),
        undecodable=problems,
    )
    if videos:
        sheet = user_path(out) if out is not None else user_path(path) / "contact_sheet.png"
        summary["contact_sheet"] = str(save_png(sheet, contact_sheet(videos, captions)))
    return summary


def format_summary(summary: dict) -> str:
    return json.dumps(summary, indent=1, default=str)
