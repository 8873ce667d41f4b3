"""What the compiled backends share: artifact keys, per-network build/load with the cache, K/V slots."""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

import torch

from regiondrag.export.specs import make_specs
from regiondrag.runner import NETWORKS, TorchRunner

from ..cache import ArtifactCache, cache_key


def device_tag(device: torch.device) -> dict:
    """The parts of the device that change a compiled artifact."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"gpu": torch.cuda.get_device_name(device), "sm": f"{major}{minor}"}
    import platform

    return {"gpu": "cpu", "sm": platform.machine()}


def precision_of(dtype: torch.dtype) -> str:
    """The precision name of a model dtype (in artifact keys and build settings)."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


class CompiledRunnerBase(TorchRunner):
    """A runner whose networks are replaced, per resolution, by artifacts from the cache.

    Subclasses set ``name`` and ``networks`` and implement :meth:`build` (write artifacts for one
    network into a directory) and :meth:`load` (artifacts -> a callable with the eager calling
    convention), plus :meth:`versions` (what goes into the key besides model, shapes and device).
    """

    name = "compiled-base"
    networks: tuple[str, ...] = NETWORKS

    def __init__(self, components, cache: ArtifactCache | None = None, precision: str | None = None,
                 progress: Callable[[str], None] | None = None):
        super().__init__(components)
        self.eager = {n: getattr(self, n) for n in NETWORKS}
        self.cache = cache or ArtifactCache()
        self.precision = precision or precision_of(self.dtype)
        self.progress = progress or (lambda msg: None)
        self.shape = None
        self.report: list[dict] = []  # one row per network of the last prepare (for `build`)

    def versions(self) -> dict:
        return {"torch": torch.__version__}

    def key(self, network: str, spec) -> str:
        return cache_key(network=network, backend=self.name, precision=self.precision, shapes=spec.shapes(),
                         inputs=spec.input_names, outputs=spec.output_names,
                         model=self.components.fingerprint, **device_tag(self.device), **self.versions())

    def build(self, network: str, spec, out_dir: Path) -> None:
        raise NotImplementedError

    def load(self, network: str, spec, art_dir: Path):
        raise NotImplementedError

    def prepare(self, height: int, width: int) -> None:
        super().prepare(height, width)
        if self.shape == (height, width):
            return
        for n, fn in self.eager.items():  # export from the eager modules
            setattr(self, n, fn)
        specs = make_specs(self, height, width)
        self.report = []
        built = {}  # every artifact first, then the loads: a build's peak memory never adds to loaded packages
        for network in self.networks:
            if network not in specs:
                continue
            spec = specs[network]
            t0 = time.perf_counter()
            art, hit = self.cache.get_or_build(
                self.key(network, spec), lambda d, n=network, s=spec: self._build_logged(n, s, d),
                meta={"network": network, "backend": self.name, "height": height, "width": width,
                      "precision": self.precision, "model": self.components.source})
            built[network] = art
            self.report.append({"network": network, "path": str(art), "hit": hit,
                                "bytes": sum(f.stat().st_size for f in art.rglob("*") if f.is_file()),
                                "seconds": time.perf_counter() - t0})
        loaded = {}
        for row in self.report:
            t0 = time.perf_counter()
            loaded[row["network"]] = self.load(row["network"], specs[row["network"]], built[row["network"]])
            row["load_seconds"] = time.perf_counter() - t0
        for network, fn in loaded.items():
            setattr(self, network, fn)
        self.shape = (height, width)

    def _build_logged(self, network: str, spec, out_dir: Path) -> None:
        self.progress(f"building {network} ({self.name}, {self.precision}) ...")
        try:
            self.build(network, spec, out_dir)
        except Exception as exc:  # noqa: BLE001 - re-raised with the network named
            raise RuntimeError(f"building {network} for the {self.name} backend failed: {exc}") from exc
        finally:
            gc.collect()  # an exporter's or compiler's copies of the weights go before the next build
