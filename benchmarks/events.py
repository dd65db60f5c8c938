"""Terminal events (issue 17, item 7): jaxode's `Event` against diffrax's `Event` and
torchdiffeq's `odeint_event`, float64, dopri5 everywhere.

    PYTHONPATH=. .venv/bin/python -m benchmarks.events [--section ball mlp] [--quick]

(ball) A falling ball, z = (height, velocity), dz/dt = (v, -g), from h = 1 at rest,
    g = 9.81, stopped when the height crosses zero downwards: one solve to the event and
    the gradient of the event time w.r.t. (h, g), at rtol = atol = 1e-6 and 1e-8. Error:
    |t* - sqrt(2h/g)| and the largest relative error of the two derivatives against
    their closed forms. (The trajectory is a quadratic, which dopri5 integrates exactly:
    the error is the root finder's; the times are the per-call cost of an event solve.)
(mlp) The neural-ODE field of `benchmarks.common` (2(+t)-64-64-2 tanh MLP) with a learned
    event cond(z) = 3 + 0.5 tanh(MLP_c(z)) - |z| (MLP_c 2-16-1 tanh, fixed weights: the
    trajectory leaves a learned region around the origin), 256 initial conditions
    z0 ~ N(0, 0.75^2 I), t in [0, 10] (every sample crosses). Time of one solve of the
    batch to its events and of the gradient of mean(event times) w.r.t. the field's MLP
    parameters, at rtol = atol = 1e-5 ... 1e-8. jaxode: jax.vmap of a single-sample solve
    (backsolve and direct) and one solve with batch_axis=0 (each sample its own steps in
    one loop, the parameter gradient accumulated once for the batch; jax.vmap of
    backsolve takes seconds, so it is timed at 1e-6 only); diffrax: jax.vmap,
    RecursiveCheckpointAdjoint (its default), throw=False so that a failed root find is
    counted instead of raised; torchdiffeq: odeint_event can stop a solve
    at one event only (a batched state stops at the first sample's crossing), so it runs
    a Python loop of single-sample solves, timed on the first 32 samples and scaled to
    256 (its times are per-sample sums, exactly linear in the number of samples).
    Errors against jaxode (vmap, direct) at rtol = atol = 1e-12 (its agreement with
    diffrax at 1e-12 is printed): the largest |t* - t*_ref| over the batch and the
    relative 2-norm error of the gradient. Then, per diffrax rtol, each jaxode gradient
    at the rtol where its event-time error is at most diffrax's (log-log interpolated
    from its runs, tightened until a run's error is), timed in one block with diffrax's.

Event location: jaxode's Illinois iteration stops at a bracket of 1% of atol + rtol |t|;
diffrax gets optimistix.Newton(rtol / 100, atol / 100) on its dense output (as its
documentation suggests, with tolerances matched to jaxode's); torchdiffeq bisects to
its solver's atol (fixed by torchdiffeq). Same step control everywhere (I-controller,
Hairer's RMS norm, automatic first step); torchdiffeq's controller is its own.

Timing as in the other benchmarks: the JAX systems of one table are sampled round-robin
(`common.time_interleaved`, medians of interleaved samples, after a warm-up call), torch in
a block of its own interleaved with one jaxode system; ratios are medians over rounds
of per-round ratios (torch's through that jaxode system, timed in both blocks; ratios
across tolerances, timed in different blocks, are ratios of medians). XLA and torch
are each held to one thread (XLA_FLAGS --xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1, unless XLA_FLAGS is already set; torch.set_num_threads(1)).
Every call goes through jax.jit's dispatch, as a user's does (a `.lower().compile()`d
executable's Python call path adds 25-90 us per call); "1st call" = trace + lower + XLA
compile + the first run of the jitted function, tolerances traced (one compile per
system). NFE: evaluations of f executed,
counted by a host callback in separate untimed builds (a batched evaluation under vmap
or batch_axis counts once). Tables go to stdout, everything to bench_results/events.json.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .common import (
    counting,  # f counting its executed evaluations (untimed builds)
    fmt,
    mlp_field,
    mlp_params,
    ms,
    table,
    time_interleaved,
    torch_mlp_field,
    us,
    versions,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("ball", "mlp")

H, G = 1.0, 9.81
BALL_TOLS = (1e-6, 1e-8)
BALL_T_END = 2.0

BATCH, T_END = 256, 10.0
MLP_TOLS = (1e-5, 1e-6, 1e-7, 1e-8)
MAIN_TOL = 1e-6
REF_TOL = 1e-12
MAX_STEPS = 16_384
TORCH_SAMPLES = 32
ROOT_FRACTION = 0.01  # diffrax's Newton gets this fraction of the solve's tolerances


def config(quick: bool) -> dict:
    if quick:
        return dict(quick=True, ball_repeats=7, mlp_repeats=3, torch_repeats=1,
                    torch_samples=8, mlp_tols=(1e-6, 1e-8), vmap_backsolve=False,
                    count_grad_nfe=False)
    return dict(quick=False, ball_repeats=15, mlp_repeats=7, torch_repeats=3,
                torch_samples=TORCH_SAMPLES, mlp_tols=MLP_TOLS, vmap_backsolve=True,
                count_grad_nfe=True)


def one_thread_env():
    """XLA on one thread (before jax is imported), unless the caller chose XLA_FLAGS."""
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1")


def first_call(fn, *args):
    """(jax.jit(fn), the seconds of its first call: trace + lower + compile + run)."""
    import jax

    jitted = jax.jit(fn)
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    return jitted, time.perf_counter() - start


def counted(make):
    """(jitted fn, counter): fn = make(field wrapper) with f's executed evaluations
    counted in counter[0]."""
    import jax

    counter = [0]
    return jax.jit(make(lambda f: counting(f, counter))), counter


def nfe_of(fn_counter, *args) -> int:
    import jax

    fn, counter = fn_counter
    counter[0] = 0
    jax.block_until_ready(fn(*args))
    return counter[0]


def _ratio_samples(a: list, b: list) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _torch_block(torch_fns: dict, pair_name: str, pair_fn, repeats: int) -> dict:
    """torch callables timed round-robin with one JAX callable (the ratio's pair)."""
    return time_interleaved({**torch_fns, pair_name: pair_fn}, repeats)


# ================================================================ (ball)


def ball_systems(field_wrap=lambda f: f):
    """{name: fn(h, g, rtol, atol)}: event time (forward) or (t*, (dt*/dh, dt*/dg))."""
    import diffrax
    import jax
    import jax.numpy as jnp
    import optimistix as optx

    import jaxode

    fall = field_wrap(lambda z, t, g: jnp.stack([z[1], -g]))
    floor = jaxode.Event(lambda z, t, g: z[0], direction=-1)
    ts = jnp.array([0.0, BALL_T_END])

    def jaxode_time(adjoint):
        def fn(h, g, rtol, atol):
            sol = jaxode.solve(fall, jnp.stack([h, jnp.zeros_like(h)]), ts, g, event=floor,
                               rtol=rtol, atol=atol, adjoint=adjoint)
            return sol.event_time
        return fn

    def diffrax_time(h, g, rtol, atol):
        event = diffrax.Event(lambda t, y, args, **kw: y[0],
                              optx.Newton(ROOT_FRACTION * rtol, ROOT_FRACTION * atol),
                              direction=False)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, g: fall(y, t, g)), diffrax.Dopri5(), 0.0, BALL_T_END,
            None, jnp.stack([h, jnp.zeros_like(h)]), args=g, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), event=event,
            adjoint=diffrax.RecursiveCheckpointAdjoint())
        return sol.ts[-1]

    def jaxode_time_and_zs(h, g, rtol, atol):
        sol = jaxode.solve(fall, jnp.stack([h, jnp.zeros_like(h)]), ts, g, event=floor,
                           rtol=rtol, atol=atol)
        return sol.event_time, sol.zs

    grad = lambda fn: jax.value_and_grad(fn, argnums=(0, 1))
    return {
        "jaxode": ("fwd", jaxode_time("backsolve")),
        # The same solve, returning zs as well: then its throw check stays in the program
        # (see the note under the table).
        "jaxode (t*, zs)": ("fwd", jaxode_time_and_zs),
        "jaxode backsolve": ("grad", grad(jaxode_time("backsolve"))),
        "jaxode direct": ("grad", grad(jaxode_time("direct"))),
        "diffrax": ("fwd", diffrax_time),
        "diffrax RecursiveCheckpoint": ("grad", grad(diffrax_time)),
    }


