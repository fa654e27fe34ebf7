"""U-Nets on CPU: JAX vs diffusers PyTorch on the same converted weights and inputs, measured alternately.

    python benchmarks/unet_cpu.py                    # unet3d, the documented mid-size config below
    python benchmarks/unet_cpu.py --kind unet2d      # the same widths as an image U-Net (batch 2)
    python benchmarks/unet_cpu.py --kind unet_motion
    python benchmarks/unet_cpu.py --malloc glibc     # both with glibc's malloc as it is, JAX dispatching async
    python benchmarks/unet_cpu.py --malloc hugepages # both with glibc's transparent huge pages only
    python benchmarks/unet_cpu.py --malloc tcmalloc  # both with tcmalloc preloaded

Config (all kinds): block widths 64/128/192, cross-attention in the first two blocks (heads of width 32),
1 resnet per block, 77 text tokens of width 256, 32x32x4 latents; video kinds take 1 video of 8 frames, unet2d a
batch of 2 images. unet3d: 15.5M parameters. Reports: JAX compile time; median forward and training-step
(forward + backward + AdamW) times for both frameworks after warm-up; the ratio JAX / PyTorch (below 1: JAX is
faster); the analytic FLOP count (magdiff_jax.utils.flops; also with convolutions counted by their in-bounds taps,
as XLA counts them) against XLA's cost_analysis (of the same model with
`attention_impl="xla"`: XLA counts the body of blockwise attention's loop once); achieved GFLOP/s; each step's
system CPU time and page faults. The models run with their configs' default `attention_impl="auto"` (blockwise
attention on CPU for long sequences). The JAX step returns new parameters and optimizer state (PyTorch updates in
place); with --donate it donates the old ones, as the trainer's step does.

One process per framework. Each worker builds or loads the model, compiles and warms up, then runs one timed call
whenever this script asks: JAX forward, PyTorch forward, JAX step, PyTorch step, repeated, so both see the same
machine load while only one of them runs at a time, and neither allocates from the other's heap. With --settle (the
default) each timed call follows an untimed call of the same function in the same worker (reported as settle_s), so
it runs as the steps of a training or sampling loop do, back to back, not after 2-3 s of the other framework's run.
On the 2-vCPU AMD VM that gap matters: its kernel (DAMON pageout, no swap) takes back memory a process has left
idle for about 2 s, and the next call faults it in again: a JAX step after a 2.5-5 s sleep took 3.1-4.3 s (2.4-4.2 s
of system time, ~1300 page faults, 877 of them 2 MiB pages: the step's whole 1.75 GB temp buffer), against
1.54-1.65 s after 0-1 s. Without --settle a third of the JAX steps paid it (and the faster framework idles longest);
the settle calls still show it. Results before --settle existed were measured without it.

The allocator (--malloc, the same for both workers). XLA's CPU runtime allocates a step's intermediates afresh on
every call: one ~2 GB buffer per unet3d training step. With glibc's malloc as it is, that buffer comes from a fresh
mmap each call: ~650k page faults and 3-4 s of system time per JAX step on a 2-vCPU VM, more when the PyTorch step
runs in between.
  magdiff (default): what `magdiff-jax` runs with (magdiff_jax/utils/allocator.py): GLIBC_TUNABLES
      glibc.malloc.hugetlb=1, mmap_max=0 and trim_threshold=64 GiB, and the JAX worker runs its programs on the
      calling thread (JAX's async CPU dispatch off), so freed buffers stay in the main heap and the next step reuses
      them (~300 faults per step).
  glibc: glibc's malloc as it is, JAX with async dispatch (plain JAX and PyTorch as they come).
  hugepages: glibc.malloc.hugetlb=1 only: the buffers still come from fresh mmaps, 2 MiB pages at a time.
  tcmalloc: gperftools' tcmalloc (libtcmalloc_minimal.so.4; Debian: libtcmalloc-minimal4) preloaded into both; it
      keeps freed memory in its page heap.
In every choice but glibc the JAX worker runs its programs on the calling thread, as `magdiff-jax` does.
Other settings measured and dropped: glibc with arena_max=1 (every thread on the main heap: no faults with async
dispatch, but lock contention slowed the demo's small steps); jemalloc (slower than glibc here).
Both workers are pinned to the same `--threads` cores (os.sched_setaffinity): XLA's CPU thread pool takes every core
the process may use, PyTorch the threads it is told, so on a larger machine an unpinned JAX worker computes on more
cores than PyTorch does.

Figures (unet3d, --donate; results/unet3d_cpu*.json; seconds, JAX / PyTorch):
  2-vCPU AMD EPYC (Zen 4) VM, magdiff, --settle, with the weight-gradient rules for in > out and in == out
  (layers.common.weight_gradient): forward 0.534 / 0.698 (0.77x), train step 1.663 / 2.097 (0.79x) (--steps 21, the
  committed JSON); five other runs the same hour, --steps 21: 1.710 / 2.153 (0.79x), 1.722 / 2.261 (0.76x), 1.684 /
  2.187 (0.77x), 1.697 / 2.137 (0.79x), 1.936 / 2.468 (0.78x, the machine slower), forward 0.69-0.83x; the code before
  that change, the same hour: 1.676 / 2.138 (0.78x), forward 0.75x. unet_motion 0.337 / 0.425 (0.79x), 1.113 / 1.362
  (0.82x); unet2d 0.072 / 0.078 (0.92x), 0.258 / 0.265 (0.98x).
  Where the unet3d step's CPU time goes (perf, cpu-clock samples of the JAX process, before that change; seconds per
  step on one core / two cores): YNNPACK matmuls 1.51 / 1.51; Eigen's products on oneDNN's sgemm kernels (3x3
  convolutions and the token-axis weight gradients) 0.71 / 0.73, plus Eigen's operand packing 0.17 / 0.22; XLA's
  generated elementwise kernels 0.41 / 0.42; YNNPACK's elementwise, transpose and reduction kernels 0.18 / 0.18;
  thread pool and kernel 0.00 / 0.07: 3.08 / 3.27 s of CPU time per step, and on two cores one core idles ~12% of
  the time. Per core the work is near the matmul peak; what two cores lose is the runtime's.
  The day before, with blockwise attention's flash-style backward (layers.attention): forward 0.490 / 0.649 (0.76x),
  train step 1.615 / 1.989 (0.81x) (--steps 21, then the committed JSON); other runs the same hour: --steps 21 1.695 /
  2.176 (0.78x); --steps 11 1.620 / 2.070 (0.78x), 1.900 / 2.382 (0.80x, the machine slower), 1.643 / 2.018 (0.81x);
  forward 0.73-0.78x. JAX's step holds at 1.60-1.70 s, PyTorch's moves 1.99-2.18 s from run to run, and the ratio with
  it. unet_motion 0.324 / 0.409 (0.79x), 1.105 / 1.380 (0.80x) (another run: 0.79x, 0.81x); unet2d 0.066 / 0.071
  (0.93x), 0.249 / 0.243 (1.02x). The same code without --settle: train step 0.84x and 0.93x (a third of the JAX steps
  paid the refault above).
  Before --settle and the flash-style backward, the same VM, with the erf-form GELU (layers.common.gelu): forward
  0.499 / 0.678 (0.73x), train step 1.793 / 2.122 (0.84x) (--steps 11, then the committed JSON; three other runs:
  1.721 / 2.077 and 1.643 / 1.979, both 0.83x, and 1.639 / 2.018, 0.81x; PyTorch's step ran 1.98-2.12 s that day
  against 2.12-2.21 s the day before). unet_motion 0.340 / 0.436 (0.78x), 1.138 / 1.364 (0.83x); unet2d
  0.071 / 0.073 (0.98x), 0.253 / 0.244 (1.04x) (unet2d's 0.07 s forward moved 0.96-1.19x across runs).
  Where the unet3d step goes (jax.profiler, the same VM): on one core 2.93-3.06 s, on two 1.64-1.79 s (1.8x);
  per core, the plain matmuls run at the core's peak (~100 GFLOP/s), the weight gradients contracting the token
  axis of both operands at 50-87, 3x3 convolutions (Eigen) 530 ms at ~94; on two cores an estimated ~8% of the
  cores' time idles (XLA runs small ops, concatenations and many mid-size matmuls on one thread).
  The same VM the day before, with dense layers' weight gradients taken from the narrower operand transposed
  (layers.common.weight_gradient) and jax.nn.gelu: forward 0.539 / 0.746 (0.72x), train step 1.800 / 2.212 (0.81x)
  (other runs the same hour: 0.80x, 0.84x with the machine slower). The code before the weight-gradient change,
  the same day: forward 0.75-0.81x, train step 0.92-1.03x. Run to run, the ratio moves by a few hundredths here.
  2-vCPU Intel Xeon VM with AVX-512, the code before the weight-gradient change (magdiff with the one-matmul
  TemporalConv, the two-product GEGLU and auto's pair-blocked attention; the other allocators before all three):
  magdiff    forward 0.544 / 0.542 (1.00x), train step 2.113 / 1.752 (1.21x), JAX system time 0.05 s per step
  tcmalloc   forward 0.512 / 0.503 (1.02x), train step 2.135 / 1.532 (1.39x), 0.03 s
  hugepages  forward 0.575 / 0.525 (1.09x), train step 3.119 / 1.618 (1.93x), 1.73 s
  glibc      forward 0.634 / 0.545 (1.16x), train step 3.710 / 1.759 (2.11x), 2.76 s
  There the JAX step lost on matmuls: XLA's CPU kernels ran the U-Net's thin ones 2-5x slower than MKL (a
  (8192, 64)^T (8192, 64) weight gradient: 1.7-1.8 ms against 0.33 ms; (8192, 1024) x (1024, 256): 34-37 ms on
  one core against 14.5 ms), whichever library XLA hands them to, and ~345 ms a step on transposed copies, most of
  them the weight-gradient operands the change above no longer copies.
An earlier AMD EPYC figure (train step 0.78x with tcmalloc, forward 0.55x: JAX 1.553 s, 0.378 s) came from before
the workers were pinned. Its JAX forward ran at ~200 GFLOP/s, the matmul peak of two Zen 4 cores, and the same code
measured 0.99x / 1.08x on a 2-vCPU Zen 4 VM later: XLA most likely computed on more cores than PyTorch's two.

Writes benchmarks/results/<kind>_cpu.json (--malloc M: <kind>_cpu_malloc_<M>.json), with the CPU's model and vector
extensions: the ratio depends on them (above).
PERF.md targets: forward <= 1.0x, training step <= 0.8x.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from magdiff_jax.utils.allocator import HUGEPAGES, supported_tunables

WIDTHS = dict(block_out_channels=(64, 128, 192), layers_per_block=1, norm_num_groups=32, cross_attention_dim=256)
CONFIGS = {
    "unet2d": dict(WIDTHS, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   attention_head_dim=(2, 4, 6), use_linear_projection=True),
    "unet3d": dict(WIDTHS, down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                   up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
                   attention_head_dim=32),  # UNet3D: the head width
    "unet_motion": dict(WIDTHS, down_block_types=("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion",
                                                  "DownBlockMotion"),
                        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion"),
                        num_attention_heads=(2, 4, 6), motion_num_attention_heads=(2, 4, 6),
                        use_linear_projection=True, use_motion_mid_block=True),
}
TORCH_CLASSES = {"unet2d": "UNet2DConditionModel", "unet3d": "UNet3DConditionModel", "unet_motion": "UNetMotionModel"}
FRAMES, TOKENS, SIZE = 8, 77, 32
# --malloc choices that set GLIBC_TUNABLES (module docstring)
GLIBC_TUNABLES = {"magdiff": ":".join(supported_tunables()), "hugepages": HUGEPAGES}
MALLOC_CHOICES = ("magdiff", "glibc", "hugepages", "tcmalloc")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="unet3d", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions of each measurement")
    ap.add_argument("--threads", type=int, default=2,
                    help="CPU threads for both frameworks; both workers are pinned to that many cores")
    ap.add_argument("--malloc", default="magdiff", choices=MALLOC_CHOICES,
                    help="the memory allocator of both workers, and with it JAX's dispatch (module docstring)")
    ap.add_argument("--donate", action="store_true",
                    help="the JAX step donates its parameters and optimizer state (module docstring)")
    ap.add_argument("--settle", action=argparse.BooleanOptionalAction, default=True,
                    help="before each timed call, an untimed call of the same function in the same worker "
                         "(module docstring)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/<kind>_cpu[_malloc_<malloc>].json)")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return (torch_worker if args.worker == "torch" else jax_worker)(args)

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
        env["JAX_PLATFORMS"] = "cpu"
        if args.malloc in GLIBC_TUNABLES:
            env["GLIBC_TUNABLES"] = GLIBC_TUNABLES[args.malloc]
        elif args.malloc == "tcmalloc":
            env["LD_PRELOAD"] = find_tcmalloc()
        common = ["--kind", args.kind, "--threads", str(args.threads), "--dir", tmp, *(["--donate"] * args.donate),
                  "--malloc", args.malloc, "--settle" if args.settle else "--no-settle"]
        cpus = pinned_cpus(args.threads)
        # the PyTorch worker builds the reference model and writes it (and the inputs) before the JAX one reads them
        workers = {"torch": Worker("torch", common, env, cpus=cpus)}
        torch_info = workers["torch"].ready()
        workers["jax"] = Worker("jax", common, env, cpus=cpus)
        jax_info = workers["jax"].ready()
        calls = {f"{w}_{what}": [] for what in ("fwd", "train") for w in ("jax", "torch")}
        for _ in range(args.steps):  # alternate, so both see the same machine load
            for what in ("fwd", "train"):
                for w in ("jax", "torch"):
                    calls[f"{w}_{what}"].append(workers[w].call(what))
        for w in workers.values():
            w.close()

    med = {k: statistics.median(c["s"] for c in v) for k, v in calls.items()}
    flops = jax_info["flops_analytic"]
    xla_flops = jax_info["flops_xla"]
    result = {
        "command": "python " + " ".join(sys.argv),
        "kind": args.kind,
        "config": {**CONFIGS[args.kind], "sample_size": SIZE, "input_shape": jax_info["input_shape"],
                   "tokens": TOKENS, "params": torch_info["params"]},
        "threads": args.threads,
        "cpus": cpus,
        "processes": "one per framework, timed calls alternating",
        "settle": args.settle,
        "malloc": {"glibc": "glibc as it is", "tcmalloc": f"tcmalloc: LD_PRELOAD={env.get('LD_PRELOAD')}",
                   **{k: f"{k}: GLIBC_TUNABLES={v}" for k, v in GLIBC_TUNABLES.items()}}[args.malloc],
        "jax_donates": args.donate,
        "jax_async_dispatch": jax_info["async_dispatch"],
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_description(),
        "jax_compile_s": jax_info["compile_s"],
        "jax_compiler_options": jax_info["compiler_options"],
        "median_s": med,
        "ratio_jax_over_torch": {"forward": med["jax_fwd"] / med["torch_fwd"],
                                 "train_step": med["jax_train"] / med["torch_train"]},
        "median_sys_s": {k: statistics.median(c["sys_s"] for c in v) for k, v in calls.items()},
        **({"median_settle_s": {k: statistics.median(c["settle_s"] for c in v) for k, v in calls.items()}}
           if args.settle else {}),
        "median_page_faults": {k: statistics.median(c["faults"] for c in v) for k, v in calls.items()},
        "flops": {"forward_analytic": flops, "forward_xla_cost_analysis": xla_flops,
                  "analytic_over_xla": flops / xla_flops, "forward_in_bounds": jax_info["flops_in_bounds"],
                  "in_bounds_over_xla": jax_info["flops_in_bounds"] / xla_flops, "train_step_analytic": 3 * flops},
        "gflops_per_s": {"jax_forward": flops / med["jax_fwd"] / 1e9, "jax_train": 3 * flops / med["jax_train"] / 1e9,
                         "torch_forward": flops / med["torch_fwd"] / 1e9,
                         "torch_train": 3 * flops / med["torch_train"] / 1e9},
        "calls": calls,
        "versions": {**jax_info["versions"], **torch_info["versions"]},
    }
    print(f"{args.kind} CPU, {torch_info['params'] / 1e6:.1f}M params, input {tuple(jax_info['input_shape'])}, "
          f"{args.threads} threads, malloc {args.malloc}, one process per framework")
    print(f"{'':12s}{'JAX (s)':>10s}{'PyTorch (s)':>13s}{'JAX/PT':>9s}{'JAX sys (s)':>13s}{'PT sys (s)':>12s}")
    for name, what in (("forward", "fwd"), ("train step", "train")):
        j, p = med[f"jax_{what}"], med[f"torch_{what}"]
        print(f"{name:12s}{j:10.3f}{p:13.3f}{j / p:9.2f}{result['median_sys_s'][f'jax_{what}']:13.2f}"
              f"{result['median_sys_s'][f'torch_{what}']:12.2f}")
    print(f"JAX compile: forward {jax_info['compile_s']['forward']:.1f} s, "
          f"train step {jax_info['compile_s']['train_step']:.1f} s")
    print(f"forward FLOPs: analytic {flops / 1e9:.2f} G, XLA {xla_flops / 1e9:.2f} G (ratio {flops / xla_flops:.3f}); "
          f"convolutions by in-bounds taps as XLA counts them {jax_info['flops_in_bounds'] / 1e9:.2f} G "
          f"(ratio {jax_info['flops_in_bounds'] / xla_flops:.3f})")
    suffix = "" if args.malloc == "magdiff" else f"_malloc_{args.malloc}"
    out = Path(args.out or Path(__file__).parent / "results" / f"{args.kind}_cpu{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def pinned_cpus(threads: int) -> list[int]:
    """The first `threads` CPUs this process may run on: both workers are pinned to them, so each framework computes
    on the same cores however many threads it starts (XLA's CPU thread pool takes every core the process may use;
    PyTorch takes `--threads`)."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(allowed):
        raise SystemExit(f"--threads {threads}: this process may run on {len(allowed)} CPUs ({allowed})")
    return allowed[:threads]


