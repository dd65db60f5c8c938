"""The solve: one `lax.while_loop` that only keeps books.

Each pass makes one step attempt (the solver), accepts or rejects it (the controller),
fills the output times it passed by dense output, stops at a terminal event, and updates
stats and status. The state is one flat vector. Integration backwards in time runs
forwards in τ = -t on the negated vector field, so the loop only ever moves to larger
times: `solve` is the one place where the direction is handled.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jax import lax

from . import events, xla_cpu
from .control import AbstractController, initial_step
from .guards import cut_if_not_finite
from .solvers import AbstractSolver

# Run-time outcomes, `Solution.status`.
SUCCESS, MAX_STEPS_REACHED, STEP_SIZE_UNDERFLOW, NONFINITE_STATE, TS_NOT_MONOTONIC = range(5)
STATUS_MESSAGES = (
    "success",
    "jaxode: max_steps reached before the end of the integration; raise max_steps, "
    "loosen rtol/atol, or check the vector field for stiffness",
    "jaxode: step size underflow (t + dt == t): the step size became too small for the "
    "floating-point precision of t, the usual float32 failure on stiff or very "
    "tight-tolerance problems; use float64 or loosen rtol/atol",
    "jaxode: non-finite state: the vector field produced NaN or inf, or an implicit "
    "solver's corrector iteration did not converge even at the smallest step",
    "jaxode: ts must be strictly increasing or strictly decreasing, and finite",
)
"""The message of each run-time outcome, indexed by `Solution.status`: 0 success,
1 max_steps reached, 2 step-size underflow, 3 non-finite state, 4 ts not monotonic (or
not finite)."""

SAVE_CHUNK = 4  # outputs filled per pass of the output loop
# Outputs a step of the checkpointed loop (adjoint="direct") writes from a window; with no
# loop to run more passes, a wider one is worth its cost (see `_save_masked`).
SAVE_WINDOW = 8


class Static(NamedTuple):
    """A solve's settings that shape the compiled program (hashable)."""

    solver: AbstractSolver
    controller: AbstractController
    max_steps: int
    dense: bool = False
    checkpointed: bool = False  # reverse-differentiable loop (adjoint="direct")
    error_size: int | None = None  # only z[:error_size] enters the error norm
    automatic_dt0: bool = True
    progress: bool = False  # report the progress in t on stderr


class Traced(NamedTuple):
    """A solve's traced numbers."""

    rtol: jax.Array
    atol: jax.Array
    dt0: jax.Array  # used when not Static.automatic_dt0


class History(NamedTuple):
    """Every step attempt, for `Solution.evaluate`: unused rows have t_start = +inf."""

    t_start: jax.Array  # (max_steps,), in τ
    dt: jax.Array
    z_start: jax.Array  # (max_steps, n)
    dense: Any  # the solver's dense info, each leaf with a leading max_steps axis


class Result(NamedTuple):
    zs: jax.Array  # (len(ts), n); rows never reached are NaN
    stats: dict
    status: jax.Array
    history: History | None
    dt_next: jax.Array  # the controller's proposal after the last step
    event_time: jax.Array | None = None  # where the solve stopped (ts[-1] without an event)
    event_happened: jax.Array | None = None


class _Carry(NamedTuple):
    t: jax.Array
    t_end: jax.Array  # where the solve is heading (per lane: see the lane backward pass)
    z: jax.Array
    solver_state: Any
    dt: jax.Array
    controller_state: Any
    next_output: jax.Array
    # (len(ts) + SAVE_CHUNK, n): the outputs and spare rows after them that take the
    # writes a step does not make (every write in bounds); None with only the end points.
    zs: jax.Array | None
    num_steps: jax.Array
    num_accepted: jax.Array
    status: jax.Array
    history: History | None
    counts: dict  # the sums of the solver's per-attempt `Step.stats`
    event_value: jax.Array | None  # cond at (t, z), with an event
    event_happened: jax.Array | None


