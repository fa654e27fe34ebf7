"""Training throughput of the real trainer (`magdiff_jax.train.trainer.train`): steps/s, examples/s, TFLOP/s per
device and, where the device's peak is known, MFU.

    python benchmarks/train_step.py                         # t2i tiny and mid on this machine's devices
    python benchmarks/train_step.py --sizes mid --compute-dtype bfloat16 --steps 60     # e.g. on a GPU

Each size runs the trainer for `--steps` steps in a temporary workdir (synthetic data, no checkpoints but the last)
and reads its metrics.jsonl: the first logged interval holds the warm-up and is dropped; the table gives the
median of the others. FLOPs are XLA's count of one device's compiled step (`cost_analysis()` of the per-device
program: forward, backward, optimizer, the frozen VAE and text encoder, and any work sharding repeats), so MFU here
counts every FLOP XLA executes, elementwise work included.

Sizes (configs/t2i.py:tiny models and data unless stated):
  tiny  configs/t2i.py:tiny as it is: 32x32 images, U-Net 32/64, batch 8.
  mid   a mid-size U-Net (128/256/256 channels, 2 layers per block, 4 heads, cross-attention 64) on
        64x64 images (32x32 latents through the tiny VAE), batch 8: about 20M U-Net parameters.
Writes benchmarks/results/train_step_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

# dense bf16 peaks in TFLOP/s per device (PERF.md); fp32 runs are reported against the same figure
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "tpu v5p": 459.0, "tpu v5 lite": 197.0,
               "tpu v5e": 197.0, "tpu v6": 918.0}


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def size_config(size: str, steps: int, compute_dtype: str, batch: int | None):
    import t2i

    c = t2i.get_config("tiny")
    c.steps, c.log_every, c.ckpt_every = steps, max(steps // 6, 1), steps
    c.async_checkpoints, c.progress, c.compute_dtype = False, False, compute_dtype
    c.preview.every = 0
    c.data.synthetic.num = 64
    if size == "mid":
        c.data.resolution = (64, 64)
        c.data.synthetic.size = 64
        c.model.unet.update(sample_size=32, block_out_channels=(128, 256, 256), layers_per_block=2,
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                            attention_head_dim=4, cross_attention_dim=64, norm_num_groups=32)
        c.model.text_encoder.update(hidden_size=64, intermediate_size=128, projection_dim=64)
    elif size != "tiny":
        raise ValueError(f"--sizes: unknown size {size!r} (tiny, mid)")
    if batch:
        c.global_batch_size = batch
    return c


def run(size: str, steps: int, compute_dtype: str, batch: int | None) -> dict:
    import jax

    from magdiff_jax.train.trainer import train

    config = size_config(size, steps, compute_dtype, batch)
    with tempfile.TemporaryDirectory(prefix=f"train_step_{size}_") as workdir:
        t0 = time.perf_counter()
        train(config, workdir)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:] or lines
    med = lambda key: statistics.median(m[key] for m in steady if key in m) if key in steady[0] else None
    out = {"size": size, "compute_dtype": compute_dtype, "global_batch_size": config.global_batch_size,
           "devices": jax.device_count(), "steps": steps, "wall_s": wall,
           "steps_per_s": med("steps_per_s"), "examples_per_s": med("examples_per_s"),
           "tflops_per_device": med("tflops_per_device"), "final_loss": lines[-1]["loss"]}
    peak = peak_tflops(jax.devices()[0].device_kind)
    if peak and out["tflops_per_device"]:
        out["peak_tflops"], out["mfu"] = peak, out["tflops_per_device"] / peak
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compute-dtype", default="float32")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: the config's 8)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax

    rows = [run(s, args.steps, args.compute_dtype, args.batch) for s in args.sizes]
    dev = jax.devices()[0]
    print(f"{'size':6} {'dtype':9} {'batch':>5} {'steps/s':>8} {'ex/s':>8} {'TFLOP/s/dev':>11} {'MFU':>6}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['size']:6} {r['compute_dtype']:9} {r['global_batch_size']:5d} {r['steps_per_s']:8.2f} "
              f"{r['examples_per_s']:8.1f} {r['tflops_per_device'] or 0:11.4f} {mfu:>6}")
    result = {"command": "python benchmarks/train_step.py " + " ".join(argv or sys.argv[1:]),
              "device": f"{dev.platform} {dev.device_kind} x{jax.device_count()}", "host": platform.node(),
              "rows": rows}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"train_step_{dev.platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