def cpu_description() -> dict:
    """The CPU's model name, vendor and the vector ISA extensions that decide which kernels the libraries pick
    (from /proc/cpuinfo; empty where there is none): the JAX/PyTorch ratio depends on them (module docstring)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last CPU's lines
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    return {"model_name": info.get("model name"), "vendor": info.get("vendor_id"), "cpus": os.cpu_count(),
            "isa": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"))}


def find_tcmalloc() -> str:
    from magdiff_jax.utils.allocator import find_tcmalloc as find

    lib = find()
    if lib is None:
        raise SystemExit("--malloc tcmalloc: no libtcmalloc found "
                         "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
    return lib


class Worker:
    """A framework's worker process: one JSON line per reply on its stdout, one command per line on its stdin."""

    def __init__(self, name: str, common: list[str], env: dict, script: str = __file__, cpus: list[int] | None = None):
        """`cpus`: the CPUs the worker (and every thread it starts) may run on; all the caller's when None."""
        self.name = name
        pin = None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus)
        self.proc = subprocess.Popen([sys.executable, script, "--worker", name, *common], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, preexec_fn=pin)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.wait()}) without replying")
        return json.loads(line)

    def ready(self) -> dict:
        return self._reply()

    def call(self, what: str) -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self, timeout: float = 60) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)


