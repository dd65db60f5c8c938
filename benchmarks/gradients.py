"""Gradient benchmarks: jaxode's adjoints against diffrax, jax.experimental.ode, torchdiffeq.

    PYTHONPATH=. python -m benchmarks.gradients [--section time memory vmap] [--quick]
                                                [--skip-slow]

The "MLP workload": f(z, t) = MLP(concat(z, t)), 2(+t)-64-64-2 tanh, float32, a batch of
512 initial conditions solved jointly as one (512, 2) system, 50 outputs on [0, 5],
dopri5 rtol=1e-5 atol=1e-7, loss = mean of the squared states at all outputs; the
gradient is taken with respect to the MLP's parameters.

time:   time per gradient (jitted value_and_grad, steady-state median, and compile
        time), forward and backward NFE, relative error of the gradient against a
        float64 reference at rtol = atol = 1e-10 (computed in a child process with
        JAX_ENABLE_X64=1, cached in the temp directory); a tolerance sweep comparing the
        seminorm with the full norm at equal gradient error.
memory: temp memory of the compiled gradient (XLA's memory_analysis) against the number
        of fixed rk4 steps, 100 / 1,000 / 10,000.
vmap:   the same workload with every sample on its own steps: jax.vmap over z0, and
        jaxode's batch_axis=0 lanes.

--quick: fewer repeats and systems, a smoke run (about 2 CPU-minutes); --skip-slow
(implied by --quick) leaves out the jax.vmap backsolve gradients of jaxode and diffrax
(tens of seconds to minutes each). Tables go to stdout, everything to
bench_results/gradients.json (--out to change).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import (
    counting,
    fmt,
    mlp_field,
    mlp_params,
    ms,
    table,
    time_interleaved,
    torch_mlp_field,
    versions,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("time", "memory", "vmap")

RTOL, ATOL = 1e-5, 1e-7
BATCH, NUM_TS, T_END = 512, 50, 5.0
MAX_STEPS = 4096
REF_TOL = 1e-10
SWEEP_RTOLS = (1e-3, 1e-4, 1e-5, 1e-6)  # atol = rtol / 100
MEMORY_STEPS = (100, 1_000, 10_000)
MEMORY_BATCH = 16

JAX_SYSTEMS = {
    # name: (library, adjoint, options)
    "jaxode backsolve seminorm": ("jaxode", "backsolve", {"seminorm": True}),
    "jaxode backsolve full norm": ("jaxode", "backsolve", {"seminorm": False}),
    "jaxode direct": ("jaxode", "direct", {}),
    "diffrax BacksolveAdjoint": ("diffrax", "backsolve", {}),
    "diffrax RecursiveCheckpoint": ("diffrax", "checkpoint", {}),
    "jax.experimental.ode": ("jode", "backsolve", {}),
}
BS, BS_FULL, DIRECT = "jaxode backsolve seminorm", "jaxode backsolve full norm", "jaxode direct"
DFX_BS, DFX_RC = "diffrax BacksolveAdjoint", "diffrax RecursiveCheckpoint"


def config(quick: bool) -> dict:
    if quick:
        return dict(quick=True, repeats=3, compile_repeats=1, torch_repeats=1,
                    torch_default_threads=False, torch_seminorm=False, count_all=False,
                    sweep_rtols=(1e-4, 1e-5, 1e-6), memory_steps=(100, 10_000),
                    memory_systems=(BS, DIRECT, DFX_RC), vmap_repeats=0)
    return dict(quick=False, repeats=11, compile_repeats=3, torch_repeats=5,
                torch_default_threads=True, torch_seminorm=True, count_all=True,
                sweep_rtols=SWEEP_RTOLS, memory_steps=MEMORY_STEPS,
                memory_systems=(BS, DIRECT, DFX_BS, DFX_RC), vmap_repeats=9)


# ================================================================ the workload


def workload_numpy():
    """Weights, z0 and ts as float32 NumPy arrays (the float64 reference casts these)."""
    params = mlp_params(0, np.float32)
    rng = np.random.default_rng(1)
    z0 = rng.standard_normal((BATCH, 2)).astype(np.float32)
    ts = np.linspace(0.0, T_END, NUM_TS, dtype=np.float32)
    return params, z0, ts


def workload(dtype):
    import jax.numpy as jnp

    params, z0, ts = workload_numpy()
    params = [(jnp.asarray(w, dtype), jnp.asarray(b, dtype)) for w, b in params]
    return params, jnp.asarray(z0, dtype), jnp.asarray(ts, dtype)


def solver_fn(system: str, field, ts, *, rtol=RTOL, atol=ATOL, max_steps=MAX_STEPS,
              fixed_steps: int | None = None, **extra):
    """zs = fn(z0, params) for one JAX system; fixed_steps: rk4 with dt = T / fixed_steps;
    extra: more keyword arguments of jaxode.odeint."""
    import diffrax
    import jax.experimental.ode as jode

    import jaxode

    library, adjoint, options = JAX_SYSTEMS[system]
    if library == "jaxode":
        solver = dict(solver="dopri5") if fixed_steps is None else dict(
            solver="rk4", dt0=(ts[-1] - ts[0]) / fixed_steps)

        method = jaxode.Backsolve(**options) if adjoint == "backsolve" else adjoint

        def fn(z0, params):
            return jaxode.odeint(field, z0, ts, params, rtol=rtol, atol=atol,
                                 max_steps=max_steps, adjoint=method, **solver, **extra)

        return fn
    if library == "diffrax":
        adj = (diffrax.BacksolveAdjoint() if adjoint == "backsolve"
               else diffrax.RecursiveCheckpointAdjoint())
        if fixed_steps is None:
            solver, controller, dt0 = (diffrax.Dopri5(),
                                       diffrax.PIDController(rtol=rtol, atol=atol), None)
        else:
            solver, controller = _DiffraxRK4(), diffrax.ConstantStepSize()
            dt0 = (ts[-1] - ts[0]) / fixed_steps

        def fn(z0, params):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, args: field(y, t, args)), solver, ts[0], ts[-1],
                dt0, z0, args=params, saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=controller, max_steps=max_steps, adjoint=adj,
            ).ys

        return fn
    assert fixed_steps is None

    def fn(z0, params):
        return jode.odeint(field, z0, ts, params, rtol=rtol, atol=atol, mxstep=max_steps)

    return fn


def _diffrax_rk4_class():
    import diffrax

    class RK4(diffrax.AbstractERK):
        """The classic 4th-order Runge-Kutta method (diffrax has none built in)."""

        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]),
            b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    return RK4


class _LazyRK4:
    cls = None

    def __call__(self):
        if _LazyRK4.cls is None:
            _LazyRK4.cls = _diffrax_rk4_class()
        return _LazyRK4.cls()


_DiffraxRK4 = _LazyRK4()


def loss_fn(solve, mode: str = "joint"):
    """loss(params, z0) = mean of the squared states at every output time."""
    import jax
    import jax.numpy as jnp

    if mode == "vmap":
        solve = jax.vmap(solve, in_axes=(0, None))

    def loss(params, z0):
        zs = solve(z0, params)
        return jnp.mean(jnp.square(zs))

    return loss


def compile_and_run(fn, *args):
    """`common.first_call` that also returns the first call's output: (compiled, times,
    output), times with lower, compile, run and total in seconds."""
    import jax

    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    built = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    ran = time.perf_counter()
    return compiled, {"lower": traced - start, "compile": built - traced, "run": ran - built,
                      "total": ran - start}, out


def flat_grad(grads) -> np.ndarray:
    """The parameter gradient as one float64 vector, leaves in (w1, b1, w2, b2, w3, b3) order."""
    import jax

    return np.concatenate([np.asarray(x, np.float64).ravel()
                           for x in jax.tree_util.tree_leaves(grads)])


def rel_error(g, ref) -> float:
    return float(np.linalg.norm(g - ref) / np.linalg.norm(ref))


# ================================================================ float64 reference


def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "jaxode").glob("*.py")):
        h.update(path.read_bytes())
    params, z0, ts = workload_numpy()
    for a in [x for layer in params for x in layer] + [z0, ts]:
        h.update(a.tobytes())
    h.update(repr((REF_TOL, MAX_STEPS, "v2")).encode())
    return h.hexdigest()[:16]


def reference_worker(path: str) -> None:
    """Child process (JAX_ENABLE_X64=1): float64 gradients at rtol = atol = 1e-10."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    assert jnp.zeros(()).dtype == jnp.float64
    params, z0, ts = workload(jnp.float64)
    out = {}
    # diffrax: an independent implementation, to check the reference.
    for name, system in (("direct", DIRECT), ("backsolve", BS), ("diffrax", DFX_RC)):
        start = time.perf_counter()
        loss = loss_fn(solver_fn(system, mlp_field, ts, rtol=REF_TOL, atol=REF_TOL,
                                 max_steps=20_000))
        value, grads = jax.jit(jax.value_and_grad(loss))(params, z0)
        out[name] = flat_grad(grads)
        out[name + "_loss"] = np.float64(value)
        out[name + "_s"] = np.float64(time.perf_counter() - start)
    np.savez(path, **out)


