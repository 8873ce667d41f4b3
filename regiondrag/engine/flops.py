"""FLOPs an edit executes, per pipeline stage, counted while it runs.

:class:`StageFlops` is a torch dispatch mode: every matrix multiply, convolution and attention op that
runs while it is active adds its FLOPs (the formulas of :mod:`torch.utils.flop_counter`, plus the CPU
flash-attention op it does not cover) to the stage :func:`regiondrag.timing.current_stage` names. So
the count is what the networks execute: a replay call, which takes its keys/values as inputs, costs
less than a capture call; the baseline's UNet, which recomputes the keys/values it then overwrites and
runs the IP-Adapter resampler in every call, costs more. Elementwise ops and normalisations are not
counted (they are a few percent of an SD UNet's FLOPs and bound by memory, not arithmetic).

Compiled backends (AOTInductor packages, ONNX Runtime, TensorRT) run outside torch's dispatcher;
:func:`count_edit_flops` counts their edits with the runner's eager networks, which compute the same
network variants.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

from regiondrag.runner import NETWORKS, TorchRunner
from regiondrag.timing import current_stage

CPU_FLASH_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


if CPU_FLASH_ATTENTION not in flop_registry:  # torch counts the CUDA attention ops only; FlopCounterMode too now
    register_flop_formula(CPU_FLASH_ATTENTION)(_cpu_flash_attention)
FORMULAS = flop_registry  # op -> FLOPs(*args, **kwargs, out_val=out)


class StageFlops(TorchDispatchMode):
    """While active, ``by_stage[stage]`` accumulates the FLOPs executed in each pipeline stage
    (``"other"`` outside every stage)."""

    def __init__(self):
        super().__init__()
        self.by_stage: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.by_stage[current_stage() or "other"] += int(formula(*args, **kwargs, out_val=out))
        return out


@contextlib.contextmanager
def eager_networks(runner):
    """A compiled runner's eager networks in place of its artifacts for the duration (no-op for others)."""
    eager = getattr(runner, "eager", None)
    if not eager:
        yield
        return
    if getattr(runner, "released", False):
        raise RuntimeError(f"the {runner.name} runner freed its eager weights (keep_eager_weights=False): "
                           "count its FLOPs before its first prepare")
    current = {n: getattr(runner, n) for n in eager}
    # the artifacts in place now stay where they are; the eager networks get their own preparation
    runner.prepare = lambda height, width: TorchRunner.prepare(runner, height, width)
    for n, fn in eager.items():
        setattr(runner, n, fn)
    try:
        yield
    finally:
        for n, fn in current.items():
            setattr(runner, n, fn)
        del runner.prepare  # the class's method again


def count_edit_flops(edit, runner=None) -> dict[str, int]:
    """FLOPs per stage of one call of ``edit()`` (run with ``runner``'s eager networks when it has any)."""
    counter = StageFlops()
    with torch.no_grad(), eager_networks(runner):
        for name in NETWORKS:  # constants of the weights (artifacts fold them at build) are not per-edit work
            fold = getattr(getattr(runner, name, None), "fold_constants", None)
            if fold is not None:
                fold()
        with counter:
            edit()
    return dict(counter.by_stage)
