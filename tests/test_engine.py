"""Compiled engine on the CPU: exported networks, backends against eager PyTorch, the artifact cache."""
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import regiondrag as rd
from helpers import METHOD_NAMES, TINY_IP, TINY_SD15, golden_case
from regiondrag.engine.cache import ArtifactCache, cache_key
from regiondrag.export.specs import make_specs
from regiondrag.models import load_components
from regiondrag.pipeline import RegionDragPipeline

pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime ([onnx] extra)")

# Per-dtype tolerances (max abs) of a compiled network's outputs against eager PyTorch.
NETWORK_TOL = {torch.float32: 1e-4, torch.float16: 2e-2}
EDIT_LATENT_TOL = {torch.float32: 1e-4, torch.float16: 5e-2}
SIZE = 128  # the golden cases' resolution


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ArtifactCache(tmp_path_factory.mktemp("engines"))


def _pipe(backend, cache):
    comps = load_components(str(TINY_SD15), ip_adapter=str(TINY_IP))
    return RegionDragPipeline(comps, backend=backend, cache_dir=cache.root)


@pytest.fixture(scope="module")
def ort_pipe(cache):
    pipe = _pipe("onnxruntime", cache)
    pipe.runner.prepare(SIZE, SIZE)
    return pipe


def _inputs(runner, spec, network):
    if network == "text_encoder":
        return (torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(0)),)
    torch.manual_seed(0)
    return spec.sample()


@pytest.mark.parametrize("network", ["text_encoder", "image_encoder", "vae_encoder", "vae_decoder", "unet",
                                     "unet_capture", "unet_replay"])
def test_onnx_network_matches_pytorch(ort_pipe, network):
    import onnx

    runner = ort_pipe.runner
    spec = make_specs(runner, SIZE, SIZE)[network]
    args = _inputs(runner, spec, network)
    want, got = runner.eager[network](*args), getattr(runner, network)(*args)
    want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
    assert len(want) == len(got) == len(spec.output_names)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        assert (w - g).abs().max().item() <= NETWORK_TOL[runner.dtype]
    graph = "unet_capture" if network == "unet" else network  # the plain UNet runs in the capture graph
    row = next(r for r in runner.report if r["network"] == graph)
    path = f"{row['path']}/{graph}.onnx"
    onnx.checker.check_model(path)
    model = onnx.load(path)
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == list(spec.input_names)


def test_capture_then_replay_round_trip(ort_pipe):
    """Keys/values captured by the ONNX capture graph, replayed by the ONNX replay graph, give the
    eager replay's ε on the eager capture's keys/values."""
    runner = ort_pipe.runner
    spec = make_specs(runner, SIZE, SIZE)["unet_capture"]
    torch.manual_seed(1)
    x, t, cond, ip = spec.sample()
    x2 = torch.randn_like(x)
    runner.unet_capture.reset_pool()
    kv_onnx = runner.unet_capture(x, t, cond, ip)[1:]
    kv_eager = runner.eager["unet_capture"](x, t, cond, ip)[1:]
    got = runner.unet_replay(x2, t, cond, ip, *kv_onnx)
    want = runner.eager["unet_replay"](x2, t, cond, ip, *kv_eager)
    assert (got - want).abs().max() <= NETWORK_TOL[torch.float32]
    assert (want - runner.eager["unet"](x2, t, cond, ip)).abs().max() > 1e-3  # replay does change ε


def _golden_edit(pipe, name):
    d = golden_case(name)
    drag = rd.RegionPairs(list(d["src_regions"]), list(d["trg_regions"]))
    return d, pipe.edit(d["ori_image"], drag, prompt=str(d["prompt"]), method=METHOD_NAMES[str(d["method"])],
                        noise_scale=float(d["noise_scale"]), seed=int(d["seed"]), mask=d["mask"])


@pytest.mark.parametrize("name", ["etcp_onepair_fullmask", "cpte_twopairs_partmask"])
def test_onnxruntime_edit_matches_torch(ort_pipe, name):
    d, result = _golden_edit(ort_pipe, name)
    assert (result.latent - torch.from_numpy(d["final_latent"])).abs().max() <= EDIT_LATENT_TOL[torch.float32]
    runner = ort_pipe.runner  # the plain UNet (cp_then_encode's preview) runs in the capture session
    assert "unet" not in {r["network"] for r in runner.report}
    assert runner.unet.session is runner.unet_capture.session


@pytest.mark.slow
@pytest.mark.parametrize("name", ["etcp_onepair_fullmask", "cpte_twopairs_partmask"])
def test_compiled_edit_matches_torch(cache, name):
    pipe = _compiled_pipe(cache)
    d, result = _golden_edit(pipe, name)
    assert (result.latent - torch.from_numpy(d["final_latent"])).abs().max() <= EDIT_LATENT_TOL[torch.float32]
    assert {r["network"] for r in pipe.runner.report} == {"unet_capture", "unet_replay", "vae_encoder", "vae_decoder"}
    for row in pipe.runner.report:  # weights in a blob beside the .so (half the host memory once loaded)
        names = zipfile.ZipFile(Path(row["path"]) / f"{row['network']}.pt2").namelist()
        assert any(n.endswith("weights.blob") for n in names), names


