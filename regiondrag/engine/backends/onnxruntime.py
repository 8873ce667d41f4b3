"""ONNX Runtime backend: the exported graphs run in ONNX Runtime, with I/O bound to torch tensors.

Providers: CUDA (``onnxruntime-gpu``, on the torch stream) when the model is on a CUDA device, else
CPU. Inputs are bound by address (no copies); outputs go into torch tensors allocated once per
network and shape and reused. ``unet_capture``'s keys/values are written into a pool of per-call
slots, so a whole edit allocates nothing after its first call at a given resolution.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch

from regiondrag.export.onnx import export_onnx
from regiondrag.runner import NETWORKS

from .base import CompiledRunnerBase

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
              "tensor(bfloat16)": torch.bfloat16}


def _require_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError("the onnxruntime backend needs ONNX Runtime: pip install 'regiondrag[onnx]' "
                           "(or onnxruntime-gpu for CUDA)") from exc
    return onnxruntime


class OrtNetwork:
    """One ONNX Runtime session called like the eager network (tensors in, tensor or tuple out)."""

    def __init__(self, path: Path, device: torch.device, input_names, pool_slots: int = 0,
                 reuse_outputs: bool = False):
        ort = _require_ort()
        self.device = device
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0,
                                                    "user_compute_stream": str(stream)})]
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("the onnxruntime backend on CUDA needs onnxruntime-gpu "
                                   "(pip install onnxruntime-gpu)")
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.inputs = list(input_names)
        graph_inputs = {i.name for i in self.session.get_inputs()}
        if graph_inputs != set(self.inputs):
            raise RuntimeError(f"{path.name}: graph inputs {sorted(graph_inputs)} differ from the spec's {self.inputs}")
        self.outputs = [(o.name, tuple(o.shape), _ORT_TYPES[o.type]) for o in self.session.get_outputs()]
        self.binding = self.session.io_binding()
        self._out = self._alloc()
        self.pool_slots, self._pool, self._next = pool_slots, [], 0
        self.reuse_outputs = reuse_outputs
        self.first_only = False

    def sharing_session(self) -> "OrtNetwork":
        """Another caller of the same session (no second copy of the weights) with its own binding and
        output buffers, reused from call to call, no K/V pool, returning the first output only."""
        view = copy.copy(self)
        view.binding = self.session.io_binding()
        view._out = view._alloc()
        view.pool_slots, view._pool, view._next, view.reuse_outputs, view.first_only = 0, [], 0, True, True
        return view

    def _alloc(self) -> list[torch.Tensor]:
        return [torch.empty(shape, dtype=dt, device=self.device) for _, shape, dt in self.outputs]

    def reset_pool(self) -> None:
        """Start filling K/V slots from the first one again (called once per edit)."""
        self._next = 0

    def _targets(self) -> list[torch.Tensor]:
        if not self.pool_slots:
            return self._out
        if self._next == len(self._pool):  # grow the pool up to the number of calls per edit
            self._pool.append(self._alloc())
        out = self._pool[self._next]
        self._next += 1
        return out

    def __call__(self, *args: torch.Tensor):
        b, dev = self.binding, self.device
        kind, index = dev.type, dev.index or 0
        args = [a.contiguous() for a in args]
        for name, t in zip(self.inputs, args):
            b.bind_input(name, kind, index, _NP.get(t.dtype, np.float32), tuple(t.shape), t.data_ptr())
        outs = self._targets()
        for (name, shape, _), t in zip(self.outputs, outs):
            b.bind_output(name, kind, index, _NP.get(t.dtype, np.float32), shape, t.data_ptr())
        self.session.run_with_iobinding(b)
        if not (self.pool_slots or self.reuse_outputs):
            outs = [o.clone() for o in outs]  # the buffers are reused by the next call
        return outs[0] if len(outs) == 1 or self.first_only else tuple(outs)


FORMAT = 2  # what an artifact holds (in the cache key): 2 = ONNX Runtime's basic-level optimised graph


def optimise_offline(exported: Path, path: Path) -> Path:
    """Saves ``exported`` as ONNX Runtime's basic-level optimisation of it (constants folded, redundant
    nodes removed: standard ONNX, the same on every execution provider), every initializer over 1 KiB in
    one external file beside it (``<name>.onnx.data``).

    A session loads that graph with its full optimisations as before, but no longer folds the weights
    itself: the exporter writes every linear layer as ``MatMul(x, Transpose(W))``, and a session that
    folded those held the folded weights beside the ones it read, so the full-size image encoder (2.5 GB
    of weights) cost 5.0 GiB of anonymous memory once loaded; from the saved graph 2.4 GiB, loaded in
    a third of the time, with bit-identical outputs and the same speed (measured on the CPU, issue 17).
    """
    ort = _require_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(path)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{path.name}.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(exported), sess_options=opts, providers=["CPUExecutionProvider"])
    return path


# Networks whose outputs the pipeline consumes before calling the same network again: their output
# buffers are handed out directly and overwritten by the next call (no allocation per step).
REUSED_OUTPUTS = ("unet_replay", "vae_encoder", "vae_decoder")


class OrtRunner(CompiledRunnerBase):
    """Every network of the edit through ONNX Runtime (see module docstring)."""

    name = "onnxruntime"
    # The plain UNet runs in the capture session with its keys/values discarded: one UNet in memory
    # and one export fewer (only cp_then_encode's preview inversion calls it).
    networks = tuple(n for n in NETWORKS if n != "unet")

    def __init__(self, components, cache=None, precision=None, progress=None):
        _require_ort()
        if components.dtype not in _NP:  # tensors are bound with a numpy element type; numpy has no bf16
            raise ValueError(f"the onnxruntime backend runs float32 or float16 models, not "
                             f"{str(components.dtype).replace('torch.', '')}; use --precision fp16 or fp32, "
                             "or another backend")
        super().__init__(components, cache, precision, progress)

    def versions(self) -> dict:
        import onnx

        return {"onnxruntime": _require_ort().__version__, "onnx": onnx.__version__, "torch": torch.__version__,
                "format": FORMAT}

    def build(self, network, spec, out_dir: Path) -> None:
        exported = export_onnx(self, spec, out_dir / "export" / f"{network}.onnx")
        optimise_offline(exported, out_dir / f"{network}.onnx")
        shutil.rmtree(out_dir / "export")

    def load(self, network, spec, art_dir: Path):
        return OrtNetwork(art_dir / f"{network}.onnx", self.device, spec.input_names,
                          pool_slots=int(network == "unet_capture"),
                          reuse_outputs=network in REUSED_OUTPUTS)

    def prepare(self, height: int, width: int) -> None:
        super().prepare(height, width)
        capture = self.unet_capture
        if isinstance(capture, OrtNetwork):
            capture.reset_pool()
            if not isinstance(self.unet, OrtNetwork):  # once per resolution
                self.unet = capture.sharing_session()
