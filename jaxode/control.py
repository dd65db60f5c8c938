"""Step-size control: Hairer's error norm, the controllers, and the first step.

A controller owns its state: `init()` gives it, and `adapt` turns one step attempt's
error estimate into (accept, next dt, new state). A controller that cannot make
progress proposes dt = 0, which the loop reports as a failed step.
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax.numpy as jnp


def rms_norm(x):
    """Root mean square of |x| over the last axis (per lane for a (lanes, n) array)."""
    return jnp.sqrt(jnp.mean(jnp.square(jnp.abs(x)), axis=-1, keepdims=x.ndim > 1))


def relative(x, scale):
    """x / scale, where 0 / 0 is 0: a component that is exactly zero, measured against a
    zero scale (atol = 0 at a zero state), is exact rather than NaN ("non-finite")."""
    return jnp.where(x == 0, 0, x / scale)


def error_ratio(error, z0, z1, rtol, atol):
    """Hairer's norm of error / (atol + rtol max(|z0|, |z1|)); a step passes when <= 1."""
    return rms_norm(relative(error, atol + rtol * jnp.maximum(jnp.abs(z0), jnp.abs(z1))))


class AbstractController(eqx.Module):
    """Decides from a step attempt whether to accept it and how large the next step is."""

    @abc.abstractmethod
    def init(self) -> Any: ...

    @abc.abstractmethod
    def adapt(self, dt, error, z0, z1, rtol, atol, error_order, state):
        """(accept, next dt, new state) after a step of size dt from z0 to z1."""


class ConstantStep(AbstractController):
    """The fixed-step methods' controller: every finite step is accepted, dt stays."""

    def init(self):
        return None

    def adapt(self, dt, error, z0, z1, rtol, atol, error_order, state):
        accept = jnp.all(jnp.isfinite(z1), axis=-1, keepdims=z1.ndim > 1)
        return accept, jnp.where(accept, dt, 0), state


class PIController(AbstractController):
    """Proportional-integral step-size controller (Söderlind; Hairer & Wanner IV.2).

    After a step with error ratio e_n (e_n <= 1 accepts it) the next step is
        dt * safety * e_n^(-(icoeff + pcoeff)/k) * e_{n-1}^(pcoeff/k),
    clipped to [factormin, factormax] times dt (and to at most dt after a rejection),
    where k = 1 + the order of the embedded error estimate. The defaults (pcoeff=0,
    icoeff=1) are the integral controller of diffrax and torchdiffeq; pcoeff=0.4,
    icoeff=0.3 is a good PI choice for non-smooth problems. `dtmax` bounds the step.
    """

    pcoeff: float = eqx.field(default=0.0, static=True)
    icoeff: float = eqx.field(default=1.0, static=True)
    safety: float = eqx.field(default=0.9, static=True)
    factormin: float = eqx.field(default=0.2, static=True)
    factormax: float = eqx.field(default=10.0, static=True)
    dtmax: float | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        for name in ("pcoeff", "icoeff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"controller.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("safety", "factormin", "factormax"):
            if not getattr(self, name) > 0:
                raise ValueError(f"controller.{name}: must be > 0, got {getattr(self, name)}")
        if not self.factormin <= 1.0 <= self.factormax:
            raise ValueError(
                "controller.factormin/factormax: expected factormin <= 1 <= factormax, got "
                f"{self.factormin}, {self.factormax}"
            )
        if self.dtmax is not None and not self.dtmax > 0:
            raise ValueError(f"controller.dtmax: must be > 0, got {self.dtmax}")

    def init(self):
        # The previous error ratio, carried only when the proportional term uses it.
        return jnp.ones(()) if self.pcoeff else None

    def adapt(self, dt, error, z0, z1, rtol, atol, error_order, state):
        ratio = error_ratio(error, z0, z1, rtol, atol)
        k = error_order + 1
        finite = jnp.isfinite(ratio)
        accept = (ratio <= 1.0) & finite
        # A zero error would give an infinite factor: factormax clips it.
        factor = self.safety * ratio ** (-(self.icoeff + self.pcoeff) / k)
        if self.pcoeff:
            factor = factor * state ** (self.pcoeff / k)
            # The 1e-4 floor keeps one near-exact step from blowing up the next factor.
            state = jnp.where(accept, jnp.maximum(ratio, 1e-4), state)
        factor = jnp.clip(factor, self.factormin, self.factormax)
        factor = jnp.where(accept, factor, jnp.minimum(factor, 1.0))
        # A non-finite error (overflow, NaN from f) rejects with the strongest cut.
        dt_next = dt * jnp.where(finite, factor, self.factormin)
        if self.dtmax is not None:
            dt_next = jnp.minimum(dt_next, self.dtmax)
        return accept, dt_next, state


def initial_step(f, t0, z0, f0, order, rtol, atol, error_size=None):
    """Hairer, Nørsett & Wanner, Solving ODEs I, II.4: a first step size for one more
    evaluation of f, given f0 = f(t0, z0); only z[..., :error_size] is measured."""
    part = (..., slice(error_size))
    scale = atol + rtol * jnp.abs(z0[part])
    d0, d1 = rms_norm(relative(z0[part], scale)), rms_norm(relative(f0[part], scale))
    # d1 = inf (not NaN): f moves a component that is zero with atol = 0, and there is no
    # scale to size the step by; the smallest first guess then, as for a resting state.
    dt0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5) | (d1 == jnp.inf), 1e-6, 0.01 * d0 / d1)
    d2 = rms_norm(relative((f(t0 + dt0, z0 + dt0 * f0) - f0)[part], scale)) / dt0
    largest = jnp.maximum(d1, d2)
    dt1 = jnp.where((largest <= 1e-15) | (largest == jnp.inf), jnp.maximum(1e-6, dt0 * 1e-3),
                    (0.01 / largest) ** (1.0 / (order + 1)))
    return jnp.minimum(100 * dt0, dt1)
