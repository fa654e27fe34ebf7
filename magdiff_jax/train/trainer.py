"""The one trainer: a sharded, resumable training loop for every stage (a stage is a task: tasks.py).

    magdiff-jax train --config configs/t2i.py:tiny --workdir /tmp/t2i [--config.steps=100 ...]

Parameters and optimizer state are created directly sharded over the mesh (abstract shapes, then `jit` with
`out_shardings`), never whole on one device; frozen models are split off before `jax.grad` and hold no optimizer
state. The step is one jitted function with in/out shardings and a donated state. The step's randomness is
`fold_in(seed key, step)`, and the data order is a function of the seed, so a run resumed from a checkpoint
continues exactly where it stopped. Checkpoints (Orbax, async, keep-N) hold the state (step, trainable params,
optimizer state, EMA, RNG key), the data-iterator state and the config. SIGTERM / SIGINT finish the current
step, save, and return normally. A non-finite loss or gradient skips the update; `max_nonfinite` in a row stop
the run with an error naming the step and the last good checkpoint.

Process 0 writes what a person reads: `metrics.jsonl` (one JSON line per `log_every` steps: step, loss, lr,
grad_norm, steps_per_s, examples_per_s, tflops_per_device (XLA's FLOP count of one device's compiled step),
nonfinite_skipped), the same scalars as TensorBoard events under `tensorboard/`, a progress bar on stderr, and
every `preview.every` steps a contact sheet of the task's samples for `preview.prompts` under `samples/` (also
in TensorBoard). `compute_dtype` runs every model in bfloat16 (or float16) with float32 parameters, gradients and
optimizer state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from magdiff_jax import cpu
from magdiff_jax import sharding as shd
from magdiff_jax.data.transforms import normalize_example
from magdiff_jax.train import optim
from magdiff_jax.train.tasks import get_task, timestep_bias

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
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "context": 1})
    c.distributed = ml_collections.ConfigDict({"coordinator": "", "num_processes": 0, "process_id": -1})
    c.trainable = ""  # regex over parameter paths ("": the task's default)
    c.ema_decay = 0.0  # > 0: keep an EMA of the trainable parameters
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
                                            "timestep_bias": 0.0})  # tasks.sample_timesteps
    return c


def check_config(config, num_devices: int, process_count: int) -> tuple[int, ...]:
    """Errors a config would hit, raised before anything compiles. Returns the mesh shape."""
    shape = shd.mesh_shape(dict(config.mesh), num_devices)
    batch_shards = shape[shd.MESH_AXES.index("data")] * shape[shd.MESH_AXES.index("fsdp")]
    if config.global_batch_size % batch_shards:
        raise ValueError(f"global_batch_size={config.global_batch_size} does not divide over the "
                         f"{batch_shards} data-parallel devices (mesh data x fsdp)")
    if config.global_batch_size % process_count:
        raise ValueError(f"global_batch_size={config.global_batch_size} does not divide over {process_count} "
                         "processes")
    if config.steps < 1 or config.log_every < 1 or config.ckpt_every < 1:
        raise ValueError("steps, log_every and ckpt_every must be positive")
    from magdiff_jax.layers.common import compute_dtype

    compute_dtype(config.compute_dtype)  # an unknown name fails here
    compiler_options(config.get("compiler_options", ""))
    timestep_bias(config)  # a negative bias fails here
    if config.preview.every > 0:
        n = len(config.preview.prompts) or config.preview.num
        if n > config.global_batch_size // process_count:
            raise ValueError(f"preview: {n} samples from the first batch, but each process loads "
                             f"{config.global_batch_size // process_count} examples")
    return shape


class _Stop:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves, and returns."""

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

    def __init__(self, workdir: Path, config, start: int, enabled: bool):
        self.workdir, self.enabled = workdir, enabled
        self.tb = self.bar = None
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
        with open(self.workdir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(m) + "\n")
        self.tb.scalars(m["step"], {k: v for k, v in m.items() if k != "step"})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        else:
            logging.info("step %d  loss %.5f  lr %.2e  %.2f steps/s", m["step"], m["loss"], m["lr"],
                         m["steps_per_s"])

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


