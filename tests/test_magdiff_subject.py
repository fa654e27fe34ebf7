"""MagDiff's subject inputs and training settings as the paper's code has them (PAPERS.md A.2-A.9):

- the entity pyramid's subject images are cut from the source frame at its own resolution (A.5), not enlarged from
  the video's crop, and cover the same region as the (randomly cropped) video;
- the CLIP branch's subject is resized and centre-cropped at `clip_load_size`, then bicubic with antialias to
  `clip_size` (A.2; matched against torch's `interpolate(mode="bicubic", antialias=True)`, within 1 of 255);
- image tokens from the CLIP vision transformer's last hidden state before post_layernorm by default, the layer a
  config value; a config that does not record one reads the penultimate (older exports unchanged);
- the "no subject" input (subject dropout in training, the dropped pass of two-scale guidance) is a black image's
  VAE latents and CLIP tokens, identical in the loader and in sampling, and not zeros;
- `MagDiffTask` trains the paper code's subset (A.7) and runs the U-Net with dropout; two-scale guidance is refused
  on a stage trained without subject dropout, before a model loads.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from magdiff_jax.data import transforms
from magdiff_jax.data.pipeline import data_config, loader_spec
from magdiff_jax.data.sources import SyntheticSource
from magdiff_jax.data.synthetic import SyntheticConfig
from magdiff_jax.demo import load_config
from magdiff_jax.models.magdiff import (
    IMAGE_LAYER,
    UNRECORDED_IMAGE_LAYER,
    black_subject,
    image_layer_of,
    subject_condition,
    subject_keys,
)
from magdiff_jax.models.registry import config_from_dict, get_model

SYN64 = SyntheticConfig(num_frames=4, size=64, shape_size=0.4, travel=0.2)


def _spec(**kw):
    base = dict(num_frames=2, stride=3, height=32, width=32, train=False, masks=True, subject=True,
                subject_sizes=(48, 40, 32), clip_size=16, clip_load_size=32, normalize=False, sda_eval_mode="first")
    return transforms.LoaderSpec(**{**base, **kw})


def _entity_at(record, size, frame=0):
    """The entity of `frame` of a synthetic record with frame and mask resized whole to size x size (box filter)."""
    from PIL import Image

    def box(im):
        return np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BOX))

    return transforms.entity_images(box(record["video"][frame])[None], box(record["mask"][frame])[None] > 127)[0]


def test_pyramid_subjects_are_cut_from_the_source_frame():
    """A 64 px source, a 32 px video: the 48 px subject is the source's entity at 48 px (decoded at
    `subject_detail_size`: 48 px covers every subject image), not the 32 px crop enlarged; the 32 px subject is
    the video's own entity, up to the resampling filter."""
    rec = SyntheticSource(SYN64, 4)[1]
    spec = _spec()
    ex = transforms.load_example(rec, spec, np.random.default_rng(0))
    assert transforms.subject_detail_size((64, 64), (32, 32), spec) == (48, 48)
    np.testing.assert_array_equal(ex["subject_48"][0], _entity_at(rec, 48))
    enlarged = transforms.resize_images(transforms.entity_images(ex["video"][:1], ex["mask"][:1] > 0), (48, 48))[0]
    assert np.abs(ex["subject_48"][0].astype(int) - enlarged).mean() > 1.0  # the old path: no extra detail
    own, inside = ex["subject_32"][0], ex["mask"][0] > 0  # the video's size: its subject, up to edge pixels
    assert np.mean((own.max(-1) > 0) != inside) < 0.04
    np.testing.assert_allclose(np.median(own[inside], 0), np.median(ex["video"][0][inside], 0), atol=6)
    assert ex["subject_48"][1:].max() == 0 and ex["subject_clip"][1:].max() == 0  # generation: the first frame's


def test_subjects_cover_the_randomly_cropped_region():
    """A random crop of a wide source (64 px tall, cropped to 32 px of a 48 px-wide resize): every pyramid subject
    shows the region the video shows (its mask matches the video's subject mask at that size)."""
    rec = SyntheticSource(SYN64, 4)[2]
    rec = {**rec, "video": rec["video"][:, :, :48], "mask": rec["mask"][:, :, :48]}  # 64 x 48: a crop along x
    spec = _spec(train=True, crop="random", sda_probs=(0.0, 1.0, 0.0))
    for seed in range(3):
        ex = transforms.load_example(rec, spec, np.random.default_rng(seed))
        video_mask = ex["mask"][0] > 0
        for s in spec.subject_sizes:
            subject = ex[f"subject_{s}"][0].max(-1) > 0
            at_video = transforms.resize_images(subject.astype(np.uint8)[None] * 255, (32, 32))[0] > 127
            assert np.mean(at_video != video_mask) < 0.04, (seed, s)


