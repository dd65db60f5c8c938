"""The training loop every experiment shares: outputs, checkpoints, resume, progress,
Ctrl-C, data parallelism.

An experiment (one module per `kind:`) subclasses `Experiment` and supplies the data,
the models, the loss, the evaluation and the report; `run` does the rest:

    runs/<name>/config.yaml      the resolved config
    runs/<name>/metrics.jsonl    one JSON object per logged step ("train") or evaluation
    runs/<name>/checkpoint.json  + checkpoint-<step>.eqx: the latest checkpoint (atomic)
    runs/<name>/*.png            figures
    runs/<name>/summary.md       the result table

Determinism: the batch for step s is a function of (seed, s) and the step's PRNG key is
fold_in(train_key, s), so a run resumed from a checkpoint at step s continues exactly
as if it had never stopped. Several models in one experiment (e.g. ODE-Net and its
baselines) are trained side by side, each with its own optimizer state, on the same
batches; their losses are summed, which leaves each model's gradient its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from . import checkpoint
from .config import ConfigError, RunConfig, differences, dump_yaml, to_dict
from .parallel import DataParallel, initialize_distributed, to_numpy
from .report import MetricsLog, Progress, Report

# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "name", "description", "notes", "out_dir", "train.steps", "train.stop_after",
    "train.log_every",
    "train.eval_every", "train.checkpoint_every", "train.eval_batch_size", "distributed",
    "devices",
)


@dataclasses.dataclass
class Context:
    """What an experiment gets from the runner."""

    cfg: Any
    out_dir: str
    config_file: str | None
    parallel: DataParallel
    dtype: Any  # numpy dtype of the run's floating data

    @property
    def is_main(self) -> bool:
        return self.parallel.is_main

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError naming `key` in this run's config file."""
        return ConfigError(self.config_file, key, message)

    def map_batches(self, fn, arrays: tuple, batch_size: int):
        """fn over `arrays` (leading axes equal) in batches of `batch_size` (rounded to a
        multiple of the device count, the last one padded), sharded like training
        batches; returns fn's outputs as numpy arrays concatenated along axis 0."""
        n = len(arrays[0])
        size = self.parallel.size
        batch_size = max(size, batch_size - batch_size % size)
        outputs = []
        for start in range(0, n, batch_size):
            chunk = [np.asarray(a[start : start + batch_size]) for a in arrays]
            real = len(chunk[0])
            pad = (-real) % size
            if pad:
                chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
            out = fn(*self.parallel.shard_batch(tuple(chunk)))
            outputs.append(jax.tree_util.tree_map(lambda x: to_numpy(x)[:real], out))
        return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outputs)


class Experiment:
    """Base class of an experiment kind. Subclasses set `Config` (a RunConfig
    dataclass: the schema of their YAML) and implement the methods below."""

    Config: type = RunConfig
    title: str = "experiment"
    progress_fields: tuple[str, ...] = ("loss", "nfe")

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    @classmethod
    def needs_x64(cls, cfg) -> bool:
        """Whether the run needs 64-bit floats enabled (even when it trains in 32)."""
        return cfg.dtype == "float64"

    def init_models(self, key) -> dict[str, eqx.Module]:
        """{name: model}: the models to train (their inexact arrays are the params)."""
        raise NotImplementedError

    def batch(self, step: int) -> dict:
        """The training batch for `step` (numpy arrays, leading axis = batch), a
        deterministic function of the seed and the step."""
        raise NotImplementedError

    def loss(self, models: dict, batch: dict, key) -> tuple[jax.Array, dict]:
        """(scalar loss to minimise, {metric: scalar}) for one batch; traced by jit."""
        raise NotImplementedError

    def evaluate(self, models: dict, step: int) -> dict:
        """{metric: float} on held-out data."""
        return {}

    def report(self, models: dict, log: MetricsLog) -> Report:
        """The result table and figures (written into self.ctx.out_dir)."""
        return Report(self.title, [log.split("eval")[-1]] if log.split("eval") else [])


def make_optimizer(cfg, total_steps: int):
    """(optax transformation, learning-rate schedule) from an OptimConfig."""
    if cfg.schedule == "constant":
        schedule = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "piecewise":
        schedule = optax.piecewise_constant_schedule(
            cfg.lr, {int(m): cfg.decay for m in cfg.milestones}
        )
    else:
        schedule = optax.cosine_decay_schedule(cfg.lr, max(1, total_steps - cfg.warmup_steps))
    if cfg.warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), schedule], [cfg.warmup_steps]
        )
    if cfg.name == "adam":
        tx = optax.adam(schedule)
    elif cfg.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    elif cfg.name == "rmsprop":
        tx = optax.rmsprop(schedule)
    else:
        tx = optax.sgd(schedule, momentum=cfg.momentum or None)
    if cfg.weight_decay and cfg.name != "adamw":
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
    if cfg.grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, schedule


