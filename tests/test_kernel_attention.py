"""The replay-attention Triton kernel (regiondrag/kernels/attention.py) against its PyTorch reference.

On a machine without CUDA, conftest sets ``TRITON_INTERPRET=1`` before anything imports Triton, and the
CPU tests run the kernel in Triton's interpreter. On a CUDA machine the variable stays unset (an
interpreter switched on for the whole session would also run the pipeline's and engine's GPU tests
interpreted): the CPU tests there check the reference path, and the ``gpu`` tests the compiled kernel.
The module reads the variable at call time, so tests can also unset it to check the plain-CPU fallback.
"""
import pytest
import torch

from regiondrag.kernels import attention as A
from regiondrag.kernels import triton_interpret

pytestmark = pytest.mark.skipif(A.triton is None, reason="triton is not installed")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # atol = rtol
CPU = torch.device("cpu")


def _inputs(seed, B, H, N, M, d, dtype, mask="none", device=CPU, kv_batch=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=gen)
    k = torch.randn(kv_batch or B, H, M, d, generator=gen)
    v = torch.randn(kv_batch or B, H, M, d, generator=gen)
    km = None
    if mask != "none":
        km = torch.rand(B, M, generator=gen) > 0.4 if mask == "random" else torch.ones(B, M, dtype=torch.bool)
        if mask == "row_false":
            km[-1] = False
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), (None if km is None else km.to(device))


def _check(q, k, v, km, **kw):
    """Run the kernel into a NaN-poisoned buffer; every element must be written and match the ref."""
    out = torch.full((*q.shape[:3], q.shape[3]), float("nan"), dtype=q.dtype, device=q.device)
    res = A.replay_attention(q, k, v, km, out=out, **kw)
    assert res is out and res.dtype == q.dtype and res.is_contiguous()
    assert not torch.isnan(res).any(), "unwritten (NaN) output elements"
    ref = A.replay_attention_ref(q, k, v, km)
    tol = TOL[q.dtype]
    torch.testing.assert_close(res.float(), ref.float(), atol=tol, rtol=tol)
    return res


# (B, heads, N, M, d): odd sizes and block boundaries (interpreter tiles are 32 x 32)
SHAPES = [
    (1, 1, 1, 1, 40),
    (2, 3, 17, 33, 40),
    (1, 3, 64, 64, 80),
    (2, 1, 70, 100, 160),
    (1, 3, 17, 100, 8),
    (2, 1, 64, 33, 64),
    (1, 1, 70, 1, 80),
    (2, 3, 1, 64, 160),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}N{}M{}d{}".format(*s))
def test_matches_ref(shape, dtype):
    for i, mask in enumerate(["none", "random"]):
        _check(*_inputs(hash(shape) % 1000 + i, *shape, dtype, mask))


