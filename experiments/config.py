"""Typed experiment configs: YAML -> dataclasses, validated before any work.

A config file is a YAML mapping. Its `kind:` picks the experiment module (see
`experiments.registry`), whose `Config` dataclass is the schema. `load_config` reads
the file, applies `--set key.sub=value` overrides (each value parsed as YAML), and
builds the dataclass, refusing with ONE `ConfigError` that names the file and the key:
an unknown key (with the nearest known name), a wrong type, a missing value, a value
out of range, or a file that does not exist.

Field types understood: bool, int, float (ints and strings such as "1e-3" accepted,
since YAML 1.1 reads 1e-3 as a string), str, Literal[...], X | None, list[X],
dict[str, X] and nested dataclasses. A dataclass may define `check(self)` returning
{subkey: message} for its semantic constraints.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(Exception):
    """A config that cannot run: names the file and the key."""

    def __init__(self, file: str | None, key: str | None, message: str):
        self.file, self.key, self.message = file, key, message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        what = f"key '{self.key}': " if self.key else ""
        return f"{where}{what}{self.message}"


# ------------------------------------------------------------------ common sections

def solver_names() -> tuple[str, ...]:
    """The names `solver.method` accepts: those of `jaxode.SOLVERS` (imported on first use,
    so that reading a config does not import JAX)."""
    import jaxode

    return tuple(jaxode.SOLVERS)


def fixed_step(method: str) -> bool:
    """Whether the solver `method` takes fixed steps (and so needs `solver.dt0`)."""
    import jaxode

    return not jaxode.SOLVERS[method]().adaptive


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop."""

    steps: int = 1000
    batch_size: int = 128
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 100
    # Stop (saving a checkpoint) after this many steps in this invocation; the next run
    # resumes. For time-boxed jobs and tests; None runs to `steps`.
    stop_after: int | None = None
    eval_batch_size: int = 512

    def check(self):
        errors = {}
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                errors[name] = f"must be a positive integer, got {getattr(self, name)}"
        if self.eval_every < 0:
            errors["eval_every"] = f"must be >= 0, got {self.eval_every}"
        if self.stop_after is not None and self.stop_after < 1:
            errors["stop_after"] = f"must be a positive integer or null, got {self.stop_after}"
        return errors


@dataclass(kw_only=True)
class OptimConfig:
    """The optimizer (optax) and its learning-rate schedule; one per model."""

    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd (0 for none)
    weight_decay: float = 0.0
    schedule: Literal["constant", "piecewise", "cosine"] = "constant"
    milestones: list[int] = field(default_factory=list)  # piecewise: steps where lr *= decay
    decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = None  # clip each model's gradient to this global norm

    def check(self):
        errors = {}
        if not self.lr > 0:
            errors["lr"] = f"must be positive, got {self.lr}"
        if self.warmup_steps < 0:
            errors["warmup_steps"] = f"must be >= 0, got {self.warmup_steps}"
        if self.milestones != sorted(self.milestones):
            errors["milestones"] = f"must be increasing, got {self.milestones}"
        if self.grad_clip is not None and not self.grad_clip > 0:
            errors["grad_clip"] = f"must be positive or null, got {self.grad_clip}"
        return errors


