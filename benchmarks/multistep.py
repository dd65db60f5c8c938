"""Multistep benchmark (issue 16): adaptive variable-order Adams against Runge-Kutta.

    PYTHONPATH=. .venv/bin/python -m benchmarks.multistep [--section classic mlp odenet]
                                                         [--quick] [--odenet-batch 128]

(classic) the four classic float64 problems of `benchmarks.solve` (b): error at the
    final time against scipy's DOP853 at 1e-13, NFE and time per solve at rtol = atol =
    1e-4 ... 1e-10, for jaxode's adams, dopri5, tsit5 and dopri8, diffrax's Dopri5,
    Tsit5 and Dopri8 and scipy's LSODA (the non-stiff Adams mode of ODEPACK; these
    problems never switch it to BDF). Target: at rtol <= 1e-8, adams takes <= 0.6x
    dopri5's NFE at equal or smaller error (adams' NFE at dopri5's error is read off
    its own work-precision line, log-log interpolation between its tolerances);
(mlp) the neural-ODE workload of `benchmarks.solve` (a) (MLP field, 512 initial
    conditions solved as one system, 50 outputs on [0, 5]) in float64, error against
    dopri8 at 1e-13, at the same tolerances (atol = rtol / 100);
(odenet) one ODE-Net training step (`benchmarks.odenet_step`'s MNIST architecture:
    forward, adjoint gradient, SGD-momentum update) with adams and with dopri5 at rtol =
    atol = 1e-5, float32: time per step, forward and backward NFE. Target: adams takes
    fewer evaluations and less time. Before it, the ODE block's forward solve in float64
    at 1e-4 ... 1e-6 against a tight reference: NFE and the true error of each solver (the
    ReLU field's kinks make dopri5's error estimate far too optimistic); and after it, a
    step with adams at the loosest of its tolerances there (1e-4, 7e-5, ... 1e-6) at
    which its error is at most dopri5's at 1e-5 (the comparison at equal error).

Each JAX system is compiled once with traced tolerances; the times of one problem are
sampled round-robin (`common.time_interleaved`), so load from other processes falls
on all alike. NFE: jaxode's `stats["nfe"]`, diffrax's by a counting callback, scipy's
`nfev`. The odenet section runs in a child process in float32. Tables go to stdout,
everything to bench_results/multistep.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
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
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("classic", "mlp", "odenet")
TOLS = (1e-4, 1e-6, 1e-8, 1e-10)
# adams also runs at these, so that its line reaches the errors dopri5 gets at 1e-10.
EXTRA_ADAMS_TOLS = (1e-11, 1e-12)
JAXODE = ("adams", "dopri5", "tsit5", "dopri8")
DIFFRAX = ("dopri5", "tsit5", "dopri8")
MAX_STEPS = 100_000
ODENET_TOL = 1e-5  # the training step's target tolerance
ODENET_PRECISION_TOLS = {"dopri5": (1e-4, 1e-5, 1e-6),
                         # finer, to find the tolerance of dopri5's error at 1e-5
                         "adams": (1e-4, 7e-5, 5e-5, 3e-5, 2e-5, 1e-5, 1e-6)}


def _jaxode_fn(field, t_end, method, ts=None):
    import jax.numpy as jnp

    import jaxode

    ts = jnp.array([0.0, t_end]) if ts is None else ts

    def fn(y0, rtol, atol):
        sol = jaxode.solve(field, y0, ts, None, solver=method, rtol=rtol, atol=atol,
                           max_steps=MAX_STEPS)
        return sol.zs, sol.stats["nfe"]

    return fn


def _diffrax_fn(field, t_end, method, ts=None):
    import diffrax

    solver = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "dopri8": diffrax.Dopri8}[method]
    saveat = diffrax.SaveAt(t1=True) if ts is None else diffrax.SaveAt(ts=ts)

    def fn(y0, rtol, atol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: field(y, t, args)), solver(), 0.0, t_end, None,
            y0, saveat=saveat, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=MAX_STEPS)
        return sol.ys, sol.stats["num_steps"]

    return fn


def _sweep(field, numpy_field, y0, t_end, reference, cfg, ts=None, atol_factor=1.0):
    """Every system at every tolerance: {(system, tol): {error, nfe, time_s}}."""
    import jax
    import jax.numpy as jnp
    from scipy.integrate import solve_ivp

    systems = [("jaxode", m) for m in JAXODE] + [("diffrax", m) for m in DIFFRAX]
    found, timed = {}, {}
    for system, method in systems:
        make = _jaxode_fn if system == "jaxode" else _diffrax_fn
        fn = jax.jit(make(field, t_end, method, ts))
        counter = [0]
        counted = jax.jit(make(counting(field, counter), t_end, method, ts))
        tols = TOLS + (EXTRA_ADAMS_TOLS if method == "adams" else ())
        for tol in tols:
            rtol = jnp.asarray(tol, y0.dtype)
            atol = jnp.asarray(tol * atol_factor, y0.dtype)
            ys, nfe = jax.block_until_ready(fn(y0, rtol, atol))
            if system == "diffrax":
                counter[0] = 0
                jax.block_until_ready(counted(y0, rtol, atol))
                nfe = counter[0]
            ys = np.asarray(ys)
            error = float(np.max(np.abs((ys[-1] if ts is None else ys) - reference)))
            found[(system, method, tol)] = {"error": error, "nfe": int(nfe)}
            if tol in TOLS:
                timed[(system, method, tol)] = (lambda fn=fn, r=rtol, a=atol: fn(y0, r, a))
    if cfg["repeats"]:
        times = time_interleaved(timed, cfg["repeats"], cfg["min_sample"])
        for key, value in times.items():
            found[key]["time_s"] = value["median"]
    if numpy_field is not None:
        y0_np = np.asarray(y0)
        for tol in TOLS:
            kwargs = dict(method="LSODA", rtol=tol, atol=tol * atol_factor,
                          t_eval=None if ts is None else np.asarray(ts))
            call = lambda: solve_ivp(lambda t, y: numpy_field(y, t), (0.0, t_end), y0_np,
                                     **kwargs)
            sol = call()
            best = math.inf
            for _ in range(max(1, cfg["repeats_scipy"])):
                start = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - start)
            ys = sol.y[:, -1] if ts is None else sol.y.T.reshape(reference.shape)
            found[("scipy", "lsoda", tol)] = {
                "error": float(np.max(np.abs(ys - reference))), "nfe": int(sol.nfev),
                "time_s": best}
    return found


def _nfe_at_error(found, system, method, error):
    """The NFE `method`'s work-precision line needs for `error` (log-log interpolation
    between its tolerances); None beyond the line's reach."""
    points = sorted((v["error"], v["nfe"]) for (s, m, _), v in found.items()
                    if s == system and m == method and v["error"] > 0)
    if not points:
        return None
    errors = np.log([p[0] for p in points])
    nfes = np.log([p[1] for p in points])
    if np.log(error) < errors[0]:
        return None
    if np.log(error) >= errors[-1]:
        return float(points[-1][1])
    # The line's NFE is monotone in the tolerance, not always in the error: take the
    # least NFE that reaches at most this error.
    reach = [n for e, n in points if e <= error]
    interpolated = float(np.exp(np.interp(np.log(error), errors, nfes)))
    return min(min(reach), interpolated) if reach else interpolated


