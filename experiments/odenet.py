"""kind: odenet — image classification, ODE-Net against its baselines (Table 1).

The models of `jaxode.nn` (ODENet, ResNet, RKNet, MLPClassifier) are trained side by
side on the same batches, each with its own optimizer state, by cross-entropy. The
ODE-Net's block uses the `solver:` section (the paper: tolerance 1e-3, adjoint
gradients). Data: scikit-learn's 8x8 digits (default, nothing downloaded) or MNIST
from local IDX files (`data.path`). The result table has each model's test error,
parameter count and, for the ODE-Net, the forward NFE.
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

from . import data as datasets
from .config import ConfigError, RunConfig
from .report import Report, plot_curves
from .runner import Experiment

MODEL_NAMES = ("odenet", "resnet", "rknet", "mlp")


@dataclass(kw_only=True)
class ImageData:
    """`data:` of the image experiments: the data set (digits or MNIST files), split, size,
    subsets and augmentation."""

    dataset: Literal["digits", "mnist"] = "digits"
    path: str | None = None  # MNIST: the directory holding the four IDX files
    test_fraction: float = 0.2  # digits: the held-out share (a fixed permutation)
    split_seed: int = 0
    size: int | None = None  # resize the images to size x size (bilinear)
    train_subset: int | None = None  # use the first N training images only
    test_subset: int | None = None  # evaluate on the first N test images only
    augment_shift: int = 0  # translate each training image by up to this many pixels

    def check(self):
        errors = {}
        if not 0 < self.test_fraction < 1:
            errors["test_fraction"] = f"must be in (0, 1), got {self.test_fraction}"
        if self.size is not None and self.size < 4:
            errors["size"] = f"must be at least 4, got {self.size}"
        if self.augment_shift < 0:
            errors["augment_shift"] = f"must be >= 0, got {self.augment_shift}"
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errors[name] = "must be a positive integer or null"
        return errors


def check_image_data(d: ImageData, file: str | None) -> None:
    """The MNIST files must be there before any work starts."""
    if d.dataset != "mnist":
        return
    if d.path is None:
        raise ConfigError(file, "data.path", "missing value: MNIST needs the directory of its "
                          "IDX files (train-images-idx3-ubyte[.gz], ...); set data.path")
    try:
        datasets.find_mnist_files(d.path)
    except FileNotFoundError as error:
        raise ConfigError(file, "data.path", str(error)) from None


def load_images(d: ImageData, dtype, file: str | None = None) -> dict:
    """The images of `d` as numpy arrays {x_train, y_train, x_test, y_test} in `dtype`; a file
    that cannot be read is a ConfigError naming `data.path`."""
    if d.dataset == "digits":
        out = datasets.load_digits(d.test_fraction, d.split_seed, d.size)
    else:
        try:
            out = datasets.load_mnist(d.path, d.size)
        except (OSError, ValueError) as error:
            raise ConfigError(file, "data.path", str(error)) from None
    if d.train_subset:
        out["x_train"], out["y_train"] = out["x_train"][: d.train_subset], out["y_train"][
            : d.train_subset]
    if d.test_subset:
        out["x_test"], out["y_test"] = out["x_test"][: d.test_subset], out["y_test"][
            : d.test_subset]
    out["x_train"] = out["x_train"].astype(dtype)
    out["x_test"] = out["x_test"].astype(dtype)
    return out


@dataclass(kw_only=True)
class ClassifierModels:
    """`model:` of `odenet`: which classifiers are trained side by side, and their sizes."""

    names: list[Literal["odenet", "resnet", "rknet", "mlp"]] = field(
        default_factory=lambda: list(MODEL_NAMES)
    )
    channels: int = 64
    t1: float = 1.0
    batch_mode: Literal["joint", "per_sample"] = "joint"
    resnet_blocks: int = 6
    rk_solver: str = "rk4"
    rk_steps: int = 4
    mlp_hidden: int = 300

    def check(self):
        errors = {}
        if not self.names:
            errors["names"] = "list at least one model"
        elif len(set(self.names)) != len(self.names):
            errors["names"] = f"duplicate model names in {self.names}"
        if self.channels < 1:
            errors["channels"] = f"must be positive, got {self.channels}"
        return errors


@dataclass(kw_only=True)
class Config(RunConfig):
    """The schema of an `odenet` config."""

    data: ImageData = field(default_factory=ImageData)
    model: ClassifierModels = field(default_factory=ClassifierModels)


def cast(model, dtype):
    """The model's floating arrays in `dtype`."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model
    )


def build_classifier(name: str, m: ClassifierModels, solver: dict, image_shape, key):
    """The `jaxode.nn` classifier named `name` ('odenet', 'resnet', 'rknet' or 'mlp') for
    images of `image_shape`."""
    from jaxode import nn

    channels, size = image_shape[0], image_shape[1]
    if name == "odenet":
        return nn.ODENet(channels=m.channels, in_channels=channels, t1=m.t1,
                         batch_mode=m.batch_mode, **solver, key=key)
    if name == "rknet":
        return nn.RKNet(channels=m.channels, in_channels=channels, solver=m.rk_solver,
                        steps=m.rk_steps, t1=m.t1, batch_mode=m.batch_mode, key=key)
    if name == "resnet":
        return nn.ResNet(channels=m.channels, in_channels=channels, num_blocks=m.resnet_blocks,
                         key=key)
    return nn.MLPClassifier(in_features=channels * size * size, hidden_size=m.mlp_hidden,
                            key=key)


