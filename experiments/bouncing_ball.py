"""kind: bouncing_ball — a ball's restitution e and gravity g learned through event times.

A ball dropped from rest at a known height h0 bounces on the floor h = 0; each bounce
turns the impact velocity v into -e v. The data are the first K bounce times and the
K apex heights (the top of the flight after each bounce), from the closed form with
Gaussian noise (seeded):

    t_1 = sqrt(2 h0 / g),  t_{n+1} = t_n + 2 e^n sqrt(2 g h0) / g,  apex_n = e^{2n} h0.

The model integrates free fall dz/dt = (v, -g) with `jaxode.solve`, one solve per
half-flight chained by `lax.scan`: from rest (or an apex) to the floor event
(h crosses 0 downwards), the reset v -> -e v, then to the apex event (v crosses 0
downwards); each solve starts at the previous event's time and state. Bounce times
and apex heights are the solves' `event_time` and `event_state`, differentiated by the
implicit function theorem, so e = sigmoid(.) and g = exp(.) are fitted by Adam through
them from a wrong start (`model.e_init`, `model.g_init`). The loss is the mean squared
bounce-time error (relative to the first observed bounce time) plus `height_weight`
times the mean squared apex error (relative to h0).

With `model.neural_event`, a second ball learns its floor event too, as in Chen, Amos &
Nickel (2021), "Learning Neural Event Functions": cond(z) = h + s h0 MLP(z / scale)
(s = `model.event_scale`; the random MLP displaces the floor at the start), trained
with e and g on the same data plus `floor_weight` times the mean squared height of its
bounces relative to h0 (an observed bounce is the ball on the floor: without that term
nothing in the data says where the floor is). The summary reports where its learned
event fires (the heights of its bounces; 0 is the true floor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxode

from .config import RunConfig, SolverConfig
from .report import Report, model_label, pyplot, save_figure
from .runner import Experiment


@dataclass(kw_only=True)
class BallData:
    h0: float = 1.0  # drop height (m), known to the model
    e: float = 0.8  # true restitution coefficient
    g: float = 9.81  # true gravity (m/s^2)
    bounces: int = 5  # K: bounce times and apexes observed
    time_noise: float = 0.002  # std of the observed bounce times (s)
    height_noise: float = 0.002  # std of the observed apex heights (m)
    horizon: float = 5.0  # each half-flight solve's span (s): an event must come before

    def check(self):
        errors = {}
        for name in ("h0", "g", "horizon"):
            if not getattr(self, name) > 0:
                errors[name] = f"must be positive, got {getattr(self, name)}"
        if not 0 < self.e < 1:
            errors["e"] = f"must be in (0, 1), got {self.e}"
        if self.bounces < 1:
            errors["bounces"] = f"must be a positive integer, got {self.bounces}"
        for name in ("time_noise", "height_noise"):
            if getattr(self, name) < 0:
                errors[name] = f"must be >= 0, got {getattr(self, name)}"
        return errors


@dataclass(kw_only=True)
class BallModel:
    e_init: float = 0.5  # the wrong start
    g_init: float = 5.0
    height_weight: float = 1.0  # weight of the apex term in the loss
    # Weight of "the ball is on the floor (h = 0) at each bounce" (0 for the parametric
    # ball, whose event is h = 0): the only data on where a learned event should fire.
    floor_weight: float = 10.0
    neural_event: bool = False  # also train a ball whose floor event is an MLP
    width: int = 16  # the event MLP's
    depth: int = 2
    # cond = h + event_scale h0 MLP(z): the floor's initial displacement, and (Adam
    # moving each weight at about lr a step) how fast the learned event may move.
    event_scale: float = 0.02

    def check(self):
        errors = {}
        if not 0 < self.e_init < 1:
            errors["e_init"] = f"must be in (0, 1), got {self.e_init}"
        if not self.g_init > 0:
            errors["g_init"] = f"must be positive, got {self.g_init}"
        for name in ("height_weight", "floor_weight"):
            if getattr(self, name) < 0:
                errors[name] = f"must be >= 0, got {getattr(self, name)}"
        for name in ("width", "depth"):
            if getattr(self, name) < 1:
                errors[name] = f"must be a positive integer, got {getattr(self, name)}"
        if not self.event_scale > 0:
            errors["event_scale"] = f"must be positive, got {self.event_scale}"
        return errors


@dataclass(kw_only=True)
class Config(RunConfig):
    dtype: Literal["float32", "float64"] = "float64"
    data: BallData = field(default_factory=BallData)
    model: BallModel = field(default_factory=BallModel)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        rtol=1e-8, atol=1e-10, max_steps=1000))

    def check(self):
        errors = super().check()
        # The slowest fall (true g or the start's) must end inside one solve's span.
        fall = np.sqrt(2 * self.data.h0 / min(self.data.g, self.model.g_init))
        if self.data.horizon <= 2 * fall:
            errors["data.horizon"] = (f"must exceed twice the longest fall, 2 sqrt(2 h0 / g) = "
                                      f"{2 * fall:.3g} s; got {self.data.horizon}")
        return errors


def closed_form(e, g, h0, k):
    """(bounce times, apex heights) of the first k bounces of a ball dropped from rest."""
    n = np.arange(1, k + 1)
    speeds = e**n * np.sqrt(2 * g * h0)  # upward speed after bounce n
    flights = np.concatenate([[0.0], np.cumsum(2 * speeds[:-1] / g)])
    return np.sqrt(2 * h0 / g) + flights, speeds**2 / (2 * g)


def closed_form_height(t, e, g, h0, k):
    """The true height at times t, up to the apex after bounce k."""
    times, _ = closed_form(e, g, h0, k)
    speeds = e ** np.arange(1, k + 1) * np.sqrt(2 * g * h0)
    n = np.searchsorted(times, t, side="right")  # bounces before t
    start = np.where(n > 0, times[np.maximum(n - 1, 0)], 0.0)
    u = np.where(n > 0, speeds[np.maximum(n - 1, 0)], 0.0)
    s = t - start
    return np.where(n > 0, u * s - g * s**2 / 2, h0 - g * t**2 / 2)


class Ball(eqx.Module):
    """e = sigmoid(e_logit), g = exp(log_g) (always valid); the floor event h = 0, or
    h + event_scale h_scale MLP(z / (h_scale, v_scale)) when `net` is set."""

    e_logit: jax.Array
    log_g: jax.Array
    net: eqx.nn.MLP | None = None
    h_scale: float = eqx.field(static=True, default=1.0)
    v_scale: float = eqx.field(static=True, default=1.0)
    event_scale: float = eqx.field(static=True, default=1.0)

    @property
    def e(self):
        return jax.nn.sigmoid(self.e_logit)

    @property
    def g(self):
        return jnp.exp(self.log_g)

    def floor(self, z):
        if self.net is None:
            return z[0]
        x = z / jnp.array([self.h_scale, self.v_scale], z.dtype)
        return z[0] + self.event_scale * self.h_scale * self.net(x)


def _fall(z, t, ball):
    return jnp.stack([z[1], -ball.g])


# Module-level conds: the same Event objects each call, so jaxode's compiled solve is reused.
FLOOR = jaxode.Event(lambda z, t, ball: ball.floor(z), direction=-1)
APEX = jaxode.Event(lambda z, t, ball: z[1], direction=-1)


def flights(ball, h0, k, horizon, options):
    """The chain of 2k solves: drop from rest at h0, then k times (floor event, reset
    v -> -e v, apex event). Returns {bounce_times, bounce_states (before the reset),
    apex_times, apex_states, happened (k, 2), steps}, each with a leading axis of k."""

    def solve(t, z, event):
        sol = jaxode.solve(_fall, z, jnp.stack([t, t + horizon]), ball, event=event,
                           **options)
        return sol.event_time, sol.event_state, sol.event_happened, sol.stats["num_steps"]

    def flight(carry, _):
        t, z = carry
        tb, zb, hit, n_down = solve(t, z, FLOOR)
        ta, za, top, n_up = solve(tb, jnp.stack([zb[0], -ball.e * zb[1]]), APEX)
        return (ta, za), {"bounce_times": tb, "bounce_states": zb, "apex_times": ta,
                          "apex_states": za, "happened": jnp.stack([hit, top]),
                          "steps": n_down + n_up}

    z0 = jnp.stack([jnp.asarray(h0, ball.log_g.dtype), jnp.zeros((), ball.log_g.dtype)])
    start = (jnp.zeros((), ball.log_g.dtype), z0)
    return jax.lax.scan(flight, start, None, length=k)[1]


def raw(e, g, dtype):
    """The unconstrained parameters (e_logit, log_g) of (e, g)."""
    return jnp.asarray(np.log(e / (1 - e)), dtype), jnp.asarray(np.log(g), dtype)


class BouncingBall(Experiment):
    Config = Config
    title = "Bouncing ball: restitution and gravity through event times"
    progress_fields = ("loss", "e", "g")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d = cfg.data
        self.true_times, self.true_apexes = closed_form(d.e, d.g, d.h0, d.bounces)
        rng = np.random.default_rng(cfg.seed)
        self.times = self.true_times + d.time_noise * rng.standard_normal(d.bounces)
        self.apexes = self.true_apexes + d.height_noise * rng.standard_normal(d.bounces)
        self.options = {**cfg.solver.options(), "throw": False}
        self._flights_jit = eqx.filter_jit(self._flights)
        self.least_squares = self._least_squares()

    def init_models(self, key):
        m, dtype = self.cfg.model, self.ctx.dtype
        models = {"ball": Ball(*raw(m.e_init, m.g_init, dtype))}
        if m.neural_event:
            net = eqx.nn.MLP(2, "scalar", m.width, m.depth, activation=jnp.tanh, key=key)
            net = jax.tree_util.tree_map(
                lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, net)
            # The speed scale from the data: a drop from rest hits at 2 h0 / t_1.
            h0 = self.cfg.data.h0
            models["neural_event"] = Ball(*raw(m.e_init, m.g_init, dtype), net, h0,
                                          float(2 * h0 / self.times[0]), m.event_scale)
        return models

    def batch(self, step):
        return {"times": self.times, "apexes": self.apexes}

    def _flights(self, ball):
        d = self.cfg.data
        return flights(ball, d.h0, d.bounces, d.horizon, self.options)

    def _residuals(self, out, times, apexes):
        """The loss's residuals: times relative to the first bounce's, heights to h0."""
        r_t = (out["bounce_times"] - times) / self.times[0]
        r_h = (out["apex_states"][:, 0] - apexes) / self.cfg.data.h0
        return r_t, r_h

    def loss(self, models, batch, key):
        total, metrics = 0.0, {}
        for name, ball in models.items():
            out = self._flights(ball)
            r_t, r_h = self._residuals(out, batch["times"], batch["apexes"])
            r_f = out["bounce_states"][:, 0] / self.cfg.data.h0
            m = self.cfg.model
            value = (jnp.mean(r_t**2) + m.height_weight * jnp.mean(r_h**2)
                     + m.floor_weight * jnp.mean(r_f**2))
            total = total + value
            metrics.update({f"{name}/loss": value, f"{name}/e": ball.e, f"{name}/g": ball.g,
                            f"{name}/steps": jnp.sum(out["steps"])})
        return total, metrics

    def measure(self, ball) -> dict:
        """Errors against the noise-free truth, and where the floor event fired."""
        out = jax.tree_util.tree_map(np.asarray, self._flights_jit(ball))
        dt = np.abs(out["bounce_times"] - self.true_times)
        dh = np.abs(out["apex_states"][:, 0] - self.true_apexes)
        return {"e": float(ball.e), "g": float(ball.g), "time_error_max": float(dt.max()),
                "time_error_mean": float(dt.mean()), "apex_error_max": float(dh.max()),
                "event_height_max": float(np.abs(out["bounce_states"][:, 0]).max()),
                "missed_events": int((~out["happened"]).sum()), "steps": int(out["steps"].sum())}

    def evaluate(self, models, step):
        return {f"{name}/{k}": v for name, ball in models.items()
                for k, v in self.measure(ball).items()}

    def _least_squares(self):
        """(e, g) minimising the same loss on the closed form, from the same start: what
        the noisy data allow (Levenberg-Marquardt; scipy is not a runner dependency)."""
        d, m = self.cfg.data, self.cfg.model
        w = np.sqrt(m.height_weight)

        def residuals(x):
            e, g = 1 / (1 + np.exp(-x[0])), np.exp(x[1])
            times, apexes = closed_form(e, g, d.h0, d.bounces)
            return np.concatenate([(times - self.times) / self.times[0],
                                   w * (apexes - self.apexes) / d.h0])

        x, damping = np.array(raw(m.e_init, m.g_init, np.float64)), 1e-3
        for _ in range(200):
            r = residuals(x)
            jac = np.stack([(residuals(x + h) - residuals(x - h)) / 2e-7
                            for h in 1e-7 * np.eye(2)], axis=1)
            step = np.linalg.solve(jac.T @ jac + damping * np.eye(2), -jac.T @ r)
            if np.sum(residuals(x + step) ** 2) < np.sum(r**2):
                x, damping = x + step, damping / 3
            else:
                damping *= 4
            if np.max(np.abs(step)) < 1e-13:
                break
        return float(1 / (1 + np.exp(-x[0]))), float(np.exp(x[1]))

    def report(self, models, log):
        out, d, m = self.ctx.out_dir, self.cfg.data, self.cfg.model
        final = log.split("eval")[-1]
        initial = self.measure(Ball(*raw(m.e_init, m.g_init, self.ctx.dtype)))
        rows = [self._row("truth", d.e, d.g, None),
                self._row("initial guess", m.e_init, m.g_init, initial),
                self._row("least squares on the closed form", *self.least_squares,
                          self._closed_form_errors(*self.least_squares))]
        for name in models:
            learned = {k.split("/", 1)[1]: v for k, v in final.items()
                       if k.startswith(name + "/")}
            label = "learned (floor h = 0)" if name == "ball" else "learned, neural event"
            rows.append(self._row(label, learned["e"], learned["g"], learned))
        figures = [self._plot(models, out), self._plot_training(list(models),
                                                                 log.split("train"), out)]
        notes = [f"data: {d.bounces} bounce times (noise std {d.time_noise:g} s) and apex "
                 f"heights (std {d.height_noise:g} m), h0 = {d.h0:g} m; errors against the "
                 "noise-free closed form; event height: the largest |h| at which the "
                 "model's floor event fired (0 for the true floor)."]
        for name in models:
            if final.get(f"{name}/missed_events"):
                notes.append(f"{name}: {final[f'{name}/missed_events']:.0f} of its events did "
                             f"not happen within data.horizon = {d.horizon:g} s.")
        return Report(self.title, rows, figures=figures, notes=notes)

    def _closed_form_errors(self, e, g):
        times, apexes = closed_form(e, g, self.cfg.data.h0, self.cfg.data.bounces)
        dt = np.abs(times - self.true_times)
        return {"time_error_max": float(dt.max()), "time_error_mean": float(dt.mean()),
                "apex_error_max": float(np.abs(apexes - self.true_apexes).max())}

    def _row(self, label, e, g, errors):
        errors = errors or {}
        ms = lambda key: 1e3 * errors[key] if key in errors else "-"
        return {"model": label, "e": float(e), "g (m/s²)": float(g),
                "bounce time error max (ms)": ms("time_error_max"),
                "mean (ms)": ms("time_error_mean"),
                "apex error max (mm)": ms("apex_error_max"),
                "event height max (mm)": ms("event_height_max")}

    def _trajectory(self, ball, points=40):
        """(t, h) along the model's chain of solves, `points` outputs per half-flight."""
        d, opts = self.cfg.data, {**self.options, "event": None}
        out = jax.tree_util.tree_map(np.asarray, self._flights_jit(ball))
        starts = [(0.0, np.array([d.h0, 0.0]))]
        ends = []
        for n in range(d.bounces):
            zb = out["bounce_states"][n]
            ends += [out["bounce_times"][n], out["apex_times"][n]]
            starts += [(ends[-2], np.array([zb[0], -float(ball.e) * zb[1]])),
                       (ends[-1], out["apex_states"][n])]
        ts, hs = [], []
        for (t0, z0), t1 in zip(starts, ends):
            if not t1 > t0:
                continue
            grid = jnp.linspace(t0, t1, points, dtype=self.ctx.dtype)
            zs = jaxode.odeint(_fall, jnp.asarray(z0, self.ctx.dtype), grid, ball, **opts)
            ts.append(np.asarray(grid))
            hs.append(np.asarray(zs[:, 0]))
        return np.concatenate(ts), np.concatenate(hs), out["bounce_times"]

    def _plot(self, models, out):
        d, m = self.cfg.data, self.cfg.model
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(9, 3.6))
        t = np.linspace(0, self.true_times[-1] + self.true_apexes[-1] ** 0.5 * (2 / d.g) ** 0.5,
                        800)
        ax.plot(t, closed_form_height(t, d.e, d.g, d.h0, d.bounces), "g-", lw=1.4,
                label=f"truth (e={d.e:g}, g={d.g:g})")
        curves = [("initial guess", Ball(*raw(m.e_init, m.g_init, self.ctx.dtype)), "0.6", ":")]
        curves += [("learned" if name == "ball" else "learned, neural event", ball,
                    "C0" if name == "ball" else "C3", "--") for name, ball in models.items()]
        for label, ball, color, style in curves:
            ts, hs, bounces = self._trajectory(ball)
            ax.plot(ts, hs, color=color, ls=style, lw=1.3,
                    label=f"{label} (e={float(ball.e):.3f}, g={float(ball.g):.2f})")
            ax.plot(bounces, np.zeros_like(bounces), "|", color=color, ms=14, mew=1.5)
        ax.plot(self.times, np.zeros_like(self.times), "kx", ms=6, label="observed bounces")
        ax.plot(self.true_times + self.true_apexes ** 0.5 * (2 / d.g) ** 0.5, self.apexes,
                "k.", ms=7, label="observed apexes")
        ax.set_xlabel("t (s)")
        ax.set_ylabel("height (m)")
        ax.set_xlim(0, t[-1] * 1.02)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
                  frameon=False)
        ax.grid(alpha=0.3)
        return save_figure(fig, out, "trajectories.png")

    def _plot_training(self, names, train, out):
        """Each model's loss (log scale), e and g against the step, the truth dashed."""
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        steps = [r["step"] for r in train]
        truth = {"e": self.cfg.data.e, "g": self.cfg.data.g}
        for ax, key in zip(axes, ("loss", "e", "g")):
            for name in names:
                ax.plot(steps, [r[f"{name}/{key}"] for r in train], lw=1.4,
                        label=model_label(name))
            if key in truth:
                ax.axhline(truth[key], color="g", ls="--", lw=1, label="truth")
            else:
                ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_title({"loss": "training loss", "e": "e", "g": "g (m/s²)"}[key])
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, out, "training.png")
