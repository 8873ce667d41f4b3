"""torch -> ONNX for one network of a runner (see :mod:`regiondrag.export.specs`).

Uses the ``torch.export``-based exporter (``dynamo=True``), opset 18, with the weights as external
data when the graph would pass 2 GB (protobuf's limit). Every graph is checked with
``onnx.checker`` and shape inference before it is accepted.
"""
from __future__ import annotations

import contextlib
import gc
import io
from pathlib import Path

import torch

from .specs import ExportSpec

OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3


class ExportError(RuntimeError):
    """Exporting or checking a network failed; the message names the network."""


def module_of(runner, name: str) -> torch.nn.Module:
    """The module a runner executes for network ``name``."""
    module = getattr(runner, name, None)
    if module is None:
        raise ExportError(f"this model has no {name} (no IP-Adapter loaded?)")
    return module


def _weights_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(runner, spec: ExportSpec, path: Path, quiet: bool = True) -> Path:
    """Export ``spec``'s network of ``runner`` to ``path`` (``.onnx``); return the path.

    Raises :class:`ExportError` (chained to the cause) when export or checking fails.
    """
    import onnx

    module = module_of(runner, spec.name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = _weights_bytes(module) > PROTOBUF_LIMIT * 0.9
    sink = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            torch.onnx.export(module, spec.sample(), str(path), input_names=list(spec.input_names),
                              output_names=list(spec.output_names), opset_version=OPSET, dynamo=True,
                              external_data=external, verbose=False)
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except Exception as exc:  # noqa: BLE001 - wrapped with the network's name
        raise ExportError(f"exporting {spec.name} to ONNX failed: {exc}") from exc
    finally:
        _forget_matched_graphs()
    return path


# What onnxscript's pattern matchers remember of the last graph they matched.
_MATCHER_STATE = ("_graph", "_current_node", "_match", "_tracer")


def _forget_matched_graphs() -> None:
    """Drops the exported graph that onnxscript's rewrite rules keep after an export.

    The exporter optimises each graph with onnxscript's rewriter, whose rules are module-level objects;
    each rule's pattern matcher keeps the last graph, node and match it saw (``_graph``,
    ``_current_node``, ``_match`` in ``onnxscript/rewriter/_matcher.py``, 0.7), and through the graph's
    initializers the exported module's weights. After an ONNX export of the full-size UNet that kept
    3.4 GB alive that nothing else referenced: freeing the eager weights freed nothing (measured on the
    CPU, issue 17). Resetting that state is safe: every match starts by setting it afresh.
    """
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, PatternMatcher):
            for name in _MATCHER_STATE:
                if name in vars(obj):
                    setattr(obj, name, None)
    gc.collect()
