"""TensorRT backend: the networks of an edit as TensorRT engines, built once per resolution and cached.

Needs TensorRT >= 10 (``pip install tensorrt --extra-index-url https://pypi.nvidia.com``), ``onnx`` and a
CUDA GPU. ``tensorrt`` is imported lazily: this module imports everywhere; using it without TensorRT
raises a RuntimeError saying how to install it.

* :func:`build_engine`: ONNX -> engine, one static profile (min = opt = max = one resolution's shapes),
  FP16 when asked, a timing cache file shared by all builds.
* :class:`TRTNetwork`: one engine on torch CUDA tensors, enqueued on torch's current stream without host
  synchronisation; optionally replayed as a CUDA graph. Its outputs are buffers allocated once per
  input shape and OVERWRITTEN BY THE NEXT CALL: consume or clone them first.
* :class:`TensorRTRunner`: ``prepare(h, w)`` exports and builds (or finds in the
  :class:`~regiondrag.engine.cache.ArtifactCache`) each network's engine and swaps it in with the eager
  calling convention. eps is the reused buffer (a scheduler step consumes it before the next call);
  ``unet_capture``'s K/V go to a pool of slots, one per capture call of an edit, rewound by ``prepare``
  (an edit's K/V are invalid after the next ``prepare``); other outputs are cloned.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from regiondrag.export.onnx import export_onnx
from regiondrag.export.specs import make_specs
from regiondrag.runner import NETWORKS, TorchRunner

from ..cache import ArtifactCache, cache_key
from .base import device_tag, precision_of

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed: install it from NVIDIA's package index (pip install tensorrt "
                "--extra-index-url https://pypi.nvidia.com) on a machine with a CUDA GPU, or use another backend")
TRT_AVAILABLE = importlib.util.find_spec("tensorrt") is not None
FORMAT = 1  # in every cache key: bump when the build settings or the artifact layout change
_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
           "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
_LOGGER = None


def _trt():
    """The ``tensorrt`` module (>= 10), or a RuntimeError saying how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise RuntimeError(f"the TensorRT backend needs TensorRT >= 10, found {tensorrt.__version__}")
    return tensorrt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def _require_cuda(device: torch.device | None = None) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("the TensorRT backend needs a CUDA GPU, and torch sees none")
    if device is not None and device.type != "cuda":
        raise RuntimeError("the TensorRT backend needs the model on a CUDA device (load it with device='cuda')")


def _logger():
    """The process's TensorRT logger (it must outlive every TensorRT object): warnings and errors go to
    :mod:`logging`; errors are also kept so that a failed build can quote them."""
    global _LOGGER
    if _LOGGER is None:
        trt = _trt()
        severity = trt.ILogger.Severity

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, level, msg):
                if level in (severity.INTERNAL_ERROR, severity.ERROR):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif level == severity.WARNING:
                    log.warning("TensorRT: %s", msg)

        _LOGGER = Logger()
    return _LOGGER


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)


