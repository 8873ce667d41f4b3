"""Tests for regiondrag.drags: user input -> point pairs (ALGORITHM.md §14), preview, border (§3)."""
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regiondrag.drags import PointPairs, PolygonPairs, RegionPairs, RegionPoints, border_points

FIXTURES = Path(__file__).parent / "fixtures"
SCALES = {"s1": 1.0, "s8": 1 / 8}


@pytest.fixture(scope="module")
def mappings():
    with np.load(FIXTURES / "mappings.npz") as data:
        return {k: data[k] for k in data.files}


def _build(m, kind, name):
    if kind == "rp":
        return RegionPairs([m[f"rp/{name}/src_region"]], [m[f"rp/{name}/trg_region"]])
    if kind == "poly":
        return PolygonPairs([m[f"poly/{name}/src_vertices"]], [m[f"poly/{name}/trg_vertices"]])
    clicked = m["rpts/clicked_points"]
    return RegionPoints(m["rpts/region_mask"], clicked[0::2], clicked[1::2])


def _rect(h=64, w=64, y0=10, y1=30, x0=10, x1=30):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


CASES = [("rp", "ellipse_move_stretch"), ("rp", "rect_squash"), ("rp", "rect_to_ellipse"),
         ("poly", "tri"), ("poly", "quad"), ("rpts", None)]


@pytest.mark.parametrize("scale_key", ["s1", "s8"])
@pytest.mark.parametrize("kind,name", CASES)
def test_mapping_matches_fixture(mappings, kind, name, scale_key):
    prefix = f"{kind}/{name}" if name else kind
    src, trg = _build(mappings, kind, name).to_points(SCALES[scale_key])
    assert src.dtype == np.int32 and trg.dtype == np.int32
    assert np.array_equal(src.astype(np.int64), mappings[f"{prefix}/{scale_key}/src_pts"].astype(np.int64))
    assert np.array_equal(trg.astype(np.int64), mappings[f"{prefix}/{scale_key}/trg_pts"].astype(np.int64))


@pytest.mark.parametrize("case", ["etcp_onepair_fullmask", "cpte_twopairs_partmask"])
def test_golden_case_points(case):
    with np.load(FIXTURES / f"{case}.npz") as data:
        drag = RegionPairs(list(data["src_regions"]), list(data["trg_regions"]))
        src, trg = drag.to_points(1 / 8)
        assert np.array_equal(src * 8, data["source_pts_img"])
        assert np.array_equal(trg * 8, data["target_pts_img"])


def test_preview_is_pixel_copy_paste(mappings):
    drag = _build(mappings, "rp", "ellipse_move_stretch")
    h, w = drag.image_size
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    src, trg = drag.to_points(1.0)
    want = img.copy()
    want[trg[:, 1], trg[:, 0]] = img[src[:, 1], src[:, 0]]
    out = drag.preview(img)
    assert out.dtype == np.uint8 and np.array_equal(out, want)
    assert np.array_equal(drag.preview(Image.fromarray(img)), want)
    untouched = np.ones((h, w), bool)
    untouched[trg[:, 1], trg[:, 0]] = False
    assert np.array_equal(out[untouched], img[untouched])


def test_preview_reads_before_writing():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    drag = PointPairs([[0, 0], [1, 0]], [[1, 0], [2, 0]])  # (1,0) is both a target and a source
    out = drag.preview(img)
    assert np.array_equal(out[0, 1], img[0, 0]) and np.array_equal(out[0, 2], img[0, 1])
    with pytest.raises(ValueError, match="outside the image"):
        PointPairs([[0, 0]], [[5, 0]]).preview(img)


def test_preview_rejects_wrong_image_size():
    drag = RegionPairs([_rect()], [_rect(x0=30, x1=50)])
    with pytest.raises(ValueError, match="must match"):
        drag.preview(np.zeros((32, 64, 3), np.uint8))


def test_border_points_square_gives_corners():
    ys, xs = np.mgrid[2:6, 3:8]
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1)
    out = border_points(pts)
    assert out.dtype == np.int32 and out.shape == (4, 2)
    assert {tuple(p) for p in out} == {(3, 2), (3, 5), (7, 5), (7, 2)}
    assert tuple(out[0]) == (3, 2)  # OpenCV starts at the top-left vertex


def test_border_points_two_blobs_concatenated():
    pts = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [5, 5], [6, 5], [5, 6], [6, 6]])
    assert len(border_points(pts)) == 8
    with pytest.raises(ValueError, match="non-negative"):
        border_points([[-1, 0]])


