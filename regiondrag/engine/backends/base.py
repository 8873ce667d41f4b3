"""What the compiled backends share: artifact keys, per-network build/load with the cache, K/V slots."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
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


def _return_free_heap() -> None:
    """Hands the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere): weights
    freed from the heap would otherwise still count as resident while the artifacts load beside them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class CompiledRunnerBase(TorchRunner):
    """A runner whose networks are replaced, per resolution, by artifacts from the cache.

    Subclasses set ``name`` and ``networks`` and implement :meth:`build` (write artifacts for one
    network into a directory) and :meth:`load` (artifacts -> a callable with the eager calling
    convention), plus :meth:`versions` (what goes into the key besides model, shapes and device).
    """

    name = "compiled-base"
    networks: tuple[str, ...] = NETWORKS
    # False: at prepare, once every artifact of the shape is built or found, the eager weights the
    # artifacts replace are freed before the artifacts load (one copy of those networks less in memory,
    # host or device). A later prepare then loads what the cache holds and refuses to build, and the
    # eager networks can no longer run (FLOP counting included). For one-resolution deployments.
    keep_eager_weights: bool = True

    def __init__(self, components, cache: ArtifactCache | None = None, precision: str | None = None,
                 progress: Callable[[str], None] | None = None):
        super().__init__(components)
        self.eager = {n: getattr(self, n) for n in NETWORKS}
        self.cache = cache or ArtifactCache()
        self.precision = precision or precision_of(self.dtype)
        self.progress = progress or (lambda msg: None)
        self.shape = None
        self.report: list[dict] = []  # one row per network of the last prepare (for `build`)
        self.released = False  # the eager weights that artifacts replace were freed
        self._specs: dict = {}  # (height, width) -> make_specs(...) of a prepared resolution

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
        if self.released and (height, width) not in self._specs:  # its sample inputs need the eager networks
            raise self._freed_error(f"prepare {width}x{height}")
        self.shape = None  # until this shape's artifacts are in place
        for n, fn in self.eager.items():  # export from the eager modules
            setattr(self, n, fn)
        if (height, width) not in self._specs:
            self._specs[(height, width)] = make_specs(self, height, width)
        specs = self._specs[(height, width)]
        self.report = []
        built = {}  # every artifact first, then the loads: a build's peak memory never adds to loaded packages
        for network in self.networks:
            if network in specs:
                row = self._artifact(network, specs[network], height, width)
                built[network] = Path(row["path"])
                self.report.append(row)
        if not self.keep_eager_weights:
            self._release_eager(set(built))
        loaded = {}
        # Largest first: a load's transient (ONNX Runtime reads the weights, then lays them out again)
        # then sits on the fewest bytes already loaded.
        for row in sorted(self.report, key=lambda r: -r["bytes"]):
            t0 = time.perf_counter()
            loaded[row["network"]] = self.load(row["network"], specs[row["network"]], built[row["network"]])
            row["load_seconds"] = time.perf_counter() - t0
        for network, fn in loaded.items():
            setattr(self, network, fn)
        self.shape = (height, width)

    def _artifact(self, network: str, spec, height: int, width: int) -> dict:
        """Finds or builds the artifact of ``network`` at one resolution; its row of :attr:`report`."""
        t0 = time.perf_counter()
        art, hit = self.cache.get_or_build(
            self.key(network, spec), lambda d: self._build_logged(network, spec, d),
            meta={"network": network, "backend": self.name, "height": height, "width": width,
                  "precision": self.precision, "model": self.components.source})
        return {"network": network, "path": str(art), "hit": hit,
                "bytes": sum(f.stat().st_size for f in art.rglob("*") if f.is_file()),
                "seconds": time.perf_counter() - t0}

    def build_network(self, height: int, width: int, network: str) -> dict | None:
        """Finds or builds only ``network``'s artifact at ``height x width`` (what a build process of its
        own does, see :func:`regiondrag.engine.build.build_artifacts`); its report row, or None when this
        backend or model has no such network.

        Before building, every eager weight the build does not need is freed (the image encoder's for a
        UNet: the UNet's sample inputs are computed first), so a process that loaded the whole model
        builds with little more than that network in memory. This runner cannot edit afterwards.
        """
        if self.released:
            raise self._freed_error(f"build {network}")
        specs = make_specs(self, height, width)
        if network not in self.networks or network not in specs:
            return None
        samples = specs[network].sample()
        spec = dataclasses.replace(specs[network], sample=lambda: samples)
        self._free_weights(set(self.eager) - {network})
        return self._artifact(network, spec, height, width)

    def _release_eager(self, replaced: set[str]) -> None:
        """Frees the weights of the eager networks in ``replaced`` (the plain UNet with the capture
        artifact, which serves it) that no network left eager shares (the IP-Adapter projection, say)."""
        if "unet_capture" in replaced and "unet" not in self.networks:
            replaced = replaced | {"unet"}
        freed = self._free_weights(replaced)
        self.released = True
        if freed:
            self.progress(f"freed {freed / 2**30:.2f} GiB of eager weights the {self.name} artifacts replace")

    def _free_weights(self, replaced: set[str]) -> int:
        """Replaces the weights of the eager networks in ``replaced`` that no other eager network shares by
        meta stand-ins (shape and dtype kept, storage gone) and hands the memory back; the bytes freed."""
        eager = {n: net for n, net in self.eager.items() if isinstance(net, torch.nn.Module)}
        kept = {id(t) for n, net in eager.items() if n not in replaced for t in (*net.parameters(), *net.buffers())}
        self.components.home = (self.device, self.dtype)
        freed, meta = 0, {}  # id(weight) -> its meta stand-in: shape and dtype kept, storage gone
        for n in replaced & eager.keys():
            for module in eager[n].modules():
                for table in (module._parameters, module._buffers):
                    for k, t in table.items():
                        if t is None or t.is_meta or id(t) in kept:
                            continue
                        if id(t) not in meta:
                            freed += t.numel() * t.element_size()
                            stand_in = t.to("meta")
                            if isinstance(t, torch.nn.Parameter):
                                stand_in = torch.nn.Parameter(stand_in, requires_grad=t.requires_grad)
                            meta[id(t)] = stand_in
                        table[k] = meta[id(t)]
        gc.collect()
        _return_free_heap()
        return freed

    def _freed_error(self, what: str) -> RuntimeError:
        return RuntimeError(f"cannot {what} for the {self.name} backend: the eager weights were freed after an "
                            "earlier resolution (keep_eager_weights=False); build every resolution first "
                            "(python -m regiondrag.engine build) or keep them")

    def _build_logged(self, network: str, spec, out_dir: Path) -> None:
        if self.released:
            raise self._freed_error(f"build {network}")
        self.progress(f"building {network} ({self.name}, {self.precision}) ...")
        try:
            self.build(network, spec, out_dir)
        except Exception as exc:  # noqa: BLE001 - re-raised with the network named
            raise RuntimeError(f"building {network} for the {self.name} backend failed: {exc}") from exc
        finally:
            gc.collect()  # an exporter's or compiler's copies of the weights go before the next build
