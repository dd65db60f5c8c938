"""The public contract of `jaxode.odeint` / `jaxode.solve` (see shared/API.md).

Pytree states, params, jit, vmap, backwards integration, dtypes, dense output, and
every documented error: bad input raises while tracing with a message naming the
argument; run-time failures raise under jit, or come back in `Solution.status` with
`throw=False`, one status per trajectory under vmap.
"""

import functools

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode
from jaxode import loop, solvers

try:
    from equinox import EquinoxRuntimeError
except ImportError:  # older equinox: the run-time error is some Exception with the message
    EquinoxRuntimeError = Exception
# Without jit equinox raises EquinoxRuntimeError itself; inside a jax.jit-compiled
# function its check runs as a host callback, so the same message reaches Python
# wrapped in JAX's runtime error. Either way the message must say what went wrong.
RUNTIME_ERRORS = (EquinoxRuntimeError, getattr(jax.errors, "JaxRuntimeError", RuntimeError))

SUCCESS = loop.SUCCESS
MAX_STEPS_REACHED = loop.MAX_STEPS_REACHED
STEP_SIZE_UNDERFLOW = loop.STEP_SIZE_UNDERFLOW
NONFINITE_STATE = loop.NONFINITE_STATE
TS_NOT_MONOTONIC = loop.TS_NOT_MONOTONIC


def test_status_codes():
    assert (SUCCESS, MAX_STEPS_REACHED, STEP_SIZE_UNDERFLOW, NONFINITE_STATE,
            TS_NOT_MONOTONIC) == (0, 1, 2, 3, 4)
    assert len(jaxode.STATUS_MESSAGES) == 5


# ------------------------------------------------------------------ fields and solutions

# Compiling a solve is what costs time here, so tests share a few jitted solves whose
# varying inputs (z0, ts, params) are arguments.


def decay(z, t, params):
    return -z


def growth_field(z, t, params):
    # z' = cos(t + 1/2) z: z(t) = z(t0) exp(sin(t + 1/2) - sin(t0 + 1/2)). Neither even nor
    # odd in t, so a solve that passed f a wrong time (-t, say, going backwards) shows.
    return jnp.cos(t + 0.5) * z


def growth_exact(z0, t0, ts):
    phase = np.sin(np.asarray(ts, float) + 0.5) - np.sin(t0 + 0.5)
    return np.exp(phase)[:, None] * np.asarray(z0)


def oscillator_exact(x0, v0, ts):
    ts = np.asarray(ts)[:, None]
    return x0 * np.cos(ts) + v0 * np.sin(ts), -x0 * np.sin(ts) + v0 * np.cos(ts)


TS = jnp.linspace(0.0, 3.0, 7)
TOL = dict(rtol=1e-9, atol=1e-9)


def growth_odeint(z0, ts):
    return jaxode.odeint(growth_field, z0, ts, **TOL)


growth_odeint_jit = jax.jit(growth_odeint)
growth_solve_jit = jax.jit(lambda z0, ts: jaxode.solve(growth_field, z0, ts, dense=True, **TOL))


# ------------------------------------------------------------------ pytree states


class Oscillator(eqx.Module):
    x: jax.Array
    v: jax.Array


class State(eqx.Module):
    """A module at the top, holding each kind of container (one compilation for all)."""

    pair: tuple
    table: dict
    nested: dict
    module: Oscillator


X0 = np.array([1.0, -0.5])
V0 = np.array([0.0, 2.0])


def _oscillator_pieces(x, v):
    return State(
        pair=(x, v),
        table={"x": x, "v": v},
        nested={"pos": (x,), "vel": {"v": v.reshape(1, 2)}},
        module=Oscillator(x=x, v=v),
    )


def pytree_field(z, t, params):
    return State(
        pair=(z.pair[1], -z.pair[0]),
        table={"x": z.table["v"], "v": -z.table["x"]},
        nested={"pos": (z.nested["vel"]["v"][0],), "vel": {"v": -z.nested["pos"][0][None]}},
        module=Oscillator(x=z.module.v, v=-z.module.x),
    )


