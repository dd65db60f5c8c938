"""Implicit methods for stiff problems: Kværnø's ESDIRK 3(2), 4(3) and 5(4).

An ESDIRK step has an explicit first stage (k_1 = f(t, z), the previous step's last
stage) and implicit stages with one diagonal coefficient γ,

    k_i = f(t + c_i dt, Y_i),   Y_i = z + dt Σ_{j<i} a_ij k_j + dt γ k_i,

each solved by a simplified Newton iteration on k_i with the matrix I - dt γ J, where
J = ∂f/∂z at (t, z) comes from `jax.jacfwd` and is LU-factorised once per step attempt
and reused by every stage and iteration. The iteration stops when the increments
shrink fast enough (Hairer & Wanner, Solving ODEs II, IV.8: η ||Δ|| <= κ with
η = θ / (1 - θ), θ the ratio of successive increments); one that diverges (θ >= 1), gives
non-finite values or has not converged after `max_iterations` marks the step's error
as infinite, so the controller rejects it and retries with a smaller step (and a
non-finite value from f ends the solve with the non-finite status).

Derivatives do not go through the iterations: each converged stage carries the
tangent of the implicit function theorem, (I - dt γ J(Y_i))⁻¹ (∂f/∂(t, z, θ) · ...),
so `Direct()` and `Forward()` differentiate the exact stage solutions.

The methods are stiffly accurate (z_1 = Y_s), so k_s = f(t + dt, z_1) is the next
step's first stage (FSAL). Dense output: the cubic Hermite interpolant through
(z_0, k_1) and (z_1, k_s), third order (local error O(dt^4)), as diffrax uses for them.

They take a flat (1-D) state, as every `jaxode.solve` gives them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from .base import AbstractSolver, Step

_TOL = 1e-10


# ---------------------------------------------------------------- order conditions


@functools.cache
def rooted_trees(order: int) -> frozenset:
    """The rooted trees with `order` nodes, each a sorted tuple of its root's subtrees."""
    if order == 1:
        return frozenset({()})
    trees = set()
    for size in range(1, order):
        for child in rooted_trees(size):
            for rest in rooted_trees(order - size):
                trees.add(tuple(sorted((*rest, child))))
    return frozenset(trees)


def _weights(a, tree):
    """The elementary weight Φ(tree) of every stage: Π over subtrees of a @ Φ(subtree)."""
    phi = np.ones(a.shape[0])
    for child in tree:
        phi = phi * (a @ _weights(a, child))
    return phi


def _density(tree):
    """γ(tree) = |tree| Π γ(subtree)."""
    size = lambda t: 1 + sum(size(c) for c in t)
    return size(tree) * np.prod([_density(c) for c in tree])


def satisfied_order(a, b, up_to=8) -> int:
    """The largest p <= up_to with b · Φ(t) = 1/γ(t) for every tree t with <= p nodes."""
    for order in range(1, up_to + 1):
        for tree in rooted_trees(order):
            if abs(b @ _weights(a, tree) - 1 / _density(tree)) > _TOL:
                return order - 1
    return up_to


# ---------------------------------------------------------------- the tableau


@dataclasses.dataclass(frozen=True, eq=False)
class ESDIRKTableau:
    """A stiffly accurate ESDIRK method's coefficients, refused when inconsistent.

    `a` (s, s): lower triangular, a[0, 0] = 0 (explicit first stage), a[i, i] = γ for
    i >= 1; b = a[-1] (stiffly accurate, so c_s = 1). `b_err` (s,): b - b̂, the weights
    of dt k_i giving the local error. `predictor` (s, s): strictly lower, rows i >= 1
    summing to 1: the first guess for k_i is Σ_j predictor[i, j] k_j. `order` and
    `error_order` are checked against the Butcher order conditions.
    """

    a: np.ndarray
    b_err: np.ndarray
    predictor: np.ndarray
    order: int
    error_order: int

    def __post_init__(self):
        for name in ("a", "b_err", "predictor"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=float))
        self._validate()

    @property
    def num_stages(self) -> int:
        return self.a.shape[0]

    @property
    def gamma(self) -> float:
        return float(self.a[1, 1])

    @property
    def b(self) -> np.ndarray:
        return self.a[-1]

    @property
    def c(self) -> np.ndarray:
        return self.a.sum(1)

    def _validate(self):
        a, s = self.a, self.a.shape[0]
        _require(a.shape == (s, s) and s >= 2, f"a has shape {a.shape}, expected (s, s)")
        _require(not np.triu(a, 1).any(), "a must be lower triangular")
        _require(a[0, 0] == 0, "a[0, 0] must be 0 (an explicit first stage)")
        _require(np.allclose(np.diag(a)[1:], a[1, 1]) and a[1, 1] > 0,
                 "the diagonal a[i, i] (i >= 1) must be one positive γ")
        _require(abs(self.c[-1] - 1) < _TOL, "the last row of a must sum to 1 (c_s = 1)")
        _require(self.b_err.shape == (s,), f"b_err needs {s} entries")
        _require(abs(self.b_err.sum()) < _TOL, "b_err must sum to 0 (the error of z' = 1)")
        p = self.predictor
        _require(p.shape == (s, s) and not np.triu(p).any(), "predictor must be strictly lower")
        _require(np.allclose(p[1:].sum(1), 1, atol=_TOL), "predictor rows must sum to 1")
        got = satisfied_order(a, self.b, self.order + 1)
        _require(got == self.order, f"b satisfies the order conditions to order {got}, "
                 f"not {self.order}")
        got = satisfied_order(a, self.b - self.b_err, self.error_order)
        _require(got >= self.error_order, f"the embedded weights b - b_err have order {got}, "
                 f"not {self.error_order}")


