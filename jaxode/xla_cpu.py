"""One kernel for a small solve on XLA:CPU.

XLA:CPU runs a while loop's body kernel by kernel, at about 45 ns a kernel. A step of a
2-4 dimensional solve is some 17 kernels, so dispatch, not arithmetic, is its cost. XLA
compiles a call tagged `xla_cpu_small_call` into one function instead (its own
SmallWhileLoopHoistingPass tags loops that touch under 1 KiB a pass, which a dopri5 step
on two float64 states just misses). `one_kernel` tags the call that produced a value, at
lowering, where the real (vmapped) shapes are known, when that function's emitter
compiles everything in it: only the operations in `_COMPILED`, no array over
`ONE_KERNEL_SIZE` elements (larger reductions become fusions it has no code for) but
the buffers only passed on or sliced (`_CARRIED`, up to `BUFFER_SIZE`). On other
platforms, and for anything else, it is the identity.
"""

from __future__ import annotations

import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.interpreters import ad, batching, mlir

ONE_KERNEL_SIZE = 1024  # elements; a reduction fusion over 4096 fails to compile
# False: every loop runs kernel by kernel (read when a program is compiled, so set it
# before the first call).
ENABLED = True

# What the single-function emitter compiles: elementwise, shape and control-flow
# operations. Not dot products, convolutions, scatters or gathers, custom calls (LAPACK,
# callbacks), nor the few that lower to them.
_COMPILED = frozenset(
    "stablehlo." + name for name in """
    abs add and atan2 broadcast_in_dim case cbrt ceil clamp compare concatenate constant
    convert cosine count_leading_zeros divide dynamic_slice dynamic_update_slice exponential
    exponential_minus_one floor if imag iota is_finite log log_plus_one logistic maximum
    minimum multiply negate not optimization_barrier or pad popcnt power real reduce
    remainder reshape return reverse round_nearest_afz round_nearest_even rsqrt select
    shift_left shift_right_arithmetic shift_right_logical sign sine slice sqrt subtract tan
    tanh transpose while xor complex bitcast_convert tuple get_tuple_element""".split()
) | frozenset(
    # CHLO's elementwise functions, which XLA expands into the above.
    "chlo." + name for name in """
    acos acosh asin asinh atan atanh cosh digamma erf erf_inv erfc is_inf is_neg_inf
    is_pos_inf lgamma next_after sinh square tan""".split()
) | {"func.call", "func.return"}

# Operations that only pass a buffer on, or read or write a slice of it in place (the
# solve's outputs and output times): their buffer may hold up to BUFFER_SIZE elements,
# when the call is handed it from an optimization barrier (see `_lower_cpu`).
_CARRIED = frozenset(
    "stablehlo." + name for name in """while dynamic_slice dynamic_update_slice return
    tuple get_tuple_element optimization_barrier""".split()
) | {"func.call", "func.return"}
BUFFER_SIZE = 1 << 14  # measured to compile and run right up to 16,016 (8,000 outputs)

one_kernel_p = Primitive("jaxode_one_kernel")
one_kernel_p.def_impl(lambda x: x)
one_kernel_p.def_abstract_eval(lambda aval: aval)
batching.defvectorized(one_kernel_p)
ad.deflinear2(one_kernel_p, lambda ct, _: (ct,))


def one_kernel(x):
    """x, marking the call that produced it to be compiled as one function on XLA:CPU
    when it can be (see the module's docstring)."""
    return one_kernel_p.bind(x)


def _lower_cpu(ctx, x):
    call = x.owner
    # Not a call inside a loop or a branch of its own function (the backward passes call
    # the loop so): one was handed buffers that the emitter aborted the process on.
    if (not ENABLED or isinstance(call, ir.Block) or call is None
            or call.name != "func.call" or call.parent.name != "func.func"):
        return [x]
    functions = {str(ir.StringAttr(op.attributes["sym_name"]).value): op
                 for op in ctx.module_context.module.body.operations
                 if "sym_name" in op.attributes}
    # A larger operand must come from an optimization barrier: XLA folds one it can into a
    # constant, and the emitter aborted the process on a constant buffer of 1,500 elements.
    handed = all(_small(v, ONE_KERNEL_SIZE) or _from_barrier(v) for v in call.operands)
    callee = str(ir.FlatSymbolRefAttr(call.attributes["callee"]).value)
    if handed and _compiles(functions, callee, set()):
        call.attributes["mhlo.frontend_attributes"] = ir.DictAttr.get({
            "xla_cpu_small_call": ir.StringAttr.get("true"),
            # Else XLA inlines the call before its CPU backend sees the tag.
            "inlineable": ir.StringAttr.get("false"),
        })
    return [x]


def _compiles(functions, name, seen) -> bool:
    """Whether the function `name` (and every function it calls) holds only operations
    in `_COMPILED` on arrays of at most ONE_KERNEL_SIZE elements (BUFFER_SIZE in
    `_CARRIED`)."""
    if name in seen:
        return True
    seen.add(name)
    if name not in functions:
        return False
    stack = [functions[name].operation]
    while stack:
        op = stack.pop()
        for region in op.regions:
            for block in region.blocks:
                stack.extend(inner.operation for inner in block.operations)
        if op is functions[name].operation:
            continue
        limit = BUFFER_SIZE if op.name in _CARRIED else ONE_KERNEL_SIZE
        if op.name not in _COMPILED or not all(_small(v, limit)
                                                for v in [*op.operands, *op.results]):
            return False
        if op.name == "func.call" and not _compiles(
                functions, str(ir.FlatSymbolRefAttr(op.attributes["callee"]).value), seen):
            return False
    return True


def _from_barrier(value) -> bool:
    owner = value.owner
    return not isinstance(owner, ir.Block) and owner.name == "stablehlo.optimization_barrier"


def _small(value, limit) -> bool:
    shaped = value.type
    if not isinstance(shaped, ir.ShapedType):  # a token
        return True
    return shaped.has_static_shape and int(np.prod(shaped.shape)) <= limit


mlir.register_lowering(one_kernel_p, lambda ctx, x: [x])
# Uncached: a cached rule sees its own function's argument instead of the call.
mlir.register_lowering(one_kernel_p, _lower_cpu, platform="cpu", cacheable=False)
