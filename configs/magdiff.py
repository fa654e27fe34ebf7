"""MagDiff (PAPERS.md part A): subject image(s) + text -> video, and video editing, with one model.

    magdiff-jax train --config configs/magdiff.py:tiny --workdir /tmp/magdiff_tiny [--config.init_from=DIR]
        CPU, the synthetic dataset (each clip's first and last frames, 32x32; the subject from its masks: first
        frame 80%, all frames 15%, none 5%), tiny models trained from scratch: every MagDiff U-Net parameter and the
        text encoder train (there is no pretrained U-Net to keep, and a random frozen text encoder mixes the
        captions into near-identical vectors). A random VAE decodes to noise, so start from a trained one:
        `magdiff-jax demo` trains configs/vae.py:tiny first and passes it as init_from (subfolder `vae`). Training
        timesteps are drawn towards high noise (`schedule.timestep_bias` 16: density ~ (t/T)^16), where alone the
        caption's direction is needed (at lower noise the noisy last frame shows where the subject went). Expected:
        after the default 600 steps (about 4-5 minutes on 2 CPU cores) the demo's held-out generations have the
        subject's colour and move the way their captions say (3 subjects x 4 motions x 3 seeds: 100% for training
        seeds 0, 1 and 2 before the paper's image layer and CLIP and pyramid inputs became the defaults; with them,
        `magdiff-jax demo` measured colour 12/12 and motion 11/12 on one seed; benchmarks/README.md, "The tiny
        MagDiff config", has the measurements behind these settings). Dropout is off here (below). samples/ shows
        generations from the first batch's subjects and captions. `:demo` is this config without previews
        (`magdiff-jax demo`'s own).
    magdiff-jax train --config configs/magdiff.py:base --workdir gs://bucket/magdiff \\
        --config.init_from=out/magdiff_init \\
        --config.data.source=folder --config.data.path=data/pexels --config.data.masks=true
        The paper's setting: 256x256, 16 frames, SD2.1-base U-Net inflated with ModelScope temporal layers, OpenCLIP
        ViT-H/14 text and image towers, the paper code's trainable subset, AdamW 5e-5, weight decay 0.01, 100 warmup
        steps, clipping 1.0, batch 64, full remat; image tokens from the CLIP vision transformer's last hidden state
        before post_layernorm, the CLIP subject loaded at 448 and resized to 224, the pyramid's 384/320/256 px
        subjects cut from the source frames, dropout on in training, and 5% of clips without a subject (so
        `--image-guidance` has a trained "no subject" input). init_from holds `unet` (kind magdiff), `vae`,
        `text_encoder`, `image_encoder` and `tokenizer` folders, as written by
            magdiff-jax convert magdiff-init --pipeline stable-diffusion-2-1-base \\
                --temporal text-to-video-ms-1.7b/unet --image-encoder IP-Adapter/models/image_encoder \\
                --out out/magdiff_init
"""

import os
import sys

import ml_collections

from magdiff_jax.train.tasks.magdiff import TRAINABLE
from magdiff_jax.train.trainer import base_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling config files
import t2i