def _require(condition, message):
    if not condition:
        raise ValueError(f"ESDIRKTableau: {message}")


def _rows(gamma, rows):
    """A lower triangular a from its rows below the first, each ending with γ."""
    s = len(rows) + 1
    a = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        a[i, :i] = [float(x) for x in row]
        a[i, i] = gamma
    return a


def _lower(rows):
    s = len(rows) + 1
    a = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        a[i, :i] = [float(x) for x in row]
    return a


# Kværnø (2004), "Singly diagonally implicit Runge-Kutta methods with an explicit first
# stage", BIT 44: the coefficients as diffrax (patrick-kidger/diffrax) and
# OrdinaryDiffEq.jl give them, with their stage predictors.
def _kvaerno3():
    g = 0.43586652150
    a31 = (-4 * g**2 + 6 * g - 1) / (4 * g)
    a32 = (-2 * g + 1) / (4 * g)
    a41 = (6 * g - 1) / (12 * g)
    a42 = -1 / ((24 * g - 12) * g)
    a43 = (-6 * g**2 + 6 * g - 1) / (6 * g - 3)
    theta = 1 / (2 * g)
    return ESDIRKTableau(
        a=_rows(g, [[g], [a31, a32], [a41, a42, a43]]),
        b_err=np.array([a41 - a31, a42 - a32, a43 - g, g]),  # b - (stage 3's row)
        predictor=_lower([[1], [1 - theta, theta], [a31, a32, g]]),
        order=3, error_order=2,
    )


def _kvaerno4():
    g = 0.5728160625
    q = lambda *coeffs: np.polyval(coeffs, g)
    a31 = q(144, -180, 81, -15, 1) * g / q(12, -6, 1) ** 2
    a32 = q(-36, 39, -15, 2) * g / q(12, -6, 1) ** 2
    a41 = q(-144, 396, -330, 117, -18, 1) / (12 * g**2 * q(12, -9, 2))
    a42 = q(72, -126, 69, -15, 1) / (12 * g**2 * q(3, -1))
    a43 = (q(-6, 6, -1) * q(12, -6, 1) ** 2) / (12 * g**2 * q(12, -9, 2) * q(3, -1))
    a51 = q(288, -312, 120, -18, 1) / (48 * g**2 * q(12, -9, 2))
    a52 = q(24, -12, 1) / (48 * g**2 * q(3, -1))
    a53 = -(q(12, -6, 1) ** 3) / (48 * g**2 * q(3, -1) * q(12, -9, 2) * q(6, -6, 1))
    a54 = q(-24, 36, -12, 1) / q(24, -24, 4)
    c2, c3 = 2 * g, g + a31 + a32
    t1, t2 = c3 / c2, (1 - c2) / (c3 - c2)
    return ESDIRKTableau(
        a=_rows(g, [[g], [a31, a32], [a41, a42, a43], [a51, a52, a53, a54]]),
        b_err=np.array([a51 - a41, a52 - a42, a53 - a43, a54 - g, g]),
        predictor=_lower([[1], [1 - t1, t1], [0, 1 - t2, t2], [a41, a42, a43, g]]),
        order=4, error_order=3,
    )


