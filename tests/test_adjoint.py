"""Gradients of `jaxode.odeint` / `jaxode.solve`: the backsolve adjoint and "direct".

References are central finite differences of tight-tolerance solves and closed forms.
Every gradient function is jitted once at module level and shared between tests (XLA
compilation dominates the cost of this file), so the core tests compile only one
gradient per adjoint (whose loss values also give the finite differences), a small
problem's gradient and grad of grad, and the backsolve memory probes. Tests that need
further compilations are marked slow.

Error scales: the solves run at rtol = atol = 1e-10 (gradients) and 1e-12 (finite
differences, step 1e-5, whose truncation error is ~1e-10 here). Both adjoints then
agree with the finite differences to ~1e-9 relative; the bounds below (1e-6) are a
thousand times looser than that but far below the O(1) error of a wrong sign, a
missing term or a gradient that silently comes out as zero.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxode

GRAD_TOL = 1e-10  # rtol = atol of the solves that are differentiated
FD_TOL = 1e-12  # rtol = atol of the finite-difference reference solves
FD_STEP = 1e-5
REL = 1e-6  # bound on the error of a gradient, relative to the largest entry

TS = {
    "increasing": np.array([0.1, 0.6, 1.3, 2.0]),
    "decreasing": np.array([2.0, 1.4, 0.7, 0.1]),  # integration backwards in time
}
WEIGHTS = np.array([0.5, 1.0, -0.7, 1.5])  # loss weights of the four output times


# ------------------------------------------------------------------------ the problem
# A pytree state (a tuple of two arrays of different sizes), a time-dependent tanh
# network as params (a dict of arrays), and a vector `c` that f closes over.


def _problem(dtype=np.float64):
    rng = np.random.default_rng(0)
    params = {
        "W1": 0.5 * rng.normal(size=(4, 5)),
        "b1": 0.3 * rng.normal(size=4),
        "wt": 0.5 * rng.normal(size=4),
        "W2": 0.5 * rng.normal(size=(5, 4)),
    }
    z0 = (np.array([0.5, -0.3]), np.array([0.8, 0.2, -0.6]))
    c = np.array([1.2, 0.8, -0.9, 1.1, 0.7])
    cast = functools.partial(jax.tree_util.tree_map, lambda x: jnp.asarray(x, dtype))
    return cast(z0), cast(params), cast(c)


def field(z, t, params, c):
    x, v = z
    y = jnp.concatenate([x, v])
    h = jnp.tanh(params["W1"] @ y + params["b1"] + t * params["wt"])
    out = c * (params["W2"] @ h) - 0.1 * y
    return out[:2], out[2:]


def loss(z0, ts, params, c, tols, *, adjoint, seminorm=True, adjoint_solver=None):
    """A weighted sum of squares over the four output times."""
    zs = jaxode.odeint(
        lambda z, t, p: field(z, t, p, c),  # c is closed over, not passed as params
        z0,
        ts,
        params,
        rtol=tols["rtol"],
        atol=tols["atol"],
        adjoint=adjoint if adjoint != "backsolve" else jaxode.Backsolve(
            rtol=tols["adjoint_rtol"], atol=tols["adjoint_atol"], solver=adjoint_solver,
            seminorm=seminorm),
    )
    weights = jnp.asarray(WEIGHTS, ts.dtype)
    return sum(jnp.sum(weights * jnp.sum(leaf**2, axis=1)) for leaf in zs)


def tolerances(tol, adjoint_tol=None, dtype=np.float64):
    """Tolerances as traced arguments, so that changing them does not recompile."""
    adjoint_tol = tol if adjoint_tol is None else adjoint_tol
    return {
        "rtol": jnp.asarray(tol, dtype),
        "atol": jnp.asarray(tol, dtype),
        "adjoint_rtol": jnp.asarray(adjoint_tol, dtype),
        "adjoint_atol": jnp.asarray(adjoint_tol, dtype),
    }


@functools.partial(jax.jit, static_argnames=("adjoint", "seminorm", "adjoint_solver"))
def loss_and_grad(z0, ts, params, c, tols, *, adjoint, seminorm, adjoint_solver):
    fn = functools.partial(loss, adjoint=adjoint, seminorm=seminorm, adjoint_solver=adjoint_solver)
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(z0, ts, params, c, tols)


def gradient(direction, adjoint, *, tol=GRAD_TOL, adjoint_tol=None, seminorm=True,
             adjoint_solver=None, dtype=np.float64):
    z0, params, c = _problem(dtype)
    ts = jnp.asarray(TS[direction], dtype)
    value, grads = loss_and_grad(
        z0, ts, params, c, tolerances(tol, adjoint_tol, dtype),
        adjoint=adjoint, seminorm=seminorm, adjoint_solver=adjoint_solver,
    )
    return float(value), jax.tree_util.tree_map(np.asarray, grads)


@functools.cache
def cached_gradient(direction, adjoint):
    return gradient(direction, adjoint)


def _args(direction):
    z0, params, c = _problem()
    return z0, jnp.asarray(TS[direction]), params, c


@functools.cache
def finite_differences(direction):
    """dL/d(z0, ts, params, c) by central differences, with the gradient's structure.

    The loss values come from the compiled `loss_and_grad` (its forward solve, at the
    finite-difference tolerance), which saves a compilation."""
    flat, unravel = ravel_pytree(_args(direction))
    tols = tolerances(FD_TOL)

    def value(x):
        z0, ts, params, c = unravel(x)
        return loss_and_grad(z0, ts, params, c, tols, adjoint="backsolve", seminorm=True,
                             adjoint_solver=None)[0]

    columns = []
    for e in np.eye(flat.size):
        columns.append((value(flat + FD_STEP * e) - value(flat - FD_STEP * e)) / (2 * FD_STEP))
    return jax.tree_util.tree_map(np.asarray, unravel(jnp.stack(columns)))


def assert_tree_close(actual, expected, rel, what=""):
    """Every leaf within rel x (the largest entry of the whole expected tree)."""
    scale = max(np.max(np.abs(x)) for x in jax.tree_util.tree_leaves(expected))
    assert scale > 0
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    actual_leaves = jax.tree_util.tree_leaves(actual)
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for (path, e), a in zip(paths, actual_leaves):
        np.testing.assert_allclose(
            a, e, rtol=0, atol=rel * scale, err_msg=f"{what} {jax.tree_util.keystr(path)}"
        )


def relative_difference(a, b):
    a = ravel_pytree(a)[0]
    b = ravel_pytree(b)[0]
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# -------------------------------------------------------- gradients vs finite differences


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
@pytest.mark.parametrize("adjoint", ["backsolve", "direct"])
def test_gradient_matches_finite_differences(adjoint, direction):
    """dL/dz0 (a tuple state), dL/dts (every time, first and last included), dL/dparams
    (a dict) and dL/dc (closed over by f), for both adjoints and both time directions."""
    _, grads = cached_gradient(direction, adjoint)
    reference = finite_differences(direction)
    names = ["z0", "ts", "params", "closed-over c"]
    for name, g, r in zip(names, grads, reference):
        # Each part has gradients of order one: a dropped or zeroed part fails here.
        assert np.max(np.abs(ravel_pytree(r)[0])) > 1e-2, name
        assert_tree_close(g, r, REL, f"{adjoint} {direction} d/d{name}")
    # Every output time matters, including ts[0] and ts[-1].
    assert np.all(np.abs(grads[1]) > 1e-3)


def test_direct_linearises_only_the_inputs_being_differentiated():
    """Direct differentiates only the leaves a gradient asks for (here one leaf of the
    state, one of the params, and ts held fixed): those parts equal the full gradient's."""
    z0, ts, params, c = _args("increasing")
    tols = tolerances(GRAD_TOL)

    @jax.jit
    def partial_grad(v, w1):
        return jax.grad(lambda v, w1: loss((z0[0], v), ts, {**params, "W1": w1}, c, tols,
                                           adjoint="direct"), argnums=(0, 1))(v, w1)

    v_bar, w1_bar = partial_grad(z0[1], params["W1"])
    full = cached_gradient("increasing", "direct")[1]
    assert np.max(np.abs(full[0][1])) > 1e-2 and np.max(np.abs(full[2]["W1"])) > 1e-2
    np.testing.assert_allclose(v_bar, full[0][1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w1_bar, full[2]["W1"], rtol=1e-12, atol=1e-12)


def test_direct_traces_no_time_derivative_when_ts_is_held_fixed():
    """With ts held fixed, Direct's traced gradient carries no derivative of t and dt: the
    cotangent sums over the time broadcasts that a gradient of ts needs are absent (the
    two programs were the same size while Direct linearised every input)."""
    z0, ts, params, c = _args("increasing")
    tols = tolerances(GRAD_TOL)
    of = lambda p, ts: loss(z0, ts, p, c, tols, adjoint="direct")  # noqa: E731
    params_only = str(jax.make_jaxpr(jax.grad(of, argnums=0))(params, ts))
    with_ts = str(jax.make_jaxpr(jax.grad(of, argnums=(0, 1)))(params, ts))
    assert params_only.count("reduce_sum") < with_ts.count("reduce_sum")


def test_direct_solves_with_the_unrolled_stages():
    """Direct's default explicit RK traces the program of stage_loop=False on a state
    that a forward solve would loop the stages of (STAGE_LOOP_SIZE elements or more)."""
    from jaxode.solvers.rk import STAGE_LOOP_SIZE

    def program(solver):
        z0, ts = jnp.ones(STAGE_LOOP_SIZE), jnp.array([0.0, 1.0])
        fn = lambda p: jnp.sum(jaxode.odeint(lambda z, t, p: -p * z, z0, ts, p,  # noqa: E731
                                             solver=solver, adjoint="direct"))
        return str(jax.make_jaxpr(jax.grad(fn))(0.5))

    default = program(jaxode.Dopri5())
    assert default == program(jaxode.Dopri5(stage_loop=False))
    assert default != program(jaxode.Dopri5(stage_loop=True))


def test_backsolve_integrates_no_adjoint_for_inputs_held_fixed():
    """The backward state is (z, a, a_θ) with θ only the inputs being differentiated: the
    params, without the closed-over c held fixed; with params held fixed too, (z, a)
    alone. dL/dz0 is then the full gradient's (the seminorm's steps ignore a_θ)."""
    z0, ts, params, c = _args("increasing")
    tols = tolerances(GRAD_TOL)
    state, num_params = sum(x.size for x in z0), sum(x.size for x in params.values())
    of_z0 = lambda z0: loss(z0, ts, params, c, tols, adjoint="backsolve")  # noqa: E731
    of_both = lambda z0, p: loss(z0, ts, p, c, tols, adjoint="backsolve")  # noqa: E731
    with_params = f"f64[{2 * state + num_params}]"
    with_c = f"f64[{2 * state + num_params + c.size}]"
    traced = str(jax.make_jaxpr(jax.grad(of_both, argnums=(0, 1)))(z0, params))
    assert with_params in traced and with_c not in traced
    assert with_params not in str(jax.make_jaxpr(jax.grad(of_z0))(z0))
    full = cached_gradient("increasing", "backsolve")[1][0]
    assert_tree_close(jax.jit(jax.grad(of_z0))(z0), full, 1e-12, "dL/dz0 alone")


def test_direct_unrolls_the_default_stage_loop_of_small_states():
    """Differentiated, an explicit RK method unrolls its default stage loop below
    DIFFERENTIATED_STAGE_LOOP_SIZE elements; a stage loop the user asked for, a large
    state and other solvers are left as they are."""
    from jaxode.solvers.rk import DIFFERENTIATED_STAGE_LOOP_SIZE

    small, large = 1024, DIFFERENTIATED_STAGE_LOOP_SIZE
    assert jaxode.Dopri5().differentiated(small).stage_loop is False
    assert jaxode.Dopri5().differentiated(large).stage_loop is None
    assert jaxode.Tsit5(stage_loop=True).differentiated(small).stage_loop is True
    kvaerno = jaxode.Kvaerno3()
    assert kvaerno.differentiated(small) is kvaerno


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
def test_backsolve_agrees_with_direct(direction):
    value_b, grads_b = cached_gradient(direction, "backsolve")
    value_d, grads_d = cached_gradient(direction, "direct")
    assert value_b == pytest.approx(value_d, rel=1e-9)
    difference = relative_difference(grads_b, grads_d)
    print(f"{direction}: max |backsolve - direct| / max |direct| = {difference:.2e}")
    assert difference < REL


def test_adjoint_tolerances_are_used():
    """adjoint_rtol/adjoint_atol are accepted and control the backward solve only: a
    loose backward tolerance (with the forward one tight) gives a visibly less accurate
    gradient than a tight one, still a close approximation."""
    reference = finite_differences("increasing")
    value_tight, tight = cached_gradient("increasing", "backsolve")
    value, loose = gradient("increasing", "backsolve", adjoint_tol=1e-5)
    assert value == value_tight  # the forward solve does not see adjoint_rtol
    error_tight = relative_difference(tight, reference)
    error_loose = relative_difference(loose, reference)
    print(f"gradient error: adjoint tol 1e-10: {error_tight:.2e}, 1e-5: {error_loose:.2e}")
    assert error_loose < 1e-3
    assert error_loose > 10 * error_tight


# --------------------------------------------------------------------------- vmap


@functools.partial(jax.jit, static_argnames=("adjoint",))
def batched_loss_and_grad(z0s, ts, params, c, tols, *, adjoint):
    def total(params, c):
        losses = jax.vmap(lambda z0: loss(z0, ts, params, c, tols, adjoint=adjoint))(z0s)
        return jnp.sum(losses)

    return jax.value_and_grad(total, argnums=(0, 1))(params, c)


@pytest.mark.slow
def test_grad_of_vmapped_loss_is_sum_of_per_sample_gradients():
    z0, params, c = _problem()
    ts = jnp.asarray(TS["increasing"])
    shifts = np.array([0.0, 0.3, -0.5])
    z0s = jax.tree_util.tree_map(lambda x: x[None] + shifts[:, None] * jnp.ones_like(x), z0)
    tols = tolerances(GRAD_TOL)
    value, (params_bar, c_bar) = batched_loss_and_grad(z0s, ts, params, c, tols,
                                                       adjoint="backsolve")
    per_sample = []
    for b in range(len(shifts)):
        z0_b = jax.tree_util.tree_map(lambda x: x[b], z0s)
        per_sample.append(loss_and_grad(z0_b, ts, params, c, tols, adjoint="backsolve",
                                        seminorm=True, adjoint_solver=None))
    assert float(value) == pytest.approx(sum(float(v) for v, _ in per_sample), rel=1e-9)
    expected = jax.tree_util.tree_map(
        lambda *g: sum(g), *[(g[2], g[3]) for _, g in per_sample]
    )
    # The samples' gradients differ: a batch that reused one sample would fail.
    assert relative_difference(per_sample[0][1][2], per_sample[1][1][2]) > 1e-2
    assert_tree_close((params_bar, c_bar), expected, 1e-8, "vmapped")


# ------------------------------------------------------------ gradients of gradients
# dz/dt = -p z^2 has z(t) = z0 / (1 + p z0 (t - t0)). x = (p, z0, t0, t1, t2).

SCALAR_X = np.array([0.7, 1.3, 0.2, 0.9, 1.6])
SCALAR_W = np.array([0.4, -1.0, 0.8])


def scalar_loss(x, *, adjoint="backsolve", tol=GRAD_TOL):
    p, z0, ts = x[0], x[1], x[2:]
    zs = jaxode.odeint(lambda z, t, p: -p * z**2, z0, ts, p, rtol=tol, atol=tol,
                       adjoint=adjoint)
    return jnp.dot(jnp.asarray(SCALAR_W), zs)


def scalar_exact(x):
    p, z0, ts = x[0], x[1], x[2:]
    return jnp.dot(jnp.asarray(SCALAR_W), z0 / (1 + p * z0 * (ts - ts[0])))


scalar_grad = jax.jit(jax.grad(scalar_loss))


@jax.jit
def scalar_hessian_vector_product(x, v):
    """jax.grad of jax.grad (reverse over reverse): the backward pass differentiated by
    the adjoint method again."""
    return jax.grad(lambda y: jnp.dot(jax.grad(scalar_loss)(y), v))(x)


def test_gradient_closed_form():
    x = jnp.asarray(SCALAR_X)
    np.testing.assert_allclose(scalar_grad(x), jax.grad(scalar_exact)(x), rtol=1e-7, atol=1e-8)


def test_grad_of_grad_closed_form_and_finite_differences():
    """Hessian columns by grad of grad through backsolve, w.r.t. p, z0 and every time:
    against the closed form, and against central differences of the (first-order,
    backsolve) gradient."""
    x = jnp.asarray(SCALAR_X)
    hessian = np.stack([scalar_hessian_vector_product(x, e) for e in np.eye(x.size)], axis=1)
    exact = np.asarray(jax.hessian(scalar_exact)(x))
    assert np.abs(exact[0, 0]) > 0.05  # d^2L/dp^2
    scale = np.abs(exact).max()
    np.testing.assert_allclose(hessian, exact, rtol=1e-6, atol=1e-6 * scale)
    h = 1e-5
    columns = [(scalar_grad(x + h * e) - scalar_grad(x - h * e)) / (2 * h)
               for e in np.eye(x.size)]
    fd = np.stack(columns, axis=1)
    np.testing.assert_allclose(hessian, fd, rtol=0, atol=1e-5 * scale)


def test_grad_of_grad_with_a_purely_relative_tolerance():
    """atol = 0 with a component that starts at zero (and adjoint states that do): the
    backward passes' first steps are step-size decisions, held constant, so no 0/0 of
    the error norm's reaches the second derivative."""
    field = lambda z, t, k: jnp.stack([z[1], -k * z[0]])  # z = (cos √k t, ...)
    ts = jnp.linspace(0.0, 1.0, 3)
    loss = lambda k: jaxode.odeint(field, jnp.array([1.0, 0.0]), ts, k, rtol=1e-9,
                                   atol=0.0)[-1, 0]
    second = jax.jit(jax.grad(jax.grad(loss)))(1.0)
    exact = jax.grad(jax.grad(lambda k: jnp.cos(jnp.sqrt(k))))(1.0)
    np.testing.assert_allclose(second, exact, rtol=1e-5)


@pytest.mark.slow
def test_jacrev_of_jacrev_hessian():
    """The full Hessian as jacrev(jacrev(...)) (jax.hessian itself is jacfwd(jacrev),
    and forward mode is not defined for a custom_vjp)."""
    x = jnp.asarray(SCALAR_X)
    hessian = jax.jit(jax.jacrev(jax.jacrev(scalar_loss)))(x)
    exact = np.asarray(jax.hessian(scalar_exact)(x))
    np.testing.assert_allclose(hessian, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())


# -------------------------------------------------------------------------- memory

MEMORY_N = 32  # state size, big enough for per-step storage to dominate memory


def _memory_problem():
    rng = np.random.default_rng(1)
    z0 = jnp.asarray(rng.normal(size=MEMORY_N))
    params = {"W": jnp.asarray(rng.normal(size=(MEMORY_N, MEMORY_N)) / np.sqrt(MEMORY_N)),
              "b": jnp.asarray(0.1 * rng.normal(size=MEMORY_N))}
    return z0, params


def memory_loss(z0, params, dt0, *, adjoint, max_steps):
    zs = jaxode.odeint(
        lambda z, t, p: jnp.tanh(p["W"] @ z + p["b"]) - 0.5 * z,
        z0, jnp.array([0.0, 1.0]), params,
        solver="rk4", dt0=dt0, max_steps=max_steps, adjoint=adjoint,
    )
    return jnp.sum(zs[-1] ** 2)


memory_grad = jax.jit(jax.grad(memory_loss, argnums=(0, 1)),
                      static_argnames=("adjoint", "max_steps"))


def measure_memory(adjoint, steps):
    """The compiled gradient's memory and its value, for `steps` fixed rk4 steps."""
    z0, params = _memory_problem()
    dt0 = jnp.asarray(1.0 / steps)
    compiled = memory_grad.lower(z0, params, dt0, adjoint=adjoint,
                                 max_steps=steps + 2).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("memory_analysis is not available on this backend")
    sizes = {name: int(getattr(stats, f"{name}_size_in_bytes"))
             for name in ("temp", "argument", "output")}
    print(f"{adjoint} {steps} steps: {sizes}")
    return sizes, compiled(z0, params, dt0)


def _memory_ratio(adjoint):
    small, grad_small = measure_memory(adjoint, 100)
    large, grad_large = measure_memory(adjoint, 10_000)
    # rk4's global error at 100 steps is ~1e-8: the same gradient.
    assert relative_difference(grad_large, grad_small) < 1e-5
    total_small = small["temp"] + small["output"]
    total_large = large["temp"] + large["output"]
    ratio = total_large / total_small
    print(f"{adjoint}: temp+output bytes {total_small} (100 steps) -> {total_large} "
          f"(10,000 steps), ratio {ratio:.2f}")
    return ratio


def test_backsolve_memory_constant_in_steps():
    assert _memory_ratio("backsolve") <= 1.1


@pytest.mark.slow
def test_direct_memory_sublinear_in_steps():
    """direct differentiates a checkpointed loop bounded by max_steps: ~sqrt(max_steps)
    checkpoints, so 100x the steps must cost much less than 100x the memory."""
    ratio = _memory_ratio("direct")
    assert 1.1 < ratio < 100  # it does grow (it stores checkpoints), sub-linearly


# ---------------------------------------------------------------------- options


@pytest.mark.slow
def test_seminorm_does_not_change_the_gradient():
    _, with_seminorm = cached_gradient("increasing", "backsolve")
    _, without = gradient("increasing", "backsolve", seminorm=False)
    assert relative_difference(without, with_seminorm) < REL
    assert relative_difference(without, finite_differences("increasing")) < REL


@pytest.mark.slow
def test_adjoint_solver_tsit5():
    _, grads = gradient("decreasing", "backsolve", adjoint_solver="tsit5")
    assert_tree_close(grads, finite_differences("decreasing"), REL, "adjoint_solver=tsit5")


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ["backsolve", "direct"])
def test_array_state_gradient(adjoint):
    """The same problem with the state as one array instead of a tuple, through
    `jaxode.solve` (dense output on) instead of `odeint`."""

    def array_loss(z0, ts, params, c):
        sol = jaxode.solve(
            lambda z, t, p: jnp.concatenate(field((z[:2], z[2:]), t, p, c)),
            z0, ts, params, rtol=GRAD_TOL, atol=GRAD_TOL, adjoint=adjoint,
        )
        return jnp.sum(jnp.asarray(WEIGHTS) * jnp.sum(sol.zs**2, axis=1))

    z0, ts, params, c = _args("increasing")
    z0 = jnp.concatenate(z0)
    grads = jax.jit(jax.grad(array_loss, argnums=(0, 1, 2, 3)))(z0, ts, params, c)
    reference = finite_differences("increasing")
    reference = (np.concatenate(reference[0]), *reference[1:])
    assert_tree_close(grads, reference, REL, f"array state, {adjoint}")