def ball_stats(rtol, atol):
    """Steps of one jaxode and one diffrax solve."""
    import diffrax
    import jax
    import jax.numpy as jnp
    import optimistix as optx

    import jaxode

    fall = lambda z, t, g: jnp.stack([z[1], -g])
    sol = jaxode.solve(fall, jnp.array([H, 0.0]), jnp.array([0.0, BALL_T_END]), G,
                       event=jaxode.Event(lambda z, t, g: z[0], direction=-1),
                       rtol=rtol, atol=atol)
    dsol = jax.jit(lambda: diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, g: fall(y, t, g)), diffrax.Dopri5(), 0.0, BALL_T_END, None,
        jnp.array([H, 0.0]), args=G, saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        event=diffrax.Event(lambda t, y, args, **kw: y[0],
                            optx.Newton(ROOT_FRACTION * rtol, ROOT_FRACTION * atol),
                            direction=False)).stats)()
    return {"jaxode": int(sol.stats["num_steps"]), "diffrax": int(dsol["num_steps"])}


def torch_ball(rtol, atol):
    """{name: run() -> (t*, grads or None)} and {name: [fwd NFE, bwd NFE]}."""
    import torch
    import torchdiffeq

    class Fall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = torch.nn.Parameter(torch.tensor(G, dtype=torch.float64))
            self.nfe = 0

        def forward(self, t, z):
            self.nfe += 1
            return torch.stack([z[1], -self.g])

    field = Fall()
    t0 = torch.tensor(0.0, dtype=torch.float64)
    event_fn = lambda t, z: z[0]
    nfe = {}

    def runner(name, interface, grad):
        def run():
            torch.set_num_threads(1)
            field.zero_grad()
            field.nfe = 0
            h = torch.tensor(H, dtype=torch.float64, requires_grad=grad)
            y0 = torch.stack([h, torch.zeros((), dtype=torch.float64)])
            if not grad:
                with torch.no_grad():
                    t_event, _ = torchdiffeq.odeint_event(field, y0, t0, event_fn=event_fn,
                                                          method="dopri5", rtol=rtol,
                                                          atol=atol)
                nfe[name] = [field.nfe, None]
                return float(t_event), None
            t_event, _ = torchdiffeq.odeint_event(field, y0, t0, event_fn=event_fn,
                                                  odeint_interface=interface, method="dopri5",
                                                  rtol=rtol, atol=atol)
            forward = field.nfe
            t_event.backward()
            nfe[name] = [forward, field.nfe - forward]
            return float(t_event.detach()), (float(h.grad), float(field.g.grad))

        return run

    return torch_variants(runner), nfe


def torch_variants(runner, suffix=""):
    """{name: runner(name, interface, grad)} for torchdiffeq's event solve alone and
    differentiated by odeint_adjoint and by backprop through odeint."""
    import torchdiffeq

    variants = (("odeint_event", None, False),
                ("odeint_event + odeint_adjoint", torchdiffeq.odeint_adjoint, True),
                ("odeint_event + odeint (backprop)", torchdiffeq.odeint, True))
    return {f"torchdiffeq {label}{suffix}": runner(f"torchdiffeq {label}{suffix}", interface, grad)
            for label, interface, grad in variants}


