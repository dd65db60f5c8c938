"""Step-size controllers: each owns its state and turns an error estimate into
(accept, next dt, state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode
from jaxode.control import ConstantStep, PIController, error_ratio

Z0, Z1 = jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0])


def adapt(controller, error, dt=0.1, state=None, order=4):
    state = controller.init() if state is None else state
    return controller.adapt(jnp.asarray(dt), jnp.asarray(error), Z0, Z1, 1e-3, 1e-6, order, state)


def scaled(ratio):
    """An error estimate whose Hairer ratio is `ratio` for Z0/Z1 at rtol 1e-3, atol 1e-6."""
    return ratio * (1e-6 + 1e-3 * jnp.abs(Z0))


def test_error_ratio_is_hairer_rms_norm():
    error = jnp.array([3e-3, -4e-3])
    scale = 1e-6 + 1e-3 * np.array([1.0, 2.0])
    expected = np.sqrt(np.mean((np.array([3e-3, 4e-3]) / scale) ** 2))
    np.testing.assert_allclose(error_ratio(error, Z0, Z1, 1e-3, 1e-6), expected, rtol=1e-12)


def test_error_ratio_of_complex_state_uses_modulus():
    z = jnp.array([3 + 4j])
    np.testing.assert_allclose(error_ratio(jnp.array([1e-3j]), z, z, 1e-3, 0.0), 0.2, rtol=1e-12)


def test_zero_component_against_zero_atol_is_exact_not_nonfinite():
    zero = jnp.array([1.0, 0.0])
    # 0 / 0 at the zero component counts as 0; a nonzero error there is infinitely large.
    np.testing.assert_allclose(error_ratio(jnp.array([1e-3, 0.0]), zero, zero, 1e-3, 0.0),
                               np.sqrt(0.5), rtol=1e-12)
    assert float(error_ratio(jnp.array([0.0, 1e-9]), zero, zero, 1e-3, 0.0)) == np.inf


@pytest.mark.parametrize("field", [
    lambda z, t, p: jnp.stack([z[1], -z[0]]),  # the zero component moves at once
    lambda z, t, p: jnp.stack([-z[0], 0.0 * z[1]]),  # the zero component stays zero
], ids=["oscillator", "resting"])
def test_pure_relative_tolerance_with_a_zero_component_solves(field):
    ts = jnp.linspace(0.0, 3.0, 4)
    z0 = jnp.array([1.0, 0.0])
    sol = jaxode.solve(field, z0, ts, rtol=1e-6, atol=0.0, throw=False)
    reference = jaxode.solve(field, z0, ts, rtol=1e-6, atol=1e-12)
    assert int(sol.status) == 0
    np.testing.assert_allclose(sol.zs, reference.zs, rtol=1e-4, atol=1e-6)


def test_integral_controller_factor():
    accept, dt_next, state = adapt(PIController(), scaled(0.5))
    assert bool(accept) and state is None  # the integral controller carries nothing
    np.testing.assert_allclose(dt_next, 0.1 * 0.9 * 0.5 ** (-1 / 5), rtol=1e-12)


def test_rejection_never_grows_the_step():
    accept, dt_next, _ = adapt(PIController(safety=1.0), scaled(1.01))
    assert not bool(accept) and float(dt_next) <= 0.1


def test_factor_limits_clip():
    _, big, _ = adapt(PIController(factormax=3.0), scaled(1e-12))
    _, small, _ = adapt(PIController(factormin=0.5), scaled(1e6))
    np.testing.assert_allclose([big, small], [0.3, 0.05], rtol=1e-12)


def test_nonfinite_error_rejects_with_strongest_cut():
    accept, dt_next, _ = adapt(PIController(), jnp.array([jnp.nan, 0.0]))
    assert not bool(accept)
    np.testing.assert_allclose(dt_next, 0.02, rtol=1e-12)


def test_dtmax_bounds_the_step():
    _, dt_next, _ = adapt(PIController(dtmax=0.05), scaled(1e-3))
    np.testing.assert_allclose(dt_next, 0.05)


def test_pcoeff_uses_and_updates_previous_error():
    controller = PIController(pcoeff=0.4, icoeff=0.3)
    state = jnp.asarray(0.25)
    accept, dt_next, new_state = adapt(controller, scaled(0.5), state=state)
    expected = 0.1 * 0.9 * 0.5 ** (-0.7 / 5) * 0.25 ** (0.4 / 5)
    np.testing.assert_allclose(dt_next, expected, rtol=1e-12)
    np.testing.assert_allclose(new_state, 0.5)  # the accepted step's error is remembered
    _, _, floored = adapt(controller, scaled(1e-9), state=state)
    np.testing.assert_allclose(floored, 1e-4)  # a near-exact step does not blow up the next


def test_pcoeff_changes_the_steps_of_a_solve():
    f = lambda z, t, p: jnp.stack([z[1], -z[0] * (1 + z[0] ** 2)])
    run = lambda c: jaxode.solve(f, jnp.array([1.0, 0.0]), jnp.array([0.0, 10.0]), rtol=1e-6,
                                 controller=c)
    integral, pi = run(PIController()), run(PIController(pcoeff=0.4, icoeff=0.3))
    assert int(integral.stats["num_steps"]) != int(pi.stats["num_steps"])
    np.testing.assert_allclose(integral.zs[-1], pi.zs[-1], atol=1e-4)


def test_constant_step_accepts_finite_and_stops_on_nonfinite():
    c = ConstantStep()
    accept, dt, _ = c.adapt(0.1, None, Z0, Z1, 0.0, 0.0, None, c.init())
    assert bool(accept) and float(dt) == 0.1
    accept, dt, _ = c.adapt(0.1, None, Z0, jnp.array([jnp.inf, 0.0]), 0.0, 0.0, None, None)
    assert not bool(accept) and float(dt) == 0.0  # no progress possible: the loop stops


@pytest.mark.parametrize("kwargs, name", [
    (dict(safety=0.0), "controller.safety"), (dict(factormin=0.0), "controller.factormin"),
    (dict(factormin=2.0), "controller.factormin/factormax"),
    (dict(factormax=0.5), "controller.factormin/factormax"), (dict(dtmax=-1.0), "controller.dtmax"),
    (dict(pcoeff=-0.1), "controller.pcoeff"), (dict(icoeff=-1.0), "controller.icoeff"),
])
def test_bad_controller_arguments_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PIController(**kwargs)


def test_controller_with_fixed_step_solver_is_refused():
    with pytest.raises(ValueError, match="controller"):
        jaxode.solve(lambda z, t, p: -z, jnp.ones(1), jnp.array([0.0, 1.0]), solver="rk4",
                     dt0=0.1, controller=PIController())


def test_constant_step_with_adaptive_method_takes_fixed_steps():
    sol = jaxode.solve(lambda z, t, p: -z, jnp.ones(1), jnp.array([0.0, 1.0]), dt0=0.25,
                       controller=ConstantStep())
    assert int(sol.stats["num_steps"]) == 4
    np.testing.assert_allclose(sol.zs[-1], np.exp(-1.0), rtol=1e-5)


def test_controllers_are_pytrees_with_static_fields():
    assert jax.tree_util.tree_leaves(PIController(pcoeff=0.4)) == []
    assert PIController(dtmax=1.0) == PIController(dtmax=1.0)
