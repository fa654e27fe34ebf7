"""Grain input pipelines for every stage, from one data config.

    config = data_config()                       # the embedded default: synthetic clips, 16 frames at 64x64
    ds = make_dataset(config, batch_size=8)      # batches (dicts of numpy arrays)
    it = iter(ds); batch = next(it)              # it.get_state() / it.set_state(...): JSON (training)

Per process (multi-host): in training, global batch k is a function of k alone (`_GlobalBatches`: a seeded bucket
draw, then the k-th run of global-batch-many examples of that bucket's shuffled, repeated order), and a process
loads its rows of it: the rows its devices hold in the batch sharding (`process_rows`; all of them when a model
axis spans processes and the batch is replicated over it). So a global batch does not depend on how many
processes share it, and the training iterator's state is the global position {"batch": k, "bad": ...}, the same on
every process: the trainer saves it as one JSON item and a run resumes on any number of processes. A bad example is
replaced by a good one of the same batch (counted and reported by `bad_input.py`, stopping with a clear error when
too many are bad), so no later batch shifts. In evaluation process p reads records p, p + n, ... once, bad ones
dropped. Examples load in `read_threads` threads and `worker_count` worker processes (`transforms.load_example`),
then a thread prefetch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import grain
import jax
import ml_collections
import numpy as np

from magdiff_jax.data.bad_input import REPORT_NAME, BadInput, BadInputReport
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
        # the CLIP branch: resized and centre-cropped at clip_load_size, bicubic with antialias to clip_size (PAPERS.md
        # A.2); the pyramid sizes are cut from the source frame (A.5)
        "enabled": False, "sizes": (384, 320, 256), "clip_size": 224, "clip_load_size": 448,
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
    c.read_threads = 4  # threads loading examples (training: batches) in each process (Grain's 16 oversubscribes)
    c.read_prefetch = 8  # examples read ahead per process, training: at least read_threads batches (Grain's default
    # of 500 can hold tens of GB of clips)
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
        # a config written before the key loaded the CLIP branch at clip_size itself
        clip_load_size=config.subject.get("clip_load_size", config.subject.clip_size),
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
                 source=None, global_batch: int | None = None, first_row: int | None = None):
    """Batches (dicts of numpy arrays, plus `key` and `caption` strings) for this process.

    `batch_size` is this process's rows of each batch. In training, the process holds rows
    [first_row, first_row + batch_size) of every global batch of `global_batch` rows (default: process i of n holds
    the i-th of n equal parts, `global_batch = n * batch_size`); the trainer passes the rows the batch sharding
    gives this process's devices (`process_rows`), which may overlap another process's when a model axis spans
    processes. `report_path` is where bad inputs are reported as JSON (default: none written; the trainer passes
    its workdir). With `config.buckets`, each batch comes from one (frames, height, width) bucket
    (`assign_buckets`), buckets drawn in proportion to their size. Raises ValueError naming the problem for a
    config it cannot serve.

    Training yields a `TrainBatches` iterable (its iterator's state is the global batch position and the bad
    inputs seen: the same on every process, so a run resumes on any number of processes); evaluation a Grain
    IterDataset reading records p, p + n, ... once.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    global_batch = batch_size * process_count if global_batch is None else global_batch
    first_row = process_index * batch_size if first_row is None else first_row
    if train and not 0 <= first_row <= first_row + batch_size <= global_batch:
        raise ValueError(f"rows [{first_row}, {first_row + batch_size}) are not rows of a global batch of "
                         f"{global_batch}")
    spec = loader_spec(config, train)
    if spec.tokenizer:  # a missing or broken tokenizer folder fails here, before any worker starts
        from magdiff_jax.data.transforms import tokenizer

        tokenizer(spec.tokenizer, spec.max_length)
    source = make_source(config) if source is None else source
    # Training: every process walks the same seeded order of the whole dataset and takes its rows of each global
    # batch (so a global batch is the same on 1 process x 8 devices and 2 x 4). Evaluation: records p::n.
    records = range(len(source)) if train else range(process_index, len(source), process_count)
    if not records:
        raise ValueError(f"{source!r} has no records for process {process_index} of {process_count}")
    source_bad = list(getattr(source, "bad", [])) if process_index == 0 else []
    share = len(records) * batch_size // global_batch if train else len(records)
    report = BadInputReport(total=max(share, 1) + len(source_bad), max_bad_fraction=config.max_bad_fraction,
                            path=report_path)
    for key, reason in source_bad:
        report.add(key, reason)

    if not config.get("buckets"):
        groups = [(records, spec)]
    else:
        if config.source == "encoded":
            raise ValueError("data.buckets: pre-encoded latents have one shape already; drop the buckets")
        buckets = [tuple(int(v) for v in b) for b in config.buckets]
        assignment = np.asarray(assign_buckets(source, records, buckets, spec.stride))
        groups = []
        for b, (frames, height, width) in enumerate(buckets):
            members = np.asarray(records)[assignment == b]
            if train and len(members) < global_batch:  # too few to fill a batch: they are not used
                if len(members):
                    logging.warning("bucket %s has %d records, fewer than a batch; skipped", buckets[b], len(members))
                continue
            if len(members):
                groups.append((members, dataclasses.replace(spec, num_frames=frames, height=height, width=width)))
    if train:
        for members, _ in groups:
            if len(members) < global_batch:
                raise ValueError(f"{len(members)} records, fewer than a global batch of {global_batch} "
                                 f"({batch_size} per process x {process_count})")
        if not groups:
            raise ValueError(f"no bucket of {list(config.buckets)} holds a batch of {global_batch} records")
        streams = [_example_stream(source, members, group_spec, config, True, seed=config.seed + b)
                   for b, (members, group_spec) in enumerate(groups)]
        batches = _GlobalBatches(streams, [len(m) for m, _ in groups], global_batch,
                                 range(first_row, first_row + batch_size), config)
        return TrainBatches(batches, config, report)
    streams = []
    for members, group_spec in groups:
        stream = _example_stream(source, members, group_spec, config, False, seed=config.seed + len(streams))
        stream = stream.to_iter_dataset(read_options=_read_options(config))
        if config.worker_count > 0:
            stream = stream.mp_prefetch(_mp_options(config))
        streams.append(DropBad(stream, report).batch(batch_size, drop_remainder=False))
    it = streams[0] if len(streams) == 1 else grain.experimental.InterleaveIterDataset(streams, cycle_length=1)
    if config.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=config.prefetch)
    return it