def _rows(problem, found):
    rows = []
    for (system, method, tol), v in sorted(found.items(), key=lambda kv: (-kv[0][2], kv[0][:2])):
        rows.append({"problem": problem, "system": system, "method": method, "tol": tol, **v})
    return rows


def _print_rows(title, rows):
    print(table(title, ["problem", "tol", "system", "method", "NFE", "error", "time ms"],
                [[r["problem"], fmt(r["tol"], ".0e"), r["system"], r["method"], fmt(r["nfe"]),
                  fmt(r["error"], ".2e"), ms(r.get("time_s"))] for r in rows
                 if r["tol"] in TOLS]), flush=True)


def _targets(problem, found):
    out = []
    for tol in (1e-8, 1e-10):
        d = found[("jaxode", "dopri5", tol)]
        a = found[("jaxode", "adams", tol)]
        equal = _nfe_at_error(found, "jaxode", "adams", d["error"])
        ratio = None if equal is None else equal / d["nfe"]
        lsoda = found.get(("scipy", "lsoda", tol))
        out.append({"problem": problem, "tol": tol, "dopri5_nfe": d["nfe"],
                    "dopri5_error": d["error"], "adams_nfe": a["nfe"], "adams_error": a["error"],
                    "adams_nfe_at_dopri5_error": equal, "ratio": ratio,
                    "lsoda_nfe": None if lsoda is None else lsoda["nfe"],
                    "lsoda_error": None if lsoda is None else lsoda["error"],
                    "met": ratio is not None and ratio <= 0.6})
    return out


def _print_targets(title, targets):
    print(table(title, ["problem", "tol", "dopri5 NFE", "error", "adams NFE", "error",
                        "adams NFE at dopri5's error", "ratio", "LSODA NFE", "error", "<= 0.6"],
                [[t["problem"], fmt(t["tol"], ".0e"), fmt(t["dopri5_nfe"]),
                  fmt(t["dopri5_error"], ".1e"), fmt(t["adams_nfe"]), fmt(t["adams_error"], ".1e"),
                  fmt(t["adams_nfe_at_dopri5_error"], ".0f"), fmt(t["ratio"], ".2f"),
                  fmt(t["lsoda_nfe"]), fmt(t["lsoda_error"], ".1e"), fmt(t["met"])]
                 for t in targets]), flush=True)


