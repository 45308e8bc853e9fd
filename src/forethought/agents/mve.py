"""`forethought run mve`: model-based value expansion (seed 002 sec 5.3); see `agents.model_value`."""

from forethought.agents.model_value import MVEConfig as Config
from forethought.agents.model_value import train_mve as train

__all__ = ["Config", "train"]