def test_detail_size_bounds_the_decoded_pixels():
    spec = dataclasses.replace(_spec(), height=256, width=256, subject_sizes=(384, 320, 256), clip_size=224,
                               clip_load_size=448)
    # a 4K source cropped to 256: decoded at 448 / 256 of the video's resize, not at 2160 x 3840
    assert transforms.subject_detail_size((2160, 3840), (256, 455), spec) == (448, 796)
    assert transforms.subject_detail_size((300, 400), (256, 341), spec) == (300, 400)  # smaller: its own


def test_clip_branch_is_loaded_at_its_load_size_then_bicubic_antialiased():
    """subject_clip = the region at clip_load_size (centre crop of a shorter-side resize), then bicubic with
    antialias to clip_size: torch.nn.functional.interpolate(mode="bicubic", antialias=True) within 1 of 255."""
    import torch

    rec = SyntheticSource(SYN64, 4)[3]
    spec = _spec()
    ex = transforms.load_example(rec, spec, np.random.default_rng(0))
    loaded = transforms.resize_images(_entity_at(rec, 48)[None], (32, 32))  # the 32 px video region at load size
    ref = torch.nn.functional.interpolate(torch.from_numpy(loaded).permute(0, 3, 1, 2).double(), size=(16, 16),
                                          mode="bicubic", antialias=True, align_corners=False)
    ref = ref.round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    diff = np.abs(ex["subject_clip"][:1].astype(float) - ref)
    box = np.abs(transforms.resize_images(loaded, (16, 16)).astype(float) - ref)  # a box filter instead
    print(f"subject_clip vs torch bicubic antialias: mean |diff| {diff.mean():.3f}, max {diff.max()}, share > 1 "
          f"{np.mean(diff > 1):.4f}; box filter: mean {box.mean():.3f}")
    # PIL rounds to uint8 between its two passes: a few pixels at the black background's edges differ by more
    assert diff.mean() < 0.2 and np.mean(diff > 1) < 0.02 and box.mean() > 2 * diff.mean()
    # non-square: the shorter side to the load size, centre crop
    wide = np.zeros((1, 40, 80, 3), np.uint8)
    wide[:, :, 20:60] = 200
    out = transforms.clip_preprocess(wide, 16, 32)
    assert out.shape == (1, 16, 16, 3) and out.min() > 150  # only the centre 40 x 40 (all 200) is kept


def test_older_configs_keep_their_clip_load_and_image_layer():
    """A data config without `subject.clip_load_size` loads the CLIP branch at clip_size (as it was trained); a run
    config without `task_options.image_layer` reads the penultimate hidden state; the configs record the paper's."""
    data = data_config()
    data.subject.enabled = True
    assert loader_spec(data, train=False).clip_load_size == 448
    old = ml_collections.ConfigDict(json.loads(data.to_json()))
    del old.subject["clip_load_size"]
    assert loader_spec(old, train=False).clip_load_size == old.subject.clip_size
    assert IMAGE_LAYER == -1 and image_layer_of({}) == UNRECORDED_IMAGE_LAYER == -2
    assert image_layer_of(None) == -2 and image_layer_of({"image_layer": -1}) == -1
    for variant in ("tiny", "base"):
        assert load_config("magdiff", variant).task_options.image_layer == -1
    with pytest.raises(ValueError, match="image_layer must be an integer"):
        image_layer_of({"image_layer": "last"})


@pytest.fixture(scope="module")
def subject_models():
    """configs/magdiff.py:tiny's VAE and CLIP vision tower, random weights."""
    m = load_config("magdiff").model
    models, params = {}, {}
    for name, kind in (("vae", "vae"), ("image_encoder", "clip_vision")):
        spec = get_model(kind)
        module = spec.build(config_from_dict(spec.config_cls, m[name].to_dict()))
        args = spec.example_inputs(module.config)
        models[name] = module
        params[name] = jax.jit(lambda k, a=args, mod=module: mod.init(k, *a)["params"])(jax.random.key(3))
    return models, params


