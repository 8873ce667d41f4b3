"""Pipeline behaviour beyond the golden cases: sizes, drag types, input validation."""
import numpy as np
import pytest
import torch
from PIL import Image

import regiondrag as rd
from helpers import reference_components
from regiondrag.inputs import processing_size
from regiondrag.pipeline import RegionDragPipeline

FAST = dict(steps=4, start_t=0.5, end_t=0.2, seed=3)


@pytest.fixture(scope="module")
def pipe():
    return RegionDragPipeline(reference_components())


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_processing_size_rounds_to_nearest_multiple_of_8():
    assert processing_size(64, 64) == (64, 64)
    assert processing_size(100, 77) == (104, 80)
    assert processing_size(3, 5) == (8, 8)
    assert processing_size(515, 1020) == (512, 1024)


@pytest.mark.parametrize("hw", [(100, 77), (64, 64), (57, 90)])
def test_any_image_size_returns_the_input_size(pipe, hw):
    h, w = hw
    drag = rd.RegionPairs([_rect(h, w, 8, 8, 32, 32)], [_rect(h, w, 30, 20, 54, 44)])
    result = pipe.edit(_image(h, w), drag, **FAST)
    assert result.image.size == (w, h)
    ph, pw = processing_size(h, w)
    assert tuple(result.latent.shape) == (1, 4, ph // 8, pw // 8)


@pytest.mark.parametrize("kind", ["region_pairs", "polygon_pairs", "region_points", "point_pairs"])
@pytest.mark.parametrize("method", ["encode_then_cp", "cp_then_encode"])
def test_every_drag_type_and_method_runs(pipe, kind, method):
    h = w = 64
    drags = {
        "region_pairs": rd.RegionPairs([_rect(h, w, 8, 8, 32, 32)], [_rect(h, w, 30, 24, 54, 48)]),
        "polygon_pairs": rd.PolygonPairs([[(8, 8), (40, 8), (8, 40)]], [[(20, 20), (60, 20), (20, 60)]]),
        "region_points": rd.RegionPoints(_rect(h, w, 8, 8, 40, 40), [(20, 20)], [(40, 36)]),
        "point_pairs": rd.PointPairs(np.array([[10, 10], [11, 10], [18, 18]]), np.array([[40, 40], [41, 40], [48, 50]])),
    }
    result = pipe.edit(_image(h, w), drags[kind], method=method, **FAST)
    assert result.image.size == (w, h)
    assert torch.isfinite(result.latent).all()


def test_image_inputs_are_equivalent(pipe, tmp_path):
    img = _image(64, 64)
    drag = rd.RegionPairs([_rect(64, 64, 8, 8, 32, 32)], [_rect(64, 64, 30, 24, 54, 48)])
    path = tmp_path / "in.png"
    Image.fromarray(img).save(path)
    a = pipe.edit(img, drag, **FAST).latent
    b = pipe.edit(Image.fromarray(img), drag, **FAST).latent
    c = pipe.edit(str(path), drag, **FAST).latent
    assert torch.equal(a, b) and torch.equal(a, c)


def test_mask_keeps_pixels_outside(pipe):
    img = _image(64, 64)
    mask = _rect(64, 64, 0, 0, 64, 40)
    drag = rd.RegionPairs([_rect(64, 64, 8, 8, 24, 24)], [_rect(64, 64, 24, 8, 40, 24)])
    out = np.asarray(pipe.edit(img, drag, mask=mask, **FAST).image)
    np.testing.assert_array_equal(out[40:], img[40:])
    assert (out[:40] != img[:40]).any()


def test_points_identical_to_pixel_pairs_give_identical_edits(pipe):
    """PointPairs of a RegionPairs' own mapping reproduce the RegionPairs edit exactly."""
    img = _image(64, 64)
    rp = rd.RegionPairs([_rect(64, 64, 8, 8, 32, 32)], [_rect(64, 64, 30, 24, 54, 48)])
    src, trg = rp.to_points(1 / 8)
    pp = rd.PointPairs(src * 8, trg * 8)
    assert torch.equal(pipe.edit(img, rp, **FAST).latent, pipe.edit(img, pp, **FAST).latent)


def _bad_calls():
    h = w = 64
    ok = rd.RegionPairs([_rect(h, w, 8, 8, 32, 32)], [_rect(h, w, 30, 24, 54, 48)])
    img = _image(h, w)
    return [
        (dict(image=img, drag=ok, method="ddim"), "method"),
        (dict(image=img, drag=ok, steps=1), "steps"),
        (dict(image=img, drag=ok, start_t=1.5), "start_t"),
        (dict(image=img, drag=ok, steps=4, start_t=0.1), "start_t"),
        (dict(image=img, drag=ok, end_t=-0.1), "end_t"),
        (dict(image=img, drag=ok, noise_scale=-1.0), "noise_scale"),
        (dict(image=img, drag=ok, mask=np.ones((32, 32))), "editing mask"),
        (dict(image=_image(48, 48), drag=ok), "48"),
        (dict(image=np.zeros((64, 64), np.uint8), drag=ok), "HxWx3"),
        (dict(image="/no/such/file.png", drag=ok), "does not exist"),
        (dict(image=img, drag=rd.PointPairs(np.array([[10, 10]]), np.array([[70, 10]]))), "outside"),
    ]


@pytest.mark.parametrize("kwargs,match", _bad_calls())
def test_bad_input_is_a_clear_value_error(pipe, kwargs, match):
    params = {**FAST, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe.edit(params.pop("image"), params.pop("drag"), **params)


def test_wrong_drag_type_is_a_type_error(pipe):
    with pytest.raises(TypeError, match="RegionPairs"):
        pipe.edit(_image(64, 64), {"sources": []}, **FAST)


def test_unknown_backend_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: torch"):
        RegionDragPipeline(reference_components(), backend="warp")


@pytest.mark.gpu
def test_no_host_sync_inside_the_step_loops():
    """On CUDA the inversion and sampling loops never synchronise with the host."""
    comps = reference_components()
    pipe = RegionDragPipeline.from_pretrained(str(comps.source), ip_adapter=None, device="cuda", dtype=torch.float16)
    for name in ("_invert_sde", "_invert_ode", "_sample"):
        inner = getattr(pipe, name)

        def strict(*a, _inner=inner, **k):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _inner(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        setattr(pipe, name, strict)
    drag = rd.RegionPairs([_rect(64, 64, 8, 8, 32, 32)], [_rect(64, 64, 30, 24, 54, 48)])
    for method in ("encode_then_cp", "cp_then_encode"):
        pipe.edit(_image(64, 64), drag, method=method, **FAST)


def test_timings_cover_every_stage(pipe):
    drag = rd.RegionPairs([_rect(64, 64, 8, 8, 32, 32)], [_rect(64, 64, 30, 24, 54, 48)])
    t = pipe.edit(_image(64, 64), drag, **FAST).timings
    assert set(t) == {"inputs", "prepare", "text_encode", "image_encode", "vae_encode", "inversion", "sampling",
                      "region_ops", "vae_decode", "postprocess", "total"}
    assert 0 < t["region_ops"] <= t["sampling"] <= t["total"]


def test_unreadable_image_file_is_a_value_error(pipe, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("plain text")
    drag = rd.RegionPairs([_rect(64, 64, 8, 8, 32, 32)], [_rect(64, 64, 30, 24, 54, 48)])
    with pytest.raises(ValueError, match="could not read image"):
        pipe.edit(str(bad), drag, **FAST)


def test_zero_image_is_encoded_once():
    """The IP-Adapter's zero-image states depend on the weights only: encoded at the first edit, reused
    after, and the IP tokens are exactly those of encoding it every time."""
    from regiondrag.networks import ImageEncoder
    from regiondrag.runner import TorchRunner

    runner = TorchRunner(reference_components())
    enc = runner.image_encoder
    calls = []
    hook = enc.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].abs().sum().item()))
    size = enc.encoder.config.image_size
    pixels = [torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    with torch.no_grad():
        tokens = [enc(p) for p in pixels]
        fresh = ImageEncoder(enc.encoder, enc.projection)
        again = fresh(pixels[1])
    hook.remove()
    assert calls.count(0.0) == 2  # once for enc, once for the fresh module: never per call
    assert len(calls) == 5
    assert torch.equal(tokens[1], again) and not torch.equal(tokens[0], tokens[1])
