"""`magdiff-jax convert magdiff-init`: a MagDiff `init_from` folder from a text-to-image pipeline (PyTorch folders,
random weights) plus the temporal layers of a unet3d (a Flax folder), and `UNet3DConfig.from_unet2d`.

The written U-Net must hold, bit for bit: the UNet2D's spatial weights, the donor's temporal weights, conv_in's old
channels (new ones zero), to_k_ip/to_v_ip equal to to_k/to_v, text_scale 1.0 and image_scale 1.5; the VAE and the
text and image encoders equal their sources; a training config with `init_from` resolves every model's config from
the folder. Bad sources fail before anything is written.
"""

import json

import numpy as np
import pytest
from helpers import flat_params, random_params
from remat_configs import spatial_config, tiny_config

from magdiff_jax import cli
from magdiff_jax.convert import ConversionError, save_torch
from magdiff_jax.data.synthetic import write_tokenizer
from magdiff_jax.export import load_model, save_model
from magdiff_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.unet2d import UNet2DConfig
from magdiff_jax.models.unet3d import UNet3DConfig
from magdiff_jax.models.vae import AutoencoderKLConfig

TEXT = CLIPTextConfig(vocab_size=128, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=109, eos_token_id=110,
                      pad_token_id=110)
VISION = CLIPVisionConfig(hidden_size=12, intermediate_size=24, projection_dim=12, num_hidden_layers=1,
                          num_attention_heads=2, image_size=16, patch_size=8)
VAE = AutoencoderKLConfig(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=4, sample_size=16)


def _random(kind, cfg, seed):
    spec = get_model(kind)
    module = spec.build(cfg)
    return module, random_params(module, *spec.example_inputs(cfg), seed=seed, **spec.example_kwargs(cfg))




@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A PyTorch pipeline folder (unet2d, vae, text_encoder, tokenizer, scheduler), a PyTorch image encoder and a
    Flax unet3d whose temporal layers are the donor's."""
    root = tmp_path_factory.mktemp("init_sources")
    models = {"unet": ("unet2d", spatial_config("unet3d")), "vae": ("vae", VAE), "text_encoder": ("clip_text", TEXT)}
    params = {}
    for seed, (name, (kind, cfg)) in enumerate(models.items()):
        module, params[name] = _random(kind, cfg, seed)
        save_torch(kind, module, params[name], root / "sd" / name)
    write_tokenizer(root / "sd" / "tokenizer")
    (root / "sd" / "scheduler").mkdir()
    (root / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    module, params["image_encoder"] = _random("clip_vision", VISION, 7)
    save_torch("clip_vision", module, params["image_encoder"], root / "image_encoder")
    module, params["temporal"] = _random("unet3d", tiny_config("unet3d"), 9)
    save_model("unet3d", module, params["temporal"], root / "t2v_unet")
    module, p = _random("unet3d", tiny_config("unet3d", blocks=1), 10)  # another layout: one block
    save_model("unet3d", module, p, root / "t2v_one_block")
    return root, {k: flat_params(v) for k, v in params.items()}


def _init(root, out, *extra):
    cli.main(cli.build_parser().parse_args(
        ["convert", "magdiff-init", "--pipeline", str(root / "sd"), "--image-encoder", str(root / "image_encoder"),
         "--out", str(out), *extra]))


def test_init_folder_keeps_every_source_weight(sources, tmp_path):
    root, src = sources
    out = tmp_path / "magdiff_init"
    _init(root, out, "--temporal", str(root / "t2v_unet"), "--seed", "3")
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder", "magdiff_init.json", "scheduler",
                                                     "text_encoder", "tokenizer", "unet", "vae"]
    kind, module, params = load_model(out / "unet")
    assert kind == "magdiff"
    cfg = module.config
    assert cfg.resampler.embedding_dim == VISION.hidden_size and cfg.resampler.output_dim == 16
    assert cfg.unet.in_channels == 8 and cfg.unet.entity_attention
    unet = flat_params(params["unet"])
    spatial, temporal = src["unet"], src["temporal"]
    kernel = unet.pop("conv_in/kernel")
    np.testing.assert_array_equal(kernel[..., :4, :], spatial["conv_in/kernel"])
    assert not kernel[..., 4:, :].any()
    ip = {p: v for p, v in unet.items() if "_ip/" in p or p.endswith("_scale")}
    assert len(ip) == 4 * 4  # four spatial transformers: to_k_ip, to_v_ip, text_scale, image_scale
    for path, value in ip.items():
        if path.endswith("text_scale"):
            assert value == 1.0
        elif path.endswith("image_scale"):
            assert value == 1.5
        else:
            np.testing.assert_array_equal(value, unet[path.replace("_ip/", "/")])
    rest = {p: v for p, v in unet.items() if p not in ip}
    from_2d = [p for p in rest if p in spatial]
    from_donor = [p for p in rest if p not in spatial]
    assert from_donor and all("temp_" in p or "transformer_in" in p for p in from_donor)
    for p in from_2d:
        np.testing.assert_array_equal(rest[p], spatial[p], err_msg=p)
    for p in from_donor:
        np.testing.assert_array_equal(rest[p], temporal[p], err_msg=p)
    assert {"image_proj", "entity_pyramid"} <= set(params)
    for name in ("vae", "text_encoder", "image_encoder"):
        _, _, p = load_model(out / name)
        got = flat_params(p)
        assert got.keys() == src[name].keys()
        assert all(np.array_equal(got[k], src[name][k]) for k in got), name
    meta = json.loads((out / "magdiff_init.json").read_text())
    assert meta["seed"] == 3 and meta["sources"]["temporal"].endswith("t2v_unet")

    # the training config of configs/magdiff.py:base takes every model config from the folder
    import ml_collections

    from magdiff_jax.data.transforms import tokenizer
    from magdiff_jax.train.tasks import MagDiffTask

    config = ml_collections.ConfigDict({"init_from": str(out), "compute_dtype": "bfloat16", "model": {
        "unet": {"unet": {"remat_policy": "full"}}, "vae": {}, "text_encoder": {}, "image_encoder": {}},
        "data": {"tokenizer": "init_from"}})
    models = MagDiffTask().models(config)
    assert models["unet"][1].unet.remat_policy == "full" and models["unet"][1].unet.dtype == "bfloat16"
    assert models["image_encoder"][1].hidden_size == VISION.hidden_size
    assert np.asarray(tokenizer(str(out / "tokenizer"), 16)(["a red square moves left"])).shape == (1, 16)


