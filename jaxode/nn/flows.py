"""Continuous normalizing flows (the paper's Section 4) and the planar flow baseline.

Conventions
-----------
A flow maps base samples z ~ N(0, base_std^2 I) to data x. Samples are vectors of
`dim` numbers; every method takes one sample (dim,) or a batch (N, dim). A CNF solves
a batch as ONE ODE system (as FFJORD does): the state is (z, ℓ) for the whole batch.

Every flow has the same methods: `transform(z)` -> (x, logdet) and `inverse(x)` ->
(z, logdet), where logdet = log|det ∂x/∂z| of the forward map, so that
log q(x) = log N(z; 0, base_std^2 I) - logdet; `log_prob(x)`, `nll(x)` (the maximum
likelihood loss), `sample(key, n)`, `sample_and_log_prob(key, n)` and
`reverse_kl(key, n, log_target)` (the density matching loss). A CNF with the
Hutchinson trace estimator needs `key` in transform, inverse, log_prob and nll: the
noise is drawn once per solve from it.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp

from ._util import SolverOptions, check_choice

__all__ = [
    "exact_trace", "hutchinson_trace", "PlanarField", "ConcatMLPField", "CNF", "FFJORD",
    "PlanarFlow",
]

TRACES = ("exact", "hutchinson")
NOISES = ("gaussian", "rademacher")


def exact_trace(f, z):
    """(f(z), tr ∂f/∂z) for f from (D,) to (D,): one linearisation and D Jacobian-vector
    products (fine for low dimension).

    Args:
        f: a function from (D,) to (D,).
        z: the point, (D,).

    Returns:
        (f(z), tr ∂f/∂z), the trace a scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> fz, trace = exact_trace(lambda v: 3.0 * v, jnp.ones(2))
        >>> float(trace)
        6.0
    """
    fz, jvp = jax.linearize(f, z)
    columns = jax.vmap(jvp)(jnp.eye(z.shape[-1], dtype=z.dtype))
    return fz, jnp.trace(columns)


def hutchinson_trace(f, z, eps):
    """(f(z), εᵀ (∂f/∂z) ε): Hutchinson's unbiased estimate of tr ∂f/∂z for noise ε with
    E[ε εᵀ] = I (Gaussian or Rademacher), by one vector-Jacobian product.

    Args:
        f: a function from (D,) to (D,).
        z: the point, (D,).
        eps: the probe noise, (D,).

    Returns:
        (f(z), the estimate), the estimate a scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> _, estimate = hutchinson_trace(lambda v: 3.0 * v, jnp.ones(2), jnp.array([1.0, -1.0]))
        >>> float(estimate)
        6.0
    """
    fz, vjp = jax.vjp(f, z)
    return fz, jnp.vdot(vjp(eps)[0], eps)


def _as_batch(x, dim: int):
    if x.ndim == 1 and x.shape[0] == dim:
        return x[None], True
    if x.ndim == 2 and x.shape[1] == dim:
        return x, False
    raise ValueError(f"x: expected shape ({dim},) or (N, {dim}), got {x.shape}")


class _Flow(eqx.Module):
    """The methods shared by every flow; subclasses define transform and inverse."""

    dim: eqx.AbstractVar[int]
    base_std: eqx.AbstractVar[float]

    @abc.abstractmethod
    def transform(self, z, *, key=None):
        """(x, logdet): base samples z pushed to data space."""

    @abc.abstractmethod
    def inverse(self, x, *, key=None):
        """(z, logdet): data x pulled back to the base space."""

    def base_log_prob(self, z):
        """log N(z; 0, base_std^2 I) for z of shape (..., dim)."""
        return jnp.sum(
            -0.5 * (z / self.base_std) ** 2 - math.log(self.base_std) - 0.5 * math.log(2 * math.pi),
            axis=-1,
        )

    def log_prob(self, x, *, key=None):
        """log q(x) for x of shape (dim,) or (N, dim): a scalar or (N,)."""
        z, logdet = self.inverse(x, key=key)
        return self.base_log_prob(z) - logdet

    def nll(self, x, *, key=None):
        """The maximum likelihood loss: the mean of -log q(x) over the batch x (N, dim)."""
        return -jnp.mean(self.log_prob(x, key=key))

    def sample_and_log_prob(self, key, n: int):
        """(x, log q(x)) for n samples of the flow: shapes (n, dim) and (n,)."""
        base_key, noise_key = jax.random.split(key)
        z = self.base_std * jax.random.normal(base_key, (n, self.dim))
        x, logdet = self.transform(z, key=noise_key)
        return x, self.base_log_prob(z) - logdet

    def sample(self, key, n: int):
        """n samples (n, dim) of the flow."""
        return self.sample_and_log_prob(key, n)[0]

    def reverse_kl(self, key, n: int, log_target):
        """The density matching loss: a Monte Carlo estimate with n samples of
        KL(q || p) - log Z = E_q[log q(x) - log_target(x)], for an unnormalised target
        log density `log_target` mapping one sample (dim,) to a scalar."""
        x, log_q = self.sample_and_log_prob(key, n)
        return jnp.mean(log_q - jax.vmap(log_target)(x))


class _ContinuousFlow(_Flow, SolverOptions):
    """A CNF: dz/dt = func(z, t) on [t0, t1], with d ℓ/dt = tr ∂f/∂z integrated jointly
    (the instantaneous change of variables, d log p(z(t))/dt = -tr ∂f/∂z). The exact
    trace is the field's own `func.with_divergence(z, t)`."""

    func: eqx.AbstractVar[eqx.Module]
    dim: int = eqx.field(static=True)
    base_std: float = eqx.field(static=True)
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)
    trace: str = eqx.field(static=True)
    noise: str = eqx.field(static=True)

    def _set_options(self, *, dim, base_std, t0, t1, trace, noise, solver, rtol, atol,
                     adjoint, dt0, max_steps):
        """Every option but func, checked; called by the subclasses' __init__."""
        check_choice("trace", trace, TRACES)
        check_choice("noise", noise, NOISES)
        self.dim, self.base_std, self.t0, self.t1 = dim, base_std, t0, t1
        self.trace, self.noise = trace, noise
        self._set_solver_options(solver=solver, rtol=rtol, atol=atol, adjoint=adjoint,
                                 dt0=dt0, max_steps=max_steps)

    def _noise(self, key, shape, dtype):
        if self.trace == "exact":
            return None
        if key is None:
            raise ValueError("key: the Hutchinson trace estimator draws its noise from a key")
        if self.noise == "rademacher":
            return jax.random.rademacher(key, shape, dtype)
        return jax.random.normal(key, shape, dtype)

    def solve(self, z, t_start, t_end, *, key=None):
        """Integrate (z, ℓ) from t_start to t_end for z of shape (dim,) or (N, dim):
        returns (z(t_end), ∫_{t_start}^{t_end} tr ∂f/∂z dt, stats). With the Hutchinson
        estimator the noise ε ~ N(0, I) (or Rademacher) is drawn once, from key, and
        held fixed during the solve."""
        zb, single = _as_batch(z, self.dim)
        eps = self._noise(key, zb.shape, zb.dtype)

        def field(state, t, args):
            func, eps = args
            if eps is None:
                return jax.vmap(lambda v: func.with_divergence(v, t))(state[0])
            f = lambda v: func(v, t)
            return jax.vmap(lambda v, e: hutchinson_trace(f, v, e))(state[0], eps)

        ts = jnp.asarray([t_start, t_end], zb.dtype)
        sol = self._solve(field, (zb, jnp.zeros(zb.shape[0], zb.dtype)), ts, (self.func, eps))
        z_end, integral = sol.zs[0][-1], sol.zs[1][-1]
        if single:
            z_end, integral = z_end[0], integral[0]
        return z_end, integral, sol.stats

    def transform(self, z, *, key=None):
        """(x, logdet): z solved from t0 to t1; logdet = ∫_{t0}^{t1} tr ∂f/∂z dt."""
        x, integral, _ = self.solve(z, self.t0, self.t1, key=key)
        return x, integral

    def inverse(self, x, *, key=None):
        """(z, logdet): x solved from t1 back to t0."""
        z, integral, _ = self.solve(x, self.t1, self.t0, key=key)
        return z, -integral