def params_of(model):
    """The trainable part of a model: its inexact arrays (equinox.filter)."""
    return eqx.filter(model, eqx.is_inexact_array)


def make_train_step(experiment: Experiment, tx, parallel: DataParallel):
    """jit(step): (models, opt_states, batch, key) -> (models, opt_states, loss, metrics)."""

    @eqx.filter_jit
    def train_step(models, opt_states, batch, key):
        (loss, metrics), grads = eqx.filter_value_and_grad(experiment.loss, has_aux=True)(
            models, batch, key
        )
        new_models, new_states = {}, {}
        for name, model in models.items():
            updates, new_states[name] = tx.update(grads[name], opt_states[name], params_of(model))
            new_models[name] = eqx.apply_updates(model, updates)
        new_models, new_states = parallel.constrain_replicated((new_models, new_states))
        return new_models, new_states, loss, metrics

    return train_step


@dataclasses.dataclass
class RunResult:
    """What `run` returns: the status, the last step, the output directory and, when complete,
    the report and the summary's path."""

    status: str  # "complete", "stopped" (train.stop_after) or "interrupted" (Ctrl-C)
    step: int
    out_dir: str
    report: Report | None = None
    summary_path: str | None = None


class _StopFlag:
    """First SIGINT: finish the current step, checkpoint, stop. Second: KeyboardInterrupt."""

    def __init__(self, bar=None):
        self.requested = False
        self._previous = None
        self._bar = bar

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._bar is not None:
            self._bar.message("stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def resolve_out_dir(cfg, out_dir: str | None) -> str:
    """The run's output directory: --out, else the config's out_dir, else runs/<name>."""
    return out_dir or cfg.out_dir or os.path.join("runs", cfg.name)


def run(experiment_cls, cfg, *, config_file: str | None = None, out_dir: str | None = None,
        stream=None, progress: bool = True, overrides: list[str] | tuple = ()) -> RunResult:
    """Train and evaluate one experiment, resuming from out_dir's checkpoint if any.

    Args:
        experiment_cls: the `Experiment` subclass of the config's `kind:`.
        cfg: the validated config (from `registry.load_config`).
        config_file: the YAML file it came from, named in errors and in the summary.
        out_dir: where the outputs go (default `cfg.out_dir`, else `runs/<name>`).
        stream: where progress and the result table are printed (default stdout).
        progress: show the progress bar (a terminal) or log lines (otherwise).
        overrides: the `--set key=value` strings applied to the file, listed in
            `summary.md` (they are already part of `cfg`).

    Returns:
        A `RunResult`: "complete", "stopped" (`train.stop_after`) or "interrupted".
    """
    stream = sys.stdout if stream is None else stream
    initialize_distributed(cfg.distributed)
    previous_x64 = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", experiment_cls.needs_x64(cfg))
    try:
        return _run(experiment_cls, cfg, config_file, resolve_out_dir(cfg, out_dir), stream,
                    progress, list(overrides))
    finally:
        jax.config.update("jax_enable_x64", previous_x64)


def _check_resumable(cfg, out_dir: str, config_file: str | None) -> None:
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        old = yaml.safe_load(f) or {}
    changed = [
        key for key in differences(old, to_dict(cfg))
        if not any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)
    ]
    if changed:
        raise ConfigError(
            config_file, changed[0],
            f"differs from the run being resumed in {out_dir} (changed: {', '.join(changed)}); "
            "use --out DIR for a new run or delete that directory",
        )


