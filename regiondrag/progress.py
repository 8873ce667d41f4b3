"""An edit's progress: one tqdm bar per stage, and the caller's ``progress(stage, i, n)`` callback.

The loops report ``(stage, i, n)`` before step ``i`` of ``n``. :class:`StageBars` turns that into a bar
per stage (``inversion (preview)``, ``inversion``, ``sampling``), configured like diffusers'
``set_progress_bar_config`` (``disable=True`` turns the bars off; other keys go to ``tqdm``).
"""
from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

Progress = Callable[[str, int, int], None]


class StageBars:
    """Callable as ``progress(stage, i, n)``: forwards to ``callback`` and advances the stage's bar."""

    def __init__(self, callback: Progress | None = None, config: dict | None = None):
        self.callback, self.config = callback, dict(config or {})
        self.bar, self.stage = None, None

    def __call__(self, stage: str, i: int, n: int) -> None:
        if self.callback is not None:
            self.callback(stage, i, n)
        if self.config.get("disable"):
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=n, desc=stage, unit="step", leave=True, **self.config)
        self.bar.update(i - self.bar.n)  # i steps of this stage are done when step i starts

    def close(self) -> None:
        """Complete and close the current bar (the last step of a stage has finished)."""
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
        self.bar, self.stage = None, None