def _read_options(config) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_prefetch)


def _mp_options(config) -> grain.MultiprocessingOptions:
    return grain.MultiprocessingOptions(num_workers=config.worker_count,
                                        per_worker_buffer_size=config.worker_buffer_size)


def process_rows(sharding, global_batch: int, process_index: int | None = None) -> tuple[int, int]:
    """[start, stop): the rows of a global batch (dimension 0 sharded by `sharding`) that `process_index`'s devices
    hold. Processes whose devices share a batch shard (a model axis spanning processes) get the same rows; a layout
    where one process's rows are not one contiguous range is refused, naming the mesh."""
    process_index = jax.process_index() if process_index is None else process_index
    rows = set()
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        if device.process_index == process_index:
            rows.update(range(*index[0].indices(global_batch)))
    if not rows:
        raise ValueError(f"process {process_index} holds no device of the batch sharding {sharding}")
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(f"process {process_index}'s devices hold rows {sorted(rows)} of the global batch, not one "
                         f"contiguous range: order the mesh so that each process's devices are adjacent on the "
                         f"batch axes ({sharding})")
    return start, stop


class _Subset:
    """Records `indices` of `source` (a process's shard, or one bucket of it); `indices` a range or an int array,
    so a copy for each worker process holds no list of Python ints."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = indices if isinstance(indices, range) else np.asarray(indices, np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


def _example_stream(source, indices, spec: LoaderSpec, config, train: bool, seed: int) -> grain.MapDataset:
    """Loaded examples of `source[indices]` by position, bad ones still marked: in training shuffled (each epoch
    anew) and repeated, each example's randomness a function of its position in this order alone."""
    ds = grain.MapDataset.source(_Subset(source, indices))
    if train and config.shuffle:
        ds = ds.shuffle(seed=seed)
    if train:
        ds = ds.repeat(None)
    if config.source == "encoded":  # latents and text embeddings already computed (`magdiff-jax data encode`)
        from magdiff_jax.data.encoded import encoded_loader

        loader = encoded_loader(config, train)
    else:
        loader = _Loader(spec)
    return ds.random_map(loader, seed=seed + 1)


