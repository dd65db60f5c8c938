"""Gradients of a solve: `Backsolve`, `Direct` and `Forward`.

`Backsolve` is the paper's adjoint method (Algorithm 1, Figure 2, Appendix C) as a
`jax.custom_vjp`: the backward pass solves the adjoint a(t) from ts[-1] to ts[0], one
solve per interval between output times, adding dL/dz(t_i) at each output time; memory
is constant in the number of steps. One backward skeleton serves two ways of
accumulating the parameter adjoint a_θ:

- joint (one trajectory): a_θ is part of the backward ODE state (z, a, a_θ), and each
  interval is a call of the same custom_vjp function, so gradients of gradients work;
- lanes (`batch_axis`: a batch of trajectories, each with its own steps, sharing θ):
  each lane solves (z, a); a_θ is a quadrature shared by all lanes, Σ dt b_i a_iᵀ∂f/∂θ
  over the accepted steps' stages, from the same linearisation of f that gives the
  stage's a_z (its pullback applied a second time, once the step is accepted); a step's
  first stage and its linearisation are the last step's last (FSAL), carried over.

Time gradients use the closed forms (Appendix C) instead of an extra a_t state:
dL/dt_i = g_iᵀ f(z(t_i), t_i) for every output time after the first, and
dL/dt_0 = -a(t_0)ᵀ f(z_0, t_0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from . import events, loop
from .control import ConstantStep, PIController, initial_step
from .guards import first_order_only, forward_only_p, not_backsolved_p
from .solvers import AbstractSolver, ExplicitRK, resolve_solver
from .solvers.implicit import AbstractStiffSolver


class AbstractAdjoint(eqx.Module):
    """How a solve is differentiated."""


class Backsolve(AbstractAdjoint):
    """The adjoint method: reverse mode with memory constant in the number of steps.

    rtol, atol, solver: those of the backward solve (None: the forward solve's).
    seminorm: leave a_θ out of the backward error norm (Kidger, Chen & Lyons 2021),
    which takes fewer backward steps; a lane-batched (`batch_axis`) backward pass
    never controls a_θ's error.

    With a stiff backward solver (Kvaerno3/4/5, Rodas5P: the forward one by default), z is
    never integrated backwards (on a stiff problem that explodes): each output interval
    is re-solved forwards with dense output, only a is solved backwards (each backward
    step factorises an n x n Jacobian, n the state's size) and a_θ is a quadrature over
    the backward steps. Memory then grows with one interval's steps (two dense
    histories of max_steps rows), not the whole solve's; first-order gradients only.
    """

    rtol: float | None = None
    atol: float | None = None
    solver: AbstractSolver | None = eqx.field(default=None, static=True)
    seminorm: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and isinstance(value, (int, float)) and not value >= 0:
                raise ValueError(f"adjoint: Backsolve.{name} must be >= 0, got {value}")
        if not isinstance(self.seminorm, bool):
            raise TypeError(f"adjoint: Backsolve.seminorm must be a bool, got {self.seminorm!r}")

    def __init__(self, rtol=None, atol=None, solver=None, seminorm=True):
        self.rtol, self.atol, self.seminorm = rtol, atol, seminorm
        self.solver = None if solver is None else resolve_solver(solver, "Backsolve.solver")


class Direct(AbstractAdjoint):
    """Reverse mode through the solver's own operations: the exact gradient of the
    discrete solve (step sizes held fixed), through a checkpointed while loop bounded by
    max_steps (memory grows sub-linearly in the steps taken). First order only."""


class Forward(AbstractAdjoint):
    """Forward mode: `jax.jvp`, `jax.jacfwd` and forward-over-forward Hessians."""


ADJOINTS = {"backsolve": Backsolve, "direct": Direct, "forward": Forward}


def resolve_adjoint(adjoint) -> AbstractAdjoint:
    if isinstance(adjoint, str):
        if adjoint not in ADJOINTS:
            raise ValueError(f"adjoint: expected one of {sorted(ADJOINTS)}, got {adjoint!r}")
        return ADJOINTS[adjoint]()
    if isinstance(adjoint, AbstractAdjoint):
        return adjoint
    raise TypeError(
        f"adjoint: expected a name or jaxode.Backsolve/Direct/Forward(), got {adjoint!r}")


class Settings(NamedTuple):
    """The static settings of a solve and of its backward pass."""

    forward: loop.Static
    backward_solver: AbstractSolver
    seminorm: bool
    event: events.Event | None = None  # its cond as cond(z, t, params, *consts), flat z
    throw: bool = True  # a gradient of a failed solve raises (else: see Solution.status)


class Residuals(NamedTuple):
    """What the backward pass needs, for lanes (one lane: a joint solve)."""

    zs: jax.Array  # (lanes, len(ts), n)
    ts: jax.Array  # (lanes, len(ts)): ts, with the times after a lane's event moved onto it
    live: jax.Array  # (lanes, len(ts)): the times that are still the caller's
    status: jax.Array  # (lanes,): the forward solve's
    params: object
    consts: tuple
    tols: object
    varied: _Static | None = None  # per leaf of (params, consts): differentiated (None: all)


class Tolerances(NamedTuple):
    """Traced numbers of a solve and of its backward pass (zero cotangent)."""

    rtol: jax.Array
    atol: jax.Array
    dt0: jax.Array
    adjoint_rtol: jax.Array
    adjoint_atol: jax.Array

    def forward(self) -> loop.Traced:
        return loop.Traced(self.rtol, self.atol, self.dt0)


def _solve(ff, settings: Settings, z0, ts, params, consts, tols: Tolerances):
    event = settings.event
    if event is not None:
        # The loop only looks for the event; its gradient comes from `events.differentiable`.
        cond, (frozen_params, frozen_consts) = event.cond, lax.stop_gradient((params, consts))
        event = events.Event(lambda t, z: cond(z, t, frozen_params, *frozen_consts),
                             event.direction)
    return loop.solve(lambda t, z: ff(z, t, params, *consts), z0, ts, settings.forward,
                      tols.forward(), event)


def _residuals(result, ts, params, consts, tols, varied=None) -> Residuals:
    """The residuals of a solve (result.zs (len(ts), n), or (lanes, len(ts), n)). After an
    event the outputs hold z at the event time, so the backward pass takes them there:
    the intervals between them have zero length."""
    zs = result.zs if result.zs.ndim == 3 else result.zs[None]
    times = jnp.broadcast_to(ts, zs.shape[:2])
    status = jnp.reshape(result.status, (-1,))
    if result.event_time is None:
        return Residuals(zs, times, jnp.ones(times.shape, bool), status, params, consts, tols,
                         varied)
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(ts.dtype)
    t_event = jnp.reshape(result.event_time, (-1, 1))
    live = ~jnp.reshape(result.event_happened, (-1, 1)) | (direction * times < direction * t_event)
    return Residuals(zs, jnp.where(live, times, t_event), live, status, params, consts, tols,
                     varied)


# ------------------------------------------------------------------ joint backsolve


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _backsolve(ff, settings, z0, ts, params, consts, tols):
    return _solve(ff, settings, z0, ts, params, consts, tols)


def _forward_rule(backsolve):
    """The forward rule of a backsolve custom_vjp (joint or lanes)."""

    def rule(ff, settings, *primals):
        # The custom_vjp function itself, not its body: differentiating the residuals
        # again (gradients of gradients) then uses the adjoint method too.
        (z0, ts, params, consts, tols), varied = _unwrap(primals)
        result = backsolve(ff, settings, z0, ts, params, consts, tols)
        return result, _residuals(result, ts, params, consts, tols, _Static(varied[2:4]))

    return rule


def _backsolve_bwd(ff, settings, residuals, cotangents):
    accumulator = accumulator_for(settings, residuals, _JointAccumulator)
    bars, _ = backward(ff, settings, residuals, _instantiate(cotangents.zs)[None], accumulator)
    z0_bar, *rest = bars
    return (z0_bar[0], *rest, _zeros_like(residuals.tols))


_backsolve.defvjp(_forward_rule(_backsolve), _backsolve_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _backsolve_lanes(ff, settings, z0s, ts, params, consts, tols):
    return jax.vmap(lambda z0: _solve(ff, settings, z0, ts, params, consts, tols))(z0s)


def _backsolve_lanes_bwd(ff, settings, residuals, cotangents):
    accumulator = accumulator_for(settings, residuals, _LaneAccumulator)
    bars, _ = backward(ff, settings, residuals, _instantiate(cotangents.zs), accumulator)
    return (*bars, _zeros_like(residuals.tols))


_backsolve_lanes.defvjp(_forward_rule(_backsolve_lanes), _backsolve_lanes_bwd,
                        symbolic_zeros=True)


# ------------------------------------------------------------------ the backward skeleton


def backward(ff, settings: Settings, residuals: Residuals, g, accumulator):
    """The adjoint solves, for lanes zs (lanes, len(ts), n) (one lane: a joint solve).
    Returns the cotangents of (z0s, ts, params, consts) and each lane's backward NFE."""
    zs, ts, live, forward_status, params, consts, tols, varied = residuals
    num_lanes, num_outputs, n = zs.shape
    real = ts.dtype
    g = g.astype(zs.dtype)
    view = _parameter_view(ff, params, consts, None if varied is None else varied.value)
    theta, field = view.theta, view.field
    acc = accumulator(ff, view, settings, tols, params, consts, n)

    f_out = jax.vmap(jax.vmap(lambda z, t: field(z, t, theta)))(zs, ts)
    ts_bar = jnp.real(jnp.sum(g * f_out, axis=2))
    a, a_theta, nfe, status = acc.solve_back(zs, g, ts)
    ts_bar = ts_bar.at[:, 0].set(-jnp.real(jnp.sum(a * f_out[:, 0], axis=1)))
    # A time after the event is not where its output was taken: no gradient.
    ts_bar = jnp.sum(jnp.where(live, ts_bar, 0), axis=0)
    if settings.throw:  # a gradient that uses no output of the solve still learns of it
        status = jnp.where(forward_status != loop.SUCCESS, forward_status, status)
    # On every cotangent: an unused one (and its check) may be dropped as dead code.
    z0_bar, ts_bar, a_theta = loop.raise_if_failed((a + g[:, 0], ts_bar, a_theta), status)
    params_bar, consts_bar = _theta_cotangent(view.unravel(acc.theta_value(a_theta)), params,
                                              consts)
    return (z0_bar, ts_bar.astype(real), params_bar, consts_bar), nfe


def _backward_static(settings: Settings, error_size=None) -> loop.Static:
    solver, controller = settings.backward_solver, settings.forward.controller
    if solver.adaptive and isinstance(controller, ConstantStep):
        controller = PIController()  # an adaptive backward solve of a fixed-step forward one
    return loop.Static(solver, controller, settings.forward.max_steps, error_size=error_size,
                       automatic_dt0=False)


class _Accumulator:
    """How a backward pass accumulates a_θ; `theta` and `tols` are set by each.

    a_θ is a real vector: a complex θ's cotangent with its real and imaginary parts side
    by side (so that it rides in a real backward state, and keeps its imaginary part in
    a complex one)."""

    def zero_theta(self):
        leaves = jax.tree_util.tree_leaves(self.theta)
        size = sum(np.size(x) for x in leaves) * (2 if _is_complex(self.theta) else 1)
        return jnp.zeros((size,), self.tols.rtol.dtype)

    def as_a_theta(self, theta_bar):
        """A flat cotangent of θ (complex where the state is) as a_θ's real vector."""
        if _is_complex(self.theta):
            return jnp.concatenate([jnp.real(theta_bar), jnp.imag(theta_bar)])
        return jnp.real(theta_bar)

    def theta_value(self, a_theta):
        """a_θ as the flat cotangent of θ."""
        if not _is_complex(self.theta):
            return a_theta
        half = a_theta.shape[0] // 2
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(self.theta))
        return (a_theta[:half] + 1j * a_theta[half:]).astype(dtype)


