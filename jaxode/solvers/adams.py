"""Adams multistep methods: Adams-Bashforth, Adams-Moulton, and the adaptive variable-step,
variable-order Adams-Bashforth-Moulton PECE method of Shampine & Gordon.

One formulation serves all three: the variable-coefficient Adams formulas in modified
divided differences (Hairer, Nørsett & Wanner, Solving ODEs I, III.5; Shampine & Gordon,
Computer Solution of ODEs, 1975). The history held in the solver's state is

  Φ_j(n) = Π_{i<j} (t_n - t_{n-i-1}) · f[t_n, ..., t_{n-j}]     (j = 0, 1, ...)

with the times s_i = t_n - t_{n-i}. For a step h to t_{n+1}, with a_i = t_{n+1} - t_{n-i},
β_j = Π_{i<j} a_i / s_{i+1} and Φ*_j = β_j Φ_j(n), the order-k Adams-Bashforth predictor
and the Adams-Moulton corrector of order k + 1 are

  p       = z_n + h Σ_{j<k} g_j Φ*_j,     Φ^p_k = f(t_{n+1}, p) - Σ_{j<k} Φ*_j,
  z_{n+1} = p + h g_k Φ^p_k,              (the order-k corrector: p + h g_{k-1} Φ^p_k)

where g_j = ∫_0^1 P_j(x) dx, P_j(x) = Π_{i<j} (h x + s_i) / a_i. Integrating P_j only up
to θ gives the dense output: the integral of the polynomial interpolating the slopes.
The history after an accepted step is Φ_j(n+1) = f_{n+1} - Σ_{i<j} Φ*_i. Any sequence of
step sizes is handled exactly, so the fixed-step methods also take a shortened last step
at their full order, and the adaptive one changes h every step.

The state is only kept by the loop when a step is accepted, so a rejected step leaves
the history as it was.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .base import AbstractSolver, Step
from .rk import RK4, Bosh3, Dopri5, Dopri8, Heun, polynomial

MAX_FIXED_ORDER = 8
# Weighted sums over a history of at most this many (weights x state) elements are
# elementwise (see `_weighted`).
SMALL_HISTORY = 1024


def _am_error_constants(count):
    """|γ*_j|, j < count: the error constants of the Adams-Moulton methods of order j
    (Σ γ*_j x^j = -x / log(1 - x); Hairer, Nørsett & Wanner I, III.1)."""
    gamma = [Fraction(1)]
    for m in range(1, count):
        gamma.append(-sum(gamma[i] / (m + 1 - i) for i in range(m)))
    return np.array([abs(float(x)) for x in gamma])


class History(NamedTuple):
    """An Adams method's state: the modified divided differences of the past slopes."""

    phi: jax.Array  # (rows, n): Φ_j(n), valid for j < count
    s: jax.Array  # (rows,): t_n - t_{n-i}; s_0 = 0
    count: jax.Array  # int32: how many past slopes f_n, f_{n-1}, ... the history holds
    order: jax.Array  # int32: the order of the next step (Adams(); fixed otherwise)


def _start(f0, rows) -> History:
    phi = jnp.zeros((rows, f0.shape[-1]), f0.dtype).at[0].set(f0)
    real = jnp.real(f0).dtype
    return History(phi, jnp.zeros((rows,), real), jnp.ones((), jnp.int32),
                   jnp.ones((), jnp.int32))


def _coefficients(h, s):
    """(a, β, I) for a step h from the history times s: a_i = h + s_i, β_j as above, and
    I[j, m] the coefficient of θ^(m+1) in ∫_0^θ P_j, so g_j = Σ_m I[j, m]. Every
    coefficient of P_j is non-negative: the sums do not cancel."""
    rows = s.shape[0]
    a, beta = _ratios(h, s)
    alpha, sigma = h.astype(s.dtype) / a, s / a
    polys = [jnp.asarray(np.eye(rows)[0], s.dtype)]
    for j in range(rows - 1):
        prev = polys[-1]
        shifted = jnp.concatenate([jnp.zeros((1,), s.dtype), prev[:-1]])
        polys.append(alpha[j] * shifted + sigma[j] * prev)
    integ = jnp.stack(polys) / jnp.arange(1, rows + 1, dtype=s.dtype)
    return a, beta, integ


