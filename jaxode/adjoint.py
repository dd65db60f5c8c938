"""Gradients of a solve.

"backsolve" is the paper's adjoint method (Algorithm 1, Figure 2, Appendix C) as a
`jax.custom_vjp`: the backward pass solves the augmented state (z, a_z, a_θ) from
ts[-1] to ts[0], one solve per interval between output times, adding dL/dz(t_i) at
each output time. Memory is constant in the number of steps. Its backward solves are
themselves calls of the same custom_vjp function, so gradients of gradients work.

Time gradients use the closed forms (Appendix C) instead of an extra a_t state:
dL/dt_i = g_iᵀ f(z(t_i), t_i) for every output time after the first (an output time
only decides where the trajectory is read), and dL/dt_0 = -a(t_0)ᵀ f(z_0, t_0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from . import integrate
from .control import PIController, initial_step
from .solvers import Tableau


class Options(NamedTuple):
    """The static (hashable) settings of a solve and of its backward pass."""

    tableau: Tableau
    max_steps: int
    controller: PIController
    dense: bool
    backward_tableau: Tableau
    seminorm: bool
    dt0_given: bool  # False: the first step is chosen automatically
    error_components: int | None = None


class Tolerances(NamedTuple):
    """Traced numbers of a solve: differentiable inputs with zero cotangent."""

    rtol: jax.Array
    atol: jax.Array
    adjoint_rtol: jax.Array
    adjoint_atol: jax.Array
    dt0: jax.Array  # used when Options.dt0_given


def _directed_solve(
    ff, options: Options, z0, ts, params, consts, tols: Tolerances, differentiable=False
):
    """Solve in user time: ts may decrease; ff(z, t, params, *consts) is the vector field."""
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(z0.dtype)

    def f_tau(tau, z):
        return direction * ff(z, direction * tau, params, *consts)

    return integrate.solve_flat(
        f_tau,
        z0,
        direction * ts,
        tableau=options.tableau,
        rtol=tols.rtol,
        atol=tols.atol,
        dt0=tols.dt0 if options.dt0_given else None,
        max_steps=options.max_steps,
        controller=options.controller,
        dense=options.dense,
        error_components=options.error_components,
        differentiable=differentiable,
    )


def _zero_cotangent(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)


def _is_differentiable(x):
    """Floating-point arrays and scalars (Python floats may arrive as JAX literals)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, float, complex)) and jnp.issubdtype(
        jnp.result_type(x), jnp.inexact
    )


def _split_differentiable(tree):
    return eqx.partition(tree, _is_differentiable)


def _parameter_view(ff, params, consts, dtype):
    """θ, the differentiable part of (params, consts): as a pytree, as a flat vector of
    the state's dtype with its unravel, and the vector field as a function of it."""
    differentiable, static = _split_differentiable((params, consts))
    theta0, unravel_theta = ravel_pytree(differentiable)

    def field(z, t, diff):
        p, c = eqx.combine(diff, static)
        return ff(z, t, p, *c)

    return differentiable, theta0.astype(dtype), unravel_theta, field