def test_point_pairs_scaling():
    pts = np.array([[0, 0], [7, 8], [15, 17], [511, 300]])
    drag = PointPairs(pts, pts[::-1])
    src, trg = drag.to_points(1 / 8)
    assert src.dtype == np.int32 and np.array_equal(src, pts // 8) and np.array_equal(trg, pts[::-1] // 8)
    assert np.array_equal(drag.to_points(1.0)[0], pts)
    assert np.array_equal(drag.to_points(0.3)[0], np.floor(pts * 0.3).astype(np.int32))
    with pytest.raises(ValueError, match="integer"):
        PointPairs([[0.5, 1]], [[1, 1]])


def test_masks_accept_bool_pil_and_rgb():
    m = _rect()
    ref = RegionPairs([m], [_rect(x0=30, x1=50)]).to_points(1.0)
    rgb = np.zeros(m.shape + (3,), np.uint8)
    rgb[..., 2] = m * 255
    for src in (m.astype(bool), Image.fromarray(m * 255), rgb):
        got = RegionPairs([src], [_rect(x0=30, x1=50)]).to_points(1.0)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))


def test_dataclasses_are_frozen():
    drag = PointPairs([[0, 0]], [[1, 1]])
    with pytest.raises(FrozenInstanceError):
        drag.sources = None


def test_region_points_ignores_handle_outside_regions(mappings):
    mask, clicked = mappings["rpts/region_mask"], mappings["rpts/clicked_points"]
    base = RegionPoints(mask, clicked[0::2], clicked[1::2]).to_points(1.0)
    assert mask[2, 2] == 0
    extra = RegionPoints(mask, list(clicked[0::2]) + [[2, 2]], list(clicked[1::2]) + [[5, 5]]).to_points(1.0)
    assert all(np.array_equal(a, b) for a, b in zip(base, extra))


def test_region_points_no_pairs_raises():
    drag = RegionPoints(_rect(), [[50, 50]], [[55, 55]])
    with pytest.raises(ValueError, match="no point pairs"):
        drag.to_points(1.0)


def test_region_points_validate():
    drag = RegionPoints(_rect(), [[15, 15]], [[20, 20]])
    drag.validate(64, 64)
    with pytest.raises(ValueError, match="must match"):
        drag.validate(64, 32)
    with pytest.raises(ValueError, match="outside the image"):
        RegionPoints(_rect(), [[15, 15]], [[20, 64]]).validate(64, 64)


def test_polygon_validate_outside_image():
    drag = PolygonPairs([[[0, 0], [10, 0], [0, 10]]], [[[5, 5], [20, 5], [5, 20]]])
    drag.validate(32, 32)
    with pytest.raises(ValueError, match="outside the image"):
        drag.validate(16, 16)


TRI = [[0, 0], [10, 0], [0, 10]]
QUAD = [[0, 0], [10, 0], [10, 10], [0, 10]]


@pytest.mark.parametrize("make,match", [
    (lambda: RegionPairs([], []), "at least one"),
    (lambda: RegionPairs([_rect()], [_rect(), _rect()]), "as many sources as targets"),
    (lambda: RegionPairs([_rect(), _rect(), np.zeros((64, 64))], [_rect()] * 3), "source region 2 is empty"),
    (lambda: RegionPairs([_rect()], [np.zeros((64, 64), bool)]), "target region 0 is empty"),
    (lambda: RegionPairs([_rect()], [_rect(h=32)]), "same size"),
    (lambda: RegionPairs([np.ones((2, 8, 8))], [_rect()]), "2-D"),
    (lambda: RegionPairs([_rect() * np.nan], [_rect()]), "NaN"),
    (lambda: PolygonPairs([QUAD + [[5, 5]]], [QUAD + [[5, 5]]]), "only triangles"),
    (lambda: PolygonPairs([[[0, 0], [5, 5]]], [[[0, 0], [5, 5]]]), "only triangles"),
    (lambda: PolygonPairs([[[0, 0], [5, 5], [10, 10]]], [TRI]), "degenerate"),
    (lambda: PolygonPairs([[[0, 0], [0, 0], [3, 10]]], [TRI]), "degenerate"),
    (lambda: PolygonPairs([[[0, 0], [10, 10], [10, 0], [0, 10]]], [QUAD]), "self-intersecting"),
    (lambda: PolygonPairs([TRI], [QUAD]), "same count"),
    (lambda: PolygonPairs([QUAD], [[[0, 0], [10, 0], [3, 3], [0, 10]]]), "convex"),
    (lambda: PolygonPairs([[[0, 0], [np.inf, 0], [0, 10]]], [TRI]), "NaN or inf"),
    (lambda: PointPairs(np.zeros((3, 3)), np.zeros((3, 3))), "N x 2"),
    (lambda: PointPairs(np.zeros((3, 2)), np.zeros((4, 2))), "as many sources as targets"),
    (lambda: PointPairs([[0, np.nan]], [[0, 0]]), "NaN or inf"),
    (lambda: RegionPoints(_rect(), [], []), "at least one"),
    (lambda: RegionPoints(_rect(), [[1, 1]], [[2, 2], [3, 3]]), "as many"),
    (lambda: RegionPoints(np.zeros((8, 8)), [[1, 1]], [[2, 2]]), "region mask is empty"),
    (lambda: RegionPoints(_rect(), [[1, 1, 1]], [[2, 2, 2]]), "N x 2"),
])
def test_bad_inputs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_source_not_column_convex_raises():
    src = _rect(x0=10, x1=20) | _rect(x0=40, x1=50)  # two bars: columns 20..39 are empty
    drag = RegionPairs([src], [_rect(x0=10, x1=50)])
    with pytest.raises(ValueError, match="not column-convex"):
        drag.to_points(1.0)


