"""The machine a benchmark runs on: its name, a synchronised clock, a measured matmul ceiling, versions.

Shared by ``python -m regiondrag.engine bench`` and the kernel benchmarks in ``benchmarks/``.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import time
from pathlib import Path

import numpy as np


def _torch():
    import torch

    return torch


def clock(device) -> float:
    """Host time in ms after the device has finished its queued work."""
    if device.type == "cuda":
        _torch().cuda.synchronize(device)
    return time.perf_counter() * 1e3


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch = _torch()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def device_name(device) -> str:
    torch = _torch()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_key(device) -> str:
    """File-name key of the device: the GPU's name as a slug, or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def median_ms(fn, device, runs: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``runs`` calls after ``warmup``: CUDA events on CUDA (the calls
    queued back to back, one synchronisation at the end), the host clock elsewhere."""
    torch = _torch()
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return float(np.median(times))
    torch.cuda.synchronize(device)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return float(np.median([s.elapsed_time(e) for s, e in pairs]))


def _matmul_ms(device, dtype, n: int) -> float:
    torch = _torch()
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    cuda = device.type == "cuda"
    return median_ms(lambda: torch.matmul(a, b), device, runs=20 if cuda else 4, warmup=5 if cuda else 1)


def matmul_ceiling(device, dtype) -> dict:
    """Measured dense matmul rate (TFLOP/s) in ``dtype``: n=8192 on CUDA (median of 20), 1024 on CPU."""
    n = 8192 if device.type == "cuda" else 1024
    ms = _matmul_ms(device, dtype, n)
    free(device)  # the operands are gone with _matmul_ms's frame
    return {"tflops": 2 * n**3 / ms / 1e9, "n": n, "dtype": str(dtype).replace("torch.", "")}


# Distribution names of the packages we report, where they differ from the import name (first found wins).
DISTRIBUTIONS = {"triton": ("triton", "pytorch-triton"), "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
                 "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt_cu12", "tensorrt-cu13")}


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (an import name), read from its metadata without importing it."""
    from importlib import metadata

    for name in DISTRIBUTIONS.get(package, (package,)):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def collect_versions(device) -> dict:
    import regiondrag

    torch = _torch()
    out = {"python": platform.python_version(), "regiondrag": regiondrag.__version__, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": None, "driver": None,
           **{p: package_version(p) for p in ("diffusers", "transformers", "triton", "onnxruntime", "tensorrt")}}
    if device.type == "cuda":
        out["cudnn"] = str(torch.backends.cudnn.version())
        with contextlib.suppress(Exception):
            import subprocess

            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            out["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    return out
