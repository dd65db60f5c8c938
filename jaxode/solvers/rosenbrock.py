"""Rosenbrock (linearly implicit) methods: Steinebach's Rodas5P.

A Rosenbrock step needs no Newton iteration: with J = ∂f/∂z and f_t = ∂f/∂t at the
step's start (one `jax.jacfwd`, one `jax.jvp`) and one LU factorisation of
I - dt γ J, each stage is one linear solve. In the W-transformed form of
OrdinaryDiffEq.jl (Hairer & Wanner, Solving ODEs II, IV.7, (7.25)),

    (I / (dt γ) - J) k_i = f(t + c_i dt, z + Σ_{j<i} a_ij k_j) + Σ_{j<i} C_ij k_j / dt
                            + dt d_i f_t,
    z_1 = z + Σ_i b_i k_i,  error = k_s (stiffly accurate: b = (a_s, 1)).

Everything is differentiable by JAX as it stands (the Jacobian included), so `Direct()`
gives the exact gradient of the discrete solve.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .base import Step
from .implicit import AbstractStiffSolver, factor, lincomb, solve_factored

_TOL = 1e-9


def _series_mul(x, y):
    return np.convolve(x, y)[: len(x)]


@dataclasses.dataclass(frozen=True, eq=False)
class RosenbrockTableau:
    """A stiffly accurate Rosenbrock method in OrdinaryDiffEq.jl's W-transformed form,
    refused when inconsistent.

    `a`, `C` (s, s) strictly lower; `gamma`; `c`, `d` (s,) the stage times and the f_t
    weights; `H` (m, s): the dense output z(θ) = (1-θ) z_0 + θ (z_1 + (1-θ) (K_1 + θ (K_2
    + θ (... K_m)))) with K = H k. Checked: on z' = λz the step and the embedded step
    (z_1 - k_s) match e^(dt λ) to `order` and `error_order`, both vanish as dt λ -> -∞
    (L-stable), and the dense output matches e^(θ dt λ) to `dense_order` at θ = 1/2.
    """

    a: np.ndarray
    C: np.ndarray
    gamma: float
    c: np.ndarray
    d: np.ndarray
    H: np.ndarray
    order: int
    error_order: int
    dense_order: int

    def __post_init__(self):
        for name in ("a", "C", "c", "d", "H"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=float))
        self._validate()

    @property
    def num_stages(self) -> int:
        return self.a.shape[0]

    @property
    def b(self) -> np.ndarray:
        return np.append(self.a[-1, :-1], 1.0)

    def linear_stages(self, z, degree=None):
        """The stages on z' = λz from z_0 = 1 (z = dt λ): a power series in z (`degree`
        terms) or, with degree None, the values at the number z."""
        s, g = self.num_stages, self.gamma
        if degree is None:
            ks = []
            for i in range(s):
                u = 1 + sum(self.a[i, j] * ks[j] for j in range(i))
                rhs = z * u + sum(self.C[i, j] * ks[j] for j in range(i))
                ks.append(rhs / (1 / g - z))
            return ks
        zvec = np.zeros(degree)
        zvec[1] = 1.0
        resolvent = g * g ** np.arange(degree)  # γ / (1 - γ z) = Σ γ^(n+1) z^n
        one = np.eye(degree)[0]
        ks = []
        for i in range(s):
            u = one + sum(self.a[i, j] * ks[j] for j in range(i))
            rhs = _series_mul(zvec, u) + sum(self.C[i, j] * ks[j] for j in range(i))
            ks.append(_series_mul(resolvent, rhs))
        return ks

    def _validate(self):
        s = self.num_stages
        for name in ("a", "C"):
            m = getattr(self, name)
            _require(m.shape == (s, s) and not np.triu(m).any(), f"{name} must be (s, s) "
                     "strictly lower triangular")
        _require(self.c.shape == (s,) and self.d.shape == (s,), "c and d need s entries")
        _require(self.H.ndim == 2 and self.H.shape[1] == s, "H needs s columns")
        _require(abs(self.d[0] - self.gamma) < _TOL, "d[0] must be γ")
        _require(abs(self.c[-1] - 1) < _TOL, "the last stage must be at t + dt (c_s = 1)")
        degree = self.order + 3
        ks = self.linear_stages(None, degree)
        exact = np.array([1 / np.prod(np.arange(1, n + 1)) for n in range(degree)])
        z1 = np.eye(degree)[0] + sum(b * k for b, k in zip(self.b, ks))
        embedded = z1 - ks[-1]
        order = lambda series: next((n - 1 for n in range(degree)
                                     if abs(series[n] - exact[n]) > _TOL), degree)
        _require(order(z1) >= self.order,
                 f"the step has linear order {order(z1)}, not {self.order}")
        _require(order(embedded) >= self.error_order,
                 f"the embedded step has linear order {order(embedded)}, not {self.error_order}")
        big = self.linear_stages(-1e8)
        stiff = 1 + sum(b * k for b, k in zip(self.b, big))
        _require(abs(stiff) < 1e-6 and abs(stiff - big[-1]) < 1e-6,
                 "the step and its embedded step must vanish as dt λ -> -∞ (L-stability)")
        theta = 0.5
        dense = np.zeros(degree)
        K = [sum(self.H[j, i] * ks[i] for i in range(s)) for j in range(self.H.shape[0])]
        inner = np.zeros(degree)
        for Kj in reversed(K):
            inner = Kj + theta * inner
        dense = (1 - theta) * np.eye(degree)[0] + theta * (z1 + (1 - theta) * inner)
        exact_half = exact * theta ** np.arange(degree)
        got = next((n - 1 for n in range(degree) if abs(dense[n] - exact_half[n]) > _TOL),
                   degree)
        _require(got >= self.dense_order,
                 f"the dense output has linear order {got}, not {self.dense_order}")


def _require(condition, message):
    if not condition:
        raise ValueError(f"RosenbrockTableau: {message}")


# Steinebach (2023), "Construction of Rosenbrock-Wanner method Rodas5P and numerical
# benchmarks within the Julia Differential Equations package", BIT 63, 27: the
# coefficients as OrdinaryDiffEq.jl (lib/OrdinaryDiffEqRosenbrock) gives them.
_RODAS5P_A = [
    [3.0],
    [2.849394379747939, 0.45842242204463923],
    [-6.954028509809101, 2.489845061869568, -10.358996098473584],
    [2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641],
    [-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256,
     0.030198172008377946],
    [-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256,
     0.030198172008377946, 1],
    [-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256,
     0.030198172008377946, 1, 1],
]
_RODAS5P_C = [
    [-14.155112264123755],
    [-17.97296035885952, -2.859693295451294],
    [147.12150275711716, -1.41221402718213, 71.68940251302358],
    [165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306],
    [24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125,
     -0.6610691825249471],
    [30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783,
     -19.097331116725623, -28.087943162872662],
    [37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047,
     -40.06618937091002, -54.66780262877968, -9.48861652309627],
]
_RODAS5P_H = [
    [25.948786856663858, -2.5579724845846235, 10.433815404888879, -2.3679251022685204,
     0.524948541321073, 1.1241088310450404, 0.4272876194431874, -0.17202221070155493],
    [-9.91568850695171, -0.9689944594115154, 3.0438037242978453, -24.495224566215796,
     20.176138334709044, 15.98066361424651, -6.789040303419874, -6.710236069923372],
    [11.419903575922262, 2.8879645146136994, 72.92137995996029, 80.12511834622643,
     -52.072871366152654, -59.78993625266729, -0.15582684282751913, 4.883087185713722],
]


def _strict(rows):
    s = len(rows) + 1
    m = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        m[i, :i] = row
    return m


RODAS5P = RosenbrockTableau(
    a=_strict(_RODAS5P_A),
    C=_strict(_RODAS5P_C),
    gamma=0.21193756319429014,
    c=np.array([0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716,
                0.4288403609558664, 1, 1, 1]),
    d=np.array([0.21193756319429014, -0.42387512638858027, -0.3384627126235924,
                1.8046452872882734, 2.325825639765069, 0, 0, 0]),
    H=np.array(_RODAS5P_H),
    order=5, error_order=4, dense_order=4,
)


class Rosenbrock(AbstractStiffSolver):
    """A stiffly accurate Rosenbrock method given by its `tableau`; its state is f(t, z).

    Per step attempt: one Jacobian (`jax.jacfwd`), one ∂f/∂t (`jax.jvp`), one LU
    factorisation, one linear solve per stage, no Newton iteration. Dense output: the
    method's own continuous extension (`RosenbrockTableau.H`)."""

    tableau: ClassVar[RosenbrockTableau]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "tableau" in cls.__dict__:
            tab = cls.tableau
            cls.order, cls.error_order = tab.order, tab.error_order
            repeated = sum(1 for i in range(1, tab.num_stages) if _repeats(tab, i))
            cls.step_nfe = tab.num_stages - repeated  # the stages after the first, and f_1

    def init(self, f, t0, z0, f0):
        return f0

    def step(self, f, t, z, dt, f0) -> Step:
        tab = self.tableau
        f_t = jax.jvp(lambda s: f(s, z), (t,), (jnp.ones_like(t),))[1]
        h = dt * tab.gamma
        lu = factor(f, t, z, h)
        ks, fi = [], f0
        for i in range(tab.num_stages):
            if i > 0 and not _repeats(tab, i):
                time = t + dt if tab.c[i] == 1 else t + float(tab.c[i]) * dt
                fi = f(time, z + lincomb(tab.a[i, :i], ks))
            rhs = fi
            if i > 0:
                rhs = rhs + lincomb(tab.C[i, :i], ks) / dt
            if tab.d[i] != 0:
                rhs = rhs + (float(tab.d[i]) * dt) * f_t
            ks.append(h * solve_factored(lu, rhs))
        z1 = z + lincomb(tab.b, ks)
        f1 = f(t + dt, z1)
        dense = jnp.stack([z1 - z, *(lincomb(row, ks) for row in tab.H)])
        stats = {"num_jacobians": jnp.ones((), jnp.int32),
                 "num_linear_solves": jnp.asarray(tab.num_stages, jnp.int32)}
        return Step(z=z1, error=ks[-1], dense=dense, state=f1, stats=stats)

    def interpolate(self, z0, dt, dense, theta):
        """(1-θ) z_0 + θ (z_1 + (1-θ) (K_1 + θ (K_2 + θ K_3)))."""
        theta = jnp.asarray(theta, jnp.real(z0).dtype)
        inner = dense[-1]
        for row in dense[-2:0:-1]:
            inner = row + theta * inner
        return z0 + theta * (dense[0] + (1 - theta) * inner)


def _repeats(tab, i):
    """Stage i evaluates f where stage i - 1 did (same row of a, same time)."""
    return i > 1 and tab.c[i] == tab.c[i - 1] and np.array_equal(tab.a[i, :i - 1],
                                                                 tab.a[i - 1, :i - 1]) \
        and tab.a[i, i - 1] == 0


class Rodas5P(Rosenbrock):
    """Steinebach (2023), "Construction of Rosenbrock-Wanner method Rodas5P and
    numerical benchmarks within the Julia Differential Equations package", BIT Numer.
    Math. 63, 27: 5(4), 8 stages, L-stable, stiffly accurate, with its continuous
    extension (fourth order on z' = λz, as Steinebach constructs it).
    Uses ∂f/∂t for non-autonomous f."""

    name, tableau = "rodas5p", RODAS5P


__all__ = ["Rodas5P", "Rosenbrock", "RosenbrockTableau"]