class _IntervalScan(_Accumulator):
    """The backward pass as a reverse scan over the output intervals, adding dL/dz(t_i)
    at each output time; `interval` solves one."""

    def solve_back(self, zs, g, ts):
        """a(t_0) (before adding dL/dz(t_0)), a_θ, and each lane's NFE and status."""

        def interval(carry, i):
            a, a_theta, dt, nfe, status = carry
            a, a_theta, dt, interval_nfe, interval_status = self.interval(
                i, zs[:, i], a + g[:, i], a_theta, ts[:, i], ts[:, i - 1], dt)
            status = jnp.where(status == loop.SUCCESS, interval_status, status)
            return (a, a_theta, dt, nfe + interval_nfe, status), None

        num_lanes, last = zs.shape[0], zs.shape[1] - 1
        init = (jnp.zeros_like(zs[:, 0]), self.zero_theta(),
                self.first_dt(zs[:, last], g[:, last], ts), jnp.full((num_lanes,), 2, jnp.int32),
                jnp.full((num_lanes,), loop.SUCCESS, jnp.int32))
        (a, a_theta, _, nfe, status), _ = lax.scan(interval, init, jnp.arange(last, 0, -1))
        return a, a_theta, nfe, status


class _JointAccumulator(_IntervalScan):
    """a_θ as part of the backward ODE state (z, a, a_θ), one lane."""

    def __init__(self, ff, view, settings, tols, params, consts, n):
        self.settings, self.tols, self.n, self.theta = settings, tols, n, view.theta
        self.params, self.consts = params, consts
        error_size = 2 * n if settings.seminorm else None
        self.inner = Settings(_backward_static(settings, error_size), settings.backward_solver,
                              settings.seminorm)

        def augmented(y, t, params_, *consts_):
            """d/dt (z, a, a_θ) = (f, -aᵀ∂f/∂z, -aᵀ∂f/∂θ): one vjp of f per call."""
            # The parameters held fixed come in as arguments too: a value closed over by
            # this custom_vjp field would leak into the backward pass of a second
            # derivative.
            theta_, rest = view.split(params_, consts_)
            field = view.field_of(rest)
            fz, vjp = jax.vjp(lambda z_, d_: field(z_, t, d_), y[:n], theta_)
            a_z, a_theta = vjp(y[n: 2 * n])
            a_theta = self.as_a_theta(ravel_pytree(a_theta)[0])
            return jnp.concatenate([fz, -a_z, -a_theta.astype(y.dtype)])

        self.augmented = augmented

    def first_dt(self, z_last, g_last, ts):
        tols = self.tols
        if not self.settings.forward.automatic_dt0:
            return tols.dt0[None]
        # a_θ starts at zero, as in the backward solve itself.
        y = jnp.concatenate([z_last[0], g_last[0], self.zero_theta().astype(z_last.dtype)])
        ts = ts[0]
        direction = jnp.where(ts[0] >= ts[-1], 1, -1).astype(ts.dtype)
        f = lambda tau, y: direction * self.augmented(y, direction * tau, self.params, *self.consts)
        tau = direction * ts[-1]
        dt = initial_step(f, tau, y, f(tau, y), self.settings.backward_solver.order,
                          tols.adjoint_rtol, tols.adjoint_atol, self.inner.forward.error_size)
        # A step-size decision, held constant under differentiation (grad of grad).
        return lax.stop_gradient(dt[None].astype(ts.dtype))

    def interval(self, i, z, a, a_theta, t_start, t_stop, dt):
        def solve():
            y = jnp.concatenate([z[0], a[0], a_theta.astype(z.dtype)])
            tols = self.tols._replace(rtol=self.tols.adjoint_rtol, atol=self.tols.adjoint_atol,
                                      dt0=dt[0])
            result = _backsolve(self.augmented, self.inner, y, jnp.concatenate([t_start, t_stop]),
                                self.params, self.consts, tols)
            y_end, n = result.zs[-1], self.n
            # a_θ rides in a complex state as a real vector: its imaginary part stays zero.
            return (y_end[None, n: 2 * n], jnp.real(y_end[2 * n:]).astype(a_theta.dtype),
                    result.dt_next[None], result.stats["nfe"][None], result.status[None])

        # Between outputs after an event (all at the event time) there is nothing to solve.
        nothing = lambda: (a, a_theta, dt, jnp.zeros((1,), jnp.int32),
                           jnp.full((1,), loop.SUCCESS, jnp.int32))
        return lax.cond(t_start[0] == t_stop[0], nothing, solve)


