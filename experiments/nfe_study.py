"""kind: nfe_study — a trained ODE-Net's statistics (Figure 3).

An ODE-Net (`jaxode.nn.ODENet`) is trained on images as in `odenet`. At every
evaluation a fixed probe batch of test images measures the number of function
evaluations of the forward pass and of the backward (adjoint) pass: (d) NFE over
training. After training the probe batch is solved at each tolerance of
`study.tolerances`: (a) forward NFE against the numerical error of the ODE block's
output (relative to a solve at `study.reference_tol`), (b) forward wall time against
NFE, (c) backward NFE against forward NFE. `study.solvers` sweeps other solvers on the
same trained model too (e.g. `adams`, the paper's kind of method: its MNIST results
used LSODE's Adams method), one line per solver in each panel; every solver's error is
measured against the training solver's reference solve.

NFE are counted by the solver's statistics (forward) and, for the backward pass, by a
host callback in the vector field that ticks once per evaluation (the adjoint solve
is inside `jax.custom_vjp`, whose statistics are not returned): backward NFE = the
evaluations during a gradient computation minus those of its forward solve. The
tolerance is a traced value, so one compilation serves every tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxode

from .config import RunConfig
from .odenet import ImageData, ImageExperiment, cast, logits_and_nfe
from .parallel import to_numpy
from .report import Report, plot_curves, pyplot, save_figure


@dataclass(kw_only=True)
class StudyModel:
    """`model:` of `nfe_study`: the ODE-Net's channels and time span."""

    channels: int = 64
    t1: float = 1.0