def _theta_cotangent(differentiable_bar, params, consts):
    """Cotangents of (params, consts) from those of their differentiable part."""
    return jax.tree_util.tree_map(
        lambda d, s: d if d is not None or s is None else _zero_cotangent(s),
        differentiable_bar,
        (params, consts),
        is_leaf=lambda x: x is None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _backsolve(ff, options, z0, ts, params, consts, tols):
    return _directed_solve(ff, options, z0, ts, params, consts, tols)


def _backsolve_fwd(ff, options, z0, ts, params, consts, tols):
    # The custom_vjp function itself, not its body: differentiating the residuals again
    # (gradients of gradients) then uses the adjoint method too.
    solution = _backsolve(ff, options, z0, ts, params, consts, tols)
    return solution, (solution.zs, ts, params, consts, tols)


def backward_pass(ff, options: Options, residuals, zs_cotangent):
    """The adjoint solves. Returns the cotangents of (z0, ts, params, consts) and the
    backward pass's number of function evaluations."""
    zs, ts, params, consts, tols = residuals
    n = zs.shape[1]
    dtype = zs.dtype
    num_outputs = ts.shape[0]
    g = zs_cotangent.astype(dtype)

    differentiable, theta0, unravel_theta, field = _parameter_view(ff, params, consts, dtype)

    def augmented(y, t, params_, *consts_):
        """d/dt (z, a, a_θ) = (f, -aᵀ∂f/∂z, -aᵀ∂f/∂θ): one vjp of f per call."""
        diff = _split_differentiable((params_, consts_))[0]
        z, a = y[:n], y[n : 2 * n]
        fz, vjp = jax.vjp(lambda z_, d_: field(z_, t, d_), z, diff)
        a_z, a_theta = vjp(a)
        a_theta = ravel_pytree(a_theta)[0].astype(dtype)
        return jnp.concatenate([fz, -a_z, -a_theta])

    backward_options = Options(
        tableau=options.backward_tableau,
        max_steps=options.max_steps,
        controller=options.controller,
        dense=False,
        backward_tableau=options.backward_tableau,
        seminorm=options.seminorm,
        dt0_given=True,
        error_components=2 * n if options.seminorm else None,
    )

    f_at_outputs = jax.vmap(lambda z, t: field(z, t, differentiable))(zs, ts)
    ts_bar = jnp.einsum("ij,ij->i", g, f_at_outputs)

    def interval(carry, i):
        a, a_theta, dt, nfe, status = carry
        a = a + g[i]
        y = jnp.concatenate([zs[i], a, a_theta])
        interval_tols = Tolerances(
            rtol=tols.adjoint_rtol,
            atol=tols.adjoint_atol,
            adjoint_rtol=tols.adjoint_rtol,
            adjoint_atol=tols.adjoint_atol,
            dt0=dt,
        )
        sol = _backsolve(
            augmented,
            backward_options,
            y,
            jnp.stack([ts[i], ts[i - 1]]),
            params,
            consts,
            interval_tols,
        )
        y_end = sol.zs[-1]
        status = jnp.where(status == integrate.SUCCESS, sol.status, status)
        carry = (y_end[n : 2 * n], y_end[2 * n :], sol.dt_next, nfe + sol.nfe, status)
        return carry, None

    # One initial-step choice for the whole backward pass; each later interval starts
    # from the step size the previous one ended with.
    last = num_outputs - 1
    y_last = jnp.concatenate([zs[last], g[last], jnp.zeros_like(theta0)])
    back_direction = jnp.where(ts[0] >= ts[-1], 1, -1).astype(dtype)

    def augmented_tau(tau, y):
        return back_direction * augmented(y, back_direction * tau, params, *consts)

    if options.dt0_given:
        dt = tols.dt0
    else:
        dt = initial_step(
            augmented_tau,
            back_direction * ts[last],
            y_last,
            augmented_tau(back_direction * ts[last], y_last),
            options.backward_tableau.order,
            tols.adjoint_rtol,
            tols.adjoint_atol,
            backward_options.error_components,
        )
    init = (
        jnp.zeros((n,), dtype),
        jnp.zeros_like(theta0),
        dt,
        jnp.asarray(2, jnp.int32),
        jnp.asarray(integrate.SUCCESS, jnp.int32),
    )
    (a, a_theta, _, nfe, status), _ = lax.scan(
        interval, init, jnp.arange(last, 0, -1)
    )
    ts_bar = ts_bar.at[0].set(-jnp.dot(a, f_at_outputs[0]))
    # On every cotangent: an unused one (and its check) may be dropped as dead code.
    z0_bar, ts_bar, a_theta = eqx.branched_error_if(
        (a + g[0], ts_bar, a_theta), status != integrate.SUCCESS, status, integrate.STATUS_MESSAGES
    )
    params_bar, consts_bar = _theta_cotangent(unravel_theta(a_theta), params, consts)
    return (z0_bar, ts_bar.astype(ts.dtype), params_bar, consts_bar), nfe


def _backsolve_bwd(ff, options, residuals, cotangents):
    (z0_bar, ts_bar, params_bar, consts_bar), _ = backward_pass(
        ff, options, residuals, cotangents.zs
    )
    tols = residuals[-1]
    tols_bar = jax.tree_util.tree_map(_zero_cotangent, tols)
    return z0_bar, ts_bar, params_bar, consts_bar, tols_bar


_backsolve.defvjp(_backsolve_fwd, _backsolve_bwd)


def solve_backsolve(ff: Callable, options: Options, z0, ts, params, tols: Tolerances):
    """A solve whose reverse-mode derivative is the adjoint method.

    `ff(z_flat, t, params)` is the flat vector field; any JAX values it closes over
    are hoisted by `jax.closure_convert` so that they receive gradients too.
    """
    converted, consts = jax.closure_convert(ff, z0, ts[0], params)
    return _backsolve(converted, options, z0, ts, params, tuple(consts), tols)


def solve_direct(ff: Callable, options: Options, z0, ts, params, tols: Tolerances):
    """A solve differentiated through the solver's own operations."""
    return _directed_solve(ff, options, z0, ts, params, (), tols, differentiable=True)


# ---------------------------------------------------------------------------------
# A batch of initial conditions with shared parameters, each sample with its own steps.
#
# Differentiating a vmapped backsolve carries a parameter adjoint for every sample: B
# copies of a_θ pushed through every stage. Here the samples are lanes of one loop: the
# lanes solve (z, a) backwards, each with its own step sizes, and the parameter
# gradient is a quadrature shared by all lanes, Σ_lanes Σ_stages dt b_i a_iᵀ ∂f/∂θ,
# taken by one vector-Jacobian product of the lane-batched f per step.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _backsolve_lanes(ff, options, z0s, ts, params, consts, tols):
    return jax.vmap(lambda z0: _directed_solve(ff, options, z0, ts, params, consts, tols))(z0s)


def _backsolve_lanes_fwd(ff, options, z0s, ts, params, consts, tols):
    solution = _backsolve_lanes(ff, options, z0s, ts, params, consts, tols)
    return solution, (solution.zs, ts, params, consts, tols)


def backward_pass_lanes(ff, options: Options, residuals, zs_cotangent):
    """The adjoint solves of a lane batch. Returns the cotangents of (z0s, ts, params,
    consts) and each lane's backward number of function evaluations."""
    zs, ts, params, consts, tols = residuals
    num_lanes, num_outputs, n = zs.shape
    dtype = zs.dtype
    g = zs_cotangent.astype(dtype)
    tableau = options.backward_tableau

    differentiable, theta0, unravel_theta, field = _parameter_view(ff, params, consts, dtype)

    back_direction = jnp.where(ts[0] >= ts[-1], 1, -1).astype(dtype)

    def lane_field(tau, y):
        """d/dτ (z, a) for one lane, τ = back_direction * t."""
        t = back_direction * tau
        z, a = y[:n], y[n:]
        fz, vjp = jax.vjp(lambda z_: field(z_, t, differentiable), z)
        return back_direction * jnp.concatenate([fz, -vjp(a)[0]])

    def theta_increment(record, active):
        """The step's contribution to the shared a_θ: the θ-part of the augmented RK step,
        dt Σ_i b_i (-aᵀ∂f/∂θ), summed over the lanes whose step was accepted."""

        def weighted_field(diff):
            total = jnp.zeros((), dtype)
            for i in range(tableau.num_stages):
                if tableau.b[i] == 0:
                    continue
                weight = jnp.where(record.accept & active, record.dt * float(tableau.b[i]), 0.0)
                times = back_direction * (record.t + float(tableau.c[i]) * record.dt)
                points = record.points[i]
                f_i = jax.vmap(lambda y, t: field(y[:n], t, diff))(points, times)
                total = total + jnp.sum(weight[:, None] * points[:, n:] * f_i)
            return total

        gradient = jax.grad(weighted_field)(differentiable)
        return -back_direction * ravel_pytree(gradient)[0].astype(dtype)

    def interval(carry, i):
        a, dt, a_theta, nfe, status = carry
        a = a + g[:, i]
        y = jnp.concatenate([zs[:, i], a], axis=1)
        stepper = integrate.make_stepper(
            lane_field,
            y[0],
            back_direction * jnp.stack([ts[i], ts[i - 1]]),
            tableau=tableau,
            rtol=tols.adjoint_rtol,
            atol=tols.adjoint_atol,
            max_steps=options.max_steps,
            controller=options.controller,
            dense=False,
        )
        lanes_unfinished = jax.vmap(stepper.unfinished)

        def body(state):
            lanes, a_theta = state
            active = lanes_unfinished(lanes)
            stepped, record = jax.vmap(stepper.step)(lanes)
            lanes = jax.tree_util.tree_map(
                lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
                stepped,
                lanes,
            )
            return lanes, a_theta + theta_increment(record, active)

        lanes = jax.vmap(stepper.init)(y, dt)
        lanes, a_theta = lax.while_loop(
            lambda state: jnp.any(lanes_unfinished(state[0])), body, (lanes, a_theta)
        )
        sol = jax.vmap(stepper.finish)(lanes)
        status = jnp.where(status == integrate.SUCCESS, sol.status, status)
        return (sol.zs[:, -1, n:], sol.dt_next, a_theta, nfe + sol.nfe, status), None

    last = num_outputs - 1
    y_last = jnp.concatenate([zs[:, last], g[:, last]], axis=1)
    tau_last = back_direction * ts[last]
    if options.dt0_given:
        dt = jnp.full((num_lanes,), tols.dt0, dtype)
    else:
        dt = jax.vmap(
            lambda y: initial_step(
                lane_field,
                tau_last,
                y,
                lane_field(tau_last, y),
                tableau.order,
                tols.adjoint_rtol,
                tols.adjoint_atol,
            )
        )(y_last)
    init = (
        jnp.zeros((num_lanes, n), dtype),
        dt,
        jnp.zeros_like(theta0),
        jnp.full((num_lanes,), 2, jnp.int32),
        jnp.full((num_lanes,), integrate.SUCCESS, jnp.int32),
    )
    (a, _, a_theta, nfe, status), _ = lax.scan(interval, init, jnp.arange(last, 0, -1))

    f_at_outputs = jax.vmap(jax.vmap(lambda z, t: field(z, t, differentiable)), (0, None))(zs, ts)
    ts_bar = jnp.einsum("bij,bij->bi", g, f_at_outputs)
    ts_bar = ts_bar.at[:, 0].set(-jnp.einsum("bj,bj->b", a, f_at_outputs[:, 0]))
    z0s_bar, ts_bar, a_theta = eqx.branched_error_if(
        (a + g[:, 0], ts_bar.sum(0), a_theta),
        jnp.any(status != integrate.SUCCESS),
        jnp.max(status),
        integrate.STATUS_MESSAGES,
    )
    params_bar, consts_bar = _theta_cotangent(unravel_theta(a_theta), params, consts)
    return (z0s_bar, ts_bar.astype(ts.dtype), params_bar, consts_bar), nfe


def _backsolve_lanes_bwd(ff, options, residuals, cotangents):
    cotangent, _ = backward_pass_lanes(ff, options, residuals, cotangents.zs)
    return (*cotangent, jax.tree_util.tree_map(_zero_cotangent, residuals[-1]))


_backsolve_lanes.defvjp(_backsolve_lanes_fwd, _backsolve_lanes_bwd)


def solve_backsolve_lanes(ff: Callable, options: Options, z0s, ts, params, tols: Tolerances):
    """`solve_backsolve` for a batch z0s (lanes, n): each lane its own steps, the
    parameter gradient accumulated once for the whole batch."""
    converted, consts = jax.closure_convert(ff, z0s[0], ts[0], params)
    return _backsolve_lanes(converted, options, z0s, ts, params, tuple(consts), tols)