@pytest.mark.slow
def test_float32_gradients_close_to_float64():
    value32, grads32 = gradient("increasing", "backsolve", tol=1e-6, dtype=np.float32)
    for leaf in jax.tree_util.tree_leaves(grads32):
        assert leaf.dtype == np.float32
        assert np.all(np.isfinite(leaf))
    value64, grads64 = cached_gradient("increasing", "backsolve")
    assert value32 == pytest.approx(value64, rel=1e-4)
    grads32 = jax.tree_util.tree_map(lambda x: x.astype(np.float64), grads32)
    assert relative_difference(grads32, grads64) < 1e-3


@pytest.mark.slow
def test_eager_gradient_equals_jitted():
    x = jnp.asarray(SCALAR_X)
    eager = jax.grad(scalar_loss)(x)
    np.testing.assert_allclose(eager, scalar_grad(x), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------- failures


def _failing_backward(argnums):
    """The forward solve (euler, 10 steps, max_steps=12) succeeds; the backward solve
    (adaptive heun_euler at a tolerance of 1e-12) needs far more than 12 steps."""

    def fn(z0, p):
        zs = jaxode.odeint(lambda z, t, p: -p * z, z0, jnp.array([0.0, 1.0]), p,
                           solver="euler", dt0=0.1, max_steps=12,
                           adjoint=jaxode.Backsolve(solver="heun_euler", rtol=1e-12,
                                                    atol=1e-12))
        return zs[-1, 0]

    return jax.jit(jax.grad(fn, argnums=argnums))


@pytest.mark.slow
@pytest.mark.parametrize("argnums", [(0, 1), 0], ids=["z0-and-params", "z0-only"])
def test_failed_backward_solve_raises(argnums):
    z0, p = jnp.array([1.0]), jnp.asarray(0.5)
    # The forward solve alone is fine.
    jaxode.odeint(lambda z, t, p: -p * z, z0, jnp.array([0.0, 1.0]), p, solver="euler",
                  dt0=0.1, max_steps=12)
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(_failing_backward(argnums)(z0, p))


@pytest.mark.slow  # the fast suite has test_direct_with_batch_axis_matches_vmap_and_backsolve
def test_vmapped_direct_gradient_with_unequal_step_counts():
    """Lanes that finish early still run the step with dt = 0: no NaN may leak into the
    gradient, which must equal the sum of the per-sample gradients."""
    f = lambda z, t, p: jnp.sin(p * z * (1 + t))
    ts = jnp.linspace(0.0, 1.0, 5)
    z0s = jnp.array([[0.1], [3.0]])
    solve = lambda z, p: jaxode.odeint(f, z, ts, p, adjoint="direct", rtol=1e-6, atol=1e-8)
    batched = jax.grad(lambda p: jnp.sum(jax.vmap(lambda z: solve(z, p))(z0s) ** 2))(1.5)
    one_by_one = sum(jax.grad(lambda p: jnp.sum(solve(z, p) ** 2))(1.5) for z in z0s)
    assert np.isfinite(batched)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-10)


