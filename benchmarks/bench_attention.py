"""Benchmark of the replay-attention kernel (regiondrag/kernels/attention.py) against SDPA and the reference.

Shapes: SD-1.5 self-attention at 512x512 with 8 heads (tokens x channels 4096x320, 1024x640,
256x1280, 64x1280, i.e. d = 40, 80, 160, 160), batch 1, fp16, with q/k/v in the attention processor's
layout ``proj.view(B, N, heads, d).transpose(1, 2)``. For each: median time over ``--runs`` runs (CUDA
events, warm-up excluded) and achieved TFLOP/s (``4·N·M·d·heads`` FLOPs per batch element) beside
the device's fp16 matmul ceiling, measured in the same run with a large ``torch.matmul``.
Prints a Markdown table and writes JSON to ``--out``. Needs CUDA: on CPU it says so and exits 0.

    python benchmarks/bench_attention.py [--runs 50] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from regiondrag.engine import hardware as hw
from regiondrag.kernels import attention as A

SHAPES = [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]  # (tokens, channels)
HEADS = 8
CUDA = torch.device("cuda")


def matmul_ceiling_tflops() -> float:
    """The fp16 matmul rate measured as ``bench`` measures it (one figure across the benchmarks)."""
    return hw.matmul_ceiling(CUDA, torch.float16)["tflops"]


def bench_shape(tokens: int, channels: int, batch: int, runs: int, warmup: int) -> dict:
    d = channels // HEADS
    gen = torch.Generator(device="cuda").manual_seed(tokens)

    def proj():
        x = torch.randn(batch, tokens, channels, generator=gen, device="cuda", dtype=torch.float16)
        return x.view(batch, tokens, HEADS, d).transpose(1, 2)

    q, k, v = proj(), proj(), proj()
    flops = 4 * tokens * tokens * d * HEADS * batch
    row = {"tokens": tokens, "channels": channels, "head_dim": d, "heads": HEADS, "batch": batch, "flops": flops}
    for name, fn in (("triton", A.replay_attention), ("sdpa", A.sdpa_attention), ("ref", A.replay_attention_ref)):
        ms = hw.median_ms(lambda: fn(q, k, v), CUDA, runs, warmup)
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
    ref = A.replay_attention_ref(q, k, v).float()
    row["triton_max_abs_err"] = (A.replay_attention(q, k, v).float() - ref).abs().max().item()
    row["sdpa_max_abs_err"] = (A.sdpa_attention(q, k, v).float() - ref).abs().max().item()
    A.select_attention(q.shape, k.shape, q.dtype, q.device)
    row["selected"] = A.CHOICES[(tuple(q.shape), tuple(k.shape), q.dtype, str(q.device))]
    return row


def markdown(rows: list[dict], ceiling: float) -> str:
    lines = [f"fp16 matmul ceiling: {ceiling:.1f} TFLOP/s", "",
             "| tokens x channels | d | Triton ms | TFLOP/s | % ceil | SDPA ms | TFLOP/s | ref ms | TFLOP/s "
             "| Triton err | selected |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['tokens']} x {r['channels']} | {r['head_dim']} | {r['triton_ms']:.4f} | {r['triton_tflops']:.1f} "
            f"| {100 * r['triton_tflops'] / ceiling:.0f}% | {r['sdpa_ms']:.4f} | {r['sdpa_tflops']:.1f} "
            f"| {r['ref_ms']:.4f} | {r['ref_tflops']:.1f} | {r['triton_max_abs_err']:.1e} | {r['selected']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per candidate (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs per candidate")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention-<gpu>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device available; this benchmark needs a GPU. Nothing to do.")
        return 0
    if A.triton is None:
        print("bench_attention: triton is not installed; nothing to benchmark.")
        return 0
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "0"):
        print("bench_attention: ignoring TRITON_INTERPRET (the kernel is timed compiled)")
    gpu = torch.cuda.get_device_name()
    ceiling = matmul_ceiling_tflops()
    rows = [bench_shape(n, c, args.batch, args.runs, args.warmup) for n, c in SHAPES]
    print(f"# replay attention, {gpu}, batch {args.batch}, fp16, {HEADS} heads, median of {args.runs} runs\n")
    print(markdown(rows, ceiling))
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" / f"attention-{hw.device_key(CUDA)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"gpu": gpu, "torch": torch.__version__, "triton": A.triton.__version__, "cuda": torch.version.cuda,
              "dtype": "float16", "runs": args.runs, "warmup": args.warmup, "matmul_fp16_tflops": ceiling,
              "layout": "proj.view(B, N, heads, d).transpose(1, 2)", "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