class PlanarField(eqx.Module):
    """The planar CNF's vector field f(z, t) = Σ_m u_m(t) tanh(w_m(t)ᵀ z + b_m(t)),
    m = 1..width, its parameters the output of a hypernetwork of t (two tanh layers of
    `hyper_hidden` units), with u gated: u_m(t) = û_m(t) ⊙ σ(g_m(t)).

    Args:
        dim: the size of z.
        width: M, the number of planar units.
        hyper_hidden: the hypernetwork's hidden units.
        key: a JAX PRNG key for the hypernetwork's weights.
    """

    hyper: eqx.nn.MLP
    dim: int = eqx.field(static=True)
    width: int = eqx.field(static=True)

    def __init__(self, *, dim: int = 2, width: int = 64, hyper_hidden: int = 32, key):
        self.hyper = eqx.nn.MLP(
            1, 3 * width * dim + width, hyper_hidden, 2, activation=jnp.tanh, key=key
        )
        self.dim, self.width = dim, width

    def _planes(self, t, dtype):
        """(w, gated u, b) at time t: (width, dim), (width, dim), (width,)."""
        params = self.hyper(jnp.asarray(t, dtype)[None])
        block = self.width * self.dim
        w = params[:block].reshape(self.width, self.dim)
        u = params[block : 2 * block].reshape(self.width, self.dim)
        gate = jax.nn.sigmoid(params[2 * block : 3 * block].reshape(self.width, self.dim))
        return w, u * gate, params[3 * block :]

    def __call__(self, z, t):
        w, u, b = self._planes(t, z.dtype)
        return u.T @ jnp.tanh(w @ z + b)

    def with_divergence(self, z, t):
        """(f(z, t), tr ∂f/∂z) with the trace in closed form, Σ_m (1 - tanh²(w_m·z + b_m))
        u_m·w_m: O(width · dim), no Jacobian-vector products (the CNF uses it for its
        exact trace)."""
        w, u, b = self._planes(t, z.dtype)
        h = jnp.tanh(w @ z + b)
        return u.T @ h, jnp.sum((1 - h**2) * jnp.sum(u * w, axis=1))


