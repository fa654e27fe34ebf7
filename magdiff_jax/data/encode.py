"""Pre-encoded training data: VAE latents and CLIP text embeddings computed once, so training skips the frozen
encoders (`magdiff-jax data encode`).

    out = encode_dataset(data_config(), vae_dir="sd/vae", text_encoder_dir="sd/text_encoder",
                         tokenizer_dir="sd/tokenizer", out_dir="encoded/")      # every process encodes its shard
    config.source, config.path = "encoded", "encoded/"                           # then train from it:
    ds = make_dataset(config, batch_size=8)                                      # (pipeline.py reads it as below)

Encoding runs the evaluation pipeline (`make_dataset(..., train=False)`: every record once, centre crop, the
first caption, no caption dropout) on this process's shard and encodes each batch on the local devices: all
frames through `AutoencoderKL.encode`, the caption's token ids through the CLIP text tower (float32 on device,
data-parallel over this process's local devices). Each clip is thus fixed: one frame window, one crop, one
caption; training from it gives up random crops and frame windows in exchange for skipping both encoders.

On disk, OUT/ holds:

    encoded-00000-of-00002.array_record   one record per example (process 0's shard), group_size 1
    encoded-00000-of-00002.json           {"count", "num_bad", "total", "shapes", "dtypes", ...} of that shard
    encoded-00001-of-00002.array_record   process 1's shard, ...
    bad_inputs.json, bad_inputs.1.json    the bad-input report of each process (`bad_input.py`)
    null_text.msgpack                     the embedding of the empty caption "" (a record as below)
    encoded.json                          metadata (process 0): data config, model paths, scaling_factor,
                                          latent and text shapes, dtype, text_layer, num_shards

Each record is `flax.serialization.msgpack_serialize` of a dict (no pickle):

    key              str
    caption          str                 the caption that was encoded
    latents_mean     (F, h, w, C)        posterior mean, unscaled (multiply by `scaling_factor` for diffusion,
    latents_std      (F, h, w, C)        after subtracting `shift_factor` when set); std = exp(logvar / 2)
    text_embeddings  (L, D)              CLIP hidden states (`text_layer`, below)
    tokens           (L,) int32          the token ids they were computed from

Latents and embeddings are stored as float32 or float16 (`dtype`). `text_layer` picks the text features:
"last" (default) is `last_hidden_state`, what SD 1.x and SD 2.x condition on (SD 2.x's converted text encoder
already has its last layer removed); "penultimate" is the second-to-last layer's output passed through the
final layer norm, as diffusers' `clip_skip=1` for a full-depth encoder.

Every file is written under a temporary name and renamed into place (in cloud storage, gs://...: written whole as
one object; a shard is written to a local temporary file and then copied up). Processes write only their own files,
so N processes can encode into one shared folder: process p encodes records p, p + N, ... into its shard (an empty
shard when it has none); once every process has written its shard (a barrier across the processes of a
multi-process job) process 0 writes `encoded.json`, and `EncodedSource` checks that every shard it lists is there.
A process refuses a folder holding anything but the other processes' files of the same encoding unless
`overwrite`, which replaces its own earlier files.

`magdiff-jax data encode` starts multi-process JAX from the environment first (`distributed.initialize`, as
the trainer does: `launch/local_multiprocess.sh`, TPU pods, SLURM, MPI), so each process knows its index.

Reading is `data/encoded.py`'s (`EncodedSource`, `encoded_loader`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.serialization import msgpack_serialize

from magdiff_jax import cpu
from magdiff_jax.data import pipeline as data_pipeline
from magdiff_jax.data.bad_input import REPORT_NAME, BadInputReport
from magdiff_jax.data.encoded import (
    DTYPES,
    FORMAT,
    META_NAME,
    NULL_TEXT_NAME,
    TEXT_LAYERS,
    VERSION,
    shard_stem,
)
from magdiff_jax.utils.files import as_path, is_remote

_SHARD_RE = re.compile(r"encoded-(\d{5})-of-(\d{5})\.(array_record|json)")
_REPORT_RE = re.compile(re.escape(REPORT_NAME).replace(r"\.json", r"(\.\d+)?\.json"))


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def _write_atomic(path, data: bytes):
    if is_remote(path):  # one object upload: whole or not at all
        as_path(path).write_bytes(data)
        return path
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_json(path, obj):
    return _write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def _config_dict(cfg) -> dict:
    if hasattr(cfg, "to_json_best_effort"):
        return json.loads(cfg.to_json_best_effort())
    return json.loads(json.dumps(dict(cfg), default=str))


def _own_names(index: int, count: int) -> set[str]:
    stem = shard_stem(index, count)
    report = data_pipeline.default_report_path(".", index).name
    names = {f"{stem}.array_record", f"{stem}.json", report}
    if index == 0:
        names |= {META_NAME, NULL_TEXT_NAME}
    return names


def _is_encoding_output(name: str) -> bool:
    return bool(_SHARD_RE.fullmatch(name) or _REPORT_RE.fullmatch(name)) or name in (META_NAME, NULL_TEXT_NAME)


def _prepare_out_dir(out, index: int, count: int, overwrite: bool) -> None:
    """Refuse a folder holding anything besides the other processes' shards of this same encoding, unless
    `overwrite`; then remove this process's previous outputs (process 0 also removes shards of an encoding
    with another shard count). Files that an encoding never writes are left alone."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    own = _own_names(index, count)
    existing = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))

    def other_process(name: str) -> bool:  # written by another process of this same encoding
        if name in own:
            return False
        if name in (META_NAME, NULL_TEXT_NAME):
            return index != 0
        if m := _SHARD_RE.fullmatch(name):
            return int(m.group(2)) == count and int(m.group(1)) < count
        if m := _REPORT_RE.fullmatch(name):
            return int(m.group(1)[1:] if m.group(1) else 0) < count
        return False

    refused = [n for n in existing if not other_process(n)]
    if refused and not overwrite:
        shown = ", ".join(refused[:5]) + (", ..." if len(refused) > 5 else "")
        raise FileExistsError(f"{out} is not empty ({shown}); choose another output folder or pass overwrite "
                              "(--overwrite)")
    for name in refused:
        if name in own or (index == 0 and _is_encoding_output(name)):  # process 0 clears other shard counts
            (out / name).unlink()
        else:
            logging.warning("%s: leaving %s in place (not written by this encoding)", out, name)
    for name in own:
        (out / f".{name}.partial").unlink(missing_ok=True)


