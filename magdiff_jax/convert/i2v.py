"""The I2V and V2V stages (MagicVideo-V2 image-to-video and video-to-video, `models.i2v`) as diffusers
AnimateDiff ControlNet pipeline folders.

diffusers has no class for the whole I2V denoiser, but its AnimateDiff ControlNet pipelines with an IP-Adapter-Plus
loaded run the same computation: the ControlNet on every frame (our reference repeated over the frames, residuals
times `controlnet_conditioning_scale`), then the UNetMotionModel with the decoupled image cross-attention. The V2V
stage is the same denoiser (its own motion modules, fine-tuned on high-resolution clips) whose low-resolution input
enters SDEdit-style: upsampled by `scale`, VAE-encoded, noised to `strength`, denoised; diffusers'
`AnimateDiffVideoToVideoControlNetPipeline` samples exactly so. One writer handles both (`TASK_EXPORTS`); the stage
export (`export.stage`) becomes

    DST/
      model_index.json             AnimateDiffControlNetPipeline (i2v) or AnimateDiffVideoToVideoControlNetPipeline
                                   (v2v), and their components (the two pipelines take the same ones):
      unet/                        UNetMotionModel (spatial layers + motion modules, no IP-Adapter projections)
      motion_adapter/              MotionAdapter: the same motion modules (the pipeline's signature requires one;
                                   with a UNetMotionModel as `unet` it is not used)
      controlnet/                  ControlNetModel
      vae/                         AutoencoderKL
      text_encoder/                CLIPTextModel (or ...WithProjection, as the stage's)
      tokenizer/                   the stage's tokenizer files; tokenizer_config.json's model_max_length set to the
                                   prompt length the stage trained with (`text_max_length`)
      scheduler/                   DDIMScheduler: the stage's schedule (DDIM's keys only)
      image_encoder/               CLIPVisionModelWithProjection (see below)
      feature_extractor/           CLIPImageProcessor at the image encoder's size, CLIP's mean and std
      ip_adapter.safetensors       IP-Adapter-Plus (`convert.ip_adapter`): the resampler (original layout) and
                                   `ip_adapter.<2n+1>.to_k_ip/to_v_ip.weight` of the spatial cross-attentions
      i2v.json | v2v.json          what diffusers has no place for (below)

    pipe = AnimateDiffControlNetPipeline.from_pretrained(DST)     # or AnimateDiffVideoToVideoControlNetPipeline
    pipe.load_ip_adapter(DST, subfolder="", weight_name="ip_adapter.safetensors")
    pipe.set_ip_adapter_scale(meta["ip_adapter_scale"])          # meta = read_i2v_meta(DST)
    pipe(prompt, conditioning_frames=[reference] * F, ip_adapter_image=reference,
         controlnet_conditioning_scale=meta["conditioning_scale"], ...)
    # v2v: also video=frames (F frames of the low-resolution clip upsampled by meta["scale"] to meta["resolution"]),
    #      strength=meta["strength"], height/width = meta["resolution"]

i2v.json / v2v.json: {"format": "magdiff_jax_i2v_diffusers" / "magdiff_jax_v2v_diffusers", "format_version": 1,
"task", "step", "config": `I2VConfig.to_dict()` (what `i2v_from_diffusers` rebuilds the model from),
"conditioning_scale" (the ControlNet residual scale), "ip_adapter_scale" (lambda of the image cross-attention),
"image_layer" (the CLIP vision hidden state the appearance tokens read: -2, the penultimate, is what diffusers'
`encode_image` takes; a stage trained on another layer needs `ip_adapter_image_embeds` computed by the caller),
"reference_factor" (reference pixels per latent), "text_max_length", "num_frames" and "resolution" (the stage's
clips; for v2v the high-resolution output's), "image_encoder_projection" ("trained", or "zeros" when the stage's
encoder has none)}, and
- i2v: "noise_prior" (the latent noise prior's settings, `NoisePriorConfig.to_dict()`: diffusers' pipeline starts
  from plain noise);
- v2v: "low_res_input" ("sdedit", the only input diffusers' pipeline has), "strength" (the SDEdit strength the
  stage samples with: the pipeline noises the encoded video to the timestep `strength` of the way through its
  schedule and runs the remaining steps) and "scale" (the low-resolution clip's upsampling factor to "resolution").
  The pipeline resizes the frames it is given to height x width itself (PIL frames with Lanczos, arrays and tensors
  with nearest neighbours): to sample as the stage does, give it frames already upsampled by `scale`.

A V2V stage trained with `task_options.low_res_input = "concat"` (the upsampled low-resolution latent concatenated
to the noisy one, a U-Net of twice the latent channels) has no diffusers pipeline: it is refused, as is any U-Net
whose input channels are not the VAE's latent channels.

The image encoder. The pipelines type it CLIPVisionModelWithProjection; the stage only reads its hidden states
(`hidden_states[-2]`, as the IP-Adapter-Plus path does), and its encoder may have no projection (CLIPVisionModel).
Such an encoder is written with a zero `visual_projection` (hidden_size -> projection_dim): it loads with no
missing key, every hidden state is the stage's, and its `image_embeds` are zeros, which no IP-Adapter-Plus uses
(a plain IP-Adapter reading them would see no image, rather than a made-up one). The meta file says "zeros".

    i2v_to_diffusers(load_stage("runs/i2v/export"), "out/i2v_diffusers")      # magdiff-jax convert to-torch --kind i2v
    i2v_to_diffusers(load_stage("runs/v2v/export"), "out/v2v_diffusers", task="v2v")          # ... --kind v2v
    module, params = i2v_from_diffusers("out/i2v_diffusers")                   # the I2VUNet back, bit-exact (either)

Every missing, unexpected and mis-shaped key of every file is reported (`ConversionError`), named as the file names it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from flax import traverse_util

from magdiff_jax.convert import safetensors_io
from magdiff_jax.convert.clip import text_torch_class
from magdiff_jax.convert.controlnet import controlnet_rules
from magdiff_jax.convert.core import read_config, save_torch, torch_format, torch_to_flax
from magdiff_jax.convert.ip_adapter import (
    IP_NAMES,
    base_config,
    check_diffusers_loadable,
    ip_adapter_to_torch,
    load_ip_adapter,
)
from magdiff_jax.convert.unet_motion import (
    motion_adapter_config,
    motion_adapter_state,
    motion_adapter_to_torch,
    unet_motion_rules,
)
from magdiff_jax.diffusion.noise_prior import NoisePriorConfig
from magdiff_jax.models.controlnet import ControlNetModel
from magdiff_jax.models.i2v import LOW_RES_INPUTS, I2VConfig, I2VUNet
from magdiff_jax.models.registry import ConfigError, get_model
from magdiff_jax.models.unet_motion import UNetMotionModel
from magdiff_jax.utils.errors import ConversionError, key_list, mismatch_message
from magdiff_jax.utils.files import as_path, atomic_dir, check_destination, copy_tree, user_path
from magdiff_jax.utils.images import CLIP_MEAN, CLIP_STD

FORMAT_VERSION = 1
IP_ADAPTER_FILE = "ip_adapter.safetensors"
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS = "diffusion_pytorch_model"
# the stage's models: name -> registry kind
STAGE_MODELS = {"unet": "i2v", "vae": "vae", "text_encoder": "clip_text", "image_encoder": "clip_vision"}
# the hidden state diffusers' `encode_image` gives an IP-Adapter-Plus
DIFFUSERS_IMAGE_LAYER = -2
# DDIMScheduler's config keys (the stage's schedule also holds other samplers' options)
DDIM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
             "set_alpha_to_one", "steps_offset", "prediction_type", "clip_sample_range", "timestep_spacing",
             "rescale_betas_zero_snr")
# meta entries that repeat a field of its "config" (checked to agree on reading)
_REPEATED = {"conditioning_scale": lambda c: c.conditioning_scale,
             "ip_adapter_scale": lambda c: c.unet.image_attention_scale,
             "reference_factor": lambda c: c.reference_factor}
# the defaults of the V2V task options the export reads (`residual_decode`: the stage's output is the bicubic input
# plus D(z) - D(E(input)), a step after the pipeline's decode that a caller of the diffusers pipeline adds)
V2V_DEFAULTS = {"low_res_input": "sdedit", "strength": 0.5, "scale": 2, "residual_decode": False}


@dataclasses.dataclass(frozen=True)
class TaskExport:
    """What tells the folders of the two stages apart: the diffusers pipeline, the meta file and its format, and
    the meta entries only that task writes (all others are common)."""

    task: str
    pipeline_class: str
    meta_file: str
    format: str
    own_entries: tuple[str, ...]


TASK_EXPORTS = {
    "i2v": TaskExport("i2v", "AnimateDiffControlNetPipeline", "i2v.json", "magdiff_jax_i2v_diffusers",
                      ("noise_prior",)),
    "v2v": TaskExport("v2v", "AnimateDiffVideoToVideoControlNetPipeline", "v2v.json", "magdiff_jax_v2v_diffusers",
                      tuple(V2V_DEFAULTS)),
}


def task_export(task: str) -> TaskExport:
    """The folder layout of `task` ("i2v" or "v2v")."""
    if task not in TASK_EXPORTS:
        raise ValueError(f"no diffusers pipeline export for task {task!r}; one of {sorted(TASK_EXPORTS)}")
    return TASK_EXPORTS[task]


# --- the files that are not weights --------------------------------------------------------------------------------
def model_index(text_encoder_class: str, task: str = "i2v") -> dict:
    """model_index.json of the pipeline folder of `task` (module docstring; both pipelines' __init__ take these
    components)."""
    return {
        "_class_name": task_export(task).pipeline_class,
        "_diffusers_version": DIFFUSERS_VERSION,
        "controlnet": ["diffusers", "ControlNetModel"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "motion_adapter": ["diffusers", "MotionAdapter"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", text_encoder_class],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNetMotionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def image_processor_config(size: int) -> dict:
    """preprocessor_config.json of a CLIPImageProcessor for a CLIP vision tower of `size` pixels: shortest edge
    resized to `size` (bicubic), centre crop to size x size, [0, 1], CLIP's mean and std."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def scheduler_config(stage) -> dict:
    """The stage's schedule as DDIMScheduler's scheduler_config.json."""
    full = stage.schedule.to_diffusers_config("DDIMScheduler")
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            **{k: full[k] for k in DDIM_KEYS if k in full}}


