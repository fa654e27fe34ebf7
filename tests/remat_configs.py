"""Tiny U-Net configs of every kind, shared by the remat, inflate and sharding tests and their subprocesses."""


def spatial_config(kind: str, sample_size: int = 8):
    """The unet2d config whose parameters are the spatial part of `tiny_config(kind)`."""
    cfg = tiny_config(kind, sample_size)
    return cfg.to_unet2d() if kind == "unet3d" else tiny_config("unet2d", sample_size)


def tiny_config(kind: str, sample_size: int = 8, blocks: int = 2):
    """blocks=2: a cross-attention block and a plain one (channels 16, 32); blocks=1: the cross-attention block alone
    (no down- or upsampler; about half the compile time)."""
    common = dict(sample_size=sample_size, block_out_channels=(16, 32)[:blocks], layers_per_block=1,
                  cross_attention_dim=16, norm_num_groups=4)

    def types(down_attn, down, up, up_attn):
        return dict(down_block_types=(down_attn, down)[:blocks], up_block_types=(up, up_attn)[-blocks:])

    if kind == "unet2d":
        from magdiff_jax.models.unet2d import UNet2DConfig

        return UNet2DConfig(**types("CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                            attention_head_dim=2, **common)
    if kind == "unet_motion":
        from magdiff_jax.models.unet_motion import UNetMotionConfig

        return UNetMotionConfig(**types("CrossAttnDownBlockMotion", "DownBlockMotion", "UpBlockMotion",
                                        "CrossAttnUpBlockMotion"), num_attention_heads=2, motion_num_attention_heads=2,
                                **common)
    if kind == "unet3d":
        from magdiff_jax.models.unet3d import UNet3DConfig

        # UNet3D's attention_head_dim is the head width: 8 gives 2 and 4 heads
        return UNet3DConfig(**types("CrossAttnDownBlock3D", "DownBlock3D", "UpBlock3D", "CrossAttnUpBlock3D"),
                            attention_head_dim=8, **common)
    raise ValueError(kind)


def tiny_magdiff_config(**kw):
    """A MagDiff U-Net around `tiny_config("unet3d")` (conv_in widened to 8 inputs) with a one-layer resampler of 2
    queries over 12-wide image tokens and an 8-channel entity pyramid."""
    from magdiff_jax.layers.resampler import ResamplerConfig
    from magdiff_jax.models.magdiff import MagDiffConfig

    resampler = ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, num_queries=2, embedding_dim=12, output_dim=16,
                                ff_mult=2)
    return MagDiffConfig(**{"unet": tiny_config("unet3d"), "resampler": resampler, "pyramid_channels": 8, **kw})
