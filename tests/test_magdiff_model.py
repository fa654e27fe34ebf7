"""The MagDiff U-Net (`models.magdiff`): entity pyramid, IP-Adapter-Plus resampler and decoupled entity/text
cross-attention around the tiny unet3d of `remat_configs` (blocks 16/32, one layer each, cross-attention 16, heads of
width 8, 8x8 latents, 3 frames).

- the resampler equals diffusers `IPAdapterPlusImageProjection` (fp32, max|diff| / max|ref| <= 1e-5) and its
  state-dict mapping round-trips exactly;
- started from a random-weight unet3d (`magdiff_params_from_unet3d`), the entity-attention U-Net with all-zero image
  tokens equals the base unet3d on the noisy latents (<= 1e-5 relative); with real image tokens it differs;
- one gradient reaches every new parameter (the pyramid once conv_in's new channels are non-zero);
- image_token_mode "own_and_first" masks other frames' tokens, and bad modes and inputs are refused.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import flat_params, random_params, rel_err
from remat_configs import tiny_config, tiny_magdiff_config

from magdiff_jax import sharding
from magdiff_jax.convert import ConversionError, torch_format
from magdiff_jax.convert.magdiff import resampler_from_torch, resampler_to_torch
from magdiff_jax.layers.resampler import Resampler, ResamplerConfig
from magdiff_jax.models.magdiff import (
    EntityPyramid,
    MagDiffConfig,
    MagDiffUNet,
    add_entity_attention,
    magdiff_params_from_unet3d,
    widen_conv_in,
)
from magdiff_jax.models.registry import config_from_dict, config_to_dict, get_model
from magdiff_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig, per_frame_image_context

B, F, H = 2, 3, 8
SPATIAL_ATTN2 = (  # every spatial transformer of the tiny U-Net (CrossAttnDown, mid, CrossAttnUp x 2 layers)
    "down_blocks_0/attentions_0", "mid_block/attentions_0", "up_blocks_1/attentions_0", "up_blocks_1/attentions_1")


def _compile(fn, *args):
    """Run `fn(*args)` compiled once; LLVM optimisation off: same arithmetic, a fraction of the compile time."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})




def _perturb(tree, seed, scale=0.05):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda a: np.asarray(a) + scale * rng.standard_normal(np.shape(a)).astype(np.float32), tree)


@pytest.fixture(scope="module")
def case():
    """A random-weight base unet3d, the MagDiff U-Net started from it (resampler and pyramid perturbed off their
    init), inputs, and the compiled base / entity-U-Net / MagDiff forwards."""
    spec = get_model("unet3d")
    base = UNet3DConditionModel(tiny_config("unet3d"))
    base_params = random_params(base, *spec.example_inputs(base.config), seed=0)
    model = MagDiffUNet(tiny_magdiff_config())
    params = magdiff_params_from_unet3d(base_params, model, jax.random.key(1))
    params = {**params, "image_proj": _perturb(params["image_proj"], 1),
              "entity_pyramid": _perturb(params["entity_pyramid"], 2)}
    rng = np.random.RandomState(0)
    inputs = dict(
        x=rng.randn(B, F, H, H, 4).astype(np.float32), t=np.array([3, 700]),
        ctx=rng.randn(B, 5, 16).astype(np.float32),
        grids=tuple(rng.randn(B, F, s, s, 4).astype(np.float32) for s in (12, 10, 8)),
        embeds=rng.randn(B, F, 9, 12).astype(np.float32),
    )
    i = inputs
    base_fwd = _compile(lambda p, x: base.apply({"params": p}, x, i["t"], i["ctx"]), base_params, i["x"])
    unet = UNet3DConditionModel(model.config.unet)

    def unet_apply(cfg):
        def fwd(p, x, img):
            return UNet3DConditionModel(cfg).apply({"params": p}, x, i["t"], i["ctx"], image_hidden_states=img)
        return fwd

    entity_x = np.concatenate([i["x"], rng.randn(B, F, H, H, 4).astype(np.float32)], axis=-1)
    tokens = np.zeros((B, F * 2, 16), np.float32)
    unet_fwd = _compile(unet_apply(unet.config), params["unet"], entity_x, tokens)
    fwd = _compile(lambda p, x, g, e: model.apply({"params": p}, x, i["t"], i["ctx"], entity_latents=g,
                                                  image_embeds=e), params, i["x"], i["grids"], i["embeds"])
    return dict(base=base, base_params=base_params, model=model, params=params, inputs=inputs, base_fwd=base_fwd,
                unet_apply=unet_apply, unet_fwd=unet_fwd, entity_x=entity_x, fwd=fwd)


