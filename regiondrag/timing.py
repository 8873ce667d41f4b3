"""Per-stage wall-clock timing without synchronising inside the timed work.

On CUDA each stage records a pair of events and nothing waits for them until :meth:`finish`, so
timing adds no host-device synchronisation to the step loops. On the CPU a host clock is used.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_STAGE: ContextVar[str | None] = ContextVar("regiondrag_stage", default=None)


def current_stage() -> str | None:
    """The stage a :class:`StageTimer` is timing in this context now (None outside every stage)."""
    return _STAGE.get()


class StageTimer:
    """``with timer("stage"): ...`` records one stage; :meth:`finish` returns ``{stage: ms}`` and ``total``."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[tuple[str, object, object]] = []
        self._t0 = time.perf_counter()

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        start = self._now()
        token = _STAGE.set(stage)
        try:
            yield
        finally:
            _STAGE.reset(token)
            self._marks.append((stage, start, self._now()))

    def finish(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for stage, a, b in self._marks:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[stage] = out.get(stage, 0.0) + ms
        out["total"] = (time.perf_counter() - self._t0) * 1e3
        return out
