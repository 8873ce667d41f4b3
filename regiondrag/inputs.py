"""Edit inputs at the processing size (ALGORITHM.md §0, §3.6, §12).

The networks need sides that are multiples of 8. An image whose sides are not is resized to the
nearest multiples of 8 (at least 8) for processing, with its masks (nearest neighbour) and drag
coordinates, and the result is resized back to the input's size (§12.3's bilinear resize).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .drags import PointPairs, PolygonPairs, RegionPairs, RegionPoints, as_rgb
from .params import check_image_size

DRAG_TYPES = (RegionPairs, PolygonPairs, RegionPoints, PointPairs)


def processing_size(height: int, width: int) -> tuple[int, int]:
    """Nearest multiples of 8 (at least 8; halfway rounds up) of the image sides."""
    return max(8, int(height / 8 + 0.5) * 8), max(8, int(width / 8 + 0.5) * 8)


def as_binary_mask(mask, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """An HxW {0,1} uint8 copy of ``mask`` (bool or numbers: {0,1}, {0,255}; HxWx1/3/4 images: nonzero
    on any colour channel); ValueError naming ``name`` on a wrong shape, dtype or size."""
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[..., :3].max(axis=2)
    if arr.ndim != 2 or arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected an HxW numeric mask, got shape {arr.shape} dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: mask size {arr.shape[1]}x{arr.shape[0]} (WxH) does not match the image "
                         f"size {shape[1]}x{shape[0]}")
    if not np.isfinite(arr.astype(np.float64)).all():
        raise ValueError(f"{name} contains NaN or inf")
    return (arr != 0).astype(np.uint8)


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return cv2.resize(np.asarray(mask, dtype=np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def resize_drag(drag, src_hw: tuple[int, int], dst_hw: tuple[int, int]):
    """The same drag on an image resized from ``src_hw`` to ``dst_hw`` (masks nearest, points scaled)."""
    if src_hw == dst_hw:
        return drag
    sx, sy = dst_hw[1] / src_hw[1], dst_hw[0] / src_hw[0]

    def pts(p, limit=True):
        q = np.asarray(p, dtype=np.float64).reshape(-1, 2) * (sx, sy)
        q = np.floor(q).astype(np.int64)
        return np.minimum(q, (dst_hw[1] - 1, dst_hw[0] - 1)) if limit else q

    if isinstance(drag, RegionPairs):
        return RegionPairs([_resize_mask(m, dst_hw) for m in drag.sources], [_resize_mask(m, dst_hw) for m in drag.targets])
    if isinstance(drag, PolygonPairs):
        scale = lambda polys: [(np.asarray(p, dtype=np.float64) * (sx, sy)).tolist() for p in polys]  # noqa: E731
        return PolygonPairs(scale(drag.sources), scale(drag.targets))
    if isinstance(drag, RegionPoints):
        return RegionPoints(_resize_mask(drag.mask, dst_hw), pts(drag.handles).tolist(), pts(drag.targets).tolist())
    if isinstance(drag, PointPairs):
        return PointPairs(pts(drag.sources), pts(drag.targets))
    raise TypeError(f"drag must be one of {', '.join(t.__name__ for t in DRAG_TYPES)}, got {type(drag).__name__}")


@dataclass
class EditInputs:
    """Everything one edit reads from its inputs, at the processing size."""

    original: np.ndarray  # HxWx3 uint8 as given
    original_mask: np.ndarray  # HxW {0,1} as given (all ones when none)
    image: np.ndarray  # processing size
    preview: np.ndarray | None
    drag: object  # at the processing size
    latent_mask: np.ndarray  # bool h x w (§3.6)
    latent_points: tuple[np.ndarray, np.ndarray]  # int64 N x 2 (x, y) source/target latent cells (§3.2)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.image.shape[0] // 8, self.image.shape[1] // 8

    def postprocess(self, decoded: torch.Tensor) -> np.ndarray:
        """§12.2-4: clamp(D/2+0.5) -> uint8 by truncation -> bilinear resize to the input size -> mask blend."""
        img = (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
        img = (img * 255).astype(np.uint8)
        h, w = self.original.shape[:2]
        img = cv2.resize(img, (w, h))
        if not self.original_mask.all():
            img = np.where(self.original_mask[..., None] != 0, img, self.original)
        return img


def load_image(image) -> np.ndarray:
    """PIL image, HxWx3 uint8 array or path -> HxWx3 uint8 RGB array."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise ValueError(f"image {str(path)!r} is a directory; pass an image file (PNG/JPEG)")
        if not path.is_file():
            raise ValueError(f"image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as exc:  # not an image, truncated, unreadable
            raise ValueError(f"could not read image {str(path)!r}: {exc}") from exc
    arr = as_rgb(image)
    if min(arr.shape[:2]) < 8:
        raise ValueError(f"image must be at least 8x8 pixels, got {arr.shape[1]}x{arr.shape[0]}")
    check_image_size(*arr.shape[:2])
    return np.array(arr, copy=True)  # never alias (or write to) the caller's array


def prepare_inputs(image, drag, mask, preview, need_preview: bool) -> EditInputs:
    """Validate and bring the inputs to the processing size; see :class:`EditInputs`."""
    original = load_image(image)
    if not isinstance(drag, DRAG_TYPES):
        raise TypeError(f"drag must be one of {', '.join(t.__name__ for t in DRAG_TYPES)}, got {type(drag).__name__}")
    hw = original.shape[:2]
    drag.validate(*hw)
    full_mask = np.ones(hw, np.uint8) if mask is None else as_binary_mask(mask, hw, "editing mask")
    if need_preview:
        preview = drag.preview(original) if preview is None else load_image(preview)
        if preview.shape != original.shape:
            raise ValueError(f"preview is {preview.shape[1]}x{preview.shape[0]} but the image is {hw[1]}x{hw[0]}")
    else:
        preview = None
    phw = processing_size(*hw)
    if phw != hw:
        resize = lambda im: cv2.resize(im, (phw[1], phw[0]), interpolation=cv2.INTER_AREA)  # noqa: E731
        image_p, preview = resize(original), (resize(preview) if preview is not None else None)
        mask_p, drag = _resize_mask(full_mask, phw), resize_drag(drag, hw, phw)
    else:
        image_p, mask_p = original, full_mask
    m = torch.from_numpy(mask_p)[None, None]
    latent_mask = F.interpolate(m, size=(phw[0] // 8, phw[1] // 8), mode="nearest")[0, 0].numpy().astype(bool)
    return EditInputs(original, full_mask, image_p, preview, drag, latent_mask, latent_points(drag, phw))


def latent_points(drag, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The drag's §3.2 source/target points on the latent grid of an ``hw`` image (int64 N x 2), checked
    to lie on that grid."""
    h, w = hw[0] // 8, hw[1] // 8
    src, trg = (p.astype(np.int64) for p in drag.to_points(1 / 8))
    for name, p in (("source", src), ("target", trg)):
        if p.size == 0 or p[:, 0].min() < 0 or p[:, 1].min() < 0 or p[:, 0].max() >= w or p[:, 1].max() >= h:
            raise ValueError(f"{name} points fall outside the {w}x{h} latent grid of the image")
    return src, trg