def _run(experiment_cls, cfg, config_file, out_dir, stream, show_progress,
         overrides) -> RunResult:
    parallel = _data_parallel(cfg, config_file)
    main = parallel.is_main
    say = (lambda text: print(text, file=stream, flush=True)) if main else (lambda text: None)
    meta = checkpoint.read_meta(out_dir)
    if meta is not None:
        _check_resumable(cfg, out_dir, config_file)
    ctx = Context(cfg=cfg, out_dir=out_dir, config_file=config_file, parallel=parallel,
                  dtype=np.dtype(cfg.dtype))
    init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    experiment, tx, schedule, train_step = _prepare(experiment_cls, cfg, ctx)
    models = experiment.init_models(init_key)
    names = list(models)  # the experiment's order (jax's tree functions sort dict keys)
    books = _Books(cfg, out_dir, parallel, train_key, schedule, models,
                   {name: tx.init(params_of(m)) for name, m in models.items()})
    if meta is not None:
        books.resume(config_file)
        say(f"resuming {cfg.name} from step {books.step} ({out_dir})")
    if main:
        os.makedirs(out_dir, exist_ok=True)
        checkpoint.write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(cfg))
    books.open_log(resumed=meta is not None)
    books.models, books.opt_states = parallel.replicate((books.models, books.opt_states))

    bar = Progress(cfg.train.steps, books.step, experiment.progress_fields,
                   enabled=show_progress and main, stream=stream, models=names)
    status = _train(experiment, train_step, books, bar)
    step, total = books.step, cfg.train.steps
    if status == "interrupted":
        say(f"interrupted at step {step}/{total}; checkpoint saved in {out_dir}; "
            "run the same command again to resume")
        return RunResult("interrupted", step, out_dir)
    if step < total:
        say(f"stopped after step {step}/{total} (train.stop_after); checkpoint saved in "
            f"{out_dir}; run the same command again to resume")
        return RunResult("stopped", step, out_dir)
    return _complete(experiment, books, ctx, say, overrides)


def _data_parallel(cfg, config_file) -> DataParallel:
    """The devices of the run (`devices:`), checked against the batch size."""
    devices = jax.devices()
    if cfg.devices is not None:
        if cfg.devices > len(devices):
            raise ConfigError(config_file, "devices",
                              f"{cfg.devices} requested but only {len(devices)} available")
        devices = devices[: cfg.devices]
    parallel = DataParallel(devices)
    if cfg.train.batch_size % parallel.size:
        raise ConfigError(
            config_file, "train.batch_size",
            f"{cfg.train.batch_size} is not a multiple of the {parallel.size} devices",
        )
    return parallel


def _prepare(experiment_cls, cfg, ctx):
    """(experiment, tx, schedule, train_step): from the last run in this process when it
    was the same experiment (an experiment is a pure function of its config), reusing its
    data and its compiled functions."""
    warm_key = (experiment_cls, _signature(cfg), tuple(d.id for d in ctx.parallel.devices),
                bool(jax.config.read("jax_enable_x64")))
    if _WARM and _WARM[0] == warm_key:
        experiment, tx, schedule, train_step = _WARM[1:]
        experiment.cfg, experiment.ctx = cfg, ctx
        return experiment, tx, schedule, train_step
    _WARM.clear()
    experiment = experiment_cls(cfg, ctx)  # loads the data: config errors surface here
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    train_step = make_train_step(experiment, tx, ctx.parallel)
    _WARM.extend([warm_key, experiment, tx, schedule, train_step])
    return experiment, tx, schedule, train_step


class _Books:
    """A run's training state (models, optimizer states, step, training time) and its
    books: the metrics not yet logged, the log, the checkpoints."""

    def __init__(self, cfg, out_dir, parallel, train_key, schedule, models, opt_states):
        self.cfg, self.out_dir, self.parallel = cfg, out_dir, parallel
        self.train_key, self.schedule = train_key, schedule
        self.models, self.opt_states = models, opt_states
        self.step, self.train_time = 0, 0.0
        self.pending = []  # host values of the steps since the last log line
        self.unlogged = []  # device values of the steps not yet moved to `pending`
        self.log = None

    def resume(self, config_file) -> None:
        """The state of the checkpoint in out_dir."""
        (self.models, self.opt_states), meta = checkpoint.load(
            self.out_dir, (self.models, self.opt_states))
        self.step, self.train_time = int(meta["step"]), float(meta.get("train_time", 0.0))
        self.pending = list(meta.get("pending", []))
        if meta.get("rng") is not None and meta["rng"] != _key_list(self.train_key):
            raise ConfigError(config_file, "seed",
                              f"does not match the checkpoint in {self.out_dir}")

    def open_log(self, resumed: bool) -> None:
        self.log = MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"),
                              self.step if resumed else None, enabled=self.parallel.is_main)

    def _collect(self) -> None:
        self.pending.extend(_to_floats(self.unlogged))
        self.unlogged.clear()

    def save(self) -> None:
        self._collect()
        if self.parallel.is_main:
            cfg = self.cfg
            checkpoint.save(self.out_dir, self.step, (self.models, self.opt_states), {
                "rng": _key_list(self.train_key), "seed": cfg.seed,
                "train_time": self.train_time, "pending": self.pending, "kind": cfg.kind,
                "total_steps": cfg.train.steps, "devices": self.parallel.size,
                "jax": jax.__version__,
            })

    def flush_log(self) -> dict:
        """Log the mean of the pending steps' metrics as one "train" record."""
        self._collect()
        record = {"step": self.step, "split": "train"}
        for name in self.pending[0] if self.pending else ():
            record[name] = float(np.mean([p[name] for p in self.pending]))
        record["lr"] = float(self.schedule(self.step - 1))
        record["train_time"] = round(self.train_time, 3)
        self.pending.clear()
        self.log.write(record)
        return record

    def evaluate(self, experiment) -> None:
        self.log.write({"step": self.step, "split": "eval",
                        **_floats(experiment.evaluate(self.models, self.step))})