class _LaneAccumulator(_Accumulator):
    """a_θ as a quadrature over the stages of every lane's accepted steps."""

    def __init__(self, ff, view, settings, tols, params, consts, n):
        solver = settings.backward_solver
        if not isinstance(solver, ExplicitRK):
            raise TypeError("adjoint: a batch_axis backward pass needs an explicit Runge-Kutta "
                            f"Backsolve.solver, got {solver!r}; pass e.g. "
                            "adjoint=jaxode.Backsolve(solver='dopri5')")
        self.field, self.theta, self.settings, self.tols, self.n = (view.field, view.theta,
                                                                    settings, tols, n)
        # The quadrature reuses each stage's linearisation: the stages must be unrolled.
        solver = dataclasses.replace(solver, stage_loop=False)
        self.static = _backward_static(settings._replace(backward_solver=solver))

    def lane_field(self, direction, records=None):
        """d/dτ (z, a) for (lanes, 2n) states at per-lane τ, keeping each stage's pullback."""
        n = self.n

        def f(tau, y):
            t = jnp.broadcast_to(direction * tau, y.shape[:-1] + (1,))[:, 0]
            batched = lambda z, theta: jax.vmap(self.field, (0, 0, None))(z, t, theta)
            fz, pullback = jax.vjp(batched, y[:, :n], self.theta)
            if records is not None:
                records.append((pullback, y[:, n:]))
            return direction * jnp.concatenate([fz, -pullback(y[:, n:])[0]], axis=1)

        return f

    def first_dt(self, z_last, g_last, ts):
        tols = self.tols
        if not self.settings.forward.automatic_dt0:
            return jnp.full((z_last.shape[0], 1), tols.dt0, ts.dtype)
        direction = jnp.where(ts[0, 0] >= ts[0, -1], 1, -1).astype(ts.dtype)
        f, tau = self.lane_field(direction), direction * ts[:, -1:]
        y = jnp.concatenate([z_last, g_last], axis=1)
        dt = initial_step(f, tau, y, f(tau, y), self.static.solver.order, tols.adjoint_rtol,
                          tols.adjoint_atol)
        return dt.astype(ts.dtype)

    def solve_back(self, zs, g, ts):
        """One loop over the whole backward span in which every lane goes at its own pace,
        crossing output times on its own (landing on each, where its z is reset to the
        forward solve's and dL/dz(t_i) is added to its a): no lane waits for the others at
        an output time. Each lane has its own times ts (lanes, len(ts))."""
        num_lanes, last, n = zs.shape[0], zs.shape[1] - 1, self.n
        direction = jnp.where(ts[0, 0] >= ts[0, -1], 1, -1).astype(ts.dtype)
        taus = direction * ts  # each row increasing from taus[:, last] to taus[:, 0]
        records = []
        f = self.lane_field(direction, records)
        traced = loop.Traced(self.tols.adjoint_rtol, self.tols.adjoint_atol,
                             self.first_dt(zs[:, last], g[:, last], ts))
        y = jnp.concatenate([zs[:, last], g[:, last]], 1)
        init, step, unfinished, finish = loop.pieces(f, y, taus[0, jnp.array([last, 0])],
                                                     self.static, traced)
        b, lanes = self.static.solver.tableau.b, jnp.arange(num_lanes)
        first = _FirstStage(f, records, y, taus[:, :1])

        def body(state):
            c, target, a_theta, stage = state
            c, stage = first.ready(c, stage)
            a_1 = c.z[:, n:]
            records.clear()
            c, (dt, accept) = step(c, unfinished(c))
            pullbacks = [(first.pullback(stage, records[-1][0]), a_1), *records]
            weights = jnp.where(accept, dt, 0).astype(zs.dtype)
            for b_i, (pullback, a_i) in zip(b, pullbacks):  # f_1's weight is 0
                if b_i:
                    theta_bar = pullback(float(b_i) * weights * a_i)[1]
                    theta_bar = self.as_a_theta(ravel_pytree(theta_bar)[0]).astype(a_theta.dtype)
                    a_theta = a_theta - direction * theta_bar
            # Lanes that landed on output time `target` (> 0) jump and head for the next
            # (at once, if it is the same time: outputs after an event).
            landed = (c.t >= c.t_end) & (target > 0) & (c.status == loop.SUCCESS)
            i = target[:, 0]
            jumped = jnp.concatenate([zs[lanes, i], c.z[:, n:] + g[lanes, i]], 1)
            t_next = taus[lanes, jnp.maximum(i - 1, 0)][:, None]
            c = c._replace(z=jnp.where(landed, jumped, c.z),
                           t_end=jnp.where(landed, t_next, c.t_end))
            stage = first.after_step(stage, records[-1][0], accept, landed)
            return c, jnp.where(landed, target - 1, target), a_theta, stage

        def going(state):
            c, target, _, _ = state
            return jnp.any(unfinished(c) | ((target > 0) & (c.status == loop.SUCCESS)))

        c = init()._replace(t=taus[:, last:last + 1], t_end=taus[:, last - 1:last])
        target = jnp.full((num_lanes, 1), last - 1)
        c, _, a_theta, stage = lax.while_loop(going, body,
                                              (c, target, self.zero_theta(), first.init()))
        result = finish(c)
        nfe = result.stats["nfe"] + stage.evaluations  # the fresh first stages
        return c.z[:, n:], a_theta, nfe[:, 0] + 1, result.status[:, 0]


