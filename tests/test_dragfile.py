"""Drag JSON files: round trips, the shipped examples and error messages (regiondrag/dragfile.py)."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import regiondrag as rd
from regiondrag.dragfile import load_drag, read_mask_png, save_drag

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
H, W = 64, 80


def _ellipse(center, axes=(10, 7)) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, center, axes, 0, 0, 360, 1, -1)
    return mask


def _drags():
    return {
        "region_pairs": rd.RegionPairs([_ellipse((20, 20)), _ellipse((30, 40))],
                                       [_ellipse((50, 22)), _ellipse((40, 45))]),
        "polygon_pairs": rd.PolygonPairs([[(1, 2), (30, 3.5), (10, 20)], [(5, 5), (20, 5), (20, 20), (5, 20)]],
                                         [[(40, 2), (70, 4), (50, 25)], [(45, 30), (60, 30), (62, 50), (44, 52)]]),
        "region_points": rd.RegionPoints(_ellipse((20, 20)), [(20, 20), (22.5, 18)], [(50, 20), (52, 19)]),
        "point_pairs": rd.PointPairs(np.array([[1, 2], [3, 4], [5, 6]]), np.array([[7, 8], [9, 10], [11, 12]])),
    }


def _assert_same(a, b):
    assert type(a) is type(b)
    for field in a.__dataclass_fields__:
        va, vb = getattr(a, field), getattr(b, field)
        if isinstance(va, tuple):  # lists of masks / polygons
            assert len(va) == len(vb)
            for x, y in zip(va, vb):
                np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_array_equal(va, vb)


@pytest.mark.parametrize("kind", ["region_pairs", "polygon_pairs", "region_points", "point_pairs"])
def test_roundtrip(tmp_path, kind):
    drag = _drags()[kind]
    path = save_drag(drag, tmp_path / "sub" / "d.json")
    assert json.loads(path.read_text())["type"] == kind
    loaded, extras = load_drag(path)
    _assert_same(drag, loaded)
    assert extras == {}
    for a, b in zip(drag.to_points(1.0), loaded.to_points(1.0)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["region_pairs", "region_points"])
def test_roundtrip_extras(tmp_path, kind):
    edit_mask = np.zeros((H, W), np.uint8)
    edit_mask[10:50, 5:70] = 1
    params = {"method": "cp_then_encode", "steps": 20, "start_t": 0.5, "end_t": 0.2,
              "noise_scale": 1.0, "seed": 7}
    path = save_drag(_drags()[kind], tmp_path / "d.json", prompt="a cat", mask=edit_mask, params=params)
    assert (tmp_path / "d_mask.png").is_file()
    loaded, extras = load_drag(path)
    _assert_same(_drags()[kind], loaded)
    assert extras["prompt"] == "a cat" and extras["params"] == params
    np.testing.assert_array_equal(extras["mask"], edit_mask)
    assert extras["mask"].dtype == np.uint8


def test_mask_png_conversion(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[1, 2] = (255, 0, 0, 255)
    rgba[3, 4] = (0, 0, 0, 255)  # black but opaque: alpha is ignored -> 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    expected = np.zeros((4, 5), np.uint8)
    expected[1, 2] = 1
    np.testing.assert_array_equal(read_mask_png(tmp_path / "m.png"), expected)
    gray = np.array([[0, 1, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask_png(tmp_path / "g.png"), [[0, 1, 1]])


@pytest.mark.parametrize("name", ["drag_region_pairs", "drag_polygon_pairs", "drag_region_points"])
def test_examples_load(name):
    image = np.array(Image.open(EXAMPLES / "dog.png").convert("RGB"))
    drag, extras = load_drag(EXAMPLES / f"{name}.json")
    assert extras.get("prompt") == "a photo of a dog"
    drag.validate(*image.shape[:2])
    src, trg = drag.to_points(1 / 8)
    assert len(src) == len(trg) > 0
    assert np.all((trg - src)[:, 0] < 0)  # the dog's head moves left
    assert drag.preview(image).shape == image.shape


def _write(tmp_path, doc, name="d.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def _png(tmp_path, name, mask=None) -> str:
    Image.fromarray(((_ellipse((20, 20)) if mask is None else mask) * 255).astype(np.uint8)).save(tmp_path / name)
    return name


PTS = [[1, 2], [3, 4]]


@pytest.mark.parametrize("doc,match", [
    ({"type": "blob", "sources": [], "targets": []},
     r"field 'type': unknown drag type 'blob'; allowed types: \['point_pairs', 'polygon_pairs', "
     r"'region_pairs', 'region_points'\]"),
    ({"sources": PTS, "targets": PTS}, r"field 'type': missing field; allowed types"),
    ({"type": "point_pairs", "sources": PTS}, r"field 'targets': missing field required for type 'point_pairs'"),
    ({"type": "point_pairs", "sources": PTS, "targets": PTS, "version": 2},
     r"field 'version': unsupported version 2"),
    ({"type": "point_pairs", "sources": PTS, "targets": PTS, "sorces": 1},
     r"field 'sorces': unknown field for type 'point_pairs'"),
    ({"type": "point_pairs", "sources": [[1, 2, 3]], "targets": [[1, 2]]},
     r"field 'sources\[0\]': expected an \[x, y\] pair of integers"),
    ({"type": "point_pairs", "sources": [[1.5, 2]], "targets": [[1, 2]]},
     r"field 'sources\[0\]': expected an \[x, y\] pair of integers"),
    ({"type": "point_pairs", "sources": {"x": 1}, "targets": PTS}, r"field 'sources': expected a list"),
    ({"type": "point_pairs", "sources": PTS, "targets": PTS[:1]},
     r"field 'targets': has 1 entries but 'sources' has 2"),
    ({"type": "polygon_pairs", "sources": [PTS], "targets": [PTS]},
     r"field 'sources\[0\]': a polygon needs 3 or 4 vertices, got 2"),
    ({"type": "polygon_pairs", "sources": [[[0, 0], [1, 1], [2, 2]]], "targets": [[[0, 0], [5, 0], [0, 5]]]},
     r"d\.json: invalid 'polygon_pairs' drag: source polygon 0 is degenerate"),
    ({"type": "region_points", "mask": 3, "handles": PTS, "targets": PTS},
     r"field 'mask': expected a mask PNG path"),
    ({"type": "point_pairs", "sources": PTS, "targets": PTS, "prompt": 5}, r"field 'prompt': expected a string"),
    ({"type": "point_pairs", "sources": PTS, "targets": PTS, "params": {"step": 3}},
     r"field 'params': unknown parameter 'step'; allowed: \['end_t', 'method'"),
    ({"type": "point_pairs", "sources": PTS, "targets": PTS, "params": {"steps": 2.5}},
     r"parameter 'steps' must be int"),
    ([1, 2], r"expected a JSON object at the top level"),
])
def test_errors(tmp_path, doc, match):
    with pytest.raises(ValueError, match=match):
        load_drag(_write(tmp_path, doc))


def test_missing_mask_file(tmp_path):
    path = _write(tmp_path, {"type": "region_pairs", "sources": ["nope.png"], "targets": ["nope2.png"]})
    resolved = str((tmp_path / "nope.png").resolve())
    with pytest.raises(ValueError, match=r"d\.json: field 'sources\[0\]': mask file not found: " + resolved):
        load_drag(path)


def test_editing_mask_both_fields(tmp_path):
    doc = {"type": "region_pairs", "sources": [_png(tmp_path, "s.png")], "targets": [_png(tmp_path, "t.png")],
           "mask": "s.png", "edit_mask": "t.png"}
    with pytest.raises(ValueError, match="not both"):
        load_drag(_write(tmp_path, doc))


def test_empty_mask_rejected(tmp_path):
    doc = {"type": "region_pairs", "sources": [_png(tmp_path, "e.png", np.zeros((H, W), np.uint8))],
           "targets": [_png(tmp_path, "t.png")]}
    with pytest.raises(ValueError, match=r"d\.json: invalid 'region_pairs' drag: source region 0 is empty"):
        load_drag(_write(tmp_path, doc))


def test_invalid_json(tmp_path):
    path = _write(tmp_path, '{\n  "type": "point_pairs",\n  "sources": [[1, 2]\n}')
    with pytest.raises(ValueError, match=r"invalid JSON in .*d\.json at line 4"):
        load_drag(path)


def test_missing_json_file(tmp_path):
    with pytest.raises(ValueError, match="drag file not found"):
        load_drag(tmp_path / "none.json")


def test_save_unknown_type(tmp_path):
    with pytest.raises(ValueError, match="cannot save a dict"):
        save_drag({"a": 1}, tmp_path / "x.json")
