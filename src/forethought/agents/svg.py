"""`forethought run svg`: SVG(H)/MAAC actor gradients through the learned model (seed 002 sec 5.4.2,
seed 003 "Solution 2"); see `agents.model_value`."""

from forethought.agents.model_value import SVGConfig as Config
from forethought.agents.model_value import train_svg as train

__all__ = ["Config", "train"]