class _Stage(NamedTuple):
    fresh: jax.Array  # (lanes, 1): the lane's first stage must be evaluated afresh
    residuals: list  # the leaves of each lane's first-stage pullback
    evaluations: jax.Array  # (lanes, 1): how many times the lane needed a fresh one


class _FirstStage:
    """A lane's first stage is its last step's last (FSAL), linearisation included: each
    lane's pullback residuals are carried to the next step, and the first stage is
    evaluated afresh (for all lanes, in steps that need it) only after a lane's jump
    at an output time, and at the start."""

    def __init__(self, f, records, y, tau):
        self.f, self.records = f, records
        more = lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype)
        shapes = jax.eval_shape(self._evaluate, tau, y)[1]
        # Each residual's lane axis (None: a residual of θ alone, the same in every lane).
        self.axes = [next((k for k, (p, q) in enumerate(zip(a.shape, b.shape)) if p != q), None)
                     for a, b in zip(shapes, jax.eval_shape(self._evaluate, more(tau), more(y))[1])]
        self.shapes, self.num_lanes = shapes, y.shape[0]

    def _evaluate(self, tau, y):
        self.records.clear()
        value = self.f(tau, y)
        return value, jax.tree_util.tree_leaves(self.records.pop()[0])

    def init(self) -> _Stage:
        return _Stage(jnp.ones((self.num_lanes, 1), bool),
                      [jnp.zeros(s.shape, s.dtype) for s in self.shapes],
                      jnp.zeros((self.num_lanes, 1), jnp.int32))

    def _select(self, which, new, old):
        def one(axis, x, y):
            if axis is None:
                return x
            shape = [1] * x.ndim
            shape[axis] = self.num_lanes
            return jnp.where(which.reshape(shape), x, y)
        return [one(*args) for args in zip(self.axes, new, old)]

    def ready(self, c, stage: _Stage):
        """The carry with every lane's first stage, and its residuals, at (c.t, c.z)."""
        value, residuals = lax.cond(jnp.any(stage.fresh), lambda: self._evaluate(c.t, c.z),
                                    lambda: (c.solver_state, stage.residuals))
        c = c._replace(solver_state=jnp.where(stage.fresh, value, c.solver_state))
        evaluations = stage.evaluations + stage.fresh.astype(jnp.int32)
        return c, _Stage(stage.fresh, self._select(stage.fresh, residuals, stage.residuals),
                         evaluations)

    def pullback(self, stage: _Stage, like):
        """The first stage's pullback: `like`'s function (the step's last stage, f at
        another point) with the first stage's residuals."""
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), stage.residuals)

    def after_step(self, stage: _Stage, last, accept, jumped) -> _Stage:
        """An accepted step's last stage is the next step's first; a rejected step's first
        stays; a lane that jumped must evaluate it afresh."""
        residuals = self._select(accept, jax.tree_util.tree_leaves(last), stage.residuals)
        return _Stage(jumped, residuals, stage.evaluations)


