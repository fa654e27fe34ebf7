"""Reading and writing safetensors files (single or sharded with an index json) without unpickling anything.

The format is small enough to own: an 8-byte little-endian header length, a JSON header mapping each tensor
name to its dtype, shape and byte range, then the raw bytes. Owning it gives bfloat16 support through
`ml_dtypes` and memory-mapped reads of multi-GB checkpoints.

Pickle-based PyTorch files (`.bin`, `.ckpt`, `.pt`, `.pth`: IP-Adapter and AnimateDiff releases) are read only by
`read_weights`, through `torch.load(weights_only=True)` (the optional torch extra), which restores tensors and
containers and refuses any other object; nothing here ever fully unpickles a file.

Files and folders may be local or in an object store (gs://..., through `etils.epath`): a remote file is read
whole into memory (no memory map) and checked exactly as a local one; a file is written whole
(`utils.files.write_bytes_whole`: a local rename, or one object).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from magdiff_jax.utils.errors import json_excerpt
from magdiff_jax.utils.files import is_remote, user_path, write_bytes_whole

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference library's limit: larger headers are refused unread


class CheckpointFormatError(ValueError):
    """A weights file or folder that cannot be read (pickle, missing, corrupt)."""


def refuse_pickle(path: Path) -> None:
    raise CheckpointFormatError(
        f"{path}: refusing to load a pickle checkpoint ({path.suffix}); pickle files can run arbitrary code and "
        "are never unpickled here. Convert it to safetensors first, e.g. in PyTorch: "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`, or "
        "`Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
    )


def _flatten_state(tree, prefix: str, out: dict, path) -> None:
    """Nested dicts of tensors (IP-Adapter's {"image_proj": {...}, "ip_adapter": {...}}) -> flat "a.b" keys."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _flatten_state(v, f"{key}.", out, path)
        elif hasattr(v, "detach") and hasattr(v, "numpy"):
            t = v.detach().cpu()
            if str(t.dtype) == "torch.bfloat16":
                out[key] = t.float().numpy().astype(ml_dtypes.bfloat16)
            else:
                out[key] = t.numpy()
        elif isinstance(v, (int, float, str, bool, type(None))):
            continue  # training metadata beside the weights (global_step, epoch, ...)
        else:
            raise CheckpointFormatError(f"{path}: entry {key!r} is a {type(v).__name__}, not a tensor or a dict of "
                                        "tensors")
    return out


def read_pickled(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a pickle-based PyTorch file, read with `torch.load(weights_only=True)` (tensors, dicts and
    plain values only; any other object is refused unread). Nested dicts flatten to "a.b" keys and a top-level
    "state_dict" wrapper (Lightning / AnimateDiff `.ckpt`) is unwrapped. Needs torch (`pip install -e ".[torch]"`)."""
    path = user_path(path)
    try:
        import torch
    except ImportError as e:
        raise CheckpointFormatError(f"{path}: reading a pickle-based checkpoint needs torch (pip install -e "
                                    "'.[torch]'), which loads it with weights_only=True; or convert it to "
                                    "safetensors elsewhere") from e
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            data = torch.load(io.BytesIO(f.read()) if is_remote(path) else f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointFormatError(f"{path}: not a loadable weights-only PyTorch checkpoint "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(data, Mapping):
        raise CheckpointFormatError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    if set(data) >= {"state_dict"} and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    return _flatten_state(data, "", {}, path)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one weights file: `.safetensors` (`read_file`, preferred) or a pickle-based PyTorch file
    (`read_pickled`, through `torch.load(weights_only=True)`)."""
    path = user_path(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickled(path)
    return read_file(path)


def read_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, as (memory-mapped) numpy arrays. The header is checked whole before
    any tensor is read (`_tensor_layout`). A file in an object store is read whole into memory."""
    path = user_path(path)
    remote = is_remote(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise CheckpointFormatError(f"{path}: not a .safetensors file")
    blob = None
    try:
        if remote:
            blob = path.read_bytes()
            size = len(blob)
        else:
            size = path.stat().st_size
        with io.BytesIO(blob) if remote else open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointFormatError(f"{path}: header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit "
                                            "(corrupt, or not a safetensors file)")
            if n > size - 8:
                raise CheckpointFormatError(f"{path}: not a safetensors file (header length {n} exceeds the file "
                                            f"size {size}; corrupt or truncated)")
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e
    except _DuplicateKey as e:
        raise CheckpointFormatError(f"{path}: the header names {e.args[0]!r} twice") from e
    except RecursionError as e:
        raise CheckpointFormatError(f"{path}: not a safetensors file (the header nests too deeply)") from e
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    layout = _tensor_layout(path, header, size - 8 - n)
    if remote:
        data = np.frombuffer(blob, dtype=np.uint8, offset=8 + n)
    else:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else b""
    return {name: np.frombuffer(data[start:end], dtype=_DTYPES[dtype]).reshape(shape)
            for name, dtype, shape, (start, end) in layout}


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_layout(path: Path, header: dict, data_bytes: int) -> list[tuple[str, str, tuple, tuple[int, int]]]:
    """(name, dtype, shape, (start, end)) of every tensor, in file order, after the reference library's checks:
    each entry well-typed, each byte range exactly prod(shape) * itemsize long, and the ranges, in order, tiling
    the data from its first byte to its last with no gap or overlap."""
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointFormatError(f"{path}: __metadata__ must be an object of strings, got {json_excerpt(metadata)}")
    layout = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointFormatError(f"{where}: malformed header entry {json_excerpt(info)} (expected an object "
                                        "with dtype, shape and data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise CheckpointFormatError(f"{where}: dtype must be a string, got {json_excerpt(dtype)}")
        if dtype not in _DTYPES:
            raise CheckpointFormatError(f"{where}: unsupported dtype {dtype} (supported: {sorted(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise CheckpointFormatError(f"{where}: shape must be a list of integers, got {json_excerpt(shape)}")
        if any(d < 0 for d in shape):
            raise CheckpointFormatError(f"{where}: shape {shape} has a negative dimension")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointFormatError(f"{where}: data_offsets must be two integers [begin, end], got "
                                        f"{json_excerpt(offsets)}")
        start, end = offsets
        if start < 0 or end < start:
            raise CheckpointFormatError(f"{where}: data_offsets {offsets} are negative or reversed")
        need = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - start != need:
            raise CheckpointFormatError(f"{where}: data_offsets {offsets} span {end - start} bytes, but {dtype} of "
                                        f"shape {shape} takes {need}")
        layout.append((name, dtype, tuple(shape), (start, end)))
    layout.sort(key=lambda t: t[3])
    covered, previous = 0, None
    for name, _, _, (start, end) in layout:
        if start < covered:
            raise CheckpointFormatError(f"{path}: tensor {name!r} data_offsets {[start, end]} overlap those of "
                                        f"tensor {previous!r}")
        if start > covered:
            raise CheckpointFormatError(f"{path}: tensor {name!r} data_offsets {[start, end]} leave bytes "
                                        f"{covered}..{start} unused (the tensors must tile the data)")
        covered, previous = end, name
    if covered > data_bytes:
        raise CheckpointFormatError(f"{path}: tensor {previous!r} runs past the end of the data ({covered} > "
                                    f"{data_bytes} bytes; truncated?)")
    if covered < data_bytes:
        raise CheckpointFormatError(f"{path}: the tensors cover {covered} of the {data_bytes} data bytes (bytes past "
                                    "the last tensor; corrupt?)")
    return layout


def _inside(folder: Path, target: Path) -> bool:
    """Whether `target` (resolved) lies in `folder`, or, for a Hugging Face hub cache snapshot
    (`<repo>/snapshots/<revision>/...`), in that repository's `blobs/`, where the hub links a snapshot's files.
    Object stores have no links."""
    if is_remote(folder):
        return True
    root = folder.resolve()
    if target.is_relative_to(root):
        return True
    for parent in (root, *root.parents):
        if parent.parent.name == "snapshots":
            blobs = parent.parent.parent / "blobs"
            return blobs.is_dir() and target.is_relative_to(blobs.resolve())
    return False


def _read_index(index: Path) -> dict[Path, set[str]]:
    """{shard file: the tensor names the index puts in it} of an `*.safetensors.index.json`; every shard must lie
    in the index's folder (symlinks included: a hub cache snapshot's may lead to its blobs/)."""
    folder = index.parent
    try:
        content = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointFormatError(f"{index}: not valid JSON ({str(e) or type(e).__name__})") from e
    if not isinstance(content, dict):
        raise CheckpointFormatError(f"{index}: expected a JSON object, got {type(content).__name__}")
    if "weight_map" not in content:
        raise CheckpointFormatError(f"{index}: no weight_map (the table of tensor name -> shard file)")
    weight_map = content["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file, "
                                    f"got {type(weight_map).__name__} {json_excerpt(weight_map)}")
    shards: dict[Path, set[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointFormatError(f"{index}: weight_map[{name!r}] must be a shard file name, got "
                                        f"{json_excerpt(file)}")
        rel = Path(file)
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointFormatError(f"{index}: weight_map[{name!r}] is {file!r}, which leaves the model folder "
                                        f"{folder}")
        shards.setdefault(folder / rel.as_posix(), set()).add(name)
    missing = [str(f) for f in sorted(shards) if not f.is_file()]
    if missing:
        raise CheckpointFormatError(f"{index} names shard files that do not exist: {missing}")
    for shard in sorted(shards) if not is_remote(folder) else ():
        target = shard.resolve()
        if not _inside(folder, target):
            raise CheckpointFormatError(f"{index}: shard {str(shard.relative_to(folder))!r} is a link to {target}, "
                                        f"outside the model folder {folder}")
    return shards


def _pick_files(folder: Path, stem: str | None) -> tuple[Path | None, dict[Path, set[str] | None]]:
    """(the index json or None, {weight file: the tensor names the index puts in it, or None without an index}) of
    a model folder. A stem's index wins over other indexes, and its single file over other indexes; a folder holding
    both a single file and its index is ambiguous."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    single = folder / f"{stem}.safetensors" if stem else None
    if stem:
        preferred = [p for p in indexes if p.name == f"{stem}.safetensors.index.json"]
        indexes = preferred or ([] if single.exists() else indexes)
    if len(indexes) > 1:
        raise CheckpointFormatError(f"{folder}: several index json files; cannot tell which describes the model: "
                                    f"{[p.name for p in indexes]}")
    if indexes:
        index = indexes[0]
        own = folder / index.name.removesuffix(".index.json")
        if own.exists():
            raise CheckpointFormatError(f"{folder}: holds both {own.name} and {index.name}; cannot tell which is the "
                                        "model (one of them is left from an older export: remove it)")
        return index, _read_index(index)
    files = sorted(folder.glob("*.safetensors"))
    if single is not None and single.exists():
        return None, {single: None}
    if len(files) == 1:
        return None, {files[0]: None}
    if len(files) > 1:
        raise CheckpointFormatError(
            f"{folder}: several .safetensors files and no index json; cannot tell which holds the model: "
            f"{[f.name for f in files]}"
        )
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    raise CheckpointFormatError(f"{folder}: no .safetensors weights found")


def read_state_dict(path: str | os.PathLike, stem: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, or of a folder holding one file or index-json-sharded files.

    `stem` ("model", "diffusion_pytorch_model") picks the file when a folder holds several. Each shard must hold
    exactly the tensors its index puts in it. `path` local or in an object store.
    """
    path = user_path(path)
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such file or folder")
    if path.is_file():
        return read_file(path)
    index, files = _pick_files(path, stem)
    state: dict[str, np.ndarray] = {}
    for f, expected in sorted(files.items()):
        tensors = read_file(f)
        if expected is not None:
            absent = sorted(expected - set(tensors))
            unlisted = sorted(set(tensors) - expected)
            if absent or unlisted:
                raise CheckpointFormatError(
                    f"{index}: disagrees with shard {f.name}: "
                    + "; ".join(part for part in (
                        f"{_names(absent)} mapped to it but absent" if absent else "",
                        f"{_names(unlisted)} in it but not mapped to it" if unlisted else "") if part))
        for k, v in tensors.items():
            if k in state:
                raise CheckpointFormatError(f"{f}: tensor {k!r} appears in more than one shard")
            state[k] = v
    return state


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"tensors {shown}" + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _serialise(tensors: Mapping[str, np.ndarray]) -> bytes:
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name]).reshape(np.shape(tensors[name]))  # keeps 0-d tensors 0-d
        if arr.dtype not in _NAMES:
            raise CheckpointFormatError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        raw = arr.tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `path` never half-written: locally through a temporary file in the same folder and a rename, in an
    object store as one object (`utils.files.write_bytes_whole`)."""
    write_bytes_whole(path, data)


def write_state_dict(
    tensors: Mapping[str, np.ndarray], folder: str | os.PathLike, stem: str, max_shard_bytes: int | None = None
) -> list[Path]:
    """Write `{stem}.safetensors`, or `{stem}-0000i-of-0000n.safetensors` shards plus the index json (`folder` local
    or in an object store)."""
    folder = user_path(folder)
    sizes = {k: np.asarray(v).nbytes for k, v in tensors.items()}
    total = sum(sizes.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        path = folder / f"{stem}.safetensors"
        atomic_write_bytes(path, _serialise(tensors))
        return [path]
    shards: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for k in sorted(tensors):
        if shards[-1] and used + sizes[k] > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][k] = tensors[k]
        used += sizes[k]
    n = len(shards)
    weight_map, paths = {}, []
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        atomic_write_bytes(folder / name, _serialise(shard))
        weight_map.update(dict.fromkeys(shard, name))
        paths.append(folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(folder / f"{stem}.safetensors.index.json", json.dumps(index, indent=2).encode())
    return paths
