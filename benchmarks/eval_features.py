"""Feature extraction for evaluation on CPU: videos/s of our jitted networks beside their PyTorch peers, same weights,
same inputs, in one run.

    python benchmarks/eval_features.py                 # about 6 minutes on 2 cores
    python benchmarks/eval_features.py --only i3d --batch 8

Networks (full size, random weights: speed does not depend on their values):
  i3d   the Kinetics-400 I3D on uint8 videos (B, 16, 256, 256, 3): preprocessing (bilinear to 224, [-1, 1]) and the
        forward to the 400 logits, as `eval.fvd.I3DFeatures` runs them for FVD; peer: cd-fvd's `preprocess_i3d` +
        `InceptionI3d(400)` (what `cdfvd.compute_fvd` runs);
  c3d   the UCF-101 C3D on (B, 16, 128, 128, 3) in [-1, 1] (its resize to 112 and mean included), as IS runs it;
        peer: tests/torch_c3d.py's `TorchC3D` (TGAN2's layers);
  clip  the ViT-B/32 vision tower with projection on the 16 frames of (B, 16, 224, 224, 3) (CLIP's preprocessing
        included on our side, the peer takes preprocessed pixels: its figure is the forward alone), as CLIPSIM /
        frame consistency run it; peer: transformers' `CLIPVisionModelWithProjection`.
Each is compiled / warmed up once, then timed over `--repeats` calls alternating ours and PyTorch's (the median
call of each), set up as `magdiff-jax` runs (`cpu.setup_process`); torch on as many threads as XLA's CPU
client uses. Reports videos/s of each and the ratio
(ours / PyTorch's time). Writes benchmarks/results/eval_features_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _random_tree(abstract, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if path[-1] in ("scale", "var"):
            return rng.uniform(0.7, 1.3, shape)
        if path[-1] == "kernel":
            return rng.normal(0, np.sqrt(2 / max(1, np.prod(shape[:-1]))), shape)
        return rng.normal(0, 0.05, shape)

    from flax import traverse_util

    return traverse_util.unflatten_dict({p: draw(p, a.shape).astype(np.float32) for p, a in abstract.items()})


def bench_i3d(batch: int):
    import numpy as np
    import torch

    from magdiff_jax.convert.i3d import i3d_state_dict
    from magdiff_jax.eval.fvd import I3DFeatures, get_protocol
    from magdiff_jax.models.i3d import I3D, I3DConfig
    from magdiff_jax.models.registry import get_model

    stub = types.ModuleType("torchvision")  # cdfvd's package imports torchvision for VideoMAE only
    sys.modules.setdefault("torchvision", stub)
    from cdfvd.third_party.i3d import pytorch_i3d, utils

    module = I3D(I3DConfig())
    params = _random_tree(get_model("i3d").abstract_params(module), 0)
    ours = I3DFeatures(module, params)
    net = pytorch_i3d.InceptionI3d(400, in_channels=3).eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in i3d_state_dict(module.config, params).items()},
                        strict=True)
    videos = np.random.default_rng(1).integers(0, 256, (batch, 16, 256, 256, 3), dtype=np.uint8)
    protocol = get_protocol("fvd2048_16f")

    def run_ours():
        ours.extract_clips(videos, protocol)

    def run_torch():
        with torch.no_grad():
            net(utils.preprocess_i3d(videos))

    return run_ours, run_torch


def bench_c3d(batch: int):
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from torch_c3d import TorchC3D

    from magdiff_jax.convert.c3d import c3d_state_dict
    from magdiff_jax.eval.runner import C3DProbabilities
    from magdiff_jax.models.c3d import C3D, C3DConfig
    from magdiff_jax.models.registry import get_model

    module = C3D(C3DConfig())
    params = _random_tree(get_model("c3d").abstract_params(module), 0)
    ours = C3DProbabilities(module, params)
    net = TorchC3D().eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in c3d_state_dict(module.config, params).items()})
    videos = np.random.default_rng(1).integers(0, 256, (batch, 16, 128, 128, 3), dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(videos.transpose(0, 4, 1, 2, 3))).float() / 127.5 - 1

    def run_torch():
        with torch.no_grad():
            net(x)

    return lambda: ours(videos), run_torch


def bench_clip(batch: int):
    import jax
    import numpy as np
    import torch
    import transformers

    from magdiff_jax.convert.core import load_torch
    from magdiff_jax.eval.clip_scores import CLIPEmbedder, clip_preprocess

    config = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512)
    torch.manual_seed(0)
    net = transformers.CLIPVisionModelWithProjection(config).eval()
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "magdiff_bench_clip_vision"
    net.save_pretrained(folder)
    vision, vision_params = load_torch("clip_vision", folder)
    ours = CLIPEmbedder(None, None, vision, vision_params, batch_size=16 * batch)
    videos = np.random.default_rng(1).uniform(-1, 1, (batch, 16, 224, 224, 3)).astype(np.float32)
    pixels = np.asarray(clip_preprocess(jax.numpy.asarray(videos.reshape(-1, 224, 224, 3)), 224))
    pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

    def run_ours():
        ours.videos(videos).block_until_ready()

    def run_torch():
        with torch.no_grad():
            net(pixel_values=pixels)

    return run_ours, run_torch


BENCHES = {"i3d": bench_i3d, "c3d": bench_c3d, "clip": bench_clip}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=sorted(BENCHES))
    parser.add_argument("--batch", type=int, default=4, help="videos per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_features_cpu.json"))
    args = parser.parse_args()

    from magdiff_jax import cpu

    cpu.setup_process()  # as `magdiff-jax eval` runs: Eigen convolutions, the malloc tunables, the CPU tuning
    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for name in args.only:
        ours, peer = BENCHES[name](args.batch)
        start = time.perf_counter()
        ours()
        first = time.perf_counter() - start
        peer()
        times = {"ours": [], "torch": []}
        for _ in range(args.repeats):
            times["ours"] += _timed(ours, 1)
            times["torch"] += _timed(peer, 1)
        ours_s, torch_s = statistics.median(times["ours"]), statistics.median(times["torch"])
        results[name] = {"batch": args.batch, "first_call_s": first, "ours_s": ours_s, "torch_s": torch_s,
                         "ours_videos_per_s": args.batch / ours_s, "torch_videos_per_s": args.batch / torch_s,
                         "ratio_ours_over_torch_time": ours_s / torch_s, "calls": times}
        print(f"{name}: ours {args.batch / ours_s:.3f} videos/s, torch {args.batch / torch_s:.3f} videos/s, "
              f"time ratio {ours_s / torch_s:.2f} (first call {first:.1f} s)", flush=True)
    record = {"command": " ".join(["python", *sys.argv]), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