def text_max_length(stage) -> int:
    """The prompt length the stage's text encoder saw in training (`data.max_length`; without one, its position
    table's length): what the exported tokenizer pads and truncates to."""
    positions = stage.modules["text_encoder"].config.max_position_embeddings
    length = (stage.config.get("data") or {}).get("max_length", positions)
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= positions:
        raise ValueError(f"{stage.path}: config data.max_length={length!r} must be an int in 1..{positions} (the text "
                         "encoder's max_position_embeddings)")
    return length


def _task_options(stage) -> dict:
    return dict(stage.config.get("task_options") or {})


def _image_layer(stage) -> int:
    return int(_task_options(stage).get("image_layer", DIFFUSERS_IMAGE_LAYER))


def v2v_options(stage) -> dict:
    """The V2V stage's sampling options the pipeline needs: {"low_res_input", "strength", "scale"} from
    `task_options` (defaults `V2V_DEFAULTS`), checked. "concat" input has no diffusers pipeline and is refused."""
    opts = _task_options(stage)
    out = {k: opts.get(k, v) for k, v in V2V_DEFAULTS.items()}
    low_res, strength, scale = out["low_res_input"], out["strength"], out["scale"]
    if low_res not in LOW_RES_INPUTS:
        raise ValueError(f"{stage.path}: task_options.low_res_input={low_res!r} must be one of {LOW_RES_INPUTS}")
    if low_res == "concat":
        raise ValueError(f"{stage.path}: task_options.low_res_input='concat': the U-Net reads the upsampled "
                         "low-resolution latent concatenated to the noisy one, and "
                         f"{TASK_EXPORTS['v2v'].pipeline_class} gives its U-Net the noisy latent alone; only an "
                         "'sdedit' V2V stage can be exported")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"{stage.path}: task_options.strength={strength!r} must be a number in (0, 1]")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"{stage.path}: task_options.scale={scale!r} must be an int >= 1")
    return {"low_res_input": low_res, "strength": float(strength), "scale": scale,
            "residual_decode": bool(out["residual_decode"])}


