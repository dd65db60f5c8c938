"""kind: ode_demo — learn the dynamics of a 2-D ODE from trajectory snippets.

The classic first neural-ODE exercise (the torchdiffeq `ode_demo`): the true system
is the damped cubic oscillator dz/dt = z^3 A of the paper's demo; the model is
dz/dt = MLP(z^3) (an `equinox.nn.MLP`, no jaxode.nn model needed); each step fits
`batch_size` snippets of `batch_time` consecutive points, each snippet its own
initial condition solved with its own steps (`batch_axis=0`), gradients by the
adjoint method. Small and fast: the runner's tests use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxode

from .config import RunConfig
from .parallel import to_numpy
from .report import Report, plot_curves, pyplot, save_figure
from .runner import Experiment

TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))


@dataclass(kw_only=True)
class DemoData:
    """`data:` of `ode_demo`: the true trajectory's start, span and length, and the training
    snippets' length."""

    n_points: int = 1000
    t_end: float = 25.0
    batch_time: int = 10
    z0: list[float] = field(default_factory=lambda: [2.0, 0.0])

    def check(self):
        errors = {}
        if self.batch_time < 2 or self.batch_time > self.n_points:
            errors["batch_time"] = f"must be in [2, n_points], got {self.batch_time}"
        if len(self.z0) != 2:
            errors["z0"] = f"expected 2 numbers, got {len(self.z0)}"
        return errors


@dataclass(kw_only=True)
class DemoModel:
    """`model:` of `ode_demo`: the MLP vector field's width and hidden layers."""

    width: int = 50
    depth: int = 1


@dataclass(kw_only=True)
class Config(RunConfig):
    """The schema of an `ode_demo` config."""

    data: DemoData = field(default_factory=DemoData)
    model: DemoModel = field(default_factory=DemoModel)


def true_trajectory(z0: np.ndarray, ts: np.ndarray, substeps: int = 20) -> np.ndarray:
    """z(ts) of dz/dt = z^3 A by classical RK4 in float64 numpy (substeps per interval)."""
    a = np.asarray(TRUE_A)
    f = lambda z: (z**3) @ a
    out, z = [z0], z0
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = (float(t1) - float(t0)) / substeps
        for _ in range(substeps):
            k1 = f(z)
            k2 = f(z + 0.5 * h * k1)
            k3 = f(z + 0.5 * h * k2)
            k4 = f(z + h * k3)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(z)
    return np.stack(out)


class Field(eqx.Module):
    """The learned vector field f(z, t) = MLP(z^3), an Equinox module."""

    mlp: eqx.nn.MLP

    def __call__(self, z, t):
        return self.mlp(z**3)


class ODEDemo(Experiment):
    """kind: ode_demo: learn dz/dt = z^3 A from snippets of one trajectory (the runner's smoke
    test; no jaxode.nn model)."""

    Config = Config
    title = "ODE demo: learning dz/dt = z^3 A"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d = cfg.data
        dtype = ctx.dtype
        self.ts = np.linspace(0.0, d.t_end, d.n_points).astype(dtype)
        self.true = true_trajectory(np.asarray(d.z0, float), self.ts).astype(dtype)
        self._solve_jit = eqx.filter_jit(self._solve)

    def init_models(self, key):
        m = self.cfg.model
        mlp = eqx.nn.MLP(2, 2, m.width, m.depth, activation=jnp.tanh, key=key)
        mlp = jax.tree_util.tree_map(
            lambda x: x.astype(self.ctx.dtype) if eqx.is_inexact_array(x) else x, mlp
        )
        return {"mlp_field": Field(mlp)}

    def batch(self, step):
        d, b = self.cfg.data, self.cfg.train.batch_size
        rng = np.random.default_rng([self.cfg.seed, step])
        starts = rng.integers(0, d.n_points - d.batch_time + 1, size=b)
        snippets = self.true[starts[:, None] + np.arange(d.batch_time)]
        return {"z0": snippets[:, 0], "target": snippets}

    def _solve(self, model, z0, ts):
        # jaxode.solve's params must be arrays: the MLP's activation function is not.
        params, static = eqx.partition(model, eqx.is_array)
        sol = jaxode.solve(lambda z, t, p: eqx.combine(p, static)(z, t), z0, ts, params,
                           dense=False, batch_axis=0, **self.cfg.solver.options())
        return jnp.swapaxes(sol.zs, 0, 1), sol.stats["nfe"]  # (batch, times, 2)

    def loss(self, models, batch, key):
        ts = jnp.asarray(self.ts[: self.cfg.data.batch_time])
        zs, nfe = self._solve(models["mlp_field"], batch["z0"], ts)
        loss = jnp.mean(jnp.abs(zs - batch["target"]))
        return loss, {"nfe": jnp.mean(nfe)}

    def _full(self, model):
        z0, ts = self.ctx.parallel.replicate((jnp.asarray(self.true[:1]), jnp.asarray(self.ts)))
        zs, nfe = self._solve_jit(model, z0, ts)
        return to_numpy(zs)[0], float(to_numpy(nfe)[0])

    def evaluate(self, models, step):
        pred, nfe = self._full(models["mlp_field"])
        return {"trajectory_l1": float(np.mean(np.abs(pred - self.true))), "nfe": nfe}

    def report(self, models, log):
        out = self.ctx.out_dir
        final = log.split("eval")[-1]
        train = log.split("train")
        params = sum(x.size for x in jax.tree_util.tree_leaves(
            eqx.filter(models["mlp_field"], eqx.is_inexact_array)))
        rows = [{
            "model": "MLP field", "params": params,
            "train loss (L1)": train[-1]["loss"] if train else float("nan"),
            "trajectory L1": final["trajectory_l1"], "NFE (full trajectory)": final["nfe"],
        }]
        figures = [f for f in (
            plot_curves(train, ["loss", "nfe"], out, "training.png", "training", logy=True),
            self._plot(models["mlp_field"], out),
        ) if f]
        return Report(self.title, rows, figures=figures)

    def _plot(self, model, out):
        pred, _ = self._full(model)
        plt = pyplot()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        ax1.plot(self.ts, self.true[:, 0], "g-", lw=1, label="true z1")
        ax1.plot(self.ts, pred[:, 0], "b--", lw=1, label="learned z1")
        ax1.set_xlabel("t")
        ax1.legend(fontsize=8)
        ax2.plot(self.true[:, 0], self.true[:, 1], "g-", lw=1, label="true")
        ax2.plot(pred[:, 0], pred[:, 1], "b--", lw=1, label="learned")
        ax2.set_aspect("equal")
        ax2.legend(fontsize=8)
        ax2.set_title("phase portrait")
        return save_figure(fig, out, "trajectories.png")
