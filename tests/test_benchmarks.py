"""The benchmarks' pure helpers (the benchmarks themselves run outside the test suite)."""

import math

from benchmarks.events import rtol_at_error
from benchmarks.multistep import ODENET_PRECISION_TOLS, _matched_tol


def test_rtol_at_error_inverts_a_power_law_between_runs():
    """On runs whose error is 3 rtol^1.25, the rtol of an error between two runs is
    that of the power law; outside the runs there is none."""
    runs = [(r, 3 * r ** 1.25) for r in (1e-5, 1e-6, 1e-7)]
    found = rtol_at_error(runs, 3 * 4e-7 ** 1.25)
    assert math.isclose(found, 4e-7, rel_tol=1e-9)
    assert rtol_at_error(runs, 3 * 1e-4 ** 1.25) is None
    assert rtol_at_error(runs, 3 * 1e-8 ** 1.25) is None
    assert rtol_at_error([(1e-6, None), (1e-7, 1e-6)], 1e-6) is None  # a run without error


def _precision(dopri5, adams):
    rows = [{"solver": solver, "tol": tol, "error": error}
            for solver, errors in (("dopri5", dopri5), ("adams", adams))
            for tol, error in zip(ODENET_PRECISION_TOLS[solver], errors)]
    return {"rows": rows}


def test_matched_tol_is_the_loosest_tolerance_at_dopri5s_error():
    """adams' tolerance for the equal-error ODE-Net step: the loosest whose error is at
    most dopri5's at 1e-5, or none when even the tightest is worse."""
    dopri5 = (2e-3, 6e-4, 2e-4)  # at 1e-4, 1e-5, 1e-6
    # adams at 1e-4, 7e-5, 5e-5, 3e-5, 2e-5, 1e-5, 1e-6
    assert _matched_tol(_precision(dopri5, (7e-4, 6.5e-4, 5e-4, 4e-4, 3e-4, 1e-4, 2e-5))) == 5e-5
    assert _matched_tol(_precision(dopri5, (6e-4, 5e-4, 4e-4, 3e-4, 2e-4, 1e-4, 2e-5))) == 1e-4
    assert _matched_tol(_precision(dopri5, (9e-3, 8e-3, 7e-3, 7e-3, 7e-3, 7e-4, 6.5e-4))) is None