def _check_stage(stage, export: TaskExport) -> I2VConfig:
    """The stage must be one of `export.task` with every model the pipeline needs; returns the denoiser's config."""
    if stage.task != export.task:
        raise ValueError(f"{stage.path} holds a {stage.task!r} stage, not {export.task}")
    if export.task == "v2v":
        v2v_options(stage)
    wrong = [f"{name} ({stage.kinds.get(name, 'absent')}, expected {kind})" for name, kind in STAGE_MODELS.items()
             if stage.kinds.get(name) != kind]
    if wrong:
        raise ValueError(f"{stage.path}: the {export.task.upper()} pipeline needs the stage's models {STAGE_MODELS}; "
                         "these differ: " + ", ".join(wrong))
    if stage.tokenizer is None:
        raise ValueError(f"{stage.path}: the stage has no tokenizer (the pipeline's `tokenizer`)")
    cfg = stage.modules["unet"].config
    if cfg.controlnet is None:
        raise ValueError(f"{stage.path}: the I2V model has no ControlNet (use_controlnet=False); "
                         f"{export.pipeline_class} needs one")
    latent = stage.modules["vae"].config.latent_channels
    if cfg.unet.in_channels != latent:
        raise ValueError(f"{stage.path}: the U-Net reads {cfg.unet.in_channels} input channels, the VAE's latents "
                         f"have {latent}: {export.pipeline_class} gives its U-Net the noisy latent alone")
    vae_factor = stage.modules["vae"].config.downsample_factor
    if cfg.reference_factor != vae_factor:
        raise ValueError(f"{stage.path}: the ControlNet reads the reference at {cfg.reference_factor}x the latent "
                         f"size, the VAE decodes at {vae_factor}x: the pipeline gives the ControlNet frames at the "
                         "video's size, so the two must agree")
    check_diffusers_loadable(cfg.resampler)
    return cfg