def serve(info: dict, fns: dict, settle: bool = False) -> None:
    """Reply `info`, then time one call of fns[command] per command line until stdin closes. With `settle`, an
    untimed call of the same function runs first (its time is reported as settle_s): the timed call then follows
    a call of its own process, as in a training or sampling loop, rather than the other framework's run."""
    import resource

    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        fn = fns[line.strip()]
        if settle:
            t0 = time.perf_counter()
            fn()
            settle_s = time.perf_counter() - t0
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"s": dt, "sys_s": r1.ru_stime - r0.ru_stime, "faults": r1.ru_minflt - r0.ru_minflt,
                          **({"settle_s": settle_s} if settle else {})}), flush=True)


def inputs(kind: str):
    import numpy as np

    rng = np.random.RandomState(0)
    shape = (1, FRAMES, SIZE, SIZE, 4) if kind != "unet2d" else (2, SIZE, SIZE, 4)
    x = rng.randn(*shape).astype(np.float32)
    b = shape[0]
    ctx = rng.randn(b, TOKENS, 256).astype(np.float32)
    t = np.arange(b) * 500 + 10
    target = rng.randn(*shape).astype(np.float32)
    return x, t, ctx, target


def reference_model(kind: str):
    """The diffusers model of `kind` at the benchmark's config, its weights drawn from torch's seed 0."""
    import diffusers
    import torch

    torch.manual_seed(0)
    return getattr(diffusers, TORCH_CLASSES[kind])(sample_size=SIZE, **CONFIGS[kind])


