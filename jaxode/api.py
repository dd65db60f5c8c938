"""The public entry points `solve`, `odeint` and `adjoint_nfe`: argument checks, the
settings built once, and `Solution`."""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Float, Int, PyTree
from typing_extensions import TypedDict, Unpack

from . import adjoint as adjoint_lib
from . import loop
from .control import AbstractController, ConstantStep, PIController
from .events import Event, check_cond
from .solvers import AbstractSolver, resolve_solver

# f(z, t, params) -> dz/dt, z any pytree of arrays and dz/dt of its structure.
VectorField = Callable[[PyTree[Array], Array, PyTree], PyTree[Array]]

# The keywords of version 1 that `Backsolve` replaced: keyword -> its field.
_REMOVED = {"adjoint_rtol": "rtol", "adjoint_atol": "atol", "adjoint_solver": "solver",
            "seminorm": "seminorm"}


class Solution(eqx.Module):
    """The result of `jaxode.solve`.

    `zs` has z0's structure with a leading axis of len(ts); `stats` holds the JAX
    integers nfe, num_steps, num_accepted, num_rejected; `status` is 0 on success
    (see `jaxode.STATUS_MESSAGES`); `evaluate(t)` gives the state at any t in the span
    (with `dense=True`). With an `event`: `event_happened` (bool), `event_time` (the
    event's t, ts[-1] if none) and `event_state` (z there, z0's structure); under
    `batch_axis` one per sample. Without one they are None.
    """

    ts: jax.Array
    zs: Any
    stats: dict
    status: jax.Array
    history: loop.History | None
    solver: AbstractSolver = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    batch_axis: int | None = eqx.field(static=True, default=None)
    event_happened: jax.Array | None = None
    event_time: jax.Array | None = None
    event_state: Any = None

    def evaluate(self, t):
        """The state at time t (a scalar) by dense output; NaN outside [ts[0], ts[-1]];
        after an event, its state."""
        if self.history is None:
            raise ValueError("dense: Solution.evaluate needs jaxode.solve(..., dense=True)")
        real = self.history.dt.dtype
        t = jnp.asarray(t, real)
        if t.ndim != 0:
            raise ValueError(f"t: expected a scalar time, got shape {t.shape}; use jax.vmap")
        ts = self.ts.astype(real)
        direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(real)

        def evaluate(history, num_steps, event_time, event_state):
            tau, tau_end = direction * t, direction * ts[-1]
            flat = loop.evaluate(self.solver, history, num_steps, tau, tau_end)
            if event_time is not None:
                after = (tau > direction * event_time) & (tau <= tau_end)
                flat = jnp.where(after, ravel_pytree(event_state)[0], flat)
            return self.unravel(flat)

        num_steps = self.stats["num_steps"]
        if self.batch_axis is None:
            return evaluate(self.history, num_steps, self.event_time, self.event_state)
        event_state = self.event_state
        if event_state is not None:
            event_state = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, self.batch_axis, 0),
                                                 event_state)
        states = jax.vmap(evaluate)(self.history, num_steps, self.event_time, event_state)
        return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, self.batch_axis), states)


def _refuses_removed_keywords(fn):
    """fn, refusing the version-1 keywords with a TypeError that names their field."""

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        for name in kwargs:
            if name in _REMOVED:
                raise TypeError(f"{name}: removed; use adjoint=jaxode.Backsolve("
                                f"{_REMOVED[name]}=...) instead")
        return fn(*args, **kwargs)

    return checked


class SolveOptions(TypedDict, total=False):
    """The keywords that `solve`, `odeint` and `adjoint_nfe` share (see `solve`)."""

    solver: str | AbstractSolver
    rtol: float
    atol: float
    dt0: float | None
    max_steps: int
    adjoint: str | adjoint_lib.AbstractAdjoint
    controller: AbstractController | None
    throw: bool
    dense: bool
    batch_axis: int | None
    progress: bool
    event: Event | None


