"""Run in a subprocess with 8 fake CPU devices: `train_helpers.config(**SPEC)` trained in WORKDIR (a fresh one, or
one holding another mesh's checkpoint, which is resharded as it is restored and continued with the data iterator
where it was). Prints one JSON line {metric: {step: value}} of the metrics named in SPEC's "metrics" (default loss).

    python tests/train_mesh_check.py WORKDIR '{"variant": "micro", "changes": {"steps": 5, "mesh.fsdp": 4}}'
"""

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

workdir, spec = sys.argv[1], json.loads(sys.argv[2])
assert jax.device_count() == 8
train(th.config(spec.get("variant", "tiny"), spec.get("file", "t2i"), **spec.get("changes", {})), workdir)
print(json.dumps({k: th.losses(workdir, k) for k in spec.get("metrics", ["loss"])}))
