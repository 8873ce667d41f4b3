"""Per-step latent region operations of RegionDrag (ALGORITHM.md §8, §9b-c) as Triton kernels.

Point lists arrive as flat int64 indices into ``h*w`` (``y * w + x``), prepared once per edit with
duplicates already resolved (:func:`last_unique`), so every launch is a plain gather/scatter.

* :func:`paste_blend` — copy-paste ``x[paste] = hook[copy]`` followed by the mask blend
  ``x = where(mask, x, hook)``, in ONE launch. The launch has two kinds of programs that write
  disjoint elements, so they need no ordering: "dense" programs write ``hook`` where the mask is 0
  (x is never read there), "paste" programs write ``hook[copy]`` at the paste points where the mask
  is 1. Elements inside the mask that are not pasted are left untouched. This equals the two-step
  definition because a pasted element outside the mask ends up as ``hook`` either way.
* :func:`blur` — §8's gather, variance-preserving mix with caller-drawn noise, scatter.

Each launcher has a PyTorch twin ``*_ref`` with the same signature (the definition; tests and
benchmarks import it). Launchers run Triton on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before Triton was imported; otherwise they call the reference.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import triton_interpret

try:  # Triton is optional: without it every launcher falls back to its reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

BLOCK = 256


def last_unique(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique values of ``idx`` and, for each, the position of its LAST occurrence.

    PyTorch's CPU index-put lets the last of several writes to one element win, which is what the
    reference's results depend on; resolving duplicates once makes every device agree with it.
    """
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    rev_unique, rev_first = np.unique(idx[::-1], return_index=True)
    return rev_unique, (idx.size - 1 - rev_first).astype(np.int64)


def blur_factor(noise_scale: float) -> float:
    """§8: ``r = √(1 - s²)`` for ``s < 1``, else 0 (pure noise of std ``s``)."""
    return math.sqrt(1.0 - noise_scale**2) if noise_scale < 1 else 0.0


# ----------------------------------------------------------------------------- references
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
    """§8 in place: ``x[idx] = r·x[idx] + noise_scale·noise``; ``idx`` unique (N), ``noise`` ``C x N``."""
    flat = x.view(x.shape[1], -1)
    flat[:, idx] = blur_factor(noise_scale) * flat[:, idx] + noise_scale * noise
    return x


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _paste_blend_kernel(x_ptr, hook_ptr, mask_ptr, copy_ptr, paste_ptr, hw, n_paste, n_dense_programs,
                            C: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if pid < n_dense_programs:  # outside the mask: x = hook
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            m = tl.load(mask_ptr + offs, mask=offs < hw, other=1)
            outside = (offs < hw) & (m == 0)
            for c in tl.static_range(C):
                h = tl.load(hook_ptr + c * hw + offs, mask=outside)
                tl.store(x_ptr + c * hw + offs, h, mask=outside)
        else:  # paste points inside the mask: x[paste] = hook[copy]
            offs = (pid - n_dense_programs) * BLOCK + tl.arange(0, BLOCK)
            valid = offs < n_paste
            dst = tl.load(paste_ptr + offs, mask=valid, other=0)
            src = tl.load(copy_ptr + offs, mask=valid, other=0)
            inside = valid & (tl.load(mask_ptr + dst, mask=valid, other=0) != 0)
            for c in tl.static_range(C):
                v = tl.load(hook_ptr + c * hw + src, mask=inside)
                tl.store(x_ptr + c * hw + dst, v, mask=inside)

    @triton.jit
    def _blur_kernel(x_ptr, idx_ptr, noise_ptr, n, hw, r, scale, C: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        p = tl.load(idx_ptr + offs, mask=valid, other=0)
        for c in tl.static_range(C):
            v = tl.load(x_ptr + c * hw + p, mask=valid).to(tl.float32)
            z = tl.load(noise_ptr + c * n + offs, mask=valid).to(tl.float32)
            tl.store(x_ptr + c * hw + p, (r * v + scale * z).to(x_ptr.dtype.element_ty), mask=valid)


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    return triton is not None and (t.is_cuda or triton_interpret())


def _check_latents(x: torch.Tensor, *others: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 1 x C x h x w tensor, got shape {tuple(x.shape)}")
    for o in others:
        if o.shape != x.shape or o.dtype != x.dtype or o.device != x.device or not o.is_contiguous():
            raise ValueError("hook must be contiguous with the shape, dtype and device of x")


def paste_blend(x: torch.Tensor, hook: torch.Tensor, copy_idx: torch.Tensor, paste_idx: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Launcher of :func:`paste_blend_ref` (same contract): one launch, in place, returns ``x``."""
    if not use_triton(x):
        return paste_blend_ref(x, hook, copy_idx, paste_idx, mask)
    _check_latents(x, hook)
    c, hw, n = x.shape[1], x.shape[2] * x.shape[3], paste_idx.numel()
    if copy_idx.numel() != n or mask.numel() != hw:
        raise ValueError("copy_idx and paste_idx must have equal lengths and mask must be h x w")
    n_dense = triton.cdiv(hw, BLOCK)
    grid = (n_dense + triton.cdiv(n, BLOCK),)
    _paste_blend_kernel[grid](x, hook, mask.contiguous().view(torch.uint8), copy_idx.contiguous(),
                              paste_idx.contiguous(), hw, n, n_dense, C=c, BLOCK=BLOCK)
    return x


def blur(x: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """Launcher of :func:`blur_ref` (same contract): one launch, in place, returns ``x``."""
    if not use_triton(x):
        return blur_ref(x, idx, noise, noise_scale)
    _check_latents(x)
    c, hw, n = x.shape[1], x.shape[2] * x.shape[3], idx.numel()
    if tuple(noise.shape) != (c, n):
        raise ValueError(f"noise must be {c} x {n}, got {tuple(noise.shape)}")
    if n:
        _blur_kernel[(triton.cdiv(n, BLOCK),)](x, idx.contiguous(), noise.contiguous(), n, hw,
                                               blur_factor(noise_scale), float(noise_scale), C=c, BLOCK=BLOCK)
    return x
