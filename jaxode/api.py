"""The public entry points `odeint` and `solve`, argument checking, and `Solution`."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import adjoint as adjoint_lib
from . import integrate
from .control import PIController
from .solvers import Tableau, resolve_solver

ADJOINTS = ("backsolve", "direct")


class Solution(eqx.Module):
    """The result of `jaxode.solve`.

    `zs` has z0's structure with a leading axis of len(ts); `stats` holds the JAX
    integers nfe, num_steps, num_accepted, num_rejected; `status` is 0 on success
    (see `jaxode.STATUS_MESSAGES`); `evaluate(t)` gives the state at any t in the span.
    """

    ts: jax.Array
    zs: Any
    stats: dict
    status: jax.Array
    history: integrate.DenseHistory | None
    direction: jax.Array
    tableau: Tableau = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    batch_axis: int | None = eqx.field(static=True, default=None)

    def evaluate(self, t):
        """The state at time t (a scalar inside [ts[0], ts[-1]]) by dense output."""
        if self.history is None:
            raise ValueError("evaluate: this solution was made with dense=False")
        t = jnp.asarray(t, self.history.dt.dtype)
        if t.ndim != 0:
            raise ValueError(f"t: expected a scalar time, got shape {t.shape}; use jax.vmap")
        evaluate = lambda history, num_steps: self.unravel(
            integrate.evaluate_history(self.tableau, history, num_steps, self.direction * t)
        )
        if self.batch_axis is None:
            return evaluate(self.history, self.stats["num_steps"])
        states = jax.vmap(evaluate)(self.history, self.stats["num_steps"])
        return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, self.batch_axis), states)


def _check_tolerance(name, value):
    if isinstance(value, numbers.Real) or (isinstance(value, np.ndarray) and value.ndim == 0):
        if not float(value) >= 0:
            raise ValueError(f"{name}: must be a non-negative number, got {value}")
    elif not isinstance(value, jax.Array):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")


def _state_dtype(z0):
    leaves = jax.tree_util.tree_leaves(z0)
    if not leaves:
        raise ValueError("z0: the initial state has no arrays")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"z0: every leaf must be a floating-point array, got dtype "
                f"{jnp.result_type(leaf)}; use e.g. jnp.asarray(z0, float)"
            )
    return jnp.result_type(*leaves)


def _describe(tree):
    return jax.tree_util.tree_map(lambda x: f"{x.dtype}{list(x.shape)}", tree)


def _check_vector_field(f, z0, t0, params):
    try:
        out = eqx.filter_eval_shape(f, z0, t0, params)
    except TypeError as error:
        if not callable(f):
            raise TypeError(f"f: expected a callable f(z, t, params), got {f!r}") from error
        raise
    expected = jax.eval_shape(lambda z: z, z0)
    same_structure = jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(
        expected
    )
    if not same_structure or any(
        a.shape != b.shape or a.dtype != b.dtype
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(expected))
    ):
        raise ValueError(
            "f: must return dz/dt with the same structure, shapes and dtypes as z; "
            f"z is {_describe(expected)} but f returned {_describe(out)}"
        )


class _Problem(NamedTuple):
    """A solve's arguments checked and flattened."""

    f_flat: Callable  # (z_flat, t, params) -> dz_flat
    z0_flat: jax.Array  # (n,), or (samples, n) with batch_axis
    ts: jax.Array
    ts_state: jax.Array  # ts in the state's dtype
    params: Any  # the arrays of params
    options: adjoint_lib.Options
    tols: adjoint_lib.Tolerances
    unravel: Callable
    direction: jax.Array
    tableau: Tableau


