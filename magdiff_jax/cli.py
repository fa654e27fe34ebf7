"""`magdiff-jax`: the one command-line entry point.

    magdiff-jax convert to-flax --kind unet2d path/to/torch/unet  out/unet_flax
    magdiff-jax convert to-torch --kind unet2d out/unet_flax      out/unet_torch
    magdiff-jax convert to-flax --kind pipeline path/to/sd-pipeline out/sd_flax
    magdiff-jax convert to-flax --kind vgg16 vgg16-397923af.pth out/vgg16_flax   (torchvision's file, one file)
    magdiff-jax convert to-torch --kind magdiff out/magdiff_flax out/magdiff_torch   (unet/ + ip_adapter + pyramid)
    magdiff-jax convert to-torch --kind i2v runs/i2v/export out/i2v_diffusers    (AnimateDiffControlNetPipeline)
    magdiff-jax convert to-torch --kind v2v runs/v2v/export out/v2v_diffusers (AnimateDiffVideoToVideo...Pipeline)
    magdiff-jax convert magdiff-init --pipeline sd21-base --temporal modelscope/unet --image-encoder vit-h \
        --out out/magdiff_init                                         (configs/magdiff.py:base's init_from)
    magdiff-jax convert i2v-init --pipeline sd15 --motion-adapter mm_sd_v15_v2.ckpt --ip-adapter ip-plus_sd15.bin \
        --image-encoder vit-h --out out/i2v_init                         (configs/i2v.py:base's init_from)
    magdiff-jax data synth --out data/synth --num 72
    magdiff-jax data build --builder ucf101 --manual-dir ~/UCF101 --out data/tfds
    magdiff-jax data inspect data/synth
    magdiff-jax data encode --data data/synth --pipeline out/sd_flax --out data/synth_latents
    magdiff-jax train --config configs/t2i.py:tiny --workdir /tmp/t2i --config.steps=100
    magdiff-jax export --workdir /tmp/t2i --out out/t2i_stage         (every model the stage's inference needs)
    magdiff-jax demo --workdir magdiff_demo                          (MagDiff end to end on the synthetic data)
    magdiff-jax sample --workdir DIR --subject dog.png --mask dog_mask.png --prompt "a dog runs" --out dog.mp4
    magdiff-jax edit --workdir DIR --video in.mp4 --masks masks/ --prompt "..." --out out.mp4 [--strength 0.8]

Runs under `absl.app` (Grain and the ml_collections config flags need parsed absl flags): argparse takes the
subcommand and its arguments, everything it does not know (`--config.lr=...`) goes to absl. Every path argument
may be local or a cloud URI (gs://...; `magdiff_jax.utils.files`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config: configs/X.py:VARIANT", lock_config=True)


def _kinds() -> tuple[str, ...]:
    """The registered models with a PyTorch form: a single-folder table, or MagDiff's multi-file folder."""
    from magdiff_jax.convert.core import torch_formats

    return tuple(sorted({*torch_formats(), "magdiff"}))


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert checkpoints between PyTorch (diffusers/transformers) and Flax",
                       description="Convert model checkpoints between PyTorch safetensors folders "
                                   "(diffusers/transformers layout) and magdiff_jax Flax checkpoints.")
    csub = p.add_subparsers(dest="direction", required=True, metavar="{to-flax,to-torch,magdiff-init,i2v-init}")
    kinds = (*_kinds(), "pipeline")
    tf = csub.add_parser("to-flax", help="PyTorch model folder -> Orbax checkpoint + config.json",
                         description="Read a diffusers/transformers model folder (config.json + safetensors, single "
                                     "or sharded) and write DST: an Orbax checkpoint of the params plus our config. "
                                     "--kind pipeline converts a whole diffusers pipeline folder (model_index.json) "
                                     "into DST/<component>.")
    tf.add_argument("--kind", required=True, choices=kinds)
    tf.add_argument("src", help="PyTorch model folder (or pipeline folder with --kind pipeline; one weights file "
                                "with --kind edsc, vgg16, i3d, c3d or dino_vit)")
    tf.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite)")
    tf.add_argument("--overwrite", action="store_true")
    tf.add_argument("--motion-adapter", default=None, metavar="ADAPTER",
                    help="with --kind unet_motion: SRC is an SD U-Net folder (UNet2DConditionModel) and ADAPTER an "
                         "AnimateDiff motion adapter (a MotionAdapter folder, or one .safetensors/.ckpt file in "
                         "diffusers' or the original AnimateDiff layout); builds UNetMotionModel.from_unet2d of them")
    tt = csub.add_parser("to-torch", help="Flax checkpoint -> PyTorch model folder (from_pretrained-ready)",
                         description="Read a folder written by `convert to-flax` (or the trainer's export) and "
                                     "write a diffusers/transformers folder that from_pretrained loads.")
    tt.add_argument("--kind", required=True, choices=(*_kinds(), "i2v", "v2v"))
    tt.add_argument("src", help="Flax checkpoint folder (config.json + params/); with --kind i2v / v2v an I2V / V2V "
                                "stage export or training workdir, written as a diffusers AnimateDiffControlNetPipeline"
                                " / AnimateDiffVideoToVideoControlNetPipeline folder")
    tt.add_argument("dst", help="output PyTorch model folder (must not exist or be empty, unless --overwrite)")
    tt.add_argument("--max-shard-mb", type=int, default=None, help="shard the safetensors above this size")
    tt.add_argument("--overwrite", action="store_true", help="replace a non-empty DST whole (none of its files "
                                                             "are kept)")
    tt.add_argument("--motion-adapter-layout", default=None, choices=("diffusers", "original"),
                    help="with --kind unet_motion: write only the motion modules, as a MotionAdapter folder "
                         "(diffusers) or as one .safetensors file DST with the original AnimateDiff keys (original)")
    mi = csub.add_parser("magdiff-init", help="a MagDiff init_from folder from an SD2.1 pipeline (+ temporal layers)",
                         description="Build the init_from folder of configs/magdiff.py:base: the U-Net (a UNet2D "
                                     "inflated, its temporal layers from --temporal or fresh; or a unet3d) widened "
                                     "for the entity input with entity attention, a fresh resampler and pyramid, "
                                     "plus the VAE, text and image encoders, tokenizer and scheduler. Sources may be "
                                     "PyTorch or Flax folders.")
    mi.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    mi.add_argument("--pipeline", default=None, help="an SD pipeline folder (diffusers, or `convert to-flax --kind "
                                                     "pipeline` output): unet, vae, text_encoder, tokenizer")
    mi.add_argument("--unet", default=None, help="UNet2D or UNet3D folder (default: PIPELINE/unet)")
    mi.add_argument("--temporal", default=None, help="a UNet3D (ModelScope) folder whose temporal layers are used")
    mi.add_argument("--vae", default=None, help="default: PIPELINE/vae")
    mi.add_argument("--text-encoder", default=None, help="default: PIPELINE/text_encoder")
    mi.add_argument("--image-encoder", required=True, help="CLIP vision folder (OpenCLIP ViT-H/14 for SD2.1)")
    mi.add_argument("--pyramid", default="multi", choices=("multi", "single"))
    mi.add_argument("--seed", type=int, default=0, help="initialises the resampler, pyramid and fresh layers")
    mi.add_argument("--overwrite", action="store_true")
    ii = csub.add_parser("i2v-init", help="a MagicVideo-V2 I2V init_from folder from SD1.5 + AnimateDiff + IP-Adapter",
                         description="Build the init_from folder of configs/i2v.py:base: the SD U-Net with an "
                                     "AnimateDiff motion adapter, image attention and resampler from an "
                                     "IP-Adapter-Plus file (or copies of to_k/to_v and a fresh resampler), a "
                                     "ControlNet (given, or copied from the U-Net with zero convs), plus the VAE, "
                                     "text and image encoders, tokenizer and scheduler. Model sources may be PyTorch "
                                     "or Flax folders (the U-Net: diffusers).")
    ii.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    ii.add_argument("--pipeline", default=None, help="an SD1.5 pipeline folder: unet, vae, text_encoder, tokenizer")
    ii.add_argument("--unet", default=None, help="UNet2DConditionModel folder (default: PIPELINE/unet)")
    ii.add_argument("--vae", default=None, help="default: PIPELINE/vae")
    ii.add_argument("--text-encoder", default=None, help="default: PIPELINE/text_encoder")
    ii.add_argument("--tokenizer", default=None, help="default: PIPELINE/tokenizer")
    ii.add_argument("--motion-adapter", required=True, help="AnimateDiff motion adapter: a MotionAdapter folder, or "
                                                            "one .safetensors/.ckpt file (diffusers' or the original "
                                                            "layout)")
    ii.add_argument("--ip-adapter", default=None, help="IP-Adapter-Plus file (.safetensors or .bin); without it "
                                                       "to_k_ip/to_v_ip copy to_k/to_v and the resampler is fresh")
    ii.add_argument("--image-encoder", required=True, help="CLIP vision folder (IP-Adapter's ViT-H/14 for SD1.5)")
    ii.add_argument("--controlnet", default=None, help="a ControlNetModel folder that fits the U-Net (default: a "
                                                       "copy of the U-Net's encoder with zero convs)")
    ii.add_argument("--resampler", default=None, metavar="JSON",
                    help='resampler fields as JSON, e.g. \'{"num_queries": 16}\' (over IP-Adapter-Plus SD1.5\'s; with '
                         "--ip-adapter only dim_head)")
    ii.add_argument("--conditioning-embedding-out-channels", default=None, metavar="C0,C1,...",
                    help="the fresh ControlNet's condition encoder widths (default 16,32,96,256: 8x, the SD VAE's)")
    ii.add_argument("--seed", type=int, default=0, help="initialises the fresh resampler and condition encoder")
    ii.add_argument("--overwrite", action="store_true")


