"""The solver protocol: one step attempt from (t, z, dt, the solver's own state)."""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax


class Step(NamedTuple):
    """One step attempt's outcome."""

    z: jax.Array  # the state at t + dt
    error: jax.Array | None  # the local error estimate (None: a fixed-step method)
    dense: Any  # what `interpolate` needs for a point inside the step
    state: Any  # the solver's state after the step, used if the step is accepted
    # Counts of this attempt that vary from step to step, summed into `Solution.stats`
    # (e.g. {"nfe": ..., "num_jacobians": ..., "num_linear_solves": ...}); "nfe", when
    # given, replaces the solver's fixed `step_nfe`.
    stats: dict = {}


class AbstractSolver(eqx.Module):
    """A method for dz/dt = f(t, z) on a flat state.

    `init` gives the solver's state at the start (from f0 = f(t0, z0)); `step` attempts
    one step and returns a `Step`; `interpolate` gives the state at a fraction θ of an
    accepted step. A step that cannot be trusted (a Newton iteration that did not
    converge) returns a non-finite error, which the controller rejects. An
    implicit method keeps its Jacobian and Newton settings in its state, a multistep
    one its history; the loop only carries the state and keeps it when a step is
    accepted. `differentiated(n)` is the form that Direct differentiates (itself unless
    a method overrides it). Solvers are compared by value, so equal solvers share
    compiled code.
    """

    name: ClassVar[str]
    order: ClassVar[int]
    error_order: ClassVar[int | None] = None  # None: fixed step, needs dt0
    init_nfe: ClassVar[int] = 0  # evaluations of f by `init`, beyond the given f0
    step_nfe: ClassVar[int]  # evaluations of f by one `step`

    @abc.abstractmethod
    def init(self, f, t0, z0, f0) -> Any:
        """The state at the start; f0 = f(t0, z0)."""

    @abc.abstractmethod
    def step(self, f, t, z, dt, state) -> Step: ...

    @abc.abstractmethod
    def interpolate(self, z0, dt, dense, theta) -> jax.Array: ...

    def differentiated(self, n: int) -> AbstractSolver:
        """The solver to use when reverse mode differentiates through its steps (Direct)
        on states of n elements: itself, unless a method is cheaper differentiated in
        another form."""
        return self

    def current_error_order(self, state):
        """The order of the error estimate of a step attempted from `state` (what the
        step-size controller's exponent should use): `error_order`, except for a
        variable-order method, whose state carries its current order."""
        return self.error_order

    @property
    def adaptive(self) -> bool:
        return self.error_order is not None
