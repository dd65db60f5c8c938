"""ODE-Net and its baselines for image classification (the paper's Section 3, Table 1).

Image layout and batches
------------------------
Every image model takes either ONE example of shape (C, H, W), the layout of
`equinox.nn.Conv2d`, or a BATCH of shape (N, C, H, W), and returns (num_classes,) or
(N, num_classes) logits. The layers that act on one example (convolutions, GroupNorm,
the head) are vmapped over a batch inside the model. The ODE block solves a batch as
ONE ODE system whose state is the whole (N, C, H, W) array (joint mode, as torchdiffeq
does): every sample takes the same steps, and the tolerance applies to the RMS norm of
the whole batch. `ODEBlock(..., batch_mode="per_sample")` instead solves each sample
with its own steps (jaxode's `batch_axis`), sharing one parameter-gradient
accumulation in the backward pass. `jax.vmap(model)(xs)` also works, and then every
sample is a separate solve.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from ._util import SolverOptions, check_choice, per_example

__all__ = [
    "ODEFunc", "ODEBlock", "ODENet", "RKNet", "ResBlock", "ResNet", "MLPClassifier",
    "group_norm",
]

BATCH_MODES = ("joint", "per_sample")


def group_norm(channels: int) -> eqx.nn.GroupNorm:
    """GroupNorm with min(32, channels) groups, as in the paper's ODE-Net (the largest
    divisor of channels not above that, when it does not divide channels).

    Args:
        channels: the number of channels normalised.

    Returns:
        An `equinox.nn.GroupNorm` for (channels, H, W) inputs.

    Examples:
        >>> group_norm(64).groups, group_norm(12).groups
        (32, 12)
    """
    return eqx.nn.GroupNorm(math.gcd(min(32, channels), channels), channels)


class _Relu(eqx.Module):
    def __call__(self, x, *, key=None):
        return jax.nn.relu(x)


def shifted_conv(conv: eqx.nn.Conv2d, x):
    """`conv(x)` for one (C, H, W) image, as a sum over the kernel's offsets of channel
    matrix products on shifted views of the padded input.

    XLA:CPU runs a convolution inside a while loop (every ODE solve) with a generic
    kernel: measured here ~20x slower than the same convolution in straight-line code,
    and ~20x slower again for its vector-Jacobian product. Matrix products keep their
    fast kernels inside loops, so the vector field is written with them.
    Stride 1, dilation 1, one group (the ODE function's convolutions).
    """
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError("conv: shifted_conv handles stride 1, dilation 1, one group only")
    kernel_h, kernel_w = conv.weight.shape[2:]
    (top, bottom), (left, right) = conv.padding
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right)))
    height = padded.shape[1] - kernel_h + 1
    width = padded.shape[2] - kernel_w + 1
    out = 0.0
    for dy in range(kernel_h):
        for dx in range(kernel_w):
            window = padded[:, dy : dy + height, dx : dx + width]
            out = out + jnp.einsum("chw,oc->ohw", window, conv.weight[:, :, dy, dx])
    return out if conv.bias is None else out + conv.bias


def loop_conv(conv: eqx.nn.Conv2d, x):
    """The ODE function's convolution, lowered for the backend it runs on: on CPU as
    `shifted_conv`; elsewhere XLA's own convolution, which on an H200 ran the ODE-Net's
    training step as fast as the shifted form with 2/3 of its compiled memory."""
    if jax.default_backend() == "cpu":
        return shifted_conv(conv, x)
    return conv(x)


class ODEFunc(eqx.Module):
    """The ODE-Net vector field f(z, t): a conv net that sees t as an extra channel.

    GN -> ReLU -> Conv(C+1 -> C, 3x3, pad 1) -> GN -> ReLU -> Conv(C+1 -> C, 3x3, pad 1)
    -> GN, where each Conv gets the constant image t concatenated as an input channel
    and GN is GroupNorm with min(32, C) groups. `func(z, t)` takes z of shape (C, H, W),
    or (N, C, H, W) (the layers are vmapped over N), and returns dz/dt of z's shape.

    Args:
        channels: C, the channels of the state (and of both convolutions' outputs).
        key: a JAX PRNG key for the convolutions' weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> func = ODEFunc(channels=4, key=jax.random.PRNGKey(0))
        >>> func(jnp.ones((4, 6, 6)), 0.5).shape
        (4, 6, 6)
    """

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    norm3: eqx.nn.GroupNorm

    def __init__(self, *, channels: int = 64, key):
        k1, k2 = jax.random.split(key)
        self.norm1 = group_norm(channels)
        self.conv1 = eqx.nn.Conv2d(channels + 1, channels, 3, padding=1, key=k1)
        self.norm2 = group_norm(channels)
        self.conv2 = eqx.nn.Conv2d(channels + 1, channels, 3, padding=1, key=k2)
        self.norm3 = group_norm(channels)

    def _one(self, z, t):
        time = jnp.full((1, *z.shape[1:]), t, z.dtype)
        h = loop_conv(self.conv1, jnp.concatenate([time, jax.nn.relu(self.norm1(z))]))
        h = loop_conv(self.conv2, jnp.concatenate([time, jax.nn.relu(self.norm2(h))]))
        return self.norm3(h)

    def __call__(self, z, t):
        return per_example(lambda x: self._one(x, t), z, 3)


class ODEBlock(SolverOptions):
    """y = z(t1) where dz/dt = func(z, t), z(0) = x: the ODE-Net's continuous block.

    `func(z, t)` is any module; it is given x as it came (one example or a batch).
    `block(x)` returns y with x's shape; `block.solve(x)` returns (y, stats) with the
    solver statistics (`nfe`, `num_steps`, `num_accepted`, `num_rejected`: JAX integers,
    the forward pass only). `batch_mode="joint"` (default) solves whatever x is as one
    system; `"per_sample"` treats x's leading axis as a batch solved sample by sample
    (each its own steps, `batch_axis=0`), and then the stats have one entry per sample.
    The solver options are those of `jaxode.odeint`; tolerances default to the paper's
    1e-3 for classification. With `func=None` an `ODEFunc(channels=channels, key=key)`
    is built.

    Args:
        func: the vector field, called as `func(z, t)`; None builds an `ODEFunc`.
        solver: the ODE solver, a name (see `jaxode.SOLVERS`) or a solver object.
        rtol: relative tolerance of the solve.
        atol: absolute tolerance of the solve.
        adjoint: how gradients flow through the solve: "backsolve" (the adjoint
            method), "direct" or "forward", or a `jaxode.Backsolve`/`Direct`/`Forward`.
        max_steps: the most steps one solve may take (reaching it is an error).
        t1: the end of the integration interval [0, t1].
        dt0: the first step (adaptive solvers; None chooses it) or every step
            (fixed-step solvers).
        batch_mode: "joint" (one system for the whole batch) or "per_sample".
        channels: the channels of the default `ODEFunc` (when func is None).
        key: a PRNG key, needed when func is None.

    Raises:
        ValueError: an unknown batch_mode, or func None without a key.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> block = ODEBlock(channels=4, key=jax.random.PRNGKey(0))
        >>> y, stats = block.solve(jnp.ones((2, 4, 6, 6)))   # a batch of 2, solved jointly
        >>> y.shape, int(stats["nfe"]) > 0
        ((2, 4, 6, 6), True)
    """

    func: eqx.Module
    t1: float = eqx.field(static=True)
    batch_mode: str = eqx.field(static=True)

    def __init__(
        self,
        func: eqx.Module | None = None,
        *,
        solver: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: str = "backsolve",
        t1: float = 1.0,
        dt0: float | None = None,
        max_steps: int = 4096,
        batch_mode: str = "joint",
        channels: int = 64,
        key=None,
    ):
        check_choice("batch_mode", batch_mode, BATCH_MODES)
        if func is None:
            if key is None:
                raise ValueError("key: needed to build the default ODEFunc when func is None")
            func = ODEFunc(channels=channels, key=key)
        self.func = func
        self._set_solver_options(solver=solver, rtol=rtol, atol=atol, adjoint=adjoint,
                                 max_steps=max_steps, dt0=dt0)
        self.t1 = t1
        self.batch_mode = batch_mode

    def solve(self, x):
        """Integrate from z(0) = x to t1.

        Args:
            x: the initial state, one example or a batch.

        Returns:
            (z(t1), stats): the final state with x's shape, and the solver statistics
                of the forward solve (`nfe`, `num_steps`, `num_accepted`, `num_rejected`).
        """
        ts = jnp.asarray([0.0, self.t1], dtype=x.dtype)
        sol = self._solve(
            lambda z, t, func: func(z, t), x, ts, self.func,
            batch_axis=0 if self.batch_mode == "per_sample" else None,
        )
        return sol.zs[-1], sol.stats

    def __call__(self, x, *, key=None):
        return self.solve(x)[0]


def _downsampling(in_channels: int, channels: int, key) -> eqx.nn.Sequential:
    """Conv(in -> C, 3x3) -> GN -> ReLU -> Conv(C -> C, 4x4, /2) -> GN -> ReLU ->
    Conv(C -> C, 4x4, /2), as in the authors' MNIST example (28x28 -> 6x6)."""
    k1, k2, k3 = jax.random.split(key, 3)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(in_channels, channels, 3, key=k1),
            group_norm(channels),
            _Relu(),
            eqx.nn.Conv2d(channels, channels, 4, stride=2, padding=1, key=k2),
            group_norm(channels),
            _Relu(),
            eqx.nn.Conv2d(channels, channels, 4, stride=2, padding=1, key=k3),
        ]
    )