BUILDER_NAMES = ("video_caption", "image_caption", "ucf101", "msrvtt", "davis", "vimeo90k")


def _add_data(sub):
    p = sub.add_parser("data", help="datasets: synthesize, build (TFDS), inspect, pre-encode",
                       description="Dataset tools.")
    dsub = p.add_subparsers(dest="action", required=True, metavar="{synth,build,index,inspect,encode}")
    sy = dsub.add_parser("synth", help="write the synthetic dataset (coloured shapes moving over textures)",
                         description="Write N synthetic clips (mp4 + per-frame masks + captions.csv) to OUT in the "
                                     "video-caption folder layout; deterministic from --seed.")
    sy.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    sy.add_argument("--num", type=int, default=72, help="number of clips (72 covers every shape/colour/motion)")
    sy.add_argument("--frames", type=int, default=16)
    sy.add_argument("--size", type=int, default=64, help="frame height and width (even)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--overwrite", action="store_true")
    bu = dsub.add_parser("build", help="build a TFDS dataset (array_record) from a local folder",
                         description="Build a TFDS dataset (array_record, no TensorFlow) from MANUAL_DIR laid out as "
                                     "the official archive unpacks (or a video/image-caption folder). Bad files are "
                                     "skipped and listed in OUT/bad_inputs.json; too many stop the build. An "
                                     "existing build in OUT is reused only if it was built from the same "
                                     "MANUAL_DIR with the same settings (OUT/<builder>/<version>/build.json).")
    bu.add_argument("--builder", required=True, choices=BUILDER_NAMES)
    bu.add_argument("--manual-dir", required=True, help="the unpacked dataset")
    bu.add_argument("--out", required=True, help="TFDS data dir to write")
    bu.add_argument("--max-bad-fraction", type=float, default=0.01,
                    help="stop when more than this fraction of the inputs is bad (default 0.01)")
    bu.add_argument("--overwrite", action="store_true",
                    help="rebuild an existing dataset in OUT (replaced once the new one is complete)")
    ix = dsub.add_parser("index", help="store the size of every video of a folder dataset (for bucketing)",
                         description="Probe every file a video/image-caption folder names once and write "
                                     "DIR/sizes.csv (media,num_frames,height,width): data.buckets then reads the "
                                     "sizes from it on every host instead of probing each video. DIR may be a "
                                     "gs:// URI.")
    ix.add_argument("dir", help="dataset folder (captions.csv / captions.jsonl)")
    ix.add_argument("--workers", type=int, default=8, help="files probed at once")
    ins = dsub.add_parser("inspect", help="counts, shapes and a contact sheet of a dataset folder",
                          description="Print what a dataset folder holds (video-caption or image-caption folder, "
                                      "TFDS build, or encoded latents) and write a contact-sheet PNG of sample "
                                      "clips with their captions.")
    ins.add_argument("dir", help="dataset folder")
    ins.add_argument("--num", type=int, default=8, help="clips to sample")
    ins.add_argument("--out", default=None, help="contact sheet path (default DIR/contact_sheet.png)")
    ins.add_argument("--seed", type=int, default=0)
    en = dsub.add_parser("encode", help="pre-encode VAE latents and text embeddings (array_record)",
                         description="Run the frozen VAE and text encoder over a dataset once and write latents and "
                                     "text embeddings as array_record shards (one per process), so training can "
                                     "skip the frozen encoders (data.source='encoded').")
    from magdiff_jax.data.encode import add_encode_arguments

    add_encode_arguments(en)


def _add_train(sub):
    p = sub.add_parser("train", help="train a stage from a config file (resumes in an existing workdir)",
                       description="Train with an ml_collections config: --config configs/X.py:VARIANT "
                                   "[--config.key=value ...]. A run in an existing workdir resumes from its last "
                                   "checkpoint; SIGTERM/SIGINT save and exit 0.")
    p.add_argument("--workdir", required=True, help="checkpoints/, metrics.jsonl, config.json, bad_inputs.json")
    ex = sub.add_parser("export", help="a trained stage's export: every model its inference needs",
                        description="Write DIR: every model the workdir's stage needs for inference (frozen ones "
                                    "included, from the workdir itself, never from init_from), its tokenizer and "
                                    "scheduler. Training writes WORKDIR/export at its last step; this writes one "
                                    "from any checkpoint.")
    ex.add_argument("--workdir", required=True, help="a training workdir")
    ex.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ex.add_argument("--no-ema", action="store_true", help="the trained parameters rather than their EMA")
    ex.add_argument("--overwrite", action="store_true")


