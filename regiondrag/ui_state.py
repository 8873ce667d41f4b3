"""The web UI's state and drawing, as pure functions (no gradio; ``regiondrag.engine.ui`` is the page).

One immutable :class:`DragState` holds the fitted image and the inputs of all three modes, so that
switching tabs loses nothing; every edit returns a new state or raises ``ValueError`` with a message
for the page (the state is then unchanged):

* ``region_pairs``  -- masks added in turn: handle (red), target (blue), handle, ... (§14.1)
* ``polygon_pairs`` -- clicked vertices: 3 or 4 for the handle polygon, as many for its target (§14.2)
* ``region_points`` -- one drawn region plus clicked handle/target points (§14.3)

:func:`render` draws a mode's inputs over the image, :func:`build_drag` turns the complete pairs into a
drag object, :func:`preview` is its pixel copy-paste preview and :func:`save_edit` writes an edit so that
``python -m regiondrag.engine edit --image original.png --drag drag.json`` replays it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .dragfile import check_params, save_drag
from .drags import PolygonPairs, RegionPairs, RegionPoints, check_polygon
from .inputs import as_binary_mask
from .pipeline import check_edit_params

MODES = ("region_pairs", "polygon_pairs", "region_points")
LONG_SIDE = 512  # the paper's UI fits the image's long side to 512 (SD-1.5)
HANDLE, TARGET = (255, 0, 0), (0, 0, 255)
HANDLE_LIGHT, TARGET_LIGHT = (255, 102, 102), (102, 102, 255)
ALPHA = 0.3  # tint strength of drawn regions, as the paper's UI
# The paper's UI defaults (ALGORITHM.md §15); its editing mask is all ones (mask=None).
UI_DEFAULTS = dict(prompt="A photo of an object.", method="encode_then_cp", steps=20, start_t=0.5, end_t=0.2,
                   noise_scale=0.6, seed=42)


# ------------------------------------------------------------------------------------------- image
def fit_size(height: int, width: int, long_side: int = LONG_SIDE) -> tuple[int, int]:
    """(h, w) with the long side ``long_side`` and both sides rounded DOWN to multiples of 8 (at least 8)."""
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    aspect = width / height
    h, w = (int(long_side / aspect), long_side) if aspect >= 1 else (long_side, int(long_side * aspect))
    return max(8, h // 8 * 8), max(8, w // 8 * 8)


def fit_image(image, long_side: int = LONG_SIDE) -> np.ndarray:
    """PIL image or array (HxW, HxWx3, HxWx4) -> HxWx3 uint8 resized as :func:`fit_size` (bilinear)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    h, w = fit_size(*arr.shape[:2], long_side)
    return cv2.resize(np.ascontiguousarray(arr[..., :3]), (w, h))


