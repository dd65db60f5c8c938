"""kind: latent_ode — latent ODE against an RNN on the spirals of Section 5.1 (Table 2).

Each spiral's first window of `n_window` equally spaced times holds `n_obs` noisy
observations (drawn without replacement, a mask marks them); the next `n_window`
times are the extrapolation targets. The latent ODE (`jaxode.nn.LatentODE`: a GRU/RNN
recognition network run backwards, dz/dt = MLP(z), MLP decoder) is trained by the
ELBO; the baseline (`jaxode.nn.RNNBaseline`, given the time gaps) by the one-step
Gaussian log-likelihood. Both see the same batches. The table has the predictive RMSE
on held-out spirals, against the noise-free trajectory: inside the observed window
(reconstruction) and on the window after it (extrapolation, the paper's Table 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import data as datasets
from .config import RunConfig
from .odenet import cast
from .report import Report, plot_curves, pyplot, save_figure
from .runner import Experiment


@dataclass(kw_only=True)
class SpiralData:
    """`data:` of `latent_ode`: how many spirals, points per spiral, observed points per
    window, noise, and how training windows are drawn."""

    n_spirals: int = 1000
    n_window: int = 100
    n_obs: int = 100  # observations per spiral in the observed window (30, 50, 100)
    noise_std: float = 0.1
    n_total: int = 1000
    stop: float = 6 * math.pi
    b: float = 0.3
    test_fraction: float = 0.2
    data_seed: int = 0
    # Training windows start anywhere their observed window fits, so that together they
    # observe the whole curve (as the authors' sampling does); test windows keep room
    # for the extrapolation. Off: both start where the extrapolation fits.
    observe_to_end: bool = False

    def check(self):
        errors = {}
        if not 1 <= self.n_obs <= self.n_window:
            errors["n_obs"] = f"must be in [1, n_window={self.n_window}], got {self.n_obs}"
        if 2 * self.n_window > self.n_total:
            errors["n_total"] = f"must be at least 2 * n_window = {2 * self.n_window}"
        if not 0 < self.test_fraction < 1:
            errors["test_fraction"] = f"must be in (0, 1), got {self.test_fraction}"
        if self.n_spirals < 2:
            errors["n_spirals"] = "must be at least 2"
        return errors


@dataclass(kw_only=True)
class LatentModels:
    """`model:` of `latent_ode`: which models (latent ODE, RNN) and their sizes."""

    names: list[Literal["latent_ode", "rnn"]] = field(
        default_factory=lambda: ["latent_ode", "rnn"])
    latent_dim: int = 4
    rec_hidden: int = 25
    dyn_hidden: int = 20
    dyn_depth: int = 1  # hidden layers of the dynamics MLP (the authors' code: 2)
    dec_hidden: int = 20
    encoder: Literal["gru", "rnn", "odernn"] = "gru"
    obs_std: float = 0.3
    rnn_hidden: int = 25
    rnn_cell: Literal["gru", "rnn"] = "gru"

    def check(self):
        if not self.names:
            return {"names": "list at least one model"}
        if self.dyn_depth < 0:
            return {"dyn_depth": f"must be 0 or more hidden layers, got {self.dyn_depth}"}
        return {}


@dataclass(kw_only=True)
class Config(RunConfig):
    """The schema of a `latent_ode` config."""

    data: SpiralData = field(default_factory=SpiralData)
    model: LatentModels = field(default_factory=LatentModels)


class LatentODESpirals(Experiment):
    """kind: latent_ode (Section 5.1, Table 2): a latent ODE against an RNN on irregularly
    sampled spirals; the table has the extrapolation and reconstruction RMSE, the figure
    four test spirals."""

    Config = Config
    title = "Latent ODE vs RNN on irregularly sampled spirals (Table 2)"
    progress_fields = ("loss", "nfe")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d = cfg.data
        shape = dict(n_window=d.n_window, n_obs=d.n_obs, noise_std=d.noise_std,
                     n_total=d.n_total, stop=d.stop, b=d.b)
        n_test = max(1, int(round(d.n_spirals * d.test_fraction)))
        if d.observe_to_end:
            self.test = datasets.make_spirals(n_spirals=n_test, seed=d.data_seed, **shape)
            self.train = datasets.make_spirals(
                n_spirals=d.n_spirals - n_test, seed=d.data_seed + 2,
                max_start=d.n_total - d.n_window, **shape)
        else:
            spirals = datasets.make_spirals(n_spirals=d.n_spirals, seed=d.data_seed, **shape)
            perm = np.random.default_rng(d.data_seed + 1).permutation(d.n_spirals)
            self.train, self.test = spirals.subset(np.sort(perm[n_test:])), spirals.subset(
                np.sort(perm[:n_test]))
        self.ts = self.test.ts.astype(ctx.dtype)
        self._eval = eqx.filter_jit(self._predict)

    def init_models(self, key):
        from jaxode import nn

        m, s = self.cfg.model, self.cfg.solver
        k1, k2 = jax.random.split(key)
        models = {}
        if "latent_ode" in m.names:
            models["latent_ode"] = nn.LatentODE(
                obs_dim=2, latent_dim=m.latent_dim, rec_hidden=m.rec_hidden,
                dyn_hidden=m.dyn_hidden, dyn_depth=m.dyn_depth, dec_hidden=m.dec_hidden,
                encoder=m.encoder, obs_std=m.obs_std, **s.options(), key=k1,
            )
        if "rnn" in m.names:
            models["rnn"] = nn.RNNBaseline(obs_dim=2, hidden_size=m.rnn_hidden,
                                           cell=m.rnn_cell, obs_std=m.obs_std, key=k2)
        return {k: cast(v, self.ctx.dtype) for k, v in models.items()}

    def _window(self, spirals, idx):
        w = self.cfg.data.n_window
        xs = spirals.noisy[idx, :w].astype(self.ctx.dtype)
        mask = np.repeat(spirals.obs_mask[idx][..., None], 2, axis=-1).astype(self.ctx.dtype)
        return xs, mask

    def batch(self, step):
        idx = datasets.batch_indices(len(self.train.clean), self.cfg.train.batch_size, step,
                                     self.cfg.seed)
        xs, mask = self._window(self.train, idx)
        return {"xs": xs, "mask": mask}

    def loss(self, models, batch, key):
        ts = jnp.asarray(self.ts[: self.cfg.data.n_window])
        n_values = 2.0 * self.cfg.data.n_obs
        total, metrics = 0.0, {}
        if "latent_ode" in models:
            model = models["latent_ode"]
            keys = jax.random.split(key, batch["xs"].shape[0])
            terms = jax.vmap(lambda k, x, m: model.elbo_terms(k, ts, x, m))(
                keys, batch["xs"], batch["mask"])
            loss = -jnp.mean(terms["elbo"]) / n_values
            total = total + loss
            metrics["latent_ode/loss"] = loss
            metrics["latent_ode/kl"] = jnp.mean(terms["kl"])
            metrics["nfe"] = jnp.mean(terms["nfe"]).astype(jnp.float32)
        if "rnn" in models:
            model = models["rnn"]
            ll = jax.vmap(lambda x, m: model.log_likelihood(ts, x, m))(batch["xs"], batch["mask"])
            loss = -jnp.mean(ll) / n_values
            total = total + loss
            metrics["rnn/loss"] = loss
        return total, metrics

    def _predict(self, models, xs, mask):
        """Means at all 2 n_window times: reconstruction then extrapolation."""
        w = self.cfg.data.n_window
        ts = jnp.asarray(self.ts)
        out = {}
        if "latent_ode" in models:
            model = models["latent_ode"]
            out["latent_ode"] = jax.vmap(
                lambda x, m: model.reconstruct(ts[:w], x, m, ts))(xs, mask)
        if "rnn" in models:
            model = models["rnn"]
            out["rnn"] = jax.vmap(lambda x, m: jnp.concatenate([
                model.one_step_predictions(ts[:w], x, m), model.predict(ts[:w], x, m, ts[w:])
            ]))(xs, mask)
        return out

    def predictions(self, models):
        xs, mask = self._window(self.test, np.arange(len(self.test.clean)))
        return self.ctx.map_batches(lambda x, m: self._eval(models, x, m), (xs, mask),
                                    self.cfg.train.eval_batch_size)

    def covered(self) -> np.ndarray:
        """Which test spirals' extrapolation windows lie where training windows observed
        the curve (unless data.observe_to_end, those stop n_window points before its end,
        where the clockwise spiral's radius grows to 15)."""
        w = self.cfg.data.n_window
        reach = {c: np.max(self.train.starts[self.train.clockwise == c], initial=-w) + w
                 for c in (True, False)}
        return self.test.starts + 2 * w <= np.where(self.test.clockwise, reach[True],
                                                    reach[False])

    def evaluate(self, models, step):
        w = self.cfg.data.n_window
        clean = self.test.clean
        covered = self.covered()
        metrics = {}
        for name, pred in self.predictions(models).items():
            recon = np.mean((pred[:, :w] - clean[:, :w]) ** 2, axis=(1, 2))
            extrap = np.mean((pred[:, w:] - clean[:, w:]) ** 2, axis=(1, 2))
            metrics[f"{name}/rmse_recon"] = float(np.sqrt(recon.mean()))
            metrics[f"{name}/rmse_extrap"] = float(np.sqrt(extrap.mean()))
            if covered.any():
                metrics[f"{name}/rmse_extrap_covered"] = float(np.sqrt(extrap[covered].mean()))
        return metrics

    def report(self, models, log):
        out = self.ctx.out_dir
        final = log.split("eval")[-1]
        d = self.cfg.data
        label = {"latent_ode": "Latent ODE", "rnn": "RNN"}
        covered = self.covered()
        rows = []
        for name in self.cfg.model.names:
            row = {"model": label[name],
                   f"extrapolation RMSE ({d.n_obs}/{d.n_window})": final[f"{name}/rmse_extrap"]}
            if covered.any():
                row["... on covered spirals"] = final[f"{name}/rmse_extrap_covered"]
            row["reconstruction RMSE"] = final[f"{name}/rmse_recon"]
            rows.append(row)
        figures = [self._plot(models, out)]
        curves = plot_curves(log.split("train"), [f"{n}/loss" for n in self.cfg.model.names],
                             out, "training.png", "training loss per observed value")
        figures += [curves] if curves else []
        notes = [f"{len(self.train.clean)} training / {len(self.test.clean)} test spirals, "
                 f"{d.n_obs} of {d.n_window} points observed, noise std {d.noise_std}; RMSE "
                 "against the noise-free spiral"]
        if covered.any():
            notes.append(f"covered spirals: the {covered.sum()} test spirals whose extrapolation "
                         "window lies within the part of the curve that training windows "
                         "observed")
        return Report(self.title, rows, figures=figures, notes=notes)

    def _plot(self, models, out, n: int = 4):
        """The first n test spirals, each panel the same size: a square view framed on
        the true spiral (a prediction that leaves it is cut at the frame), one legend
        below the panels."""
        w = self.cfg.data.n_window
        preds = self.predictions(models)
        plt = pyplot()
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.7), squeeze=False)
        label = {"latent_ode": "Latent ODE", "rnn": "RNN"}
        for i, ax in enumerate(axes[0]):
            clean = self.test.clean[i]
            seen = self.test.obs_mask[i]
            observed = self.test.noisy[i, :w][seen]
            ax.plot(clean[:, 0], clean[:, 1], color="0.7", lw=1, label="truth")
            ax.scatter(observed[:, 0], observed[:, 1], s=6, color="k", label="observed")
            for name, color in (("latent_ode", "tab:blue"), ("rnn", "tab:red")):
                if name in preds:
                    p = preds[name][i]
                    # The RNN's first prediction has read nothing yet: left out of the plot.
                    first = 1 if name == "rnn" else 0
                    ax.plot(p[first:w, 0], p[first:w, 1], color=color, lw=1.2,
                            label=f"{label[name]}, reconstruction")
                    ax.plot(p[w:, 0], p[w:, 1], color=color, lw=1.2, ls="--",
                            label=f"{label[name]}, extrapolation")
            frame = np.concatenate([clean, observed])
            center = (frame.max(0) + frame.min(0)) / 2
            half = 0.6 * float((frame.max(0) - frame.min(0)).max()) + 1e-6
            ax.set_xlim(center[0] - half, center[0] + half)
            ax.set_ylim(center[1] - half, center[1] + half)
            ax.set_aspect("equal", adjustable="box")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"test spiral {i + 1}", fontsize=9)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
                   frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        return save_figure(fig, out, "spirals.png")