def _add_generation(sub):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", required=True, help="a MagDiff stage: a training workdir (its latest checkpoint) "
                                                         "or an export (WORKDIR/export, `magdiff-jax export`)")
    common.add_argument("--prompt", required=True)
    common.add_argument("--out", required=True, help="output .mp4 (with --num N: OUT_0.mp4 ... OUT_<N-1>.mp4)")
    common.add_argument("--seed", type=int, default=42)
    common.add_argument("--num-steps", type=int, default=50, help="DDIM steps (eta 0)")
    common.add_argument("--guidance", type=float, default=7.5, help="text guidance scale")
    common.add_argument("--image-guidance", type=float, default=None,
                        help="two-scale guidance: the image scale (default: text-only guidance, the subject kept in "
                             "both passes); refused for a model trained without subject dropout")
    common.add_argument("--negative-prompt", default="",
                        help="the unconditional text of guidance (default \"\": the caption dropout's; the paper's "
                             "evaluator may use \"watermark\")")
    common.add_argument("--correlation", choices=("iid", "mixed", "progressive"), default="iid",
                        help="initial frame noise: independent (the paper's default), or PYoCo mixed / progressive")
    common.add_argument("--alpha", type=float, default=0.0, help="PYoCo correlation strength (>= 0)")
    common.add_argument("--fps", type=int, default=8)
    sa = sub.add_parser("sample", parents=[common], help="MagDiff generation: subject image + prompt -> video")
    sa.add_argument("--subject", required=True, help="subject image (PNG/JPEG/WebP/BMP)")
    sa.add_argument("--mask", default=None, help="subject mask (PNG, non-zero inside; default: the whole image)")
    sa.add_argument("--num", type=int, default=1, help="videos, with seeds seed .. seed+num-1 (one batch)")
    ed = sub.add_parser("edit", parents=[common], help="MagDiff editing: video + masks of the region to keep")
    ed.add_argument("--video", required=True, help="source video (mp4, webm, mov or a frame folder; all of it is "
                                                   "decoded, before the model loads, and its first frames edited)")
    ed.add_argument("--masks", required=True, help="per-frame masks: a folder of PNGs or a mask video")
    ed.add_argument("--strength", type=float, default=1.0,
                    help="< 1: start from the source's DDIM inversion this far along (structure kept)")
    iv = sub.add_parser("i2v", help="MagicVideo-V2 image-to-video: reference image + prompt -> keyframes",
                        description="Keyframes from an I2V stage export (or training workdir): the reference image "
                                    "conditions the appearance encoder and the ControlNet, and the latent noise "
                                    "prior starts from it.")
    iv.add_argument("--export", required=True, help="an I2V stage: its export or a training workdir")
    iv.add_argument("--image", required=True, help="reference image (PNG/JPEG/WebP/BMP)")
    iv.add_argument("--prompt", required=True)
    iv.add_argument("--out", required=True, help="output .mp4 (with --num N: OUT_0.mp4 ... OUT_<N-1>.mp4)")
    iv.add_argument("--frames", type=int, default=None, help="keyframes (default: the stage's training frames)")
    iv.add_argument("--num", type=int, default=1, help="videos, with seeds seed .. seed+num-1 (one batch)")
    iv.add_argument("--seed", type=int, default=42)
    iv.add_argument("--sampler", choices=("ddim", "dpm", "euler"), default="ddim",
                    help="DDIM (eta 0), DPM-Solver++ 2M or Euler")
    iv.add_argument("--num-steps", type=int, default=25)
    iv.add_argument("--guidance", type=float, default=7.5, help="text guidance scale")
    iv.add_argument("--image-guidance", type=float, default=None,
                    help="two-scale guidance: the image scale (default: text-only guidance, the reference kept in "
                         "both passes)")
    iv.add_argument("--prior", choices=("diffused", "mean_shift", "frame_init", "none"), default="diffused",
                    help="latent noise prior: the forward-diffused reference (--strength), a mean shift toward it "
                         "(--gamma), ConsistI2V's FrameInit (--cutoff), or plain noise")
    iv.add_argument("--strength", type=float, default=None, help="diffused prior: how far along the reference is "
                                                                 "noised (1: from pure noise at the last timestep)")
    iv.add_argument("--gamma", type=float, default=None, help="mean-shift prior: the reference latent's weight")
    iv.add_argument("--cutoff", type=float, default=None, help="FrameInit: the low-pass cutoff (spatial and "
                                                               "temporal)")
    iv.add_argument("--correlation", choices=("iid", "mixed", "progressive"), default=None,
                    help="frame noise: independent, or PYoCo mixed / progressive")
    iv.add_argument("--alpha", type=float, default=None, help="PYoCo correlation strength")
    iv.add_argument("--fps", type=int, default=8)
    vv = sub.add_parser("v2v", help="MagicVideo-V2 video-to-video: low-res video + reference image + prompt -> "
                                    "high-res video",
                        description="Super-resolves a video with a V2V stage export (or training workdir): the video "
                                    "is upsampled (bicubic), encoded, noised to --strength and denoised "
                                    "(SDEdit; or fed at every step to a stage trained with concat input), "
                                    "conditioned on the reference image and the prompt. Frames larger than the "
                                    "stage's training size are denoised in overlapping tiles.")
    vv.add_argument("--export", required=True, help="a V2V stage: its export or a training workdir")
    vv.add_argument("--video", required=True, help="input video (mp4, webm, mov or a frame folder)")
    vv.add_argument("--image", required=True, help="reference image (the text-to-image stage's; PNG/JPEG/WebP/BMP)")
    vv.add_argument("--prompt", required=True)
    vv.add_argument("--out", required=True, help="output .mp4")
    vv.add_argument("--scale", type=int, default=None, help="upsampling factor (default: the stage's)")
    vv.add_argument("--strength", type=float, default=None,
                    help="SDEdit strength: how far along the upsampled video is noised (default: the stage's)")
    vv.add_argument("--seed", type=int, default=42)
    vv.add_argument("--sampler", choices=("ddim", "dpm", "euler"), default="ddim")
    vv.add_argument("--num-steps", type=int, default=25, help="steps of the full schedule (strength runs a part)")
    vv.add_argument("--guidance", type=float, default=7.5, help="text guidance scale")
    vv.add_argument("--vae-frames", type=int, default=0, help="frames the VAE encodes / decodes at once (0: all)")
    vv.add_argument("--fps", type=int, default=None, help="output fps (default: the input's, else 8)")
    fi = sub.add_parser("interpolate", help="MagicVideo-V2 frame interpolation: factor - 1 frames between each pair",
                        description="Inserts factor - 1 frames between each pair of neighbouring frames with a VFI "
                                    "stage export (or training workdir): 32 frames -> 94 at factor 3. Frames larger "
                                    "than --tile pixels are interpolated in overlapping tiles.")
    fi.add_argument("--export", required=True, help="a VFI stage: its export or a training workdir")
    fi.add_argument("--video", required=True, help="input video (mp4, webm, mov or a frame folder)")
    fi.add_argument("--out", required=True, help="output .mp4")
    fi.add_argument("--factor", type=int, default=3, help="output frames per input frame interval")
    fi.add_argument("--tile", type=int, default=512, help="tile size in pixels for large frames")
    fi.add_argument("--overlap", type=int, default=64, help="pixels neighbouring tiles share")
    fi.add_argument("--pairs-per-call", type=int, default=8, help="frame pairs interpolated per compiled call")
    fi.add_argument("--fps", type=float, default=None,
                    help="output fps (default: the input's x factor, so the clip keeps its duration)")
    mv = sub.add_parser("magicvideo", help="MagicVideo-V2 end to end: prompt -> reference image -> keyframes -> "
                                           "high-res video -> interpolated video",
                        description="Runs the four stages (T2I, I2V, V2V, VFI), each loaded from its export when its "
                                    "turn comes, after checking that they chain. Writes reference.png, "
                                    "keyframes.mp4, hires.mp4, final.mp4 and summary.json to --out as each stage "
                                    "finishes (one file per prompt with several prompts); a rerun skips the stages "
                                    "whose outputs exist for the same settings.")
    mv.add_argument("--stages", required=True,
                    help="a folder holding t2i/ i2v/ v2v/ vfi/ (exports or training workdirs), or a JSON file "
                         '{"t2i": path, "i2v": ..., "v2v": ..., "vfi": ...} (paths relative to the file)')
    mv.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    mv.add_argument("--prompts", default=None, help="a text file of prompts, one per line")
    mv.add_argument("--out", required=True, help="output folder")
    mv.add_argument("--seed", type=int, default=42, help="the first prompt's seed (the next: seed + 1, ...)")
    mv.add_argument("--frames", type=int, default=None, help="keyframes (default: the I2V stage's training frames)")
    mv.add_argument("--steps", default="25", help="denoising steps: one number, or three for t2i,i2v,v2v")
    mv.add_argument("--guidance", default="7.5", help="text guidance: one scale, or three for t2i,i2v,v2v")
    mv.add_argument("--t2i-size", default=None, help="reference image size HxW (default: the T2I stage's)")
    mv.add_argument("--scale", type=int, default=None, help="V2V upsampling factor (default: the stage's)")
    mv.add_argument("--strength", type=float, default=None, help="V2V SDEdit strength (default: the stage's)")
    mv.add_argument("--vae-frames", type=int, default=0,
                    help="frames V2V's VAE encodes / decodes at once (0: the stage's setting, else all)")
    mv.add_argument("--factor", type=int, default=3, help="VFI: output frames per keyframe interval (32 -> 94 at 3)")
    mv.add_argument("--tile", type=int, default=512, help="VFI tile size in pixels for large frames")
    mv.add_argument("--overlap", type=int, default=64, help="VFI: pixels neighbouring tiles share")
    mv.add_argument("--sampler", choices=("ddim", "dpm", "euler"), default="ddim")
    mv.add_argument("--fps", type=int, default=8, help="keyframe fps (the final video: fps x factor)")
    mv.add_argument("--force", action="store_true", help="run every stage even when its outputs exist")
    de = sub.add_parser("demo", help="MagDiff end to end on the synthetic dataset (about 6 minutes on 2 CPU cores)",
                        description="Trains the tiny VAE and configs/magdiff.py:demo (tiny, without previews) on "
                                    "synthetic clips, then "
                                    "generates from held-out subjects and edits a held-out clip; writes mp4s, a "
                                    "contact sheet, a loss plot and summary.json to the workdir. --config.key=value "
                                    "overrides apply to the MagDiff config.")
    de.add_argument("--workdir", default=None, help="default: magdiff_demo (<system>_demo with another --system)")
    de.add_argument("--system", choices=("magdiff", "i2v", "v2v", "vfi", "magicvideo"), default="magdiff",
                    help="magdiff: the MagDiff demo; i2v: MagicVideo-V2's image-to-video stage alone (the tiny VAE, "
                         "then configs/i2v.py:demo, scored on held-out subjects and captions); v2v: its "
                         "super-resolution stage alone (the tiny VAE, then configs/v2v.py:demo, scored against "
                         "bicubic upsampling on held-out clips); vfi: its frame interpolation stage alone "
                         "(configs/vfi.py:demo, scored against blending the neighbours); magicvideo: MagicVideo-V2 end "
                         "to end (the tiny VAE and the four tiny stages, then `magdiff-jax magicvideo` on held-out "
                         "captions, each stage scored)")