def _setup(
    f, z0, ts, params, *, solver, rtol, atol, dt0, max_steps, adjoint, controller, dense,
    adjoint_rtol, adjoint_atol, adjoint_solver, seminorm, batch_axis,
) -> _Problem:
    tableau = resolve_solver(solver)
    if adjoint not in ADJOINTS:
        raise ValueError(f"adjoint: expected one of {ADJOINTS}, got {adjoint!r}")
    _check_tolerance("rtol", rtol)
    _check_tolerance("atol", atol)
    if not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"max_steps: expected a positive integer, got {max_steps!r}")
    if dt0 is None and not tableau.adaptive:
        raise ValueError(
            f"dt0: the fixed-step solver {tableau.name!r} needs a step size dt0"
        )
    if dt0 is not None:
        _check_tolerance("dt0", dt0)
        if isinstance(dt0, numbers.Real) and dt0 == 0:
            raise ValueError("dt0: must be non-zero")
    controller = PIController() if controller is None else controller
    if not isinstance(controller, PIController):
        raise TypeError(f"controller: expected a jaxode.PIController, got {controller!r}")

    dtype = _state_dtype(z0)
    if batch_axis is not None:
        z0 = _batch_first(z0, batch_axis)
    sample = z0 if batch_axis is None else jax.tree_util.tree_map(lambda x: x[0], z0)
    ts = jnp.asarray(ts)
    if ts.ndim != 1:
        raise ValueError(f"ts: expected a 1-D array of times, got shape {ts.shape}")
    if ts.shape[0] < 2:
        raise ValueError(f"ts: expected at least 2 times, got {ts.shape[0]}")
    ts_state = ts.astype(dtype)
    _check_vector_field(f, sample, ts_state[0], params)

    unravel = ravel_pytree(sample)[1]
    ravel = lambda z: ravel_pytree(z)[0]
    z0_flat = ravel(z0) if batch_axis is None else jax.vmap(ravel)(z0)
    direction = jnp.where(ts_state[-1] >= ts_state[0], 1, -1).astype(dtype)

    # Arrays of params travel through the solve (and get gradients); anything else in
    # it (an Equinox module's activation functions, say) is closed over as a constant.
    params_static = eqx.partition(params, eqx.is_array)[1]
    params = eqx.filter(params, eqx.is_array)

    def f_flat(z_flat, t, params):
        return ravel_pytree(f(unravel(z_flat), t, eqx.combine(params, params_static)))[0]

    options = adjoint_lib.Options(
        tableau=tableau,
        max_steps=int(max_steps),
        controller=controller,
        dense=dense,
        backward_tableau=tableau if adjoint_solver is None else resolve_solver(adjoint_solver),
        seminorm=bool(seminorm),
        dt0_given=dt0 is not None,
    )
    rtol, atol = jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype)
    tols = adjoint_lib.Tolerances(
        rtol=rtol,
        atol=atol,
        adjoint_rtol=rtol if adjoint_rtol is None else jnp.asarray(adjoint_rtol, dtype),
        adjoint_atol=atol if adjoint_atol is None else jnp.asarray(adjoint_atol, dtype),
        dt0=jnp.abs(jnp.asarray(0.0 if dt0 is None else dt0, dtype)),
    )
    return _Problem(
        f_flat=f_flat,
        z0_flat=z0_flat,
        ts=ts,
        ts_state=ts_state,
        params=params,
        options=options,
        tols=tols,
        unravel=unravel,
        direction=direction,
        tableau=tableau,
    )


