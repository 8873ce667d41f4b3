"""End-to-end CLI: `python -m regiondrag.engine` as a user runs it, on the tiny random model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import FIXTURES

REPO = Path(__file__).resolve().parents[1]
SAMPLE = FIXTURES / "dragbench-animals"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, REGIONDRAG_CACHE=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1",
             OMP_NUM_THREADS="2")
    e.pop("REGIONDRAG_DEBUG", None)
    return e


def run(env, *args):
    return subprocess.run([sys.executable, "-m", "regiondrag.engine", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_edit_dragbench_sample_with_tiny(env, tmp_path):
    out = tmp_path / "out" / "edit.png"
    r = run(env, "edit", "--sample", str(SAMPLE), "--out", str(out), "--model", "tiny", "--steps", "10")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (512, 512)
    assert "RANDOM weights" in r.stderr and "sampling" in r.stderr
    assert r.stdout.strip() == str(out)
    # The benchmark's editing mask keeps the pixels outside it.
    img = np.asarray(Image.open(SAMPLE / "original_image.png").convert("RGB"))
    mask = np.asarray(Image.open(SAMPLE / "mask.png")) > 0
    np.testing.assert_array_equal(np.asarray(Image.open(out))[~mask], img[~mask])


def test_edit_image_and_drag_json(env, tmp_path):
    out = tmp_path / "edit.png"
    r = run(env, "edit", "--image", "examples/dog.png", "--drag", "examples/drag_polygon_pairs.json",
            "--out", str(out), "--model", "tiny", "--steps", "4", "--method", "cp_then_encode", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (512, 512)


@pytest.mark.parametrize("args,match", [
    (["--image", "examples/dog.png", "--out", "x.png"], "needs --image and --drag"),
    (["--image", "examples/nope.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.png"], "does not exist"),
    (["--sample", "/no/such/case", "--out", "x.png"], "no/such/case"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.png",
      "--model", "/no/such/model"], "neither an existing path nor a hub id"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.png",
      "--model", "tiny", "--start-t", "2"], "start_t"),
])
def test_errors_are_one_line_and_nonzero(env, args, match):
    r = run(env, "edit", *args)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and match in last
    assert "Traceback" not in r.stderr


def test_bad_drag_json_names_the_problem(env, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "lasso", "sources": [], "targets": []}))
    r = run(env, "edit", "--image", "examples/dog.png", "--drag", str(bad), "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "lasso" in r.stderr and "region_pairs" in r.stderr


def test_info(env):
    r = run(env, "info")
    assert r.returncode == 0
    assert "torch" in r.stdout and "devices" in r.stdout and "cache" in r.stdout


def test_build_then_edit_with_onnxruntime(env, tmp_path):
    """`build` caches the artifacts; `edit --backend onnxruntime` loads them without rebuilding."""
    pytest.importorskip("onnxruntime")
    from regiondrag.dragfile import save_drag
    from regiondrag.drags import RegionPairs

    img = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    src = np.zeros((128, 128), np.uint8)
    src[16:48, 16:48] = 1
    drag_json = save_drag(RegionPairs([src], [np.roll(src, 40, axis=1)]), tmp_path / "drag.json")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    r = run(env, "build", "--model", "tiny", "--backend", "onnxruntime", "--height", "128", "--width", "128", *cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("built") == 7 and "unet_replay" in r.stdout
    r = run(env, "build", "--model", "tiny", "--backend", "onnxruntime", "--height", "128", "--width", "128", *cache)
    assert r.returncode == 0 and r.stdout.count("cached") == 7
    out = tmp_path / "o.png"
    r = run(env, "edit", "--image", str(tmp_path / "img.png"), "--drag", str(drag_json), "--out", str(out),
            "--model", "tiny", "--backend", "onnxruntime", "--steps", "10", *cache)
    assert r.returncode == 0, r.stderr
    assert "building" not in r.stderr  # every artifact came from the cache
    assert Image.open(out).size == (128, 128)
