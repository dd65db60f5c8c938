"""The solve: one `lax.while_loop` over Runge-Kutta steps on a flat state vector.

The state pytree is raveled into one vector so that the error norm, the stage
combinations and the output buffer are plain array operations. Integration
backwards in time runs forwards in τ = -t on the negated vector field, so the loop
only ever moves to larger times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jax import lax

from .control import PIController, initial_step, scaled_error
from .solvers import Tableau

# Run-time outcomes, `Solution.status`.
SUCCESS = 0
MAX_STEPS_REACHED = 1
STEP_SIZE_UNDERFLOW = 2
NONFINITE_STATE = 3
TS_NOT_MONOTONIC = 4

STATUS_MESSAGES = (
    "success",
    "jaxode: max_steps reached before the end of the integration; raise max_steps, "
    "loosen rtol/atol, or check the vector field for stiffness",
    "jaxode: step size underflow (t + dt == t): the step size became too small for the "
    "floating-point precision of t, the usual float32 failure on stiff or very "
    "tight-tolerance problems; use float64 or loosen rtol/atol",
    "jaxode: non-finite state: the vector field produced NaN or inf",
    "jaxode: ts must be strictly increasing or strictly decreasing",
)


def lincomb(coeffs, vectors):
    """Σ c_i v_i for static coefficients, skipping zeros (unrolled while tracing)."""
    terms = [float(c) * v for c, v in zip(coeffs, vectors) if c != 0]
    if not terms:
        return jnp.zeros_like(vectors[0])
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def interpolate(tableau: Tableau, z, dt, stages, theta):
    """Dense output at fraction θ of a step: z + dt Σ_i p_i(θ) K_i."""
    dense = jnp.asarray(tableau.dense, dtype=z.dtype)
    powers = theta ** jnp.arange(1, dense.shape[1] + 1, dtype=z.dtype)
    weights = dense @ powers
    total = jnp.zeros_like(z)
    for i, k in enumerate(stages):
        if tableau.dense[i].any():
            total = total + weights[i] * k
    return z + dt * total


def rk_step(tableau: Tableau, f, t, z, k1, dt):
    """One explicit RK step: the new state z_1, the stages k_1..k_s, and the points
    (z_i) at which they were evaluated."""
    stages, points = [k1], [z]
    for i in range(1, tableau.num_stages):
        z_i = z + dt * lincomb(tableau.a[i, :i], stages)
        stages.append(f(t + float(tableau.c[i]) * dt, z_i))
        points.append(z_i)
    return z + dt * lincomb(tableau.b, stages), stages, points


# Outputs filled per pass of the save loop (see make_stepper's save_outputs).
SAVE_CHUNK = 4


class DenseHistory(NamedTuple):
    """Every accepted step, for `Solution.evaluate`: unused rows have t_start = +inf."""

    t_start: jax.Array  # (max_steps,)
    dt: jax.Array  # (max_steps,)
    z_start: jax.Array  # (max_steps, n)
    stages: jax.Array  # (max_steps, s + 1, n)


class FlatSolution(NamedTuple):
    zs: jax.Array  # (len(ts), n); rows never reached are NaN
    nfe: jax.Array
    num_steps: jax.Array
    num_accepted: jax.Array
    num_rejected: jax.Array
    status: jax.Array
    history: DenseHistory | None
    dt_next: jax.Array  # the controller's proposal after the last step


class _Carry(NamedTuple):
    t: jax.Array
    z: jax.Array
    f0: jax.Array  # f(t, z): the next step's first stage
    dt: jax.Array
    previous_error: jax.Array
    next_output: jax.Array
    zs: jax.Array
    num_steps: jax.Array
    num_accepted: jax.Array
    status: jax.Array
    history: DenseHistory | None


class StepRecord(NamedTuple):
    """What one step attempt evaluated: for quadratures alongside the solve."""

    t: jax.Array
    dt: jax.Array
    points: list  # z_i, i = 1..s
    accept: jax.Array


class Stepper(NamedTuple):
    init: Callable  # (z0, dt0) -> carry
    step: Callable  # carry -> (carry, StepRecord)
    unfinished: Callable  # carry -> bool
    finish: Callable  # carry -> FlatSolution


def solve_flat(f: Callable, z0, taus, *, differentiable: bool = False, **options) -> FlatSolution:
    """Solve dz/dτ = f(τ, z) on a flat vector z from taus[0] to taus[-1] (increasing).

    `f(τ, z)` takes and returns 1-D arrays of z's dtype. Outputs at every τ in `taus`.
    `options`: those of `make_stepper`.
    `differentiable`: make the loop reverse-differentiable (adjoint="direct"): a
    checkpointed while loop bounded by max_steps (equinox's online recursive
    checkpointing: memory grows sub-linearly with the steps taken, and a short solve
    costs only its own steps), outputs saved by a masked update instead of an inner
    loop, and the step-size decisions held constant, so the result is the exact
    gradient of the discrete solve with its steps fixed.
    """
    dt0 = options.pop("dt0")
    stepper = make_stepper(
        f, z0, taus, differentiable=differentiable, automatic_first_step=dt0 is None, **options
    )
    step = lambda c: stepper.step(c)[0]
    if differentiable:
        final = eqxi.while_loop(
            stepper.unfinished,
            step,
            stepper.init(z0, dt0),
            max_steps=options["max_steps"],
            buffers=lambda c: c.history,
            kind="checkpointed",
        )
    else:
        # The loop runs while any lane (of a vmapped solve) is unfinished, masking the
        # finished lanes itself: a batched loop condition would make XLA select every
        # carry leaf, the output and history buffers included, at every step.
        def masked_step(c):
            active = stepper.unfinished(c)
            new = stepper.step(c, active)[0]
            kept = jax.tree_util.tree_map(
                lambda a, b: jnp.where(active, a, b),
                new._replace(zs=None, history=None),
                c._replace(zs=None, history=None),
            )
            return kept._replace(zs=new.zs, history=new.history)

        final = lax.while_loop(
            lambda c: eqxi.unvmap_any(stepper.unfinished(c)), masked_step, stepper.init(z0, dt0)
        )
    return stepper.finish(final)


def make_stepper(
    f: Callable,
    z0,
    taus,
    *,
    tableau: Tableau,
    rtol,
    atol,
    max_steps: int,
    controller: PIController,
    dense: bool,
    error_components: int | None = None,
    differentiable: bool = False,
    automatic_first_step: bool = False,
) -> Stepper:
    """The pieces of the solve of dz/dτ = f(τ, z) (see `solve_flat`), for loops that
    drive them: `solve_flat`, and the lane-batched backward pass of the adjoint.

    `z0` gives the state's shape and dtype; `init(z0, dt0)` starts a solve from it with
    first step dt0, or with one chosen by Hairer's algorithm if `automatic_first_step`.
    `error_components`: only z[:error_components] enters the error norm (a seminorm).
    """
    dtype = z0.dtype
    n = z0.shape[0]
    num_outputs = taus.shape[0]
    t0, t_end = taus[0], taus[-1]
    num_rows = tableau.num_stages + 1

    int_ = jnp.int32

    def init(z0, dt0) -> _Carry:
        status = jnp.where(jnp.all(taus[1:] > taus[:-1]), SUCCESS, TS_NOT_MONOTONIC)
        f0 = f(t0, z0)
        if automatic_first_step:
            dt = initial_step(f, t0, z0, f0, tableau.order, rtol, atol, error_components)
            dt = lax.stop_gradient(dt)
        else:
            dt = jnp.asarray(dt0, dtype)
        # A non-finite start would otherwise spin through max_steps rejected steps.
        finite = jnp.all(jnp.isfinite(z0)) & jnp.all(jnp.isfinite(f0)) & jnp.isfinite(dt)
        status = jnp.where(finite, status, NONFINITE_STATE)

        zs = jnp.full((num_outputs, n), jnp.nan, dtype).at[0].set(z0)
        history = None
        if dense:
            history = DenseHistory(
                t_start=jnp.full((max_steps,), jnp.inf, dtype),
                dt=jnp.ones((max_steps,), dtype),
                z_start=jnp.zeros((max_steps, n), dtype),
                stages=jnp.zeros((max_steps, num_rows, n), dtype),
            )
        return _Carry(
            t=t0,
            z=z0,
            f0=f0,
            dt=dt,
            previous_error=jnp.ones((), dtype),
            next_output=jnp.ones((), int_),
            zs=zs,
            num_steps=jnp.zeros((), int_),
            num_accepted=jnp.zeros((), int_),
            status=jnp.asarray(status, int_),
            history=history,
        )

    def save_outputs(zs, next_output, t, z, dt, t_new, z_new, stages, accept):
        """Fill every output time in (t, t_new] by dense output; steps never shrink for them."""

        def pending(state):
            index, _ = state
            next_tau = taus[jnp.minimum(index, num_outputs - 1)]
            return accept & (index < num_outputs) & (next_tau <= t_new)

        def fill(state):
            """The next SAVE_CHUNK outputs at once: one scatter, in which outputs beyond the
            step (and, under vmap, those of lanes with nothing to write) are aimed past the
            end of the buffer and dropped, so it is never read or selected as a whole."""
            index, zs = state
            indices = index + jnp.arange(SAVE_CHUNK, dtype=index.dtype)
            tau = taus[jnp.minimum(indices, num_outputs - 1)]
            write = accept & (indices < num_outputs) & (tau <= t_new)
            values = jax.vmap(lambda tau: interpolate(tableau, z, dt, stages, (tau - t) / dt))(tau)
            values = jnp.where((tau == t_new)[:, None], z_new, values)
            zs = zs.at[jnp.where(write, indices, num_outputs)].set(values, mode="drop")
            return index + jnp.sum(write, dtype=index.dtype), zs

        # Most steps pass at most SAVE_CHUNK outputs: one chunk without a loop, then a
        # loop (entered only while some lane still has outputs in this step).
        next_output, zs = lax.while_loop(
            lambda state: eqxi.unvmap_any(pending(state)), fill, (next_output, zs)
        )
        return zs, next_output

    def save_outputs_masked(zs, next_output, t, z, dt, t_new, z_new, stages, accept):
        """As save_outputs, by evaluating the dense output at every output time: no inner
        loop to differentiate, O(len(ts)) work per step."""
        inside = accept & (taus > t) & (taus <= t_new)
        # A finished lane of a vmapped solve still runs the step, with dt = 0: a NaN from
        # 0/0 here would leak through the mask into the gradient.
        safe_dt = jnp.where(dt == 0, 1, dt)
        values = jax.vmap(
            lambda tau: interpolate(tableau, z, dt, stages, (tau - t) / safe_dt)
        )(taus)
        values = jnp.where((taus == t_new)[:, None], z_new, values)
        zs = jnp.where(inside[:, None], values, zs)
        return zs, next_output + jnp.sum(inside, dtype=next_output.dtype)

    def step(c: _Carry, active=True) -> _Carry:
        """One step attempt. `active` is False for a lane that has finished while others
        go on (a vmapped solve): its outputs and history stay untouched."""
        # A last step within rounding of dt is stretched rather than followed by a sliver.
        last = t_end - c.t <= c.dt * (1 + 100 * jnp.finfo(dtype).eps)
        dt = jnp.where(last, t_end - c.t, c.dt)
        t_new = jnp.where(last, t_end, c.t + dt)
        z_new, stages, points = rk_step(tableau, f, c.t, c.z, c.f0, dt)
        f_new = f(t_new, z_new)
        stages = [*stages, f_new]
        if tableau.adaptive:
            error = scaled_error(
                dt * lincomb(tableau.b_err, stages)[:error_components],
                c.z[:error_components],
                z_new[:error_components],
                rtol,
                atol,
            )
            error = lax.stop_gradient(error)
            accept, dt_next = controller.next_step(
                dt, error, c.previous_error, tableau.error_order
            )
            previous_error = jnp.where(accept, jnp.maximum(error, 1e-4), c.previous_error)
            # After a final step shortened to land on t_end, hand on the unshortened proposal.
            dt_next = jnp.where(last & accept, jnp.maximum(dt_next, c.dt), dt_next)
            nonfinite = ~jnp.isfinite(error)
        else:
            nonfinite = ~jnp.all(jnp.isfinite(z_new))
            accept = ~nonfinite
            dt_next = c.dt
            previous_error = c.previous_error

        save = save_outputs_masked if differentiable else save_outputs
        zs, next_output = save(
            c.zs, c.next_output, c.t, c.z, dt, t_new, z_new, stages, accept & active
        )
        history = c.history
        if dense:
            # One row per attempt, each written once. A rejected attempt shares its t_start
            # with the accepted one that follows, which comes later in the rows and so is
            # the one `evaluate_history` finds.
            slot = c.num_steps
            history = DenseHistory(
                t_start=history.t_start.at[slot].set(jnp.where(active, c.t, jnp.inf)),
                dt=history.dt.at[slot].set(dt),
                z_start=history.z_start.at[slot].set(c.z),
                stages=history.stages.at[slot].set(jnp.stack(stages)),
            )

        t = jnp.where(accept, t_new, c.t)
        num_steps = c.num_steps + 1
        unfinished = t < t_end
        status = c.status
        if tableau.adaptive:
            underflow = unfinished & (t + dt_next <= t)
            status = jnp.where(
                underflow, jnp.where(nonfinite, NONFINITE_STATE, STEP_SIZE_UNDERFLOW), status
            )
        else:
            status = jnp.where(nonfinite, NONFINITE_STATE, status)
        status = jnp.where(
            (status == SUCCESS) & unfinished & (num_steps >= max_steps), MAX_STEPS_REACHED, status
        )
        record = StepRecord(t=c.t, dt=dt, points=points, accept=accept)
        return _Carry(
            t=t,
            z=jnp.where(accept, z_new, c.z),
            f0=jnp.where(accept, f_new, c.f0),
            dt=dt_next,
            previous_error=previous_error,
            next_output=next_output,
            zs=zs,
            num_steps=num_steps,
            num_accepted=c.num_accepted + accept.astype(int_),
            status=status.astype(int_),
            history=history,
        ), record

    def unfinished(c: _Carry):
        return (c.t < t_end) & (c.status == SUCCESS)

    initial_calls = 2 if automatic_first_step else 1

    def finish(c: _Carry) -> FlatSolution:
        return FlatSolution(
            zs=c.zs,
            # f(z0), the initial-step probe when there was one, and s calls per attempt.
            nfe=initial_calls + tableau.num_stages * c.num_steps,
            num_steps=c.num_steps,
            num_accepted=c.num_accepted,
            num_rejected=c.num_steps - c.num_accepted,
            status=c.status,
            history=c.history,
            dt_next=c.dt,
        )

    return Stepper(init=init, step=step, unfinished=unfinished, finish=finish)


def evaluate_history(tableau: Tableau, history: DenseHistory, num_steps, tau):
    """The flat state at τ from the stored steps (τ inside the solved span)."""
    index = jnp.searchsorted(history.t_start, tau, side="right") - 1
    index = jnp.clip(index, 0, jnp.maximum(num_steps - 1, 0))
    dt = history.dt[index]
    theta = (tau - history.t_start[index]) / dt
    stages = list(history.stages[index])
    return interpolate(tableau, history.z_start[index], dt, stages, theta)
