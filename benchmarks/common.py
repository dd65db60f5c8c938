"""Shared benchmark helpers: interleaved timing, first-call timing, the MLP field, tables."""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------- NFE

def counting(f, counter: list):
    """f that also counts its executed evaluations in counter[0] (NFE runs only).

    A host callback on a stop-gradient'ed time whose (zero) result feeds f's output, so
    XLA keeps one per evaluation actually executed, recomputations by checkpointing
    included; differentiating f differentiates only the original f. Under vmap a
    batched evaluation counts once (vmap_method="expand_dims").
    """
    import jax
    import jax.numpy as jnp

    def tick(t):
        counter[0] += 1
        return np.zeros(np.shape(t), np.asarray(t).dtype)

    def g(z, t, params):
        dz = f(z, t, params)
        t = jax.lax.stop_gradient(jnp.asarray(t, dz.dtype))
        zero = jax.pure_callback(tick, jax.ShapeDtypeStruct(t.shape, t.dtype), t,
                                 vmap_method="expand_dims")
        return dz + 0 * jax.lax.stop_gradient(jnp.sum(zero))

    return g


# ---------------------------------------------------------------- timing


def _block(out):
    import jax

    return jax.block_until_ready(out)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    min_sample_s: float = 0.0,
    block: Callable[[Any], Any] = _block,
) -> dict[str, dict]:
    """Steady-state times of several zero-argument callables, sampled round-robin.

    Each callable is warmed up once, then called `number` times per sample (chosen so
    a sample lasts at least `min_sample_s`), `repeats` samples each: one sample of
    each per round, in a shuffled order, so that load from other processes falls on
    all of them alike (see `paired_ratio`). Every call is blocked on, so a sample is
    latency, not throughput. Returns {name: {median, min, number, samples}}, seconds
    per call.
    """
    numbers = {}
    for name, fn in fns.items():
        block(fn())
        start = time.perf_counter()
        block(fn())
        once = time.perf_counter() - start
        numbers[name] = max(1, math.ceil(min_sample_s / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            number = numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                block(fn())
            samples[name].append((time.perf_counter() - start) / number)
    return {
        name: {"median": statistics.median(s), "min": min(s), "number": numbers[name],
               "samples": s}
        for name, s in samples.items()
    }


def paired_ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time[a] / time[b], both sampled in the same round."""
    return statistics.median(x / y for x, y in zip(times[a]["samples"], times[b]["samples"]))


def first_call(fn: Callable, *args) -> tuple[Callable, dict]:
    """Trace+lower, XLA-compile and run a fresh `jax.jit(fn)` once, timing each part.

    Returns the compiled executable (for steady-state timing) and the times in s.
    """
    import jax

    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    built = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ran = time.perf_counter()
    return compiled, {
        "lower": traced - start,
        "compile": built - traced,
        "run": ran - built,
        "total": ran - start,
    }


# ---------------------------------------------------------------- the MLP vector field

MLP_SIZES = ((3, 64, 2.0), (64, 64, 2.0), (64, 2, 3.0))  # (fan_in, fan_out, gain)
BIAS_STD = 0.01


def mlp_params(seed: int = 0, dtype=np.float32):
    """2(+t)→64→64→2 weights W ~ N(0, gain²/fan_in), biases ~ N(0, 0.01²), as NumPy."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out, gain in MLP_SIZES:
        w = rng.normal(0.0, gain / math.sqrt(fan_in), (fan_in, fan_out)).astype(dtype)
        b = rng.normal(0.0, BIAS_STD, (fan_out,)).astype(dtype)
        params.append((w, b))
    return params


def mlp_field(z, t, params):
    """f(z, t) = MLP(concat(z, t)) with tanh hidden layers; z is (..., 2)."""
    import jax.numpy as jnp

    t = jnp.broadcast_to(jnp.asarray(t, z.dtype), (*z.shape[:-1], 1))
    h = jnp.concatenate([z, t], axis=-1)
    (w1, b1), (w2, b2), (w3, b3) = params
    h = jnp.tanh(h @ w1 + b1)
    h = jnp.tanh(h @ w2 + b2)
    return h @ w3 + b3


# ---------------------------------------------------------------- printing


def torch_mlp_field(params_np, dtype):
    """`mlp_field` as a torch module f(t, z) for z (..., 2), counting its calls in .nfe."""
    import torch

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.from_numpy(np.array(a, dtype)))
                 for layer in params_np for a in layer])
            self.nfe = 0

        def forward(self, t, z):
            self.nfe += 1
            w1, b1, w2, b2, w3, b3 = self.weights
            time = t.reshape([1] * z.dim()).expand(*z.shape[:-1], 1).to(z.dtype)
            h = torch.tanh(torch.cat([z, time], dim=-1) @ w1 + b1)
            h = torch.tanh(h @ w2 + b2)
            return h @ w3 + b3

    return Field()


def fmt(x, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "NO"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return format(float(x), spec)


def ms(seconds) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def us(seconds) -> str:
    return "-" if seconds is None else f"{1e6 * seconds:.1f}"


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def table(title: str, headers: list[str], rows: list[list], note: str = "") -> str:
    """A plain-text table; numbers must already be formatted (anything else is str()'d)."""
    cells = [[h for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r]
                                      for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [title, "-" * len(title)]
    for k, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if j else c.ljust(w)
                               for j, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    if note:
        lines.append(note)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- results


def versions(names) -> dict:
    """{package: installed version, or None}."""
    import importlib.metadata as md

    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def jsonable(x):
    """JSON for NumPy and JAX scalars and arrays; anything else as its string."""
    if hasattr(x, "__array__"):
        x = np.asarray(x)
        return x.item() if x.ndim == 0 else x.tolist()
    return str(x)


def write_results(results: dict, path) -> Path:
    """results as indented JSON at path (its folder made if need be), said on stdout with
    the run's wall time when results["meta"] holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=jsonable))
    wall = results.get("meta", {}).get("wall_s")
    print(f"results written to {path}" + ("" if wall is None else f" ({wall:.0f} s)"))
    return path