class _BucketSchedule:
    """Which bucket global batch k comes from, and how many batches of that bucket came before it: one seeded draw
    per batch, in proportion to the buckets' sizes. Random access by k (draws are made in blocks, each block's
    counts kept), so a stream can start at any batch."""

    BLOCK = 4096

    def __init__(self, sizes: list[int], seed: int):
        self.p = np.asarray(sizes, np.float64) / sum(sizes)
        self.seed = seed
        self.before = [np.zeros(len(sizes), np.int64)]  # per block: each bucket's batches in the blocks before it
        self.cached = (-1, None)

    def _draws(self, block: int) -> np.ndarray:
        if self.cached[0] != block:
            rng = np.random.default_rng([self.seed, block])
            self.cached = (block, rng.choice(len(self.p), self.BLOCK, p=self.p))
        return self.cached[1]

    def __call__(self, k: int) -> tuple[int, int]:
        if len(self.p) == 1:
            return 0, k
        block, r = divmod(k, self.BLOCK)
        while len(self.before) <= block:
            self.before.append(self.before[-1] + np.bincount(self._draws(len(self.before) - 1),
                                                             minlength=len(self.p)))
        draws = self._draws(block)
        b = int(draws[r])
        return b, int(self.before[block][b] + np.count_nonzero(draws[:r] == b))


