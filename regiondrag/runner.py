"""The interface between the scheduler loop and whatever executes the networks.

A :class:`Runner` exposes the networks of :mod:`regiondrag.networks` as callables. The eager
:class:`TorchRunner` here is the reference; compiled backends (``regiondrag.engine.backends``)
subclass it and swap individual callables for compiled ones, keeping the calling convention:

* ``text_encoder(ids[1x77]) -> cond``; ``image_encoder(pixels) -> ip_tokens``
* ``vae_encoder(x) -> (mean, std)``; ``vae_decoder(z) -> image``
* ``unet(x, t, cond[, ip]) -> eps``; ``unet_capture(x, t, cond[, ip]) -> (eps, *k, *v)``;
  ``unet_replay(x, t, cond[, ip], *k, *v) -> eps``

``ip`` (the IP-Adapter tokens) is passed only with an IP-Adapter; without one ``image_encoder`` is None.
"""
from __future__ import annotations

import torch

from .attention import install_kv_processors, self_attention_layers
from .models import Components, RunsComponents
from .networks import ImageEncoder, TextEncoder, UNetKV, VAEDecoder, VAEEncoder, split_ip_projection

NETWORKS = ("text_encoder", "image_encoder", "vae_encoder", "vae_decoder", "unet", "unet_capture", "unet_replay")


class TorchRunner(RunsComponents):
    """Eager PyTorch execution of every network (the ``torch`` backend)."""

    name = "torch"

    def __init__(self, components: Components):
        c = self.components = components
        self.store = install_kv_processors(c.unet, _replay_attention_for(c.device))
        self.num_layers = self.store.num_layers
        self.unet = UNetKV(c.unet, "plain", self.store)
        self.unet_capture = UNetKV(c.unet, "capture", self.store)
        self.unet_replay = UNetKV(c.unet, "replay", self.store)
        projection = split_ip_projection(c.unet)
        self.image_encoder = (ImageEncoder(c.image_encoder, projection)
                              if c.image_encoder is not None and projection is not None else None)
        self.vae_encoder = VAEEncoder(c.vae)
        self.vae_decoder = VAEDecoder(c.vae)
        self.text_encoder = TextEncoder(c.text_encoder)
        for net in (self.unet, self.unet_capture, self.unet_replay, self.image_encoder, self.vae_encoder,
                    self.vae_decoder, self.text_encoder):
            if net is not None:
                net.eval()

    def prepare(self, height: int, width: int) -> None:
        """Called before an edit at ``height x width`` pixels (compiled backends build or load here).

        On CUDA it picks, once per shape, the faster of the Triton replay-attention kernel and SDPA.
        """
        if self.device.type == "cuda":
            from regiondrag.export.specs import kv_shapes
            from regiondrag.kernels.attention import select_attention

            modules = dict(self.components.unet.named_modules())
            for name, (tokens, channels) in zip(self_attention_layers(self.components.unet),
                                                kv_shapes(self.components.unet, height, width)):
                heads = modules[name].heads
                shape = (1, heads, tokens, channels // heads)
                select_attention(shape, shape, self.dtype, self.device)


def _replay_attention_for(device: torch.device):
    """Replay attention: the per-shape choice between Triton and SDPA on CUDA, SDPA elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    from regiondrag.kernels.attention import selected_attention

    return selected_attention
