"""``compiled`` backend: AOTInductor packages, built once per resolution and cached on disk.

``build`` runs ``torch.export`` + ``aoti_compile_and_package`` for the UNet (capture and replay
variants) and the VAE encoder/decoder with static shapes; a later process loads the ``.pt2``
packages without recompiling. The plain UNet call (only 'cp_then_encode''s preview inversion) reuses
the capture package and drops the keys/values. Text and image encoders run once per edit and stay
eager. On CUDA each package call is captured once in a CUDA graph and replayed (static buffers).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import CompiledRunnerBase


class CudaGraphed:
    """Replays one CUDA-graph capture of ``fn`` with static input/output buffers.

    Outputs are the static buffers: valid until the next call (callers clone what they keep).
    """

    def __init__(self, fn, sample_args):
        self.inputs = [a.clone() for a in sample_args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside the graph (allocator, lazy init)
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *args):
        for dst, src in zip(self.inputs, args):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        self.graph.replay()
        return self.outputs


BUILD_OPTIONS_VERSION = 3  # bump when build_options changes what a package holds (it is in the cache key)


def build_options(device: torch.device) -> dict:
    """Inductor settings of a package build.

    * ``freezing``: weights become constants of the graph, so convolution and linear weights are
      converted once, at build time, to the blocked layouts oneDNN computes with (and folded where
      possible). Without it every call re-laid out every weight: on the CPU inductor runs convolutions
      channels-last and transposed each 3x3 weight inside the GroupNorm kernels on every call, which
      made the full-size UNet package 1.4-1.6x *slower* than eager (measured, issue 17). Frozen, it is
      1.8x faster than eager at 256x256. The package holds its own (converted) copy of the weights.
    * ``compile_wrapper_opt_level=O0`` on the CPU: the C++ wrapper only sequences kernel calls (the
      kernels themselves are built at -O3 in their own file); compiling it without optimisation cuts a
      CPU build from minutes to seconds. On CUDA the calls are replayed from a CUDA graph anyway.
    * the weights as a binary blob in the package, not inside the ``.so``: loading an in-``.so`` package
      maps the library's 3.3 GB data section and copies the weights out of it, so a full-size UNet
      package cost 6.4 GB of host memory once loaded; from the blob it costs 3.2 GB, at the same speed
      (measured on the CPU at 256x256, issue 17).
    """
    opts = {"freezing": True, "aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": "binary_blob"}
    if device.type == "cpu":
        opts["aot_inductor.compile_wrapper_opt_level"] = "O0"
    return opts


class _Package:
    """A loaded AOTInductor package called like the eager network."""

    def __init__(self, path: Path, spec, cuda_graph: bool, device: torch.device):
        # The default (thread-safe) container records and queries CUDA events in every run, which a
        # stream under CUDA-graph capture refuses; the single-threaded one does not (torch >= 2.7).
        index = -1  # CPU: the package's default
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
        self.fn = torch._inductor.aoti_load_package(str(path), run_single_threaded=cuda_graph, device_index=index)
        self.cuda_graph = CudaGraphed(self._call, spec.sample()) if cuda_graph else None

    def _call(self, *args):
        out = self.fn(*(a.contiguous() for a in args))  # the package was compiled for contiguous strides
        if isinstance(out, (list, tuple)):
            return out[0] if len(out) == 1 else tuple(out)
        return out

    def __call__(self, *args):
        return self.cuda_graph(*args) if self.cuda_graph is not None else self._call(*args)


class CompiledRunner(CompiledRunnerBase):
    """UNet and VAE through AOTInductor packages (see module docstring)."""

    name = "compiled"
    networks = ("unet_capture", "unet_replay", "vae_encoder", "vae_decoder")

    def versions(self) -> dict:
        return {**super().versions(), "inductor": BUILD_OPTIONS_VERSION}

    def build(self, network, spec, out_dir: Path) -> None:
        import torch._inductor.config as inductor

        module = getattr(self, network)
        with torch.no_grad(), inductor.patch(build_options(self.device)):
            program = torch.export.export(module, spec.sample(), strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / f"{network}.pt2"))

    def load(self, network, spec, art_dir: Path):
        return _Package(art_dir / f"{network}.pt2", spec, cuda_graph=self.device.type == "cuda", device=self.device)

    def prepare(self, height: int, width: int) -> None:
        super().prepare(height, width)
        capture = self.unet_capture
        if not isinstance(capture, _Package):
            return
        self.unet = lambda *args: capture(*args)[0]
        if capture.cuda_graph is not None:  # keep each call's keys/values out of the static buffers
            self.unet_capture = lambda *args: tuple(t.clone() for t in capture(*args))
