"""kind: stiff_robertson — a neural vector field learns Robertson's stiff kinetics.

Robertson's reactions (rate constants 0.04, 3e7, 1e4) from y = (1, 0, 0), observed at
log-spaced times in [t_min, t_end] with multiplicative noise. As Kim et al. (2021),
"Stiff Neural Ordinary Differential Equations", the species are scaled by their
largest value (y2 peaks near 3.6e-5, the others near 1): the model is

    dy/dt = s ⊙ exp(g) ⊙ MLP(y / s),   s = max_t y_true(t),

with g a learned log gain per species started at the data's largest rate (`Field`),

and the loss is the mean squared error of y / s over the observation times. It is
trained with a stiff solver (rodas5p or kvaerno5, `solver.method`) through the adjoint
method (`solver.adjoint`); the summary compares the fitted trajectories with the truth
(log time axis) and reports what dopri5 does on the trained model and on the true
kinetics (steps, or its max_steps failure).
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
from .report import Report, plot_curves, pyplot, save_figure
from .runner import Experiment

RATES = (0.04, 3e7, 1e4)


def robertson(y, t, k):
    return jnp.stack([-k[0] * y[0] + k[2] * y[1] * y[2],
                      k[0] * y[0] - k[1] * y[1] ** 2 - k[2] * y[1] * y[2],
                      k[1] * y[1] ** 2])


@dataclass(kw_only=True)
class StiffData:
    n_points: int = 40
    t_min: float = 1e-5
    t_end: float = 1e5
    noise_std: float = 0.01  # relative (multiplicative) noise on each observation

    def check(self):
        errors = {}
        if self.n_points < 2:
            errors["n_points"] = f"must be >= 2, got {self.n_points}"
        if not 0 < self.t_min < self.t_end:
            errors["t_min"] = f"expected 0 < t_min < t_end, got {self.t_min}, {self.t_end}"
        if self.noise_std < 0:
            errors["noise_std"] = f"must be >= 0, got {self.noise_std}"
        return errors


@dataclass(kw_only=True)
class StiffModel:
    width: int = 32
    depth: int = 2


@dataclass(kw_only=True)
class DopriCheck:
    max_steps: int = 20_000  # dopri5's budget on the trained model and the true kinetics


@dataclass(kw_only=True)
class Config(RunConfig):
    dtype: Literal["float32", "float64"] = "float64"
    data: StiffData = field(default_factory=StiffData)
    model: StiffModel = field(default_factory=StiffModel)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        method="rodas5p", rtol=1e-5, atol=1e-9, max_steps=4000))
    dopri5: DopriCheck = field(default_factory=DopriCheck)


class Field(eqx.Module):
    """dy/dt = s ⊙ exp(g) ⊙ MLP(y / s): g, a learned log gain per species, starts at the
    log of the data's largest rate of change of y / s (~1e3 for y2, ~1 for the others),
    so the field starts as stiff as the kinetics and the MLP works at O(1)."""

    mlp: eqx.nn.MLP
    log_gain: jax.Array
    scale: jax.Array

    def __call__(self, y, t):
        return self.scale * jnp.exp(self.log_gain) * self.mlp(y / self.scale)


class StiffRobertson(Experiment):
    Config = Config
    title = "Stiff neural ODE: Robertson's kinetics"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d = cfg.data
        self.y0 = np.array([1.0, 0.0, 0.0])
        self.ts = np.concatenate([[0.0], np.geomspace(d.t_min, d.t_end, d.n_points)])
        self.true = np.asarray(jaxode.odeint(
            robertson, jnp.asarray(self.y0), jnp.asarray(self.ts), jnp.asarray(RATES),
            solver="rodas5p", rtol=1e-10, atol=1e-14, max_steps=20_000))
        self.scale = self.true.max(0)
        rng = np.random.default_rng(cfg.seed)
        noise = 1 + d.noise_std * rng.standard_normal(self.true.shape)
        noise[0] = 1.0
        self.observed = self.true * noise
        self._solve_jit = eqx.filter_jit(self._solve)

    @classmethod
    def needs_x64(cls, cfg) -> bool:
        return True

    def init_models(self, key):
        m = self.cfg.model
        mlp = eqx.nn.MLP(3, 3, m.width, m.depth, activation=jnp.tanh, key=key)
        mlp = jax.tree_util.tree_map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, mlp)
        rates = np.abs(np.diff(self.observed / self.scale, axis=0)) / np.diff(self.ts)[:, None]
        log_gain = jnp.asarray(np.log(np.maximum(rates.max(0), 1e-8)))
        return {"stiff_field": Field(mlp, log_gain, jnp.asarray(self.scale))}

    def batch(self, step):
        return {"observed": self.observed}

    def _solve(self, model, ts, **options):
        params, static = eqx.partition(model, eqx.is_array)
        # The scale is data, not a parameter: no gradient for it.
        params = eqx.tree_at(lambda f: f.scale, params, replace_fn=jax.lax.stop_gradient)
        opts = {**self.cfg.solver.options(), **options}
        sol = jaxode.solve(lambda y, t, p: eqx.combine(p, static)(y, t),
                           jnp.asarray(self.y0), ts, params, **opts)
        return sol.zs, sol.stats, sol.status

    def loss(self, models, batch, key):
        zs, stats, _ = self._solve(models["stiff_field"], jnp.asarray(self.ts))
        scaled = (zs[1:] - batch["observed"][1:]) / self.scale
        return jnp.mean(scaled**2), {"nfe": stats["nfe"], "steps": stats["num_steps"]}

    def _trajectory(self, model):
        zs, stats, status = self._solve_jit(model, jnp.asarray(self.ts), throw=False)
        return np.asarray(zs), {k: int(v) for k, v in stats.items()}, int(status)

    def evaluate(self, models, step):
        pred, stats, status = self._trajectory(models["stiff_field"])
        err = np.abs(pred[1:] - self.true[1:]) / self.scale
        return {"trajectory_error": float(np.mean(err)), "max_error": float(np.max(err)),
                "steps": stats["num_steps"], "status": status}

    def dopri5(self, model=None):
        """dopri5 on the trained model (or the true kinetics): (steps, status message)."""
        budget = self.cfg.dopri5.max_steps
        options = dict(solver="dopri5", rtol=self.cfg.solver.rtol, atol=self.cfg.solver.atol,
                       max_steps=budget, throw=False, adjoint="direct")
        if model is None:
            sol = jaxode.solve(robertson, jnp.asarray(self.y0), jnp.asarray(self.ts),
                               jnp.asarray(RATES), **options)
            stats, status = sol.stats, sol.status
        else:
            _, stats, status = self._solve_jit(model, jnp.asarray(self.ts), **options)
        status = int(status)
        message = "success" if status == 0 else jaxode.STATUS_MESSAGES[status].split(";")[0]
        return int(stats["num_steps"]), message

    def report(self, models, log):
        out = self.ctx.out_dir
        model = models["stiff_field"]
        final = log.split("eval")[-1]
        train = log.split("train")
        _, stiff_stats, _ = self._trajectory(model)
        dopri_steps, dopri_status = self.dopri5(model)
        true_steps, true_status = self.dopri5()
        rows = [{
            "solver": self.cfg.solver.method, "adjoint": self.cfg.solver.adjoint,
            "train loss (scaled MSE)": train[-1]["loss"] if train else float("nan"),
            "trajectory error (scaled, mean)": final["trajectory_error"],
            "max error (scaled)": final["max_error"],
            f"{self.cfg.solver.method} steps": stiff_stats["num_steps"],
            "dopri5 on the model": f"{dopri_steps} steps, {dopri_status}",
            "dopri5 on the true kinetics": f"{true_steps} steps, {true_status}",
        }]
        figures = [f for f in (
            plot_curves(train, ["loss", "nfe"], out, "training.png", "training", logy=True),
            self._plot(model, out),
        ) if f]
        notes = [f"dopri5 at rtol {self.cfg.solver.rtol:g} with max_steps "
                 f"{self.cfg.dopri5.max_steps} (status after the budget)."]
        return Report(self.title, rows, figures=figures, notes=notes)

    def _plot(self, model, out):
        pred, _, _ = self._trajectory(model)
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for i, ax in enumerate(axes):
            ax.semilogx(self.ts[1:], self.true[1:, i], "g-", lw=1.2, label="truth")
            ax.semilogx(self.ts[1:], self.observed[1:, i], "k.", ms=3, label="observed")
            ax.semilogx(self.ts[1:], pred[1:, i], "b--", lw=1.2, label="neural ODE")
            ax.set_title(f"y{i + 1}")
            ax.set_xlabel("t")
        axes[0].legend(fontsize=8)
        return save_figure(fig, out, "trajectories.png")
