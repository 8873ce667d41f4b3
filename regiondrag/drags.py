"""User drag input -> dense point pairs and the pixel copy-paste preview (ALGORITHM.md §14).

Four input types, each with ``to_points(scale)`` (int32 ``N x 2`` (x, y) source/target arrays on the
grid of the image resized by ``scale``: 1 = pixels, 1/8 = latent cells), ``preview(image)`` and
``validate(height, width)``:

* :class:`RegionPairs`  -- pairs of handle/target region masks (§14.1).
* :class:`PolygonPairs` -- pairs of triangles or quadrilaterals (§14.2).
* :class:`RegionPoints` -- one region mask plus clicked handle/target points (§14.3).
* :class:`PointPairs`   -- dense point pairs, what the reference ``drag()`` takes (§1).

:func:`border_points` is §3 ``border(P)``, used by 'CP then Encode'.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .drag_maps import contour_pairs, filled_pixels, polygon_pair_points, region_pair_points, resize_mask

__all__ = ["RegionPairs", "PolygonPairs", "RegionPoints", "PointPairs", "border_points"]


# ----------------------------------------------------------------------------------------------
# input normalisation and checks
# ----------------------------------------------------------------------------------------------

def _as_mask(mask, what: str) -> np.ndarray:
    """A mask (ndarray of any integer/bool dtype, PIL image, HxWx3/4) -> read-only HxW uint8 in {0,1}."""
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = (arr[..., :3] != 0).any(axis=-1)  # nonzero on any colour channel
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D HxW mask (or an HxWx3 image), got shape {arr.shape}")
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{what} must be numeric or boolean, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf; allowed values are 0 and 1")
    out = (arr != 0).astype(np.uint8)
    if not out.any():
        raise ValueError(f"{what} is empty (all zero); it must contain at least one nonzero pixel")
    out.setflags(write=False)
    return out


def _as_points(points, what: str, integral: bool = True) -> np.ndarray:
    """(x, y) points -> read-only N x 2 float64 (finite; integral values if ``integral``)."""
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be an N x 2 array of (x, y) numbers") from exc
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty N x 2 array of (x, y) points, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf; only finite (x, y) coordinates are allowed")
    if integral and not (arr == np.round(arr)).all():
        raise ValueError(f"{what} must hold integer pixel coordinates")
    arr.setflags(write=False)
    return arr


def _check_pair_lists(sources, targets, kind: str) -> tuple[list, list]:
    sources, targets = list(sources), list(targets)
    if not sources or not targets:
        raise ValueError(f"{kind} needs at least one source/target pair, got an empty list")
    if len(sources) != len(targets):
        raise ValueError(f"{kind} needs as many sources as targets, got {len(sources)} sources "
                         f"and {len(targets)} targets")
    return sources, targets


def _store_pairs(drag, kind: str, convert, what: str) -> tuple[tuple, tuple]:
    """Check ``drag``'s paired ``sources``/``targets`` lists, convert each item with ``convert(item,
    name)`` (names like "source region 0") and store the converted tuples on the frozen ``drag``."""
    sources, targets = _check_pair_lists(drag.sources, drag.targets, kind)
    srcs = tuple(convert(x, f"source {what} {i}") for i, x in enumerate(sources))
    trgs = tuple(convert(x, f"target {what} {i}") for i, x in enumerate(targets))
    object.__setattr__(drag, "sources", srcs)
    object.__setattr__(drag, "targets", trgs)
    return srcs, trgs


def _concat_pairs(pairs: list, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The (source, target) arrays of several pairs, in order, as int32; refused when empty."""
    return _check_nonempty(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]), scale)


def _check_scale(scale) -> float:
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number (1 = pixels, 1/8 = latent), got {scale}")
    return scale


def _check_in_image(points: np.ndarray, height: int, width: int, what: str) -> None:
    x, y = points[:, 0], points[:, 1]
    bad = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    if bad.any():
        p = points[np.argmax(bad)]
        raise ValueError(f"{what} has point ({p[0]:g}, {p[1]:g}) outside the image; "
                         f"allowed x in [0, {width}), y in [0, {height})")


def _check_mask_size(masks, height: int, width: int, what: str) -> None:
    if masks[0].shape != (height, width):
        raise ValueError(f"{what} masks are {masks[0].shape[0]}x{masks[0].shape[1]} (HxW) "
                         f"but the image is {height}x{width}; they must match")