# ----------------------------------------------------------------- adjoints as objects


def _decay(z, t, p):
    return jnp.stack([-p[0] * z[0] + jnp.sin(t) * z[1], -p[1] * z[1] * z[0]])


P0, Z0_SMALL, TS_SMALL = jnp.array([0.7, 0.3]), jnp.array([1.0, 0.5]), jnp.linspace(0, 2.0, 4)


def _small_loss(p, z0, *, adjoint, ts=TS_SMALL):
    zs = jaxode.odeint(_decay, z0, ts, p, rtol=1e-10, atol=1e-10, adjoint=adjoint)
    return jnp.sum(zs[-1] ** 2) + jnp.sum(zs[1])


def _central_difference(fn, x, eps=1e-6):
    return np.array([(fn(x + eps * e) - fn(x - eps * e)) / (2 * eps) for e in np.eye(len(x))])


@pytest.mark.parametrize("name", ["rtol", "atol", "solver", "seminorm"])
def test_flat_adjoint_keywords_are_refused_naming_the_backsolve_field(name):
    keyword = {"rtol": "adjoint_rtol", "atol": "adjoint_atol", "solver": "adjoint_solver",
               "seminorm": "seminorm"}[name]
    for entry in (jaxode.odeint, jaxode.solve, jaxode.adjoint_nfe):
        with pytest.raises(TypeError, match=rf"{keyword}: removed.*Backsolve\({name}="):
            entry(_decay, Z0_SMALL, TS_SMALL, P0, **{keyword: None})