class _Preview:
    """The task's preview samples, every `preview.every` steps: a jitted `params -> videos` on the first `num`
    examples of process 0's first batch (all processes hold the same copy), the prompts replacing their captions
    when the config gives some."""

    def __init__(self, task, modules, config, data_cfg, params_sharding, replicated):
        self.config = config
        self.batch = self.captions = None
        if config.preview.every <= 0:
            self.fn = None
            return
        from magdiff_jax.data.transforms import tokenizer

        self.tok = tokenizer(data_cfg.tokenizer, data_cfg.max_length) if data_cfg.tokenizer else None
        self.keys = task.batch_keys(config)
        key = jax.random.key(config.preview.seed)
        self.fn = jax.jit(lambda params, batch: task.preview(modules, params, batch, key, config=config),
                          in_shardings=(params_sharding, replicated), out_shardings=replicated,
                          compiler_options=cpu.compiler_options())

    def due(self, step: int) -> bool:
        return self.fn is not None and (step % self.config.preview.every == 0 or step == self.config.steps)

    def take(self, host: dict) -> None:
        """Keep the examples to sample for, from the first batch (process 0's, broadcast to every process)."""
        if self.fn is None or self.batch is not None:
            return
        from jax.experimental import multihost_utils

        prompts = list(self.config.preview.prompts)
        n = len(prompts) or self.config.preview.num
        batch = {k: np.asarray(host[k][:n]) for k in self.keys}
        self.captions = prompts or [str(c) for c in np.asarray(host.get("caption", [""] * n))[:n]]
        if self.tok is not None:
            if prompts:
                batch["tokens"] = np.asarray(self.tok(prompts))
            batch["null_tokens"] = np.asarray(self.tok([""] * n))
        self.batch = multihost_utils.broadcast_one_to_all(batch) if jax.process_count() > 1 else batch

    def __call__(self, params) -> np.ndarray:
        return np.asarray(self.fn(params, normalize_example(self.batch)))


def _init_models(task, config, mesh, rules, key, *, restoring: str | None = None):
    """Modules, params (directly sharded) and their shardings, per model name. `restoring`: the trainable regex of a
    run about to restore its checkpoint; models whose every parameter it matches are left abstract
    (ShapeDtypeStructs with their shardings): the checkpoint holds them, so they are never initialised."""
    from magdiff_jax.convert.core import get_kind
    from magdiff_jax.convert.flax_checkpoint import load_flax

    modules, params, shardings = {}, {}, {}
    for i, (name, (kind, model_cfg)) in enumerate(sorted(task.models(config).items())):
        spec = get_kind(kind)
        module = spec.build(model_cfg)
        args, kwargs = spec.example_inputs(model_cfg), spec.example_kwargs(model_cfg)
        folder = Path(config.init_from) / name if config.init_from else None
        if restoring is None and not (folder and folder.exists()):  # a fresh model: traced once, to initialise it
            p, sh = shd.init_sharded(module, jax.random.fold_in(key, i), *args, mesh=mesh, rules=rules, **kwargs)
            modules[name], params[name], shardings[name] = module, p, sh
            continue
        abstract = shd.abstract_init(module, *args, **kwargs)["params"]
        sh = shd.param_shardings(abstract, mesh, rules)
        if restoring is not None and all(re.search(restoring, f"{name}/{k}") for k in optim.flat(nn.meta.unbox(
                abstract))):
            p = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             nn.meta.unbox(abstract), sh)
        elif folder and folder.exists():
            _, _, p = load_flax(folder, kind=kind, shardings=sh)
        else:
            p, _ = shd.init_sharded(module, jax.random.fold_in(key, i), *args, mesh=mesh, rules=rules, shardings=sh,
                                    **kwargs)
        modules[name], params[name], shardings[name] = module, p, sh
    return modules, params, shardings


def _initial_state(trainable, opt_state, key, ema_decay: float) -> dict:
    """A fresh run's training state: step 0, the trainable parameters, their optimizer state, the step RNG and
    the EMA (a copy of the parameters)."""
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": opt_state,
             "rng": jax.random.key_data(jax.random.fold_in(key, 2))}
    if ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, trainable)
    return state


