"""Planning and optimal control over any `cost(x, u, t)` and `dynamics(x, u, t)`.

Every solver follows trajax's contract, `solver(cost, dynamics, x0, U0, ...) -> Solution`, and is
jit-compiled whole. See `docs/ARCHITECTURE.md` for the objective convention.
"""

from forethought.control.solution import Solution

__all__ = ["Solution"]
