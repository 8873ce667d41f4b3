"""DragBench readers: layouts, validation and safe unpickling (regiondrag/data.py)."""
import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

import regiondrag as rd
from regiondrag.data import (DragCase, SafeUnpickler, iter_cases, load_case,
                             safe_load_pickle)

FIXTURE = Path(__file__).parent / "fixtures" / "dragbench-animals"
SAMPLES = Path(__file__).resolve().parents[2] / "shared/data/dragbench-sample"


def _copy_case(tmp_path: Path) -> Path:
    case = tmp_path / "case"
    shutil.copytree(FIXTURE, case)
    return case


def _rewrite_meta(case: Path, **changes) -> None:
    meta = safe_load_pickle(case / "meta_data.pkl")
    meta.update(changes)
    with open(case / "meta_data.pkl", "wb") as fh:
        pickle.dump(meta, fh)


def _dump(obj, path: Path, protocol=None) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)
    return path


def test_fixture_case():
    case = load_case(FIXTURE)
    assert isinstance(case, DragCase)
    assert case.prompt == "a photo of a dog"
    assert case.image.shape == (512, 512, 3) and case.image.dtype == np.uint8
    assert case.mask.shape == (512, 512) and case.mask.dtype == np.uint8
    assert set(np.unique(case.mask)) == {0, 1}
    np.testing.assert_array_equal(case.handles, [[331, 179]])
    np.testing.assert_array_equal(case.targets, [[217, 177]])
    assert isinstance(case.drag, rd.RegionPoints)
    np.testing.assert_array_equal(case.drag.mask, case.mask)
    np.testing.assert_array_equal(case.drag.handles, [[331, 179]])
    assert case.name == "dragbench-animals" and case.path == FIXTURE
    src, trg = case.drag.to_points(1 / 8)
    assert len(src) == len(trg) > 0


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared DragBench sample not present")
def test_all_shared_samples():
    cases = list(iter_cases(SAMPLES))
    assert len(cases) == 10
    assert cases == sorted(cases)
    for path in cases:
        case = load_case(path)
        h, w = case.image.shape[:2]
        assert case.image.shape == (h, w, 3) and case.mask.shape == (h, w)
        assert set(np.unique(case.mask)) <= {0, 1}
        assert case.prompt and len(case.handles) == len(case.targets) >= 1
        assert isinstance(case.drag, rd.RegionPoints)


def test_iter_cases(tmp_path):
    for name in ("b/case2", "a/case1", "a/case0"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "original_image.png").write_bytes(b"")
    (tmp_path / "a" / "not_a_case").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in iter_cases(tmp_path)] == \
        ["a/case0", "a/case1", "b/case2"]
    with pytest.raises(FileNotFoundError, match="no such DragBench root"):
        iter_cases(tmp_path / "missing")


def test_mask_0_255_is_normalised(tmp_path):
    case = _copy_case(tmp_path)
    ref = load_case(FIXTURE).mask
    _rewrite_meta(case, mask=ref * 255)
    np.testing.assert_array_equal(load_case(case).mask, ref)


@pytest.mark.parametrize("layout", ["alternating", "source_target", "src_trg", "pts", "pair"])
def test_region_layout_gives_point_pairs(tmp_path, layout):
    case = _copy_case(tmp_path)
    src = np.array([[330, 170], [331, 171], [332, 172]], dtype=np.int64)
    trg = src - [114, 2]
    alternating = np.stack([src, trg], axis=1).reshape(-1, 2).tolist()
    meta = {"alternating": {"points": alternating},
            "source_target": {"source": src, "target": trg},
            "src_trg": {"src": src.tolist(), "trg": trg.tolist()},
            "pts": {"source_pts": src.astype(np.float64), "target_pts": trg},
            "pair": {"points": [src, trg]}}[layout]
    _dump(meta, case / "meta_data_region.pkl")
    loaded = load_case(case)
    assert isinstance(loaded.drag, rd.PointPairs)
    np.testing.assert_array_equal(loaded.drag.sources, src)
    np.testing.assert_array_equal(loaded.drag.targets, trg)
    np.testing.assert_array_equal(loaded.handles, [[331, 179]])  # still from meta_data.pkl