class ConcatMLPField(eqx.Module):
    """An MLP vector field f(z, t) whose every layer sees t as an extra input:
    h_{k+1} = act(W_k [h_k, t] + b_k), linear last layer (FFJORD's "concat" layers).

    Args:
        dim: the size of z.
        hidden: the hidden layers' widths.
        activation: the activation between layers.
        key: a JAX PRNG key for the weights.
    """

    layers: tuple
    activation: callable = eqx.field(static=True)

    def __init__(self, *, dim: int = 2, hidden: tuple = (64, 64), activation=jnp.tanh, key):
        sizes = (dim, *hidden, dim)
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a + 1, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        )
        self.activation = activation

    def __call__(self, z, t):
        time = jnp.asarray(t, z.dtype)[None]
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(jnp.concatenate([h, time]))
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h

    def with_divergence(self, z, t):
        """(f(z, t), tr ∂f/∂z), the trace from D Jacobian-vector products."""
        return exact_trace(lambda v: self(v, t), z)


class CNF(_ContinuousFlow):
    """The paper's planar continuous normalizing flow (Section 4, Figures 4-6):
    dz/dt = `PlanarField` with `width` M hidden units, integrated over [t0, t1].
    `trace="exact"` (default; in closed form, `PlanarField.with_divergence`) or
    `"hutchinson"` (one vector-Jacobian product per probe, `noise="gaussian"` or
    `"rademacher"`, drawn once per solve). log_prob integrates from t1 back to t0.
    Solver defaults: dopri5 at rtol = atol = 1e-5, the paper's density estimation
    tolerance. (The authors' maximum likelihood example: t1 = 10, base_std = 0.1**0.5.)

    Args:
        dim: the size of a sample.
        width: M, the planar units of the vector field.
        hyper_hidden: the hidden units of the hypernetwork of t.
        base_std: the base distribution's standard deviation.
        t0: the start of the flow's time interval (the base distribution's end).
        t1: the end of the interval (the data's end).
        trace: "exact" or "hutchinson".
        noise: the Hutchinson probes' distribution, "gaussian" or "rademacher".
        solver: the ODE solver, a name (see `jaxode.SOLVERS`) or a solver object.
        rtol: relative tolerance of the solve.
        atol: absolute tolerance of the solve.
        adjoint: how gradients flow through the solve: "backsolve" (the adjoint
            method), "direct" or "forward", or a `jaxode.Backsolve`/`Direct`/`Forward`.
        dt0: the first step (adaptive solvers; None chooses it) or every step
            (fixed-step solvers).
        max_steps: the most steps one solve may take (reaching it is an error).
        key: a JAX PRNG key for the weights.

    Raises:
        ValueError: an unknown trace or noise.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> flow = CNF(dim=2, width=4, rtol=1e-3, atol=1e-3, key=jax.random.PRNGKey(0))
        >>> flow.log_prob(jnp.zeros((3, 2))).shape
        (3,)
        >>> flow.sample(jax.random.PRNGKey(1), 5).shape
        (5, 2)
    """

    func: PlanarField

    def __init__(
        self, *, dim: int = 2, width: int = 64, hyper_hidden: int = 32, base_std: float = 1.0,
        t0: float = 0.0, t1: float = 1.0, trace: str = "exact", noise: str = "gaussian",
        solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
        adjoint: str = "backsolve", dt0: float | None = None, max_steps: int = 4096, key,
    ):
        self._set_options(dim=dim, base_std=base_std, t0=t0, t1=t1, trace=trace, noise=noise,
                          solver=solver, rtol=rtol, atol=atol, adjoint=adjoint, dt0=dt0,
                          max_steps=max_steps)
        self.func = PlanarField(dim=dim, width=width, hyper_hidden=hyper_hidden, key=key)


