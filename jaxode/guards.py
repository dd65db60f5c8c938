"""Identities that refuse a derivative JAX would otherwise take silently wrong."""

from __future__ import annotations

import functools

import jax
import jax.extend
from jax.interpreters import ad, batching, mlir


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def first_order_only(message: str, x):
    """x, whose derivative raises a TypeError with `message`: put on what a first
    derivative is built from (a pullback, a coefficient), it refuses the second."""
    return x


@first_order_only.defjvp
def _first_order_only_jvp(message, primals, tangents):
    raise TypeError(message)


# The identity, whose transpose refuses reverse mode through a Forward() solve.
forward_only_p = jax.extend.core.Primitive("jaxode_forward_only")
forward_only_p.def_impl(lambda x: x)
forward_only_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(forward_only_p, mlir.lower_fun(lambda x: x, multiple_results=False))
ad.defjvp(forward_only_p, lambda tangent, x: forward_only_p.bind(tangent))
batching.primitive_batchers[forward_only_p] = lambda xs, dims: (forward_only_p.bind(*xs), dims[0])


def _refuse_reverse(cotangent, x):
    raise TypeError("adjoint: Forward() is forward mode only (jax.jvp, jax.jacfwd); for "
                    "jax.grad use adjoint='backsolve' or 'direct'")


ad.primitive_transposes[forward_only_p] = _refuse_reverse
