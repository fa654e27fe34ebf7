"""U-Nets on CPU: JAX vs diffusers PyTorch on the same converted weights and inputs, measured alternately.

    python benchmarks/unet_cpu.py                    # unet3d, the documented mid-size config below
    python benchmarks/unet_cpu.py --kind unet2d      # the same widths as an image U-Net (batch 2)
    python benchmarks/unet_cpu.py --kind unet_motion

Config (all kinds): block widths 64/128/192, cross-attention in the first two blocks (heads of width 32),
1 resnet per block, 77 text tokens of width 256, 32x32x4 latents; video kinds take 1 video of 8 frames, unet2d a
batch of 2 images. unet3d: 15.5M parameters. Reports: JAX compile time; median forward and training-step
(forward + backward + AdamW) times for both frameworks after warm-up, run alternately; the ratio JAX / PyTorch
(below 1: JAX is faster); the analytic FLOP count (magdiff_jax.utils.flops) against XLA's cost_analysis (of the
same model with `attention_impl="xla"`: XLA counts the body of blockwise attention's loop once); achieved GFLOP/s.
The models run with their configs' default `attention_impl="auto"` (blockwise attention on CPU for long sequences).
Writes benchmarks/results/<kind>_cpu.json. PERF.md targets: forward <= 1.0x, training step <= 0.8x.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="unet3d", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions of each measurement")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<kind>_cpu.json)")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch

    from magdiff_jax.convert import load_torch
    from magdiff_jax.utils.flops import count_flops

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    video = args.kind != "unet2d"
    ref = getattr(diffusers, TORCH_CLASSES[args.kind])(sample_size=SIZE, **CONFIGS[args.kind])
    n_params = sum(p.numel() for p in ref.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        module, params = load_torch(args.kind, tmp)

    rng = np.random.RandomState(0)
    shape = (1, FRAMES, SIZE, SIZE, 4) if video else (2, SIZE, SIZE, 4)
    x = rng.randn(*shape).astype(np.float32)
    b = shape[0]
    ctx = rng.randn(b, TOKENS, 256).astype(np.float32)
    t = np.arange(b) * 500 + 10
    target = rng.randn(*shape).astype(np.float32)

    def to_torch(a):  # channels-last -> channels-first (B, C, [F,] H, W)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))

    tx, ttarget, tt = to_torch(x), to_torch(target), torch.from_numpy(t)
    tctx = torch.from_numpy(np.repeat(ctx, FRAMES, axis=0) if args.kind == "unet_motion" else ctx)

    fwd = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    opt = optax.adamw(1e-4)

    def loss_fn(p, x, t, c, y):
        return jnp.mean((module.apply({"params": p}, x, t, c) - y) ** 2)

    @jax.jit
    def train_step(p, s, x, t, c, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, t, c, y)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    opt_state = opt.init(params)
    t0 = time.perf_counter()
    fwd.lower(params, x, t, ctx).compile()
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_step.lower(params, opt_state, x, t, ctx, target).compile()
    compile_train = time.perf_counter() - t0
    # XLA counts a loop body once, so its count is taken on the same model with loop-free (xla) attention
    plain = module.clone(config=dataclasses.replace(module.config, attention_impl="xla"))
    cost = jax.jit(lambda p, x, t, c: plain.apply({"params": p}, x, t, c)).lower(params, x, t, ctx).compile(
    ).cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    flops = count_flops(lambda p, x, t, c: module.apply({"params": p}, x, t, c), params, x, t, ctx)

    topt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    ref.eval()

    def torch_fwd():
        with torch.no_grad():
            return ref(tx, tt, tctx).sample

    def torch_train():
        topt.zero_grad(set_to_none=True)
        loss = torch.mean((ref(tx, tt, tctx).sample - ttarget) ** 2)
        loss.backward()
        topt.step()
        return loss

    state = {"p": params, "s": opt_state}

    def jax_fwd():
        return fwd(state["p"], x, t, ctx).block_until_ready()

    def jax_train():
        state["p"], state["s"], loss = train_step(state["p"], state["s"], x, t, ctx, target)
        return jax.block_until_ready(loss)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for fn in (jax_fwd, torch_fwd, jax_train, torch_train):  # warm-up
        fn()
    times = {k: [] for k in ("jax_fwd", "torch_fwd", "jax_train", "torch_train")}
    for _ in range(args.steps):  # alternate, so both see the same machine load
        times["jax_fwd"].append(timed(jax_fwd))
        times["torch_fwd"].append(timed(torch_fwd))
        times["jax_train"].append(timed(jax_train))
        times["torch_train"].append(timed(torch_train))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "kind": args.kind,
        "config": {**CONFIGS[args.kind], "sample_size": SIZE, "input_shape": list(shape), "tokens": TOKENS,
                   "params": n_params},
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "jax_compile_s": {"forward": compile_fwd, "train_step": compile_train},
        "median_s": med,
        "ratio_jax_over_torch": {"forward": med["jax_fwd"] / med["torch_fwd"],
                                 "train_step": med["jax_train"] / med["torch_train"]},
        "flops": {"forward_analytic": flops, "forward_xla_cost_analysis": xla_flops,
                  "analytic_over_xla": flops / xla_flops, "train_step_analytic": 3 * flops},
        "gflops_per_s": {"jax_forward": flops / med["jax_fwd"] / 1e9, "jax_train": 3 * flops / med["jax_train"] / 1e9,
                         "torch_forward": flops / med["torch_fwd"] / 1e9,
                         "torch_train": 3 * flops / med["torch_train"] / 1e9},
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    print(f"{args.kind} CPU, {n_params / 1e6:.1f}M params, input {shape}, {args.threads} threads")
    print(f"{'':12s}{'JAX (s)':>10s}{'PyTorch (s)':>13s}{'JAX/PT':>9s}")
    for name, j, p in (("forward", "jax_fwd", "torch_fwd"), ("train step", "jax_train", "torch_train")):
        print(f"{name:12s}{med[j]:10.3f}{med[p]:13.3f}{med[j] / med[p]:9.2f}")
    print(f"JAX compile: forward {compile_fwd:.1f} s, train step {compile_train:.1f} s")
    print(f"forward FLOPs: analytic {flops / 1e9:.2f} G, XLA {xla_flops / 1e9:.2f} G (ratio {flops / xla_flops:.3f})")
    out = Path(args.out or Path(__file__).parent / "results" / f"{args.kind}_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
