"""`magdiff-jax demo`: MagDiff end to end on the synthetic dataset, on a CPU, in about 6 minutes (2 cores).

    magdiff-jax demo [--workdir magdiff_demo] [--config.steps=300 ...]      (--config: configs/magdiff.py:demo)

1. trains the tiny VAE (configs/vae.py:tiny; a random VAE decodes to noise) and exports it as a converted model;
2. trains configs/magdiff.py:demo (the tiny config without training previews: step 3 shows more) from it
   (init_from), with the given `--config.*` overrides;
3. generates videos from held-out subjects (clips the training never saw): each subject starts in the middle of
   the frame and is generated once per caption motion (left, right, up, down) with the same seeds, so only the
   caption says where it goes; and edits a held-out clip (every frame's subject kept, the rest regenerated);
4. writes `generated_<k>.mp4` (subject k's four motions side by side), `edited.mp4`, `contact_sheet.png` (a grid:
   a row per subject, its image then its four motions with the colour and motion detected; a row for the edit's
   source and result), `loss.png` (both stages' training losses) and `summary.json`,
   whose `colour_accuracy` is the fraction of generations whose subject region (the entity's mask on the first
   frame) is closest in mean colour to the entity's own palette colour among the six (chance: 1/6), and
   `motion_accuracy` the fraction whose subject (pixels of its colour) moves from the first to the last frame in
   the caption's direction (chance: 1/4); `colour_p_value` and `motion_p_value` are the chances of doing as well by
   luck (`above_chance`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_collections
import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, variant: str = "tiny") -> ml_collections.ConfigDict:
    """configs/<name>.py:<variant> of the source tree (the demo runs from a checkout: `pip install -e .`)."""
    import importlib.util
    import sys

    path = CONFIGS / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the demo needs the repository's configs/ (pip install -e .)")
    sys.path.insert(0, str(CONFIGS))
    spec = importlib.util.spec_from_file_location(f"magdiff_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _palette() -> tuple[list[str], np.ndarray]:
    """The synthetic colours' names and their RGB values (6, 3) float32."""
    from magdiff_jax.data.synthetic import COLORS

    return list(COLORS), np.asarray(list(COLORS.values()), np.float32)


def subject_colour_accuracy(videos: np.ndarray, masks: np.ndarray, colours: list[str]) -> tuple[float, list[str]]:
    """videos (N, F, H, W, 3) uint8, masks (N, H, W) the subject's region on the first frame, colours the entities'
    palette names -> (fraction whose region's mean colour is nearest to its own palette colour, the nearest names)."""
    names, palette = _palette()
    nearest = []
    for video, mask in zip(videos, masks, strict=True):
        mean = video[0][mask.astype(bool)].astype(np.float32).mean(axis=0)
        nearest.append(names[int(np.argmin(np.linalg.norm(palette - mean, axis=1)))])
    hits = [n == c for n, c in zip(nearest, colours, strict=True)]
    return float(np.mean(hits)), nearest


def subject_motion(video: np.ndarray, colour: str, max_distance: float = 60.0, min_pixels: int = 3,
                   min_shift: float = 1.0) -> str | None:
    """The direction the subject of `colour` moves in `video` (F, H, W, 3) uint8: its pixels are those within
    `max_distance` of the palette colour and nearer to it than to any other; the centroid's shift from the first to
    the last frame, projected on each of `MOTIONS`' directions, names the largest if it is at least `min_shift`
    pixels. None: no subject found in the first or last frame, or it hardly moves."""
    from magdiff_jax.data.synthetic import MOTIONS

    names, palette = _palette()
    centroids = []
    for frame in (video[0], video[-1]):
        dist = np.linalg.norm(frame.astype(np.float32)[..., None, :] - palette, axis=-1)  # (H, W, 6)
        own = (dist.argmin(-1) == names.index(colour)) & (dist.min(-1) <= max_distance)
        if own.sum() < min_pixels:
            return None
        centroids.append(np.argwhere(own).mean(axis=0))
    shift = centroids[1] - centroids[0]  # (dy, dx)
    scores = {m: float(np.dot(shift, d)) for m, d in MOTIONS.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] >= min_shift else None


def subject_motion_accuracy(videos, colours, motions) -> tuple[float, list[str | None]]:
    """(fraction of videos whose subject moves as its caption says, the detected directions); chance 1/4."""
    detected = [subject_motion(v, c) for v, c in zip(videos, colours, strict=True)]
    return float(np.mean([d == m for d, m in zip(detected, motions, strict=True)])), detected


def above_chance(hits: int, n: int, chance: float) -> float:
    """The one-sided binomial p-value of `hits` right out of `n` where each is right with probability `chance`:
    P(X >= hits), X ~ Binomial(n, chance). Small: the accuracy is above chance (12 generations, chance 1/4: 6 right
    gives 0.054, 7 gives 0.014, 12 gives 6e-8)."""
    from math import comb

    if not 0 <= hits <= n:
        raise ValueError(f"hits={hits} must be between 0 and n={n}")
    return float(sum(comb(n, k) * chance**k * (1 - chance) ** (n - k) for k in range(hits, n + 1)))


def loss_plot(curves: dict[str, list[tuple[int, float]]], path: Path, smooth: int = 5) -> Path:
    """The stages' training losses, one panel per stage (`utils.plots.line_plot`): the logged per-batch loss
    against the training step, faint, and its moving mean over `smooth` logged points, the legend giving its first
    and last value."""
    from magdiff_jax.utils.plots import line_plot

    return line_plot({name: {"loss": points} for name, points in curves.items()}, path, xlabel="training step",
                     ylabel="training loss (per batch)", title="training losses", smooth=smooth)


def _mark(ok: bool) -> str:
    return "\u2713" if ok else "\u2717"


def _verdict(found_colour: str, colour: str, found_motion: str | None, motion: str) -> str:
    """What was detected in a generation, marked right or wrong: 'red \u2713 \u00b7 left \u2717'."""
    return (f"{found_colour} {_mark(found_colour == colour)} \u00b7 {found_motion or 'no motion'} "
            f"{_mark(found_motion == motion)}")


