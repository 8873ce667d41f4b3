"""The networks of an edit as plain tensor-in/tensor-out modules (what every backend runs).

Each module takes and returns only tensors, so the same module runs eagerly, under torch.compile /
AOTInductor, or exported to ONNX / TensorRT:

* :class:`UNetKV` — ε-prediction with the self-attention keys/values as explicit outputs (capture)
  or inputs (replay). Inputs: latent ``1x4xhxw``, timestep ``[1]`` int64, text ``1x77xC``, IP tokens
  ``2x1xTxC`` (already projected by the IP-Adapter's Resampler, see :class:`ImageEncoder`).
* :class:`ImageEncoder` — CLIP image encoder penultimate states of ``(zeros, image)`` and the
  IP-Adapter projection, i.e. the IP tokens the UNet consumes (ALGORITHM.md §2).
* :class:`VAEEncoder` (posterior mean and std; the sample is drawn outside with the edit's
  generator, §13), :class:`VAEDecoder`, :class:`TextEncoder`.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import KVStore, install_kv_processors


class _ProjectedIP(nn.Module):
    """Stands in for the UNet's IP-Adapter projection when the tokens are already projected."""

    def forward(self, image_embeds):
        return image_embeds


def split_ip_projection(unet: nn.Module) -> nn.Module | None:
    """Detach the UNet's IP-Adapter Resampler so it runs once per edit instead of once per step.

    Returns the projection (or None without an IP-Adapter); the UNet then expects projected tokens.
    """
    proj = getattr(unet, "encoder_hid_proj", None)
    if proj is None or isinstance(proj, _ProjectedIP):
        return getattr(unet, "_regiondrag_ip_projection", None)
    unet.encoder_hid_proj = _ProjectedIP()
    object.__setattr__(unet, "_regiondrag_ip_projection", proj)  # not a submodule of the UNet
    return proj


class UNetKV(nn.Module):
    """ε(x, t) with K/V capture or replay (ALGORITHM.md §7) as explicit tensors.

    ``mode="plain"``: ``eps = f(latent, t, text[, ip_tokens])`` (ip_tokens only with an IP-Adapter).
    ``mode="capture"``: returns ``(eps, k_1..k_L, v_1..v_L)`` (layers in execution order).
    ``mode="replay"``: takes ``k_1..k_L, v_1..v_L`` after the regular inputs and uses them in place
    of the self-attention keys/values (their projections are not computed).
    """

    def __init__(self, unet: nn.Module, mode: str, store: KVStore | None = None):
        super().__init__()
        if mode not in ("plain", "capture", "replay"):
            raise ValueError(f"mode {mode!r} is not one of plain, capture, replay")
        self.unet, self.mode = unet, mode
        self.store = store if store is not None else install_kv_processors(unet)
        self.has_ip = getattr(unet, "encoder_hid_proj", None) is not None
        split_ip_projection(unet)

    @property
    def num_layers(self) -> int:
        return self.store.num_layers

    def forward(self, latent, timestep, text, *rest):
        """``rest`` = ``[ip_tokens] + [k_1..k_L, v_1..v_L in replay mode]`` (ip_tokens only with an IP-Adapter)."""
        ip_tokens, kv = (rest[0], rest[1:]) if self.has_ip else (None, rest)
        store, n = self.store, self.store.num_layers
        if self.mode == "capture":
            store.start_capture()
            store.new_call()
        elif self.mode == "replay":
            if len(kv) != 2 * n:
                raise ValueError(f"replay needs {2 * n} K/V tensors, got {len(kv)}")
            store.calls = [list(zip(kv[:n], kv[n:]))]
            store.use_call(0)
        kwargs = {"added_cond_kwargs": {"image_embeds": [ip_tokens]}} if self.has_ip else {}
        try:
            eps = self.unet(latent, timestep, encoder_hidden_states=text, **kwargs).sample
            if self.mode != "capture":
                return eps
            keys, values = zip(*store.calls[0])
            return (eps, *keys, *values)
        finally:
            store.clear()


class ImageEncoder(nn.Module):
    """IP tokens ``2x1xTxC`` from CLIP-preprocessed pixels ``1x3xSxS`` (§2, QUIRK IP tokens).

    Penultimate hidden states of the image encoder on an all-zero image and on the image, stacked as
    ``[e_0, e_img]``, then the IP-Adapter Resampler. Each image is encoded on its own, as the reference.
    """

    def __init__(self, image_encoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.encoder, self.projection = image_encoder, projection
        self._zero: dict = {}  # (shape, dtype, device) -> e_0: it depends on the weights only

    def _hidden(self, pixels):
        return self.encoder(pixels, output_hidden_states=True).hidden_states[-2]

    def _zero_image_states(self, pixels):
        """``e_0``, computed once per shape, dtype and device (the same values every edit; ONNX Runtime
        folds it into a constant too). Traced afresh under export, compilation, tracing or autograd."""
        if (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
                or torch.is_grad_enabled()):
            return self._hidden(torch.zeros_like(pixels))
        key = (tuple(pixels.shape), pixels.dtype, pixels.device)
        if key not in self._zero:
            self._zero[key] = self._hidden(torch.zeros_like(pixels))
        return self._zero[key]

    @torch.no_grad()
    def fold_constants(self) -> None:
        """Computes now what depends on the weights only (``e_0`` for one image at the encoder's size,
        dtype and device), as a compiled artifact does at build, so that the next call does not."""
        p = next(self.encoder.parameters())
        size = self.encoder.config.image_size
        self._zero_image_states(torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device))

    def forward(self, pixels):
        e_img = self._hidden(pixels)
        return self.projection([torch.stack([self._zero_image_states(pixels), e_img])])[0]


class VAEEncoder(nn.Module):
    """Posterior ``(mean, std)`` of ``vae.encode(x)`` for ``x = 2·image - 1`` in ``[-1, 1]``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std


class VAEDecoder(nn.Module):
    """``vae.decode(z).sample`` (the caller divides by 0.18215 first, §12)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


class TextEncoder(nn.Module):
    """Last hidden state of the text encoder on ``1x77`` token ids (§2)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]
