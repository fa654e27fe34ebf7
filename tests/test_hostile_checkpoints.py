"""Hostile and broken checkpoint files: each gets one clear line naming the culprit (file, tensor, field, value),
never a silently wrong result or a Python traceback, and nothing already written is lost.

- safetensors headers that lie (hand-built: 8-byte length + JSON + bytes): offsets negative, reversed, overlapping,
  with gaps, past the end; negative, non-integer or mistyped dimensions; mistyped dtype and offsets; a header that
  is deeply nested, huge or names a tensor twice. Checked as the reference `safetensors` library checks them;
- sharded folders: an index whose weight_map leaves the folder (`..`, an absolute path, a symlink) or is missing,
  malformed, or disagrees with its shards; a folder holding both a single file and an index;
- writing over an older export (`save_torch`, `convert to-torch`, `magdiff_to_torch`, `export.save_model`): refused
  unless overwrite, the old folder untouched; with overwrite only the new files remain;
- config.json fields of the wrong type or value, in diffusers/transformers config.json and in our own JSON.

Models are tiny (a one-layer CLIP text tower) and nothing is compiled.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import flat_params, random_params

from magdiff_jax.convert import CheckpointFormatError, load_torch, save_torch
from magdiff_jax.convert import safetensors_io as sio
from magdiff_jax.convert.core import torch_format
from magdiff_jax.export import load_model, save_model
from magdiff_jax.models.registry import get_model

REPO = Path(__file__).parents[1]
F32 = "F32"

CLIP_TEXT = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 16, "hidden_size": 8,
             "intermediate_size": 16, "projection_dim": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "pad_token_id": 1,
             "bos_token_id": 0, "eos_token_id": 2}


# --- hand-built safetensors files -----------------------------------------------------------------------------------
def write_raw(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """8-byte little-endian header length, the header (a dict as JSON, or raw bytes), the data bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def entry(offsets, shape=(4,), dtype=F32):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}


def read_raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


DATA16 = np.arange(4, dtype=np.float32).tobytes()
DATA32 = np.arange(8, dtype=np.float32).tobytes()
DATA48 = np.arange(12, dtype=np.float32).tobytes()

# (id, header, data, words the one-line error must contain besides the file)
LYING_HEADERS = [
    ("negative-offset", {"a": entry([0, 16]), "b": entry([-16, 32])}, DATA32, ["'b'", "[-16, 32]"]),
    ("reversed-offsets", {"a": entry([0, 16]), "b": entry([16, 0], shape=[0])}, DATA16, ["'b'", "[16, 0]"]),
    ("overlapping", {"a": entry([0, 16]), "b": entry([0, 16])}, DATA16, ["overlap"]),
    ("gap", {"a": entry([0, 16]), "b": entry([32, 48])}, DATA48, ["'b'", "[32, 48]"]),
    ("uncovered-tail", {"a": entry([0, 16])}, DATA32, ["16 of the 32"]),
    ("past-the-end", {"a": entry([0, 16]), "b": entry([16, 48], shape=[8])}, DATA32, ["'b'", "past the end"]),
    ("size-mismatch", {"a": entry([0, 16], shape=[3])}, DATA16, ["'a'", "12"]),
    ("negative-dimension", {"a": entry([0, 16], shape=[-1, 4])}, DATA16, ["'a'", "[-1, 4]"]),
    ("float-dimension", {"a": entry([0, 16], shape=[2.0, 2])}, DATA16, ["'a'", "shape"]),
    ("bool-dimension", {"a": entry([0, 16], shape=[True, 4])}, DATA16, ["'a'", "shape"]),
    ("shape-not-a-list", {"a": entry([0, 16], shape="4")}, DATA16, ["'a'", "shape"]),
    ("dtype-not-a-string", {"a": entry([0, 16], dtype=["F32"])}, DATA16, ["'a'", "dtype"]),
    ("offsets-as-strings", {"a": entry([0, "16"])}, DATA16, ["'a'", "data_offsets"]),
    ("offsets-as-floats", {"a": entry([0.0, 16.0])}, DATA16, ["'a'", "data_offsets"]),
    ("offsets-not-a-pair", {"a": entry([0, 16, 16])}, DATA16, ["'a'", "data_offsets"]),
    ("entry-not-an-object", {"a": [0, 16]}, DATA16, ["'a'"]),
    ("metadata-not-strings", {"__metadata__": {"format": 1}, "a": entry([0, 16])}, DATA16, ["__metadata__"]),
    ("duplicate-name", b'{"a":' + json.dumps(entry([0, 16])).encode() + b',"a":'
     + json.dumps(entry([0, 16])).encode() + b"}", DATA16, ["'a'", "twice"]),
    ("deeply-nested", b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", ["nest"]),
]


@pytest.mark.parametrize("header,data,words", [c[1:] for c in LYING_HEADERS], ids=[c[0] for c in LYING_HEADERS])
def test_lying_safetensors_headers_are_refused(tmp_path, header, data, words):
    path = write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointFormatError) as info:
        sio.read_file(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    for word in words:
        assert word in msg, msg


def test_huge_header_is_refused_before_it_is_read(tmp_path):
    """A header length over the reference library's 100 MB limit is refused from the 8 length bytes alone (the
    file is sparse: nothing of it is read)."""
    path = tmp_path / "huge.safetensors"
    n = 150_000_000
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n)
    with pytest.raises(CheckpointFormatError, match=r"header of 150000000 bytes exceeds the 100000000-byte limit"):
        sio.read_file(path)


