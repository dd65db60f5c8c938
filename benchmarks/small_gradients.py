"""Gradients of a small system: fitting Lotka-Volterra's four parameters, float64.

    PYTHONPATH=. .venv/bin/python -m benchmarks.small_gradients [--quick]

The loss is the squared distance of the solve (dopri5, rtol = atol = 1e-8, t in [0, 10],
from (1, 1)) to data made with parameters 10% off, at 2 or 20 output times; the gradient
is taken with respect to the parameters. Systems: jaxode's Backsolve and Direct,
diffrax's BacksolveAdjoint and RecursiveCheckpointAdjoint, jax.experimental.ode's
adjoint. Columns: time per jitted gradient (medians of interleaved rounds, ratios paired
by round) and the gradient's relative error against diffrax's RecursiveCheckpointAdjoint
at 1e-12.

Each flag setting runs in a child process: XLA's defaults, and XLA:CPU's small-loop
path opened to loops that touch up to 64 KiB a pass (`SMALL_LOOP_FLAGS`), under which
XLA compiles a direct gradient's reverse loop into one function. Tables go to stdout,
everything to bench_results/small_gradients.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .common import fmt, paired_ratio, table, time_interleaved, us, write_results

ROOT = Path(__file__).resolve().parents[1]
SMALL_LOOP_FLAGS = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=65536"
SETTINGS = {"default flags": None, "small-loop flags (64 KiB)": SMALL_LOOP_FLAGS}
OUTPUTS = (2, 20)
TOL, REF_TOL, T_END = 1e-8, 1e-12, 10.0
SYSTEMS = ("jaxode Backsolve", "jaxode Direct", "diffrax BacksolveAdjoint",
           "diffrax RecursiveCheckpoint", "jax.experimental.ode")
# jaxode's system / the peer it is compared with
RATIOS = (("jaxode Backsolve", "diffrax BacksolveAdjoint"),
          ("jaxode Direct", "diffrax RecursiveCheckpoint"),
          ("jaxode Backsolve", "jax.experimental.ode"))


def lotka_volterra(y, t, p):
    import jax.numpy as jnp

    a, b, c, d = p
    return jnp.stack([a * y[0] - b * y[0] * y[1], -c * y[1] + d * y[0] * y[1]])


def _loss(system: str, ts, data, tol):
    """loss(p) of one system."""
    import diffrax
    import jax.experimental.ode as jode
    import jax.numpy as jnp

    import jaxode

    y0 = jnp.array([1.0, 1.0])
    if system.startswith("jaxode"):
        adjoint = "backsolve" if system.endswith("Backsolve") else "direct"
        solve = lambda p: jaxode.odeint(lotka_volterra, y0, ts, p, rtol=tol,  # noqa: E731
                                        atol=tol, adjoint=adjoint, max_steps=100_000)
    elif system.startswith("diffrax"):
        adjoint = (diffrax.BacksolveAdjoint() if system.endswith("BacksolveAdjoint")
                   else diffrax.RecursiveCheckpointAdjoint())
        solve = lambda p: _diffrax_solve(ts, p, tol, adjoint)  # noqa: E731
    else:
        solve = lambda p: jode.odeint(lotka_volterra, y0, ts, p, rtol=tol,  # noqa: E731
                                      atol=tol, mxstep=100_000)
    return lambda p: jnp.sum((solve(p) - data) ** 2)


def worker(repeats: int) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    p = jnp.array([1.5, 1.0, 3.0, 1.0])
    rows = []
    for num in OUTPUTS:
        ts = jnp.linspace(0.0, T_END, num)
        data = jax.jit(lambda p: _diffrax_solve(ts, p, REF_TOL))(1.1 * p)
        ref = np.asarray(jax.grad(_loss("diffrax RecursiveCheckpoint", ts, data, REF_TOL))(p))
        grads = {s: jax.jit(jax.grad(_loss(s, ts, data, TOL))) for s in SYSTEMS}
        errors = {s: float(np.linalg.norm(np.asarray(g(p)) - ref) / np.linalg.norm(ref))
                  for s, g in grads.items()}
        times = time_interleaved({s: (lambda g=g: g(p)) for s, g in grads.items()}, repeats)
        rows.append({"outputs": num,
                     "time_s": {s: times[s]["median"] for s in SYSTEMS}, "error": errors,
                     "ratios": {f"{a} / {b}": paired_ratio(times, a, b) for a, b in RATIOS}})
    print(json.dumps(rows))


def _diffrax_solve(ts, p, tol, adjoint=None):
    import diffrax
    import jax.numpy as jnp

    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: lotka_volterra(y, t, args)), diffrax.Dopri5(),
        0.0, T_END, None, jnp.array([1.0, 1.0]), args=p, saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
        adjoint=adjoint or diffrax.RecursiveCheckpointAdjoint(), max_steps=100_000).ys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "small_gradients.json"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # its repeats
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    results = {}
    for name, flags in SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        if flags:
            env["XLA_FLAGS"] = flags
        out = subprocess.run([sys.executable, "-m", "benchmarks.small_gradients", "--worker",
                              str(3 if args.quick else 15)], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        rows = results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(table(
            f"gradient of a Lotka-Volterra fit (4 parameters, dopri5, tol {TOL:g}), {name}",
            ["outputs", *[f"us {s}" for s in SYSTEMS]],
            [[fmt(r["outputs"]), *[us(r["time_s"][s]) for s in SYSTEMS]] for r in rows]
            + [["rel. error", *[fmt(rows[-1]["error"][s], ".1e") for s in SYSTEMS]]],
            f"rel. error: of the 20-output gradient, against diffrax's "
            f"RecursiveCheckpointAdjoint at {REF_TOL:g}."), flush=True)
        print(table(f"ratios, {name} (paired by round)", ["outputs", *[f"{a} / {b}"
                                                                     for a, b in RATIOS]],
                    [[fmt(r["outputs"]), *[fmt(v, ".2f") for v in r["ratios"].values()]]
                     for r in rows]), flush=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