def solve(
    f: Callable,
    z0,
    ts,
    params=None,
    *,
    solver="dopri5",
    rtol=1e-6,
    atol=1e-8,
    dt0=None,
    max_steps: int = 4096,
    adjoint: str = "backsolve",
    controller: PIController | None = None,
    throw: bool = True,
    dense: bool = True,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_solver=None,
    seminorm: bool = True,
    batch_axis: int | None = None,
) -> Solution:
    """Solve dz/dt = f(z, t, params) from z0 at ts[0], reporting z at every time in ts.

    See `odeint` for the arguments. `dense=True` keeps every step for
    `Solution.evaluate` (memory: max_steps x (stages + 2) x state size). `throw=False`
    returns failures in `Solution.status` instead of raising. With `batch_axis`,
    `stats` and `status` have one entry per sample.
    """
    problem = _setup(
        f, z0, ts, params, solver=solver, rtol=rtol, atol=atol, dt0=dt0,
        max_steps=max_steps, adjoint=adjoint, controller=controller, dense=dense,
        adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_solver=adjoint_solver,
        seminorm=seminorm, batch_axis=batch_axis,
    )
    f_flat, z0_flat, ts, ts_state, params, options, tols, unravel, direction, tableau = problem
    if adjoint == "backsolve":
        backsolve = (
            adjoint_lib.solve_backsolve if batch_axis is None else adjoint_lib.solve_backsolve_lanes
        )
        flat = backsolve(f_flat, options, z0_flat, ts_state, params, tols)
        # The dense history is not differentiated by the adjoint method.
        flat = flat._replace(history=jax.lax.stop_gradient(flat.history))
    else:
        direct = lambda z: adjoint_lib.solve_direct(f_flat, options, z, ts_state, params, tols)
        flat = direct(z0_flat) if batch_axis is None else jax.vmap(direct)(z0_flat)
    zs_flat = flat.zs
    # Integer outputs of a custom_vjp still carry (zero) tangents: cut them.
    status = jax.lax.stop_gradient(flat.status)
    if throw:
        zs_flat = eqx.branched_error_if(
            zs_flat, status != integrate.SUCCESS, status, integrate.STATUS_MESSAGES
        )
    if batch_axis is None:
        zs = jax.vmap(unravel)(zs_flat)
    else:
        # (samples, times, ...) -> times first, the samples at batch_axis after it.
        zs = jax.tree_util.tree_map(
            lambda x: jnp.moveaxis(jnp.swapaxes(x, 0, 1), 1, batch_axis + 1),
            jax.vmap(jax.vmap(unravel))(zs_flat),
        )
    stats = {
        "nfe": flat.nfe,
        "num_steps": flat.num_steps,
        "num_accepted": flat.num_accepted,
        "num_rejected": flat.num_rejected,
    }
    return Solution(
        ts=ts,
        zs=zs,
        stats=stats,
        status=status,
        history=flat.history,
        direction=direction,
        tableau=tableau,
        unravel=unravel,
        batch_axis=batch_axis,
    )


def _batch_first(z0, batch_axis):
    if not isinstance(batch_axis, numbers.Integral) or batch_axis < 0:
        raise ValueError(f"batch_axis: expected None or a non-negative integer, got {batch_axis!r}")
    sizes = set()
    for leaf in jax.tree_util.tree_leaves(z0):
        if jnp.ndim(leaf) <= batch_axis:
            raise ValueError(
                f"batch_axis: {batch_axis} is out of range for a z0 leaf of shape {jnp.shape(leaf)}"
            )
        sizes.add(jnp.shape(leaf)[batch_axis])
    if len(sizes) != 1:
        raise ValueError(f"batch_axis: z0's leaves have different batch sizes {sorted(sizes)}")
    return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, batch_axis, 0), z0)


