"""Self-attention over replayed keys/values (ALGORITHM.md §7) as a FlashAttention-style Triton kernel.

Layout: ``q`` is ``B x heads x N x d`` and ``k``/``v`` are ``B x heads x M x d`` (a batch of 1 in
``k``/``v`` broadcasts over ``q``'s batch). Any strides are accepted — the attention processor passes
``proj.view(B, N, heads, d).transpose(1, 2)`` views — and the output is a fresh contiguous
``B x heads x N x d`` tensor in ``q``'s dtype. ``d`` is padded to ``BLOCK_D = next_power_of_2(d)``
(at least 16, at most 256) with masked loads/stores, so SD-1.5's 40/80/160 work; N and M tails are
masked too. The kernel walks the keys in tiles with an online softmax (running max and sum, base-2
exponentials, scale ``1/√d``) and accumulates in fp32.

Masking: ``key_mask`` is a bool ``B x M`` tensor (or ``1 x M``); keys where it is False get no weight.
A query row whose keys are all masked outputs zeros (the reference defines it the same way).

Dispatch (:func:`replay_attention`): Triton runs on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1`` is set; otherwise (plain CPU, or Triton not installed) the call goes to
:func:`replay_attention_ref`. The environment is read at call time and the kernel is wrapped with
``triton.jit`` lazily, once per mode, so setting ``TRITON_INTERPRET`` any time before the first call
is enough (Triton itself reads it when a function is wrapped, not at import).

:func:`select_attention` picks, per shape and dtype, the faster of this kernel and PyTorch's
``scaled_dot_product_attention`` on CUDA (timed once, recorded in :data:`CHOICES`); on CPU it
returns :func:`sdpa_attention`. All candidates share the signature ``f(q, k, v, key_mask=None)``.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from . import triton_interpret

try:  # Triton is optional: without it everything falls back to the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

log = logging.getLogger(__name__)
CHOICES: dict[tuple, str] = {}
MAX_BLOCK_D = 256


# ----------------------------------------------------------------------------- reference
def replay_attention_ref(q, k, v, key_mask=None):
    """``softmax(q kᵀ/√d, masked keys -> -inf) v`` in fp32, fully-masked rows -> 0, cast to q's dtype."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if key_mask is not None:  # a row with every key masked is softmax(-inf...) = NaN: define it as 0
        probs = probs.masked_fill(~key_mask.bool().any(-1)[:, None, None, None], 0.0)
    return (probs @ v.float()).to(q.dtype)


def sdpa_attention(q, k, v, key_mask=None):
    """``scaled_dot_product_attention`` with the same contract as :func:`replay_attention_ref`."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    km = key_mask.bool()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=km[:, None, None, :])
    return out.masked_fill(~km.any(-1)[:, None, None, None], 0.0)


# ----------------------------------------------------------------------------- kernel
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, N, M, D, H, qk_scale,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb,
              HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Undecorated on purpose: _kernel() wraps it with triton.jit when first needed (see docstring).
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = dd < D
    q_tile = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :] * sqd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's tl.dot multiplies bf16 bit patterns as integers: feed it fp32
        q_tile = q_tile.to(tl.float32)
    kt_base = k_ptr + b * skb + h * skh + dd[:, None] * skd  # kᵀ tile: BLOCK_D x BLOCK_N
    v_base = v_ptr + b * svb + h * svh + dd[None, :] * svd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_N):
        keys = start + cols
        key_ok = keys < M
        kt = tl.load(kt_base + keys[None, :] * skn, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q_tile, kt, input_precision=PRECISION) * qk_scale
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_ptr + b * smb + keys, mask=key_ok, other=0) != 0)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid -inf - -inf
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + keys[:, None] * svn, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        pv = p.to(v_ptr.dtype.element_ty)  # P·V in the input dtype, like FlashAttention
        if UPCAST:
            pv, vt = pv.to(tl.float32), vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, vt, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # all keys masked: acc is 0 -> output 0
    tl.store(o_ptr + bh.to(tl.int64) * N * D + rows[:, None] * D + dd[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_KERNELS: dict[bool, object] = {}


def _kernel():
    mode = triton_interpret()
    if mode not in _KERNELS:
        _KERNELS[mode] = triton.jit(_attn_fwd)  # triton reads TRITON_INTERPRET here
    return _KERNELS[mode]


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    return triton is not None and (t.is_cuda or triton_interpret())


def _blocks(block_d: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim.

    Not timed on a GPU yet: chosen so the fp16 kernel compiles for sm_90 without register spills
    (cuobjdump resource usage); :func:`select_attention` falls back to SDPA where it loses.
    """
    if interpret:
        return 32, 32, 4, 1
    if block_d <= 32:
        return 128, 64, 4, 3
    if block_d <= 64:
        return 128, 64, 8, 3
    return 64, 32, 8, 2  # 128 and 256 (with a key mask, 256 spills ~88 bytes)