def build_engine(onnx_path, engine_path, shapes: dict[str, tuple[int, ...]], fp16: bool = True,
                 timing_cache_path=None, bf16: bool = False) -> Path:
    """Build the engine of the ONNX graph at ``onnx_path`` for input ``shapes``; write it to ``engine_path``.

    ``fp16``/``bf16`` allow those kernels (bf16 for a bfloat16 graph); ``timing_cache_path`` is read if it
    exists and rewritten with this build's timings added.
    """
    trt = _trt()
    _require_cuda()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = _logger()
    logger.errors.clear()

    def fail(detail: str) -> RuntimeError:
        return RuntimeError(f"building the TensorRT engine for {onnx_path.stem} failed: {detail}")

    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    try:
        parsed = parser.parse_from_file(str(onnx_path))  # resolves external data relative to the file
    except Exception as exc:  # noqa: BLE001 - re-raised with the network named
        raise fail(f"cannot parse {onnx_path}: {exc}") from exc
    if not parsed:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise fail(f"cannot parse {onnx_path}: " + ("; ".join(errors) or "no details"))
    config = builder.create_builder_config()
    for flag, wanted in (("FP16", fp16), ("BF16", bf16)):
        if wanted:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        declared, shape = tuple(tensor.shape), shapes.get(tensor.name)
        if shape is None and -1 in declared:
            raise fail(f"no shape given for its dynamic input {tensor.name} {declared}")
        shape = declared if shape is None else tuple(int(s) for s in shape)
        if len(shape) != len(declared) or any(d not in (-1, s) for d, s in zip(declared, shape)):
            raise fail(f"input {tensor.name} is {declared} in the graph, not {shape}")
        if -1 in declared:  # static profile: this resolution only
            profile.set_shape(tensor.name, shape, shape, shape)
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
    timing_path = Path(timing_cache_path) if timing_cache_path is not None else None
    blob = timing_path.read_bytes() if timing_path is not None and timing_path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # noqa: BLE001 - an unreadable timing cache only costs time
        cache = None
    config.set_timing_cache(cache or config.create_timing_cache(b""), ignore_mismatch=False)
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as exc:  # noqa: BLE001
        raise fail(str(exc)) from exc
    if serialized is None:
        raise fail("; ".join(logger.errors) or "TensorRT returned no engine (see its log)")
    if timing_path is not None:
        _atomic_write(timing_path, config.get_timing_cache().serialize())
    _atomic_write(engine_path, serialized)
    return engine_path


class TRTNetwork:
    """One engine called like the eager network: ``net(*inputs) -> tensor`` (one output) or a tuple.

    ``input_names`` is the positional order of the inputs (default: the engine's); inputs the graph
    dropped are accepted and ignored. Returned tensors are reused buffers (see the module docstring).
    """

    def __init__(self, engine_path, input_names=None, output_names=None, cuda_graph: bool = False, device=None):
        trt = _trt()
        _require_cuda()
        self.path = Path(engine_path)
        self.name, self.cuda_graph = self.path.stem, cuda_graph
        device = torch.device(device or "cuda")
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self._runtime = trt.Runtime(_logger())
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"cannot load the TensorRT engine {self.path} (another TensorRT version or GPU?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        self.input_names = tuple(input_names or inputs)
        self.output_names = tuple(output_names or outputs)
        unknown = (set(inputs) - set(self.input_names)) | (set(outputs) ^ set(self.output_names))
        if unknown:
            raise RuntimeError(f"the engine {self.path} does not match its spec (tensors {sorted(unknown)})")
        self.bound = [(i, n) for i, n in enumerate(self.input_names) if n in inputs]
        to_torch = {getattr(trt.DataType, k): v for k, v in _DTYPES.items() if hasattr(trt.DataType, k)}
        self.dtypes = {n: to_torch[self.engine.get_tensor_dtype(n)] for n in names}
        self.declared = {n: tuple(self.engine.get_tensor_shape(n)) for n in inputs}
        self._states: dict[tuple, SimpleNamespace] = {}
        self._active = self._stream = None

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"{self.name} takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(inputs)}")
        args = [self._conform(n, inputs[i]) for i, n in self.bound]
        shapes = tuple(tuple(a.shape) for a in args)
        state = self._states.get(shapes) or self._setup(shapes)
        if state.graph is not None:
            for dst, src in zip(state.static, args):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            state.graph.replay()
        else:
            self._bind(state, args)
            self._enqueue()
            if self.cuda_graph and not state.graph_failed:
                self._capture(state, args)  # the call above was the warm-up
        return state.outputs[0] if len(state.outputs) == 1 else state.outputs

    def _conform(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, self.dtypes[name])  # e.g. token ids for an engine that wants int32
        if not t.is_contiguous() or t.data_ptr() % 256:
            t = t.clone(memory_format=torch.contiguous_format)
        return t

    def _setup(self, shapes: tuple) -> SimpleNamespace:
        """A new input shape: check it against the engine, allocate the outputs for it."""
        for (_, n), shape in zip(self.bound, shapes):
            declared = self.declared[n]
            if len(declared) != len(shape) or any(d not in (-1, s) for d, s in zip(declared, shape)):
                raise ValueError(f"{self.name}: input {n} has shape {shape} but the engine was built for "
                                 f"{declared} (prepare the runner at this resolution)")
        state = SimpleNamespace(shapes=shapes, outputs=None, graph=None, static=None, graph_failed=False)
        self._bind(state, ())
        self._states[shapes] = state
        return state

    def _bind(self, state: SimpleNamespace, args) -> None:
        ctx = self.context
        if self._active is not state:  # input shapes, then (allocated once) outputs
            for (_, n), shape in zip(self.bound, state.shapes):
                if -1 in self.declared[n] and not ctx.set_input_shape(n, shape):
                    raise ValueError(f"{self.name}: input shape {shape} of {n} is outside the engine's profile")
            if state.outputs is None:
                state.outputs = tuple(torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=self.dtypes[n],
                                                  device=self.device) for n in self.output_names)
            for n, t in zip(self.output_names, state.outputs):
                ctx.set_tensor_address(n, t.data_ptr())
            self._active = state
        for (_, n), t in zip(self.bound, args):
            ctx.set_tensor_address(n, t.data_ptr())

    def _enqueue(self) -> None:
        current = torch.cuda.current_stream(self.device)
        if current.cuda_stream == 0:  # legacy default stream: TensorRT would synchronise around it
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_stream(current)
            ok = self.context.execute_async_v3(self._stream.cuda_stream)
            current.wait_stream(self._stream)
        else:
            ok = self.context.execute_async_v3(current.cuda_stream)
        if not ok:
            raise RuntimeError(f"TensorRT failed to run {self.name} (see the TensorRT log)")

    def _capture(self, state: SimpleNamespace, args) -> None:
        state.static = [a.clone() for a in args]
        self._bind(state, state.static)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # capture runs on torch's side stream, which _enqueue uses
                self._enqueue()
        except Exception as exc:  # noqa: BLE001 - an engine that cannot be captured runs plainly
            state.graph_failed, state.static = True, None
            log.warning("CUDA graph capture of the %s engine failed (%s); running it without", self.name, exc)
            return
        state.graph = graph


