"""Compile time of parameter initialisation: JAX's threefry against the init generator (magdiff_jax/utils/prng.py),
per model of a training config, in one run, as a ratio.

    python benchmarks/init_compile.py                    # configs/magdiff.py:tiny (MagDiff U-Net, VAE, CLIP towers)
    python benchmarks/init_compile.py --config t2i:tiny  # configs/<name>.py:<variant>

Each model's init program (`module.init` under jit, parameters only: XLA drops the forward pass) is lowered and
compiled afresh for each generator, alternating, `--repeats` times (the persistent compilation cache off); the table
gives medians. XLA's optimisation level is that of the environment (`XLA_FLAGS`); the test suite compiles at 0.
Writes benchmarks/results/init_compile_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def init_params(module, inputs, kwargs, wrap):
    """The init program of `module`, its key passed through `wrap` (the generator under test)."""
    import flax.linen as nn

    return lambda k: nn.meta.unbox(module.init(wrap(k), *inputs, **kwargs)["params"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="magdiff:tiny", help="configs/<name>.py:<variant>")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from magdiff_jax.demo import load_config
    from magdiff_jax.models.registry import get_model
    from magdiff_jax.train.tasks import get_task
    from magdiff_jax.utils.prng import init_key

    name, _, variant = args.config.partition(":")
    config = load_config(name, variant or "tiny")
    generators = {"threefry": lambda k: k, "init_key": init_key}
    rows = {}
    for model, (kind, model_cfg) in sorted(get_task(config.task).models(config).items()):
        spec = get_model(kind)
        module = spec.build(model_cfg)
        inputs, kwargs = spec.example_inputs(model_cfg), spec.example_kwargs(model_cfg)
        times = {gen: [] for gen in generators}
        for _ in range(args.repeats):
            for gen, wrap in generators.items():
                jax.clear_caches()  # JAX keeps compiled programs in memory: each compile here starts afresh
                lowered = jax.jit(init_params(module, inputs, kwargs, wrap)).lower(jax.random.key(0))
                start = time.perf_counter()
                lowered.compile()
                times[gen].append(time.perf_counter() - start)
        shapes = jax.eval_shape(init_params(module, inputs, kwargs, generators["threefry"]), jax.random.key(0))
        med = {gen: statistics.median(t) for gen, t in times.items()}
        rows[model] = {"kind": kind, "leaves": len(jax.tree.leaves(shapes)),
                       "params": sum(x.size for x in jax.tree.leaves(shapes)),
                       "compile_s": med, "ratio_init_key_over_threefry": med["init_key"] / med["threefry"]}
        print(f"{model:14s} {kind:12s} {rows[model]['leaves']:4d} leaves  threefry {med['threefry']:6.2f} s  "
              f"init_key {med['init_key']:6.2f} s  ratio {rows[model]['ratio_init_key_over_threefry']:.2f}",
              flush=True)
    total = {gen: sum(r["compile_s"][gen] for r in rows.values()) for gen in generators}
    print(f"{'total':27s}        threefry {total['threefry']:6.2f} s  init_key {total['init_key']:6.2f} s  "
          f"ratio {total['init_key'] / total['threefry']:.2f}")
    result = {"command": "python benchmarks/init_compile.py " + " ".join(sys.argv[1:]), "config": args.config,
              "platform": jax.devices()[0].platform, "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "repeats": args.repeats, "models": rows,
              "total_compile_s": total, "ratio_init_key_over_threefry": total["init_key"] / total["threefry"]}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"init_compile_{result['platform']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
