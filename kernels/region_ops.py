"""Per-step latent region operations of RegionDrag (ALGORITHM.md §8, §9b-c).

Point lists arrive as flat int64 indices into ``h*w`` (``y * w + x``), prepared once per edit with
duplicates already resolved (:func:`last_unique`), so every launch is a plain gather/scatter.
The ``*_ref`` functions are the PyTorch definitions; Triton versions (same signatures) dispatch to them
on the CPU.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def last_unique(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique values of ``idx`` and, for each, the position of its LAST occurrence.

    PyTorch's CPU index-put lets the last of several writes to one element win, which is what the
    reference's results depend on; resolving duplicates once makes every device agree with it.
    """
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    rev_unique, rev_first = np.unique(idx[::-1], return_index=True)
    return rev_unique, (idx.size - 1 - rev_first).astype(np.int64)


def paste_blend_ref(x: torch.Tensor, hook: torch.Tensor, copy_idx: torch.Tensor, paste_idx: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """``x[:, :, paste] = hook[:, :, copy]`` then ``x = where(mask, x, hook)``, in place; returns ``x``.

    ``x``, ``hook``: ``1 x C x h x w``; ``copy_idx``/``paste_idx``: int64 flat indices (paste unique);
    ``mask``: bool ``h x w``.
    """
    flat = x.view(x.shape[0], x.shape[1], -1)
    flat[:, :, paste_idx] = hook.reshape(hook.shape[0], hook.shape[1], -1)[:, :, copy_idx]
    return x.copy_(torch.where(mask, x, hook))


def blur_ref(x: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """§8 in place: ``x[idx] = r·x[idx] + noise_scale·noise`` with ``r = √(1-s²)`` if ``s < 1`` else 0.

    ``idx`` unique int64 flat indices (N); ``noise`` ``C x N`` drawn by the caller.
    """
    r = math.sqrt(1.0 - noise_scale**2) if noise_scale < 1 else 0.0
    flat = x.view(x.shape[1], -1)
    flat[:, idx] = r * flat[:, idx] + noise_scale * noise
    return x