def _find_report(ds) -> BadInputReport | None:
    """The bad-input report of the pipeline's DropBad stage (searched through the dataset graph)."""
    todo, seen = [ds], set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(getattr(node, "report", None), BadInputReport):
            return node.report
        todo.extend(getattr(node, "parents", ()) or ())
    return None


# ---------------------------------------------------------------------------------------------------------------
# jitted encoders (cached per model config, so repeated calls and every batch reuse one compilation)


@functools.lru_cache(maxsize=8)
def _video_fn(vae_config, frames_per_call: int):
    """jit((params, uint8 video (B, F, H, W, 3)) -> float32 (mean, std) (B, F, h, w, C)), frames in [0, 255]
    mapped to [-1, 1] as the pipeline's `normalize_example` does."""
    from magdiff_jax.models.vae import AutoencoderKL, encode_frames

    vae = AutoencoderKL(vae_config)

    def fn(params, video):
        mean, logvar = encode_frames(vae, params, video.astype(jnp.float32) / 127.5 - 1.0, frames_per_call)
        return mean.astype(jnp.float32), jnp.exp(0.5 * logvar.astype(jnp.float32))

    return jax.jit(fn, compiler_options=cpu.compiler_options())


@functools.lru_cache(maxsize=8)
def _text_fn(text_config, text_layer: str):
    """jit((params, tokens (B, L) int32) -> float32 embeddings (B, L, D)) for `text_layer` ("last" |
    "penultimate")."""
    from magdiff_jax.layers.common import layer_norm
    from magdiff_jax.models.clip import CLIPTextModel

    if text_layer not in TEXT_LAYERS:
        raise ValueError(f"text_layer must be one of {TEXT_LAYERS}, got {text_layer!r}")
    if text_layer == "penultimate" and text_config.num_hidden_layers < 2:
        raise ValueError("text_layer 'penultimate' needs a text encoder with at least 2 layers")
    model = CLIPTextModel(text_config)
    final_norm = layer_norm(epsilon=text_config.layer_norm_eps, dtype=jnp.dtype(text_config.dtype))

    def fn(params, tokens):
        out = model.apply({"params": params}, tokens, output_hidden_states=text_layer != "last")
        if text_layer == "last":
            h = out.last_hidden_state
        else:
            h = final_norm.apply({"params": params["final_layer_norm"]}, out.hidden_states[-2])
        return h.astype(jnp.float32)

    return jax.jit(fn)


