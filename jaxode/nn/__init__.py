"""The paper's models as Equinox modules (see each class's docstring).

Image classifiers (Section 3, Table 1): `ODENet` (downsampling, one `ODEBlock` of an
`ODEFunc`, head), the baselines `ResNet`, `RKNet` and `MLPClassifier`, and
`count_params`. They take one image (C, H, W) or a batch (N, C, H, W); the ODE block
solves a batch as one system (see `jaxode.nn.odenet`).

Time series (Section 5): `LatentODE` with an `RNNEncoder` or `ODERNNEncoder`
recognition network and an optional Poisson process likelihood, and the `RNNBaseline`.
Methods work on one sequence (ts, xs, mask); batches via `jax.vmap`.

Density models (Section 4): the planar `CNF`, `FFJORD` (MLP vector field, Hutchinson
trace) and the `PlanarFlow` baseline, all with `log_prob`, `sample`, `nll` and
`reverse_kl`; samples (dim,) or batches (N, dim), a CNF solving a batch as one system.
"""

from ._util import count_params
from .flows import (
    CNF,
    FFJORD,
    ConcatMLPField,
    PlanarField,
    PlanarFlow,
    exact_trace,
    hutchinson_trace,
)
from .latent import LatentODE, ODERNNEncoder, RNNBaseline, RNNCell, RNNEncoder, gaussian_kl
from .odenet import MLPClassifier, ODEBlock, ODEFunc, ODENet, ResBlock, ResNet, RKNet, group_norm

__all__ = [
    "count_params", "group_norm",
    "ODEFunc", "ODEBlock", "ODENet", "RKNet", "ResBlock", "ResNet", "MLPClassifier",
    "RNNCell", "RNNEncoder", "ODERNNEncoder", "LatentODE", "RNNBaseline", "gaussian_kl",
    "exact_trace", "hutchinson_trace", "PlanarField", "ConcatMLPField",
    "CNF", "FFJORD", "PlanarFlow",
]