def _add_eval(sub):
    p = sub.add_parser("eval", help="scores of generated videos: FVD, IS, CLIP and DINO scores (folders of videos)",
                       description="Evaluate folders of generated videos. Videos are read one at a time and their "
                                   "features cached in --cache as they are extracted, so an interrupted evaluation "
                                   "resumes and the real videos' statistics are computed once. Writes OUT "
                                   "(report.json, report.md, scores.png with several stepped sets), or OUT.json "
                                   "and OUT.md beside it when OUT ends in .json.")
    esub = p.add_subparsers(dest="action", required=True, metavar="{fvd,is,clip,suite}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--fake", required=True, action="append", metavar="[LABEL=]DIR",
                        help="a folder of generated videos (.mp4/.gif/.npy, any depth); repeat for several sets, "
                             "e.g. --fake step_1000=out1000 --fake step_2000=out2000 (a label ending in a number "
                             "is a training step: the report plots each score against it)")
    common.add_argument("--out", required=True, help="report folder, or a .json path")
    common.add_argument("--cache", default=None, help="feature cache folder (default OUT/cache)")
    common.add_argument("--num-videos", type=int, default=None,
                        help="videos a side instead of the protocol's 2048 (the protocol is then renamed "
                             "<name>_n<N> in the report, never passed off as the standard one)")
    common.add_argument("--batch-size", type=int, default=8)
    common.add_argument("--allow-fewer", action="store_true",
                        help="score folders with fewer videos than the protocol needs (a warning; the report "
                             "records the real counts) instead of stopping")
    common.add_argument("--skip-bad", action="store_true",
                        help="skip (and list in the report) videos that cannot be decoded or are too short, "
                             "instead of stopping at the first")
    fv = esub.add_parser("fvd", parents=[common], help="Frechet Video Distance with the Kinetics-400 I3D",
                         description="FVD of each --fake folder against --real (StyleGAN-V's protocols: clips from "
                                     "each video's first frame, 224 px, [-1, 1], the I3D's 400 logits).")
    fv.add_argument("--i3d", required=True, help="the I3D: pytorch-i3d's i3d_pretrained_400.pt (or .safetensors), "
                                                 "or a folder `convert to-flax --kind i3d` wrote")
    fv.add_argument("--real", required=True, help="a folder of real videos")
    fv.add_argument("--protocol", default="fvd2048_16f",
                    choices=("fvd2048_16f", "fvd2048_128f", "fvd2048_128f_subsample8f"))
    iv = esub.add_parser("is", parents=[common], help="Inception Score with the UCF-101 C3D",
                         description="Video Inception Score of each --fake folder (StyleGAN-V's isv2048_ucf: the "
                                     "first 16 frames of 2048 videos, the C3D's class probabilities, 10 splits).")
    iv.add_argument("--c3d", required=True, help="the C3D: a .safetensors / .pth in the PyTorch layout "
                                                 "(convert/c3d.py), or a folder `convert to-flax --kind c3d` wrote")
    iv.add_argument("--splits", type=int, default=10)
    cl = esub.add_parser("clip", parents=[common], help="CLIPSIM, text alignment, frame consistency, CLIP-I, DINO",
                         description="CLIP scores of each --fake folder: CLIPSIM and MagDiff's text alignment (x100) "
                                     "against each video's prompt, frame consistency (x100, consecutive frames), "
                                     "and with --subjects CLIP-I (and DINO with --dino) against each video's "
                                     "subject image; the mean and spread over videos.")
    cl.add_argument("--clip", required=True, help="a transformers CLIPModel folder (config.json, model.safetensors "
                                                  "and its tokenizer files, e.g. openai/clip-vit-base-patch32), "
                                                  "or one with text_encoder/, image_encoder/ and tokenizer/")
    cl.add_argument("--prompts", default=None,
                    help="JSON {video name relative to its folder: prompt} (default: FAKE/prompts.json where it "
                         "exists; without prompts only the image scores are computed)")
    cl.add_argument("--subjects", default=None,
                    help="a folder of subject images named as the videos (class_a/v0.mp4 -> class_a/v0.png)")
    cl.add_argument("--dino", default=None, help="DINO ViT weights (timm / official .pth or .safetensors, or a "
                                                 "folder `convert to-flax --kind dino_vit` wrote); needs --subjects")
    cl.add_argument("--num-frames", type=int, default=None, help="score the first frames only")
    _add_eval_suite(esub)


