"""``bench``: latency of whole RegionDrag edits per backend, beside the paper's own implementation.

``python -m regiondrag.engine bench`` (and ``benchmarks/bench_pipeline.py``, a thin wrapper) runs fixed
workloads on every selected backend in one process; :mod:`regiondrag.engine.bench_cli` writes the result
document (a JSON file rewritten after each measurement, a Markdown table and a PNG chart beside it):

* Workloads (:data:`WORKLOADS`): the paper's default edit (512x512, steps 20, start_t 0.5, end_t 0.2,
  encode_then_cp, IP-Adapter on), the same at 768x768 and 512x768 (width x height), and cp_then_encode
  at 512x512. The image is a fixed-seed smooth random image; the drag one region pair of two ellipses
  covering 5% of the image each, the target shifted. Same inputs and seed on every backend.
* Backends: ``baseline`` (``benchmarks/baseline.py``: the reference code's structure in eager
  diffusers, the denominator of every ``ratio_to_baseline``), ``torch``, ``compiled``, ``onnxruntime``,
  ``tensorrt``. Each loads its own copy of the model (memory is freed in between).
* Per backend and workload: the first edit after loading is timed on its own (``first_call_ms`` =
  ``load_ms`` (from_pretrained, or load_components for the baseline) + ``first_edit_ms``, which
  includes compiling/loading artifacts for that shape); ``warmup - 1`` more untimed edits; then ``runs``
  timed edits: end to end with a host clock (synchronised), per stage from the pipeline's
  ``result.timings`` (CUDA events on CUDA), region ops (blur, copy-paste + mask blend; part of
  ``sampling``) as the pipeline records them. Median and p90.
  ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` over the timed runs (GiB, weights included;
  TensorRT / ONNX Runtime allocations outside torch show in ``device_mem_used_gb`` instead).
* Achieved TFLOP/s per stage: the FLOPs each stage executes (``flops``, counted by one more edit under
  :class:`regiondrag.engine.flops.StageFlops`, with the eager networks for compiled backends) over its
  median time, and that rate as a fraction of the dense rate measured at the start of the run
  (``hardware.matmul_ceiling``: the faster of a matmul and a 3x3 convolution, large, warm, best of
  several, same threads). ``peak_rss_gb``: the peak
  resident memory of the backend's process (loading and builds included, ``VmHWM``): it also counts
  clean pages of weight files mapped while they are read, which the kernel drops under pressure.
  ``peak_anon_gb``: the peak anonymous memory of the backend's process and its children (a build's
  compiler included), sampled every 0.1 s from the parent; what decides whether a run fits the
  machine (only swap or the OOM killer take it back). Isolated runs only. Compiled backends at one
  resolution run as a one-resolution deployment would: their artifacts are built (or found) first,
  each network in a build process of its own (``build --isolate``; ``build_peak_anon_gb``: the largest
  of those processes' peaks, which ``peak_anon_gb`` includes; the first workload's ``first_call_ms``
  includes their time and ``artifact_build_s`` their builds), then the benchmark process counts FLOPs
  with the eager networks and frees the eager weights the artifacts replace (``eager_weights_kept``:
  False) before it loads them.
* Each backend runs in a fresh process (``BenchConfig.isolate``): nothing one backend loads stays for
  the next, and a backend that crashes or is killed costs only its own rows.

Weights: ``--model`` when given (``weights: "real"`` unless the model is a random one); otherwise
``random-sd15`` (full-size SD-1.5 architecture, random weights, the real cost) on CUDA and ``tiny``
on the CPU, where the default is a labelled smoke run (see ``bench_cli.SMOKE``). CPU figures are CPU
figures: the run says so and ``benchmarks/report.py`` leaves them out.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import BACKENDS as ENGINE_BACKENDS
from .bench_workloads import Inputs, Workload, make_inputs
from .flops import count_edit_flops
from .hardware import (_torch, clock, collect_versions, device_key, device_name, free,
                       matmul_ceiling, peak_rss_gb, reset_peak_rss)
from .processes import run_in_own_process

SCHEMA = "regiondrag-bench-pipeline/1"
REPO = Path(__file__).resolve().parents[2]  # the repository root (regiondrag/engine/ -> ../..)
BASELINE_FILE = REPO / "benchmarks" / "baseline.py"
BACKENDS = ("baseline", *ENGINE_BACKENDS)
STAGES = ("inputs", "prepare", "text_encode", "image_encode", "vae_encode", "inversion", "sampling", "region_ops",
          "vae_decode", "postprocess")
CPU_NOTE = ("NOTE: CPU run: these are CPU timings (model {model}), not GPU figures; do not report or "
            "commit them as GPU results.")
SMOKE_NOTE = ("SMOKE RUN: the CPU default (tiny model, small images, few edits) checks that every backend "
              "runs and shows where time goes; it is not a benchmark (--full for the whole suite)")
CEILING_NOTE = ("TFLOP/s: the matmul, convolution and attention FLOPs a stage executes (counted, eager networks "
                "for compiled backends) per second of its median time; % of ceiling: that rate over the fastest "
                "dense rate measured here at the start ({tflops:.3g} TFLOP/s, {method}, {threads} threads)")
Say = Callable[[str], None]


# ----------------------------------------------------------------------------- device helpers
# ----------------------------------------------------------------------------- backends
def load_baseline_module():
    """``benchmarks/baseline.py`` of the repository checkout (it is not part of the installed package)."""
    if not BASELINE_FILE.is_file():
        raise ValueError(f"the baseline backend needs the repository's benchmarks/baseline.py "
                         f"(not found at {BASELINE_FILE}); run from a checkout")
    mod = sys.modules.get("regiondrag_bench_baseline")
    if mod is None:
        spec = importlib.util.spec_from_file_location("regiondrag_bench_baseline", BASELINE_FILE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


def unavailable_reason(backend: str, device) -> str | None:
    """Why ``backend`` cannot run on ``device`` here (None when it can)."""
    if backend not in BACKENDS:
        return f"unknown backend; allowed: {', '.join(BACKENDS)}"
    if backend == "baseline" and not BASELINE_FILE.is_file():
        return "benchmarks/baseline.py is not here (run from a repository checkout)"
    if backend == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "ONNX Runtime is not installed (pip install 'regiondrag[onnx]', or onnxruntime-gpu for CUDA)"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    if backend == "tensorrt":
        if device.type != "cuda":
            return "TensorRT needs a CUDA device"
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed"
    return None


def default_backends(device) -> list[str]:
    """Every backend that can run here; ``compiled`` only on CUDA (AOTInductor CPU builds take minutes)."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None
            and not (b == "compiled" and device.type != "cuda")]


