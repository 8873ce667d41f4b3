"""DragBench / DragBench-SR / DragBench-DR readers with safe unpickling.

A case directory holds::

    original_image.png      the input image (any PIL mode; converted to RGB)
    meta_data.pkl           {'prompt': str, 'points': [[x, y], ...], 'mask': HxW array}
                            points alternate handle, target, handle, target, ...
    meta_data_region.pkl    (DragBench-SR / -DR only) the dense region point pairs used by the
                            paper's evaluation (``run_eval.py``)

The region file of the released benchmark has the same layout as ``meta_data.pkl`` (dense points
alternating source, target). The reader also accepts ``source``/``target`` (or ``src``/``trg``,
``source_pts``/``target_pts``) arrays, or ``points`` given as a ``[source_array, target_array]``
pair. Its optional ``prompt`` and ``mask`` override those of ``meta_data.pkl``, as the paper's
evaluation reads both from the region file.

The pickles are read with :class:`SafeUnpickler`, which only builds plain containers, strings,
numbers and numpy arrays: a pickle naming any other callable is refused before anything runs.
"""
from __future__ import annotations

import _compat_pickle
import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .drags import PointPairs, RegionPoints
from .inputs import as_binary_mask, load_image

IMAGE_FILE = "original_image.png"
META_FILE = "meta_data.pkl"
REGION_FILE = "meta_data_region.pkl"
LAYOUT = (f"a DragBench case directory holds {IMAGE_FILE} and {META_FILE} "
          f"(plus {REGION_FILE} for DragBench-SR/-DR)")

# (module, name) -> (module to resolve from, attribute); numpy 2 moved numpy.core to numpy._core.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
}
_BUILTIN_GLOBALS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
}
_PLAIN_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None))


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to latin-1: how pickle protocols 0-2 spell ``bytes``."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_attr(where: str, name: str) -> Any:
    """Resolve a numpy internal without touching the deprecated ``numpy.core`` alias."""
    if where == "numpy":
        return getattr(np, name)
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + where), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {where}.{name}")


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that admits only plain containers, strings, numbers and numpy arrays."""

    def __init__(self, file, source: str = "<pickle>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocols 0-2), as pickle's own find_class maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _BUILTIN_GLOBALS:
            return _BUILTIN_GLOBALS[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_attr(*_NUMPY_GLOBALS[(module, name)])
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name} from {self.source}: only plain containers, "
            "strings, numbers and numpy arrays are allowed")


def _check_plain(obj: Any, source: str) -> None:
    """Walk ``obj`` and refuse anything but plain containers, scalars and non-object arrays."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, (np.ndarray, np.generic, np.dtype)):
            dtype = item if isinstance(item, np.dtype) else item.dtype
            if dtype.hasobject:
                raise ValueError(f"refusing {source}: it holds a numpy array of dtype object; "
                                 "only numeric arrays are allowed")
        elif not isinstance(item, _PLAIN_TYPES):
            raise ValueError(f"refusing {source}: it holds a {type(item).__name__}; only plain "
                             "containers, strings, numbers and numpy arrays are allowed")


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle file that may only contain plain data and numpy arrays.

    Raises ``ValueError`` when the pickle names any other class or function (nothing is executed),
    when it holds an object array, or when the file is not a readable pickle.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            obj = SafeUnpickler(fh, source=str(path)).load()
        except pickle.UnpicklingError as exc:
            if str(exc).startswith("refusing"):
                raise ValueError(str(exc)) from exc
            raise ValueError(f"could not unpickle {path}: {exc}") from exc
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise ValueError(f"could not unpickle {path}: {type(exc).__name__}: {exc}") from exc
    _check_plain(obj, str(path))
    return obj


@dataclass
class DragCase:
    """One benchmark case: the inputs of an edit plus the point annotations used for scoring."""

    image: np.ndarray      # HxWx3 uint8 RGB
    prompt: str
    mask: np.ndarray       # HxW uint8 in {0, 1}: the editing mask
    drag: Any              # PointPairs (-SR/-DR) or RegionPoints (DragBench)
    handles: np.ndarray    # Nx2 int32 (x, y), from meta_data.pkl
    targets: np.ndarray    # Nx2 int32 (x, y), from meta_data.pkl
    path: Path
    name: str


def _as_points(value: Any, what: str) -> np.ndarray:
    """Convert a point list to an Nx2 int32 (x, y) array; floats are rounded."""
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise ValueError(f"{what}: expected an Nx2 list of (x, y) points ({exc})") from exc
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype.kind not in "iuf":
        raise ValueError(f"{what}: expected an Nx2 list of (x, y) points, got shape "
                         f"{arr.shape} dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: points must be finite")
        arr = np.rint(arr)
    return arr.astype(np.int32)