_COMPILED = {}


def _compiled_pipe(cache):
    if "pipe" not in _COMPILED:  # AOTInductor builds take about a minute on the CPU: once per session
        _COMPILED["pipe"] = _pipe("compiled", cache)
    return _COMPILED["pipe"]


def test_second_prepare_is_a_cache_hit(cache, ort_pipe):
    pipe = _pipe("onnxruntime", cache)
    pipe.runner.prepare(SIZE, SIZE)
    assert pipe.runner.report and all(r["hit"] for r in pipe.runner.report)


# ----------------------------------------------------------------------------- the cache itself
def _writer(payload: bytes, calls: list):
    def build(d):
        calls.append(1)
        (d / "artifact.bin").write_bytes(payload)
    return build


def test_cache_hit_and_corruption_rebuild(tmp_path):
    cache, calls = ArtifactCache(tmp_path), []
    key = cache_key(network="unet", shapes=[1, 2])
    d, hit = cache.get_or_build(key, _writer(b"x" * 1000, calls))
    assert not hit and calls == [1] and (d / "artifact.bin").read_bytes() == b"x" * 1000
    d, hit = cache.get_or_build(key, _writer(b"x" * 1000, calls))
    assert hit and calls == [1]
    (d / "artifact.bin").write_bytes(b"x" * 500)  # truncated
    assert cache.lookup(key) is None and not d.exists()  # detected, removed, never loaded
    d, hit = cache.get_or_build(key, _writer(b"x" * 1000, calls))
    assert not hit and calls == [1, 1]
    (d / "artifact.bin").write_bytes(b"y" * 1000)  # same size, different bytes
    assert cache.lookup(key) is None
    d, _ = cache.get_or_build(key, _writer(b"x" * 1000, calls))
    (d / "manifest.json").write_text("{not json")
    assert cache.lookup(key) is None


def test_failed_build_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)

    def broken(d):
        (d / "half.bin").write_bytes(b"1")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.get_or_build("k", broken)
    assert cache.lookup("k") is None and list(tmp_path.glob("k*")) == []


