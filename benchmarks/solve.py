"""Forward-solve benchmarks: jaxode against diffrax, jax.experimental.ode and torchdiffeq.

    PYTHONPATH=. python -m benchmarks.solve [--section a b c] [--quick]

(a) a neural-ODE workload (MLP field, batch 512, float32) in "joint" and "vmap" batch
    modes: NFE, steady-state time, first-call (trace + compile + run) time;
(b) work-precision on four classic problems in float64: error at the final time
    against scipy's DOP853 at 1e-13, NFE, time per solve (jax.experimental.ode's time
    beside dopri5's);
(c) overhead of the solver loop: solve time / (NFE x time of one evaluation of f);
(d) section (b) again, with XLA:CPU's small-loop path opened to every library
    (`SMALL_LOOP_FLAGS`): a while loop whose one iteration touches fewer bytes than a
    threshold (1 KiB by default) is compiled into one function instead of running its
    body kernel by kernel, which is what a 2-4 dimensional solve's steps cost here;
(e) section (b) in float32 at rtol = atol = 1e-5 and 1e-6, default flags (half the bytes
    a step: which loops are one function changes).

Sections run in child processes grouped by precision and XLA flags ((a)+(c)+(e) float32,
(b) float64, (d) float64 with the flag), so settings never mix. Tables go to stdout,
everything to bench_results/solve.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .common import (
    BIAS_STD,
    counting,
    first_call,
    fmt,
    jsonable,
    mlp_field,
    mlp_params,
    ms,
    paired_ratio,
    ratio,
    table,
    time_interleaved,
    us,
    versions,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("a", "b", "c", "d", "e")
GROUPS = {"float32": ("a", "c", "e"), "float64": ("b",), "float64-small-loop": ("d",)}
# What a user of small systems can set (docs/guides/solvers.md): 16 KiB takes in every
# classic problem's loop here, dopri8's on four states included, and no neural-ODE loop.
SMALL_LOOP_FLAGS = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=16384"
GROUP_FLAGS = {"float64-small-loop": SMALL_LOOP_FLAGS}

# (a) and (c): the neural-ODE workload.
RTOL_A, ATOL_A = 1e-5, 1e-7
BATCH, NUM_TS, T_END = 512, 50, 5.0
MAX_STEPS_A = 4096
MODES = ("joint", "vmap")
# diffrax 0.7.2's dt0=None starts every solve with dt = 0.01: inside diffeqsolve its
# first-step selection sees the WrapTerm around the ODETerm and falls back to its SDE
# default, so its program holds no code before the loop. "jaxode dt0=0.01" starts the same
# way: the like-for-like row (the targets stay on jaxode's automatic first step).
JAXODE_DT0 = "jaxode dt0=0.01"
JODE = "jax.experimental.ode"
JAX_SYSTEMS = ("jaxode", JAXODE_DT0, "diffrax", JODE)

# (b): work-precision.
TOLS_B = (1e-4, 1e-6, 1e-8, 1e-10)
# (e): float32. Looser, the Arenstorf orbit's close approaches defeat float32 time: at
# 1e-4 diffrax's dopri5 runs out of 100,000 steps and jaxode's tsit5 underflows its step.
TOLS_E = (1e-5, 1e-6)
METHODS_B = ("dopri5", "tsit5", "dopri8")
MAX_STEPS_B = 100_000


def config(quick: bool) -> dict:
    if quick:
        return dict(quick=True, repeats_a=3, compile_repeats=1, repeats_b=3,
                    min_sample_b=0.005, tols_b=(1e-4, 1e-8), tols_e=(1e-5,),
                    outputs_b=(10, 1_000), repeats_c=3, evals_c=200)
    # Many short rounds: a burst of load from other processes then spoils few of them.
    return dict(quick=False, repeats_a=15, compile_repeats=3, repeats_b=21,
                min_sample_b=0.01, tols_b=TOLS_B, tols_e=TOLS_E, outputs_b=(10, 1_000, 5_000),
                repeats_c=15, evals_c=1000)


# ================================================================ (a) and (c)


def _workload():
    import jax.numpy as jnp

    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in mlp_params(0)]
    rng = np.random.default_rng(1)
    z0 = jnp.asarray(rng.standard_normal((BATCH, 2)).astype(np.float32))
    ts = jnp.linspace(0.0, T_END, NUM_TS, dtype=jnp.float32)
    return params, z0, ts


def _mlp_solver(system: str, mode: str, field, ts, with_stats: bool):
    """fn(z0, params) -> zs (or stats) for one JAX system and batch mode."""
    import diffrax
    import jax
    import jax.experimental.ode as jode

    import jaxode

    if system.startswith("jaxode"):
        dt0 = 0.01 if system == JAXODE_DT0 else None
        if with_stats:
            def fn(z0, params):
                return jaxode.solve(field, z0, ts, params, rtol=RTOL_A, atol=ATOL_A, dt0=dt0,
                                    max_steps=MAX_STEPS_A, dense=False).stats
        else:
            def fn(z0, params):
                return jaxode.odeint(field, z0, ts, params, rtol=RTOL_A, atol=ATOL_A, dt0=dt0,
                                     max_steps=MAX_STEPS_A)
    elif system == "diffrax":
        def fn(z0, params):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, args: field(y, t, args)),
                diffrax.Dopri5(), ts[0], ts[-1], None, z0, args=params,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(rtol=RTOL_A, atol=ATOL_A),
                max_steps=MAX_STEPS_A,
            )
            return dict(sol.stats) if with_stats else sol.ys
    else:
        def fn(z0, params):
            zs = jode.odeint(field, z0, ts, params, rtol=RTOL_A, atol=ATOL_A)
            return {"zs": zs} if with_stats else zs
    return fn if mode == "joint" else jax.vmap(fn, in_axes=(0, None))


def _build_mlp_systems(cache: dict, keys, compile_repeats: int) -> None:
    """Compile (timing first calls) and count the NFE of (system, mode) pairs; memoised.

    The first-call samples are taken round-robin over the systems, each from a fresh
    closure so that no tracing or compilation cache is reused.
    """
    import jax

    keys = [k for k in keys if k not in cache]
    if not keys:
        return
    params, z0, ts = _workload()
    firsts: dict = {k: [] for k in keys}
    compiled = {}
    for _ in range(compile_repeats):
        for system, mode in keys:
            field = lambda z, t, p: mlp_field(z, t, p)  # noqa: E731
            compiled[(system, mode)], times = first_call(
                _mlp_solver(system, mode, field, ts, False), z0, params)
            firsts[(system, mode)].append(times)
    for key in keys:
        system, mode = key
        counter = [0]
        stats_fn = jax.jit(_mlp_solver(system, mode, counting(mlp_field, counter), ts, True))
        jax.block_until_ready(stats_fn(z0, params))
        counter[0] = 0
        stats = jax.device_get(jax.block_until_ready(stats_fn(z0, params)))
        samples = firsts[key]
        entry = {"fn": compiled[key], "args": (z0, params), "nfe": counter[0],
                 "first": {k: statistics.median(t[k] for t in samples) for k in samples[0]},
                 "compile_samples": [t["lower"] + t["compile"] for t in samples]}
        if system.startswith("jaxode"):
            entry["nfe_stats_max"] = int(np.max(stats["nfe"]))
            entry["nfe_stats_mean"] = float(np.mean(stats["nfe"]))
        if system.startswith("jaxode") or system == "diffrax":
            entry["steps_max"] = int(np.max(stats["num_steps"]))
            entry["steps_mean"] = float(np.mean(stats["num_steps"]))
            rejected = stats.get("num_rejected", stats.get("num_rejected_steps"))
            entry["rejected_max"] = int(np.max(rejected))
        cache[key] = entry


def _compile_ratio(a: dict, b: dict) -> float:
    """Median over the first-call rounds of compile time a / b (paired by round)."""
    return statistics.median(x / y for x, y in zip(a["compile_samples"], b["compile_samples"]))


def _torch_system(params_np, z0_np, ts_np):
    """Runners for torchdiffeq (joint mode only), the NFE and the first-call time."""
    import time

    import torch
    import torchdiffeq

    class Field:
        def __init__(self):
            self.layers = [(torch.tensor(np.array(w)), torch.tensor(np.array(b)))
                           for w, b in params_np]
            self.nfe = 0

        def __call__(self, t, z):
            self.nfe += 1
            h = torch.cat([z, t.reshape(1, 1).expand(z.shape[0], 1).to(z.dtype)], dim=-1)
            (w1, b1), (w2, b2), (w3, b3) = self.layers
            h = torch.tanh(h @ w1 + b1)
            h = torch.tanh(h @ w2 + b2)
            return h @ w3 + b3

    field = Field()
    z0, ts = torch.tensor(np.array(z0_np)), torch.tensor(np.array(ts_np))
    default_threads = torch.get_num_threads()

    def runner(threads):
        def run():
            torch.set_num_threads(threads)
            with torch.no_grad():
                torchdiffeq.odeint(field, z0, ts, rtol=RTOL_A, atol=ATOL_A, method="dopri5")

        return run

    torch.set_num_threads(1)
    start = time.perf_counter()
    field.nfe = 0
    runner(1)()
    first = time.perf_counter() - start
    nfe = field.nfe
    return {"1": runner(1), str(default_threads): runner(default_threads)}, nfe, first


def section_a(cfg: dict, cache: dict) -> dict:
    params, z0, ts = _workload()
    keys = [(system, mode) for mode in MODES for system in JAX_SYSTEMS]
    _build_mlp_systems(cache, keys, cfg["compile_repeats"])
    timed = {f"{s}/{m}": (lambda e=cache[(s, m)]: e["fn"](*e["args"])) for s, m in keys}
    times = time_interleaved(timed, cfg["repeats_a"])
    # torch runs in its own block: its OpenMP threads spin after each call and would
    # slow down whichever JAX call came next.
    runners, torch_nfe, torch_first = _torch_system(
        [(np.asarray(w), np.asarray(b)) for w, b in params], np.asarray(z0), np.asarray(ts)
    )
    times.update(time_interleaved(
        {f"torchdiffeq-{n}t/joint": run for n, run in runners.items()}, cfg["repeats_a"]))

    rows = []
    for key in [*keys, *(("torchdiffeq", f"{n}t") for n in runners)]:
        system, mode = key
        entry = cache.get(key)
        if entry is None:  # torch
            name = f"torchdiffeq ({mode[:-1]} thr)"
            t_key, mode = f"torchdiffeq-{mode}/joint", "joint"
        else:
            t_key, name = f"{system}/{mode}", system
        jx = cache[("jaxode", mode)]
        first = entry["first"] if entry else None
        rows.append({
            "system": name, "mode": mode,
            "steps_max": entry.get("steps_max") if entry else None,
            "nfe_executed": entry["nfe"] if entry else torch_nfe,
            "steady_s": times[t_key]["median"], "steady_min_s": times[t_key]["min"],
            "lower_s": first["lower"] if first else None,
            "compile_s": first["lower"] + first["compile"] if first else None,
            "first_call_s": first["total"] if first else
            (torch_first if name.startswith("torchdiffeq (1 ") else None),
            # Paired within rounds where both were sampled together (all but torch).
            "jaxode_over_this_time": (
                paired_ratio(times, f"jaxode/{mode}", t_key) if entry else
                ratio(times[f"jaxode/{mode}"]["median"], times[t_key]["median"])),
            "jaxode_over_this_compile": _compile_ratio(jx, entry) if entry else None,
            **({k: entry[k] for k in entry if k.startswith(("nfe_stats", "steps_", "rej"))}
               if entry else {}),
        })

    printed = [[r["system"], r["mode"], fmt(r["steps_max"]), fmt(r["nfe_executed"]),
                ms(r["steady_s"]), fmt(r["lower_s"], ".2f"), fmt(r["compile_s"], ".2f"),
                fmt(r["first_call_s"], ".2f"), fmt(r["jaxode_over_this_time"], ".2f"),
                fmt(r["jaxode_over_this_compile"], ".2f")] for r in rows]
    jx = {m: cache[("jaxode", m)] for m in MODES}
    note = (
        f"steps: max over lanes; NFE: evaluations of f executed (counted; under vmap one "
        f"batched call counts once).\n"
        f"jaxode stats nfe, max over lanes: joint {jx['joint']['nfe_stats_max']}, vmap "
        f"{jx['vmap']['nfe_stats_max']} (mean per lane {jx['vmap']['nfe_stats_mean']:.0f}).\n"
        f"compile = trace/lower + XLA compile; 1st call = compile + first run; medians of "
        f"{cfg['compile_repeats']} fresh closures.\nsteady: median of {cfg['repeats_a']} "
        f"rounds; jaxode/this: median over rounds of the paired ratio.\n"
        f"torchdiffeq: no vmap (joint only), timed in a block of its own (so its ratio is "
        f"of medians); its 1st call\nis the first call in the process (1 thread)."
    )
    print(table(
        f"(a) MLP field 2(+t)-64-64-2, batch {BATCH}, {NUM_TS} outputs on [0, {T_END:g}], "
        f"dopri5 rtol={RTOL_A:g} atol={ATOL_A:g}, float32",
        ["system", "mode", "steps", "NFE", "steady ms", "lower s", "compile s", "1st call s",
         "jaxode/this time", "jaxode/this compile"],
        printed, note))

    targets = []
    for mode in MODES:
        j, d = cache[("jaxode", mode)], cache[("diffrax", mode)]
        t = paired_ratio(times, f"jaxode/{mode}", f"diffrax/{mode}")
        c = _compile_ratio(j, d)
        n = ratio(j["nfe"], d["nfe"])
        targets += [
            {"target": f"{mode}: steady time <= 1.0x diffrax", "value": t, "met": t <= 1.0},
            {"target": f"{mode}: compile time <= 0.5x diffrax", "value": c, "met": c <= 0.5},
            {"target": f"{mode}: NFE within 5% of diffrax", "value": n,
             "met": abs(n - 1) <= 0.05},
        ]
    _print_targets("(a) targets", targets)
    same_start = {mode: {
        "time": paired_ratio(times, f"{JAXODE_DT0}/{mode}", f"diffrax/{mode}"),
        "compile": _compile_ratio(cache[(JAXODE_DT0, mode)], cache[("diffrax", mode)]),
    } for mode in MODES}
    print("(a) with diffrax's first step (dt0 = 0.01, what its dt0=None gives): jaxode/diffrax "
          + ", ".join(f"{m} time {r['time']:.3f} compile {r['compile']:.3f}"
                      for m, r in same_start.items()) + "\n", flush=True)
    return {"rows": rows, "targets": targets, "same_first_step": same_start,
            "settings": {"rtol": RTOL_A, "atol": ATOL_A, "batch": BATCH, "num_ts": NUM_TS,
                         "t_end": T_END, "bias_std": BIAS_STD, "max_steps": MAX_STEPS_A}}


def _print_targets(title, targets):
    print(table(title, ["target", "jaxode/diffrax", "met"],
                [[t["target"], fmt(t["value"], ".3f"), fmt(t["met"])] for t in targets]))


# Issue 14's targets: the joint solve within 5% of its evaluations' bare cost, per-sample
# (jax.vmap) within 15%.
OVERHEAD_TARGETS = {"joint": 1.05, "vmap": 1.15}


def section_c(cfg: dict, cache: dict) -> dict:
    import jax
    from jax import lax

    params, z0, ts = _workload()
    n = cfg["evals_c"]
    timed, loops = {}, {}
    for mode in MODES:
        f = mlp_field if mode == "joint" else jax.vmap(mlp_field, in_axes=(0, None, None))

        def chain(z, p, f=f):
            # N evaluations, each feeding the next, as a stage update would.
            return lax.fori_loop(0, n, lambda i, z: z + 1e-3 * f(z, 0.005 * i, p), z)

        loops[mode] = jax.jit(chain).lower(z0, params).compile()
        timed[f"eval/{mode}"] = lambda loop=loops[mode]: loop(z0, params)
        _build_mlp_systems(cache, [("jaxode", mode), ("diffrax", mode)], 1)
        for system in ("jaxode", "diffrax"):
            entry = cache[(system, mode)]
            timed[f"{system}/{mode}"] = lambda e=entry: e["fn"](*e["args"])
    times = time_interleaved(timed, cfg["repeats_c"])

    rows, targets = [], []
    for mode in MODES:
        t_eval = times[f"eval/{mode}"]["median"] / n
        for system in ("jaxode", "diffrax"):
            nfe = cache[(system, mode)]["nfe"]
            solve = times[f"{system}/{mode}"]["median"]
            # Paired: each round's solve against the same round's evaluation loop.
            over = paired_ratio(times, f"{system}/{mode}", f"eval/{mode}") * n / nfe
            rows.append({"system": system, "mode": mode, "nfe_executed": nfe,
                         "eval_s": t_eval, "ideal_s": nfe * t_eval, "solve_s": solve,
                         "overhead": over})
        over, bound = rows[-2]["overhead"], OVERHEAD_TARGETS[mode]
        targets.append({"target": f"{mode}: jaxode overhead <= {bound}", "value": over,
                        "met": over <= bound})
    print(table(
        "(c) loop overhead: solve time / (NFE x one batched evaluation of f)",
        ["system", "mode", "NFE", "f eval us", "NFE x eval ms", "solve ms", "overhead"],
        [[r["system"], r["mode"], fmt(r["nfe_executed"]), us(r["eval_s"]), ms(r["ideal_s"]),
          ms(r["solve_s"]), fmt(r["overhead"], ".2f")] for r in rows],
        f"f eval: lax.fori_loop of {n} chained evaluations z <- z + 1e-3 f(z, t) on the "
        f"({BATCH}, 2) batch (vmap mode: jax.vmap(f)); medians of {cfg['repeats_c']} "
        f"rounds with the solves;\noverhead: median over rounds of solve / (NFE x eval)."))
    print(table("(c) targets", ["target", "value", "met"],
                [[t["target"], fmt(t["value"], ".3f"), fmt(t["met"])] for t in targets]))
    return {"rows": rows, "targets": targets, "evals_per_loop": n}


# ================================================================ (b)


def lotka_volterra(y, t, xp):
    x, v = y[0], y[1]
    return xp.stack([1.5 * x - x * v, -3.0 * v + x * v])


def van_der_pol(y, t, xp):
    x, v = y[0], y[1]
    return xp.stack([v, 1.0 * (1 - x**2) * v - x])


ARENSTORF_MU = 0.012277471


def arenstorf(y, t, xp):
    x, vx, yy, vy = y[0], y[1], y[2], y[3]
    mu, nu = ARENSTORF_MU, 1 - ARENSTORF_MU
    d1 = ((x + mu) ** 2 + yy**2) ** 1.5
    d2 = ((x - nu) ** 2 + yy**2) ** 1.5
    ax = x + 2 * vy - nu * (x + mu) / d1 - mu * (x - nu) / d2
    ay = yy - 2 * vx - nu * yy / d1 - mu * yy / d2
    return xp.stack([vx, ax, vy, ay])


def kepler(y, t, xp):
    q1, q2, p1, p2 = y[0], y[1], y[2], y[3]
    r3 = (q1**2 + q2**2) ** 1.5
    return xp.stack([p1, p2, -q1 / r3, -q2 / r3])


_E = 0.5
PROBLEMS_B = {
    "lotka-volterra": (lotka_volterra, [1.0, 1.0], 10.0),
    "van der pol mu=1": (van_der_pol, [2.0, 0.0], 20.0),
    "arenstorf": (arenstorf, [0.994, 0.0, 0.0, -2.00158510637908252240537862224],
                  17.0652165601579625588917206249),
    "kepler e=0.5": (kepler, [1 - _E, 0.0, 0.0, math.sqrt((1 + _E) / (1 - _E))],
                     2 * math.pi),
}


def _b_solver(system, method, problem, field):
    """fn(y0, rtol, atol) -> (y(T), nfe or num_steps) for one system and method."""
    import diffrax
    import jax.numpy as jnp

    import jaxode

    _, _, t_end = PROBLEMS_B[problem]
    if system == JODE:  # dopri5 only; its tolerances must be Python floats (static)
        import jax.experimental.ode as jode

        ts = jnp.array([0.0, t_end])

        def fn(y0, rtol, atol):
            return jode.odeint(field, y0, ts, None, rtol=rtol, atol=atol,
                               mxstep=MAX_STEPS_B)[-1], None

        return fn
    if system == "jaxode":
        ts = jnp.array([0.0, t_end])

        def fn(y0, rtol, atol):
            sol = jaxode.solve(field, y0, ts, None, solver=method, rtol=rtol, atol=atol,
                               max_steps=MAX_STEPS_B, dense=False)
            return sol.zs[-1], sol.stats["num_steps"]

        return fn
    solver = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "dopri8": diffrax.Dopri8}[method]

    def fn(y0, rtol, atol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: field(y, t, args)), solver(), 0.0, t_end, None,
            y0, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=MAX_STEPS_B,
        )
        return sol.ys[-1], sol.stats["num_steps"]

    return fn


def _loop_is_one_function(jitted, *args) -> bool:
    """Whether XLA:CPU compiled the solve's main while loop into one function (its
    entry computation then holds no while)."""
    text = jitted.lower(*args).compile().as_text()
    return " while(" not in text.split("\nENTRY ")[1]


def _b_systems(method: str) -> tuple:
    return ("jaxode", "diffrax", JODE) if method == "dopri5" else ("jaxode", "diffrax")


def _b_rows(cfg, problem, method, f, y0, ref, tols, real) -> list:
    """One problem and method at every tolerance: each system's error, NFE, steps and
    compile time, and their times from one interleaved block."""
    import jax
    import jax.numpy as jnp

    rows = []
    timed, found = {}, {}
    systems = _b_systems(method)
    for system in systems:
        field = lambda y, t, p, f=f: f(y, t, jnp)  # noqa: E731
        solver = _b_solver(system, method, problem, field)
        counter = [0]
        counted = _b_solver(system, method, problem, counting(field, counter))
        if system == JODE:  # static tolerances: one program per tolerance
            programs = {tol: (lambda y, s=solver, tol=tol: s(y, tol, tol)[0], (y0,))
                        for tol in tols}
            counts = {tol: (lambda y, s=counted, tol=tol: s(y, tol, tol), (y0,))
                      for tol in tols}
        else:
            tol_args = {tol: (y0, jnp.asarray(tol, real), jnp.asarray(tol, real))
                        for tol in tols}
            final = lambda *a, s=solver: s(*a)[0]  # noqa: E731  (one program, all tols)
            programs = {tol: (final, tol_args[tol]) for tol in tols}
            counts = {tol: (counted, tol_args[tol]) for tol in tols}
        fn0, args0 = programs[tols[0]]
        _, first = first_call(fn0, *args0)
        # Timed through jax.jit: calling the compiled executable itself costs
        # 25-90 us more a call here, which would pull small problems' ratios to 1.
        jitted = {fn: jax.jit(fn) for fn in {fn for fn, _ in programs.values()}}
        counted_jit = {fn: jax.jit(fn) for fn in {fn for fn, _ in counts.values()}}
        one_function = _loop_is_one_function(jitted[fn0], *args0)
        for tol in tols:
            fn, args = programs[tol]
            y_end = np.asarray(jitted[fn](*args))
            counter[0] = 0
            cfn, cargs = counts[tol]
            _, steps = jax.block_until_ready(counted_jit[cfn](*cargs))
            found[(system, tol)] = {
                "error": float(np.max(np.abs(y_end - ref))),
                "nfe": counter[0], "steps": None if steps is None else int(steps),
                "compile_s": first["lower"] + first["compile"],
                "loop_one_function": one_function,
            }
            timed[f"{system}/{tol}"] = lambda c=jitted[fn], a=args: c(*a)
    times = time_interleaved(timed, cfg["repeats_b"], cfg["min_sample_b"])
    for tol in tols:
        j, d = found[("jaxode", tol)], found[("diffrax", tol)]
        row = {
            "problem": problem, "method": method, "tol": tol,
            "error_ratio": ratio(j["error"], d["error"]),
            "time_ratio": paired_ratio(times, f"jaxode/{tol}", f"diffrax/{tol}"),
        }
        for system in systems:
            row[system] = {**found[(system, tol)], "time_s": times[f"{system}/{tol}"]["median"]}
        if JODE in systems:
            row["time_ratio_jode"] = paired_ratio(times, f"jaxode/{tol}", f"{JODE}/{tol}")
        rows.append(row)
    return rows


def section_b(cfg: dict, cache: dict, name: str = "b") -> dict:
    import jax
    import jax.numpy as jnp
    from scipy.integrate import solve_ivp

    assert jax.config.jax_enable_x64 == (name != "e"), f"section ({name}): wrong precision"
    real = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    tols = cfg["tols_e"] if name == "e" else cfg["tols_b"]
    rows = []
    for problem, (f, y0_list, t_end) in PROBLEMS_B.items():
        ref = solve_ivp(lambda t, y, f=f: f(y, t, np), (0.0, t_end), np.array(y0_list),
                        method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
        y0 = jnp.asarray(y0_list, real)
        for method in METHODS_B:
            rows.extend(_b_rows(cfg, problem, method, f, y0, ref, tols, real))
        print(f"  ({name}) {problem}: done", file=sys.stderr, flush=True)

    printed = [[r["problem"], r["method"], f"{r['tol']:.0e}",
                fmt(r["jaxode"]["error"], ".2e"), fmt(r["diffrax"]["error"], ".2e"),
                fmt(r["error_ratio"], ".2f"), fmt(r["jaxode"]["nfe"]), fmt(r["diffrax"]["nfe"]),
                us(r["jaxode"]["time_s"]), us(r["diffrax"]["time_s"]),
                us(r[JODE]["time_s"]) if JODE in r else "-", fmt(r["time_ratio"], ".2f"),
                "/".join("yes" if r[s]["loop_one_function"] else "no"
                         for s in ("jaxode", "diffrax"))] for r in rows]
    flags = f" (XLA_FLAGS={os.environ.get('XLA_FLAGS')})" if name == "d" else ""
    print(table(
        f"({name}) work-precision, {jnp.dtype(real).name}, rtol = atol = tol, "
        "error = max |y(T) - y_ref(T)|"
        + flags,
        ["problem", "method", "tol", "err jaxode", "err diffrax", "err j/d", "NFE j",
         "NFE d", "us j", "us d", "us jode", "time j/d", "loop 1 fn j/d"],
        printed,
"y_ref: scipy DOP853 at rtol = atol = 1e-13. us: median per solve, jitted, tolerances "
        "passed as traced scalars\n(one compile per problem and method); time j/d: median "
        "over rounds of the paired ratio; loop 1 fn: XLA:CPU compiled the main while loop "
        "into one function\n(its small-loop path) rather than running it kernel by kernel."))

    summary, targets = [], []
    for method in METHODS_B:
        rs = [r for r in rows if r["method"] == method]
        geo = math.exp(statistics.mean(math.log(r["time_ratio"]) for r in rs))
        err_ok = sum(r["jaxode"]["error"] <= r["diffrax"]["error"] for r in rs)
        err_geo = math.exp(statistics.mean(math.log(r["error_ratio"]) for r in rs))
        nfe_geo = math.exp(statistics.mean(
            math.log(r["jaxode"]["nfe"] / r["diffrax"]["nfe"]) for r in rs))
        summary.append([method, fmt(geo, ".2f"), fmt(min(r["time_ratio"] for r in rs), ".2f"),
                        fmt(max(r["time_ratio"] for r in rs), ".2f"), fmt(nfe_geo, ".2f"),
                        fmt(err_geo, ".2f"), f"{err_ok}/{len(rs)}"])
        targets.append({"target": f"{method}: time per solve <= 0.5x diffrax (geo. mean)",
                        "value": geo, "met": geo <= 0.5})
        targets.append({"target": f"{method}: error <= diffrax's at equal tol (all runs)",
                        "value": err_ok / len(rs), "met": err_ok == len(rs)})
    jode = [r["time_ratio_jode"] for r in rows if "time_ratio_jode" in r]
    if jode:
        geo = math.exp(statistics.mean(math.log(x) for x in jode))
        summary.append([f"dopri5 / {JODE}", fmt(geo, ".2f"), fmt(min(jode), ".2f"),
                        fmt(max(jode), ".2f"), "-", "-", "-"])
        targets.append({"target": f"dopri5: time per solve <= 1.0x {JODE} (geo. mean)",
                        "value": geo, "met": geo <= 1.0})
    fixed = _fixed_cost(cfg) if name == "b" else None
    many = _many_outputs(cfg) if name == "b" else None
    print(table(f"({name}) summary over problems and tolerances (jaxode/diffrax; the last "
                f"row jaxode/{JODE})",
                ["method", "time geo", "time min", "time max", "NFE geo", "error geo",
                 "error <= diffrax"], summary))
    _print_targets(f"({name}) targets", targets)
    return {"rows": rows, "targets": targets, "tols": list(tols), "fixed_cost": fixed,
            "many_outputs": many}


def _fixed_cost(cfg: dict) -> dict:
    """The per-call cost of run-time error checking (a host callback) on a small solve."""
    import diffrax
    import jax
    import jax.numpy as jnp

    import jaxode

    f, y0_list, t_end = PROBLEMS_B["lotka-volterra"]
    field = lambda y, t, p: f(y, t, jnp)  # noqa: E731
    y0 = jnp.asarray(y0_list, jnp.float64)
    tol = 1e-6

    def jx(throw):
        return lambda y: jaxode.solve(field, y, jnp.array([0.0, t_end]), None, rtol=tol,
                                      atol=tol, max_steps=MAX_STEPS_B, dense=False,
                                      throw=throw).zs[-1]

    def dx(throw):
        return lambda y: diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: field(y, t, args)), diffrax.Dopri5(), 0.0,
            t_end, None, y, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=MAX_STEPS_B, throw=throw).ys[-1]

    candidates = {"empty call (y * 2)": lambda y: y * 2,
                  "jaxode throw=True": jx(True), "jaxode throw=False": jx(False),
                  "diffrax throw=True": dx(True), "diffrax throw=False": dx(False)}
    timed = {}
    for name, fn in candidates.items():
        jitted = jax.jit(fn)
        compiled = jitted.lower(y0).compile()
        timed[f"jit/{name}"] = lambda j=jitted: j(y0)
        timed[f"executable/{name}"] = lambda c=compiled: c(y0)
    times = time_interleaved(timed, cfg["repeats_b"], cfg["min_sample_b"])
    out = {way: {name: times[f"{way}/{name}"]["median"] for name in candidates}
           for way in ("jit", "executable")}
    print(table(
        f"(b) fixed cost: lotka-volterra, dopri5, tol {tol:g} (the error check is a host "
        "callback)",
        ["call", "us through jax.jit", "us, executable called"],
        [[name, us(out["jit"][name]), us(out["executable"][name])] for name in candidates],
        "throw=True checks the status at run time through a host callback; called through "
        "jax.jit a program that holds one\ncosts no more, while its compiled executable "
        "(jax.jit(f).lower(...).compile()) called directly pays for it on every call."))
    return out


def _many_outputs(cfg: dict) -> list:
    """A small solve saved at many times: Lotka-Volterra, dopri5, tol 1e-8, with 10 to
    5,000 evenly spaced outputs (a dense trajectory, as a fit to a time series takes)."""
    import diffrax
    import jax
    import jax.experimental.ode as jode
    import jax.numpy as jnp

    import jaxode

    f, y0_list, t_end = PROBLEMS_B["lotka-volterra"]
    field = lambda y, t, p: f(y, t, jnp)  # noqa: E731
    y0, tol = jnp.asarray(y0_list, jnp.float64), 1e-8
    candidates, found = {}, {}
    for num in cfg["outputs_b"]:
        ts = jnp.linspace(0.0, t_end, num)
        candidates[("jaxode", num)] = lambda y, ts=ts: jaxode.solve(
            field, y, ts, None, rtol=tol, atol=tol, max_steps=MAX_STEPS_B, dense=False).zs
        candidates[("diffrax", num)] = lambda y, ts=ts: diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: field(y, t, args)), diffrax.Dopri5(), 0.0,
            t_end, None, y, saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=MAX_STEPS_B).ys
        candidates[(JODE, num)] = lambda y, ts=ts: jode.odeint(
            field, y, ts, None, rtol=tol, atol=tol, mxstep=MAX_STEPS_B)
    timed = {}
    for key, fn in candidates.items():
        jitted = jax.jit(fn)
        found[key] = {"zs": np.asarray(jitted(y0)), "one_function": _loop_is_one_function(
            jitted, y0)}
        timed["/".join(map(str, key))] = lambda j=jitted: j(y0)
    times = time_interleaved(timed, cfg["repeats_b"], cfg["min_sample_b"])
    rows = []
    for num in cfg["outputs_b"]:
        row = {"outputs": num}
        for system in ("jaxode", "diffrax", JODE):
            row[system] = {"time_s": times[f"{system}/{num}"]["median"],
                           "one_function": found[(system, num)]["one_function"],
                           "max_difference_to_jaxode": float(np.max(np.abs(
                               found[(system, num)]["zs"] - found[("jaxode", num)]["zs"])))}
        row["time_ratio"] = paired_ratio(times, f"jaxode/{num}", f"diffrax/{num}")
        row["time_ratio_jode"] = paired_ratio(times, f"jaxode/{num}", f"{JODE}/{num}")
        rows.append(row)
    print(table(
        f"(b) many outputs: lotka-volterra, dopri5, tol {tol:g}, outputs evenly spaced",
        ["outputs", "us jaxode", "us diffrax", f"us {JODE}", "time j/d", f"time j/{JODE}",
         "loop 1 fn j/d/jode", "max |zs - zs j| d/jode"],
        [[fmt(r["outputs"]), us(r["jaxode"]["time_s"]), us(r["diffrax"]["time_s"]),
          us(r[JODE]["time_s"]), fmt(r["time_ratio"], ".2f"), fmt(r["time_ratio_jode"], ".2f"),
          "/".join("yes" if r[s]["one_function"] else "no" for s in ("jaxode", "diffrax", JODE)),
          "/".join(fmt(r[s]["max_difference_to_jaxode"], ".1e") for s in ("diffrax", JODE))]
         for r in rows],
        "A jaxode loop is one function while its output buffers hold <= 16,384 elements "
        "(jaxode.xla_cpu.BUFFER_SIZE)."))
    return rows


# ================================================================ driver

RUNNERS = {"a": section_a, "b": section_b, "c": section_c,
           "d": lambda cfg, cache: section_b(cfg, cache, name="d"),
           "e": lambda cfg, cache: section_b(cfg, cache, name="e")}


def worker(args) -> None:
    import jax

    jax.config.update("jax_enable_x64", args.worker.startswith("float64"))
    jax.config.update("jax_enable_compilation_cache", False)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))  # backend start-up, not timed
    cfg = config(args.quick)
    cache: dict = {}
    results = {}
    for section in sorted(args.section):
        results[section] = RUNNERS[section](cfg, cache)
    Path(args.json).write_text(json.dumps(results, default=jsonable))


def _meta(args) -> dict:
    found = versions(("jax", "jaxlib", "equinox", "diffrax", "torch", "torchdiffeq", "scipy",
                      "jaxode"))

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "jaxode_dirty": bool(git("status", "--porcelain", "jaxode")),
        "sections": sorted(args.section), "quick": args.quick, "versions": found,
        "python": platform.python_version(), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "config": config(args.quick),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "solve.json"),
                        help="where to write the JSON results")
    parser.add_argument("--worker", choices=tuple(GROUPS), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    results = {"meta": _meta(args)}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for group, sections in GROUPS.items():
        chosen = [s for s in sections if s in args.section]
        if not chosen:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results.json"
            command = [sys.executable, "-m", "benchmarks.solve", "--worker", group,
                       "--json", str(out), "--section", *chosen]
            if args.quick:
                command.append("--quick")
            flags = " ".join(filter(None, [env.get("XLA_FLAGS"), GROUP_FLAGS.get(group)]))
            subprocess.run(command, env={**env, "XLA_FLAGS": flags}, cwd=ROOT, check=True)
            results.update(json.loads(out.read_text()))
    write_results(results, args.out)


if __name__ == "__main__":
    main()
