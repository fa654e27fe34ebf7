"""Pre-encoded latents and text embeddings (`magdiff_jax.data.encode`): what is stored equals the frozen encoders'
output on the evaluation pipeline's batches, shards split the records exactly, and the encoded source feeds the
Grain pipeline (caption dropout onto the null-caption embedding, posterior samples)."""

from __future__ import annotations

import argparse
import json
import pickle

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.serialization import msgpack_restore
from helpers import random_params, write_tokenizer

from magdiff_jax.data import encode
from magdiff_jax.data import encoded as encoded_data
from magdiff_jax.data.bad_input import TooManyBadInputs
from magdiff_jax.data.pipeline import data_config, make_dataset
from magdiff_jax.data.sources import SyntheticSource
from magdiff_jax.data.synthetic import SyntheticConfig
from magdiff_jax.export import save_model
from magdiff_jax.models.clip import CLIPTextConfig, CLIPTextModel
from magdiff_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

NUM, FRAMES, SIZE, BATCH = 5, 3, 32, 2
VAE_CONFIG = AutoencoderKLConfig(
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=SIZE, scaling_factor=0.3,
)
CLIP_CONFIG = CLIPTextConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, eos_token_id=2)


def small_config():
    c = data_config()
    c.synthetic.num, c.synthetic.num_frames, c.synthetic.size = NUM, 4, SIZE
    c.num_frames, c.resolution, c.prefetch = FRAMES, (SIZE, SIZE), 0
    return c


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    vae = AutoencoderKL(VAE_CONFIG)
    vae_params = random_params(vae, np.zeros((1, SIZE, SIZE, 3), np.float32), seed=1)
    text = CLIPTextModel(CLIP_CONFIG)
    text_params = random_params(text, np.zeros((1, 77), np.int32), seed=2)
    save_model("vae", vae, vae_params, root / "vae")
    save_model("clip_text", text, text_params, root / "text_encoder")
    write_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
    return {"root": root, "vae": (vae, vae_params), "text": (text, text_params),
            "dirs": dict(vae_dir=root / "vae", text_encoder_dir=root / "text_encoder",
                         tokenizer_dir=root / "tokenizer")}


@pytest.fixture(scope="module")
def encoded(models, tmp_path_factory):
    """The synthetic dataset encoded as processes 0 and 1 of 2 (process 1 first: either order works)."""
    out = tmp_path_factory.mktemp("encoded") / "out"
    for index in (1, 0):
        encode.encode_dataset(small_config(), out_dir=out, batch_size=BATCH, process_index=index, process_count=2,
                              **models["dirs"])
    return out


@pytest.fixture(scope="module")
def vae_encode(models):
    vae, params = models["vae"]
    return jax.jit(lambda x: vae.apply({"params": params}, x, method="encode"))


@pytest.fixture(scope="module")
def text_encode(models):
    text, params = models["text"]
    return jax.jit(lambda t: text.apply({"params": params}, t, output_hidden_states=True))


def read_shard(path) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    records = [msgpack_restore(b) for b in reader.read_all()]
    reader.close()
    return records