def editor_mask(value, shape: tuple[int, int]) -> np.ndarray:
    """The strokes of an image-editor value (``{"background", "layers", "composite"}``) as HxW {0,1}.

    A pixel is in the mask when any layer has alpha > 0 there; masks of another size are resized
    (nearest) to ``shape``.
    """
    mask = np.zeros(shape, np.uint8)
    layers = value.get("layers") if isinstance(value, dict) else None
    for layer in layers or []:
        if layer is None:
            continue
        arr = np.asarray(layer)
        if arr.ndim == 3 and arr.shape[2] == 4:
            drawn = arr[..., 3] > 0
        elif arr.ndim in (2, 3):
            drawn = (arr != 0) if arr.ndim == 2 else (arr != 0).any(axis=2)
        else:
            continue
        drawn = drawn.astype(np.uint8)
        if drawn.shape != tuple(shape):
            drawn = cv2.resize(drawn, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        mask |= drawn
    return mask


def editor_shows(value, image) -> bool:
    """Whether an image-editor value was read over ``image`` (its background is that picture).

    After Add/Undo/Clear the page gives the editor a new background; until the browser has loaded it,
    the editor still reports (and uploads) values over the previous one. Such a value is stale: its
    strokes belong to the region already added, and a stroke made then is wiped by the load.
    """
    bg = value.get("background") if isinstance(value, dict) else None
    if bg is None or image is None:
        return False
    bg = np.asarray(bg)
    if bg.ndim != 3 or bg.shape[:2] != image.shape[:2] or bg.shape[2] < 3:
        return False
    # PNG both ways: the same picture comes back exactly; allow a little rounding on a few pixels only,
    # since a new region's tint may cover a small part of the image.
    differ = (np.abs(bg[..., :3].astype(np.int16) - image[..., :3]) > 2).any(axis=2)
    return int(differ.sum()) <= max(2, differ.size // 10_000)


# ------------------------------------------------------------------------------------------- state
@dataclass(frozen=True, eq=False)
class DragState:
    """Everything the user has given. ``polygons``: tuple of ``(n, vertices)``, handle then target vertices."""

    image: np.ndarray | None = None
    masks: tuple = ()
    polygons: tuple = ()
    shape: int = 4
    region: np.ndarray | None = None
    points: tuple = ()
    meta: dict = field(default_factory=dict)  # e.g. the uploaded size, for messages


def new_state(image, shape: int = 4) -> DragState:
    """A fresh state for an uploaded image (fitted to the canvas), keeping the polygon shape choice."""
    uploaded = image.size[::-1] if isinstance(image, Image.Image) else np.shape(image)[:2]
    return DragState(image=fit_image(image), shape=shape, meta={"uploaded": tuple(uploaded)})


def need_image(state: DragState) -> np.ndarray:
    if state.image is None:
        raise ValueError("upload an image first")
    return state.image


def _point(state: DragState, point) -> tuple[int, int]:
    h, w = need_image(state).shape[:2]
    x, y = (int(round(float(v))) for v in point)
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"point ({x}, {y}) is outside the {w}x{h} image")
    return x, y


def role_of(index: int) -> str:
    """Role of the ``index``-th region/point of a pair list: even = handle, odd = target."""
    return "handle" if index % 2 == 0 else "target"


# region pairs
def add_region(state: DragState, mask) -> DragState:
    """Append a drawn mask as the next handle (even) or target (odd) region."""
    mask = as_binary_mask(mask, need_image(state).shape[:2], "the drawn region")
    if not mask.any():
        raise ValueError(f"nothing drawn: paint the {role_of(len(state.masks))} region with the brush, "
                         "then click Add region")
    return replace(state, masks=state.masks + (mask,))


def undo_region(state: DragState) -> DragState:
    return replace(state, masks=state.masks[:-1])


def clear_regions(state: DragState) -> DragState:
    return replace(state, masks=())


# polygon pairs
def _check_pair(n: int, vertices: tuple, k: int) -> None:
    """Validate the polygon just completed by the last click of pair ``k`` (the drag classes' checks)."""
    what = f"{'handle' if len(vertices) == n else 'target'} polygon {k + 1}"
    try:
        if len(vertices) == n:
            check_polygon(np.asarray(vertices), "it")
        elif len(vertices) == 2 * n:
            check_polygon(np.asarray(vertices[n:]), "it")
            PolygonPairs([vertices[:n]], [vertices[n:]])  # the pair: the same convexity
    except ValueError as exc:
        raise ValueError(f"{what} refused: {str(exc).replace('polygon pair 0: ', '')}") from None


def _complete(pair) -> bool:
    return len(pair[1]) == 2 * pair[0]


def add_vertex(state: DragState, point) -> DragState:
    """Add a clicked vertex: a new pair starts with ``state.shape`` handle vertices, then as many targets."""
    pt = _point(state, point)
    polys = list(state.polygons)
    if not polys or _complete(polys[-1]):
        polys.append((state.shape, ()))
    n, verts = polys[-1]
    verts = verts + (pt,)
    _check_pair(n, verts, len(polys) - 1)
    polys[-1] = (n, verts)
    return replace(state, polygons=tuple(polys))


def undo_vertex(state: DragState) -> DragState:
    if not state.polygons:
        return state
    n, verts = state.polygons[-1]
    last = ((n, verts[:-1]),) if len(verts) > 1 else ()
    return replace(state, polygons=state.polygons[:-1] + last)


def clear_polygons(state: DragState) -> DragState:
    return replace(state, polygons=())


def set_shape(state: DragState, n: int) -> DragState:
    """Triangles (3) or quadrilaterals (4) for new pairs, and for a pair whose handle is unfinished."""
    if n not in (3, 4):
        raise ValueError(f"polygons have 3 (triangle) or 4 (quadrilateral) vertices, got {n}")
    polys = list(state.polygons)
    if polys and len(polys[-1][1]) < polys[-1][0]:  # handle polygon still being clicked
        verts = polys[-1][1][:n]
        if len(verts) == n:
            try:
                _check_pair(n, verts, len(polys) - 1)
            except ValueError:
                verts = verts[:-1]
        polys[-1] = (n, verts)
    return replace(state, shape=n, polygons=tuple(polys))


# region + points
def set_region(state: DragState, mask) -> DragState:
    """The region to move (HxW, nonzero = inside); an empty mask clears it."""
    mask = as_binary_mask(mask, need_image(state).shape[:2], "the drawn region")
    return replace(state, region=mask if mask.any() else None)


def add_point(state: DragState, point) -> DragState:
    """Add a clicked point: handle, target, handle, ..."""
    return replace(state, points=state.points + (_point(state, point),))


def undo_point(state: DragState) -> DragState:
    return replace(state, points=state.points[:-1])


def clear_points(state: DragState) -> DragState:
    return replace(state, points=(), region=None)


# ------------------------------------------------------------------------------------------- drags
def build_drag(state: DragState, mode: str):
    """The drag object of ``mode`` from its complete pairs (an unpaired last handle is left out)."""
    image = need_image(state)
    if mode == "region_pairs":
        k = len(state.masks) // 2
        if k == 0:
            raise ValueError("nothing to drag yet: draw a handle region (red) and click Add region, then "
                             "draw its target region (blue) and click Add region" if not state.masks else
                             "the handle region has no target yet: draw the target region (blue) and click "
                             "Add region")
        drag = RegionPairs(sources=state.masks[0:2 * k:2], targets=state.masks[1:2 * k:2])
    elif mode == "polygon_pairs":
        done = [(n, v) for n, v in state.polygons if len(v) == 2 * n]
        if not done:
            raise ValueError("nothing to drag yet: click 3 or 4 handle vertices (red), then as many target "
                             "vertices (blue) in the same order")
        drag = PolygonPairs(sources=[v[:n] for n, v in done], targets=[v[n:] for n, v in done])
    elif mode == "region_points":
        if state.region is None:
            raise ValueError("nothing to drag yet: draw the region to move, then click a handle point inside "
                             "it and a target point")
        k = len(state.points) // 2
        if k == 0:
            raise ValueError("click a handle point inside the region, then its target point")
        drag = RegionPoints(mask=state.region, handles=state.points[0:2 * k:2], targets=state.points[1:2 * k:2])
    else:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    drag.validate(*image.shape[:2])
    return drag


def pending_note(state: DragState, mode: str) -> str | None:
    """What the last, unpaired input still needs (it is not part of the drag until then), or None."""
    if mode == "region_pairs" and len(state.masks) % 2:
        return (f"handle region {len(state.masks) // 2 + 1} has no target yet: draw its target region (blue) "
                "and click Add region")
    if mode == "polygon_pairs" and state.polygons and not _complete(state.polygons[-1]):
        n, v = state.polygons[-1]
        left = (n - len(v)) if len(v) < n else (2 * n - len(v))
        role = "handle" if len(v) < n else "target"
        return f"polygon pair {len(state.polygons)}: {left} more {role} vert{'ex' if left == 1 else 'ices'} to click"
    if mode == "region_points" and state.region is not None and len(state.points) % 2:
        return f"handle point {len(state.points) // 2 + 1} has no target yet: click its target point"
    return None


def preview(state: DragState, mode: str) -> tuple[np.ndarray | None, str | None]:
    """(pixel copy-paste preview, None), or (the image, why there is no preview yet)."""
    if state.image is None:
        return None, "upload an image first"
    try:
        return build_drag(state, mode).preview(state.image), None
    except ValueError as exc:
        return state.image, str(exc)


# ------------------------------------------------------------------------------------------- drawing
def tint(image: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
    """``image`` with ``mask`` blended towards ``color`` (:data:`ALPHA`) and its outline drawn in ``color``."""
    out = image.copy()
    inside = np.asarray(mask) != 0
    out[inside] = ((1 - ALPHA) * image[inside] + ALPHA * np.asarray(color, np.float64)).astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), 2)
    return out


