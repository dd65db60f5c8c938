"""The cases of JAX's own `jax.experimental.ode` test-suite, run against `jaxode.odeint`
in float32 and float64: values against scipy's odeint, and reverse-mode gradients of
first and second order against numerical differences (`jax.test_util.check_grads`);
its regression cases (closures, vmapped gradients, forward mode refused) as well.

jax.experimental.ode's f is f(y, t, *args); jaxode's is f(z, t, params), so each case's
extra arguments travel as the params tuple. Second-order checks take ~20 s a case here:
three of the cases are marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from jax.test_util import check_grads

import jaxode

DTYPES = [np.float32, np.float64]


def integrate(fun):
    """odeint in jax.experimental.ode's calling convention: (y0, ts, *args). The field is
    made once, so that repeated calls reuse the compiled solve."""
    field = lambda y, t, p: fun(y, t, *p)
    return lambda y0, ts, *args: jaxode.odeint(field, y0, ts, args, rtol=1.4e-8, atol=1.4e-8)


def tolerance(dtype):
    return 1e-1 if dtype == np.float32 else 1e-3


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


def check_against_scipy(fun, y0, ts, args, dtype):
    """fun(xp, y, t, *args) written for both NumPy (scipy's side) and jax.numpy."""
    expected = scipy.integrate.odeint(lambda y, t, *a: fun(np, y, t, *a), np.asarray(y0, float),
                                      np.asarray(ts, float), tuple(args))
    found = integrate(lambda y, t, *a: fun(jnp, y, t, *a))(
        cast(y0, dtype), cast(ts, dtype), *cast(args, dtype))
    np.testing.assert_allclose(np.asarray(found, float), expected, rtol=tolerance(dtype),
                               atol=tolerance(dtype))


def check_gradients(fun, y0, ts, args, dtype):
    tol = tolerance(dtype)
    check_grads(integrate(fun), (cast(y0, dtype), cast(ts, dtype), *cast(args, dtype)),
                modes=["rev"], order=2, atol=tol, rtol=tol)


def pendulum(y, t, m, g):
    theta, omega = y
    return [omega, -m * omega - g * jnp.sin(theta)]


def time_dependent(xp, y, t):
    return xp.stack([y[1] * -t, -1 * y[1] - 9.8 * xp.sin(y[0])])


def decay(xp, y, t, a, b):
    return -xp.sqrt(t) - y + a - xp.mean((y + b) ** 2)


def swoop(xp, y, t, a, b):
    return y - xp.sin(t) - xp.cos(t) * a + b


def jax_side(fun):
    return lambda y, t, *a: fun(jnp, y, t, *a)


@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)])
def test_pendulum_with_list_state_and_gradients(dtype):
    ts = np.linspace(0.0, 1.0, 11)
    check_gradients(pendulum, [np.pi - 0.1, 0.0], ts, (0.25, 9.8), dtype)
    zs = integrate(pendulum)(cast([np.pi - 0.1, 0.0], dtype), cast(ts, dtype),
                             *cast((0.25, 9.8), dtype))
    expected = scipy.integrate.odeint(
        lambda y, t: [y[1], -0.25 * y[1] - 9.8 * np.sin(y[0])], [np.pi - 0.1, 0.0], ts)
    np.testing.assert_allclose(np.stack(zs, 1), expected, atol=tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)])