@dataclass(kw_only=True)
class StudyOptions:
    """`study:` of `nfe_study`: the tolerances swept after training, the reference tolerance,
    the probe batch, the timing repeats and the sweep's dtype."""

    tolerances: list[float] = field(default_factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
    reference_tol: float = 1e-7
    probe_size: int = 64  # test images in the probe batch
    timing_repeats: int = 3
    # The tolerance sweep's precision, whatever the training's (the top-level dtype):
    # float64 keeps the reference solve accurate far below the tolerances.
    dtype: Literal["float32", "float64"] = "float64"
    # The solvers swept (adaptive ones; empty: only the training solver).
    solvers: list[str] = field(default_factory=list)

    def check(self):
        errors = {}
        unknown = [s for s in self.solvers if s not in jaxode.SOLVERS
                   or not jaxode.SOLVERS[s]().adaptive]
        if unknown:
            errors["solvers"] = (f"{unknown} are not adaptive solvers; choose from "
                                 f"{sorted(n for n, c in jaxode.SOLVERS.items() if c().adaptive)}")
        if not self.tolerances or any(t <= 0 for t in self.tolerances):
            errors["tolerances"] = "list positive tolerances"
        elif self.reference_tol >= min(self.tolerances):
            errors["reference_tol"] = "must be below every tolerance of the study"
        if self.probe_size < 1:
            errors["probe_size"] = "must be positive"
        return errors


@dataclass(kw_only=True)
class Config(RunConfig):
    """The schema of an `nfe_study` config."""

    data: ImageData = field(default_factory=ImageData)
    model: StudyModel = field(default_factory=StudyModel)
    study: StudyOptions = field(default_factory=StudyOptions)


class _Counter:
    def __init__(self):
        self.count = 0

    def tick(self):
        self.count += 1


class NFEStudy(ImageExperiment):
    """kind: nfe_study (Figure 3): train an ODE-Net, then sweep the solver tolerance; the table
    has forward and backward NFE, error and time per tolerance, the figure the paper's four
    panels."""

    Config = Config
    title = "ODE-Net NFE statistics (Figure 3)"

    @classmethod
    def needs_x64(cls, cfg) -> bool:
        return "float64" in (cfg.dtype, cfg.study.dtype)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        n = min(cfg.study.probe_size, len(self.data["y_test"]))
        self.probe = ctx.parallel.replicate(
            (jnp.asarray(self.data["x_test"][:n]), jnp.asarray(self.data["y_test"][:n])))
        self.counter = _Counter()
        self._forward = eqx.filter_jit(self._probe_forward)
        self._grad = eqx.filter_jit(eqx.filter_grad(self._probe_loss))

    # -------------------------------------------------------------- training

    def init_models(self, key):
        from jaxode import nn

        model = nn.ODENet(channels=self.cfg.model.channels,
                          in_channels=self.data["x_train"].shape[1], t1=self.cfg.model.t1,
                          **self.cfg.solver.options(), key=key)
        return {"odenet": cast(model, self.ctx.dtype)}

    def loss(self, models, batch, key):
        logits, nfe = logits_and_nfe(models["odenet"], batch["x"])
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))
        return loss, {"nfe": nfe, "acc": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}

    # -------------------------------------------------------------- probes

    def _features(self, model, x, rtol, atol, counting, solver=None):
        """The ODE block's output and forward NFE at traced tolerances (with `solver`, or
        the block's own); with counting true every evaluation of the vector field ticks
        the host counter."""
        block = model.features
        counter = self.counter

        def field(z, t, func):
            jax.lax.cond(counting, lambda: jax.debug.callback(counter.tick), lambda: None)
            return func(z, t)

        h = jax.vmap(model.downsample)(x)
        sol = jaxode.solve(field, h, jnp.asarray([0.0, block.t1], h.dtype), block.func,
                           solver=solver or block.solver, rtol=rtol, atol=atol, dt0=block.dt0,
                           max_steps=block.max_steps, adjoint=block.adjoint, dense=False)
        return sol.zs[-1], sol.stats["nfe"]

    def _probe_forward(self, model, x, rtol, atol, counting, solver=None):
        h, nfe = self._features(model, x, rtol, atol, counting, solver)
        return h, nfe, jax.vmap(model.head)(h)

    def _probe_loss(self, model, x, y, rtol, atol, solver=None):
        h, _ = self._features(model, x, rtol, atol, True, solver)
        logits = jax.vmap(model.head)(h)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def measure(self, model, tol: float, probe, solver: str | None = None) -> dict:
        """Forward NFE (solver stats and counted), backward NFE, forward output, on the
        probe batch `probe` = (x, y), with `solver` (None: the model's)."""
        x, y = probe
        rtol = atol = self.ctx.parallel.replicate(jnp.asarray(tol, x.dtype))
        self.counter.count = 0
        out, nfe, _ = jax.block_until_ready(self._forward(model, x, rtol, atol, True, solver))
        jax.effects_barrier()
        forward = self.counter.count
        self.counter.count = 0
        jax.block_until_ready(self._grad(model, x, y, rtol, atol, solver))
        jax.effects_barrier()
        total = self.counter.count
        return {"nfe_forward": float(to_numpy(nfe)), "nfe_forward_counted": forward,
                "nfe_backward": total - forward, "output": to_numpy(out)}

    def time_forward(self, model, tol: float, probe, solver: str | None = None) -> float:
        x, _ = probe
        rtol = atol = self.ctx.parallel.replicate(jnp.asarray(tol, x.dtype))
        jax.block_until_ready(self._forward(model, x, rtol, atol, False, solver))
        times = []
        for _ in range(self.cfg.study.timing_repeats):
            start = time.perf_counter()
            jax.block_until_ready(self._forward(model, x, rtol, atol, False, solver))
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def evaluate(self, models, step):
        model = models["odenet"]
        m = self.measure(model, self.cfg.solver.rtol, self.probe)
        # Test error with the probe's compiled forward pass (batches of the probe's size).
        rtol = atol = self.ctx.parallel.replicate(jnp.asarray(self.cfg.solver.rtol,
                                                              self.probe[0].dtype))
        correct = self.ctx.map_batches(
            lambda a, b: jnp.argmax(self._forward(model, a, rtol, atol, False)[2], -1) == b,
            (self.data["x_test"], self.data["y_test"]), len(self.probe[1]))
        return {"test_error": float(1 - correct.mean()), "nfe_forward": m["nfe_forward"],
                "nfe_backward": m["nfe_backward"]}

    # -------------------------------------------------------------- report

    def report(self, models, log):
        out = self.ctx.out_dir
        st = self.cfg.study
        model = cast(models["odenet"], np.dtype(st.dtype))
        probe = (self.probe[0].astype(st.dtype), self.probe[1])
        reference = self.measure(model, st.reference_tol, probe)["output"]
        trained = self.cfg.solver.method
        solvers = [trained] + [s for s in st.solvers if s != trained]
        rows = []
        for solver in solvers:
            # The training solver through the model's own options, the others by name.
            other = {} if solver == trained else {"solver": solver}
            for tol in sorted(st.tolerances, reverse=True):
                m = self.measure(model, tol, probe, **other)
                error = float(np.linalg.norm(m["output"] - reference)
                              / np.linalg.norm(reference))
                rows.append({"solver": solver, "tolerance": tol,
                             "forward NFE": m["nfe_forward"],
                             "backward NFE": m["nfe_backward"],
                             "backward/forward": m["nfe_backward"] / max(m["nfe_forward"], 1),
                             "relative error": error,
                             "forward time (ms)": 1000 * self.time_forward(model, tol, probe,
                                                                          **other)})
        evals = log.split("eval")
        figures = [self._plot(rows, evals, out)]
        curves = plot_curves(log.split("train"), ["loss", "nfe"], out, "training.png",
                             "training loss and forward NFE")
        figures += [curves] if curves else []
        final = evals[-1] if evals else {}
        notes = [f"probe batch: {len(self.probe[1])} test images in {st.dtype}; error relative "
                 f"to a solve at tolerance {st.reference_tol}; final test error "
                 f"{100 * final.get('test_error', float('nan')):.2f}%",
                 f"trained at rtol=atol={self.cfg.solver.rtol} with {self.cfg.solver.method}, "
                 f"adjoint={self.cfg.solver.adjoint_text()}; solvers swept: {', '.join(solvers)}"]
        return Report(self.title, rows, figures=figures, notes=notes)

    def _plot(self, rows, evals, out):
        plt = pyplot()
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        nfe = [r["forward NFE"] for r in rows]
        solvers = list(dict.fromkeys(r.get("solver") for r in rows))
        for solver in solvers:
            mine = [r for r in rows if r.get("solver") == solver]
            label = solver or None
            # NFE spans less than a decade: a linear axis keeps its tick labels.
            axes[0].semilogx([max(r["relative error"], 1e-12) for r in mine],
                             [r["forward NFE"] for r in mine], "o-", label=label)
            axes[1].plot([r["forward NFE"] for r in mine],
                         [r["forward time (ms)"] for r in mine], "o-", label=label)
            axes[2].scatter([r["forward NFE"] for r in mine], [r["backward NFE"] for r in mine],
                            label=f"{solver}: sweep" if solver else None)
        if len(solvers) > 1:
            axes[0].legend(fontsize=7)
            axes[1].legend(fontsize=7)
        axes[0].set_xlabel("numerical error")
        axes[0].set_ylabel("forward NFE")
        axes[0].set_title("(a) NFE vs error")
        axes[1].set_xlabel("forward NFE")
        axes[1].set_ylabel("forward time (ms)")
        axes[1].set_title("(b) time vs NFE")
        f_train = [e["nfe_forward"] for e in evals if "nfe_forward" in e]
        b_train = [e["nfe_backward"] for e in evals if "nfe_backward" in e]
        if f_train:
            axes[2].scatter(f_train, b_train, marker="x", label="training evaluations")
        f_all = nfe + f_train
        b_all = [r["backward NFE"] for r in rows] + b_train
        top = max(f_all + b_all + [1])
        axes[2].plot([0, top], [0, top], "k:", lw=0.8, label="backward = forward")
        axes[2].plot([0, top], [0, top / 2], "k--", lw=0.8, label="backward = forward / 2")
        axes[2].legend(fontsize=7)
        axes[2].set_xlabel("forward NFE")
        axes[2].set_ylabel("backward NFE")
        axes[2].set_title("(c) backward vs forward NFE")
        axes[3].plot([e["step"] for e in evals], [e.get("nfe_forward") for e in evals], "o-",
                     label="forward")
        axes[3].plot([e["step"] for e in evals], [e.get("nfe_backward") for e in evals], "s-",
                     label="backward")
        axes[3].legend(fontsize=7)
        axes[3].set_xlabel("training step")
        axes[3].set_ylabel("NFE")
        axes[3].set_title("(d) NFE over training")
        fig.tight_layout()
        return save_figure(fig, out, "nfe_study.png")