def section_ball(cfg) -> dict:
    import jax
    import jax.numpy as jnp

    exact = math.sqrt(2 * H / G)
    exact_grad = np.array([1 / math.sqrt(2 * H * G), -math.sqrt(2 * H) / (2 * G ** 1.5)])
    h, g = jnp.array(H), jnp.array(G)
    args0 = (h, g, jnp.array(BALL_TOLS[0]), jnp.array(BALL_TOLS[0]))
    systems = ball_systems()
    compiled = {}
    for name, (kind, fn) in systems.items():
        c, seconds = first_call(fn, *args0)
        compiled[name] = (kind, c, seconds)
    nfe_fns = {name: counted(lambda wrap, name=name: ball_systems(wrap)[name][1])
               for name in systems}
    rows, records = [], []
    for tol in BALL_TOLS:
        args = (h, g, jnp.array(tol), jnp.array(tol))
        results, nfes = {}, {}
        for name, (_, c, _) in compiled.items():
            results[name] = jax.block_until_ready(c(*args))
            nfes[name] = nfe_of(nfe_fns[name], *args)
        steps = ball_stats(tol, tol)
        timed = {name: (lambda c=c: c(*args)) for name, (_, c, _) in compiled.items()}
        times = time_interleaved(timed, cfg["ball_repeats"], min_sample_s=0.02)
        torch_fns, torch_nfe = torch_ball(tol, tol)
        torch_out = {name: run() for name, run in torch_fns.items()}
        pair = "jaxode backsolve"
        torch_times = time_interleaved({**torch_fns, pair: timed[pair]}, cfg["ball_repeats"],
                                       min_sample_s=0.02)
        per = {}
        for name, (kind, _, compile_s) in compiled.items():
            out = results[name]
            t_event = float(out[0] if isinstance(out, tuple) else out)
            grad_err = None
            if kind == "grad":
                grads = np.array([float(x) for x in out[1]])
                grad_err = float(np.max(np.abs(grads - exact_grad) / np.abs(exact_grad)))
            lib = name.split()[0]
            per[name] = dict(system=name, kind=kind, rtol=tol, atol=tol,
                             time=times[name]["median"], samples=times[name]["samples"],
                             compile=compile_s, t_error=abs(t_event - exact),
                             grad_error=grad_err, nfe=nfes[name], steps=steps[lib])
        for name, (t_event, grads) in torch_out.items():
            grad_err = None if grads is None else float(
                np.max(np.abs(np.array(grads) - exact_grad) / np.abs(exact_grad)))
            fwd, bwd = torch_nfe[name]
            per[name] = dict(system=name, kind="fwd" if grads is None else "grad", rtol=tol,
                             atol=tol, time=torch_times[name]["median"],
                             samples=torch_times[name]["samples"], compile=None,
                             t_error=abs(t_event - exact), grad_error=grad_err,
                             nfe=fwd if bwd is None else fwd + bwd, nfe_fwd=fwd, nfe_bwd=bwd,
                             steps=None)
        pair_samples = torch_times[pair]["samples"]
        for name in torch_out:
            per[name]["jaxode_backsolve_in_block"] = torch_times[pair]["median"]
            per[name]["over_jaxode"] = _ratio_samples(torch_times[name]["samples"],
                                                      pair_samples)
        for r in per.values():
            records.append(r)
            rows.append([f"{tol:.0e}", r["system"], r["kind"], us(r["time"]),
                         fmt(r["compile"], ".2f"), fmt(r["steps"]), fmt(r["nfe"]),
                         fmt(r["t_error"], ".1e"), fmt(r["grad_error"], ".1e")])
        print(f"  ball rtol={tol:.0e} done", file=sys.stderr, flush=True)
    print(table(
        f"(ball) falling ball to the floor, float64, dopri5, rtol = atol, t* = sqrt(2h/g) = "
        f"{exact:.6f}",
        ["rtol", "system", "call", "time us", "1st call s", "steps", "NFE", "|t* err|",
         "grad rel err"], rows,
        note="fwd: the event time; grad: value and gradient of t* w.r.t. (h, g). NFE: "
             "executed evaluations of f\n  (grad: forward + backward). torchdiffeq's "
             "rows come from their own interleaved block (see ratios).\n"
             "jaxode (t*, zs): the same solve returning zs as well. With t* alone, "
             "jaxode's throw check (a host\n  callback on zs) is dead code and leaves the "
             "program, and XLA:CPU then runs it on its thread pool\n  instead of inline "
             "in the caller: a thread hand-off of tens of us per call on a loaded "
             "machine.\n  diffrax's t* keeps its error check (ts[-1] depends on it)."))
    ratios = ball_ratios(records)
    return {"rows": records, "ratios": ratios}


def ball_ratios(records) -> list:
    by = {(r["rtol"], r["system"]): r for r in records}
    rows, out = [], []
    tadj, tfwd = "torchdiffeq odeint_event + odeint_adjoint", "torchdiffeq odeint_event"
    for tol in BALL_TOLS:
        jf, df = by[tol, "jaxode"], by[tol, "diffrax"]
        jb, jd, dg = by[tol, "jaxode backsolve"], by[tol, "jaxode direct"], by[
            tol, "diffrax RecursiveCheckpoint"]
        ta, tf = by[tol, tadj], by[tol, tfwd]
        # torch rows: time / jaxode backsolve's time in the torch block (paired by round);
        # jaxode forward vs torch forward through the main block's ratio of the two JAX
        # systems.
        pr = lambda a, b: _ratio_samples(a["samples"], b["samples"])
        fwd_over_bs = pr(jf, jb)
        r = dict(rtol=tol,
                 fwd_vs_diffrax=pr(jf, df),
                 fwd_with_zs_vs_diffrax=pr(by[tol, "jaxode (t*, zs)"], df),
                 backsolve_grad_vs_diffrax=pr(jb, dg),
                 direct_grad_vs_diffrax=pr(jd, dg),
                 backsolve_grad_vs_torch_adjoint=1 / ta["over_jaxode"],
                 fwd_vs_torch_fwd=fwd_over_bs / tf["over_jaxode"])
        out.append(r)
        rows.append([f"{tol:.0e}", f"{r['fwd_vs_diffrax']:.2f}x",
                     f"{r['fwd_with_zs_vs_diffrax']:.2f}x",
                     f"{r['backsolve_grad_vs_diffrax']:.2f}x",
                     f"{r['direct_grad_vs_diffrax']:.2f}x",
                     f"{r['fwd_vs_torch_fwd']:.3f}x",
                     f"{r['backsolve_grad_vs_torch_adjoint']:.3f}x"])
    print(table("(ball) ratios: jaxode time / peer time (< 1: jaxode faster)",
                ["rtol", "fwd / diffrax", "fwd (t*, zs) / diffrax", "backsolve grad / diffrax",
                 "direct grad / diffrax", "fwd / torch", "backsolve grad / torch adjoint"],
                rows, note="medians over rounds of per-round ratios (torch: through "
                           "jaxode backsolve's grad, timed in both blocks)"))
    return out


# ================================================================ (mlp)