def test_resampler_matches_diffusers():
    """`Resampler` == diffusers `IPAdapterPlusImageProjection` (embed 32 -> hidden 32 -> output 24, depth 2, 4 heads
    of 8, 4 queries, ffn_ratio 2; every weight perturbed), fp32, max|diff| / max|ref| <= 1e-5; the state-dict
    mapping round-trips bit-exactly."""
    import torch
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from helpers import perturb_

    torch.manual_seed(0)
    ref_model = perturb_(IPAdapterPlusImageProjection(embed_dims=32, output_dims=24, hidden_dims=32, depth=2,
                                                      dim_head=8, heads=4, num_queries=4, ffn_ratio=2).eval())
    cfg = ResamplerConfig(dim=32, depth=2, dim_head=8, heads=4, num_queries=4, embedding_dim=32, output_dim=24,
                          ff_mult=2)
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    params = resampler_from_torch(state, cfg)
    x = np.random.RandomState(0).randn(2, 9, 32).astype(np.float32)
    ours = Resampler(cfg).apply({"params": params}, x)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    err = rel_err(ours, ref)
    print(f"resampler rel err {err:.2e}")
    assert ours.shape == (2, 4, 24) and err <= 1e-5
    back = resampler_to_torch(params, cfg)
    assert set(back) == set(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    with pytest.raises(ConversionError, match="missing keys"):
        resampler_from_torch({k: v for k, v in state.items() if k != "layers.1.ln0.weight"}, cfg)


def test_pyramid_and_resampler_shapes():
    """Pyramid: 12/10/8 grids (384/320/256 px subjects at 1/8 of an 8x8-latent video) -> (B, F, 8, 8, 4) through
    scale_0..2, fuse and proj_out; "single" passes the smallest grid through. Resampler: (B*F, T, 12) -> (B*F, 2, 16).
    """
    grids = tuple(jax.ShapeDtypeStruct((B, F, s, s, 4), jnp.float32) for s in (12, 10, 8))
    out, variables = jax.eval_shape(lambda g: EntityPyramid(channels=8).init_with_output(jax.random.key(0), g), grids)
    assert out.shape == (B, F, 8, 8, 4)
    shapes = {k: v.shape for k, v in flat_params(nn.meta.unbox(variables["params"])).items()}
    assert shapes == {"scale_0/kernel": (3, 3, 4, 8), "scale_1/kernel": (3, 3, 4, 8), "scale_2/kernel": (3, 3, 4, 8),
                      "fuse/kernel": (3, 3, 8, 8), "proj_out/kernel": (1, 1, 8, 4), "scale_0/bias": (8,),
                      "scale_1/bias": (8,), "scale_2/bias": (8,), "fuse/bias": (8,), "proj_out/bias": (4,)}
    single, variables = EntityPyramid(mode="single").init_with_output(jax.random.key(0), np.ones((B, F, 8, 8, 4)))
    assert single.shape == (B, F, 8, 8, 4) and not variables.get("params")
    cfg = tiny_magdiff_config().resampler
    tokens = jax.eval_shape(lambda x: Resampler(cfg).init_with_output(jax.random.key(0), x)[0],
                            jax.ShapeDtypeStruct((B * F, 257, 12), jnp.float32))
    assert tokens.shape == (B * F, 2, 16)
    with pytest.raises(ValueError, match="three latent grids"):
        EntityPyramid().init(jax.random.key(0), grids[:2])


def test_parameters_of_the_entity_attention(case):
    """conv_in reads 8 channels (4 new, zero); every spatial attn2, and only those, has to_k_ip/to_v_ip copied from
    to_k/to_v and text_scale 1.0 / image_scale 1.5; everything else is the base's."""
    flat, base = flat_params(case["params"]["unet"]), flat_params(case["base_params"])
    kernel = flat["conv_in/kernel"]
    assert kernel.shape == (3, 3, 8, 16) and not np.any(kernel[:, :, 4:])
    np.testing.assert_array_equal(kernel[:, :, :4], base["conv_in/kernel"])
    for prefix in SPATIAL_ATTN2:
        attn = f"{prefix}/transformer_blocks_0/attn2"
        np.testing.assert_array_equal(flat[f"{attn}/to_k_ip/kernel"], base[f"{attn}/to_k/kernel"])
        np.testing.assert_array_equal(flat[f"{attn}/to_v_ip/kernel"], base[f"{attn}/to_v/kernel"])
        assert float(flat[f"{attn}/text_scale"]) == 1.0 and float(flat[f"{attn}/image_scale"]) == 1.5
    new = sorted(set(flat) - set(base))
    assert len(new) == 4 * len(SPATIAL_ATTN2) and all(p.startswith(SPATIAL_ATTN2) for p in new)
    assert all(np.array_equal(flat[p], base[p]) for p in base if p != "conv_in/kernel")
    with pytest.raises(ConversionError, match="to_k/kernel"):
        broken = traverse_util.flatten_dict(case["base_params"])
        del broken[("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")]
        add_entity_attention(widen_conv_in(traverse_util.unflatten_dict(broken), 4), case["model"].config.unet)
    with pytest.raises(ValueError, match="conv_in reads 8"):
        magdiff_params_from_unet3d(case["params"]["unet"], case["model"], jax.random.key(0))


def test_start_equals_base_with_zero_image_tokens(case):
    """At the start, the entity-attention U-Net on [noisy latents; any entity input] with all-zero image tokens equals
    the base unet3d on the noisy latents (<= 1e-5 relative): conv_in's new channels are zero and the bias-free
    to_v_ip turns zero tokens into an exactly zero image branch. With real image tokens (the full MagDiff U-Net) the
    image branch is live from the start, so the output differs."""
    i = case["inputs"]
    ref = np.asarray(case["base_fwd"](case["base_params"], i["x"]))
    zero_tokens = np.zeros((B, F * 2, 16), np.float32)
    ours = case["unet_fwd"](case["params"]["unet"], case["entity_x"], zero_tokens)
    err = rel_err(ours, ref)
    print(f"entity U-Net with zero image tokens vs base: rel err {err:.2e}")
    assert err <= 1e-5
    full = np.asarray(case["fwd"](case["params"], i["x"], i["grids"], i["embeds"]))
    assert full.shape == (B, F, H, H, 4)
    assert rel_err(full, ref) > 1e-2


def test_gradients_reach_every_new_parameter(case):
    """One gradient of an MSE loss (the U-Net under remat "full"): non-zero for every layer's text_scale,
    image_scale, to_k_ip, to_v_ip, every resampler parameter and conv_in's new input channels. The pyramid's
    gradient is exactly zero while conv_in's new channels are (their product feeds the U-Net); once those are small
    random values every pyramid parameter gets a gradient."""
    model, params, i = case["model"], case["params"], case["inputs"]
    cfg = model.config
    remat_model = MagDiffUNet(dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, remat_policy="full")))
    target = np.random.RandomState(5).randn(B, F, H, H, 4).astype(np.float32)

    def loss(p):
        out = remat_model.apply({"params": p}, i["x"], i["t"], i["ctx"], entity_latents=i["grids"],
                                image_embeds=i["embeds"])
        return jnp.mean((out - target) ** 2)

    loss_grad = _compile(jax.value_and_grad(loss), params)
    value, grads = loss_grad(params)
    plain = np.asarray(case["fwd"](params, i["x"], i["grids"], i["embeds"]))
    assert abs(float(value) - float(np.mean((plain - target) ** 2))) <= 1e-5 * float(value)
    flat = flat_params(grads)
    nonzero = lambda path: float(np.abs(flat[path]).max()) > 0
    for prefix in SPATIAL_ATTN2:
        for name in ("text_scale", "image_scale", "to_k_ip/kernel", "to_v_ip/kernel"):
            assert nonzero(f"unet/{prefix}/transformer_blocks_0/attn2/{name}"), (prefix, name)
    resampler = [p for p in flat if p.startswith("image_proj/")]
    assert len(resampler) == 19 and all(nonzero(p) for p in resampler)
    assert np.all(np.abs(flat["unet/conv_in/kernel"][:, :, 4:]).max(axis=(0, 1)) > 0)
    pyramid = [p for p in flat if p.startswith("entity_pyramid/")]
    assert len(pyramid) == 10 and not any(nonzero(p) for p in pyramid)

    unet = traverse_util.flatten_dict(params["unet"])
    kernel = np.array(unet[("conv_in", "kernel")])
    kernel[:, :, 4:] = 0.05 * np.random.RandomState(6).randn(*kernel[:, :, 4:].shape)
    unet[("conv_in", "kernel")] = kernel
    _, grads = loss_grad({**params, "unet": traverse_util.unflatten_dict(unet)})
    flat = flat_params(grads)
    assert all(nonzero(p) for p in pyramid)