# ----------------------------------------------------------------------------- measuring
@dataclass
class BenchConfig:
    model: str
    ip_adapter: str | None
    device: object  # torch.device
    dtype: object  # torch.dtype
    backends: list
    workloads: list  # [Workload]
    runs: int = 10
    warmup: int = 2
    smoke: bool = False  # the CPU default: small, few edits; says so in its output
    isolate: bool = True  # each backend in a fresh process (see _bench_backend_isolated)


def is_full_size_sd15(components) -> bool:
    u, v = components.unet.config, components.vae.config
    return (tuple(u.block_out_channels) == (320, 640, 1280, 1280) and u.cross_attention_dim == 768
            and tuple(v.block_out_channels) == (128, 256, 512, 512))


def _edit_fn(backend: str, cfg: BenchConfig, say: Say):
    """Load ``backend``'s model; returns ``(edit(workload, inputs) -> EditResult, components, runner)``."""
    if backend == "baseline":
        from regiondrag.models import load_components

        mod = load_baseline_module()
        comps = load_components(cfg.model, cfg.ip_adapter, cfg.device, cfg.dtype)

        def edit(w: Workload, inp: Inputs):
            # What the engine does in its "inputs" stage (region masks -> points, the preview) is
            # done by the reference's UI before drag(); it is counted here, in "inputs".
            t0 = time.perf_counter()
            src, trg = inp.drag.to_points(1 / 8)
            preview = inp.drag.preview(inp.image) if w.method == "cp_then_encode" else None
            prep_ms = (time.perf_counter() - t0) * 1e3
            res = mod.baseline_edit(comps, inp.image, src * 8, trg * 8, prompt=w.prompt, preview=preview,
                                    method=w.method, steps=w.steps, start_t=w.start_t, end_t=w.end_t,
                                    noise_scale=w.noise_scale, seed=w.seed)
            res.timings["inputs"] = res.timings.get("inputs", 0.0) + prep_ms
            res.timings["total"] = res.timings.get("total", 0.0) + prep_ms
            return res

        return edit, comps, None
    from regiondrag.pipeline import RegionDragPipeline

    pipe = RegionDragPipeline.from_pretrained(cfg.model, ip_adapter=cfg.ip_adapter, device=cfg.device,
                                              dtype=cfg.dtype, backend=backend, build_progress=say)
    pipe.set_progress_bar_config(disable=True)  # the benchmark reports its own progress, per measurement

    def edit(w: Workload, inp: Inputs):
        return pipe.edit(inp.image, inp.drag, prompt=w.prompt, method=w.method, steps=w.steps,
                         start_t=w.start_t, end_t=w.end_t, noise_scale=w.noise_scale, seed=w.seed)

    return edit, pipe.components, pipe.runner