def _kvaerno5():
    g = 0.26
    rows = [
        [g],
        [0.13, 0.84033320996790809],
        [0.22371961478320505, 0.47675532319799699, -0.06470895363112615],
        [0.16648564323248321, 0.10450018841591720, 0.03631482272098715,
         -0.13090704451073998],
        [0.13855640231268224, 0, -0.04245337201752043, 0.02446657898003141,
         0.61943039072480676],
        [0.13659751177640291, 0, -0.05496908796538376, -0.04118626728321046,
         0.62993304899016403, 0.06962479448202728],
    ]
    a = _rows(g, rows)
    predictor = _lower([
        [1.0],
        [-1.366025403784441, 2.3660254037844357],
        [-0.19650552613122207, 0.8113579546496623, 0.38514757148155954],
        [0.10375304369958693, 0.937994698066431, -0.04174774176601781, 0],
        [-0.17281112873898072, 0.6235784481025847, 0.5492326806363959, 0, 0],
        [*rows[4], g],
    ])
    return ESDIRKTableau(a=a, b_err=a[6] - a[5], predictor=predictor, order=5,
                         error_order=4)


KVAERNO3, KVAERNO4, KVAERNO5 = _kvaerno3(), _kvaerno4(), _kvaerno5()


# ---------------------------------------------------------------- shared pieces


class AbstractStiffSolver(AbstractSolver):
    """An implicit or linearly implicit method: it factorises I - dt γ ∂f/∂z each step.

    The adjoint method (`Backsolve`) of such a solver re-solves z forward over each
    output interval instead of integrating it backwards (see `jaxode.Backsolve`)."""


def rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(jnp.abs(x))))


def lincomb(coeffs, vectors):
    """Σ c_i v_i for static coefficients, skipping zeros."""
    terms = [float(c) * v for c, v in zip(coeffs, vectors) if c != 0]
    if not terms:
        return jnp.zeros_like(vectors[0])
    return functools.reduce(lambda x, y: x + y, terms)


def factor(f, t, z, h):
    """The LU factors of I - h ∂f/∂z at (t, z), ∂f/∂z by forward mode. A complex state
    is linearised in its real form (Re z, Im z), 2n x 2n, so f need not be holomorphic."""
    if jnp.iscomplexobj(z):
        n = z.shape[-1]
        g = lambda x: _real_form(f(t, lax.complex(x[:n], x[n:])))
        jac = jax.jacfwd(g)(_real_form(z))
    else:
        jac = jax.jacfwd(lambda y: f(t, y))(z)
    return jsl.lu_factor(jnp.eye(jac.shape[-1], dtype=jac.dtype) - h * jac)


def solve_factored(lu, rhs):
    """x with (I - h J) x = rhs, for the factors from `factor`."""
    if jnp.iscomplexobj(rhs):
        n = rhs.shape[-1]
        x = jsl.lu_solve(lu, _real_form(rhs))
        return lax.complex(x[:n], x[n:])
    return jsl.lu_solve(lu, rhs)


def _real_form(z):
    return jnp.concatenate([jnp.real(z), jnp.imag(z)], axis=-1)


def hermite(z0, dt, dense, theta):
    """Cubic Hermite through (z0, k0) and (z1, k1); dense = (k0, k1, (z1 - z0)/dt)."""
    k0, k1, mean = dense[0], dense[1], dense[2]
    theta = jnp.asarray(theta, jnp.real(z0).dtype)
    t2, t3 = theta * theta, theta * theta * theta
    return z0 + dt * ((3 * t2 - 2 * t3) * mean + (theta - 2 * t2 + t3) * k0 + (t3 - t2) * k1)


class _NewtonState(eqx.Module):
    iteration: jax.Array
    k: jax.Array
    norm: jax.Array
    eta: jax.Array
    done: jax.Array
    converged: jax.Array


