"""MagicVideo-V2 image-to-video (PAPERS.md B.3, B.7): a reference image and a caption -> keyframes.

    magdiff-jax train --config configs/i2v.py:tiny --workdir /tmp/i2v_tiny [--config.init_from=DIR]
        CPU, the synthetic dataset (each clip's first and last frames, 32x32; the reference is the first frame),
        joint image/video training (2 one-frame videos from the same synthetic clips beside the 8 clips of every
        step), tiny models trained from scratch: every I2V parameter and the text encoder train (there is no
        pretrained U-Net to keep, and a random frozen text encoder mixes the captions into near-identical vectors).
        A random VAE decodes to noise: `magdiff-jax demo --system i2v` trains configs/vae.py:tiny first and passes
        it as init_from (subfolder `vae`). As MagDiff's tiny config, it predicts v and draws most timesteps at high
        noise, where only the caption says where the subject goes. Expected: after the default 600 steps (about 6
        minutes on 2 CPU cores) the demo's held-out keyframes keep the reference's colour and move the way their
        captions say (3 subjects x 4 motions: 12/12 for both; benchmarks/README.md, "The tiny I2V config").
        `:demo` is this config without previews.
    magdiff-jax train --config configs/i2v.py:base --workdir gs://bucket/i2v --config.init_from=out/i2v_init \\
        --config.data.source=folder --config.data.path=data/videos \\
        --config.image_data.source=images --config.image_data.path=data/images
        The paper's recipe with B.7's defaults: SD1.5 + an AnimateDiff motion adapter + IP-Adapter-Plus (16 tokens,
        lambda 1) + a ControlNet copied from the U-Net, 32 frames at 512 px (576: --config.data.resolution), epsilon
        MSE, images:videos 1:1 per step, the spatial layers frozen (task_options.train_spatial to train them at 5e-5),
        AdamW 1e-4 for the new modules, weight decay 0.01, full remat. init_from holds `unet` (kind i2v), `vae`,
        `text_encoder`, `image_encoder` and `tokenizer`, as written by
            magdiff-jax convert i2v-init --pipeline stable-diffusion-v1-5 --motion-adapter animatediff-motion-adapter \\
                --ip-adapter ip-adapter-plus_sd15.safetensors --image-encoder IP-Adapter/models/image_encoder \\
                --out out/i2v_init
"""

import os
import sys

import ml_collections

from magdiff_jax.data.pipeline import data_config
from magdiff_jax.train.trainer import base_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling config files
import magdiff


def tiny_models() -> ml_collections.ConfigDict:
    """MagDiff's tiny VAE, text and image encoders; the AnimateDiff U-Net of the same widths."""
    m = magdiff.tiny_models()
    return ml_collections.ConfigDict({
        "unet": {
            "unet": {"sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
                     "down_block_types": ("CrossAttnDownBlockMotion", "DownBlockMotion"),
                     "up_block_types": ("UpBlockMotion", "CrossAttnUpBlockMotion"), "num_attention_heads": 4,
                     "cross_attention_dim": 32, "norm_num_groups": 8, "motion_num_attention_heads": 4,
                     "motion_max_seq_length": 32},
            "resampler": {"dim": 32, "depth": 1, "dim_head": 8, "heads": 4, "num_queries": 4, "embedding_dim": 32,
                          "output_dim": 32, "ff_mult": 2},
            # one stride-2 step: the reference at twice the latent size (the tiny VAE's factor)
            "conditioning_embedding_out_channels": (16, 32),
        },
        "vae": m.vae.to_dict(),
        "text_encoder": m.text_encoder.to_dict(),
        "image_encoder": m.image_encoder.to_dict(),
    })


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "i2v"
    c.task_options.reference = "first"  # first | random: the clip's frame the reference is
    c.task_options.reference_dropout = 0.05  # the "no reference" input two-scale guidance needs
    c.task_options.image_layer = -2  # CLIP vision hidden state for the appearance tokens (penultimate)
    c.task_options.train_spatial = False
    c.data.caption_dropout = 0.05
    c.data.normalize = False  # uint8 from the loader; scaled on device
    # joint image/video training: `image_batch_size` one-frame videos per step from `image_data`
    c.image_data = data_config()
    c.image_data.normalize = False
    c.image_data.num_frames = 1
    c.image_batch_size = 0
    c.optim.update(lr=1e-4, weight_decay=0.01, warmup_steps=100, grad_clip=1.0)
    if arg in ("tiny", "demo"):
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 600, 8, 25, 300
        c.optim.update(lr=2e-3, warmup_steps=20)
        c.schedule.prediction_type = "v_prediction"  # as configs/magdiff.py:tiny (its docstring says why)
        c.schedule.timestep_bias = 16.0
        # no reference dropout (text-only guidance; two-scale guidance is refused on this model): with 10% dropped
        # references and 4 images per step the caption's direction was still unread at step 900 (benchmarks/README)
        c.task_options.reference_dropout = 0.0
        c.trainable = r"^(unet|text_encoder)/"  # from scratch: one group (`unet`) trains all that learns
        c.data.source = "synthetic"
        c.data.synthetic.update(num=96, num_frames=4, size=32, shape_size=0.5, travel=0.2, independent_start=True)
        c.data.num_frames, c.data.stride, c.data.resolution = 2, 3, (32, 32)
        c.data.tokenizer, c.data.max_length = "synthetic", 16
        c.image_data.source = "synthetic"
        c.image_data.synthetic = c.data.synthetic.copy_and_resolve_references()
        c.image_data.resolution = c.data.resolution
        c.image_data.seed = 1
        c.image_batch_size = 2  # images:videos 1:4
        c.preview.update(every=300, num=3, num_steps=20, guidance=3.0)
        c.model = tiny_models()
        c.compiler_options = "xla_backend_optimization_level=1"  # as configs/magdiff.py:tiny
        if arg == "demo":
            c.preview.every = 0
    elif arg == "base":
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 100000, 32, 50, 1000
        c.mesh.update(data=1, fsdp=-1)
        c.data.source = "folder"
        c.data.num_frames, c.data.stride, c.data.resolution = 32, 2, (512, 512)
        c.data.worker_count = 8
        c.data.tokenizer, c.data.max_length = "init_from", 77
        c.image_data.source = "images"
        c.image_data.resolution = c.data.resolution
        c.image_data.worker_count = 4
        c.image_data.caption_dropout = 0.05
        c.image_batch_size = 32  # images:videos 1:1 per step (PAPERS.md B.7)
        c.init_from = ""  # set to the folder of `magdiff-jax convert i2v-init`
        c.model = ml_collections.ConfigDict({"unet": {"unet": {"remat_policy": "full"}}, "vae": {},
                                             "text_encoder": {}, "image_encoder": {}})
        # the task's groups (motion, controlnet, appearance), each with its own optimizer over `optim`
        c.groups = ml_collections.ConfigDict({
            "motion": {"optim": {"lr": 1e-4}},
            "controlnet": {"optim": {"lr": 1e-4}},
            "appearance": {"optim": {"lr": 1e-4}},
        })
        c.preview.update(every=1000, num=4, num_steps=25, guidance=7.5)
    else:
        raise ValueError(f"configs/i2v.py: variant must be tiny, demo or base, got {arg!r}")
    return c