def test_region_vanishing_at_latent_scale_raises():
    tiny = np.zeros((64, 64), np.uint8)
    tiny[20, 20] = 1
    with pytest.raises(ValueError, match="source region 0 vanishes"):
        RegionPairs([tiny], [_rect()]).to_points(1 / 8)


def test_bad_scale_raises():
    with pytest.raises(ValueError, match="scale"):
        PointPairs([[0, 0]], [[1, 1]]).to_points(0)


def _region_points_oracle(mask, handles, targets, scale):
    """§14.3 written out step by step from ALGORITHM.md, every mask drawn on the resized image's canvas
    (cv2.drawContours, FILLED), independently of regiondrag.drags except for its float16 IDW."""
    import cv2

    from regiondrag.drag_maps import idw

    h, w = int(mask.shape[0] * scale), int(mask.shape[1] * scale)
    region = cv2.resize(mask, (w, h))
    s = (np.asarray(handles, np.float64) * scale).astype(np.int32).astype(np.int64)
    t = (np.asarray(targets, np.float64) * scale).astype(np.int32).astype(np.int64)

    def filled(contour):
        canvas = np.zeros((h, w), np.uint8)
        cv2.drawContours(canvas, [contour.reshape(-1, 1, 2).astype(np.int32)], -1, 255, thickness=cv2.FILLED)
        ys, xs = np.nonzero(canvas)
        return np.stack([xs, ys], 1).astype(np.int64)

    out_s, out_t = [], []
    for c in cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]:
        c = c[:, 0, :].astype(np.int64)
        r_s = filled(c)
        ref = (s[:, None] == r_s[None]).all(axis=2).any(axis=1)
        if not ref.any():
            continue
        fwd = idw(r_s, s[ref], t[ref] - s[ref])
        r_t = filled(idw(c, s[ref], t[ref] - s[ref]))
        back = idw(r_t, fwd, r_s - fwd)
        keep = ((back >= 0) & (back < (w, h))).all(1) & ((r_t >= 0) & (r_t < (w, h))).all(1)
        out_s.append(back[keep])
        out_t.append(r_t[keep])
    return np.concatenate(out_s), np.concatenate(out_t)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [1.0, 1 / 8])
def test_region_points_near_the_border_match_the_spec(seed, scale):
    """Clicks near the right and bottom edges with targets that leave the image: the target polygon crosses
    the canvas edge, where OpenCV's fill depends on the canvas size (the reference uses the image's)."""
    rng = np.random.default_rng(seed)
    h, w = 160, 200
    mask = np.zeros((h, w), np.uint8)
    x0, y0 = int(rng.integers(100, 140)), int(rng.integers(60, 100))
    mask[y0:y0 + 50, x0:x0 + 55] = 1
    mask[y0 + 10:y0 + 30, x0 - 20:x0] = 1  # not a plain rectangle
    handles = [(x0 + 5 + 15 * k, y0 + 8 + 12 * k) for k in range(3)]
    targets = [(min(w - 1, hx + int(rng.integers(30, 80))), min(h - 1, hy + int(rng.integers(0, 40))))
               for hx, hy in handles]
    got = RegionPoints(mask, handles, targets).to_points(scale)
    want = _region_points_oracle(mask, handles, targets, scale)
    assert got[1].shape == want[1].shape
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
