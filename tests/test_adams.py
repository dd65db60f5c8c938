"""The Adams multistep solvers: explicit_adams, implicit_adams (fixed step) and adams
(adaptive, variable order): orders of convergence, accuracy against scipy, the order
climbing, the history surviving rejected steps, gradients through every adjoint."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import jaxode
from jaxode.control import AbstractController

# ------------------------------------------------------------------ fixed step


def _growth(z, t, p):
    """z' = cos(t) z: z(t) = z0 exp(sin t)."""
    return jnp.cos(t) * z


def _fixed_errors(name, order, dts, t_end=1.0, **options):
    solver = jaxode.SOLVERS[name](order=order, **options)
    ts = jnp.array([0.0, t_end])
    exact = np.exp(np.sin(t_end))

    @jax.jit
    def run(dt):
        return jaxode.solve(_growth, jnp.array([1.0]), ts, solver=solver, dt0=dt)

    errors = []
    for dt in dts:
        sol = run(jnp.asarray(dt))
        assert int(sol.status) == 0
        errors.append(abs(float(sol.zs[-1, 0]) - exact))
    return np.array(errors)


# t_end = 1 with dt = 0.3/2^m: every solve ends with a shortened step, which the
# variable-coefficient formulas take at full order.
DTS = 0.3 / 2.0 ** np.arange(3, 6)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["explicit_adams", "implicit_adams"])
def test_fixed_step_convergence_order(name, order):
    options = {"rtol": 1e-13, "atol": 1e-15, "max_iters": 20} if name == "implicit_adams" else {}
    errors = _fixed_errors(name, order, DTS, **options)
    slopes = np.log2(errors[:-1] / errors[1:])
    assert np.all(np.abs(slopes - order) < 0.35), (name, order, errors, slopes)


@pytest.mark.parametrize("order", [5, 6, 7, 8])
def test_explicit_adams_high_orders(order):
    errors = _fixed_errors("explicit_adams", order, 0.1 / 2.0 ** np.arange(0, 3))
    slopes = np.log2(errors[:-1] / errors[1:])
    assert slopes[-1] > order - 0.6, (order, errors, slopes)


def test_fixed_step_nfe_and_start():
    """One evaluation a step once the Runge-Kutta start is over (RK4's 4 for the first
    three steps of order 4)."""
    ts = jnp.array([0.0, 1.0])
    sol = jaxode.solve(_growth, jnp.array([1.0]), ts, solver=jaxode.ExplicitAdams(order=4),
                       dt0=0.1)
    steps = int(sol.stats["num_steps"])
    assert steps == 10
    assert int(sol.stats["nfe"]) == 1 + 3 * 4 + (steps - 3)
    assert jaxode.ExplicitAdams() == jaxode.ExplicitAdams(order=4)
    assert jaxode.ExplicitAdams(order=3) != jaxode.ExplicitAdams(order=4)
    assert jaxode.SOLVERS["explicit_adams"]().order == 4
    assert jaxode.SOLVERS["implicit_adams"]().order == 4


def test_fixed_step_needs_dt0_and_valid_order():
    ts = jnp.array([0.0, 1.0])
    for name in ("explicit_adams", "implicit_adams"):
        with pytest.raises(ValueError, match="dt0"):
            jaxode.odeint(_growth, jnp.array([1.0]), ts, solver=name)
    for order in (0, 9, 2.0):
        with pytest.raises(ValueError, match="order"):
            jaxode.ExplicitAdams(order=order)
    with pytest.raises(ValueError, match="max_order"):
        jaxode.Adams(max_order=13)