def test_a_unet3d_base_is_used_as_it_is(sources, tmp_path):
    """A text-to-video U-Net (ModelScope's layout, here the Flax donor) as the base: nothing inflated, every one of
    its weights kept (conv_in's old channels); pyramid "single" has no weights."""
    root, src = sources
    out = tmp_path / "init"
    _init(root, out, "--unet", str(root / "t2v_unet"), "--pyramid", "single")
    _, module, params = load_model(out / "unet")
    assert module.config.pyramid == "single" and "entity_pyramid" not in params
    unet = flat_params(params["unet"])
    for path, value in src["temporal"].items():
        got = unet[path][..., :4, :] if path == "conv_in/kernel" else unet[path]
        np.testing.assert_array_equal(got, value, err_msg=path)
    meta = json.loads((out / "magdiff_init.json").read_text())
    assert not any("temp_" in p for p in meta["fresh"])


def test_bad_sources_fail_before_writing(sources, tmp_path):
    root, _ = sources
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):  # a missing folder is named
        _init(root, out, "--image-encoder", str(tmp_path / "no_such_folder"))
    with pytest.raises(ConversionError, match=r"image_encoder source .* 'clip_text' model; expected clip_vision"):
        _init(root, out, "--image-encoder", str(root / "sd" / "text_encoder"))
    with pytest.raises(ConversionError, match="does not fit the inflated U-Net"):
        _init(root, out, "--temporal", str(root / "t2v_one_block"))
    wide_text = tmp_path / "wide_text"
    module, p = _random("clip_text", CLIPTextConfig(**{**TEXT.__dict__, "hidden_size": 24, "projection_dim": 24}), 0)
    save_torch("clip_text", module, p, wide_text)
    with pytest.raises(ConversionError, match="24 wide but the U-Net's cross-attention reads 16"):
        _init(root, out, "--text-encoder", str(wide_text))
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())
    (out / "keep").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not empty"):
        _init(root, out)
    assert (out / "keep").is_dir()


def test_unet3d_config_from_unet2d():
    """`from_unet2d` inverts `to_unet2d`; SD2.1's U-Net gives the MagDiff backbone layout (sd21_base); options the
    video model cannot express are named."""
    cfg = tiny_config("unet3d")
    assert UNet3DConfig.from_unet2d(cfg.to_unet2d()) == cfg
    assert UNet3DConfig.from_unet2d(UNet2DConfig.sd21(sample_size=64)) == UNet3DConfig.sd21_base()
    with pytest.raises(ValueError, match="widths"):  # SD1.5: 8 heads in every block, widths 40/80/160
        UNet3DConfig.from_unet2d(UNet2DConfig.sd15())
    with pytest.raises(ValueError, match="use_linear_projection=False"):  # SD1.5's conv projections
        UNet3DConfig.from_unet2d(UNet2DConfig.sd15(attention_head_dim=(5, 10, 20, 20)))
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet3DConfig.from_unet2d(UNet2DConfig.sd21(class_embed_type="timestep"))