@dataclass(kw_only=True)
class SolverConfig:
    """ODE solver options handed to the models (`jaxode.odeint` keywords)."""

    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    dt0: float | None = None
    max_steps: int = 1000
    adjoint: Literal["backsolve", "direct"] = "backsolve"
    # The backward solve's own tolerances (backsolve only; None: the forward ones). At
    # the paper's 1e-3 the adjoint's gradient can be far from the discrete solve's.
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None

    def check(self):
        errors = {}
        names = solver_names()
        if self.method not in names:
            errors["method"] = f"unknown solver {self.method!r}; expected one of {names}"
        elif fixed_step(self.method) and self.dt0 is None:
            errors["dt0"] = f"the fixed-step solver {self.method!r} needs a step size dt0"
        if not (self.rtol >= 0 and self.atol >= 0):
            errors["rtol" if self.rtol < 0 else "atol"] = "tolerances must be >= 0"
        if self.max_steps < 1:
            errors["max_steps"] = f"must be a positive integer, got {self.max_steps}"
        for name in ("adjoint_rtol", "adjoint_atol"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.adjoint != "backsolve":
                errors[name] = f"applies to adjoint: backsolve only, not {self.adjoint!r}"
            elif not value > 0:
                errors[name] = f"must be positive or null, got {value}"
        return errors

    def _own_backward_tolerances(self) -> bool:
        return self.adjoint_rtol is not None or self.adjoint_atol is not None

    def adjoint_method(self):
        """`adjoint=` of `jaxode.odeint`: the name, or a `jaxode.Backsolve` with the
        backward tolerances."""
        if not self._own_backward_tolerances():
            return self.adjoint
        import jaxode

        return jaxode.Backsolve(rtol=self.adjoint_rtol, atol=self.adjoint_atol)

    def adjoint_text(self) -> str:
        """The adjoint as a report names it."""
        if not self._own_backward_tolerances():
            return self.adjoint
        return f"{self.adjoint} (backward rtol={self.adjoint_rtol}, atol={self.adjoint_atol})"

    def options(self) -> dict:
        """The keywords of `jaxode.odeint` (and of the jaxode.nn models)."""
        return dict(
            solver=self.method, rtol=self.rtol, atol=self.atol, dt0=self.dt0,
            max_steps=self.max_steps, adjoint=self.adjoint_method(),
        )


@dataclass(kw_only=True)
class DistributedConfig:
    """Multi-host training: `jax.distributed.initialize` with these arguments (None:
    auto-detected on Cloud TPU / SLURM / Open MPI). Single-host multi-device data
    parallelism needs nothing here: it is used whenever jax.device_count() > 1."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None


@dataclass(kw_only=True)
class RunConfig:
    """The keys every experiment shares. Each experiment's `Config` extends this with
    its own `data:` and `model:` sections (and any others)."""

    kind: str
    name: str = ""  # default: the config file's stem; outputs go to runs/<name>
    description: str = ""
    notes: list[str] = field(default_factory=list)  # lines added to summary.md's notes
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    out_dir: str | None = None  # default runs/<name>; the CLI's --out wins
    devices: int | None = None  # data-parallel over the first N devices (None: all)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def check(self):
        if self.devices is not None and self.devices < 1:
            return {"devices": f"must be a positive integer or null, got {self.devices}"}
        return {}


# ------------------------------------------------------------------ loading

def read_yaml(path: str) -> dict:
    """The YAML mapping in `path`, or a ConfigError naming the file."""
    if not os.path.exists(path):
        raise ConfigError(path, None, "config file not found")
    if os.path.isdir(path):
        raise ConfigError(path, None, "is a directory, expected a YAML config file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(path, None, f"invalid YAML{line}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"expected a YAML mapping, got {type(data).__name__}")
    return data


def parse_override(text: str, file: str | None = None) -> tuple[str, Any]:
    """'key.sub=value' -> ('key.sub', value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(file, None, f"--set {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str], file: str | None = None) -> dict:
    """A copy of `data` with each 'key.sub=value' set (intermediate mappings created)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text, file)
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(
                    file, key, f"--set: '{where}' is a {type(child).__name__}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return data


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(tp, value, key: str, file: str | None):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"expected a mapping, got {_show(value)}")
        return build(tp, value, file=file, prefix=key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(file, key, f"missing value: expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, file)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(file, key, f"expected {_type_name(tp)}, got {_show(value)}")
    if value is None:
        raise ConfigError(file, key, f"missing value: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]", file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {_show(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{key}.{k}", file) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, key, f"expected true/false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_float(value)
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
        raise ConfigError(file, key, f"expected an integer, got {_show(value)}")
    if tp is float:
        number = _as_float(value)
        if number is None:
            raise ConfigError(file, key, f"expected a number, got {_show(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(file, key, f"expected a string, got {_show(value)}")
        return value
    raise TypeError(f"config schema: unsupported field type {tp!r} at {key}")


def _as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def build(cls, data: dict, *, file: str | None = None, prefix: str = ""):
    """An instance of the dataclass `cls` from the mapping `data`, validated."""
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"; did you mean '{join(close[0])}'?" if close else ""
            known = ", ".join(fields)
            raise ConfigError(file, join(name), f"unknown key{hint} (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], join(name), file)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                file, join(name), f"missing value: expected {_type_name(hints[name])}"
            )
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        for name, message in (check() or {}).items():
            raise ConfigError(file, join(name), message)
    return obj


def to_dict(obj) -> dict:
    """The plain-data form of a config dataclass (for YAML output and comparisons)."""
    return dataclasses.asdict(obj)


def dump_yaml(obj) -> str:
    """The config as YAML text, every key in schema order (the resolved config.yaml)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested mappings."""
    keys = []
    for name in sorted(set(old) | set(new), key=str):
        key = f"{prefix}.{name}" if prefix else str(name)
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(differences(a, b, key))
        elif a != b:
            keys.append(key)
    return keys