def solve(f, z0, ts, static: Static, traced: Traced, event: events.Event | None = None) -> Result:
    """Solve dz/dt = f(t, z) on a flat z from ts[0] (increasing or decreasing) with an
    output at every time in ts, stopping at the first crossing of `event.cond(t, z)`."""
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(ts.dtype)
    f_tau = lambda tau, z: direction * f(direction * tau, z)
    taus = direction * ts
    if event is not None:
        cond = event.cond
        event = events.Event(lambda tau, z: cond(direction * tau, z), event.direction)
    init, step, unfinished, finish = pieces(f_tau, z0, taus, static, traced, event)
    if static.checkpointed:
        # A single trajectory (vmapped or not: equinox's loop masks batched lanes) is
        # active whenever the body runs.
        body = lambda c: step(c)[0]
        # The history and the outputs are written once per row: as buffers they are
        # neither checkpointed nor carried as cotangents step by step.
        final = eqxi.while_loop(lambda c: jnp.any(unfinished(c)), body, init(),
                                max_steps=static.max_steps,
                                buffers=lambda c: (c.history, c.zs), kind="checkpointed")
    else:
        # The loop runs while any lane (of a vmapped solve) is unfinished; the step masks
        # the finished ones itself: a batched loop condition would make XLA select every
        # carry leaf, the output and history buffers included, at every step.
        body = lambda c: step(c, unfinished(c))[0]
        run = lambda c0: lax.while_loop(lambda c: eqxi.unvmap_any(unfinished(c)), body, c0)
        # The loop is a call of its own, which a small solve runs as one function on
        # XLA:CPU. The barrier keeps XLA from folding its initial values into constant
        # operands of the call (under grad of grad, the emitter aborted on a call whose
        # operands were constants). The tag goes on the states that `finish` reads: one
        # on an unused value is dropped.
        final = jax.jit(run)(lax.optimization_barrier(init()))
        if final.zs is None:
            final = final._replace(z=xla_cpu.one_kernel(final.z))
        else:
            final = final._replace(zs=xla_cpu.one_kernel(final.zs))
    result = finish(final)
    if event is None:
        return result
    return result._replace(event_time=direction * result.event_time)