def test_image_token_modes(case):
    """own_and_first: frame i sees its own and the first frame's tokens (the mask); with every frame's tokens
    alike it equals "all" (attention over duplicated keys is attention over one copy), with distinct tokens it
    differs. Run under remat "full" (the mask travels through the rematerialised blocks)."""
    mask = per_frame_image_context(UNet3DConfig(entity_attention=True, image_token_mode="own_and_first",
                                                cross_attention_dim=4), jnp.zeros((2, 6, 4)), 2, 3, jnp.float32)[1]
    keep = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(mask)[:, 0, 0], np.concatenate([keep, keep]))

    unet_cfg = case["model"].config.unet
    own = dataclasses.replace(unet_cfg, image_token_mode="own_and_first", remat_policy="full")
    rng = np.random.RandomState(7)
    distinct = rng.randn(B, F * 2, 16).astype(np.float32)
    alike = np.tile(rng.randn(B, 2, 16).astype(np.float32), (1, F, 1))
    p, x = case["params"]["unet"], case["entity_x"]
    own_fwd = _compile(case["unet_apply"](own), p, x, distinct)
    assert rel_err(own_fwd(p, x, alike), case["unet_fwd"](p, x, alike)) <= 1e-5
    assert rel_err(own_fwd(p, x, distinct), case["unet_fwd"](p, x, distinct)) > 1e-3


