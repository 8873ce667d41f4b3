"""What the web UI shows: its texts, and the drawings and previews as PNG files for gradio.

:mod:`regiondrag.engine.ui` wires these to the page; all state and drawing logic is in
:mod:`regiondrag.ui_state`.
"""
import atexit
import functools
import hashlib
import os
import shutil
import tempfile

import numpy as np

from regiondrag import ui_state as us

from .paths import atomic_path

BRUSH_SIZE = 24
CSS = "#status {min-height: 2.5em} #banner {font-size: 1.05em}"
HELP = dict(
    prompt="Describes the output image; the paper's default suits most images.",
    method="Encode then CP: invert the image (SDE), then copy handle latents to the target at every step "
           "(the paper's main method). CP then Encode: copy-paste pixels first (the preview), then invert.",
    steps="Timestep grid size; start_t x steps of them are used for inversion and as many for sampling.",
    start_t="Inversion depth as a fraction of the grid: higher allows bigger changes and runs longer.",
    end_t="Meant as the fraction of final steps without copy-paste; as in the reference it only stops "
          "copy-paste below timestep end_t x steps (README, QUIRK 3), so it rarely matters.",
    noise_scale="Noise put on the handle region before sampling: higher removes more of its old content.",
    seed="The same seed and inputs give the same result.",
)
TIPS = {
    "region_pairs": "Paint a region with the brush and click **Add region**: the first is a handle (red), the "
                    "next its target (blue), and so on in pairs. The handle's content is stretched onto the target.",
    "polygon_pairs": "Click 3 (triangle) or 4 (quadrilateral) handle vertices (red), then as many target "
                     "vertices (blue) in the same order. Give quadrilateral vertices in order around the outline.",
    "region_points": "Paint the region to move on the left. Then click a handle point inside it and a target "
                     "point on the right, as many pairs as you like: the region follows the arrows.",
}
# Shown under the editor from Add/Undo/Clear until the editor reports its new background: a stroke made
# while the editor is still loading it would be wiped when the load ends.
LOADING = "⏳ Preparing the canvas… wait for the prompt to draw the next region."
WORDS = {"region_pairs": "Region pairs", "polygon_pairs": "Polygon pairs", "region_points": "Region + points"}


def info_text(msg: str) -> str:
    return f"ℹ️ {msg}"


def error_text(msg: str) -> str:
    return f"⚠️ **{msg[:1].upper() + msg[1:]}**"


@functools.cache
def _view_dir() -> str:
    """This process's folder for view files (removed at exit)."""
    folder = tempfile.mkdtemp(prefix="regiondrag-ui-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def png_file(image) -> str | None:
    """``image`` (HxWx3 uint8 array or PIL image) as a PNG file named by its content, for a gradio output.

    Returning an array makes gradio encode it and rewrite its cached copy in place on every return; an
    identical view returned again (the same render after a tab switch, an editor reset, an undo) then
    truncates the very file the browser may be fetching for the earlier one, and the page keeps a broken
    image. A path is instead copied into gradio's cache once, by rename. This file is written once too:
    atomically, and never again while it exists.
    """
    if image is None:
        return None
    from PIL import Image

    arr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    digest = hashlib.sha1(repr(arr.shape).encode() + arr.tobytes()).hexdigest()[:20]
    path = os.path.join(_view_dir(), f"{digest}.png")
    if not os.path.exists(path):
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format="png")
    return path


def view_png(state, mode: str) -> str | None:
    """The drawing for ``mode`` (image with regions, polygons or points) as a PNG path."""
    return png_file(us.render(state, mode)) if state.image is not None else None


def preview_and_status(state, mode: str, done: str | None = None) -> tuple:
    """(preview image path, status line) for ``mode``: the action's message, then what is missing."""
    image, why = us.preview(state, mode)
    pending = us.pending_note(state, mode)
    parts = [p for p in (done, pending, None if pending else why) if p]
    if not why and image is not None:
        parts.append("preview updated")
    return png_file(image), info_text("; ".join(parts)) if parts else ""
