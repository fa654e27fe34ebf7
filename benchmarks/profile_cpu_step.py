"""Where a U-Net training step's time goes on CPU: the step of `unet_cpu.py` (same config, weights, inputs and
compile options) under `jax.profiler`, its thunks grouped by what XLA's optimised HLO says they compute.

    python benchmarks/profile_cpu_step.py                  # unet3d on 2 cores
    python benchmarks/profile_cpu_step.py --cores 1        # one core: no two ops overlap, times add up
    python benchmarks/profile_cpu_step.py --kind unet_motion --top 30

Prints, per step: wall time; time by op class (dot, convolution, elementwise, reduce, copy/transpose,
concatenate, while = the blockwise-attention loops: on one core the loops' whole time, their bodies' ops counted
again by class; on two only their launch); the top matmul shapes with their GFLOP/s; the top module paths
(forward / backward). Writes results/<kind>_cpu_profile_<cores>core.json.

The step runs with the CPU tuning on (`magdiff_jax.cpu.enable()`), as `unet_cpu.py` times it. The figures of
results/unet3d_cpu_profile_{1,2}core.json are in benchmarks/README.md.

Profiled steps: the first traced step only settles (starting the trace leaves the process idle for seconds, and on
a VM whose kernel takes back idle memory the next step refaults it: see unet_cpu.py), and a step slower than 1.15x
the fastest (such a refault inside it) is left out; `profiled_steps_s` lists the steps counted.

Reading it: on one core the classes add up to the step and a matmul's GFLOP/s is the core's rate (a 2-vCPU Zen 4
peaks near 100). On two, XLA runs independent ops at the same time, so class times are thread time and may add
to more than the step; Eigen convolutions run outside the traced thunks (their launch is all that shows) and so do
a parallel matmul's helper tasks. Comparing the two runs op by op shows which ops use the second core.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

OP = re.compile(r"(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")


def parse_hlo(text: str):
    """{computation: [instruction lines]} and {instruction: (line, shape, opcode)} of an HLO module's text."""
    comps, inst, cur = {}, {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            cur = head.group(1)
            comps[cur] = []
        elif cur and line.startswith("  "):
            comps[cur].append(line.strip())
            m = OP.match(line.strip())
            if m:
                inst[m.group(1)] = (line.strip(), m.group(2), m.group(3))
    return comps, inst


def op_class(name: str, comps, inst) -> str:
    if name.startswith("while"):
        return "while"
    if name not in inst:
        return "other"
    line, _, opcode = inst[name]
    if opcode != "fusion":
        return {"dot": "dot", "convolution": "convolution", "concatenate": "concatenate",
                "copy": "copy/transpose", "transpose": "copy/transpose"}.get(opcode, opcode)
    called = re.findall(r"calls=%?([\w.\-]+)", line)
    ops = collections.Counter()
    todo = list(called)
    while todo:
        for body_line in comps.get(todo.pop(), []):
            m = OP.match(body_line)
            if m:
                ops[m.group(3)] += 1
            todo += re.findall(r"calls=%?([\w.\-]+)", body_line)
    for opcode in ("dot", "convolution", "reduce"):
        if opcode in ops:
            return opcode
    if set(ops) <= {"parameter", "copy", "transpose", "bitcast", "reshape"}:
        return "copy/transpose"
    return "elementwise"


def dots_of(name: str, comps, inst):
    """(lhs shape, rhs shape, dimension numbers, flops) of each dot computed by instruction `name`."""
    line = inst[name][0]
    called = re.findall(r"calls=%?([\w.\-]+)", line)
    body = comps[called[0]] if called else [line]
    shapes = {}
    for body_line in body:
        m = OP.match(body_line)
        if m:
            shapes[m.group(1)] = m.group(2)
    dims = lambda s: [int(v) for v in re.match(r"\w+\[([\d,]*)\]", s).group(1).split(",") if v]
    for body_line in body:
        m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (\S+) dot\(%?([\w.\-]+), %?([\w.\-]+)\)", body_line)
        if not m:
            continue
        lhs = shapes.get(m.group(2)) or inst.get(m.group(2), (None, None))[1]
        rhs = shapes.get(m.group(3)) or inst.get(m.group(3), (None, None))[1]
        if lhs is None or rhs is None:
            continue
        contracting = [int(v) for v in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", body_line).group(1).split(",")
                       if v]
        numbers = re.search(r"lhs_batch_dims.*?rhs_contracting_dims=\{[\d,]*\}|lhs_contracting_dims=\{[\d,]*\}, "
                            r"rhs_contracting_dims=\{[\d,]*\}", body_line)
        k = 1
        for d in contracting:
            k *= dims(lhs)[d]
        out = 1
        for d in dims(m.group(1)):
            out *= d
        yield dims(lhs), dims(rhs), numbers.group(0) if numbers else "", 2 * k * out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="unet3d", choices=("unet3d", "unet2d", "unet_motion"))
    parser.add_argument("--cores", type=int, default=2, help="pin the process to this many cores before JAX starts")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 5 timed ones and one settling)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import unet_cpu

    cpus = unet_cpu.pinned_cpus(args.cores)
    os.sched_setaffinity(0, cpus)  # XLA sizes its thread pool from the CPUs the process may use
    tunables = unet_cpu.GLIBC_TUNABLES["magdiff"]  # the allocator set-up `magdiff-jax` and unet_cpu.py run with
    if os.environ.get("GLIBC_TUNABLES") != tunables:  # glibc reads it at start: run again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": tunables})
    work = Path(tempfile.mkdtemp(prefix="profile_cpu_step_"))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={work / 'hlo'}".strip()

    import jax
    import optax

    from magdiff_jax import cpu
    from magdiff_jax.convert import load_torch
    from magdiff_jax.cpu.allocator import run_cpu_programs_on_calling_thread

    run_cpu_programs_on_calling_thread()
    cpu.enable()
    unet_cpu.reference_model(args.kind).save_pretrained(work / "m")
    module, params = load_torch(args.kind, work / "m")
    x, t, ctx, target = unet_cpu.inputs(args.kind)
    opt = optax.adamw(1e-4)
    state = [params, opt.init(params)]
    step = jax.jit(unet_cpu.jax_train_step(module, opt), donate_argnums=(0, 1)).lower(
        *state, x, t, ctx, target).compile(cpu.compiler_options())

    def run():
        state[0], state[1], loss = step(*state, x, t, ctx, target)
        jax.block_until_ready(loss)

    run(), run()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    jax.profiler.start_trace(str(work / "trace"))
    for i in range(args.steps + 1):  # the first traced step only settles: starting the trace idles the process for
        with jax.profiler.TraceAnnotation(f"profiled_step_{i}"):  # seconds, and on some VMs the kernel takes back
            run()                                                   # memory left idle that long (unet_cpu.py)
    jax.profiler.stop_trace()

    hlo = [f for f in glob.glob(str(work / "hlo" / "*.cpu_after_optimizations.txt")) if "train_step" in f]
    comps, inst = parse_hlo(Path(max(hlo, key=os.path.getsize)).read_text())
    with gzip.open(glob.glob(str(work / "trace" / "plugins" / "profile" / "*" / "*.trace.json.gz"))[0]) as f:
        trace = json.load(f)
    shutil.rmtree(work)  # the converted model, the HLO dumps and the trace
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
             if e.get("ph") == "X" and e["name"].startswith("profiled_step_") and e["name"] != "profiled_step_0"]
    if len(steps) != args.steps:
        raise RuntimeError(f"found {len(steps)} of the {args.steps} profiled steps' annotations in the trace")
    # a step that refaulted its memory (seconds of system time inside its first-touching ops) is not counted
    fastest = min(end - start for start, end in steps)
    steps = [(start, end) for start, end in steps if end - start <= 1.15 * fastest]
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and (e["name"] in inst or
                                                                          e["name"].startswith("while"))
              and any(start <= e["ts"] <= end for start, end in steps)]
    per_step = lambda us: us / 1e3 / len(steps)
    by_class, by_dot, by_path, dot_flops, count = (collections.Counter() for _ in range(5))
    for e in events:
        name = e["name"]
        cls = op_class(name, comps, inst)
        by_class[cls] += e["dur"]
        if name not in inst:
            continue
        meta = re.search(r'op_name="([^"]+)"', inst[name][0])
        path = meta.group(1) if meta else "?"
        direction = "bwd" if "transpose(" in path else "fwd"
        path = re.sub(r"jit\(\w+\)/|transpose\(|jvp\(|\)|checkpoint/|rematted_computation/", "", path)
        by_path[(direction, "/".join(path.split("/")[1:-1])[-70:], cls)] += e["dur"]
        if cls == "dot":
            for lhs, rhs, numbers, flops in dots_of(name, comps, inst):
                key = f"{lhs} x {rhs} {numbers}"
                by_dot[key] += e["dur"]
                dot_flops[key] += flops
                count[key] += 1

    result = {
        "command": "python " + " ".join(sys.argv), "kind": args.kind, "cores": len(cpus),
        "cpu": unet_cpu.cpu_description(), "step_s": {"median": statistics.median(times), "runs": times},
        "profiled_steps_s": [round((end - start) / 1e6, 3) for start, end in steps],
        "ms_per_step_by_class": {k: per_step(v) for k, v in by_class.most_common()},
        "top_dots": [{"dot": k, "ms_per_step": per_step(v), "count_per_step": count[k] / len(steps),
                      "gflop_per_s": dot_flops[k] / (v / 1e6) / 1e9} for k, v in by_dot.most_common(args.top)],
        "top_paths": [{"pass": d, "path": p, "class": c, "ms_per_step": per_step(v)}
                      for (d, p, c), v in by_path.most_common(args.top)],
    }
    print(f"{args.kind} train step on {len(cpus)} core(s): median {statistics.median(times):.3f} s; profiled steps "
          + " ".join(f"{t:.2f}" for t in result["profiled_steps_s"]) + " s")
    print("ms per step by class (thread time):")
    for k, v in result["ms_per_step_by_class"].items():
        print(f"  {v:8.1f}  {k}")
    print("top matmuls (a dot in a while loop's body counts once per execution):")
    for row in result["top_dots"]:
        print(f"  {row['ms_per_step']:8.1f} ms  x{row['count_per_step']:4.0f}  {row['gflop_per_s']:6.1f} GFLOP/s  "
              f"{row['dot']}")
    print("top module paths:")
    for row in result["top_paths"]:
        print(f"  {row['ms_per_step']:8.1f} ms  {row['pass']}  {row['class']:14s} {row['path']}")
    out = Path(args.out or Path(__file__).parent / "results" / f"{args.kind}_cpu_profile_{len(cpus)}core.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