def test_pytree_states():
    z0 = _oscillator_pieces(jnp.asarray(X0), jnp.asarray(V0))
    zs = jax.jit(lambda z: jaxode.odeint(pytree_field, z, TS, **TOL))(z0)
    assert isinstance(zs, State)
    assert jax.tree_util.tree_structure(zs) == jax.tree_util.tree_structure(z0)
    for leaf0, leaf in zip(jax.tree_util.tree_leaves(z0), jax.tree_util.tree_leaves(zs)):
        assert leaf.shape == (len(TS), *leaf0.shape)
        assert leaf.dtype == leaf0.dtype
        np.testing.assert_array_equal(leaf[0], leaf0)  # zs[0] == z0 exactly
    x_exact, v_exact = oscillator_exact(X0, V0, TS)
    pieces = {
        "tuple": zs.pair,
        "dict": (zs.table["x"], zs.table["v"]),
        "nested": (zs.nested["pos"][0], zs.nested["vel"]["v"][:, 0]),
        "module": (zs.module.x, zs.module.v),
    }
    for name, (x, v) in pieces.items():
        np.testing.assert_allclose(x, x_exact, rtol=0, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(v, v_exact, rtol=0, atol=1e-7, err_msg=name)


class TestCoreWithAndWithoutJit(chex.TestCase):
    """The core cases, run eagerly and under jit (chex.variants): the same answers."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_pytree_state(self):
        z0 = _oscillator_pieces(jnp.asarray(X0), jnp.asarray(V0))
        zs = self.variant(lambda z: jaxode.odeint(pytree_field, z, TS, **TOL))(z0)
        chex.assert_trees_all_equal_structs(zs, z0)
        x_exact, v_exact = oscillator_exact(X0, V0, TS)
        expected = jax.vmap(_oscillator_pieces)(jnp.asarray(x_exact), jnp.asarray(v_exact))
        chex.assert_trees_all_close(zs, expected, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_of_every_reverse_adjoint_agree(self):
        def loss(z0, k, adjoint):
            zs = jaxode.odeint(lambda z, t, k: -k * z**3, z0, TS, k, adjoint=adjoint, **TOL)
            return jnp.sum(zs**2)

        z0, k = jnp.array([1.0, 0.5]), jnp.asarray(0.7)
        grads = {name: self.variant(jax.grad(functools.partial(loss, adjoint=name), (0, 1)))(z0, k)
                 for name in ("backsolve", "direct")}
        chex.assert_trees_all_close(grads["backsolve"], grads["direct"], rtol=1e-6)
        forward = self.variant(jax.jacfwd(functools.partial(loss, adjoint="forward"), (0, 1)))
        chex.assert_trees_all_close(forward(z0, k), grads["direct"], rtol=1e-6)


def test_mixed_dtype_leaves_keep_their_dtypes():
    z0 = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones(3, jnp.float64)}
    zs = jax.jit(lambda z: jaxode.odeint(
        lambda z, t, p: jax.tree_util.tree_map(jnp.negative, z), z, TS))(z0)
    assert zs["a"].dtype == jnp.float32 and zs["b"].dtype == jnp.float64
    np.testing.assert_allclose(zs["a"][:, 0], np.exp(-TS), rtol=1e-5)
    np.testing.assert_allclose(zs["b"][:, 0], np.exp(-TS), rtol=1e-5)


# ------------------------------------------------------------------ params


def test_params_none():
    seen = []

    def f(z, t, params):
        seen.append(params)
        return -z

    z0 = jnp.array([1.0, 2.0])
    zs = jax.jit(lambda z: jaxode.odeint(f, z, TS))(z0)  # params left out: None
    assert seen and all(p is None for p in seen)
    # Default tolerances (rtol=1e-6): the global error is a small multiple of rtol.
    np.testing.assert_allclose(zs, np.exp(-np.asarray(TS))[:, None] * z0, rtol=1e-5)


def test_python_scalar_leaves_are_arrays():
    zs = jaxode.odeint(lambda z, t, k: {"a": -k * z["a"]}, {"a": 2.0}, TS, 1.0, **TOL)
    np.testing.assert_allclose(zs["a"], 2.0 * np.exp(-np.asarray(TS)), rtol=1e-5)
    grad = jax.grad(lambda z: jaxode.odeint(lambda z, t, k: -k * z, z, TS, 1.0, **TOL)[-1])
    np.testing.assert_allclose(grad(1.0), np.exp(-float(TS[-1])), rtol=1e-5)
    nfe = jaxode.adjoint_nfe(lambda z, t, k: -k * z, 1.0, TS, 1.0, **TOL)
    assert int(nfe["forward"]) > 0 and int(nfe["backward"]) > 0


class Rates(eqx.Module):
    rate: jax.Array
    scale: float = eqx.field(static=True, default=1.0)


def rate_field(z, t, params):
    return -params.scale * params.rate * z


@jax.jit
def solve_rates(params):
    return jaxode.odeint(rate_field, jnp.ones(2), TS, params, **TOL)


def rates_exact(params):
    rate = params.scale * np.asarray(params.rate)
    return np.exp(-np.asarray(TS)[:, None] * rate)


def test_params_module():
    params = Rates(rate=jnp.array([0.5, 2.0]), scale=2.0)
    np.testing.assert_allclose(solve_rates(params), rates_exact(params), rtol=1e-7, atol=1e-9)


def test_vmap_over_params():
    params = Rates(rate=jnp.array([[0.5, 1.0], [1.0, 3.0], [2.0, 0.0]]), scale=1.0)
    zs = jax.vmap(solve_rates)(params)
    assert zs.shape == (3, len(TS), 2)
    for i in range(3):
        lane = Rates(rate=params.rate[i], scale=1.0)
        np.testing.assert_allclose(zs[i], rates_exact(lane), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ jit and vmap


def test_jit_matches_eager():
    z0 = jnp.array([1.0, 0.3])
    eager = growth_odeint(z0, TS)
    jitted = growth_odeint_jit(z0, TS)
    np.testing.assert_allclose(jitted, eager, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jitted, growth_exact(z0, 0.0, TS), rtol=1e-7)


def test_vmap_over_z0():
    z0s = jnp.array([[1.0, 0.0], [0.5, -2.0], [3.0, 1.0]])
    zs = jax.jit(jax.vmap(growth_odeint, in_axes=(0, None)))(z0s, TS)
    assert zs.shape == (3, len(TS), 2)
    for i in range(3):
        np.testing.assert_allclose(zs[i], growth_exact(z0s[i], 0.0, TS), rtol=1e-7)


def test_vmap_over_ts_including_a_backwards_lane():
    tss = jnp.array([[0.0, 0.5, 1.0], [0.0, 1.0, 2.5], [1.0, 0.5, -1.0]])
    z0 = jnp.array([1.0, 2.0])
    zs = jax.jit(jax.vmap(growth_odeint, in_axes=(None, 0)))(z0, tss)
    for i in range(3):
        np.testing.assert_allclose(zs[i], growth_exact(z0, tss[i, 0], tss[i]), rtol=1e-7)


def nonlinear_decay(z, t, params):  # z' = -z²: z(t) = z0 / (1 + z0 t)
    return -(z**2)


@jax.jit
def solve_nonlinear(z0):
    sol = jaxode.solve(nonlinear_decay, z0, jnp.array([0.0, 1.0, 5.0]), **TOL, dense=False)
    return sol.zs, sol.stats


def test_vmap_lanes_take_their_own_steps():
    z0s = jnp.array([[0.1], [20.0]])
    zs, stats = jax.jit(jax.vmap(solve_nonlinear))(z0s)
    assert stats["num_steps"].shape == (2,)
    # The fast lane needs more steps, and each lane's counts are its own solve's.
    assert int(stats["num_steps"][1]) > int(stats["num_steps"][0])
    for i in range(2):
        zs_i, stats_i = solve_nonlinear(z0s[i])
        for key in ("nfe", "num_steps", "num_accepted", "num_rejected"):
            assert int(stats[key][i]) == int(stats_i[key]), (i, key)
        np.testing.assert_allclose(zs[i], zs_i, rtol=1e-12)
        ts = np.array([0.0, 1.0, 5.0])
        exact = float(z0s[i, 0]) / (1 + float(z0s[i, 0]) * ts)
        np.testing.assert_allclose(zs[i][:, 0], exact, rtol=1e-7)


# ------------------------------------------------------------------ time direction

TS_BACKWARDS = jnp.array([2.0, 1.5, 0.7, 0.0, -0.3, -1.0, -2.5])  # same length as TS


def test_decreasing_ts():
    z0 = jnp.array([1.0, -0.5])
    zs = growth_odeint_jit(z0, TS_BACKWARDS)
    np.testing.assert_array_equal(zs[0], z0)
    np.testing.assert_allclose(zs, growth_exact(z0, 2.0, TS_BACKWARDS), rtol=1e-7)


def test_decreasing_ts_fixed_step():
    z0 = jnp.array([1.0, -0.5])
    zs = jax.jit(lambda z: jaxode.odeint(growth_field, z, TS_BACKWARDS, solver="rk4",
                                         dt0=0.05))(z0)
    np.testing.assert_array_equal(zs[0], z0)
    np.testing.assert_allclose(zs, growth_exact(z0, 2.0, TS_BACKWARDS), rtol=1e-5)


@jax.jit
def evaluate_many(sol, ts):
    return jax.vmap(sol.evaluate)(ts)


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
def test_evaluate_dense_output(direction):
    ts = jnp.linspace(0.0, 4.0, 7)
    if direction == "decreasing":
        ts = ts[::-1]
    z0 = jnp.array([1.0, 0.5])
    sol = growth_solve_jit(z0, ts)
    t0 = float(ts[0])
    queries = jnp.array([0.0, 0.01, 0.37, 1.0, 1.9, 2.5, 3.33, 3.99, 4.0])
    values = evaluate_many(sol, jnp.concatenate([queries, ts]))
    np.testing.assert_allclose(values[: len(queries)], growth_exact(z0, t0, queries), rtol=1e-7)
    # At the output times the dense output agrees with zs.
    np.testing.assert_allclose(values[len(queries):], sol.zs, rtol=1e-9)
    np.testing.assert_allclose(sol.evaluate(1.9), values[4], rtol=1e-12)


# ------------------------------------------------------------------ dtypes


def jaxpr_float_dtypes(closed_jaxpr):
    """Every floating dtype computed anywhere in a jaxpr, sub-jaxprs included."""
    found = set()

    def walk(jaxpr):
        if hasattr(jaxpr, "consts") and hasattr(jaxpr, "jaxpr"):
            jaxpr = jaxpr.jaxpr
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                dtype = getattr(getattr(var, "aval", None), "dtype", None)
                if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
                    found.add((str(dtype), eqn.primitive.name))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "eqns") or (hasattr(sub, "consts") and hasattr(sub, "jaxpr")):
                        walk(sub)

    walk(closed_jaxpr)
    return found


def test_float64_in_float64_out():
    z0 = jnp.array([1.0, 0.5], jnp.float64)
    sol = growth_solve_jit(z0, TS)
    assert sol.zs.dtype == jnp.float64
    assert jax.eval_shape(sol.evaluate, 0.3).dtype == jnp.float64
    np.testing.assert_array_equal(sol.zs[0], z0)
    np.testing.assert_allclose(sol.zs, growth_exact(z0, 0.0, TS), rtol=1e-8)


def test_float32_in_float32_out():
    z0 = jnp.array([1.0, 1 / 3], jnp.float32)
    ts = jnp.linspace(0.0, 2.0, 5, dtype=jnp.float32)
    sol = jax.jit(lambda z: jaxode.solve(decay, z, ts, rtol=1e-5, atol=1e-6, dense=True))(z0)
    assert sol.zs.dtype == jnp.float32
    assert jax.eval_shape(sol.evaluate, 0.3).dtype == jnp.float32
    np.testing.assert_array_equal(sol.zs[0], z0)
    np.testing.assert_allclose(sol.zs, np.exp(-np.asarray(ts, float))[:, None] * z0,
                               rtol=1e-4)


def test_float32_computation_stays_in_float32():
    """A float32 solve computes in float32 only: no float64 anywhere in its program."""
    ts = jnp.array([0.0, 1.0], jnp.float32)
    jaxpr = jax.make_jaxpr(lambda z: jaxode.odeint(decay, z, ts))(jnp.ones(2, jnp.float32))
    dtypes = jaxpr_float_dtypes(jaxpr)
    assert ("float32", "mul") in dtypes  # the walk does see the computation
    assert not {d for d in dtypes if d[0] != "float32"}, sorted(dtypes)


def test_float32_time_dependent_field():
    z0 = jnp.array([1.0, 2.0], jnp.float32)
    ts = jnp.linspace(0.0, 2.0, 5, dtype=jnp.float32)
    zs = jax.jit(lambda z: jaxode.odeint(growth_field, z, ts, rtol=1e-5, atol=1e-6))(z0)
    assert zs.dtype == jnp.float32
    np.testing.assert_allclose(zs, growth_exact(z0, 0.0, ts), rtol=1e-4)


# ------------------------------------------------------------------ solvers by object


def test_solver_object_equals_name():
    z0 = jnp.array([1.0, 0.5])
    # Both with ts a constant: a constant and a traced ts compile to different programs,
    # which may round differently.
    by_name = jax.jit(lambda z: jaxode.odeint(growth_field, z, TS, solver="dopri5", **TOL))(z0)
    by_object = jax.jit(
        lambda z: jaxode.odeint(growth_field, z, TS, solver=jaxode.Dopri5(), **TOL))(z0)
    np.testing.assert_array_equal(by_name, by_object)
    np.testing.assert_allclose(by_object, growth_exact(z0, 0.0, TS), rtol=1e-7)


def test_every_solver_name_has_an_object():
    for name, cls in solvers.SOLVERS.items():
        assert solvers.resolve_solver(cls()) == solvers.resolve_solver(name)
        assert solvers.resolve_solver(cls) == solvers.resolve_solver(name)
        assert jaxode.SOLVERS[name] is cls
    assert isinstance(jaxode.RK4(), jaxode.AbstractSolver)


# ------------------------------------------------------------------ fixed-step solvers


def test_fixed_step_returns_every_time_in_ts():
    # Output times off the dt0 grid, several inside one step, and a span that is not a
    # multiple of dt0.
    ts = jnp.array([0.0, 0.01, 0.05, 0.13, 0.5, 0.77, 0.78, 1.0, 1.234])
    z0 = jnp.array([1.0, -2.0])
    sol = jax.jit(lambda z: jaxode.solve(growth_field, z, ts, solver="rk4", dt0=0.1))(z0)
    assert sol.zs.shape == (len(ts), 2)
    np.testing.assert_allclose(sol.zs, growth_exact(z0, 0.0, ts), rtol=2e-6)
    assert int(sol.stats["num_steps"]) == 13  # ceil(1.234 / 0.1)
    assert int(sol.stats["num_rejected"]) == 0


@pytest.mark.parametrize("max_steps, status", [(10, 0), (9, 1)])
def test_fixed_step_max_steps_is_exact(max_steps, status):
    """[0, 1] with dt0 = 0.1 is exactly 10 steps: 10 allowed succeeds, 9 fails."""
    sol = jax.jit(lambda z: jaxode.solve(decay, z, jnp.array([0.0, 1.0]), solver="euler",
                                         dt0=0.1, max_steps=max_steps, throw=False,
                                         dense=False))(jnp.ones(1))
    assert int(sol.status) == status
    assert int(sol.stats["num_steps"]) == max_steps
    if status == SUCCESS:
        np.testing.assert_allclose(sol.zs[-1], 0.9**10, rtol=1e-12)


# ------------------------------------------------------------------ bad input: while tracing


def _wrong_structure(z, t, p):
    return z[0]  # a tuple state, an array back


BAD_INPUT = {
    "f_structure": (dict(f=_wrong_structure, z0=(jnp.ones(2), jnp.ones(2))), ValueError,
                    r"\bf\b"),
    "f_shape": (dict(f=lambda z, t, p: z[:2]), ValueError, r"\bf\b"),
    "f_dtype": (dict(f=lambda z, t, p: z.astype(jnp.float32)), ValueError, r"\bf\b"),
    "f_not_callable": (dict(f=3), TypeError, r"\bf\b"),
    "ts_2d": (dict(ts=jnp.zeros((2, 2))), ValueError, r"\bts\b"),
    "ts_scalar": (dict(ts=jnp.array(1.0)), ValueError, r"\bts\b"),
    "ts_length_1": (dict(ts=jnp.array([0.0])), ValueError, r"\bts\b"),
    "solver_unknown": (dict(solver="rk45"), ValueError, r"\bsolver\b"),
    "solver_type": (dict(solver=3), TypeError, r"\bsolver\b"),
    "fixed_without_dt0": (dict(solver="rk4"), ValueError, r"\bdt0\b"),
    "rtol_negative": (dict(rtol=-1e-6), ValueError, r"\brtol\b"),
    "atol_negative": (dict(atol=-1e-8), ValueError, r"\batol\b"),
    "rtol_negative_array": (dict(rtol=jnp.array(-1e-6)), ValueError, r"\brtol\b"),
    "atol_negative_array": (dict(atol=np.float64(-1e-8)), ValueError, r"\batol\b"),
    "tolerances_zero_arrays": (dict(rtol=jnp.array(0.0), atol=np.float64(0.0)), ValueError,
                               r"\brtol, atol\b"),
    "dt0_zero_array": (dict(dt0=jnp.array(0.0)), ValueError, r"\bdt0\b"),
    "adjoint_unknown": (dict(adjoint="adjoint_sensitivities"), ValueError, r"\badjoint\b"),
    "max_steps_zero": (dict(max_steps=0), ValueError, r"\bmax_steps\b"),
    "max_steps_negative": (dict(max_steps=-5), ValueError, r"\bmax_steps\b"),
    "max_steps_float": (dict(max_steps=2.5), ValueError, r"\bmax_steps\b"),
    "z0_integer": (dict(z0=jnp.array([1, 2])), TypeError, r"\bz0\b"),
}


@pytest.mark.parametrize("entry", ["odeint", "solve"])
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_raises_naming_the_argument(case, entry):
    overrides, error, pattern = BAD_INPUT[case]
    args = dict(f=decay, z0=jnp.ones(3), ts=jnp.array([0.0, 1.0]))
    args.update(overrides)
    f, z0, ts = args.pop("f"), args.pop("z0"), args.pop("ts")
    function = getattr(jaxode, entry)
    with pytest.raises(error, match=pattern):
        function(f, z0, ts, None, **args)


def test_bad_input_raises_under_jit_too():
    with pytest.raises(ValueError, match=r"\bf\b"):
        jax.jit(lambda z: jaxode.odeint(lambda z, t, p: z[:1], z, TS))(jnp.ones(2))
    with pytest.raises(ValueError, match=r"\bdt0\b"):
        jax.jit(lambda z: jaxode.odeint(decay, z, TS, solver="midpoint"))(jnp.ones(2))


# ------------------------------------------------------------------ failures at run time


def blow_up(z, t, params):  # z' = z²: z = z0 / (1 - z0 t), infinite at t = 1/z0
    return z**2


def nan_after_half(z, t, params):
    return jnp.where(t > 0.5, jnp.nan, -z)


def always_nan(z, t, params):
    return z * jnp.nan


def oscillator(z, t, params):
    return jnp.stack([z[1], -z[0]])


F32 = jnp.float32
FOUR_TS = jnp.array([0.0, 1.0, 2.0, 3.0])
# name: (f, options, z0, ts, status). Cases with the same f and options share one
# compiled solve (z0 and ts are its arguments).
FAILURES = {
    "max_steps": (oscillator, (("max_steps", 5),), jnp.array([1.0, 0.0]),
                  jnp.linspace(0.0, 10.0, 4), MAX_STEPS_REACHED),
    # Finite-time blow-up at t = 1: the controller shrinks the step until t + dt == t.
    "underflow_float32": (blow_up, (), jnp.ones(1, F32), jnp.array([0.0, 2.0], F32),
                          STEP_SIZE_UNDERFLOW),
    "underflow_float64": (blow_up, (), jnp.ones(1), jnp.array([0.0, 0.5, 2.0]),
                          STEP_SIZE_UNDERFLOW),
    "nonfinite_adaptive": (nan_after_half, (), jnp.ones(2), FOUR_TS, NONFINITE_STATE),
    "nonfinite_from_the_start": (always_nan, (), jnp.ones(2), FOUR_TS, NONFINITE_STATE),
    # Euler on z' = z² overshoots the blow-up and overflows float32 to inf.
    "nonfinite_overflow_fixed_float32": (blow_up, (("dt0", 0.1), ("solver", "euler")),
                                         jnp.ones(1, F32), jnp.array([0.0, 2.0], F32),
                                         NONFINITE_STATE),
    "nonfinite_z0": (decay, (), jnp.array([1.0, jnp.nan]), FOUR_TS, NONFINITE_STATE),
    "ts_not_monotonic": (decay, (), jnp.ones(2), jnp.array([0.0, 1.0, 0.5, 2.0]),
                         TS_NOT_MONOTONIC),
    "ts_repeated": (decay, (), jnp.ones(2), jnp.array([0.0, 1.0, 1.0, 2.0]),
                    TS_NOT_MONOTONIC),
    "ts_decreasing_then_not": (decay, (), jnp.ones(2), jnp.array([2.0, 1.0, 1.5, 0.0]),
                               TS_NOT_MONOTONIC),
    # Not a max_steps failure after 4096 steps towards infinity: told at once.
    "ts_infinite": (decay, (), jnp.ones(2), jnp.array([0.0, 1.0, 2.0, jnp.inf]),
                    TS_NOT_MONOTONIC),
}


@functools.cache
def failing_solve(f, options):
    """A jitted throw=False solve of f, shared by the cases with this f and options."""
    return jax.jit(lambda z0, ts: jaxode.solve(f, z0, ts, throw=False, dense=False,
                                               **dict(options)))


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_runtime_failure_status(case):
    f, options, z0, ts, status = FAILURES[case]
    sol = failing_solve(f, options)(z0, ts)
    assert int(sol.status) == status, (case, int(sol.status), sol.stats)
    assert int(sol.stats["num_steps"]) <= dict(options).get("max_steps", 4096)
    np.testing.assert_array_equal(sol.zs[0], z0)
    # A failed solve never reports a wrong answer as a number: the end is not reached.
    assert not np.all(np.isfinite(np.asarray(sol.zs[-1])))


# One per status code, with throw=True (the default) under jit: the message says which.
RAISING = {
    "max_steps": "max_steps",
    "underflow_float32": "underflow",
    "nonfinite_adaptive": "non-finite",
    "ts_not_monotonic": "strictly increasing or strictly decreasing",
}


@pytest.mark.parametrize("case", sorted(RAISING))
def test_runtime_failure_raises_under_jit(case):
    f, options, z0, ts, _ = FAILURES[case]
    run = jax.jit(lambda z: jaxode.odeint(f, z, ts, **dict(options)))
    with pytest.raises(RUNTIME_ERRORS, match=RAISING[case]):
        jax.block_until_ready(run(z0))


@pytest.mark.parametrize("adjoint", ["backsolve", "direct"])
def test_a_gradient_of_a_failed_solve_raises_its_failure(adjoint):
    # Only the gradient is used (the outputs' own check is then dead code): it raises,
    # with the forward solve's message (a gradient of 0.0, or the backward pass's "non-
    # finite state", before).
    def loss(k, throw=True):
        zs = jaxode.odeint(decay, jnp.ones(2), jnp.array([0.0, 5.0]), k, max_steps=2,
                           adjoint=adjoint, throw=throw)
        return zs[-1].sum()

    with pytest.raises(RUNTIME_ERRORS, match="max_steps"):
        jax.block_until_ready(jax.jit(jax.grad(loss))(1.0))
    if adjoint == "direct":  # throw=False: the failure is the caller's to read in status
        jax.block_until_ready(jax.jit(jax.grad(functools.partial(loss, throw=False)))(1.0))


def test_runtime_failure_raises_without_jit():
    with pytest.raises(RUNTIME_ERRORS, match="strictly"):
        jax.block_until_ready(jaxode.odeint(decay, jnp.ones(2), jnp.array([0.0, 2.0, 1.0])))


def test_vmap_each_lane_gets_its_own_status():
    # z' = z² from 1 blows up at t = 1; from -1 it decays as -1 / (1 + t).
    ts = jnp.array([0.0, 0.5, 2.0])
    z0s = jnp.array([[1.0], [-1.0]])
    run = failing_solve(blow_up, ())
    sol = jax.vmap(run, in_axes=(0, None))(z0s, ts)
    np.testing.assert_array_equal(sol.status, [STEP_SIZE_UNDERFLOW, SUCCESS])
    np.testing.assert_allclose(sol.zs[1][:, 0], -1 / (1 + np.asarray(ts)), rtol=1e-5)
    np.testing.assert_allclose(sol.zs[0][1, 0], 2.0, rtol=1e-5)  # reached before blow-up
    assert not np.isfinite(sol.zs[0][2, 0])
    assert int(sol.stats["num_steps"][0]) > int(sol.stats["num_steps"][1])
    # Each lane is exactly its own solve.
    for i in range(2):
        alone = run(z0s[i], ts)
        assert int(alone.status) == int(sol.status[i])
        assert int(alone.stats["num_steps"]) == int(sol.stats["num_steps"][i])


def test_vmap_over_ts_each_lane_gets_its_own_status():
    tss = jnp.array([[0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    sol = jax.vmap(failing_solve(decay, ()), in_axes=(None, 0))(jnp.ones(2), tss)
    np.testing.assert_array_equal(sol.status, [SUCCESS, TS_NOT_MONOTONIC, SUCCESS])
    np.testing.assert_allclose(sol.zs[0][:, 0], np.exp(-np.asarray(tss[0])), rtol=1e-5)
    np.testing.assert_allclose(sol.zs[2][:, 0], np.exp(np.asarray(tss[0])), rtol=1e-5)


def test_vmap_with_throw_raises_if_any_lane_fails():
    ts = jnp.array([0.0, 2.0])
    run = jax.jit(jax.vmap(lambda z: jaxode.odeint(blow_up, z, ts)))
    with pytest.raises(RUNTIME_ERRORS, match="underflow"):
        jax.block_until_ready(run(jnp.array([[1.0], [-1.0]])))


# ------------------------------------------------------------------ complex states


def test_complex_linear_system_matches_expm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a = jnp.array([[-0.2 + 1.0j, 0.3], [-0.1j, -0.5 + 0.2j]])
    z0 = jnp.array([1.0 + 0.5j, -0.3j])
    ts = jnp.linspace(0.0, 2.0, 5)
    zs = jaxode.odeint(lambda z, t, a: a @ z, z0, ts, a, rtol=1e-10, atol=1e-12)
    assert zs.dtype == jnp.complex128
    expected = np.stack([scipy_linalg.expm(np.asarray(a) * t) @ np.asarray(z0) for t in ts])
    np.testing.assert_allclose(zs, expected, rtol=1e-8)
    zs64 = jaxode.odeint(lambda z, t, a: a @ z, z0.astype(jnp.complex64), ts.astype(jnp.float32),
                         a.astype(jnp.complex64), rtol=1e-5, atol=1e-7)
    assert zs64.dtype == jnp.complex64
    np.testing.assert_allclose(zs64, expected, rtol=1e-4)


def _complex_field(z, t, w):
    return (w[0] * 1j - w[1]) * z + 0.1 * w[2] * z * jnp.conj(z)


def _complex_loss(w, adjoint="backsolve"):
    """A real loss of a complex, nonlinear solve with real parameters w (one field for
    every call: eager calls of one field share a compiled program)."""
    z0 = jnp.array([1.0 + 0.2j, 0.5j])
    zs = jaxode.odeint(_complex_field, z0, jnp.array([0.0, 0.5, 1.0]), w, rtol=1e-11, atol=1e-11,
                       adjoint=adjoint)
    return jnp.sum(jnp.abs(zs[-1]) ** 2) + jnp.sum(jnp.real(zs[1]))


def test_complex_gradients_match_finite_differences():
    w = jnp.array([1.3, 0.4, 0.7])
    eps = 1e-6
    grad = jax.grad(_complex_loss)(w)
    fd = np.array([(_complex_loss(w + eps * e) - _complex_loss(w - eps * e)) / (2 * eps)
                   for e in np.eye(3)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(functools.partial(_complex_loss, adjoint="direct"))(w),
                               grad, rtol=1e-7)


@pytest.mark.slow
def test_complex_second_order_gradients_match_finite_differences():
    w = jnp.array([1.3, 0.4, 0.7])
    hessian = jax.jacrev(jax.grad(_complex_loss))(w)
    fd2 = np.array([(jax.grad(_complex_loss)(w + 1e-5 * e) - jax.grad(_complex_loss)(w - 1e-5 * e))
                    / 2e-5 for e in np.eye(3)])
    np.testing.assert_allclose(hessian, fd2, rtol=1e-4, atol=1e-6)


def test_complex_gradient_with_respect_to_complex_z0():
    """JAX's convention: for a real loss, grad w.r.t. complex z is conj(dL/dx + i dL/dy)."""
    f = lambda z, t, p: (-0.3 + 1j) * z
    loss = lambda z0: jnp.sum(jnp.abs(jaxode.odeint(f, z0, jnp.array([0.0, 1.0]), rtol=1e-11,
                                                     atol=1e-11)[-1]) ** 2)
    z0 = jnp.array([1.0 + 0.5j])
    grad = jax.grad(loss)(z0)
    dx = (loss(z0 + 1e-6) - loss(z0 - 1e-6)) / 2e-6
    dy = (loss(z0 + 1e-6j) - loss(z0 - 1e-6j)) / 2e-6
    np.testing.assert_allclose(grad, np.conj(dx + 1j * dy), rtol=1e-6)


def _linear(z, t, p):
    return p @ z


def _complex_parameter_gradient(p, **options):
    """dL/dp for a complex matrix p (real loss), by JAX's convention for complex numbers:
    conj(dL/dRe p + i dL/dIm p), which the adjoint accumulates with its imaginary part."""
    z0 = jnp.array([1.0 + 0.5j, -0.3j])
    loss = lambda p: jnp.sum(jnp.abs(jaxode.odeint(_linear, z0, jnp.linspace(
        0.0, 1.5, 4), p, rtol=1e-10, atol=1e-10, **options)) ** 2)
    return jax.grad(loss)(p), loss


@pytest.mark.parametrize("options", [{}, {"solver": "kvaerno5"}, {"adjoint": "direct"}],
                         ids=["backsolve", "stiff backsolve", "direct"])
def test_complex_parameter_gradient_keeps_its_imaginary_part(options):
    p = jnp.array([[-0.2 + 1.0j, 0.5], [-0.3j, -0.1 - 2.0j]])
    grad, loss = _complex_parameter_gradient(p, **options)
    e = np.zeros((2, 2))
    e[0, 0] = 1e-6
    dx, dy = (loss(p + e) - loss(p - e)) / 2e-6, (loss(p + 1j * e) - loss(p - 1j * e)) / 2e-6
    np.testing.assert_allclose(grad[0, 0], np.conj(dx + 1j * dy), rtol=1e-5)
    assert abs(grad[0, 0].imag) > 0.1


def test_complex_parameter_gradient_of_a_batch_and_of_a_real_state():
    p = jnp.array([[-0.2 + 1.0j, 0.5], [-0.3j, -0.1 - 2.0j]])
    z0 = jnp.array([[1.0 + 0.5j, -0.3j], [0.2, 1.0j]])
    ts = jnp.linspace(0.0, 1.5, 4)
    batch = lambda p, **o: jnp.sum(jnp.abs(jaxode.odeint(lambda z, t, p: p @ z, z0, ts, p,
                                                          rtol=1e-10, atol=1e-10, **o)) ** 2)
    np.testing.assert_allclose(jax.grad(functools.partial(batch, batch_axis=0))(p),
                               jax.grad(functools.partial(batch, adjoint="direct",
                                                          batch_axis=0))(p), rtol=1e-7)
    # A real state whose field depends on |p|: the cotangent of p is still complex.
    real = lambda p, adjoint: jnp.sum(jaxode.odeint(lambda z, t, p: -jnp.abs(p) * z, jnp.ones(2),
                                                    ts, p, rtol=1e-10, atol=1e-10,
                                                    adjoint=adjoint)[-1])
    p = jnp.asarray(0.3 + 0.4j)
    np.testing.assert_allclose(jax.grad(real)(p, "backsolve"), jax.grad(real)(p, "direct"),
                               rtol=1e-7)


# ------------------------------------------------------------------ sharp edges


def test_dense_history_is_kept_only_when_asked_for():
    big = jnp.zeros(10**6)
    sol = jax.eval_shape(lambda z: jaxode.solve(lambda z, t, p: -z, z, jnp.array([0.0, 1.0])), big)
    assert sol.history is None  # no max_steps x stages x n buffer
    with pytest.raises(ValueError, match="dense"):
        jaxode.solve(lambda z, t, p: -z, jnp.ones(2), jnp.array([0.0, 1.0])).evaluate(0.5)
    dense = jaxode.solve(lambda z, t, p: -z, jnp.ones(2), jnp.array([0.0, 1.0]), dense=True)
    np.testing.assert_allclose(dense.evaluate(0.5), np.exp(-0.5), rtol=1e-6)


def test_evaluate_outside_the_span_is_nan():
    sol = jaxode.solve(lambda z, t, p: -z, jnp.ones(2), jnp.array([1.0, 0.0]), dense=True)
    for t in (-0.1, 1.1):
        assert np.isnan(np.asarray(sol.evaluate(t))).all()
    assert np.isfinite(np.asarray(sol.evaluate(0.0))).all()


def test_eager_calls_reuse_the_compiled_solve():
    f = lambda z, t, p: -p * z
    traces = []
    counted = lambda z, t, p: (traces.append(1), f(z, t, p))[1]
    for p in (1.0, 2.0, 3.0):
        jaxode.odeint(counted, jnp.ones(2), jnp.array([0.0, 1.0]), jnp.asarray(p))
    assert len(traces) <= 3  # traced once (f is called a few times while tracing), not per call
    first = len(traces)
    jaxode.odeint(counted, jnp.ones(2), jnp.array([0.0, 2.0]), jnp.asarray(4.0))
    assert len(traces) == first


@pytest.mark.parametrize("rtol, atol, match", [(0.0, 0.0, "rtol, atol"), (-1.0, 1e-6, "rtol")])
def test_impossible_tolerances_are_refused(rtol, atol, match):
    with pytest.raises(ValueError, match=match):
        jaxode.odeint(lambda z, t, p: -z, jnp.ones(2), jnp.array([0.0, 1.0]), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_states_are_refused(dtype):
    with pytest.raises(TypeError, match="z0"):
        jaxode.odeint(lambda z, t, p: -z, jnp.ones(2, dtype), jnp.array([0.0, 1.0]))


def test_solvers_are_public():
    assert set(jaxode.SOLVERS) >= {"euler", "rk4", "dopri5", "tsit5", "dopri8"}
    assert jaxode.SOLVERS["tsit5"] is jaxode.Tsit5


@pytest.mark.parametrize("options, error, name", [
    (dict(progress="yes"), TypeError, "progress"),
    (dict(dense=1), TypeError, "dense"),
    (dict(throw="no"), TypeError, "throw"),
    (dict(adjoint=jaxode.Backsolve(solver="rk4")), ValueError, "Backsolve.solver"),
    (dict(adjoint=42), TypeError, "adjoint"),
])
def test_bad_v2_options_are_refused_naming_them(options, error, name):
    with pytest.raises(error, match=name):
        jaxode.odeint(lambda z, t, p: -z, jnp.ones(2), jnp.array([0.0, 1.0]), **options)


def test_backsolve_seminorm_must_be_a_bool():
    with pytest.raises(TypeError, match="Backsolve.seminorm"):
        jaxode.Backsolve(seminorm="x")