class _Head(eqx.Module):
    """GN -> ReLU -> global average pool -> Linear(C -> num_classes), one example."""

    norm: eqx.nn.GroupNorm
    linear: eqx.nn.Linear

    def __init__(self, channels: int, num_classes: int, key):
        self.norm = group_norm(channels)
        self.linear = eqx.nn.Linear(channels, num_classes, key=key)

    def __call__(self, h):
        return self.linear(jnp.mean(jax.nn.relu(self.norm(h)), axis=(1, 2)))


class _ConvClassifier(eqx.Module):
    """downsampling -> features -> head; features sees one example or the whole batch."""

    downsample: eqx.nn.Sequential
    features: eqx.Module
    head: _Head

    def _features(self, h):
        return self.features(h), {}

    def with_stats(self, x):
        """The logits and the feature block's solver statistics.

        Args:
            x: one image (C, H, W) or a batch (N, C, H, W).

        Returns:
            (logits, stats): logits of shape (num_classes,) or (N, num_classes), and
                the ODE block's statistics (`nfe`, ...; an empty dict for the ResNet).
        """
        channels = self.downsample.layers[0].in_channels
        if x.ndim not in (3, 4) or x.shape[-3] != channels:
            raise ValueError(f"x: expected one image ({channels}, H, W) or a batch (N, "
                             f"{channels}, H, W), got shape {tuple(x.shape)}")
        h = per_example(self.downsample, x, 3)
        h, stats = self._features(h)
        return per_example(self.head, h, 3), stats

    def __call__(self, x, *, key=None):
        """Logits for x of shape (C, H, W) or (N, C, H, W)."""
        return self.with_stats(x)[0]