def _train(experiment, train_step, books: _Books, bar) -> str:
    """Train up to `train.steps` (or `train.stop_after` more): "complete", or
    "interrupted" (Ctrl-C: the checkpoint is saved after the current step)."""
    cfg, parallel = books.cfg, books.parallel
    total, stop_after = cfg.train.steps, cfg.train.stop_after
    target = total if stop_after is None else min(total, books.step + stop_after)
    try:
        with _StopFlag(bar) as stop:
            if books.step < target:
                bar.message(f"training {cfg.name}: {', '.join(bar.models)} for {total} steps "
                            f"from step {books.step}; the first step includes compiling it")
            first, clock = True, time.perf_counter()
            while books.step < target:
                batch = parallel.shard_batch(experiment.batch(books.step))
                key = jax.random.fold_in(books.train_key, books.step)
                books.models, books.opt_states, loss, metrics = train_step(
                    books.models, books.opt_states, batch, key)
                books.unlogged.append({"loss": loss, **metrics})
                books.step += 1
                step, now = books.step, time.perf_counter()
                books.train_time += now - clock
                if step % cfg.train.log_every == 0 or step == total:
                    bar.log(step, books.flush_log())
                elif first:  # shown, not logged: the first line comes after one step
                    bar.log(step, _to_floats(books.unlogged[-1:])[0])
                first = False
                bar.advance(step)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                    books.evaluate(experiment)
                if step % cfg.train.checkpoint_every == 0 or step == target or stop.requested:
                    books.save()
                if stop.requested:
                    return "interrupted"
                clock = time.perf_counter()  # evaluation and saving are not training time
    except KeyboardInterrupt:
        books.save()
        return "interrupted"
    finally:
        bar.close()
    return "complete"


def _complete(experiment, books: _Books, ctx, say, overrides) -> RunResult:
    """The final evaluation, the report and the summary of a complete run."""
    cfg, step, main = ctx.cfg, books.step, ctx.is_main
    if not any(r.get("step") == step for r in books.log.split("eval")):
        books.evaluate(experiment)
    if not main:  # every process runs the report's computations; only process 0 keeps files
        import tempfile

        experiment.ctx = dataclasses.replace(ctx, out_dir=tempfile.mkdtemp(prefix="jaxode-"))
    report = experiment.report(books.models, books.log)
    report.notes = list(report.notes) + list(cfg.notes)
    summary = None
    if main:
        header = {"config": ctx.config_file or "-",
                  "overrides": " ".join(f"`--set {o}`" for o in overrides) or "none",
                  "kind": cfg.kind, "steps": step, "seed": cfg.seed,
                  "devices": ctx.parallel.size, "train time (s)": round(books.train_time, 1),
                  "outputs": ctx.out_dir}
        summary = report.write(ctx.out_dir, header)
        say(f"\n{report.title} ({cfg.name}, {step} steps, {books.train_time:.1f} s training)\n")
        say(report.table())
        say(f"\nsummary: {summary}")
    return RunResult("complete", step, ctx.out_dir, report if main else None, summary)


# Keys that do not change what the experiment computes (only how long and how often).
_NOT_COMPUTATION = ("name", "description", "notes", "out_dir", "train.stop_after",
                    "train.log_every",
                    "train.eval_every", "train.checkpoint_every", "distributed")
_WARM: list = []  # [key, experiment, tx, schedule, train_step] of the last run


def _signature(cfg) -> str:
    data = to_dict(cfg)
    for key in _NOT_COMPUTATION:
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return json.dumps(data, sort_keys=True, default=str)


def _key_list(key) -> list[int]:
    return [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()]


def _to_floats(values: list[dict]) -> list[dict]:
    host = jax.device_get(values)
    return [{k: float(np.mean(v)) for k, v in d.items()} for d in host]


def _floats(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float, np.number, jnp.ndarray)) else v)
            for k, v in metrics.items()}
