"""kinds: cnf_density_matching and cnf_ml — continuous normalizing flows (Section 4).

cnf_density_matching (Figure 4): for each unnormalised target log p̃ (Rezende & Mohamed's
U1..U4) and each width M in `model.widths` (the paper: 2, 8, 32), a planar CNF of width
M and a planar NF of depth K = M are fitted by minimising the reverse KL,
E_q[log q(x) - log p̃(x)] (= KL(q||p) - log Z), with samples of the flow. The CNF
reaches the lower loss in the paper.

cnf_ml (Figures 5-6): maximum likelihood on 2-D data (two moons, two circles, ...),
fresh samples every step; a CNF (width 64 in the paper) against a planar NF (64
layers). The table has the test negative log-likelihood.

Every (model, target/dataset) pair is its own model, all trained side by side on the
same steps with their own optimizer states. `model.cnf` may be "cnf" (the paper's
planar CNF) or "ffjord" (MLP field, Hutchinson trace).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import data as datasets
from .config import RunConfig
from .odenet import cast
from .parallel import to_numpy
from .report import Report, plot_curves, pyplot, save_figure
from .runner import Experiment


@dataclass(kw_only=True)
class FlowOptions:
    """What both flow experiments' models share."""

    cnf: Literal["cnf", "ffjord"] = "cnf"  # the planar CNF, or FFJORD ...
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # ... with these MLP sizes
    hyper_hidden: int = 32
    t0: float = 0.0
    t1: float = 1.0
    base_std: float = 1.0
    trace: Literal["exact", "hutchinson"] = "exact"
    baseline: bool = True  # train the planar NF baseline too

    def check(self):
        errors = {}
        if self.t1 == self.t0:
            errors["t1"] = "must differ from t0"
        if not self.base_std > 0:
            errors["base_std"] = f"must be positive, got {self.base_std}"
        return errors


@dataclass(kw_only=True)
class MLModels(FlowOptions):
    """`model:` of `cnf_ml`: one CNF (width `width`) and, with `baseline`, a planar NF
    (`nf_layers` layers, default the width) per data set."""

    width: int = 32  # CNF hidden units M (planar field)
    nf_layers: int | None = None  # planar NF depth K; default K = width

    def check(self):
        errors = super().check()
        if self.width < 1:
            errors["width"] = f"must be positive, got {self.width}"
        return errors


@dataclass(kw_only=True)
class MatchingModels(FlowOptions):
    """`model:` of `cnf_density_matching`: a CNF of width M and a planar NF of K = M layers for
    each M in `widths`."""

    widths: list[int] = field(default_factory=lambda: [32])  # each M, with an NF of K = M

    def check(self):
        errors = super().check()
        if not self.widths or min(self.widths) < 1 or len(set(self.widths)) < len(self.widths):
            errors["widths"] = f"list distinct positive widths, got {self.widths}"
        elif self.cnf == "ffjord" and len(self.widths) > 1:
            errors["widths"] = "FFJORD has no width M: list one (the planar NF's K)"
        return errors


@dataclass(kw_only=True)
class MatchingData:
    """`data:` of `cnf_density_matching`: the target densities (U1-U4) and the Monte Carlo
    samples per step and per evaluation."""

    targets: list[Literal["U1", "U2", "U3", "U4"]] = field(default_factory=lambda: ["U1"])
    samples: int = 256  # Monte Carlo samples per step (train.batch_size is not used)
    eval_samples: int = 4096

    def check(self):
        return {"targets": "list at least one target"} if not self.targets else {}


@dataclass(kw_only=True)
class MatchingConfig(RunConfig):
    """The schema of a `cnf_density_matching` config."""

    data: MatchingData = field(default_factory=MatchingData)
    model: MatchingModels = field(default_factory=MatchingModels)


@dataclass(kw_only=True)
class MLData:
    """`data:` of `cnf_ml`: the 2-D data sets (fresh samples every step) and the held-out
    samples."""

    datasets: list[Literal["moons", "circles", "8gaussians", "pinwheel", "checkerboard"]] = (
        field(default_factory=lambda: ["moons", "circles"])
    )
    test_samples: int = 2048

    def check(self):
        return {"datasets": "list at least one data set"} if not self.datasets else {}


@dataclass(kw_only=True)
class MLConfig(RunConfig):
    """The schema of a `cnf_ml` config."""

    data: MLData = field(default_factory=MLData)
    model: MLModels = field(default_factory=MLModels)