def mlp_workload():
    """Field parameters, the event MLP's (fixed) weights and z0, as float64 NumPy."""
    params = mlp_params(0, np.float64)
    rng = np.random.default_rng(2)
    event_params = (rng.normal(0.0, 1.0, (2, 16)), rng.normal(0.0, 0.5, 16),
                    rng.normal(0.0, 0.25, 16))
    z0 = 0.75 * rng.standard_normal((BATCH, 2))
    return params, event_params, z0


def event_value(z, event_params, xp):
    """cond(z) = 3 + 0.5 tanh(MLP_c(z)) - |z|: positive inside a learned region."""
    w1, b1, w2 = event_params
    inside = xp.tanh(xp.tanh(z @ w1 + b1) @ w2)
    return 3.0 + 0.5 * inside - xp.sqrt(xp.sum(z ** 2) + 1e-12)


def mlp_systems(event_params, field_wrap=lambda f: f, vmap_backsolve=True):
    """{name: (mode, fwd(params, z0, rtol, atol) -> (event times, steps) or None,
    loss(params, z0, rtol, atol) -> mean event time)}."""
    import diffrax
    import jax
    import jax.numpy as jnp
    import optimistix as optx

    import jaxode

    field = field_wrap(mlp_field)
    ep = tuple(jnp.asarray(a) for a in event_params)
    event = jaxode.Event(lambda z, t, p: event_value(z, ep, jnp), direction=-1)
    ts = jnp.array([0.0, T_END])

    def jaxode_vmap(adjoint):
        def fwd(params, z0, rtol, atol):
            def one(z):
                sol = jaxode.solve(field, z, ts, params, event=event, rtol=rtol, atol=atol,
                                   adjoint=adjoint, max_steps=MAX_STEPS)
                return sol.event_time, sol.stats["num_steps"], sol.event_happened
            return jax.vmap(one)(z0)
        return fwd

    def jaxode_lanes(adjoint):
        def fwd(params, z0, rtol, atol):
            sol = jaxode.solve(field, z0, ts, params, event=event, rtol=rtol, atol=atol,
                               adjoint=adjoint, max_steps=MAX_STEPS, batch_axis=0)
            return sol.event_time, sol.stats["num_steps"], sol.event_happened
        return fwd

    def diffrax_vmap(params, z0, rtol, atol):
        def one(z):
            ev = diffrax.Event(lambda t, y, args, **kw: event_value(y, ep, jnp),
                               optx.Newton(ROOT_FRACTION * rtol, ROOT_FRACTION * atol),
                               direction=False)
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, p: field(y, t, p)), diffrax.Dopri5(), 0.0, T_END,
                None, z, args=params, saveat=diffrax.SaveAt(t1=True),
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), event=ev,
                max_steps=MAX_STEPS, adjoint=diffrax.RecursiveCheckpointAdjoint(),
                throw=False)
            # throw=False: a failed root find (Newton's max_steps) is counted, not raised.
            return sol.ts[-1], sol.stats["num_steps"], sol.result == diffrax.RESULTS.event_occurred
        return jax.vmap(one)(z0)

    def loss(fwd):
        # sum(weights * t*) / batch: mean(t*) for weights of ones (a 0/1 mask picks the
        # terms of some samples without a new compile).
        return lambda params, z0, rtol, atol, weights: (
            jnp.sum(weights * fwd(params, z0, rtol, atol)[0]) / z0.shape[0])

    # (mode, forward solve, the solve whose loss is differentiated); the direct
    # systems' forward solve is the backsolve ones' (the same steps).
    systems = {
        "jaxode vmap backsolve": ("vmap", jaxode_vmap("backsolve"),
                                  jaxode_vmap("backsolve") if vmap_backsolve else None),
        "jaxode vmap direct": ("vmap", None, jaxode_vmap("direct")),
        "jaxode batch_axis backsolve": ("batch_axis", jaxode_lanes("backsolve"),
                                        jaxode_lanes("backsolve")),
        "jaxode batch_axis direct": ("batch_axis", None, jaxode_lanes("direct")),
        "diffrax RecursiveCheckpoint": ("vmap", diffrax_vmap, diffrax_vmap),
    }
    return {name: (mode, fwd, None if g is None else jax.value_and_grad(loss(g)))
            for name, (mode, fwd, g) in systems.items()}


def flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.asarray(x, np.float64).ravel()
                           for x in jax.tree_util.tree_leaves(tree)])


def torch_mlp(params_np, event_params, z0_np, rtol, atol):
    """{name: run(n) -> (event times, flat gradient or None)} over the first n samples,
    and {name: [fwd NFE, bwd NFE] per sample (means)}."""
    import torch
    import torchdiffeq

    field = torch_mlp_field(params_np, np.float64)
    ep = tuple(torch.from_numpy(np.array(a, np.float64)) for a in event_params)
    event_fn = lambda t, z: event_value(z, ep, torch)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    nfe = {}

    def runner(name, interface, grad):
        def run(n):
            torch.set_num_threads(1)
            field.zero_grad()
            times, forward, backward = [], 0, 0
            for i in range(n):
                y0 = torch.from_numpy(np.array(z0_np[i]))
                field.nfe = 0
                if grad:
                    t_event, _ = torchdiffeq.odeint_event(
                        field, y0, t0, event_fn=event_fn, odeint_interface=interface,
                        method="dopri5", rtol=rtol, atol=atol)
                    forward += field.nfe
                    field.nfe = 0
                    (t_event / BATCH).backward()  # the gradient of the batch's mean
                    backward += field.nfe
                else:
                    with torch.no_grad():
                        t_event, _ = torchdiffeq.odeint_event(
                            field, y0, t0, event_fn=event_fn, method="dopri5", rtol=rtol,
                            atol=atol)
                    forward += field.nfe
                times.append(float(t_event.detach()))
            nfe[name] = [forward / n, backward / n if grad else None]
            g = (np.concatenate([p.grad.detach().numpy().ravel() for p in field.weights])
                 if grad else None)
            return np.array(times), g

        return run

    return torch_variants(runner, " loop"), nfe