def test_region_file_prompt_and_mask_override(tmp_path):
    case = _copy_case(tmp_path)
    mask = np.zeros((512, 512), np.uint8)
    mask[100:200, 100:200] = 255
    _dump({"prompt": "a dog", "mask": mask, "points": [[1, 2], [3, 4]]},
          case / "meta_data_region.pkl", protocol=5)
    loaded = load_case(case)
    assert loaded.prompt == "a dog"
    np.testing.assert_array_equal(loaded.mask, mask // 255)


def test_region_file_unknown_structure(tmp_path):
    case = _copy_case(tmp_path)
    _dump({"foo": 1, "bar": [1, 2]}, case / "meta_data_region.pkl")
    with pytest.raises(ValueError, match=r"no point pairs found.*\['bar', 'foo'\]"):
        load_case(case)
    _dump([1, 2, 3], case / "meta_data_region.pkl")
    with pytest.raises(ValueError, match="expected a dict, got list"):
        load_case(case)


def test_region_file_length_mismatch(tmp_path):
    case = _copy_case(tmp_path)
    _dump({"source": [[1, 2], [3, 4]], "target": [[1, 2]]}, case / "meta_data_region.pkl")
    with pytest.raises(ValueError, match="2 source points but 1 target points"):
        load_case(case)


class _Payload:
    """Unpickling this runs ``os.system`` (with a normal pickle.load)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    case = _copy_case(tmp_path)
    marker = tmp_path / "pwned"
    _dump({"prompt": "x", "points": [[1, 2], [3, 4]], "mask": _Payload(marker)},
          case / "meta_data.pkl")
    with pytest.raises(ValueError, match=r"refusing to unpickle (posix|os|nt)\.system from .*"
                                         r"meta_data\.pkl: only plain containers"):
        load_case(case)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("subprocess", "Popen"),
                                         ("numpy", "load"), ("copyreg", "_reconstructor")])
def test_unpickler_refuses_other_globals(module, name):
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to unpickle {module}.{name}"):
        SafeUnpickler(io.BytesIO(), source="f.pkl").find_class(module, name)


def test_object_array_refused(tmp_path):
    path = _dump({"mask": np.array([1, "a", None], dtype=object)}, tmp_path / "obj.pkl")
    with pytest.raises(ValueError, match="dtype object"):
        safe_load_pickle(path)


def test_codecs_only_latin1(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    data = safe_load_pickle(_dump({"a": arr, "b": b"\x00\xff"}, tmp_path / "p2.pkl", protocol=2))
    np.testing.assert_array_equal(data["a"], arr)
    assert data["b"] == b"\x00\xff"
    evil = b"c_codecs\nencode\n(Vabc\nVzlib_codec\ntR."
    (tmp_path / "evil.pkl").write_bytes(evil)
    with pytest.raises(ValueError, match="zlib_codec"):
        safe_load_pickle(tmp_path / "evil.pkl")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_data_roundtrips(tmp_path, protocol):
    obj = {"s": "x", "i": 3, "f": 1.5, "c": 1 + 2j, "set": {1, 2}, "fs": frozenset({3}),
           "t": (None, True), "a": np.arange(12, dtype=np.float32).reshape(3, 4),
           "n": np.int64(7), "ba": bytearray(b"ab")}
    out = safe_load_pickle(_dump(obj, tmp_path / "ok.pkl", protocol=protocol))
    np.testing.assert_array_equal(out.pop("a"), obj.pop("a"))
    assert out == obj


def test_corrupt_pickle(tmp_path):
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="could not unpickle .*bad.pkl"):
        safe_load_pickle(tmp_path / "bad.pkl")


@pytest.mark.parametrize("missing", ["original_image.png", "meta_data.pkl"])
def test_missing_file(tmp_path, missing):
    case = _copy_case(tmp_path)
    (case / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {missing}.*DragBench case directory holds"):
        load_case(case)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such case directory"):
        load_case(tmp_path / "nope")


def test_odd_number_of_points(tmp_path):
    case = _copy_case(tmp_path)
    _rewrite_meta(case, points=[[1, 2], [3, 4], [5, 6]])
    with pytest.raises(ValueError, match="even number of points.*got 3"):
        load_case(case)


def test_mask_size_mismatch(tmp_path):
    case = _copy_case(tmp_path)
    _rewrite_meta(case, mask=np.ones((256, 512), np.uint8))
    with pytest.raises(ValueError, match=r"mask size 512x256 \(WxH\) does not match the image size 512x512"):
        load_case(case)


def test_missing_meta_key(tmp_path):
    case = _copy_case(tmp_path)
    with open(case / "meta_data.pkl", "wb") as fh:
        pickle.dump({"prompt": "x", "points": [[1, 2], [3, 4]]}, fh)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['mask'\]"):
        load_case(case)
