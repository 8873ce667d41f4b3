"""End-to-end CLI: `python -m regiondrag.engine` as a user runs it, on the tiny random model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import regiondrag as rd

from helpers import FIXTURES

REPO = Path(__file__).resolve().parents[1]
SAMPLE = FIXTURES / "dragbench-animals"
NO_MODEL = ["--model", "/no/such/model"]  # loading it fails: an error about anything else came first


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
    # Refused before loading: the model path does not exist, yet the error is about the input.
    (["--image", "examples", "--drag", "examples/drag_region_pairs.json", "--out", "x.png", *NO_MODEL],
     "'examples' is a directory"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.png",
      "--mask", "no-such-mask.png", *NO_MODEL], "--mask editing mask 'no-such-mask.png' does not exist"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.png",
      "--noise-scale", "inf", *NO_MODEL], "noise_scale must be a finite number"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.png",
      "--steps", "1000000000", *NO_MODEL], "steps must be an integer in [2, 1000]"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.png",
      "--seed", str(2**64), *NO_MODEL], "seed must be an integer"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "README.md/x.png",
      *NO_MODEL], "--out 'README.md/x.png' cannot be written"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.txt",
      *NO_MODEL], "--out 'x.txt' needs one of the extensions"),
    (["--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json", "--out", "x.png",
      "--model", "tiny", "--ip-adapter", "/no/such/adapter"], "or 'none' to edit without the IP-Adapter"),
])
def test_errors_are_one_line_and_nonzero(env, args, match):
    r = run(env, "edit", *args)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and match in last
    assert "Traceback" not in r.stderr


def test_handle_outside_its_region_is_refused_before_loading(env, tmp_path):
    from regiondrag.dragfile import save_drag

    region = np.zeros((512, 512), np.uint8)
    region[100:200, 100:200] = 1
    drag = save_drag(rd.RegionPoints(region, [(150, 150), (300, 300)], [(180, 150), (320, 300)]),
                     tmp_path / "drag.json")
    r = run(env, "edit", "--image", "examples/dog.png", "--drag", str(drag), "--out", str(tmp_path / "o.png"),
            *NO_MODEL)
    assert r.returncode == 2 and "error: handle 1 at (300, 300) lies outside the region" in r.stderr
    assert "loading" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_device_without_cuda(env, tmp_path):
    r = run(env, "edit", "--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json",
            "--out", str(tmp_path / "o.png"), "--device", "cuda", *NO_MODEL)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: device 'cuda': CUDA is not available")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_loading(env, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = run(env, "edit", "--image", "examples/dog.png", "--drag", "examples/drag_region_pairs.json",
                "--out", str(ro / "o.png"), *NO_MODEL)
    finally:
        ro.chmod(0o700)
    assert r.returncode == 2 and "cannot be written: Permission denied" in r.stderr
    assert "Traceback" not in r.stderr and not list(ro.iterdir())


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
    # Each network in a build process of its own; the in-process build then finds every one: same keys.
    r = run(env, "build", "--model", "tiny", "--backend", "onnxruntime", "--height", "128", "--width", "128",
            "--isolate", *cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("built") == 6 and "unet_replay" in r.stdout  # the plain UNet runs in unet_capture
    peaks = [float(line.split()[4]) for line in r.stdout.splitlines()[1:] if " built " in line]
    assert len(peaks) == 6 and all(p > 0 for p in peaks)  # each process's own peak memory
    r = run(env, "build", "--model", "tiny", "--backend", "onnxruntime", "--height", "128", "--width", "128", *cache)
    assert r.returncode == 0 and r.stdout.count("cached") == 6
    out = tmp_path / "o.png"
    r = run(env, "edit", "--image", str(tmp_path / "img.png"), "--drag", str(drag_json), "--out", str(out),
            "--model", "tiny", "--backend", "onnxruntime", "--steps", "10", *cache)
    assert r.returncode == 0, r.stderr
    assert "building" not in r.stderr and "0 built" in r.stderr  # every artifact came from the cache
    assert Image.open(out).size == (128, 128)


def test_console_script_is_the_same_command(env):
    """`regiondrag` (pyproject's console script) runs the CLI and names itself in its usage line."""
    script = Path(sys.executable).parent / "regiondrag"
    if not script.is_file():
        pytest.skip(f"no console script beside {sys.executable} (package not installed with pip)")
    r = subprocess.run([str(script), "--help"], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: regiondrag ") and "edit" in r.stdout
    assert run(env, "--help").stdout.startswith("usage: python -m regiondrag.engine ")
