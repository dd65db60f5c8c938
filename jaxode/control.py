"""Step-size control: Hairer's RMS error norm, a PI controller, the initial step."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def rms_norm(x):
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def scaled_error(error, z0, z1, rtol, atol):
    """Hairer's norm: RMS over the whole state of error / (atol + rtol max(|z0|, |z1|))."""
    scale = atol + rtol * jnp.maximum(jnp.abs(z0), jnp.abs(z1))
    return rms_norm(error / scale)


@dataclasses.dataclass(frozen=True)
class PIController:
    """Proportional-integral step-size controller (Söderlind; Hairer & Wanner IV.2).

    After a step with scaled error e_n (e_n <= 1 accepts it) the next step is
        dt * safety * e_n^(-(icoeff + pcoeff)/k) * e_{n-1}^(pcoeff/k),
    clipped to [factormin, factormax] times dt (and to at most dt after a rejection),
    where k = 1 + the order of the embedded error estimate. The defaults
    (pcoeff=0, icoeff=1) are the classic integral controller used by diffrax and
    torchdiffeq; pcoeff=0.4, icoeff=0.3 is a good PI choice for non-smooth problems.
    `dtmax` bounds the step size when given.
    """

    pcoeff: float = 0.0
    icoeff: float = 1.0
    safety: float = 0.9
    factormin: float = 0.2
    factormax: float = 10.0
    dtmax: float | None = None

    def __post_init__(self):
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

    def next_step(self, dt, error, previous_error, error_order):
        """The proposed next step size and whether the step with this error is accepted."""
        k = error_order + 1
        accept = error <= 1.0
        # A zero error would give an infinite factor: factormax clips it.
        factor = self.safety * error ** (-(self.icoeff + self.pcoeff) / k)
        if self.pcoeff:
            factor = factor * previous_error ** (self.pcoeff / k)
        factor = jnp.clip(factor, self.factormin, self.factormax)
        factor = jnp.where(accept, factor, jnp.minimum(factor, 1.0))
        # A non-finite error (overflow, NaN from f) rejects with the strongest cut.
        factor = jnp.where(jnp.isfinite(error), factor, self.factormin)
        dt_next = dt * factor
        if self.dtmax is not None:
            dt_next = jnp.minimum(dt_next, self.dtmax)
        return accept & jnp.isfinite(error), dt_next


def initial_step(f, t0, z0, f0, order, rtol, atol, error_components=None):
    """Hairer, Nørsett & Wanner, Solving ODEs I, II.4: a first step size, for 1 call of f.

    Only z[:error_components] is measured, as in the step's error norm.
    """
    part = slice(error_components)
    scale = atol + rtol * jnp.abs(z0[part])
    d0 = rms_norm(z0[part] / scale)
    d1 = rms_norm(f0[part] / scale)
    dt0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    f1 = f(t0 + dt0, z0 + dt0 * f0)
    d2 = rms_norm((f1 - f0)[part] / scale) / dt0
    largest = jnp.maximum(d1, d2)
    dt1 = jnp.where(
        largest <= 1e-15,
        jnp.maximum(1e-6, dt0 * 1e-3),
        (0.01 / largest) ** (1.0 / (order + 1)),
    )
    return jnp.minimum(100 * dt0, dt1).astype(z0.dtype)
