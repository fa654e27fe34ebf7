"""Reading and writing safetensors files (single or sharded with an index json) without unpickling anything.

The format is small enough to own: an 8-byte little-endian header length, a JSON header mapping each tensor
name to its dtype, shape and byte range, then the raw bytes. Owning it gives bfloat16 support through
`ml_dtypes` and memory-mapped reads of multi-GB checkpoints.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

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


class CheckpointFormatError(ValueError):
    """A weights file or folder that cannot be read (pickle, missing, corrupt)."""


def refuse_pickle(path: Path) -> None:
    raise CheckpointFormatError(
        f"{path}: refusing to load a pickle checkpoint ({path.suffix}); pickle files can run arbitrary code and "
        "are never unpickled here. Convert it to safetensors first, e.g. in PyTorch: "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`, or "
        "`Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
    )


def read_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, as (memory-mapped) numpy arrays."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise CheckpointFormatError(f"{path}: not a .safetensors file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointFormatError(f"{path}: not a safetensors file (header length {n} exceeds the file "
                                            f"size {size}; corrupt or truncated)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise CheckpointFormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else b""
    out = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{path}: malformed header entry for tensor {name!r}") from e
        if dtype_name not in _DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        if end > len(data):
            raise CheckpointFormatError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        try:
            out[name] = np.frombuffer(data[start:end], dtype=_DTYPES[dtype_name]).reshape(shape)
        except ValueError as e:
            raise CheckpointFormatError(f"{path}: tensor {name!r}: byte range does not match shape {shape}") from e
    return out


def _pick_stem_file(folder: Path, stem: str | None) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if stem:
        preferred = [p for p in index if p.name == f"{stem}.safetensors.index.json"]
        index = preferred or index
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointFormatError(f"{index[0]} names shard files that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if stem and (folder / f"{stem}.safetensors").exists():
        return [folder / f"{stem}.safetensors"]
    if len(files) == 1:
        return files
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

    `stem` ("model", "diffusion_pytorch_model") picks the file when a folder holds several.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else _pick_stem_file(path, stem)
    state: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in read_file(f).items():
            if k in state:
                raise CheckpointFormatError(f"{f}: tensor {k!r} appears in more than one shard")
            state[k] = v
    return state


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file in the same folder and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_state_dict(
    tensors: Mapping[str, np.ndarray], folder: str | os.PathLike, stem: str, max_shard_bytes: int | None = None
) -> list[Path]:
    """Write `{stem}.safetensors`, or `{stem}-0000i-of-0000n.safetensors` shards plus the index json."""
    folder = Path(folder)
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
