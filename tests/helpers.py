"""Shared test helpers: fixture paths and the golden reference model (tests/fixtures/tiny-sd15)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_SD15 = FIXTURES / "tiny-sd15"
TINY_IP = TINY_SD15 / "ip_adapter"
METHOD_NAMES = {"Encode then CP": "encode_then_cp", "CP then Encode": "cp_then_encode"}

# Tolerances, one table per dtype: final latent (max abs) and output image (levels per pixel).
TOLERANCES = {"float32": {"latent": 1e-4, "image": 2}}


@lru_cache(maxsize=None)
def golden_case(name: str) -> dict:
    """A reference case (ALGORITHM.md §16) as a dict of numpy values."""
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@lru_cache(maxsize=1)
def reference_components():
    """The fixture's tiny SD-1.5 model with its tiny IP-Adapter, loaded once per test session."""
    from regiondrag.models import load_components

    return load_components(str(TINY_SD15), ip_adapter=str(TINY_IP))