def test_implicit_corrector_not_converging_is_a_status():
    """A step too large for the fixed-point iteration (h L >> 1) fails the solve."""
    stiff = lambda z, t, p: -50.0 * z
    ts = jnp.array([0.0, 1.0])
    sol = jaxode.solve(stiff, jnp.array([1.0]), ts, solver=jaxode.ImplicitAdams(order=2),
                       dt0=0.1, throw=False)
    assert int(sol.status) != 0
    assert np.isnan(np.asarray(sol.zs[-1])).all()
    with pytest.raises(Exception, match="non-finite"):
        jaxode.odeint(stiff, jnp.array([1.0]), ts, solver=jaxode.ImplicitAdams(order=2),
                      dt0=0.1)
    ok = jaxode.solve(stiff, jnp.array([1.0]), ts,
                      solver=jaxode.ImplicitAdams(order=2, atol=1e-30), dt0=0.002)
    assert int(ok.status) == 0
    # the trapezoidal rule's own amplification, (1 + hλ/2) / (1 - hλ/2) a step
    np.testing.assert_allclose(ok.zs[-1], (0.95 / 1.05) ** 500, rtol=1e-6)


# ------------------------------------------------------------------ adaptive


def lotka_volterra(z, xp):
    return xp.stack([1.5 * z[0] - z[0] * z[1], -3.0 * z[1] + z[0] * z[1]])


def van_der_pol(z, xp):
    return xp.stack([z[1], (1 - z[0] ** 2) * z[1] - z[0]])


MU = 0.012277471
T_ARENSTORF = 17.0652165601579625588917206249


def arenstorf(z, xp):
    x, y, vx, vy = z[0], z[1], z[2], z[3]
    d1 = ((x + MU) ** 2 + y**2) ** 1.5
    d2 = ((x - 1 + MU) ** 2 + y**2) ** 1.5
    ax = x + 2 * vy - (1 - MU) * (x + MU) / d1 - MU * (x - 1 + MU) / d2
    ay = y - 2 * vx - (1 - MU) * y / d1 - MU * y / d2
    return xp.stack([vx, vy, ax, ay])


def kepler(z, xp):
    r3 = (z[0] ** 2 + z[1] ** 2) ** 1.5
    return xp.stack([z[2], z[3], -z[0] / r3, -z[1] / r3])


# As tests/test_loop.py's: (field, z0, t_end, amplification of local errors).
PROBLEMS = {
    "lotka_volterra": (lotka_volterra, [1.0, 1.0], 10.0, 1e2),
    "van_der_pol": (van_der_pol, [2.0, 0.0], 10.0, 1e2),
    "arenstorf": (arenstorf, [0.994, 0.0, 0.0, -2.00158510637908252240537862224],
                  T_ARENSTORF, 1e5),
    "kepler": (kepler, [0.5, 0.0, 0.0, np.sqrt(3.0)], 2 * np.pi, 1e3),
}


def test_adams_against_scipy_dop853():
    """The four classic problems at rtol = atol = 1e-10 against DOP853 at 1e-13, at 9
    output times (dense output between the steps), within the bounds dopri5 meets."""
    tol = 1e-10
    names = sorted(PROBLEMS)
    grids = {name: np.linspace(0.0, PROBLEMS[name][2], 9) for name in names}

    @jax.jit
    def solve_all(z0s):
        out = {}
        for name in names:
            field = PROBLEMS[name][0]
            sol = jaxode.solve(lambda z, t, p, field=field: field(z, jnp), z0s[name],
                               jnp.asarray(grids[name]), solver="adams", rtol=tol, atol=tol)
            out[name] = (sol.zs, sol.status, sol.stats["nfe"])
        return out

    results = solve_all({name: jnp.asarray(PROBLEMS[name][1]) for name in names})
    failures = []
    for name in names:
        field, z0, t_end, amplification = PROBLEMS[name]
        ref = scipy.integrate.solve_ivp(lambda t, z, field=field: field(z, np), (0.0, t_end),
                                        z0, method="DOP853", rtol=1e-13, atol=1e-13,
                                        t_eval=grids[name]).y.T
        zs, status = np.asarray(results[name][0]), int(results[name][1])
        relative = np.abs(zs - ref).max() / np.abs(ref).max()
        if status != 0 or relative > amplification * tol:
            failures.append(f"{name}: status {status}, relative error {relative:.3g}")
    assert not failures, "\n".join(failures)