def motion_grid(images, videos, colours, motions, nearest, detected, num_seeds: int, name: str):
    """`utils.images.contact_grid`'s rows for generations asked for each of the four motions (`held_out_set`'s
    order: per subject, per motion, per seed): one row per subject, its image (the subject image or the reference,
    `images[k]`) then the first seed's generation for each motion, each labelled with the colour and motion
    detected; the row label counts the subject's correct colours and motions over all its seeds.
    -> (cells, row_labels, col_labels, cell_labels)."""
    from magdiff_jax.data.synthetic import MOTIONS

    per_subject = len(MOTIONS) * num_seeds
    cells, row_labels, cell_labels = [], [], []
    for k, image in enumerate(images):
        first = k * per_subject
        gens = range(first, first + per_subject)
        shown = [first + j * num_seeds for j in range(len(MOTIONS))]
        colour_hits = sum(nearest[n] == colours[n] for n in gens)
        motion_hits = sum(detected[n] == motions[n] for n in gens)
        cells.append([image, *(videos[n] for n in shown)])
        row_labels.append(f"{name} {k}: {colours[first]}\ncolour \u2713 {colour_hits}/{per_subject}\n"
                          f"motion \u2713 {motion_hits}/{per_subject}")
        cell_labels.append([None, *(_verdict(nearest[n], colours[n], detected[n], motions[n]) for n in shown)])
    return cells, row_labels, [f"{name} image" if name == "subject" else name, *MOTIONS], cell_labels


def calibrate_scaling(vae, params, clip_config, num: int = 32):
    """The VAE module with `scaling_factor` = 1 / std of its latents over `num` synthetic clips (Stable
    Diffusion's recipe: diffusion then sees unit-variance latents, which its noise schedule assumes)."""
    import dataclasses

    import jax

    from magdiff_jax import cpu
    from magdiff_jax.data.synthetic import make_clip

    frames = np.concatenate([make_clip(i, clip_config).frames for i in range(num)])
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"), compiler_options=cpu.compiler_options())
    mean, _ = encode(params, frames / 127.5 - 1.0)
    scale = float(1.0 / np.std(np.asarray(mean)))
    logging.info("VAE latents: std %.3f -> scaling_factor %.4f", 1.0 / scale, scale)
    return vae.clone(config=dataclasses.replace(vae.config, scaling_factor=scale))