def _split_unet(params) -> tuple[dict, dict]:
    """The U-Net's params -> (without the IP-Adapter projections, all of them), nested plain dicts."""
    flat = traverse_util.flatten_dict(params)
    base = {p: v for p, v in flat.items() if not (len(p) >= 2 and p[-2] in IP_NAMES)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(flat)


def _meta(stage, export: TaskExport, cfg: I2VConfig, prior: NoisePriorConfig | None, projection: str) -> dict:
    data = stage.config.get("data") or {}
    resolution = data.get("resolution")
    own = {"noise_prior": prior.to_dict()} if export.task == "i2v" else v2v_options(stage)
    return {
        "format": export.format, "format_version": FORMAT_VERSION, "task": stage.task, "step": int(stage.step),
        "config": json.loads(json.dumps(cfg.to_dict())),
        "conditioning_scale": cfg.conditioning_scale,
        "ip_adapter_scale": cfg.unet.image_attention_scale,
        "image_layer": _image_layer(stage),
        "reference_factor": cfg.reference_factor,
        "text_max_length": text_max_length(stage),
        "num_frames": data.get("num_frames"),
        "resolution": list(resolution) if resolution is not None else None,
        "image_encoder_projection": projection,
        **own,
    }


# --- Flax stage -> diffusers folder ---------------------------------------------------------------------------------
def i2v_to_diffusers(stage, dst: str | os.PathLike, overwrite: bool = False, prior: NoisePriorConfig | None = None,
                     max_shard_bytes: int | None = None, task: str = "i2v") -> epath.Path:
    """Write the `task` stage (`export.stage.load_stage` of an export or a training workdir; "i2v" or "v2v") as
    the pipeline folder of the module docstring: AnimateDiffControlNetPipeline with i2v.json, or
    AnimateDiffVideoToVideoControlNetPipeline with v2v.json. For i2v, `prior` is recorded in i2v.json (default: the
    I2V pipeline's, `NoisePriorConfig()`); a V2V stage starts from its noised input video and takes none. A stage of
    another task, or one the pipeline cannot run, is refused before anything is written. The folder is assembled
    beside DST and swapped into place; a non-empty DST is refused unless `overwrite`. Returns DST."""
    export = task_export(task)
    cfg = _check_stage(stage, export)
    if task == "v2v" and prior is not None:
        raise ValueError("a V2V stage starts from its noised low-resolution video (SDEdit): no noise prior applies")
    prior = NoisePriorConfig() if prior is None and task == "i2v" else prior
    dst = as_path(dst)
    check_destination(dst, overwrite)
    layer = _image_layer(stage)
    if layer != DIFFUSERS_IMAGE_LAYER:
        logging.warning("%s: the stage reads CLIP hidden state %d, diffusers' encode_image gives the IP-Adapter %d: "
                        "pass ip_adapter_image_embeds of layer %d to the pipeline", stage.path, layer,
                        DIFFUSERS_IMAGE_LAYER, layer)
    params = nn.meta.unbox(jax.device_get(stage.params["unet"]))
    base = base_config(cfg.unet)
    unet_base, unet_full = _split_unet(params["unet"])
    text_module, vision_module = stage.modules["text_encoder"], stage.modules["image_encoder"]
    vision_params = nn.meta.unbox(jax.device_get(stage.params["image_encoder"]))
    projection = "trained" if vision_module.config.with_projection else "zeros"
    if projection == "zeros":
        vcfg = dataclasses.replace(vision_module.config, with_projection=True)
        vision_module = type(vision_module)(vcfg)
        vision_params = {**vision_params, "visual_projection": {
            "kernel": np.zeros((vcfg.hidden_size, vcfg.projection_dim), np.float32)}}
    length = text_max_length(stage)
    meta = _meta(stage, export, cfg, prior, projection)

    with atomic_dir(dst) as tmp:
        save_torch("unet_motion", UNetMotionModel(base), unet_base, tmp / "unet", max_shard_bytes=max_shard_bytes)
        motion_adapter_to_torch(base, unet_base, tmp / "motion_adapter")
        save_torch("controlnet", ControlNetModel(cfg.controlnet), params["controlnet"], tmp / "controlnet",
                   max_shard_bytes=max_shard_bytes)
        save_torch("vae", stage.modules["vae"], stage.params["vae"], tmp / "vae", max_shard_bytes=max_shard_bytes)
        save_torch("clip_text", text_module, stage.params["text_encoder"], tmp / "text_encoder",
                   max_shard_bytes=max_shard_bytes)
        save_torch("clip_vision", vision_module, vision_params, tmp / "image_encoder", max_shard_bytes=max_shard_bytes)
        ip_adapter_to_torch(params["image_proj"], cfg.resampler, cfg.unet, unet_full, tmp / IP_ADAPTER_FILE)

        copy_tree(stage.tokenizer_folder(), tmp / "tokenizer")
        tok_config = tmp / "tokenizer" / "tokenizer_config.json"
        tok = json.loads(tok_config.read_text()) if tok_config.exists() else {"tokenizer_class": "CLIPTokenizer"}
        tok_config.write_text(json.dumps({**tok, "model_max_length": length}, indent=2))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(stage), indent=2))
        (tmp / "feature_extractor").mkdir()
        (tmp / "feature_extractor" / "preprocessor_config.json").write_text(
            json.dumps(image_processor_config(vision_module.config.image_size), indent=2))
        (tmp / "model_index.json").write_text(
            json.dumps(model_index(text_torch_class(text_module.config), task), indent=2))
        (tmp / export.meta_file).write_text(json.dumps(meta, indent=2))
    return dst


