"""Small helpers shared by the models."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import api


def count_params(model) -> int:
    """The number of trainable scalars: the total size of the model's floating arrays.

    Works on a model or on its shapes (`equinox.filter_eval_shape(Model, ..., key=key)`),
    which counts a large model without initialising it.

    Args:
        model: an Equinox module (or any pytree), or its shapes.

    Returns:
        The number of floating-point scalars, as a Python int.

    Examples:
        >>> import jax, equinox as eqx
        >>> count_params(eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0)))
        8
    """

    def is_float(x):
        return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jnp.issubdtype(
            x.dtype, jnp.inexact
        )

    leaves = jax.tree_util.tree_leaves(model)
    return int(sum(math.prod(leaf.shape) for leaf in leaves if is_float(leaf)))


def per_example(fn, x, example_ndim: int):
    """Apply `fn` (written for one example of `example_ndim` dims) to `x`, which is one
    example or a batch with one extra leading axis (vmapped)."""
    if x.ndim == example_ndim:
        return fn(x)
    if x.ndim == example_ndim + 1:
        return jax.vmap(fn)(x)
    raise ValueError(
        f"x: expected one example with {example_ndim} dims or a batch with "
        f"{example_ndim + 1}, got shape {x.shape}"
    )


def gaussian_log_prob(x, mean, log_std):
    """Elementwise log N(x; mean, exp(log_std)^2)."""
    return -0.5 * (((x - mean) * jnp.exp(-log_std)) ** 2) - log_std - 0.5 * math.log(2 * math.pi)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def solve_module(field, z0, ts, module, **options):
    """`jaxode.solve(field, z0, ts, module, ..., dense=False)`: `field(z, t, module)`, the
    module's arrays differentiated and its other leaves closed over. Returns the Solution."""
    return api.solve(field, z0, ts, module, dense=False, **options)


class SolverOptions(eqx.Module):
    """Base of the models that solve ODEs: the options of `jaxode.odeint` they solve
    with, static (changing one recompiles)."""

    solver: str = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    adjoint: str = eqx.field(static=True)
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def _set_solver_options(self, *, solver, rtol, atol, adjoint, max_steps, dt0=None):
        self.solver, self.rtol, self.atol, self.adjoint = solver, rtol, atol, adjoint
        self.dt0, self.max_steps = dt0, max_steps

    def _solve(self, field, z0, ts, params, **extra):
        """`solve_module` with this model's solver options (and `extra` ones)."""
        return solve_module(field, z0, ts, params, solver=self.solver, rtol=self.rtol,
                            atol=self.atol, adjoint=self.adjoint, dt0=self.dt0,
                            max_steps=self.max_steps, **extra)