class ODENet(_ConvClassifier):
    """The paper's ODE-Net classifier (Table 1): downsampling convs, one `ODEBlock` of
    `ODEFunc` integrated over t in [0, t1], and a GN -> ReLU -> pool -> Linear head.

    x: (in_channels, H, W) or a batch (N, in_channels, H, W); the batch is solved as one
    ODE system (see the module docstring). `net(x)` gives logits; `net.with_stats(x)`
    gives (logits, stats) with the ODE block's NFE. With channels=64 on 28x28 MNIST it
    has 208,266 parameters (the paper's 0.22M).

    Args:
        channels: the channels of the downsampling output and of the ODE state.
        in_channels: the input images' channels (1 for MNIST).
        num_classes: the number of logits.
        solver: the ODE solver, a name (see `jaxode.SOLVERS`) or a solver object.
        rtol: relative tolerance of the solve.
        atol: absolute tolerance of the solve.
        adjoint: how gradients flow through the solve: "backsolve" (the adjoint
            method), "direct" or "forward", or a `jaxode.Backsolve`/`Direct`/`Forward`.
        max_steps: the most steps one solve may take (reaching it is an error).
        t1: the end of the integration interval [0, t1].
        dt0: the first step (adaptive) or every step (fixed-step solvers).
        batch_mode: "joint" (one ODE system per batch) or "per_sample".
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> net = ODENet(channels=4, key=jax.random.PRNGKey(0))
        >>> logits, stats = net.with_stats(jnp.zeros((2, 1, 16, 16)))
        >>> logits.shape, int(stats["nfe"]) > 0
        ((2, 10), True)
    """

    def __init__(
        self,
        *,
        channels: int = 64,
        in_channels: int = 1,
        num_classes: int = 10,
        solver: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: str = "backsolve",
        t1: float = 1.0,
        dt0: float | None = None,
        max_steps: int = 4096,
        batch_mode: str = "joint",
        key,
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        self.downsample = _downsampling(in_channels, channels, k1)
        self.features = ODEBlock(
            ODEFunc(channels=channels, key=k2),
            solver=solver,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            t1=t1,
            dt0=dt0,
            max_steps=max_steps,
            batch_mode=batch_mode,
        )
        self.head = _Head(channels, num_classes, k3)

    def _features(self, h):
        return self.features.solve(h)


class RKNet(ODENet):
    """RK-Net (Table 1): the ODE-Net with its block integrated by a fixed-step
    Runge-Kutta method (`solver`, default "rk4", `steps` equal steps over [0, t1]) and
    differentiated through the solver's operations (`adjoint="direct"`).

    Args:
        channels: the channels of the downsampling output and of the ODE state.
        in_channels: the input images' channels.
        num_classes: the number of logits.
        solver: a fixed-step method ("euler", "midpoint", "heun", "ralston", "rk4").
        steps: the number of equal steps over [0, t1].
        t1: the end of the integration interval.
        batch_mode: "joint" or "per_sample".
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> net = RKNet(channels=4, steps=2, key=jax.random.PRNGKey(0))
        >>> net(jnp.zeros((1, 16, 16))).shape
        (10,)
    """

    def __init__(
        self,
        *,
        channels: int = 64,
        in_channels: int = 1,
        num_classes: int = 10,
        solver: str = "rk4",
        steps: int = 4,
        t1: float = 1.0,
        batch_mode: str = "joint",
        key,
    ):
        super().__init__(
            channels=channels,
            in_channels=in_channels,
            num_classes=num_classes,
            solver=solver,
            adjoint="direct",
            t1=t1,
            dt0=t1 / steps,
            max_steps=steps + 1,
            batch_mode=batch_mode,
            key=key,
        )


class ResBlock(eqx.Module):
    """x + Conv(GN-ReLU(Conv(GN-ReLU(x)))) with bias-free 3x3 convs (pre-activation
    residual block of the authors' example), for one example (C, H, W).

    Args:
        channels: the channels in and out.
        key: a JAX PRNG key for the convolutions' weights.
    """

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d

    def __init__(self, *, channels: int = 64, key):
        k1, k2 = jax.random.split(key)
        self.norm1 = group_norm(channels)
        self.conv1 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k1)
        self.norm2 = group_norm(channels)
        self.conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k2)

    def __call__(self, x, *, key=None):
        h = self.conv1(jax.nn.relu(self.norm1(x)))
        return x + self.conv2(jax.nn.relu(self.norm2(h)))


