"""Identities that refuse a derivative JAX would otherwise take silently wrong."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def first_order_only(message: str, x):
    """x, whose derivative raises a TypeError with `message`: put on what a first
    derivative is built from (a pullback, a coefficient), it refuses the second."""
    return x


@first_order_only.defjvp
def _first_order_only_jvp(message, primals, tangents):
    raise TypeError(message)


def _identity_refusing_reverse(name: str, message: str):
    """An identity primitive whose transpose (reverse mode through it) raises a TypeError
    with `message`: forward mode and vmap go through, a cotangent never arrives silently
    dropped."""
    identity = jax.extend.core.Primitive(name)
    identity.def_impl(lambda x: x)
    identity.def_abstract_eval(lambda x: x)
    mlir.register_lowering(identity, mlir.lower_fun(lambda x: x, multiple_results=False))
    ad.defjvp(identity, lambda tangent, x: identity.bind(tangent))
    batching.primitive_batchers[identity] = lambda xs, dims: (identity.bind(*xs), dims[0])

    def refuse(cotangent, x):
        raise TypeError(message)

    ad.primitive_transposes[identity] = refuse
    return identity


# On a Forward() solve's outputs.
forward_only_p = _identity_refusing_reverse(
    "jaxode_forward_only", "adjoint: Forward() is forward mode only (jax.jvp, jax.jacfwd); for "
    "jax.grad use adjoint='backsolve' or 'direct'")

# On a Backsolve solve's dense history, which the adjoint method does not differentiate.
not_backsolved_p = _identity_refusing_reverse(
    "jaxode_not_backsolved", "adjoint: Backsolve does not differentiate Solution.evaluate "
    "(the dense output); to differentiate it use adjoint='direct' (or 'forward' for "
    "forward mode), or put the times in ts")


def cut_if_not_finite(fn):
    """fn, whose reverse mode sends no cotangent into it when its values are not all
    finite. Such a step attempt is rejected, and its linearisation (inf or NaN
    coefficients: a float32 overflow, say) would turn the zero cotangents of its
    discarded values into NaN gradients."""

    def cut(*args):
        converted, consts = jax.closure_convert(fn, *args)
        return _cut(converted, args, tuple(consts))

    return cut


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cut(fn, args, consts):
    return fn(*args, *consts)


def _cut_fwd(fn, args, consts):
    out, pullback = jax.vjp(lambda args, consts: fn(*args, *consts), args, consts)
    inexact = [x for x in jax.tree_util.tree_leaves(out) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return out, (pullback, jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in inexact])))


def _cut_bwd(fn, residuals, cotangent):
    pullback, finite = residuals
    keep = lambda x: jnp.where(finite, x, 0) if jnp.issubdtype(x.dtype, jnp.inexact) else x
    return jax.tree_util.tree_map(keep, pullback(cotangent))


_cut.defvjp(_cut_fwd, _cut_bwd)
