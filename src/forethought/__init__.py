"""forethought: model-based reinforcement learning and optimal control in JAX.

Layers, bottom to top: `systems` (dynamics as pure JAX functions, mazes, Gymnasium adapters),
`control` (planners and optimal control), `models` (learned dynamics), `rl` (model-free pieces),
`agents` (the loops of the course notes), `experiment` (run folders, logs, plots, checkpoints).
Importing the package registers the built-in systems as Gymnasium envs (`forethought/Pendulum-v0`).
"""

from forethought.errors import ForethoughtError
from forethought import systems

__version__ = "0.1.0"
__all__ = ["ForethoughtError", "systems", "__version__"]