def _like_params(opt_state, param_shardings, replicated):
    """Shardings for an optimizer state: every subtree shaped like the parameters (Adam's moments, accumulated
    gradients) takes the parameters' shardings; everything else (step counts) is replicated."""
    structure = jax.tree.structure(param_shardings)

    def one(sub):
        if jax.tree.structure(sub) == structure:
            return param_shardings
        return jax.tree.map(lambda _: replicated, sub)

    return jax.tree.map(one, opt_state, is_leaf=lambda x: jax.tree.structure(x) == structure)


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


def tokenizer_folder(config, workdir) -> str:
    """`data.tokenizer` as a folder: "synthetic" is the vocabulary the trainer writes to WORKDIR/tokenizer,
    "init_from" the `tokenizer/` of the init_from folder (`magdiff-jax convert magdiff-init` copies the pipeline's),
    anything else a folder path ("" for none)."""
    tok = config.data.tokenizer
    if tok == "synthetic":
        return str(Path(workdir) / "tokenizer")
    if tok == "init_from":
        if not config.init_from:
            raise ValueError("data.tokenizer='init_from' needs config.init_from (a folder with tokenizer/)")
        return str(Path(config.init_from) / "tokenizer")
    return tok


def train(config, workdir: str | Path) -> dict:
    """Run (or resume) training in `workdir`, with the CPU tuning (`magdiff_jax.cpu`) on where JAX's backend is the
    CPU. Returns the last logged metrics."""
    from magdiff_jax.train import distributed

    distributed.initialize(config.distributed.coordinator, config.distributed.num_processes,
                           config.distributed.process_id)
    with cpu.tuning(jax.default_backend() == "cpu"):
        return _train(config, workdir)


