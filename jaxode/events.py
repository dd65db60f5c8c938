"""Terminal events: where a solve stops because its state says so.

Three parts, one job each:

- `Event(cond, direction)`: what to look for, the public object;
- `locate`: after each accepted step, whether `cond` changed sign across it (its value
  at the step's two ends) and, if so, where: the Illinois method (regula falsi that
  halves the value kept at a bracket end chosen twice in a row) on the step's dense
  output, to a bracket of 1% of `atol + rtol * |t|`;
- `differentiable`: the event time and state with gradients by the implicit function
  theorem. The solve itself (under any adjoint) gives z at the located time t* held
  fixed; t* then gets dt*/dθ = -(∂c/∂θ + ∂c/∂z ∂z/∂θ) / (∂c/∂z f + ∂c/∂t) and the
  event state z(t*) gets ∂z/∂θ + f dt*/dθ.

Only the signs at the two ends of a step are compared: a pair of crossings inside one
step (the same sign at both ends) is not seen, nor is a tangent touch of zero.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from .guards import first_order_only

MAX_ROOT_ITERATIONS = 60  # Illinois converges superlinearly: a handful are the rule


class Event(eqx.Module):
    """A terminal event: the solve stops at the first t after ts[0] at which
    `cond(z(t), t, params)` crosses zero.

    cond: `cond(z, t, params) -> scalar`, a real floating-point scalar: a function or a
        callable Equinox module (a learned event function); `params`, the arrays it
        closes over and a module's own arrays are all differentiated.
    direction: +1 counts only crossings from negative to positive, -1 only from positive
        to negative, 0 both; "from" and "to" as the solve meets them (for decreasing ts,
        in the order of decreasing t). A start exactly on zero is not a crossing.

    The crossing is looked for by comparing the signs of `cond` at the two ends of each
    accepted step: a pair of crossings inside one step, or a tangent touch of zero, is
    not seen (a smaller `rtol`/`atol` takes smaller steps). Event time and state are
    differentiated once (`jax.grad`, `jax.jvp`, every adjoint); a second derivative
    through an event raises a TypeError.

    Example:
        >>> import jax.numpy as jnp, jaxode
        >>> fall = lambda z, t, g: jnp.array([z[1], -g])   # height, velocity
        >>> floor = jaxode.Event(lambda z, t, g: z[0], direction=-1)
        >>> sol = jaxode.solve(fall, jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]), 9.81,
        ...                    event=floor)
        >>> bool(jnp.allclose(sol.event_time, jnp.sqrt(2 / 9.81)))
        True
    """

    cond: Callable
    direction: int = eqx.field(static=True, default=0)

    def __check_init__(self):
        if not callable(self.cond):
            raise TypeError(f"cond: expected a callable cond(z, t, params), got {self.cond!r}")
        if isinstance(self.direction, bool) or self.direction not in (-1, 0, 1):
            raise ValueError(f"direction: expected -1, 0 or +1, got {self.direction!r}")


class CondError(TypeError, ValueError):
    """A `cond` whose value is not a real floating-point scalar (both a TypeError and a
    ValueError: a wrong dtype and a wrong shape are the same mistake)."""


def check_cond(event: Event, z0, t0, params):
    """While tracing: `cond(z0, t0, params)` must be a real floating-point scalar."""
    out = eqx.filter_eval_shape(event.cond, z0, t0, params)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise CondError(f"cond: must return a scalar, got {shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise CondError(f"cond: must return a real floating-point scalar, got dtype {out.dtype}")


def crosses(before, after, direction: int):
    """Whether a value going from `before` to `after` counts as a crossing."""
    up = (before < 0) & (after >= 0)
    down = (before > 0) & (after <= 0)
    return {1: up, -1: down, 0: up | down}[direction]


def locate(value_at, before, after, tolerance):
    """θ in (0, 1] at which value_at(θ) (with value_at(0) = before, value_at(1) = after,
    of opposite signs or after == 0) is zero, to a bracket of `tolerance`; the bracket's
    end before the crossing, so that the located state has not yet crossed."""

    def body(state):
        lo, hi, v_lo, v_hi, side, _, k = state
        # Regula falsi, kept inside the bracket (and bisection if the values coincide).
        gap = v_hi - v_lo
        theta = jnp.where(gap != 0, (lo * v_hi - hi * v_lo) / jnp.where(gap != 0, gap, 1),
                          (lo + hi) / 2)
        theta = jnp.clip(theta, lo, hi)
        v = value_at(theta)
        high = jnp.sign(v) == jnp.sign(v_hi)
        # Illinois: a bracket end kept twice in a row has its value halved.
        v_lo = jnp.where(high, jnp.where(side > 0, v_lo / 2, v_lo), v)
        v_hi = jnp.where(high, v, jnp.where(side < 0, v_hi / 2, v_hi))
        lo, hi = jnp.where(high, lo, theta), jnp.where(high, theta, hi)
        lo = jnp.where(v == 0, theta, lo)
        return lo, hi, v_lo, v_hi, jnp.where(high, 1, -1).astype(side.dtype), v == 0, k + 1

    def unfinished(state):
        lo, hi, *_, exact, k = state
        return (hi - lo > tolerance) & ~exact & (k < MAX_ROOT_ITERATIONS)

    one, zero = jnp.ones_like(before), jnp.zeros_like(before)
    state = (zero, one, before, after, jnp.zeros((), jnp.int32), after == 0, 0)
    lo = lax.while_loop(unfinished, body, state)[0]
    return jnp.where(after == 0, one, lo)


def differentiable(cond, field, ts, zs, t_out, happened):
    """(zs, event time, event state) of one trajectory with the gradients of the implicit
    function theorem.

    cond(z, t) and field(z, t) act on the flat state (closing over the differentiable
    parameters); zs (len(ts), n) holds z at the located time t_out in every row at or
    after it, as a function of z0, θ and ts[0] with t_out held fixed (for an adjoint
    that differentiates t_out itself, Direct and Forward, the motion of t_out is taken
    out again).
    """
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(ts.dtype)
    after = direction * ts >= direction * t_out
    t_fixed = lax.stop_gradient(t_out)
    z_row = zs[jnp.argmax(after)]
    # The differences below are zero in value: only their first derivatives count.
    slope_z = field(z_row, t_fixed)
    z_fixed = z_row - slope_z * (t_out - t_fixed)
    # dc/dt along the trajectory at the event: ∂c/∂z f + ∂c/∂t.
    _, slope_c = jax.jvp(cond, (z_fixed, t_fixed), (slope_z, jnp.ones_like(t_fixed)))
    # Without an event the slope is unused, but a zero there would still turn its zero
    # cotangent into NaN.
    slope_c = jnp.where(happened, slope_c, 1)
    t_event = _implicit_time(t_fixed, cond(z_fixed, t_fixed), slope_c)
    z_event = z_fixed + slope_z * (t_event - t_fixed)
    zs = jnp.where(happened & after[:, None], z_event, zs)
    return zs, jnp.where(happened, t_event, ts[-1]), jnp.where(happened, z_event, zs[-1])


@jax.custom_jvp
def _implicit_time(t, value, slope):
    """t, whose tangent is -(the tangent of cond's value) / (dc/dt along the solution).
    First order only: the slope's own derivative is left out, so a second derivative
    (through the slope) is refused rather than wrong."""
    return t


@_implicit_time.defjvp
def _implicit_time_jvp(primals, tangents):
    t, _, slope = primals
    return t, (-tangents[1] / first_order_only(_ONCE, slope)).astype(t.dtype)


_ONCE = ("event: event times and states are differentiated once (jax.grad, jax.jvp); "
         "gradients of gradients and forward-over-forward through an event are not supported")
