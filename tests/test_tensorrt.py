"""TensorRT backend on the tiny fixture model at 128x128 (needs TensorRT >= 10 and a CUDA GPU).

Each runner gets its own copy of the model: installing the K/V processors of a second runner on a
UNet detaches the first runner's eager K/V store (only the export reads it, but tests stay independent).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt "
                                       "--extra-index-url https://pypi.nvidia.com; needs a CUDA GPU)")

import regiondrag as rd  # noqa: E402
from helpers import TINY_IP, TINY_SD15  # noqa: E402
from regiondrag.engine.backends import tensorrt as trt_backend  # noqa: E402
from regiondrag.engine.backends.tensorrt import TensorRTRunner, build_engine  # noqa: E402
from regiondrag.engine.cache import ArtifactCache  # noqa: E402
from regiondrag.export.specs import make_specs  # noqa: E402
from regiondrag.runner import NETWORKS  # noqa: E402
from regiondrag.runner import TorchRunner  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
H = W = 128
REL = 2e-2  # fp16: max |trt - eager| <= REL * max(1, max |eager|), per output
FAST = dict(steps=4, start_t=0.5, end_t=0.2, seed=3)


def _components():
    from regiondrag.models import load_components

    return load_components(str(TINY_SD15), ip_adapter=str(TINY_IP), device="cuda", dtype=torch.float16)


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_close(got, ref, what):
    got, ref = _outputs(got), _outputs(ref)
    assert len(got) == len(ref), what
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape and g.dtype == r.dtype, (what, i, g.shape, r.shape, g.dtype, r.dtype)
        err, scale = (g.float() - r.float()).abs().max().item(), max(1.0, r.float().abs().max().item())
        assert err <= REL * scale, f"{what} output {i}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ArtifactCache(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def eager():
    return TorchRunner(_components())


@pytest.fixture(scope="module")
def runner(cache):
    messages = []
    r = TensorRTRunner(_components(), cache=cache, progress=messages.append)
    r.prepare(H, W)
    r.messages = messages
    return r


def _inputs(eager, name, spec):
    if name == "text_encoder":
        tok = eager.components.tokenizer("a photo of a cat", padding="max_length", max_length=77,
                                         truncation=True, return_tensors="pt")
        return (tok.input_ids.cuda(),)
    return spec.sample()


def test_first_prepare_builds_every_network(runner):
    assert [row["network"] for row in runner.report] == list(NETWORKS)  # the fixture has an IP-Adapter
    assert not any(row["hit"] for row in runner.report)
    assert all(row["path"].startswith(str(runner.cache.root)) for row in runner.report)
    timing = list(runner.cache.root.glob("tensorrt-*.timing"))
    assert len(timing) == 1 and timing[0].stat().st_size > 0
    for row in runner.report:  # only the engine (+ manifest) is kept
        names = sorted(p.name for p in Path(row["path"]).iterdir())
        assert names == sorted([f"{row['network']}.plan", "manifest.json"])


@pytest.mark.parametrize("name", NETWORKS)
def test_network_matches_eager(eager, runner, name):
    torch.manual_seed(0)
    spec = make_specs(eager, H, W)[name]
    inputs = _inputs(eager, name, spec)
    with torch.no_grad():
        ref = getattr(eager, name)(*inputs)
        got = getattr(runner, name)(*inputs)
    _assert_close(got, ref, name)


def test_capture_keys_values_survive_later_calls(eager, runner):
    torch.manual_seed(1)
    spec = make_specs(eager, H, W)["unet_capture"]
    runner.prepare(H, W)
    a, b = spec.sample(), spec.sample()
    with torch.no_grad():
        first = runner.unet_capture(*a)
        kv_first = [t.clone() for t in first[1:]]
        second = runner.unet_capture(*b)
        runner.unet(*b)
        runner.unet_replay(*b, *second[1:])
    assert all(torch.equal(x, y) for x, y in zip(first[1:], kv_first))  # slot 0 untouched by later calls
    assert all(x.data_ptr() != y.data_ptr() for x, y in zip(first[1:], second[1:]))
    assert runner.kv_pool.used == 2
    runner.prepare(H, W)  # a new edit reuses the slots
    assert runner.kv_pool.used == 0
    with torch.no_grad():
        again = runner.unet_capture(*a)
    assert [t.data_ptr() for t in again[1:]] == [t.data_ptr() for t in first[1:]]
    _assert_close(list(again[1:]), kv_first, "unet_capture K/V")


def test_cuda_graph_replay_matches(eager, runner, cache):
    graphed = TensorRTRunner(_components(), cache=cache, cuda_graph=True)
    graphed.prepare(H, W)
    assert all(row["hit"] for row in graphed.report)
    spec = make_specs(eager, H, W)["unet"]
    torch.manual_seed(2)
    with torch.no_grad():
        for _ in range(3):  # warm-up + capture, then replays with new inputs
            x = spec.sample()
            ref = runner.unet(*x).clone()
            got = graphed.unet(*x)
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


def test_second_prepare_is_a_cache_hit(runner, cache, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the engine should have come from the cache")

    monkeypatch.setattr(trt_backend, "build_engine", no_build)
    monkeypatch.setattr(trt_backend, "export_onnx", no_build)
    before = sorted(p.name for p in cache.root.iterdir())
    messages = []
    again = TensorRTRunner(_components(), cache=cache, progress=messages.append)
    again.prepare(H, W)
    assert all(row["hit"] for row in again.report) and len(again.report) == len(NETWORKS)
    assert all("found in the cache" in m for m in messages)
    assert sorted(p.name for p in cache.root.iterdir()) == before
    again.prepare(H, W)  # same resolution: nothing reloaded
    assert len(again.report) == len(NETWORKS)


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.mark.parametrize("method", ["encode_then_cp", "cp_then_encode"])
def test_edit_matches_torch_pipeline(cache, method):
    from regiondrag.pipeline import RegionDragPipeline

    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    drag = rd.RegionPairs([_rect(H, W, 16, 16, 64, 64)], [_rect(H, W, 48, 40, 96, 88)])
    ref = RegionDragPipeline(_components()).edit(image, drag, method=method, **FAST)
    pipe = RegionDragPipeline(_components())
    pipe.runner = TensorRTRunner(pipe.components, cache=cache)  # after the pipeline's own runner (see top)
    out = pipe.edit(image, drag, method=method, **FAST)
    assert pipe.runner.shape == (H, W)
    err = (out.latent.float() - ref.latent.float()).abs().max().item()
    assert err < 5e-2, f"final latent differs from eager PyTorch by {err:.3g}"
    assert out.image.size == ref.image.size
    out2 = pipe.edit(image, drag, method=method, **FAST)  # the next edit reuses the K/V slots
    torch.testing.assert_close(out2.latent, out.latent, atol=1e-3, rtol=0)


def test_unparsable_onnx_names_the_network(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"this is not an ONNX model")
    with pytest.raises(RuntimeError, match=r"building the TensorRT engine for bogus failed: cannot parse"):
        build_engine(bogus, tmp_path / "bogus.plan", {}, fp16=True, timing_cache_path=tmp_path / "t.timing")
    assert not (tmp_path / "bogus.plan").exists()
