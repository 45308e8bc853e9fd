"""Progress display: a rich progress bar on a terminal, silence elsewhere (CI, pipes, files)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Episode progress: episode i/N, env steps, last return, steps per second.

    Shown only when stderr is a terminal (or `enabled=True`); otherwise every method is a no-op.
    """

    def __init__(self, total: int, description: str = "", enabled: bool | None = None, start: int = 0):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._started = time.perf_counter()
        self._steps_at_start: int | None = None
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("episodes"), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            transient=False)
        self._task = self._progress.add_task(description, total=total, completed=start, status="")
        self._progress.start()

    def update(self, episode: int, env_steps: int, last_return: float) -> None:
        if self._progress is None:
            return
        if self._steps_at_start is None:
            self._steps_at_start = env_steps
            self._started = time.perf_counter()
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = (env_steps - self._steps_at_start) / elapsed
        status = f"steps {env_steps}  return {last_return:.1f}  {rate:.0f} steps/s"
        self._progress.update(self._task, completed=episode, status=status)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
