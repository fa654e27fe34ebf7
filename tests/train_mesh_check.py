"""Run in a subprocess with 8 fake CPU devices: a 1-device run's workdir (t2i micro, checkpoint at step 3) resumed
on mesh fsdp=4 x tensor=2 to step 5: the checkpoint's arrays are resharded as they are restored, and the data
iterator continues where it was. Prints one JSON line {step: loss}."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
from absl import flags

flags.FLAGS.mark_as_parsed()
sys.path.insert(0, os.path.dirname(__file__))
import train_helpers as th  # noqa: E402

from magdiff_jax.train.trainer import train  # noqa: E402

workdir = sys.argv[1]
assert jax.device_count() == 8
train(th.config("micro", steps=5, ckpt_every=3, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}), workdir)
print(json.dumps(th.losses(workdir)))