def build_flows(cfg, sizes: dict[str, tuple[int, int]], key) -> dict:
    """{f"cnf_{name}": CNF (width M) or FFJORD, f"nf_{name}": PlanarFlow (K layers)} for
    each name: (M, K) in sizes."""
    from jaxode import nn

    m, s = cfg.model, cfg.solver
    models = {}
    for (name, (width, depth)), k in zip(sizes.items(), jax.random.split(key, len(sizes))):
        k1, k2 = jax.random.split(k)
        common = dict(dim=2, base_std=m.base_std, t0=m.t0, t1=m.t1, trace=m.trace,
                      **s.options(), key=k1)
        if m.cnf == "cnf":
            models[f"cnf_{name}"] = nn.CNF(width=width, hyper_hidden=m.hyper_hidden, **common)
        else:
            models[f"cnf_{name}"] = nn.FFJORD(hidden=tuple(m.hidden), **common)
        if m.baseline:
            models[f"nf_{name}"] = nn.PlanarFlow(dim=2, num_layers=depth, base_std=m.base_std,
                                                 key=k2)
    return {k: cast(v, np.dtype(cfg.dtype)) for k, v in models.items()}


def is_continuous(model) -> bool:
    """Whether `model` is a continuous flow (it solves an ODE)."""
    return hasattr(model, "solve")


def sample_and_log_q(model, key, n: int, dtype):
    """(x, log q(x), nfe) for n samples of a flow (nfe NaN for a discrete flow)."""
    base_key, noise_key = jax.random.split(key)
    z = model.base_std * jax.random.normal(base_key, (n, model.dim), dtype)
    if is_continuous(model):
        x, integral, stats = model.solve(z, model.t0, model.t1, key=noise_key)
        return x, model.base_log_prob(z) - integral, jnp.mean(stats["nfe"]).astype(jnp.float32)
    x, logdet = model.transform(z)
    return x, model.base_log_prob(z) - logdet, jnp.asarray(jnp.nan, jnp.float32)


def nll_and_nfe(model, x, key):
    """(mean negative log-likelihood of x, mean forward NFE or NaN for a discrete flow)."""
    if is_continuous(model):
        z, integral, stats = model.solve(x, model.t1, model.t0, key=key)
        log_q = model.base_log_prob(z) + integral
        return -jnp.mean(log_q), jnp.mean(stats["nfe"]).astype(jnp.float32)
    return model.nll(x), jnp.asarray(jnp.nan, jnp.float32)


def sum_over_flows(models, key, per_flow, metric: str):
    """(Σ loss, metrics) over the flows: per_flow(name, model, key) -> (loss, nfe); the
    metrics hold each flow's loss as "<name>/<metric>" and the CNFs' mean NFE as "nfe"."""
    total, metrics, nfes = 0.0, {}, []
    keys = jax.random.split(key, len(models))
    for (name, model), k in zip(sorted(models.items()), keys):
        value, nfe = per_flow(name, model, k)
        total = total + value
        metrics[f"{name}/{metric}"] = value
        if is_continuous(model):
            nfes.append(nfe)
    if nfes:
        metrics["nfe"] = jnp.mean(jnp.stack(nfes))
    return total, metrics


def eval_metrics(out: dict, metric: str) -> dict:
    """{name: (value, nfe)} as floats "<name>/<metric>" and, for the CNFs, "<name>/nfe"."""
    metrics = {}
    for name, (value, nfe) in jax.tree_util.tree_map(to_numpy, out).items():
        metrics[f"{name}/{metric}"] = float(value)
        if np.isfinite(float(nfe)):
            metrics[f"{name}/nfe"] = float(nfe)
    return metrics


def grid(lim: float, n: int):
    """(gx, gy, points): an n x n grid over [-lim, lim]^2 and its points as (n*n, 2)."""
    xs = np.linspace(-lim, lim, n)
    gx, gy = np.meshgrid(xs, xs)
    return gx, gy, np.stack([gx.ravel(), gy.ravel()], axis=1)


class _FlowExperiment(Experiment):
    progress_fields = ("loss", "nfe")
    sizes: dict[str, tuple[int, int]]  # flow pair name -> (CNF width M, NF depth K)

    def init_models(self, key):
        return build_flows(self.cfg, self.sizes, key)

    def _samples_jit(self):
        if not hasattr(self, "_sampler"):
            dtype = self.ctx.dtype

            @eqx.filter_jit
            def sampler(model, key, n):
                return sample_and_log_q(model, key, n, dtype)[0]

            self._sampler = sampler
        return self._sampler

    def _sample(self, model, n, seed=0):
        key = self.ctx.parallel.replicate(jax.random.PRNGKey(seed))
        return to_numpy(self._samples_jit()(model, key, n))