class _StiffAccumulator(_IntervalScan):
    """The adjoint method for stiff solvers (`AbstractStiffSolver`: Kvaerno, Rodas5P).

    z cannot be integrated backwards on a stiff problem (the reverse of a fast decay is an
    explosion), so each output interval [t_{i-1}, t_i] is done in three parts, one lane at
    a time (vmapped over lanes for `batch_axis`):

    1. z is re-solved forwards from the stored z(t_{i-1}) with the forward solver and
       tolerances, keeping its dense output;
    2. a alone is solved backwards, da/dt = -aᵀ∂f/∂z(z(t), t), with z(t) from that dense
       output, by the backward (implicit) solver: each backward step factorises an n x n
       Jacobian (n the state's size, not 2n + the number of parameters), which is
       -(∂f/∂z)ᵀ;
    3. a_θ += ∫ aᵀ∂f/∂θ dt over the interval, a 3-point Gauss-Legendre quadrature over each
       accepted backward step from both dense outputs: one vector-Jacobian product per
       node, never inside the implicit solve.

    Memory per interval: the two dense histories, max_steps rows each of (the solver's
    dense rows + 1) x n (allocated once, reused by every interval; one interval's steps,
    never the whole solve's). First-order only: gradients of gradients are not supported.
    """

    NODES = (np.polynomial.legendre.leggauss(3)[0] + 1) / 2
    WEIGHTS = np.polynomial.legendre.leggauss(3)[1] / 2

    def __init__(self, ff, view, settings, tols, params, consts, n, *, zs):
        self.field, self.theta, self.tols, self.zs = view.field, view.theta, tols, zs
        forward = settings.forward
        self.resolve = forward._replace(dense=True, checkpointed=False, error_size=None,
                                        progress=False)
        self.back = _backward_static(settings)._replace(dense=True,
                                                        automatic_dt0=forward.automatic_dt0)

    def first_dt(self, z_last, g_last, ts):
        return jnp.zeros(z_last.shape[:1], ts.dtype)  # each solve picks its own first step

    def interval(self, i, z, a, a_theta, t_start, t_stop, dt):
        a_new, theta_bar, nfe, status = jax.vmap(self._lane)(self.zs[:, i - 1], a, t_stop, t_start)
        return a_new, a_theta + jnp.sum(theta_bar, 0).astype(a_theta.dtype), dt, nfe, status

    def _lane(self, z_begin, a_end, t_begin, t_end):
        # Between outputs after an event (all at the event time) there is nothing to solve.
        nothing = lambda: (a_end, self.zero_theta(),
                           jnp.zeros((), jnp.int32), jnp.asarray(loop.SUCCESS, jnp.int32))
        return lax.cond(t_begin == t_end, nothing,
                        lambda: self._interval_lane(z_begin, a_end, t_begin, t_end))

    def _interval_lane(self, z_begin, a_end, t_begin, t_end):
        tols, theta = self.tols, self.theta
        span = jnp.stack([t_begin, t_end])
        fwd = loop.solve(lambda t, z: self.field(z, t, theta), z_begin, span, self.resolve,
                         loop.Traced(tols.rtol, tols.atol, tols.dt0))
        forward_sign = jnp.where(t_end >= t_begin, 1, -1).astype(span.dtype)
        # Extrapolated past the span: a stage time may lie beyond it (Kvaerno5's c_3 = 1.23).
        z_at = lambda t: loop.evaluate(self.resolve.solver, fwd.history, fwd.stats["num_steps"],
                                       forward_sign * t)

        def adjoint_field(t, a):
            _, vjp = jax.vjp(lambda z_: self.field(z_, t, theta), z_at(t))
            return -vjp(a)[0]

        back = loop.solve(adjoint_field, a_end, span[::-1], self.back,
                          loop.Traced(tols.adjoint_rtol, tols.adjoint_atol, tols.dt0))
        history, num_steps, solver = back.history, back.stats["num_steps"], self.back.solver
        last_row = history.t_start.shape[0] - 1

        def quadrature(k, total):
            # A rejected attempt shares its t_start with the attempt after it.
            accepted = (k == num_steps - 1) | (
                history.t_start[jnp.minimum(k + 1, last_row)] != history.t_start[k])
            dt, row = history.dt[k], jax.tree_util.tree_map(lambda x: x[k], history.dense)
            for node, weight in zip(self.NODES, self.WEIGHTS):
                a_node = solver.interpolate(history.z_start[k], dt, row, node)
                t = -forward_sign * (history.t_start[k] + float(node) * dt)
                z_node = z_at(t)
                _, vjp = jax.vjp(lambda th: self.field(z_node, t, th), theta)
                value = ravel_pytree(vjp(a_node)[0])[0]
                total = total + jnp.where(accepted, float(weight) * dt, 0) * value
            return total

        flat = ravel_pytree(theta)[0]
        zero = jnp.zeros(flat.shape, jnp.result_type(flat, a_end))
        theta_bar = forward_sign * lax.fori_loop(0, num_steps, quadrature, zero)
        status = jnp.where(fwd.status != loop.SUCCESS, fwd.status, back.status)
        nfe = fwd.stats["nfe"] + back.stats["nfe"] + len(self.NODES) * num_steps
        return back.zs[-1], self.as_a_theta(theta_bar), nfe, status


