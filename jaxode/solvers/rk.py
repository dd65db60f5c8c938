"""Explicit Runge-Kutta methods: one generic step, each method a validated tableau.

All coefficients are NumPy constants: they are baked into the compiled program, and
zero coefficients are skipped while tracing.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import lax

from .base import AbstractSolver, Step
from .tableau import ButcherTableau, F, lower, pad_rows, poly, quartic_dense

STAGE_LOOP_SIZE = 256
DIFFERENTIATED_STAGE_LOOP_SIZE = 65_536  # an ODE-Net's convolutional state loops its stages


def lincomb(coeffs, vectors):
    """Σ c_i v_i for static coefficients, skipping zeros (unrolled while tracing)."""
    terms = [float(c) * v for c, v in zip(coeffs, vectors) if c != 0]
    if not terms:
        return jnp.zeros_like(vectors[0])
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class ExplicitRK(AbstractSolver):
    """An explicit Runge-Kutta method given by its `tableau`; its state is f(t, z), the
    next step's first stage.

    stage_loop: evaluate the stages in a `lax.fori_loop`, so that the compiled program
    holds one copy of f instead of one per stage (much faster to compile, a little
    slower per step); None (default) loops for states of `STAGE_LOOP_SIZE` elements or
    more, where one evaluation of f outweighs the loop's overhead, and of
    `DIFFERENTIATED_STAGE_LOOP_SIZE` or more when reverse mode differentiates the steps.
    """

    tableau: ClassVar[ButcherTableau]
    stage_loop: bool | None = eqx.field(default=None, static=True, kw_only=True)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "tableau" in cls.__dict__:
            cls.step_nfe = cls.tableau.num_stages
            if (cls.tableau.b_err is None) != (cls.error_order is None):
                raise TypeError(f"{cls.__name__}: error_order must be given iff b_err is")

    def init(self, f, t0, z0, f0):
        return f0

    def differentiated(self, n):
        # Differentiated, a stage loop stacks f's residuals for every stage in buffers
        # that are zeroed and copied at each reverse step (7% of the MLP benchmark's
        # direct gradient, whose XLA compile the loop does not shorten).
        if self.stage_loop is None and n < DIFFERENTIATED_STAGE_LOOP_SIZE:
            return dataclasses.replace(self, stage_loop=False)
        return self

    def step(self, f, t, z, dt, k1) -> Step:
        tab = self.tableau
        loop = z.size >= STAGE_LOOP_SIZE if self.stage_loop is None else self.stage_loop
        if loop:
            z1, stages = self._looped_stages(f, t, z, dt, k1)
            rows = [stages[..., i, :] for i in range(tab.num_stages + 1)]
        else:
            rows = [k1]
            for i in range(1, tab.num_stages):
                z_i = z + dt * lincomb(tab.a[i, :i], rows)
                rows.append(f(t + float(tab.c[i]) * dt, z_i))
            z1 = z + dt * lincomb(tab.b, rows)
            rows.append(f(t + dt, z1))
        # Static weights over the rows: fused elementwise work, no matrix product.
        error = None if tab.b_err is None else dt * lincomb(tab.b_err, rows)
        # Dense output as the coefficients D_m = Σ_i dense[i, m] K_i of θ^(m+1), once a
        # step: an output time then costs a Horner evaluation of D, not a weight per stage
        # (per lane and time, under vmap, recomputed for every element of the state).
        dense = jnp.stack([lincomb(column, rows) for column in tab.dense.T], axis=-2)
        return Step(z=z1, error=error, dense=dense, state=rows[-1])

    def _looped_stages(self, f, t, z, dt, k1):
        """The stages k_2..k_s and f_1 as rows 1..s of the extended tableau (f_1's row of a
        is b, its c is 1), in one loop."""
        tab, s = self.tableau, self.tableau.num_stages
        a = np.zeros((s + 1, s + 1))
        a[:s, :s], a[s, :s] = tab.a, tab.b
        a, c = jnp.asarray(a), jnp.asarray(np.append(tab.c, 1.0), jnp.real(z).dtype)

        def stage(i, carry):
            stages, _ = carry
            # One row of weights for all lanes: a single contraction compiles smallest.
            z_i = z + dt * jnp.einsum("s,...sn->...n", a[i].astype(stages.dtype), stages)
            return stages.at[..., i, :].set(f(t + c[i] * dt, z_i)), z_i

        stages = jnp.zeros((*z.shape[:-1], s + 1, z.shape[-1]), z.dtype).at[..., 0, :].set(k1)
        stages, z1 = lax.fori_loop(1, s + 1, stage, (stages, z))
        return z1, stages

    def interpolate(self, z0, dt, dense, theta):
        return polynomial(z0, dt, dense, theta)


def polynomial(z0, dt, coefficients, theta):
    """z0 + dt Σ_m θ^(m+1) D_m for coefficients D (..., degree, n), by Horner's rule in
    products (a vmapped power would cost a pow per lane and time, and a cumulative
    product a scan in its derivative)."""
    theta = jnp.asarray(theta, jnp.real(z0).dtype)
    total = coefficients[..., -1, :]
    for m in range(coefficients.shape[-2] - 2, -1, -1):
        total = total * theta + coefficients[..., m, :]
    return z0 + dt * theta * total


def _v(xs):
    return np.array([float(x) for x in xs])


# ---------------------------------------------------------------- fixed step

EULER = ButcherTableau(
    a=np.zeros((1, 1)), b=_v([1]), c=_v([0]))
MIDPOINT = ButcherTableau(
    a=lower([[F(1, 2)]]), b=_v([0, 1]), c=_v([0, F(1, 2)]))
HEUN = ButcherTableau(
    a=lower([[1]]), b=_v([F(1, 2), F(1, 2)]), c=_v([0, 1]))
RALSTON = ButcherTableau(
    a=lower([[F(2, 3)]]),
    b=_v([F(1, 4), F(3, 4)]),
    c=_v([0, F(2, 3)]),
)
CLASSIC_RK4 = ButcherTableau(
    a=lower([[F(1, 2)], [0, F(1, 2)], [0, 0, 1]]),
    b=_v([F(1, 6), F(1, 3), F(1, 3), F(1, 6)]),
    c=_v([0, F(1, 2), F(1, 2), 1]),
)

# ---------------------------------------------------------------- adaptive

HEUN_EULER = ButcherTableau(
    a=lower([[1]]),
    b=_v([F(1, 2), F(1, 2)]),
    c=_v([0, 1]),
    b_err=_v([F(1, 2) - 1, F(1, 2), 0]),
)

# Fehlberg's RK1(2): the third stage sits on the first-order solution.
FEHLBERG2 = ButcherTableau(
    a=lower([[F(1, 2)], [F(1, 256), F(255, 256)]]),
    b=_v([F(1, 512), F(255, 256), F(1, 512)]),
    c=_v([0, F(1, 2), 1]),
    b_err=_v([F(1, 512) - F(1, 256), 0, F(1, 512), 0]),
)

BOSH3 = ButcherTableau(
    a=lower([[F(1, 2)], [0, F(3, 4)]]),
    b=_v([F(2, 9), F(1, 3), F(4, 9)]),
    c=_v([0, F(1, 2), F(3, 4)]),
    b_err=_v([F(2, 9) - F(7, 24), F(1, 3) - F(1, 4), F(4, 9) - F(1, 3), -F(1, 8)]),
)

_DOPRI5_B = [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84)]
# The embedded fourth-order weights of diffrax, torchdiffeq and jax.experimental.ode
# (Hairer's DOPRI5 code has another set, whose larger estimate takes ~6% more steps):
# the same steps as those libraries for a drop-in replacement.
_DOPRI5_B_LOW = [
    F(1951, 21600),
    0,
    F(22642, 50085),
    F(451, 720),
    F(-12231, 42400),
    F(649, 6300),
    F(1, 60),
]
# Shampine's weights for z at the middle of the step (fourth order there).
_DOPRI5_B_MID = [
    F(6025192743, 30085553152) / 2,
    0,
    F(51252292925, 65400821598) / 2,
    F(-2691868925, 45128329728) / 2,
    F(187940372067, 1594534317056) / 2,
    F(-1776094331, 19743644256) / 2,
    F(11237099, 235043384) / 2,
]
DOPRI5 = ButcherTableau(
    a=lower(
        [
            [F(1, 5)],
            [F(3, 40), F(9, 40)],
            [F(44, 45), F(-56, 15), F(32, 9)],
            [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)],
            [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)],
        ],
    ),
    b=_v(_DOPRI5_B),
    c=_v([0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1]),
    b_err=_v([x - y for x, y in zip([*_DOPRI5_B, 0], _DOPRI5_B_LOW)]),
    dense=quartic_dense(_v(_DOPRI5_B), _v(_DOPRI5_B_MID)),
)

# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first
# column simplifying assumption", with its continuous extension.
_TSIT5_B = np.array(
    [
        0.09646076681806523,
        0.01,
        0.4798896504144996,
        1.379008574103742,
        -3.290069515436081,
        2.324710524099774,
    ]
)
_TSIT5_B_LOW = np.array(
    [
        0.09468075576583945,
        0.009183565540343254,
        0.4877705284247616,
        1.234297566930479,
        -2.7077123499835256,
        1.866628418170587,
        1 / 66,
    ]
)
TSIT5 = ButcherTableau(
    a=lower(
        [
            [0.161],
            [-0.008480655492356989, 0.335480655492357],
            [2.8971530571054935, -6.359448489975075, 4.3622954328695815],
            [
                5.325864828439257,
                -11.748883564062828,
                7.4955393428898365,
                -0.09249506636175525,
            ],
            [
                5.86145544294642,
                -12.92096931784711,
                8.159367898576159,
                -0.071584973281401,
                -0.028269050394068383,
            ],
        ],
    ),
    b=_TSIT5_B,
    c=np.array([0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0]),
    b_err=np.append(_TSIT5_B, 0.0) - _TSIT5_B_LOW,
    dense=pad_rows(
        [
            poly(-1.0530884977290216, 1, [1, -1.3299890189751412],
                  [1, -1.4364028541716351, 0.7139816917074209]),
            poly(0.1017, 2, [1, -2.1966568338249754, 1.2949852507374631]),
            poly(2.490627285651252793, 2, [1, -2.38535645472061657, 1.57803468208092486]),
            poly(-16.54810288924490272, 2, [1, -1.21712927295533244],
                  [1, -0.61620406037800089]),
            poly(47.37952196281928122, 2, [1, -1.203071208372362603],
                  [1, -0.658047292653547382]),
            poly(-34.87065786149660974, 2, [1, -1.2], [1, -2 / 3]),
            poly(2.5, 2, [1, -1.0], [1, -0.6]),
        ]
    ),
)

# Prince & Dormand (1981) RK8(7)13M, with Bogacki & Shampine's (1990) interpolant.
_DOPRI8_B = [
    F(14005451, 335480064),
    0,
    0,
    0,
    0,
    F(-59238493, 1068277825),
    F(181606767, 758867731),
    F(561292985, 797845732),
    F(-1041891430, 1371343529),
    F(760417239, 1151165299),
    F(118820643, 751138087),
    F(-528747749, 2220607170),
    F(1, 4),
]
_DOPRI8_B_LOW = [
    F(13451932, 455176623),
    0,
    0,
    0,
    0,
    F(-808719846, 976000145),
    F(1757004468, 5645159321),
    F(656045339, 265891186),
    F(-3867574721, 1518517206),
    F(465885868, 322736535),
    F(53011238, 667516719),
    F(2, 45),
    0,
    0,
]
# Rows: K_i; columns: coefficients of θ^6 .. θ^1 (highest first), times θ.
_DOPRI8_DENSE_HIGH_FIRST = np.array(
    [
        [-6.3448349392860401388, 22.1396504998094068976, -30.0610568289666450593,
         19.9990069333683970610, -6.6910181737837595697, 1.0],
        [0.0] * 6,
        [0.0] * 6,
        [0.0] * 6,
        [0.0] * 6,
        [-39.6107919852202505218, 116.4422149550342161651, -121.4999627731334642623,
         52.2273532792945524050, -7.6142658045872677172, 0.0],
        [20.3761213808791436958, -67.1451318825957197185, 83.1721004639847717481,
         -46.8919164181093621583, 10.7281392630428866124, 0.0],
        [7.3347098826795362023, -16.5672243527496524646, 9.5724507555993664382,
         -0.1890893225010595467, 0.5526637063753648783, 0.0],
        [32.8801774352459155182, -89.9916014847245016028, 87.8406057677205645007,
         -35.7075975946222072821, 4.2186562625665153803, 0.0],
        [-10.1588990526426760954, 22.6237489648532849093, -17.4152107770762969005,
         6.2736448083240352160, -0.6627209125361597559, 0.0],
        [-12.5401268098782561200, 32.2362340167355370113, -28.5903289514790976966,
         10.3160881272450748458, -1.2636789001135462218, 0.0],
        [29.5553001484516038033, -82.1020315488359848644, 81.6630950584341412934,
         -34.7650769866611817349, 5.4106037898590422230, 0.0],
        [-41.7923486424390588923, 116.2662185791119533462, -114.9375291377009418170,
         47.7457971078225540396, -7.0321379067945741781, 0.0],
        [20.3006925822100825485, -53.9020777466385396792, 50.2558364226176017553,
         -19.0082099341608028453, 2.3537586759714983486, 0.0],
    ]
)
DOPRI8 = ButcherTableau(
    a=lower(
        [
            [F(1, 18)],
            [F(1, 48), F(1, 16)],
            [F(1, 32), 0, F(3, 32)],
            [F(5, 16), 0, F(-75, 64), F(75, 64)],
            [F(3, 80), 0, 0, F(3, 16), F(3, 20)],
            [F(29443841, 614563906), 0, 0, F(77736538, 692538347),
             F(-28693883, 1125000000), F(23124283, 1800000000)],
            [F(16016141, 946692911), 0, 0, F(61564180, 158732637),
             F(22789713, 633445777), F(545815736, 2771057229), F(-180193667, 1043307555)],
            [F(39632708, 573591083), 0, 0, F(-433636366, 683701615),
             F(-421739975, 2616292301), F(100302831, 723423059), F(790204164, 839813087),
             F(800635310, 3783071287)],
            [F(246121993, 1340847787), 0, 0, F(-37695042795, 15268766246),
             F(-309121744, 1061227803), F(-12992083, 490766935), F(6005943493, 2108947869),
             F(393006217, 1396673457), F(123872331, 1001029789)],
            [F(-1028468189, 846180014), 0, 0, F(8478235783, 508512852),
             F(1311729495, 1432422823), F(-10304129995, 1701304382),
             F(-48777925059, 3047939560), F(15336726248, 1032824649),
             F(-45442868181, 3398467696), F(3065993473, 597172653)],
            [F(185892177, 718116043), 0, 0, F(-3185094517, 667107341),
             F(-477755414, 1098053517), F(-703635378, 230739211), F(5731566787, 1027545527),
             F(5232866602, 850066563), F(-4093664535, 808688257), F(3962137247, 1805957418),
             F(65686358, 487910083)],
            [F(403863854, 491063109), 0, 0, F(-5068492393, 434740067),
             F(-411421997, 543043805), F(652783627, 914296604), F(11173962825, 925320556),
             F(-13158990841, 6184727034), F(3936647629, 1978049680),
             F(-160528059, 685178525), F(248638103, 1413531060), 0],
        ],
    ),
    b=_v(_DOPRI8_B),
    c=_v([0, F(1, 18), F(1, 12), F(1, 8), F(5, 16), F(3, 8), F(59, 400), F(93, 200),
            F(5490023248, 9719169821), F(13, 20), F(1201146811, 1299019798), 1, 1]),
    b_err=_v([x - y for x, y in zip([*_DOPRI8_B, 0], _DOPRI8_B_LOW)]),
    dense=_DOPRI8_DENSE_HIGH_FIRST[:, ::-1].copy(),
)


class Euler(ExplicitRK):
    """Forward Euler: order 1, fixed step (Euler, 1768)."""

    name, tableau, order = "euler", EULER, 1


class Midpoint(ExplicitRK):
    """The explicit midpoint method: order 2, fixed step (Runge, 1895)."""

    name, tableau, order = "midpoint", MIDPOINT, 2


class Heun(ExplicitRK):
    """Heun's method (the explicit trapezoid): order 2, fixed step (Heun, 1900)."""

    name, tableau, order = "heun", HEUN, 2