class FFJORD(_ContinuousFlow):
    """An FFJORD-style CNF (Grathwohl et al. 2019) for data of any dimension: dz/dt =
    `ConcatMLPField` (hidden sizes `hidden`, activation tanh), with Hutchinson's trace
    estimator by default (`noise="gaussian"` or `"rademacher"`, drawn once per solve;
    `trace="exact"` also works). Methods as every flow (module docstring).

    Args:
        dim: the size of a sample.
        hidden: the vector field's hidden layers' widths.
        activation: the vector field's activation.
        base_std: the base distribution's standard deviation.
        t0: the start of the flow's time interval.
        t1: its end.
        trace: "hutchinson" or "exact".
        noise: the Hutchinson probes' distribution, "gaussian" or "rademacher".
        solver: the ODE solver, a name (see `jaxode.SOLVERS`) or a solver object.
        rtol: relative tolerance of the solve.
        atol: absolute tolerance of the solve.
        adjoint: how gradients flow through the solve: "backsolve" (the adjoint
            method), "direct" or "forward", or a `jaxode.Backsolve`/`Direct`/`Forward`.
        dt0: the first step (adaptive solvers; None chooses it) or every step
            (fixed-step solvers).
        max_steps: the most steps one solve may take (reaching it is an error).
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> flow = FFJORD(dim=2, hidden=(8,), rtol=1e-3, atol=1e-3, key=jax.random.PRNGKey(0))
        >>> flow.nll(jnp.zeros((4, 2)), key=jax.random.PRNGKey(1)).shape   # noise from key
        ()
    """

    func: ConcatMLPField

    def __init__(
        self, *, dim: int = 2, hidden: tuple = (64, 64), activation=jnp.tanh,
        base_std: float = 1.0, t0: float = 0.0, t1: float = 1.0, trace: str = "hutchinson",
        noise: str = "gaussian", solver: str = "dopri5", rtol: float = 1e-5,
        atol: float = 1e-5, adjoint: str = "backsolve", dt0: float | None = None,
        max_steps: int = 4096, key,
    ):
        self._set_options(dim=dim, base_std=base_std, t0=t0, t1=t1, trace=trace, noise=noise,
                          solver=solver, rtol=rtol, atol=atol, adjoint=adjoint, dt0=dt0,
                          max_steps=max_steps)
        self.func = ConcatMLPField(dim=dim, hidden=tuple(hidden), activation=activation, key=key)