class _ResStack(eqx.Module):
    blocks: tuple

    def __call__(self, h):
        def one(x):
            for block in self.blocks:
                x = block(x)
            return x

        return per_example(one, h, 3)


class ResNet(_ConvClassifier):
    """The ResNet baseline (Table 1): the ODE-Net's downsampling and head around
    `num_blocks` (default 6) residual blocks. With channels=64 on 28x28 MNIST it has
    576,778 parameters (the paper's 0.60M). x: (C, H, W) or (N, C, H, W).

    Args:
        channels: the channels of the downsampling output and of the blocks.
        in_channels: the input images' channels.
        num_classes: the number of logits.
        num_blocks: the number of residual blocks.
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxode.nn import count_params
        >>> count_params(ResNet(channels=64, key=jax.random.PRNGKey(0)))
        576778
    """

    def __init__(
        self,
        *,
        channels: int = 64,
        in_channels: int = 1,
        num_classes: int = 10,
        num_blocks: int = 6,
        key,
    ):
        keys = jax.random.split(key, num_blocks + 2)
        self.downsample = _downsampling(in_channels, channels, keys[0])
        self.features = _ResStack(
            tuple(ResBlock(channels=channels, key=k) for k in keys[2:])
        )
        self.head = _Head(channels, num_classes, keys[1])


class MLPClassifier(eqx.Module):
    """The 1-layer MLP baseline (Table 1): flatten -> Linear(in_features -> hidden) ->
    ReLU -> Linear(hidden -> num_classes). x: (C, H, W) or (N, C, H, W). With the
    defaults (28x28 inputs, 300 hidden units) it has 238,510 parameters (0.24M).

    Args:
        in_features: the size of one flattened input (C * H * W).
        hidden_size: the hidden layer's width.
        num_classes: the number of logits.
        key: a JAX PRNG key for the weights.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> mlp = MLPClassifier(in_features=64, hidden_size=32, key=jax.random.PRNGKey(0))
        >>> mlp(jnp.zeros((5, 1, 8, 8))).shape
        (5, 10)
    """

    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(
        self,
        *,
        in_features: int = 28 * 28,
        hidden_size: int = 300,
        num_classes: int = 10,
        key,
    ):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(in_features, hidden_size, key=k1)
        self.out = eqx.nn.Linear(hidden_size, num_classes, key=k2)

    def __call__(self, x, *, key=None):
        return per_example(lambda v: self.out(jax.nn.relu(self.hidden(v.reshape(-1)))), x, 3)

