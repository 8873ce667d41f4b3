"""Drag JSON files: the CLI's description of one drag (``--drag DRAG.json``).

Schema (version 1). One JSON object; ``type`` selects the drag and its required fields::

    {"type": "region_pairs",  "sources": ["src0.png", ...], "targets": ["trg0.png", ...]}
    {"type": "polygon_pairs", "sources": [[[x, y], [x, y], [x, y]], ...],
                              "targets": [[[x, y], [x, y], [x, y]], ...]}
    {"type": "region_points", "mask": "region.png", "handles": [[x, y], ...],
                              "targets": [[x, y], ...]}
    {"type": "point_pairs",   "sources": [[x, y], ...], "targets": [[x, y], ...]}

* ``region_pairs``: ``sources[i]`` (handle region) moves to ``targets[i]``; both are mask PNGs.
* ``polygon_pairs``: each polygon has 3 (affine) or 4 (perspective) vertices; numbers may be floats.
* ``region_points``: one region mask PNG plus clicked handle/target points.
* ``point_pairs``: dense integer point pairs, row ``k`` of sources pairs with row ``k`` of targets.

Points are ``[x, y]`` = (column, row) in image pixels. Mask paths are relative to the directory of
the JSON file (absolute paths work too). A mask PNG is converted to 8-bit grayscale (PIL mode "L";
RGB is mixed to luminance, an alpha channel is dropped) and every nonzero pixel is 1, others 0.

Optional top-level fields, defaults for ``edit`` that command-line options override:

* ``"version"``: must be 1 (absent means 1).
* ``"prompt"``: text prompt (string).
* ``"mask"``: editing-mask PNG (pixels allowed to change), loaded like the other masks. For
  ``region_points`` the ``mask`` field is the drag's region, so there the editing mask is given as
  ``"edit_mask"`` (accepted for every type; giving both ``mask`` and ``edit_mask`` as editing masks
  is an error).
* ``"params"``: object with any of ``method`` (string), ``steps`` (int), ``start_t``, ``end_t``,
  ``noise_scale`` (numbers), ``seed`` (int).

Any other field is an error. :func:`load_drag` returns ``(drag, extras)`` where ``extras`` holds
``prompt``, ``mask`` (HxW uint8 {0,1}) and ``params`` when present; :func:`save_drag` writes the JSON
plus its mask PNGs (``<stem>_source0.png``, ``<stem>_target0.png``, ``<stem>_region.png``,
``<stem>_mask.png``) next to it, so that ``load_drag(save_drag(drag, path))`` round-trips exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .drags import PointPairs, PolygonPairs, RegionPairs, RegionPoints

VERSION = 1
DRAG_FIELDS = {
    "region_pairs": ("sources", "targets"),
    "polygon_pairs": ("sources", "targets"),
    "region_points": ("mask", "handles", "targets"),
    "point_pairs": ("sources", "targets"),
}
OPTIONAL_FIELDS = ("version", "prompt", "params", "mask", "edit_mask")
PARAM_TYPES = {"method": str, "steps": int, "start_t": float, "end_t": float,
               "noise_scale": float, "seed": int}


def _error(path: Path, field: str, message: str) -> ValueError:
    """A ValueError naming the file and the field."""
    return ValueError(f"{path}: field {field!r}: {message}")


def _read_json(path: Path) -> dict:
    """Parse the JSON file, naming the file and line on a syntax error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ValueError(f"drag file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"could not read drag file {path}: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON in {path} at line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got "
                         f"{type(doc).__name__}")
    return doc