def _check(q, k, v, key_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-d: B x heads x tokens x d")
    B, H, _, d = q.shape
    if k.shape != v.shape or k.shape[1] != H or k.shape[3] != d or k.shape[0] not in (1, B):
        raise ValueError(f"k/v shape {tuple(k.shape)} / {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if max(16, triton.next_power_of_2(d)) > MAX_BLOCK_D:
        raise ValueError(f"head dim {d} pads to more than {MAX_BLOCK_D}")
    if key_mask is not None and (key_mask.dim() != 2 or key_mask.shape[0] not in (1, B)
                                 or key_mask.shape[1] != k.shape[2]):
        raise ValueError(f"key_mask must be bool B x M, got {tuple(key_mask.shape)}")


def replay_attention(q, k, v, key_mask=None, out=None, block_m=None, block_n=None):
    """Launcher of :func:`replay_attention_ref` (same contract).

    ``out``: optional contiguous ``B x heads x N x d`` buffer of q's dtype to write into (returned).
    ``block_m``/``block_n``: override the tile sizes (powers of two >= 16; tests use them).
    """
    if not use_triton(q):
        ref = replay_attention_ref(q, k, v, key_mask)
        return ref if out is None else out.copy_(ref)
    _check(q, k, v, key_mask)
    B, H, N, D = q.shape
    M = k.shape[2]
    if out is None:
        out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor with q's shape, dtype and device")
    if B * H * N == 0:
        return out
    k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)  # batch-1 k/v -> stride 0
    block_d = max(16, triton.next_power_of_2(D))
    bm, bn, warps, stages = _blocks(block_d, triton_interpret())
    bm, bn = block_m or bm, block_n or bn
    stages = 1 if q.dtype == torch.float32 else stages  # fp32 tiles: one stage, shared memory <= ~104 KiB
    if key_mask is not None:
        key_mask = key_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
        mask_arg, smb = key_mask, (key_mask.stride(0) if key_mask.shape[0] == B else 0)
    else:
        mask_arg, smb = q, 0  # never read
    scale = (1.0 / math.sqrt(D)) * 1.4426950408889634  # log2(e): the kernel uses exp2
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 in: no TF32 rounding
    upcast = triton_interpret() and q.dtype == torch.bfloat16
    _kernel()[(triton.cdiv(N, bm), B * H)](
        q, k, v, out, mask_arg, N, M, D, H, scale, *q.stride(), *k.stride(), *v.stride(), smb,
        HAS_MASK=key_mask is not None, PRECISION=precision, UPCAST=upcast,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages)
    return out


# ----------------------------------------------------------------------------- selection
def select_attention(q_shape, k_shape, dtype, device):
    """The faster of :func:`replay_attention` and :func:`sdpa_attention` for these shapes (CUDA).

    Times both once per ``(q_shape, k_shape, dtype, device)`` on random inputs (no key mask), records
    ``"triton"`` or ``"sdpa"`` in :data:`CHOICES` and logs it. On CPU, or without Triton: SDPA.
    """
    device = torch.device(device)
    if device.type != "cuda" or triton is None:
        return sdpa_attention
    key = (tuple(q_shape), tuple(k_shape), dtype, str(device))
    if key not in CHOICES:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(*q_shape, generator=gen, device=device, dtype=dtype)
        k = torch.randn(*k_shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(*k_shape, generator=gen, device=device, dtype=dtype)
        from regiondrag.engine.hardware import median_ms  # the benchmarks' timer (a leaf module)

        t_sdpa = median_ms(lambda: sdpa_attention(q, k, v), device, runs=10, warmup=3)
        try:
            t_triton = median_ms(lambda: replay_attention(q, k, v), device, runs=10, warmup=3)
        except Exception as exc:  # a shape the kernel cannot compile for must not break the engine
            log.warning("replay_attention failed for %s (%s); using SDPA", key, exc)
            t_triton = float("inf")
        CHOICES[key] = "triton" if t_triton < t_sdpa else "sdpa"
        log.info("attention %s: triton %.4f ms, sdpa %.4f ms -> %s", key, t_triton, t_sdpa, CHOICES[key])
    return replay_attention if CHOICES[key] == "triton" else sdpa_attention


def selected_attention(q, k, v):
    """Attention with the implementation :func:`select_attention` chose for these shapes.

    Meant for the replay processor on CUDA; call :func:`select_attention` for every shape beforehand
    (the runner does in ``prepare``) so that no timing happens inside the step loop. While the module
    is being exported or compiled (the compiled backends export these same modules), SDPA: a raw
    Triton launch cannot be traced, and the compiler makes its own attention kernel.
    """
    if _tracing():
        return sdpa_attention(q, k, v)
    return select_attention(q.shape, k.shape, q.dtype, q.device)(q, k, v)


def _tracing() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return torch.compiler.is_compiling() or (is_exporting is not None and is_exporting())