def load_reference() -> dict:
    """The float64 reference gradients, computed once per jaxode source and cached."""
    path = Path(tempfile.gettempdir()) / f"jaxode_gradients_ref_{_source_digest()}.npz"
    if not path.exists():
        print(f"computing the float64 reference gradient (rtol = atol = {REF_TOL:g}) ...",
              file=sys.stderr, flush=True)
        env = dict(os.environ, JAX_ENABLE_X64="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        tmp = path.with_suffix(".tmp.npz")
        subprocess.run([sys.executable, "-m", "benchmarks.gradients", "--reference-worker",
                        str(tmp)], env=env, cwd=ROOT, check=True)
        tmp.replace(path)
    data = dict(np.load(path))
    data["path"] = str(path)
    data["direct_vs_backsolve"] = rel_error(data["backsolve"], data["direct"])
    data["direct_vs_diffrax"] = rel_error(data["diffrax"], data["direct"])
    return data


# ================================================================ NFE helpers


def jaxode_adjoint_nfe(field, z0, ts, params, seminorm: bool) -> dict:
    """`jaxode.adjoint_nfe` for the workload's loss, mean(zs**2): cotangent 2 zs / zs.size."""
    import jax
    import jax.numpy as jnp

    import jaxode

    def run(z0, params):
        zs = jaxode.odeint(field, z0, ts, params, rtol=RTOL, atol=ATOL, max_steps=MAX_STEPS)
        cotangent = jax.grad(lambda zs: jnp.mean(jnp.square(zs)))(zs)
        return jaxode.adjoint_nfe(field, z0, ts, params, cotangent=cotangent, rtol=RTOL,
                                  atol=ATOL, max_steps=MAX_STEPS,
                                  adjoint=jaxode.Backsolve(seminorm=seminorm))

    return {k: int(v) for k, v in jax.jit(run)(z0, params).items()}


def count_nfe(system: str, ts, z0, params, mode: str = "joint", rtols=(RTOL,)):
    """Executed evaluations of f: forward solve alone, and value_and_grad in total.

    Returns {rtol: (forward, backward = total - forward, flat gradient)}; for jaxode
    the tolerances are traced, so a sweep compiles once.
    """
    import jax
    import jax.numpy as jnp

    counter = [0]
    field = counting(mlp_field, counter)
    library = JAX_SYSTEMS[system][0]

    def make(rtol, atol):
        return loss_fn(solver_fn(system, field, ts, rtol=rtol, atol=atol), mode)

    if library == "jaxode":
        def fwd(params, z0, rtol, atol):
            return make(rtol, atol)(params, z0)

        vg = jax.jit(jax.value_and_grad(fwd))
        fwd = jax.jit(fwd)
        calls = {r: (lambda f, r=r: f(params, z0, jnp.float32(r), jnp.float32(r / 100)))
                 for r in rtols}
    else:
        assert rtols == (RTOL,)
        fwd = jax.jit(make(RTOL, ATOL))
        vg = jax.jit(jax.value_and_grad(make(RTOL, ATOL)))
        calls = {RTOL: lambda f: f(params, z0)}
    out = {}
    for rtol, call in calls.items():
        jax.block_until_ready(call(fwd))  # compile outside the count
        counter[0] = 0
        jax.block_until_ready(call(fwd))
        forward = counter[0]
        jax.block_until_ready(call(vg))
        counter[0] = 0
        _, grads = jax.block_until_ready(call(vg))
        out[rtol] = (forward, counter[0] - forward, flat_grad(grads))
    return out


# ================================================================ torchdiffeq


def torch_systems(params_np, z0_np, ts_np, default_threads: bool, seminorm: bool):
    """{name: (run() -> flat gradient, threads)} and the NFE of each torchdiffeq system."""
    import torch
    import torchdiffeq

    field = torch_mlp_field(params_np, np.float32)
    z0, ts = torch.from_numpy(z0_np), torch.from_numpy(ts_np)
    default = torch.get_num_threads()
    nfe = {}

    def runner(name, adjoint, threads, options=None):
        def run():
            torch.set_num_threads(threads)
            field.zero_grad()
            solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
            kwargs = {"adjoint_options": options} if options else {}
            field.nfe = 0
            zs = solve(field, z0, ts, rtol=RTOL, atol=ATOL, method="dopri5", **kwargs)
            forward = field.nfe
            torch.square(zs).mean().backward()
            nfe[name] = (forward, field.nfe - forward)
            return np.concatenate([p.grad.detach().numpy().astype(np.float64).ravel()
                                   for p in field.weights])

        return run

    threads = [1] + ([default] if default_threads and default != 1 else [])
    systems = {}
    for t in threads:
        systems[f"torchdiffeq odeint_adjoint ({t} thr)"] = (runner(
            f"adjoint{t}", True, t), t)
    if seminorm:
        systems["torchdiffeq odeint_adjoint seminorm (1 thr)"] = (runner(
            "seminorm", True, 1, {"norm": "seminorm"}), 1)
    for t in threads:
        systems[f"torchdiffeq odeint ({t} thr)"] = (runner(f"direct{t}", False, t), t)
    return systems, nfe


def _nfe_key(name: str) -> str:
    threads = name.split("(")[-1].split()[0]
    if "seminorm" in name:
        return "seminorm"
    return ("adjoint" if "adjoint" in name else "direct") + threads


# ================================================================ section: time


def section_time(cfg: dict, ref: dict) -> dict:
    params, z0, ts = workload(np.float32)
    g_ref = ref["direct"]
    systems = _jax_time_entries(cfg, params, z0, ts)
    torch_fns, torch_nfe = torch_systems(
        [(np.array(w), np.array(b)) for w, b in params], np.array(z0), np.array(ts),
        cfg["torch_default_threads"], cfg["torch_seminorm"])
    torch_first, torch_grads = {}, {}
    for name, (run, _) in torch_fns.items():
        start = time.perf_counter()
        torch_grads[name] = run()
        torch_first[name] = time.perf_counter() - start
    times, torch_times = _time_systems(cfg, systems, torch_fns, params, z0)
    bs_time_torch_run = torch_times.pop(BS)["median"]

    rows = []
    bs_time = times[BS]["median"]
    for name, e in systems.items():
        rows.append({
            "system": name, "nfe_fwd": e["nfe_fwd"], "nfe_bwd": e["nfe_bwd"],
            "stats_nfe_fwd": e.get("stats_nfe_fwd"), "stats_nfe_bwd": e.get("stats_nfe_bwd"),
            "steady_s": times[name]["median"], "steady_min_s": times[name]["min"],
            "samples_s": times[name]["samples"],
            "lower_s": e["first"]["lower"], "compile_s": e["first"]["lower"] +
            e["first"]["compile"], "first_call_s": e["first"]["total"],
            "grad_rel_error": rel_error(e["grad"], g_ref),
            "time_over_jaxode_backsolve": times[name]["median"] / bs_time,
        })
    for name in torch_fns:
        fwd, bwd = torch_nfe[_nfe_key(name)]
        steady = torch_times[name]["median"]
        base = bs_time_torch_run if torch_fns[name][1] == 1 else bs_time
        rows.append({
            "system": name, "nfe_fwd": fwd, "nfe_bwd": bwd if "adjoint" in name else None,
            "steady_s": steady, "steady_min_s": torch_times[name]["min"],
            "samples_s": torch_times[name]["samples"], "first_call_s": torch_first[name],
            "grad_rel_error": rel_error(torch_grads[name], g_ref),
            "time_over_jaxode_backsolve": steady / base,
        })
    _print_time_table(rows, cfg, ref, bs_time_torch_run)

    sweep = _sweep_table(systems, g_ref, cfg)
    breakdown = _breakdown(systems, params, z0, ts, cfg)
    by = {r["system"]: r for r in rows}
    targets = _time_targets(by, sweep, torch_fns)
    _print_targets("(time) targets", targets)
    for e in systems.values():
        e.pop("fn")
        e.pop("grad")
        e["sweep"] = {str(k): (a, b, rel_error(g, g_ref)) for k, (a, b, g) in
                      e["sweep"].items()}
    return {"rows": rows, "sweep": sweep, "breakdown": breakdown, "targets": targets,
            "reference": {k: ref[k] for k in ("path", "direct_vs_backsolve",
                                               "direct_vs_diffrax", "direct_s",
                                               "backsolve_s", "diffrax_s", "direct_loss")},
            "settings": {"rtol": RTOL, "atol": ATOL, "batch": BATCH, "num_ts": NUM_TS,
                         "t_end": T_END, "max_steps": MAX_STEPS, "ref_tol": REF_TOL}}


def _jax_time_entries(cfg: dict, params, z0, ts) -> dict:
    """Each JAX system's compiled value_and_grad, compile times, gradient and NFE."""
    import jax

    import jaxode

    systems = {}
    for name in JAX_SYSTEMS:
        firsts, compiled = [], None
        for _ in range(cfg["compile_repeats"]):
            # A fresh closure each time, so no tracing or compilation cache is reused.
            field = lambda z, t, p: mlp_field(z, t, p)  # noqa: E731
            compiled, times, (_, grads) = compile_and_run(
                jax.value_and_grad(loss_fn(solver_fn(name, field, ts))), params, z0)
            firsts.append(times)
        first = {k: statistics.median(t[k] for t in firsts) for k in firsts[0]}
        entry = {"fn": compiled, "first": first, "grad": flat_grad(grads),
                 "nfe_fwd": None, "nfe_bwd": None, "sweep": {}}
        if cfg["count_all"] or JAX_SYSTEMS[name][0] == "jaxode":
            rtols = cfg["sweep_rtols"] if name in (BS, BS_FULL) else (RTOL,)
            counts = count_nfe(name, ts, z0, params, rtols=rtols)
            entry.update(nfe_fwd=counts[RTOL][0], nfe_bwd=counts[RTOL][1], sweep=counts)
        if JAX_SYSTEMS[name][0] == "jaxode":
            stats = jax.jit(lambda z0, p: jaxode.solve(
                mlp_field, z0, ts, p, rtol=RTOL, atol=ATOL, max_steps=MAX_STEPS,
                dense=False).stats)(z0, params)
            entry["stats_nfe_fwd"] = int(stats["nfe"])
            entry["stats_steps_fwd"] = int(stats["num_steps"])
        if name in (BS, BS_FULL):
            seminorm = JAX_SYSTEMS[name][2]["seminorm"]
            entry["stats_nfe_bwd"] = jaxode_adjoint_nfe(mlp_field, z0, ts, params,
                                                        seminorm)["backward"]
        systems[name] = entry
        print(f"  time: {name} compiled and counted", file=sys.stderr, flush=True)
    return systems


def _time_systems(cfg: dict, systems: dict, torch_fns: dict, params, z0):
    """(times, torch_times): the JAX systems get `repeats` interleaved samples; torch
    (seconds per call) fewer, interleaved with jaxode backsolve (its entry BS in
    torch_times) so that the ratio sees one load."""
    timed = {name: (lambda e=e: e["fn"](params, z0)) for name, e in systems.items()}
    one_thread = {n: (lambda r=r: r()) for n, (r, t) in torch_fns.items() if t == 1}
    times = time_interleaved(timed, cfg["repeats"])
    torch_times = time_interleaved({**one_thread, BS: timed[BS]}, cfg["torch_repeats"])
    for name, (run, threads) in torch_fns.items():
        if threads != 1:
            # Several threads on a shared 2-core machine can be very slow: 2 samples,
            # after the first call.
            samples = []
            for _ in range(2):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            torch_times[name] = {"median": statistics.median(samples), "min": min(samples),
                                 "samples": samples}
    return times, torch_times


def _print_time_table(rows: list, cfg: dict, ref: dict, bs_time_torch_run: float) -> None:
    printed = [[r["system"], fmt(r["nfe_fwd"]), fmt(r["nfe_bwd"]),
                fmt(r.get("stats_nfe_fwd")) + "/" + fmt(r.get("stats_nfe_bwd")),
                ms(r["steady_s"]), fmt(r.get("compile_s"), ".2f"),
                fmt(r["first_call_s"], ".2f"), fmt(r["grad_rel_error"], ".2e"),
                fmt(r["time_over_jaxode_backsolve"], ".2f")] for r in rows]
    note = (
        "NFE: evaluations of f executed, counted by a host callback in f (non-timed runs);\n"
        "  bwd = value_and_grad total - forward solve alone (recomputation by "
        "checkpointing included;\n  jaxode backsolve: 2 for the initial step + 1 batched "
        "f at the 50 outputs + the augmented solves).\n"
        "jaxode stats fwd/bwd: Solution.stats['nfe'] / jaxode.adjoint_nfe's "
        "backward NFE for the loss's cotangent.\n"
        f"steady: median of {cfg['repeats']} interleaved samples of the jitted "
        "value_and_grad; compile = trace/lower +\n  XLA compile (median of "
        f"{cfg['compile_repeats']} fresh closures); 1st call = compile + first run "
        "(torch: first call).\n"
        f"grad err: ||g - g_ref|| / ||g_ref|| over the parameters; g_ref: "
        f"jaxode direct, float64, rtol=atol={REF_TOL:g}\n  (it differs from jaxode "
        f"backsolve by {ref['direct_vs_backsolve']:.1e} and from diffrax "
        f"RecursiveCheckpoint by {ref['direct_vs_diffrax']:.1e}, both float64 at "
        f"{REF_TOL:g}).\n"
        "x backsolve: time / jaxode backsolve seminorm's time; torch 1-thread rows are "
        f"timed in their own\n  interleaved run ({cfg['torch_repeats']} samples) with "
        f"jaxode backsolve (median {ms(bs_time_torch_run)} ms there); torch's default "
        "thread\n  count: 2 samples, against the JAX rows' backsolve median (threads "
        "oversubscribe a loaded machine).\n"
        "torchdiffeq odeint: backprop through the solver's operations, so no backward "
        "evaluations of f;\n  torchdiffeq's adjoint norm: max of per-tensor RMS norms "
        "(y, a_y, each parameter).")
    print(table(
        f"(time) gradient of mean(z^2): MLP 2(+t)-64-64-2, batch {BATCH} joint, {NUM_TS} "
        f"outputs on [0, {T_END:g}], dopri5 rtol={RTOL:g} atol={ATOL:g}, float32",
        ["system", "fwd NFE", "bwd NFE", "jaxode stats", "steady ms", "compile s",
         "1st call s", "grad err", "x backsolve"], printed, note))


def _sweep_table(systems, g_ref, cfg) -> dict:
    """Backward NFE against gradient error for the seminorm and the full norm."""
    rows, curves = [], {}
    for name in (BS, BS_FULL):
        curve = []
        for rtol, (fwd, bwd, g) in sorted(systems[name]["sweep"].items(), reverse=True):
            err = rel_error(g, g_ref)
            curve.append((rtol, fwd, bwd, err))
        curves[name] = curve
    for (rtol, fwd, b_semi, e_semi), (_, _, b_full, e_full) in zip(curves[BS], curves[BS_FULL]):
        rows.append([f"{rtol:.0e}", fmt(fwd), fmt(b_semi), fmt(e_semi, ".2e"), fmt(b_full),
                     fmt(e_full, ".2e"), fmt(b_semi / b_full, ".2f")])
    # The full norm's backward NFE at the seminorm's error (workload tolerance), by
    # log-log interpolation of the full norm's curve.
    semi = next(c for c in curves[BS] if c[0] == RTOL)
    full_at = _interpolate_nfe(curves[BS_FULL], semi[3])
    equal = None if full_at is None else semi[2] / full_at
    note = ("Tolerance sweep, forward and adjoint rtol = tol, atol = tol/100 (traced, one "
            "compile); backward NFE counted.\n"
            f"At the seminorm's error at rtol={RTOL:g} ({semi[3]:.2e}) the full norm needs "
            f"{fmt(full_at, '.0f')} backward NFE (log-log\ninterpolation): seminorm / full "
            f"at equal gradient error = {fmt(equal, '.2f')}.")
    print(table("(time) seminorm vs full norm: backward NFE against gradient error",
                ["rtol", "fwd NFE", "bwd semi", "err semi", "bwd full", "err full",
                 "semi/full NFE"], rows, note))
    return {"curves": {k: v for k, v in curves.items()}, "full_nfe_at_semi_error": full_at,
            "semi_over_full_at_equal_error": equal}


def _breakdown(systems, params, z0, ts, cfg) -> dict:
    """Where jaxode backsolve's gradient time goes: the forward solve, and the backward
    pass against (backward NFE) x (one augmented evaluation), the augmented evaluation
    split into f with its z-vjp and the parameter vjp; all timed in one interleaved run."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.flatten_util import ravel_pytree

    evals = 200
    n = z0.size
    theta = ravel_pytree(params)[0]

    def chain(fun, y0):
        # `evals` chained evaluations y <- y + 1e-6 fun(y, t): nothing can be elided.
        loop = jax.jit(lambda y, p: lax.fori_loop(
            0, evals, lambda i, y: y + 1e-6 * fun(y, 1e-3 * i, p), y))
        return lambda: loop(y0, params)

    def f_only(y, t, p):
        return mlp_field(y, t, p)

    def augmented(y, t, p):  # as jaxode's backward_pass: one vjp for a_z and a_θ
        z, a = y[:n].reshape(z0.shape), y[n:2 * n].reshape(z0.shape)
        fz, vjp = jax.vjp(lambda z_, p_: mlp_field(z_, t, p_), z, p)
        a_z, a_p = vjp(a)
        return jnp.concatenate([fz.ravel(), -a_z.ravel(), -ravel_pytree(a_p)[0]])

    def augmented_z(y, t, p):  # the same without the parameter adjoint
        z, a = y[:n].reshape(z0.shape), y[n:].reshape(z0.shape)
        fz, vjp = jax.vjp(lambda z_: mlp_field(z_, t, p), z)
        return jnp.concatenate([fz.ravel(), -vjp(a)[0].ravel()])

    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.standard_normal((BATCH, 64)).astype(np.float32))
    d = jnp.asarray(rng.standard_normal((BATCH, 64)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32))

    def dots(fun, y0):
        loop = jax.jit(lambda y: lax.fori_loop(0, evals, lambda i, y: y + 1e-6 * fun(y), y))
        return lambda: loop(y0)

    y_aug = jnp.concatenate([z0.ravel(), z0.ravel(), jnp.zeros_like(theta)])
    forward = jax.jit(loss_fn(solver_fn(BS, mlp_field, ts)))
    fns = {
        "gradient": lambda: systems[BS]["fn"](params, z0),
        "forward": lambda: forward(params, z0),
        "f": chain(f_only, z0),
        "aug": chain(augmented, y_aug),
        "aug_z": chain(augmented_z, y_aug[:2 * n]),
        "dot": dots(lambda y: y @ w, h),  # forward layer: (512x64) @ (64x64)
        "dot_t": dots(lambda y: (h + y[0, 0]).T @ d, w),  # its weight gradient, K=512
    }
    t = {k: v["median"] for k, v in time_interleaved(fns, cfg["repeats"]).items()}
    for k in ("f", "aug", "aug_z", "dot", "dot_t"):
        t[k] /= evals
    nfe_f, nfe_b = systems[BS]["nfe_fwd"], systems[BS]["nfe_bwd"]
    backward = t["gradient"] - t["forward"]
    rows = [
        ["gradient (value_and_grad)", ms(t["gradient"]), "100%", ""],
        ["  forward solve (the loss alone)", ms(t["forward"]),
         f"{t['forward'] / t['gradient']:.0%}", f"{nfe_f} NFE x {1e6 * t['f']:.0f} us f = "
         f"{ms(nfe_f * t['f'])} ms"],
        ["  backward pass (difference)", ms(backward), f"{backward / t['gradient']:.0%}",
         f"{nfe_b} NFE x {1e6 * t['aug']:.0f} us augmented = {ms(nfe_b * t['aug'])} ms"],
        ["    of which f and its z-vjp", ms(nfe_b * t["aug_z"]),
         f"{nfe_b * t['aug_z'] / t['gradient']:.0%}",
         f"{nfe_b} x {1e6 * t['aug_z']:.0f} us (augmented without a_theta)"],
        ["    of which the parameter vjp", ms(nfe_b * (t["aug"] - t["aug_z"])),
         f"{nfe_b * (t['aug'] - t['aug_z']) / t['gradient']:.0%}",
         f"{nfe_b} x {1e6 * (t['aug'] - t['aug_z']):.0f} us"],
    ]
    print(table(
        "(time) where jaxode backsolve's gradient time goes (seminorm, joint batch)",
        ["part", "ms", "share", "model: NFE x time of one evaluation"], rows,
        f"One evaluation: a lax.fori_loop of {evals} chained evaluations, timed with the "
        f"gradient ({cfg['repeats']} interleaved samples).\nXLA:CPU's weight-gradient "
        f"matmul h^T d, (64x512)@(512x64), takes {1e6 * t['dot_t']:.0f} us against "
        f"{1e6 * t['dot']:.0f} us for the forward matmul h@W\n(512x64)@(64x64) of the same "
        "FLOPs: the parameter vjp is the costly part of an augmented evaluation."))
    return {"times_s": t, "nfe_fwd": nfe_f, "nfe_bwd": nfe_b}


def _interpolate_nfe(curve, err):
    """NFE at gradient error `err` on a (rtol, fwd, bwd, err) curve, log-log, or None."""
    points = sorted((c[3], c[2]) for c in curve)
    for (e0, n0), (e1, n1) in zip(points, points[1:]):
        if e0 <= err <= e1 and e0 > 0 and e1 > e0:
            w = (math.log(err) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))
    return None


def _time_targets(by, sweep, torch_fns) -> list:
    bs, dfx_bs, direct, dfx_rc = by[BS], by[DFX_BS], by[DIRECT], by[DFX_RC]
    t_bs = bs["steady_s"] / dfx_bs["steady_s"]
    targets = [
        {"target": "backsolve time <= 0.6x diffrax BacksolveAdjoint", "value": t_bs,
         "met": t_bs <= 0.6},
        {"target": "  ... with gradient error no worse (err ratio)",
         "value": bs["grad_rel_error"] / dfx_bs["grad_rel_error"],
         "met": bs["grad_rel_error"] <= dfx_bs["grad_rel_error"]},
    ]
    same_tol = bs["nfe_bwd"] / by[BS_FULL]["nfe_bwd"]
    equal = sweep["semi_over_full_at_equal_error"]
    targets += [
        {"target": "seminorm bwd NFE <= 0.7x full norm (equal error)", "value": equal,
         "met": equal is not None and equal <= 0.7},
        {"target": "  (same tolerance, for reference)", "value": same_tol,
         "met": same_tol <= 0.7},
    ]
    t_d = direct["steady_s"] / dfx_rc["steady_s"]
    c_d = direct["compile_s"] / dfx_rc["compile_s"]
    targets += [
        {"target": "direct time <= 1.0x diffrax RecursiveCheckpoint", "value": t_d,
         "met": t_d <= 1.0},
        {"target": "direct compile <= 0.5x diffrax RecursiveCheckpoint", "value": c_d,
         "met": c_d <= 0.5},
    ]
    adjoints = [n for n in torch_fns if "odeint_adjoint (" in n]
    fastest = min(adjoints, key=lambda n: by[n]["steady_s"])
    speed = by[fastest]["time_over_jaxode_backsolve"]
    targets.append({"target": f"backsolve >= 7x faster than {fastest}", "value": speed,
                    "met": speed >= 7})
    return targets


def _print_targets(title, targets):
    print(table(title, ["target", "value", "met"],
                [[t["target"], fmt(t["value"], ".3f"), fmt(t["met"])] for t in targets]))


# ================================================================ section: memory


def section_memory(cfg: dict) -> dict:
    import jax

    params, z0, ts = workload(np.float32)
    z0 = z0[:MEMORY_BATCH]
    names = cfg["memory_systems"]
    rows = []
    for steps in cfg["memory_steps"]:
        for name in names:
            loss = loss_fn(solver_fn(name, mlp_field, ts, max_steps=steps, fixed_steps=steps))
            start = time.perf_counter()
            compiled = jax.jit(jax.value_and_grad(loss)).lower(params, z0).compile()
            compile_s = time.perf_counter() - start
            mem = compiled.memory_analysis()
            row = {"system": name, "steps": steps, "temp_bytes": int(mem.temp_size_in_bytes),
                   "argument_bytes": int(mem.argument_size_in_bytes),
                   "output_bytes": int(mem.output_size_in_bytes), "compile_s": compile_s}
            if steps == cfg["memory_steps"][0]:
                # Run once (the smallest N only: 10,000 steps take seconds): a finite
                # gradient, and its agreement with the other systems.
                value, grads = jax.block_until_ready(compiled(params, z0))
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, z0))
                row["run_s"] = time.perf_counter() - start
                row["grad"] = flat_grad(grads)
                row["finite"] = bool(np.isfinite(row["grad"]).all()
                                     and np.isfinite(float(value)))
            rows.append(row)
        print(f"  memory: {steps} steps done", file=sys.stderr, flush=True)

    def cell(name, steps, key):
        r = next(r for r in rows if r["system"] == name and r["steps"] == steps)
        return r[key]

    steps = cfg["memory_steps"]
    base = cell(DFX_RC, steps[0], "grad")
    printed = []
    for name in names:
        temps = [cell(name, s, "temp_bytes") for s in steps]
        printed.append([name, *[f"{t / 2**10:,.0f}" for t in temps],
                        fmt(temps[-1] / temps[0], ".1f"),
                        *[fmt(cell(name, s, "compile_s"), ".2f") for s in steps],
                        ms(cell(name, steps[0], "run_s")),
                        fmt(rel_error(cell(name, steps[0], "grad"), base), ".1e")])
    print(table(
        f"(memory) compiled value_and_grad temp memory (KiB) against fixed rk4 steps; "
        f"MLP field, batch {MEMORY_BATCH}, {NUM_TS} outputs, float32",
        ["system", *[f"{s:,} st KiB" for s in steps], f"x {steps[-1] // steps[0]} st",
         *[f"{s:,} st compile s" for s in steps], f"{steps[0]} st run ms",
         f"{steps[0]} st grad vs dfx RC"],
        printed,
        "temp: XLA memory_analysis().temp_size_in_bytes of the compiled gradient; dt0 = "
        "T/N, max_steps = N for both\nlibraries (diffrax: ConstantStepSize and a "
        "user-defined RK4 tableau). Run (once, after a warm-up) at the smallest N only;\n"
        "grad vs dfx RC: relative difference of the parameter gradient from diffrax "
        "RecursiveCheckpoint's.\ntorch peak memory: not measured (CPU allocations are "
        "not tracked by torch)."))
    for r in rows:
        r.pop("grad", None)
    return {"rows": rows, "batch": MEMORY_BATCH}


# ================================================================ section: vmap


def _rounds(fns: dict, repeats: int) -> dict:
    """Round-robin samples of already warmed-up callables (one call per sample)."""
    import jax

    samples: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(v), "min": min(v), "samples": v}
            for name, v in samples.items()}


def section_vmap(cfg: dict, ref: dict, skip_slow: bool) -> dict:
    import jax

    params, z0, ts = workload(np.float32)
    g_ref = ref["direct"]
    joint, vmapped = "jaxode backsolve, joint", "jaxode backsolve, jax.vmap"
    lanes = "jaxode backsolve, batch_axis=0"
    direct_joint, direct_lanes = "jaxode direct, joint", "jaxode direct, batch_axis=0"
    runs = {joint: (BS, "joint", {}), vmapped: (BS, "vmap", {}),
            lanes: (BS, "joint", {"batch_axis": 0}), direct_joint: (DIRECT, "joint", {}),
            direct_lanes: (DIRECT, "joint", {"batch_axis": 0})}
    if skip_slow:
        del runs[vmapped]
    if not cfg["quick"]:
        runs["jaxode direct, jax.vmap"] = (DIRECT, "vmap", {})
        runs["diffrax RecursiveCheckpoint, jax.vmap"] = (DFX_RC, "vmap", {})
    built = {}
    for label, (name, mode, extra) in runs.items():
        field = lambda z, t, p: mlp_field(z, t, p)  # noqa: E731
        compiled, first, (_, grads) = compile_and_run(
            jax.value_and_grad(loss_fn(solver_fn(name, field, ts, **extra), mode)), params, z0)
        built[label] = {"fn": compiled, "first": first, "grad": flat_grad(grads)}
        print(f"  vmap: {label} compiled", file=sys.stderr, flush=True)
    if not cfg["quick"] and vmapped in built:
        counts = count_nfe(BS, ts, z0, params, "vmap")
        built[vmapped]["nfe_fwd"], built[vmapped]["nfe_bwd"] = counts[RTOL][:2]
    if cfg["vmap_repeats"]:
        # Each has run once after compiling: that was the warm-up.
        times = _rounds({k: (lambda e=e: e["fn"](params, z0)) for k, e in built.items()},
                        cfg["vmap_repeats"])
    else:
        # --quick: the first run after compiling is the sample (the jax.vmap backsolve
        # takes tens of seconds per gradient).
        times = {k: {"median": e["first"]["run"], "min": e["first"]["run"],
                     "samples": [e["first"]["run"]]} for k, e in built.items()}
    if not skip_slow:
        label = "diffrax BacksolveAdjoint, jax.vmap"
        compiled, first, (_, grads) = compile_and_run(
            jax.value_and_grad(loss_fn(solver_fn(DFX_BS, mlp_field, ts), "vmap")), params, z0)
        times[label] = {"median": first["run"], "min": first["run"],
                        "samples": [first["run"]]}
        built[label] = {"first": first, "grad": flat_grad(grads)}
    base = times[joint]["median"]
    rows = []
    for label, e in built.items():
        rows.append({"system": label, "steady_s": times[label]["median"],
                     "samples_s": times[label]["samples"],
                     "compile_s": e["first"]["lower"] + e["first"]["compile"],
                     "grad_rel_error": rel_error(e["grad"], g_ref),
                     "over_joint_backsolve": times[label]["median"] / base,
                     "nfe_fwd": e.get("nfe_fwd"), "nfe_bwd": e.get("nfe_bwd")})
    notes = [(f"steady: median of {cfg['vmap_repeats']} round-robin samples after a warm-up "
              "call" if cfg["vmap_repeats"] else "steady: the first run after compiling "
              "(--quick)") + "; grad err against the float64 reference as in (time)."]
    if "nfe_fwd" in built.get(vmapped, {}):
        notes.append(f"jaxode backsolve under jax.vmap executes {built[vmapped]['nfe_fwd']} "
                     f"batched forward and {built[vmapped]['nfe_bwd']} batched backward "
                     "evaluations\n(a vmapped while loop runs until its slowest lane is done) "
                     "and carries a parameter adjoint per sample.")
    if lanes in built:
        notes.append("batch_axis=0: jaxode's lane mode, each sample its own steps in one "
                     "loop and one shared parameter adjoint.")
    notes.append("jaxode backsolve and diffrax BacksolveAdjoint under jax.vmap: " + (
        "skipped (--skip-slow or --quick)" if skip_slow else
        "diffrax's is the first run after compiling, not interleaved"))
    print(table(
        "(vmap) the same gradient with every sample on its own steps",
        ["system", "steady ms", "compile s", "grad err", "x joint backsolve"],
        [[r["system"], ms(r["steady_s"]), fmt(r["compile_s"], ".2f"),
          fmt(r["grad_rel_error"], ".2e"), fmt(r["over_joint_backsolve"], ".2f")]
         for r in rows], "\n".join(notes)))
    targets = []
    if vmapped in times:
        ratio_v = times[vmapped]["median"] / base
        targets.append({"target": "jax.vmap backsolve <= 2x joint backsolve time",
                        "value": ratio_v, "met": ratio_v <= 2.0})
    ratio_l = times[lanes]["median"] / base
    targets.append({"target": "batch_axis=0 backsolve <= 1.5x joint backsolve time",
                    "value": ratio_l, "met": ratio_l <= 1.5})
    ratio_d = times[direct_lanes]["median"] / times[direct_joint]["median"]
    targets.append({"target": "batch_axis=0 direct <= 1.3x joint direct time",
                    "value": ratio_d, "met": ratio_d <= 1.3})
    _print_targets("(vmap) targets", targets)
    return {"rows": rows, "targets": targets, "skip_slow": skip_slow}


# ================================================================ driver


def _git_state() -> dict:
    """The commit benchmarked and whether jaxode/ had uncommitted changes."""
    def git(*command):
        try:
            return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"commit": git("rev-parse", "HEAD"),
            "jaxode_dirty": bool(git("status", "--porcelain", "--", "jaxode"))}


def _meta(args) -> dict:
    found = versions(("jax", "jaxlib", "equinox", "diffrax", "torch", "torchdiffeq", "jaxode"))
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "sections": list(args.section), "quick": args.quick, "skip_slow": args.skip_slow,
        "versions": found, "python": platform.python_version(),
        "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "config": config(args.quick), "jaxode_source": _git_state(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    parser.add_argument("--skip-slow", action="store_true",
                        help="skip the slow jax.vmap backsolve gradients of jaxode (~10 s "
                             "each) and diffrax (~15 s or more); implied by --quick")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "gradients.json"),
                        help="where to write the JSON results")
    parser.add_argument("--reference-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_worker:
        reference_worker(args.reference_worker)
        return

    import jax

    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_enable_compilation_cache", False)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))  # backend start-up, not timed
    cfg = config(args.quick)
    started = time.perf_counter()
    results = {"meta": _meta(args)}
    ref = load_reference() if {"time", "vmap"} & set(args.section) else None
    if "time" in args.section:
        results["time"] = section_time(cfg, ref)
    if "memory" in args.section:
        results["memory"] = section_memory(cfg)
    if "vmap" in args.section:
        results["vmap"] = section_vmap(cfg, ref, args.skip_slow or args.quick)
    results["meta"]["wall_s"] = time.perf_counter() - started
    write_results(results, args.out)


if __name__ == "__main__":
    main()
