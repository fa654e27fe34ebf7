"""MagicVideo-V2 end to end (PAPERS.md B.1): text -> reference image (T2I) -> keyframes (I2V) -> high-resolution
video (V2V) -> interpolated video (VFI), each stage loaded from its export (or training workdir) when its turn comes.

    pipe = MagicVideoPipeline.load("runs/stages")       # t2i/ i2v/ v2v/ vfi/ inside, or a JSON file naming them
    result = pipe.run(["a red square moves left"], "out/clip", seeds=[0])
    result.reference, result.keyframes, result.hires, result.final          # uint8 arrays, one row per prompt

`load` checks the four stages against each other from their JSON files alone, before any weight is read: each
holds the task of its slot, I2V and V2V read the prompt alike (the same tokenizer, prompt length and text-encoder
architecture), the reference image's aspect ratio is the keyframes', the keyframes times V2V's scale give a size
V2V can denoise, and the frames fit both motion modules' position tables.

`run` writes each stage's output as soon as it finishes: `reference.png`, `keyframes.mp4`, `hires.mp4`,
`final.mp4` (with several prompts `reference_<k>.png`, ... one per prompt), the exact frames under `stages/` and
`summary.json` (each stage's export, step, settings, seconds). A rerun in the same folder skips every stage whose
outputs exist for the same prompts, seeds, stage exports and settings (its own and those of every stage before
it), so a crash in VFI does not redo I2V. Only one stage's parameters are held at a time; V2V encodes and decodes
`vae_frames` frames at a time when asked, VFI interpolates in tiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from typing import Any

import numpy as np
from etils import epath

from magdiff_jax.diffusion.noise_prior import strength_start_index
from magdiff_jax.pipelines.v2v import default_strength
from magdiff_jax.utils.files import as_path, atomic_path, is_remote

STAGES = ("t2i", "i2v", "v2v", "vfi")
OUTPUTS = {"t2i": "reference.png", "i2v": "keyframes.mp4", "v2v": "hires.mp4", "vfi": "final.mp4"}
STAGE_LIST = "stages.json"  # the default name of a file listing the four stages


@dataclasses.dataclass(frozen=True)
class MagicVideoSettings:
    """How each stage runs. None: the stage's own default (the T2I image at its training resolution, the I2V
    stage's training frames, V2V's trained scale and strength). `fps`: the keyframes' (and the high-resolution
    video's) frame rate; the final video plays at `fps x factor`, so every video lasts as long."""

    t2i_steps: int = 25
    t2i_guidance: float = 7.5
    t2i_size: tuple[int, int] | None = None
    frames: int | None = None
    i2v_steps: int = 25
    i2v_guidance: float = 7.5
    v2v_steps: int = 25
    v2v_guidance: float = 7.5
    scale: int | None = None
    strength: float | None = None
    vae_frames: int = 0
    factor: int = 3
    tile: int = 512
    overlap: int = 64
    sampler: str = "ddim"
    fps: int = 8

    def stage(self, name: str) -> dict:
        """The settings that change stage `name`'s output."""
        own = {"t2i": ("t2i_steps", "t2i_guidance", "t2i_size", "sampler"),
               "i2v": ("frames", "i2v_steps", "i2v_guidance", "sampler"),
               "v2v": ("v2v_steps", "v2v_guidance", "scale", "strength", "vae_frames", "sampler"),
               "vfi": ("factor", "tile", "overlap")}[name]
        return {k: getattr(self, k) for k in own}


@dataclasses.dataclass
class MagicVideoResult:
    """One run's outputs (uint8, one row per prompt) and its summary (what summary.json holds)."""

    reference: np.ndarray  # (N, H, W, 3)
    keyframes: np.ndarray  # (N, F, h, w, 3)
    hires: np.ndarray  # (N, F, s h, s w, 3)
    final: np.ndarray  # (N, F + (F - 1)(factor - 1), s h, s w, 3)
    summary: dict[str, Any]


