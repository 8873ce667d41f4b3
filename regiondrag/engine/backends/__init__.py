"""Execution backends: each is a :class:`regiondrag.runner.TorchRunner` whose networks run compiled.

=============  =====================================================  ==============================
backend        runs                                                   needs
=============  =====================================================  ==============================
torch          eager PyTorch (the reference)                          —
compiled       AOTInductor packages built once and cached (+ CUDA      a C++ compiler (CPU) or CUDA
               graphs on CUDA)
onnxruntime    ONNX graphs in ONNX Runtime (CPU / CUDA providers),    ``pip install regiondrag[onnx]``
               I/O bound to torch tensors
tensorrt       TensorRT engines, fp16, one static profile per          TensorRT 10 from NVIDIA's index,
               resolution                                             a CUDA GPU
=============  =====================================================  ==============================
"""
from __future__ import annotations

# Every backend's name, in display order (the one list the pipeline, the CLI and bench use; this
# package imports nothing heavy at the top, so the CLI reads it cheaply).
BACKENDS = ("torch", "compiled", "onnxruntime", "tensorrt")
COMPILED_BACKENDS = BACKENDS[1:]


def runner_class(backend: str):
    """The runner class of compiled ``backend`` (imported on demand: each may need heavy libraries)."""
    if backend == "compiled":
        from .compiled import CompiledRunner

        return CompiledRunner
    if backend == "onnxruntime":
        from .onnxruntime import OrtRunner

        return OrtRunner
    if backend == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner
    raise ValueError(f"backend {backend!r} is not one of {', '.join(COMPILED_BACKENDS)}")


def make_runner(backend: str, components, cache=None, progress=None):
    """The runner of compiled ``backend`` for ``components`` (artifacts in ``cache``, an ArtifactCache);
    ``torch`` is :class:`regiondrag.runner.TorchRunner` itself (see ``regiondrag.pipeline.make_runner``)."""
    return runner_class(backend)(components, cache=cache, progress=progress)
