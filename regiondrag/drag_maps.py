"""The §14 mappings from a drag to dense point pairs (ALGORITHM.md §14.1-14.3), on checked inputs.

:mod:`regiondrag.drags` checks what the user gives and calls these; each follows the reference's
arithmetic (OpenCV rasterisation on the resized image's canvas, float16 inverse-distance weighting).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

_IDW_MAX_REFS = 100   # §14.3: more references are subsampled with linspace
_IDW_K = 4            # §14.3: nearest references used per point
_IDW_CHUNK = 1 << 15  # points per IDW chunk (rows are independent, so chunking changes nothing)


def resize_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """§14.1 step 1: ``cv2.resize`` (bilinear) to ``(int(W*scale), int(H*scale))``, nonzero -> bool."""
    h, w = mask.shape
    size = (int(w * scale), int(h * scale))
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"a {h}x{w} mask is empty when resized by {scale:g}; use a larger image or scale")
    return cv2.resize(mask, size) != 0


def filled_pixels(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """All pixels (x, y) of ``fillPoly(polygon)`` on a canvas of ``shape``, row-major (int64)."""
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.ascontiguousarray(polygon, dtype=np.int32).reshape(-1, 1, 2)], 1)
    ys, xs = np.nonzero(canvas)
    return np.stack([xs, ys], axis=1)


def _column_extent(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: min and max row of ``region`` (+inf / -inf where the column is empty)."""
    rows = np.arange(region.shape[0], dtype=np.float64)[:, None]
    return (np.where(region, rows, np.inf).min(axis=0), np.where(region, rows, -np.inf).max(axis=0))


def region_pair_points(src: np.ndarray, trg: np.ndarray, scale: float, k: int):
    """§14.1 ``region_pair_to_pts``: global horizontal stretch, per-column vertical stretch."""
    rs, rt = resize_mask(src, scale), resize_mask(trg, scale)
    for name, region in (("source", rs), ("target", rt)):
        if not region.any():
            raise ValueError(f"{name} region {k} vanishes when the mask is resized by {scale:g} (fewer than "
                             "two of the central pixels of every cell are set); make the region larger")
    ty, tx = np.nonzero(rt)  # row-major target cells
    scols, tcols = np.nonzero(rs.any(axis=0))[0], np.nonzero(rt.any(axis=0))[0]
    xs_min, xs_max, xt_min, xt_max = scols[0], scols[-1], tcols[0], tcols[-1]
    sx = (xs_max - xs_min) / max(xt_max - xt_min, 1e-4)
    xp = (tx - xt_min) * sx + xs_min
    col = xp.astype(np.int64)
    ys_min, ys_max = _column_extent(rs)
    yt_min, yt_max = _column_extent(rt)
    if np.isinf(ys_min[col]).any():  # the reference would produce inf/nan -> garbage here
        c = int(col[np.isinf(ys_min[col])][0])
        raise ValueError(f"source region {k} is not column-convex at scale {scale:g}: its column {c} is "
                         "empty but a target column maps onto it; use a region without horizontal gaps")
    sy = (ys_max[col] - ys_min[col]) / np.maximum(yt_max[tx] - yt_min[tx], 1e-4)
    yp = (ty - yt_min[tx]) * sy + ys_min[col]
    return np.stack([col, yp.astype(np.int64)], axis=1), np.stack([tx, ty], axis=1)


def polygon_pair_points(src_v: np.ndarray, trg_v: np.ndarray, scale: float):
    """§14.2 ``transform_polygon``: fill the target polygon, map its pixels to the source (target->source)."""
    src = src_v.astype(np.float32) * np.float32(scale)
    trg = trg_v.astype(np.float32) * np.float32(scale)
    trg_int = trg.astype(np.int32)
    trg_pts = filled_pixels(trg_int, (trg_int[:, 1].max() + 1, trg_int[:, 0].max() + 1))
    pts = trg_pts.astype(np.float32).reshape(-1, 1, 2)
    if len(trg_v) == 3:
        src_pts = cv2.transform(pts, cv2.getAffineTransform(trg, src))
    else:
        src_pts = cv2.perspectiveTransform(pts, cv2.getPerspectiveTransform(trg, src))
    return src_pts.reshape(-1, 2).astype(np.int32), trg_pts


def _idw_rows(p: torch.Tensor, refs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """IDW direction for a chunk of float16 points: k nearest refs, weights 1/(d+1e-4) normalised."""
    # torch's float16 vector norm accumulates in float32 before rounding; with the unstable sort the
    # tie order depends on these exact values (§14.3), so the distance must be computed this way.
    dist = torch.linalg.vector_norm(p[:, None, :] - refs[None, :, :], dim=-1)
    k = min(_IDW_K, refs.shape[0])
    idx = torch.sort(dist, dim=1)[1][:, :k]  # default (unstable) sort, as §14.3 requires
    w = 1.0 / (torch.gather(dist, 1, idx) + 1e-4)
    w = w / w.sum(dim=1, keepdim=True)
    return torch.round(p + (w[:, :, None] * dirs[idx]).sum(dim=1))


def idw(points: np.ndarray, refs: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """§14.3 ``IDW(points; refs, dirs)`` in float16 on the CPU -> int64 N x 2 points."""
    p = torch.as_tensor(np.asarray(points), dtype=torch.float16)
    r = torch.as_tensor(np.asarray(refs), dtype=torch.float16)
    d = torch.as_tensor(np.asarray(dirs), dtype=torch.float16)
    if r.shape[0] < 2:
        return (p + d).to(torch.int64).numpy()
    if r.shape[0] > _IDW_MAX_REFS:
        keep = torch.linspace(0, r.shape[0] - 1, _IDW_MAX_REFS).long()
        r, d = r[keep], d[keep]
    out = [_idw_rows(p[i:i + _IDW_CHUNK], r, d) for i in range(0, p.shape[0], _IDW_CHUNK)]
    return torch.cat(out).to(torch.int64).numpy()


def contour_pairs(contour: np.ndarray, shape, s_pts: np.ndarray, t_pts: np.ndarray):
    """§14.3 steps 2-6 for one contour; ``None`` when no clicked handle lies inside it."""
    h, w = shape
    r_s = filled_pixels(contour, shape)
    inside = np.zeros(shape, bool)
    inside[r_s[:, 1], r_s[:, 0]] = True
    in_img = (s_pts[:, 0] >= 0) & (s_pts[:, 0] < w) & (s_pts[:, 1] >= 0) & (s_pts[:, 1] < h)
    ref = np.zeros(len(s_pts), bool)
    ref[in_img] = inside[s_pts[in_img, 1], s_pts[in_img, 0]]
    if not ref.any():
        return None
    src_ref, dirs = s_pts[ref], t_pts[ref] - s_pts[ref]
    trg_contour = idw(contour, src_ref, dirs)
    r_t_fwd = idw(r_s, src_ref, dirs)
    # Filled on the image's own canvas, as the reference: OpenCV rasterises a polygon that crosses the
    # canvas edge differently from the same polygon on a larger canvas, even inside the common part.
    r_t = filled_pixels(trg_contour, shape)
    src_of_r_t = idw(r_t, r_t_fwd, r_s - r_t_fwd)
    both = np.concatenate([src_of_r_t, r_t], axis=1)
    keep = ((both >= 0) & (both < np.array([w, h, w, h]))).all(axis=1)
    return src_of_r_t[keep], r_t[keep]