def test_no_subject_input_is_a_black_images_latents_and_tokens(subject_models):
    """The loader's dropped subject (mode "none") is what sampling drops to (`black_subject`), and the U-Net sees it
    as a black image's CLIP tokens (the last hidden state, the same for every frame) and VAE latents: not zeros."""
    models, params = subject_models
    rec = SyntheticSource(dataclasses.replace(SYN64, size=32), 2)[0]
    spec = _spec(clip_size=32, clip_load_size=64)  # the tiny CLIP tower's 32 px
    sizes = spec.subject_sizes
    first = transforms.normalize_example(transforms.load_example(rec, spec, np.random.default_rng(0)))
    none = transforms.normalize_example(transforms.load_example(rec, dataclasses.replace(spec, sda_eval_mode="none"),
                                                                np.random.default_rng(0)))
    keys = subject_keys(sizes)
    dropped = black_subject({k: first[k][None] for k in keys})
    for k in keys:
        np.testing.assert_allclose(np.asarray(dropped[k]), none[k][None], rtol=0, atol=1e-6, err_msg=k)

    cond = jax.jit(lambda p, s: subject_condition(models, p, s, sizes=sizes))(params, dropped)
    tokens = np.asarray(cond["image_embeds"])
    black = np.asarray(dropped["subject_clip"][0, :1])
    ref = models["image_encoder"].apply({"params": params["image_encoder"]}, black).last_hidden_state
    np.testing.assert_allclose(tokens[0, 0], np.asarray(ref[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tokens[0, 1], tokens[0, 0], rtol=1e-6, atol=1e-6)
    assert np.abs(tokens).mean() > 0.1
    for latent in cond["entity_latents"]:
        assert np.abs(np.asarray(latent)).mean() > 1e-3  # the VAE latent of a black image is not zero (A.5)


def _tiny_abstract():
    """configs/magdiff.py:tiny's four models and their abstract parameters ({name: nested ShapeDtypeStructs})."""
    from flax import traverse_util

    from magdiff_jax.train.tasks import get_task

    tiny = load_config("magdiff", "tiny")
    task = get_task("magdiff")
    modules, params = {}, {}
    for name, (kind, cfg) in task.models(tiny).items():
        spec = get_model(kind)
        modules[name] = spec.build(cfg)
        params[name] = traverse_util.unflatten_dict(spec.abstract_params(modules[name]))
    return task, tiny, modules, params


# the submodule that names a parameter's group: the first of these on its path
GROUP_NAMES = ("image_proj", "entity_pyramid", "conv_in", "transformer_in", "time_embedding", "temp_convs",
               "temp_attentions", "transformer_blocks", "resnets", "downsamplers", "upsamplers", "conv_norm_out",
               "conv_out", "proj_in", "proj_out", "norm")


def test_trainable_subset_is_the_paper_codes():
    """configs/magdiff.py:base's group `unet` (PAPERS.md A.7) on the tiny models: temporal layers, the spatial
    transformer blocks (with the entity attention), conv_in, the resampler and the pyramid train (and transformer_in,
    the temporal transformer of the ModelScope layout); the resnets,
    samplers, time embedding, the spatial transformers' proj_in/proj_out/norm, conv_out, the VAE and the text and
    image towers stay frozen."""
    from magdiff_jax.train.groups import split_params
    from magdiff_jax.train.optim import flat

    task, _, _, params = _tiny_abstract()
    trained, frozen = split_params(params, task.groups(load_config("magdiff", "base")))
    assert list(trained) == ["unet"]

    def kinds(tree):
        out = set()
        for path in flat(tree):
            parts = path.split("/")
            if parts[0] != "unet":
                out.add(parts[0])
                continue
            named = [p.rstrip("_0123456789") for p in parts[1:] if p.rstrip("_0123456789") in GROUP_NAMES]
            out.add(f"unet/{named[0] if named else parts[2]}")
        return out

    print("trained:", sorted(kinds(trained)), "\nfrozen:", sorted(kinds(frozen)))
    # transformer_in: the ModelScope layout's temporal transformer after conv_in (A.6), temporal like temp_*
    assert kinds(trained) == {"unet/conv_in", "unet/transformer_in", "unet/temp_convs", "unet/temp_attentions",
                              "unet/transformer_blocks", "unet/image_proj", "unet/entity_pyramid"}
    assert kinds(frozen) == {"unet/resnets", "unet/downsamplers", "unet/upsamplers", "unet/time_embedding",
                             "unet/proj_in", "unet/proj_out", "unet/norm", "unet/conv_norm_out", "unet/conv_out",
                             "vae", "text_encoder", "image_encoder"}
    names = flat(trained["unet"])
    assert any(p.endswith("attn2/to_k_ip/kernel") for p in names)
    assert any(p.endswith("attn2/image_scale") for p in names)


def test_training_runs_the_unet_with_dropout_and_sampling_without():
    """`MagDiffTask.update` (traced, never compiled) applies the U-Net with deterministic=False and a "dropout" key
    from the step's key (the temporal convs' dropout 0.1 is live, as in diffusers' training; the base config's
    default, `task_options.dropout`); its preview (the pipeline's `generate`) applies it deterministically."""
    import types

    task, config, modules, params = _tiny_abstract()
    calls = []

    class Recorder:
        def __init__(self, module):
            self.module, self.config = module, module.config

        def apply(self, variables, x, t, ctx, **kwargs):
            calls.append({k: kwargs.get(k) for k in ("deterministic", "rngs")})
            return jnp.zeros_like(x)

    modules = {**modules, "unet": Recorder(modules["unet"])}
    f, sizes = 2, tuple(config.data.subject.sizes)
    batch = {"video": jnp.zeros((1, f, 32, 32, 3)), "tokens": jnp.zeros((1, 16), jnp.int32),
             "null_tokens": jnp.zeros((1, 16), jnp.int32),
             **{f"subject_{s}": jnp.zeros((1, f, s, s, 3)) for s in sizes},
             "subject_clip": jnp.zeros((1, f, 32, 32, 3))}
    ctx = types.SimpleNamespace(config=config, modules=modules,
                                minimize=lambda fn: (jax.eval_shape(lambda p: fn(p)[0], params),))
    assert load_config("magdiff", "base").task_options.dropout is True
    config.task_options.dropout = True
    task.update(ctx, batch, jax.random.key(0))
    assert calls and all(c["deterministic"] is False and "dropout" in (c["rngs"] or {}) for c in calls), calls
    calls.clear()
    config.task_options.dropout = False  # the option off: deterministic training
    task.update(ctx, batch, jax.random.key(0))
    assert calls and all(c["deterministic"] is True for c in calls), calls
    calls.clear()
    config.preview.num_steps = 2
    jax.eval_shape(lambda p: task.preview(modules, p, batch, jax.random.key(1), config=config), params)
    assert calls and all(c["deterministic"] in (None, True) and not c["rngs"] for c in calls), calls


def test_image_guidance_is_refused_without_subject_dropout(tmp_path):
    """Two-scale guidance on a stage whose config trained no "no subject" input is refused, saying why, before a
    model loads (the CLI reads the stage's config alone); a stage with subject dropout passes the check."""
    from magdiff_jax import cli
    from magdiff_jax.pipelines.magdiff import check_image_guidance, subject_dropout

    base = load_config("magdiff", "base")
    assert subject_dropout(base) == pytest.approx(0.05) and subject_dropout(load_config("magdiff", "tiny")) > 0
    check_image_guidance(base, 1.5, "base")
    check_image_guidance(ml_collections.ConfigDict({"data": {}}), None, "x")  # text-only guidance: always fine
    stage = tmp_path / "stage"
    stage.mkdir()
    config = {"data": {"num_frames": 2, "subject": {"probs": {"none": 0.0, "first": 0.8, "all": 0.2}}}}
    (stage / "stage.json").write_text(json.dumps({"format": "magdiff_jax_stage", "format_version": 1, "task":
                                                  "magdiff", "step": 0, "models": {}, "tokenizer": None,
                                                  "config": config}))
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "s.png")
    args = cli.build_parser().parse_args(["sample", "--workdir", str(stage), "--subject", str(tmp_path / "s.png"),
                                          "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"),
                                          "--image-guidance", "1.5"])
    with pytest.raises(ValueError, match=r"subject dropout.*probs.none = 0.*never\s+trained"):
        cli._generate(args)
    assert not (tmp_path / "o.mp4").exists()