def test_bad_modes_and_inputs_are_refused(case):
    with pytest.raises(ValueError, match="image_token_mode"):
        UNet3DConfig(image_token_mode="own")
    cfg = tiny_config("unet3d")
    args = get_model("unet3d").example_inputs(cfg)
    tokens = jnp.zeros((1, 3, 16))
    with pytest.raises(ValueError, match="entity_attention=False"):
        jax.eval_shape(lambda: UNet3DConditionModel(cfg).init(jax.random.key(0), *args, image_hidden_states=tokens))
    entity = dataclasses.replace(cfg, entity_attention=True)
    with pytest.raises(ValueError, match="needs image_hidden_states"):
        jax.eval_shape(lambda: UNet3DConditionModel(entity).init(jax.random.key(0), *args))
    own = dataclasses.replace(entity, image_token_mode="own_and_first")
    with pytest.raises(ValueError, match="F=2 equal"):  # 3 tokens over 2 frames
        jax.eval_shape(lambda: UNet3DConditionModel(own).init(jax.random.key(0), *args, image_hidden_states=tokens))
    with pytest.raises(ValueError, match="pyramid must be"):
        tiny_magdiff_config(pyramid="double")
    with pytest.raises(ValueError, match=r"resampler\.output_dim"):
        tiny_magdiff_config(resampler=ResamplerConfig(output_dim=24, embedding_dim=12, dim=16, heads=2, dim_head=8))
    with pytest.raises(ValueError, match="in_channels=5"):
        tiny_magdiff_config(unet=dataclasses.replace(cfg, in_channels=5))
    i = case["inputs"]
    with pytest.raises(ValueError, match="does not match the noisy latents"):
        jax.eval_shape(lambda: case["model"].apply({"params": case["params"]}, i["x"], i["t"], i["ctx"],
                                                   entity_latents=i["grids"][::-1], image_embeds=i["embeds"]))


def test_config_json_registry_and_logical_axes(tmp_path):
    """MagDiffConfig: in_channels 8 and entity_attention derived, nested dicts through JSON and the registry's
    config_from_dict; unet3d's diffusers config neither writes nor reads the entity fields; every parameter of the
    `magdiff` kind carries logical axis names the sharding rules know; a Flax checkpoint round-trips."""
    cfg = tiny_magdiff_config(pyramid="single")
    assert cfg.unet.in_channels == 8 and cfg.unet.entity_attention
    back = json.loads(json.dumps(cfg.to_dict()))
    assert MagDiffConfig.from_dict(back) == cfg
    spec = get_model("magdiff")
    assert config_from_dict(spec.config_cls, config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        MagDiffConfig.from_dict({**back, "unet": {**back["unet"], "entity_prompt": 1}})
    with pytest.raises(ValueError, match="'magdiff' has no single-folder PyTorch format"):
        torch_format("magdiff")

    unet3d = torch_format("unet3d")
    d = unet3d.config_to_torch(tiny_config("unet3d"))
    assert "entity_attention" not in d and "image_token_mode" not in d
    with pytest.raises(ValueError, match="unknown key 'entity_attention'"):
        unet3d.config_from_torch({**d, "entity_attention": True})
    with pytest.raises(NotImplementedError):
        unet3d.rules(cfg.unet)

    multi = tiny_magdiff_config()
    abstract = sharding.abstract_init(spec.build(multi), *spec.example_inputs(multi), **spec.example_kwargs(multi))
    leaves = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    known = {name for name, _ in sharding.DEFAULT_RULES}
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    for x in leaves:
        assert set(x.names) - {None} <= known and len(x.names) == x.value.ndim, x.names
        sharding.logical_to_spec(x.names, x.value.shape, mesh, sharding.DEFAULT_RULES)
    attn2 = abstract["params"]["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]
    assert attn2["to_k_ip"]["kernel"].names == ("embed", "heads") and attn2["image_scale"].names == ()

    from magdiff_jax.export import load_model, save_model

    module = spec.build(cfg)
    params = random_params(module, *spec.example_inputs(cfg), **spec.example_kwargs(cfg))
    save_model("magdiff", module, params, tmp_path / "magdiff")
    kind, loaded, restored = load_model(tmp_path / "magdiff", kind="magdiff")
    assert kind == "magdiff" and loaded.config == cfg and "entity_pyramid" not in restored
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)))