class Loop:
    """The pieces of the loop over dz/dτ = f(τ, z), τ increasing: `init`, `step`,
    `unfinished` and `finish`, for the loops that drive them (`solve`, and the adjoint's
    lane-batched backward pass).

    z0 is one state (n,) or a batch of lanes (lanes, n), each lane with its own t, dt
    and status of shape (lanes, 1).
    """

    def __init__(self, f, z0, taus, static: Static, traced: Traced, event=None):
        self.f, self.z0, self.taus, self.static, self.traced = f, z0, taus, static, traced
        self.solver, self.controller, self.event = static.solver, static.controller, event
        self.lanes = z0.shape[:-1] + (1,) if z0.ndim > 1 else ()
        # The output times and SAVE_CHUNK +inf after them (see `_save`), padded here, out
        # of the loop: inside, the concatenation would be redone at every step. The barrier
        # keeps XLA from folding them into a constant, which a one-function loop (see
        # `solve`) cannot be handed when it is large.
        self.padded_taus = lax.optimization_barrier(
            jnp.concatenate([taus, jnp.full((SAVE_CHUNK,), jnp.inf, taus.dtype)]))

    def init(self) -> _Carry:
        f, z0, taus, static, solver = self.f, self.z0, self.taus, self.static, self.solver
        t0, t_end, lanes = taus[0], taus[-1], self.lanes
        ordered = jnp.all(taus[1:] > taus[:-1]) & jnp.all(jnp.isfinite(taus))
        status = jnp.where(ordered, SUCCESS, TS_NOT_MONOTONIC)
        f0 = f(t0, z0)
        solver_state = solver.init(f, t0, z0, f0)
        if static.automatic_dt0:
            dt = initial_step(f, t0, z0, f0, solver.order, self.traced.rtol, self.traced.atol,
                              static.error_size)
            dt = lax.stop_gradient(dt.astype(taus.dtype))
        else:
            dt = self.traced.dt0.astype(taus.dtype)
        # A non-finite start would otherwise spin through max_steps rejected steps.
        status = jnp.where(_all_finite(z0) & jnp.isfinite(dt), status, NONFINITE_STATE)
        zs = None
        if taus.shape[0] > 2:
            # Spare rows after the outputs take the writes that land past them.
            rows = taus.shape[0] + SAVE_CHUNK
            zs = jnp.full((*z0.shape[:-1], rows, z0.shape[-1]), jnp.nan, z0.dtype)
            zs = zs.at[..., 0, :].set(z0)
        probe = jax.eval_shape(lambda: solver.step(f, t0, z0, dt, solver_state))
        zero = jnp.zeros(lanes, jnp.int32)
        controller_state = jax.tree_util.tree_map(
            lambda x: jnp.broadcast_to(x, lanes).astype(taus.dtype), self.controller.init())
        event_value = happened = None
        if self.event is not None:
            event_value = self._event_value(jnp.broadcast_to(t0, lanes), z0)
            happened = jnp.zeros(lanes, bool)
        return _Carry(jnp.broadcast_to(t0, lanes), jnp.broadcast_to(t_end, lanes), z0,
                      solver_state, jnp.broadcast_to(dt, lanes), controller_state,
                      jnp.ones(lanes, jnp.int32), zs, zero, zero,
                      jnp.broadcast_to(status, lanes).astype(jnp.int32),
                      self._empty_history(probe.dense), {key: zero for key in probe.stats},
                      event_value, happened)

    def _empty_history(self, dense):
        if not self.static.dense:
            return None
        rows, dtype = self.static.max_steps, self.taus.dtype
        return History(
            t_start=jnp.full((rows,), jnp.inf, dtype), dt=jnp.ones((rows,), dtype),
            z_start=jnp.zeros((rows, self.z0.shape[-1]), self.z0.dtype),
            dense=jax.tree_util.tree_map(lambda x: jnp.zeros((rows, *x.shape), x.dtype), dense))

    def step(self, c: _Carry, active=True):
        """One step attempt, and its (dt, accept). `active` is False for a lane that has
        finished while others go on: nothing of it changes."""
        static, solver = self.static, self.solver
        # A last step within rounding of dt is stretched rather than followed by a sliver.
        last = c.t_end - c.t <= c.dt * (1 + 100 * jnp.finfo(self.taus.dtype).eps)
        dt = jnp.where(last, c.t_end - c.t, c.dt)
        t_new = jnp.where(last, c.t_end, c.t + dt)
        attempt_at = lambda t, z, dt, state: solver.step(self.f, t, z, dt, state)
        if static.checkpointed:  # reverse mode: no NaN from a rejected, overflowed attempt
            attempt_at = cut_if_not_finite(attempt_at)
        attempt = attempt_at(c.t, c.z, dt, c.solver_state)
        part = (..., slice(static.error_size))
        # Step-size decisions are held constant under differentiation.
        error, z_start, z_end = lax.stop_gradient((attempt.error, c.z[part], attempt.z[part]))
        accept, dt_next, controller_state = self.controller.adapt(
            dt, None if error is None else error[part], z_start, z_end, self.traced.rtol,
            self.traced.atol, solver.current_error_order(c.solver_state), c.controller_state)
        accept = accept & active
        # After a final step shortened to land on t_end, hand on the unshortened proposal.
        dt_next = jnp.where(last & accept, jnp.maximum(dt_next, c.dt), dt_next)
        dt_next = jnp.where(active, dt_next, c.dt)
        if controller_state is not None:
            controller_state = jnp.where(active, controller_state, c.controller_state)
        t_end, event_value, happened = c.t_end, c.event_value, c.event_happened
        if self.event is not None:
            # A crossing ends the step, and the solve, at the located time.
            t_new, attempt, value, hit = self._stop_at_event(c, dt, t_new, attempt, accept)
            event_value = jnp.where(accept, value, event_value)
            t_end, happened = jnp.where(hit, t_new, t_end), happened | hit
        zs, next_output, history = self._record(c, dt, t_new, attempt, accept, active)
        t = jnp.where(accept, t_new, c.t)
        if static.progress:
            # Against the step's t_end: a solve that stops at an event ends its bar at 100%.
            _report_progress(self.taus[0], t_end, c.t, t, c.num_steps + 1)
        num_steps = c.num_steps + jnp.asarray(active, jnp.int32)
        keep = lambda new, old: jnp.where(accept, new, old)
        return _Carry(
            t, t_end, keep(attempt.z, c.z),
            jax.tree_util.tree_map(keep, attempt.state, c.solver_state),
            dt_next, controller_state, next_output, zs, num_steps,
            c.num_accepted + accept.astype(jnp.int32),
            self._status(c, t, happened, dt_next, num_steps, attempt.z, active), history,
            {k: c.counts[k] + jnp.where(active, attempt.stats[k], 0) for k in c.counts},
            event_value, happened,
        ), (dt, accept)

    def _event_value(self, t, z):
        """cond at (t, z), held constant under differentiation (as the caller holds cond's
        parameters). Events are looked for in single trajectories (vmapped or not)."""
        t, z = lax.stop_gradient((t, z))
        return self.event.cond(t, z).astype(self.taus.dtype)

    def _stop_at_event(self, c, dt, t_new, attempt, accept):
        """(t_new, attempt, cond's value at t_new, crossed): the step's end moved back to
        the event where cond crossed zero inside it (after which the solve is over).
        Locating it only uses values held constant under differentiation; z there is the
        dense output at that fixed θ."""
        after = self._event_value(t_new, attempt.z)
        hit = accept & events.crosses(c.event_value, after, self.event.direction)

        def root(t, z, dt, dense, before, after, t_new):
            def value_at(theta):
                z_theta = self.solver.interpolate(z, dt, dense, theta)
                return self._event_value(t + theta * dt, z_theta)

            scale = self.traced.atol + self.traced.rtol * jnp.abs(t_new)
            eps = jnp.finfo(self.taus.dtype).eps
            tolerance = jnp.maximum(0.01 * scale / jnp.where(dt == 0, 1, jnp.abs(dt)), 8 * eps)
            return events.locate(value_at, before, after, tolerance)

        def find():
            # Lanes (of a vmapped solve) without a crossing start (and end) at a root: θ = 1.
            args = lax.stop_gradient((c.t, c.z, dt, attempt.dense, c.event_value,
                                      jnp.where(hit, after, 0), t_new))
            theta = jnp.where(hit, root(*args), 1)
            z_hit = self.solver.interpolate(c.z, dt, attempt.dense, theta)
            return theta, jnp.where(theta == 1, attempt.z, z_hit)

        # Only a step in which some lane crossed looks for the root and interpolates.
        theta, z_hit = lax.cond(eqxi.unvmap_any(jnp.any(hit)), find,
                                lambda: (jnp.ones_like(after), attempt.z))
        t_hit = jnp.where(theta == 1, t_new, c.t + theta * dt)
        keep = lambda new, old: jnp.where(hit, new, old)
        return keep(t_hit, t_new), attempt._replace(z=keep(z_hit, attempt.z)), after, hit

    def _record(self, c, dt, t_new, attempt, accept, active):
        """The outputs the step passed, and its row of the dense history."""
        zs, next_output, history = c.zs, c.next_output, c.history
        if zs is not None:
            save, taus = ((_save_masked, self.taus) if self.static.checkpointed
                          else (_save, self.padded_taus))
            zs, next_output = save(self.solver, taus, zs, next_output, c.t, c.z, dt, t_new,
                                   attempt.z, attempt.dense, accept)
        if history is not None:
            # One row per attempt, each written once. A rejected attempt shares its t_start
            # with the accepted one that follows, which comes later in the rows and so is
            # the one `evaluate` finds.
            row = lambda buffer, x: buffer.at[c.num_steps].set(x)
            # Under adjoint="direct" each leaf is a buffer of the checkpointed loop.
            history = jax.tree_util.tree_map(row, history, History(
                jnp.where(active, c.t, jnp.inf), dt, c.z, attempt.dense),
                is_leaf=lambda x: hasattr(x, "at"))
        return zs, next_output, history

    def _status(self, c, t, happened, dt_next, num_steps, z_new, active):
        unfinished = self._going(t, c.t_end, happened) & active
        stuck = unfinished & (t + dt_next <= t)
        failure = jnp.where(_all_finite(z_new), STEP_SIZE_UNDERFLOW, NONFINITE_STATE)
        status = jnp.where(stuck & (c.status == SUCCESS), failure, c.status)
        status = jnp.where((status == SUCCESS) & unfinished & (num_steps >= self.static.max_steps),
                           MAX_STEPS_REACHED, status)
        return status.astype(jnp.int32)

    def unfinished(self, c: _Carry):
        return self._going(c.t, c.t_end, c.event_happened) & (c.status == SUCCESS)

    @staticmethod
    def _going(t, t_end, happened):
        # After an event, t and t_end are one value computed twice, and XLA may compute
        # the copies differently (by an ulp, seen with --xla_backend_optimization_level=0):
        # the flag, not t < t_end, ends the solve.
        return (t < t_end) if happened is None else (t < t_end) & ~happened

    def finish(self, c: _Carry) -> Result:
        if c.zs is None:
            reached = ~self._going(c.t, c.t_end, c.event_happened)
            zs = jnp.stack([self.z0, jnp.where(reached, c.z, jnp.nan)], axis=-2)
        else:
            zs = c.zs[..., :self.taus.shape[0], :]
            if c.event_happened is not None:  # outputs after the event hold its state
                after = c.event_happened[..., None] & (self.taus > c.t)[..., None]
                zs = jnp.where(after, c.z[..., None, :], zs)
        initial_nfe = 1 + self.solver.init_nfe + (1 if self.static.automatic_dt0 else 0)
        stats = {"nfe": self.solver.step_nfe * c.num_steps, "num_jacobians": 0,
                 "num_linear_solves": 0, **c.counts}
        stats["nfe"] = initial_nfe + stats["nfe"]
        stats.update(num_steps=c.num_steps, num_accepted=c.num_accepted,
                     num_rejected=c.num_steps - c.num_accepted)
        zero = jnp.zeros_like(c.num_steps)
        stats = {k: jnp.asarray(v, jnp.int32) + zero for k, v in stats.items()}
        event_time = happened = None
        if c.event_happened is not None:
            event_time, happened = c.t, c.event_happened
        return Result(zs, stats, c.status, c.history, c.dt, event_time, happened)


