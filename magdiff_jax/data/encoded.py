"""Reading pre-encoded training data (written by `data/encode.py`, `magdiff-jax data encode`; its docstring has the
on-disk layout).

`EncodedSource(OUT)` is a random-access source over every shard and `encoded_loader(config, train)` the
per-example transform: in training, caption dropout replaces the text embedding (and tokens, caption) with the
stored null-caption one, and `config.encoded_sample` draws `latents = mean + std * N(0, 1)` (unscaled) in place of
`latents_mean` / `latents_std`.
"""

from __future__ import annotations

import json
import os
import threading

import grain
import numpy as np
from flax.serialization import msgpack_restore

from magdiff_jax.utils.files import as_path

FORMAT = "magdiff_jax.encoded"
VERSION = 1
META_NAME = "encoded.json"
NULL_TEXT_NAME = "null_text.msgpack"
DTYPES = ("float32", "float16")
TEXT_LAYERS = ("last", "penultimate")
RECORD_KEYS = ("key", "caption", "latents_mean", "latents_std", "text_embeddings", "tokens")


def shard_stem(index: int, count: int) -> str:
    return f"encoded-{index:05d}-of-{count:05d}"


def read_msgpack(path) -> dict:
    return msgpack_restore(as_path(path).read_bytes())


class EncodedSource:
    """Random access to every record of an encoded folder (all shards, in shard order); records as in the module
    doc. Picklable: the array_record readers open on first access in each process. `path` may be a cloud URI
    (gs://...): metadata through epath, shards through array_record's own cloud-storage reader."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path)
        meta_path = self.path / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: no {META_NAME}; expected a folder written by `magdiff-jax data "
                                    "encode` (process 0 writes it when its shard is done)")
        self.metadata = json.loads(meta_path.read_text())
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not an encoded-dataset metadata file (format "
                             f"{self.metadata.get('format')!r})")
        n = int(self.metadata["num_shards"])
        self.files = [self.path / f"{shard_stem(i, n)}.array_record" for i in range(n)]
        missing = [f.name for f in self.files if not f.is_file()]
        missing += [f.with_suffix(".json").name for f in self.files if not f.with_suffix(".json").is_file()]
        if missing:
            shown = ", ".join(sorted(missing)[:6]) + (", ..." if len(missing) > 6 else "")
            raise FileNotFoundError(f"{self.path}: {META_NAME} lists {n} shards but {len(missing)} shard file(s) "
                                    f"are missing: {shown} (has every process's encode finished?)")
        self.counts = [int(json.loads(f.with_suffix(".json").read_text())["count"]) for f in self.files]
        null_path = self.path / self.metadata.get("null_text", NULL_TEXT_NAME)
        if not null_path.is_file():
            raise FileNotFoundError(f"{self.path}: missing {null_path.name} (the null-caption embedding)")
        self.null_text = read_msgpack(null_path)
        self.bad: list[tuple[str, str]] = []  # bad inputs were reported when encoding
        self._lock = threading.Lock()
        self._source = None

    @property
    def null_text_embeddings(self) -> np.ndarray:
        """(L, D) embedding of the empty caption, in the stored dtype."""
        return self.null_text["text_embeddings"]

    @property
    def null_tokens(self) -> np.ndarray:
        return self.null_text["tokens"]

    @property
    def total(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return sum(self.counts)

    def _reader(self):
        if self._source is None:
            with self._lock:
                if self._source is None:
                    from grain.sources import ArrayRecordDataSource

                    paths = [f"{f}[0:{c}]" for f, c in zip(self.files, self.counts) if c > 0]
                    if not paths:
                        raise ValueError(f"{self.path}: the encoded dataset holds no records")
                    self._source = ArrayRecordDataSource(paths)
        return self._source

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return msgpack_restore(self._reader()[index])

    def __getitems__(self, indices) -> list[dict]:
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"record {i} of {len(self)}")
        return [msgpack_restore(b) for b in self._reader().__getitems__(indices)]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"], state["_lock"] = None, None
        state["path"], state["files"] = os.fspath(self.path), [os.fspath(f) for f in self.files]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.path, self.files = as_path(self.path), [as_path(f) for f in self.files]
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EncodedSource({self.path}, {len(self)} records in {len(self.files)} shards)"


class EncodedLoader(grain.transforms.RandomMap):
    """Per example: caption dropout onto the stored null-caption embedding (training), and optionally a posterior
    sample `latents` (float32, unscaled; the mean in evaluation) in place of `latents_mean` / `latents_std`. An
    unreadable record becomes the pipeline's bad-input marker."""

    def __init__(self, path: str | os.PathLike, train: bool, caption_dropout: float = 0.0, sample: bool = False):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.path, self.train = str(path), bool(train)
        self.caption_dropout, self.sample = float(caption_dropout), bool(sample)
        self._null = None

    def null_text(self) -> dict:
        if self._null is None:
            self._null = read_msgpack(as_path(self.path) / NULL_TEXT_NAME)
        return self._null

    def random_map(self, record, rng: np.random.Generator):
        try:
            out = {"key": str(record["key"]), "caption": str(record["caption"]),
                   "text_embeddings": record["text_embeddings"], "tokens": record["tokens"]}
            if self.train and self.caption_dropout > 0 and rng.random() < self.caption_dropout:
                null = self.null_text()
                out.update(caption="", text_embeddings=null["text_embeddings"], tokens=null["tokens"])
            mean, std = record["latents_mean"], record["latents_std"]
            if self.sample:
                latents = np.asarray(mean, np.float32)
                if self.train:
                    noise = rng.standard_normal(latents.shape, dtype=np.float32)
                    latents = latents + np.asarray(std, np.float32) * noise
                out["latents"] = latents
            else:
                out.update(latents_mean=mean, latents_std=std)
            return out
        except (KeyError, TypeError, ValueError) as e:
            key = str(record.get("key", "?")) if isinstance(record, dict) else "?"
            return {"_bad": key, "_reason": f"{type(e).__name__}: {e}"}


def encoded_loader(config, train: bool) -> EncodedLoader:
    """The loader the pipeline uses for `config.source == "encoded"` (reads `config.path`,
    `config.caption_dropout` and `config.encoded_sample`)."""
    return EncodedLoader(config.path, train, caption_dropout=float(config.caption_dropout),
                         sample=bool(config.get("encoded_sample", False)))
