"""The benchmark's workloads: the edits it times, their fixed inputs and their nominal cost.

Every backend gets the same inputs: a fixed-seed smooth random image and one region pair of two
ellipses covering 5% of the image each, the target shifted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True)
class Workload:
    """One benchmarked edit. ``width`` x ``height`` in pixels."""

    name: str
    width: int
    height: int
    method: str = "encode_then_cp"
    steps: int = 20
    start_t: float = 0.5
    end_t: float = 0.2
    noise_scale: float = 1.0
    seed: int = 42
    prompt: str = "A photo of an object."


WORKLOADS = {w.name: w for w in (
    Workload("default", 512, 512),
    Workload("768x768", 768, 768),
    Workload("512x768", 512, 768),
    Workload("cp_then_encode", 512, 512, method="cp_then_encode"),
)}


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (a 6x6 random grid upsampled bicubically), HxWx3 uint8."""
    from PIL import Image

    grid = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.array(Image.fromarray(grid).resize((width, height), Image.BICUBIC))  # writable, for torch


def ellipse_mask(width: int, height: int, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return ((((xx + 0.5 - cx) / ax) ** 2 + ((yy + 0.5 - cy) / ay) ** 2) <= 1).astype(np.uint8)


def region_pair(width: int, height: int):
    """The benchmark's drag: two ellipses of 5% of the image each (semi-axes 0.16 W and 0.10 H), the
    target shifted by (+0.26 W, -0.10 H)."""
    import regiondrag as rd

    ax, ay = 0.16 * width, 0.10 * height
    src = ellipse_mask(width, height, 0.36 * width, 0.55 * height, ax, ay)
    trg = ellipse_mask(width, height, 0.62 * width, 0.45 * height, ax, ay)
    return rd.RegionPairs(sources=[src], targets=[trg])


@dataclass
class Inputs:
    image: np.ndarray
    drag: object
    region_fraction: float


def make_inputs(w: Workload) -> Inputs:
    drag = region_pair(w.width, w.height)
    return Inputs(synthetic_image(w.width, w.height), drag, float(drag.sources[0].mean()))
