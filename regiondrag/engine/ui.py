"""``python -m regiondrag.engine ui``: a local web page (gradio) for drag editing.

Layout, as the paper's UI: an image upload (fitted to the canvas: long side 512, sides multiples of 8,
rounded down), one tab per input mode (region pairs, polygon pairs, region + points), the pixel
copy-paste preview, the parameters with the paper's UI defaults, Run and Save. The model is loaded
once at start-up. All state and drawing lives in :mod:`regiondrag.ui_state` (pure functions, tested
without a browser); this module only wires it to gradio. Every handler catches its errors and shows a
message: the page never shows a stack trace (the server log has it for unexpected errors). Texts and
the PNG views are in :mod:`regiondrag.engine.ui_views`.
"""
import functools
import logging
import sys
import time
from pathlib import Path

import numpy as np

from regiondrag import ui_state as us

from .ui_views import (BRUSH_SIZE, CSS, HELP, LOADING, TIPS, WORDS, error_text, info_text, png_file,
                       preview_and_status, view_png)

log = logging.getLogger("regiondrag.ui")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dog.png"
DEFAULT_OUT = "outputs/ui"


def _gradio():
    try:
        import gradio as gr
    except ImportError as exc:
        raise ValueError("the web UI needs gradio: pip install -e '.[ui]'") from exc
    return gr