def _artifact_state(runner, before) -> str | None:
    """Compiled backends: "built" / "cached" when the first edit prepared artifacts for its shape,
    "loaded" when this process already had them (an earlier workload of the same shape); else None."""
    report = getattr(runner, "report", None)
    if report is None:
        return None
    if report is before:
        return "loaded"
    return "built" if any(not r.get("hit") for r in report) else "cached"


def _bench_workload(backend, edit, runner, w: Workload, inp: Inputs, cfg: BenchConfig, load_ms: float,
                    say: Say, first: bool, flops: dict | None = None) -> tuple[dict, object]:
    torch = _torch()
    dev = cfg.device
    if dev.type == "cuda" and not first:  # for the first workload the reset before loading counts
        torch.cuda.reset_peak_memory_stats(dev)
    report_before = getattr(runner, "report", None)
    t0 = clock(dev)
    edit(w, inp)
    first_edit_ms = clock(dev) - t0
    first_peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    artifacts = _artifact_state(runner, report_before)
    build_s = (sum(r["seconds"] for r in runner.report if not r["hit"]) if artifacts == "built" else None)
    for _ in range(cfg.warmup - 1):
        edit(w, inp)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    e2e, stages = [], []
    for _ in range(cfg.runs):
        t0 = clock(dev)
        res = edit(w, inp)
        e2e.append(clock(dev) - t0)
        stages.append({k: float(v) for k, v in res.timings.items() if k != "total"})
    peak = used = None
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        free, total = torch.cuda.mem_get_info(dev)
        used = (total - free) / 2**30
    if flops is None:
        flops = count_edit_flops(lambda: edit(w, inp), runner)
    names = [s for s in STAGES if any(s in st for st in stages)]
    stages_ms = {s: float(np.median([st.get(s, 0.0) for st in stages])) for s in names}
    row = dict(backend=backend, workload=w.name, width=w.width, height=w.height, method=w.method, steps=w.steps,
               start_t=w.start_t, e2e_ms_median=float(np.median(e2e)), e2e_ms_p90=float(np.percentile(e2e, 90)),
               e2e_ms_runs=[float(x) for x in e2e], first_call_ms=load_ms + first_edit_ms, load_ms=load_ms,
               first_edit_ms=first_edit_ms, artifacts=artifacts, artifact_build_s=build_s, stages_ms=stages_ms,
               stages_ms_p90={s: float(np.percentile([st.get(s, 0.0) for st in stages], 90)) for s in names},
               peak_mem_gb=peak, first_call_peak_mem_gb=first_peak, device_mem_used_gb=used,
               peak_rss_gb=peak_rss_gb(), peak_anon_gb=None, flops={k: v for k, v in flops.items() if v},
               eager_weights_kept=getattr(runner, "keep_eager_weights", None), error=None)
    say(f"{backend:<11} {w.name:<15} e2e median {row['e2e_ms_median']:.1f} ms, p90 {row['e2e_ms_p90']:.1f} ms, "
        f"first call {row['first_call_ms'] / 1e3:.1f} s")
    return row, res.latent.detach().float().cpu()


def _one_resolution(cfg: BenchConfig) -> bool:
    """Whether every workload runs at one size (artifact backends then run as a one-resolution deployment)."""
    return len({(w.height, w.width) for w in cfg.workloads}) == 1