class DensityMatching(_FlowExperiment):
    """kind: cnf_density_matching (Figure 4): fit CNFs and planar NFs to unnormalised 2-D
    densities by reverse KL; the table has E_q[log q - log p~] per target and width, the
    figure the fitted densities."""

    progress_fields = ("kl", "nfe")  # each flow's loss ("<flow>/kl"), not their sum
    Config = MatchingConfig
    title = "Density matching: planar CNF against planar NF (Figure 4)"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        # one CNF/NF pair per (target, width), named "U1_M8"
        self.sizes = {f"{t}_M{w}": (w, w) for t in cfg.data.targets for w in cfg.model.widths}
        self.targets = {t: datasets.log_target(t) for t in cfg.data.targets}
        self._kl = eqx.filter_jit(self._kl_all)

    def batch(self, step):
        return {}  # the flows draw their own samples from the step's key

    def _kl_one(self, model, target, key, n):
        x, log_q, nfe = sample_and_log_q(model, key, n, self.ctx.dtype)
        return jnp.mean(log_q - target(x)), nfe

    def _target_of(self, name):
        return self.targets[name.split("_")[1]]  # name: "cnf_U1_M8" or "nf_U1_M8"

    def loss(self, models, batch, key):
        return sum_over_flows(models, key, lambda name, model, k: self._kl_one(
            model, self._target_of(name), k, self.cfg.data.samples), "kl")

    def _kl_all(self, models, key):
        keys = jax.random.split(key, len(models))
        return {name: self._kl_one(model, self._target_of(name), k, self.cfg.data.eval_samples)
                for (name, model), k in zip(sorted(models.items()), keys)}

    def evaluate(self, models, step):
        key = self.ctx.parallel.replicate(jax.random.PRNGKey(10_000 + self.cfg.seed))
        return eval_metrics(self._kl(models, key), "kl")

    def report(self, models, log):
        out = self.ctx.out_dir
        final = log.split("eval")[-1]
        m = self.cfg.model
        rows = []
        for target in self.cfg.data.targets:
            row = {"target": target}
            for w in m.widths:
                row[f"CNF M={w}"] = final[f"cnf_{target}_M{w}/kl"]
                if m.baseline:
                    row[f"NF K={w}"] = final[f"nf_{target}_M{w}/kl"]
            row["CNF NFE"] = "/".join(
                f"{final[key]:.0f}" if key in final else "-"
                for key in (f"cnf_{target}_M{w}/nfe" for w in m.widths))
            rows.append(row)
        figures = [self._plot(models, out)]
        curves = plot_curves(log.split("train"), [f"{n}/kl" for n in sorted(models)], out,
                             "training.png", "E_q[log q - log p~] during training",
                             group=lambda key: f"target {key.split('_')[1]}")
        figures += [curves] if curves else []
        notes = ["loss = E_q[log q(x) - log p~(x)] = KL(q||p) - log Z, estimated with "
                 f"{self.cfg.data.eval_samples} samples; lower is better",
                 "CNF NFE: forward evaluations of the sampling solve, for M = "
                 + "/".join(map(str, m.widths))]
        return Report(self.title, rows, figures=figures, notes=notes)

    def _plot(self, models, out):
        plt = pyplot()
        m = self.cfg.model
        panels = [(kind, w) for w in m.widths
                  for kind in (("cnf", "nf") if m.baseline else ("cnf",))]
        targets = self.cfg.data.targets
        fig, axes = plt.subplots(len(targets), 1 + len(panels),
                                 figsize=(2.6 * (1 + len(panels)), 2.6 * len(targets)),
                                 squeeze=False)
        gx, gy, points = grid(4.0, 200)
        for row, target in zip(axes, targets):
            density = np.exp(np.asarray(self.targets[target](jnp.asarray(points))))
            row[0].pcolormesh(gx, gy, density.reshape(gx.shape), shading="auto")
            row[0].set_title(f"{target}: target")
            for ax, (kind, w) in zip(row[1:], panels):
                x = self._sample(models[f"{kind}_{target}_M{w}"], 20_000)
                ax.hist2d(x[:, 0], x[:, 1], bins=100, range=[[-4, 4], [-4, 4]])
                ax.set_title(f"{target}: " + (f"CNF M={w}" if kind == "cnf" else f"NF K={w}"))
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
        fig.tight_layout()
        return save_figure(fig, out, "densities.png")