def newton(f, t_i, base, h, k0, lu, scale, eta0, kappa, max_iterations):
    """Simplified Newton iteration for k = f(t_i, base + h k) with the LU of I - h J.

    Returns (k, iterations, converged, last increment norm, η). The increments are
    measured as h Δ / scale (RMS); the iteration stops when η ||Δ|| <= κ."""

    def body(s: _NewtonState):
        delta = solve_factored(lu, f(t_i, base + h * s.k) - s.k)
        norm = rms(h * delta / scale)
        theta = norm / s.norm
        eta = jnp.where(s.iteration > 0, theta / (1 - theta), s.eta)
        finite = jnp.isfinite(norm)
        diverged = ~finite | ((s.iteration > 0) & (theta >= 1))
        converged = ~diverged & (eta * norm <= kappa)
        return _NewtonState(s.iteration + 1, s.k + delta, norm, eta, converged | diverged,
                            converged)

    real = scale.dtype
    init = _NewtonState(jnp.zeros((), jnp.int32), k0, jnp.asarray(jnp.inf, real),
                        jnp.asarray(eta0, real), jnp.zeros((), bool), jnp.zeros((), bool))
    s = lax.while_loop(lambda s: ~s.done & (s.iteration < max_iterations), body, init)
    return s.k, s.iteration, s.converged, s.norm, s.eta


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _implicit_stage(f, k, t_i, base, h, *consts):
    """The converged stage k = f(t_i, base + h k, *consts), with the tangent of the
    implicit function theorem (k itself comes from the Newton iteration)."""
    return k


@_implicit_stage.defjvp
def _implicit_stage_jvp(f, primals, tangents):
    k, t_i, base, h, *consts = primals
    _, dt_i, dbase, dh, *dconsts = tangents
    y = base + h * k
    _, rhs = jax.jvp(lambda t_, y_, *c: f(t_, y_, *c), (t_i, y, *consts),
                     (dt_i, dbase + dh * k, *dconsts))
    return k, solve_factored(factor(lambda t_, y_: f(t_, y_, *consts), t_i, y, h), rhs)


# ---------------------------------------------------------------- the ESDIRK solver