def raise_if_failed(tree, status):
    """tree, raising the message of the (worst) failure in `status` when it is used."""
    return eqx.branched_error_if(tree, jnp.any(status != SUCCESS), jnp.max(status),
                                 STATUS_MESSAGES)


def pieces(f, z0, taus, static: Static, traced: Traced, event=None):
    """(init, step, unfinished, finish) of a `Loop`."""
    loop = Loop(f, z0, taus, static, traced, event)
    return loop.init, loop.step, loop.unfinished, loop.finish


def _all_finite(z):
    return jnp.all(jnp.isfinite(z), axis=-1, keepdims=z.ndim > 1)


def _report_progress(t0, t_end, t_before, t_after, num_steps):
    """Each time the solve (under vmap: its slowest lane) passes another whole percent of
    the span, one host callback redraws the bar: at most 101 updates a solve."""
    # The end is 100% exactly, whatever the rounding of the division.
    percent = lambda t: jnp.where(t >= t_end, 100, jnp.floor(100 * (t - t0) / (t_end - t0)))
    slowest = lambda x: -eqxi.unvmap_max(-jnp.min(x))
    before, after = slowest(percent(t_before)), slowest(percent(t_after))
    steps = eqxi.unvmap_max(jnp.max(num_steps))
    lax.cond(after > before, lambda: jax.debug.callback(_draw_progress, after, steps),
             lambda: None)


