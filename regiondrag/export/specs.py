"""One export spec per network: names, dtypes, dynamic axes, a sample input and its shape profile.

Every compiled backend (ONNX Runtime, TensorRT, AOTInductor) reads these specs, so the networks
agree on their calling convention with :mod:`regiondrag.runner`:

========================  ==========================================  ===============================
network                   inputs                                      outputs
========================  ==========================================  ===============================
``text_encoder``          input_ids ``1x77`` int64                    text ``1x77xC``
``image_encoder``         pixels ``1x3xSxS``                          ip_tokens ``2x1xTxC``
``vae_encoder``           image ``1x3xHxW`` in [-1, 1]                mean, std ``1x4xhxw``
``vae_decoder``           latent ``1x4xhxw``                          image ``1x3xHxW``
``unet``                  latent, timestep ``[1]`` int64, text, ip    eps
``unet_capture``          as ``unet``                                 eps, k_1..k_L, v_1..v_L
``unet_replay``           as ``unet`` + k_1..k_L, v_1..v_L            eps
========================  ==========================================  ===============================

``ip_tokens`` is present only with an IP-Adapter. Keys/values are ``1 x N_l x C_l`` (tokens and
channels of self-attention layer l, in execution order). Each spec declares which axes could be
dynamic (``dynamic_axes``), but the graphs are exported with static shapes, one per resolution (every
artifact key holds the shapes); TensorRT builds one static profile from :meth:`ExportSpec.shapes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class ExportSpec:
    """How to export one network of a runner at one resolution."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    sample: Callable[[], tuple[torch.Tensor, ...]]  # sample inputs on the runner's device/dtype
    dynamic_axes: dict  # ONNX dynamic axes {tensor name: {axis: label}}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shape of every input at this spec's resolution (a TensorRT optimisation profile)."""
        return {n: tuple(t.shape) for n, t in zip(self.input_names, self.sample())}


def kv_shapes(unet: torch.nn.Module, height: int, width: int) -> list[tuple[int, int]]:
    """(tokens, channels) of every self-attention layer in execution order at ``height x width`` pixels."""
    from regiondrag.attention import self_attention_layers

    shapes, modules = [], dict(unet.named_modules())
    for name in self_attention_layers(unet):
        level = _resolution_level(name, len(unet.config.block_out_channels))
        tokens = _halved(height // 8, level) * _halved(width // 8, level)
        shapes.append((tokens, modules[name].to_k.out_features))
    return shapes


def _halved(n: int, times: int) -> int:
    """A latent side after ``times`` stride-2 downsamplers (3x3, padding 1: odd sides round up)."""
    for _ in range(times):
        n = (n + 1) // 2
    return n


def _resolution_level(name: str, n_blocks: int) -> int:
    """How many times the latent was halved at the block holding layer ``name``."""
    group, rest = name.split(".", 1)
    if group == "mid_block":
        return n_blocks - 1
    index = int(rest.split(".", 1)[0])
    return index if group == "down_blocks" else n_blocks - 1 - index


def kv_names(num_layers: int) -> tuple[str, ...]:
    return tuple(f"key_{i}" for i in range(num_layers)) + tuple(f"value_{i}" for i in range(num_layers))


def make_specs(runner, height: int, width: int) -> dict[str, ExportSpec]:
    """The export specs of every network ``runner`` has, at ``height x width`` pixels."""
    c, dev, dt = runner.components, runner.device, runner.dtype
    h, w = height // 8, width // 8
    unet_cfg = c.unet.config
    has_ip = runner.image_encoder is not None
    kv = kv_shapes(c.unet, height, width)
    names_kv = kv_names(len(kv))
    spatial = {2: "h", 3: "w"}

    def unet_inputs():
        args = [torch.randn(1, unet_cfg.in_channels, h, w, device=dev, dtype=dt),
                torch.tensor([500], dtype=torch.int64, device=dev),
                torch.randn(1, 77, unet_cfg.cross_attention_dim, device=dev, dtype=dt)]
        if has_ip:
            args.append(runner.image_encoder(image_sample()))
        return tuple(args)

    def kv_inputs():  # distinct tensors: an exporter may merge inputs that are the same object
        return tuple(torch.randn(1, n, ch, device=dev, dtype=dt) for _ in range(2) for n, ch in kv)

    def image_sample():
        size = c.image_encoder.config.image_size
        return torch.randn(1, 3, size, size, device=dev, dtype=dt)

    unet_in = ("latent", "timestep", "text") + (("ip_tokens",) if has_ip else ())
    kv_axes = {n: {1: "tokens"} for n in names_kv}
    specs = {
        "text_encoder": ExportSpec("text_encoder", ("input_ids",), ("text",),
                                   lambda: (torch.zeros(1, 77, dtype=torch.int64, device=dev),), {}),
        "vae_encoder": ExportSpec("vae_encoder", ("image",), ("mean", "std"),
                                  lambda: (torch.randn(1, 3, height, width, device=dev, dtype=dt),),
                                  {"image": spatial, "mean": spatial, "std": spatial}),
        "vae_decoder": ExportSpec("vae_decoder", ("latent",), ("image",),
                                  lambda: (torch.randn(1, 4, h, w, device=dev, dtype=dt),),
                                  {"latent": spatial, "image": spatial}),
        "unet": ExportSpec("unet", unet_in, ("eps",), unet_inputs, {"latent": spatial, "eps": spatial}),
        "unet_capture": ExportSpec("unet_capture", unet_in, ("eps",) + names_kv, unet_inputs,
                                   {"latent": spatial, "eps": spatial, **kv_axes}),
        "unet_replay": ExportSpec("unet_replay", unet_in + names_kv, ("eps",),
                                  lambda: unet_inputs() + kv_inputs(), {"latent": spatial, "eps": spatial, **kv_axes}),
    }
    if has_ip:
        specs["image_encoder"] = ExportSpec("image_encoder", ("pixels",), ("ip_tokens",), lambda: (image_sample(),), {})
    return specs
