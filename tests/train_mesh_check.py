"""Run in a subprocess with 8 fake CPU devices: the t2i micro trainer for 5 steps on mesh data=8 (checkpoints at
steps 3 and 5), then that run's step-3 checkpoint resumed on fsdp=4 x tensor=2 to step 5 (two compiles: the costly
part). Prints one JSON line {run: {step: loss}}."""

import json
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
from absl import flags

flags.FLAGS.mark_as_parsed()
sys.path.insert(0, os.path.dirname(__file__))
import train_helpers as th  # noqa: E402

from magdiff_jax.train.trainer import train  # noqa: E402

base = sys.argv[1]
assert jax.device_count() == 8
out = {}
train(th.config("micro", steps=5, ckpt_every=3, **{"mesh.data": 8}), f"{base}/data8")
out["data8"] = th.losses(f"{base}/data8")
# its step-3 checkpoint, resumed on another mesh
shutil.copytree(f"{base}/data8", f"{base}/moved")
shutil.rmtree(f"{base}/moved/checkpoints/5")
train(th.config("micro", steps=5, ckpt_every=3, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}), f"{base}/moved")
out["data8_moved_to_fsdp4_tensor2"] = th.losses(f"{base}/moved")
print(json.dumps(out))
