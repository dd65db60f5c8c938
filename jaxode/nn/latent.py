"""Latent ODEs for irregularly sampled time series (the paper's Section 5).

Conventions
-----------
One sequence is `ts` of shape (T,) (strictly increasing observation times), `xs` of
shape (T, D) and an optional observation `mask` of shape (T, D) (1 = observed, 0 =
missing; None = everything observed). Every method works on ONE sequence and returns
per-sequence values; batches go through `jax.vmap` (split the key per sequence), each
sequence then getting its own solver steps. Sequences of different lengths can be
padded with mask = 0 at extra, still increasing, times.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from ._util import SolverOptions, check_choice, gaussian_log_prob

__all__ = [
    "RNNCell", "RNNEncoder", "ODERNNEncoder", "LatentODE", "RNNBaseline", "gaussian_kl",
]

CELLS = ("gru", "rnn")
ENCODERS = ("gru", "rnn", "odernn")


def gaussian_kl(mean, log_std):
    """KL(N(mean, diag(exp(log_std)^2)) || N(0, I)), summed over the last axis.

    Args:
        mean: the Gaussian's mean, (..., d).
        log_std: the log of its standard deviations, (..., d).

    Returns:
        The KL divergence, with the last axis summed out.

    Examples:
        >>> import jax.numpy as jnp
        >>> float(gaussian_kl(jnp.zeros(3), jnp.zeros(3)))
        0.0
    """
    return 0.5 * jnp.sum(jnp.exp(2 * log_std) + mean**2 - 1.0 - 2 * log_std, axis=-1)


def _mask_of(xs, mask):
    return jnp.ones_like(xs) if mask is None else jnp.asarray(mask, xs.dtype)


class RNNCell(eqx.Module):
    """A plain (Elman) recurrent cell: h' = tanh(W [x, h] + b).

    Args:
        input_size: the size of x.
        hidden_size: the size of h.
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> cell = RNNCell(2, 5, key=jax.random.PRNGKey(0))
        >>> cell(jnp.ones(2), jnp.zeros(5)).shape
        (5,)
    """

    linear: eqx.nn.Linear

    def __init__(self, input_size: int, hidden_size: int, *, key):
        self.linear = eqx.nn.Linear(input_size + hidden_size, hidden_size, key=key)

    def __call__(self, x, h):
        return jnp.tanh(self.linear(jnp.concatenate([x, h])))


def _make_cell(cell: str, input_size: int, hidden_size: int, key):
    check_choice("cell", cell, CELLS)
    if cell == "gru":
        return eqx.nn.GRUCell(input_size, hidden_size, key=key)
    return RNNCell(input_size, hidden_size, key=key)


class RNNEncoder(eqx.Module):
    """Recognition network q(z0 | x) = N(mean, diag(std^2)): an RNN (GRU or plain) run
    backwards in time over the observations, reading [x * mask, mask, gap] at each time
    (gap: the time to the next observed time, the one it read before), then a linear map
    of its final hidden state to (mean, log_std). Times with nothing observed leave the
    hidden state unchanged (so padding does not change the result).
    `encoder(ts, xs, mask)` returns (mean, log_std), each (latent_dim,), for z at ts[0].

    Args:
        obs_dim: D, the size of one observation.
        hidden_size: the RNN's hidden units.
        latent_dim: the size of z0.
        cell: "gru" or "rnn".
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> encoder = RNNEncoder(obs_dim=2, latent_dim=4, key=jax.random.PRNGKey(0))
        >>> mean, log_std = encoder(jnp.linspace(0.0, 1.0, 7), jnp.ones((7, 2)))
        >>> mean.shape, log_std.shape
        ((4,), (4,))
    """

    cell: eqx.Module
    out: eqx.nn.Linear
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self, *, obs_dim: int = 2, hidden_size: int = 25, latent_dim: int = 4,
        cell: str = "gru", key,
    ):
        k1, k2 = jax.random.split(key)
        self.cell = _make_cell(cell, 2 * obs_dim + 1, hidden_size, k1)
        self.out = eqx.nn.Linear(hidden_size, 2 * latent_dim, key=k2)
        self.hidden_size = hidden_size

    def __call__(self, ts, xs, mask=None):
        mask = _mask_of(xs, mask)

        def step(carry, inputs):
            h, t_next, seen = carry
            t, x, m = inputs
            observed = jnp.any(m > 0)
            gap = jnp.where(seen, t_next - t, 0.0)
            h = jnp.where(observed, self.cell(jnp.concatenate([x * m, m, gap[None]]), h), h)
            return (h, jnp.where(observed, t, t_next), seen | observed), None

        h0 = jnp.zeros(self.hidden_size, xs.dtype)
        init = (h0, ts[-1].astype(xs.dtype), jnp.asarray(False))
        (h, _, _), _ = jax.lax.scan(step, init, (ts.astype(xs.dtype), xs, mask), reverse=True)
        mean, log_std = jnp.split(self.out(h), 2)
        return mean, log_std


class _MLPField(eqx.Module):
    """An autonomous vector field f(z, t) = MLP(z)."""

    mlp: eqx.nn.MLP

    def __call__(self, z, t):
        return self.mlp(z)


class ODERNNEncoder(SolverOptions):
    """ODE-RNN recognition network (Rubanova, Chen & Duvenaud 2019), run backwards in
    time: the hidden state h starts at zero at ts[-1], between consecutive observation
    times it evolves by dh/dt = MLP(h) (one `jaxode.odeint` per interval, from t_{i+1}
    back to t_i), and at each time with an observation a GRU reads [x * mask, mask].
    A linear map of h at ts[0] gives (mean, log_std) of q(z0 | x). h stays at zero
    until the latest observation (so trailing padding does not change the result).
    The ODE solves use `solver`, `rtol`, `atol`, `adjoint`, `dt0` and `max_steps` as
    `jaxode.odeint` does.

    Args:
        obs_dim: D, the size of one observation.
        hidden_size: the size of h.
        latent_dim: the size of z0.
        ode_hidden: the hidden units of the MLP giving dh/dt.
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
        >>> encoder = ODERNNEncoder(obs_dim=2, latent_dim=3, key=jax.random.PRNGKey(0))
        >>> mean, log_std = encoder(jnp.linspace(0.0, 1.0, 4), jnp.ones((4, 2)))
        >>> mean.shape
        (3,)
    """

    cell: eqx.nn.GRUCell
    func: _MLPField
    out: eqx.nn.Linear
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self, *, obs_dim: int = 2, hidden_size: int = 25, latent_dim: int = 4,
        ode_hidden: int = 25, solver: str = "dopri5", rtol: float = 1e-5,
        atol: float = 1e-7, adjoint: str = "backsolve", dt0: float | None = None,
        max_steps: int = 4096, key,
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        self.cell = eqx.nn.GRUCell(2 * obs_dim, hidden_size, key=k1)
        self.func = _MLPField(
            eqx.nn.MLP(hidden_size, hidden_size, ode_hidden, 1, activation=jnp.tanh, key=k2)
        )
        self.out = eqx.nn.Linear(hidden_size, 2 * latent_dim, key=k3)
        self.hidden_size = hidden_size
        self._set_solver_options(solver=solver, rtol=rtol, atol=atol, adjoint=adjoint,
                                 dt0=dt0, max_steps=max_steps)

    def _update(self, h, x, m):
        return jnp.where(jnp.any(m > 0), self.cell(jnp.concatenate([x * m, m]), h), h)

    def __call__(self, ts, xs, mask=None):
        mask = _mask_of(xs, mask)
        ts = ts.astype(xs.dtype)
        h = self._update(jnp.zeros(self.hidden_size, xs.dtype), xs[-1], mask[-1])

        def step(carry, inputs):
            h, seen = carry
            t_later, t, x, m = inputs
            evolved = self._solve(
                lambda z, t, func: func(z, t), h, jnp.stack([t_later, t]), self.func
            ).zs[-1]
            # Before the latest observation (trailing padding) h stays at zero.
            h = jnp.where(seen, evolved, h)
            return (self._update(h, x, m), seen | jnp.any(m > 0)), None

        inputs = (ts[1:], ts[:-1], xs[:-1], mask[:-1])
        (h, _), _ = jax.lax.scan(step, (h, jnp.any(mask[-1] > 0)), inputs, reverse=True)
        mean, log_std = jnp.split(self.out(h), 2)
        return mean, log_std


class _Augmented(eqx.Module):
    """d(z, Λ)/dt = (f(z, t), λ(z)): the latent state with the integrated intensity."""

    func: eqx.Module
    intensity: eqx.Module

    def __call__(self, state, t):
        z, _ = state
        return self.func(z, t), self.intensity(z)


class _Intensity(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, z):
        return jax.nn.softplus(self.mlp(z)[0])


class LatentODE(SolverOptions):
    """The latent ODE model (the paper's Section 5, Figure 6).

    Generative model: z0 ~ N(0, I); z(t) solves dz/dt = f(z) (an MLP of `dyn_depth`
    hidden layers of `dyn_hidden` units, ELU) from z0 at ts[0]; x(t_i) ~
    N(decoder(z(t_i)), obs_std^2 I) with the decoder an MLP of `dec_hidden` units
    (ReLU). Recognition: q(z0 | x) from an `RNNEncoder` run backwards (`encoder="gru"`
    or `"rnn"`, `rec_hidden` units) or an `ODERNNEncoder` (`encoder="odernn"`).
    `learn_std=True` learns the observation noise (starting at obs_std). `poisson=True`
    adds an intensity λ(z) = softplus(MLP(z)) and the Poisson process likelihood of the
    observation times, log p = Σ_i log λ(z(t_i)) - ∫ λ(z(t)) dt over [ts[0], ts[-1]],
    with the integral carried as an extra ODE state. The solver options are those of
    `jaxode.odeint` (the paper used 1.5e-8).

    Methods (one sequence; see the module docstring): `encode`, `elbo`, `elbo_terms`,
    `trajectory`, `decode`, `predict`, `reconstruct`, `sample_prior`,
    `poisson_log_likelihood`.

    Args:
        obs_dim: D, the size of one observation.
        latent_dim: the size of the latent state z.
        rec_hidden: the recognition network's hidden units.
        dyn_hidden: the latent dynamics MLP's hidden units (and the intensity's).
        dyn_depth: the latent dynamics MLP's hidden layers.
        dec_hidden: the decoder MLP's hidden units.
        encoder: "gru", "rnn" (an `RNNEncoder`) or "odernn" (an `ODERNNEncoder`).
        obs_std: the observation noise's standard deviation (its start when learned).
        learn_std: learn the observation noise.
        poisson: add the Poisson process likelihood of the observation times.
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
        ValueError: an unknown encoder.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> model = LatentODE(obs_dim=2, latent_dim=4, rtol=1e-3, atol=1e-3,
        ...                   key=jax.random.PRNGKey(0))
        >>> ts, xs = jnp.linspace(0.0, 1.0, 6), jnp.ones((6, 2))
        >>> model.elbo(jax.random.PRNGKey(1), ts, xs).shape          # maximise it
        ()
        >>> model.reconstruct(ts, xs, None, jnp.linspace(0.0, 2.0, 9)).shape
        (9, 2)
    """

    encoder: eqx.Module
    func: _MLPField
    decoder: eqx.nn.MLP
    intensity: _Intensity | None
    log_obs_std: jax.Array | None
    obs_std: float = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        obs_dim: int = 2,
        latent_dim: int = 4,
        rec_hidden: int = 25,
        dyn_hidden: int = 20,
        dyn_depth: int = 1,
        dec_hidden: int = 20,
        encoder: str = "gru",
        obs_std: float = 0.3,
        learn_std: bool = False,
        poisson: bool = False,
        solver: str = "dopri5",
        rtol: float = 1e-6,
        atol: float = 1e-8,
        adjoint: str = "backsolve",
        dt0: float | None = None,
        max_steps: int = 4096,
        key,
    ):
        check_choice("encoder", encoder, ENCODERS)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        if encoder == "odernn":
            self.encoder = ODERNNEncoder(
                obs_dim=obs_dim, hidden_size=rec_hidden, latent_dim=latent_dim,
                solver=solver, rtol=rtol, atol=atol, adjoint=adjoint, dt0=dt0,
                max_steps=max_steps, key=k1,
            )
        else:
            self.encoder = RNNEncoder(
                obs_dim=obs_dim, hidden_size=rec_hidden, latent_dim=latent_dim,
                cell=encoder, key=k1,
            )
        self.func = _MLPField(
            eqx.nn.MLP(latent_dim, latent_dim, dyn_hidden, dyn_depth, activation=jax.nn.elu,
                       key=k2)
        )
        self.decoder = eqx.nn.MLP(latent_dim, obs_dim, dec_hidden, 1, key=k3)
        self.intensity = (
            _Intensity(eqx.nn.MLP(latent_dim, 1, dyn_hidden, 1, activation=jax.nn.elu, key=k4))
            if poisson
            else None
        )
        self.log_obs_std = jnp.asarray(math.log(obs_std)) if learn_std else None
        self.obs_std = obs_std
        self.latent_dim = latent_dim
        self._set_solver_options(solver=solver, rtol=rtol, atol=atol, adjoint=adjoint,
                                 dt0=dt0, max_steps=max_steps)

    def _odeint(self, f, z0, ts, params):
        """(zs, stats) of the latent solve; stats["nfe"] the forward evaluations."""
        sol = self._solve(f, z0, ts, params)
        return sol.zs, sol.stats

    def _log_std(self, dtype):
        if self.log_obs_std is None:
            return jnp.asarray(math.log(self.obs_std), dtype)
        return self.log_obs_std.astype(dtype)

    def encode(self, ts, xs, mask=None):
        """(mean, log_std) of q(z0 | x), z0 being the latent state at ts[0]."""
        return self.encoder(ts, xs, mask)

    def sample_prior(self, key):
        """z0 ~ N(0, I), a sample of the prior."""
        return jax.random.normal(key, (self.latent_dim,))

    def trajectory(self, z0, ts):
        """The latent states z(ts) (len(ts), latent_dim), z0 being z(ts[0])."""
        return self._trajectory(z0, ts)[0]

    def _trajectory(self, z0, ts):
        return self._odeint(lambda z, t, func: func(z, t), z0, ts.astype(z0.dtype), self.func)

    def decode(self, zs):
        """The observation means for latent states zs (..., latent_dim)."""
        return _per_row(self.decoder, zs)

    def predict(self, z0, ts, *, t0=None):
        """Decoded means x̂(ts) (len(ts), obs_dim) from z0 at time t0 (default ts[0];
        otherwise ts[0] >= t0). Works for any increasing times: reconstruction inside
        the observed window and extrapolation after it."""
        ts = ts.astype(z0.dtype)
        if t0 is None:
            return self.decode(self.trajectory(z0, ts))
        t0 = jnp.asarray(t0, z0.dtype)
        # Solve over (t0, ts); when ts[0] == t0 an intermediate time stands in for it
        # (the solve's times must be strictly monotonic) and z0 is its output.
        at_t0 = ts[0] == t0
        later = ts[1] if ts.shape[0] > 1 else t0 + 1
        first = jnp.where(at_t0, (t0 + later) / 2, ts[0])
        zs = self.trajectory(z0, jnp.concatenate([t0[None], first[None], ts[1:]]))[1:]
        zs = zs.at[0].set(jnp.where(at_t0, z0, zs[0]))
        return self.decode(zs)

    def reconstruct(self, ts, xs, mask, ts_pred, *, key=None):
        """Encode the observations (ts, xs, mask) and predict the means at ts_pred
        (increasing times from ts[0] on; those after ts[-1] are extrapolation), from the
        posterior mean (key=None) or a posterior sample."""
        mean, log_std = self.encode(ts, xs, mask)
        z0 = mean
        if key is not None:
            z0 = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.predict(z0, ts_pred, t0=ts[0])

    def poisson_log_likelihood(self, z0, ts, event_mask=None, *, t_end=None):
        """log p(events) = Σ_i log λ(z(t_i)) - ∫_{ts[0]}^{t_end} λ(z(t)) dt of events at
        the times ts[i] with event_mask[i] true (default: all), z0 being z(ts[0]) (the
        window's start: mask it out if it is no event); t_end defaults to ts[-1], and
        when given must come after it. The integral is one more state of the same solve.
        """
        if self.intensity is None:
            raise ValueError("poisson_log_likelihood: build the model with poisson=True")
        ts = ts.astype(z0.dtype)
        times = ts if t_end is None else jnp.concatenate([ts, jnp.asarray(t_end, z0.dtype)[None]])
        (zs, big_lambda), _ = self._augmented_solve(z0, times)
        events = jnp.ones(ts.shape, bool) if event_mask is None else jnp.asarray(event_mask, bool)
        rates = jax.vmap(self.intensity)(zs[: ts.shape[0]])
        return jnp.sum(jnp.where(events, jnp.log(rates), 0.0)) - big_lambda[-1]

    def _augmented_solve(self, z0, ts):
        field = _Augmented(self.func, self.intensity)
        state0 = (z0, jnp.zeros((), z0.dtype))
        return self._odeint(lambda s, t, f: f(s, t), state0, ts, field)

    def elbo_terms(self, key, ts, xs, mask=None):
        """The ELBO's parts for one sequence, with one posterior sample: a dict with
        `elbo` = `log_likelihood` (+ `poisson`) - `kl`, and the latent solve's `nfe`."""
        mask = _mask_of(xs, mask)
        ts = ts.astype(xs.dtype)
        mean, log_std = self.encode(ts, xs, mask)
        z0 = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
        terms = {}
        if self.intensity is None:
            zs, stats = self._trajectory(z0, ts)
        else:
            (zs, big_lambda), stats = self._augmented_solve(z0, ts)
            events = jnp.any(mask > 0, axis=-1)
            rates = jax.vmap(self.intensity)(zs)
            terms["poisson"] = jnp.sum(jnp.where(events, jnp.log(rates), 0.0)) - big_lambda[-1]
        x_mean = self.decode(zs)
        log_lik = gaussian_log_prob(xs, x_mean, self._log_std(xs.dtype))
        terms["log_likelihood"] = jnp.sum(log_lik * mask)
        terms["kl"] = gaussian_kl(mean, log_std)
        terms["elbo"] = terms["log_likelihood"] + terms.get("poisson", 0.0) - terms["kl"]
        terms["nfe"] = stats["nfe"]
        return terms

    def elbo(self, key, ts, xs, mask=None):
        """The evidence lower bound of one sequence (one posterior sample): Gaussian
        log-likelihood of the observed entries (+ the Poisson process term when built
        with poisson=True) minus KL(q(z0 | x) || N(0, I)). Maximise it."""
        return self.elbo_terms(key, ts, xs, mask)["elbo"]


def _per_row(fn, xs):
    """fn (for one vector) applied along the last axis of xs."""
    flat = xs.reshape(-1, xs.shape[-1])
    out = jax.vmap(fn)(flat)
    return out.reshape(*xs.shape[:-1], out.shape[-1])


class RNNBaseline(eqx.Module):
    """The RNN baseline of Section 5 (Table 2): a recurrent cell (`cell="gru"` or
    `"rnn"`, 25 hidden units) that at time t_i reads the previous observation
    [x_{i-1} * mask, mask] and the time gap t_i - t_{i-1}, and predicts x_i as
    N(linear(h_i), obs_std^2) (obs_std learned with `learn_std=True`).

    `log_likelihood(ts, xs, mask)`: one-step-ahead Gaussian log-likelihood of the
    observed entries (maximise it). `one_step_predictions(ts, xs, mask)`: the means
    x̂(ts). `predict(ts, xs, mask, ts_pred)`: after reading the sequence, predicts at
    the later times ts_pred, feeding its own predictions back (extrapolation).

    Args:
        obs_dim: D, the size of one observation.
        hidden_size: the cell's hidden units.
        cell: "gru" or "rnn".
        obs_std: the prediction's standard deviation (its start when learned).
        learn_std: learn the standard deviation.
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> rnn = RNNBaseline(obs_dim=2, key=jax.random.PRNGKey(0))
        >>> ts, xs = jnp.linspace(0.0, 1.0, 6), jnp.ones((6, 2))
        >>> rnn.predict(ts, xs, None, jnp.linspace(1.2, 2.0, 5)).shape
        (5, 2)
    """

    cell: eqx.Module
    out: eqx.nn.Linear
    log_obs_std: jax.Array | None
    obs_std: float = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self, *, obs_dim: int = 2, hidden_size: int = 25, cell: str = "gru",
        obs_std: float = 0.3, learn_std: bool = False, key,
    ):
        k1, k2 = jax.random.split(key)
        self.cell = _make_cell(cell, 2 * obs_dim + 1, hidden_size, k1)
        self.out = eqx.nn.Linear(hidden_size, obs_dim, key=k2)
        self.log_obs_std = jnp.asarray(math.log(obs_std)) if learn_std else None
        self.obs_std = obs_std
        self.hidden_size = hidden_size

    def _read(self, ts, xs, mask):
        """Teacher-forced pass: the hidden states' predictions at ts and the final carry."""
        mask = _mask_of(xs, mask)
        ts = ts.astype(xs.dtype)

        def step(carry, inputs):
            h, x_prev, m_prev, t_prev = carry
            t, x, m = inputs
            h = self.cell(jnp.concatenate([x_prev * m_prev, m_prev, (t - t_prev)[None]]), h)
            return (h, x, m, t), self.out(h)

        zeros = jnp.zeros_like(xs[0])
        init = (jnp.zeros(self.hidden_size, xs.dtype), zeros, zeros, ts[0])
        carry, preds = jax.lax.scan(step, init, (ts, xs, mask))
        return preds, carry

    def one_step_predictions(self, ts, xs, mask=None):
        """x̂(t_i) given the observations before t_i: (T, obs_dim)."""
        return self._read(ts, xs, mask)[0]

    def log_likelihood(self, ts, xs, mask=None):
        """Σ over observed entries of log N(x_i; x̂(t_i), obs_std^2)."""
        preds = self.one_step_predictions(ts, xs, mask)
        log_std = (
            jnp.asarray(math.log(self.obs_std), xs.dtype)
            if self.log_obs_std is None
            else self.log_obs_std.astype(xs.dtype)
        )
        return jnp.sum(gaussian_log_prob(xs, preds, log_std) * _mask_of(xs, mask))

    def predict(self, ts, xs, mask, ts_pred):
        """Means at ts_pred (after ts[-1]), fed back autoregressively: (len, obs_dim)."""
        _, (h, x_prev, m_prev, t_prev) = self._read(ts, xs, mask)

        def step(carry, t):
            h, x_prev, m_prev, t_prev = carry
            h = self.cell(jnp.concatenate([x_prev * m_prev, m_prev, (t - t_prev)[None]]), h)
            x = self.out(h)
            return (h, x, jnp.ones_like(x), t), x

        _, preds = jax.lax.scan(step, (h, x_prev, m_prev, t_prev), ts_pred.astype(xs.dtype))
        return preds