def _check_nonempty(src: np.ndarray, trg: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    if len(trg) == 0:
        raise ValueError(f"the drag yields no point pairs at this scale ({scale:g}): no handle lies inside "
                         "a region, or the regions vanish when resized; enlarge them or move the handles")
    return src.astype(np.int32), trg.astype(np.int32)


def as_rgb(image) -> np.ndarray:
    """PIL image (converted to RGB) or HxWx3 uint8 array -> HxWx3 uint8 array (an array is not copied)."""
    if hasattr(image, "convert"):  # PIL image
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be an HxWx3 uint8 RGB array or a PIL image, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    return arr


def _copy_paste(image, drag) -> np.ndarray:
    """§14.1 step 6: ``out[trg] = image[src]`` with scale-1 points, all reads before all writes."""
    img = as_rgb(image)
    drag.validate(img.shape[0], img.shape[1])
    src, trg = drag.to_points(1.0)
    _check_in_image(src, *img.shape[:2], "the mapped source")  # e.g. a polygon map that overshoots
    out = img.copy()
    out[trg[:, 1], trg[:, 0]] = img[src[:, 1], src[:, 0]]
    return out


def border_points(points) -> np.ndarray:
    """§3 ``border(P)``: outline vertices of the points ``P`` (N x 2 (x, y), non-negative integers).

    Ones at ``P`` in a ``(max_y+1) x (max_x+1)`` uint8 image, ``cv2.findContours(RETR_EXTERNAL,
    CHAIN_APPROX_SIMPLE)``; the contour points concatenated in OpenCV's order (int32 N x 2).
    """
    pts = _as_points(points, "border_points input").astype(np.int64)
    if (pts < 0).any():
        raise ValueError("border_points needs non-negative (x, y) coordinates")
    canvas = np.zeros((pts[:, 1].max() + 1, pts[:, 0].max() + 1), np.uint8)
    canvas[pts[:, 1], pts[:, 0]] = 1
    contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.int32)


class _Drag:
    """What every drag type shares: the pixel copy-paste preview (§14.1 step 6) of its scale-1 pairs."""

    def preview(self, image) -> np.ndarray:
        """``image`` with each scale-1 target pixel set to its source pixel (all reads before writes)."""
        return _copy_paste(image, self)


