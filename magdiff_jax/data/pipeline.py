"""Grain input pipelines for every stage, from one data config.

    config = data_config()                       # the embedded default: synthetic clips, 16 frames at 64x64
    ds = make_dataset(config, batch_size=8)      # grain.IterDataset of batches (dicts of numpy arrays)
    it = iter(ds); batch = next(it)              # it.get_state() / it.set_state(...), or Orbax (below)

Per process (multi-host): in training every process follows the same seeded order of the whole dataset (shuffled
again every epoch) and reads only its slice of each global batch, so the global batch does not depend on how many
processes share it; in evaluation process p reads records p, p + n, ... Records become examples in
`worker_count` worker processes (`transforms.load_example`); bad records come back as markers that the main
process drops, counts and reports (`bad_input.py`), stopping with a clear error when too many are bad. Then
batching and a thread prefetch.

The iterator state (including the bad-input counts) saves and restores through Orbax with
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`: a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np

from magdiff_jax.data.bad_input import REPORT_NAME, BadInputReport
from magdiff_jax.data.transforms import LoaderSpec, confined, safe_load
from magdiff_jax.data.video_io import VideoError, probe

SOURCES = ("synthetic", "folder", "images", "tfds", "encoded")


def data_config() -> ml_collections.ConfigDict:
    """Every key a data pipeline reads, with the embedded default (the synthetic dataset)."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # synthetic | folder (videos + captions) | images (images + captions) | tfds | encoded
    c.path = ""  # folder, TFDS data dir, or encoded-latents dir
    c.builder = ""  # TFDS builder name (source tfds)
    c.split = "train"
    c.synthetic = ml_collections.ConfigDict({"num": 72, "num_frames": 16, "size": 64, "seed": 0, "shape_size": 0.3,
                                             "travel": 0.4, "independent_start": False})
    c.task = "video"  # video | interp | vsr
    c.num_frames = 16
    c.stride = 1
    c.fps = 0.0  # > 0: sample at this frame rate instead of a fixed stride
    c.resolution = (64, 64)  # (height, width): shorter side resized to cover it, then cropped
    c.crop = "random"  # random | center (evaluation crops at the centre)
    c.buckets = ()  # ((frames, height, width), ...): batches of one shape each, by aspect ratio and length
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
    c.read_threads = 4  # threads loading examples in each process (Grain's default of 16 oversubscribes workers)
    c.read_prefetch = 8  # examples read ahead per process (Grain's default of 500 can hold tens of GB of clips)
    c.prefetch = 2  # batches prefetched by a thread (0: none)
    c.max_bad_fraction = 0.01
    return c


def synthetic_config(c):
    """The clip settings of a `data.synthetic` config (everything but `num`)."""
    from magdiff_jax.data.synthetic import SyntheticConfig

    return SyntheticConfig(num_frames=c.num_frames, size=c.size, seed=c.seed, shape_size=c.shape_size,
                           travel=c.travel, independent_start=c.independent_start)


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
        return sources.SyntheticSource(synthetic_config(config.synthetic), config.synthetic.num)
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
        from magdiff_jax.data.encoded import EncodedSource

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
    the trainer passes its workdir). With `config.buckets`, each batch comes from one (frames, height, width)
    bucket (`assign_buckets`), buckets drawn in proportion to their size. Raises ValueError naming the problem
    for a config it cannot serve.
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
    # Training: every process walks the same seeded order of the whole dataset and takes its slice of each global
    # batch (so a global batch is the same on 1 process x 8 devices and 2 x 4). Evaluation: records p::n.
    records = list(range(len(source))) if train else list(range(process_index, len(source), process_count))
    if not records:
        raise ValueError(f"{source!r} has no records for process {process_index} of {process_count}")
    source_bad = list(getattr(source, "bad", [])) if process_index == 0 else []
    share = len(records) // process_count if train else len(records)
    report = BadInputReport(total=max(share, 1) + len(source_bad), max_bad_fraction=config.max_bad_fraction,
                            path=report_path)
    for key, reason in source_bad:
        report.add(key, reason)

    global_batch = batch_size * process_count if train else batch_size
    if not config.get("buckets"):
        groups = [(records, spec)]
    else:
        if config.source == "encoded":
            raise ValueError("data.buckets: pre-encoded latents have one shape already; drop the buckets")
        buckets = [tuple(int(v) for v in b) for b in config.buckets]
        assignment = assign_buckets(source, records, buckets, spec.stride)
        groups = []
        for b, (frames, height, width) in enumerate(buckets):
            members = [i for i, a in zip(records, assignment, strict=True) if a == b]
            if train and len(members) < global_batch:  # too few to fill a batch: they are not used
                if members:
                    logging.warning("bucket %s has %d records, fewer than a batch; skipped", buckets[b], len(members))
                continue
            if members:
                groups.append((members, dataclasses.replace(spec, num_frames=frames, height=height, width=width)))
    streams, weights = [], []
    for members, group_spec in groups:
        if train and len(members) < global_batch:
            raise ValueError(f"{len(members)} records, fewer than a global batch of {global_batch} "
                             f"({batch_size} per process x {process_count})")
        stream = _example_stream(source, members, group_spec, config, train, seed=config.seed + len(streams),
                                 slice_of=(process_index, process_count, batch_size) if train else None)
        streams.append(DropBad(stream, report).batch(batch_size, drop_remainder=train))
        weights.append(len(members))
    if not streams:
        raise ValueError(f"no bucket of {list(config.buckets)} holds a batch of {global_batch} records")
    if len(streams) == 1:
        it = streams[0]
    elif train:
        it = grain.IterDataset.mix(streams, weights=[w / sum(weights) for w in weights])
    else:
        it = grain.experimental.InterleaveIterDataset(streams, cycle_length=1)
    if config.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=config.prefetch)
    return it