class KVPool:
    """K/V slots for the ``unet_capture`` calls of an edit: ``store`` copies one call's keys/values into
    the next slot (allocated the first time an edit needs that many); ``reset`` frees all for the next edit."""

    def __init__(self):
        self.slots: list[tuple[torch.Tensor, ...]] = []
        self.used = 0

    def reset(self) -> None:
        self.used = 0

    def store(self, tensors) -> tuple[torch.Tensor, ...]:
        if self.used == len(self.slots):
            self.slots.append(tuple(torch.empty_like(t) for t in tensors))
        slot = self.slots[self.used]
        self.used += 1
        torch._foreach_copy_(list(slot), list(tensors))
        return slot


def _adapt(name: str, net: TRTNetwork, pool: KVPool):
    """``net`` with the eager calling convention and output lifetimes of network ``name``."""
    if name in ("unet", "unet_replay"):
        return net  # eps: consumed by the scheduler step before the next call

    def unet_capture(*args):
        eps, *kv = net(*args)
        return (eps, *pool.store(kv))

    def vae_encoder(x):
        return tuple(t.clone() for t in net(x))

    def kept(*args):  # text / IP tokens live for the whole edit; the decoded image is returned
        return net(*args).clone()

    return {"unet_capture": unet_capture, "vae_encoder": vae_encoder}.get(name, kept)