def build_app(pipe, model_name: str, out_dir: str = DEFAULT_OUT):
    """The gradio Blocks page for ``pipe`` (a loaded RegionDragPipeline)."""
    gr = _gradio()
    random_weights = bool(getattr(pipe.components, "random_weights", False))

    def guard(n_out: int):
        """Turn any exception into a message in the status line (last output); other outputs unchanged."""
        def deco(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except ValueError as exc:
                    msg = str(exc)
                except Exception as exc:  # noqa: BLE001 - the page must show a message, not a trace
                    log.exception("UI handler %s failed", fn.__name__)
                    msg = f"internal error ({type(exc).__name__}): {exc}; see the server log"
                gr.Warning(msg)
                return error_text(msg) if n_out == 1 else (gr.skip(),) * (n_out - 1) + (error_text(msg),)
            return wrapper
        return deco

    def editor(state, mode: str, next_index: int = 0):
        """Editor value with the mode's drawing as background; brush red for a handle, blue for a target."""
        bg = view_png(state, mode)
        color = "#ff0000" if next_index % 2 == 0 else "#0000ff"
        value = None if bg is None else {"background": bg, "layers": [], "composite": None}
        return gr.ImageEditor(value=value, brush=gr.Brush(colors=[color], default_color=color,
                                                          color_mode="fixed", default_size=BRUSH_SIZE))

    with gr.Blocks(title="RegionDrag") as demo:
        state = gr.State(us.DragState())
        mode = gr.State("region_pairs")
        last = gr.State(None)
        gr.Markdown('# RegionDrag: drag image content from <span style="color:#e00">red</span> handle regions '
                    'to <span style="color:#00e">blue</span> target regions')
        dev = f"{pipe.device} ({str(pipe.dtype).replace('torch.', '')})"
        banner = f"Model `{model_name}` on {dev}."
        if random_weights:
            banner += (" ⚠️ **This model has RANDOM weights: its result is noise, not an edit.** It only checks "
                       "that the page works; start the UI without `--model tiny` for real edits.")
        gr.Markdown(banner, elem_id="banner")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.Image(label="1. Upload an image (fitted to long side 512)", type="numpy",
                                  sources=["upload", "clipboard"], elem_id="upload", height=260)
                example = gr.Button("Use the example image", size="sm", visible=EXAMPLE.is_file())
            with gr.Column(scale=2):
                status = gr.Markdown(info_text("Upload an image to start."), elem_id="status")
        with gr.Tabs():
            with gr.Tab(WORDS["region_pairs"], id="region_pairs", elem_id="tab-region-pairs") as tab_m:
                gr.Markdown(TIPS["region_pairs"])
                ed_m = gr.ImageEditor(label="2. Draw a region", type="numpy", sources=(), transforms=(),
                                      layers=False, format="png", elem_id="editor-m", height=560,
                                      brush=gr.Brush(colors=["#ff0000"], color_mode="fixed",
                                                     default_size=BRUSH_SIZE))
                with gr.Row():
                    add_m = gr.Button("Add region", variant="primary", elem_id="add-region")
                    undo_m = gr.Button("Undo region", elem_id="undo-region")
                    clear_m = gr.Button("Clear regions", elem_id="clear-regions")
                note_m = gr.Markdown("", elem_id="note-m")
            with gr.Tab(WORDS["polygon_pairs"], id="polygon_pairs", elem_id="tab-polygon-pairs") as tab_p:
                gr.Markdown(TIPS["polygon_pairs"])
                shape = gr.Radio([("▲ Triangle", 3), ("■ Quadrilateral", 4)], value=4, label="Shape",
                                 elem_id="shape")
                vis_p = gr.Image(label="2. Click vertices", interactive=False, format="png", elem_id="vis-p",
                                 buttons=[])
                with gr.Row():
                    undo_p = gr.Button("Undo vertex", elem_id="undo-vertex")
                    clear_p = gr.Button("Clear polygons", elem_id="clear-polygons")
            with gr.Tab(WORDS["region_points"], id="region_points", elem_id="tab-region-points") as tab_r:
                gr.Markdown(TIPS["region_points"])
                with gr.Row():
                    ed_r = gr.ImageEditor(label="2. Draw the region", type="numpy", sources=(), transforms=(),
                                          layers=False, format="png", elem_id="editor-r", height=480,
                                          brush=gr.Brush(colors=["#ff0000"], color_mode="fixed",
                                                         default_size=BRUSH_SIZE))
                    vis_r = gr.Image(label="3. Click handle → target points", interactive=False, format="png",
                                     elem_id="vis-r", buttons=[])
                with gr.Row():
                    undo_r = gr.Button("Undo point", elem_id="undo-point")
                    clear_r = gr.Button("Clear region and points", elem_id="clear-points")
        with gr.Row():
            prev = gr.Image(label="Preview (pixel copy-paste, before running)", interactive=False,
                            format="png", elem_id="preview")
            result = gr.Image(label="Result", interactive=False, format="png", elem_id="result")
        timing = gr.Markdown("", elem_id="timing")
        with gr.Accordion("Parameters", open=True):
            with gr.Row():
                prompt = gr.Textbox(us.UI_DEFAULTS["prompt"], label="Prompt", info=HELP["prompt"], elem_id="prompt")
                method = gr.Dropdown([("Encode then CP", "encode_then_cp"), ("CP then Encode", "cp_then_encode")],
                                     value=us.UI_DEFAULTS["method"], label="Method", info=HELP["method"])
            with gr.Row():
                steps = gr.Slider(20, 100, us.UI_DEFAULTS["steps"], step=20, label="Steps", info=HELP["steps"],
                                  elem_id="steps")
                start_t = gr.Slider(0.05, 0.95, us.UI_DEFAULTS["start_t"], step=0.05, label="start_t",
                                    info=HELP["start_t"], elem_id="start-t")
                end_t = gr.Slider(0.0, 0.95, us.UI_DEFAULTS["end_t"], step=0.05, label="end_t",
                                  info=HELP["end_t"], elem_id="end-t")
            with gr.Row():
                noise = gr.Slider(0.0, 1.6, us.UI_DEFAULTS["noise_scale"], step=0.2, label="Handle noise scale",
                                  info=HELP["noise_scale"], elem_id="noise-scale")
                seed = gr.Number(us.UI_DEFAULTS["seed"], precision=0, label="Seed", info=HELP["seed"],
                                 elem_id="seed")
        with gr.Row():
            run_btn = gr.Button("Run drag", variant="primary", elem_id="run")
            out_box = gr.Textbox(out_dir, label="Output folder (Save writes a new subfolder here)",
                                 elem_id="out-dir", scale=2)
            save_btn = gr.Button("Save", elem_id="save")
        params = [method, steps, start_t, end_t, noise, seed]

        # ---------------------------------------------------------------- image
        def draw_hint(k: int) -> str:
            color = "red" if k % 2 == 0 else "blue"
            return f"Draw {us.role_of(k)} region {k // 2 + 1} ({color}) on the image, then click **Add region**."

        views = [state, ed_m, note_m, vis_p, ed_r, vis_r, prev, result, timing, last, status]

        @guard(len(views))
        def on_image(image, n, md):
            if image is None:
                return (us.DragState(shape=n), None, "", None, None, None, None, None, "", None,
                        info_text("Upload an image to start."))
            st = us.new_state(image, shape=n)
            (h0, w0), (h, w) = st.meta["uploaded"], st.image.shape[:2]
            pv, msg = preview_and_status(st, md, f"image fitted to the canvas: {w0}x{h0} → {w}x{h}")
            return (st, editor(st, "region_pairs"), "", view_png(st, "polygon_pairs"), editor(st, "region_points"),
                    view_png(st, "region_points"), pv, None, "", None, msg)

        upload.upload(on_image, [upload, shape, mode], views)
        upload.clear(on_image, [upload, shape, mode], views)

        def load_example():
            from PIL import Image
            return np.asarray(Image.open(EXAMPLE).convert("RGB"))

        example.click(load_example, None, upload).then(on_image, [upload, shape, mode], views)

        # ---------------------------------------------------------------- modes
        def tab(name):
            @guard(3)
            def select(st, md):
                # The tabs also report the tab already shown (once when the page is first drawn, which on a
                # loaded machine can be answered after an upload, with the state from before it): nothing
                # changes then, so the status line keeps what the upload said.
                if md == name:
                    return (gr.skip(),) * 3
                return (name, *preview_and_status(st, name, f"mode: {WORDS[name]}"))
            return select

        tab_m.select(tab("region_pairs"), [state, mode], [mode, prev, status])
        tab_p.select(tab("polygon_pairs"), [state, mode], [mode, prev, status])
        tab_r.select(tab("region_points"), [state, mode], [mode, prev, status])

        out_m = [state, ed_m, note_m, prev, status]

        def stale(st, value) -> bool:
            """The editor's value is from before its newest background loaded (see us.editor_shows)."""
            return not us.editor_shows(value, us.render(st, "region_pairs"))

        @guard(len(out_m))
        def on_add_region(st, value):
            us.need_image(st)
            if stale(st, value):  # e.g. a second click on Add region before the canvas has reset
                raise ValueError("the canvas is still loading the last change: wait for the prompt under "
                                 "it, then draw the next region")
            st = us.add_region(st, us.editor_mask(value, st.image.shape[:2]))
            k = len(st.masks)
            done = f"added {us.role_of(k - 1)} region {(k + 1) // 2} ({'red' if k % 2 else 'blue'})"
            return (st, editor(st, "region_pairs", k), LOADING, *preview_and_status(st, "region_pairs", done))

        @guard(len(out_m))
        def on_regions(st, op):
            st = us.undo_region(st) if op == "undo" else us.clear_regions(st)
            return (st, editor(st, "region_pairs", len(st.masks)), LOADING,
                    *preview_and_status(st, "region_pairs", "removed the last region" if op == "undo" else "cleared"))

        @guard(1)
        def on_drawn(st, value):
            if st.image is None or stale(st, value):  # keep the note (LOADING) until the new canvas reports
                return gr.skip()
            n = int(us.editor_mask(value, st.image.shape[:2]).sum())
            k = len(st.masks)
            if n == 0:  # also what the editor reports once it has shown a new background (Add/Undo/Clear)
                return draw_hint(k)
            return f"{us.role_of(k).capitalize()} region {k // 2 + 1} drawn ({n} pixels): click **Add region**."

        # An editor is read on both events. gradio's ImageEditor dispatches `input` when a stroke ends (and when
        # a new background has loaded), while its upload of the layers may still be running: that event can carry
        # the value from before the stroke. `change` follows once the upload is done, with the stroke, but the
        # editor drops the first one. Each event is answered with what it carries and the last answer is the
        # latest value, so a stroke is never left unreported.
        for event in (ed_m.input, ed_m.change):
            event(on_drawn, [state, ed_m], note_m, trigger_mode="always_last")
        add_m.click(on_add_region, [state, ed_m], out_m)
        undo_m.click(lambda st: on_regions(st, "undo"), state, out_m)
        clear_m.click(lambda st: on_regions(st, "clear"), state, out_m)

        out_p = [state, vis_p, prev, status]

        @guard(len(out_p))
        def on_vertex(st, evt: gr.SelectData):
            st = us.add_vertex(st, evt.index)
            return (st, view_png(st, "polygon_pairs"), *preview_and_status(st, "polygon_pairs"))

        @guard(len(out_p))
        def on_polygons(st, op, n=4):
            st = {"undo": us.undo_vertex, "clear": us.clear_polygons}[op](st) if op != "shape" else us.set_shape(st, n)
            return (st, view_png(st, "polygon_pairs"), *preview_and_status(st, "polygon_pairs"))

        vis_p.select(on_vertex, state, out_p)
        undo_p.click(lambda st: on_polygons(st, "undo"), state, out_p)
        clear_p.click(lambda st: on_polygons(st, "clear"), state, out_p)
        shape.change(lambda st, n: on_polygons(st, "shape", n), [state, shape], out_p)

        out_r = [state, vis_r, prev, status]

        @guard(len(out_r))
        def on_region_drawn(st, md, value):
            if st.image is None:
                return (gr.skip(),) * len(out_r)
            st = us.set_region(st, us.editor_mask(value, st.image.shape[:2]))
            n = 0 if st.region is None else int(st.region.sum())
            if md != "region_points":  # the hidden editor reporting its reset: keep the other tab's view
                return st, view_png(st, "region_points"), gr.skip(), gr.skip()
            done = f"region drawn ({n} pixels)" if n else None
            return (st, view_png(st, "region_points"), *preview_and_status(st, "region_points", done))

        @guard(len(out_r))
        def on_point(st, evt: gr.SelectData):
            st = us.add_point(st, evt.index)
            k = len(st.points)
            done = f"{us.role_of(k - 1)} point {(k + 1) // 2} at ({st.points[-1][0]}, {st.points[-1][1]})"
            return (st, view_png(st, "region_points"), *preview_and_status(st, "region_points", done))

        @guard(len(out_r) + 1)
        def on_points(st, op):
            st = us.undo_point(st) if op == "undo" else us.clear_points(st)
            ed = editor(st, "region_points") if op == "clear" else gr.skip()
            return (st, view_png(st, "region_points"), ed, *preview_and_status(st, "region_points"))

        for event in (ed_r.input, ed_r.change):  # as for ed_m
            event(on_region_drawn, [state, mode, ed_r], out_r, trigger_mode="always_last")
        vis_r.select(on_point, state, out_r)
        undo_r.click(lambda st: on_points(st, "undo"), state, [state, vis_r, ed_r, prev, status])
        clear_r.click(lambda st: on_points(st, "clear"), state, [state, vis_r, ed_r, prev, status])

        # ---------------------------------------------------------------- run / save
        @guard(4)
        def on_run(st, md, text, *values, progress=gr.Progress()):
            drag = us.build_drag(st, md)
            p = us.edit_params(*values)

            def report(stage, i, n):
                progress((i + 1) / n, desc=f"{stage} {i + 1}/{n}")

            progress(0, desc="starting")
            res = pipe.edit(st.image, drag, prompt=text, progress=report, **p)
            note = " (random weights: noise, not an edit)" if random_weights else ""
            msg = us.format_timings(res.timings) + note
            run = dict(state=st, mode=md, drag=drag, prompt=text, params=p, result=res.image)
            return png_file(res.image), msg, run, info_text(f"done: {msg}; Save writes it to the output folder")

        run_btn.click(on_run, [state, mode, prompt, *params], [result, timing, last, status])

        @guard(1)
        def on_save(run, st, md, text, folder, *values):
            if run is None:  # nothing run yet: save the current inputs without a result
                run = dict(state=st, mode=md, drag=us.build_drag(st, md), prompt=text,
                           params=us.edit_params(*values), result=None)
            if not str(folder or "").strip():
                raise ValueError("give an output folder")
            target = us.unique_folder(folder)
            image = run["state"].image
            us.save_edit(target, image, us.render(run["state"], run["mode"]), run["drag"].preview(image),
                         run["result"], run["drag"], run["prompt"], run["params"])
            extra = "" if run["result"] is not None else " (no result yet: run first to include it)"
            return info_text(f"saved to `{target}`{extra}. Replay: `{us.replay_command(target, model_name)}`")

        save_btn.click(on_save, [last, state, mode, prompt, out_box, *params], status)
    return demo


def run_ui(args) -> int:
    """Load the model once, then serve the page until interrupted (``python -m regiondrag.engine ui``)."""
    gr = _gradio()
    import torch

    from regiondrag.models import DEFAULT_MODEL
    from regiondrag.pipeline import RegionDragPipeline

    logging.basicConfig(level=logging.WARNING, format="[regiondrag] %(message)s")
    model = args.model or DEFAULT_MODEL
    ip = None if str(args.ip_adapter).lower() == "none" else args.ip_adapter
    print(f"[regiondrag] loading {model}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    dtype = getattr(args, "dtype", None)
    pipe = RegionDragPipeline.from_pretrained(model, ip_adapter=ip, device=args.device,
                                              dtype=getattr(torch, dtype) if dtype else None,
                                              backend=args.backend)
    print(f"[regiondrag] loaded in {time.perf_counter() - t0:.1f}s on {pipe.device}", file=sys.stderr, flush=True)
    if pipe.components.random_weights:
        print("[regiondrag] note: this model has RANDOM weights; its output is noise, not an edit",
              file=sys.stderr, flush=True)
    demo = build_app(pipe, model)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, show_error=False, css=CSS, footer_links=[],
        theme=gr.themes.Default())
    return 0