def test_initial_noise_is_iid_by_default_and_pyoco_on_request():
    """Sampling's first latent: i.i.d. N(0, I) by default (the same draw as before the option, so seeds give the
    same videos), PYoCo mixed / progressive frame correlation on request (alpha 2: corr 4/5 between any frames,
    (2/sqrt(5))^|i-j| progressive), unit variance either way; a bad option is refused before compiling."""
    from magdiff_jax.pipelines.magdiff import MagDiffPipeline, initial_noise

    key, shape = jax.random.key(0), (512, 3, 4, 4, 4)
    np.testing.assert_array_equal(initial_noise(key, shape), jax.random.normal(key, shape))

    def corr(x, i, j):
        return float(np.corrcoef(np.asarray(x[:, i]).ravel(), np.asarray(x[:, j]).ravel())[0, 1])

    iid, mixed, prog = (initial_noise(key, shape, n) for n in (("iid", 0.0), ("mixed", 2.0), ("progressive", 2.0)))
    assert abs(corr(iid, 0, 2)) < 0.05
    assert abs(corr(mixed, 0, 2) - 0.8) < 0.03 and abs(corr(mixed, 0, 1) - 0.8) < 0.03
    assert abs(corr(prog, 0, 1) - 0.8 ** 0.5) < 0.03 and abs(corr(prog, 0, 2) - 0.8) < 0.03
    for x in (mixed, prog):
        assert abs(float(np.std(np.asarray(x))) - 1) < 0.03
    pipe = MagDiffPipeline.__new__(MagDiffPipeline)  # the checks run before any model is touched
    pipe.config = ml_collections.ConfigDict({"data": {"subject": {"probs": {"none": 0.05}}}})
    pipe.stage = None
    with pytest.raises(ValueError, match="noise correlation must be one of"):
        pipe([], [], noise=("pink", 1.0))
    with pytest.raises(ValueError, match=r"alpha .* must be a finite number >= 0"):
        pipe([], [], noise=("mixed", -1.0))