# --- diffusers folder -> Flax I2VUNet -------------------------------------------------------------------------------
def _folder_export(src) -> TaskExport:
    """Which of the two folders `src` is: the one meta file it holds."""
    found = [e for e in TASK_EXPORTS.values() if (src / e.meta_file).exists()]
    if not found:
        names = " or ".join(e.meta_file for e in TASK_EXPORTS.values())
        kinds = "|".join(TASK_EXPORTS)
        raise safetensors_io.CheckpointFormatError(f"{src}: no {names}; expected a folder written by "
                                                   f"`magdiff-jax convert to-torch --kind {kinds}`")
    if len(found) > 1:
        raise safetensors_io.CheckpointFormatError(f"{src} holds {' and '.join(e.meta_file for e in found)}; a "
                                                   "folder written by `i2v_to_diffusers` holds one")
    return found[0]


def read_i2v_meta(src: str | os.PathLike) -> dict:
    """The meta file (i2v.json or v2v.json) of a folder written by `i2v_to_diffusers`, checked for its format,
    version, task and entries, and against model_index.json's pipeline class."""
    src = user_path(src)
    export = _folder_export(src)
    path = src / export.meta_file
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise safetensors_io.CheckpointFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != export.format:
        raise safetensors_io.CheckpointFormatError(f"{path}: not an {export.task.upper()} diffusers export "
                                                   f"(format != {export.format!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise safetensors_io.CheckpointFormatError(f"{path}: format_version {meta.get('format_version')!r} is not "
                                                   f"the supported {FORMAT_VERSION}")
    if meta.get("task") != export.task:
        raise safetensors_io.CheckpointFormatError(f"{path}: task {meta.get('task')!r}, expected {export.task!r}")
    missing = [k for k in ("config", *_REPEATED, *export.own_entries) if k not in meta]
    if missing:
        raise safetensors_io.CheckpointFormatError(f"{path}: missing entries {missing}")
    index = src / "model_index.json"
    if index.exists():
        try:
            pipeline = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise safetensors_io.CheckpointFormatError(f"{index}: not a JSON object ({e})") from e
        if pipeline != export.pipeline_class:
            raise safetensors_io.CheckpointFormatError(f"{index}: _class_name {pipeline!r}, but {export.meta_file} "
                                                       f"is written beside {export.pipeline_class}")
    return meta


