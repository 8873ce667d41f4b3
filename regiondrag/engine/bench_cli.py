"""The ``bench`` command line: options, the CPU smoke default, and writing the results as they come.

The measuring itself is :mod:`regiondrag.engine.bench`; ``benchmarks/bench_pipeline.py`` runs this same
command.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from .bench import (BACKENDS, CPU_NOTE, REPO, SMOKE_NOTE, BenchConfig, Say, _torch, default_backends, run_bench,
                    unavailable_reason)
from .bench_output import markdown_table, write_chart
from .bench_workloads import WORKLOADS, Workload
from .hardware import device_key

# The CPU default: every backend, both methods, in a few minutes on 2 cores. Explicit options override it.
SMOKE = dict(size="256x256", workloads="default,cp_then_encode", runs=2, warmup=1)


def default_out(device) -> Path:
    root = REPO if (REPO / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results" / f"{device_key(device)}-{_dt.date.today().isoformat()}.json"


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local diffusers dir, .safetensors file, 'random-sd15' (full-size SD-1.5 "
                   "architecture, random weights) or 'tiny' (default: random-sd15 on CUDA, tiny on the CPU)")
    p.add_argument("--ip-adapter", default="default", help="as for edit; 'none' to run without (default: on)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default: every one available here; "
                   "compiled only on CUDA)")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--runs", type=int, default=None,
                   help=f"timed edits per backend and workload (default 10; CPU smoke run {SMOKE['runs']})")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed edits before them, >= 1; the first is reported as first_call_ms "
                   f"(default 2; CPU smoke run {SMOKE['warmup']})")
    p.add_argument("--full", action="store_true",
                   help="on the CPU, run the whole suite instead of the smoke run (default without CUDA: "
                   f"tiny model, workloads {SMOKE['workloads']} at {SMOKE['size']}; takes a few minutes)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                   help="default: float16 on CUDA (as the paper), float32 on CPU")
    p.add_argument("--out", help="result JSON (default: benchmarks/results/<gpu-or-cpu>-<date>.json), rewritten "
                   "after each measurement; the Markdown table (.md) and chart (.png) are written beside it")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--size", help="WxH: run every workload at this size instead (smoke runs; not comparable)")
    p.add_argument("--steps", type=int, help="override the workloads' steps (smoke runs; not comparable)")
    p.add_argument("--cache-dir", help="cache root (default: $REGIONDRAG_CACHE or ~/.cache/regiondrag)")


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="latency benchmark across backends, beside the paper's implementation",
                       description="Time whole edits per stage on every backend and on a mirror of the "
                       "paper's code (baseline); write JSON, a chart and a Markdown table.")
    add_arguments(p)
    return p


def _list_arg(value: str | None, allowed, what: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--{what} {value!r}: allowed values are {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def _relabel(w: Workload) -> Workload:
    """A workload whose size or steps were overridden is named by what runs: ``WxH[ method][ N steps]``."""
    name = f"{w.width}x{w.height}" + (f" {w.method}" if w.method != "encode_then_cp" else "")
    return replace(w, name=name + (f" {w.steps} steps" if w.steps != Workload("", 0, 0).steps else ""))


def _workloads(args, smoke: bool) -> list[Workload]:
    names = _list_arg(args.workloads or (SMOKE["workloads"] if smoke else None), WORKLOADS, "workloads")
    workloads = [WORKLOADS[n] for n in (names or WORKLOADS)]
    size = args.size or (SMOKE["size"] if smoke else None)
    if size:
        m = re.fullmatch(r"(\d+)x(\d+)", size)
        if not m or int(m[1]) % 8 or int(m[2]) % 8 or min(int(m[1]), int(m[2])) < 64 or max(int(m[1]), int(m[2])) > 2048:
            raise ValueError(f"--size {size!r} must be WxH, multiples of 8, from 64 to 2048")
        workloads = [replace(w, width=int(m[1]), height=int(m[2])) for w in workloads]
    if args.steps is not None:
        workloads = [replace(w, steps=args.steps) for w in workloads]  # checked with the rest in run_bench
    if size or args.steps is not None:
        workloads = list({(w.width, w.height, w.method, w.steps): _relabel(w) for w in workloads}.values())
    return workloads


def config_from_args(args, say: Say) -> BenchConfig:
    from regiondrag.params import integer, resolve_device

    torch = _torch()
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    smoke = device.type != "cuda" and not args.full
    runs = integer("--runs", args.runs if args.runs is not None else (SMOKE["runs"] if smoke else 10), 1, 1000)
    warmup = integer("--warmup", args.warmup if args.warmup is not None else (SMOKE["warmup"] if smoke else 2), 1, 100)
    model = args.model or ("random-sd15" if device.type == "cuda" else "tiny")
    if args.model is None and device.type != "cuda":
        say("no CUDA device: benchmarking the tiny random model on the CPU (--model to choose another)")
    backends = _list_arg(args.backends, BACKENDS, "backends") or default_backends(device)
    for b in backends:
        why = unavailable_reason(b, device)
        if why:
            raise ValueError(f"backend {b!r} cannot run here: {why}")
    ip = None if str(args.ip_adapter).lower() == "none" else args.ip_adapter
    return BenchConfig(model=model, ip_adapter=ip, device=device, dtype=dtype, backends=backends,
                       workloads=_workloads(args, smoke), runs=runs, warmup=warmup, smoke=smoke)


def run_from_args(args, say: Say = lambda m: print(m, file=sys.stderr)) -> int:
    """The ``bench`` command: run, write JSON (rewritten after each measurement), a Markdown table and a
    chart beside it, print the table. Exit 1 if a backend failed."""
    from .paths import atomic_path, check_writable

    cfg = config_from_args(args, say)  # (--cache-dir is applied by the CLI, for the model cache too)
    out = check_writable(Path(args.out) if args.out else default_out(cfg.device), "--out", suffixes=(".json",))
    table, chart = out.with_suffix(".md"), out.with_suffix(".png")
    if cfg.smoke:
        say(SMOKE_NOTE)
    if cfg.device.type != "cuda":
        say(CPU_NOTE.format(model=cfg.model))
    say(f"backends {', '.join(cfg.backends)}; workloads {', '.join(w.name for w in cfg.workloads)}; "
        f"{cfg.warmup} warm-up + {cfg.runs} timed edits each; results go to {out}")

    def write(doc: dict) -> None:
        doc["settings"].update(size=getattr(args, "size", None), steps=getattr(args, "steps", None))
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
        with atomic_path(table) as tmp:
            tmp.write_text(_heading(doc) + markdown_table(doc) + "\n\n" + "".join(f"{n}\n" for n in doc["notes"]))

    doc = run_bench(cfg, say, on_update=write)
    doc["chart"] = None
    if not args.no_chart:
        if write_chart(doc, chart):
            doc["chart"] = chart.name
        else:
            doc["notes"].append("matplotlib is not installed: no chart (pip install matplotlib)")
    write(doc)
    print(_heading(doc))
    print(markdown_table(doc))
    print()
    for note in doc["notes"]:
        print(note)
    print(f"results: {out}\ntable: {table}" + (f"\nchart: {chart}" if doc["chart"] else ""))
    return 1 if any(r.get("error") for r in doc["results"]) else 0


def _heading(doc: dict) -> str:
    return (f"# regiondrag bench{' (smoke run)' if doc.get('smoke') else ''}: {doc['device']}, {doc['model']} "
            f"({doc['weights']} weights), {doc['dtype']}, ceiling {doc['matmul_tflops']:.2f} TFLOP/s\n\n")