def accumulator_for(settings: Settings, residuals, default):
    """The a_θ accumulator of a backward pass: `default` (joint or lanes), or the stiff
    one when the backward solver is implicit or Rosenbrock."""
    if isinstance(settings.backward_solver, AbstractStiffSolver):
        return functools.partial(_StiffAccumulator, zs=residuals.zs)
    return default


# ------------------------------------------------------------------ Direct and Forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _direct(ff, settings, z0, ts, params, consts, tols):
    # The primal (traced even when only the fwd rule runs, and run when nothing is
    # differentiated) is the plain loop; only the fwd rule checkpoints it.
    return _solve(ff, settings, z0, ts, params, consts, tols)


def _direct_fwd(ff, settings, *primals):
    # Only the inputs being differentiated are linearised: with ts held fixed (as a loss
    # of z0 or params holds them), t and dt carry no tangent through the steps.
    settings = settings._replace(forward=settings.forward._replace(checkpointed=True))
    leaves, treedef = jax.tree_util.tree_flatten(primals, is_leaf=_is_primal)
    moving = tuple(leaf.perturbed for leaf in leaves)

    def run(*moved):
        moved = iter(moved)
        args = treedef.unflatten([next(moved) if p.perturbed else p.value for p in leaves])
        return _solve(ff, settings, *args)

    result, pullback = jax.vjp(run, *[p.value for p in leaves if p.perturbed])
    return result, (pullback, result.status, _Static((treedef, moving)))