class MaxLikelihood(_FlowExperiment):
    """kind: cnf_ml (Figures 5-6): fit a CNF and a planar NF to 2-D data by maximum likelihood;
    the table has the test NLL, the figures samples and their flow from noise to data."""

    progress_fields = ("nll", "nfe")  # each flow's loss ("<flow>/nll"), not their sum
    Config = MLConfig
    title = "Maximum likelihood: CNF against planar NF on 2-D data (Figures 5-6)"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.names = list(cfg.data.datasets)
        m = cfg.model
        self.sizes = {name: (m.width, m.nf_layers or m.width) for name in self.names}
        self.test = {name: datasets.sample_2d(name, cfg.data.test_samples,
                                              [cfg.seed, 1, i]).astype(ctx.dtype)
                     for i, name in enumerate(self.names)}
        self._nll = eqx.filter_jit(self._nll_all)

    def batch(self, step):
        b = self.cfg.train.batch_size
        return {name: datasets.sample_2d(name, b, [self.cfg.seed, 0, i, step])
                .astype(self.ctx.dtype) for i, name in enumerate(self.names)}

    def loss(self, models, batch, key):
        return sum_over_flows(models, key, lambda name, model, k: nll_and_nfe(
            model, batch[name.split("_", 1)[1]], k), "nll")

    def _nll_all(self, models, test, key):
        keys = jax.random.split(key, len(models))
        return {name: nll_and_nfe(model, test[name.split("_", 1)[1]], k)
                for (name, model), k in zip(sorted(models.items()), keys)}

    def evaluate(self, models, step):
        test = self.ctx.parallel.replicate({k: jnp.asarray(v) for k, v in self.test.items()})
        key = self.ctx.parallel.replicate(jax.random.PRNGKey(20_000 + self.cfg.seed))
        return eval_metrics(self._nll(models, test, key), "test_nll")

    def report(self, models, log):
        out = self.ctx.out_dir
        final = log.split("eval")[-1]
        m = self.cfg.model
        label = "CNF" if m.cnf == "cnf" else "FFJORD"
        rows = []
        for name in self.names:
            row = {"data": name,
                   f"{label} (width {m.width}) test NLL": final[f"cnf_{name}/test_nll"],
                   f"{label} NFE": final.get(f"cnf_{name}/nfe", "-")}
            if m.baseline:
                row[f"planar NF (K={m.nf_layers or m.width}) test NLL"] = final[
                    f"nf_{name}/test_nll"]
            rows.append(row)
        figures = [self._plot(models, out), self._plot_flow(models, out)]
        curves = plot_curves(log.split("train"), [f"{n}/nll" for n in sorted(models)], out,
                             "training.png", "training NLL",
                             group=lambda key: key.split("/")[0].split("_", 1)[1])
        figures += [curves] if curves else []
        notes = [f"test NLL in nats per 2-D sample, {self.cfg.data.test_samples} held-out "
                 "samples; lower is better"]
        return Report(self.title, rows, figures=figures, notes=notes)

    def _plot(self, models, out):
        plt = pyplot()
        kinds = ["data", "cnf"] + (["nf"] if self.cfg.model.baseline else [])
        fig, axes = plt.subplots(len(self.names), len(kinds),
                                 figsize=(3 * len(kinds), 3 * len(self.names)), squeeze=False)
        for row, name in zip(axes, self.names):
            lim = float(np.abs(self.test[name]).max()) * 1.1
            rng = [[-lim, lim], [-lim, lim]]
            row[0].hist2d(self.test[name][:, 0], self.test[name][:, 1], bins=80, range=rng)
            row[0].set_title(f"{name}: data")
            for ax, kind in zip(row[1:], kinds[1:]):
                x = self._sample(models[f"{kind}_{name}"], 20_000)
                ax.hist2d(x[:, 0], x[:, 1], bins=80, range=rng)
                ax.set_title(f"{name}: {kind.upper()} samples")
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
        fig.tight_layout()
        return save_figure(fig, out, "samples.png")

    def _plot_flow(self, models, out, n_times: int = 6, n: int = 5000):
        """Figure 6: the CNF's samples flowing from the base density (t0) to data (t1)."""
        plt = pyplot()

        @eqx.filter_jit
        def flow_to(model, z, t, key):
            return model.solve(z, model.t0, t, key=key)[0]

        fig, axes = plt.subplots(len(self.names), n_times,
                                 figsize=(2.4 * n_times, 2.4 * len(self.names)), squeeze=False)
        for row, name in zip(axes, self.names):
            model = models[f"cnf_{name}"]
            z = model.base_std * jax.random.normal(jax.random.PRNGKey(1), (n, model.dim),
                                                   self.ctx.dtype)
            lim = max(float(np.abs(self.test[name]).max()) * 1.1, 3 * model.base_std)
            key = self.ctx.parallel.replicate(jax.random.PRNGKey(2))
            for k, ax in enumerate(row):
                t = model.t0 + (model.t1 - model.t0) * k / (n_times - 1)
                x = to_numpy(z) if k == 0 else to_numpy(flow_to(
                    model, self.ctx.parallel.replicate(z), jnp.asarray(t, self.ctx.dtype), key))
                ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, color="tab:blue")
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
                ax.set_title(f"{name}: t = {t:g}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_aspect("equal")
        fig.tight_layout()
        return save_figure(fig, out, "flow.png")