def jax_train_step(module, opt):
    """The JAX training step both scripts time: mean squared error of the prediction, its gradient, `opt`'s update.
    (params, opt_state, x, t, context, target) -> (params, opt_state, loss)."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(p, x, t, c, y):
        return jnp.mean((module.apply({"params": p}, x, t, c) - y) ** 2)

    def train_step(p, s, x, t, c, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, t, c, y)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    return train_step


def torch_worker(args) -> None:
    import diffusers
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    ref = reference_model(args.kind)
    ref.save_pretrained(args.dir)
    x, t, ctx, target = inputs(args.kind)

    def to_torch(a):  # channels-last -> channels-first (B, C, [F,] H, W)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))

    tx, ttarget, tt = to_torch(x), to_torch(target), torch.from_numpy(t)
    tctx = torch.from_numpy(np.repeat(ctx, FRAMES, axis=0) if args.kind == "unet_motion" else ctx)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    ref.eval()

    def fwd():
        with torch.no_grad():
            return ref(tx, tt, tctx).sample

    def train():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((ref(tx, tt, tctx).sample - ttarget) ** 2)
        loss.backward()
        opt.step()
        return loss

    fwd(), train()  # warm-up
    serve({"params": sum(p.numel() for p in ref.parameters()),
           "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}},
          {"fwd": fwd, "train": train}, settle=args.settle)


def jax_worker(args) -> None:
    import dataclasses

    import jax
    import optax

    from magdiff_jax.convert import load_torch
    from magdiff_jax.utils import xla_cpu
    from magdiff_jax.utils.allocator import run_cpu_programs_on_calling_thread
    from magdiff_jax.utils.flops import count_flops, count_in_bounds_flops

    if args.malloc != "glibc":  # as `magdiff-jax` runs (module docstring)
        run_cpu_programs_on_calling_thread()
    module, params = load_torch(args.kind, args.dir)
    x, t, ctx, target = inputs(args.kind)
    fwd_fn = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    opt = optax.adamw(1e-4)
    train_jit = jax.jit(jax_train_step(module, opt), donate_argnums=(0, 1) if args.donate else ())
    opt_state = opt.init(params)
    t0 = time.perf_counter()
    options = xla_cpu.merged(None)  # the library's XLA CPU setting, as the trainer compiles its step
    fwd_c = fwd_fn.lower(params, x, t, ctx).compile(options)
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_c = train_jit.lower(params, opt_state, x, t, ctx, target).compile(options)
    compile_train = time.perf_counter() - t0
    # XLA counts a loop body once, so its count is taken on the same model with loop-free (xla) attention
    plain = module.clone(config=dataclasses.replace(module.config, attention_impl="xla"))
    cost = jax.jit(lambda p, x, t, c: plain.apply({"params": p}, x, t, c)).lower(params, x, t, ctx).compile(
    ).cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    flops = count_flops(lambda p, x, t, c: module.apply({"params": p}, x, t, c), params, x, t, ctx)
    in_bounds = count_in_bounds_flops(lambda p, x, t, c: module.apply({"params": p}, x, t, c), params, x, t, ctx)
    state = {"p": params, "s": opt_state}

    def fwd():
        return fwd_c(state["p"], x, t, ctx).block_until_ready()

    def train():
        state["p"], state["s"], loss = train_c(state["p"], state["s"], x, t, ctx, target)
        return jax.block_until_ready(loss)

    fwd(), train()  # warm-up
    serve({"compile_s": {"forward": compile_fwd, "train_step": compile_train}, "flops_analytic": flops,
           "flops_in_bounds": in_bounds, "flops_xla": xla_flops, "input_shape": list(x.shape),
           "versions": {"jax": jax.__version__},
           "async_dispatch": jax.config.values["jax_cpu_enable_async_dispatch"],
           "compiler_options": options or {}},
          {"fwd": fwd, "train": train}, settle=args.settle)


if __name__ == "__main__":
    main()
