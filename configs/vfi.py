"""MagicVideo-V2 frame interpolation (PAPERS.md B.5, B.7): EDSC with the time input, trained as a GAN's generator.

    magdiff-jax train --config configs/vfi.py:tiny --workdir /tmp/vfi_tiny
        CPU, the synthetic dataset at 32x32: 4-frame windows, frames 0 and 3 given, frames 1 and 2 (t = 1/3 and
        2/3) the targets, as 32 -> 94 frames needs. A small EDSC (3 levels of 16/32/32 channels) from scratch with
        the parameter-free bilateral motion prior (`models/motion_prior.py`, B.5's lightweight model): its heads
        learn residual motion and occlusion (without it the net learnt no motion in a CPU budget and stayed below
        blending: benchmarks/README.md, "The tiny VFI config"). Charbonnier loss + 0.05 x LPIPS on a small random
        VGG16 (no pretrained weights on a fresh machine: frozen random features still measure structure) + from
        step 250 0.05 x the hinge GAN loss against a patch discriminator with its own AdamW (lr 2e-4, betas
        0.5 / 0.9). `magdiff-jax demo --system vfi` trains it and scores held-out clips against blending the two
        neighbours (PSNR and SSIM, summary.json).
    magdiff-jax train --config configs/vfi.py:base --workdir gs://bucket/vfi --config.init_from=out/vfi_init \\
        --config.data.path=gs://bucket/tfds
        B.5 / B.7: the released EDSC_m network (init_from/interpolator: `magdiff-jax convert to-flax --kind edsc
        EDSC_m.ckpt out/vfi_init/interpolator`, or from scratch without it) on Vimeo-90K septuplets, 256 px crops,
        frames 1 and 7 given and frames 3 and 5 (t = 1/3, 2/3) the targets; L1-like Charbonnier + LPIPS(VGG16)
        (init_from/perceptual: `convert.vgg.lpips_from_torch` of torchvision's vgg16 and the lpips package's
        vgg.pth heads) + a 0.05-weighted hinge PatchGAN from step 10000. No motion prior: the released weights
        were trained without one (from scratch, --config.model.interpolator.motion_prior=bilateral adds it).
"""

import ml_collections

from magdiff_jax.train.trainer import base_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "vfi"
    c.task_options.reconstruction = "charbonnier"  # charbonnier | l1
    c.task_options.charbonnier_eps = 1e-3
    c.task_options.perceptual_weight = 1.0
    c.task_options.adversarial_weight = 0.05
    c.task_options.adversarial_start = 10000
    c.data.task = "interp"
    c.data.normalize = False
    c.data.caption_dropout = 0.0
    c.optim.update(lr=1e-4, weight_decay=0.0, warmup_steps=500, grad_clip=1.0)
    c.groups = ml_collections.ConfigDict({
        "discriminator": {"optim": {"lr": 2e-4, "b1": 0.5, "b2": 0.9, "warmup_steps": 0}},
    })
    if arg in ("tiny", "demo"):
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 500, 8, 25, 500
        c.optim.update(lr=2e-3, warmup_steps=20)
        c.task_options.perceptual_weight = 0.05
        c.task_options.adversarial_start = 250
        c.data.source = "synthetic"
        c.data.synthetic.update(num=96, num_frames=4, size=32, shape_size=0.3, travel=0.3)
        c.data.interp.update(window=4, targets=(1, 2))
        c.data.stride, c.data.resolution = 1, (32, 32)
        c.preview.update(every=500, num=3)
        c.model = ml_collections.ConfigDict({
            "interpolator": {"block_out_channels": (16, 32, 32), "head_channels": (16, 16), "het_groups": 4,
                             "blend_init": True, "motion_prior": "bilateral"},
            "perceptual": {"vgg": {"widths": (8, 16, 32, 32, 32)}},
            "discriminator": {"channels": 16, "num_layers": 2, "norm_num_groups": 8},
        })
        if arg == "demo":
            c.preview.every = 0
    elif arg == "base":
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 200000, 32, 100, 5000
        c.mesh.update(data=-1, fsdp=1)
        c.data.source = "tfds"
        c.data.builder = "vimeo90k"
        c.data.interp.update(window=7, targets=(2, 4))
        c.data.stride, c.data.resolution = 1, (256, 256)
        c.data.worker_count = 8
        c.init_from = ""  # interpolator/ (optional) and perceptual/ (LPIPS weights)
        c.model = ml_collections.ConfigDict({"interpolator": {}, "perceptual": {},
                                             "discriminator": {"channels": 64, "num_layers": 3}})
        c.preview.update(every=5000, num=4)
    else:
        raise ValueError(f"configs/vfi.py: variant must be tiny, demo or base, got {arg!r}")
    return c