def test_solve_odeint_and_adjoint_nfe_share_one_signature():
    shared = inspect.signature(jaxode.solve).parameters
    assert shared["rtol"].default == 1e-6 and shared["max_steps"].default == 4096
    assert inspect.signature(jaxode.odeint).parameters == shared
    nfe = dict(inspect.signature(jaxode.adjoint_nfe).parameters)
    assert nfe.pop("cotangent").kind is inspect.Parameter.KEYWORD_ONLY
    assert nfe == dict(shared)
    with pytest.raises(TypeError, match="adjoint_nfe.*'bogus'"):
        jaxode.adjoint_nfe(_decay, Z0_SMALL, TS_SMALL, P0, bogus=1)


def test_adjoint_strings_are_the_objects():
    from jaxode.adjoint import resolve_adjoint

    for name, adjoint in [("backsolve", jaxode.Backsolve()), ("direct", jaxode.Direct()),
                          ("forward", jaxode.Forward())]:
        assert resolve_adjoint(name) == adjoint
    # The same gradient program (it differs for other settings).
    program = lambda adjoint: str(jax.make_jaxpr(jax.grad(functools.partial(
        _small_loss, adjoint=adjoint)))(P0, Z0_SMALL))
    assert program("backsolve") == program(jaxode.Backsolve())
    assert program("backsolve") != program(jaxode.Backsolve(rtol=1e-3))