@pytest.mark.parametrize("mask", ["all_true", "row_false"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_masks(mask, dtype):
    q, k, v, km = _inputs(7, 2, 3, 17, 70, 40, dtype, mask)
    res = _check(q, k, v, km)
    if mask == "row_false":  # batch 1 has no visible key: zeros, not NaN
        assert torch.equal(res[1], torch.zeros_like(res[1]))
        assert res[0].abs().sum() > 0
    else:
        torch.testing.assert_close(res, A.replay_attention(q, k, v, None), atol=0, rtol=0)


@pytest.mark.parametrize("d", [40, 160])
def test_bf16(d):
    # The interpreter's tl.dot multiplies bf16 bit patterns as integers; the launcher then feeds the dot
    # fp32 copies of the bf16 tiles (exact), so loads, masking and rounding of P are still bf16.
    for mask in ("none", "row_false"):
        _check(*_inputs(d, 2, 1, 33, 70, d, torch.bfloat16, mask))


@pytest.mark.parametrize("bm,bn", [(16, 16), (64, 16), (16, 64)])
def test_tile_sizes(bm, bn):
    """Many key tiles (online-softmax rescaling) and a mask that empties whole tiles."""
    q, k, v, km = _inputs(3, 1, 2, 70, 100, 80, torch.float32, "random")
    km[0, 16:48] = False
    _check(q, k, v, km, block_m=bm, block_n=bn)


def test_leading_keys_masked_large_scores():
    """The first tile fully masked, then huge scores: the running max must not produce NaN/inf."""
    q, k, v, km = _inputs(5, 1, 1, 17, 64, 40, torch.float32, "all_true")
    q, k = q * 30, k * 30
    km[0, :32] = False
    _check(q, k, v, km, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_non_contiguous(dtype):
    """The processor's layout: proj.view(B, N, heads, d).transpose(1, 2); plus a strided d axis."""
    gen = torch.Generator().manual_seed(11)
    B, H, N, M, d = 2, 3, 33, 40, 40
    q = torch.randn(B, N, H * d, generator=gen).to(dtype).view(B, N, H, d).transpose(1, 2)
    k = torch.randn(B, M, H * d, generator=gen).to(dtype).view(B, M, H, d).transpose(1, 2)
    v = torch.randn(B, H, M, 2 * d, generator=gen).to(dtype)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    km = torch.rand(B, M, generator=gen) > 0.3
    _check(q, k, v, km)
    _check(q, k, v, None)


def test_kv_batch_broadcast():
    q, k, v, km = _inputs(13, 2, 3, 17, 33, 40, torch.float32, "random", kv_batch=1)
    _check(q, k, v, km)
    _check(q, k, v, km[:1])


def test_default_out_and_empty():
    q, k, v, km = _inputs(17, 1, 2, 17, 33, 40, torch.float16, "random")
    res = A.replay_attention(q, k, v, km)
    assert res.shape == q.shape and res.dtype == q.dtype
    torch.testing.assert_close(res, A.replay_attention_ref(q, k, v, km), atol=2e-3, rtol=2e-3)
    assert A.replay_attention(q[:, :, :0], k, v).shape == (1, 2, 0, 40)


def test_rejects_bad_inputs():
    q, k, v, _ = _inputs(0, 1, 1, 4, 4, 40, torch.float32)
    with pytest.raises(ValueError):
        A.replay_attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError):
        A.replay_attention(q, k.half(), v.half())
    with pytest.raises(ValueError):
        A.replay_attention(q, k, v, torch.ones(1, 5, dtype=torch.bool))
    big = torch.zeros(1, 1, 4, 300)
    with pytest.raises(ValueError):
        A.replay_attention(big, big, big)
    with pytest.raises(ValueError):
        A.replay_attention(q, k, v, out=torch.empty(1, 1, 4, 40, dtype=torch.float16))


@pytest.mark.skipif(not triton_interpret(), reason="the interpreter is on only without CUDA (conftest)")
def test_interpret_uses_kernel(monkeypatch):
    calls = []
    real = A._kernel
    monkeypatch.setattr(A, "_kernel", lambda: calls.append(1) or real())
    _check(*_inputs(1, 1, 1, 5, 5, 16, torch.float32))
    assert calls


def test_plain_cpu_falls_back_to_ref(monkeypatch):
    def boom():
        raise AssertionError("the Triton kernel must not run on plain CPU")

    q, k, v, km = _inputs(2, 2, 3, 17, 33, 40, torch.float32, "row_false")
    monkeypatch.setattr(A, "_kernel", boom)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not A.use_triton(q)
    assert torch.equal(A.replay_attention(q, k, v, km), A.replay_attention_ref(q, k, v, km))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(A, "triton", None)  # Triton missing: also the reference
    assert torch.equal(A.replay_attention(q, k, v, km), A.replay_attention_ref(q, k, v, km))


@pytest.mark.parametrize("mask", ["none", "random", "row_false"])
def test_sdpa_matches_ref(mask):
    q, k, v, km = _inputs(4, 2, 3, 17, 33, 40, torch.float32, mask)
    res = A.sdpa_attention(q, k, v, km)
    assert not torch.isnan(res).any()
    torch.testing.assert_close(res, A.replay_attention_ref(q, k, v, km), atol=1e-5, rtol=1e-5)


def test_select_on_cpu_is_sdpa():
    n = len(A.CHOICES)
    assert A.select_attention((1, 8, 64, 40), (1, 8, 64, 40), torch.float32, "cpu") is A.sdpa_attention
    assert len(A.CHOICES) == n


def test_selected_attention_is_sdpa_while_exporting(monkeypatch):
    """The compiled backends export the modules that call selected_attention: no Triton launch (nor a
    timing run) may end up in the traced graph, whatever was chosen for eager calls."""
    def chosen_kernel(*shapes):
        def launch(q, k, v):
            raise AssertionError("the selected kernel was called inside an export")
        return launch

    monkeypatch.setattr(A, "select_attention", chosen_kernel)

    class Replay(torch.nn.Module):
        def forward(self, q, k, v):
            return A.selected_attention(q, k, v)

    q, k, v, _ = _inputs(0, 1, 2, 16, 16, 8, torch.float32)
    program = torch.export.export(Replay(), (q, k, v), strict=False)
    torch.testing.assert_close(program.module()(q, k, v), A.sdpa_attention(q, k, v))
    with pytest.raises(AssertionError, match="inside an export"):  # eager calls take the choice
        Replay()(q, k, v)


# ----------------------------------------------------------------------------- CUDA
SD15 = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # 512x512 self-attention, 8 heads


@pytest.fixture
def compiled(monkeypatch):
    """Run the compiled kernel, never the interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("n,d", SD15)
def test_cuda_sd15(compiled, n, d, dtype):
    cuda = torch.device("cuda")
    for mask in ("none", "random", "row_false"):
        _check(*_inputs(n + d, 2, 8, n, n, d, dtype, mask, device=cuda))
    gen = torch.Generator().manual_seed(d)
    proj = torch.randn(2, n, 8 * d, generator=gen).to(cuda, dtype)
    qkv = proj.view(2, n, 8, d).transpose(1, 2)
    _check(qkv, qkv, qkv, None)
    _check(*_inputs(1, 2, 8, n - 3, n + 5, d, dtype, "random", device=cuda))


@pytest.mark.gpu
def test_cuda_select_records_choice(compiled):
    shape = (1, 8, 1024, 80)
    fn = A.select_attention(shape, shape, torch.float16, "cuda")
    key = (shape, shape, torch.float16, "cuda")
    assert A.CHOICES[key] in ("triton", "sdpa")
    assert fn is (A.replay_attention if A.CHOICES[key] == "triton" else A.sdpa_attention)
    assert A.select_attention(shape, shape, torch.float16, "cuda") is fn
    q, k, v, km = _inputs(0, *shape[:3], 1024, 80, torch.float16, "random", device=torch.device("cuda"))
    torch.testing.assert_close(fn(q, k, v, km), A.replay_attention_ref(q, k, v, km), atol=2e-3, rtol=2e-3)
