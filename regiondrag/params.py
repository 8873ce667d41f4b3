"""Checks of the numbers and settings a user passes, shared by the library and every front end.

Each check names the parameter and its allowed range, and costs nothing: front ends (CLI, bench, web
UI) run them before a model loads, and :meth:`RegionDragPipeline.edit` runs the same ones, so a bad
value is refused the same way everywhere. Wrong types raise :class:`ParameterTypeError` (both a
``TypeError`` and a ``ValueError``); values out of range (NaN and inf included) raise ``ValueError``.
"""
from __future__ import annotations

import math
import numbers
import secrets

import torch

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64 - 1] (higher overflows a C++ uint64)
NOISE_SCALE_MAX = 100.0  # the std of the handle noise; the paper uses 0..1.6 (UI) and 1.0 (eval)
PROMPT_MAX_CHARS = 10_000  # the text encoder reads the first 77 tokens; longer text only costs time
MAX_SIDE = 4096  # image sides (pixels) an edit or a build accepts; SD-1.5 works at 512


class ParameterTypeError(TypeError, ValueError):
    """A parameter of the wrong type (``None``, a string, a bool for a number). Both a ``TypeError`` and
    a ``ValueError``, so callers that catch either for bad input catch it."""


def integer(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (``hi`` None: no upper limit); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParameterTypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer in [{lo}, {'inf' if hi is None else hi}], got {value}")
    return value


def real(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval ``lo..hi`` (open ends where asked); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterTypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if not math.isfinite(value) or below or above:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


def check_seed(seed) -> int:
    """An int seed in ``[0, 2**64 - 1]``; ``None`` draws a fresh random one (reported in the result)."""
    if seed is None:
        return secrets.randbits(63)
    return integer("seed", seed, 0, SEED_MAX)


def check_prompt(prompt) -> str:
    """The text prompt; ``None`` means the empty prompt (the reference's default)."""
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise ParameterTypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > PROMPT_MAX_CHARS:
        raise ValueError(f"prompt has {len(prompt)} characters; at most {PROMPT_MAX_CHARS} are accepted "
                         "(the text encoder reads only its first 77 tokens)")
    return prompt


def check_image_size(height: int, width: int, what: str = "image") -> None:
    """Refuse sides above :data:`MAX_SIDE` (the edit would need more memory than any GPU has)."""
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"{what} is {width}x{height}; sides of at most {MAX_SIDE} pixels are supported "
                         "(SD-1.5 works best near 512)")


def available_devices() -> list[str]:
    """The torch devices this process can use, e.g. ``['cpu', 'cuda:0']``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device=None) -> torch.device:
    """``device`` as a usable ``torch.device`` (None: CUDA when available, else CPU).

    Refuses, before anything is loaded, a device this process cannot use (``cuda`` on a machine
    without CUDA, ``cuda:3`` with one GPU), naming the devices it can.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device; available: "
                         f"{', '.join(available_devices())}") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available in this process (torch "
                             f"{torch.__version__}, {'built without CUDA' if torch.version.cuda is None else 'no GPU found'}); "
                             f"available devices: {', '.join(available_devices())}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s); available: {', '.join(available_devices())}")
        return dev
    if str(dev) not in available_devices() and dev.type not in available_devices():
        raise ValueError(f"device {str(device)!r} is not available; available devices: "
                         f"{', '.join(available_devices())}")
    return dev