def section_classic(cfg):
    import jax
    import jax.numpy as jnp
    from scipy.integrate import solve_ivp

    from .solve import PROBLEMS_B

    assert jax.config.jax_enable_x64
    rows, targets = [], []
    for problem, (f, y0_list, t_end) in PROBLEMS_B.items():
        ref = solve_ivp(lambda t, y, f=f: f(y, t, np), (0.0, t_end), np.array(y0_list),
                        method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
        field = lambda y, t, p, f=f: f(y, t, jnp)  # noqa: E731
        found = _sweep(field, lambda y, t, f=f: f(y, t, np), jnp.asarray(y0_list, jnp.float64),
                       t_end, ref, cfg)
        rows += _rows(problem, found)
        targets += _targets(problem, found)
        _print_rows(f"(classic) {problem}", _rows(problem, found))
    _print_targets("(classic) targets: adams vs dopri5 at equal or smaller error", targets)
    return {"rows": rows, "targets": targets}


def section_mlp(cfg):
    import jax
    import jax.numpy as jnp

    import jaxode

    assert jax.config.jax_enable_x64
    params = [(jnp.asarray(w, jnp.float64), jnp.asarray(b, jnp.float64))
              for w, b in mlp_params(0, np.float64)]
    batch, t_end = cfg["mlp_batch"], 5.0
    y0 = jnp.asarray(np.random.default_rng(1).normal(size=(batch * 2,)))
    ts = jnp.linspace(0.0, t_end, 50)
    field = lambda y, t, p: mlp_field(y.reshape(batch, 2), t, params).reshape(-1)  # noqa: E731
    reference = np.asarray(jaxode.odeint(field, y0, ts, solver="dopri8", rtol=1e-13,
                                         atol=1e-15, max_steps=MAX_STEPS))
    np_params = [(np.asarray(w), np.asarray(b)) for w, b in params]

    def numpy_field(y, t):
        z = y.reshape(batch, 2)
        h = np.concatenate([z, np.full((batch, 1), t)], axis=1)
        (w1, b1), (w2, b2), (w3, b3) = np_params
        h = np.tanh(h @ w1 + b1)
        h = np.tanh(h @ w2 + b2)
        return (h @ w3 + b3).reshape(-1)

    found = _sweep(field, numpy_field, y0, t_end, reference, cfg, ts=ts, atol_factor=1e-2)
    rows = _rows(f"MLP x{batch}", found)
    _print_rows(f"(mlp) MLP field, {batch} initial conditions as one system, 50 outputs, "
                "float64, atol = rtol/100", rows)
    targets = _targets(f"MLP x{batch}", found)
    _print_targets("(mlp) adams vs dopri5 at equal or smaller error", targets)
    return {"rows": rows, "targets": targets}


def _odenet_step(method, tol, cfg):
    """One training step with `method` at rtol = atol = tol, in a child process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.multistep", "--odenet-worker", method,
         "--odenet-tol", str(tol), "--odenet-batch", str(cfg["odenet_batch"]),
         "--repeats", str(cfg["odenet_repeats"])],
        cwd=ROOT, capture_output=True, text=True, check=True)
    return {"tol": tol, **json.loads(out.stdout.strip().splitlines()[-1])}


def _matched_tol(precision, tol=ODENET_TOL):
    """The loosest tolerance at which adams' true error is at most dopri5's at `tol`."""
    error = lambda solver, t: next(r["error"] for r in precision["rows"]  # noqa: E731
                                   if r["solver"] == solver and r["tol"] == t)
    fits = [t for t in ODENET_PRECISION_TOLS["adams"]
            if error("adams", t) <= error("dopri5", tol)]
    return max(fits) if fits else None


def section_odenet(cfg):
    """In child processes: the ODE block's true error (float64), then one training step
    (float32) with dopri5 and adams at rtol = atol = 1e-5, and with adams at the
    tolerance that matches dopri5's error at 1e-5."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.multistep", "--odenet-worker",
                          "precision"], cwd=ROOT, capture_output=True, text=True, check=True)
    precision = json.loads(out.stdout.strip().splitlines()[-1])
    print(table("(odenet) the ODE block's forward solve in float64 (batch 16, the same weights): "
                f"error relative to dopri5 at 1e-9 ({precision['reference_nfe']} NFE)",
                ["solver", "rtol = atol", "NFE", "relative error"],
                [[r["solver"], fmt(r["tol"], ".0e"), fmt(r["nfe"]), fmt(r["error"], ".2e")]
                 for r in precision["rows"]]), flush=True)
    matched = _matched_tol(precision)
    runs = [("dopri5", ODENET_TOL), ("adams", ODENET_TOL)]
    if matched is not None and matched != ODENET_TOL:
        runs.append(("adams", matched))
    results = [_odenet_step(method, tol, cfg) for method, tol in runs]
    print(table(f"(odenet) one ODE-Net training step, batch {cfg['odenet_batch']}, 64 channels, "
                "float32",
                ["solver", "rtol = atol", "step ms", "compile s", "forward NFE", "backward NFE",
                 "loss"],
                [[r["solver"], fmt(r["tol"], ".0e"), ms(r["step_s"]), fmt(r["compile_s"], ".1f"),
                  fmt(r["forward_nfe"]), fmt(r["backward_nfe"]), fmt(r["loss"], ".5f")]
                 for r in results]), flush=True)
    nfe = lambda r: r["forward_nfe"] + r["backward_nfe"]  # noqa: E731

    def compare(a, d):
        return {"adams_tol": a["tol"], "nfe_ratio": nfe(a) / nfe(d),
                "time_ratio": a["step_s"] / d["step_s"],
                "met": nfe(a) < nfe(d) and a["step_s"] < d["step_s"]}

    target = compare(results[1], results[0])
    print(f"adams / dopri5 at rtol {ODENET_TOL:g}: NFE {target['nfe_ratio']:.2f}x, time "
          f"{target['time_ratio']:.2f}x, target met: {fmt(target['met'])}", flush=True)
    equal_error = compare(results[-1], results[0]) if len(results) > 2 else None
    if equal_error:
        print(f"at equal error (adams at {matched:g}, whose float64 error is at most dopri5's "
              f"at {ODENET_TOL:g}): NFE {equal_error['nfe_ratio']:.2f}x, time "
              f"{equal_error['time_ratio']:.2f}x", flush=True)
    return {"rows": results, "target": target, "equal_error": equal_error,
            "precision": precision}


