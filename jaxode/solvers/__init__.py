"""The solvers: each a small class with its reference, `SOLVERS` naming them all."""

from __future__ import annotations

from .adams import Adams, ExplicitAdams, ImplicitAdams
from .base import AbstractSolver, Step
from .implicit import ESDIRK, AbstractStiffSolver, ESDIRKTableau, Kvaerno3, Kvaerno4, Kvaerno5
from .rk import (
    RK4,
    Bosh3,
    Dopri5,
    Dopri8,
    Euler,
    ExplicitRK,
    Fehlberg2,
    Heun,
    HeunEuler,
    Midpoint,
    Ralston,
    Tsit5,
)
from .rosenbrock import Rodas5P, Rosenbrock, RosenbrockTableau
from .tableau import ButcherTableau

SOLVERS: dict[str, type[AbstractSolver]] = {
    cls.name: cls
    for cls in (Euler, Midpoint, Heun, Ralston, RK4, HeunEuler, Fehlberg2, Bosh3, Dopri5,
                Tsit5, Dopri8, ExplicitAdams, ImplicitAdams, Adams, Kvaerno3, Kvaerno4, Kvaerno5,
                Rodas5P)
}
"""Every solver's name (the `solver=` string) mapped to its class."""


def resolve_solver(solver, argument: str = "solver") -> AbstractSolver:
    """A solver instance from a name, a class or an instance."""
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(
                f"{argument}: unknown solver {solver!r}; expected one of {sorted(SOLVERS)}"
            )
        return SOLVERS[solver]()
    if isinstance(solver, type) and issubclass(solver, AbstractSolver):
        return solver()
    if isinstance(solver, AbstractSolver):
        return solver
    raise TypeError(
        f"{argument}: expected a name such as 'dopri5' or a solver object such as "
        f"jaxode.Dopri5(), got {solver!r}"
    )


__all__ = ["AbstractSolver", "ButcherTableau", "ExplicitRK", "SOLVERS", "Step",
           "AbstractStiffSolver", "ESDIRK", "ESDIRKTableau", "Rosenbrock", "RosenbrockTableau",
           "resolve_solver", *(cls.__name__ for cls in SOLVERS.values())]
