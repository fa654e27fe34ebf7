"""unet2d on CPU: JAX vs diffusers PyTorch on the same converted weights and inputs, measured alternately.

    python benchmarks/unet2d_cpu.py [--steps 5] [--threads 2]

Config: a mid-size SD-layout U-Net (block widths 64/128/256, 2 resnets per block, cross-attention 256 wide over
77 tokens, 32x32x4 latents, batch 2): 18.2M parameters. Reports compile time, median forward time and
median training-step time (forward + backward + AdamW update) for both, and the ratio JAX / PyTorch (below 1 means
JAX is faster). Writes benchmarks/results/unet2d_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=256,
    attention_head_dim=(2, 4, 8), use_linear_projection=True, norm_num_groups=32,
)
BATCH, TOKENS = 2, 77


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions of each measurement")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "unet2d_cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from magdiff_jax.convert import load_torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = TorchUNet(**CONFIG)
    n_params = sum(p.numel() for p in ref.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        module, params = load_torch("unet2d", tmp)

    rng = np.random.RandomState(0)
    x = rng.randn(BATCH, 32, 32, 4).astype(np.float32)
    ctx = rng.randn(BATCH, TOKENS, 256).astype(np.float32)
    t = np.array([10, 700])
    target = rng.randn(*x.shape).astype(np.float32)
    tx, tctx, tt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ctx), torch.from_numpy(t)
    ttarget = torch.from_numpy(target).permute(0, 3, 1, 2).contiguous()

    # --- JAX
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

    # --- PyTorch
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-4)

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

    ref.eval()
    for fn in (jax_fwd, torch_fwd, jax_train, torch_train):  # warm-up
        fn()
    times = {k: [] for k in ("jax_fwd", "torch_fwd", "jax_train", "torch_train")}
    for _ in range(args.steps):  # alternate so both see the same machine load
        times["jax_fwd"].append(timed(jax_fwd))
        times["torch_fwd"].append(timed(torch_fwd))
        times["jax_train"].append(timed(jax_train))
        times["torch_train"].append(timed(torch_train))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "config": {**CONFIG, "batch": BATCH, "tokens": TOKENS, "params": n_params},
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "jax_compile_s": {"forward": compile_fwd, "train_step": compile_train},
        "median_s": med,
        "ratio_jax_over_torch": {"forward": med["jax_fwd"] / med["torch_fwd"],
                                 "train_step": med["jax_train"] / med["torch_train"]},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }
    print(f"unet2d CPU, {n_params / 1e6:.1f}M params, batch {BATCH}, 32x32 latents, {args.threads} threads")
    print(f"{'':12s}{'JAX (s)':>10s}{'PyTorch (s)':>13s}{'JAX/PT':>9s}")
    for name, j, p in (("forward", "jax_fwd", "torch_fwd"), ("train step", "jax_train", "torch_train")):
        print(f"{name:12s}{med[j]:10.3f}{med[p]:13.3f}{med[j] / med[p]:9.2f}")
    print(f"JAX compile: forward {compile_fwd:.1f} s, train step {compile_train:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