def odeint(
    f: Callable,
    z0,
    ts,
    params=None,
    *,
    solver="dopri5",
    rtol=1e-6,
    atol=1e-8,
    dt0=None,
    max_steps: int = 4096,
    adjoint: str = "backsolve",
    controller: PIController | None = None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_solver=None,
    seminorm: bool = True,
    batch_axis: int | None = None,
):
    """Integrate dz/dt = f(z, t, params) and return z at every time in ts.

    f: `f(z, t, params) -> dz/dt`, z any pytree of floating arrays.
    z0: the state at ts[0]. ts: 1-D, strictly increasing or strictly decreasing,
    length >= 2. params: any pytree, or None.
    solver: a name ("euler", "midpoint", "heun", "ralston", "rk4", "heun_euler",
    "fehlberg2", "bosh3", "dopri5", "tsit5", "dopri8") or a solver object.
    rtol, atol: tolerances of the adaptive solvers (Hairer's RMS norm over the state).
    dt0: the first step (adaptive; chosen automatically when None) or the step size
    (fixed-step solvers, required). max_steps: the most steps (accepted and rejected);
    reaching it raises. adjoint: "backsolve" (the paper's adjoint method, constant
    memory) or "direct" (differentiate the solver's operations). controller: a
    `jaxode.PIController`. adjoint_rtol, adjoint_atol, adjoint_solver: the backward
    solve's tolerances and method (default: the forward ones). seminorm: leave the
    parameter adjoint out of the backward error norm (Kidger, Chen & Lyons 2021).
    batch_axis: None, or the axis of z0's leaves that indexes a batch of initial
    conditions: each sample is solved with its own steps (as under jax.vmap), zs gets
    the time axis first and the samples at batch_axis + 1, and the backward pass
    accumulates the shared parameter gradient once for the whole batch (always with
    the seminorm) instead of once per sample, which is what makes
    jax.grad over a batch fast. Second derivatives need batch_axis=None.

    Returns zs with z0's structure, each leaf with a leading axis of len(ts).
    """
    return solve(
        f,
        z0,
        ts,
        params,
        solver=solver,
        rtol=rtol,
        atol=atol,
        dt0=dt0,
        max_steps=max_steps,
        adjoint=adjoint,
        controller=controller,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_solver=adjoint_solver,
        seminorm=seminorm,
        batch_axis=batch_axis,
        dense=False,
    ).zs


def adjoint_nfe(
    f: Callable,
    z0,
    ts,
    params=None,
    *,
    cotangent=None,
    solver="dopri5",
    rtol=1e-6,
    atol=1e-8,
    dt0=None,
    max_steps: int = 4096,
    controller: PIController | None = None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_solver=None,
    seminorm: bool = True,
    batch_axis: int | None = None,
) -> dict:
    """The function evaluations of one gradient by the adjoint method (Figure 3(c) of the
    paper): {"forward": ..., "backward": ...}, per sample with batch_axis.

    Runs the forward solve and the backward pass that `jax.grad` of `odeint(...,
    adjoint="backsolve")` would run, for the loss whose gradient with respect to zs is
    `cotangent` (zs's structure; default: all ones). The other arguments are odeint's.
    """
    problem = _setup(
        f, z0, ts, params, solver=solver, rtol=rtol, atol=atol, dt0=dt0,
        max_steps=max_steps, adjoint="backsolve", controller=controller, dense=False,
        adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_solver=adjoint_solver,
        seminorm=seminorm, batch_axis=batch_axis,
    )
    single_z0 = problem.z0_flat if batch_axis is None else problem.z0_flat[0]
    converted, consts = jax.closure_convert(
        problem.f_flat, single_z0, problem.ts_state[0], problem.params
    )
    solve_flat = lambda z: adjoint_lib._directed_solve(
        converted, problem.options, z, problem.ts_state, problem.params, tuple(consts),
        problem.tols,
    )
    if batch_axis is None:
        forward = solve_flat(problem.z0_flat)
        backward_pass = adjoint_lib.backward_pass
    else:
        forward = jax.vmap(solve_flat)(problem.z0_flat)
        backward_pass = adjoint_lib.backward_pass_lanes
    if cotangent is None:
        zs_cotangent = jnp.ones_like(forward.zs)
    elif batch_axis is None:
        zs_cotangent = jax.vmap(lambda c: ravel_pytree(c)[0])(cotangent)
    else:
        raise ValueError("cotangent: only the default (ones) is supported with batch_axis")
    residuals = (forward.zs, problem.ts_state, problem.params, tuple(consts), problem.tols)
    _, backward = backward_pass(converted, problem.options, residuals, zs_cotangent)
    return {"forward": forward.nfe, "backward": backward}