def _direct_bwd(ff, settings, residuals, cotangents):
    pullback, status, inputs = residuals
    treedef, moving = inputs.value
    cotangents = jax.tree_util.tree_map(_instantiate, cotangents, is_leaf=_is_zero)
    moved = iter(first_order_only(_DIRECT_ONCE, pullback)(cotangents))
    bars = treedef.unflatten([next(moved) if m else None for m in moving])
    if not settings.throw:
        return bars
    # A gradient that uses no output of the failed solve still learns of it.
    differentiable, rest = eqx.partition(bars, eqx.is_inexact_array)
    return eqx.combine(loop.raise_if_failed(differentiable, status), rest)


_direct.defvjp(_direct_fwd, _direct_bwd, symbolic_zeros=True)
_DIRECT_ONCE = ("adjoint: Direct() differentiates once in reverse mode; for gradients of "
                "gradients use adjoint='backsolve', for forward mode adjoint='forward'")


def solve(adjoint: AbstractAdjoint, ff, settings: Settings, z0, ts, params, tols, lanes: bool):
    """A flat solve (`ff(z, t, params)`; z0 (n,), or (lanes, n) when `lanes`; with
    `settings.event`, cond(z, t, params)) whose derivatives are those `adjoint` asks for."""
    result = _differentiable_solve(adjoint, ff, settings, z0, ts, params, tols, lanes)
    if settings.event is None:
        return result
    cond = lambda z, t: settings.event.cond(z, t, params)
    attach = lambda zs, t, happened: events.differentiable(cond, lambda z, t: ff(z, t, params),
                                                           ts, zs, t, happened)
    zs, event_time, _ = (jax.vmap(attach) if lanes else attach)(
        result.zs, result.event_time, result.event_happened)
    return result._replace(zs=zs, event_time=event_time)