class _GlobalBatches(grain.MapDataset):
    """Global batch k, the rows `rows` of it: random access by k. Batch k draws a bucket (`_BucketSchedule`) and
    is elements [i * G, (i + 1) * G) of that bucket's example stream (its i-th batch, G the global batch). A bad
    example is replaced by the next good one among this process's rows of the batch (then of the bucket's
    following batches), so the batch keeps its shape and no later batch shifts; the bad ones travel with the batch
    (`_bad`) for the main process to count."""

    LOOKAHEAD = 8  # batches searched for a good example when every row of one is bad

    def __init__(self, streams: list, sizes: list[int], global_batch: int, rows: range, config):
        super().__init__()
        self.streams, self.global_batch, self.rows = streams, global_batch, rows
        self.schedule = _BucketSchedule(sizes, config.seed)
        # training repeats forever; num_epochs > 0: that many epochs' worth of batches
        self.length = sys.maxsize if config.num_epochs < 0 else max(config.num_epochs * sum(sizes) // global_batch, 1)

    def __len__(self):
        return self.length

    def __str__(self):
        return f"_GlobalBatches(rows={self.rows.start}:{self.rows.stop} of {self.global_batch})"

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        b, i = self.schedule(k)
        stream = self.streams[b]
        examples = [stream[i * self.global_batch + r] for r in self.rows]
        bad = [(ex["_bad"], ex["_reason"]) for ex in examples if "_bad" in ex]
        good = [ex for ex in examples if "_bad" not in ex]
        ahead = 1
        while not good and ahead <= self.LOOKAHEAD:
            for r in self.rows:
                ex = stream[(i + ahead) * self.global_batch + r]
                if "_bad" in ex:
                    bad.append((ex["_bad"], ex["_reason"]))
                else:
                    good.append(ex)
            ahead += 1
        if not good:
            first = "; ".join(f"{key}: {reason}" for key, reason in bad[:5])
            raise BadInput(f"batch {k}", f"all {len(self.rows)} rows of this process in it and in the next "
                           f"{self.LOOKAHEAD} batches are bad input; first: {first}")
        filled, n = [], 0
        for ex in examples:
            if "_bad" in ex:
                ex, n = good[n % len(good)], n + 1
            filled.append(ex)
        batch = {key: np.stack([np.asarray(ex[key]) for ex in filled]) for key in filled[0]}
        batch["_bad"] = bad
        return batch


class TrainBatches:
    """The training stream of one process: iterate for batches. Its iterator's `get_state()` is
    {"batch": global batch position, "bad": {key: reason}} (JSON), the same whatever the number of processes, and
    `set_state` restarts the stream at that batch, so a run saved by 2 processes resumes on 1 or 4 with the same
    global batches."""

    def __init__(self, batches: _GlobalBatches, config, report: BadInputReport):
        self.batches, self.config, self.report = batches, config, report

    def __iter__(self):
        return _TrainIterator(self)

    def from_batch(self, k: int):
        """A Grain iterator over batches k, k + 1, ... (read threads, worker processes and a thread prefetch). A
        read thread loads one batch (this process's rows of it): `read_threads` batches load at once, and
        `read_prefetch` examples' worth of batches, but no fewer than the threads, are read ahead."""
        threads = self.config.read_threads
        ahead = max(threads, -(-self.config.read_prefetch // len(self.batches.rows)))
        ds = self.batches[k:].to_iter_dataset(read_options=grain.ReadOptions(num_threads=threads,
                                                                             prefetch_buffer_size=ahead))
        if self.config.worker_count > 0:
            ds = ds.mp_prefetch(_mp_options(self.config))
        if self.config.prefetch > 0:
            ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self.config.prefetch)
        return iter(ds)


class _TrainIterator:
    def __init__(self, stream: TrainBatches):
        self.stream, self.batch, self._it = stream, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self.stream.from_batch(self.batch)
        out = next(self._it)
        self.batch += 1
        for key, reason in out.pop("_bad"):
            self.stream.report.add(key, reason)
        return out

    def get_state(self) -> dict:
        return {"batch": self.batch, "bad": dict(self.stream.report.bad)}

    def set_state(self, state: dict, keep_bad: bool = True) -> None:
        """Restart at `state`'s batch; `keep_bad` False starts the bad-input count afresh (the trainer's processes
        other than the main one, whose report is the one kept)."""
        self.close()
        self.batch = int(state["batch"])
        self.stream.report.bad = dict(state.get("bad", {})) if keep_bad else {}

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


IMAGE_PREFIX = "image_"


class JointIterator:
    """Joint image/video training: each step's batch is a video batch and an image batch (one-frame videos from a
    second source), the image entries prefixed `image_` (`image_video`, `image_tokens`, ...). Its state is both
    streams' global positions, {"video": ..., "image": ...} (JSON)."""

    def __init__(self, videos, images):
        self.videos, self.images = iter(videos), iter(images)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = dict(next(self.videos))
        out.update({IMAGE_PREFIX + k: v for k, v in next(self.images).items()})
        return out

    def get_state(self) -> dict:
        return {"video": self.videos.get_state(), "image": self.images.get_state()}

    def set_state(self, state: dict, keep_bad: bool = True) -> None:
        if set(state) != {"video", "image"}:
            raise ValueError(f"a joint image/video data state has 'video' and 'image' entries, got {sorted(state)} "
                             "(a checkpoint of a run without image_batch_size?)")
        self.videos.set_state(state["video"], keep_bad)
        self.images.set_state(state["image"], keep_bad)

    def close(self) -> None:
        for it in (self.videos, self.images):
            it.close()


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


def default_report_path(out_dir: str | os.PathLike, process_index: int | None = None):
    """`<out_dir>/bad_inputs.json` (process 0) or `bad_inputs.<i>.json`: one report per process (local or a cloud
    URI, `utils.files.as_path`)."""
    from magdiff_jax.utils.files import as_path

    i = jax.process_index() if process_index is None else process_index
    name = REPORT_NAME if i == 0 else REPORT_NAME.replace(".json", f".{i}.json")
    return as_path(out_dir) / name