def test_backsolve_object_validation():
    with pytest.raises(ValueError, match="Backsolve.rtol"):
        jaxode.Backsolve(rtol=-1.0)
    with pytest.raises(ValueError, match="Backsolve.solver"):
        jaxode.Backsolve(solver="nope")
    with pytest.raises(ValueError, match="adjoint"):
        jaxode.odeint(_decay, Z0_SMALL, TS_SMALL, P0, adjoint="nope")


def test_forward_mode_matches_finite_differences_and_reverse():
    jac_fwd = jax.jacfwd(functools.partial(_small_loss, adjoint="forward"))(P0, Z0_SMALL)
    jac_rev = jax.jacrev(functools.partial(_small_loss, adjoint=jaxode.Direct()))(P0, Z0_SMALL)
    fd = _central_difference(lambda p: float(_small_loss(p, Z0_SMALL, adjoint="forward")),
                             np.asarray(P0))
    np.testing.assert_allclose(jac_fwd, fd, rtol=1e-6)
    np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-7)
    # jvp through solve, with respect to z0
    _, tangent = jax.jvp(lambda z: jaxode.solve(_decay, z, TS_SMALL, P0, adjoint="forward",
                                                rtol=1e-10, atol=1e-10).zs[-1],
                         (Z0_SMALL,), (jnp.array([1.0, 0.0]),))
    # The same solve as the differences of p above: one compiled program for both.
    end = lambda z: jaxode.odeint(_decay, z, TS_SMALL, P0, rtol=1e-10, atol=1e-10,
                                  adjoint="forward")[-1]
    fd_z = (end(Z0_SMALL + jnp.array([1e-6, 0])) - end(Z0_SMALL - jnp.array([1e-6, 0]))) / 2e-6
    np.testing.assert_allclose(tangent, fd_z, rtol=1e-6)