def precision_worker():
    """Forward NFE and true error of the ODE block at 1e-4 .. 1e-6 (float64)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import jaxode
    import jaxode.nn as nn
    import jaxode.nn.odenet as odenet

    jax.config.update("jax_enable_x64", True)
    model = nn.ODENet(channels=64, key=jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, model)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 1, 28, 28)).astype(jnp.float64)
    h = odenet.per_example(model.downsample, x, 3)
    func = model.features.func
    field = lambda z, t, p: func(z, t)  # noqa: E731
    ts = jnp.array([0.0, 1.0])
    # dopri8 at 1e-11 runs out of max_steps: the ReLU field's kinks defeat high orders.
    ref = jaxode.solve(field, h, ts, solver="dopri5", rtol=1e-9, atol=1e-9, max_steps=50_000)
    rows = []
    for method in ("dopri5", "adams"):
        for tol in ODENET_PRECISION_TOLS[method]:
            sol = jaxode.solve(field, h, ts, solver=method, rtol=tol, atol=tol)
            error = jnp.linalg.norm(sol.zs[-1] - ref.zs[-1]) / jnp.linalg.norm(ref.zs[-1])
            rows.append({"solver": method, "tol": tol, "nfe": int(sol.stats["nfe"]),
                         "error": float(error)})
    print(json.dumps({"reference_nfe": int(ref.stats["nfe"]), "rows": rows}))


def odenet_worker(method, tol, batch, repeats):
    import jax

    import jaxode.nn as nn

    from .odenet_step import features_block, measure_step

    model = nn.ODENet(channels=64, solver=method, rtol=tol, atol=tol,
                      key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 1, 28, 28))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    result = measure_step(model, x, y, features_block(model), repeats)
    keys = ("step_s", "compile_s", "loss", "forward_nfe", "backward_nfe")
    print(json.dumps({"solver": method, **{k: result[k] for k in keys}}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    parser.add_argument("--odenet-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--odenet-tol", type=float, default=ODENET_TOL, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "multistep.json"))
    parser.add_argument("--odenet-worker", choices=("dopri5", "adams", "precision"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.odenet_worker == "precision":
        precision_worker()
        return
    if args.odenet_worker:
        odenet_worker(args.odenet_worker, args.odenet_tol, args.odenet_batch, args.repeats or 3)
        return
    import jax

    jax.config.update("jax_enable_x64", True)
    cfg = dict(repeats=3 if args.quick else 7, min_sample=0.005, repeats_scipy=1 if args.quick
               else 3, mlp_batch=512, odenet_batch=args.odenet_batch,
               odenet_repeats=2 if args.quick else 3)
    if args.repeats is not None:
        cfg["repeats"] = cfg["odenet_repeats"] = args.repeats
    results = {"config": cfg, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    sections = {"classic": section_classic, "mlp": section_mlp, "odenet": section_odenet}
    for name in args.section:
        results[name] = sections[name](cfg)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