@_refuses_removed_keywords
def solve(
    f: VectorField,
    z0: PyTree[ArrayLike],
    ts: Float[ArrayLike, " times"],
    params: PyTree = None,
    *,
    solver: str | AbstractSolver = "dopri5",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    max_steps: int = 4096,
    adjoint: str | adjoint_lib.AbstractAdjoint = "backsolve",
    controller: AbstractController | None = None,
    throw: bool = True,
    dense: bool = False,
    batch_axis: int | None = None,
    progress: bool = False,
    event: Event | None = None,
) -> Solution:
    """Solve dz/dt = f(z, t, params) from z0 at ts[0], reporting z at every time in ts.

    Args:
        f: the vector field `f(z, t, params) -> dz/dt`, z any pytree of floating or
            complex arrays; dz/dt has z's structure, shapes and dtypes.
        z0: the state at ts[0].
        ts: 1-D output times, strictly increasing or strictly decreasing, length >= 2.
        params: any pytree, or None; its arrays are differentiated.
        solver: a name (see `jaxode.SOLVERS`) or a solver object such as `jaxode.Dopri5()`.
        rtol: relative tolerance of the adaptive solvers (Hairer's RMS norm).
        atol: absolute tolerance.
        dt0: the first step (adaptive solvers; automatic when None) or the step size
            (fixed-step solvers, required).
        max_steps: the most step attempts; reaching it is a run-time error.
        adjoint: how the solve is differentiated: "backsolve" /
            `jaxode.Backsolve(rtol, atol, solver, seminorm)` (the paper's adjoint method,
            constant memory), "direct" / `jaxode.Direct()` (through the solver's own
            operations) or "forward" / `jaxode.Forward()` (forward mode).
        controller: a `jaxode.PIController` (adaptive solvers); fixed-step solvers use
            `jaxode.ConstantStep()`.
        throw: raise on a run-time failure; False returns it in `Solution.status`.
        dense: keep every step for `Solution.evaluate` (memory: max_steps x at most
            (stages + 2) x the state's size; for the Runge-Kutta methods (degree of their
            dense output + 1), 5 for dopri5).
        batch_axis: None, or the axis of z0's leaves that indexes a batch of initial
            conditions: each sample gets its own steps (as under `jax.vmap`), zs gets the
            time axis first and the samples at batch_axis + 1, and the backward pass
            accumulates the shared parameter gradient once for the batch. `stats` and
            `status` then have one entry per sample.
        progress: show the integration's progress in t and its step count on stderr (at
            most 101 updates a solve; under vmap one bar for the batch, following its
            slowest sample). Off, the compiled program is unchanged.
        event: a terminal `jaxode.Event(cond, direction)`: the solve stops at the first
            crossing of zero by cond(z(t), t, params), located on the dense output to
            within atol + rtol |t|; every output time after it holds its state. Its time
            and state are differentiable (implicit function theorem) with every adjoint.

    Returns:
        A `Solution`: `ts`, `zs` (z0's structure, each leaf with a leading axis of
        len(ts)), `stats`, `status`, `evaluate(t)` and, with an event, `event_happened`,
        `event_time` and `event_state`.

    Raises:
        ValueError: while tracing, for a bad argument (named in the message).
        TypeError: while tracing, for an argument of the wrong kind, a removed keyword,
            or a derivative the adjoint does not give.

    Example:
        >>> import jax.numpy as jnp, jaxode
        >>> sol = jaxode.solve(lambda z, t, k: -k * z, jnp.ones(2), jnp.array([0.0, 1.0]), 2.0)
        >>> bool(jnp.allclose(sol.zs[-1], jnp.exp(-2.0), rtol=1e-5))
        True
    """
    adjoint = adjoint_lib.resolve_adjoint(adjoint)
    z0 = _as_arrays(z0)
    settings, tols = _setup(z0, solver=solver, rtol=rtol, atol=atol, dt0=dt0,
                            max_steps=max_steps, adjoint=adjoint, controller=controller,
                            dense=dense, progress=progress, throw=throw)
    if event is not None and not isinstance(event, Event):
        raise TypeError(f"event: expected None or a jaxode.Event(cond, direction), got {event!r}")
    return _solve(f, z0, ts, params, adjoint, settings, tols, batch_axis, event)