def image_batch(images: dict, cfg, step: int) -> dict:
    """The training batch of `step`, translated when cfg.data.augment_shift > 0; seeded
    by (seed, step), so a resumed run sees the same batches."""
    idx = datasets.batch_indices(len(images["y_train"]), cfg.train.batch_size, step, cfg.seed)
    x = datasets.random_shift(images["x_train"][idx], cfg.data.augment_shift,
                              np.random.default_rng([cfg.seed, step, 1]))
    return {"x": x, "y": images["y_train"][idx]}


def logits_and_nfe(model, x):
    """(logits, mean forward NFE or NaN) for a batch."""
    if hasattr(model, "with_stats"):
        logits, stats = model.with_stats(x)
        if "nfe" in stats:
            return logits, jnp.mean(stats["nfe"]).astype(jnp.float32)
        return logits, jnp.asarray(jnp.nan, jnp.float32)
    return model(x), jnp.asarray(jnp.nan, jnp.float32)


class ImageExperiment(Experiment):
    """The shared part of the image experiments: cfg.data is an `ImageData`, checked
    before any work and loaded into self.data; training batches by `image_batch`."""

    progress_fields = ("loss", "nfe")

    @staticmethod
    def check_config(cfg, file):
        check_image_data(cfg.data, file)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.data = load_images(cfg.data, ctx.dtype, ctx.config_file)

    def batch(self, step):
        return image_batch(self.data, self.cfg, step)


class ODENetClassification(ImageExperiment):
    """kind: odenet (Table 1): an ODE-Net against a ResNet, an RK-Net and an MLP; the table has
    test error, parameters and NFE, the figures the test error and loss during training."""

    Config = Config
    title = "Image classification: ODE-Net and baselines (Table 1)"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self._eval = eqx.filter_jit(self._eval_batch)

    def init_models(self, key):
        keys = jax.random.split(key, len(self.cfg.model.names))
        shape = self.data["x_train"].shape[1:]
        return {
            name: cast(build_classifier(name, self.cfg.model, self.cfg.solver.options(), shape,
                                        k), self.ctx.dtype)
            for name, k in zip(self.cfg.model.names, keys)
        }

    def loss(self, models, batch, key):
        total, metrics = 0.0, {}
        for name, model in models.items():
            logits, nfe = logits_and_nfe(model, batch["x"])
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))
            total = total + loss
            metrics[f"{name}/loss"] = loss
            metrics[f"{name}/acc"] = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
            if name == "odenet":
                metrics["nfe"] = nfe
        return total, metrics

    def _eval_batch(self, models, x, y):
        out = {}
        for name, model in models.items():
            logits, nfe = logits_and_nfe(model, x)
            out[name] = (jnp.argmax(logits, -1) == y, nfe * jnp.ones(x.shape[0], jnp.float32))
        return out

    def evaluate(self, models, step):
        start = time.perf_counter()
        out = self.ctx.map_batches(
            lambda x, y: self._eval(models, x, y), (self.data["x_test"], self.data["y_test"]),
            self.cfg.train.eval_batch_size,
        )
        metrics = {}
        for name, (correct, nfe) in out.items():
            metrics[f"{name}/test_error"] = float(1.0 - correct.mean())
            if not np.all(np.isnan(nfe)):
                metrics[f"{name}/nfe"] = float(np.nanmean(nfe))
        metrics["eval_time"] = time.perf_counter() - start
        return metrics

    def report(self, models, log):
        from jaxode.nn import count_params

        out = self.ctx.out_dir
        final = log.split("eval")[-1]
        train = log.split("train")
        last = train[-1] if train else {}
        theory = {"odenet": ("O(1)", "O(L~)"), "rknet": ("O(L~)", "O(L~)"),
                  "resnet": ("O(L)", "O(L)"), "mlp": ("-", "-")}
        label = {"odenet": "ODE-Net (adjoint)", "rknet": "RK-Net", "resnet": "ResNet",
                 "mlp": "1-layer MLP"}
        rows = []
        for name in self.cfg.model.names:
            model = models[name]
            rows.append({
                "model": label[name],
                "test error": f"{100 * final[f'{name}/test_error']:.2f}%",
                "params": count_params(model),
                "train loss": last.get(f"{name}/loss", float("nan")),
                "NFE (fwd)": final.get(f"{name}/nfe", "-"),
                "memory": theory[name][0],
                "time": theory[name][1],
            })
        names = self.cfg.model.names
        figures = [f for f in (
            plot_curves(log.split("eval"), [f"{n}/test_error" for n in names], out,
                        "test_error.png", "test error during training"),
            plot_curves(train, [f"{n}/loss" for n in names], out, "train_loss.png",
                        "training loss (cross-entropy)", logy=True),
            plot_curves(train, ["nfe"], out, "nfe.png", "ODE-Net forward NFE per batch"),
        ) if f]
        d = self.cfg.data
        notes = [f"data: {d.dataset}, {len(self.data['y_train'])} train / "
                 f"{len(self.data['y_test'])} test images of shape "
                 f"{tuple(self.data['x_train'].shape[1:])}; one test image is "
                 f"{100 / len(self.data['y_test']):.2f}% of the test error",
                 f"solver: {self.cfg.solver.method}, rtol={self.cfg.solver.rtol}, "
                 f"atol={self.cfg.solver.atol}, adjoint={self.cfg.solver.adjoint_text()}"]
        return Report(self.title, rows, figures=figures, notes=notes)