def _differentiable_solve(adjoint, ff, settings: Settings, z0, ts, params, tols, lanes: bool):
    """The solve under `adjoint`; after an event, z at its time held fixed."""
    if isinstance(adjoint, Forward):
        run = lambda z0: _solve(ff, settings, z0, ts, params, (), tols)
        result = jax.vmap(run)(z0) if lanes else run(z0)
        return result._replace(zs=forward_only_p.bind(result.zs))
    converted, event, consts = _closure_convert(ff, settings.event, z0[0] if lanes else z0,
                                                ts[0], params)
    settings = settings._replace(event=event)
    if isinstance(adjoint, Direct):
        forward = settings.forward
        settings = settings._replace(forward=forward._replace(
            solver=forward.solver.differentiated(z0.shape[-1])))
        # Lanes are a vmapped solve: each sample's loop, f's vjp summing the shared
        # parameters' cotangent over the batch.
        run = lambda z0: _direct(converted, settings, z0, ts, params, tuple(consts), tols)
        return jax.vmap(run)(z0) if lanes else run(z0)
    backsolve = _backsolve_lanes if lanes else _backsolve
    result = backsolve(converted, settings, z0, ts, params, tuple(consts), tols)
    # The dense history is not differentiated by the adjoint method: reverse mode through
    # `Solution.evaluate` raises (the times belong in ts).
    return result._replace(history=jax.tree_util.tree_map(not_backsolved_p.bind, result.history))


def _closure_convert(ff, event, z, t, params):
    """ff and the event's cond with the values they close over hoisted into consts (so
    that those receive gradients too): (ff, event, consts)."""
    if event is None:
        converted, consts = jax.closure_convert(ff, z, t, params)
        return converted, None, consts
    pair = lambda z, t, params: (ff(z, t, params), event.cond(z, t, params))
    converted, consts = jax.closure_convert(pair, z, t, params)
    cond = lambda *args: converted(*args)[1]
    return (lambda *args: converted(*args)[0]), events.Event(cond, event.direction), consts


# ------------------------------------------------------------------ parameter views


class _Static(eqx.Module):
    """Static data (no arrays) carried as a custom_vjp residual."""

    value: object = eqx.field(static=True)


_is_primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)  # noqa: E731
_is_zero = lambda x: isinstance(x, jax.custom_derivatives.SymbolicZero)  # noqa: E731


def _unwrap(primals):
    """(values, varied) of a custom_vjp rule's primals (symbolic zeros on): the inputs,
    and per leaf whether it is differentiated."""
    values = jax.tree_util.tree_map(lambda p: p.value, primals, is_leaf=_is_primal)
    varied = jax.tree_util.tree_map(lambda p: p.perturbed, primals, is_leaf=_is_primal)
    return values, varied


def _instantiate(cotangent):
    """A (symbolic-zero) cotangent as an array."""
    if not _is_zero(cotangent):
        return cotangent
    if cotangent.dtype == jax.dtypes.float0:  # of an integer output
        return np.zeros(cotangent.shape, jax.dtypes.float0)
    return jnp.zeros(cotangent.shape, cotangent.dtype)


def _is_complex(tree) -> bool:
    """Whether a tree has complex leaves (from their dtypes: no operation is traced)."""
    return any(jnp.iscomplexobj(x) for x in jax.tree_util.tree_leaves(tree))


def _zeros_like(tree):
    def zero(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)

    return jax.tree_util.tree_map(zero, tree)


def _is_differentiable(x):
    """Floating-point arrays and scalars (Python floats may arrive as JAX literals)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, float, complex)) and jnp.issubdtype(
        jnp.result_type(x), jnp.inexact
    )


class _View(NamedTuple):
    """θ, the part of (params, consts) a backward pass differentiates, with its unravel;
    `split(params, consts)`: (θ, the rest) of given values; `field_of(rest)`: the vector
    field as a function f(z, t, θ) with that rest; `field`: the one with this rest."""

    theta: object
    unravel: object
    field: object
    split: object
    field_of: object


def _parameter_view(ff, params, consts, varied=None) -> _View:
    """θ: the floating-point leaves of (params, consts) that are differentiated (all,
    without `varied`, a matching tree of bools): a leaf held fixed has no adjoint."""
    spec = _is_differentiable if varied is None else jax.tree_util.tree_map(
        lambda x, v: v and _is_differentiable(x), (params, consts), varied)
    split = lambda p, c: eqx.partition((p, c), spec)  # noqa: E731

    def field_of(rest):
        def field(z, t, theta_):
            p, c = eqx.combine(theta_, rest)
            return ff(z, t, p, *c)

        return field

    theta, rest = split(params, consts)
    return _View(theta, ravel_pytree(theta)[1], field_of(rest), split, field_of)


def _theta_cotangent(theta_bar, params, consts):
    """Cotangents of (params, consts) from those of their differentiable part."""
    return jax.tree_util.tree_map(
        lambda d, s: d if d is not None or s is None else _zeros_like(s),
        theta_bar,
        (params, consts),
        is_leaf=lambda x: x is None,
    )
