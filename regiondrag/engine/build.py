"""``build``: compile every network of a model for one backend and resolution into the cache."""
from __future__ import annotations

from typing import Callable

import torch

from .backends import COMPILED_BACKENDS

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_artifacts(model: str, backend: str, height: int, width: int, precision: str | None = None,
                    ip_adapter: str | None = "default", device: str | None = None, config: str | None = None,
                    progress: Callable[[str], None] | None = None) -> list[dict]:
    """Build (or find in the cache) the artifacts of ``backend`` for ``model`` at ``height x width``.

    Returns one row per network: ``network``, ``hit`` (already cached), ``path``, ``bytes``, ``seconds``.
    """
    from regiondrag.inputs import processing_size
    from regiondrag.params import MAX_SIDE, integer, resolve_device
    from regiondrag.pipeline import RegionDragPipeline

    if backend not in COMPILED_BACKENDS:
        raise ValueError(f"build needs a compiled backend, one of {', '.join(COMPILED_BACKENDS)}; got {backend!r}")
    for name, side in (("height", height), ("width", width)):
        integer(name, side, 64, MAX_SIDE)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    dtype = PRECISIONS[precision] if precision else (torch.float16 if dev.type == "cuda" else torch.float32)
    pipe = RegionDragPipeline.from_pretrained(model, ip_adapter=ip_adapter, device=dev, dtype=dtype,
                                              backend=backend, config=config, build_progress=progress)
    pipe.runner.prepare(*processing_size(height, width))
    return pipe.runner.report
