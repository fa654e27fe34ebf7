"""Text-to-image (MagicVideo-V2 stage 1): SD-style latent diffusion, frozen VAE and CLIP text, trainable unet2d.

    magdiff-jax train --config configs/t2i.py:tiny --workdir /tmp/t2i_tiny
        CPU, synthetic data (one frame of each clip, 32x32) and the synthetic one-token-per-word vocabulary;
        randomly initialised tiny models. 50 steps take well under a minute after compilation; the loss in
        metrics.jsonl (and tensorboard/) falls from about 1.0; samples/step_0000050.png shows three prompts.
    magdiff-jax train --config configs/t2i.py:sd15 --workdir gs://bucket/t2i_sd15 --config.init_from=out/sd15 \\
        --config.data.source=folder --config.data.path=data/images
        SD 1.5 fine-tuning at 512x512 from a converted pipeline (`magdiff-jax convert to-flax --kind pipeline`).
    magdiff-jax train --config configs/t2i.py:demo --workdir /tmp/t2i_demo --config.init_from=magicvideo_demo/models
        tiny's models trained as configs/magdiff.py:tiny is (v-prediction, timesteps drawn towards high noise, the
        text encoder trained with the U-Net, lr 2e-3), 300 steps: the first stage of `magdiff-jax demo --system
        magicvideo`, whose held-out references then have their caption's colour (12/12 measured, after 47 s on 2
        cores, with the demo's tiny VAE as init_from).
    magdiff-jax train --config configs/t2i.py:micro --workdir /tmp/t2i_micro
        tiny's data with one-block models (about a third of tiny's compile time): for checking the machinery
        quickly (a new mesh, a multi-host launch), not for learning anything.
    sd21: the same from SD 2.1-base (v-prediction off: epsilon, 512x512), OpenCLIP ViT-H text.
"""

import ml_collections

from magdiff_jax.train.trainer import base_config


def tiny_models() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "unet": {"sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 4,
                 "cross_attention_dim": 32, "norm_num_groups": 8},
        "vae": {"block_out_channels": (16, 32), "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "norm_num_groups": 8,
                "sample_size": 32},
        "text_encoder": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
                         "bos_token_id": 108, "eos_token_id": 109, "pad_token_id": 109},
    })


def micro_models() -> ml_collections.ConfigDict:
    m = tiny_models()
    m.unet.update(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",))
    m.vae.update(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",))
    m.text_encoder.num_hidden_layers = 1
    return m


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "t2i"
    c.data.num_frames = 1
    c.data.normalize = False  # uint8 from the loader (4x fewer bytes between processes); scaled on device
    if arg in ("tiny", "micro", "demo"):
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 50, 8, 10, 50
        c.optim.lr, c.optim.warmup_steps = 1e-3, 10
        c.data.source = "synthetic"
        c.data.synthetic.update(num=72, num_frames=8, size=32)
        c.data.resolution = (32, 32)
        c.data.tokenizer, c.data.max_length = "synthetic", 16
        c.data.caption_dropout = 0.1
        c.preview.update(every=50, num_steps=10, guidance=3.0,
                         prompts=("a red square moves left", "a blue circle moves up", "a green triangle moves down"))
        c.model = micro_models() if arg == "micro" else tiny_models()
        if arg == "demo":  # as configs/magdiff.py:tiny: v, high-noise timesteps, the text encoder trained
            c.steps, c.ckpt_every, c.log_every = 300, 300, 25
            c.optim.lr = 2e-3
            c.schedule.prediction_type = "v_prediction"
            c.schedule.timestep_bias = 16.0
            c.trainable = r"^(unet|text_encoder)/"
            c.preview.every = 0
    elif arg in ("sd15", "sd21"):
        c.steps, c.global_batch_size, c.log_every, c.ckpt_every = 10000, 64, 50, 1000
        c.optim.lr, c.optim.warmup_steps = 1e-5, 500
        c.mesh.update(data=1, fsdp=-1)
        c.data.source, c.data.resolution, c.data.caption_dropout = "images", (512, 512), 0.1
        c.data.worker_count = 8
        c.init_from = ""  # set to the converted pipeline folder
        c.model = ml_collections.ConfigDict({"unet": {}, "vae": {}, "text_encoder": {}})  # from init_from
        if arg == "sd21":
            c.schedule.prediction_type = "epsilon"
    else:
        raise ValueError(f"configs/t2i.py: variant must be tiny, micro, demo, sd15 or sd21, got {arg!r}")
    return c