def _count_first_and_free(runner, edit, cfg: BenchConfig, inputs: dict, say: Say) -> dict:
    """A backend whose artifacts replace its eager networks, benchmarked at one resolution, runs as a
    one-resolution deployment does: the FLOPs of each workload are counted first (with the eager
    networks), then the eager weights the artifacts replace are freed at its first prepare
    (``keep_eager_weights``), so its memory is that of the artifacts. Returns workload -> FLOPs."""
    if not hasattr(runner, "keep_eager_weights") or not _one_resolution(cfg):
        return {}
    counted = {}
    for w in cfg.workloads:
        say(f"{runner.name} {w.name}: counting FLOPs with the eager networks")
        counted[w.name] = count_edit_flops(lambda w=w: edit(w, inputs[w.name]), runner)
    runner.keep_eager_weights = False
    return counted


def _error_row(backend: str, w: Workload, exc: BaseException) -> dict:
    return dict(backend=backend, workload=w.name, width=w.width, height=w.height, method=w.method, steps=w.steps,
                e2e_ms_median=None, e2e_ms_p90=None, first_call_ms=None, stages_ms={}, peak_mem_gb=None,
                error=f"{type(exc).__name__}: {exc}")


def _bench_backend(backend: str, cfg: BenchConfig, inputs: dict, say: Say, meta: dict, latents: dict,
                   row_done: Callable[[dict], None]) -> None:
    torch = _torch()
    dev = cfg.device
    free(dev)
    reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    say(f"{backend}: loading {cfg.model}")
    try:
        t0 = clock(dev)
        edit, comps, runner = _edit_fn(backend, cfg, say)
        load_ms = clock(dev) - t0
        counted = _count_first_and_free(runner, edit, cfg, inputs, say)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the other backends still run
        if os.environ.get("REGIONDRAG_DEBUG"):
            raise
        say(f"{backend}: failed before its first edit (loading, or counting FLOPs): {exc}")
        for w in cfg.workloads:
            row_done(_error_row(backend, w, exc))
        return
    meta.setdefault("random_weights", bool(comps.random_weights))
    meta.setdefault("full_size", is_full_size_sd15(comps))
    meta.setdefault("ip_adapter", comps.image_encoder is not None)
    meta.setdefault("fingerprint", comps.fingerprint)
    for i, w in enumerate(cfg.workloads):
        try:
            row, latent = _bench_workload(backend, edit, runner, w, inputs[w.name], cfg, load_ms, say, i == 0,
                                          counted.get(w.name))
            latents[(backend, w.name)] = latent
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            if os.environ.get("REGIONDRAG_DEBUG"):
                raise
            say(f"{backend} {w.name}: failed: {exc}")
            row = _error_row(backend, w, exc)
        row_done(row)
    del edit, comps, runner
    free(dev)


def _bench_backend_isolated(backend: str, cfg: BenchConfig, inputs: dict, say: Say, meta: dict, latents: dict,
                            row_done: Callable[[dict], None]) -> None:
    """:func:`_bench_backend` in a fresh process: what a backend loads and builds (models, artifacts,
    allocator caches) goes with the process, its peak memory is its own, and a backend that crashes or
    is killed (out of memory) costs only its own rows: they are recorded as errors and the run goes on."""
    pending = {w.name: w for w in cfg.workloads}
    try:
        built = _build_apart(backend, cfg, say)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the other backends still run
        say(f"{backend}: building its artifacts failed: {exc}")
        for w in cfg.workloads:
            row_done(_error_row(backend, w, exc))
        return

    def on_message(kind: str, payload, peak_anon_gb) -> bool:
        if kind == "say":
            say(payload)
        elif kind == "row":
            row, latent, worker_meta = payload
            for k, v in worker_meta.items():
                meta.setdefault(k, v)
            if latent is not None:
                latents[(backend, row["workload"])] = _torch().from_numpy(latent)
            pending.pop(row["workload"], None)
            row_done(_with_build({**row, "peak_anon_gb": peak_anon_gb}, built))
        return not pending

    end = run_in_own_process(_backend_worker, (backend, cfg, inputs), f"bench-{backend}", on_message)
    if pending:
        exc = RuntimeError(f"the {backend} benchmark process exited with code {end.exitcode}{end.why()} "
                           "before it finished")
        say(f"{backend}: {exc}")
        for w in pending.values():
            row_done({**_error_row(backend, w, exc), "peak_anon_gb": end.peak_anon_gb})


