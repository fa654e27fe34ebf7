"""Training data pipeline on CPU: clips/s of `make_dataset` for 16 frames at 256x256 decoded from 480p H.264.

    python benchmarks/data_cpu.py                      # all settings below, about 3.5 minutes on 2 cores
    python benchmarks/data_cpu.py --data DIR           # keep the generated source clips in DIR
    python benchmarks/data_cpu.py --workers 0 2 --skip-subject --skip-tiny

Source: 24 clips of 48-64 frames at 24 fps, 854x480, H.264 crf 23 (panning textured background with sensor
noise and striped shapes moving over it, about 1.3 Mbit/s), in the video-caption folder layout with per-frame PNG
masks of one subject. Generated once into a cache folder (default: <tmp>/magdiff_data_bench; about a minute)
and reused.

Settings: `make_dataset` with source "folder", train=True, batch 4, random start and crop, resolution (256, 256),
16 frames at stride 1, for each worker count (default 0, 1, 2). Each is started (time to the first batch reported
as start-up, which includes spawning the workers), drained of what it read ahead, then timed over `--repeats`
runs of at least `--batches` batches and `--min-run-s` seconds; clips/s is over all timed runs (Grain's 16 read
threads finish clips in bursts, so short windows scatter). Per setting also: resident memory of the process tree
after the timed runs and the CPU cores it kept busy, with those other processes kept busy meanwhile (to spot a
loaded machine). Memory: Grain reads up to 500 examples ahead per process, so the subject variant with float32
output (79 MB a clip) can hold 10-16 GB here even with this consumer that never waits.
Also reported:
  - decode only: `read_frames` of the 16 frames with the decode-time resize, in-process, no Grain;
  - a breakdown of one example's loading into its stages (probe, decode + resize, normalise to float32, and for
    the subject: masks, entity pyramid, CLIP crop), and the bytes an example carries from a worker;
  - at the best worker count: the same with uint8 output (normalize=False), and the MagDiff subject variant
    (masks + entity pyramid 384/320/256 + CLIP 224), both with float32 and uint8 output;
  - the tiny setting (synthetic source, 16 frames at 64x64, worker_count 0), what the tiny configs train on;
  - whether loading keeps up with the JAX training step of benchmarks/results/unet3d_cpu.json (1 video), and
    the CPU it would take from that step on the same cores.
Writes benchmarks/results/data_cpu.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HEIGHT, WIDTH, FPS, CRF = 480, 854, 24, 23
FRAMES, RES, BATCH = 16, (256, 256), 4
DATA_VERSION = 2  # bump when the generated clips change


# ---------------------------------------------------------------------------------------------------------------
# source clips


def make_source_clip(index: int, num_frames: int):
    """(frames (F, 480, 854, 3) uint8, subject masks (F, 480, 854) bool) of clip `index` (deterministic)."""
    import numpy as np

    rng = np.random.default_rng([DATA_VERSION, index])
    pan_y, pan_x = rng.uniform(-0.6, 0.6), rng.uniform(1.5, 3.5)  # camera pan, pixels per frame
    margin = math.ceil(0.6 * num_frames) + 1
    bh, bw = HEIGHT + 2 * margin, WIDTH + math.ceil(pan_x * num_frames) + 1
    yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
    background = np.zeros((bh, bw, 3), np.float32) + rng.uniform(70, 170, 3).astype(np.float32)
    for _ in range(5):  # smooth waves of several scales
        fy, fx = rng.uniform(0.005, 0.06, 2)
        wave = rng.uniform(8, 25) * np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * np.pi))
        background += wave[..., None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
    fine = rng.normal(0, 12, (bh // 2 + 1, bw // 2 + 1, 3)).astype(np.float32)  # detail fixed to the scene
    background += fine.repeat(2, 0).repeat(2, 1)[:bh, :bw]
    sy, sx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    shapes = [dict(cy=rng.uniform(100, 380), cx=rng.uniform(150, 700), ry=rng.uniform(40, 110),
                   rx=rng.uniform(30, 90), vy=rng.uniform(-3, 3), vx=rng.uniform(-5, 5),
                   color=rng.uniform(30, 230, 3).astype(np.float32)) for _ in range(3)]
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    masks = np.empty((num_frames, HEIGHT, WIDTH), bool)
    for t in range(num_frames):
        oy, ox = margin + int(pan_y * t), int(pan_x * t)
        frame = background[oy:oy + HEIGHT, ox:ox + WIDTH].copy()
        for k, s in enumerate(shapes):  # the last one drawn is the subject (on top, so its mask is exact)
            cy, cx = s["cy"] + s["vy"] * t, s["cx"] + s["vx"] * t
            m = ((sy - cy) / s["ry"]) ** 2 + ((sx - cx) / s["rx"]) ** 2 <= 1
            stripes = 20 * np.sin(0.15 * (sx[m] - cx) + 0.1 * (sy[m] - cy))
            frame[m] = s["color"] + stripes[:, None]
            if k == len(shapes) - 1:
                masks[t] = m
        frame += rng.normal(0, 3, (HEIGHT, WIDTH, 1)).astype(np.float32)  # sensor noise
        frames[t] = np.clip(frame, 0, 255)
    return frames, masks


def ensure_source(root: Path, clips: int) -> tuple[Path, float]:
    """The video-caption folder at `root` (generated unless a matching one is there) and the seconds spent."""
    import numpy as np
    from PIL import Image

    from magdiff_jax.data.video_io import write_video

    meta = {"version": DATA_VERSION, "clips": clips, "size": [HEIGHT, WIDTH], "fps": FPS, "crf": CRF}
    stamp = root / "benchmark.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == meta:
        return root, 0.0
    print(f"generating {clips} source clips in {root} ...", flush=True)
    t0 = time.perf_counter()
    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for i in range(clips):
        n = 48 + (i * 7) % 17  # 48..64 frames
        frames, masks = make_source_clip(i, n)
        name = f"{i:05d}"
        write_video(tmp / "videos" / f"{name}.mp4", frames, fps=FPS, crf=CRF)
        (tmp / "masks" / name).mkdir(parents=True)
        for t, m in enumerate(masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(tmp / "masks" / name / f"{t:03d}.png")
        rows.append({"video": f"videos/{name}.mp4", "caption": f"clip {i}: shapes moving over a textured wall",
                     "mask": f"masks/{name}"})
    with open(tmp / "captions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["video", "caption", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp / "benchmark.json").write_text(json.dumps(meta))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# measurements


def base_config(data: Path, workers: int, subject: bool = False, normalize: bool = True):
    from magdiff_jax.data.pipeline import data_config

    c = data_config()
    c.source, c.path = "folder", str(data)
    c.num_frames, c.stride, c.resolution, c.crop = FRAMES, 1, RES, "random"
    c.worker_count, c.normalize = workers, normalize
    c.subject.enabled = subject
    return c


def time_pipeline(config, name: str, batches: int, repeats: int, min_run_s: float,
                  batch_size: int = BATCH) -> dict:
    """Start-up (to the first batch), then `repeats` timed runs of at least `batches` consecutive batches and
    `min_run_s` seconds each, after draining what the pipeline read ahead (Grain's read threads, the worker
    buffers and the batch prefetch), so that the runs see the steady state. clips/s: all timed clips over all
    timed seconds (the runs' own rates are kept to show the spread)."""
    import grain

    from magdiff_jax.data.pipeline import make_dataset

    t0 = time.perf_counter()
    it = iter(make_dataset(config, batch_size=batch_size, train=True, process_index=0, process_count=1))
    first = next(it)
    startup = time.perf_counter() - t0
    nbytes = sum(v.nbytes for v in first.values() if hasattr(v, "nbytes")) / batch_size
    read_ahead = max(1, config.worker_count) * grain.ReadOptions().num_threads
    ahead = config.worker_count * config.worker_buffer_size + read_ahead
    drain = config.prefetch + math.ceil(ahead / batch_size) + 1
    for _ in range(drain):
        next(it)
    runs, ticks0 = [], _cpu_ticks()
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < batches or time.perf_counter() - t0 < min_run_s:
            next(it)
            n += 1
        runs.append((n * batch_size, time.perf_counter() - t0))
    ticks1, tree = _cpu_ticks(), _proc_tree()
    timed_s, hz = sum(t for _, t in runs), os.sysconf("SC_CLK_TCK")
    cpu = {"this_run": (ticks1[1] - ticks0[1]) / hz / timed_s,
           "other_processes": max(0.0, (ticks1[0] - ticks0[0]) - (ticks1[1] - ticks0[1])) / hz / timed_s}
    rss = sum(pages for pages, _ in tree.values()) * os.sysconf("SC_PAGE_SIZE") / 2**20
    it.close()
    del it, first
    _release_memory()
    rates = [c / t for c, t in runs]
    clips_per_s = sum(c for c, _ in runs) / timed_s  # Grain's read threads finish clips in bursts: a long window
    result = {"setting": name, "worker_count": config.worker_count, "clips_per_s": clips_per_s,
              "ms_per_clip": 1000 / clips_per_s, "startup_s": startup, "batches": sum(c for c, _ in runs) // batch_size,
              "repeats": repeats, "batch_size": batch_size, "drained_batches": drain, "bytes_per_clip": int(nbytes),
              "run_clips_per_s": rates, "rss_mb": rss, "cpu_cores_busy": cpu}
    print(f"  {name:24s} w={config.worker_count}  {clips_per_s:6.2f} clips/s  {1000 / clips_per_s:7.1f} ms/clip  "
          f"start-up {startup:5.2f} s  runs {' '.join(f'{r:.1f}' for r in rates)}  CPU cores: this "
          f"{cpu['this_run']:.2f}, others {cpu['other_processes']:.2f}", flush=True)
    return result


def _release_memory():
    """Free what the last setting left behind, so that the next one's resident memory is its own."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_tree() -> dict[int, tuple[int, int]]:
    """{pid: (resident pages, CPU clock ticks)} of this process and its descendants (Linux /proc; else {})."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[21]), int(fields[11]) + int(fields[12]))
    tree, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, (ppid, _, _) in stats.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return {p: stats[p][1:] for p in tree if p in stats}


def _cpu_ticks() -> tuple[int, int]:
    """(busy CPU ticks of the whole machine, CPU ticks of this process tree), to tell other load apart."""
    try:
        busy = sum(int(v) for i, v in enumerate(Path("/proc/stat").read_text().split("\n")[0].split()[1:9])
                   if i not in (3, 4))  # all but idle and iowait
    except OSError:
        return 0, 0
    return busy, sum(cpu for _, cpu in _proc_tree().values())


def time_stages(data: Path, subject: bool, n: int, seed: int = 0) -> dict:
    """One example's loading split into its stages, in-process, over `n` clips with random starts and crops;
    mean ms per clip for each (the loader's own steps, in its order)."""
    import numpy as np

    from magdiff_jax.data import transforms as tf
    from magdiff_jax.data.pipeline import loader_spec
    from magdiff_jax.data.sources import VideoCaptionFolder
    from magdiff_jax.data.video_io import probe, read_frames

    try:
        from grain._src.python.ipc import shared_memory_array as shm
    except ImportError:  # private module: skip that stage if it moves
        shm = None
    source = VideoCaptionFolder(data)
    spec = loader_spec(base_config(data, 0, subject=subject), train=True)
    rng = np.random.default_rng(seed)
    stages: dict[str, list[float]] = {}

    def timed(stage, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        stages.setdefault(stage, []).append(1000 * (time.perf_counter() - t0))
        return out

    ex = None
    for i in range(n):
        record = source[i % len(source)]
        info = timed("probe", probe, record["video"])
        indices = tf.sample_indices(range(info.num_frames), FRAMES, 1, rng)
        size = tf.scaled_size(info.height, info.width, *RES)
        y, x = tf.crop_offset(size, RES, rng)
        frames = timed("decode + resize", read_frames, record["video"], indices, resize=size)
        frames = frames[:, y:y + RES[0], x:x + RES[1]]
        ex = {"video": frames}
        if subject:
            timed("probe mask", probe, record["mask"])
            masks = timed("read masks (PNG + resize)", read_frames, record["mask"], indices, resize=size, gray=True)
            masks = masks[:, y:y + RES[0], x:x + RES[1]] > 127
            ex.update(timed("subject inputs (resizes)", tf.subject_inputs, frames, masks, spec, rng))
        uint8_bytes = sum(v.nbytes for v in ex.values() if hasattr(v, "nbytes"))
        # the hand-over from a worker: Grain copies C-contiguous arrays into shared memory and pickles the rest
        # through its queue (the uint8 crop is a strided view, so uint8 output goes the pickle way); then the
        # main process copies the example into its batch
        timed("uint8 out: pickle + batch copy", lambda e: _copy(pickle.loads(pickle.dumps(e, protocol=5))), ex)
        ex = timed("normalize to float32", tf.normalize_example, ex)
        if shm is not None:
            timed("float32 out: shm + batch copy", lambda e: _copy(shm.open_from_shm(shm.copy_to_shm(e))), ex)
    float_bytes = sum(v.nbytes for v in ex.values() if hasattr(v, "nbytes"))
    total = [1000 * t for t in _repeat_time(lambda r: tf.load_example(r, spec, rng), [source[i % len(source)]
                                                                                    for i in range(n)])]
    out = {k: statistics.mean(v) for k, v in stages.items()}
    out["load_example (whole)"] = statistics.mean(total)
    return {"ms_per_clip": out, "bytes_uint8": uint8_bytes, "bytes_float32": float_bytes, "clips": n}


def _with_other_cpu(fn, *args, **kwargs) -> dict:
    """fn's result dict, with the CPU cores other processes kept busy meanwhile (`other_processes_cpu_cores`)."""
    t0, ticks0 = time.perf_counter(), _cpu_ticks()
    out = fn(*args, **kwargs)
    ticks1, wall = _cpu_ticks(), time.perf_counter() - t0
    other = max(0, (ticks1[0] - ticks0[0]) - (ticks1[1] - ticks0[1])) / os.sysconf("SC_CLK_TCK") / wall
    return {**out, "other_processes_cpu_cores": other}


def _copy(example: dict) -> dict:
    import numpy as np

    return {k: np.array(v) for k, v in example.items()}


def _repeat_time(fn, items) -> list[float]:
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return times


def time_decode(data: Path, n: int, seed: int = 1) -> dict:
    """`read_frames` of 16 frames (random start) with the decode-time resize, in-process: ms per clip."""
    import numpy as np

    from magdiff_jax.data.sources import VideoCaptionFolder
    from magdiff_jax.data.transforms import sample_indices, scaled_size
    from magdiff_jax.data.video_io import probe, read_frames

    source = VideoCaptionFolder(data)
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        path = source[i % len(source)]["video"]
        info = probe(path)
        jobs.append((path, sample_indices(range(info.num_frames), FRAMES, 1, rng),
                     scaled_size(info.height, info.width, *RES)))
    times = _repeat_time(lambda job: read_frames(job[0], job[1], resize=job[2]), jobs)
    return {"ms_per_clip_mean": 1000 * statistics.mean(times), "ms_per_clip_median": 1000 * statistics.median(times),
            "clips_per_s": 1 / statistics.mean(times), "clips": n}


def training_comparison(results_dir: Path, settings: list[dict]) -> dict | None:
    """Clips/s the JAX training step of unet3d_cpu.json consumes against what each setting delivers, and the CPU
    the loader would take from that step on the same cores (its CPU seconds per clip over the step's)."""
    path = results_dir / "unet3d_cpu.json"
    if not path.is_file():
        return None
    ref = json.loads(path.read_text())
    step = ref["median_s"]["jax_train"]
    videos = ref["config"]["input_shape"][0]
    needed = videos / step
    step_cpu_s = step * (ref.get("threads") or os.cpu_count())
    out = {"source": str(path.relative_to(results_dir.parent.parent)), "jax_train_step_s": step,
           "step_input_shape": ref["config"]["input_shape"], "clips_per_s_needed": needed,
           "note": "the tiny configs train at 64x64 pixels: the 256x256 figures are a conservative bound",
           "delivered": {}}
    for s in settings:
        cpu_s_per_clip = s["cpu_cores_busy"]["this_run"] / s["clips_per_s"]
        out["delivered"][s["label"]] = {"clips_per_s": s["clips_per_s"], "headroom": s["clips_per_s"] / needed,
                                        "loader_cpu_s_per_clip": cpu_s_per_clip,
                                        "loader_cpu_share_of_step": cpu_s_per_clip * videos / step_cpu_s}
    return out


# ---------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="source clip folder (generated if missing or stale)")
    ap.add_argument("--clips", type=int, default=24, help="source clips to generate")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to time")
    ap.add_argument("--batches", type=int, default=6, help="at least this many batches of 4 per timed run")
    ap.add_argument("--min-run-s", type=float, default=5.0, help="and at least this many seconds per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (clips/s over all of them)")
    ap.add_argument("--skip-subject", action="store_true", help="leave out the MagDiff subject variant")
    ap.add_argument("--skip-tiny", action="store_true", help="leave out the tiny (64x64 synthetic) setting")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/data_cpu.json)")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import flags
    from absl import logging as absl_logging

    flags.FLAGS.mark_as_parsed()  # Grain reads absl flags
    absl_logging.set_verbosity(absl_logging.WARNING)

    import av
    import grain
    import jax
    import numpy as np
    import PIL

    from magdiff_jax.data.pipeline import data_config

    t_start = time.perf_counter()
    root = Path(args.data) if args.data else Path(tempfile.gettempdir()) / "magdiff_data_bench"
    data, gen_s = ensure_source(root.absolute(), args.clips)
    videos = sorted((data / "videos").glob("*.mp4"))
    from magdiff_jax.data.video_io import probe

    kbps = sum(p.stat().st_size for p in videos) * 8 / 1000 / sum(probe(p).num_frames for p in videos) * FPS

    print(f"source: {len(videos)} clips {WIDTH}x{HEIGHT} H.264 crf {CRF} ({kbps:.0f} kbit/s) in {data}"
          + (f", generated in {gen_s:.0f} s" if gen_s else ", cached"))
    print(f"target: {FRAMES} frames at {RES[0]}x{RES[1]}, batch {BATCH}, {os.cpu_count()} CPUs", flush=True)

    decode = _with_other_cpu(time_decode, data, 2 * len(videos))
    print(f"decode only (read_frames + resize, in-process): {decode['ms_per_clip_mean']:.1f} ms/clip "
          f"({decode['clips_per_s']:.1f} clips/s)", flush=True)
    stages = _with_other_cpu(time_stages, data, subject=False, n=len(videos))
    subject_stages = None if args.skip_subject else _with_other_cpu(time_stages, data, subject=True,
                                                                    n=len(videos) // 2)

    print("pipeline (make_dataset):", flush=True)
    timing = dict(batches=args.batches, repeats=args.repeats, min_run_s=args.min_run_s)
    settings = [time_pipeline(base_config(data, w), "video float32", **timing) for w in args.workers]
    best = max(settings, key=lambda s: s["clips_per_s"])["worker_count"]
    settings.append(time_pipeline(base_config(data, best, normalize=False), "video uint8", **timing))
    if not args.skip_subject:
        for normalize in (True, False):
            settings.append(time_pipeline(base_config(data, best, subject=True, normalize=normalize),
                                          f"subject {'float32' if normalize else 'uint8'}",
                                          **dict(timing, batches=max(2, args.batches // 2))))
    tiny = None
    if not args.skip_tiny:
        c = data_config()  # the embedded default: synthetic clips, 16 frames at 64x64
        c.worker_count = 0
        tiny = time_pipeline(c, "tiny (synthetic 64x64)", **dict(timing, batches=10 * args.batches))
        tiny["config"] = {"source": c.source, "num_frames": c.num_frames, "resolution": list(c.resolution)}

    compared = [dict(s, label=f"256x256 w={s['worker_count']}") for s in settings if s["setting"] == "video float32"]
    if tiny:
        compared.append(dict(tiny, label="tiny 64x64 w=0"))
    results_dir = Path(__file__).parent / "results"
    train = training_comparison(results_dir, compared)

    print(f"\n{'setting':24s}{'workers':>8s}{'clips/s':>9s}{'ms/clip':>9s}{'start-up s':>12s}{'MB/clip':>9s}"
          f"{'RSS MB':>8s}")
    for s in settings + ([tiny] if tiny else []):
        print(f"{s['setting']:24s}{s['worker_count']:8d}{s['clips_per_s']:9.2f}{s['ms_per_clip']:9.1f}"
              f"{s['startup_s']:12.2f}{s['bytes_per_clip'] / 2**20:9.1f}{s['rss_mb']:8.0f}")
    print(f"{'decode only':24s}{'-':>8s}{decode['clips_per_s']:9.2f}{decode['ms_per_clip_mean']:9.1f}")
    for title, st in (("video", stages), ("subject", subject_stages)):
        if st:
            print(f"\nstages of one example, {title}, in-process (mean ms/clip; {st['bytes_uint8'] / 2**20:.1f} MB "
                  f"uint8, {st['bytes_float32'] / 2**20:.1f} MB float32):")
            for k, v in st["ms_per_clip"].items():
                print(f"  {k:28s}{v:8.1f}")
    if train:
        print(f"\ntraining step (JAX, {train['step_input_shape']} latents, {train['jax_train_step_s']:.2f} s): needs "
              f"{train['clips_per_s_needed']:.2f} clips/s")
        for name, d in train["delivered"].items():
            print(f"  {name:18s} delivers {d['clips_per_s']:6.2f} clips/s ({d['headroom']:.0f}x); loader CPU "
                  f"{1000 * d['loader_cpu_s_per_clip']:.0f} ms/clip = {100 * d['loader_cpu_share_of_step']:.1f}% "
                  f"of a step's CPU")
        print(f"  ({train['note']})")

    result = {
        "command": "python " + " ".join(sys.argv),
        "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "source": {"path": str(data), "clips": len(videos), "size": [HEIGHT, WIDTH], "fps": FPS, "crf": CRF,
                   "frames_per_clip": "48-64", "kbit_per_s": kbps, "generated_s": gen_s},
        "target": {"num_frames": FRAMES, "resolution": list(RES), "batch_size": BATCH, "crop": "random"},
        "decode_only": decode,
        "stages": stages,
        "subject_stages": subject_stages,
        "settings": settings,
        "tiny": tiny,
        "training_step": train,
        "total_s": time.perf_counter() - t_start,
        "versions": {"av": av.__version__, "grain": _version("grain", grain), "jax": jax.__version__,
                     "numpy": np.__version__, "pillow": PIL.__version__, "python": platform.python_version()},
    }
    out = Path(args.out) if args.out else results_dir / "data_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out} ({result['total_s']:.0f} s)")


def _version(dist: str, module) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return getattr(module, "__version__", "?")


if __name__ == "__main__":
    main()
