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


def peak_rss_gb() -> float | None:
    """This process's peak resident memory (GiB) since it started or since :func:`reset_peak_rss`.

    Linux ``VmHWM``; elsewhere ``ru_maxrss`` (not resettable); None when neither can be read. Helper
    processes (the C++ compiler of a build) are not included.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError):
        pass
    try:
        import resource
        import sys

        scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    except (ImportError, OSError):
        return None


def process_tree_memory_gb(pid: int) -> tuple[float, float] | None:
    """``(resident, anonymous)`` memory (GiB) of process ``pid`` and all its descendants (Linux).

    Anonymous memory is what only swap or the OOM killer can take back; resident memory also counts
    clean pages mapped from files (a weight file being read), which the kernel drops under pressure.
    None where ``/proc`` cannot tell (another OS, the process gone).
    """
    rss = anon = 0
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith(("VmRSS:", "RssAnon:")))
            rss += int(fields["VmRSS"].split()[0])
            anon += int(fields["RssAnon"].split()[0])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, KeyError, ValueError):
            if p == pid:
                return None  # a descendant that exited meanwhile is simply not counted
    return rss / 2**20, anon / 2**20  # kB


class TreeMemorySampler:
    """Peak resident and anonymous memory of a process tree, sampled from outside it.

    ``/proc`` keeps a resident high-water mark (``VmHWM``) per process, but none for anonymous memory
    nor for a process's children (the compiler a build spawns); a sample every ``interval`` seconds
    gives both. Sampling from another process also sees what a call that holds the GIL allocates.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        import threading

        self.pid, self.interval = pid, interval
        self.peak_rss_gb = self.peak_anon_gb = None
        self._stop = threading.Event()
        self.sample()  # at least one sample, however soon it stops
        self._thread = threading.Thread(target=self._run, name=f"memory-of-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = process_tree_memory_gb(self.pid)
        if now is not None:
            self.peak_rss_gb = max(now[0], self.peak_rss_gb or 0.0)
            self.peak_anon_gb = max(now[1], self.peak_anon_gb or 0.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_gb` afresh from the current resident memory (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


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


def matmul_ceiling(device, dtype, repeats: int = 5) -> dict:
    """The dense arithmetic rate (TFLOP/s) in ``dtype`` that achieved TFLOP/s figures are set against.

    The faster of a square matmul (n=8192 on CUDA, 2048 on the CPU) and a 3x3 convolution of the UNet's
    640-channel blocks (batch 8 on CUDA, 1 on the CPU): on some CPUs oneDNN's convolutions run faster
    than the BLAS matmul (an AMD EPYC here: 0.22 vs 0.19 TFLOP/s on 2 cores), and a ceiling below what a
    network reaches is no ceiling. Each is warmed up and run in the current thread settings; the best
    of ``repeats`` medians (CUDA: of 20 back-to-back calls; CPU: of 3) counts, so a noisy moment lowers
    no ceiling. Work that does fewer multiplications than its nominal count (Winograd or FFT
    convolutions) could still exceed it.
    """
    torch = _torch()
    cuda = device.type == "cuda"
    g = torch.Generator(device).manual_seed(0)
    runs, warmup = (20, 5) if cuda else (3, 2)

    def best_ms(fn) -> float:
        return min(median_ms(fn, device, runs=runs, warmup=warmup) for _ in range(repeats))

    def matmul_rate(n: int) -> float:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        return 2 * n**3 / best_ms(lambda: torch.matmul(a, b)) / 1e9

    def conv_rate(batch: int, ch: int = 640, side: int = 32) -> float:
        x = torch.randn(batch, ch, side, side, device=device, dtype=dtype, generator=g)
        w = torch.randn(ch, ch, 3, 3, device=device, dtype=dtype, generator=g) / 50
        flop = 2 * batch * ch * ch * 9 * side * side
        return flop / best_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1)) / 1e9

    n = 8192 if cuda else 2048
    matmul, conv = matmul_rate(n), conv_rate(8 if cuda else 1)
    free(device)
    return {"tflops": max(matmul, conv), "matmul_tflops": matmul, "conv3x3_tflops": conv, "matmul_n": n,
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "method": f"faster of matmul and 3x3 conv, best of {repeats} medians, warm"}


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