def section_mlp(cfg) -> dict:
    import jax.numpy as jnp

    params_np, event_params, z0_np = mlp_workload()
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params_np]
    z0 = jnp.asarray(z0_np)
    tol_args = lambda tol: (params, z0, jnp.array(tol), jnp.array(tol))
    ones = jnp.ones(BATCH)
    systems = mlp_systems(event_params, vmap_backsolve=cfg["vmap_backsolve"])
    built = {}
    for name, (mode, fwd, grad) in systems.items():
        entry = {"mode": mode}
        if fwd is not None:
            entry["fwd"], entry["fwd_compile"] = first_call(fwd, *tol_args(MAIN_TOL))
        if grad is not None:
            entry["grad"], entry["grad_compile"] = first_call(grad, *tol_args(MAIN_TOL),
                                                              ones)
        built[name] = entry
        print(f"  mlp: {name} compiled", file=sys.stderr, flush=True)
    ref_args = tol_args(REF_TOL)
    t_ref, g_ref, reference = _mlp_reference(built, ref_args, ones)

    records = []
    torch_records = {}
    for tol in cfg["mlp_tols"]:
        args = tol_args(tol)
        per = _mlp_round(cfg, built, args, ones, tol, t_ref, g_ref)
        if tol == MAIN_TOL:
            torch_records = run_torch_mlp(cfg, params_np, event_params, z0_np, t_ref, g_ref,
                                          built, args, ref_args)
            if cfg["count_grad_nfe"]:
                count_mlp_nfe(per, event_params, args, ones, cfg)
        records.extend(per.values())
        print(f"  mlp rtol={tol:.0e} done", file=sys.stderr, flush=True)

    print_mlp(records, torch_records, reference, cfg)
    ratios = mlp_ratios(records, torch_records, cfg)
    ratios["matched"] = matched_error_rounds(cfg, built, records, tol_args, ones, t_ref)
    return {"rows": records, "torch": torch_records, "reference": reference,
            "ratios": ratios,
            "settings": dict(batch=BATCH, t_end=T_END, tols=list(cfg["mlp_tols"]),
                             ref_tol=REF_TOL, max_steps=MAX_STEPS,
                             torch_samples=cfg["torch_samples"])}


def _mlp_reference(built: dict, ref_args, ones):
    """(t*, flat gradient, summary): jaxode vmap direct at REF_TOL (its forward is jaxode
    vmap backsolve's solve), cross-checked against diffrax at REF_TOL."""
    import jax

    t_ref, _, happened_ref = jax.block_until_ready(built["jaxode vmap backsolve"]["fwd"](*ref_args))
    _, g_ref = jax.block_until_ready(built["jaxode vmap direct"]["grad"](*ref_args, ones))
    t_ref, g_ref = np.asarray(t_ref), flat(g_ref)
    t_dfx, _, _ = built["diffrax RecursiveCheckpoint"]["fwd"](*ref_args)
    _, g_dfx = built["diffrax RecursiveCheckpoint"]["grad"](*ref_args, ones)
    reference = dict(
        tol=REF_TOL, happened=int(np.sum(happened_ref)), batch=BATCH,
        t_min=float(t_ref.min()), t_median=float(np.median(t_ref)), t_max=float(t_ref.max()),
        diffrax_t_diff=float(np.max(np.abs(np.asarray(t_dfx) - t_ref))),
        diffrax_grad_diff=float(np.linalg.norm(flat(g_dfx) - g_ref) / np.linalg.norm(g_ref)))
    print(f"  mlp: reference at {REF_TOL:g}: {reference['happened']}/{BATCH} events, "
          f"t* in [{reference['t_min']:.3f}, {reference['t_max']:.3f}]; diffrax at "
          f"{REF_TOL:g} differs by {reference['diffrax_t_diff']:.1e} (t*), "
          f"{reference['diffrax_grad_diff']:.1e} (grad)", file=sys.stderr, flush=True)
    return t_ref, g_ref, reference


def _mlp_round(cfg, built: dict, args, ones, tol, t_ref, g_ref) -> dict:
    """{system: record} at one tolerance: steps, t* and gradient errors, and the times of
    one interleaved block (jax.vmap backsolve's gradient at MAIN_TOL only, in its own)."""
    import jax

    per, timed, slow = {}, {}, "jaxode vmap backsolve"
    for name, e in built.items():
        r = dict(system=name, mode=e["mode"], rtol=tol, atol=tol)
        if "fwd" in e:
            t_event, steps, happened = jax.block_until_ready(e["fwd"](*args))
            t_event, steps = np.asarray(t_event), np.asarray(steps)
            r.update(fwd_compile=e["fwd_compile"], steps_mean=float(steps.mean()),
                     steps_max=int(steps.max()), happened=int(np.sum(happened)),
                     t_error=float(np.max(np.abs(t_event - t_ref))))
            timed[f"{name}|fwd"] = lambda e=e: e["fwd"](*args)
        if "grad" in e and (name != slow or tol == MAIN_TOL):
            _, g = jax.block_until_ready(e["grad"](*args, ones))
            r.update(grad_compile=e["grad_compile"],
                     grad_error=float(np.linalg.norm(flat(g) - g_ref) / np.linalg.norm(g_ref)))
            if name != slow:
                timed[f"{name}|grad"] = lambda e=e: e["grad"](*args, ones)
        per[name] = r
    # Steps and t* of the direct systems: their forward solve is the backsolve one's.
    for direct, fwd_of in (("jaxode vmap direct", "jaxode vmap backsolve"),
                           ("jaxode batch_axis direct", "jaxode batch_axis backsolve")):
        for k in ("steps_mean", "steps_max", "happened"):
            per[direct][k] = per[fwd_of][k]
        # t* of the direct solve itself (rounding may differ): from its gradient's value.
        per[direct]["t_error"] = None
    times = time_interleaved(timed, cfg["mlp_repeats"])
    for key, t in times.items():
        name, kind = key.split("|")
        per[name][f"{kind}_time"] = t["median"]
        per[name][f"{kind}_samples"] = t["samples"]
    if "grad" in built[slow] and tol == MAIN_TOL:
        # jax.vmap of the adjoint method: seconds per call; 3 samples, paired with the
        # batch_axis backsolve gradient.
        pair = "jaxode batch_axis backsolve"
        t = time_interleaved({slow: lambda: built[slow]["grad"](*args, ones),
                              pair: lambda: built[pair]["grad"](*args, ones)}, 3)
        per[slow]["grad_time"] = t[slow]["median"]
        per[slow]["grad_over_batch_axis_backsolve"] = _ratio_samples(
            t[slow]["samples"], t[pair]["samples"])
    return per


