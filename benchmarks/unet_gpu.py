"""Video U-Nets on a CUDA GPU: JAX vs diffusers PyTorch on the same converted weights and inputs, bf16 mixed precision.

    python benchmarks/unet_gpu.py                      # unet3d at SD-1.5 widths, 16 frames of 32x32 latents (256 px)
    python benchmarks/unet_gpu.py --batch 2 --torch-compile   # also torch.compile'd PyTorch (minutes of compiling)
    python benchmarks/unet_gpu.py --size mid           # unet_cpu.py's mid-size config

Sizes (unet3d, 77 text tokens):
  sd   the ModelScope text-to-video U-Net (diffusers UNet3DConditionModel at SD-1.5 widths: blocks 320/640/1280/1280,
       2 resnets per block, heads of width 64, text width 1024; 1.4B parameters) on 16 frames of 32x32x4 latents:
       PERF.md's "16x256 video U-Net", whose GPU target is a training-step MFU of at least 40% and at least 1.2x
       faster than diffusers PyTorch with SDPA (1.0x against torch.compile).
  mid  unet_cpu.py's config (blocks 64/128/192, 15.5M parameters) on 8 frames.

First a correctness check in fp32 on unet_cpu.py's mid config with perturbed weights (`highest` matmul precision,
no TF32 in PyTorch): the JAX model on the GPU against the same JAX model on the CPU, and against diffusers on the
GPU; also the bf16 model's error against fp32. Then the speed figures: both frameworks keep fp32 parameters and
compute in bf16 (JAX: the model config's `dtype="bfloat16"`; PyTorch: `torch.autocast(bfloat16)`, as diffusers'
training scripts run), train with AdamW (PyTorch's fused CUDA AdamW) on a mean-squared error, and JAX donates
parameters and optimizer state as the trainer does. JAX's attention is the config default `auto` (cuDNN flash
attention for the spatial self-attention, XLA's for the short cross- and temporal attention); PyTorch's is
diffusers' default, SDPA. Each timed call runs `--reps` forwards or steps and synchronises; the table gives the
median over `--steps` calls per repetition. One process per framework, PyTorch's first (it writes the weights),
then JAX's, each alone on the GPU. MFU: the analytic FLOP count (magdiff_jax.utils.flops, a training step = 3x the
forward) over time, against the H200's 989 TFLOP/s dense bf16 datasheet peak and the ~790 TFLOP/s a large bf16
matmul measures on it (PERF.md).

Writes benchmarks/results/<kind>_<size>_gpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_cpu import CONFIGS, Worker, serve

SIZES = {
    "sd": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
               cross_attention_dim=1024, attention_head_dim=64,
               down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
               up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3),
    "mid": CONFIGS["unet3d"],
}
FRAMES = {"sd": 16, "mid": 8}
PARITY_FRAMES, LATENT, TOKENS = 4, 32, 77
PEAK_TFLOPS, MATMUL_TFLOPS = 989.0, 790.0  # H200 dense bf16: datasheet; measured large matmul (PERF.md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="sd", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed calls of each measurement")
    ap.add_argument("--reps", type=int, default=10, help="forwards or training steps per timed call")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd PyTorch")
    ap.add_argument("--skip-parity", action="store_true", help="skip the fp32 correctness check")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/unet3d_<size>_gpu.json)")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return (torch_worker if args.worker == "torch" else jax_worker)(args)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--size", args.size, "--batch", str(args.batch), "--reps", str(args.reps), "--dir", tmp,
                  *(["--torch-compile"] * args.torch_compile), *(["--skip-parity"] * args.skip_parity)]
        calls, info = {}, {}
        # PyTorch first (it writes the weights and the parity reference), then JAX, each alone on the GPU
        for name in ("torch", "jax"):
            worker = Worker(name, common, dict(os.environ), script=__file__)
            info[name] = worker.ready()
            log(t_start, f"{name} worker ready: {json.dumps(info[name].get('compile_s', {}))}")
            for what in info[name]["measures"]:
                calls[f"{name}_{what}"] = [worker.call(what)["s"] / args.reps for _ in range(args.steps)]
            worker.close(timeout=300)
            log(t_start, f"{name} worker done")

    med = {k: statistics.median(v) for k, v in calls.items()}
    flops = info["jax"]["flops_analytic"]
    result = {
        "command": "python " + " ".join(sys.argv),
        "kind": "unet3d", "size": args.size,
        "config": {**SIZES[args.size], "sample_size": LATENT, "input_shape": info["jax"]["input_shape"],
                   "tokens": TOKENS, "params": info["torch"]["params"]},
        "precision": "fp32 parameters, bf16 compute (JAX dtype=bfloat16; PyTorch autocast bfloat16)",
        "reps_per_call": args.reps, "calls": args.steps,
        "device": {"torch": info["torch"]["device"], "jax": info["jax"]["device"]},
        "parity_fp32": {**info["torch"].get("parity", {}), **info["jax"].get("parity", {})},
        "jax_compile_s": info["jax"]["compile_s"], "torch_compile_s": info["torch"].get("compile_s", {}),
        "median_s": med,
        "ratio_jax_over_torch": {what: med[f"jax_{what}"] / med[f"torch_{what}"] for what in ("fwd", "train")},
        "flops": {"forward_analytic": flops, "forward_xla_cost_analysis": info["jax"]["flops_xla"],
                  "analytic_over_xla": flops / info["jax"]["flops_xla"] if info["jax"]["flops_xla"] else None,
                  "train_step_analytic": 3 * flops},
        "tflops_per_s": {k: (3 if k.endswith("train") else 1) * flops / v / 1e12 for k, v in med.items()},
        "peak_memory_gb": {f"{w}_train": info[w]["train_memory_gb"] for w in ("jax", "torch")},
        "versions": {**info["jax"]["versions"], **info["torch"]["versions"]},
        "wall_s": time.perf_counter() - t_start,
    }
    if "torch_compiled_train" in med:
        result["ratio_jax_over_torch"].update(
            {f"{w}_vs_compiled": med[f"jax_{w}"] / med[f"torch_compiled_{w}"] for w in ("fwd", "train")})
    result["mfu"] = {k: v / PEAK_TFLOPS for k, v in result["tflops_per_s"].items()}
    result["mfu_of_measured_matmul"] = {k: v / MATMUL_TFLOPS for k, v in result["tflops_per_s"].items()}

    out = Path(args.out or Path(__file__).parent / "results" / f"unet3d_{args.size}_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nunet3d {args.size} on {info['jax']['device']}: {info['torch']['params'] / 1e6:.0f}M params, input "
          f"{tuple(info['jax']['input_shape'])}, bf16 compute; per forward / step, median of {args.steps} calls "
          f"of {args.reps}")
    if result["parity_fp32"]:
        print("fp32 parity (relative L2): " + ", ".join(f"{k} {v:.2e}" for k, v in result["parity_fp32"].items()))
    print(f"{'':22s}{'ms':>9s}{'TFLOP/s':>9s}{'MFU':>7s}{'JAX/this':>10s}")
    for k, v in med.items():
        what = "train" if k.endswith("train") else "fwd"
        print(f"{k:22s}{v * 1e3:9.2f}{result['tflops_per_s'][k]:9.1f}{result['mfu'][k]:7.1%}"
              f"{med[f'jax_{what}'] / v:10.2f}")
    xla = info["jax"]["flops_xla"]
    print(f"forward FLOPs: analytic {flops / 1e12:.3f} T, XLA {f'{xla / 1e12:.3f} T' if xla else 'n/a'}; "
          f"peak memory of a step (GB): {json.dumps(result['peak_memory_gb'])}; "
          f"JAX compile (s): {json.dumps(info['jax']['compile_s'])}")
    print(f"wrote {out}")


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def inputs(batch: int, frames: int, text_width: int, seed: int = 0):
    import numpy as np

    rng = np.random.RandomState(seed)
    x = rng.randn(batch, frames, LATENT, LATENT, 4).astype(np.float32)
    ctx = rng.randn(batch, TOKENS, text_width).astype(np.float32)
    t = (np.arange(batch) * 500 + 10) % 1000
    target = rng.randn(*x.shape).astype(np.float32)
    return x, t, ctx, target


def rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_worker(args) -> None:
    import diffusers
    import numpy as np
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = Path(args.dir)

    def to_torch(a):  # channels-last -> channels-first (B, C, F, H, W)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1))).to(dev)

    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    if not args.skip_parity:  # fp32 reference of the perturbed mid-size model, on the GPU and the CPU
        torch.manual_seed(0)
        small = diffusers.UNet3DConditionModel(sample_size=LATENT, **SIZES["mid"]).eval()
        with torch.no_grad():
            for p in small.parameters():
                p.add_(0.05 * torch.randn_like(p))
        small.save_pretrained(folder / "parity")
        x, t, ctx, _ = inputs(1, PARITY_FRAMES, SIZES["mid"]["cross_attention_dim"], seed=1)
        with torch.no_grad():
            cpu_out = small(to_torch(x).cpu(), torch.from_numpy(t), torch.from_numpy(ctx)).sample
            gpu_out = small.to(dev)(to_torch(x), torch.from_numpy(t).to(dev), torch.from_numpy(ctx).to(dev)).sample
        gpu_out = np.moveaxis(gpu_out.cpu().numpy(), 1, -1)
        np.save(folder / "parity_torch_gpu.npy", gpu_out)
        info["parity"] = {"torch_gpu_vs_torch_cpu": rel(gpu_out, np.moveaxis(cpu_out.numpy(), 1, -1))}
        del small
    torch.backends.cuda.matmul.allow_tf32 = True  # the speed runs compute in bf16 anyway
    torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    with torch.device(dev):
        ref = diffusers.UNet3DConditionModel(sample_size=LATENT, **SIZES[args.size])
    ref.save_pretrained(folder / "speed")
    cfg = SIZES[args.size]
    x, t, ctx, target = inputs(args.batch, FRAMES[args.size], cfg["cross_attention_dim"])
    tx, ttarget, tt, tctx = to_torch(x), to_torch(target), torch.from_numpy(t).to(dev), torch.from_numpy(ctx).to(dev)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=dev == "cuda")

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def make(model):
        def fwd():
            with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
                for _ in range(args.reps):
                    model(tx, tt, tctx)
            sync()

        def train():
            for _ in range(args.reps):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev, dtype=torch.bfloat16):
                    out = model(tx, tt, tctx).sample
                loss = torch.mean((out.float() - ttarget) ** 2)
                loss.backward()
                opt.step()
            sync()
        return fwd, train

    fns = dict(zip(("fwd", "train"), make(ref)))
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for fn in fns.values():  # warm-up
        fn()
    info["train_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None
    if args.torch_compile:
        compiled = torch.compile(ref)
        info["compile_s"] = {}
        for what, fn in zip(("compiled_fwd", "compiled_train"), make(compiled)):
            t0 = time.perf_counter()
            fn()  # the first call compiles
            info["compile_s"][what] = time.perf_counter() - t0
            fns[what] = fn
    serve({**info, "params": sum(p.numel() for p in ref.parameters()), "measures": list(fns)}, fns)


def jax_worker(args) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from magdiff_jax.convert import load_torch
    from magdiff_jax.utils.flops import count_flops

    folder = Path(args.dir)
    dev = jax.devices()[0]
    info = {"device": dev.device_kind, "versions": {"jax": jax.__version__}}
    if not args.skip_parity:
        module, params = load_torch("unet3d", folder / "parity")
        x, t, ctx, _ = inputs(1, PARITY_FRAMES, SIZES["mid"]["cross_attention_dim"], seed=1)
        apply = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
        cpu = jax.devices("cpu")[0]
        with jax.default_matmul_precision("highest"):
            on_gpu = np.asarray(apply(params, x, t, ctx))
            on_cpu = np.asarray(apply(*jax.device_put((params, x, t, ctx), cpu)))
        on_gpu_default = np.asarray(apply(params, x, t, ctx))  # XLA's default precision (TF32 on the GPU)
        bf16 = module.clone(config=dataclasses.replace(module.config, dtype="bfloat16"))
        on_gpu_bf16 = np.asarray(jax.jit(lambda p, x, t, c: bf16.apply({"params": p}, x, t, c))(params, x, t, ctx))
        torch_gpu = np.load(folder / "parity_torch_gpu.npy")
        info["parity"] = {"jax_gpu_vs_jax_cpu": rel(on_gpu, on_cpu), "jax_gpu_vs_torch_gpu": rel(on_gpu, torch_gpu),
                          "jax_gpu_default_precision_vs_torch_gpu": rel(on_gpu_default, torch_gpu),
                          "jax_gpu_bf16_vs_fp32": rel(on_gpu_bf16, on_gpu)}
        del params

    module, params = load_torch("unet3d", folder / "speed")
    module = module.clone(config=dataclasses.replace(module.config, dtype="bfloat16"))
    x, t, ctx, target = inputs(args.batch, FRAMES[args.size], SIZES[args.size]["cross_attention_dim"])
    x, t, ctx, target = jax.device_put((x, t, ctx, target))
    opt = optax.adamw(1e-4)

    def forward(p, x, t, c):
        return module.apply({"params": p}, x, t, c)

    def loss_fn(p, x, t, c, y):
        return jnp.mean((forward(p, x, t, c).astype(jnp.float32) - y) ** 2)

    def train_step(p, s, x, t, c, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, t, c, y)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    opt_state = opt.init(params)
    t0 = time.perf_counter()
    fwd_c = jax.jit(forward).lower(params, x, t, ctx).compile()
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_c = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, x, t, ctx, target).compile()
    compile_train = time.perf_counter() - t0
    mem = train_c.memory_analysis()
    train_gb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes) / 1e9 if mem is not None else None
    # XLA's count, of the same model with XLA attention (cuDNN's custom call carries no FLOP count); not compiled
    plain = module.clone(config=dataclasses.replace(module.config, attention_impl="xla"))
    cost = jax.jit(lambda p, x, t, c: plain.apply({"params": p}, x, t, c)).lower(params, x, t, ctx).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost["flops"]) if cost else None  # XLA's GPU backend gives no count before compiling
    flops = count_flops(forward, params, x, t, ctx)
    state = {"p": params, "s": opt_state}

    def fwd():
        for _ in range(args.reps):
            out = fwd_c(state["p"], x, t, ctx)
        out.block_until_ready()

    def train():
        for _ in range(args.reps):
            state["p"], state["s"], loss = train_c(state["p"], state["s"], x, t, ctx, target)
        jax.block_until_ready(loss)

    fwd(), train()  # warm-up
    serve({**info, "compile_s": {"forward": compile_fwd, "train_step": compile_train}, "flops_analytic": flops,
           "flops_xla": xla_flops, "input_shape": list(x.shape), "train_memory_gb": train_gb,
           "measures": ["fwd", "train"]}, {"fwd": fwd, "train": train})


if __name__ == "__main__":
    main()
