"""One-function loops on XLA:CPU (`jaxode.xla_cpu`): which calls are tagged, and that a
tagged solve compiles and is right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax import lax

import jaxode
from jaxode import xla_cpu

# Our tag: XLA's own small-loop pass also tags loops (under 1 KiB), never with this.
TAG = 'inlineable="false",xla_cpu_small_call="true"'
A = np.array([[-0.5, 2.0], [-2.0, -0.5]])


def _rotation(z, t, params):
    # Elementwise (no dot product): the field a one-function loop compiles.
    return jnp.stack([A[0, 0] * z[0] + A[0, 1] * z[1], A[1, 0] * z[0] + A[1, 1] * z[1]])


def _rotation_by_matmul(z, t, params):
    return params @ z


def _exact(ts, z0):
    return np.stack([scipy.linalg.expm(A * float(t)) @ np.asarray(z0) for t in ts])


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def _doubling(x):
    return lax.while_loop(lambda c: c[0] < 10, lambda c: (c[0] + 1, 2 * c[1]), (0, x))[1]


@pytest.mark.parametrize("size, tagged", [(1024, True), (1025, False)])
def test_a_call_is_tagged_only_with_arrays_up_to_the_size_limit(size, tagged):
    x = jnp.ones(size)
    fn = lambda x: xla_cpu.one_kernel(jax.jit(_doubling)(x))
    assert (TAG in _hlo(fn, x)) == tagged
    np.testing.assert_array_equal(jax.jit(fn)(x), 1024.0)


def _doubling_the_first_ten(x):
    # A buffer only read and written by slice, as a solve's outputs are.
    def body(c):
        i, x = c
        return i + 1, lax.dynamic_update_slice(x, 2 * lax.dynamic_slice(x, (i,), (1,)), (i,))
    return lax.while_loop(lambda c: c[0] < 10, body, (0, x))[1]


@pytest.mark.parametrize("size, barrier, tagged", [
    (2000, True, True), (2000, False, False), (xla_cpu.BUFFER_SIZE + 1, True, False)])
def test_a_larger_buffer_is_handed_to_a_tagged_call_only_from_a_barrier(size, barrier, tagged):
    def fn(x):
        x = lax.optimization_barrier(x) if barrier else x
        return xla_cpu.one_kernel(jax.jit(_doubling_the_first_ten)(x))
    x = jnp.ones(size)
    assert (TAG in _hlo(fn, x)) == tagged
    np.testing.assert_array_equal(jax.jit(fn)(x), np.where(np.arange(size) < 10, 2.0, 1.0))


def test_a_call_with_a_dot_product_is_not_tagged():
    x, m = jnp.ones(200), jnp.eye(200)
    fn = lambda x, m: xla_cpu.one_kernel(jax.jit(lambda x: _doubling(m @ x))(x))
    assert TAG not in _hlo(fn, x, m)
    np.testing.assert_array_equal(jax.jit(fn)(x, m), 1024.0)


def test_a_value_not_made_by_a_call_is_left_alone():
    x = jnp.ones(3)
    assert TAG not in _hlo(lambda x: xla_cpu.one_kernel(2 * x), x)
    # Differentiated and vmapped, it is the identity.
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(xla_cpu.one_kernel(x) ** 2))(x), 2 * x)
    np.testing.assert_array_equal(jax.vmap(xla_cpu.one_kernel)(jnp.ones((2, 3))), 1.0)


@pytest.mark.parametrize("num_ts", [2, 11])
def test_a_small_solve_runs_as_one_function_and_is_right(num_ts):
    ts = jnp.linspace(0.0, 3.0, num_ts)
    z0 = jnp.array([1.0, 0.5])
    solve = lambda z0: jaxode.odeint(_rotation, z0, ts, None, rtol=1e-10, atol=1e-10)
    assert TAG in _hlo(solve, z0)
    np.testing.assert_allclose(jax.jit(solve)(z0), _exact(ts, z0), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("solver", ["adams", "explicit_adams", "implicit_adams"])
def test_a_small_multistep_solve_runs_as_one_function_and_is_right(solver):
    # The Adams methods' weighted sums over a small history are elementwise, not
    # matrix products, so that their loops qualify.
    ts = jnp.linspace(0.0, 3.0, 11)
    z0 = jnp.array([1.0, 0.5])
    dt0 = None if solver == "adams" else 0.005
    solve = lambda z0: jaxode.odeint(_rotation, z0, ts, None, solver=solver, rtol=1e-10,
                                     atol=1e-10, dt0=dt0)
    assert TAG in _hlo(solve, z0)
    np.testing.assert_allclose(jax.jit(solve)(z0), _exact(ts, z0), rtol=1e-7, atol=1e-8)


def test_adams_weighted_sums_agree_as_products_and_elementwise(monkeypatch):
    from jaxode.solvers import adams

    weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 14)))
    rows = jnp.asarray(np.random.default_rng(1).normal(size=(14, 5)))
    elementwise = adams._weighted(weights, rows)  # 3 x 14 x 5 = 210 elements: small
    monkeypatch.setattr(adams, "SMALL_HISTORY", 0)
    np.testing.assert_allclose(elementwise, adams._weighted(weights, rows), rtol=1e-12)
    np.testing.assert_allclose(elementwise, weights @ rows, rtol=1e-12)


def test_solves_that_one_function_cannot_compile_keep_the_kernels():
    ts = jnp.linspace(0.0, 3.0, 5)
    z0 = jnp.array([1.0, 0.5])
    by_matmul = lambda z0: jaxode.odeint(_rotation_by_matmul, z0, ts, jnp.asarray(A))
    assert TAG not in _hlo(by_matmul, z0)
    # A vmapped solve's outputs are written at each lane's own row: a scatter.
    lanes = jnp.stack([z0, 2 * z0])
    vmapped = jax.vmap(lambda z0: jaxode.odeint(_rotation, z0, ts, None, rtol=1e-10, atol=1e-10))
    assert TAG not in _hlo(vmapped, lanes)
    exact = _exact(ts, z0)
    np.testing.assert_allclose(jax.jit(vmapped)(lanes), np.stack([exact, 2 * exact]),
                               rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(jax.jit(by_matmul)(z0), exact, rtol=1e-5, atol=1e-6)


def test_other_platforms_get_no_tag():
    z0 = jnp.array([1.0, 0.5])
    # throw=False: throw's host callback lowers for this machine's own platform only.
    solve = jax.jit(lambda z0: jaxode.solve(_rotation, z0, jnp.array([0.0, 1.0]), None,
                                            throw=False).zs)
    exported = jax.export.export(solve, platforms=["cuda"])(z0)
    assert "xla_cpu_small_call" not in exported.mlir_module()
    assert "xla_cpu_small_call" in jax.export.export(solve, platforms=["cpu"])(z0).mlir_module()


def test_a_solve_in_a_scan_is_one_function_and_none_when_switched_off(monkeypatch):
    z0 = jnp.array([1.0, 0.5])
    solve = lambda z0: jaxode.odeint(_rotation, z0, jnp.array([0.0, 1.0]), None,
                                     rtol=1e-10, atol=1e-10)
    in_scan = lambda z0: lax.scan(lambda z, _: (solve(z)[-1], None), z0, None, length=2)[0]
    assert TAG in _hlo(in_scan, z0)
    np.testing.assert_allclose(jax.jit(in_scan)(z0), _exact([2.0], z0)[0], rtol=1e-8)
    monkeypatch.setattr(xla_cpu, "ENABLED", False)
    assert TAG not in _hlo(lambda z0: solve(z0) + 0, z0)


def test_a_solve_with_many_output_times_is_one_function_and_the_same(monkeypatch):
    # 2,000 output times, a constant of the program: 4,000 output elements.
    ts = jnp.linspace(0.0, 3.0, 2000)
    solve = lambda z0: jaxode.odeint(_rotation, z0, ts, None, rtol=1e-10, atol=1e-10)
    z0 = jnp.array([1.0, 0.5])
    assert TAG in _hlo(solve, z0)
    tagged = jax.jit(solve)(z0)
    np.testing.assert_allclose(tagged[::400], _exact(ts[::400], z0), rtol=1e-8, atol=1e-9)
    monkeypatch.setattr(xla_cpu, "ENABLED", False)
    np.testing.assert_array_equal(jax.jit(lambda z0: solve(z0) + 0)(z0), tagged)


def test_a_field_reading_a_large_constant_keeps_the_kernels():
    # A table of 2,000 rates read by index: XLA makes it a constant operand of the call.
    rates = np.linspace(0.5, 1.5, 2000)
    decay = lambda z, t, params: -jnp.asarray(rates)[jnp.floor(10 * t).astype(jnp.int32)] * z
    solve = lambda z0: jaxode.odeint(decay, z0, jnp.array([0.0, 1.0]), None,
                                     rtol=1e-10, atol=1e-10)[-1]
    z0 = jnp.array([1.0, 0.5])
    assert TAG not in _hlo(solve, z0)
    # The rate jumps every 0.1: the steps across the jumps hold the error to about 1e-7.
    np.testing.assert_allclose(jax.jit(solve)(z0), np.exp(-0.1 * rates[:10].sum()) * z0,
                               rtol=1e-6)