def _train(config, workdir: str | Path) -> dict:
    from magdiff_jax.data.pipeline import default_report_path, make_dataset

    workdir = Path(workdir).absolute()
    main = jax.process_index() == 0
    check_config(config, jax.device_count(), jax.process_count())
    mesh = shd.make_mesh(dict(config.mesh))
    rules = shd.DEFAULT_RULES
    workdir.mkdir(parents=True, exist_ok=True)
    if main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

    data_cfg = config.data.copy_and_resolve_references()
    if data_cfg.tokenizer == "synthetic":  # the embedded default's one-token-per-word vocabulary
        from magdiff_jax.data.synthetic import write_tokenizer

        write_tokenizer(workdir / "tokenizer")
    data_cfg.tokenizer = tokenizer_folder(config, workdir)
    local_batch = config.global_batch_size // jax.process_count()
    data_iter = iter(make_dataset(data_cfg, batch_size=local_batch, train=True,
                                  report_path=default_report_path(workdir)))

    if jax.default_backend() == "cpu":
        cpu.one_writer_per_array()
        if main and (hint := cpu.allocator_hint()):
            logging.info(hint)
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=config.async_checkpoints)
    mgr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data", "config"), options=options)
    start = mgr.latest_step() or 0  # a run in an existing workdir resumes from its last checkpoint

    task = get_task(config.task)
    key = jax.random.key(config.seed)
    trainable_rx = config.trainable or task.trainable
    modules, params, shardings = _init_models(task, config, mesh, rules, jax.random.fold_in(key, 1),
                                              restoring=trainable_rx if start else None)
    trainable, frozen = optim.split_trainable(params, trainable_rx)
    t_shard, f_shard = optim.split_trainable(shardings, trainable_rx)
    tx, lr_schedule = optim.make_optimizer(config.optim, config.steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = _like_params(jax.eval_shape(tx.init, trainable), t_shard, replicated)
    state_shardings = {"step": replicated, "params": t_shard, "opt_state": opt_shardings, "rng": replicated}
    if config.ema_decay > 0:
        state_shardings["ema"] = t_shard
    if start:  # the checkpoint holds the whole state: its shapes and shardings suffice, nothing is initialised
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             jax.eval_shape(lambda t: _initial_state(t, tx.init(t), key, config.ema_decay), trainable),
                             state_shardings)
    else:
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
        state = jax.device_put(_initial_state(trainable, opt_state, key, config.ema_decay), state_shardings)
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    def train_step(state, frozen, batch):
        batch = normalize_example(batch)  # uint8 images (data.normalize=False) are scaled here, on device
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss_fn(p):
            return task.loss(modules, optim.merge(p, frozen), batch, step_key, config=config)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        new = dict(state, step=state["step"] + 1, params=keep(new_params, state["params"]),
                   opt_state=keep(opt_state, state["opt_state"]))
        if "ema" in state:
            d = config.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], new["params"])
            new["ema"] = keep(ema, state["ema"])
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state["step"]),
                   "nonfinite": (~ok).astype(jnp.int32), **aux}
        return new, metrics

    step_fn = jax.jit(train_step, in_shardings=(state_shardings, f_shard, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    import grain

    if start:
        restored = mgr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                              data=grain.checkpoint.CheckpointRestore(data_iter)))
        state = restored["state"]
        logging.info("resumed from step %d in %s", start, workdir)
        if main and (workdir / "metrics.jsonl").exists():  # drop lines logged after the checkpoint
            lines = (workdir / "metrics.jsonl").read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start]
            (workdir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))

    def save(step):
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=grain.checkpoint.CheckpointSave(data_iter),
                                               config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))

    log = _Log(workdir, config, start, enabled=main)
    preview = _Preview(task, modules, config, data_cfg, shardings, replicated)
    last, nonfinite_run, nonfinite_total = {}, 0, 0
    step, compiled, flops = start, None, None
    try:
        with _Stop() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            while step < config.steps:
                host = next(data_iter)
                batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(host[k]))
                         for k in task.batch_keys(config)}
                preview.take(host)
                if compiled is None:  # compile ahead of time: XLA's FLOP count of the step, the compile time
                    tc = time.perf_counter()
                    lowered = step_fn.lower(state, frozen, batch)
                    tl = time.perf_counter()
                    xla_options = cpu.compiler_options(compiler_options(config.get("compiler_options", "")))
                    compiled = lowered.compile(xla_options)
                    flops = _device_flops(compiled)
                    logging.info("step compiled in %.1f s (traced and lowered %.1f s, XLA %.1f s; %s FLOP per step "
                                 "per device)", time.perf_counter() - tc, tl - tc, time.perf_counter() - tl,
                                 f"{flops:.3g}" if flops else "unknown")
                    t0, examples = time.perf_counter(), 0
                state, m = compiled(state, frozen, batch)
                step += 1
                examples += config.global_batch_size
                m = jax.device_get(m)
                log.step()
                if m["nonfinite"]:
                    nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
                    logging.warning("step %d: non-finite loss or gradient; update skipped", step)
                    if nonfinite_run >= config.max_nonfinite:
                        mgr.wait_until_finished()
                        good = mgr.latest_step()
                        where = f"step {good} in {workdir / 'checkpoints'}" if good is not None else "none yet"
                        raise FloatingPointError(f"{nonfinite_run} non-finite steps in a row (max_nonfinite), the "
                                                 f"last at step {step}; last good checkpoint: {where}")
                else:
                    nonfinite_run = 0
                if step % config.log_every == 0 or step == config.steps:
                    dt = time.perf_counter() - t0
                    steps_done = examples // config.global_batch_size
                    last = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
                            "grad_norm": float(m["grad_norm"]), "steps_per_s": steps_done / dt,
                            "examples_per_s": examples / dt, "nonfinite_skipped": nonfinite_total}
                    if flops:
                        last["tflops_per_device"] = flops * steps_done / dt / 1e12
                    log.metrics(last)
                    t0, examples = time.perf_counter(), 0
                if preview.due(step):
                    tp = time.perf_counter()
                    log.samples(step, preview(optim.merge(state.get("ema", state["params"]), frozen)),
                                preview.captions)
                    t0 += time.perf_counter() - tp  # throughput figures leave the preview out
                if step % config.ckpt_every == 0 or step == config.steps or stop.requested:
                    save(step)
                if stop.requested:
                    logging.info("%s: saved step %d, stopping", stop.requested, step)
                    break
    finally:
        log.close()
    mgr.wait_until_finished()
    mgr.close()
    return last