def tiny_models() -> ml_collections.ConfigDict:
    m = t2i.tiny_models()
    return ml_collections.ConfigDict({
        "unet": {
            "unet": {"sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
                     "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
                     "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"), "attention_head_dim": 8,
                     "cross_attention_dim": 32, "norm_num_groups": 8},
            "resampler": {"dim": 32, "depth": 1, "dim_head": 8, "heads": 4, "num_queries": 4, "embedding_dim": 32,
                          "output_dim": 32, "ff_mult": 2},
            "pyramid": "multi", "pyramid_channels": 16,
        },
        "vae": m.vae.to_dict(),
        "text_encoder": m.text_encoder.to_dict(),
        "image_encoder": {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    })


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "magdiff"
    # CLIP vision hidden state for the image tokens: the last layer's, before post_layernorm (PAPERS.md A.2)
    c.task_options.image_layer = -1
    c.task_options.dropout = True  # the U-Net's dropout live in training, as the paper's code and diffusers
    c.data.masks = True
    c.data.subject.enabled = True
    c.data.caption_dropout = 0.15
    c.data.normalize = False  # uint8 from the loader; scaled on device
    c.optim.update(lr=5e-5, weight_decay=0.01, warmup_steps=100, grad_clip=1.0)
    if arg in ("tiny", "demo"):
        # two frames per clip: the first and last show the whole motion
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 600, 8, 25, 300
        c.optim.update(lr=2e-3, warmup_steps=20)
        # v-prediction: at high noise its target is mostly the clean latent, so a few hundred steps already learn
        # where the subject goes and its colour (epsilon's loss hardly weighs the clean latent there)
        c.schedule.prediction_type = "v_prediction"
        # most timesteps where the subject's direction is not in the noisy frames (docstring)
        c.schedule.timestep_bias = 16.0
        c.trainable = r"^(unet|text_encoder)/"  # from scratch: the whole MagDiff U-Net and the text encoder
        # no dropout in this short run: with the temporal convs' dropout (0.1) live, the demo's 600 steps moved 7 of
        # 12 held-out subjects the caption's way, against 11 of 12 without (colour 12/12 both; one training seed)
        c.task_options.dropout = False
        c.data.source = "synthetic"
        # the clip's first and last frames show its whole path (6.4 px, 3.2 latent px); every subject starts where
        # it could go any way, so only the caption tells the direction (the demo asks each held-out subject for all
        # four)
        c.data.synthetic.update(num=96, num_frames=4, size=32, shape_size=0.5, travel=0.2, independent_start=True)
        c.data.num_frames, c.data.stride, c.data.resolution = 2, 3, (32, 32)
        # the paper's rule at the tiny sizes: pyramid 1.5/1.25/1x the video, CLIP loaded at 2x clip_size
        c.data.subject.update(sizes=(48, 40, 32), clip_size=32, clip_load_size=64)
        c.data.subject.probs.update(none=0.05, first=0.8, all=0.15)
        c.data.tokenizer, c.data.max_length = "synthetic", 16
        c.preview.update(every=300, num=3, num_steps=20, guidance=3.0)
        c.model = tiny_models()
        # XLA's optimisation level 1: as fast a step as the default level 2, a shorter compile
        c.compiler_options = "xla_backend_optimization_level=1"
        if arg == "demo":  # `magdiff-jax demo`: its held-out generations and contact sheet stand in for previews
            c.preview.every = 0
    elif arg == "base":
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 30000, 64, 50, 1000
        c.trainable = TRAINABLE  # the paper code's subset (the task's default, spelled out)
        c.mesh.update(data=1, fsdp=-1)
        c.data.source = "folder"
        c.data.num_frames, c.data.resolution = 16, (256, 256)
        c.data.worker_count = 8
        c.data.tokenizer, c.data.max_length = "init_from", 77  # init_from/tokenizer (copied by magdiff-init)
        # subject dropout, so that two-scale guidance (`--image-guidance`) has a trained "no subject" input: 5% of
        # clips without a subject (the InstructPix2Pix recipe, PAPERS.md A.8/A.9), the rest first frame / all frames
        # 0.8 / 0.2 (A.12)
        c.data.subject.probs.update(none=0.05, first=0.76, all=0.19)
        c.init_from = ""  # set to the folder of `magdiff-jax convert magdiff-init`
        c.model = ml_collections.ConfigDict({"unet": {"unet": {"remat_policy": "full"}}, "vae": {},
                                             "text_encoder": {}, "image_encoder": {}})
        c.preview.update(every=1000, num=4, num_steps=50, guidance=7.5)
    else:
        raise ValueError(f"configs/magdiff.py: variant must be tiny, demo or base, got {arg!r}")
    return c