def _steps(solver, field, z0, t0, dts):
    """Drive the solver's own init/step by hand: the states after each step."""
    f = lambda t, z: field(z, t, None)
    state = solver.init(f, t0, z0, f(t0, z0))
    t, z, states = t0, z0, []
    step = jax.jit(lambda t, z, dt, state: solver.step(f, t, z, dt, state))
    for dt in dts:
        attempt = step(t, z, jnp.asarray(dt), state)
        t, z, state = t + dt, attempt.z, attempt.state
        states.append(state)
    return z, states


def test_adams_order_climbs_on_a_smooth_problem():
    """From order 1, one order a step while the next order's estimate is smaller, to the
    highest orders on the oscillator (entire solutions: every order helps)."""
    osc = lambda z, t, p: jnp.stack([z[1], -z[0]])
    _, states = _steps(jaxode.Adams(), osc, jnp.array([1.0, 0.0]), 0.0, [0.05] * 30)
    orders = [int(s.order) for s in states]
    assert orders[:4] == [1, 2, 3, 4], orders
    assert all(b - a <= 1 for a, b in zip(orders, orders[1:])), orders
    assert orders[10] >= 5 and max(orders) >= 9, orders
    # Through the loop: the same climb shows as few steps at tight tolerances.
    ts = jnp.array([0.0, 2 * np.pi])
    sol = jaxode.solve(osc, jnp.array([1.0, 0.0]), ts, solver="adams", rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sol.zs[-1], [1.0, 0.0], atol=1e-8)
    dopri5 = jaxode.solve(osc, jnp.array([1.0, 0.0]), ts, rtol=1e-10, atol=1e-12)
    assert int(sol.stats["nfe"]) < 0.3 * int(dopri5.stats["nfe"])
    # ... and a capped maximum order is respected.
    _, capped = _steps(jaxode.Adams(max_order=3), osc, jnp.array([1.0, 0.0]), 0.0, [0.05] * 12)
    assert max(int(s.order) for s in capped) == 3


class _RejectOnce(AbstractController):
    """Accepts every step at the constant size dt except attempt `reject_at`, whose size
    was doubled by the attempt before it and which it rejects, asking for dt again."""

    dt: float
    reject_at: int = -1

    def init(self):
        return jnp.zeros(())

    def adapt(self, dt, error, z0, z1, rtol, atol, error_order, state):
        attempt = state
        reject = attempt == self.reject_at
        accept = ~reject
        bigger = attempt == self.reject_at - 1
        dt_next = jnp.where(bigger, 2 * self.dt, self.dt).astype(jnp.result_type(dt))
        return accept, dt_next, state + 1


def test_a_rejected_step_leaves_the_history_intact():
    """A rejected (larger) attempt, then the accepted one: the same solution, to the bit,
    as a solve that never rejected, outputs and dense output included."""
    field = lambda z, t, p: lotka_volterra(z, jnp)
    ts = jnp.linspace(0.0, 2.0, 7)
    run = lambda controller: jaxode.solve(field, jnp.array([1.0, 1.0]), ts, solver="adams",
                                          controller=controller, dt0=0.05, dense=True)
    smooth = run(_RejectOnce(dt=0.05))
    rejected = run(_RejectOnce(dt=0.05, reject_at=9))
    assert int(smooth.stats["num_rejected"]) == 0
    assert int(rejected.stats["num_rejected"]) == 1
    assert int(rejected.stats["num_accepted"]) == int(smooth.stats["num_accepted"])
    np.testing.assert_array_equal(rejected.zs, smooth.zs)
    for t in (0.3, 0.47, 1.21, 1.9):
        np.testing.assert_array_equal(rejected.evaluate(t), smooth.evaluate(t))