def test_pytree_state_gradients(dtype):
    fun = lambda y, t: jax.tree_util.tree_map(jnp.negative, y)
    y0 = (np.array(-0.1), np.array([[[0.1]]]))
    check_gradients(fun, y0, np.linspace(0.0, 1.0, 11), (), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_time_dependent_dynamics(dtype):
    y0, ts = np.array([np.pi - 0.1, 0.0]), np.linspace(0.0, 1.0, 11)
    check_against_scipy(time_dependent, y0, ts, (), dtype)
    check_gradients(jax_side(time_dependent), y0, ts, (), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_decay(dtype):
    rng = np.random.RandomState(0)
    args, y0, ts = (rng.randn(3), rng.randn(3)), rng.randn(3), np.linspace(0.1, 0.2, 4)
    check_against_scipy(decay, y0, ts, args, dtype)
    check_gradients(jax_side(decay), y0, ts, args, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_swoop(dtype):
    ts = np.array([0.1, 0.2])
    for y0, args in ((np.linspace(0.1, 0.9, 10), (0.1, 0.2)),
                     (np.linspace(1.1, 10.9, 10), (0.1, 0.3))):
        check_against_scipy(swoop, y0, ts, args, dtype)
        check_gradients(jax_side(swoop), y0, ts, args, dtype)


def test_vmap_of_gradient_sums_the_separate_gradients():
    fun = lambda y, t, p: 0.1 * y
    ts = jnp.array([0.0, 5.0])
    one = lambda x, y: jaxode.odeint(fun, jnp.stack([x, y]), ts)[-1].sum()
    both = lambda x: jax.vmap(lambda y0: jaxode.odeint(fun, y0, ts))(
        jnp.array([[x, 0.1], [x, 0.2]]))[:, -1].sum()
    expected = jax.grad(one)(2.0, 0.1) + jax.grad(one)(2.0, 0.2)
    np.testing.assert_allclose(jax.grad(both)(2.0), expected, rtol=2e-15, atol=5e-15)


def test_vmap_under_disable_jit():
    with jax.disable_jit():
        zs = jax.vmap(lambda z0: jaxode.odeint(lambda z, t, p: z, z0, jnp.array([0.0, 1.0])))(
            jnp.zeros((5, 2)))
    np.testing.assert_array_equal(zs, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_of_a_closed_over_value(dtype):
    ts = jnp.arange(0, 10, 0.1, dtype)

    def experiment(x):
        return integrate(lambda y, t: -x * y)(jnp.ones((), dtype), ts)[-1]

    check_grads(experiment, (jnp.asarray(0.01, dtype),), modes=["rev"], order=1,
                atol=tolerance(dtype), rtol=tolerance(dtype))


def test_vmapped_value_and_gradient_of_a_jitted_closure():
    @jax.jit
    def experiment(x):
        return integrate(lambda y, t: -x * y)(jnp.ones(()), jnp.arange(0, 10, 0.1))[-1]

    values, grads = jax.vmap(jax.value_and_grad(experiment))(jnp.arange(0.0, 1.0, 0.01))
    value = experiment(0.11)
    difference = (experiment(0.11 + 1e-5) - value) / 1e-5
    np.testing.assert_allclose([values[11], grads[11]], [value, difference], atol=1e-2, rtol=1e-2)


def test_forward_mode_through_the_adjoint_method_is_refused():
    loss = lambda k: integrate(lambda x, t: k * x)(jnp.ones(()), jnp.linspace(0, 1.0, 50)).sum()
    with pytest.raises(TypeError, match="can't apply forward-mode"):
        jax.jacfwd(loss)(3.0)


def test_gradient_of_a_field_that_restacks_its_state():
    field = lambda z, t: jnp.stack([z[0], z[1]])
    grad = jax.grad(lambda z: jnp.sum(integrate(field)(z, jnp.arange(10.0))))(jnp.ones(2))
    # z(t) = z0 e^t: d/dz0 of the sum over ts of z(t) is Σ e^t.
    np.testing.assert_allclose(grad, np.full(2, np.exp(np.arange(10.0)).sum()), rtol=1e-6)


@pytest.mark.parametrize("order", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_complex_state_and_parameter(dtype, order):
    complex_dtype = jnp.complex64 if dtype == np.float32 else jnp.complex128
    field = lambda y, t, alpha: alpha * y * jnp.exp(-t).astype(y.dtype)
    run = lambda y0, ts, alpha: integrate(field)(y0, ts, alpha).real
    args = (jnp.asarray(1 + 2j, complex_dtype), jnp.linspace(0.0, 1.0, 11, dtype=dtype),
            jnp.asarray(3 + 4j, complex_dtype))
    check_grads(run, args, modes=["rev"], order=order, atol=tolerance(dtype),
                rtol=tolerance(dtype))
