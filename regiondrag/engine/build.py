"""``build``: compile every network of a model for one backend and resolution into the cache.

In one process (the default) the model is loaded once and every artifact is built beside it. With
``isolate=True`` each network is built by a process of its own that loads the model, frees every weight
that network's build does not need and exits when its artifact is in the cache: the peak memory is
that of one network's build rather than the whole model plus the compiler's copies of every network
built so far (what an exporter or compiler leaves behind goes with its process), at the price of one
model load per network. The calling process holds no model meanwhile.
"""
from __future__ import annotations

from typing import Callable

import torch

from .backends import COMPILED_BACKENDS, runner_class

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
Say = Callable[[str], None]


def build_artifacts(model: str, backend: str, height: int, width: int, precision: str | None = None,
                    ip_adapter: str | None = "default", device: str | None = None, config: str | None = None,
                    progress: Say | None = None, isolate: bool = False) -> list[dict]:
    """Build (or find in the cache) the artifacts of ``backend`` for ``model`` at ``height x width``.

    Returns one row per network: ``network``, ``hit`` (already cached), ``path``, ``bytes``, ``seconds``;
    with ``isolate`` (backends with per-network builds: ``compiled``, ``onnxruntime``) also ``process_s``
    (the process's whole life, model load included) and ``peak_anon_gb`` / ``peak_rss_gb`` (its peak
    memory, sampled from here; None where ``/proc`` cannot tell).
    """
    from regiondrag.inputs import processing_size

    settings = _checked(model, backend, height, width, precision, ip_adapter, device, config)
    size = processing_size(height, width)
    if isolate and supports_isolated_build(backend):
        return [row for network in runner_class(backend).networks
                if (row := _build_in_process_of_its_own(settings, size, network, progress or (lambda m: None)))]
    pipe = _load(settings, progress)
    pipe.runner.prepare(*size)
    return pipe.runner.report


def supports_isolated_build(backend: str) -> bool:
    """Whether ``backend``'s runner builds one network at a time (``build_network``)."""
    from .backends.base import CompiledRunnerBase

    return backend in COMPILED_BACKENDS and issubclass(runner_class(backend), CompiledRunnerBase)


def _checked(model, backend, height, width, precision, ip_adapter, device, config) -> dict:
    """The build's settings, every one checked before anything is loaded (picklable, for a child)."""
    from regiondrag.params import MAX_SIDE, integer, resolve_device

    if backend not in COMPILED_BACKENDS:
        raise ValueError(f"build needs a compiled backend, one of {', '.join(COMPILED_BACKENDS)}; got {backend!r}")
    for name, side in (("height", height), ("width", width)):
        integer(name, side, 64, MAX_SIDE)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    dtype = PRECISIONS[precision] if precision else (torch.float16 if dev.type == "cuda" else torch.float32)
    return dict(model=model, ip_adapter=ip_adapter, device=dev, dtype=dtype, backend=backend, config=config)


def _load(settings: dict, progress: Say | None):
    from regiondrag.pipeline import RegionDragPipeline

    return RegionDragPipeline.from_pretrained(settings["model"], ip_adapter=settings["ip_adapter"],
                                              device=settings["device"], dtype=settings["dtype"],
                                              backend=settings["backend"], config=settings["config"],
                                              build_progress=progress)


def _build_in_process_of_its_own(settings: dict, size: tuple[int, int], network: str, say: Say) -> dict | None:
    """Runs :func:`_build_worker` for ``network`` in a fresh process; its row (None: no such network)."""
    from .processes import run_in_own_process

    result = []

    def on_message(kind: str, payload, peak_anon_gb) -> bool:
        if kind == "say":
            say(payload)
            return False
        result.append((kind, payload))
        return True

    end = run_in_own_process(_build_worker, (settings, size, network), f"build-{network}", on_message)
    if not result:
        raise RuntimeError(f"the process building {network} for the {settings['backend']} backend exited with "
                           f"code {end.exitcode}{end.why()} before it finished")
    kind, payload = result[0]
    if kind == "value_error":  # a setting the loader refused (the model, say): as without isolate
        raise ValueError(payload)
    if kind == "error":
        raise RuntimeError(payload)
    if payload is None:
        return None
    return {**payload, "process_s": end.seconds, "peak_anon_gb": end.peak_anon_gb, "peak_rss_gb": end.peak_rss_gb}


def _build_worker(settings: dict, size: tuple[int, int], network: str, send) -> None:
    """The body of a build process: load, build one network, ``send("row", row | None)``, or
    ``("error" | "value_error", message)``; progress as ``("say", text)``."""
    try:
        pipe = _load(settings, lambda m: send("say", m))
        send("row", pipe.runner.build_network(*size, network))
    except ValueError as exc:
        send("value_error", str(exc))
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it with this message
        send("error", f"{type(exc).__name__}: {exc}")