class ESDIRK(AbstractStiffSolver):
    """A stiffly accurate ESDIRK method given by its `tableau`; its state is f(t, z).

    newton_rtol, newton_atol: the Newton iteration's tolerances (its increments are
    measured against newton_atol + newton_rtol |z|; the iteration stops at η ||Δ|| <=
    kappa); set them to the solve's rtol/atol to spend no more iterations than the
    controller needs (diffrax does so by itself). max_iterations: Newton iterations per
    stage before the step is rejected. stage_loop: solve the stages in a `lax.fori_loop`
    (one copy of f and of the Newton iteration in the compiled program: ~40% faster to
    compile, as fast per step on Robertson); False unrolls them.
    """

    tableau: ClassVar[ESDIRKTableau]
    newton_rtol: float = eqx.field(default=1e-7, static=True)
    newton_atol: float = eqx.field(default=1e-9, static=True)
    kappa: float = eqx.field(default=1e-2, static=True)
    max_iterations: int = eqx.field(default=10, static=True)
    stage_loop: bool = eqx.field(default=True, static=True)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "tableau" in cls.__dict__:
            cls.order, cls.error_order = cls.tableau.order, cls.tableau.error_order
            cls.step_nfe = cls.tableau.num_stages - 1  # at least one iteration per stage

    def __check_init__(self):
        for name in ("newton_rtol", "newton_atol", "kappa"):
            if not getattr(self, name) > 0:
                raise ValueError(f"solver: {type(self).__name__}.{name} must be > 0, got "
                                 f"{getattr(self, name)}")
        if not (isinstance(self.max_iterations, int) and self.max_iterations >= 1):
            raise ValueError(f"solver: {type(self).__name__}.max_iterations must be a "
                             f"positive integer, got {self.max_iterations!r}")

    def init(self, f, t0, z0, f0):
        return f0

    def step(self, f, t, z, dt, k1) -> Step:
        tab = self.tableau
        gamma = tab.gamma
        real = jnp.real(z).dtype
        # Values that f closes over (parameters) become explicit, for the stage tangents.
        conv, consts = jax.closure_convert(f, t, z)
        t_, z_, dt_, consts_ = lax.stop_gradient((t, z, dt, consts))
        f_ = lambda s, y: conv(s, y, *consts_)
        h_ = dt_ * gamma
        lu = factor(f_, t_, z_, h_)
        eps = jnp.finfo(real).eps
        rtol = jnp.maximum(jnp.asarray(self.newton_rtol, real), 1000 * eps)
        atol = jnp.maximum(jnp.asarray(self.newton_atol, real), 1000 * eps * jnp.finfo(real).tiny)
        scale = atol + rtol * jnp.abs(z_)

        def comb(coeffs, ks):
            if isinstance(coeffs, np.ndarray):  # static: skip the zeros
                return lincomb(coeffs, [ks[j] for j in range(len(coeffs))])
            return coeffs @ ks

        def stage(i, c_i, a_i, predictor_i, ks, eta):
            """Stage i from the stages before it (rows of `ks`, the others zero)."""
            time = t + dt if c_i is None else t + c_i * dt
            ks_ = lax.stop_gradient(ks)
            time_ = t_ + dt_ if c_i is None else t_ + c_i * dt_
            base_ = z_ + dt_ * comb(a_i, ks_)
            guess = comb(predictor_i, ks_)
            k_, iterations, ok, norm, eta = newton(f_, time_, base_, h_, guess, lu, scale, eta,
                                                   self.kappa, self.max_iterations)
            k_ = jnp.where(ok, k_, guess)
            eta = jnp.where(ok, jnp.maximum(eta, 1e-2) ** 0.8, 1.0).astype(real)
            k = _implicit_stage(conv, k_, time, z + dt * comb(a_i, ks), dt * gamma, *consts)
            return k, iterations, ok, jnp.isfinite(norm), eta

        s = tab.num_stages
        strict = np.tril(tab.a, -1)
        ks = jnp.zeros((s, z.shape[-1]), z.dtype).at[0].set(k1)
        init = (ks, jnp.ones((), real), jnp.zeros((), jnp.int32), jnp.ones((), bool),
                jnp.ones((), bool))
        if self.stage_loop:
            # One copy of f and of the Newton iteration in the program: fast to compile.
            a_rows, p_rows = jnp.asarray(strict, real), jnp.asarray(tab.predictor, real)
            c_all = jnp.asarray(tab.c, real)

            def body(i, carry):
                ks, eta, nfe, converged, finite = carry
                k, iterations, ok, fin, eta = stage(i, c_all[i], a_rows[i].astype(z.dtype),
                                                    p_rows[i].astype(z.dtype), ks, eta)
                return ks.at[i].set(k), eta, nfe + iterations, converged & ok, finite & fin

            ks, _, nfe, converged, finite = lax.fori_loop(1, s, body, init)
        else:
            ks, eta, nfe, converged, finite = init
            for i in range(1, s):
                c_i = None if tab.c[i] == 1 else float(tab.c[i])
                k, iterations, ok, fin, eta = stage(i, c_i, strict[i, :i], tab.predictor[i, :i],
                                                    ks, eta)
                ks = ks.at[i].set(k)
                nfe, converged, finite = nfe + iterations, converged & ok, finite & fin
        z1 = z + dt * comb(tab.b, ks)
        error = dt * comb(tab.b_err, ks)
        error = jnp.where(converged, error, jnp.inf)
        # A non-finite value from f is the non-finite status once the steps run out.
        z1 = jnp.where(finite, z1, jnp.nan)
        dense = jnp.stack([k1, ks[-1], (z1 - z) / dt])
        stats = {"nfe": nfe, "num_jacobians": jnp.ones((), jnp.int32), "num_linear_solves": nfe}
        return Step(z=z1, error=error, dense=dense, state=ks[-1], stats=stats)

    def interpolate(self, z0, dt, dense, theta):
        return hermite(z0, dt, dense, theta)


class Kvaerno3(ESDIRK):
    """Kværnø (2004), "Singly diagonally implicit Runge-Kutta methods with an explicit
    first stage", BIT 44: ESDIRK 3(2), 4 stages, L-stable, stiffly accurate, FSAL.
    Newton solves per implicit stage; cubic Hermite dense output."""

    name, tableau = "kvaerno3", KVAERNO3


class Kvaerno4(ESDIRK):
    """Kværnø (2004), BIT 44: ESDIRK 4(3), 5 stages, L-stable, stiffly accurate, FSAL
    (γ of the method advancing with the fourth-order solution). Newton solves per
    implicit stage; cubic Hermite dense output."""

    name, tableau = "kvaerno4", KVAERNO4


class Kvaerno5(ESDIRK):
    """Kværnø (2004), BIT 44: ESDIRK 5(4), 7 stages, L-stable, stiffly accurate, FSAL.
    Newton solves per implicit stage; cubic Hermite dense output. Its third stage lies
    past the step (c_3 = 1.23): f is evaluated slightly beyond t + dt."""

    name, tableau = "kvaerno5", KVAERNO5


__all__ = ["AbstractStiffSolver", "ESDIRK", "ESDIRKTableau", "Kvaerno3", "Kvaerno4",
           "Kvaerno5", "rooted_trees", "satisfied_order"]
