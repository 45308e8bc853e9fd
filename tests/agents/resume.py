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


def cut_run_folder(path, stop=None):
    """A real run folder (so agents that keep `buffer.npz` beside the checkpoint save it) that,
    with `stop`, raises KeyboardInterrupt once the checkpoint of episode `stop` is written;
    `cut_run_folder(path)` again opens it for resuming. Its rows are `read_metrics(path)`."""
    from forethought.experiment.run import Run

    class CutRun(Run):
        def save_checkpoint(self, state, **meta):
            super().save_checkpoint(state, **meta)
            if stop is not None and meta["episode"] >= stop:
                raise KeyboardInterrupt

    if (path / "config.json").exists():
        return CutRun(path, Run.open(path).config)
    run = Run.create(path, {"agent": "test", "env": "test", "seed": 0})
    return CutRun(run.path, run.config)