def _add_eval_suite(esub):
    su = esub.add_parser("suite", help="generate samples from exports and score them under a named suite",
                         description="Generate --num-videos samples from each --export on a benchmark's real data "
                                     "and score them (magdiff_jax/eval/suite.py states each suite's protocol): "
                                     "ucf101 FVD (--i3d) + IS (--c3d), msrvtt FVD, davis text alignment + frame "
                                     "consistency (--clip, --edit-prompts), vimeo PSNR / SSIM (+ LPIPS with --vgg). "
                                     "Samples go to OUT/samples/<label>/ as they are made; a rerun skips those that "
                                     "exist. Writes OUT/report.json, report.md and scores.png (several exports).")
    su.add_argument("--export", required=True, action="append", metavar="[LABEL=]DIR",
                    help="a stage export or training workdir; repeat for several checkpoints (default label "
                         "step_<its step>: the report plots each score against it)")
    su.add_argument("--suite", required=True, choices=("davis", "msrvtt", "ucf101", "vimeo"))
    su.add_argument("--data", required=True, help="the dataset unpacked in its official layout (what `data build "
                                                  "--manual-dir` reads), or a video-caption folder (`data synth`)")
    su.add_argument("--num-videos", type=int, required=True, help="samples per export (and real clips for FVD)")
    su.add_argument("--out", required=True, help="output folder (samples/, real/, cache/, the report)")
    su.add_argument("--i3d", default=None, help="the I3D for FVD (as `eval fvd --i3d`)")
    su.add_argument("--c3d", default=None, help="the C3D for IS (as `eval is --c3d`)")
    su.add_argument("--clip", default=None, help="davis: a CLIP model folder (as `eval clip --clip`)")
    su.add_argument("--vgg", default=None, help="vimeo: LPIPS weights (a folder `convert to-flax --kind lpips` "
                                                "wrote)")
    su.add_argument("--edit-prompts", default=None, help="davis: JSON {clip key or sequence name: edit prompt}")
    su.add_argument("--prompt-template", default=None,
                    help="ucf101: the prompt of a class name, e.g. 'a video of {}' (the default on UCF-101; '{}' on "
                         "a video-caption folder)")
    su.add_argument("--seed", type=int, default=0, help="sample i is drawn with seed + i")
    su.add_argument("--steps", type=int, default=50, help="DDIM steps")
    su.add_argument("--guidance", type=float, default=7.5)
    su.add_argument("--strength", type=float, default=1.0, help="davis: 1 edits from noise, < 1 from the inversion")
    su.add_argument("--batch-size", type=int, default=4, help="samples generated per batch (split over devices)")
    su.add_argument("--feature-batch-size", type=int, default=8)
    su.add_argument("--fvd-protocol", default="fvd2048_16f",
                    choices=("fvd2048_16f", "fvd2048_128f", "fvd2048_128f_subsample8f"))
    su.add_argument("--splits", type=int, default=10, help="IS splits")
    su.add_argument("--cache", default=None, help="feature cache folder (default OUT/cache)")
    su.add_argument("--allow-fewer", action="store_true",
                    help="evaluate on fewer real clips than --num-videos (a warning; the report records the count)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magdiff-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_data(sub)
    _add_train(sub)
    _add_generation(sub)
    _add_eval(sub)
    return parser


class UsageError(ValueError):
    """A command line that cannot be run (an unknown config key, a bad value, a config file that fails)."""


def parse_flags(argv: list[str]) -> argparse.Namespace:
    args, rest = build_parser().parse_known_args(argv[1:])
    given = any(a == "--config" or a.startswith("--config=") for a in rest)
    if args.command == "demo" and args.system != "magicvideo" and not given:
        from magdiff_jax.demo import CONFIGS

        name = args.system
        rest = [f"--config={CONFIGS / (name + '.py')}:demo", *rest]
    try:
        flags.FLAGS([argv[0], *rest])
    except (flags.Error, ValueError, AttributeError, KeyError, TypeError) as e:
        raise UsageError(_flag_error(e, rest)) from None
    if FLAGS.config is not None:
        try:
            _ = FLAGS.config.get  # a config file that failed to load reports it on the first access
        except OSError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise UsageError(f"--config: {lines[-1] if lines else e}") from None
    return args


def _flag_error(error: BaseException, rest: list[str]) -> str:
    """One line for an error raised while the config flags are parsed: ml_collections and absl wrap the cause (an
    unknown key, a value of the wrong type, an exception of the config file) in tracebacks of their own."""
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    if isinstance(root, (AttributeError, KeyError)):  # an override of a key the config does not have
        key = str(root).strip("\"' ")
        given = [a.split("=", 1)[0] for a in rest if a.startswith("--config.")]
        arg = next((a for a in given if key in a[len("--config."):].split(".")), None)
        return f"unknown config key {arg or key} (the config file defines every key a run may set)"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if message.startswith("flag --") and "Traceback" not in message and "whilst parsing" not in message:
        return message
    first = (str(root).strip().splitlines() or [type(root).__name__])[0]
    return f"{first}" if isinstance(root, ValueError) else f"{type(root).__name__}: {first}"


def _convert(args) -> None:
    from magdiff_jax.convert import load_torch, save_torch
    from magdiff_jax.export import load_model, save_model
    from magdiff_jax.utils.files import as_path

    if args.direction == "magdiff-init":
        from magdiff_jax.convert.magdiff_init import build_magdiff_init

        build_magdiff_init(args.out, pipeline=args.pipeline, unet=args.unet, temporal=args.temporal, vae=args.vae,
                           text_encoder=args.text_encoder, image_encoder=args.image_encoder, pyramid=args.pyramid,
                           seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return
    if args.direction == "i2v-init":
        import json

        from magdiff_jax.convert.i2v_init import build_i2v_init

        resampler = channels = None
        if args.resampler:
            try:
                resampler = json.loads(args.resampler)
            except json.JSONDecodeError as e:
                raise ValueError(f"--resampler: not valid JSON ({e})") from e
            if not isinstance(resampler, dict):
                raise ValueError(f"--resampler must be a JSON object of resampler fields, e.g. '{{\"num_queries\": "
                                 f"16}}', got {args.resampler!r}")
        if args.conditioning_embedding_out_channels:
            try:
                channels = tuple(int(c) for c in args.conditioning_embedding_out_channels.split(","))
            except ValueError:
                raise ValueError("--conditioning-embedding-out-channels: expected comma-separated integers, got "
                                 f"{args.conditioning_embedding_out_channels!r}") from None
        build_i2v_init(args.out, pipeline=args.pipeline, unet=args.unet, vae=args.vae, text_encoder=args.text_encoder,
                       tokenizer=args.tokenizer, motion_adapter=args.motion_adapter, ip_adapter=args.ip_adapter,
                       image_encoder=args.image_encoder, controlnet=args.controlnet, resampler_config=resampler,
                       conditioning_embedding_out_channels=channels, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return
    motion = getattr(args, "motion_adapter", None) or getattr(args, "motion_adapter_layout", None)
    if motion and args.kind != "unet_motion":
        raise ValueError(f"--motion-adapter{'-layout' if args.direction == 'to-torch' else ''} needs --kind "
                         f"unet_motion, not {args.kind}")
    if args.direction == "to-flax":
        if args.motion_adapter:
            from magdiff_jax.convert.unet_motion import load_motion_adapter

            module, params = load_motion_adapter(args.src, args.motion_adapter)
            logging.info("wrote %s", save_model(args.kind, module, params, args.dst, overwrite=args.overwrite))
        elif args.kind == "pipeline":
            from magdiff_jax.convert.pipeline import load_pipeline_torch

            pipe = load_pipeline_torch(args.src)
            for name, (kind, module, params) in pipe.models.items():
                out = save_model(kind, module, params, as_path(args.dst) / name, overwrite=args.overwrite)
                logging.info("wrote %s (%s)", out, kind)
            pipe.save_extras(args.dst)
        else:
            if args.kind == "magdiff":  # a multi-file folder (convert.magdiff)
                from magdiff_jax.convert.magdiff import magdiff_from_torch

                module, params = magdiff_from_torch(args.src)
            else:
                module, params = load_torch(args.kind, args.src)
            out = save_model(args.kind, module, params, args.dst, overwrite=args.overwrite)
            logging.info("wrote %s", out)
    elif args.kind in ("i2v", "v2v"):  # a whole stage (convert.i2v)
        from magdiff_jax.convert.i2v import i2v_to_diffusers
        from magdiff_jax.export.stage import load_stage

        max_bytes = args.max_shard_mb * 2**20 if args.max_shard_mb else None
        out = i2v_to_diffusers(load_stage(args.src), args.dst, overwrite=args.overwrite, max_shard_bytes=max_bytes,
                               task=args.kind)
        logging.info("wrote %s", out)
    else:
        _, module, params = load_model(args.src, kind=args.kind)
        max_bytes = args.max_shard_mb * 2**20 if args.max_shard_mb else None
        if args.motion_adapter_layout:
            from magdiff_jax.convert.unet_motion import motion_adapter_to_torch

            out = motion_adapter_to_torch(module.config, params, args.dst, layout=args.motion_adapter_layout,
                                          overwrite=args.overwrite)
        elif args.kind == "magdiff":
            from magdiff_jax.convert.magdiff import magdiff_to_torch

            out = magdiff_to_torch(module, params, args.dst, max_shard_bytes=max_bytes, overwrite=args.overwrite)
        else:
            out = save_torch(args.kind, module, params, args.dst, max_shard_bytes=max_bytes, overwrite=args.overwrite)
        logging.info("wrote %s", out)
    print(f"wrote {args.dst}")


def _data(args) -> None:
    if args.action == "synth":
        from magdiff_jax.data.synthetic import SyntheticConfig, write_synthetic

        config = SyntheticConfig(num_frames=args.frames, size=args.size, seed=args.seed)
        out = write_synthetic(args.out, args.num, config, overwrite=args.overwrite)
        print(f"wrote {args.num} clips to {out}")
    elif args.action == "build":
        from magdiff_jax.data.builders import build

        out = build(args.builder, args.manual_dir, args.out, max_bad_fraction=args.max_bad_fraction,
                    overwrite=args.overwrite)
        print(f"built {args.builder} in {out}")
    elif args.action == "index":
        from magdiff_jax.data.sources import write_size_index

        path, count, failed = write_size_index(args.dir, workers=args.workers)
        for media, reason in failed[:5]:
            logging.warning("not indexed: %s: %s", media, reason)
        print(f"wrote the sizes of {count} files to {path}" + (f" ({len(failed)} could not be read)" if failed
                                                                else ""))
    elif args.action == "inspect":
        from magdiff_jax.data.summary import format_summary, inspect_dataset

        print(format_summary(inspect_dataset(args.dir, out=args.out, num=args.num, seed=args.seed)))
    else:
        from magdiff_jax.data.encode import run_encode_cli

        print(f"wrote encoded dataset to {run_encode_cli(args)}")


def _export(args) -> None:
    from magdiff_jax.export import export_workdir

    out = export_workdir(args.workdir, args.out, step=args.step, use_ema=not args.no_ema, overwrite=args.overwrite)
    print(f"wrote {out}")


def _train(args) -> None:
    from magdiff_jax.train.trainer import train

    if FLAGS.config is None:
        raise ValueError("train needs --config configs/X.py:VARIANT")
    last = train(FLAGS.config, args.workdir)
    print(f"trained to step {last.get('step')} in {args.workdir}: loss {last.get('loss')}")


def _local_input(path: str, stack) -> str:
    """A local copy of an input file or folder in an object store (the video and image readers read local files),
    removed when `stack` closes; a local path as given."""
    import tempfile

    from magdiff_jax.utils.files import as_path, copy_tree, is_remote

    if not is_remote(path):
        return path
    src = as_path(path)
    if src.is_dir():
        local = stack.enter_context(tempfile.TemporaryDirectory(prefix="magdiff-input-"))
        copy_tree(src, local)
        return local
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    local = stack.enter_context(tempfile.TemporaryDirectory(prefix="magdiff-input-"))
    target = as_path(local) / src.name
    target.write_bytes(src.read_bytes())
    return str(target)


def _generate(args) -> None:
    import contextlib

    with contextlib.ExitStack() as stack:
        for name in ("subject", "mask", "video", "masks"):
            if getattr(args, name, None):
                setattr(args, name, _local_input(getattr(args, name), stack))
        _generate_local_inputs(args)


def _generate_local_inputs(args) -> None:
    import time

    from magdiff_jax.data.video_io import write_video
    from magdiff_jax.export.stage import read_stage_config
    from magdiff_jax.pipelines.magdiff import MagDiffPipeline, check_image_guidance, read_edit_source, read_subject
    from magdiff_jax.utils.files import user_path

    # the inputs and settings first: an unreadable image or video, or a setting the stage cannot take, is one error
    # naming it, before a model is loaded
    if args.command == "sample":
        image, mask = read_subject(args.subject, args.mask)
    else:  # as many frames as the model makes (the stage's config says how many, no model loaded yet)
        frames, masks = read_edit_source(args.video, args.masks, int(read_stage_config(args.workdir).data.num_frames))
    if args.image_guidance is not None:
        check_image_guidance(read_stage_config(args.workdir), args.image_guidance, args.workdir)
    pipe = MagDiffPipeline.load(args.workdir)
    f = pipe.num_frames
    if args.command == "sample":
        ex = pipe.example(image[None], None if mask is None else mask[None], args.prompt, mode="first")
        examples, seeds = [ex] * args.num, [args.seed + k for k in range(args.num)]
        extra = {}
    else:
        ex = pipe.example(frames, masks, args.prompt, mode="all")
        examples, seeds, extra = [ex], [args.seed], {"strength": args.strength}
    logging.info("%s: %d video(s) of %d frames, %d DDIM steps (compiling first)", args.command, len(examples), f,
                 args.num_steps)
    t0 = time.perf_counter()
    videos = pipe(examples, seeds, num_steps=args.num_steps, guidance=args.guidance,
                  image_guidance=args.image_guidance, negative_prompt=args.negative_prompt,
                  noise=(args.correlation, args.alpha), progress=True, **extra)
    out = user_path(args.out)
    paths = [out] if len(videos) == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(len(videos))]
    for path, video in zip(paths, videos):
        write_video(path, video, fps=args.fps)
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - t0:.1f} s")


def _i2v(args) -> None:
    import contextlib
    import time

    from magdiff_jax.data.video_io import read_image, write_video
    from magdiff_jax.diffusion.noise_prior import NoisePriorConfig
    from magdiff_jax.pipelines.i2v import I2VPipeline
    from magdiff_jax.utils.files import user_path

    settings = {"kind": args.prior, **{k: getattr(args, k) for k in ("strength", "gamma", "correlation", "alpha")
                                       if getattr(args, k) is not None}}
    if args.cutoff is not None:
        settings.update(cutoff_spatial=args.cutoff, cutoff_temporal=args.cutoff)
    prior = NoisePriorConfig(**settings)  # a bad value fails here, before a model loads
    with contextlib.ExitStack() as stack:
        image = read_image(_local_input(args.image, stack))
    pipe = I2VPipeline.load(args.export)
    seeds = [args.seed + k for k in range(args.num)]
    logging.info("i2v: %d video(s), %s, %d steps, prior %s (compiling first)", args.num, args.sampler,
                 args.num_steps, args.prior)
    t0 = time.perf_counter()
    videos = pipe([image] * args.num, [args.prompt] * args.num, seeds, num_frames=args.frames,
                  num_steps=args.num_steps, guidance=args.guidance, image_guidance=args.image_guidance,
                  sampler=args.sampler, prior=prior, progress=True)
    out = user_path(args.out)
    paths = [out] if len(videos) == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(len(videos))]
    for path, video in zip(paths, videos):
        write_video(path, video, fps=args.fps)
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - t0:.1f} s")