# ----------------------------------------------------------------------------------------------
# §14.1 region pairs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class RegionPairs(_Drag):
    """Pairs of HxW {0,1} handle (``sources``) and target (``targets``) region masks (§14.1)."""

    sources: tuple
    targets: tuple

    def __post_init__(self):
        srcs, trgs = _store_pairs(self, "RegionPairs", _as_mask, "region")
        shapes = {m.shape for m in srcs + trgs}
        if len(shapes) > 1:
            raise ValueError(f"all region masks must have the same size, got sizes {sorted(shapes)}")

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the masks."""
        return self.sources[0].shape

    def validate(self, height: int, width: int) -> None:
        """Raise ``ValueError`` unless the masks are ``height x width``."""
        _check_mask_size(self.sources, height, width, "RegionPairs")

    def to_points(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """§14.1 for every pair, concatenated in input order."""
        scale = _check_scale(scale)
        pairs = [region_pair_points(s, t, scale, k)
                 for k, (s, t) in enumerate(zip(self.sources, self.targets))]
        return _concat_pairs(pairs, scale)


# ----------------------------------------------------------------------------------------------
# §14.2 polygon pairs
# ----------------------------------------------------------------------------------------------

def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def _turns(poly: np.ndarray) -> np.ndarray:
    """Orientation sign of each consecutive vertex triple (i-1, i, i+1)."""
    n = len(poly)
    return np.sign([_cross(poly[i - 1], poly[i], poly[(i + 1) % n]) for i in range(n)])


def check_polygon(poly: np.ndarray, what: str) -> None:
    """Refuse wrong vertex counts, degenerate polygons and self-intersecting quadrilaterals."""
    if len(poly) not in (3, 4):
        raise ValueError(f"{what} has {len(poly)} vertices; only triangles (3) or quadrilaterals (4) are allowed")
    n = len(poly)
    for i in range(n):  # any collinear triple (incl. repeated vertices) makes the transform singular
        for j in range(i + 1, n):
            for k in range(j + 1, n):
                if _cross(poly[i], poly[j], poly[k]) == 0:
                    raise ValueError(f"{what} is degenerate: vertices {i}, {j}, {k} are collinear or repeated")
    if n == 4:
        def crosses(a, b, c, d):
            return (_cross(a, b, c) > 0) != (_cross(a, b, d) > 0) and (_cross(c, d, a) > 0) != (_cross(c, d, b) > 0)
        if crosses(poly[0], poly[1], poly[2], poly[3]) or crosses(poly[1], poly[2], poly[3], poly[0]):
            raise ValueError(f"{what} is self-intersecting; give the 4 vertices in order around the outline")


@dataclass(frozen=True, eq=False)
class PolygonPairs(_Drag):
    """Pairs of source/target triangles or quadrilaterals, each a list of (x, y) vertices (§14.2)."""

    sources: tuple
    targets: tuple

    def __post_init__(self):
        srcs, trgs = _store_pairs(self, "PolygonPairs", lambda p, name: _as_points(p, name, integral=False),
                                  "polygon")
        for i, (s, t) in enumerate(zip(srcs, trgs)):
            check_polygon(s, f"source polygon {i}")
            check_polygon(t, f"target polygon {i}")
            if len(s) != len(t):
                raise ValueError(f"polygon pair {i}: source has {len(s)} vertices but target has {len(t)}; "
                                 "they must have the same count (3 or 4)")
            if len(s) == 4 and len({int(v) for v in _turns(s) * _turns(t)}) != 1:
                raise ValueError(f"polygon pair {i}: one quadrilateral is convex and the other is not; the "
                                 "perspective map would send part of the target to infinity")

    def validate(self, height: int, width: int) -> None:
        """Raise ``ValueError`` if a vertex lies outside ``[0, width) x [0, height)``."""
        for i, (s, t) in enumerate(zip(self.sources, self.targets)):
            _check_in_image(s, height, width, f"source polygon {i}")
            _check_in_image(t, height, width, f"target polygon {i}")

    def to_points(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """§14.2 for every pair, concatenated in input order."""
        scale = _check_scale(scale)
        pairs = [polygon_pair_points(s, t, scale) for s, t in zip(self.sources, self.targets)]
        return _concat_pairs(pairs, scale)


# ----------------------------------------------------------------------------------------------
# §14.3 region + clicked points
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class RegionPoints(_Drag):
    """One HxW region mask plus clicked (x, y) pairs: ``handles[k]`` is dragged to ``targets[k]`` (§14.3)."""

    mask: np.ndarray
    handles: np.ndarray
    targets: np.ndarray

    def __post_init__(self):
        handles, targets = _check_pair_lists(self.handles, self.targets, "RegionPoints")
        object.__setattr__(self, "mask", _as_mask(self.mask, "region mask"))
        object.__setattr__(self, "handles", _as_points(handles, "handles", integral=False))
        object.__setattr__(self, "targets", _as_points(targets, "targets", integral=False))

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the mask."""
        return self.mask.shape

    def validate(self, height: int, width: int) -> None:
        """Raise ``ValueError`` unless the mask is ``height x width``, every click is inside the image and
        every handle inside the region (its filled outline, §14.3 step 2; elsewhere it would be ignored)."""
        _check_mask_size([self.mask], height, width, "RegionPoints")
        _check_in_image(self.handles, height, width, "handles")
        _check_in_image(self.targets, height, width, "targets")
        contours, _ = cv2.findContours(self.mask.copy(), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        filled = np.zeros_like(self.mask)
        for c in contours:  # the pixels §14.3 step 2 matches handles against
            xy = filled_pixels(c.reshape(-1, 2), self.mask.shape)
            filled[xy[:, 1], xy[:, 0]] = 1
        h = self.handles.astype(np.int32)
        outside = filled[h[:, 1], h[:, 0]] == 0
        if outside.any():
            k = int(np.argmax(outside))
            raise ValueError(f"handle {k} at ({self.handles[k, 0]:g}, {self.handles[k, 1]:g}) lies outside the region "
                             "mask, so it would move nothing; put each handle inside the region")

    def to_points(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """§14.3: per contour (OpenCV order), IDW-warp the region and map each target pixel back."""
        scale = _check_scale(scale)
        region = resize_mask(self.mask, scale).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        s_pts = (self.handles * scale).astype(np.int32).astype(np.int64)
        t_pts = (self.targets * scale).astype(np.int32).astype(np.int64)
        pairs = [contour_pairs(c.reshape(-1, 2).astype(np.int64), region.shape, s_pts, t_pts)
                 for c in contours]
        pairs = [p for p in pairs if p is not None]
        if not pairs:
            raise ValueError(f"the drag yields no point pairs at this scale ({scale:g}): no handle lies "
                             "inside the region mask")
        return _concat_pairs(pairs, scale)


# ----------------------------------------------------------------------------------------------
# dense point pairs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PointPairs(_Drag):
    """Dense N x 2 (x, y) integer image-coordinate pairs, row k of ``sources`` paired with row k of ``targets``."""

    sources: np.ndarray
    targets: np.ndarray

    def __post_init__(self):
        src = _as_points(self.sources, "PointPairs sources").astype(np.int64)
        trg = _as_points(self.targets, "PointPairs targets").astype(np.int64)
        if len(src) != len(trg):
            raise ValueError(f"PointPairs needs as many sources as targets, got {len(src)} and {len(trg)}")
        src.setflags(write=False)
        trg.setflags(write=False)
        object.__setattr__(self, "sources", src)
        object.__setattr__(self, "targets", trg)

    def validate(self, height: int, width: int) -> None:
        """Raise ``ValueError`` if a point lies outside ``[0, width) x [0, height)``."""
        _check_in_image(self.sources, height, width, "PointPairs sources")
        _check_in_image(self.targets, height, width, "PointPairs targets")

    def to_points(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """``floor(points * scale)``; exact integer floor division when ``1/scale`` is an integer (§3 step 2)."""
        scale = _check_scale(scale)
        inv = 1.0 / scale
        if inv == round(inv):
            return (self.sources // int(round(inv))).astype(np.int32), (self.targets // int(round(inv))).astype(np.int32)
        return (np.floor(self.sources * scale).astype(np.int32),
                np.floor(self.targets * scale).astype(np.int32))
