"""End-to-end latency benchmark of RegionDrag edits (not a test): every backend beside the paper's code.

A thin wrapper of ``python -m regiondrag.engine bench`` (the logic lives in ``regiondrag.engine.bench``,
the baseline in ``benchmarks/baseline.py``); same options:

    python benchmarks/bench_pipeline.py                                  # CUDA: every backend, random-sd15
    python benchmarks/bench_pipeline.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --backends baseline,torch,tensorrt
    python benchmarks/bench_pipeline.py --model tiny --workloads default --size 128x128 --steps 4 \\
        --backends torch,baseline --runs 2 --warmup 1 --out /tmp/bench.json  # CPU smoke run

Writes ``benchmarks/results/<gpu-or-cpu>-<date>.json`` (+ ``.png``) and prints a Markdown table;
``python benchmarks/report.py`` then updates the comparison table in ``benchmarks/README.md``.
"""
from __future__ import annotations

import sys

from regiondrag.engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
