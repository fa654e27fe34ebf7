"""Tiny U-Net configs of every kind, shared by the remat tests and their memory-check subprocess."""


def tiny_config(kind: str, sample_size: int = 8):
    common = dict(sample_size=sample_size, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
                  norm_num_groups=4)
    if kind == "unet2d":
        from magdiff_jax.models.unet2d import UNet2DConfig

        return UNet2DConfig(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, **common)
    if kind == "unet_motion":
        from magdiff_jax.models.unet_motion import UNetMotionConfig

        return UNetMotionConfig(down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                                up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), num_attention_heads=2,
                                motion_num_attention_heads=2, **common)
    if kind == "unet3d":
        from magdiff_jax.models.unet3d import UNet3DConfig

        return UNet3DConfig(down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=2, **common)
    raise ValueError(kind)