class _Subset:
    """Records `indices` of `source` (a process's shard, or one bucket of it)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


class _BatchSlice(grain.MapDataset):
    """Process `index` of `count`'s part of each global batch: elements [index * local, (index + 1) * local) of
    every run of `count * local` consecutive elements of the parent."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, local: int):
        super().__init__(parent)
        self._index, self._count, self._local = index, count, local

    def __len__(self):
        return len(self._parent) // (self._count * self._local) * self._local

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        batch, j = divmod(i, self._local)
        return self._parent[(batch * self._count + self._index) * self._local + j]

    def __str__(self):
        return f"_BatchSlice(process={self._index}/{self._count}, local={self._local})"


def _example_stream(source, indices, spec: LoaderSpec, config, train: bool, seed: int,
                    slice_of: tuple[int, int, int] | None = None) -> grain.IterDataset:
    """Shuffled (each epoch anew), repeated, loaded examples of `source[indices]`, bad ones still marked.
    `slice_of` = (process index, process count, local batch): keep this process's part of each global batch (the
    random map sits before the slice, so an example's randomness follows its global position)."""
    ds = grain.MapDataset.source(_Subset(source, indices))
    if train and config.shuffle:
        ds = ds.shuffle(seed=seed)
    epochs = config.num_epochs if train else 1
    if epochs != 1:
        ds = ds.repeat(None if epochs < 0 else epochs)
    if config.source == "encoded":  # latents and text embeddings already computed (`magdiff-jax data encode`)
        from magdiff_jax.data.encoded import encoded_loader

        loader = encoded_loader(config, train)
    else:
        loader = _Loader(spec)
    ds = ds.random_map(loader, seed=seed + 1)
    if slice_of is not None and slice_of[1] > 1:
        ds = _BatchSlice(ds, *slice_of)
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_prefetch)
    it = ds.to_iter_dataset(read_options=read)
    if config.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    return it


def assign_buckets(source, indices, buckets: list[tuple[int, int, int]], stride: int = 1) -> list[int]:
    """The (frames, height, width) bucket of each record: among the buckets whose frame count the clip can fill
    (at `stride`), the closest in aspect ratio, then the longest.

    Sizes come from what is stored, so that no host probes every video at start: a source's `sizes(indices)`
    ((usable frames, height, width) per record, -1 unknown: folder sources read them from annotation columns or
    the folder's size index written by `magdiff-jax data index`, TFDS builds from the size index written at build
    time), else a record's `num_frames`, `height`, `width` keys. Only a record with no stored size is probed
    (its header only, for most containers; logged once with the count). A record that cannot be probed goes to
    bucket 0, where the loader reports it as bad."""
    indices = list(indices)
    stored = source.sizes(indices) if hasattr(source, "sizes") else None
    if stored is not None and (stored[:, 0] < 0).any():
        logging.warning("data.buckets: %d of %d records have no stored size and are probed (for a folder dataset, "
                        "`magdiff-jax data index %s` stores them once)", int((stored[:, 0] < 0).sum()), len(indices),
                        getattr(source, "root", "DIR"))
    out = []
    for j, i in enumerate(indices):
        if stored is not None and stored[j, 0] > 0:
            n, h, w = (int(v) for v in stored[j])
        else:
            record = source[i]
            try:
                if all(k in record for k in ("num_frames", "height", "width")):
                    n, h, w = int(record["num_frames"]), int(record["height"]), int(record["width"])
                else:
                    info = probe(confined(record)["video"])
                    n, h, w = info.num_frames, info.height, info.width
            except (VideoError, ValueError, OSError):
                out.append(0)
                continue
            if record.get("frames") is not None:
                n = len(record["frames"])
        fits = [b for b, (f, _, _) in enumerate(buckets) if (f - 1) * stride + 1 <= n] or list(range(len(buckets)))
        ratio = np.log(h / w)
        out.append(min(fits, key=lambda b: (round(abs(np.log(buckets[b][1] / buckets[b][2]) - ratio), 6),
                                            -buckets[b][0])))
    return out


def default_report_path(out_dir: str | os.PathLike, process_index: int | None = None) -> Path:
    """`<out_dir>/bad_inputs.json` (process 0) or `bad_inputs.<i>.json`: one report per process."""
    i = jax.process_index() if process_index is None else process_index
    name = REPORT_NAME if i == 0 else REPORT_NAME.replace(".json", f".{i}.json")
    return Path(out_dir) / name
