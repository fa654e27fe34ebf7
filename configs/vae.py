"""Autoencoder training: the tiny VAE of the synthetic dataset (the tiny configs' random VAEs decode to noise).

    magdiff-jax train --config configs/vae.py:tiny --workdir /tmp/vae_tiny
        CPU, synthetic frames at 32x32, configs/t2i.py's tiny VAE (16/32 channels, f=2, 4 latent channels) from
        scratch: reconstruction MSE (plus a 1e-6 KL) falls below about 0.01 in a few hundred steps; samples/ shows
        inputs above their reconstructions. `magdiff-jax demo` runs it before MagDiff and passes the result as
        init_from (folder `vae`).
    magdiff-jax train --config configs/vae.py:tiny_gan --workdir /tmp/vae_gan
        the same VAE against a patch discriminator (models/discriminator.py; hinge loss, weight 0.1, its own AdamW
        with lr 2e-4 and betas (0.5, 0.9)) that starts training at step 100: two parameter groups, two losses per
        step (metrics.jsonl: loss and loss_d, grad_norm/<group>, lr/<group>); the export holds the VAE alone.
"""

import os
import sys

import ml_collections

from magdiff_jax.train.trainer import base_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling config files
import t2i


def get_config(arg: str = "tiny"):
    c = base_config()
    c.task = "vae"
    c.task_options.kl_weight = 1e-6
    c.data.normalize = False
    if arg not in ("tiny", "tiny_gan"):
        raise ValueError(f"configs/vae.py: variant must be tiny or tiny_gan, got {arg!r}")
    c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 400, 8, 20, 400
    c.optim.update(lr=2e-3, warmup_steps=20, weight_decay=0.0)
    c.data.source = "synthetic"
    c.data.synthetic.update(num=96, num_frames=8, size=32)
    c.data.num_frames, c.data.resolution = 2, (32, 32)
    c.preview.update(every=400, num=3)
    c.model.vae = t2i.tiny_models().vae
    if arg == "tiny_gan":
        c.task_options.disc_weight, c.task_options.disc_start = 0.1, 100
        c.model.discriminator = ml_collections.ConfigDict({"channels": 16, "num_layers": 2, "norm_num_groups": 8})
        c.groups.discriminator = ml_collections.ConfigDict({"optim": {"lr": 2e-4, "b1": 0.5, "b2": 0.9,
                                                                      "warmup_steps": 0}})
    return c