def _split_alternating(points: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``[h1, t1, h2, t2, ...]`` into (handles, targets)."""
    arr = _as_points(points, what)
    if len(arr) % 2:
        raise ValueError(f"{what}: expected an even number of points (handle, target, ...), "
                         f"got {len(arr)}")
    return arr[0::2].copy(), arr[1::2].copy()


def _read_meta(path: Path) -> dict:
    """Load a metadata pickle and check it is a dict."""
    meta = safe_load_pickle(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a dict, got {type(meta).__name__}")
    return meta


_REGION_KEY_PAIRS = (("source", "target"), ("src", "trg"), ("source_pts", "target_pts"),
                     ("sources", "targets"))


def _is_array_pair(points: Any) -> bool:
    """True for ``[source_array, target_array]`` (two Nx2 arrays), False for alternating points."""
    if isinstance(points, np.ndarray):
        return points.ndim == 3 and points.shape[0] == 2
    try:
        return (isinstance(points, (list, tuple)) and len(points) == 2
                and all(np.ndim(p) == 2 for p in points))
    except ValueError:  # ragged nesting: not a pair of arrays
        return False


def _region_pairs(meta: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Extract the dense (source, target) pairs from a meta_data_region.pkl dict."""
    for src_key, trg_key in _REGION_KEY_PAIRS:
        if src_key in meta and trg_key in meta:
            src = _as_points(meta[src_key], f"{path}: {src_key!r}")
            trg = _as_points(meta[trg_key], f"{path}: {trg_key!r}")
            break
    else:
        if "points" not in meta:
            raise ValueError(f"{path}: no point pairs found; expected keys 'points' or "
                             f"'source'/'target' (or 'src'/'trg', 'source_pts'/'target_pts'), "
                             f"found {sorted(map(str, meta))}")
        points = meta["points"]
        if _is_array_pair(points):  # [source_array, target_array]
            src = _as_points(points[0], f"{path}: 'points'[0]")
            trg = _as_points(points[1], f"{path}: 'points'[1]")
        else:  # the released layout: dense points alternating source, target
            src, trg = _split_alternating(points, f"{path}: 'points'")
    if len(src) != len(trg):
        raise ValueError(f"{path}: {len(src)} source points but {len(trg)} target points")
    return src, trg


def _require(path: Path) -> Path:
    """Raise FileNotFoundError naming ``path`` and the expected layout if it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}: {LAYOUT}")
    return path


def load_case(path: str | Path) -> DragCase:
    """Read one DragBench / DragBench-SR / DragBench-DR case directory.

    ``.drag`` is ``PointPairs`` from ``meta_data_region.pkl`` when that file exists (as the paper's
    evaluation does), otherwise ``RegionPoints`` built from the editing mask and the clicked points.
    ``.handles``/``.targets`` always come from ``meta_data.pkl``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such case directory: {path} ({LAYOUT})")
    image = load_image(_require(path / IMAGE_FILE))
    meta_path = _require(path / META_FILE)
    meta = _read_meta(meta_path)
    missing = [k for k in ("prompt", "points", "mask") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing key(s) {missing}; expected 'prompt', 'points', "
                         f"'mask', found {sorted(map(str, meta))}")
    if not isinstance(meta["prompt"], str):
        raise ValueError(f"{meta_path}: 'prompt' must be a string")
    shape = image.shape[:2]
    prompt = meta["prompt"]
    mask = as_binary_mask(meta["mask"], shape, f"{meta_path}: 'mask'")
    handles, targets = _split_alternating(meta["points"], f"{meta_path}: 'points'")

    region_path = path / REGION_FILE
    if region_path.is_file():
        region = _read_meta(region_path)
        src, trg = _region_pairs(region, region_path)
        if isinstance(region.get("prompt"), str):
            prompt = region["prompt"]
        if region.get("mask") is not None:
            mask = as_binary_mask(region["mask"], shape, f"{region_path}: 'mask'")
        drag = PointPairs(src, trg)
    else:
        drag = RegionPoints(mask, [tuple(map(int, p)) for p in handles],
                            [tuple(map(int, p)) for p in targets])
    return DragCase(image=image, prompt=prompt, mask=mask, drag=drag, handles=handles,
                    targets=targets, path=path, name=path.name)


def iter_cases(root: str | Path) -> Iterator[Path]:
    """Every case directory (one holding original_image.png) under ``root``, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such DragBench root directory: {root}")
    return iter(sorted(p.parent for p in root.rglob(IMAGE_FILE) if p.is_file()))