class PlanarFlow(_Flow):
    """The planar normalizing flow (Rezende & Mohamed 2015), the paper's baseline:
    K = `num_layers` maps z <- z + û_k tanh(w_kᵀ z + b_k), each with
    log|det| = log|1 + (1 - tanh²(w_kᵀ z + b_k)) w_kᵀ û_k|, where
    û = u + (m(wᵀu) - wᵀu) w / |w|², m(a) = -1 + softplus(a), keeps wᵀû > -1 so that
    every layer is invertible. The inverse solves each layer's scalar equation
    s = a + (wᵀû) tanh(a) for a = wᵀz + b by bisection (then one Newton step, which
    carries the gradient by the implicit function theorem), so `log_prob` is exact.

    Args:
        dim: the size of a sample.
        num_layers: K, the number of planar maps.
        base_std: the base distribution's standard deviation.
        init_scale: the standard deviation of the initial w, u, b.
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> flow = PlanarFlow(dim=2, num_layers=8, key=jax.random.PRNGKey(0))
        >>> x = flow.sample(jax.random.PRNGKey(1), 4)
        >>> z, logdet = flow.inverse(x)
        >>> x.shape, logdet.shape
        ((4, 2), (4,))
    """

    w: jax.Array
    u: jax.Array
    b: jax.Array
    dim: int = eqx.field(static=True)
    base_std: float = eqx.field(static=True)

    def __init__(self, *, dim: int = 2, num_layers: int = 64, base_std: float = 1.0,
                 init_scale: float = 0.1, key):
        kw, ku, kb = jax.random.split(key, 3)
        self.w = init_scale * jax.random.normal(kw, (num_layers, dim))
        self.u = init_scale * jax.random.normal(ku, (num_layers, dim))
        self.b = init_scale * jax.random.normal(kb, (num_layers,))
        self.dim, self.base_std = dim, base_std

    def constrained_u(self):
        """û (num_layers, dim), the invertibility-constrained u."""
        wu = jnp.sum(self.w * self.u, axis=-1, keepdims=True)
        m = -1.0 + jax.nn.softplus(wu)
        return self.u + (m - wu) * self.w / jnp.sum(self.w**2, axis=-1, keepdims=True)

    def transform(self, z, *, key=None):
        zb, single = _as_batch(z, self.dim)
        u_hat = self.constrained_u()

        def layer(carry, params):
            h, logdet = carry
            w, u, b = params
            a = h @ w + b
            h = h + jnp.tanh(a)[:, None] * u
            logdet = logdet + jnp.log(jnp.abs(1 + (1 - jnp.tanh(a) ** 2) * jnp.dot(w, u)))
            return (h, logdet), None

        init = (zb, jnp.zeros(zb.shape[0], zb.dtype))
        (x, logdet), _ = jax.lax.scan(layer, init, (self.w, u_hat, self.b))
        return (x[0], logdet[0]) if single else (x, logdet)

    def inverse(self, x, *, key=None):
        xb, single = _as_batch(x, self.dim)
        u_hat = self.constrained_u()
        iterations = 2 * jnp.finfo(xb.dtype).nmant + 8

        def solve_scalar(s, c):
            """a with a + c tanh(a) = s (monotone in a since c > -1)."""
            g = lambda a: a + c * jnp.tanh(a) - s

            def bisect(_, bounds):
                lo, hi = bounds
                mid = 0.5 * (lo + hi)
                above = g(mid) > 0
                return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

            radius = jnp.abs(c) + 1.0
            lo, hi = jax.lax.fori_loop(
                0, iterations, bisect, jax.lax.stop_gradient((s - radius, s + radius))
            )
            a = jax.lax.stop_gradient(0.5 * (lo + hi))
            return a - g(a) / (1 + c * (1 - jnp.tanh(a) ** 2))

        def layer(carry, params):
            h, logdet = carry
            w, u, b = params
            c = jnp.dot(w, u)
            a = jax.vmap(lambda s: solve_scalar(s, c))(h @ w + b)
            h = h - jnp.tanh(a)[:, None] * u
            logdet = logdet + jnp.log(jnp.abs(1 + (1 - jnp.tanh(a) ** 2) * c))
            return (h, logdet), None

        init = (xb, jnp.zeros(xb.shape[0], xb.dtype))
        (z, logdet), _ = jax.lax.scan(layer, init, (self.w, u_hat, self.b), reverse=True)
        return (z[0], logdet[0]) if single else (z, logdet)
