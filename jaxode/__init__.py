"""jaxode: Neural Ordinary Differential Equations in JAX."""

from . import nn  # noqa: F401  (the models: jaxode.nn)
from .adjoint import AbstractAdjoint, Backsolve, Direct, Forward
from .api import Solution, adjoint_nfe, odeint, solve
from .control import AbstractController, ConstantStep, PIController
from .events import Event
from .loop import STATUS_MESSAGES
from .solvers import (
    RK4,
    SOLVERS,
    AbstractSolver,
    Adams,
    Bosh3,
    ButcherTableau,
    Dopri5,
    Dopri8,
    ESDIRKTableau,
    Euler,
    ExplicitAdams,
    ExplicitRK,
    Fehlberg2,
    Heun,
    HeunEuler,
    ImplicitAdams,
    Kvaerno3,
    Kvaerno4,
    Kvaerno5,
    Midpoint,
    Ralston,
    Rodas5P,
    RosenbrockTableau,
    Tsit5,
)

__version__ = "0.2.0"

__all__ = [
    "odeint", "solve", "adjoint_nfe", "Solution", "Event", "STATUS_MESSAGES", "SOLVERS",
    "Backsolve", "Direct", "Forward", "AbstractAdjoint",
    "PIController", "ConstantStep", "AbstractController",
    "AbstractSolver", "ExplicitRK", "ButcherTableau",
    "Euler", "Midpoint", "Heun", "Ralston", "RK4",
    "HeunEuler", "Fehlberg2", "Bosh3", "Dopri5", "Tsit5", "Dopri8",
    "ExplicitAdams", "ImplicitAdams", "Adams",
    "Kvaerno3", "Kvaerno4", "Kvaerno5", "Rodas5P", "ESDIRKTableau", "RosenbrockTableau",
]