def _check_config_jsons(src, cfg: I2VConfig, export: TaskExport) -> None:
    """unet/, controlnet/ and motion_adapter/config.json must be what i2v.json's config implies."""
    base = base_config(cfg.unet)
    wanted = {"unet": torch_format("unet_motion").config_to_torch(base),
              "controlnet": torch_format("controlnet").config_to_torch(cfg.controlnet),
              "motion_adapter": motion_adapter_config(base)}
    problems = []
    for folder, want in wanted.items():
        have = {k: v for k, v in read_config(src / folder).items() if not k.startswith("_")}
        want = json.loads(json.dumps({k: v for k, v in want.items() if not k.startswith("_")}))
        problems += [f"{folder}/config.json {k}: {have.get(k, '<absent>')!r}, {export.meta_file}'s config implies "
                     f"{want.get(k, '<absent>')!r}" for k in sorted(set(have) | set(want))
                     if have.get(k, "<absent>") != want.get(k, "<absent>")]
    if problems:
        raise ConversionError(f"[{export.task}] {src} is inconsistent:" + key_list(problems))


def _check_motion_adapter(src, base, unet_base, task: str) -> None:
    """motion_adapter/ must hold exactly unet/'s motion modules (the pipeline runs unet/'s)."""
    folder = src / "motion_adapter"
    have = safetensors_io.read_state_dict(folder, WEIGHTS)
    want = motion_adapter_state(base, unet_base)
    missing = sorted(k for k in want if k not in have)
    unexpected = sorted(k for k in have if k not in want)
    misshaped = sorted(f"{k}: file has {tuple(np.shape(have[k]))}, expected {tuple(want[k].shape)}" for k in want
                       if k in have and tuple(np.shape(have[k])) != tuple(want[k].shape))
    if missing or unexpected or misshaped:
        raise ConversionError(mismatch_message(f"[{task}] {folder} does not match the config's motion modules:",
                                               missing, unexpected, misshaped))
    differ = sorted(k for k in want if not np.array_equal(np.asarray(have[k], np.float32), want[k]))
    if differ:
        raise ConversionError(f"[{task}] {folder} differs from unet/'s motion modules (the pipeline runs unet/'s) in:"
                              + key_list(differ))