class Ralston(ExplicitRK):
    """Ralston's second-order method, least truncation error: fixed step (Ralston, 1962)."""

    name, tableau, order = "ralston", RALSTON, 2


class RK4(ExplicitRK):
    """The classic fourth-order Runge-Kutta method: fixed step (Kutta, 1901)."""

    name, tableau, order = "rk4", CLASSIC_RK4, 4


class HeunEuler(ExplicitRK):
    """Heun-Euler 2(1): adaptive, Heun's method with Euler as the error estimate."""

    name, tableau, order, error_order = "heun_euler", HEUN_EULER, 2, 1


class Fehlberg2(ExplicitRK):
    """Fehlberg's RK1(2) (NASA TR R-315, 1969): adaptive, order 2 propagated."""

    name, tableau, order, error_order = "fehlberg2", FEHLBERG2, 2, 1


class Bosh3(ExplicitRK):
    """Bogacki & Shampine (1989), "A 3(2) pair of Runge-Kutta formulas": adaptive, FSAL."""

    name, tableau, order, error_order = "bosh3", BOSH3, 3, 2


class Dopri5(ExplicitRK):
    """Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae": 5(4),
    adaptive, FSAL, with Shampine's (1986) quartic dense output."""

    name, tableau, order, error_order = "dopri5", DOPRI5, 5, 4


class Tsit5(ExplicitRK):
    """Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column
    simplifying assumption": adaptive, FSAL, with its continuous extension."""

    name, tableau, order, error_order = "tsit5", TSIT5, 5, 4


class Dopri8(ExplicitRK):
    """Prince & Dormand (1981), "High order embedded Runge-Kutta formulae", RK8(7)13M:
    adaptive, FSAL, with Bogacki & Shampine's fifth-order interpolant."""

    name, tableau, order, error_order = "dopri8", DOPRI8, 8, 7