def _is_number(value: Any, integer: bool) -> bool:
    """True for a JSON number (ints only when ``integer``; bools are never numbers)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (not integer and isinstance(value, float))


def _points(value: Any, path: Path, field: str, integer: bool) -> list[tuple]:
    """A list of [x, y] pairs as a list of tuples."""
    kind = "integer" if integer else "number"
    if not isinstance(value, list):
        raise _error(path, field, f"expected a list of [x, y] {kind} pairs, got "
                                  f"{type(value).__name__}")
    for i, p in enumerate(value):
        if not (isinstance(p, list) and len(p) == 2 and all(_is_number(v, integer) for v in p)):
            raise _error(path, f"{field}[{i}]", f"expected an [x, y] pair of {kind}s, got {p!r}")
    return [tuple(p) for p in value]


def _list(value: Any, path: Path, field: str) -> list:
    """Check ``value`` is a JSON list."""
    if not isinstance(value, list):
        raise _error(path, field, f"expected a list, got {type(value).__name__}")
    return value


def _same_length(a: list, b: list, path: Path, fa: str, fb: str) -> None:
    """Paired lists must have equal lengths."""
    if len(a) != len(b):
        raise _error(path, fb, f"has {len(b)} entries but {fa!r} has {len(a)}")


def read_mask_png(file: str | Path, what: str = "mask") -> np.ndarray:
    """Load a mask PNG as HxW uint8 {0,1}: convert to mode "L", nonzero -> 1. ``ValueError`` naming
    ``what`` and the file when it is missing, a directory or not an image."""
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} " + ("is a directory" if path.is_dir() else "does not exist"))
    try:
        with Image.open(path) as img:
            return (np.asarray(img.convert("L")) != 0).astype(np.uint8)
    except OSError as exc:
        raise ValueError(f"could not read {what} {str(path)!r}: {exc}") from exc


def _mask(value: Any, path: Path, field: str) -> np.ndarray:
    """Resolve a mask path relative to the JSON file and load it."""
    if not isinstance(value, str) or not value:
        raise _error(path, field, f"expected a mask PNG path (string), got {value!r}")
    resolved = (path.parent / value).resolve()
    if not resolved.is_file():
        raise _error(path, field, f"mask file not found: {resolved}")
    try:
        return read_mask_png(resolved, "mask image")
    except ValueError as exc:
        raise _error(path, field, str(exc)) from exc


def _polygons(value: Any, path: Path, field: str) -> list[list[tuple]]:
    """A list of polygons, each 3 or 4 [x, y] vertices."""
    polygons = [_points(p, path, f"{field}[{i}]", integer=False)
                for i, p in enumerate(_list(value, path, field))]
    for i, poly in enumerate(polygons):
        if len(poly) not in (3, 4):
            raise _error(path, f"{field}[{i}]", f"a polygon needs 3 or 4 vertices, got {len(poly)}")
    return polygons


def _parse_drag(kind: str, doc: dict, path: Path) -> Any:
    """Build the drag object of type ``kind`` from the (field-checked) document."""
    if kind == "region_pairs":
        src = [_mask(v, path, f"sources[{i}]") for i, v in enumerate(_list(doc["sources"], path, "sources"))]
        trg = [_mask(v, path, f"targets[{i}]") for i, v in enumerate(_list(doc["targets"], path, "targets"))]
        _same_length(src, trg, path, "sources", "targets")
        return RegionPairs(sources=src, targets=trg)
    if kind == "polygon_pairs":
        src, trg = _polygons(doc["sources"], path, "sources"), _polygons(doc["targets"], path, "targets")
        _same_length(src, trg, path, "sources", "targets")
        return PolygonPairs(sources=src, targets=trg)
    if kind == "region_points":
        handles = _points(doc["handles"], path, "handles", integer=False)
        targets = _points(doc["targets"], path, "targets", integer=False)
        _same_length(handles, targets, path, "handles", "targets")
        return RegionPoints(mask=_mask(doc["mask"], path, "mask"), handles=handles, targets=targets)
    src = _points(doc["sources"], path, "sources", integer=True)
    trg = _points(doc["targets"], path, "targets", integer=True)
    _same_length(src, trg, path, "sources", "targets")
    return PointPairs(sources=np.array(src, np.int32).reshape(-1, 2),
                      targets=np.array(trg, np.int32).reshape(-1, 2))


def check_params(params: Any, where: str = "params") -> dict:
    """Validate an edit-parameter dict (names and types of ``PARAM_TYPES``); return a copy."""
    if not isinstance(params, dict):
        raise ValueError(f"{where}: expected an object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in PARAM_TYPES:
            raise ValueError(f"{where}: unknown parameter {key!r}; allowed: {sorted(PARAM_TYPES)}")
        want = PARAM_TYPES[key]
        ok = isinstance(value, str) if want is str else _is_number(value, integer=want is int)
        if not ok:
            raise ValueError(f"{where}: parameter {key!r} must be {want.__name__}, got {value!r}")
    return dict(params)


def _check_fields(doc: dict, path: Path) -> str:
    """Check version, type, required and unknown fields; return the drag type."""
    version = doc.get("version", VERSION)
    if version != VERSION or isinstance(version, bool):
        raise _error(path, "version", f"unsupported version {version!r}; this reader supports {VERSION}")
    if "type" not in doc:
        raise _error(path, "type", f"missing field; allowed types: {sorted(DRAG_FIELDS)}")
    kind = doc["type"]
    if kind not in DRAG_FIELDS:
        raise _error(path, "type", f"unknown drag type {kind!r}; allowed types: {sorted(DRAG_FIELDS)}")
    for name in DRAG_FIELDS[kind]:
        if name not in doc:
            raise _error(path, name, f"missing field required for type {kind!r} "
                                     f"(required: {list(DRAG_FIELDS[kind])})")
    allowed = {"type", *OPTIONAL_FIELDS, *DRAG_FIELDS[kind]}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise _error(path, unknown[0], f"unknown field for type {kind!r}; allowed: {sorted(allowed)}")
    return kind


def _edit_mask_field(doc: dict, kind: str, path: Path) -> str | None:
    """Name of the field holding the editing mask: "edit_mask", or "mask" except for region_points."""
    names = [n for n in ("mask", "edit_mask") if n in doc and (n, kind) != ("mask", "region_points")]
    if len(names) > 1:
        raise _error(path, "edit_mask", "give the editing mask as 'mask' or 'edit_mask', not both")
    return names[0] if names else None


def load_drag(path: str | Path) -> tuple[Any, dict]:
    """Read a drag JSON file; return ``(drag, extras)`` with extras prompt / mask / params if given.

    For ``region_points`` the ``mask`` field is the drag's region, not an editing mask.
    """
    path = Path(path)
    doc = _read_json(path)
    kind = _check_fields(doc, path)
    try:
        drag = _parse_drag(kind, doc, path)
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: invalid {kind!r} drag: {exc}") from exc
    extras: dict = {}
    if "prompt" in doc:
        if not isinstance(doc["prompt"], str):
            raise _error(path, "prompt", f"expected a string, got {doc['prompt']!r}")
        extras["prompt"] = doc["prompt"]
    edit_mask = _edit_mask_field(doc, kind, path)
    if edit_mask:
        extras["mask"] = _mask(doc[edit_mask], path, edit_mask)
    if "params" in doc:
        extras["params"] = check_params(doc["params"], f"{path}: field 'params'")
    return drag, extras


def _json_points(points: Any) -> list[list]:
    """Points as JSON lists; integral values are written as ints, others as floats."""
    def num(v):
        v = v.item() if isinstance(v, np.generic) else v
        return int(v) if isinstance(v, int) or float(v).is_integer() else float(v)
    return [[num(x), num(y)] for x, y in np.asarray(points).reshape(-1, 2).tolist()]


def _write_mask(mask: Any, file: Path) -> str:
    """Write a mask as an 8-bit PNG (0 / 255); return its name relative to the JSON file."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask for {file.name}: expected an HxW array, got shape {arr.shape}")
    Image.fromarray(((arr != 0) * 255).astype(np.uint8), mode="L").save(file)
    return file.name