def _build_apart(backend: str, cfg: BenchConfig, say: Say) -> dict | None:
    """An artifact backend benchmarked at one resolution has its artifacts built (or found) first, each
    network in a build process of its own (:func:`regiondrag.engine.build.build_artifacts`, ``isolate``),
    so that no build's memory adds to the model the benchmark process holds, as a deployment that runs
    ``build --isolate`` first. None where that does not apply; else what the rows record of it."""
    from .build import build_artifacts, supports_isolated_build
    from .backends.base import precision_of

    if not supports_isolated_build(backend) or not _one_resolution(cfg):
        return None
    w = cfg.workloads[0]
    say(f"{backend}: building (or finding) its artifacts for {w.width}x{w.height}, one process per network")
    rows = build_artifacts(cfg.model, backend, w.height, w.width, precision_of(cfg.dtype), cfg.ip_adapter,
                           str(cfg.device), progress=say, isolate=True)
    built = [r for r in rows if not r["hit"]]
    return {"built": bool(built), "build_s": sum(r["seconds"] for r in built) if built else None,
            "process_ms": sum(r["process_s"] for r in rows) * 1e3,
            "peak_anon_gb": max((r["peak_anon_gb"] or 0.0 for r in rows), default=None)}


def _with_build(row: dict, built: dict | None) -> dict:
    """A row of a backend whose artifacts :func:`_build_apart` built or found: the builds' peak memory
    counts in the backend's, and the first call of its first workload includes the build processes."""
    if built is None or row.get("error") is not None:
        return row
    row = {**row, "build_peak_anon_gb": built["peak_anon_gb"], "artifacts_built_apart": True,
           "peak_anon_gb": max(row["peak_anon_gb"] or 0.0, built["peak_anon_gb"] or 0.0) or None}
    if row["artifacts"] in ("built", "cached"):  # the workload whose first edit loaded the artifacts
        row["artifacts"] = "built" if built["built"] else "cached"
        row["artifact_build_s"] = built["build_s"]
        row["first_call_ms"] += built["process_ms"]
    return row


def _backend_worker(backend: str, cfg: BenchConfig, inputs: dict, send) -> None:
    """The body of :func:`_bench_backend_isolated`'s process: rows (with latents) and messages to ``send``."""
    meta: dict = {}
    latents: dict = {}

    def row_done(row: dict) -> None:
        latent = latents.get((backend, row["workload"]))
        send("row", (row, None if latent is None else latent.numpy(), dict(meta)))

    _bench_backend(backend, cfg, inputs, lambda m: send("say", m), meta, latents, row_done)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _add_derived(rows: list[dict], latents: dict, ceiling: float) -> dict:
    """Ratios to the baseline, latent differences to it and achieved TFLOP/s, in place."""
    base = {r["workload"]: r for r in rows if r["backend"] == "baseline" and r["error"] is None}
    ratios: dict = {}
    for r in rows:
        if r["error"] is not None:
            continue
        b = base.get(r["workload"])
        r["ratio_to_baseline"] = r["e2e_ms_median"] / b["e2e_ms_median"] if b else None
        r["speedup_vs_baseline"] = b["e2e_ms_median"] / r["e2e_ms_median"] if b else None
        ratios.setdefault(r["backend"], {})[r["workload"]] = r["ratio_to_baseline"]
        mine, ref = latents.get((r["backend"], r["workload"])), latents.get(("baseline", r["workload"]))
        r["latent_max_abs_diff_vs_baseline"] = (float((mine - ref).abs().max()) if mine is not None
                                                and ref is not None else None)
        r["tflops"] = {st: f / r["stages_ms"][st] / 1e9 for st, f in (r.get("flops") or {}).items()
                       if r["stages_ms"].get(st)}
        r["tflops_fraction_of_matmul"] = {st: v / ceiling for st, v in r["tflops"].items()} if ceiling else None
    return ratios


