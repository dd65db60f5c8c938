"""Butcher tableaus as validated data: a method is its numbers, checked when built.

Conventions. A method has `s` stages k_1..k_s. After each step the vector field is also
evaluated at the new point, f_1 = f(t + dt, z_1), which is the next step's k_1 (so FSAL
methods cost s evaluations a step and the others cost s as usual). `K = (k_1, ..., k_s,
f_1)` has s + 1 rows:

  z_1       = z + dt Σ_i b[i] k_i
  error     = dt Σ_i b_err[i] K_i                            (adaptive methods only)
  z(t+θdt)  = z + dt Σ_i Σ_j dense[i, j] θ^(j+1) K_i          (θ in [0, 1])
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np

_TOL = 1e-10  # published float coefficients carry 16-20 digits


@dataclasses.dataclass(frozen=True, eq=False)
class ButcherTableau:
    """An explicit Runge-Kutta method's coefficients, refused when inconsistent.

    `a` (s, s) strictly lower triangular, `b` and `c` (s,), `b_err` (s + 1,) weights of
    K giving the local error (None: a fixed-step method), `dense` (s + 1, degree)
    coefficients of θ^1..θ^degree (None: the cubic Hermite interpolant).
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    b_err: np.ndarray | None = None
    dense: np.ndarray | None = None

    def __post_init__(self):
        fields = {name: _array(getattr(self, name)) for name in ("a", "b", "c", "b_err", "dense")}
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        if self.dense is None:
            object.__setattr__(self, "dense", hermite_dense(self.b))
        self._validate()

    def _validate(self):
        s = len(self.b)
        _require(self.a.shape == (s, s), f"a has shape {self.a.shape}, expected ({s}, {s})")
        _require(self.c.shape == (s,), f"c has shape {self.c.shape}, expected ({s},)")
        _require(not np.triu(self.a).any(), "a must be strictly lower triangular")
        _require(np.allclose(self.a.sum(1), self.c, atol=_TOL), "the rows of a must sum to c")
        _require(abs(self.b.sum() - 1) < _TOL, f"b must sum to 1, sums to {self.b.sum()!r}")
        if self.b_err is not None:
            _require(self.b_err.shape == (s + 1,), f"b_err needs {s + 1} entries, one per K_i")
            _require(abs(self.b_err.sum()) < _TOL, "b_err must sum to 0 (the error of z' = 1)")
        d = self.dense
        _require(d.ndim == 2 and d.shape[0] == s + 1, f"dense needs {s + 1} rows, one per K_i")
        # θ = 1 must give z_1 and θ -> 0 the slope k_1: the interpolant joins the steps.
        _require(np.allclose(d.sum(1), np.append(self.b, 0), atol=_TOL),
                 "dense at θ = 1 must equal b (the interpolant must end at z_1)")
        _require(np.allclose(d[:, 0], np.eye(s + 1)[0], atol=_TOL),
                 "dense's θ^1 column must be (1, 0, ...) (the interpolant's slope at 0 is k_1)")

    @property
    def num_stages(self) -> int:
        return len(self.b)


def _require(condition, message):
    if not condition:
        raise ValueError(f"ButcherTableau: {message}")


def _array(x):
    return None if x is None else np.asarray(x, dtype=float)


def lower(rows):
    """A strictly lower triangular `a` from its rows below the diagonal."""
    s = len(rows) + 1
    a = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        a[i, : len(row)] = [float(x) for x in row]
    return a


def hermite_dense(b: np.ndarray) -> np.ndarray:
    """Cubic Hermite interpolation through (z0, k_1) and (z1, f_1):
    z(θ) = z0 + dt [ (3θ²-2θ³) Σ b_i k_i + (θ-2θ²+θ³) k_1 + (-θ²+θ³) f_1 ]."""
    s = len(b)
    dense = np.zeros((s + 1, 3))  # columns: θ, θ², θ³
    dense[:s, 1] += 3 * b
    dense[:s, 2] += -2 * b
    dense[0] += [1.0, -2.0, 1.0]
    dense[s] += [0.0, -1.0, 1.0]
    return dense


def quartic_dense(b, b_mid) -> np.ndarray:
    """Shampine's quartic through z0, z1, z(1/2) = z0 + dt Σ b_mid K and the slopes k_1,
    f_1: each basis polynomial Σ_j α_j θ^j (j = 1..4) is fixed by q'(0), q(1), q'(1),
    q(1/2)."""
    b, b_mid = _array(b), _array(b_mid)
    s = len(b)
    conditions = np.array([[1.0, 0, 0, 0], [1, 1, 1, 1], [1, 2, 3, 4], [0.5, 0.25, 0.125, 0.0625]])
    rhs = np.zeros((4, s + 1))
    rhs[0, 0], rhs[2, s] = 1.0, 1.0
    rhs[1, :s], rhs[3] = b, b_mid
    return np.linalg.solve(conditions, rhs).T


def poly(scale, power_of_theta, *factors):
    """Ascending coefficients (θ^1, θ^2, ...) of scale θ^power Π factors (each factor a
    polynomial given highest power first)."""
    p = np.poly1d([scale] + [0.0] * power_of_theta)
    for factor in factors:
        p = p * np.poly1d(factor)
    return p.coeffs[::-1][1:]


def pad_rows(rows):
    width = max(len(r) for r in rows)
    return np.array([np.pad(r, (0, width - len(r))) for r in rows])


F = Fraction