def test_valid_files_still_read(tmp_path):
    """The checks refuse no valid file: the reference writer's (dtype-sorted, with an empty and a 0-d tensor) and
    ours read back equal."""
    import safetensors.numpy

    tensors = {"z": np.arange(6, dtype=np.float16).reshape(2, 3), "a": np.ones((2, 2), np.float32),
               "empty": np.zeros((0, 3), np.float32), "scalar": np.array(3, np.int64), "mask": np.array([True, False])}
    safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    sio.write_state_dict(tensors, tmp_path, "ours")
    for name in ("ref", "ours"):
        back = sio.read_file(tmp_path / f"{name}.safetensors")
        assert set(back) == set(tensors)
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), (name, k)


# --- sharded folders ------------------------------------------------------------------------------------------------
def _shard(folder: Path, stem: str, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return sio.write_state_dict(tensors, folder, stem)[0]


def _index(folder: Path, content, stem: str = "model") -> Path:
    path = folder / f"{stem}.safetensors.index.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


W = {"w": np.arange(4, dtype=np.float32)}


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    outside = _shard(tmp_path / "elsewhere", "secret", W)
    model = tmp_path / "model"
    model.mkdir()
    for target in ("../elsewhere/secret.safetensors", str(outside)):
        index = _index(model, {"weight_map": {"w": target}})
        with pytest.raises(CheckpointFormatError) as info:
            sio.read_state_dict(model, "model")
        msg = str(info.value)
        assert str(index) in msg and target in msg and "\n" not in msg, msg
    # a shard that is a symlink resolving outside the folder
    (model / "model-00001-of-00001.safetensors").symlink_to(outside)
    index = _index(model, {"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    with pytest.raises(CheckpointFormatError, match="outside the model folder") as info:
        sio.read_state_dict(model, "model")
    assert str(index) in str(info.value) and str(outside) in str(info.value)


def test_symlinks_inside_the_folder_and_the_hub_cache_are_followed(tmp_path):
    """A shard linked to another file of the model folder loads; so does a Hugging Face hub cache snapshot, whose
    files are links to the repository's blobs/."""
    model = tmp_path / "model"
    _shard(model / "real", "part", W)
    (model / "model-00001-of-00001.safetensors").symlink_to(Path("real") / "part.safetensors")
    _index(model, {"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    assert np.array_equal(sio.read_state_dict(model, "model")["w"], W["w"])

    repo = tmp_path / "hub" / "models--org--name"
    blob = _shard(repo / "blobs", "0123abcd", W)
    unet = repo / "snapshots" / "deadbeef" / "unet"
    unet.mkdir(parents=True)
    (unet / "model-00001-of-00001.safetensors").symlink_to(Path("../../..") / "blobs" / blob.name)
    _index(unet, {"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    assert np.array_equal(sio.read_state_dict(unet, "model")["w"], W["w"])


BAD_INDEXES = [
    ("not-json", "{weight_map: }", ["not valid JSON"]),
    ("not-an-object", [], ["JSON object"]),
    ("no-weight-map", {"metadata": {}}, ["no weight_map"]),
    ("weight-map-a-list", {"weight_map": ["model-00001-of-00001.safetensors"]}, ["weight_map", "list"]),
    ("non-string-file", {"weight_map": {"w": 5}}, ["'w'", "5"]),
    ("missing-shard", {"weight_map": {"w": "model-00002-of-00002.safetensors"}}, ["do not exist"]),
    ("tensor-not-in-its-shard", {"weight_map": {"w": "model-00001-of-00001.safetensors",
                                                "v": "model-00001-of-00001.safetensors"}}, ["'v'"]),
    ("tensor-not-in-the-map", {"weight_map": {"v": "model-00001-of-00001.safetensors"}}, ["'w'"]),
]


@pytest.mark.parametrize("content,words", [c[1:] for c in BAD_INDEXES], ids=[c[0] for c in BAD_INDEXES])
def test_malformed_index_is_a_named_error(tmp_path, content, words):
    _shard(tmp_path, "model-00001-of-00001", W)
    index = _index(tmp_path, content)
    with pytest.raises(CheckpointFormatError) as info:
        sio.read_state_dict(tmp_path, "model")
    msg = str(info.value)
    assert str(tmp_path) in msg and "\n" not in msg, msg
    assert index.name in msg or "model-00001-of-00001" in msg, msg
    for word in words:
        assert word in msg, msg


def test_single_file_beside_an_index_is_ambiguous(tmp_path):
    _shard(tmp_path, "model-00001-of-00001", W)
    _index(tmp_path, {"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    _shard(tmp_path, "model", {"w": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointFormatError, match=r"both model\.safetensors and model\.safetensors\.index\.json"):
        sio.read_state_dict(tmp_path, "model")


# --- writing over an older export -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip():
    """A one-layer CLIP text tower and two different sets of random parameters."""
    spec, cfg = get_model("clip_text"), torch_format("clip_text").config_from_torch(CLIP_TEXT)
    module = spec.build(cfg)
    old, new = (random_params(module, *spec.example_inputs(cfg), seed=s) for s in (0, 1))
    return module, old, new


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same(a, b) -> bool:
    fa, fb = flat_params(a), flat_params(b)
    return set(fa) == set(fb) and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def test_save_torch_over_an_older_sharded_export(clip, tmp_path):
    """Without overwrite the older sharded export is left as it was; with it only the new files exist and the new
    weights load (the older index no longer wins over them)."""
    module, old, new = clip
    dst = tmp_path / "text_encoder"
    save_torch("clip_text", module, old, dst, max_shard_bytes=2_000)
    assert (dst / "model.safetensors.index.json").exists()
    before = _snapshot(dst)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_torch("clip_text", module, new, dst)
    assert _snapshot(dst) == before
    save_torch("clip_text", module, new, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left beside it
    assert _same(load_torch("clip_text", dst)[1], new)


def test_save_model_over_an_older_export(clip, tmp_path):
    """Our Orbax model folder: refused without overwrite; with it the older folder's files are all gone; a write
    that fails part-way leaves the older folder whole."""
    module, old, new = clip
    dst = tmp_path / "model"
    save_model("clip_text", module, old, dst)
    (dst / "stale.safetensors.index.json").write_text("{}")
    before = _snapshot(dst)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_model("clip_text", module, new, dst)
    assert _snapshot(dst) == before
    with pytest.raises(ValueError, match="Unsupported type"):  # Orbax cannot save the leaf
        save_model("clip_text", module, {"not": object()}, dst, overwrite=True)
    assert _snapshot(dst) == before
    save_model("clip_text", module, new, dst, overwrite=True)
    assert not (dst / "stale.safetensors.index.json").exists()
    assert _same(load_model(dst, kind="clip_text")[2], new)


def test_magdiff_export_over_an_older_export(tmp_path):
    """magdiff_to_torch follows the same rule: an older MagDiff export (it holds magdiff.json) is not replaced unless
    asked; with overwrite the older sharded unet/ is gone."""
    from remat_configs import tiny_magdiff_config

    from magdiff_jax.convert import magdiff as export

    cfg = tiny_magdiff_config(pyramid="single")
    spec = get_model("magdiff")
    module = spec.build(cfg)
    params = random_params(module, *spec.example_inputs(cfg), **spec.example_kwargs(cfg))
    dst = tmp_path / "magdiff_torch"
    export.magdiff_to_torch(module, params, dst, max_shard_bytes=20_000)
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    before = _snapshot(dst)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export.magdiff_to_torch(module, params, dst)
    assert _snapshot(dst) == before
    export.magdiff_to_torch(module, params, dst, overwrite=True)
    assert sorted(p.name for p in (dst / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert _same(export.magdiff_from_torch(dst)[1], params)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "magdiff_jax.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("magdiff-jax: error:")]


def test_cli_to_torch_over_an_older_export(clip, tmp_path):
    """`magdiff-jax convert to-torch` refuses a non-empty destination (exit 1, the older files untouched) unless
    --overwrite, which leaves only the new files."""
    module, old, new = clip
    save_model("clip_text", module, new, tmp_path / "flax")
    dst = tmp_path / "torch"
    save_torch("clip_text", module, old, dst, max_shard_bytes=2_000)
    before = _snapshot(dst)
    r = _cli("convert", "to-torch", "--kind", "clip_text", str(tmp_path / "flax"), str(dst))
    lines = _error_lines(r.stderr)
    assert r.returncode == 1 and len(lines) == 1 and str(dst) in lines[0] and "--overwrite" in lines[0], r.stderr
    assert _snapshot(dst) == before
    r = _cli("convert", "to-torch", "--kind", "clip_text", "--overwrite", str(tmp_path / "flax"), str(dst))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert _same(load_torch("clip_text", dst)[1], new)


def test_cli_to_flax_on_a_lying_header(clip, tmp_path):
    """A real checkpoint whose header gives one tensor another's bytes (overlap, and a gap where its own were):
    `convert to-flax` exits 1 with one line naming the file, and writes nothing."""
    module, old, _ = clip
    src = tmp_path / "torch"
    save_torch("clip_text", module, old, src)
    path = src / "model.safetensors"
    header, data = read_raw(path)
    a, b = "text_model.final_layer_norm.bias", "text_model.final_layer_norm.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    write_raw(path, header, data)
    r = _cli("convert", "to-flax", "--kind", "clip_text", str(src), str(tmp_path / "flax"))
    lines = _error_lines(r.stderr)
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert str(path) in lines[0] and "overlap" in lines[0], lines
    assert not (tmp_path / "flax").exists()


# --- config.json ------------------------------------------------------------------------------------------------------
TORCH_CONFIGS = {
    "unet2d": {"_class_name": "UNet2DConditionModel", "sample_size": 8, "block_out_channels": [8, 16],
               "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
               "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4},
    "unet3d": {"_class_name": "UNet3DConditionModel", "sample_size": 8, "block_out_channels": [16, 32],
               "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
               "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "layers_per_block": 1,
               "cross_attention_dim": 16, "attention_head_dim": 8, "norm_num_groups": 4},
    "unet_motion": {"_class_name": "UNetMotionModel", "sample_size": 8, "block_out_channels": [16, 32],
                    "down_block_types": ["CrossAttnDownBlockMotion", "DownBlockMotion"],
                    "up_block_types": ["UpBlockMotion", "CrossAttnUpBlockMotion"], "layers_per_block": 1,
                    "cross_attention_dim": 16, "num_attention_heads": 2, "motion_num_attention_heads": 2,
                    "norm_num_groups": 4},
    "vae": {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 4, "norm_num_groups": 4, "sample_size": 16},
    "clip_text": CLIP_TEXT,
    "clip_vision": {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": 8,
                    "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 8,
                    "patch_size": 4, "num_channels": 3, "projection_dim": 8},
}

# (kind, field, bad value)
BAD_FIELDS = [
    ("unet2d", "block_out_channels", "8"),
    ("unet2d", "block_out_channels", [0, 16]),
    ("unet2d", "block_out_channels", [-8, 16]),
    ("unet2d", "in_channels", "4"),
    ("unet2d", "layers_per_block", 1.5),
    ("unet2d", "cross_attention_dim", True),
    ("unet2d", "norm_num_groups", 3),
    ("unet2d", "attention_head_dim", 0),
    ("unet2d", "down_block_types", "CrossAttnDownBlock2D"),
    ("unet2d", "layers_per_block", [1, 1, 1]),
    ("unet2d", "act_fn", "swishy"),
    ("unet3d", "attention_head_dim", 0),
    ("unet3d", "norm_num_groups", 5),
    ("unet_motion", "num_attention_heads", "2"),
    ("unet_motion", "block_out_channels", [16, 0]),
    ("vae", "norm_num_groups", 0),
    ("vae", "block_out_channels", {"0": 8}),
    ("vae", "scaling_factor", float("nan")),
    ("clip_text", "num_attention_heads", 0),
    ("clip_text", "hidden_size", "8"),
    ("clip_text", "architectures", 5),
    ("clip_vision", "image_size", "8"),
    ("clip_vision", "patch_size", 0),
    ("clip_vision", "hidden_act", "gelu_fast"),
]


def _config_folder(folder: Path, config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def test_good_torch_configs_pass_the_checks(tmp_path):
    """The configs the bad ones are made from pass: their folders fail only for want of weights."""
    for kind, config in TORCH_CONFIGS.items():
        _config_folder(tmp_path / kind, config)
        with pytest.raises(CheckpointFormatError, match=r"no \.safetensors weights"):
            load_torch(kind, tmp_path / kind)


@pytest.mark.parametrize("kind,field,value", BAD_FIELDS, ids=[f"{k}-{f}-{v}" for k, f, v in BAD_FIELDS])
def test_torch_config_with_a_bad_field_is_named(tmp_path, kind, field, value):
    path = _config_folder(tmp_path, {**TORCH_CONFIGS[kind], field: value})
    with pytest.raises(ValueError) as info:
        load_torch(kind, tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and f"{field}: " in msg and "\n" not in msg, msg


def test_torch_config_that_is_not_an_object(tmp_path):
    path = _config_folder(tmp_path, [TORCH_CONFIGS["unet2d"]])
    with pytest.raises(ValueError, match="JSON object") as info:
        load_torch("unet2d", tmp_path)
    assert str(info.value).startswith(f"{path}: ")


OURS = {"block_out_channels": [8, 16], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 8,
        "attention_head_dim": 2, "norm_num_groups": 4, "sample_size": 8}


@pytest.mark.parametrize("config,field", [
    ({**OURS, "block_out_channels": "8"}, "block_out_channels"),
    ({**OURS, "norm_num_groups": -4}, "norm_num_groups"),
    ({**OURS, "remat_save_names": "attention"}, "remat_save_names"),
    ({**OURS, "dtype": "float8"}, "dtype"),
    ([OURS], "config"),
], ids=["string-channels", "negative-groups", "string-for-list", "unknown-dtype", "list-for-object"])
def test_our_config_json_with_a_bad_field_is_named(tmp_path, config, field):
    """Our model folders (`export.model`) read their config.json through the same checks."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kind": "unet2d", "format": "magdiff_jax", "config": config}))
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and f"{field}: " in msg and "\n" not in msg, msg


def test_magdiff_json_with_a_bad_nested_field_is_named(tmp_path):
    """A MagDiff PyTorch export's magdiff.json: a nested field is named by its dotted path."""
    from remat_configs import tiny_magdiff_config

    from magdiff_jax.convert import magdiff as export

    cfg = tiny_magdiff_config(pyramid="single")
    meta = json.loads(json.dumps(export._meta(cfg)))
    meta["config"]["unet"]["norm_num_groups"] = 0
    path = tmp_path / "magdiff.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as info:
        export.magdiff_from_torch(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "unet.norm_num_groups: " in msg and "\n" not in msg, msg

