"""The scaffold of the agents' resume tests: a run that is cut off after some checkpoints, as a
killed process is, and one that resumes from the last of them."""

import jax
import numpy as np

from forethought.agents.base import MemoryRun


class Cut(MemoryRun):
    """Keeps the last checkpoint in memory; with `stop`, raises KeyboardInterrupt once the
    checkpoint of episode `stop` is written. `Cut(saved=cut.saved)` resumes from it."""

    def __init__(self, stop=None, saved=None):
        super().__init__()
        self.stop, self.saved = stop, saved

    def save_checkpoint(self, state, **meta):
        self.saved = (jax.tree.map(lambda a: np.array(a) if hasattr(a, "shape") else a, state), meta)
        if self.stop is not None and meta["episode"] >= self.stop:
            raise KeyboardInterrupt

    def load_checkpoint(self, like):
        return self.saved


def without_timing(rows, also=()):
    """Metric rows without their wall-clock columns (and the columns in `also`)."""
    return [{k: v for k, v in row.items() if "seconds" not in k and k not in also} for row in rows]
