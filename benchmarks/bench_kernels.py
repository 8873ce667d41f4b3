"""Kernel benchmark (not a test): Triton region ops and replay attention against their references.

Region ops run at SD-1.5's 512x512 latent (1x4x64x64, fp16) with a few point counts; attention at the
self-attention shapes of a 512x512 UNet (see bench_attention.py). Times are medians over CUDA events
after warm-up; bandwidth is reported beside the device's measured copy bandwidth. CUDA only: on a
machine without CUDA it prints a note and exits 0.

    python benchmarks/bench_kernels.py [--out benchmarks/results/kernels-<gpu>.json] [--runs 200]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from regiondrag.engine import hardware as hw

sys.path.insert(0, str(Path(__file__).resolve().parent))
CUDA = torch.device("cuda")


def copy_bandwidth_gbs(runs: int) -> float:
    """Measured device-to-device copy bandwidth (GB/s, read + write) on a 1 GiB buffer."""
    src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = hw.median_ms(lambda: dst.copy_(src), CUDA, max(5, runs // 20), 10)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_region_ops(runs: int) -> list[dict]:
    from regiondrag.kernels import region_ops as ro

    rows, h, w = [], 64, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4, h, w, device="cuda", dtype=torch.float16, generator=g)
    hook = torch.randn_like(x)
    mask = torch.rand(h, w, device="cuda", generator=g) > 0.2
    es = x.element_size()
    for n in (200, 1000, 3000):
        paste = torch.randperm(h * w, device="cuda", generator=g)[:n]
        copy = torch.randint(0, h * w, (n,), device="cuda", generator=g)
        noise = torch.randn(4, n, device="cuda", dtype=x.dtype, generator=g)
        moved_pb = h * w * (1 + 2 * 4 * es) + n * (16 + 2 * 4 * es)  # mask, hook/x outside, points
        moved_blur = n * (8 + 3 * 4 * es)
        for name, fn, ref, moved in (
            ("paste_blend", lambda: ro.paste_blend(x, hook, copy, paste, mask),
             lambda: ro.paste_blend_ref(x, hook, copy, paste, mask), moved_pb),
            ("blur", lambda: ro.blur(x, paste, noise, 0.6), lambda: ro.blur_ref(x, paste, noise, 0.6), moved_blur),
        ):
            t_k, t_r = hw.median_ms(fn, CUDA, runs, 10), hw.median_ms(ref, CUDA, runs, 10)
            rows.append(dict(kernel=name, points=n, triton_ms=t_k, ref_ms=t_r, speedup=t_r / t_k,
                             triton_gbs=moved / t_k / 1e6))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON path (default benchmarks/results/kernels-<gpu>.json)")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the kernels' CPU path is their PyTorch reference, "
              "so there is nothing to time. Run this on a CUDA GPU.")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_kernels: triton is not installed; nothing to benchmark.")
        return 0

    gpu = torch.cuda.get_device_name()
    ceiling = copy_bandwidth_gbs(args.runs)
    rows = bench_region_ops(args.runs)
    print(f"# Region kernels on {gpu} (copy bandwidth ceiling {ceiling:.0f} GB/s)\n")
    print("| kernel | points | triton ms | reference ms | speedup | triton GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kernel']} | {r['points']} | {r['triton_ms']:.4f} | {r['ref_ms']:.4f} | "
              f"{r['speedup']:.1f}x | {r['triton_gbs']:.1f} |")
    import bench_attention

    attention = [bench_attention.bench_shape(n, c, 1, args.runs, 10) for n, c in bench_attention.SHAPES]
    print("\n# Replay attention (fp16, 8 heads)\n")
    print(bench_attention.markdown(attention, bench_attention.matmul_ceiling_tflops()))
    out = Path(args.out or Path(__file__).resolve().parent / "results"
               / f"kernels-{hw.device_key(CUDA)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=gpu, versions=dict(torch=torch.__version__, triton=triton.__version__),
                                   copy_bandwidth_gbs=ceiling, region_ops=rows, attention=attention), indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