# Counted (each is one more compile): the forward solves, and the gradients of one system
# per adjoint and batching (batch_axis direct and vmap backsolve take the same forward
# steps as vmap direct and batch_axis backsolve).
COUNTED = {"jaxode vmap backsolve": ("fwd",), "jaxode vmap direct": ("grad",),
           "jaxode batch_axis backsolve": ("fwd", "grad"),
           "diffrax RecursiveCheckpoint": ("fwd", "grad")}


def count_mlp_nfe(per, event_params, args, ones, cfg):
    """Executed NFE (batched evaluations) of the forward solves and gradients."""
    import jax

    for name, kinds in COUNTED.items():
        counter = [0]
        _, fwd, grad = mlp_systems(event_params, lambda f: counting(f, counter),
                                   cfg["vmap_backsolve"])[name]
        if "fwd" in kinds:
            counter[0] = 0
            jax.block_until_ready(jax.jit(fwd)(*args))
            per[name]["nfe_fwd"] = counter[0]
        if "grad" in kinds:
            counter[0] = 0
            jax.block_until_ready(jax.jit(grad)(*args, ones))
            per[name]["nfe_grad"] = counter[0]
        print(f"  mlp: {name} NFE counted", file=sys.stderr, flush=True)


def run_torch_mlp(cfg, params_np, event_params, z0_np, t_ref, g_ref, built, args,
                  ref_args) -> dict:
    import jax.numpy as jnp

    n = cfg["torch_samples"]
    fns, nfe = torch_mlp(params_np, event_params, z0_np, MAIN_TOL, MAIN_TOL)
    outs = {name: run(n) for name, run in fns.items()}  # also the warm-up
    # The reference gradient of the first n samples' terms of the mean (jaxode vmap direct
    # at REF_TOL, the other samples' weights zero).
    mask = jnp.asarray(np.arange(BATCH) < n, np.float64)
    g_ref_n = flat(built["jaxode vmap direct"]["grad"](*ref_args, mask)[1])
    pair = "jaxode batch_axis backsolve"
    timed = {name: (lambda run=run: run(n)) for name, run in fns.items()}
    ones = jnp.ones(BATCH)
    t = _torch_block(timed, pair, lambda: built[pair]["grad"](*args, ones),
                     cfg["torch_repeats"])
    rec = {}
    for name, (times, g) in outs.items():
        rec[name] = dict(
            system=name, samples_timed=n, time_per_sample=t[name]["median"] / n,
            time_batch=t[name]["median"] * BATCH / n,
            over_pair=_ratio_samples(t[name]["samples"], t[pair]["samples"]) * BATCH / n,
            pair=pair, pair_time_in_block=t[pair]["median"],
            t_error=float(np.max(np.abs(times - t_ref[:n]))),
            grad_error=None if g is None else float(
                np.linalg.norm(g - g_ref_n) / np.linalg.norm(g_ref_n)),
            nfe_fwd=nfe[name][0], nfe_bwd=nfe[name][1])
    rec["_reference_subset_vs_full"] = float(np.linalg.norm(g_ref_n) / np.linalg.norm(g_ref))
    return rec


def print_mlp(records, torch_records, reference, cfg):
    rows = []
    for r in records:
        nfe = "-"
        if "nfe_fwd" in r or "nfe_grad" in r:
            nfe = f"{fmt(r.get('nfe_fwd'))}/{fmt(r.get('nfe_grad'))}"
        rows.append([f"{r['rtol']:.0e}", r["system"], ms(r.get("fwd_time")),
                     ms(r.get("grad_time")),
                     fmt(r.get("fwd_compile"), ".1f") + "/" + fmt(r.get("grad_compile"), ".1f"),
                     f"{r['steps_mean']:.1f}/{r['steps_max']}", fmt(r["happened"]), nfe,
                     fmt(r.get("t_error"), ".1e"), fmt(r.get("grad_error"), ".1e")])
    for name, r in torch_records.items():
        if name.startswith("_"):
            continue
        kind = "fwd" if r["grad_error"] is None else "grad"
        t = ms(r["time_batch"])
        rows.append([f"{MAIN_TOL:.0e}", name, t if kind == "fwd" else "-",
                     t if kind == "grad" else "-", "-", "-", "-",
                     f"{r['nfe_fwd']:.0f}" + ("" if r["nfe_bwd"] is None
                                              else f"+{r['nfe_bwd']:.0f}") + " per sample",
                     fmt(r["t_error"], ".1e"), fmt(r["grad_error"], ".1e")])
    note = (
        f"fwd: one solve of the {BATCH}-sample batch to its events; grad: value and "
        "gradient of mean(t*) w.r.t. the\n  field's MLP parameters. 1st call: fwd/grad, "
        "s (compile + first run;\n  tolerances traced: one per system). steps: per "
        "sample, mean/max "
        "(a vmapped\n  loop runs until its slowest lane). events: samples whose event was "
        "found (diffrax: result\n  event_occurred; a failed Newton root find counts as "
        "none). NFE: executed (batched)\n  evaluations, forward solve / whole gradient, at "
        f"{MAIN_TOL:.0e} only; torch: per sample, forward + backward.\n"
        f"|t* err|: max over the batch against jaxode at {REF_TOL:g} (direct rows: "
        "the solve is the backsolve row's);\n  grad err: relative 2-norm error of the "
        "gradient against jaxode vmap direct at "
        f"{REF_TOL:g}.\n  Reference check: diffrax at {REF_TOL:g} differs by "
        f"{reference['diffrax_t_diff']:.1e} in t*, {reference['diffrax_grad_diff']:.1e} "
        f"in the gradient; {reference['happened']}/{BATCH}\n  samples cross, t* in "
        f"[{reference['t_min']:.2f}, {reference['t_max']:.2f}].\n"
        f"torchdiffeq: a loop of single-sample odeint_event solves over the first "
        f"{cfg['torch_samples']} samples, time x {BATCH // cfg['torch_samples']}\n  (its "
        "errors: over those samples; grad: of their terms of the mean).")
    print(table(f"(mlp) MLP field 2(+t)-64-64-2, learned event, batch {BATCH}, float64, "
                "dopri5, rtol = atol",
                ["rtol", "system", "fwd ms", "grad ms", "1st call s", "steps", "events", "NFE",
                 "|t* err|", "grad err"], rows, note=note))


