"""Planning and optimal control over any `cost(x, u, t)` and `dynamics(x, u, t)`.

Every solver follows trajax's contract, `solver(cost, dynamics, x0, U0, ...) -> Solution`, and is
jit-compiled whole. See `docs/ARCHITECTURE.md` for the objective convention.
"""

from forethought.control.collocation import collocation
from forethought.control.ilqr import ddp, ilqr
from forethought.control.mcts import uct, uct_batch, uct_path
from forethought.control.lqr import lqr, lqr_expected_cost, lqr_rollout
from forethought.control.mpc import MPC, run_mpc
from forethought.control.shooting import cem, mppi, random_shooting, rollout, rollout_costs
from forethought.control.solution import Solution

__all__ = ["Solution", "lqr", "lqr_rollout", "lqr_expected_cost", "ilqr", "ddp", "collocation", "MPC", "run_mpc", "uct", "uct_batch", "uct_path",
           "cem", "mppi", "random_shooting", "rollout", "rollout_costs"]