def _drag_doc(drag: Any, path: Path) -> dict:
    """The type-specific fields of ``drag``, writing its mask PNGs next to ``path``."""
    stem, out = path.stem, path.parent
    if isinstance(drag, RegionPairs):
        return {"type": "region_pairs",
                "sources": [_write_mask(m, out / f"{stem}_source{i}.png") for i, m in enumerate(drag.sources)],
                "targets": [_write_mask(m, out / f"{stem}_target{i}.png") for i, m in enumerate(drag.targets)]}
    if isinstance(drag, PolygonPairs):
        return {"type": "polygon_pairs", "sources": [_json_points(p) for p in drag.sources],
                "targets": [_json_points(p) for p in drag.targets]}
    if isinstance(drag, RegionPoints):
        return {"type": "region_points", "mask": _write_mask(drag.mask, out / f"{stem}_region.png"),
                "handles": _json_points(drag.handles), "targets": _json_points(drag.targets)}
    if isinstance(drag, PointPairs):
        return {"type": "point_pairs", "sources": _json_points(drag.sources),
                "targets": _json_points(drag.targets)}
    raise ValueError(f"cannot save a {type(drag).__name__}; expected RegionPairs, PolygonPairs, "
                     "RegionPoints or PointPairs")


def save_drag(drag: Any, path: str | Path, prompt: str | None = None, mask: Any = None,
              params: dict | None = None) -> Path:
    """Write ``drag`` (and optional prompt / editing mask / params) as a drag JSON file.

    Mask PNGs are written next to the JSON as ``<stem>_source<i>.png``, ``<stem>_target<i>.png``,
    ``<stem>_region.png`` and ``<stem>_mask.png``. Returns the JSON path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": VERSION, **_drag_doc(drag, path)}
    if prompt is not None:
        doc["prompt"] = str(prompt)
    if mask is not None:
        field = "edit_mask" if doc["type"] == "region_points" else "mask"
        doc[field] = _write_mask(mask, path.parent / f"{path.stem}_mask.png")
    if params is not None:
        doc["params"] = check_params(params)
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in doc.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    return path