def encode_text(text_module, params, tokens, *, text_layer: str = "last", dtype: str = "float32") -> np.ndarray:
    """CLIP text features of token ids (B, L) as `encode_dataset` stores them (numpy)."""
    out = _text_fn(text_module.config, text_layer)(params, jnp.asarray(tokens, jnp.int32))
    return np.asarray(jax.device_get(out)).astype(dtype)


def encode_posterior(vae_module, params, video, *, dtype: str = "float32", frames_per_call: int = 0):
    """(mean, std) (B, F, h, w, C) of uint8 frames (B, F, H, W, 3), as `encode_dataset` stores them (numpy)."""
    out = _video_fn(vae_module.config, int(frames_per_call))(params, jnp.asarray(video))
    return tuple(np.asarray(a).astype(dtype) for a in jax.device_get(out))


class _Placement:
    """Data-parallel placement over this process's local devices (params replicated, batches split)."""

    def __init__(self, batch_size: int):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.local_devices()
        self.batch = -(-batch_size // len(devices)) * len(devices)  # padded to a multiple of the device count
        mesh = Mesh(np.asarray(devices), ("batch",))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.split = NamedSharding(mesh, PartitionSpec("batch"))

    def params(self, tree):
        return jax.device_put(tree, self.replicated)

    def batch_array(self, x: np.ndarray) -> jax.Array:
        """`x` padded (repeating its last row) to the jitted batch size, split over the devices."""
        n = x.shape[0]
        if n < self.batch:
            x = np.concatenate([x, np.repeat(x[-1:], self.batch - n, axis=0)])
        return jax.device_put(x, self.split)


# ---------------------------------------------------------------------------------------------------------------
# writing


def encode_dataset(data_cfg, *, vae_dir, text_encoder_dir, tokenizer_dir, out_dir, batch_size: int = 4,
                   process_index: int | None = None, process_count: int | None = None, overwrite: bool = False,
                   dtype: str = "float32", text_layer: str = "last", frames_per_call: int = 0,
                   source=None) -> Path:
    """Encode this process's shard of the dataset `data_cfg` describes into `out_dir` (see the module doc).

    `vae_dir` / `text_encoder_dir`: folders written by `magdiff-jax convert to-flax` (kinds "vae" and
    "clip_text"); `tokenizer_dir`: a CLIP tokenizer folder (or a pipeline root with `tokenizer/`). `batch_size`
    is per process (the last, partial batch is padded to it on device and the padding dropped).
    `frames_per_call` > 0 bounds the frames per VAE call (memory at high resolution). `source` replaces the
    source the config names. Returns `out_dir`.
    """
    from magdiff_jax.export.model import load_model, read_model_config
    from magdiff_jax.models.tokenizer import CLIPTokenizer, resolve_tokenizer_folder

    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if text_layer not in TEXT_LAYERS:
        raise ValueError(f"text_layer must be one of {TEXT_LAYERS}, got {text_layer!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    cfg = ml_collections.ConfigDict(copy.deepcopy(data_cfg.to_dict()) if hasattr(data_cfg, "to_dict") else data_cfg)
    if cfg.task != "video":
        raise ValueError(f"encoding supports data.task 'video' (images: one-frame videos), not {cfg.task!r}")
    if cfg.source == "encoded":
        raise ValueError("data.source is already 'encoded'")
    tok_folder = resolve_tokenizer_folder(tokenizer_dir)
    cfg.tokenizer = str(tok_folder)
    cfg.normalize = False  # uint8 frames to the device; scaled to [-1, 1] there
    cfg.crop, cfg.caption_dropout, cfg.masks = "center", 0.0, False
    cfg.subject.enabled = False

    # the models' configs first (one JSON file each): a setting they cannot take fails before a weight is read
    vae_cfg = read_model_config(vae_dir, "vae")[1]
    text_cfg = read_model_config(text_encoder_dir, "clip_text")[1]
    res = cfg.resolution
    height, width = (res, res) if isinstance(res, int) else tuple(res)
    factor = vae_cfg.downsample_factor
    if height % factor or width % factor:
        raise ValueError(f"resolution {height}x{width} does not divide by the VAE's downsampling factor {factor}")
    if cfg.max_length > text_cfg.max_position_embeddings:
        raise ValueError(f"data.max_length {cfg.max_length} exceeds the text encoder's "
                         f"max_position_embeddings {text_cfg.max_position_embeddings}")
    _, vae, vae_params = load_model(vae_dir, kind="vae")
    _, text, text_params = load_model(text_encoder_dir, kind="clip_text")
    latent_shape = [int(cfg.num_frames), height // factor, width // factor, vae.config.latent_channels]
    text_shape = [int(cfg.max_length), text.config.hidden_size]

    out = as_path(out_dir)
    remote = is_remote(out)
    _prepare_out_dir(out, index, count, overwrite)
    stem = shard_stem(index, count)
    report_path = out / data_pipeline.default_report_path(".", index).name
    source = data_pipeline.make_source(cfg) if source is None else source
    # records index, index + count, ...: a process past the last record writes an empty shard
    ds = None
    if index < len(source):
        ds = data_pipeline.make_dataset(cfg, batch_size=batch_size, train=False, process_index=index,
                                        process_count=count, report_path=report_path, source=source)

    place = _Placement(batch_size)
    vae_params, text_params = place.params(vae_params), place.params(text_params)
    video_fn = _video_fn(vae.config, int(frames_per_call))
    text_fn = _text_fn(text.config, text_layer)

    from array_record.python.array_record_module import ArrayRecordWriter

    final = out / f"{stem}.array_record"
    if remote:  # array_record writes local files: a temporary one here, copied up when complete
        import tempfile

        tmp_dir = Path(tempfile.mkdtemp(prefix="magdiff-encode-"))
        tmp = tmp_dir / final.name
    else:
        tmp = out / f".{final.name}.partial"
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    num_written = 0

    def write(pending):
        nonlocal num_written
        batch, (mean, std), emb = pending
        mean, std, emb = (np.asarray(a).astype(dtype) for a in jax.device_get((mean, std, emb)))
        for j in range(len(batch["key"])):
            record = {"key": str(batch["key"][j]), "caption": str(batch["caption"][j]),
                      "latents_mean": np.asarray(mean[j]), "latents_std": np.asarray(std[j]),
                      "text_embeddings": np.asarray(emb[j]), "tokens": np.asarray(batch["tokens"][j], np.int32)}
            writer.write(msgpack_serialize(record))
            num_written += 1

    try:
        pending = None
        for num_batches, batch in enumerate(ds if ds is not None else (), 1):
            latents = video_fn(vae_params, place.batch_array(np.asarray(batch["video"])))
            emb = text_fn(text_params, place.batch_array(np.asarray(batch["tokens"], np.int32)))
            small = {k: batch[k] for k in ("key", "caption", "tokens")}
            if pending is not None:
                write(pending)  # the previous batch, while this one computes
            pending = (small, latents, emb)
            if num_batches % 100 == 0:
                logging.info("encode: process %d wrote %d examples", index, num_written)
        if pending is not None:
            write(pending)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        if remote:
            tmp_dir.rmdir()
        raise
    writer.close()
    if remote:
        try:
            from magdiff_jax.data.sources import copy_to

            copy_to(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
            tmp_dir.rmdir()
    else:
        os.replace(tmp, final)

    report = _find_report(ds) if ds is not None else None
    num_bad = len(report.bad) if report is not None else 0
    if report is not None:
        report.write(report_path)
    np_dtype = np.dtype(dtype).name
    shard_meta = {
        "format": FORMAT, "version": VERSION, "shard": index, "num_shards": count, "file": final.name,
        "count": num_written, "num_bad": num_bad, "total": report.total if report is not None else num_written,
        "shapes": {"latents_mean": latent_shape, "latents_std": latent_shape, "text_embeddings": text_shape,
                   "tokens": [text_shape[0]]},
        "dtypes": {"latents_mean": np_dtype, "latents_std": np_dtype, "text_embeddings": np_dtype,
                   "tokens": "int32"},
    }
    _write_json(out / f"{stem}.json", shard_meta)
    logging.info("encode: process %d wrote %d examples (%d bad) to %s", index, num_written, num_bad, final)

    from magdiff_jax import distributed

    distributed.sync("magdiff_data_encode_shards_written")  # the index only once every shard is there
    if index == 0:
        tokenizer = CLIPTokenizer.from_folder(tok_folder, max_length=cfg.max_length)
        null_tokens = tokenizer([""])
        null_emb = np.asarray(jax.device_get(text_fn(text_params, place.batch_array(null_tokens)))[0]).astype(dtype)
        null = {"key": "", "caption": "", "text_embeddings": null_emb,
                "tokens": np.asarray(null_tokens[0], np.int32)}
        _write_atomic(out / NULL_TEXT_NAME, msgpack_serialize(null))
        vc = vae.config
        meta = {
            "format": FORMAT, "version": VERSION, "num_shards": count,
            "shards": [f"{shard_stem(i, count)}.array_record" for i in range(count)],
            "data": _config_dict(cfg), "batch_size": batch_size,
            "vae": str(Path(vae_dir).absolute()), "text_encoder": str(Path(text_encoder_dir).absolute()),
            "tokenizer": str(tok_folder.absolute()), "text_layer": text_layer, "dtype": np_dtype,
            "scaling_factor": vc.scaling_factor, "shift_factor": vc.shift_factor,
            "latent_shape": latent_shape, "text_shape": text_shape, "null_text": NULL_TEXT_NAME,
            "vae_config": dataclasses.asdict(vc),
        }
        _write_json(out / META_NAME, meta)
    return out


# ---------------------------------------------------------------------------------------------------------------
# command line


def _resolution(text: str) -> tuple[int, int]:
    parts = re.split(r"[x,]", str(text).strip().lower())
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, got {text!r}")
    return (sizes[0], sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])


def add_encode_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `magdiff-jax data encode` (read by `run_encode_cli`)."""
    parser.add_argument("--data", required=True,
                        help="a video-caption folder (captions.csv/.jsonl; an image-caption folder with an `image` "
                             "column is read as one-frame videos), or 'synthetic'")
    parser.add_argument("--pipeline", default=None,
                        help="a folder written by `magdiff-jax convert to-flax --kind pipeline` (vae/, "
                             "text_encoder/, tokenizer/)")
    parser.add_argument("--vae", default=None, help="Flax VAE folder (overrides PIPELINE/vae)")
    parser.add_argument("--text-encoder", default=None, help="Flax CLIP text folder (overrides PIPELINE/text_encoder)")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (overrides PIPELINE/tokenizer)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--stride", type=int, default=1, help="between sampled frames")
    parser.add_argument("--resolution", type=_resolution, default=(256, 256), help="SIZE or HEIGHTxWIDTH")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per encoder call, per process")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored latents and embeddings")
    parser.add_argument("--text-layer", choices=TEXT_LAYERS, default="last",
                        help="last: last_hidden_state; penultimate: the second-to-last layer + final layer norm")
    parser.add_argument("--frames-per-call", type=int, default=0,
                        help="bound the frames in one VAE call (0: a whole batch); lowers memory at high resolution")
    parser.add_argument("--synthetic-num", type=int, default=72, help="clips of --data synthetic")
    parser.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="stop when more than this fraction of the inputs is unusable")
    return parser


def _folder_kind(path) -> str:
    """'images' for an image-caption folder (annotations with an `image` and no `video` column), else 'folder'."""
    from magdiff_jax.data.sources import find_annotations, read_rows

    for _, fields, error in read_rows(find_annotations(path)):
        if error is None:
            return "images" if "image" in fields and "video" not in fields else "folder"
    return "folder"


def encode_config_from_args(args):
    """The data config `run_encode_cli` encodes."""
    cfg = data_pipeline.data_config()
    height, width = args.resolution if isinstance(args.resolution, tuple) else _resolution(args.resolution)
    cfg.resolution = (height, width)
    cfg.num_frames, cfg.stride = args.frames, args.stride
    cfg.max_bad_fraction = args.max_bad_fraction
    cfg.worker_count = args.workers
    if args.data == "synthetic":
        cfg.source = "synthetic"
        cfg.synthetic.num = args.synthetic_num
        cfg.synthetic.num_frames = max(cfg.synthetic.num_frames, (args.frames - 1) * args.stride + 1)
        size = max(cfg.synthetic.size, height, width)
        cfg.synthetic.size = size + size % 2
    else:
        cfg.source = _folder_kind(as_path(args.data))
        cfg.path = os.fspath(as_path(args.data))
        if cfg.source == "images":
            cfg.num_frames = 1
    return cfg


def run_encode_cli(args: argparse.Namespace) -> Path:
    """`magdiff-jax data encode`: this process (jax.process_index() of jax.process_count(), after
    `distributed.initialize()` from the environment) encodes its shard."""
    from magdiff_jax import distributed

    distributed.initialize()  # before anything touches JAX: every process learns its index
    root = Path(args.pipeline) if args.pipeline else None
    vae = args.vae or (root / "vae" if root else None)
    text = args.text_encoder or (root / "text_encoder" if root else None)
    tokenizer = args.tokenizer or (root / "tokenizer" if root else None)
    if not (vae and text and tokenizer):
        raise ValueError("data encode: pass --pipeline, or all of --vae, --text-encoder and --tokenizer")
    out = encode_dataset(encode_config_from_args(args), vae_dir=vae, text_encoder_dir=text, tokenizer_dir=tokenizer,
                         out_dir=args.out, batch_size=args.batch_size, overwrite=args.overwrite, dtype=args.dtype,
                         text_layer=args.text_layer, frames_per_call=args.frames_per_call,
                         process_index=jax.process_index(), process_count=jax.process_count())
    logging.info("process %d: wrote %s to %s", jax.process_index(),
                 shard_stem(jax.process_index(), jax.process_count()), out)
    return out


__all__ = [
    "add_encode_arguments",
    "encode_dataset",
    "encode_posterior",
    "encode_text",
    "run_encode_cli",
]
