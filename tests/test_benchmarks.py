"""The benchmarks' pure helpers (the benchmarks themselves run outside the test suite)."""

import math

from benchmarks.events import rtol_at_error


def test_rtol_at_error_inverts_a_power_law_between_runs():
    """On runs whose error is 3 rtol^1.25, the rtol of an error between two runs is
    that of the power law; outside the runs there is none."""
    runs = [(r, 3 * r ** 1.25) for r in (1e-5, 1e-6, 1e-7)]
    found = rtol_at_error(runs, 3 * 4e-7 ** 1.25)
    assert math.isclose(found, 4e-7, rel_tol=1e-9)
    assert rtol_at_error(runs, 3 * 1e-4 ** 1.25) is None
    assert rtol_at_error(runs, 3 * 1e-8 ** 1.25) is None
    assert rtol_at_error([(1e-6, None), (1e-7, 1e-6)], 1e-6) is None  # a run without error