def test_forward_over_forward_hessian_matches_finite_differences_of_gradient():
    loss = functools.partial(_small_loss, adjoint="forward")
    hessian = jax.jacfwd(jax.jacfwd(loss))(P0, Z0_SMALL)
    grad = jax.grad(functools.partial(_small_loss, adjoint="backsolve"))
    fd = _central_difference(lambda p: np.asarray(grad(jnp.asarray(p), Z0_SMALL)),
                             np.asarray(P0), eps=1e-5)
    np.testing.assert_allclose(hessian, hessian.T, rtol=1e-8)
    np.testing.assert_allclose(hessian, fd, rtol=1e-4, atol=1e-7)


def test_reverse_mode_through_forward_is_a_type_error_naming_adjoint():
    with pytest.raises(TypeError, match="adjoint"):
        jax.grad(functools.partial(_small_loss, adjoint="forward"))(P0, Z0_SMALL)


def test_forward_mode_through_reverse_adjoints_is_a_type_error():
    for adjoint in ("backsolve", "direct"):
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(lambda p: _small_loss(p, Z0_SMALL, adjoint=adjoint), (P0,), (P0,))


def test_grad_of_grad_through_direct_is_a_type_error_naming_adjoint():
    inner = jax.grad(functools.partial(_small_loss, adjoint="direct"))
    with pytest.raises(TypeError, match="adjoint.*backsolve"):
        jax.grad(lambda p: jnp.sum(inner(p, Z0_SMALL)))(P0)