def _v2v(args) -> None:
    import contextlib
    import time

    from magdiff_jax.data.video_io import probe, read_frames, read_image, write_video
    from magdiff_jax.pipelines.v2v import V2VPipeline
    from magdiff_jax.utils.files import user_path

    with contextlib.ExitStack() as stack:  # every input read before the model loads
        image = read_image(_local_input(args.image, stack))
        source = _local_input(args.video, stack)
        fps = args.fps or probe(source).fps or 8
        video = read_frames(source)
    pipe = V2VPipeline.load(args.export)
    logging.info("v2v: %d frames of %dx%d, x%s, %s, %d steps (compiling first)", *video.shape[:3],
                 args.scale or pipe.config.task_options.get("scale", 2), args.sampler, args.num_steps)
    t0 = time.perf_counter()
    out_video = pipe(video[None], [image], [args.prompt], [args.seed], scale=args.scale, strength=args.strength,
                     num_steps=args.num_steps, guidance=args.guidance, sampler=args.sampler,
                     frames_per_call=args.vae_frames, progress=True)[0]
    out = user_path(args.out)
    write_video(out, out_video, fps=round(fps))
    print(f"wrote {out} ({out_video.shape[0]} frames of {out_video.shape[1]}x{out_video.shape[2]}) in "
          f"{time.perf_counter() - t0:.1f} s")


