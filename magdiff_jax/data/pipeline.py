"""Grain input pipelines for every stage, from one data config.

    config = data_config()                       # the embedded default: synthetic clips, 16 frames at 64x64
    ds = make_dataset(config, batch_size=8)      # grain.IterDataset of batches (dicts of numpy arrays)
    it = iter(ds); batch = next(it)              # it.get_state() / it.set_state(...), or Orbax (below)

Per process (multi-host): the source is cut into `process_count` interleaved shards and each process reads only
its own; its order is a pure function of the seed (shuffled again every epoch). Records become examples in
`worker_count` worker processes (`transforms.load_example`); bad records come back as markers that the main
process drops, counts and reports (`bad_input.py`), stopping with a clear error when too many are bad. Then
batching and a thread prefetch.

The iterator state (including the bad-input counts) saves and restores through Orbax with
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`: a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import os
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np

from magdiff_jax.data.bad_input import REPORT_NAME, BadInputReport
from magdiff_jax.data.transforms import LoaderSpec, safe_load

SOURCES = ("synthetic", "folder", "images", "tfds", "encoded")


def data_config() -> ml_collections.ConfigDict:
    """Every key a data pipeline reads, with the embedded default (the synthetic dataset)."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # synthetic | folder (videos + captions) | images (images + captions) | tfds | encoded
    c.path = ""  # folder, TFDS data dir, or encoded-latents dir
    c.builder = ""  # TFDS builder name (source tfds)
    c.split = "train"
    c.synthetic = ml_collections.ConfigDict({"num": 72, "num_frames": 16, "size": 64, "seed": 0})
    c.task = "video"  # video | interp | vsr
    c.num_frames = 16
    c.stride = 1
    c.fps = 0.0  # > 0: sample at this frame rate instead of a fixed stride
    c.resolution = (64, 64)  # (height, width): shorter side resized to cover it, then cropped
    c.crop = "random"  # random | center (evaluation crops at the centre)
    c.caption_dropout = 0.0
    c.masks = False
    c.subject = ml_collections.ConfigDict({
        "enabled": False, "sizes": (384, 320, 256), "clip_size": 224,
        "probs": ml_collections.ConfigDict({"none": 0.0, "first": 0.8, "all": 0.2}), "eval_mode": "first",
    })
    c.interp = ml_collections.ConfigDict({"window": 7, "targets": ()})
    c.vsr = ml_collections.ConfigDict({"scale": 4})
    c.tokenizer = ""  # CLIP tokenizer folder (adds `tokens`)
    c.max_length = 77
    c.normalize = True  # False: uint8 images, scaled on device with transforms.normalize_example
    c.encoded_sample = False  # source encoded: sample latents from the stored posterior (else mean and std)
    c.shuffle = True
    c.num_epochs = -1  # training repeats forever; evaluation reads each record once
    c.seed = 0
    c.worker_count = 0  # worker processes decoding examples (0: in the main process)
    c.worker_buffer_size = 2
    c.prefetch = 2  # batches prefetched by a thread (0: none)
    c.max_bad_fraction = 0.01
    return c


def loader_spec(config, train: bool) -> LoaderSpec:
    res = config.resolution
    height, width = (res, res) if isinstance(res, int) else tuple(res)
    probs = config.subject.probs
    return LoaderSpec(
        task=config.task, num_frames=config.num_frames, stride=config.stride, fps=float(config.fps),
        height=height, width=width, crop=config.crop if train else "center", train=train,
        caption_dropout=config.caption_dropout, masks=config.masks, subject=config.subject.enabled,
        subject_sizes=tuple(config.subject.sizes), clip_size=config.subject.clip_size,
        sda_probs=(probs.none, probs.first, probs.all), sda_eval_mode=config.subject.eval_mode,
        interp_window=config.interp.window, interp_targets=tuple(config.interp.targets),
        vsr_scale=config.vsr.scale, normalize=config.normalize, tokenizer=config.tokenizer,
        max_length=config.max_length,
    )