def _marker(image: np.ndarray, point, text: str, color) -> None:
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (tw, th), _ = cv2.getTextSize(text, font, fs, 1)
    cv2.circle(image, point, 9, color, -1, cv2.LINE_AA)
    cv2.circle(image, point, 9, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(image, text, (point[0] - tw // 2, point[1] + th // 2), font, fs, (255, 255, 255), 1, cv2.LINE_AA)


def _polygon_mask(shape, vertices) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.asarray(vertices, np.int32).reshape(-1, 1, 2)], 1)
    return mask


def render(state: DragState, mode: str) -> np.ndarray | None:
    """The inputs of ``mode`` drawn over the image: red handles, blue targets (None without an image)."""
    if state.image is None:
        return None
    out = state.image.copy()
    if mode == "region_pairs":
        for i, mask in enumerate(state.masks):
            out = tint(out, mask, HANDLE if i % 2 == 0 else TARGET)
    elif mode == "polygon_pairs":
        number = 1
        for n, verts in state.polygons:
            for part, color in ((verts[:n], HANDLE), (verts[n:], TARGET)):
                if len(part) == n:
                    out = tint(out, _polygon_mask(out.shape[:2], part), color)
                elif len(part) > 1:
                    cv2.polylines(out, [np.asarray(part, np.int32).reshape(-1, 1, 2)], False, color, 2, cv2.LINE_AA)
            for i, v in enumerate(verts):
                _marker(out, v, str(number + i % n), HANDLE_LIGHT if i < n else TARGET_LIGHT)
            number += n
    elif mode == "region_points":
        if state.region is not None:
            out = tint(out, state.region, HANDLE)
        pts = state.points
        for i, p in enumerate(pts):
            if i % 2 and cv2.norm(np.subtract(p, pts[i - 1]).astype(np.float64)) > 0:
                cv2.arrowedLine(out, pts[i - 1], p, (255, 255, 255), 2, cv2.LINE_AA, tipLength=0.25)
        for i, p in enumerate(pts):
            cv2.circle(out, p, 6, HANDLE if i % 2 == 0 else TARGET, -1, cv2.LINE_AA)
            cv2.circle(out, p, 6, (255, 255, 255), 1, cv2.LINE_AA)
    else:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    return out


# ------------------------------------------------------------------------------------------- run/save
def edit_params(method: str, steps, start_t, end_t, noise_scale, seed) -> dict:
    """The page's parameter values as ``edit`` keyword arguments (checked like a drag file's params)."""
    try:
        params = dict(method=str(method), steps=int(steps), start_t=float(start_t), end_t=float(end_t),
                      noise_scale=float(noise_scale), seed=int(seed))
    except (TypeError, ValueError):
        raise ValueError("steps, start_t, end_t, noise scale and seed must all be numbers") from None
    check_edit_params(**{k: v for k, v in params.items() if k != "seed"})  # what edit would refuse
    return check_params(params)


def format_timings(timings: dict) -> str:
    """``"Edit took 14.2 s (inversion 6.1 s, sampling 7.0 s, ...)"`` from stage -> milliseconds."""
    stages = ", ".join(f"{k} {v / 1000:.1f} s" for k, v in timings.items() if k != "total" and v >= 50)
    return f"Edit took {timings['total'] / 1000:.1f} s" + (f" ({stages})" if stages else "")


def unique_folder(base: str | Path) -> Path:
    """``base/edit-YYYYmmdd-HHMMSS`` (with ``-2``, ``-3``, ... if taken); not created."""
    base = Path(base).expanduser()
    stem = base / time.strftime("edit-%Y%m%d-%H%M%S")
    folder, k = stem, 2
    while folder.exists():
        folder, k = Path(f"{stem}-{k}"), k + 1
    return folder


def save_edit(folder: str | Path, original, visual, preview_image, result, drag, prompt: str,
              params: dict) -> dict:
    """Write original / input / preview / result PNGs and ``drag.json`` (+ mask PNGs) into ``folder``.

    ``result`` may be None (nothing run yet). Returns ``{name: path}`` of what was written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, img in (("original", original), ("input", visual), ("preview", preview_image), ("result", result)):
        if img is not None:
            path = folder / f"{name}.png"
            (img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))).save(path)
            written[name] = path
    written["drag"] = save_drag(drag, folder / "drag.json", prompt=prompt, params=params)
    return written


def replay_command(folder: str | Path, model: str) -> str:
    """The CLI command that replays a saved edit."""
    folder = Path(folder)
    return (f"python -m regiondrag.engine edit --image {folder / 'original.png'} --drag {folder / 'drag.json'} "
            f"--out {folder / 'replay.png'} --model {model}")