def _interpolate(args) -> None:
    import contextlib
    import time

    from magdiff_jax.data.video_io import probe, read_frames, write_video
    from magdiff_jax.pipelines.vfi import VFIPipeline
    from magdiff_jax.utils.files import user_path

    with contextlib.ExitStack() as stack:  # the input read before the model loads
        source = _local_input(args.video, stack)
        src_fps = probe(source).fps or 8
        video = read_frames(source)
    pipe = VFIPipeline.load(args.export, tile=args.tile, overlap=args.overlap, pairs_per_call=args.pairs_per_call)
    t0 = time.perf_counter()
    out_video = pipe(video[None], factor=args.factor)[0]
    fps = round(args.fps or src_fps * args.factor)
    out = user_path(args.out)
    write_video(out, out_video, fps=fps)
    print(f"wrote {out}: {video.shape[0]} -> {out_video.shape[0]} frames of {out_video.shape[1]}x"
          f"{out_video.shape[2]} at {fps} fps in {time.perf_counter() - t0:.1f} s")


def _per_stage(value: str, what: str, cast) -> tuple:
    """'25' -> (25, 25, 25); '20,25,10' -> (20, 25, 10): the t2i, i2v and v2v values of a --steps/--guidance."""
    parts = [p.strip() for p in str(value).split(",")]
    try:
        values = tuple(cast(p) for p in parts)
    except ValueError:
        raise ValueError(f"--{what} {value!r}: expected a number or three comma-separated numbers") from None
    if len(values) not in (1, 3):
        raise ValueError(f"--{what} {value!r}: one value for every diffusion stage or three (t2i,i2v,v2v)")
    return values * 3 if len(values) == 1 else values