class TensorRTRunner(TorchRunner):
    """Every network of the edit as a TensorRT engine (see the module docstring).

    One resolution's engines are in GPU memory at a time (the text/image encoders' serve every
    resolution); preparing another resolution releases the previous one's and loads (or builds) its own.
    """

    name = "tensorrt"

    def __init__(self, components, cache: ArtifactCache | None = None, precision: str | None = None,
                 cuda_graph: bool = False, progress: Callable[[str], None] | None = None):
        self.trt_version = _trt().__version__
        _require_cuda(components.device)
        precision = precision or precision_of(components.dtype)  # fp16 kernels only for an fp16 model
        if precision not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"precision {precision!r} is not one of fp16, bf16, fp32")
        super().__init__(components)
        self.eager = {n: getattr(self, n) for n in NETWORKS}  # what prepare exports
        self.cache = cache if cache is not None else ArtifactCache()
        self.precision, self.cuda_graph = precision, cuda_graph
        self.progress = progress or (lambda msg: None)
        self.shape: tuple[int, int] | None = None  # the resolution whose engines are loaded
        self.report: list[dict] = []  # one row per network of the last resolution loaded
        self.kv_pool = KVPool()
        self._networks: dict[str, TRTNetwork] = {}  # cache key -> loaded engine

    def prepare(self, height: int, width: int) -> None:
        if self.shape != (height, width):
            self.shape = None  # until every engine of the new resolution is in place
            for network, fn in self._load(height, width).items():
                setattr(self, network, fn)
            self.shape = (height, width)
        self.kv_pool.reset()

    def _key(self, spec) -> str:
        return cache_key(network=spec.name, backend=self.name, format=FORMAT, trt=self.trt_version,
                         precision=self.precision, dtype=str(self.dtype), shapes=spec.shapes(),
                         inputs=spec.input_names, outputs=spec.output_names,
                         fingerprint=self.components.fingerprint, **device_tag(self.device))

    def _load(self, height: int, width: int) -> dict:
        for network, module in self.eager.items():  # make_specs and the export read the eager modules
            setattr(self, network, module)
        specs = make_specs(self, height, width)
        specs = [specs[n] for n in NETWORKS if n in specs]  # no IP-Adapter: no image_encoder
        keys = [self._key(spec) for spec in specs]
        torch.cuda.current_stream(self.device).synchronize()  # nothing may still run on engines released here
        self._networks = {k: net for k, net in self._networks.items() if k in keys}  # free the old resolution's
        self.kv_pool = KVPool()
        timing = self.cache.root / f"tensorrt-{self.trt_version}-sm{device_tag(self.device)['sm']}.timing"
        loaded, self.report = {}, []
        for spec, key in zip(specs, keys):
            t0 = time.perf_counter()
            art, hit = self.cache.get_or_build(
                key, lambda d, s=spec: self._build(s, d, timing, height, width),
                meta={"network": spec.name, "backend": self.name, "height": height, "width": width,
                      "precision": self.precision, "trt": self.trt_version, "model": self.components.source})
            if key not in self._networks:
                self._networks[key] = TRTNetwork(art / f"{spec.name}.plan", spec.input_names, spec.output_names,
                                                 self.cuda_graph, self.device)
            loaded[spec.name] = _adapt(spec.name, self._networks[key], self.kv_pool)
            self.progress(f"{spec.name}: TensorRT engine {'found in the cache' if hit else 'built'}")
            self.report.append({"network": spec.name, "path": str(art), "hit": hit, "seconds": time.perf_counter() - t0,
                                "bytes": sum(f.stat().st_size for f in art.rglob("*") if f.is_file())})
        return loaded

    def _build(self, spec, out_dir: Path, timing: Path, height: int, width: int) -> None:
        """Export ``spec``'s network to ONNX in ``out_dir``, build its engine there, keep only the engine."""
        self.progress(f"{spec.name}: exporting to ONNX ...")
        onnx_path = export_onnx(self, spec, out_dir / "onnx" / f"{spec.name}.onnx")
        self.progress(f"{spec.name}: building the TensorRT engine for {height}x{width} ({self.precision}; "
                      "minutes, once) ...")
        build_engine(onnx_path, out_dir / f"{spec.name}.plan", spec.shapes(), self.precision == "fp16", timing,
                     bf16=self.precision == "bf16")
        shutil.rmtree(out_dir / "onnx")
