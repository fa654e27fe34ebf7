"""The analytic FLOP count (matmuls and convolutions from the jaxpr) against hand counts and XLA's
`cost_analysis()`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from magdiff_jax.utils.flops import count_flops, count_in_bounds_flops


def test_dense_conv_and_attention_hand_counts():
    x = jnp.zeros((2, 10, 16))
    dense = nn.Dense(32)
    p = dense.init(jax.random.key(0), x)
    assert count_flops(dense.apply, p, x) == 2 * 2 * 10 * 16 * 32
    img = jnp.zeros((2, 8, 8, 4))
    conv = nn.Conv(6, (3, 3))
    pc = conv.init(jax.random.key(0), img)
    assert count_flops(conv.apply, pc, img) == 2 * (2 * 8 * 8 * 6) * 4 * 9
    # in bounds: along each 8-long axis the 3 taps of 8 outputs, less the 2 that land on the padding: 22 pairs
    assert count_in_bounds_flops(conv.apply, pc, img) == 2 * (2 * 6) * 4 * 22 * 22
    strided = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)))
    ps = strided.init(jax.random.key(0), img)
    assert count_in_bounds_flops(strided.apply, ps, img) == 2 * (2 * 6) * 4 * 11 * 11  # 4 outputs x 3 taps, less 1
    q = jnp.zeros((2, 5, 3, 8))
    attn = lambda q: jax.nn.dot_product_attention(q, q, q)
    assert count_flops(attn, q) == 2 * (2 * 2 * 3 * 5 * 5 * 8)  # QK^T and AV
    scanned = lambda x: jax.lax.scan(lambda c, _: (dense.apply(p, c)[..., :16], None), x, None, length=3)[0]
    assert count_flops(scanned, x) == 3 * 2 * 2 * 10 * 16 * 32


def test_unet2d_count_matches_xla_cost_analysis():
    """The in-bounds count within 5% of XLA's on a U-Net of realistic widths (XLA also counts norms and
    activations, which the convention leaves out: they matter only at toy widths); the convention's count is the
    in-bounds one plus the taps on the padding (8% of a 3x3 convolution's at 16x16, 16% at 8x8)."""
    from magdiff_jax.models.unet2d import UNet2DConditionModel, UNet2DConfig, example_inputs

    cfg = UNet2DConfig(sample_size=16, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=128,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=(2, 4),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=True)
    module = UNet2DConditionModel(cfg)
    params = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(cfg))
    args = (params, jnp.zeros((2, 16, 16, 4)), jnp.zeros((2,)), jnp.zeros((2, 77, 128)))
    ours = count_in_bounds_flops(module.apply, *args)
    cost = jax.jit(module.apply).lower(*args).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert abs(ours - xla) / xla < 0.05, (ours, xla)
    convention = count_flops(module.apply, *args)
    assert 1.05 < convention / ours < 1.15, (convention, ours)