def test_lanes_backward_nfe_counts_the_quadrature():
    """batch_axis: the parameter quadrature reuses each stage's linearisation, and a step's
    first stage is the last step's last (its linearisation carried), evaluated afresh only
    where a lane jumps at an output time: with the seminorm the lanes take the joint
    pass's backward steps, and make as many evaluations."""
    z0s = jnp.stack([Z0_SMALL, 2 * Z0_SMALL])
    for ts in (TS_SMALL[jnp.array([0, -1])], TS_SMALL):
        joint = jaxode.adjoint_nfe(_decay, z0s[1], ts, P0)
        lanes = jaxode.adjoint_nfe(_decay, z0s, ts, P0, batch_axis=0)
        assert lanes["backward"].shape == (2,)
        assert int(lanes["backward"][1]) == int(joint["backward"])
    grads = jax.grad(lambda p: jnp.sum(jaxode.odeint(_decay, z0s, TS_SMALL, p, batch_axis=0,
                                                     rtol=1e-10, atol=1e-10)[-1]))(P0)
    vmapped = jax.grad(lambda p: jnp.sum(jax.vmap(lambda z: jaxode.odeint(
        _decay, z, TS_SMALL, p, rtol=1e-10, atol=1e-10))(z0s)[:, -1]))(P0)
    np.testing.assert_allclose(grads, vmapped, rtol=1e-7)


@pytest.mark.parametrize("num_outputs", [pytest.param(5, marks=pytest.mark.slow), 40,
                                         pytest.param(400, marks=pytest.mark.slow)])
def test_direct_with_batch_axis_matches_vmap_and_backsolve(num_outputs):
    """Direct + batch_axis (each sample its own steps): the same values and gradient as
    jax.vmap of single solves, with few outputs (5), a few a step (40) and many (400).
    Its outputs (written by the checkpointed loop into its output buffer) equal those of
    the forward solve's chunked output loop, and its gradient is Backsolve's."""
    z0s = jnp.stack([Z0_SMALL, 2 * Z0_SMALL, 0.5 * Z0_SMALL])
    ts = jnp.linspace(0.0, 2.0, num_outputs)

    def lanes(p, adjoint="direct"):
        return jaxode.odeint(_decay, z0s, ts, p, adjoint=adjoint, batch_axis=0, rtol=1e-9,
                             atol=1e-9)

    def vmapped(p):
        return jax.vmap(lambda z: jaxode.odeint(_decay, z, ts, p, adjoint="direct", rtol=1e-9,
                                                atol=1e-9), out_axes=1)(z0s)

    # One program a solve: its outputs and, from them, the gradient of sum(zs ** 2).
    (zs, pullback), (zs_vmapped, pullback_vmapped), (zs_backsolve, pullback_backsolve) = (
        jax.vjp(fn, P0) for fn in (lanes, vmapped, lambda p: lanes(p, "backsolve")))
    np.testing.assert_allclose(zs, zs_vmapped, rtol=1e-13)
    np.testing.assert_allclose(zs, zs_backsolve, rtol=1e-13, atol=1e-15)
    (grad,) = pullback(2 * zs)
    np.testing.assert_allclose(grad, pullback_vmapped(2 * zs_vmapped)[0], rtol=1e-11)
    np.testing.assert_allclose(grad, pullback_backsolve(2 * zs_backsolve)[0], rtol=1e-6)