def test_adams_dense_output_and_stats():
    field = lambda z, t, p: van_der_pol(z, jnp)
    z0 = jnp.array([2.0, 0.0])
    ts = jnp.array([0.0, 5.0])
    sol = jaxode.solve(field, z0, ts, solver="adams", rtol=1e-9, atol=1e-9, dense=True)
    inner = np.linspace(0.1, 4.9, 13)
    ref = scipy.integrate.solve_ivp(lambda t, z: van_der_pol(z, np), (0.0, 5.0), z0,
                                    method="DOP853", rtol=1e-13, atol=1e-13, t_eval=inner).y.T
    dense = np.stack([np.asarray(sol.evaluate(t)) for t in inner])
    np.testing.assert_allclose(dense, ref, atol=1e-6)
    steps = int(sol.stats["num_steps"])
    assert int(sol.stats["nfe"]) == 2 + 2 * steps  # f0, the first-step probe, 2 a step


def test_adams_pytrees_float32_vmap_and_backwards():
    field = lambda z, t, p: {"x": z["v"], "v": -p * z["x"]}
    z0 = {"x": jnp.array([1.0], jnp.float32), "v": jnp.array([0.0], jnp.float32)}
    ts = jnp.linspace(0.0, 3.0, 4, dtype=jnp.float32)
    zs = jax.jit(lambda z0: jaxode.odeint(field, z0, ts, jnp.float32(1.0), solver="adams",
                                          rtol=1e-5, atol=1e-6))(z0)
    assert zs["x"].dtype == jnp.float32
    np.testing.assert_allclose(zs["x"][:, 0], np.cos(np.asarray(ts)), atol=1e-4)
    # vmap over parameters, and integration backwards in time
    ps = jnp.array([1.0, 4.0])
    z0d = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), z0)
    back = jnp.linspace(3.0, 0.0, 4)
    xs = jax.vmap(lambda p: jaxode.odeint(field, z0d, back, p, solver="adams", rtol=1e-9,
                                          atol=1e-10)["x"][:, 0])(ps)
    exact = np.cos(np.sqrt(np.asarray(ps))[:, None] * (np.asarray(back) - 3.0))
    np.testing.assert_allclose(xs, exact, atol=1e-6)
    # the fixed-step ones under vmap
    xs = jax.vmap(lambda p: jaxode.odeint(field, z0d, back, p, solver="explicit_adams",
                                          dt0=0.01)["x"][:, 0])(ps)
    np.testing.assert_allclose(xs, exact, atol=1e-5)


def test_adams_throw_false_and_max_steps():
    field = lambda z, t, p: lotka_volterra(z, jnp)
    sol = jaxode.solve(field, jnp.array([1.0, 1.0]), jnp.array([0.0, 10.0]), solver="adams",
                       max_steps=20, throw=False)
    assert int(sol.status) == 1  # max_steps reached
    assert np.isnan(np.asarray(sol.zs[-1])).all()


# ------------------------------------------------------------------ gradients


def _decay_loss(p, z0, *, solver, adjoint, **options):
    field = lambda z, t, p: -p[0] * z + p[1] * jnp.sin(t) * z[::-1]
    ts = jnp.linspace(0.0, 1.5, 4)
    zs = jaxode.odeint(field, z0, ts, p, solver=solver, adjoint=adjoint, **options)
    return jnp.sum(zs[1:] ** 2)


def _central_difference(fun, x, eps=1e-6):
    x = np.asarray(x, float)
    grad = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = eps
        grad.flat[i] = (fun(x + e) - fun(x - e)) / (2 * eps)
    return grad


P0, Z0 = jnp.array([0.7, 0.3]), jnp.array([1.0, 0.5])
CASES = {
    "adams": {"rtol": 1e-10, "atol": 1e-12},
    "explicit_adams": {"dt0": 0.01},
    "implicit_adams": {"dt0": 0.02},
}


@pytest.fixture(scope="module")
def true_gradient():
    """Central differences of a dopri8 solve at rtol = atol = 1e-13."""
    loss = functools.partial(_decay_loss, solver="dopri8", adjoint="direct", rtol=1e-13,
                             atol=1e-13)
    run = jax.jit(loss)
    return (_central_difference(lambda p: float(run(jnp.asarray(p), Z0)), P0),
            _central_difference(lambda z: float(run(P0, jnp.asarray(z))), Z0))


