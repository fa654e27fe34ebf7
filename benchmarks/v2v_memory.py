"""Memory of the base V2V training step (configs/v2v.py:base) on one device, from XLA's `memory_analysis()` of the
compiled step: compiled, never run, from abstract parameters (no weight files, nothing allocated).

    python benchmarks/v2v_memory.py                               # 32 frames at 1024 px, full remat, bf16 compute
    python benchmarks/v2v_memory.py --remat none                  # the same without remat (only compiled)
    python benchmarks/v2v_memory.py --frames 16 --size 512 --remat full none
    python benchmarks/v2v_memory.py --tiny --frames 2 --size 64   # configs/v2v.py:tiny models (a quick check)

The step is the trainer's (`train.trainer`): the V2V task's update (`V2VTask.update`, SDEdit input: the clip
VAE-encoded `task_options.vae_frames_per_call` frames at a time, the reference condition through the CLIP vision
tower, the caption through the CLIP text tower, the I2V denoiser's epsilon / v loss), its gradient with respect to
the task's trainable groups alone (motion, controlnet, appearance: `train.groups.StepContext.minimize`) and each
group's AdamW update (fp32 parameters and moments, `train.optim`), the frozen parameters (spatial U-Net layers, VAE,
text and image encoders) as inputs, the state donated; on a one-device mesh with the run's logical-axis rules, on
the CPU with the CPU tuning the trainer uses there (large attentions blockwise). Per-device batch 1 (the base config's
global 16 over 16 devices). Models: configs/v2v.py:base with the weights its `init_from` would hold: the I2V
denoiser of `models.i2v.I2VConfig` defaults (SD1.5 AnimateDiff U-Net, IP-Adapter-Plus resampler, ControlNet), the
SD VAE (`AutoencoderKLConfig.sd`), CLIP ViT-L text (`CLIPTextConfig.sd15`) and OpenCLIP ViT-H vision
(`CLIPVisionConfig.vit_h14`).

Memory: argument (state + frozen parameters + batch), output (the new state: aliased to the donated state), temp
(XLA's buffers for the activations and gradients) and generated code bytes; total = argument + output + temp -
alias, what the device holds at the step's peak by XLA's accounting. On the CPU, XLA_FLAGS gets
`--xla_cpu_enable_concurrency_optimized_scheduler=false` (as tests/remat_memory_check.py) so that the CPU schedules
for memory as the GPU and TPU schedulers do; the CPU's figures remain the CPU backend's (its own fusion and
attention), an estimate of an accelerator's.

Writes (merges into) benchmarks/results/v2v_memory_<backend>.json: one row per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
GIB = 2**30


def step_config(tiny: bool, frames: int, size: int, remat: str, dtype: str):
    """configs/v2v.py's base (or tiny) config at `frames` x `size` px, with the base models' configs filled in
    where the base config leaves them to `init_from`."""
    import v2v

    from magdiff_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
    from magdiff_jax.models.registry import config_to_dict
    from magdiff_jax.models.unet_motion import UNetMotionConfig
    from magdiff_jax.models.vae import AutoencoderKLConfig

    c = v2v.get_config("tiny" if tiny else "base")
    c.compute_dtype = dtype
    c.data.num_frames, c.data.resolution = frames, (size, size)
    if not tiny:
        # the I2V stage's models as `magdiff-jax convert i2v-init` writes them (the ControlNet derived from the U-Net,
        # its dtype and remat policy the U-Net's); dtypes left to the run's compute dtype (tasks.base.model_config)
        unet = config_to_dict(UNetMotionConfig.animatediff_sd15())
        unet.pop("dtype")
        c.model.unet.unet = {**unet, **c.model.unet.unet.to_dict()}
        for name, preset in (("vae", AutoencoderKLConfig.sd()), ("text_encoder", CLIPTextConfig.sd15()),
                             ("image_encoder", CLIPVisionConfig.vit_h14())):
            given = config_to_dict(preset)
            given.pop("dtype")
            c.model[name] = given
    factor = 2 ** (len(c.model.vae.block_out_channels) - 1)
    if size % factor:
        raise ValueError(f"--size {size} is not a multiple of the VAE's downsampling factor {factor}")
    c.model.unet.unet.sample_size = size // factor
    c.model.unet.unet.remat_policy = remat
    return c


def measure(config, *, batch_size: int = 1) -> dict:
    """Lower and compile the trainer's step for `config` on one device; XLA's memory figures and parameter counts."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from magdiff_jax import cpu
    from magdiff_jax import sharding as shd
    from magdiff_jax.train import groups as grp
    from magdiff_jax.train.tasks import get_task
    from magdiff_jax.train.trainer import _abstract_models, compiler_options, make_train_step, run_rules

    task = get_task(config.task)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, devices=jax.devices()[:1])
    declared = task.models(config)
    groups = task.groups(config)
    modules, abstract, _ = _abstract_models(declared, config, mesh)
    group_params, frozen = grp.split_params(nn.meta.unbox(abstract), groups)
    optimizers = grp.make_optimizers(groups, config.steps)
    state = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32),
                                      "rng": jax.random.key_data(jax.random.key(0)),
                                      "groups": grp.initial_state(p, optimizers, groups)}, group_params)
    f, (h, w), s = config.data.num_frames, config.data.resolution, config.data.vsr.scale
    batch = {"video": jax.ShapeDtypeStruct((batch_size, f, h, w, 3), np.uint8),
             "low_res": jax.ShapeDtypeStruct((batch_size, f, h // s, w // s, 3), np.uint8),
             "tokens": jax.ShapeDtypeStruct((batch_size, config.data.max_length), np.int32)}
    assert set(batch) == set(task.batch_keys(config))

    train_step = make_train_step(task, modules, config, groups, optimizers)

    on_cpu = jax.default_backend() == "cpu"
    with cpu.tuning(on_cpu), jax.set_mesh(mesh), nn.logical_axis_rules(run_rules(config)):
        t0 = time.perf_counter()
        lowered = jax.jit(train_step, donate_argnums=(0,)).lower(state, frozen, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile(cpu.compiler_options(compiler_options(config.get("compiler_options", ""))))
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    row = {"lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
           "trainable_params": {g: count(p) for g, p in group_params.items()},
           "frozen_params": {m: count(p) for m, p in frozen.items()}}
    row["trainable_params_total"] = sum(row["trainable_params"].values())
    row["frozen_params_total"] = sum(row["frozen_params"].values())
    fields = ("argument", "output", "alias", "temp", "generated_code")
    row["bytes"] = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in fields}
    peak = getattr(mem, "peak_memory_in_bytes", 0)
    if peak and not on_cpu:  # the CPU backend's counts the arguments alone
        row["bytes"]["peak_memory"] = int(peak)
    b = row["bytes"]
    row["total_gib"] = round((b["argument"] + b["output"] + b["temp"] - b["alias"]) / GIB, 3)
    row["gib"] = {k: round(v / GIB, 3) for k, v in b.items()}
    return row


def main(argv=None) -> None:
    from magdiff_jax.layers.remat import POLICIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=1024, help="frame height and width in pixels")
    ap.add_argument("--remat", nargs="+", default=["full"], choices=POLICIES, help="one run per policy")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    ap.add_argument("--tiny", action="store_true", help="configs/v2v.py:tiny models instead of the base ones")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/v2v_memory_<backend>.json)")
    args = ap.parse_args(argv)

    if MEMORY_FLAG not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts a backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + MEMORY_FLAG).strip()
    import jax

    dev = jax.devices()[0]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"v2v_memory_{dev.platform}.json")
    command = "python benchmarks/v2v_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}
    for remat in args.remat:
        setting = {"config": "configs/v2v.py:" + ("tiny" if args.tiny else "base"), "frames": args.frames,
                   "size": args.size, "remat": remat, "compute_dtype": args.dtype, "param_dtype": "float32",
                   "batch_per_device": 1}
        print(f"compiling {json.dumps(setting)}", flush=True)
        row = measure(step_config(args.tiny, args.frames, args.size, remat, args.dtype))
        row = {**setting, **row, "command": command, "jax": jax.__version__,
               "device": f"{dev.platform} {dev.device_kind}", "host": platform.node(),
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
        g = row["gib"]
        print(f"  total {row['total_gib']:.2f} GiB = argument {g['argument']:.2f} + output {g['output']:.2f} + temp "
              f"{g['temp']:.2f} - alias {g['alias']:.2f} (code {g['generated_code']:.3f}); trainable "
              f"{row['trainable_params_total'] / 1e6:.1f}M, frozen {row['frozen_params_total'] / 1e6:.1f}M; "
              f"lowered {row['lower_s']} s, compiled {row['compile_s']} s", flush=True)
        keys = tuple(setting)
        result["runs"] = [r for r in result["runs"] if tuple(r.get(k) for k in keys) != tuple(setting.values())]
        result["runs"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after each run: a later one may not finish
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