def _below(rows, dtype):
    """The strictly lower triangular matrix of ones: cumulative sums as one product
    (XLA:CPU runs a cumsum over a few rows as many small operations)."""
    return jnp.asarray(np.tril(np.ones((rows, rows)), -1), dtype)


def _ratios(h, s):
    """a_i = h + s_i and β_j = Π_{i<j} a_i / s_{i+1} (0 where the history is short)."""
    h = h.astype(s.dtype)
    a = h + s
    b = s[1:]
    ratio = jnp.where(b > 0, a[:-1] / jnp.where(b > 0, b, 1), 0)
    return a, jnp.concatenate([jnp.ones((1,), s.dtype), _cumprod(ratio)])


def _gauss(rows):
    """Gauss-Legendre nodes and weights on [0, 1], exact for the P_j (degree < rows)."""
    x, w = np.polynomial.legendre.leggauss((rows + 1) // 2)
    return (x + 1) / 2, w / 2


def _quadrature(alpha, sigma, theta):
    """G_j(θ) = ∫_0^θ P_j for every j at once: P_j at the Gauss nodes is a cumulative
    product, P_j(x) = Π_{i<j} (α_i x + σ_i)."""
    rows = alpha.shape[0]
    x, w = _gauss(rows)
    x = theta * jnp.asarray(x, alpha.dtype)
    # (Not as exp Σ log: θ outside [0, 1], masked by the loop, may make a factor <= 0.)
    factors = alpha[:-1, None] * x[None] + sigma[:-1, None]
    values = jnp.concatenate([jnp.ones((1, x.shape[0]), alpha.dtype),
                              _cumprod(factors)])
    return theta * jnp.sum(values * jnp.asarray(w, alpha.dtype), axis=1)


def _weighted(weights, rows):
    """Σ_j w_j rows_j for weights (rows,), or (m, rows) for m such sums. A small history's
    as elementwise products and a sum, which XLA:CPU compiles into a one-function loop
    (`jaxode.xla_cpu`; a matrix product it does not); a large one's as a matrix product,
    which reads each row once."""
    weights = weights.astype(rows.dtype)
    if weights.size * rows.shape[-1] > SMALL_HISTORY:
        return weights @ rows
    return jnp.sum(weights[..., None] * rows, axis=-2)


def _starred(kept, phi):
    """Φ*_j = kept_j Φ_j for the rows phi (rows, n), or for one row."""
    return kept[..., None].astype(phi.dtype) * phi


def _cumprod(x):
    """The cumulative product along the first axis, unrolled: a few rows, which XLA:CPU
    would otherwise run as a window reduction."""
    products = [x[0]]
    for row in x[1:]:
        products.append(products[-1] * row)
    return jnp.stack(products)


def _advance(history: History, kept, f1, a, points, order):
    """The history after the step: Φ_j(n+1) = f1 - Σ_{i<j} Φ*_i, s'_i = a_{i-1}, with
    Φ*_i = kept_i Φ_i(n) (kept_i: β_i, or 0 for a row the formula leaves out)."""
    phi = history.phi
    partial = _weighted(_below(phi.shape[0], phi.dtype) * kept.astype(phi.dtype)[None], phi)
    s_new = jnp.concatenate([jnp.zeros((1,), a.dtype), a[:-1]])
    count = jnp.minimum(history.count + 1, points)
    return History(f1[None] - partial, s_new, count.astype(jnp.int32), order.astype(jnp.int32))


def _pad(x, rows):
    return jnp.concatenate([x, jnp.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])


# The Runge-Kutta method that starts a fixed-step method of each order (at least that
# order, so that the start does not lower the global order).
_STARTERS = {1: None, 2: Heun(), 3: Bosh3(), 4: RK4(), 5: Dopri5(), 6: Dopri8(), 7: Dopri8(),
             8: Dopri8()}


class _FixedAdams(AbstractSolver):
    """Shared by the fixed-step, fixed-order methods: a Runge-Kutta start while the
    history is short, then the multistep formula."""

    order: int = eqx.field(default=4, static=True)

    error_order: ClassVar[None] = None
    init_nfe: ClassVar[int] = 0
    points: ClassVar[Any]  # how many past slopes the formula uses (a function of order)

    def __check_init__(self):
        if not (isinstance(self.order, int) and 1 <= self.order <= MAX_FIXED_ORDER):
            raise ValueError(f"solver: {type(self).__name__}.order must be an integer from 1 "
                             f"to {MAX_FIXED_ORDER}, got {self.order!r}")

    @property
    def _points(self) -> int:
        return self.points(self.order)

    @property
    def _rows(self) -> int:
        return self._points + 1

    @property
    def _starter(self):
        return _STARTERS[self.order] if self._points > 1 else None

    @property
    def _dense_rows(self) -> int:
        starter = self._starter
        return max(self._rows, 0 if starter is None else starter.tableau.dense.shape[1])

    step_nfe: ClassVar[int] = 1  # a multistep step; `Step.stats` counts the start's

    def init(self, f, t0, z0, f0):
        return _start(f0, self._rows)

    def _multistep(self, f, t, z, dt, history):
        """(z1, dense, new history, nfe, ok) by the multistep formula."""
        raise NotImplementedError

    def step(self, f, t, z, dt, history) -> Step:
        starter = self._starter
        if starter is None:
            z1, dense, new, nfe, ok = self._multistep(f, t, z, dt, history)
        else:
            starting = history.count < self._points

            def start(operands):
                t, z, dt, history = operands
                rk = starter.step(f, t, z, dt, history.phi[0])
                a, beta = _ratios(dt, history.s)
                kept = jnp.where(jnp.arange(self._rows) < history.count, beta, 0)
                new = _advance(history, kept, rk.state, a, self._points, history.order)
                multi = self._multistep(f, t, z, dt, history)
                pick = lambda x, y: jnp.where(starting, x, y)
                return jax.tree_util.tree_map(pick, (rk.z, _pad(rk.dense, self._dense_rows),
                                                     new, jnp.int32(starter.step_nfe),
                                                     jnp.asarray(True)),
                                              multi)

            z1, dense, new, nfe, ok = lax.cond(
                eqxi.unvmap_any(starting), start,
                lambda operands: self._multistep(f, *operands), (t, z, dt, history))
        # A corrector that did not converge gives a non-finite state: the step fails
        # (`Solution.status`), never a silent answer.
        z1 = jnp.where(ok, z1, jnp.nan)
        return Step(z=z1, error=None, dense=dense, state=new, stats={"nfe": nfe})

    def interpolate(self, z0, dt, dense, theta):
        return polynomial(z0, dt, dense, theta)


class ExplicitAdams(_FixedAdams):
    """Adams-Bashforth of order k (1 to 8), fixed step, one evaluation of f a step; the
    first k - 1 steps by a Runge-Kutta method of order >= k (Heun, Bosh3's third-order
    solution, RK4, Dopri5, Dopri8). Bashforth & Adams (1883); Hairer, Nørsett & Wanner
    I, III.1 and III.5 (variable steps: a shortened last step keeps the order)."""

    name: ClassVar[str] = "explicit_adams"
    points: ClassVar[Any] = staticmethod(lambda order: order)

    def _multistep(self, f, t, z, dt, history):
        rows, k = self._rows, self.order
        a, beta, integ = _coefficients(dt, history.s)
        use = jnp.arange(rows) < jnp.minimum(k, history.count)
        kept = jnp.where(use, beta, 0)
        phistar = _starred(kept, history.phi)
        z1 = z + dt * _weighted(integ.sum(1), phistar)
        f1 = f(t + dt, z1)
        new = _advance(history, kept, f1, a, self._points, history.order)
        dense = _pad(_weighted(integ.T, phistar), self._dense_rows)
        return z1, dense, new, jnp.int32(1), jnp.asarray(True)


class ImplicitAdams(_FixedAdams):
    """Adams-Moulton of order k (1 to 8), fixed step: the Adams-Bashforth predictor of
    order max(k - 1, 1), then fixed-point corrector iterations (at most `max_iters`
    evaluations of f) until two iterates agree to within rtol, atol (Hairer's norm), and
    one evaluation at the result. A corrector that does not converge fails the step
    (a non-finite state in `Solution.status`). k = 1 is backward Euler, k = 2 the
    trapezoidal rule. Started like `ExplicitAdams`. Moulton (1926)."""

    name: ClassVar[str] = "implicit_adams"
    points: ClassVar[Any] = staticmethod(lambda order: max(order - 1, 1))
    max_iters: int = eqx.field(default=10, static=True)
    rtol: float = eqx.field(default=1e-7, static=True)
    atol: float = eqx.field(default=1e-9, static=True)

    def __check_init__(self):
        super().__check_init__()
        if not (isinstance(self.max_iters, int) and self.max_iters >= 1):
            raise ValueError(f"solver: ImplicitAdams.max_iters must be a positive integer, "
                             f"got {self.max_iters!r}")
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError("solver: ImplicitAdams.rtol and atol must be >= 0, not both 0")

    def _multistep(self, f, t, z, dt, history):
        rows, q = self._rows, self._points
        c = q if self.order > 1 else 0  # the corrector's coefficient g_c
        a, beta, integ = _coefficients(dt, history.s)
        g = integ.sum(1)
        use = jnp.arange(rows) < jnp.minimum(q, history.count)
        kept = jnp.where(use, beta, 0)
        phistar = _starred(kept, history.phi)
        total = jnp.sum(phistar, axis=0)
        p = z + dt * _weighted(g, phistar)
        t1 = t + dt
        real = jnp.real(z).dtype
        rtol = max(self.rtol, 16 * float(jnp.finfo(real).eps))
        corrector = lambda slope: p + dt * g[c].astype(z.dtype) * (slope - total)

        def body(carry):
            z_m, _, converged, iters = carry
            slope = f(t1, z_m)
            z_next = corrector(slope)
            scale = self.atol + rtol * jnp.maximum(jnp.abs(z_m), jnp.abs(z_next))
            change = jnp.sqrt(jnp.mean(jnp.square(jnp.abs(z_next - z_m) / scale)))
            return z_next, slope, change <= 1, iters + 1

        init = (p, jnp.zeros_like(z), jnp.asarray(False), jnp.int32(0))
        z1, slope, converged, iters = eqxi.while_loop(
            lambda carry: ~carry[2], body, init, max_steps=self.max_iters, kind="bounded")
        f1 = f(t1, z1)
        new = _advance(history, kept, f1, a, self._points, history.order)
        if c < q:  # order 1, backward Euler: z(θ) = z_n + θ h f(t1, z1)
            psi = jnp.where((jnp.arange(rows) == 0)[:, None], slope, 0)
        else:
            psi = jnp.where((jnp.arange(rows) == c)[:, None], slope - total, phistar)
        dense = _pad(_weighted(integ.T, psi), self._dense_rows)
        return z1, dense, new, iters + 1, converged


class Adams(AbstractSolver):
    """Adaptive variable-step, variable-order (1 to `max_order`, at most 12) Adams-
    Bashforth-Moulton in PECE mode, two evaluations of f a step: the order-k Adams-
    Bashforth predictor, one evaluation, the Adams-Moulton corrector of order k + 1
    (local extrapolation), one evaluation at the result. The error estimate is that of the
    order-k corrector, h (g_k - g_{k-1}) Φ^p_k. After each accepted step the order is
    lowered or raised from the error estimates at orders k-2, k-1, k and k+1, as in
    Shampine & Gordon's STEP (1975). The history is the modified divided differences;
    the step size is the controller's. It starts at order 1 and climbs one order a step
    while the higher order's estimate is smaller.

    `order` (the initial step's exponent) is the starting order 1. The step-size
    controller's exponent is the order the step used (`current_error_order`: the order
    in the state), so the step sizes follow the order as it climbs; `error_order` (6)
    only marks the method as adaptive. A rejected step is retried at the same order with
    the controller's smaller step.
    """

    max_order: int = eqx.field(default=12, static=True)

    name: ClassVar[str] = "adams"
    order: ClassVar[int] = 1
    error_order: ClassVar[int] = 6
    init_nfe: ClassVar[int] = 0
    step_nfe: ClassVar[int] = 2

    def __check_init__(self):
        if not (isinstance(self.max_order, int) and 1 <= self.max_order <= 12):
            raise ValueError(f"solver: Adams.max_order must be an integer from 1 to 12, got "
                             f"{self.max_order!r}")

    @property
    def _rows(self) -> int:
        return self.max_order + 2

    def init(self, f, t0, z0, f0):
        return _start(f0, self._rows)

    def current_error_order(self, state):
        return state.order

    def step(self, f, t, z, dt, history: History) -> Step:
        rows, top = self._rows, self.max_order
        k = history.order
        a, beta = _ratios(dt, history.s)
        alpha, sigma = dt.astype(a.dtype) / a, history.s / a
        g = _quadrature(alpha, sigma, jnp.ones((), a.dtype))
        j = jnp.arange(rows)
        # Φ*_j = β_j Φ_j (0 past the history) is folded into each weighted sum of the
        # rows, so that the (rows, n) history is read, not copied, by each.
        kept = jnp.where(j < history.count, beta, 0)
        predict = (j < k).astype(g.dtype) * kept
        total, increment = _weighted(jnp.stack([predict, predict * g]), history.phi)
        p = z + dt * increment
        t1 = t + dt
        fp = f(t1, p)
        phi_k = fp - total
        g_k, g_km1 = g[k].astype(z.dtype), g[k - 1].astype(z.dtype)
        z1 = p + dt * g_k * phi_k
        error = dt * (g_k - g_km1) * phi_k
        f1 = f(t1, z1)

        # Order selection (Shampine & Gordon's STEP): estimates of the local error at
        # orders k-2 .. k+1 with the constant-step error constants γ*, corrected for the
        # step-size history by σ; compared relative to one another.
        real = g.dtype
        scale = jnp.abs(z1) + jnp.mean(jnp.abs(z1)) + jnp.asarray(1e-30, real)
        norm = lambda v: jnp.sqrt(jnp.mean(jnp.square(jnp.abs(v) / scale)))
        gstar = jnp.asarray(_am_error_constants(rows + 1), real)
        sig = jnp.concatenate([jnp.ones((1,), real),
                               _cumprod(jnp.arange(1, rows, dtype=real) * alpha[:-1])])
        row = lambda i: _starred(kept[i], history.phi[i])  # noqa: E731
        phi_km1 = phi_k + row(jnp.maximum(k - 1, 0))
        phi_km2 = phi_km1 + row(jnp.maximum(k - 2, 0))
        new = _advance(history, kept, f1, a, rows, k)
        phi_kp1 = new.phi[jnp.minimum(k + 1, rows - 1)]
        err_k = sig[k] * gstar[k] * norm(phi_k)
        err_km1 = sig[k - 1] * gstar[k - 1] * norm(phi_km1)
        err_km2 = sig[jnp.maximum(k - 2, 0)] * gstar[jnp.maximum(k - 2, 0)] * norm(phi_km2)
        err_kp1 = gstar[k + 1] * norm(phi_kp1)
        lower = jnp.where(k >= 3, jnp.maximum(err_km1, err_km2) <= err_k,
                          (k == 2) & (err_km1 <= 0.5 * err_k))
        can_raise = ~lower & (k < top) & (new.count >= k + 2)
        lower_instead = can_raise & (k > 1) & (err_km1 <= jnp.minimum(err_k, err_kp1))
        raise_ = can_raise & ~lower_instead & jnp.where(k == 1, err_kp1 < 0.5 * err_k,
                                                        err_kp1 < err_k)
        k_new = k - (lower | lower_instead).astype(k.dtype) + raise_.astype(k.dtype)
        new = new._replace(order=k_new.astype(jnp.int32))

        # Dense output: z(t_n + θh) = z_n + h Σ_j G_j(θ) Ψ_j, Ψ = (Φ*_0..Φ*_{k-1}, Φ^p_k).
        psi = jnp.where((j < k)[:, None], _starred(kept, history.phi),
                        jnp.where((j == k)[:, None], phi_k[None], 0))
        return Step(z=z1, error=error, dense=(psi, alpha, sigma), state=new,
                    stats={"nfe": jnp.int32(2)})

    def interpolate(self, z0, dt, dense, theta):
        psi, alpha, sigma = dense
        weights = _quadrature(alpha, sigma, jnp.asarray(theta, alpha.dtype))
        return z0 + dt * _weighted(weights, psi)