@pytest.mark.parametrize("solver", [
    "adams",
    pytest.param("explicit_adams", marks=pytest.mark.slow),
    pytest.param("implicit_adams", marks=pytest.mark.slow),
])
def test_gradients_against_finite_differences(solver, true_gradient):
    """Backsolve (the backward solve with the same solver), Direct and Forward against
    central differences: of the same fixed-step solve for the fixed-step methods (the
    exact derivative of the discrete solve), of a dopri8 solve at 1e-13 for adams (whose
    own order and step choices make finite differences of it noisy at ~1e-5)."""
    options = CASES[solver]
    loss = functools.partial(_decay_loss, solver=solver, **options)
    if solver == "adams":
        fd, fd_z = true_gradient
        rtol = 1e-6
    else:
        run = jax.jit(functools.partial(loss, adjoint="direct"))
        fd = _central_difference(lambda p: float(run(jnp.asarray(p), Z0)), P0)
        fd_z = _central_difference(lambda z: float(run(P0, jnp.asarray(z))), Z0)
        rtol = 1e-7
    grads = {}
    for adjoint in ("backsolve", "direct"):
        grads[adjoint] = jax.jit(jax.grad(functools.partial(loss, adjoint=adjoint), (0, 1)))(
            P0, Z0)
    grads["forward"] = jax.jit(jax.jacfwd(functools.partial(loss, adjoint="forward"), (0, 1)))(
        P0, Z0)
    for adjoint, (g_p, g_z) in grads.items():
        # The fixed-step backward solve is the adjoint ODE's own discretisation: it
        # meets the discrete solve's derivative to the method's accuracy, not exactly.
        tol = 1e-5 if adjoint == "backsolve" and solver != "adams" else rtol
        np.testing.assert_allclose(g_p, fd, rtol=tol, atol=tol * 1e-2, err_msg=adjoint)
        np.testing.assert_allclose(g_z, fd_z, rtol=tol, atol=tol * 1e-2, err_msg=adjoint)
    # Direct and Forward differentiate the same discrete solve (to rounding: their sums
    # run in different orders over hundreds of steps).
    for a, b in zip(grads["direct"], grads["forward"]):
        np.testing.assert_allclose(a, b, rtol=1e-9)


def _lanes_loss(p, adjoint):
    field = lambda z, t, p: -p[0] * z + p[1] * jnp.sin(t) * z[::-1]
    z0s = jnp.stack([Z0, 2 * Z0])
    zs = jaxode.odeint(field, z0s, jnp.linspace(0.0, 1.5, 4), p, batch_axis=0, adjoint=adjoint,
                       solver="adams", rtol=1e-10, atol=1e-12)
    return jnp.sum(zs[1:] ** 2)


def test_batch_axis_backsolve_with_adams_needs_an_rk_backward_solver():
    """A lane-batched backward pass needs an explicit Runge-Kutta backward solver: with
    adams forward, the default (adams backward) is refused with a message that says so."""
    with pytest.raises(TypeError, match="explicit Runge-Kutta Backsolve.solver"):
        jax.grad(_lanes_loss)(P0, "backsolve")


@pytest.mark.slow
def test_batch_axis_gradients_with_adams():
    """Backsolve(solver="dopri5") and Forward with batch_axis give the gradient of the
    per-sample solves."""
    per_sample = jax.grad(lambda p: sum(
        _decay_loss(p, z, solver="adams", adjoint="direct", rtol=1e-10, atol=1e-12)
        for z in (Z0, 2 * Z0)))(P0)
    lanes = jax.grad(_lanes_loss)(P0, jaxode.Backsolve(solver="dopri5"))
    np.testing.assert_allclose(lanes, per_sample, rtol=1e-6)
    jac = jax.jacfwd(lambda p: _lanes_loss(p, "forward"))(P0)
    np.testing.assert_allclose(jac, per_sample, rtol=1e-6)
