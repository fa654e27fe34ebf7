"""The one trainer: a sharded, resumable training loop for every stage (a stage is a task: `train/tasks/`).

    magdiff-jax train --config configs/t2i.py:tiny --workdir /tmp/t2i [--config.steps=100 ...]

A task names its models, its parameter groups (each with its own optimizer, trainable mask, EMA and start step:
`train/groups.py`) and its update (one or several losses per step); this file owns the rest, in the sections below:
processes and mesh; data; models and parameter groups; checkpoints; the update step; the loop; the export.

Parameters and optimizer state are created directly sharded over the mesh (abstract shapes, then `jit` with
`out_shardings`), never whole on one device; each model's parameters shard by the run's logical-axis rules
(`config.sharding_rules`) updated with the model's own (its registry entry's, then `config.model_sharding_rules.
<model>`). Parameters no group trains are frozen: they get no gradient and no optimizer state, and are written once
to WORKDIR/frozen when the run starts, so neither a resume nor an export needs the `init_from` folders again. The
step is one jitted function with in/out shardings and a donated state; its randomness is `fold_in(seed key, step)`
and the data order is a function of the seed, so a run resumed from a checkpoint continues exactly where it
stopped. Checkpoints (Orbax, async, keep-N) hold one item per parameter group (params, optimizer state, EMA), the
step and RNG, the data stream's global position and the config; parameters reshard on restore and the data position
does not depend on the number of processes, so a run resumes on another mesh or process count. SIGTERM / SIGINT
(on any process: the processes agree on the step, `distributed.StopVote`) finish the steps up to it, save it on
every process, and return normally.

Multi-host: each process loads the rows of each global batch that the batch sharding puts on its devices
(`data.pipeline.process_rows`), so a model axis that spans processes sees the same rows on each. The host runs one
step ahead of the devices (a step's metrics are fetched once the next is dispatched); each batch shape (buckets)
compiles its own step.

A non-finite loss or gradient leaves a group as it was; `max_nonfinite` such steps in a row stop the run with an
error naming the step and the last good checkpoint. At the last step the stage is exported to WORKDIR/export
(`export/stage.py`): every model its inference needs, tokenizer and scheduler.

Process 0 writes what a person reads: `metrics.jsonl` (one JSON line per `log_every` steps: step, loss and the
task's other losses, `grad_norm/<group>`, `lr/<group>`, steps_per_s, examples_per_s, tflops_per_device (XLA's
FLOP count of one device's compiled step), nonfinite_skipped), the same scalars as TensorBoard events under
`tensorboard/`, a progress bar on stderr, and every `preview.every` steps a contact sheet of the task's samples for
`preview.prompts` under `samples/` (also in TensorBoard). `compute_dtype` runs every model in bfloat16 (or float16)
with float32 parameters, gradients and optimizer state. On the CPU backend the run uses the CPU tuning
(`magdiff_jax.cpu`).

The workdir, `init_from` and a tokenizer folder may be local or in an object store (gs://...): every file here is
reached through `etils.epath` (`utils.files`); in an object store metrics.jsonl and the event files are rewritten
whole at each append, and the export is marked complete by a last file rather than renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from magdiff_jax import cpu, distributed
from magdiff_jax import sharding as shd
from magdiff_jax.data.transforms import normalize_example
from magdiff_jax.export import stage as stage_files
from magdiff_jax.models.registry import get_model
from magdiff_jax.train import groups as grp
from magdiff_jax.train import optim
from magdiff_jax.train.tasks import get_task
from magdiff_jax.train.tasks.base import timestep_bias
from magdiff_jax.utils.files import GrowingFile, as_path, atomic_dir, copy_tree, is_complete, move_tree

BATCH_AXES = ("data", "fsdp")


def base_config() -> ml_collections.ConfigDict:
    """Keys every training config has (configs/*.py start from this)."""
    from magdiff_jax.data.pipeline import data_config

    c = ml_collections.ConfigDict()
    c.task = "t2i"
    c.steps = 100
    c.seed = 0
    c.global_batch_size = 8
    c.log_every = 10
    c.ckpt_every = 100
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.max_nonfinite = 5  # consecutive non-finite steps that stop the run
    c.export = True  # write WORKDIR/export at the last step
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "context": 1})  # totals, all devices
    # How much of each mesh axis goes across TPU slices or GPU/CPU hosts (the data-centre network); the rest of each
    # axis stays within one. -1: as many as the slices or hosts allow (1 on one of them). Must divide `mesh`, and the
    # sizes multiply to a divisor of the number of slices (multislice TPU) or processes (GPU/CPU; consecutive
    # processes group, e.g. data=2 for 2 nodes of 8 one-GPU processes). sharding.make_mesh has the details.
    c.mesh_dcn = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "context": 1})
    # (logical axis, mesh axes) pairs over sharding.DEFAULT_RULES for the whole run, and per model name
    c.sharding_rules = ()
    c.model_sharding_rules = ml_collections.ConfigDict()
    c.distributed = ml_collections.ConfigDict({"coordinator": "", "num_processes": 0, "process_id": -1})
    # JAX's persistent compilation cache (a local folder or gs://...), set before the first compile; "": JAX's own
    # setting (JAX_COMPILATION_CACHE_DIR) is left as it is
    c.compilation_cache_dir = ""
    c.trainable = ""  # regex over parameter paths for the task's main group ("": the task's default)
    c.ema_decay = 0.0  # > 0: keep an EMA of the main group's parameters
    c.groups = ml_collections.ConfigDict()  # per parameter group: trainable, ema_decay, start_step, optim.<field>
    c.init_from = ""  # a folder of converted models, one subfolder per model name (absent ones: random init)
    c.compute_dtype = "float32"  # float32 | bfloat16 | float16: the models' compute dtype (parameters stay fp32)
    c.progress = True  # a progress bar on process 0 (stderr)
    # XLA options for compiling the train step, "name=value,...", e.g. "xla_backend_optimization_level=3" (overrides
    # XLA_FLAGS for this program alone)
    c.compiler_options = ""
    # every > 0: samples/ every that many steps, for `num` examples of the first batch (prompts: their captions)
    c.preview = ml_collections.ConfigDict({"every": 0, "num": 4, "prompts": (), "num_steps": 20, "guidance": 5.0,
                                           "seed": 0})
    c.task_options = ml_collections.ConfigDict()  # task-specific settings (see the task's docstring)
    c.optim = optim.optim_config()
    c.data = data_config()
    c.model = ml_collections.ConfigDict()
    # Stable Diffusion's scheduler settings; latent diffusion never clips the predicted clean latent (unit-variance
    # latents go well past [-1, 1]: clipping them is what pixel-space DDPM does, and it erases the subject)
    c.schedule = ml_collections.ConfigDict({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                            "beta_start": 0.00085, "beta_end": 0.012,
                                            "prediction_type": "epsilon", "clip_sample": False,
                                            "set_alpha_to_one": False, "steps_offset": 1,
                                            "timestep_bias": 0.0})  # diffusion.losses.sample_timesteps
    return c


def check_config(config, num_devices: int, process_count: int) -> tuple[int, ...]:
    """Errors a config would hit, raised before anything compiles. Returns the mesh shape."""
    for name in ("steps", "global_batch_size", "log_every", "ckpt_every", "keep_checkpoints", "max_nonfinite"):
        if not isinstance(config[name], int) or config[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {config[name]!r}")
    shape = shd.mesh_shape(dict(config.mesh), num_devices)
    shd.check_dcn_sizes(dict(config.mesh_dcn), dict(config.mesh))  # the granule count is make_mesh's to check
    batch_shards = shape[shd.MESH_AXES.index("data")] * shape[shd.MESH_AXES.index("fsdp")]
    if config.global_batch_size % batch_shards:
        raise ValueError(f"global_batch_size={config.global_batch_size} does not divide over the "
                         f"{batch_shards} data-parallel devices (mesh data x fsdp)")
    image_batch = config.get("image_batch_size", 0)
    if image_batch:
        if not isinstance(image_batch, int) or image_batch < 0 or image_batch % batch_shards:
            raise ValueError(f"image_batch_size={image_batch!r} must be a non-negative integer that divides over the "
                             f"{batch_shards} data-parallel devices (mesh data x fsdp)")
        if "image_data" not in config:
            raise ValueError("image_batch_size > 0 (joint image/video training) needs image_data: the image source's "
                             "data config")

    from magdiff_jax.layers.common import compute_dtype

    compute_dtype(config.compute_dtype)  # an unknown name fails here
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {config.ema_decay!r}")
    warnings = optim.check_optim_config(config.optim, config.steps, "optim")
    overrides = config.get("groups") or {}
    for name, group in get_task(config.task).groups(config).items():
        if "optim" in (overrides.get(name) or {}):  # a group's own optimizer settings, over `optim`
            warnings += optim.check_optim_config(group.optim, config.steps - group.start_step, f"groups.{name}.optim")
        if not 0 <= group.ema_decay < 1:
            raise ValueError(f"groups.{name}.ema_decay must be in [0, 1), got {group.ema_decay!r}")
    for warning in warnings:
        logging.warning(warning)
    compiler_options(config.get("compiler_options", ""))
    timestep_bias(config)  # a negative bias fails here
    run_rules(config)  # a malformed rule table fails here
    if config.preview.every < 0 or config.preview.num_steps < 1:
        raise ValueError(f"preview.every must be >= 0 and preview.num_steps >= 1, got {config.preview.every} and "
                         f"{config.preview.num_steps}")
    if config.preview.every > 0:
        n = len(config.preview.prompts) or config.preview.num
        if n > config.global_batch_size:
            raise ValueError(f"preview: {n} samples from the first batch, but a batch holds "
                             f"{config.global_batch_size} examples")
    return shape


def run_rules(config) -> shd.Rules:
    """The run's logical-axis rules: sharding.DEFAULT_RULES updated with `config.sharding_rules`."""
    return shd.updated_rules(shd.DEFAULT_RULES, config.get("sharding_rules", ()), "config.sharding_rules")


def model_rules(config, name: str, kind: str) -> shd.Rules:
    """Model `name`'s parameter rules: the run's, then its registry entry's, then `config.model_sharding_rules`."""
    own = (config.get("model_sharding_rules") or {}).get(name, ())
    rules = shd.updated_rules(run_rules(config), get_model(kind).sharding_rules, f"model {kind!r}")
    return shd.updated_rules(rules, own, f"config.model_sharding_rules.{name}")


class _Stop:
    """SIGTERM / SIGINT set a flag, which the loop hands to `distributed.StopVote`: the processes agree on a step,
    train to it, save it and return."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Log:
    """Process 0's outputs: metrics.jsonl, TensorBoard events, the progress bar and preview contact sheets.
    Other processes get a silent one."""

    def __init__(self, workdir: epath.Path, config, start: int, enabled: bool):
        self.workdir, self.enabled = workdir, enabled
        self.tb = self.bar = self.jsonl = None
        if not enabled:
            return
        from magdiff_jax.utils.tensorboard import EventWriter

        self.tb = EventWriter(workdir / "tensorboard")
        if config.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=config.steps, initial=start, file=sys.stderr, desc="train", unit="step",
                            mininterval=1.0, dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def metrics(self, m: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self.jsonl = GrowingFile(self.workdir / "metrics.jsonl")
        self.jsonl.append((json.dumps(m) + "\n").encode())
        self.tb.scalars(m["step"], {k: v for k, v in m.items() if k != "step"})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        else:
            logging.info("step %d  loss %.5f  %.2f steps/s", m["step"], m["loss"], m["steps_per_s"])

    def samples(self, step: int, videos, captions) -> None:
        if not self.enabled:
            return
        from magdiff_jax.utils.images import contact_sheet, save_png

        captions = list(captions) + [""] * (len(videos) - len(captions))  # tasks may add rows (inputs, ...)
        sheet = contact_sheet(videos, captions)
        save_png(self.workdir / "samples" / f"step_{step:07d}.png", sheet)
        self.tb.image(step, "samples", sheet)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


class _Preview:
    """The task's preview samples, every `preview.every` steps: a jitted `params -> videos` on the first `num` rows
    of the first global batch (gathered from the processes that hold them, kept replicated), the prompts replacing
    their captions when the config gives some."""

    def __init__(self, task, modules, config, data_cfg, params_sharding, replicated):
        self.config, self.replicated = config, replicated
        self.batch = self.captions = None
        if config.preview.every <= 0:
            self.fn = None
            return
        from magdiff_jax.data.transforms import tokenizer

        self.tok = tokenizer(data_cfg.tokenizer, data_cfg.max_length) if data_cfg.tokenizer else None
        self.keys = task.batch_keys(config)
        self.n = len(config.preview.prompts) or config.preview.num
        key = jax.random.key(config.preview.seed)
        self.fn = jax.jit(lambda params, batch: task.preview(modules, params, normalize_example(batch), key,
                                                             config=config),
                          in_shardings=(params_sharding, replicated), out_shardings=replicated,
                          compiler_options=cpu.compiler_options())

    def due(self, step: int) -> bool:
        return self.fn is not None and (step % self.config.preview.every == 0 or step == self.config.steps)

    def take(self, host: dict, batch: dict, first_row: int) -> None:
        """Keep the examples to sample for: rows [0, num) of the first global batch (`batch`, sharded) and their
        captions (`host`: this process's rows, from `first_row`)."""
        if self.fn is None or self.batch is not None:
            return
        n, prompts = self.n, list(self.config.preview.prompts)
        self.batch = jax.jit(lambda b: {k: b[k][:n] for k in self.keys}, out_shardings=self.replicated)(batch)
        self.captions = prompts or _gather_strings(list(host.get("caption", [""] * len(host["key"]))),
                                                   first_row)[:n]
        extra = {}
        if self.tok is not None:
            if prompts:
                extra["tokens"] = np.asarray(self.tok(prompts))
            extra["null_tokens"] = np.asarray(self.tok([""] * n))
        for k, v in extra.items():  # the same on every process: a replicated global array
            self.batch[k] = jax.make_array_from_process_local_data(self.replicated, v, v.shape)

    def __call__(self, params) -> np.ndarray:
        return np.asarray(self.fn(params, self.batch))  # replicated: every process holds all of it


def _gather_strings(local: list[str], first_row: int) -> list[str]:
    """The rows of a global batch's strings (captions) in order, from every process's rows [first_row, ...): the
    processes hold equal numbers of rows (possibly the same ones, when a model axis spans processes)."""
    if jax.process_count() == 1:
        return [str(c) for c in local]
    from jax.experimental import multihost_utils

    encoded = [str(c).encode() for c in local]
    width = int(np.max(multihost_utils.process_allgather(np.asarray(max(map(len, encoded), default=0)))))
    table = np.zeros((len(encoded), max(width, 1)), np.uint8)
    for i, b in enumerate(encoded):
        table[i, :len(b)] = np.frombuffer(b, np.uint8)
    tables = multihost_utils.process_allgather(table)  # (processes, rows, width)
    firsts = multihost_utils.process_allgather(np.asarray(first_row))
    rows = {}
    for t, f in zip(tables, np.asarray(firsts).reshape(-1)):
        for i, r in enumerate(t):
            rows.setdefault(int(f) + i, bytes(r).rstrip(b"\0").decode())
    return [rows[r] for r in range(len(rows))]


def compiler_options(text: str) -> dict[str, object]:
    """ "name=value,..." -> {name: value} (ints, floats and true/false parsed) for `Lowered.compile`."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"compiler_options: {item!r} is not name=value (in {text!r})")
        value = value.strip()
        if value.lower() in ("true", "false"):
            out[name.strip()] = value.lower() == "true"
            continue
        for cast in (int, float):
            try:
                out[name.strip()] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[name.strip()] = value
    return out


def _device_flops(compiled) -> float | None:
    """XLA's FLOP count of one device's program (the compiled step is the per-device SPMD program; counting the
    lowered one instead costs seconds for a big step). XLA counts the body of a loop once: with blockwise attention
    (attention_impl "auto" on CPU, long sequences) the count leaves out all but one block of those attentions."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return (cost or {}).get("flops") or None




def _like_params(opt_state, param_shardings, replicated):
    """Shardings for an optimizer state: every subtree shaped like the parameters (Adam's moments, accumulated
    gradients) takes the parameters' shardings; everything else (step counts) is replicated."""
    structure = jax.tree.structure(param_shardings)

    def one(sub):
        if jax.tree.structure(sub) == structure:
            return param_shardings
        return jax.tree.map(lambda _: replicated, sub)

    return jax.tree.map(one, opt_state, is_leaf=lambda x: jax.tree.structure(x) == structure)


def _abstract_models(declared: dict, config, mesh):
    """Modules, boxed abstract params and shardings per model name, nothing allocated."""
    modules, abstract, shardings = {}, {}, {}
    for name, (kind, model_cfg) in declared.items():
        spec = get_model(kind)
        modules[name] = spec.build(model_cfg)
        abstract[name] = spec.abstract_variables(modules[name])["params"]
        shardings[name] = shd.param_shardings(abstract[name], mesh, model_rules(config, name, kind))
    return modules, abstract, shardings


def _init_params(declared: dict, modules: dict, shardings: dict, config, mesh, key) -> dict:
    """Every model's parameters, directly sharded: from `init_from/<name>` where that folder exists, else freshly
    initialised from `fold_in(key, i)` (i: the model's place in name order)."""
    from magdiff_jax.export.model import load_model

    params = {}
    for i, name in enumerate(sorted(declared)):
        kind, model_cfg = declared[name]
        folder = as_path(config.init_from) / name if config.init_from else None
        if folder is not None and folder.exists():
            _, _, params[name] = load_model(folder, kind=kind, shardings=shardings[name])
            continue
        spec = get_model(kind)
        args, kwargs = spec.example_inputs(model_cfg), spec.example_kwargs(model_cfg)
        params[name], _ = shd.init_sharded(modules[name], jax.random.fold_in(key, i), *args, mesh=mesh,
                                           rules=model_rules(config, name, kind), shardings=shardings[name],
                                           **kwargs)
    return params


def initial_models(config, mesh=None) -> tuple[dict, dict]:
    """(modules, parameters), per model name, that a fresh run of `config` starts from: the `init_from` folders
    where they exist, else initialised from the seed, exactly as `train` does (sharded over `mesh`, by default
    the config's)."""
    mesh = shd.make_mesh(dict(config.mesh), dcn_sizes=dict(config.mesh_dcn)) if mesh is None else mesh
    declared = get_task(config.task).models(config)
    modules, _, shardings = _abstract_models(declared, config, mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return modules, _init_params(declared, modules, shardings, config, mesh, key)


def _tokenizer(config, workdir: epath.Path, main: bool) -> str:
    """The run's tokenizer folder, WORKDIR/tokenizer (or "" for none): `data.tokenizer` "synthetic" writes the
    synthetic vocabulary there, "init_from" copies the init_from folder's `tokenizer/`, a path copies that folder
    (a workdir holds everything its stage's inference needs). Process 0 writes it whole (`utils.files.atomic_dir`);
    the others wait for it."""
    tok = config.data.tokenizer
    if not tok:
        return ""
    dst = workdir / stage_files.TOKENIZER
    if tok == "init_from":
        if not config.init_from:
            raise ValueError("data.tokenizer='init_from' needs config.init_from (a folder with tokenizer/)")
        tok = str(as_path(config.init_from) / "tokenizer")
    if main and not is_complete(dst):
        if tok == "synthetic":
            from magdiff_jax.data.synthetic import write_tokenizer

            with atomic_dir(dst) as tmp:
                write_tokenizer(tmp)
        elif as_path(tok).is_dir():
            with atomic_dir(dst) as tmp:
                copy_tree(as_path(tok), tmp)
        else:
            raise FileNotFoundError(f"data.tokenizer: {tok} is not a tokenizer folder")
    distributed.sync("tokenizer")
    return str(dst)


UNRESTORABLE = "checkpoints.unrestorable"  # where a checkpoint that cannot be restored is moved, for inspection


def _restore_newest(mgr, workdir: epath.Path, args, main: bool):
    """(step, restored items) of the newest checkpoint that restores. A newer one that cannot be restored (files
    missing or truncated by a crash) is reported by its step and path and moved to WORKDIR/checkpoints.unrestorable/
    (kept for inspection; left where it was, Orbax would refuse to save that step again and its keep-N would delete
    it). When none restores, the error names the newest and nothing is moved."""
    failures = []
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            restored = mgr.restore(step, args=args)
        except Exception as e:  # whatever a broken checkpoint raises: reported, and the next one tried
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            failures.append((step, f"{type(e).__name__}: {first}"))
            logging.warning("checkpoint %d (%s) cannot be restored (%s); trying the one before it", step,
                            workdir / stage_files.CHECKPOINTS / str(step), failures[-1][1])
            continue
        if failures:
            if main:
                aside = workdir / UNRESTORABLE
                aside.mkdir(parents=True, exist_ok=True)
                for bad, _ in failures:
                    dst = aside / str(bad)
                    n = 1
                    while dst.exists():
                        dst, n = aside / f"{bad}.{n}", n + 1
                    move_tree(workdir / stage_files.CHECKPOINTS / str(bad), dst)
                    logging.warning("moved the unrestorable checkpoint %d to %s", bad, dst)
            distributed.sync("unrestorable checkpoints moved")
            mgr.reload()
        return step, restored
    step, reason = failures[0]
    raise FileNotFoundError(f"{workdir / stage_files.CHECKPOINTS}: no checkpoint restores; the newest, step {step} "
                            f"({workdir / stage_files.CHECKPOINTS / str(step)}): {reason}")


def _truncate_metrics(path: epath.Path, step: int) -> None:
    """Drop the lines of metrics.jsonl logged after `step` (the checkpoint resumed from), and any line a crash left
    torn (a kill in the middle of an append)."""
    if not path.exists():
        return
    kept = []
    for i, line in enumerate(path.read_bytes().decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            logged = int(entry["step"])
        except (ValueError, KeyError, TypeError):
            logging.warning("%s:%d: dropping a torn or malformed line", path, i)
            continue
        if logged <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def use_compilation_cache(cache_dir: str) -> None:
    """Keep compiled programs in `cache_dir` (JAX's persistent compilation cache; "" leaves the setting alone): a
    program compiled again, in this process or a later one, is read back instead."""
    if cache_dir and cache_dir != jax.config.values.get("jax_compilation_cache_dir"):  # before the first compile
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", cache_dir)
        compilation_cache.reset_cache()  # a cache an earlier compile in this process opened elsewhere is dropped


def train(config, workdir: str | os.PathLike) -> dict:
    """Run (or resume) training in `workdir`, with the CPU tuning (`magdiff_jax.cpu`) on where JAX's backend is the
    CPU. Returns the last logged metrics."""

    distributed.initialize(config.distributed.coordinator, config.distributed.num_processes,
                           config.distributed.process_id)  # before anything starts a JAX backend
    use_compilation_cache(str(config.compilation_cache_dir))
    with cpu.tuning(jax.default_backend() == "cpu"):
        return _train(config, workdir)


def make_train_step(task, modules: dict, config, groups: dict, optimizers: dict):
    """The update step `(state, frozen, batch) -> (state, metrics)` the trainer compiles: the batch normalised on
    device (uint8 images with data.normalize=False), the step's key folded from the run's rng, the task's update on
    the groups' state. `state` = {"step", "rng" (key data), "groups": {name: optimizer state}}."""

    def train_step(state, frozen, batch):
        batch = normalize_example(batch)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        ctx = grp.StepContext(modules, config, state["step"], state["groups"], frozen, groups, optimizers,
                              metrics={"nonfinite": jnp.zeros((), jnp.int32)})
        ctx = task.update(ctx, batch, step_key)
        return dict(state, step=state["step"] + 1, groups=ctx.state), ctx.metrics

    return train_step


def _train(config, workdir: str | os.PathLike) -> dict:
    from magdiff_jax.data.pipeline import default_report_path, make_dataset, process_rows

    # --- processes and mesh -------------------------------------------------------------------------------------
    workdir = as_path(workdir)
    main = jax.process_index() == 0
    check_config(config, jax.device_count(), jax.process_count())
    mesh = shd.make_mesh(dict(config.mesh), dcn_sizes=dict(config.mesh_dcn))
    rules = run_rules(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    workdir.mkdir(parents=True, exist_ok=True)
    if main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    if jax.default_backend() == "cpu":
        cpu.one_writer_per_array()
        if main and (hint := cpu.allocator_hint()):
            logging.info(hint)

    # --- data ---------------------------------------------------------------------------------------------------
    task = get_task(config.task)
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.tokenizer = _tokenizer(config, workdir, main)
    # this process loads the rows of each global batch that the batch sharding puts on its devices (all of them
    # when no batch axis crosses processes but a model axis does)
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    first_row, stop_row = process_rows(batch_sharding, config.global_batch_size)
    data_iter = iter(make_dataset(data_cfg, batch_size=stop_row - first_row, global_batch=config.global_batch_size,
                                  first_row=first_row, train=True, report_path=default_report_path(workdir)))
    global_rows = {}  # batch entry -> its global batch size, where it is not global_batch_size
    if config.get("image_batch_size", 0) > 0:  # joint image/video training: a second stream of one-frame videos
        from magdiff_jax.data.pipeline import IMAGE_PREFIX, JointIterator

        image_cfg = config.image_data.copy_and_resolve_references()
        image_cfg.tokenizer, image_cfg.max_length = data_cfg.tokenizer, data_cfg.max_length  # one text encoder
        image_first, image_stop = process_rows(batch_sharding, config.image_batch_size)
        images = make_dataset(image_cfg, batch_size=image_stop - image_first, global_batch=config.image_batch_size,
                              first_row=image_first, train=True,
                              report_path=default_report_path(workdir / "image_data"))
        data_iter = JointIterator(data_iter, images)
        global_rows = {k: config.image_batch_size for k in task.batch_keys(config) if k.startswith(IMAGE_PREFIX)}

    # --- models and parameter groups ----------------------------------------------------------------------------
    key = jax.random.key(config.seed)
    declared = task.models(config)
    groups = task.groups(config)
    modules, abstract, shardings = _abstract_models(declared, config, mesh)
    abstract_groups, _ = grp.split_params(nn.meta.unbox(abstract), groups)
    group_shardings, frozen_shardings = grp.split_params(shardings, groups)
    optimizers = grp.make_optimizers(groups, config.steps)

    def fresh_state(group_params):
        return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.fold_in(key, 2)),
                "groups": grp.initial_state(group_params, optimizers, groups)}

    abstract_state = jax.eval_shape(fresh_state, abstract_groups)
    state_shardings = {"step": replicated, "rng": replicated, "groups": {
        g: {"params": group_shardings[g], "opt_state": _like_params(s["opt_state"], group_shardings[g], replicated),
            **({"ema": group_shardings[g]} if "ema" in s else {})} for g, s in abstract_state["groups"].items()}}

    # --- checkpoints: resume, or start afresh -------------------------------------------------------------------
    # the data item is the stream's global position (JSON, written by the main process): a run resumes on any
    # number of processes
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=config.async_checkpoints)
    group_items = {g: stage_files.GROUP_ITEM.format(g) for g in groups}
    mgr = ocp.CheckpointManager(workdir / stage_files.CHECKPOINTS,
                                item_names=("state", *group_items.values(), "data", "config"), options=options)
    start = mgr.latest_step() or 0  # a run in an existing workdir resumes from its last checkpoint
    if start:  # the checkpoint and frozen/ hold every parameter: nothing is initialised
        frozen = stage_files.restore_frozen(workdir, frozen_shardings) if frozen_shardings else {}
        target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state,
                              state_shardings)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore({"step": target["step"], "rng": target["rng"]}),
            data=ocp.args.JsonRestore(),
            **{item: ocp.args.StandardRestore(target["groups"][g]) for g, item in group_items.items()})
        start, restored = _restore_newest(mgr, workdir, args, main)
        # the bad inputs seen are the main process's (its report); the others' reports start afresh
        data_iter.set_state(restored["data"], keep_bad=main)
        state = {"step": restored["state"]["step"], "rng": restored["state"]["rng"],
                 "groups": {g: restored[item] for g, item in group_items.items()}}
        logging.info("resumed from step %d in %s", start, workdir)
        if main:
            _truncate_metrics(workdir / "metrics.jsonl", start)
    else:
        group_params, frozen = grp.split_params(_init_params(declared, modules, shardings, config, mesh,
                                                             jax.random.fold_in(key, 1)), groups)
        if main:
            _truncate_metrics(workdir / "metrics.jsonl", 0)  # a run that crashed before its first checkpoint
            stage_files.write_workdir_models(workdir, task.name, declared, list(groups), task.export_models(config),
                                             tokenizer=bool(data_cfg.tokenizer), frozen=bool(frozen))
        if frozen:  # written once: a resume or an export reads the frozen parameters from here
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(workdir / stage_files.FROZEN, frozen, force=True)
                ckptr.wait_until_finished()
        state = jax.jit(fresh_state, out_shardings=state_shardings)(group_params)
        del group_params

    def save(step):
        mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
            data=ocp.args.JsonSave(data_iter.get_state()),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
            **{item: ocp.args.StandardSave(state["groups"][g]) for g, item in group_items.items()}))

    # --- the update step ----------------------------------------------------------------------------------------
    train_step = make_train_step(task, modules, config, groups, optimizers)
    step_fn = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    def inference_params() -> dict:
        """Every model's parameters as inference uses them: each group's EMA where it keeps one."""
        return grp.merge_params({g: s.get("ema", s["params"]) for g, s in state["groups"].items()}, frozen)

    # --- the loop -----------------------------------------------------------------------------------------------
    # The host runs a step ahead of the devices: a step's metrics are fetched once the next step is dispatched (the
    # next batch's loading and transfer overlap the step). Each batch shape (buckets) compiles its own step. A stop
    # signal is agreed across processes (`distributed.StopVote`): every process saves the same step and returns.
    log = _Log(workdir, config, start, enabled=main)
    preview = _Preview(task, modules, config, data_cfg, shardings, replicated)
    vote = distributed.StopVote()
    last, nonfinite = {}, {"run": 0, "total": 0}
    step, saved, compiled, pending = start, start, {}, None
    clock = {"t0": None, "examples": 0}

    def finish(done: int, m) -> None:
        """A dispatched step's metrics, once fetched: the non-finite count, and the log line every log_every."""
        nonlocal last
        m = jax.device_get(m)
        clock["examples"] += config.global_batch_size
        if m["nonfinite"]:
            nonfinite["run"] += 1
            nonfinite["total"] += 1
            logging.warning("step %d: non-finite loss or gradient; update skipped", done)
            if nonfinite["run"] >= config.max_nonfinite:
                mgr.wait_until_finished()
                good = mgr.latest_step()
                where = f"step {good} in {workdir / 'checkpoints'}" if good is not None else "none yet"
                raise FloatingPointError(f"{nonfinite['run']} non-finite steps in a row (max_nonfinite), the last "
                                         f"at step {done}; last good checkpoint: {where}")
        else:
            nonfinite["run"] = 0
        if done % config.log_every == 0 or done == config.steps:
            dt = time.perf_counter() - clock["t0"]
            steps_done = clock["examples"] // config.global_batch_size
            last = {"step": done, **{k: float(v) for k, v in m.items() if k != "nonfinite"},
                    "steps_per_s": steps_done / dt, "examples_per_s": clock["examples"] / dt,
                    "nonfinite_skipped": nonfinite["total"]}
            flops = compiled.get("flops")
            if flops:
                last["tflops_per_device"] = flops * steps_done / dt / 1e12
            log.metrics(last)
            clock.update(t0=time.perf_counter(), examples=0)

    def compile_for(batch) -> object:
        """The compiled step for this batch's shapes (ahead of time: XLA's FLOP count, the compile time)."""
        signature = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if signature not in compiled:
            tc = time.perf_counter()
            lowered = step_fn.lower(state, frozen, batch)
            tl = time.perf_counter()
            xla_options = cpu.compiler_options(compiler_options(config.get("compiler_options", "")))
            compiled[signature] = lowered.compile(xla_options)
            flops = _device_flops(compiled[signature])
            compiled.setdefault("flops", flops)  # the first shape's count stands for the throughput figures
            logging.info("step compiled for %s in %.1f s (traced and lowered %.1f s, XLA %.1f s; %s FLOP per step "
                         "per device)", ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(batch.items())),
                         time.perf_counter() - tc, tl - tc, time.perf_counter() - tl,
                         f"{flops:.3g}" if flops else "unknown")
            if clock["t0"] is not None:  # throughput figures leave compiles out
                clock["t0"] += time.perf_counter() - tc
        return compiled[signature]

    try:
        with _Stop() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            while step < config.steps:
                stop_at = vote.poll(step, stop.requested is not None)
                if stop_at is not None and step >= stop_at:
                    if step > saved:
                        save(step)
                        saved = step
                    logging.warning("%s: saved step %d, stopping", stop.requested or "stop requested by another "
                                    "process", step)
                    break
                host = next(data_iter)
                batch = {k: jax.make_array_from_process_local_data(
                    batch_sharding, np.asarray(host[k]),
                    (global_rows.get(k, config.global_batch_size), *np.shape(host[k])[1:]))
                    for k in task.batch_keys(config)}
                preview.take(host, batch, first_row)
                step_compiled = compile_for(batch)
                if clock["t0"] is None:
                    clock["t0"] = time.perf_counter()
                state, m = step_compiled(state, frozen, batch)
                step += 1
                log.step()
                if pending is not None:
                    finish(*pending)
                pending = (step, m)
                if preview.due(step):
                    finish(*pending)
                    pending = None
                    tp = time.perf_counter()
                    log.samples(step, preview(inference_params()), preview.captions)
                    clock["t0"] += time.perf_counter() - tp  # throughput figures leave the preview out
                if step % config.ckpt_every == 0 or step == config.steps:
                    save(step)
                    saved = step
            if pending is not None:
                finish(*pending)
    finally:
        log.close()
    mgr.wait_until_finished()
    mgr.close()

    # --- the export ---------------------------------------------------------------------------------------------
    if step == config.steps and config.get("export", True):
        names = task.export_models(config)
        params = inference_params()
        stage = stage_files.Stage(task.name, step, config, {n: declared[n][0] for n in names},
                                  {n: modules[n] for n in names}, {n: params[n] for n in names},
                                  as_path(data_cfg.tokenizer) if data_cfg.tokenizer else None, workdir)
        stage_files.save_stage(stage, workdir / "export", overwrite=True)
        logging.info("exported step %d to %s", step, workdir / "export")
    return last