def _magicvideo(args) -> None:
    import time

    from magdiff_jax.pipelines.magicvideo import MagicVideoPipeline, MagicVideoSettings
    from magdiff_jax.utils.files import as_path

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += [line.strip() for line in as_path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt (or --prompts FILE)")
    steps = _per_stage(args.steps, "steps", int)
    guidance = _per_stage(args.guidance, "guidance", float)
    size = None
    if args.t2i_size:
        try:
            size = tuple(int(v) for v in args.t2i_size.lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != 2:
            raise ValueError(f"--t2i-size {args.t2i_size!r}: expected HxW, e.g. 512x512")
    settings = MagicVideoSettings(
        t2i_steps=steps[0], i2v_steps=steps[1], v2v_steps=steps[2], t2i_guidance=guidance[0],
        i2v_guidance=guidance[1], v2v_guidance=guidance[2], t2i_size=size, frames=args.frames, scale=args.scale,
        strength=args.strength, vae_frames=args.vae_frames, factor=args.factor, tile=args.tile, overlap=args.overlap,
        sampler=args.sampler, fps=args.fps)
    pipe = MagicVideoPipeline.load(args.stages, settings)  # the stages checked against each other, nothing loaded
    t0 = time.perf_counter()
    result = pipe.run(prompts, args.out, seeds=[args.seed + k for k in range(len(prompts))], force=args.force)
    stages = result.summary["stages"]
    timing = ", ".join(f"{name} " + ("skipped" if st["skipped"] else f"{st['seconds']:.1f} s")
                       for name, st in stages.items())
    print(f"wrote {args.out}: final video {'x'.join(map(str, result.final.shape[1:4]))} per prompt "
          f"({timing}; {time.perf_counter() - t0:.1f} s in all); see summary.json")


def _demo(args) -> None:
    if args.system == "magicvideo":
        from magdiff_jax.demo import run_magicvideo_demo

        workdir = args.workdir or "magicvideo_demo"
        s = run_magicvideo_demo(workdir)
        print(f"magicvideo demo done in {workdir} ({s['wall_seconds'] / 60:.1f} min): reference colour right in "
              f"{s['t2i']['reference_colour_accuracy']:.0%} (chance 17%), keyframe motion right in "
              f"{s['i2v']['keyframe_motion_accuracy']:.0%} (chance 25%), V2V {s['v2v']['psnr_gain']:+.2f} dB over "
              f"bicubic, VFI {s['vfi']['psnr_gain']:+.2f} dB over blending; see contact_sheet.png, videos/, "
              "summary.json")
        return
    if args.system == "vfi":
        from magdiff_jax.demo import run_vfi_demo

        summary = run_vfi_demo(args.workdir or "vfi_demo", FLAGS.config)
        print(f"vfi demo done in {args.workdir or 'vfi_demo'}: PSNR of the in-between frames "
              f"{summary['psnr_vfi']:.2f} dB (blending the neighbours {summary['psnr_blend']:.2f} dB, gain "
              f"{summary['psnr_gain']:+.2f} dB); see summary.json")
        return
    if args.system == "v2v":
        from magdiff_jax.demo import run_v2v_demo

        summary = run_v2v_demo(args.workdir or "v2v_demo", FLAGS.config)
        print(f"v2v demo done in {args.workdir or 'v2v_demo'}: PSNR to the high-resolution truth "
              f"{summary['psnr_v2v']:.2f} dB (bicubic {summary['psnr_bicubic']:.2f} dB, gain "
              f"{summary['psnr_gain']:+.2f} dB); see summary.json")
        return
    if args.system == "i2v":
        from magdiff_jax.demo import run_i2v_demo

        summary = run_i2v_demo(args.workdir or "i2v_demo", FLAGS.config)
        print(f"i2v demo done in {args.workdir or 'i2v_demo'}: reference colour kept in "
              f"{summary['colour_accuracy']:.0%} of keyframe videos (chance {summary['chance']:.0%}), motion right in "
              f"{summary['motion_accuracy']:.0%} (chance {summary['motion_chance']:.0%}); see summary.json")
        return
    from magdiff_jax.demo import run_demo

    args.workdir = args.workdir or "magdiff_demo"
    summary = run_demo(args.workdir, FLAGS.config)
    print(f"demo done in {args.workdir}: subject colour right in {summary['colour_accuracy']:.0%} of generations "
          f"(chance {summary['chance']:.0%}; p {summary['colour_p_value']:.2g}), motion right in "
          f"{summary['motion_accuracy']:.0%} (chance {summary['motion_chance']:.0%}; p "
          f"{summary['motion_p_value']:.2g}); see contact_sheet.png, generated_*.mp4, edited.mp4, loss.png")


def _eval(args) -> None:
    if args.action == "suite":
        return _eval_suite(args)
    import dataclasses

    from magdiff_jax.eval import report as report_lib
    from magdiff_jax.eval import runner

    fakes = report_lib.labelled_folders(args.fake, "--fake")
    out = str(args.out)
    cache = args.cache or (f"{out[:-5]}_cache" if out.endswith(".json") else f"{out.rstrip('/')}/cache")
    options = dict(cache=cache, batch_size=args.batch_size, allow_fewer=args.allow_fewer, skip_bad=args.skip_bad)
    if args.action == "fvd":
        from magdiff_jax.eval.fvd import I3DFeatures, get_protocol

        protocol = get_protocol(args.protocol)
        if args.num_videos:
            protocol = dataclasses.replace(protocol, name=f"{protocol.name}_n{args.num_videos}",
                                           num_videos=args.num_videos)
        rows = runner.evaluate_fvd(I3DFeatures.from_torch(args.i3d), args.real, fakes, protocol, **options)
        scores, title = ("fvd",), f"FVD ({protocol.name})"
    elif args.action == "clip":
        rows, scores, title = _eval_clip(args, fakes, cache), runner.CLIP_SCORES, "CLIP and DINO scores"
    else:
        protocol = runner.ISProtocol(num_splits=args.splits)
        if args.num_videos:
            protocol = dataclasses.replace(protocol, name=f"{protocol.name}_n{args.num_videos}",
                                           num_videos=args.num_videos)
        c3d = runner.C3DProbabilities(*runner.load_feature_network(args.c3d, "c3d"))
        rows = runner.evaluate_is(c3d, fakes, protocol, **options)
        scores, title = ("is",), f"IS ({protocol.name})"
    report_lib.write_report(out, rows, scores, meta={"title": title, "command": f"eval {args.action}"})
    for row in rows:
        values = ", ".join(f"{s} {row[s]:.4g}" for s in scores if s in row)
        print(f"{row['label']}: {values} on {row['num_videos']} videos"
              + ("" if row.get("complete", True) else " (fewer than the protocol needs)"))
    print(f"wrote {out}")


def _eval_clip(args, fakes: dict, cache: str) -> list:
    from magdiff_jax.eval import runner
    from magdiff_jax.eval.clip_scores import DINOEmbedder
    from magdiff_jax.utils.files import user_path

    if args.dino and not args.subjects:
        raise ValueError("--dino scores generated videos against subject images: give --subjects too")
    clip, tokenizer = runner.load_clip(args.clip, batch_size=args.batch_size)
    dino = DINOEmbedder(*runner.load_feature_network(args.dino, "dino_vit"), batch_size=args.batch_size) \
        if args.dino else None
    prompts = {}
    for label, folder in fakes.items():
        path = args.prompts or (user_path(folder) / "prompts.json")
        if args.prompts or user_path(path).exists():
            prompts[label] = runner.read_prompts(path)
    subjects = {label: args.subjects for label in fakes} if args.subjects else None
    return runner.evaluate_clip(clip, tokenizer, fakes, prompts, subjects, dino, cache=cache,
                                skip_bad=args.skip_bad, num_frames=args.num_frames, max_videos=args.num_videos)
def _eval_suite(args) -> None:
    from magdiff_jax.eval import runner
    from magdiff_jax.eval.suite import export_labels, run_suite
    from magdiff_jax.pipelines import load_pipeline

    nets = runner.load_networks(i3d=args.i3d, c3d=args.c3d, clip=args.clip, vgg=args.vgg)
    report = run_suite(args.suite, export_labels(args.export), args.data, args.out, load_pipeline=load_pipeline,
                       num_videos=args.num_videos,
                       seed=args.seed, num_steps=args.steps, guidance=args.guidance, strength=args.strength,
                       batch_size=args.batch_size, feature_batch_size=args.feature_batch_size,
                       fvd_protocol=args.fvd_protocol, is_splits=args.splits, prompt_template=args.prompt_template,
                       edit_prompts=args.edit_prompts, allow_fewer=args.allow_fewer, cache=args.cache, **nets)
    if report is None:
        return
    for row in report["rows"]:
        scores = ", ".join(f"{s} {row[s]:.4g}" for s in report["scores"] if s in row)
        print(f"{row['label']}: {scores} on {row['num_videos']} videos")
    print(f"wrote {args.out}")


COMMANDS = {"convert": _convert, "data": _data, "train": _train, "export": _export, "sample": _generate,
            "edit": _generate, "i2v": _i2v, "v2v": _v2v,
            "interpolate": _interpolate, "magicvideo": _magicvideo,
            "demo": _demo, "eval": _eval}


def setup_logging() -> None:
    """INFO and above to stderr; on processes other than 0 of a multi-process job, WARNING and above only (from
    `distributed.initialize` on, when the process index is known: `distributed.MainProcessInfo`)."""
    from magdiff_jax import distributed

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO lines
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, distributed.MainProcessInfo) for f in handler.filters):
            handler.addFilter(distributed.MainProcessInfo())


def main(args: argparse.Namespace) -> None:
    setup_logging()
    COMMANDS[args.command](args)
    from magdiff_jax import distributed

    distributed.exit_multiprocess(0)  # one process of several: past a teardown that can hang (see there)


def run() -> None:
    """Console-script entry point. It first sets the process up for CPU runs (`magdiff_jax.cpu.setup_process`: XLA's
    CPU convolutions on Eigen, a restart with the malloc tunables that keep XLA's CPU buffers mapped from step to
    step, CPU programs on the calling thread, the CPU kernels)."""
    from magdiff_jax import cpu

    cpu.setup_process()
    try:
        app.run(main, flags_parser=parse_flags)
    except (ValueError, OSError, FloatingPointError) as e:  # expected failures: one clear line, exit 1
        print(f"magdiff-jax: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