def test_direct_outputs_from_the_window_and_from_every_row():
    """Direct's outputs are written from a window of the next outputs, or from every
    output row when a step passes more than the window: a solve with both kinds of step
    (dense outputs first, then sparse ones) gives the forward solve's outputs, and the
    derivative that forward mode takes of that same discrete solve."""
    from jaxode.loop import SAVE_WINDOW

    dense = jnp.linspace(0.05, 2.0, 6 * SAVE_WINDOW)  # many outputs a step
    ts = jnp.concatenate([jnp.zeros(1), dense, jnp.array([3.0, 4.0])])
    solve = lambda p, ts, adjoint="direct": jaxode.solve(_decay, Z0_SMALL, ts, p, rtol=1e-4,
                                                         atol=1e-4, adjoint=adjoint)
    def outputs(p):
        sol = solve(p, ts)
        return sol.zs, sol.stats["num_accepted"]

    # Under differentiation the outputs are those the checkpointed loop writes.
    zs, pullback, num_accepted = jax.vjp(outputs, P0, has_aux=True)
    # Fewer steps in all than windows of the dense outputs: some step passed more.
    assert int(num_accepted) < dense.shape[0] // SAVE_WINDOW
    np.testing.assert_allclose(zs, solve(P0, ts, "backsolve").zs, rtol=1e-13, atol=1e-15)
    (grad,) = pullback(jnp.zeros_like(zs).at[1:-2].set(2 * zs[1:-2]))  # of sum(zs[1:-2] ** 2)
    loss = lambda p: jnp.sum(solve(p, ts, "forward").zs[1:-2] ** 2)
    np.testing.assert_allclose(grad, jax.jacfwd(loss)(P0), rtol=1e-10)


def test_second_derivative_in_z0_with_the_parameters_held_fixed():
    # Only z0 differentiated: the backward field gets the fixed parameters as arguments
    # (closed over, they leaked into the second backward pass as a tracer).
    a = jnp.array([[-0.5, 1.0], [-1.0, -0.5]])
    loss = lambda z, adjoint: jnp.sum(jaxode.odeint(lambda z, t, a: a @ jnp.tanh(z), z,
                                                    jnp.linspace(0.0, 2.0, 3), a, rtol=1e-11,
                                                    atol=1e-11, adjoint=adjoint)[-1] ** 2)
    z0 = jnp.array([1.0, 0.5])
    np.testing.assert_allclose(jax.jacrev(jax.grad(loss))(z0, "backsolve"),
                               jax.jacfwd(jax.jacfwd(loss))(z0, "forward"), atol=1e-9)


def test_dense_output_under_direct_and_its_gradient():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a = jnp.array([[-0.5, 1.0], [-1.0, -0.5]])

    def at(z0, adjoint, t=0.7):
        sol = jaxode.solve(lambda z, t, a: a @ z, z0, jnp.array([0.0, 2.0]), a, dense=True,
                           adjoint=adjoint, rtol=1e-10, atol=1e-10)
        return sol.evaluate(t).sum()

    z0 = jnp.array([1.0, 0.5])
    expected = np.ones(2) @ scipy_linalg.expm(np.asarray(a) * 0.7)  # d/dz0 of Σ e^{0.7a} z0
    np.testing.assert_allclose(jax.grad(at)(z0, "direct"), expected, rtol=1e-7)
    np.testing.assert_allclose(jax.jacfwd(at)(z0, "forward"), expected, rtol=1e-7)
    # The adjoint method does not differentiate the dense output: refused, not zero.
    with pytest.raises(TypeError, match="adjoint.*evaluate"):
        jax.grad(at)(z0, "backsolve")
    # A loss of zs alone from a dense solve (evaluate called, its value unused) is fine.

    def zs_only(z0):
        sol = jaxode.solve(lambda z, t, a: a @ z, z0, jnp.array([0.0, 2.0]), a, dense=True)
        sol.evaluate(0.7)
        return sol.zs[-1].sum()

    expected = np.ones(2) @ scipy_linalg.expm(np.asarray(a) * 2.0)
    np.testing.assert_allclose(jax.grad(zs_only)(z0), expected, rtol=1e-5)