def run_bench(cfg: BenchConfig, say: Say = lambda m: None, on_update: Callable[[dict], None] | None = None) -> dict:
    """Run every backend on every workload; returns the result document (see the module docstring).

    ``on_update(doc)`` receives the document so far (``"complete": false``) after each backend and
    workload, so that an interrupted run keeps what it measured.
    """
    from regiondrag.pipeline import check_edit_params

    for w in cfg.workloads:  # check the parameters before loading anything
        check_edit_params(w.method, w.steps, w.start_t, w.end_t, w.noise_scale, seed=w.seed, prompt=w.prompt)
    dev = cfg.device
    started = _dt.datetime.now(_dt.timezone.utc)
    say(f"measuring the {str(cfg.dtype).replace('torch.', '')} arithmetic ceiling on {device_name(dev)}")
    ceiling = matmul_ceiling(dev, cfg.dtype)
    inputs = {w.name: make_inputs(w) for w in cfg.workloads}
    meta: dict = {}
    latents: dict = {}
    rows: list[dict] = []
    eta = _Eta(len(cfg.backends) * len(cfg.workloads), say)
    # What every document of this run shares, gathered once (versions may ask nvidia-smi).
    fixed = dict(started=started, ceiling=ceiling, inputs=inputs, versions=collect_versions(dev))

    def row_done(row: dict) -> None:
        rows.append(row)
        eta.step(f"{row['backend']} {row['workload']}")
        if on_update is not None:
            on_update(_document(cfg, rows, meta, latents, fixed, complete=False))

    bench_backend = _bench_backend_isolated if cfg.isolate else _bench_backend
    for backend in cfg.backends:
        bench_backend(backend, cfg, inputs, say, meta, latents, row_done)
    return _document(cfg, rows, meta, latents, fixed, complete=True)


class _Eta:
    """Progress over (backend, workload) units with the time left, from the mean time per unit so far."""

    def __init__(self, total: int, say: Say):
        self.total, self.done, self.say, self.t0 = total, 0, say, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        spent = time.perf_counter() - self.t0
        left = spent / self.done * (self.total - self.done)
        tail = f", about {_duration(left)} left" if self.done < self.total else f", {_duration(spent)} in all"
        self.say(f"[{self.done}/{self.total}] {what} done{tail}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _document(cfg: BenchConfig, rows: list, meta: dict, latents: dict, fixed: dict, complete: bool) -> dict:
    """The result document for the rows measured so far (``fixed``: what :func:`run_bench` gathered once)."""
    ceiling, inputs = fixed["ceiling"], fixed["inputs"]
    rows = [dict(r) for r in rows]  # derived fields are added to copies: a partial write changes nothing
    ratios = _add_derived(rows, latents, ceiling["tflops"])
    dev = cfg.device
    notes = []
    if cfg.smoke:
        notes.append(SMOKE_NOTE)
    if dev.type != "cuda":
        notes.append(CPU_NOTE.format(model=cfg.model))
    if not meta.get("full_size", False):
        notes.append(f"model {cfg.model!r} is not the full-size SD-1.5 architecture: its costs are not SD-1.5's")
    if meta.get("random_weights"):
        notes.append("random weights: the cost of the architecture, not real edits (load_ms includes "
                     "building the weights)")
    notes.append(CEILING_NOTE.format(**ceiling))
    if not complete:
        notes.append("INCOMPLETE: the run was still going (or was interrupted) when this was written")
    return _finite({
        "schema": SCHEMA, "timestamp": fixed["started"].isoformat(timespec="seconds"), "complete": complete,
        "smoke": cfg.smoke,
        "device": device_name(dev), "device_type": dev.type, "device_key": device_key(dev),
        "dtype": str(cfg.dtype).replace("torch.", ""), "model": cfg.model,
        "weights": "random" if meta.get("random_weights", cfg.model in ("tiny", "random-sd15")) else "real",
        "full_size": meta.get("full_size"), "ip_adapter": meta.get("ip_adapter"),
        "model_fingerprint": meta.get("fingerprint"),
        "versions": fixed["versions"], "matmul": ceiling, "matmul_tflops": ceiling["tflops"],
        "settings": {"runs": cfg.runs, "warmup": cfg.warmup, "backends": list(cfg.backends),
                     "workloads": [w.name for w in cfg.workloads]},
        "workloads": {w.name: {**asdict(w), "region_fraction": inputs[w.name].region_fraction}
                      for w in cfg.workloads},
        "results": rows, "ratio_to_baseline": ratios, "notes": notes,
    })