def i2v_from_diffusers(src: str | os.PathLike, dtype=np.float32) -> tuple[I2VUNet, dict]:
    """Read a folder written by `i2v_to_diffusers` (either task) back into `(I2VUNet, params)`: the model from the
    meta file's config,
    the U-Net from unet/, the ControlNet from controlnet/, the resampler and the image projections from
    ip_adapter.safetensors (checked against unet/'s config.json, controlnet/'s and motion_adapter/'s, and
    motion_adapter/'s weights against unet/'s motion modules). Params are numpy arrays of `dtype` (a float32
    export reads back bit-exactly). The VAE and the CLIP towers are plain model folders (`convert.load_torch`)."""
    src = user_path(src)
    meta = read_i2v_meta(src)
    export = task_export(meta["task"])
    meta_path, task = src / export.meta_file, export.task
    try:
        cfg = I2VConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise ConfigError(f"{meta_path}: {e.within('config')}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{meta_path}: config: {e}") from e
    differ = [f"{k}: {meta[k]!r}, the config has {get(cfg)!r}" for k, get in _REPEATED.items() if meta[k] != get(cfg)]
    if differ:
        raise ConversionError(f"[{task}] {meta_path} contradicts its config:" + key_list(differ))
    if cfg.controlnet is None:
        raise ConversionError(f"[{task}] {meta_path}: the config has no ControlNet (use_controlnet=False)")
    _check_config_jsons(src, cfg, export)
    module = I2VUNet(cfg)
    abstract = get_model("i2v").abstract_params(module)
    part = lambda name: {p[1:]: a for p, a in abstract.items() if p[0] == name}
    unet_abstract = part("unet")
    base = base_config(cfg.unet)
    base_rules = unet_motion_rules(base)
    unet_base = torch_to_flax(safetensors_io.read_state_dict(src / "unet", WEIGHTS), base_rules,
                              {r.flax: unet_abstract[r.flax] for r in base_rules}, "i2v <- unet",
                              source=str(src / "unet"), dtype=np.float32)
    controlnet = torch_to_flax(safetensors_io.read_state_dict(src / "controlnet", WEIGHTS),
                               controlnet_rules(cfg.controlnet), part("controlnet"), "i2v <- controlnet",
                               source=str(src / "controlnet"), dtype=np.float32)
    _check_motion_adapter(src, base, unet_base, task)
    rcfg, resampler, unet = load_ip_adapter(src / IP_ADAPTER_FILE, cfg.unet, unet_base,
                                            dim_head=cfg.resampler.dim_head, abstract=unet_abstract)
    if rcfg != cfg.resampler:
        raise ConversionError(f"[{task}] {src / IP_ADAPTER_FILE}: its resampler is {rcfg}, {export.meta_file}'s "
                              f"config has {cfg.resampler}")
    params = {"unet": unet, "image_proj": resampler, "controlnet": controlnet}
    return module, jax.tree.map(lambda x: np.asarray(x, dtype=dtype), params)


__all__ = ["TASK_EXPORTS", "TaskExport", "i2v_from_diffusers", "i2v_to_diffusers", "image_processor_config",
           "model_index", "read_i2v_meta", "scheduler_config", "task_export", "text_max_length", "v2v_options"]
