"""Evaluation suites: generate samples from stage exports on a benchmark's real data and score them under a named
protocol (`magdiff-jax eval suite`).

    rows = run_suite("ucf101", {"step_2000": "runs/magdiff/export"}, "data/UCF101", "out/ucf", num_videos=2048,
                     i3d=I3DFeatures.from_torch("i3d_pretrained_400.pt"), c3d=C3DProbabilities(*c3d_net))

A suite says which real data is read, how the prompts, subject images or source videos are drawn from it, which
pipeline generates and which scores are computed (PAPERS.md A.11; where it is silent, the default below and why):

ucf101    (MagDiff generation; FVD + IS) The test split 1 of UCF-101. Sample i is of class i mod C (the classes in
          their index order, C of them): a round robin over the classes, the k-th sample of a class taking that
          class's k-th test clip, so the generated and the real sets have the same class balance (a class whose
          clips run out drops out of the round). Prompt: `PROMPT_TEMPLATE` ("a video of {}") filled with the class
          name in words ("apply eye makeup"); the paper's prompts (PYoCo / Make-A-Video's) were not retrieved, so a
          neutral template that every class name fits is the default (`prompt_template` changes it, and the report
          records it). Subject image: the first frame of that real clip, whole (no segmentation model ships here;
          where the data gives a mask, the mask of the first frame). Real set for FVD: those same clips.
          FVD: StyleGAN-V's fvd2048_16f, IS: isv2048_ucf (the C3D's 16 frames, 10 splits), both renamed `<name>_n<N>`
          when --num-videos is not 2048 (never passed off as the standard protocol).
msrvtt    (MagDiff generation; FVD) The MSR-VTT test clips (2,990) in the annotation's order; the prompt is each
          clip's first caption (the lowest sentence id), the subject its first frame (or first mask). Real set:
          those clips. FVD as for ucf101.
davis     (MagDiff editing; text alignment + frame consistency, x100) DAVIS 2017 has no edit prompts: they come
          from `edit_prompts` ({clip key or sequence name: prompt}, which also chooses the clips, in its order).
          Each clip's first F frames (F = the model's frames) are edited with every frame's subject mask kept
          (mode "all"), from noise (strength 1: MagDiff's tuning-free setting; `strength` < 1 starts from the DDIM
          inversion of the clip). Scores with CLIP (PAPERS.md suggests ViT-L/14): mean frame-prompt cosine x100
          and mean consecutive-frame cosine x100, averaged over clips.
vimeo     (VFI; PSNR + SSIM, + LPIPS with a VGG) The Vimeo-90K septuplet test list. Each septuplet's frames
          1, 3, 5, 7 go in, the stage interpolates at factor 2 (t = 1/2), and frames 2, 4, 6 are scored against the
          truth (the septuplet's own in-betweens: the one factor at which every predicted frame has a ground
          truth; the mean over predicted frames, then over septuplets). Samples are written losslessly (.npy).

`data` is the dataset unpacked in its official layout (what `magdiff-jax data build --manual-dir` reads: the
builders of `data.builders` list its clips) or a video-caption folder (captions.csv / .jsonl, e.g. the synthetic
dataset `magdiff-jax data synth` writes): there every clip is used in order, the caption is the ucf101 "class"
(the template defaults to "{}" there: the caption is already a prompt) and the msrvtt prompt, the `mask` column the
subject; vimeo takes each clip's first 7 frames.

Generation writes each sample as soon as it is made, under OUT/samples/<label>/: `NNNNN.mp4` (vimeo: `.npy`), a
`prompts.json` ({video name: prompt}, what `magdiff-jax eval clip` reads) and a `manifest.json` (the settings, and
each sample's real clip, prompt and seed). A rerun skips the samples that exist; a manifest whose settings differ is
an error naming them (use another OUT, or remove the folder). Sample i's seed is `seed + i` and its item does not
depend on N, so raising --num-videos only adds samples. Over several devices a batch is split by the pipeline's
`BatchRunner`; over several processes every process runs every batch (the runner shards its rows over all devices
of all processes) and process p writes the samples i with i mod P = p (vimeo: process p generates them); process 0
scores and writes the report after a barrier. Videos are never all in memory: a batch at a time is generated and
written, and the scores read the folders one video at a time (`eval.runner`: the real statistics cached per
folder listing, every feature cached as extracted, so an interrupted evaluation resumes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from magdiff_jax import distributed
from magdiff_jax.eval.fvd import NotEnoughVideosError, get_protocol
from magdiff_jax.utils.files import as_path, is_remote, user_path, write_bytes_whole

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "a video of {}"  # UCF-101 class names in words -> prompts (module docstring)
MANIFEST, PROMPTS = "manifest.json", "prompts.json"
VIMEO_FRAMES, VIMEO_FACTOR = 7, 2


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """A suite: the stage task that generates (`task`), the data builder whose official layout it reads (and
    `split`), the scores it computes and the network each needs, and its protocol in words (for the report)."""

    name: str
    task: str
    builder: str
    split: str
    scores: tuple[str, ...]
    networks: tuple[tuple[str, str], ...]  # (network, the scores it gives)
    protocol: str


SUITES = {
    "ucf101": SuiteSpec("ucf101", "magdiff", "ucf101", "test", ("fvd", "is"), (("i3d", "fvd"), ("c3d", "is")),
                        "UCF-101 test split 1; a round robin over the classes (sample i: class i mod C, its k-th "
                        "test clip); prompt = template(class name in words); subject = the clip's first frame; "
                        "FVD against those clips, IS of the samples"),
    "msrvtt": SuiteSpec("msrvtt", "magdiff", "msrvtt", "test", ("fvd",), (("i3d", "fvd"),),
                        "MSR-VTT test clips in order; prompt = each clip's first caption; subject = its first "
                        "frame; FVD against those clips"),
    "davis": SuiteSpec("davis", "magdiff", "davis", "validation", ("text_alignment", "frame_consistency"),
                       (("clip", "text_alignment"),),
                       "DAVIS 2017 clips named by the edit prompts; MagDiff editing of the first F frames with "
                       "every frame's mask kept; CLIP text alignment and frame consistency (x100)"),
    "vimeo": SuiteSpec("vimeo", "vfi", "vimeo90k", "test", ("psnr", "ssim", "lpips"), (("vgg", "lpips"),),
                       "Vimeo-90K septuplet test list; frames 1, 3, 5, 7 in, factor 2; PSNR / SSIM (/ LPIPS) of "
                       "frames 2, 4, 6 against the truth"),
}


class SuiteDataError(ValueError):
    """A --data folder without what the suite needs (its layout, masks, edit prompts, enough clips)."""


@dataclasses.dataclass(frozen=True)
class SuiteItem:
    """One sample to make: the real clip it comes from (`key`, `video`, `mask`: video-likes of `data.video_io`),
    its prompt, and the class it stands for (ucf101)."""

    key: str
    video: Any
    mask: Any
    prompt: str
    label: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# real data -> items


def _records(spec: SuiteSpec, data) -> tuple[list[dict], str]:
    """The suite's real clips as {key, video, mask, captions} in the data's order, and the layout read
    ("official" or "caption_folder")."""
    from magdiff_jax.data.builders import BUILDERS
    from magdiff_jax.data.sources import ANNOTATION_NAMES, VideoCaptionFolder

    root = as_path(data)
    if not root.is_dir():
        raise SuiteDataError(f"--data {data}: no such folder")
    if any((root / name).is_file() for name in ANNOTATION_NAMES):
        source = VideoCaptionFolder(root)
        records = []
        for r in source.records:
            captions = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
            records.append({"key": r["key"], "video": r["video"], "mask": r["mask"], "captions": captions})
        if source.bad:
            warnings.warn(f"{data}: {len(source.bad)} annotation rows unusable, first {source.bad[0]}", stacklevel=3)
        return records, "caption_folder"
    cls = BUILDERS[spec.builder]
    try:
        dataset_root = cls.locate(Path(os.fspath(data)))
    except FileNotFoundError as e:
        raise SuiteDataError(f"--data {data}: neither a video-caption folder ({' or '.join(ANNOTATION_NAMES)}) nor "
                             f"the {spec.builder} layout ({e})") from None
    # `list_items` lists the clips from the annotation files alone (no decoding, no TFDS): it reads only the
    # builder's class attributes, so no builder (and no TFDS data folder) is made for it
    splits, bad = cls.list_items(cls.__new__(cls), dataset_root)
    if bad:
        warnings.warn(f"{data}: {len(bad)} clips unusable, first {bad[0]}", stacklevel=3)
    items = splits.get(spec.split, [])
    return [{"key": it.key, "video": it.video, "mask": it.mask, "captions": list(it.caption)} for it in items], \
        "official"


def _round_robin(records: list[dict]) -> list[dict]:
    """Records interleaved over their classes (first caption), classes in first-seen order: class 0's first clip,
    class 1's first, ..., class 0's second, ...; a class whose clips run out drops out of the round."""
    classes: dict[str, list[dict]] = {}
    for r in records:
        classes.setdefault(r["captions"][0], []).append(r)
    out, k = [], 0
    while len(out) < len(records):
        out += [members[k] for members in classes.values() if k < len(members)]
        k += 1
    return out


def _read_edit_prompts(edit_prompts) -> dict[str, str]:
    if isinstance(edit_prompts, Mapping):
        prompts = dict(edit_prompts)
    else:
        try:
            prompts = json.loads(user_path(edit_prompts).read_text())
        except (OSError, ValueError) as e:
            raise SuiteDataError(f"{edit_prompts}: cannot read the edit prompts ({e})") from e
    if not isinstance(prompts, dict) or not prompts or not all(isinstance(v, str) for v in prompts.values()):
        raise SuiteDataError(f"{edit_prompts}: expected a non-empty JSON object {{clip key or sequence name: edit "
                             "prompt}")
    return prompts


def suite_items(suite: str, data, *, prompt_template: str | None = None, edit_prompts=None) -> tuple[list, dict]:
    """Every item the suite can draw from `data`, in the order samples take them (module docstring), and what the
    report records of how they were drawn. A folder without what the suite needs is a `SuiteDataError` naming it."""
    spec = SUITES[suite]
    records, layout = _records(spec, data)
    if not records:
        raise SuiteDataError(f"--data {data}: no {spec.split} clips for suite {suite}")
    info: dict[str, Any] = {"layout": layout, "available": len(records)}
    if suite == "ucf101":
        template = prompt_template or (PROMPT_TEMPLATE if layout == "official" else "{}")
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no {{}} for the class name")
        ordered = _round_robin(records)
        items = [SuiteItem(r["key"], r["video"], r["mask"], template.format(r["captions"][0]), r["captions"][0])
                 for r in ordered]
        info.update(prompt_template=template, classes=len({r["captions"][0] for r in records}))
    elif suite == "msrvtt":
        items = [SuiteItem(r["key"], r["video"], r["mask"], r["captions"][0]) for r in records]
        info.update(prompt="the first caption of each clip")
    elif suite == "davis":
        if edit_prompts is None:
            raise SuiteDataError(f"suite davis: {data} gives no edit prompts (DAVIS has none); pass a JSON file "
                                 "{clip key or sequence name: edit prompt}")
        prompts = _read_edit_prompts(edit_prompts)
        by_name = {}
        for r in records:
            by_name[r["key"]] = r
            by_name.setdefault(r["key"].rstrip("/").rsplit("/", 1)[-1], r)
        missing = [k for k in prompts if k not in by_name]
        if missing:
            raise SuiteDataError(f"{edit_prompts}: no clip {missing[:5]} in {data} (clips: "
                                 f"{[r['key'] for r in records[:5]]}...)")
        chosen = [(by_name[k], p) for k, p in prompts.items()]
        no_mask = [r["key"] for r, _ in chosen if r["mask"] is None]
        if no_mask:
            raise SuiteDataError(f"suite davis edits with the subject's masks; {data} has none for {no_mask[:5]}")
        items = [SuiteItem(r["key"], r["video"], r["mask"], p) for r, p in chosen]
        info.update(prompt="the edit prompts", edit_prompts=os.fspath(edit_prompts)
                    if not isinstance(edit_prompts, Mapping) else "given")
    else:
        items = [SuiteItem(r["key"], r["video"], None, "") for r in records]
    return items, info


# ---------------------------------------------------------------------------------------------------------------
# generation


def _name(i: int, suite: str) -> str:
    return f"{i:05d}.npy" if suite == "vimeo" else f"{i:05d}.mp4"


def _check_manifest(folder, manifest: dict) -> None:
    path = folder / MANIFEST
    if not path.exists():
        return
    old = json.loads(path.read_text())
    changed = {k: (old.get("settings", {}).get(k), v) for k, v in manifest["settings"].items()
               if old.get("settings", {}).get(k) != v}
    if changed:
        what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"{folder} holds samples made with other settings ({what}); use another --out, or remove "
                         "the folder to make them afresh")
    for old_item, item in zip(old.get("samples", []), manifest["samples"]):
        if old_item != item:
            raise ValueError(f"{folder}: sample {item['video']} was made from {old_item.get('key')!r} with "
                             f"{old_item.get('prompt')!r}, now {item['key']!r} with {item['prompt']!r} (the data "
                             "changed); use another --out, or remove the folder")


def _first_frame(item: SuiteItem):
    from magdiff_jax.data.video_io import read_frames

    frame = read_frames(item.video, indices=[0])
    mask = None if item.mask is None else read_frames(item.mask, indices=[0], resize=frame.shape[1:3], gray=True)
    return frame, mask


def _edit_source(item: SuiteItem, num_frames: int):
    from magdiff_jax.data.video_io import VideoError, read_frames

    try:
        frames = read_frames(item.video, indices=range(num_frames))
        masks = read_frames(item.mask, indices=range(num_frames), resize=frames.shape[1:3], gray=True)
    except VideoError as e:
        raise SuiteDataError(f"{item.key}: {e} (the model edits {num_frames} frames)") from e
    return frames, masks


def _septuplet(item: SuiteItem) -> np.ndarray:
    from magdiff_jax.data.video_io import VideoError, read_frames

    try:
        return read_frames(item.video, indices=range(VIMEO_FRAMES))
    except VideoError as e:
        raise SuiteDataError(f"{item.key}: {e} (suite vimeo needs {VIMEO_FRAMES} frames)") from e


def generate_samples(suite: str, pipeline, folder, items: list[SuiteItem], *, settings: dict, seed: int = 0,
                     batch_size: int = 4, num_steps: int = 50, guidance: float = 7.5, strength: float = 1.0,
                     fps: int = 8) -> dict:
    """Make the samples of `items` with `pipeline` (the export loaded: a `pipelines.magdiff.MagDiffPipeline`, or for
    vimeo a `pipelines.vfi.VFIPipeline`) into `folder` (module docstring: one file each, written as made, existing
    ones skipped, the manifest's settings checked). Returns {"generated": count made, "existing": count skipped}."""
    from magdiff_jax.data.video_io import write_video

    folder = as_path(folder)
    index, count = jax.process_index(), jax.process_count()
    manifest = {"suite": suite, "settings": settings,
                "samples": [{"video": _name(i, suite), "key": it.key, "prompt": it.prompt, "seed": seed + i,
                             **({"label": it.label} if it.label is not None else {})} for i, it in enumerate(items)]}
    if index == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _check_manifest(folder, manifest)
        write_bytes_whole(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        if suite != "vimeo":
            write_bytes_whole(folder / PROMPTS, json.dumps({_name(i, suite): it.prompt for i, it in
                                                            enumerate(items)}, indent=1).encode())
    distributed.sync("eval_suite_manifest")
    pending = [i for i in range(len(items)) if not (folder / _name(i, suite)).exists()]
    existing = len(items) - len(pending)
    if not pending:
        return {"generated": 0, "existing": existing}
    pipe = pipeline
    if suite == "vimeo":
        made = 0
        for i in pending:
            if i % count != index:
                continue
            truth = _septuplet(items[i])
            out = pipe(truth[None, ::VIMEO_FACTOR], factor=VIMEO_FACTOR)[0]
            import io

            buf = io.BytesIO()
            np.save(buf, out)
            write_bytes_whole(folder / _name(i, suite), buf.getvalue())
            made += 1
        distributed.sync("eval_suite_samples")
        return {"generated": len(pending), "existing": existing, "generated_here": made}

    if suite != "davis" and batch_size % jax.device_count() and jax.device_count() > 1:
        log.warning("batch size %d does not divide over %d devices: every process generates each batch whole",
                    batch_size, jax.device_count())
    for start in range(0, len(pending), batch_size):
        idx = pending[start:start + batch_size]
        if suite == "davis":
            examples = [pipe.example(*_edit_source(items[i], pipe.num_frames), items[i].prompt, mode="all")
                        for i in idx]
        else:
            examples = [pipe.example(*_first_frame(items[i]), items[i].prompt, mode="first") for i in idx]
        pad = batch_size - len(idx)  # one compiled batch shape for the whole run
        videos = pipe(examples + [examples[-1]] * pad, seeds=[seed + i for i in idx] + [seed + idx[-1]] * pad,
                      num_steps=num_steps, guidance=guidance, strength=strength)
        for i, video in zip(idx, videos, strict=False):
            if i % count == index:
                write_video(folder / _name(i, suite), video, fps=fps)
        log.info("eval suite: %d / %d samples of %s", min(start + batch_size, len(pending)) + existing, len(items),
                 folder)
    distributed.sync("eval_suite_samples")
    return {"generated": len(pending), "existing": existing}


def write_real_folder(folder, items: list[SuiteItem]) -> None:
    """The real clips of `items` as one folder for FVD: `NNNNN_<name>` links to the files (copies where a link
    cannot be made; a frame folder decoded to .npy), anything else in the folder removed, so its listing (and the
    cached statistics keyed on it) depends on the clips alone."""
    from magdiff_jax.data.video_io import read_frames

    folder = as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for i, it in enumerate(items):
        src = it.video
        if isinstance(src, (str, os.PathLike)) and as_path(src).is_file():
            base = as_path(src).name
            wanted[f"{i:05d}_{base}"] = as_path(src)
        else:
            wanted[f"{i:05d}_{os.path.basename(str(it.key).rstrip('/')) or 'clip'}.npy"] = it
    for p in folder.iterdir():
        if p.name not in wanted:
            p.unlink()
    for name, src in wanted.items():
        dst = folder / name
        if dst.exists():
            continue
        if isinstance(src, SuiteItem):
            import io

            buf = io.BytesIO()
            np.save(buf, read_frames(src.video))
            write_bytes_whole(dst, buf.getvalue())
        elif not is_remote(folder) and not is_remote(src):
            try:
                os.symlink(os.path.abspath(os.fspath(src)), os.fspath(dst))
            except OSError:
                write_bytes_whole(dst, src.read_bytes())
        else:
            write_bytes_whole(dst, src.read_bytes())


# ---------------------------------------------------------------------------------------------------------------
# scores


def _renamed(protocol, num_videos: int):
    if num_videos == protocol.num_videos:
        return protocol
    return dataclasses.replace(protocol, name=f"{protocol.name}_n{num_videos}", num_videos=num_videos)


def _image_scores(folder, items: list[SuiteItem], vgg=None) -> dict:
    """vimeo: PSNR, SSIM (and LPIPS) of each sample's frames 2, 4, 6 against the truth, one sample at a time."""
    from magdiff_jax.eval.image import psnr, ssim

    per: dict[str, list[float]] = {"psnr": [], "ssim": [], **({"lpips": []} if vgg is not None else {})}
    folder = as_path(folder)
    for i, item in enumerate(items):
        with (folder / _name(i, "vimeo")).open("rb") as f:
            pred = np.load(f, allow_pickle=False)
        truth = _septuplet(item)
        middle = slice(1, None, VIMEO_FACTOR)
        x = pred[middle].astype(np.float32) / 127.5 - 1.0
        y = truth[middle].astype(np.float32) / 127.5 - 1.0
        per["psnr"].append(float(np.mean(psnr(x, y))))
        per["ssim"].append(float(np.mean(ssim(x, y))))
        if vgg is not None:
            from magdiff_jax.eval.lpips import lpips_distance

            per["lpips"].append(float(np.mean(lpips_distance(*vgg, x, y))))
    row = {}
    for k, v in per.items():
        row[k], row[f"{k}_std"] = float(np.mean(v)), float(np.std(v))
    return row


# ---------------------------------------------------------------------------------------------------------------
# the suite


def _check_exports(spec: SuiteSpec, exports: Mapping[str, Any]) -> None:
    from magdiff_jax.export.stage import read_stage_info

    if not exports:
        raise ValueError("no export to evaluate")
    for label, path in exports.items():
        task = read_stage_info(path).task
        if task != spec.task:
            raise ValueError(f"{path} ({label}) holds a {task!r} stage; suite {spec.name} generates with a "
                             f"{spec.task!r} stage")


def _check_frames(pipe, label: str, need: int, what: str) -> None:
    if pipe.num_frames < need:
        raise ValueError(f"{label}: the export makes {pipe.num_frames} frames, {what} needs {need}")


def export_labels(specs) -> dict[str, str]:
    """`--export [LABEL=]DIR` values -> {label: folder}; an unlabelled export is `step_<its step>` (stage.json's, or
    a workdir's latest checkpoint), so the report plots the scores against the training step."""
    from magdiff_jax.eval.report import labelled_folders
    from magdiff_jax.export.stage import CHECKPOINTS, STAGE_FILE, checkpoint_steps

    def step_label(folder):
        path = as_path(folder)
        if (path / STAGE_FILE).exists():
            return f"step_{int(json.loads((path / STAGE_FILE).read_text())['step'])}"
        if (path / CHECKPOINTS).is_dir() and (steps := checkpoint_steps(path)):
            return f"step_{max(steps)}"
        return path.name

    return labelled_folders(specs, "--export", step_label)


def run_suite(suite: str, exports: Mapping[str, Any], data, out, *, load_pipeline, num_videos: int, i3d=None, c3d=None,
              clip=None, vgg=None, seed: int = 0, num_steps: int = 50, guidance: float = 7.5, strength: float = 1.0,
              batch_size: int = 4, fvd_protocol="fvd2048_16f", is_splits: int = 10, is_protocol=None,
              prompt_template: str | None = None, edit_prompts=None, allow_fewer: bool = False, cache=None,
              feature_batch_size: int = 8, fps: int = 8) -> dict | None:
    """Generate `num_videos` samples per export ({label: export folder}; a label ending in a number is a training
    step) under OUT/samples/<label>/, score them and write OUT/report.json, report.md (and scores.png with
    several stepped exports). Networks: `i3d` an `I3DFeatures` (FVD), `c3d` a `runner.C3DProbabilities` (IS),
    `clip` (a `CLIPEmbedder`, its tokenizer) (davis), `vgg` (LPIPS module, params) (vimeo, optional). Returns the
    report on process 0, None elsewhere. `load_pipeline(task, export)` loads an export's pipeline (the suite's
    task: "magdiff" -> `MagDiffPipeline.load`, "vfi" -> `VFIPipeline.load`; eval/ sits beside pipelines/ in the
    layering, so the caller, e.g. the CLI, passes it). `fvd_protocol` (a name or an `FVDProtocol`) and `is_protocol` (an
    `ISProtocol`, default isv2048_ucf with `is_splits`) are renamed `<name>_n<N>` unless they take N videos."""
    from magdiff_jax.eval import runner
    from magdiff_jax.eval.report import write_report

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {sorted(SUITES)}")
    spec = SUITES[suite]
    if num_videos < 1:
        raise ValueError(f"--num-videos must be positive, got {num_videos}")
    given = {"i3d": i3d, "c3d": c3d, "clip": clip, "vgg": vgg}
    if suite in ("ucf101", "msrvtt") and all(given[n] is None for n, _ in spec.networks):
        needs = " and ".join(f"{score.upper()} (--{n})" for n, score in spec.networks)
        raise ValueError(f"suite {suite} scores {needs}: give its network")
    if suite == "davis" and clip is None:
        raise ValueError("suite davis scores text alignment and frame consistency with CLIP: give --clip")
    _check_exports(spec, exports)
    items, info = suite_items(suite, data, prompt_template=prompt_template, edit_prompts=edit_prompts)
    if len(items) < num_videos:
        message = (f"--data {data}: {len(items)} {spec.split} clips usable by suite {suite}, --num-videos asks for "
                   f"{num_videos}")
        if not allow_fewer:
            raise NotEnoughVideosError(message + " (--allow-fewer to evaluate on them)")
        warnings.warn(message + "; evaluating on them", stacklevel=2)
    items = items[:num_videos]
    n = len(items)
    out = as_path(out)
    cache = cache or out / "cache"
    protocols: dict[str, Any] = {}
    if i3d is not None and "fvd" in spec.scores:
        protocols["fvd"] = _renamed(get_protocol(fvd_protocol), n)
    if c3d is not None and "is" in spec.scores:
        protocols["is"] = _renamed(is_protocol or runner.ISProtocol(num_splits=is_splits), n)

    settings = {"suite": suite, "data": os.fspath(data), "seed": seed, "prompt_template": info.get("prompt_template"),
                "edit_prompts": info.get("edit_prompts")}
    if spec.task == "magdiff":
        settings.update(num_steps=num_steps, guidance=float(guidance), strength=float(strength))
    folders, generation = {}, {}
    for label, export in exports.items():
        folder = out / "samples" / label
        folders[label] = folder
        pipe = load_pipeline(spec.task, export)
        if "fvd" in protocols:
            _check_frames(pipe, label, protocols["fvd"].span, f"FVD protocol {protocols['fvd'].name}")
        if "is" in protocols:
            _check_frames(pipe, label, protocols["is"].num_frames, f"IS protocol {protocols['is'].name}")
        step = pipe.stage.step
        export_settings = {**settings, "export": os.fspath(export), "export_step": step}
        generation[label] = {"export": os.fspath(export), "export_step": step,
                             **generate_samples(suite, pipe, folder, items, settings=export_settings, seed=seed,
                                                batch_size=batch_size, num_steps=num_steps, guidance=guidance,
                                                strength=strength, fps=fps)}
        del pipe

    if jax.process_index() != 0:
        distributed.sync("eval_suite_report")
        return None
    options = dict(cache=cache, batch_size=feature_batch_size, allow_fewer=allow_fewer)
    row_lists = []
    if "fvd" in protocols:
        real = out / "real"
        write_real_folder(real, items)
        row_lists.append(runner.evaluate_fvd(i3d, real, folders, protocols["fvd"], **options))
    if "is" in protocols:
        row_lists.append(runner.evaluate_is(c3d, folders, protocols["is"], **options))
    rows = runner.merge_rows(*row_lists) if row_lists else []
    if suite == "davis":  # each sample against its edit prompt (prompts.json), cached as scored
        embedder, tokenizer = clip
        prompts = {label: runner.read_prompts(as_path(folder) / PROMPTS) for label, folder in folders.items()}
        rows += runner.evaluate_clip(embedder, tokenizer, folders, prompts, cache=cache, max_videos=n)
    if suite == "vimeo":
        from magdiff_jax.eval.report import step_of

        for label, folder in folders.items():
            rows.append({"label": label, "step": step_of(label), "folder": os.fspath(folder), "num_videos": n,
                         **_image_scores(folder, items, vgg)})
    for row in rows:
        row["generation"] = generation[row["label"]]
    scores = [s for s in spec.scores if any(s in r for r in rows)]
    meta = {"title": f"Suite {suite}", "command": "eval suite", "suite": suite, "protocol": spec.protocol,
            "data": {"path": os.fspath(data), **info, "num_videos": n},
            "settings": {k: v for k, v in settings.items() if k not in ("suite", "data")},
            "protocols": {k: dataclasses.asdict(p) for k, p in protocols.items()},
            "not_scored": [s for s in spec.scores if s not in scores]}
    if suite == "vimeo":
        meta["protocols"]["vimeo"] = {"input_frames": [1, 3, 5, 7], "factor": VIMEO_FACTOR,
                                      "scored_frames": [2, 4, 6], "data_range": "[-1, 1] (2.0)"}
    report = write_report(out, rows, scores, meta=meta)
    distributed.sync("eval_suite_report")
    return report


__all__ = ["PROMPT_TEMPLATE", "SUITES", "SuiteDataError", "SuiteItem", "SuiteSpec", "export_labels",
           "generate_samples", "run_suite", "suite_items", "write_real_folder"]
