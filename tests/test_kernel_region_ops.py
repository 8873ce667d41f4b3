"""Triton region kernels against their PyTorch references (interpreted on CPU, native on CUDA)."""
import zlib

import numpy as np
import pytest
import torch

from regiondrag.kernels import region_ops as ro

pytestmark = pytest.mark.skipif(ro.triton is None, reason="triton is not installed")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# blur vs its reference (rtol, atol). The kernel computes r*x + s*z in fp32 and rounds once to the input
# dtype, so it is compared with the reference computed in fp32 and rounded once: fp16 may then differ by
# one unit in the last place (rtol 2**-10). Comparing with the reference run in fp16 instead is not a
# bound: it rounds r*x and s*z first, and where they cancel its error exceeds any fixed rtol/atol.
DTYPES = {torch.float32: (1e-6, 1e-6), torch.float16: (2**-10, 1e-5)}
SIZES = [(12, 16), (8, 8), (16, 16), (17, 33), (64, 64)]  # odd and block-boundary latents (hw 256)
COUNTS = [0, 1, 7, 256, "many"]


def _seed(*parts) -> int:
    """A seed per parametrisation that is the same in every process (``hash`` of a str is not)."""
    return zlib.crc32(repr(parts).encode())


def _case(h, w, n, device, dtype, seed, mask_kind="random"):
    g = torch.Generator().manual_seed(seed)
    hw = h * w
    n = hw * 3 // 4 if n == "many" else min(n, hw)
    x = torch.randn(1, 4, h, w, generator=g).to(device, dtype)
    hook = torch.randn(1, 4, h, w, generator=g).to(device, dtype)
    paste = torch.randperm(hw, generator=g)[:n].to(device)
    copy = torch.randint(0, hw, (n,), generator=g).to(device)
    mask = {"random": torch.rand(h, w, generator=g) > 0.3, "zeros": torch.zeros(h, w, dtype=torch.bool),
            "ones": torch.ones(h, w, dtype=torch.bool)}[mask_kind].to(device)
    return x, hook, copy, paste, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("mask_kind", ["random", "zeros", "ones"])
def test_paste_blend_matches_reference(device, hw, n, mask_kind):
    x, hook, copy, paste, mask = _case(*hw, n, device, torch.float32, seed=_seed(hw, n, mask_kind),
                                       mask_kind=mask_kind)
    expected = ro.paste_blend_ref(x.clone(), hook, copy, paste, mask)
    # Poison every element whose result does not depend on x: a NaN left there was never written.
    pasted = torch.zeros(hw[0] * hw[1], dtype=torch.bool, device=device)
    pasted[paste] = True
    overwritten = (~mask) | pasted.view(hw)
    x[:, :, overwritten] = float("nan")
    out = ro.paste_blend(x, hook, copy, paste, mask)
    assert out.data_ptr() == x.data_ptr()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_paste_blend_dtypes(device, dtype):
    x, hook, copy, paste, mask = _case(12, 16, 40, device, dtype, seed=5)
    expected = ro.paste_blend_ref(x.clone(), hook, copy, paste, mask)
    torch.testing.assert_close(ro.paste_blend(x, hook, copy, paste, mask), expected, rtol=0, atol=0)


def test_duplicate_targets_resolve_to_the_last_pair():
    """Duplicates are resolved once (last_unique); the result equals PyTorch CPU index-put."""
    h, w = 12, 16
    g = torch.Generator().manual_seed(1)
    x, hook = torch.randn(1, 4, h, w, generator=g), torch.randn(1, 4, h, w, generator=g)
    paste_dup = np.array([5, 9, 5, 100, 9, 5, 7])
    copy_dup = np.array([1, 2, 3, 4, 5, 6, 7])
    mask = torch.ones(h, w, dtype=torch.bool)
    cpu_semantics = x.clone()
    cpu_semantics.view(1, 4, -1)[:, :, torch.from_numpy(paste_dup)] = hook.view(1, 4, -1)[:, :, torch.from_numpy(copy_dup)]
    paste_u, last = ro.last_unique(paste_dup)
    np.testing.assert_array_equal(paste_u, [5, 7, 9, 100])
    np.testing.assert_array_equal(copy_dup[last], [6, 7, 5, 4])
    out = ro.paste_blend(x.clone(), hook, torch.from_numpy(copy_dup[last]), torch.from_numpy(paste_u), mask)
    torch.testing.assert_close(out, cpu_semantics, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("noise_scale", [0.0, 0.6, 1.0, 1.2])
def test_blur_matches_reference(device, dtype, hw, n, noise_scale):
    x, _, _, idx, _ = _case(*hw, n, device, dtype, seed=_seed(hw, n))
    noise = torch.randn(4, idx.numel(), generator=torch.Generator().manual_seed(2)).to(device, dtype)
    # A copy in fp32 (``x.float()`` would be ``x`` itself for fp32, and blur_ref writes in place).
    expected = ro.blur_ref(x.to(torch.float32, copy=True), idx, noise.float(), noise_scale).to(dtype)
    assert expected.data_ptr() != x.data_ptr()
    out = ro.blur(x, idx, noise, noise_scale)
    assert out.data_ptr() == x.data_ptr()
    rtol, atol = DTYPES[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


def test_blur_duplicate_points_match_cpu_reference_semantics():
    """§8 with duplicates: each occurrence draws noise and the LAST occurrence's value remains."""
    x = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(3))
    pts = np.array([3, 50, 3, 3, 77])
    z = torch.randn(4, len(pts), generator=torch.Generator().manual_seed(4))
    ref = x.clone()
    flat = ref.view(4, -1)
    flat[:, torch.from_numpy(pts)] = 0.8 * flat[:, torch.from_numpy(pts)] + 0.6 * z
    idx, last = ro.last_unique(pts)
    out = ro.blur(x.clone(), torch.from_numpy(idx), z[:, torch.from_numpy(last)], 0.6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_without_interpreter_the_cpu_path_is_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ro.use_triton(torch.zeros(1))


def test_bad_shapes_are_value_errors():
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="noise"):
        ro.blur(x, torch.arange(3), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="hook"):
        ro.paste_blend(x, torch.zeros(1, 4, 8, 9), torch.arange(2), torch.arange(2), torch.ones(8, 8, dtype=torch.bool))


@pytest.mark.gpu
def test_pipeline_uses_the_kernels_on_cuda(monkeypatch):
    """On CUDA the sampling loop goes through the Triton launchers."""
    import regiondrag as rd
    from helpers import TINY_SD15

    calls = []
    for name in ("paste_blend", "blur"):
        fn = getattr(ro, name)
        monkeypatch.setattr(ro, name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a))
    pipe = rd.RegionDragPipeline.from_pretrained(str(TINY_SD15), ip_adapter=None, device="cuda")
    m = np.zeros((64, 64), np.uint8)
    m[8:32, 8:32] = 1
    t = np.roll(m, 16, axis=1)
    pipe.edit(np.zeros((64, 64, 3), np.uint8), rd.RegionPairs([m], [t]), steps=4)
    assert "paste_blend" in calls and "blur" in calls