@eqx.filter_jit
def _solve(f, z0, ts, params, adjoint, settings, tols, batch_axis, event) -> Solution:
    """The solve itself, compiled once per setting: an eager call hits the cache."""
    f_flat, z0_flat, ts, arrays, unravel = _flatten(f, z0, ts, params, batch_axis, tols)
    if event is not None:
        settings = settings._replace(event=_flat_event(event, z0, ts, params, batch_axis,
                                                       unravel, tols))
    flat = adjoint_lib.solve(adjoint, f_flat, settings, z0_flat, ts.astype(tols.rtol.dtype),
                             arrays, tols, lanes=batch_axis is not None)
    # Integer outputs of a custom_vjp still carry (zero) tangents: cut them.
    status = jax.lax.stop_gradient(flat.status)
    zs_flat, event_time, happened = flat.zs, flat.event_time, flat.event_happened
    if happened is not None:
        happened = jax.lax.stop_gradient(happened)
    if settings.throw:
        # On every output: one used alone (the event time, say) still raises.
        zs_flat, event_time, happened = loop.raise_if_failed((zs_flat, event_time, happened),
                                                             status)
    if batch_axis is None:
        zs = jax.vmap(unravel)(zs_flat)
    else:
        # (samples, times, ...) -> times first, the samples at batch_axis after it.
        move = lambda x: jnp.moveaxis(jnp.swapaxes(x, 0, 1), 1, batch_axis + 1)
        zs = jax.tree_util.tree_map(move, jax.vmap(jax.vmap(unravel))(zs_flat))
    stats = jax.lax.stop_gradient(flat.stats)
    event_state = None
    if event is not None:  # the last output is at or after the event: its state
        event_state = jax.tree_util.tree_map(lambda x: x[-1], zs)
    return Solution(ts=ts, zs=zs, stats=stats, status=status, history=flat.history,
                    solver=settings.forward.solver, unravel=unravel, batch_axis=batch_axis,
                    event_happened=happened, event_time=event_time, event_state=event_state)


def _with_solve_signature(fn):
    """fn(f, z0, ts, params, **options), refusing the removed keywords, and showing
    `solve`'s keywords and defaults (the one list of them) in its signature."""
    own, shared = inspect.signature(fn), inspect.signature(solve)
    extra = [p for p in own.parameters.values() if p.kind is p.KEYWORD_ONLY]  # cotangent
    checked = _refuses_removed_keywords(fn)
    checked.__signature__ = shared.replace(parameters=[*shared.parameters.values(), *extra],
                                           return_annotation=own.return_annotation)
    return checked


@_with_solve_signature
def odeint(f: VectorField, z0: PyTree[ArrayLike], ts: Float[ArrayLike, " times"],
           params: PyTree = None, **options: Unpack[SolveOptions]) -> PyTree[Array]:
    """Integrate dz/dt = f(z, t, params) and return z at every time in ts.

    Args:
        f: the vector field `f(z, t, params) -> dz/dt`.
        z0: the state at ts[0], any pytree of floating or complex arrays.
        ts: 1-D output times, strictly increasing or strictly decreasing, length >= 2.
        params: any pytree, or None.
        **options: the keywords of `jaxode.solve` (solver, rtol, atol, dt0, max_steps,
            adjoint, controller, throw, dense, batch_axis, progress, event).

    Returns:
        zs with z0's structure, each leaf with a leading axis of len(ts): `solve(...).zs`.

    Raises:
        ValueError: as `jaxode.solve`.
        TypeError: as `jaxode.solve`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxode
        >>> loss = lambda k: jaxode.odeint(lambda z, t, k: -k * z, jnp.ones(1),
        ...                                jnp.array([0.0, 1.0]), k)[-1, 0]
        >>> bool(jnp.allclose(jax.grad(loss)(2.0), -jnp.exp(-2.0), rtol=1e-4))
        True
    """
    return solve(f, z0, ts, params, **options).zs


@_with_solve_signature
def adjoint_nfe(f: VectorField, z0: PyTree[ArrayLike], ts: Float[ArrayLike, " times"],
                params: PyTree = None, *, cotangent: PyTree[ArrayLike] | None = None,
                **options: Unpack[SolveOptions]) -> dict[str, Int[Array, ...]]:
    """The function evaluations of one gradient by the adjoint method (Figure 3(c) of the
    paper).

    Runs the forward solve and the backward pass that `jax.grad` of `odeint(...,
    adjoint=Backsolve(...))` would run, for the loss whose gradient with respect to zs
    is `cotangent`.

    Args:
        f: as `jaxode.solve`.
        z0: as `jaxode.solve`.
        ts: as `jaxode.solve`.
        params: as `jaxode.solve`.
        cotangent: dL/dzs, with zs's structure (default: all ones).
        **options: the keywords of `jaxode.solve`; `adjoint` must be a `Backsolve`.

    Returns:
        {"forward": ..., "backward": ...}: JAX integers, one per sample with batch_axis.

    Raises:
        ValueError: for an adjoint other than Backsolve, or a cotangent with batch_axis.

    Example:
        >>> import jax.numpy as jnp, jaxode
        >>> nfe = jaxode.adjoint_nfe(lambda z, t, k: -k * z, jnp.ones(1),
        ...                          jnp.array([0.0, 1.0]), 2.0)
        >>> int(nfe["backward"]) > 0
        True
    """
    for name in options:
        if name not in SolveOptions.__annotations__:
            raise TypeError(f"adjoint_nfe() got an unexpected keyword argument {name!r}")
    if options.pop("event", None) is not None:
        raise ValueError("event: adjoint_nfe counts a solve without events")
    adjoint = adjoint_lib.resolve_adjoint(options.pop("adjoint", "backsolve"))
    if not isinstance(adjoint, adjoint_lib.Backsolve):
        raise ValueError(f"adjoint: adjoint_nfe counts the adjoint method's, got {adjoint!r}")
    batch_axis = options.pop("batch_axis", None)
    options.pop("throw", None)
    if cotangent is not None and batch_axis is not None:
        raise ValueError("cotangent: only the default (ones) is supported with batch_axis")
    z0 = _as_arrays(z0)
    settings, tols = _setup(z0, adjoint=adjoint, **{**options, "dense": False})
    return _adjoint_nfe(f, z0, ts, params, cotangent, settings, tols, batch_axis)


