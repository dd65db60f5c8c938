"""`kind:` in a config -> the experiment class that runs it (imported on demand)."""

from __future__ import annotations

import importlib
import os

from .config import ConfigError, RunConfig, apply_overrides, build, read_yaml

# kind: (module of this package, class, one-line description)
KINDS: dict[str, tuple[str, str, str]] = {
    "ode_demo": (
        "ode_demo", "ODEDemo",
        "learn the dynamics dz/dt = z^3 A from trajectory snippets (no jaxode.nn model)",
    ),
    "odenet": (
        "odenet", "ODENetClassification",
        "image classification: ODE-Net against ResNet, RK-Net and an MLP (Table 1)",
    ),
    "nfe_study": (
        "nfe_study", "NFEStudy",
        "a trained ODE-Net's NFE against error, time, backward NFE and training (Figure 3)",
    ),
    "latent_ode": (
        "latent_ode", "LatentODESpirals",
        "latent ODE against an RNN on irregularly sampled spirals (Section 5.1, Table 2)",
    ),
    "cnf_density_matching": (
        "cnf", "DensityMatching",
        "planar CNF against planar NF fitted to unnormalised 2-D densities (Figure 4)",
    ),
    "cnf_ml": (
        "cnf", "MaxLikelihood",
        "CNF against planar NF by maximum likelihood on 2-D data (Figures 5-6)",
    ),
    "stiff_robertson": (
        "stiff", "StiffRobertson",
        "a neural vector field learns Robertson's stiff kinetics with rodas5p / kvaerno5",
    ),
    "bouncing_ball": (
        "bouncing_ball", "BouncingBall",
        "a bouncing ball's restitution and gravity (and a neural floor event) learned "
        "through event times",
    ),
}


def experiment_class(kind: str, file: str | None = None):
    """The Experiment subclass of `kind`; an unknown kind is a ConfigError naming `kind` in
    `file`."""
    if kind not in KINDS:
        raise ConfigError(file, "kind", f"unknown kind {kind!r}; expected one of {list(KINDS)}")
    module, name, _ = KINDS[kind]
    return getattr(importlib.import_module(f".{module}", __package__), name)


def load_config(path: str, overrides: list[str] | tuple = ()):
    """(experiment class, validated config) from a YAML file and --set overrides."""
    data = apply_overrides(read_yaml(path), list(overrides), path)
    kind = data.get("kind")
    if kind is None:
        raise ConfigError(path, "kind", f"missing value: expected one of {list(KINDS)}")
    if not isinstance(kind, str):
        raise ConfigError(path, "kind", f"expected a string, got {kind!r}")
    cls = experiment_class(kind, path)
    schema = getattr(cls, "Config", RunConfig)
    cfg = build(schema, data, file=path)
    if not cfg.name:
        cfg.name = os.path.splitext(os.path.basename(path))[0]
    check = getattr(cls, "check_config", None)
    if check is not None:  # checks that need more than one section (files, shapes)
        check(cfg, path)
    return cls, cfg
