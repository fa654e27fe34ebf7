"""MagicVideo-V2 video-to-video super-resolution (PAPERS.md B.4, B.7): low-resolution keyframes + the reference image
+ a caption -> the video at a higher resolution.

    magdiff-jax train --config configs/v2v.py:tiny --workdir /tmp/v2v_tiny [--config.init_from=DIR]
        CPU, the synthetic dataset at 64x64 with its 2x box-downsampled 32x32 clips (the data pipeline's `vsr`
        task), 2 frames per clip, the reference a high-resolution frame of the clip; configs/i2v.py's tiny
        denoiser, trained from scratch (every U-Net parameter: there is no I2V stage to start from here), v
        prediction. Unlike base it reads the upsampled clip's latent at every step (concat input: the tiny model
        learns the mapping in minutes, which SDEdit input alone did not), trains timesteps below 250 and samples at
        strength 0.2, and decodes residually (the bicubic input + D(z) - D(E(input))): the tiny VAE reconstructs
        these 64 px clips at about 25 dB PSNR, below bicubic upsampling's 32.5, so a plain decode could not come
        near the input's own fidelity (benchmarks/README.md, "The tiny V2V config"). A random VAE decodes to noise:
        `magdiff-jax demo --system v2v` trains the tiny VAE first and passes it as init_from (subfolder `vae`), then
        scores held-out clips against bicubic upsampling (PSNR to the high-resolution truth, summary.json).
    magdiff-jax train --config configs/v2v.py:base --workdir gs://bucket/v2v --config.init_from=runs/i2v/export \\
        --config.data.source=folder --config.data.path=data/hires_videos
        B.4 / B.7: the I2V stage's export as init_from (its U-Net, spatial layers, appearance encoder and ControlNet,
        VAE and encoders), its motion modules fine-tuned on 1024 px clips of 32 frames (the low-res input 512 px:
        `data.vsr.scale` 2) with the ControlNet and appearance encoder; SDEdit input at strength 0.5, so the
        timesteps trained stop at 600; full remat, the VAE encoding 4 frames at a time. Concat input instead:
        --config.task_options.low_res_input=concat --config.model.unet.unet.in_channels=8 (the input convolutions
        then train too).
"""

import os
import sys

import ml_collections

from magdiff_jax.train.trainer import base_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling config files
import i2v


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "v2v"
    c.task_options.low_res_input = "sdedit"  # sdedit | concat (then model.unet.unet.in_channels = 2 x latent)
    c.task_options.strength = 0.5  # the SDEdit strength the stage samples at (recorded with the export)
    c.task_options.max_timestep = 600  # training timesteps below this: an SDEdit run at 0.5 starts at t = 500
    c.task_options.scale = 2  # the upsampling factor the stage is trained for (= data.vsr.scale)
    c.task_options.reference = "first"
    c.task_options.reference_dropout = 0.0
    c.task_options.image_layer = -2
    c.task_options.train_spatial = False
    c.data.task = "vsr"
    c.data.vsr.scale = 2
    c.data.normalize = False
    c.data.caption_dropout = 0.05
    c.optim.update(lr=1e-4, weight_decay=0.01, warmup_steps=100, grad_clip=1.0)
    if arg in ("tiny", "demo"):
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 500, 4, 25, 500
        c.task_options.low_res_input = "concat"
        c.task_options.max_timestep, c.task_options.strength = 250, 0.2
        c.task_options.residual_decode = True
        c.optim.update(lr=2e-3, warmup_steps=20)
        c.schedule.prediction_type = "v_prediction"
        c.trainable = r"^unet/"  # from scratch: one group (`unet`)
        c.data.source = "synthetic"
        c.data.synthetic.update(num=96, num_frames=4, size=64, shape_size=0.5, travel=0.2, independent_start=True)
        c.data.num_frames, c.data.stride, c.data.resolution = 2, 3, (64, 64)
        c.data.tokenizer, c.data.max_length = "synthetic", 16
        c.preview.update(every=500, num=2, num_steps=10, guidance=1.0)
        c.model = i2v.tiny_models()
        c.model.unet.unet.update(sample_size=32, in_channels=8)  # noisy + upsampled latents (concat input)
        c.compiler_options = "xla_backend_optimization_level=1"  # as configs/magdiff.py:tiny
        if arg == "demo":
            c.preview.every = 0
    elif arg == "base":
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 50000, 16, 50, 1000
        c.mesh.update(data=1, fsdp=-1)
        c.data.source = "folder"
        c.data.num_frames, c.data.stride, c.data.resolution = 32, 2, (1024, 1024)
        c.data.worker_count = 8
        c.data.tokenizer, c.data.max_length = "init_from", 77
        c.init_from = ""  # set to the I2V stage's export
        c.model = ml_collections.ConfigDict({"unet": {"unet": {"remat_policy": "full", "sample_size": 128}},
                                             "vae": {}, "text_encoder": {}, "image_encoder": {}})
        c.groups = ml_collections.ConfigDict({
            "motion": {"optim": {"lr": 1e-4}},
            "controlnet": {"optim": {"lr": 5e-5}},
            "appearance": {"optim": {"lr": 5e-5}},
        })
        c.task_options.vae_frames_per_call = 4
        c.preview.update(every=1000, num=2, num_steps=25, guidance=7.5)
    else:
        raise ValueError(f"configs/v2v.py: variant must be tiny, demo or base, got {arg!r}")
    return c
