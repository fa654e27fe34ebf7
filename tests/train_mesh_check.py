"""Run in a subprocess with 8 fake CPU devices: the t2i micro trainer on mesh data=2 x fsdp=2 x tensor=2 for 5
steps, and its step-3 checkpoint resumed on fsdp=4 x tensor=2 to step 5 (two compiles: the costly part). Prints one
JSON line {run: {step: loss}} for the test to compare with one device."""

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
train(th.config("micro", steps=5, ckpt_every=3, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), f"{base}/dft")
out["data2_fsdp2_tensor2"] = th.losses(f"{base}/dft")
# the step-3 checkpoint of that run, resumed on another mesh
shutil.copytree(f"{base}/dft", f"{base}/moved")
shutil.rmtree(f"{base}/moved/checkpoints/5")
train(th.config("micro", steps=5, ckpt_every=3, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}), f"{base}/moved")
out["moved_to_fsdp4_tensor2"] = th.losses(f"{base}/moved")
print(json.dumps(out))
