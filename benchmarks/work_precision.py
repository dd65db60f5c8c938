"""Gradient work-precision: time per gradient against its error, jaxode's adjoints
against diffrax's, on the MLP workload of `benchmarks.gradients` in float64.

    PYTHONPATH=. python -m benchmarks.work_precision [--quick]

For rtol = atol = tol in 1e-3 .. 1e-8 (forward and backward solves alike), each system's
jitted value_and_grad is timed (round-robin, median) and its parameter gradient compared
with the float64 reference of `benchmarks.gradients` (rtol = atol = 1e-10). A curve is
"at or below" a peer's when, at every error level the peer reaches, jaxode reaches it in
no more time (its time at that error by log-log interpolation along its own curve).
Tables go to stdout, everything to bench_results/work_precision.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from .common import fmt, mlp_field, ms, table, time_interleaved  # noqa: E402
from .gradients import (  # noqa: E402
    BS,
    BS_FULL,
    DFX_BS,
    DFX_RC,
    DIRECT,
    flat_grad,
    load_reference,
    loss_fn,
    rel_error,
    solver_fn,
    workload,
)

ROOT = Path(__file__).resolve().parents[1]
TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
JAXODE = (BS, BS_FULL, DIRECT)
PEERS = (DFX_BS, DFX_RC)


def measure(tols, repeats: int) -> dict:
    """{system: [(tol, seconds, relative error)]}."""
    params, z0, ts = workload(np.float64)
    ref = load_reference()["direct"]
    curves = {name: [] for name in (*JAXODE, *PEERS)}
    for tol in tols:
        fns, errors = {}, {}
        for name in curves:
            grad = jax.jit(jax.grad(loss_fn(solver_fn(name, mlp_field, ts, rtol=tol, atol=tol,
                                                      max_steps=100_000))))
            errors[name] = rel_error(flat_grad(grad(params, z0)), ref)
            fns[name] = lambda g=grad: g(params, z0)
        times = time_interleaved(fns, repeats, 0.0)
        for name in curves:
            curves[name].append((tol, times[name]["median"], errors[name]))
        print(f"  tol {tol:g}: done", file=sys.stderr, flush=True)
    return curves


def time_at_error(curve, error):
    """The curve's time at `error` by log-log interpolation; None outside its range."""
    points = sorted((e, t) for _, t, e in curve)
    for (e0, t0), (e1, t1) in zip(points, points[1:]):
        if e0 <= error <= e1 and e0 > 0:
            w = (math.log(error) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
    return next((t for e, t in points if e == error), None)


def compare(curves) -> list:
    """For each jaxode system and peer: jaxode's time / the peer's at each peer point."""
    rows = []
    for mine in JAXODE:
        for peer in PEERS:
            ratios = [None if (t := time_at_error(curves[mine], e)) is None else t / tp
                      for _, tp, e in curves[peer]]
            known = [r for r in ratios if r is not None]
            rows.append({"jaxode": mine, "peer": peer, "ratios": ratios,
                         "worst": max(known) if known else None,
                         "below_everywhere": bool(known) and max(known) <= 1.0,
                         "covered": f"{len(known)}/{len(ratios)}"})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three tolerances, few repeats")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "work_precision.json"))
    args = parser.parse_args(argv)
    tols = (1e-3, 1e-5, 1e-7) if args.quick else TOLS
    curves = measure(tols, 3 if args.quick else 7)
    print(table(
        "Gradient work-precision, MLP workload in float64 (time ms / relative error)",
        ["system", *(f"{t:.0e}" for t in tols)],
        [[name, *(f"{ms(t)} / {e:.1e}" for _, t, e in curve)] for name, curve in curves.items()],
        "rtol = atol = tol for the forward and the backward solve; error against the float64 "
        "reference at 1e-10."))
    rows = compare(curves)
    print(table(
        "jaxode's time / the peer's at the peer's error levels (<= 1: at or below)",
        ["jaxode", "peer", *(f"{t:.0e}" for t in tols), "worst", "covered"],
        [[r["jaxode"], r["peer"], *(fmt(x, ".2f") for x in r["ratios"]), fmt(r["worst"], ".2f"),
          r["covered"]] for r in rows],
        "A ratio is missing where the peer's error lies outside jaxode's range of errors."))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tols": tols, "curves": curves, "compare": rows},
                                         indent=1))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