def _losses(workdir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def held_out_set(pipe, synth: ml_collections.ConfigDict, num_subjects: int, num_seeds: int,
                 first_seed: int = 0) -> dict:
    """The demo's held-out generations: subjects `synth.num + k` (indices the training never saw), each started in
    the middle of the frame, from where every direction is open, and asked for each of the four motions with the
    same seeds: only the caption differs, so a right direction comes from the text, not from where the subject
    starts. Returns lists (one entry per generation) `examples` (`pipe.example`, first-frame subject), `seeds`,
    `colours`, `motions`, `masks` (the loader's first-frame subject mask) and `captions` (one per subject x motion)."""
    from magdiff_jax.data.pipeline import synthetic_config
    from magdiff_jax.data.synthetic import MOTIONS, make_clip

    clip_cfg = synthetic_config(synth)
    out = {k: [] for k in ("examples", "seeds", "colours", "motions", "masks", "captions")}
    for k in range(num_subjects):
        for motion in MOTIONS:
            clip = make_clip(synth.num + k, clip_cfg, motion=motion, start=(0.5, 0.5))
            ex = pipe.example(clip.frames[:1], clip.masks[:1], clip.caption, mode="first")
            out["examples"] += [ex] * num_seeds
            out["seeds"] += [first_seed + k * num_seeds + s for s in range(num_seeds)]
            out["colours"] += [clip.color] * num_seeds
            out["motions"] += [motion] * num_seeds
            out["masks"] += [np.asarray(ex["mask"][0]) > 0] * num_seeds
            out["captions"].append(clip.caption)
    return out


def score_held_out(videos: np.ndarray, held: dict) -> tuple[float, list[str], float, list[str | None]]:
    """`held_out_set`'s generations `videos` (N, F, H, W, 3) uint8 -> (colour accuracy, nearest colours, motion
    accuracy, detected motions)."""
    accuracy, nearest = subject_colour_accuracy(videos, np.stack(held["masks"]), held["colours"])
    motion_accuracy, detected = subject_motion_accuracy(videos, held["colours"], held["motions"])
    return accuracy, nearest, motion_accuracy, detected


def train_tiny_vae(workdir: Path, config: ml_collections.ConfigDict, vae_steps: int | None = None) -> Path:
    """configs/vae.py:tiny on `config`'s synthetic clips and resolution, with `config.model.vae`, trained in
    WORKDIR/vae and saved (with the scaling factor that gives its latents unit variance) as WORKDIR/models/vae: the
    init_from folder of the stage trained next. Returns WORKDIR/models."""
    from magdiff_jax.data.pipeline import synthetic_config
    from magdiff_jax.export import load_stage, save_model
    from magdiff_jax.train.trainer import train

    synth = config.data.synthetic
    vae_cfg = load_config("vae")
    vae_cfg.data.synthetic = synth.copy_and_resolve_references()
    vae_cfg.data.resolution = tuple(config.data.resolution)
    vae_cfg.model.vae = config.model.vae
    vae_cfg.compiler_options = config.compiler_options  # both stages compiled alike
    if vae_steps is not None:
        vae_cfg.steps, vae_cfg.ckpt_every, vae_cfg.preview.every = vae_steps, vae_steps, vae_steps
    train(vae_cfg, workdir / "vae")
    vae = load_stage(workdir / "vae" / "export")
    models = workdir / "models"
    if not (models / "vae").exists():
        module = calibrate_scaling(vae.modules["vae"], vae.params["vae"], synthetic_config(synth))
        save_model("vae", module, vae.params["vae"], models / "vae")
    return models


def run_demo(workdir: str | Path, config: ml_collections.ConfigDict | None = None, *, vae_steps: int | None = None,
             num_subjects: int = 3, num_seeds: int = 1, num_steps: int = 25, guidance: float = 3.0) -> dict:
    """The whole demo (module docstring); returns the summary it writes. `config`: the MagDiff config
    (configs/magdiff.py:demo by default)."""
    from magdiff_jax.data.pipeline import synthetic_config
    from magdiff_jax.data.synthetic import MOTIONS, make_clip
    from magdiff_jax.data.video_io import write_video
    from magdiff_jax.pipelines.magdiff import MagDiffPipeline
    from magdiff_jax.train.trainer import train
    from magdiff_jax.utils.images import contact_grid, save_png

    workdir = Path(workdir).absolute()
    config = load_config("magdiff", "demo") if config is None else config
    synth = config.data.synthetic

    logging.info("demo [1/4]: training the tiny VAE in %s", workdir / "vae")
    models = train_tiny_vae(workdir, config, vae_steps)

    logging.info("demo [2/4]: training MagDiff (configs/magdiff.py) in %s", workdir / "magdiff")
    config = config.copy_and_resolve_references()
    config.init_from = str(models)
    train(config, workdir / "magdiff")

    logging.info("demo [3/4]: generating from %d held-out subjects x 4 motions x %d seeds, editing a held-out clip",
                 num_subjects, num_seeds)
    pipe = MagDiffPipeline.load(workdir / "magdiff" / "export")
    held = held_out_set(pipe, synth, num_subjects, num_seeds)
    examples, seeds, colours, motions = (held[k] for k in ("examples", "seeds", "colours", "motions"))
    # an edit of another held-out clip, in the same batch
    source = make_clip(synth.num + num_subjects, synthetic_config(synth))
    edit_ex = pipe.example(source.frames, source.masks, source.caption, mode="all")
    videos = pipe([*examples, edit_ex], seeds=[*seeds, len(seeds)], num_steps=num_steps, guidance=guidance)
    videos, edited = videos[:-1], videos[-1]
    accuracy, nearest, motion_accuracy, detected = score_held_out(videos, held)
    logging.info("colour accuracy %.2f (chance 1/6), motion accuracy %.2f (chance 1/4)", accuracy, motion_accuracy)
    logging.info("demo [4/4]: writing the videos, the contact sheet and the loss plot")
    per_subject = len(MOTIONS) * num_seeds
    outputs = []
    for k in range(num_subjects):  # the four motions side by side, first seed
        tiles = videos[k * per_subject:(k + 1) * per_subject:num_seeds]
        outputs.append(write_video(workdir / f"generated_{k}.mp4", np.concatenate(list(tiles), axis=2), fps=4))
    write_video(workdir / "edited.mp4", edited, fps=4)

    subject_key = f"subject_{config.data.subject.sizes[-1]}"
    cells, row_labels, col_labels, cell_labels = motion_grid(
        [np.asarray(examples[k * per_subject][subject_key][0]) for k in range(num_subjects)], videos, colours, motions,
        nearest, detected, num_seeds, "subject")
    cells.append([np.asarray(edit_ex["video"]), edited, *[None] * (len(col_labels) - 2)])
    row_labels.append("edit of a held-out clip")
    cell_labels.append([f"source: {source.caption}", "edited: the subject kept in every frame, the rest regenerated",
                        *[None] * (len(col_labels) - 2)])
    title = (f"MagDiff on held-out subjects, one generation per caption motion (first seed): colour correct "
             f"{accuracy:.0%} (chance 17%), moves as captioned {motion_accuracy:.0%} (chance 25%)")
    save_png(workdir / "contact_sheet.png", contact_grid(cells, row_labels, col_labels, title=title,
                                                         cell_labels=cell_labels))
    loss_plot({"vae": _losses(workdir / "vae"), "magdiff": _losses(workdir / "magdiff")}, workdir / "loss.png")
    n = len(colours)
    summary = {"colour_accuracy": accuracy, "chance": 1 / 6, "nearest_colours": nearest, "colours": colours,
               "colour_p_value": above_chance(round(accuracy * n), n, 1 / 6),
               "motion_accuracy": motion_accuracy, "motion_chance": 1 / 4, "detected_motions": detected,
               "motion_p_value": above_chance(round(motion_accuracy * n), n, 1 / 4), "motions": motions,
               "generated": [str(p) for p in outputs], "edited": str(workdir / "edited.mp4"),
               "contact_sheet": str(workdir / "contact_sheet.png"), "loss_plot": str(workdir / "loss.png"),
               "magdiff_final_loss": _losses(workdir / "magdiff")[-1][1]}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary



def i2v_held_out(synth: ml_collections.ConfigDict, num_subjects: int, num_seeds: int, first_seed: int = 0) -> dict:
    """The I2V stage's held-out set: subjects `synth.num + k` (never trained on), each started in the middle of the
    frame and asked for each of the four motions with the same seeds, the reference being the clip's first frame.
    Lists (one entry per generation) `references` (H, W, 3) uint8, `prompts`, `seeds`, `colours`, `motions`,
    `masks` (the reference's subject mask)."""
    from magdiff_jax.data.pipeline import synthetic_config
    from magdiff_jax.data.synthetic import MOTIONS, make_clip

    clip_cfg = synthetic_config(synth)
    out = {k: [] for k in ("references", "prompts", "seeds", "colours", "motions", "masks")}
    for k in range(num_subjects):
        for motion in MOTIONS:
            clip = make_clip(synth.num + k, clip_cfg, motion=motion, start=(0.5, 0.5))
            out["references"] += [clip.frames[0]] * num_seeds
            out["prompts"] += [clip.caption] * num_seeds
            out["seeds"] += [first_seed + k * num_seeds + s for s in range(num_seeds)]
            out["colours"] += [clip.color] * num_seeds
            out["motions"] += [motion] * num_seeds
            out["masks"] += [np.asarray(clip.masks[0]) > 0] * num_seeds
    return out


def run_i2v_demo(workdir: str | Path, config: ml_collections.ConfigDict | None = None, *, vae_steps: int | None = None,
                 num_subjects: int = 3, num_seeds: int = 1, num_steps: int = 25, guidance: float = 3.0,
                 models: str | Path | None = None) -> dict:
    """MagicVideo-V2's image-to-video stage on the synthetic dataset: the tiny VAE, then configs/i2v.py:demo from it,
    then keyframes for held-out subjects (the reference: each clip's first frame) x the four motions, scored as the
    MagDiff demo scores its generations (`colour_accuracy`: the subject region of the first keyframe nearest its
    palette colour, chance 1/6; `motion_accuracy`: the subject moves the caption's way, chance 1/4). Writes
    `keyframes_<k>.mp4` (subject k's four motions side by side), `contact_sheet.png`, `loss.png` and `summary.json`
    (with the training time) in `workdir`; returns the summary. `models`: a folder holding a trained tiny `vae` for
    these clips (another demo's WORKDIR/models) instead of training one."""
    import time

    from magdiff_jax.data.synthetic import MOTIONS
    from magdiff_jax.data.video_io import write_video
    from magdiff_jax.pipelines.i2v import I2VPipeline
    from magdiff_jax.train.trainer import train
    from magdiff_jax.utils.images import contact_grid, save_png

    workdir = Path(workdir).absolute()
    config = load_config("i2v", "demo") if config is None else config
    if models is None:
        logging.info("i2v demo [1/3]: training the tiny VAE in %s", workdir / "vae")
        models = train_tiny_vae(workdir, config, vae_steps)
    vae_losses = _losses(workdir / "vae") if (workdir / "vae" / "metrics.jsonl").exists() else []
    logging.info("i2v demo [2/3]: training the I2V stage (configs/i2v.py) in %s", workdir / "i2v")
    config = config.copy_and_resolve_references()
    config.init_from = str(models)
    t0 = time.perf_counter()
    train(config, workdir / "i2v")
    train_s = time.perf_counter() - t0

    logging.info("i2v demo [3/3]: keyframes for %d held-out subjects x 4 motions x %d seeds", num_subjects, num_seeds)
    pipe = I2VPipeline.load(workdir / "i2v" / "export")
    held = i2v_held_out(config.data.synthetic, num_subjects, num_seeds)
    t0 = time.perf_counter()
    videos = pipe(held["references"], held["prompts"], held["seeds"], num_steps=num_steps, guidance=guidance)
    sample_s = time.perf_counter() - t0
    accuracy, nearest = subject_colour_accuracy(videos, np.stack(held["masks"]), held["colours"])
    motion_accuracy, detected = subject_motion_accuracy(videos, held["colours"], held["motions"])
    logging.info("colour accuracy %.2f (chance 1/6), motion accuracy %.2f (chance 1/4)", accuracy, motion_accuracy)
    per_subject = len(MOTIONS) * num_seeds
    outputs = []
    for k in range(num_subjects):
        tiles = videos[k * per_subject:(k + 1) * per_subject:num_seeds]
        outputs.append(write_video(workdir / f"keyframes_{k}.mp4", np.concatenate(list(tiles), axis=2), fps=4))
    cells, row_labels, col_labels, cell_labels = motion_grid(
        [held["references"][k * per_subject] for k in range(num_subjects)], videos, held["colours"], held["motions"],
        nearest, detected, num_seeds, "reference")
    title = (f"I2V keyframes from held-out references, one per caption motion (first seed): colour correct "
             f"{accuracy:.0%} (chance 17%), moves as captioned {motion_accuracy:.0%} (chance 25%)")
    save_png(workdir / "contact_sheet.png", contact_grid(cells, row_labels, col_labels, title=title,
                                                         cell_labels=cell_labels))
    loss_plot({**({"vae": vae_losses} if vae_losses else {}), "i2v": _losses(workdir / "i2v")}, workdir / "loss.png")
    summary = {"colour_accuracy": accuracy, "chance": 1 / 6, "nearest_colours": nearest, "colours": held["colours"],
               "motion_accuracy": motion_accuracy, "motion_chance": 1 / 4, "detected_motions": detected,
               "motions": held["motions"], "train_seconds": train_s, "sample_seconds": sample_s,
               "steps": int(config.steps), "keyframes": [str(p) for p in outputs],
               "contact_sheet": str(workdir / "contact_sheet.png"), "loss_plot": str(workdir / "loss.png"),
               "i2v_final_loss": _losses(workdir / "i2v")[-1][1]}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def v2v_held_out(config: ml_collections.ConfigDict, num_clips: int) -> dict:
    """The V2V stage's held-out set: synthetic clips `synth.num + k` (never trained on) at the training resolution,
    `config.data.num_frames` frames `config.data.stride` apart, each with its box-downsampled low-res clip (the
    data pipeline's `vsr` task) and its first frame as the reference. Arrays `hires` (N, F, H, W, 3) and `low_res`
    (N, F, H/s, W/s, 3) uint8; lists `references`, `prompts`."""
    from magdiff_jax.data.pipeline import synthetic_config
    from magdiff_jax.data.synthetic import make_clip
    from magdiff_jax.data.transforms import resize_images

    synth, data = config.data.synthetic, config.data
    clip_cfg = synthetic_config(synth)
    scale = int(data.vsr.scale)
    idx = [k * int(data.stride) for k in range(int(data.num_frames))]
    h, w = (int(s) for s in data.resolution)
    hires, low, refs, prompts = [], [], [], []
    for k in range(num_clips):
        clip = make_clip(synth.num + k, clip_cfg)
        frames = resize_images(np.asarray(clip.frames)[idx], (h, w))
        hires.append(frames)
        low.append(resize_images(np.ascontiguousarray(frames), (h // scale, w // scale)))
        refs.append(frames[0])
        prompts.append(clip.caption)
    return {"hires": np.stack(hires), "low_res": np.stack(low), "references": refs, "prompts": prompts}


def run_v2v_demo(workdir: str | Path, config: ml_collections.ConfigDict | None = None, *, vae_steps: int | None = None,
                 num_clips: int = 8, num_steps: int = 25, guidance: float = 1.0,
                 models: str | Path | None = None) -> dict:
    """MagicVideo-V2's super-resolution stage on the synthetic dataset: the tiny VAE, then configs/v2v.py:demo from
    it, then each held-out clip's box-downsampled frames upsampled by the stage (SDEdit at the stage's strength, the
    clip's first high-resolution frame as the reference image, as the text-to-image stage's image is in the
    four-stage pipeline) and by bicubic interpolation, both scored by PSNR (dB, on [0, 255] frames) to the
    high-resolution truth (mean per-frame PSNR in dB and SSIM, `frame_scores`): `psnr_v2v`, `psnr_bicubic`,
    `psnr_gain`, `ssim_*`, and the PSNRs over the frames after the first (`*_later_frames`: frames the reference does
    not show). Writes `hires_<k>.mp4` (low-res input, bicubic, V2V,
    truth side by side), `contact_sheet.png`, `loss.png` and `summary.json` in `workdir`; returns the summary.
    `models`: a folder holding a trained tiny `vae` (another demo's WORKDIR/models) instead of training one."""
    import time

    from magdiff_jax.data.video_io import write_video
    from magdiff_jax.pipelines.v2v import V2VPipeline
    from magdiff_jax.train.trainer import train
    from magdiff_jax.utils.images import contact_grid, save_png

    workdir = Path(workdir).absolute()
    config = load_config("v2v", "demo") if config is None else config
    if models is None:
        logging.info("v2v demo [1/3]: training the tiny VAE in %s", workdir / "vae")
        models = train_tiny_vae(workdir, config, vae_steps)
    vae_losses = _losses(workdir / "vae") if (workdir / "vae" / "metrics.jsonl").exists() else []
    logging.info("v2v demo [2/3]: training the V2V stage (configs/v2v.py) in %s", workdir / "v2v")
    config = config.copy_and_resolve_references()
    config.init_from = str(models)
    t0 = time.perf_counter()
    train(config, workdir / "v2v")
    train_s = time.perf_counter() - t0

    logging.info("v2v demo [3/3]: super-resolving %d held-out clips", num_clips)
    t0 = time.perf_counter()
    scores, held = v2v_scores(V2VPipeline.load(workdir / "v2v" / "export"), config, num_clips, num_steps=num_steps,
                              guidance=guidance)
    sample_s = time.perf_counter() - t0
    out, bicubic, truth = held["v2v"], held["bicubic"], held["truth"]
    size = truth.shape[2:4]
    logging.info("PSNR to the truth: v2v %.2f dB, bicubic %.2f dB (gain %+.2f dB)", scores["psnr_v2v"],
                 scores["psnr_bicubic"], scores["psnr_gain"])
    scale = int(config.data.vsr.scale)
    nearest = held["low_res"].repeat(scale, axis=2).repeat(scale, axis=3)  # the input's pixels, enlarged
    videos, cells, row_labels, cell_labels = [], [], [], []
    for k in range(num_clips):
        side = np.concatenate([nearest[k], bicubic[k], out[k], truth[k]], axis=2)
        videos.append(write_video(workdir / f"hires_{k}.mp4", side, fps=4))
        if k < 4:
            cells.append([nearest[k], bicubic[k], out[k], truth[k]])
            row_labels.append(held["prompts"][k])
            cell_labels.append([None, *(f"PSNR {frame_scores(v[k], truth[k])[0]:.2f} dB" for v in (bicubic, out)),
                                None])
    low = held["low_res"].shape[2:4]
    col_labels = [f"low-res input ({low[0]}\u00d7{low[1]}, pixels enlarged)", "bicubic", "V2V",
                  f"truth ({size[0]}\u00d7{size[1]})"]
    title = (f"V2V super-resolution (\u00d7{scale}) of held-out clips: PSNR to the truth {scores['psnr_v2v']:.2f} dB, "
             f"bicubic {scores['psnr_bicubic']:.2f} dB (mean over {num_clips} clips)")
    save_png(workdir / "contact_sheet.png", contact_grid(cells, row_labels, col_labels, title=title,
                                                         cell_labels=cell_labels))
    loss_plot({**({"vae": vae_losses} if vae_losses else {}), "v2v": _losses(workdir / "v2v")}, workdir / "loss.png")
    summary = {**scores, "train_seconds": train_s, "sample_seconds": sample_s, "steps": int(config.steps),
               "strength": float(config.task_options.get("strength", 0.5)), "num_clips": num_clips,
               "scale": int(config.data.vsr.scale), "resolution": list(size), "videos": [str(p) for p in videos],
               "contact_sheet": str(workdir / "contact_sheet.png"), "loss_plot": str(workdir / "loss.png"),
               "v2v_final_loss": _losses(workdir / "v2v")[-1][1]}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def frame_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean per-frame PSNR (dB) and SSIM of uint8 frames (..., H, W, 3) against the truth, on [0, 255]."""
    from magdiff_jax.eval import psnr, ssim

    x, y = (np.asarray(a, np.float32).reshape(-1, *a.shape[-3:]) for a in (pred, truth))
    return float(np.mean(psnr(x, y, data_range=255.0))), float(np.mean(ssim(x, y, data_range=255.0)))


def vfi_held_out(config: ml_collections.ConfigDict, num_clips: int) -> dict:
    """The VFI stage's held-out set: synthetic clips `synth.num + k` (never trained on), their first `interp.window`
    frames `data.stride` apart at the training resolution. `videos` (N, window, H, W, 3) uint8 (the ends given, the
    inner frames the truth at t = i / (window - 1)) and `captions`."""
    from magdiff_jax.data.pipeline import synthetic_config
    from magdiff_jax.data.synthetic import make_clip
    from magdiff_jax.data.transforms import resize_images

    data = config.data
    window, stride = int(data.interp.window), int(data.stride)
    clip_cfg = synthetic_config(data.synthetic)
    clips = [make_clip(data.synthetic.num + k, clip_cfg) for k in range(num_clips)]
    videos = [resize_images(np.asarray(c.frames)[[i * stride for i in range(window)]], tuple(data.resolution))
              for c in clips]
    return {"videos": np.stack(videos), "captions": [c.caption for c in clips]}


def run_vfi_demo(workdir: str | Path, config: ml_collections.ConfigDict | None = None, *, num_clips: int = 16) -> dict:
    """MagicVideo-V2's frame-interpolation stage on the synthetic dataset: configs/vfi.py:demo from scratch, then
    for each held-out clip the frames at t = 1/3 and 2/3 between its first and last frame (3 frames apart) predicted
    by the stage (`VFIPipeline`, factor 3) and by blending the two ends ((1 - t) x0 + t x1), both scored against
    the true frames: `psnr_vfi`, `psnr_blend`, `psnr_gain` (dB), `ssim_vfi`, `ssim_blend`. Writes
    `interpolated_<k>.mp4` (blend, stage, truth side by side), `contact_sheet.png`, `loss.png` and `summary.json`
    in `workdir`; returns the summary."""
    import time

    from magdiff_jax.data.video_io import write_video
    from magdiff_jax.pipelines.vfi import VFIPipeline
    from magdiff_jax.train.trainer import train
    from magdiff_jax.utils.images import contact_grid, save_png

    workdir = Path(workdir).absolute()
    config = load_config("vfi", "demo") if config is None else config
    window = int(config.data.interp.window)
    if window != 4:
        raise ValueError(f"the VFI demo scores factor 3 (t = 1/3, 2/3): data.interp.window must be 4, got {window}")
    logging.info("vfi demo [1/2]: training the VFI stage (configs/vfi.py) in %s", workdir / "vfi")
    t0 = time.perf_counter()
    train(config, workdir / "vfi")
    train_s = time.perf_counter() - t0

    logging.info("vfi demo [2/2]: interpolating %d held-out clips", num_clips)
    t0 = time.perf_counter()
    scores, held = vfi_scores(VFIPipeline.load(workdir / "vfi" / "export"), config, num_clips)
    sample_s = time.perf_counter() - t0
    videos, out, blended = held["videos"], held["vfi"], held["blend"]
    truth = videos[:, 1:-1]
    psnr_vfi, psnr_blend = scores["psnr_vfi"], scores["psnr_blend"]
    logging.info("PSNR of the in-between frames: vfi %.2f dB, blending %.2f dB (gain %+.2f dB); SSIM %.3f vs %.3f",
                 psnr_vfi, psnr_blend, scores["psnr_gain"], scores["ssim_vfi"], scores["ssim_blend"])
    files, cells, row_labels, cell_labels = [], [], [], []
    for k in range(num_clips):
        side = np.concatenate([blended[k], out[k], videos[k]], axis=2)
        files.append(write_video(workdir / f"interpolated_{k}.mp4", side, fps=4))
        if k < 4:
            cells.append([blended[k], out[k], videos[k]])
            row_labels.append(held["captions"][k])
            cell_labels.append([f"PSNR {frame_scores(v[k, 1:-1], truth[k])[0]:.2f} dB" for v in (blended, out)]
                               + [None])
    col_labels = ["blending (1 - t) x0 + t x1", "VFI", "truth"]
    title = (f"VFI of held-out clips: frames t = 1/3, 2/3 between the first and last (given) frames; PSNR of those "
             f"{psnr_vfi:.2f} dB, blending {psnr_blend:.2f} dB (mean over {num_clips} clips)")
    save_png(workdir / "contact_sheet.png", contact_grid(cells, row_labels, col_labels, title=title,
                                                         cell_labels=cell_labels))
    loss_plot({"vfi": _losses(workdir / "vfi")}, workdir / "loss.png")
    summary = {**scores, "train_seconds": train_s, "sample_seconds": sample_s,
               "steps": int(config.steps), "num_clips": num_clips, "resolution": list(videos.shape[2:4]),
               "videos": [str(p) for p in files], "contact_sheet": str(workdir / "contact_sheet.png"),
               "loss_plot": str(workdir / "loss.png"), "vfi_final_loss": _losses(workdir / "vfi")[-1][1]}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# --- MagicVideo-V2 end to end ------------------------------------------------------------------------------------
MAGICVIDEO_STEPS = {"vae": 200, "t2i": 300, "i2v": 500, "v2v": 50, "vfi": 50}


def magicvideo_configs(steps: dict | None = None) -> dict[str, ml_collections.ConfigDict]:
    """The four tiny stages of `run_magicvideo_demo` on one synthetic dataset (configs/i2v.py:demo's clips: 32 px,
    a subject half the frame wide travelling a fifth of it; V2V's at 64 px): configs/t2i.py:demo, i2v.py:demo,
    v2v.py:demo and vfi.py:demo with the training steps of `MAGICVIDEO_STEPS` (updated by `steps`), the tiny VAE
    shared by T2I, I2V and V2V."""
    steps = {**MAGICVIDEO_STEPS, **(steps or {})}
    configs = {"t2i": load_config("t2i", "demo"), "i2v": load_config("i2v", "demo"),
               "v2v": load_config("v2v", "demo"), "vfi": load_config("vfi", "demo")}
    synth = configs["i2v"].data.synthetic
    for name, c in configs.items():
        c.steps, c.ckpt_every = steps[name], steps[name]
        c.log_every = max(1, min(int(c.log_every), steps[name] // 4))
        c.preview.every = 0
        c.compiler_options = configs["i2v"].compiler_options
        size = int(c.data.synthetic.size)
        c.data.synthetic = synth.copy_and_resolve_references()
        c.data.synthetic.size = size  # V2V trains at 64 px
        if name != "vfi":
            c.model.vae = configs["i2v"].model.vae
    configs["vfi"].data.synthetic.num_frames = 4  # the interpolation window
    return configs


def dominant_colour(image: np.ndarray, max_distance: float = 60.0, min_pixels: int = 3) -> str | None:
    """The palette colour most pixels of `image` (H, W, 3) uint8 are nearest to (within `max_distance`): the
    synthetic subject's colour (the textured background is far from every palette colour); None if fewer than
    `min_pixels` pixels are near any."""
    names, palette = _palette()
    dist = np.linalg.norm(image.astype(np.float32)[..., None, :] - palette, axis=-1)  # (H, W, 6)
    counts = np.bincount(dist.argmin(-1)[dist.min(-1) <= max_distance], minlength=len(names))
    return names[int(counts.argmax())] if counts.max() >= min_pixels else None


def v2v_scores(pipe, config: ml_collections.ConfigDict, num_clips: int, *, num_steps: int = 25,
               guidance: float = 1.0) -> tuple[dict, dict]:
    """A V2V stage on `v2v_held_out` clips of `config`, against bicubic upsampling: ({psnr_v2v, psnr_bicubic,
    psnr_gain, ssim_*, the same over the frames after the first}, {low_res, bicubic, v2v, truth, prompts})."""
    from magdiff_jax.utils.images import upscale_video

    held = v2v_held_out(config, num_clips)
    out = pipe(held["low_res"], held["references"], held["prompts"], list(range(num_clips)), num_steps=num_steps,
               guidance=guidance)
    size = held["hires"].shape[2:4]
    bicubic = np.round((np.asarray(upscale_video(held["low_res"].astype(np.float32) / 127.5 - 1, size)) + 1)
                       * 127.5).clip(0, 255).astype(np.uint8)
    truth, scores = held["hires"], {}
    for name, video in (("v2v", out), ("bicubic", bicubic)):
        scores[f"psnr_{name}"], scores[f"ssim_{name}"] = frame_scores(video, truth)
        scores[f"psnr_{name}_later_frames"], _ = frame_scores(video[:, 1:], truth[:, 1:])
    scores["psnr_gain"] = scores["psnr_v2v"] - scores["psnr_bicubic"]
    scores["psnr_gain_later_frames"] = scores["psnr_v2v_later_frames"] - scores["psnr_bicubic_later_frames"]
    return scores, {"low_res": held["low_res"], "bicubic": bicubic, "v2v": out, "truth": truth,
                    "prompts": held["prompts"]}


def vfi_scores(pipe, config: ml_collections.ConfigDict, num_clips: int) -> tuple[dict, dict]:
    """A VFI stage on `vfi_held_out` clips of `config` (window 4: the frames at t = 1/3, 2/3 between the ends),
    against blending the ends ((1 - t) x0 + t x1): ({psnr_vfi, psnr_blend, psnr_gain, ssim_vfi, ssim_blend},
    {videos (the truth), vfi (ends and interpolated frames), blend (likewise), captions})."""
    held = vfi_held_out(config, num_clips)
    videos = held["videos"]
    out = pipe(videos[:, [0, -1]], factor=3)  # (N, 4, H, W, 3): the ends and the two frames between
    t = np.asarray([1 / 3, 2 / 3], np.float32)[None, :, None, None, None]
    ends = videos[:, [0, -1]].astype(np.float32)
    blend = out.copy()
    blend[:, 1:-1] = np.round((1 - t) * ends[:, :1] + t * ends[:, 1:]).clip(0, 255).astype(np.uint8)
    truth = videos[:, 1:-1]
    psnr_vfi, ssim_vfi = frame_scores(out[:, 1:-1], truth)
    psnr_blend, ssim_blend = frame_scores(blend[:, 1:-1], truth)
    scores = {"psnr_vfi": psnr_vfi, "psnr_blend": psnr_blend, "psnr_gain": psnr_vfi - psnr_blend,
              "ssim_vfi": ssim_vfi, "ssim_blend": ssim_blend}
    return scores, {"videos": videos, "vfi": out, "blend": blend, "captions": held["captions"]}


def magicvideo_prompts(synth: ml_collections.ConfigDict, num_subjects: int) -> dict:
    """Held-out captions: subjects `synth.num + k` (never trained on) asked for each of the four motions. Lists
    `prompts`, `colours`, `motions`."""
    from magdiff_jax.data.pipeline import synthetic_config
    from magdiff_jax.data.synthetic import MOTIONS, make_clip

    clip_cfg = synthetic_config(synth)
    out = {"prompts": [], "colours": [], "motions": []}
    for k in range(num_subjects):
        for motion in MOTIONS:
            clip = make_clip(synth.num + k, clip_cfg, motion=motion)
            out["prompts"].append(clip.caption)
            out["colours"].append(clip.color)
            out["motions"].append(motion)
    return out


def run_magicvideo_demo(workdir: str | Path, *, steps: dict | None = None,
                        configs: dict[str, ml_collections.ConfigDict] | None = None, num_subjects: int = 2,
                        num_steps: int = 25, guidance: tuple[float, float, float] = (5.0, 3.0, 1.0),
                        num_clips: int = 8) -> dict:
    """MagicVideo-V2 end to end on the synthetic dataset: trains the tiny VAE and the four tiny stages
    (`magicvideo_configs`), runs the four-stage pipeline (`pipelines.magicvideo`) on held-out captions
    (`num_subjects` x the four motions) and measures each stage:
    - T2I `reference_colour_accuracy`: the reference's dominant palette colour is the caption's (chance 1/6);
    - I2V `keyframe_motion_accuracy`: the keyframes' subject (the caption's colour) moves the caption's way (chance
      1/4), and `keyframe_colour_kept`: the first keyframe's dominant colour is the reference's;
    - V2V `psnr_gain` over bicubic upsampling and VFI `psnr_gain` over blending the neighbours, each on held-out
      clips with a known truth (`v2v_scores`, `vfi_scores`).
    Writes WORKDIR/stages.json (the four exports), WORKDIR/videos/ (the pipeline's outputs: reference_<k>.png,
    keyframes_<k>.mp4, hires_<k>.mp4, final_<k>.mp4, its summary.json), `contact_sheet.png` (one row per prompt:
    reference, keyframes, high-resolution and final frames), `loss.png`, `metrics.png` and `summary.json`; returns
    the summary. Compiled programs are kept in WORKDIR/jax_cache (a rerun reads them back). `configs`: the four
    stages' configs (default `magicvideo_configs(steps)`; `steps["vae"]` still sets the VAE's)."""
    import time

    from magdiff_jax.pipelines.magicvideo import STAGES, MagicVideoPipeline, MagicVideoSettings
    from magdiff_jax.pipelines.v2v import V2VPipeline
    from magdiff_jax.pipelines.vfi import VFIPipeline
    from magdiff_jax.train.trainer import train, use_compilation_cache
    from magdiff_jax.utils.images import contact_grid, save_png
    from magdiff_jax.utils.plots import bar_plot

    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    # programs compiled twice (V2V's in the pipeline and in its scoring) or by a rerun are read back
    use_compilation_cache(str(workdir / "jax_cache"))
    steps_all = {**MAGICVIDEO_STEPS, **(steps or {})}
    configs = magicvideo_configs(steps) if configs is None else configs
    train_s = {}
    logging.info("magicvideo demo [1/6]: training the tiny VAE in %s", workdir / "vae")
    t0 = time.perf_counter()
    models = train_tiny_vae(workdir, configs["i2v"], steps_all["vae"])
    train_s["vae"] = time.perf_counter() - t0
    for k, name in enumerate(STAGES):
        logging.info("magicvideo demo [%d/6]: training the %s stage in %s (%d steps)", k + 2, name, workdir / name,
                     configs[name].steps)
        config = configs[name].copy_and_resolve_references()
        if name != "vfi":
            config.init_from = str(models)
        t0 = time.perf_counter()
        train(config, workdir / name)
        train_s[name] = time.perf_counter() - t0
    listing = workdir / "stages.json"
    listing.write_text(json.dumps({name: f"{name}/export" for name in STAGES}, indent=1) + "\n")

    logging.info("magicvideo demo [6/6]: the four-stage pipeline on %d held-out captions, then each stage scored",
                 num_subjects * 4)
    held = magicvideo_prompts(configs["i2v"].data.synthetic, num_subjects)
    settings = MagicVideoSettings(t2i_steps=num_steps, i2v_steps=num_steps, v2v_steps=num_steps,
                                  t2i_guidance=guidance[0], i2v_guidance=guidance[1], v2v_guidance=guidance[2], fps=4)
    pipe = MagicVideoPipeline.load(listing, settings)
    seeds = list(range(len(held["prompts"])))
    result = pipe.run(held["prompts"], workdir / "videos", seeds=seeds, progress=False)
    refs = [dominant_colour(im) for im in result.reference]
    firsts = [dominant_colour(v[0]) for v in result.keyframes]
    colour_acc = float(np.mean([r == c for r, c in zip(refs, held["colours"], strict=True)]))
    kept = float(np.mean([f == r for f, r in zip(firsts, refs, strict=True) if r is not None] or [0.0]))
    motion_acc, detected = subject_motion_accuracy(result.keyframes, held["colours"], held["motions"])
    logging.info("reference colour %.2f (chance 1/6), keyframe motion %.2f (chance 1/4)", colour_acc, motion_acc)
    t0 = time.perf_counter()
    v2v = v2v_scores(V2VPipeline.load(workdir / "v2v" / "export"), configs["v2v"], num_clips, num_steps=num_steps,
                     guidance=guidance[2])[0]
    vfi = vfi_scores(VFIPipeline.load(workdir / "vfi" / "export"), configs["vfi"], 2 * num_clips)[0]
    score_s = time.perf_counter() - t0
    logging.info("V2V %.2f dB vs bicubic %.2f; VFI %.2f dB vs blending %.2f", v2v["psnr_v2v"], v2v["psnr_bicubic"],
                 vfi["psnr_vfi"], vfi["psnr_blend"])

    cells, row_labels, cell_labels = [], [], []
    for n, prompt in enumerate(held["prompts"]):
        cells.append([result.reference[n], result.keyframes[n], result.hires[n], result.final[n]])
        row_labels.append(f"{prompt} (seed {seeds[n]})")
        cell_labels.append([f"colour: {refs[n]} {_mark(refs[n] == held['colours'][n])}",
                            f"moves: {detected[n]} {_mark(detected[n] == held['motions'][n])}", None, None])
    keys, hires, final = result.keyframes.shape, result.hires.shape, result.final.shape
    col_labels = [f"T2I {result.reference.shape[1]}\u00d7{result.reference.shape[2]}",
                  f"I2V keyframes ({keys[1]} at {keys[2]}\u00d7{keys[3]})",
                  f"V2V ({hires[2]}\u00d7{hires[3]})", f"VFI ({final[1]} frames)"]
    title = (f"MagicVideo-V2 on held-out captions: reference colour as captioned {colour_acc:.0%} (chance 17%), "
             f"keyframes move as captioned {motion_acc:.0%} (chance 25%); on held-out clips V2V "
             f"{v2v['psnr_gain']:+.2f} dB over bicubic, VFI {vfi['psnr_gain']:+.2f} dB over blending")
    save_png(workdir / "contact_sheet.png", contact_grid(cells, row_labels, col_labels, title=title,
                                                         cell_labels=cell_labels, frames=4, cell_px=64))
    loss_plot({name: _losses(workdir / name) for name in ("vae", *STAGES)}, workdir / "loss.png")
    bar_plot({"T2I reference colour": {"as captioned": colour_acc},
              "I2V keyframe motion": {"as captioned": motion_acc},
              "V2V (held-out clips)": {"V2V": v2v["psnr_v2v"], "bicubic": v2v["psnr_bicubic"]},
              "VFI (held-out clips)": {"VFI": vfi["psnr_vfi"], "blending": vfi["psnr_blend"]}},
             workdir / "metrics.png",
             ylabel={"T2I reference colour": "fraction of prompts", "I2V keyframe motion": "fraction of prompts",
                     "V2V (held-out clips)": "PSNR to the truth (dB)",
                     "VFI (held-out clips)": "PSNR to the truth (dB)"},
             baseline={"T2I reference colour": ("chance", 1 / 6), "I2V keyframe motion": ("chance", 1 / 4)},
             title="MagicVideo-V2 demo: each stage against its baseline")
    pipeline_s = {name: result.summary["stages"][name]["seconds"] for name in STAGES}
    summary = {
        "t2i": {"reference_colour_accuracy": colour_acc, "chance": 1 / 6, "detected_colours": refs,
                "train_seconds": train_s["t2i"], "steps": int(configs["t2i"].steps)},
        "i2v": {"keyframe_motion_accuracy": motion_acc, "chance": 1 / 4, "detected_motions": detected,
                "keyframe_colour_kept": kept, "train_seconds": train_s["i2v"], "steps": int(configs["i2v"].steps)},
        "v2v": {**v2v, "num_clips": num_clips, "train_seconds": train_s["v2v"], "steps": int(configs["v2v"].steps)},
        "vfi": {**vfi, "num_clips": 2 * num_clips, "train_seconds": train_s["vfi"],
                "steps": int(configs["vfi"].steps)},
        "vae": {"train_seconds": train_s["vae"], "steps": int(steps_all["vae"])},
        "prompts": held["prompts"], "colours": held["colours"], "motions": held["motions"], "seeds": seeds,
        "pipeline_seconds": pipeline_s, "scoring_seconds": score_s,
        "videos": str(workdir / "videos"), "contact_sheet": str(workdir / "contact_sheet.png"),
        "loss_plot": str(workdir / "loss.png"), "metrics_plot": str(workdir / "metrics.png"),
        "wall_seconds": time.perf_counter() - t_start,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