def test_concurrent_builds_of_one_key(tmp_path):
    cache, calls, results = ArtifactCache(tmp_path), [], []

    def slow_build(d):
        calls.append(1)
        threading.Event().wait(0.3)
        (d / "a.bin").write_bytes(b"z" * 4096)

    threads = [threading.Thread(target=lambda: results.append(cache.get_or_build("same", slow_build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]  # built once, the others waited and hit
    assert sorted(hit for _, hit in results) == [False, True, True, True]
    assert cache.verify(results[0][0])


def test_key_changes_with_shape_precision_and_model(ort_pipe):
    runner = ort_pipe.runner
    specs_a, specs_b = make_specs(runner, 128, 128), make_specs(runner, 128, 192)
    base = runner.key("unet", specs_a["unet"])
    assert runner.key("unet", specs_b["unet"]) != base
    assert runner.key("unet_replay", specs_a["unet_replay"]) != base
    old = runner.precision
    try:
        runner.precision = "fp16"
        assert runner.key("unet", specs_a["unet"]) != base
    finally:
        runner.precision = old
    fp = runner.components.fingerprint
    try:
        runner.components.fingerprint = "another-model"
        assert runner.key("unet", specs_a["unet"]) != base
    finally:
        runner.components.fingerprint = fp
    assert runner.key("unet", specs_a["unet"]) == base


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="onnxruntime"):
        RegionDragPipeline(load_components(str(TINY_SD15), ip_adapter=None), backend="openvino")


# ----------------------------------------------------------------------------- CUDA (never run on the CPU)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["compiled", "onnxruntime"])
def test_fp16_full_size_edit_matches_torch(backend, tmp_path):
    """Full-size SD-1.5 architecture (random weights), 512x512, fp16: a compiled backend's edit
    equals the eager one up to fp16 rounding."""
    if backend == "onnxruntime":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            pytest.skip("onnxruntime-gpu is not installed")
    g = np.random.default_rng(0)
    image = g.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    src = np.zeros((512, 512), np.uint8)
    src[180:300, 120:240] = 1
    drag = rd.RegionPairs([src], [np.roll(src, 96, axis=1)])
    latents = {}
    for name in ("torch", backend):
        pipe = RegionDragPipeline.from_pretrained("random-sd15", device="cuda", dtype=torch.float16,
                                                  backend=name, cache_dir=tmp_path)
        latents[name] = pipe.edit(image, drag, seed=0).latent.float()
        del pipe
        torch.cuda.empty_cache()
    assert (latents["torch"] - latents[backend]).abs().max() <= EDIT_LATENT_TOL[torch.float16]


@pytest.mark.gpu
def test_cuda_graph_replay_equals_direct_call():
    from regiondrag.engine.backends.compiled import CudaGraphed

    w = torch.randn(64, 64, device="cuda")

    def fn(x, y):
        return (x @ w).relu() + y, x.sum(dim=0)

    args = (torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda"))
    graphed = CudaGraphed(fn, args)
    for _ in range(3):
        new = (torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda"))
        want = fn(*new)
        got = graphed(*new)
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b)


def test_onnxruntime_refuses_bf16_before_exporting(cache):
    """ONNX Runtime tensors are bound with numpy element types (no bf16): refused when the runner is
    made, before any export, naming the precisions that work."""
    comps = load_components(str(TINY_SD15), ip_adapter=None, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float16 models, not bfloat16"):
        RegionDragPipeline(comps, backend="onnxruntime", cache_dir=cache.root)


def test_freed_eager_weights_keep_the_edit_and_refuse_a_new_build(cache, ort_pipe):
    """keep_eager_weights=False: the eager copies go before the ONNX sessions load, the edit is unchanged,
    a resolution whose artifacts are not cached is refused by name (and the loaded one still works),
    and FLOP counting with the freed eager networks is refused."""
    from regiondrag.engine.flops import count_edit_flops

    pipe = _pipe("onnxruntime", cache)
    pipe.runner.keep_eager_weights = False
    for name in ("cpte_twopairs_partmask", "etcp_onepair_fullmask"):
        d, result = _golden_edit(pipe, name)
        assert (result.latent - torch.from_numpy(d["final_latent"])).abs().max() <= EDIT_LATENT_TOL[torch.float32]
    comps = pipe.components
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.image_encoder):  # every network is a session
        assert all(p.is_meta for p in module.parameters())
    with pytest.raises(RuntimeError, match="keep_eager_weights"):
        pipe.runner.prepare(SIZE + 64, SIZE)
    assert pipe.runner.shape == (SIZE, SIZE)  # refused before anything changed
    d, again = _golden_edit(pipe, "etcp_onepair_fullmask")
    assert torch.equal(again.latent, result.latent)
    with pytest.raises(RuntimeError, match="keep_eager_weights"):
        count_edit_flops(lambda: None, pipe.runner)


def test_freed_eager_weights_leave_memory_after_an_export(tmp_path):
    """An onnxruntime prepare that exports (empty cache) and frees the eager weights leaves none of the
    UNet's weight tensors alive: the exporter's rewrite rules kept the last exported graph, and with it
    every weight, until regiondrag.export.onnx cleared them (so freeing freed nothing)."""
    import gc
    import weakref

    comps = load_components(str(TINY_SD15), ip_adapter=str(TINY_IP))
    weights = [weakref.ref(p) for p in comps.unet.parameters()]
    pipe = RegionDragPipeline(comps, backend="onnxruntime", cache_dir=tmp_path)
    pipe.runner.keep_eager_weights = False
    pipe.runner.prepare(SIZE, SIZE)
    assert not all(row["hit"] for row in pipe.runner.report)  # it did export
    gc.collect()
    assert sum(w() is not None for w in weights) == 0


def test_build_network_frees_what_its_build_does_not_need(tmp_path):
    """build_network (what a build process of its own runs) builds one artifact, under the key prepare
    uses, after freeing every weight its build does not need: for the UNet the text encoder's, the
    VAE's and the image encoder's own (its IP projection lives in the UNet and stays)."""
    comps = load_components(str(TINY_SD15), ip_adapter=str(TINY_IP))
    runner = RegionDragPipeline(comps, backend="onnxruntime", cache_dir=tmp_path).runner
    row = runner.build_network(SIZE, SIZE, "unet_capture")
    assert row["network"] == "unet_capture" and not row["hit"] and Path(row["path"], "unet_capture.onnx").is_file()
    for module in (comps.text_encoder, comps.vae, comps.image_encoder):
        assert all(p.is_meta for p in module.parameters())
    assert not any(p.is_meta for p in comps.unet.parameters())
    assert runner.build_network(SIZE, SIZE, "unet") is None  # onnxruntime serves it from unet_capture's session
    fresh = RegionDragPipeline(load_components(str(TINY_SD15), ip_adapter=str(TINY_IP)), backend="onnxruntime",
                               cache_dir=tmp_path).runner
    assert fresh.key("unet_capture", make_specs(fresh, SIZE, SIZE)["unet_capture"]) == Path(row["path"]).name


def test_freeing_keeps_the_weights_an_eager_network_shares():
    """compiled replaces the UNet and the VAE but not the image encoder, whose IP projection lives in the
    UNet: those weights stay, every other UNet and VAE weight goes."""
    from regiondrag.engine.backends.compiled import CompiledRunner

    runner = CompiledRunner(load_components(str(TINY_SD15), ip_adapter=str(TINY_IP)))
    kept = {id(p) for p in runner.image_encoder.parameters()}
    runner._release_eager(set(runner.networks))
    comps = runner.components
    assert all(p.is_meta for p in comps.vae.parameters())
    unet = list(comps.unet.parameters())
    assert any(p.is_meta for p in unet) and all(p.is_meta == (id(p) not in kept) for p in unet)
    assert not any(p.is_meta for p in comps.image_encoder.parameters())
    assert not any(p.is_meta for p in comps.text_encoder.parameters())
