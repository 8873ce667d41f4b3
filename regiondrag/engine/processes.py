"""Work in a process of its own: what it loads and builds goes with it, its peak memory is its own, and a
crash or the OOM killer costs only its result (``bench`` runs each backend so, ``build --isolate`` each
network).

:func:`run_in_own_process` starts ``target(*args, send)`` in a fresh (spawned) process and hands every
``send(kind, payload)`` to the caller's ``on_message`` as it arrives; it samples the memory of the
process and its children from outside (:class:`regiondrag.engine.hardware.TreeMemorySampler`), and the
process ends within a second of its parent.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Finished:
    """How a process of :func:`run_in_own_process` ended."""

    exitcode: int | None
    peak_anon_gb: float | None
    peak_rss_gb: float | None
    seconds: float

    def why(self) -> str:
        """`` (killed: out of memory?)`` for a SIGKILL (what the OOM killer sends), else empty."""
        return " (killed: out of memory?)" if self.exitcode == -9 else ""


def run_in_own_process(target: Callable, args: tuple, name: str,
                       on_message: Callable[[str, Any, float | None], bool]) -> Finished:
    """Runs ``target(*args, send)`` in a fresh process until ``on_message(kind, payload, peak_anon_gb)``
    returns True or the process ends; ``peak_anon_gb`` is the process tree's peak anonymous memory so
    far (GiB), sampled just before."""
    import multiprocessing
    import queue

    from .hardware import TreeMemorySampler

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads and a model
    messages = ctx.Queue()
    worker = ctx.Process(target=_child, args=(target, args, messages, os.getpid()), name=name, daemon=True)
    t0 = time.perf_counter()
    worker.start()
    memory = TreeMemorySampler(worker.pid)
    complete = False
    try:
        while not complete:
            try:
                kind, payload = messages.get(timeout=0.5)
            except queue.Empty:
                if worker.is_alive():
                    continue
                try:  # what it sent just before it exited
                    kind, payload = messages.get(timeout=2.0)
                except queue.Empty:
                    break
            memory.sample()
            complete = bool(on_message(kind, payload, memory.peak_anon_gb))
    finally:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()
            worker.join()
        memory.stop()
    return Finished(worker.exitcode, memory.peak_anon_gb, memory.peak_rss_gb, time.perf_counter() - t0)


def _child(target: Callable, args: tuple, messages, parent: int) -> None:
    exit_with_parent(parent)
    target(*args, lambda kind, payload: messages.put((kind, payload)))
    messages.close()
    messages.join_thread()  # everything sent before the process exits


def exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """Ends this process once ``parent`` (the process that started it) is gone (killed, say): no one would
    read what it computes, and it would hold the CPU and memory for minutes. A daemon process is ended
    only when its parent exits normally."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
