"""``python -m regiondrag.engine``: a thin command line over the library.

Commands: ``edit`` (one edit from an image + drag JSON, or a DragBench case), ``build`` (compile a
model for a backend and resolution), ``bench`` (latency suite), ``ui`` (web UI) and ``info``
(versions, devices, cache). Set ``REGIONDRAG_DEBUG=1`` for tracebacks. Progress goes to stderr; errors print one line and exit non-zero.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .backends import BACKENDS, COMPILED_BACKENDS

EXIT_USAGE = 2
DTYPES = ("float16", "bfloat16", "float32")
# Library defaults (ALGORITHM.md §15, the paper's evaluation settings); a drag JSON's "params"
# override them and command-line options override both.
EDIT_DEFAULTS = dict(method="encode_then_cp", steps=20, start_t=0.5, end_t=0.2, noise_scale=1.0, seed=42)


def _say(msg: str) -> None:
    print(f"[regiondrag] {msg}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """diffusers/transformers print progress bars and warnings the CLI replaces with its own lines."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch._dynamo", "torch._inductor", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass


def _add_edit_parser(sub) -> None:
    p = sub.add_parser("edit", help="run one drag edit",
                       description="Run one RegionDrag edit and write the result image.")
    src = p.add_argument_group("input (either --image with --drag, or --sample)")
    src.add_argument("--image", help="input image (PNG/JPEG)")
    src.add_argument("--drag", help="drag JSON file (schema in README.md)")
    src.add_argument("--sample", help="a DragBench / DragBench-SR/DR case directory")
    p.add_argument("--out", required=True, help="output image path (PNG)")
    p.add_argument("--mask", help="editing-mask PNG (nonzero = may change); default: the drag file's, else all")
    p.add_argument("--prompt", help="text prompt (default: the drag file's or case's, else empty)")
    p.add_argument("--model", default=None, help="hub id, local diffusers dir, .safetensors file, or 'tiny' "
                   "(default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("--config", help="for a single-file checkpoint: a diffusers dir or hub id with its configs")
    p.add_argument("--ip-adapter", default="default",
                   help="IP-Adapter-Plus: hub id or local dir laid out like h94/IP-Adapter, or 'none' "
                   "(default: h94/IP-Adapter; the tiny adapter with --model tiny)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="torch (eager) or a compiled backend, built on first use and cached (default: torch)")
    p.add_argument("--cache-dir", help="cache root (default: $REGIONDRAG_CACHE or ~/.cache/regiondrag)")
    p.add_argument("--method", choices=("encode_then_cp", "cp_then_encode"),
                   help=f"default {EDIT_DEFAULTS['method']}: SDE inversion then copy-paste (the paper's "
                   "main method); cp_then_encode: pixel copy-paste then ODE inversion")
    p.add_argument("--steps", type=int, help=f"timestep grid size (default {EDIT_DEFAULTS['steps']})")
    p.add_argument("--start-t", type=float, help=f"inversion depth in (0,1) (default {EDIT_DEFAULTS['start_t']})")
    p.add_argument("--end-t", type=float, help=f"copy-paste cut-off, see README QUIRKs (default {EDIT_DEFAULTS['end_t']})")
    p.add_argument("--noise-scale", type=float, help=f"noise std at the handle points (default {EDIT_DEFAULTS['noise_scale']})")
    p.add_argument("--seed", type=int, help=f"random seed (default {EDIT_DEFAULTS['seed']})")


def _edit_inputs(args):
    """(image, drag, prompt, mask, params) from --image/--drag or --sample."""
    import numpy as np

    from regiondrag.inputs import as_binary_mask

    params: dict = {}
    if args.sample:
        if args.image or args.drag:
            raise ValueError("give either --sample or --image with --drag, not both")
        from regiondrag.data import load_case

        case = load_case(args.sample)
        image, drag, prompt, mask = case.image, case.drag, case.prompt, case.mask
        # The paper's evaluation passes the original image as the 'cp_then_encode' preview.
        params["preview"] = case.image
    else:
        if not (args.image and args.drag):
            raise ValueError("edit needs --image and --drag (or --sample DIR)")
        from regiondrag.dragfile import load_drag
        from regiondrag.inputs import load_image

        image = load_image(args.image)
        drag, extras = load_drag(args.drag)
        prompt, mask, params = extras.get("prompt", ""), extras.get("mask"), extras.get("params", {})
    if args.mask:
        from regiondrag.dragfile import read_mask_png

        mask = read_mask_png(args.mask, "--mask editing mask")
    if mask is not None:
        mask = as_binary_mask(np.asarray(mask), image.shape[:2], "editing mask")
    if args.prompt is not None:
        prompt = args.prompt
    merged = {**EDIT_DEFAULTS, **params}  # params may also carry the sample's preview
    for key in EDIT_DEFAULTS:
        if getattr(args, key) is not None:
            merged[key] = getattr(args, key)
    return image, drag, prompt, mask, merged


def cmd_edit(args) -> int:
    import torch

    from regiondrag.models import DEFAULT_MODEL
    from regiondrag.params import resolve_device
    from regiondrag.pipeline import RegionDragPipeline, check_edit

    from .paths import atomic_path, check_writable

    # Everything that needs no model is checked before loading one: the output path, the device, the
    # parameters, and the image with its drag, mask and preview.
    out = check_writable(args.out, "--out", suffixes=(".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    device = resolve_device(args.device)
    image, drag, prompt, mask, params = _edit_inputs(args)
    check_edit(image, drag, mask=mask, prompt=prompt, **params)
    model = args.model or DEFAULT_MODEL
    ip = _ip_arg(args)
    _say(f"loading {model}" + (f" + IP-Adapter {ip}" if ip not in (None, "default") else ""))
    t0 = time.perf_counter()
    pipe = RegionDragPipeline.from_pretrained(model, ip_adapter=ip, device=device,
                                              dtype=getattr(torch, args.dtype) if args.dtype else None,
                                              backend=args.backend, config=args.config, build_progress=_say)
    _say(f"loaded in {time.perf_counter() - t0:.1f}s on {pipe.device} ({str(pipe.dtype).replace('torch.', '')})")
    if pipe.components.random_weights:
        _say("note: this model has RANDOM weights; its output is noise, not an edit")
    result = pipe.edit(image, drag, prompt=prompt, mask=mask, **params)
    if args.backend != "torch":
        built = sum(not r["hit"] for r in pipe.runner.report)
        _say(f"backend {args.backend}: {len(pipe.runner.report) - built} artifacts from the cache, {built} built")
    with atomic_path(out) as tmp:
        result.image.save(tmp)
    stages = ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items() if k != "total")
    _say(f"edit {result.timings['total']:.0f} ms ({stages} ms)")
    print(out)
    return 0


def _add_build_parser(sub) -> None:
    p = sub.add_parser("build", help="compile a model's networks for a backend and resolution",
                       description="Export/compile every network once and cache the artifacts; later edits "
                       "with --backend load them without rebuilding.")
    p.add_argument("--model", default=None, help="as for edit (default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("--config", help="for a single-file checkpoint: a diffusers dir or hub id with its configs")
    p.add_argument("--ip-adapter", default="default", help="as for edit")
    p.add_argument("--backend", required=True, choices=COMPILED_BACKENDS)
    p.add_argument("--height", type=int, default=512, help="image height in pixels (default 512)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels (default 512)")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", help="cache root (default: $REGIONDRAG_CACHE or ~/.cache/regiondrag)")
    p.add_argument("--isolate", action="store_true",
                   help="build each network in a process of its own (compiled, onnxruntime): the peak memory "
                   "is one network's build instead of the whole model plus every build so far; loads the "
                   "model once per network")


def cmd_build(args) -> int:
    from regiondrag.models import DEFAULT_MODEL

    from .build import build_artifacts

    model = args.model or DEFAULT_MODEL
    _say(f"building {args.backend} artifacts for {model} at {args.height}x{args.width}")
    t0 = time.perf_counter()
    rows = build_artifacts(model, args.backend, args.height, args.width, args.precision, _ip_arg(args),
                           args.device, args.config, progress=_say, isolate=args.isolate)
    print(f"{'network':<14} {'status':<7} {'MiB':>8} {'seconds':>8} {'peak GiB':>9}  path")
    for r in rows:
        peak = r.get("peak_anon_gb")  # the build process's peak anonymous memory (with --isolate)
        print(f"{r['network']:<14} {'cached' if r['hit'] else 'built':<7} {r['bytes'] / 2**20:>8.1f} "
              f"{r['seconds']:>8.1f} {'-' if peak is None else f'{peak:.2f}':>9}  {r['path']}")
    _say(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def _ip_arg(args):
    return None if str(args.ip_adapter).lower() == "none" else args.ip_adapter


def cmd_info(args) -> int:
    from .info import collect_info

    for key, value in collect_info().items():
        print(f"{key:<16} {value}")
    return 0


def _add_ui_parser(sub) -> None:
    p = sub.add_parser("ui", help="start the local web UI",
                       description="Serve the drag-editing web page; the model loads once at start-up.")
    p.add_argument("--model", default=None, help="hub id, local diffusers dir, .safetensors file, or 'tiny' "
                   "(random weights, for a quick look) (default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("--ip-adapter", default="default", help="as for edit (default: h94/IP-Adapter)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="inference backend (default: torch)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port, 1-65535 (default: 7860)")


def cmd_ui(args) -> int:
    from regiondrag.params import integer, resolve_device

    from .ui import run_ui  # imports gradio lazily; without it the error says how to install it

    integer("--port", args.port, 1, 65535)
    resolve_device(args.device)  # before the model loads
    return run_ui(args)


def cmd_bench(args) -> int:
    from .bench_cli import run_from_args  # the benchmark command; benchmarks/bench_pipeline.py runs the same

    return run_from_args(args, say=_say)


def build_parser() -> argparse.ArgumentParser:
    # `regiondrag` (the console script) and `python -m regiondrag.engine` are the same command.
    prog = "regiondrag" if Path(sys.argv[0]).name == "regiondrag" else "python -m regiondrag.engine"
    parser = argparse.ArgumentParser(prog=prog,
                                     description="RegionDrag inference engine: region-based drag editing.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_edit_parser(sub)
    _add_build_parser(sub)
    sub.add_parser("info", help="versions, devices and cached artifacts")
    _add_ui_parser(sub)
    from .bench_cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    handler = {"edit": cmd_edit, "build": cmd_build, "info": cmd_info, "ui": cmd_ui,
               "bench": cmd_bench}[args.command]
    if getattr(args, "cache_dir", None):
        os.environ["REGIONDRAG_CACHE"] = str(Path(args.cache_dir).expanduser().resolve())
    try:
        return handler(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        if os.environ.get("REGIONDRAG_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
