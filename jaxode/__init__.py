"""jaxode: Neural Ordinary Differential Equations in JAX."""

from . import nn  # noqa: F401  (the models: jaxode.nn)
from .api import Solution, adjoint_nfe, odeint, solve
from .control import PIController
from .integrate import STATUS_MESSAGES
from .solvers import (
    RK4,
    Bosh3,
    Dopri5,
    Dopri8,
    Euler,
    Fehlberg2,
    Heun,
    HeunEuler,
    Midpoint,
    Ralston,
    Solver,
    Tsit5,
)

__version__ = "0.1.0"

__all__ = [
    "odeint", "solve", "adjoint_nfe", "Solution", "PIController", "STATUS_MESSAGES", "Solver",
    "Euler", "Midpoint", "Heun", "Ralston", "RK4",
    "HeunEuler", "Fehlberg2", "Bosh3", "Dopri5", "Tsit5", "Dopri8",
]
