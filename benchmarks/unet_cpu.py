"""U-Nets on CPU: JAX vs diffusers PyTorch on the same converted weights and inputs, measured alternately.

    python benchmarks/unet_cpu.py                    # unet3d, the documented mid-size config below
    python benchmarks/unet_cpu.py --kind unet2d      # the same widths as an image U-Net (batch 2)
    python benchmarks/unet_cpu.py --kind unet_motion
    python benchmarks/unet_cpu.py --no-tuning        # JAX without the CPU tuning (magdiff_jax.cpu): plain model code
    python benchmarks/unet_cpu.py --malloc glibc     # both with glibc's malloc as it is, JAX dispatching async
    python benchmarks/unet_cpu.py --malloc hugepages # both with glibc's transparent huge pages only
    python benchmarks/unet_cpu.py --malloc tcmalloc  # both with tcmalloc preloaded

Config (all kinds): block widths 64/128/192, cross-attention in the first two blocks (heads of width 32),
1 resnet per block, 77 text tokens of width 256, 32x32x4 latents; video kinds take 1 video of 8 frames, unet2d a
batch of 2 images. unet3d: 15.5M parameters. Reports: JAX compile time; median forward and training-step
(forward + backward + AdamW) times for both frameworks after warm-up; the ratio JAX / PyTorch (below 1: JAX is
faster); the analytic FLOP count (magdiff_jax.utils.flops; also with convolutions counted by their in-bounds taps,
as XLA counts them) against XLA's cost_analysis (of the same model with `attention_impl="xla"`: XLA counts the
body of blockwise attention's loop once); achieved GFLOP/s; each step's system CPU time and page faults. The JAX
worker runs with the CPU tuning on (`magdiff_jax.cpu.enable()`, as `magdiff-jax` and the trainer run on CPU; off
with --no-tuning) and the models' default `attention_impl="auto"`. The JAX step returns new parameters and optimizer
state (PyTorch updates in place); with --donate it donates the old ones, as the trainer's step does.

One process per framework. Each worker builds or loads the model, compiles and warms up, then runs one timed call
whenever this script asks: JAX forward, PyTorch forward, JAX step, PyTorch step, repeated, so both see the same
machine load while only one of them runs at a time, and neither allocates from the other's heap. With --settle (the
default) each timed call follows an untimed call of the same function in the same worker (reported as settle_s), so
it runs as the steps of a training or sampling loop do, back to back, not after seconds of the other framework's
run: on a VM whose kernel takes back memory a process has left idle for ~2 s, the next call would fault it in again.

The allocator (--malloc, the same for both workers). XLA's CPU runtime allocates a step's intermediates afresh on
every call (one ~2 GB buffer per unet3d training step), which glibc's malloc as it is maps afresh each call.
  magdiff (default): what `magdiff-jax` runs with (magdiff_jax/cpu/allocator.py): GLIBC_TUNABLES
      glibc.malloc.hugetlb=1, mmap_max=0 and trim_threshold=64 GiB, and the JAX worker runs its programs on the
      calling thread (JAX's async CPU dispatch off), so freed buffers stay in the main heap and the next step reuses
      them.
  glibc: glibc's malloc as it is, JAX with async dispatch.
  hugepages: glibc.malloc.hugetlb=1 only: the buffers still come from fresh mmaps, 2 MiB pages at a time.
  tcmalloc: gperftools' tcmalloc (libtcmalloc_minimal.so.4; Debian: libtcmalloc-minimal4) preloaded into both; it
      keeps freed memory in its page heap.
In every choice but glibc the JAX worker runs its programs on the calling thread, as `magdiff-jax` does.
Both workers are pinned to the same `--threads` cores (os.sched_setaffinity): XLA's CPU thread pool takes every core
the process may use, PyTorch the threads it is told, so on a larger machine an unpinned JAX worker computes on more
cores than PyTorch does.

Writes benchmarks/results/<kind>_cpu.json (--malloc M: <kind>_cpu_malloc_<M>.json; --no-tuning: the name ends in
_untuned), with the CPU's model and vector extensions: the ratio depends on them. The figures, and the settings
measured and dropped, are in benchmarks/README.md. PERF.md targets: forward <= 1.0x, training step <= 0.8x.
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

from magdiff_jax.cpu.allocator import HUGEPAGES, supported_tunables

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
    ap.add_argument("--tuning", action=argparse.BooleanOptionalAction, default=True,
                    help="the JAX worker with the CPU tuning (magdiff_jax.cpu) on (module docstring)")
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
                  "--malloc", args.malloc, "--settle" if args.settle else "--no-settle",
                  "--tuning" if args.tuning else "--no-tuning"]
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
        "jax_cpu_tuning": jax_info["cpu_tuning"],
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
    suffix = ("" if args.malloc == "magdiff" else f"_malloc_{args.malloc}") + ("" if args.tuning else "_untuned")
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
    from magdiff_jax.cpu.allocator import find_tcmalloc as find

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

    from magdiff_jax import cpu
    from magdiff_jax.convert import load_torch
    from magdiff_jax.cpu.allocator import run_cpu_programs_on_calling_thread
    from magdiff_jax.utils.flops import count_flops, count_in_bounds_flops

    if args.malloc != "glibc":  # as `magdiff-jax` runs (module docstring)
        run_cpu_programs_on_calling_thread()
    if args.tuning:
        cpu.enable()
    module, params = load_torch(args.kind, args.dir)
    x, t, ctx, target = inputs(args.kind)
    fwd_fn = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    opt = optax.adamw(1e-4)
    train_jit = jax.jit(jax_train_step(module, opt), donate_argnums=(0, 1) if args.donate else ())
    opt_state = opt.init(params)
    t0 = time.perf_counter()
    options = cpu.compiler_options()  # the CPU tuning's XLA setting, as the trainer compiles its step
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
           "async_dispatch": jax.config.values["jax_cpu_enable_async_dispatch"], "cpu_tuning": cpu.enabled(),
           "compiler_options": options or {}},
          {"fwd": fwd, "train": train}, settle=args.settle)


if __name__ == "__main__":
    main()