def stage_paths(spec) -> dict[str, epath.Path]:
    """The four stages' folders from `spec`: a folder holding t2i/ i2v/ v2v/ vfi/ (or a stages.json), a JSON file
    {"t2i": path, ...} (relative paths from the file's folder), or such a mapping."""
    if isinstance(spec, dict):
        listing, base = spec, None
    else:
        path = as_path(spec)
        if path.is_dir() and not (path / STAGE_LIST).exists():
            return {name: path / name for name in STAGES}
        file = path / STAGE_LIST if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{spec}: neither a folder of the four stages nor a file listing them")
        try:
            listing = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e}); expected {{\"t2i\": path, \"i2v\": ..., ...}}") from e
        base = file.parent
        if not isinstance(listing, dict):
            raise ValueError(f"{file}: expected a JSON object naming the stages {list(STAGES)}")
    missing = [s for s in STAGES if s not in listing]
    unknown = sorted(set(listing) - set(STAGES))
    if missing or unknown:
        raise ValueError(f"the stage list must name exactly {list(STAGES)}: missing {missing}, unknown {unknown}")
    out = {}
    for name in STAGES:
        p = os.fspath(listing[name])
        out[name] = as_path(p) if (base is None or is_remote(p) or os.path.isabs(p)) else base / p
    return out


def _aspect(size) -> float:
    return size[1] / size[0]


def check_chain(infos: dict, settings: MagicVideoSettings) -> dict:
    """That the stages chain (module docstring); `infos`: {stage: `export.stage.StageInfo`}. Returns the sizes
    the run will make: {"reference": (H, W), "keyframes": (h, w), "frames": F, "scale": s, "hires": (s h, s w)}."""
    for name in STAGES:
        if infos[name].task != name:
            raise ValueError(f"the {name} stage ({infos[name].path}) holds a {infos[name].task!r} stage")
    i2v, v2v = infos["i2v"], infos["v2v"]
    # I2V and V2V share a backbone (B.4): one tokenizer and text encoder reading the same prompt
    problems = []
    if i2v.models["text_encoder"] != v2v.models["text_encoder"]:
        a, b = (dataclasses.asdict(x.models["text_encoder"][1]) for x in (i2v, v2v))
        fields = sorted(k for k in a if a[k] != b.get(k))
        problems.append(f"text encoders differ ({', '.join(f'{k}: {a[k]} vs {b.get(k)}' for k in fields)})")
    if int(i2v.config.data.max_length) != int(v2v.config.data.max_length):
        problems.append(f"prompt lengths differ ({i2v.config.data.max_length} vs {v2v.config.data.max_length} "
                        "tokens)")
    if _tokenizer_digest(i2v) != _tokenizer_digest(v2v):
        problems.append("tokenizers differ")
    if problems:
        raise ValueError(f"the v2v stage ({v2v.path}) does not read prompts as the i2v stage ({i2v.path}) does: "
                         f"{'; '.join(problems)}")

    t2i_res = tuple(int(v) for v in infos["t2i"].config.data.resolution)
    reference = tuple(int(v) for v in settings.t2i_size) if settings.t2i_size is not None else t2i_res
    keyframes = tuple(int(v) for v in i2v.config.data.resolution)
    if abs(_aspect(reference) - _aspect(keyframes)) > 0.01 * _aspect(keyframes):
        raise ValueError(f"the t2i stage makes {reference[0]}x{reference[1]} images and the i2v stage "
                         f"{keyframes[0]}x{keyframes[1]} keyframes: the reference would lose part of the picture "
                         "to cropping (give a t2i size of the keyframes' aspect ratio)")
    vae_f = infos["t2i"].models["vae"][1].downsample_factor
    down = 2 ** (len(infos["t2i"].models["unet"][1].block_out_channels) - 1)
    if reference[0] % (vae_f * down) or reference[1] % (vae_f * down):
        raise ValueError(f"the t2i image size {reference[0]}x{reference[1]} must be a multiple of {vae_f * down} "
                         f"(the VAE's factor {vae_f} x the U-Net's downsampling {down})")
    frames = int(i2v.config.data.num_frames) if settings.frames is None else int(settings.frames)
    for name in ("i2v", "v2v"):
        table = infos[name].models["unet"][1].unet.motion_max_seq_length
        if frames > table:
            raise ValueError(f"{frames} keyframes: the {name} stage's motion modules hold {table} frame positions")
    if frames < 2:
        raise ValueError(f"frame interpolation needs at least 2 keyframes, got {frames}")
    scale = int(v2v.config.task_options.get("scale", 2) if settings.scale is None else settings.scale)
    if scale < 1:
        raise ValueError(f"the v2v scale must be a positive integer, got {scale}")
    hires = (keyframes[0] * scale, keyframes[1] * scale)
    vae_f = v2v.models["vae"][1].downsample_factor
    down = 2 ** (len(v2v.models["unet"][1].unet.block_out_channels) - 1)
    if hires[0] % (vae_f * down) or hires[1] % (vae_f * down):
        raise ValueError(f"the i2v keyframes ({keyframes[0]}x{keyframes[1]}) x the v2v scale {scale} give "
                         f"{hires[0]}x{hires[1]}, which the v2v stage cannot denoise: it needs a multiple of "
                         f"{vae_f * down} (the VAE's factor {vae_f} x the U-Net's downsampling {down})")
    strength = default_strength(v2v.config, settings.strength)
    if strength < 1.0:
        try:
            strength_start_index(settings.v2v_steps, strength)
        except ValueError as e:
            raise ValueError(f"the v2v stage at {settings.v2v_steps} steps: {e}") from None
    if int(settings.factor) != settings.factor or settings.factor < 2:
        raise ValueError(f"the interpolation factor must be an integer >= 2, got {settings.factor}")
    if settings.sampler not in ("ddim", "dpm", "euler"):
        raise ValueError(f"sampler must be one of ddim, dpm, euler; got {settings.sampler!r}")
    return {"reference": reference, "keyframes": keyframes, "frames": frames, "scale": scale, "hires": hires}


def _tokenizer_digest(info) -> str | None:
    if info.tokenizer is None:
        return None
    h = hashlib.sha256()
    for f in sorted(info.tokenizer.iterdir(), key=lambda p: p.name):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _stage_step(info) -> int | None:
    """The step an export was written at, or a workdir's latest checkpoint (which `load_stage` would read)."""
    from magdiff_jax.export.stage import STAGE_FILE, checkpoint_steps

    if (info.path / STAGE_FILE).exists():
        return int(json.loads((info.path / STAGE_FILE).read_text()).get("step", -1))
    steps = checkpoint_steps(info.path)
    return steps[-1] if steps else None


class MagicVideoPipeline:
    """The four stages, checked against each other; `run` generates (module docstring)."""

    def __init__(self, paths: dict[str, epath.Path], settings: MagicVideoSettings = MagicVideoSettings()):
        from magdiff_jax.export.stage import read_stage_info

        self.paths = paths
        self.infos = {name: read_stage_info(paths[name]) for name in STAGES}
        self.settings = settings
        self.sizes = check_chain(self.infos, settings)
        self.steps = {name: _stage_step(self.infos[name]) for name in STAGES}

    @classmethod
    def load(cls, spec, settings: MagicVideoSettings | None = None) -> MagicVideoPipeline:
        """`spec`: see `stage_paths`."""
        return cls(stage_paths(spec), settings or MagicVideoSettings())

    def with_settings(self, **changes) -> MagicVideoPipeline:
        """The same stages with some settings changed (checked again)."""
        settings = dataclasses.replace(self.settings, **changes)
        new = object.__new__(MagicVideoPipeline)
        new.paths, new.infos, new.steps, new.settings = self.paths, self.infos, self.steps, settings
        new.sizes = check_chain(self.infos, settings)
        return new

    # --- one stage at a time ---------------------------------------------------------------------------------------
    def _t2i(self, prompts, seeds, progress):
        from magdiff_jax.pipelines.t2i import T2IPipeline

        s = self.settings
        pipe = T2IPipeline.load(self.paths["t2i"])
        return pipe(prompts, seeds, size=self.sizes["reference"], num_steps=s.t2i_steps, guidance=s.t2i_guidance,
                    sampler=s.sampler, progress=progress)

    def _i2v(self, prompts, seeds, reference, progress):
        from magdiff_jax.pipelines.i2v import I2VPipeline

        s = self.settings
        pipe = I2VPipeline.load(self.paths["i2v"])
        return pipe(list(reference), prompts, seeds, num_frames=self.sizes["frames"], num_steps=s.i2v_steps,
                    guidance=s.i2v_guidance, sampler=s.sampler, progress=progress)

    def _v2v(self, prompts, seeds, reference, keyframes, progress):
        from magdiff_jax.pipelines.v2v import V2VPipeline

        s = self.settings
        pipe = V2VPipeline.load(self.paths["v2v"])
        frames = s.vae_frames or int(pipe.config.task_options.get("vae_frames_per_call", 0))
        return pipe(keyframes, list(reference), prompts, seeds, scale=self.sizes["scale"], strength=s.strength,
                    num_steps=s.v2v_steps, guidance=s.v2v_guidance, sampler=s.sampler, frames_per_call=frames,
                    progress=progress)

    def _vfi(self, hires):
        from magdiff_jax.pipelines.vfi import VFIPipeline

        s = self.settings
        pipe = VFIPipeline.load(self.paths["vfi"], tile=s.tile, overlap=s.overlap)
        return pipe(hires, factor=int(s.factor))

    # --- the run ---------------------------------------------------------------------------------------------------
    def fingerprints(self, prompts: list[str], seeds: list[int]) -> dict[str, str]:
        """Each stage's identity: its export and step, its settings, the prompts and seeds, and the fingerprint of
        the stage before it (so a change upstream invalidates everything after it)."""
        out, upstream = {}, ""
        for name in STAGES:
            record = {"stage": name, "path": os.fspath(self.paths[name]), "step": self.steps[name],
                      "settings": self.settings.stage(name), "prompts": list(prompts), "seeds": list(seeds),
                      "upstream": upstream}
            upstream = hashlib.sha256(json.dumps(record, sort_keys=True, default=list).encode()).hexdigest()[:16]
            out[name] = upstream
        return out

    def run(self, prompts: list[str] | str, out_dir, seeds: list[int] | None = None, *, progress: bool = True,
            force: bool = False) -> MagicVideoResult:
        """The four stages for `prompts` (one seed each, default 0, 1, ...), written to `out_dir` as they finish
        (module docstring). `force`: run every stage even when its outputs exist."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if not prompts or len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds: at least one prompt, one seed each")
        out_dir = as_path(out_dir) if is_remote(out_dir) else epath.Path(os.path.abspath(out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
        prints = self.fingerprints(prompts, seeds)
        summary_path = out_dir / "summary.json"
        previous = {}
        if summary_path.exists() and not force:
            try:
                previous = json.loads(summary_path.read_text()).get("stages", {})
            except json.JSONDecodeError:
                logging.warning("%s is not valid JSON: every stage runs again", summary_path)
        summary = {"prompts": prompts, "seeds": seeds, "settings": dataclasses.asdict(self.settings),
                   "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in self.sizes.items()},
                   "stages": {}}
        arrays = {}
        for k, name in enumerate(STAGES):
            files = _output_files(out_dir, name, len(prompts))
            state = out_dir / "stages" / f"{name}.npy"
            old = previous.get(name, {})
            if old.get("fingerprint") == prints[name] and state.exists() and all(f.exists() for f in files):
                arrays[name] = _load_array(state)
                summary["stages"][name] = {**old, "skipped": True}
                logging.info("magicvideo [%d/4] %s: outputs exist for these settings, skipped", k + 1, name)
                continue
            logging.info("magicvideo [%d/4] %s: %s (loading %s)", k + 1, name, _what(name, self.sizes),
                         self.paths[name])
            t0 = time.perf_counter()
            if name == "t2i":
                arrays[name] = self._t2i(prompts, seeds, progress)
            elif name == "i2v":
                arrays[name] = self._i2v(prompts, seeds, arrays["t2i"], progress)
            elif name == "v2v":
                arrays[name] = self._v2v(prompts, seeds, arrays["t2i"], arrays["i2v"], progress)
            else:
                arrays[name] = self._vfi(arrays["v2v"])
            seconds = time.perf_counter() - t0
            _save_array(state, arrays[name])
            fps = self.settings.fps * (int(self.settings.factor) if name == "vfi" else 1)
            for path, row in zip(files, arrays[name], strict=True):
                _write_output(path, row, fps)
            summary["stages"][name] = {"export": os.fspath(self.paths[name]), "step": self.steps[name],
                                       "settings": self.settings.stage(name), "fingerprint": prints[name],
                                       "seconds": round(seconds, 3), "shape": list(arrays[name].shape),
                                       "outputs": [os.fspath(f) for f in files], "skipped": False}
            logging.info("magicvideo [%d/4] %s: %s in %.1f s", k + 1, name, "x".join(map(str, arrays[name].shape)),
                         seconds)
            _write_json(summary_path, {**summary, "complete": False})  # what has finished, should a later stage fail
        summary["complete"] = True
        _write_json(summary_path, summary)
        return MagicVideoResult(arrays["t2i"], arrays["i2v"], arrays["v2v"], arrays["vfi"], summary)


def _what(name: str, sizes: dict) -> str:
    h, w = sizes["keyframes"]
    return {"t2i": "reference image {}x{}".format(*sizes["reference"]),
            "i2v": f"{sizes['frames']} keyframes at {h}x{w}",
            "v2v": "x{} to {}x{}".format(sizes["scale"], *sizes["hires"]),
            "vfi": "frame interpolation"}[name]


def _output_files(out_dir, name: str, n: int) -> list:
    stem, suffix = OUTPUTS[name].split(".")
    return [out_dir / OUTPUTS[name]] if n == 1 else [out_dir / f"{stem}_{k}.{suffix}" for k in range(n)]


def _write_output(path, array: np.ndarray, fps: int) -> None:
    if array.ndim == 3:
        from magdiff_jax.utils.images import save_png

        save_png(path, array)
    else:
        from magdiff_jax.data.video_io import write_video

        write_video(path, array, fps=fps)


def _save_array(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array))


def _load_array(path) -> np.ndarray:
    return np.load(io.BytesIO(as_path(path).read_bytes()))


def _write_json(path, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