def _draw_progress(percent, steps):
    percent = int(percent)
    bar = "#" * (percent // 4) + "-" * (25 - percent // 4)
    end = "\n" if percent >= 100 else ""
    sys.stderr.write(f"\rjaxode [{bar}] {percent:3d}%  {int(steps)} steps{end}")
    sys.stderr.flush()


def _save(solver, padded, zs, next_output, t, z, dt, t_new, z1, dense, accept):
    """Fill every output time in (t, t_new] by dense output; steps never shrink for them.
    Each pass fills the next SAVE_CHUNK output rows in one block: a slice write, which
    XLA:CPU's one-function loops compile (a scatter they do not). `padded`: the output
    times and SAVE_CHUNK +inf after them, so that a block past the last output writes
    nothing."""

    def pending(state):
        index, _ = state
        return accept & (lax.dynamic_index_in_dim(padded, index, keepdims=False) <= t_new)

    def fill(state):
        index, zs = state
        tau = lax.dynamic_slice_in_dim(padded, index, SAVE_CHUNK)
        write = accept & (tau <= t_new)
        # Rows from `index` on are unwritten (NaN): those the step did not reach stay so.
        block = jnp.where(write[:, None], _interpolate(solver, tau, t, z, dt, t_new, z1, dense),
                          jnp.nan)
        zs = lax.dynamic_update_slice_in_dim(zs, block.astype(zs.dtype), index, axis=-2)
        return index + jnp.sum(write, dtype=index.dtype), zs

    next_output, zs = lax.while_loop(lambda s: eqxi.unvmap_any(pending(s)), fill, (next_output, zs))
    return zs, next_output


def _save_masked(solver, taus, zs, next_output, t, z, dt, t_new, z1, dense, accept):
    """As `_save`, with no loop to differentiate, so that zs can be a buffer of the
    checkpointed loop: the next SAVE_WINDOW outputs in one scatter, or, when the step
    passed more of them (in some lane), every output row (outputs already written are
    aimed at the spare row, so each row is written once)."""
    num_outputs = taus.shape[0]
    every = jnp.arange(num_outputs, dtype=next_output.dtype)
    unwritten = jnp.where(every >= next_output, every, num_outputs)  # the rest: spare row
    write = lambda rows: _write(solver, taus, zs, next_output, rows, t, z, dt, t_new, z1,
                                dense, accept)
    if num_outputs <= SAVE_WINDOW:
        return write(unwritten)
    beyond = next_output + SAVE_WINDOW  # the first output outside the window
    fits = (beyond >= num_outputs) | (taus[jnp.minimum(beyond, num_outputs - 1)] > t_new)
    # Interpolating (and differentiating) every output at every step cost 15% of a
    # direct gradient with 50 outputs; a window of 4 sent most steps of a 512-lane
    # batch to the every-output path.
    return lax.cond(eqxi.unvmap_all(fits), lambda: write(next_output + every[:SAVE_WINDOW]),
                    lambda: write(unwritten))


def _write(solver, taus, zs, index, rows, t, z, dt, t_new, z1, dense, accept):
    """(zs, index): the outputs among `rows` (none before `index`) that the step passed,
    written from its dense output in one scatter (the others aimed at the spare row
    len(ts)), and the next output to write."""
    num_outputs = taus.shape[0]
    tau = taus[jnp.minimum(rows, num_outputs - 1)]
    write = accept & (rows < num_outputs) & (tau <= t_new)
    values = _interpolate(solver, tau, t, z, dt, t_new, z1, dense)
    zs = zs.at[jnp.where(write, rows, num_outputs)].set(values)
    return zs, index + jnp.sum(write, dtype=index.dtype)


def _interpolate(solver, tau, t, z, dt, t_new, z1, dense):
    """The step's dense output at the times tau (z1 exactly at its end)."""
    # A finished lane of a vmapped solve still runs the step, with dt = 0: a NaN from 0/0
    # here would leak through the mask into the gradient.
    safe_dt = jnp.where(dt == 0, 1, dt)
    values = jax.vmap(lambda tau: solver.interpolate(z, dt, dense, (tau - t) / safe_dt))(tau)
    return jnp.where((tau == t_new)[:, None], z1, values)


def evaluate(solver: AbstractSolver, history: History, num_steps, tau, tau_end=None):
    """The flat state at τ from the stored steps; NaN outside [τ_0, τ_end] (without
    tau_end: the nearest step's interpolant, extrapolated)."""
    index = jnp.searchsorted(history.t_start, tau, side="right") - 1
    index = jnp.clip(index, 0, jnp.maximum(num_steps - 1, 0))
    dt = history.dt[index]
    row = jax.tree_util.tree_map(lambda x: x[index], history.dense)
    z = solver.interpolate(history.z_start[index], dt, row, (tau - history.t_start[index]) / dt)
    if tau_end is None:
        return z
    inside = (tau >= history.t_start[0]) & (tau <= tau_end)
    return jnp.where(inside, z, jnp.nan)