def test_files_and_metadata(encoded):
    names = sorted(p.name for p in encoded.iterdir())
    assert names == ["bad_inputs.1.json", "bad_inputs.json", "encoded-00000-of-00002.array_record",
                     "encoded-00000-of-00002.json", "encoded-00001-of-00002.array_record",
                     "encoded-00001-of-00002.json", "encoded.json", "null_text.msgpack"]
    meta = json.loads((encoded / "encoded.json").read_text())
    assert meta["num_shards"] == 2 and meta["scaling_factor"] == 0.3 and meta["dtype"] == "float32"
    assert meta["latent_shape"] == [FRAMES, SIZE // 2, SIZE // 2, 4] and meta["text_shape"] == [77, 16]
    assert meta["data"]["num_frames"] == FRAMES and meta["data"]["crop"] == "center"
    shards = [json.loads((encoded / f"encoded-0000{i}-of-00002.json").read_text()) for i in range(2)]
    assert [s["count"] for s in shards] == [3, 2] and [s["num_bad"] for s in shards] == [0, 0]
    assert shards[0]["shapes"]["latents_mean"] == meta["latent_shape"]


def test_shards_hold_every_record_once_and_match_the_encoders(encoded, vae_encode, text_encode):
    for index in range(2):
        records = read_shard(encoded / f"encoded-0000{index}-of-00002.array_record")
        config = small_config()
        config.tokenizer = json.loads((encoded / "encoded.json").read_text())["tokenizer"]
        batches = list(make_dataset(config, batch_size=BATCH, train=False, process_index=index, process_count=2))
        assert [len(b["key"]) for b in batches] == ([2, 1] if index == 0 else [2])  # the partial batch is kept
        examples = [{k: v[j] for k, v in b.items()} for b in batches for j in range(len(b["key"]))]
        assert [r["key"] for r in records] == [str(e["key"]) for e in examples]
        for rec, ex in zip(records, examples):
            mean, logvar = vae_encode(ex["video"])  # (F, H, W, 3) in [-1, 1]
            np.testing.assert_allclose(rec["latents_mean"], mean, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(rec["latents_std"], np.exp(0.5 * np.asarray(logvar)), atol=1e-5, rtol=1e-5)
            assert rec["latents_mean"].dtype == np.float32 and rec["latents_mean"].shape == (FRAMES, 16, 16, 4)
            np.testing.assert_array_equal(rec["tokens"], ex["tokens"])
            assert rec["caption"] == str(ex["caption"])
            ref = text_encode(ex["tokens"][None]).last_hidden_state[0]
            np.testing.assert_allclose(rec["text_embeddings"], ref, atol=1e-5, rtol=1e-5)
    keys = [r["key"] for i in range(2) for r in read_shard(encoded / f"encoded-0000{i}-of-00002.array_record")]
    assert sorted(keys) == sorted(SyntheticSource(SyntheticConfig(num_frames=4, size=SIZE), NUM)[i]["key"]
                                  for i in range(NUM))


def test_null_text_is_the_empty_caption(models, encoded, text_encode):
    from magdiff_jax.models.tokenizer import CLIPTokenizer

    src = encoded_data.EncodedSource(encoded)
    tokens = CLIPTokenizer.from_folder(models["dirs"]["tokenizer_dir"])([""])
    np.testing.assert_array_equal(src.null_tokens, tokens[0])
    np.testing.assert_allclose(src.null_text_embeddings, text_encode(tokens).last_hidden_state[0], atol=1e-5)


def test_penultimate_text_layer(models, text_encode):
    text, params = models["text"]
    tokens = np.arange(2 * 77, dtype=np.int32).reshape(2, 77) % 60
    got = encode.encode_text(text, params, tokens, text_layer="penultimate")
    h = text_encode(tokens).hidden_states[-2]
    ln = params["final_layer_norm"]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    ref = (h - mu) / jnp.sqrt(var + CLIP_CONFIG.layer_norm_eps) * ln["scale"] + ln["bias"]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    last = encode.encode_text(text, params, tokens)
    np.testing.assert_allclose(last, text_encode(tokens).last_hidden_state, atol=1e-6)


def test_encoded_source_through_grain(encoded):
    src = encoded_data.EncodedSource(encoded)
    assert len(src) == src.total == NUM and src.bad == [] and src.metadata["num_shards"] == 2
    src = pickle.loads(pickle.dumps(src))  # readers open lazily, after pickling
    assert set(src[4]) == set(encoded_data.RECORD_KEYS)
    config = small_config()
    config.source, config.path = "encoded", str(encoded)
    loader = encoded_data.encoded_loader(config, train=False)
    ds = grain.MapDataset.source(src)[0::1].random_map(loader, seed=0).to_iter_dataset().batch(2)
    batches = list(ds)
    assert [len(b["key"]) for b in batches] == [2, 2, 1]
    b = batches[0]
    assert b["latents_mean"].shape == (2, FRAMES, 16, 16, 4) and b["latents_std"].shape == b["latents_mean"].shape
    assert b["text_embeddings"].shape == (2, 77, 16) and b["tokens"].shape == (2, 77) and b["tokens"].dtype == np.int32
    np.testing.assert_array_equal(b["latents_mean"][0], src[0]["latents_mean"])


def test_caption_dropout_and_posterior_samples_in_the_pipeline(encoded):
    src = encoded_data.EncodedSource(encoded)
    config = small_config()
    config.source, config.path, config.caption_dropout, config.encoded_sample = "encoded", str(encoded), 1.0, True
    batch = next(iter(make_dataset(config, batch_size=4, train=True, process_index=0, process_count=1)))
    assert batch["text_embeddings"].shape == (4, 77, 16)
    for j in range(4):
        np.testing.assert_array_equal(batch["text_embeddings"][j], src.null_text_embeddings)
        np.testing.assert_array_equal(batch["tokens"][j], src.null_tokens)
    assert list(batch["caption"]) == [""] * 4 and "latents_mean" not in batch
    rec = next(src[i] for i in range(len(src)) if src[i]["key"] == batch["key"][0])
    z = (batch["latents"][0] - rec["latents_mean"]) / rec["latents_std"]  # a standard normal draw
    assert batch["latents"].dtype == np.float32 and 0.5 < z.std() < 1.5 and not np.allclose(z, 0)
    config.caption_dropout, config.encoded_sample = 0.0, False  # evaluation: the stored mean, the real caption
    batch = next(iter(make_dataset(config, batch_size=2, train=False, process_index=0, process_count=1)))
    np.testing.assert_array_equal(batch["text_embeddings"][0], src[0]["text_embeddings"])
    assert batch["caption"][0] == src[0]["caption"] != ""


def test_missing_shard_is_named(encoded, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(encoded, copy)
    (copy / "encoded-00001-of-00002.array_record").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoded-00001-of-00002\.array_record"):
        encoded_data.EncodedSource(copy)
    (copy / "encoded.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoded\.json"):
        encoded_data.EncodedSource(copy)


def test_existing_output_is_refused_unless_overwrite(models, encoded, tmp_path):
    with pytest.raises(FileExistsError, match="not empty"):
        encode.encode_dataset(small_config(), out_dir=encoded, batch_size=BATCH, process_index=0, process_count=2,
                              **models["dirs"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        encode.encode_dataset(small_config(), out_dir=other, batch_size=BATCH, process_index=1, process_count=2,
                              **models["dirs"])
    config = small_config()
    config.synthetic.num = 2
    out = tmp_path / "again"
    encode.encode_dataset(config, out_dir=out, batch_size=BATCH, process_index=0, process_count=1, **models["dirs"])
    (out / "stale").mkdir()
    encode.encode_dataset(config, out_dir=out, batch_size=BATCH, process_index=0, process_count=1, overwrite=True,
                          dtype="float16", **models["dirs"])
    src = encoded_data.EncodedSource(out)
    assert len(src) == 2 and src[0]["latents_mean"].dtype == np.float16 and src.metadata["dtype"] == "float16"
    assert src.null_text_embeddings.dtype == np.float16
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


class _WithBad:
    """The synthetic source with record 1 too short for the clip length."""

    def __init__(self, n):
        self.inner, self.bad = SyntheticSource(SyntheticConfig(num_frames=4, size=SIZE), n), []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        r = self.inner[i]
        return {**r, "video": r["video"][:1]} if i == 1 else r


def test_bad_inputs_are_counted_and_reported(models, tmp_path):
    config = small_config()
    config.max_bad_fraction = 0.5
    out = encode.encode_dataset(config, out_dir=tmp_path / "out", batch_size=BATCH, process_index=0,
                                process_count=1, source=_WithBad(3), **models["dirs"])
    shard = json.loads((out / "encoded-00000-of-00001.json").read_text())
    assert shard["count"] == 2 and shard["num_bad"] == 1 and shard["total"] == 3
    report = json.loads((out / "bad_inputs.json").read_text())
    assert report["bad"][0]["key"].endswith("00001") and "usable frames" in report["bad"][0]["reason"]
    config.max_bad_fraction = 0.1
    with pytest.raises(TooManyBadInputs):
        encode.encode_dataset(config, out_dir=tmp_path / "strict", batch_size=BATCH, process_index=0,
                              process_count=1, source=_WithBad(3), **models["dirs"])
    assert not (tmp_path / "strict" / "encoded-00000-of-00001.array_record").exists()


def test_cli(models, tmp_path):
    root = models["root"]
    parser = encode.add_encode_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", "synthetic", "--synthetic-num", "2", "--pipeline", str(root), "--out",
                              str(tmp_path / "cli"), "--frames", str(FRAMES), "--resolution", f"{SIZE}x{SIZE}",
                              "--batch-size", str(BATCH)])
    out = encode.run_encode_cli(args)
    src = encoded_data.EncodedSource(out)
    assert len(src) == 2 and src.metadata["latent_shape"] == [FRAMES, 16, 16, 4]
    assert src.metadata["vae"] == str(root / "vae")
    bad = parser.parse_args(["--data", "synthetic", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--pipeline"):
        encode.run_encode_cli(bad)


def test_frames_per_call_bounds_the_vae_batch_without_changing_results(models, vae_encode):
    vae, params = models["vae"]
    video = np.random.RandomState(0).randint(0, 256, (2, FRAMES, SIZE, SIZE, 3)).astype(np.uint8)
    whole = encode.encode_posterior(vae, params, video)
    chunked = encode.encode_posterior(vae, params, video, frames_per_call=4, dtype="float16")
    assert chunked[0].dtype == np.float16 and chunked[0].shape == (2, FRAMES, 16, 16, 4)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b.astype(np.float32), rtol=2e-3, atol=2e-3)
    mean, _ = vae_encode(video[1].astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(whole[0][1], mean, atol=1e-5, rtol=1e-5)


def test_models_that_do_not_fit_are_refused_before_their_weights_load(models, tmp_path, monkeypatch):
    """A text encoder given as the VAE, or a resolution the VAE cannot take, fails from the config files alone."""
    from magdiff_jax.export import model as model_io

    def no_weights(*args, **kwargs):
        raise AssertionError("a model's weights were read")

    monkeypatch.setattr(model_io, "load_model", no_weights)
    dirs = dict(models["dirs"], vae_dir=models["root"] / "text_encoder")
    with pytest.raises(ValueError, match="text_encoder holds a 'clip_text' model, not 'vae'"):
        encode.encode_dataset(small_config(), out_dir=tmp_path / "a", **dirs)
    odd = small_config()
    odd.resolution = (SIZE + 1, SIZE)
    with pytest.raises(ValueError, match="does not divide by the VAE's downsampling factor"):
        encode.encode_dataset(odd, out_dir=tmp_path / "b", **models["dirs"])