def time_at_error(points, error):
    """Time at `error` on the curve of (error, time) points, by log-log interpolation;
    None outside its range (as `benchmarks.work_precision.time_at_error`)."""
    points = sorted(p for p in points if p[0] is not None)
    for (e0, t0), (e1, t1) in zip(points, points[1:]):
        if e0 <= error <= e1 and e0 > 0 and e1 > e0:
            w = (math.log(error) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
    return next((t for e, t in points if e == error), None)


# Gradient systems and the forward solve whose event times they differentiate.
GRAD_FORWARD = {"jaxode batch_axis backsolve": "jaxode batch_axis backsolve",
                "jaxode batch_axis direct": "jaxode batch_axis backsolve",
                "jaxode vmap direct": "jaxode vmap backsolve"}
MATCH_MARGIN, MATCH_TRIES, MATCH_SHRINK = 0.9, 4, 0.8


def rtol_at_error(points, error):
    """The rtol at which a system's |t* err| would be `error`, by log-log interpolation
    of its (rtol, error) runs; None outside them."""
    points = sorted((r, e) for r, e in points if e)
    for (r0, e0), (r1, e1) in zip(points, points[1:]):
        if min(e0, e1) <= error <= max(e0, e1) and e0 != e1:
            w = (math.log(error) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
    return None


def _matched_rtol(fwd, points, error, tol_args, t_ref):
    """(rtol, |t* err|) of a run of `fwd` whose error is at most `error`: from the
    interpolated rtol at MATCH_MARGIN x error, tightened by MATCH_SHRINK until it is."""
    import jax

    rtol = rtol_at_error(points, MATCH_MARGIN * error)
    for _ in range(MATCH_TRIES if rtol else 0):
        t_event, _, _ = jax.block_until_ready(fwd(*tol_args(rtol)))
        found = float(np.max(np.abs(np.asarray(t_event) - t_ref)))
        if found <= error:
            return rtol, found
        rtol *= MATCH_SHRINK
    return None, None


def matched_error_rounds(cfg, built, records, tol_args, ones, t_ref) -> list:
    """Per diffrax rtol: each jaxode gradient at the rtol where its event-time error is
    at most diffrax's, timed in one interleaved block with diffrax's gradient."""
    dfx = "diffrax RecursiveCheckpoint"
    out, rows, batch = [], [], max(r["happened"] for r in records)
    names = [n for n in GRAD_FORWARD if n in built]
    for ref in [r for r in records if r["system"] == dfx and r["happened"] == batch]:
        matched = {}
        for fwd in sorted({GRAD_FORWARD[n] for n in names}):
            points = [(r["rtol"], r["t_error"]) for r in records if r["system"] == fwd]
            matched[fwd] = _matched_rtol(built[fwd]["fwd"], points, ref["t_error"],
                                         tol_args, t_ref)
        args = {dfx: tol_args(ref["rtol"])}
        args.update({n: tol_args(matched[GRAD_FORWARD[n]][0]) for n in names
                     if matched[GRAD_FORWARD[n]][0] is not None})
        timed = {n: (lambda n=n: built[n]["grad"](*args[n], ones)) for n in args}
        times = time_interleaved(timed, cfg["mlp_repeats"])
        row = [f"{ref['rtol']:.0e}", fmt(ref["t_error"], ".1e"), ms(times[dfx]["median"])]
        for name in names:
            rtol, error = matched[GRAD_FORWARD[name]]
            ratio = None if rtol is None else _ratio_samples(times[name]["samples"],
                                                             times[dfx]["samples"])
            out.append(dict(diffrax_rtol=ref["rtol"], diffrax_t_error=ref["t_error"],
                            system=name, rtol=rtol, t_error=error, ratio=ratio,
                            grad_time=None if rtol is None else times[name]["median"],
                            diffrax_grad_time=times[dfx]["median"]))
            row.append("-" if rtol is None else
                       f"{ratio:.2f} @{rtol:.1e} ({error:.1e})")
        rows.append(row)
        print(f"  mlp: matched error at diffrax rtol={ref['rtol']:.0e} done", file=sys.stderr,
              flush=True)
    print(table("(mlp) gradient time / diffrax's at equal or smaller event-time error, "
                "one block per row",
                ["diffrax rtol", "diffrax |t* err|", "diffrax grad ms"] + names, rows,
                note="each jaxode system at the rtol (@) where its |t* err| (in brackets) is "
                     f"at most diffrax's: interpolated\n  from its runs above at "
                     f"{MATCH_MARGIN}x diffrax's error, tightened by x{MATCH_SHRINK} until "
                     "a run's error is at most diffrax's;\n  timed in one interleaved "
                     "block with diffrax's gradient. target: <= 0.5."))
    return out


def mlp_ratios(records, torch_records, cfg) -> dict:
    """Gradient time ratios against diffrax at equal rtol and at equal or smaller
    event-time error, and against torchdiffeq's adjoint at MAIN_TOL."""
    dfx = "diffrax RecursiveCheckpoint"
    tols = {r["rtol"] for r in records}
    # Systems with a gradient at every rtol (jax.vmap backsolve: at MAIN_TOL only).
    jaxode_grads = [n for n in ("jaxode batch_axis backsolve", "jaxode batch_axis direct",
                                "jaxode vmap direct", "jaxode vmap backsolve")
                    if {r["rtol"] for r in records
                        if r["system"] == n and r.get("grad_time")} == tols]
    # Event-time error of a gradient system = that of its forward solve.
    err = {}
    for r in records:
        fwd_of = GRAD_FORWARD.get(r["system"], r["system"])
        src = next(x for x in records if x["system"] == fwd_of and x["rtol"] == r["rtol"])
        err[r["system"], r["rtol"]] = src["t_error"]
    rows, equal_rtol, equal_error = [], [], []
    slow = next((r for r in records if r["system"] == "jaxode vmap backsolve"
                 and r.get("grad_time")), None)
    vmap_note = ""
    if slow is not None and "jaxode vmap backsolve" not in jaxode_grads:
        ref = next(r for r in records if r["system"] == dfx and r["rtol"] == slow["rtol"])
        equal_rtol.append(dict(rtol=slow["rtol"], system=slow["system"],
                               ratio=slow["grad_time"] / ref["grad_time"]))
        vmap_note = (f"jaxode vmap backsolve (timed at {slow['rtol']:.0e} only): "
                     f"{slow['grad_time'] / ref['grad_time']:.2f}x diffrax's time at equal "
                     "rtol.\n")
    batch = max(r["happened"] for r in records)
    for ref in [r for r in records if r["system"] == dfx]:
        if ref["happened"] < batch:  # a failed root find: no error level to compare at
            rows.append([f"{ref['rtol']:.0e}", f"{batch - ref['happened']} root find(s) "
                         "failed", ms(ref["grad_time"])] + ["-"] * len(jaxode_grads))
            continue
        row = [f"{ref['rtol']:.0e}", fmt(ref["t_error"], ".1e"), ms(ref["grad_time"])]
        for name in jaxode_grads:
            runs = [r for r in records if r["system"] == name and r.get("grad_time")]
            same = next(r for r in runs if r["rtol"] == ref["rtol"])
            value = _ratio_samples(same["grad_samples"], ref["grad_samples"])  # same block
            equal_rtol.append(dict(rtol=ref["rtol"], system=name, ratio=value))
            ok = [r for r in runs if err[name, r["rtol"]] <= ref["t_error"]]
            best = min(ok, key=lambda r: r["grad_time"]) if ok else None
            ratio = None if best is None else best["grad_time"] / ref["grad_time"]
            at = time_at_error([(err[name, r["rtol"]], r["grad_time"]) for r in runs],
                               ref["t_error"])
            interpolated = None if at is None else at / ref["grad_time"]
            equal_error.append(dict(diffrax_rtol=ref["rtol"], system=name, ratio=ratio,
                                    at_rtol=None if best is None else best["rtol"],
                                    interpolated=interpolated))
            row.append(f"{value:.2f} | " + ("-" if best is None else
                                            f"{ratio:.2f} @{best['rtol']:.0e}") + " | "
                       + ("-" if interpolated is None else f"{interpolated:.2f}"))
        rows.append(row)
    print(table("(mlp) gradient time / diffrax's gradient time: a | b | c",
                ["diffrax rtol", "diffrax |t* err|", "diffrax grad ms"] + jaxode_grads, rows,
                note=vmap_note + "a: at equal rtol; b: the fastest run of that system "
                     "whose |t* err| <= diffrax's (@ its rtol);\n  c: its time at "
                     "diffrax's |t* err|, by log-log interpolation between its own runs "
                     "(- outside them).\n"
                     "  target: <= 0.5 at equal or smaller error. Runs at different rtol "
                     "were timed in different\n  interleaved blocks."))
    vs_torch = _torch_ratios(records, torch_records, jaxode_grads, cfg)
    return {"equal_rtol": equal_rtol, "equal_error": equal_error, "vs_torch": vs_torch}


def _torch_ratios(records, torch_records, jaxode_grads, cfg) -> dict:
    """jaxode's gradient (and forward) times over torchdiffeq's at MAIN_TOL."""
    vs_torch = {}
    tadj = torch_records.get("torchdiffeq odeint_event + odeint_adjoint loop")
    if not tadj:
        return vs_torch
    pair_over_torch = 1 / tadj["over_pair"]  # jaxode batch_axis backsolve / torch adjoint
    main = {r["system"]: r for r in records if r["rtol"] == MAIN_TOL}
    pair = main["jaxode batch_axis backsolve"]
    trows = []
    for name in jaxode_grads:
        # Through the pair: (name / pair in the JAX block) x (pair / torch in its block).
        value = _ratio_samples(main[name]["grad_samples"], pair["grad_samples"]) \
            * pair_over_torch
        vs_torch[name] = value
        trows.append([name, ms(main[name]["grad_time"]), f"{value:.4f}x",
                      f"{1 / value:.0f}x faster"])
    tf = torch_records["torchdiffeq odeint_event loop"]
    for name in ("jaxode batch_axis backsolve", "jaxode vmap backsolve",
                 "diffrax RecursiveCheckpoint"):
        if main[name].get("fwd_time"):
            value = _ratio_samples(main[name]["fwd_samples"], pair["grad_samples"]) \
                / tf["over_pair"]
            vs_torch[name + " (fwd)"] = value
            trows.append([name + " (fwd)", ms(main[name]["fwd_time"]), f"{value:.4f}x",
                          f"{1 / value:.0f}x faster"])
    print(table(f"(mlp) against torchdiffeq at rtol {MAIN_TOL:.0e}: jaxode time / "
                "torchdiffeq's (grad: odeint_event + odeint_adjoint; fwd: odeint_event)",
                ["system", "ms", "ratio", ""], trows,
                note=f"torch loop over {cfg['torch_samples']} samples scaled to {BATCH}, "
                     "paired with jaxode batch_axis backsolve's gradient in its own "
                     "block; target: >= 10x faster"))
    return vs_torch


# ================================================================ main


def _git_state() -> dict:
    """The commit benchmarked and whether jaxode/ had uncommitted changes."""
    from .gradients import _git_state as state

    return state()


def _meta(args, cfg) -> dict:
    found = versions(("jax", "jaxlib", "equinox", "diffrax", "optimistix", "torch",
                      "torchdiffeq", "jaxode"))
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "sections": list(args.section), "quick": args.quick, "versions": found,
            "python": platform.python_version(), "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS"),
            "jaxode_source": _git_state(),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and tolerances, 8 torch samples: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "events.json"))
    args = parser.parse_args(argv)
    one_thread_env()
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_enable_compilation_cache", False)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))  # backend start-up, not timed
    import torch

    torch.set_num_threads(1)
    cfg = config(args.quick)
    started = time.perf_counter()
    results = {"meta": _meta(args, cfg)}
    source = results["meta"]["jaxode_source"]
    print(f"jaxode at {str(source['commit'])[:10]}"
          + (" with uncommitted changes in jaxode/" if source["jaxode_dirty"] else "")
          + f"; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}", file=sys.stderr, flush=True)
    for name, section in (("ball", section_ball), ("mlp", section_mlp)):
        if name in args.section:
            start = time.perf_counter()
            results[name] = section(cfg)
            results[name]["wall_s"] = time.perf_counter() - start
            print(f"  {name}: {results[name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    results["meta"]["wall_s"] = time.perf_counter() - started
    write_results(results, args.out)


if __name__ == "__main__":
    main()