@eqx.filter_jit
def _adjoint_nfe(f, z0, ts, params, cotangent, settings, tols, batch_axis):
    f_flat, z0_flat, ts, params, _ = _flatten(f, z0, ts, params, batch_axis, tols)
    ts = ts.astype(tols.rtol.dtype)
    lanes = batch_axis is not None
    converted, consts = jax.closure_convert(f_flat, z0_flat[0] if lanes else z0_flat, ts[0], params)
    run = lambda z: adjoint_lib._solve(converted, settings, z, ts, params, tuple(consts), tols)
    forward = jax.vmap(run)(z0_flat) if lanes else run(z0_flat)
    zs = forward.zs if lanes else forward.zs[None]
    if cotangent is None:
        g = jnp.ones_like(zs)
    else:
        g = jax.vmap(lambda c: ravel_pytree(c)[0])(cotangent)[None]
    residuals = adjoint_lib._residuals(forward, ts, params, tuple(consts), tols)
    default = adjoint_lib._LaneAccumulator if lanes else adjoint_lib._JointAccumulator
    accumulator = adjoint_lib.accumulator_for(settings, residuals, default)
    _, backward = adjoint_lib.backward(converted, settings, residuals, g, accumulator)
    return {"forward": forward.stats["nfe"], "backward": backward if lanes else backward[0]}


# ------------------------------------------------------------------ argument checks


