"""How well a trained tiny MagDiff follows the caption, at each of its checkpoints: the demo's held-out generations.

    magdiff-jax demo --workdir runs/demo --config.ckpt_every=100 --config.keep_checkpoints=10
    python benchmarks/demo_motion.py --workdir runs/demo [--seeds 3] [--first-seed 100] [--guidance 3.0]

For every checkpoint of `<workdir>/magdiff` (or `--steps`), loads the pipeline at that step and generates
`magdiff_jax.demo.held_out_set`: 3 held-out subjects, started in the middle of the frame, each asked for the four
motions with the same `--seeds` sampling seeds (seeds from `--first-seed`; the demo itself uses 0, 1, ...), so a
right direction can only come from the caption. Prints and writes (benchmarks/results/demo_motion.json, or --out)
the fraction whose subject has its entity's colour (chance 1/6) and the fraction that moves the way its caption
says (chance 1/4), per step, with the detected directions. This is the measurement behind `configs/magdiff.py`'s
tiny settings (`schedule.timestep_bias`, `steps`); a quality check, not a timed benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a `magdiff-jax demo` workdir (its magdiff/ is scored)")
    ap.add_argument("--steps", type=int, nargs="*", default=None, help="checkpoint steps (default: all kept)")
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds per subject and motion")
    ap.add_argument("--first-seed", type=int, default=100)
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--num-steps", type=int, default=25, help="DDIM steps (the demo's)")
    ap.add_argument("--guidance", type=float, default=3.0, help="text guidance (the demo's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_motion.json"))
    args = ap.parse_args(argv)

    from magdiff_jax.demo import held_out_set, score_held_out
    from magdiff_jax.pipelines.magdiff import MagDiffPipeline

    workdir = Path(args.workdir) / "magdiff"
    ckpts = workdir / "checkpoints"
    if not ckpts.is_dir():
        raise SystemExit(f"demo_motion: {ckpts} not found (a `magdiff-jax demo` or `train` workdir is needed)")
    kept = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    if not kept:
        raise SystemExit(f"demo_motion: {ckpts} holds no checkpoint (has the training saved one?)")
    steps = args.steps or kept
    missing = sorted(set(steps) - set(kept))
    if missing:
        raise SystemExit(f"demo_motion: no checkpoint for step(s) {missing} in {ckpts} (kept: {kept})")

    rows = []
    for step in steps:
        t0 = time.perf_counter()
        pipe = MagDiffPipeline.load(workdir, step=step)
        held = held_out_set(pipe, pipe.config.data.synthetic, args.subjects, args.seeds, args.first_seed)
        videos = pipe(held["examples"], seeds=held["seeds"], num_steps=args.num_steps, guidance=args.guidance)
        colour, _, motion, detected = score_held_out(videos, held)
        rows.append({"step": step, "colour_accuracy": colour, "motion_accuracy": motion, "detected": detected,
                     "motions": held["motions"], "seconds": round(time.perf_counter() - t0, 1)})
        print(f"step {step:6d}  colour {colour:.2f} (chance 0.17)  motion {motion:.2f} (chance 0.25)  "
              f"n={len(detected)}", flush=True)
    config = pipe.config
    result = {
        "command": " ".join(["python", "benchmarks/demo_motion.py", *(argv if argv is not None else sys.argv[1:])]),
        "workdir": str(Path(args.workdir).absolute()), "seed": int(config.seed),
        "timestep_bias": float(config.schedule.get("timestep_bias", 0.0)), "train_steps": int(config.steps),
        "sampling": {"seeds": args.seeds, "first_seed": args.first_seed, "subjects": args.subjects,
                     "num_steps": args.num_steps, "guidance": args.guidance},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
