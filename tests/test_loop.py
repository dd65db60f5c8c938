"""Accuracy of the adaptive solves against exact solutions and scipy references.

Bounds are tolerance-proportional. With rtol = atol = tol the controller keeps every
step's estimated local error below tol (in Hairer's norm); the global error is the
sum of local errors carried along by the flow, and for the well-conditioned problems
here that stays within a small multiple of tol. C = 100 leaves room for the number of
steps and the embedded estimate's crudeness, and is still tight enough that a wrong
coefficient, a mis-scaled error norm or a broken interpolant fails. Problems whose
flow amplifies errors (orbits with close approaches) get a larger factor, stated
where they are defined.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import jaxode

ADAPTIVE = ["heun_euler", "fehlberg2", "bosh3", "dopri5", "tsit5", "dopri8"]
# Tolerances fitting each method's order, so that step counts stay small.
TOL = {"heun_euler": 1e-5, "fehlberg2": 1e-5, "bosh3": 1e-6, "dopri5": 1e-8, "tsit5": 1e-8,
       "dopri8": 1e-10}
STAGES = {"heun_euler": 2, "fehlberg2": 3, "bosh3": 3, "dopri5": 6, "tsit5": 6, "dopri8": 13,
          "rk4": 4, "euler": 1}
C = 100.0

# ------------------------------------------------------------------ exact solutions

# Four problems with closed-form solutions, solved together as one dict-valued state
# (one compilation per solver). Each component is checked against its own solution.
LINEAR_A = np.array([[-0.3, 1.0, 0.0], [-1.0, -0.3, 0.5], [0.0, -0.5, -0.1]])
EXACT_Z0 = {
    "decay": np.array([1.0, -2.0]),  # z' = -0.7 z
    "oscillator": np.array([1.0, 0.0]),  # x'' = -4 x
    "linear": np.array([1.0, 0.0, -1.0]),  # z' = A z
    "time_dependent": np.array([1.0, 0.5]),  # z' = cos(t) z
}
T_EXACT = 4.0
TS_EXACT = np.linspace(0.0, T_EXACT, 9)  # outputs between steps too, not only the end


def exact_field(z, t, params):
    x, v = z["oscillator"]
    return {
        "decay": -0.7 * z["decay"],
        "oscillator": jnp.stack([v, -4.0 * x]),
        "linear": jnp.asarray(LINEAR_A) @ z["linear"],
        "time_dependent": jnp.cos(t) * z["time_dependent"],
    }


def exact_solution(ts):
    ts = np.asarray(ts)
    z0 = EXACT_Z0
    return {
        "decay": np.exp(-0.7 * ts)[:, None] * z0["decay"],
        "oscillator": np.stack([np.cos(2 * ts), -2 * np.sin(2 * ts)], axis=1),
        "linear": np.stack([scipy.linalg.expm(LINEAR_A * t) @ z0["linear"] for t in ts]),
        "time_dependent": np.exp(np.sin(ts))[:, None] * z0["time_dependent"],
    }


@pytest.fixture(scope="module")
def exact_reference():
    return exact_solution(TS_EXACT)


def component_errors(zs, reference, rows):
    """Per component: the worst error over the given output rows relative to max(1, |z|)."""
    return {
        key: float(np.abs(np.asarray(zs[key])[rows] - reference[key][rows]).max()
                   / max(1.0, np.abs(reference[key]).max()))
        for key in reference
    }


# fehlberg2 propagates its second-order solution, but its error estimate is the error
# of the first-order partner, whose leading error constant Fehlberg made 1/512 of
# Euler's. The estimate therefore undershoots the true local error by a large, fixed
# factor: the global error is still proportional to tol, with a constant of ~3e3 on
# these problems (torchdiffeq's fehlberg2 does the same). Every other method: C.
METHOD_C = {"fehlberg2": 1e4}
# dopri8's interpolant is fifth order (known limitation, see test_solvers): its outputs
# between steps are ~1e2-1e3 x less accurate than its step end points.
INTERIOR_C = {"fehlberg2": 1e4, "dopri8": 1e4}


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_exact_solutions(solver, exact_reference):
    z0 = {k: jnp.asarray(v) for k, v in EXACT_Z0.items()}

    @jax.jit
    def run(tol):  # tolerances are traced: both tolerances share one compilation
        sol = jaxode.solve(exact_field, z0, jnp.asarray(TS_EXACT), solver=solver, rtol=tol,
                           atol=tol, max_steps=4096)
        return sol.zs, sol.stats, sol.status

    tol = TOL[solver]
    bound = METHOD_C.get(solver, C)
    final_errors = {}
    for t in (10 * tol, tol):
        zs, stats, status = run(t)
        assert int(status) == 0
        for key in z0:
            np.testing.assert_array_equal(zs[key][0], z0[key])
        final = component_errors(zs, exact_reference, slice(-1, None))
        between = component_errors(zs, exact_reference, slice(1, -1))
        final_errors[t] = final
        for key in z0:
            # At the last time the solution is a step's own end point; in between, the
            # outputs come from the interpolant, which must be as accurate.
            assert final[key] <= bound * t, (
                f"{solver} at tol={t:g}: {key} error at t_end {final[key]:.3g} > {bound:g}*tol")
            interior_bound = INTERIOR_C.get(solver, C)
            assert between[key] <= interior_bound * t, (
                f"{solver} at tol={t:g}: {key} error at interior ts {between[key]:.3g} > "
                f"{interior_bound:g}*tol (at t_end: {final[key]:.3g})")
        steps = int(stats["num_steps"])
        assert steps == int(stats["num_accepted"]) + int(stats["num_rejected"])
        assert 1 <= int(stats["num_accepted"]) <= steps
        # FSAL-or-not, every step costs `stages` evaluations; +1 for f(z0), +1 for dt0.
        assert int(stats["nfe"]) == STAGES[solver] * steps + 2
    for key in z0:  # a tighter tolerance buys a smaller error
        assert final_errors[tol][key] < final_errors[10 * tol][key], (solver, key, final_errors)


# ------------------------------------------------------------------ function evaluations


@pytest.mark.parametrize(
    "solver, dt0, expect_rejections",
    [("dopri5", None, None), ("dopri5", 2.0, True), ("rk4", 0.3, False)],
)
def test_nfe_counts_real_evaluations(solver, dt0, expect_rejections):
    """stats["nfe"] equals the number of times f really ran (counted by a callback)."""
    calls = []

    def f(z, t, params):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.stack([z[1], -z[0]])

    t_end = 3.0
    sol = jax.jit(lambda z: jaxode.solve(f, z, jnp.array([0.0, t_end]), solver=solver,
                                         rtol=1e-6, atol=1e-6, dt0=dt0, dense=False))(
        jnp.array([1.0, 0.0]))
    jax.block_until_ready(sol.zs)
    jax.effects_barrier()
    stats = {k: int(v) for k, v in sol.stats.items()}
    steps = stats["num_steps"]
    assert stats["nfe"] == len(calls)
    assert steps == stats["num_accepted"] + stats["num_rejected"]
    setup = 1 if dt0 is not None else 2  # f(z0), and one more to choose dt0
    assert stats["nfe"] == STAGES[solver] * steps + setup
    if solver == "rk4":
        assert stats["num_rejected"] == 0 and steps == int(np.ceil(t_end / dt0))
    if expect_rejections is not None:
        assert (stats["num_rejected"] > 0) == expect_rejections, stats
    np.testing.assert_allclose(sol.zs[-1], [np.cos(t_end), -np.sin(t_end)], atol=1e-3)


# ------------------------------------------------------------------ scipy references

MU_ARENSTORF = 0.012277471
T_ARENSTORF = 17.0652165601579625588917206249
KEPLER_E = 0.5


def lotka_volterra(z, xp):
    return xp.stack([1.5 * z[0] - z[0] * z[1], -3.0 * z[1] + z[0] * z[1]])


def van_der_pol(z, xp):
    return xp.stack([z[1], (1 - z[0] ** 2) * z[1] - z[0]])


def arenstorf(z, xp):
    x, y, vx, vy = z[0], z[1], z[2], z[3]
    mu, nu = MU_ARENSTORF, 1 - MU_ARENSTORF
    d1 = ((x + mu) ** 2 + y**2) ** 1.5
    d2 = ((x - nu) ** 2 + y**2) ** 1.5
    ax = x + 2 * vy - nu * (x + mu) / d1 - mu * (x - nu) / d2
    ay = y - 2 * vx - nu * y / d1 - mu * y / d2
    return xp.stack([vx, vy, ax, ay])


def kepler(z, xp):
    r3 = (z[0] ** 2 + z[1] ** 2) ** 1.5
    return xp.stack([z[2], z[3], -z[0] / r3, -z[1] / r3])


# name: (field, z0, t_end, periodic, amplification). The amplification bounds how much
# the flow magnifies local errors over the span: ~1 for the limit cycles, ~1e2-1e3 for
# Kepler (phase errors grow along the orbit, sharpest at perihelion), ~1e4-1e5 for
# Arenstorf (two close approaches to the moon over one period).
REFERENCE_PROBLEMS = {
    "lotka_volterra": (lotka_volterra, [1.0, 1.0], 10.0, False, 1e2),
    "van_der_pol": (van_der_pol, [2.0, 0.0], 10.0, False, 1e2),
    "arenstorf": (arenstorf, [0.994, 0.0, 0.0, -2.00158510637908252240537862224],
                  T_ARENSTORF, True, 1e5),
    "kepler": (kepler, [1 - KEPLER_E, 0.0, 0.0, np.sqrt((1 + KEPLER_E) / (1 - KEPLER_E))],
               2 * np.pi, True, 1e3),
}
REFERENCE_TOL = {"dopri5": 1e-10, "tsit5": 1e-10, "dopri8": 1e-12}


@pytest.fixture(scope="module")
def scipy_references():
    """DOP853 at rtol = atol = 1e-13, computed once per module, at 9 output times."""
    out = {}
    for name, (field, z0, t_end, _, _) in REFERENCE_PROBLEMS.items():
        ts = np.linspace(0.0, t_end, 9)
        ref = scipy.integrate.solve_ivp(
            lambda t, z, field=field: field(z, np), (0.0, t_end), z0, method="DOP853",
            rtol=1e-13, atol=1e-13, t_eval=ts,
        )
        assert ref.success
        out[name] = (ts, ref.y.T)
    return out


@pytest.mark.parametrize("solver", ["dopri5", "tsit5", "dopri8"])
def test_against_scipy(solver, scipy_references):
    """All four problems in one compiled program per solver (compilation dominates)."""
    names = sorted(REFERENCE_PROBLEMS)
    tol = REFERENCE_TOL[solver]

    def solve_all(z0s):
        out = {}
        for name in names:
            field, _, _, _, _ = REFERENCE_PROBLEMS[name]
            ts = jnp.asarray(scipy_references[name][0])
            sol = jaxode.solve(lambda z, t, p, field=field: field(z, jnp), z0s[name], ts,
                               solver=solver, rtol=tol, atol=tol, max_steps=4096,
                               dense=False)
            out[name] = (sol.zs, sol.status)
        return out

    z0s = {name: jnp.asarray(REFERENCE_PROBLEMS[name][1]) for name in names}
    results = jax.jit(solve_all)(z0s)
    failures = []
    for name in names:
        _, z0, _, periodic, amplification = REFERENCE_PROBLEMS[name]
        zs, status = np.asarray(results[name][0]), int(results[name][1])
        reference = scipy_references[name][1]
        scale = np.abs(reference).max()
        relative = np.abs(zs - reference).max() / scale
        # one full period: back where it started
        closure = np.abs(zs[-1] - np.asarray(z0)).max() / scale if periodic else 0.0
        bound = amplification * tol
        if status != 0 or relative > bound or closure > bound:
            failures.append(f"{name}: status {status}, relative error {relative:.3g}, "
                            f"closure {closure:.3g}, bound {bound:.3g}")
    assert not failures, f"{solver} at tol={tol:g}:\n" + "\n".join(failures)


# ------------------------------------------------------------------ progress


def _decay_solve(**options):
    return jaxode.solve(lambda z, t, p: -z, jnp.ones(2), jnp.linspace(0.0, 3.0, 4), **options)


def test_progress_reaches_100_percent_with_bounded_updates(capfd):
    jax.block_until_ready(jax.jit(lambda: _decay_solve(progress=True).zs)())
    jax.effects_barrier()
    err = capfd.readouterr().err
    updates = [u for u in err.split("\r") if u.startswith("jaxode [")]
    assert updates and "100%" in updates[-1]
    percents = [int(u.split("]")[1].split("%")[0]) for u in updates]
    assert percents == sorted(percents) and len(percents) <= 101


def test_progress_off_prints_nothing_and_leaves_the_program_unchanged(capfd):
    jax.block_until_ready(_decay_solve().zs)
    jax.effects_barrier()
    assert capfd.readouterr().err == ""
    lowered = lambda **kw: jax.jit(lambda: _decay_solve(throw=False, **kw).zs).lower().as_text()
    assert lowered() == lowered(progress=False)
    assert "callback" not in lowered() and "callback" in lowered(progress=True)


def test_progress_under_vmap_shows_one_bar(capfd):
    solve = lambda z0: jaxode.odeint(lambda z, t, p: -z, z0, jnp.linspace(0.0, 3.0, 4),
                                     progress=True)
    jax.block_until_ready(jax.vmap(solve)(jnp.ones((5, 2)) * jnp.arange(1, 6)[:, None]))
    jax.effects_barrier()
    err = capfd.readouterr().err
    assert err.count("100%") == 1


def test_progress_of_a_solve_stopped_by_an_event_ends_at_100_percent(capfd):
    ball = lambda z, t, g: jnp.stack([z[1], -g])
    sol = jaxode.solve(ball, jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]), 9.81, progress=True,
                       event=jaxode.Event(lambda z, t, p: z[0]))
    jax.block_until_ready(sol.event_time)
    jax.effects_barrier()
    err = capfd.readouterr().err
    assert bool(sol.event_happened) and float(sol.event_time) < 1.0
    assert "100%" in err.split("\r")[-1] and err.endswith("\n")  # the bar is finished