def make_source(config):
    """The random-access source the config names (records in the `sources.py` schema)."""
    from magdiff_jax.data import sources

    if config.source == "synthetic":
        from magdiff_jax.data.synthetic import SyntheticConfig

        s = config.synthetic
        return sources.SyntheticSource(SyntheticConfig(num_frames=s.num_frames, size=s.size, seed=s.seed), s.num)
    if not config.path:
        raise ValueError(f"data.source={config.source!r} needs data.path")
    if config.source == "folder":
        return sources.VideoCaptionFolder(config.path)
    if config.source == "images":
        return sources.ImageCaptionFolder(config.path)
    if config.source == "tfds":
        from magdiff_jax.data.builders import TfdsSource

        return TfdsSource(config.path, builder=config.builder or None, split=config.split)
    if config.source == "encoded":
        from magdiff_jax.data.encode import EncodedSource

        return EncodedSource(config.path)
    raise ValueError(f"data.source must be one of {SOURCES}, got {config.source!r}")


class _Loader(grain.transforms.RandomMap):
    def __init__(self, spec: LoaderSpec):
        self.spec = spec

    def random_map(self, record, rng: np.random.Generator):
        return safe_load(record, self.spec, rng)


class _DropBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, report: BadInputReport):
        super().__init__(parent)
        self._report = report

    def __next__(self):
        while True:
            example = next(self._parent)
            if "_bad" not in example:
                return example
            self._report.add(example["_bad"], example["_reason"])

    def get_state(self):
        return {"parent": self._parent.get_state(), "bad": dict(self._report.bad)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._report.bad = dict(state["bad"])


class DropBad(grain.IterDataset):
    """Drops the loader's bad-input markers in the main process, recording them in `report` (which raises
    TooManyBadInputs past its threshold). Its counts are part of the iterator state."""

    def __init__(self, parent: grain.IterDataset, report: BadInputReport):
        super().__init__(parent)
        self.report = report

    def __iter__(self):
        return _DropBadIterator(self._parent.__iter__(), self.report)


def make_dataset(config, *, batch_size: int, train: bool = True, process_index: int | None = None,
                 process_count: int | None = None, report_path: str | os.PathLike | None = None,
                 source=None) -> grain.IterDataset:
    """Batches (dicts of numpy arrays, plus `key` and `caption` strings) for this process.

    `batch_size` is per process. `report_path` is where bad inputs are reported as JSON (default: none written;
    the trainer passes its workdir). Raises ValueError naming the problem for a config it cannot serve.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    spec = loader_spec(config, train)
    if spec.tokenizer:  # a missing or broken tokenizer folder fails here, before any worker starts
        from magdiff_jax.data.transforms import tokenizer

        tokenizer(spec.tokenizer, spec.max_length)
    source = make_source(config) if source is None else source
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"{source!r} has no records for process {process_index} of {process_count}")
    if train and len(ds) < batch_size:
        raise ValueError(f"{len(ds)} records in this process's shard, fewer than a batch of {batch_size}")
    if train and config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    epochs = config.num_epochs if train else 1
    if epochs != 1:
        ds = ds.repeat(None if epochs < 0 else epochs)
    if config.source == "encoded":  # latents and text embeddings already computed (`magdiff-jax data encode`)
        from magdiff_jax.data.encode import encoded_loader

        loader = encoded_loader(config, train)
    else:
        loader = _Loader(spec)
    ds = ds.random_map(loader, seed=config.seed + 1)
    it = ds.to_iter_dataset()
    if config.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    source_bad = list(getattr(source, "bad", [])) if process_index == 0 else []
    report = BadInputReport(total=_shard_len(source, process_index, process_count) + len(source_bad),
                            max_bad_fraction=config.max_bad_fraction, path=report_path)
    for key, reason in source_bad:
        report.add(key, reason)
    it = DropBad(it, report).batch(batch_size, drop_remainder=train)
    if config.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=config.prefetch)
    return it


def _shard_len(source, index: int, count: int) -> int:
    return len(range(index, len(source), count))


def default_report_path(out_dir: str | os.PathLike, process_index: int | None = None) -> Path:
    """`<out_dir>/bad_inputs.json` (process 0) or `bad_inputs.<i>.json`: one report per process."""
    i = jax.process_index() if process_index is None else process_index
    name = REPORT_NAME if i == 0 else REPORT_NAME.replace(".json", f".{i}.json")
    return Path(out_dir) / name