def _setup(z0, *, solver="dopri5", rtol=1e-6, atol=1e-8, dt0=None, max_steps=4096, adjoint,
           controller=None, dense=False, progress=False, throw=True):
    """Checks the options and builds the settings once: (Settings, Tolerances)."""
    solver = resolve_solver(solver)
    controller = _controller(controller, solver, dt0)
    _check_tolerances(rtol, atol)
    if not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"max_steps: expected a positive integer, got {max_steps!r}")
    if dt0 is not None:
        _check_number("dt0", dt0)
        if _known_zero(dt0):
            raise ValueError("dt0: must be non-zero")
    for name, flag in (("dense", dense), ("progress", progress), ("throw", throw)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {flag!r}")
    backsolve = adjoint if isinstance(adjoint, adjoint_lib.Backsolve) else adjoint_lib.Backsolve()
    backward_solver = backsolve.solver or solver
    if isinstance(controller, PIController) and not backward_solver.adaptive:
        raise ValueError(f"adjoint: Backsolve.solver {backward_solver.name!r} is fixed-step; "
                         "an adaptive forward solve needs an adaptive backward one")
    forward = loop.Static(solver, controller, int(max_steps), dense=dense,
                          automatic_dt0=dt0 is None, progress=progress)
    settings = adjoint_lib.Settings(forward, backward_solver, backsolve.seminorm, throw=throw)
    real = lambda x: jnp.asarray(x, jnp.finfo(_state_dtype(z0)).dtype)
    tols = adjoint_lib.Tolerances(
        rtol=real(rtol), atol=real(atol), dt0=jnp.abs(real(0.0 if dt0 is None else dt0)),
        adjoint_rtol=real(rtol if backsolve.rtol is None else backsolve.rtol),
        adjoint_atol=real(atol if backsolve.atol is None else backsolve.atol),
    )
    return settings, tols


def _flatten(f, z0, ts, params, batch_axis, tols):
    """Checks the problem and flattens it: (the flat field f(z_flat, t, arrays), flat z0
    ((samples, n) with batch_axis), ts, the arrays of params, unravel)."""
    if batch_axis is not None:
        z0 = _batch_first(z0, batch_axis)
    sample = z0 if batch_axis is None else jax.tree_util.tree_map(lambda x: x[0], z0)
    ts = jnp.asarray(ts)
    if ts.ndim != 1:
        raise ValueError(f"ts: expected a 1-D array of times, got shape {ts.shape}")
    if ts.shape[0] < 2:
        raise ValueError(f"ts: expected at least 2 times, got {ts.shape[0]}")
    _check_vector_field(f, sample, ts.astype(tols.rtol.dtype)[0], params)
    unravel = ravel_pytree(sample)[1]
    ravel = lambda z: ravel_pytree(z)[0]
    z0_flat = ravel(z0) if batch_axis is None else jax.vmap(ravel)(z0)
    # Arrays of params travel through the solve (and get gradients); anything else in it
    # (an Equinox module's activation functions, say) is closed over as a constant.
    arrays, static = eqx.partition(params, eqx.is_array)

    def f_flat(z_flat, t, arrays):
        return ravel(f(unravel(z_flat), t, eqx.combine(arrays, static)))

    return f_flat, z0_flat, ts, arrays, unravel


def _flat_event(event: Event, z0, ts, params, batch_axis, unravel, tols) -> Event:
    """The event with cond(z_flat, t, arrays), checked while tracing."""
    sample = z0 if batch_axis is None else jax.tree_util.tree_map(
        lambda x: jnp.take(x, 0, axis=batch_axis), z0)
    check_cond(event, sample, ts.astype(tols.rtol.dtype)[0], params)
    static = eqx.partition(params, eqx.is_array)[1]

    def cond(z_flat, t, arrays):
        return event.cond(unravel(z_flat), t, eqx.combine(arrays, static))

    return Event(cond, event.direction)


def _controller(controller, solver: AbstractSolver, dt0) -> AbstractController:
    if controller is None:
        controller = PIController() if solver.adaptive else ConstantStep()
    if not isinstance(controller, AbstractController):
        raise TypeError(f"controller: expected a jaxode.PIController, got {controller!r}")
    if isinstance(controller, PIController) and not solver.adaptive:
        raise ValueError(f"controller: the fixed-step solver {solver.name!r} has no error "
                         "estimate to control")
    if isinstance(controller, ConstantStep) and dt0 is None:
        raise ValueError(f"dt0: the fixed-step solver {solver.name!r} needs a step size dt0")
    return controller


def _concrete(value) -> bool:
    """Whether value is a number known while tracing (a traced one is checked by the run)."""
    return isinstance(value, (numbers.Real, np.ndarray, np.generic)) or (
        isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer))


def _known_zero(value) -> bool:
    return _concrete(value) and bool(np.all(np.asarray(value) == 0))


def _check_number(name, value):
    if not isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if _concrete(value) and not np.all(np.asarray(value) >= 0):
        raise ValueError(f"{name}: must be a non-negative number, got {value}")


def _check_tolerances(rtol, atol):
    _check_number("rtol", rtol)
    _check_number("atol", atol)
    if _known_zero(rtol) and _known_zero(atol):
        raise ValueError("rtol, atol: both are 0, which no step can meet; give atol > 0")


def _as_arrays(z0):
    """z0 with Python scalars as leaves (odeint(f, 1.0, ...)) made arrays, as jnp does,
    before the compiled solve (which would take them as static values)."""
    return jax.tree_util.tree_map(lambda x: x if hasattr(x, "shape") else jnp.asarray(x), z0)


def _state_dtype(z0):
    leaves = jax.tree_util.tree_leaves(z0)
    if not leaves:
        raise ValueError("z0: the initial state has no arrays")
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(f"z0: every leaf must be a floating-point or complex array, got "
                            f"dtype {dtype}; use e.g. jnp.asarray(z0, float)")
        if jnp.finfo(dtype).bits < 32:
            raise TypeError(f"z0: {dtype} is too coarse for error control and step sizes; "
                            "use float32 or float64")
    return jnp.result_type(*leaves)


def _describe(tree):
    return jax.tree_util.tree_map(lambda x: f"{x.dtype}{list(x.shape)}", tree)


def _check_vector_field(f, z0, t0, params):
    if not callable(f):
        raise TypeError(f"f: expected a callable f(z, t, params), got {f!r}")
    out = eqx.filter_eval_shape(f, z0, t0, params)
    expected = jax.eval_shape(lambda z: z, z0)
    same = jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(expected)
    if not same or any(
        a.shape != b.shape or a.dtype != b.dtype
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(expected))
    ):
        raise ValueError(
            "f: must return dz/dt with the same structure, shapes and dtypes as z; "
            f"z is {_describe(expected)} but f returned {_describe(out)}"
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
