"""Bounds on every number an edit takes, refused early and by name (one shared check for every front end)."""
import time

import numpy as np
import pytest
import torch

import regiondrag as rd
from helpers import reference_components
from regiondrag.params import ParameterTypeError, resolve_device
from regiondrag.pipeline import RegionDragPipeline, check_edit, check_edit_params

FAST = dict(steps=4, start_t=0.5, end_t=0.2)


@pytest.fixture(scope="module")
def pipe():
    p = RegionDragPipeline(reference_components())
    p.set_progress_bar_config(disable=True)
    return p


def _case(h=64, w=64):
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    src = np.zeros((h, w), np.uint8)
    src[8:24, 8:24] = 1
    return img, rd.RegionPairs([src], [np.roll(src, 16, axis=1)])


@pytest.mark.parametrize("steps", [1001, 5000, 10**6, 10**9, 10**30])
def test_steps_above_the_schedule_levels_are_refused_at_once(steps):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"steps must be an integer in \[2, 1000\]"):
        check_edit_params(steps=steps)
    assert time.perf_counter() - t0 < 5  # nothing of size `steps` is allocated (10**9 used to fill memory)


def test_steps_that_would_repeat_timesteps_are_refused():
    check_edit_params(steps=999)  # the finest grid without repeats on 1000 levels
    with pytest.raises(ValueError, match="repeats timesteps"):
        check_edit_params(steps=1000)


@pytest.mark.parametrize("name,value,error,match", [
    ("noise_scale", float("inf"), ValueError, "noise_scale must be a finite number"),
    ("noise_scale", float("nan"), ValueError, "noise_scale"),
    ("noise_scale", 1e6, ValueError, r"noise_scale must be a finite number in \[0, 100\]"),
    ("noise_scale", -0.1, ValueError, "noise_scale"),
    ("noise_scale", None, TypeError, "noise_scale must be a number"),
    ("start_t", None, TypeError, "start_t must be a number"),
    ("start_t", float("inf"), ValueError, "start_t"),
    ("end_t", "0.2", TypeError, "end_t must be a number"),
    ("end_t", float("nan"), ValueError, "end_t"),
    ("steps", None, TypeError, "steps must be an integer"),
    ("steps", True, TypeError, "steps must be an integer"),
    ("seed", 2**64, ValueError, r"seed must be an integer in \[0, 18446744073709551615\]"),
    ("seed", -1, ValueError, "seed must be an integer"),
    ("seed", 1.5, TypeError, "seed must be an integer"),
    ("prompt", 7, TypeError, "prompt must be a string"),
    ("prompt", "x" * 10_001, ValueError, "prompt has 10001 characters"),
])
def test_bad_parameters_are_named(name, value, error, match):
    with pytest.raises(error, match=match):
        check_edit_params(**{name: value})


def test_wrong_types_are_also_value_errors():
    """Callers that catch ValueError for bad input (the CLI, the UI) catch a wrong type too."""
    with pytest.raises(ValueError):
        check_edit_params(start_t=None)
    assert issubclass(ParameterTypeError, TypeError)


def test_largest_seed_runs_and_none_draws_one(pipe):
    img, drag = _case()
    big = pipe.edit(img, drag, seed=2**64 - 1, **FAST)
    assert big.seed == 2**64 - 1
    drawn = pipe.edit(img, drag, seed=None, **FAST)
    assert isinstance(drawn.seed, int)
    again = pipe.edit(img, drag, seed=drawn.seed, **FAST)  # the reported seed reproduces the edit
    assert torch.equal(drawn.latent, again.latent)


def test_prompt_none_is_the_empty_prompt(pipe):
    img, drag = _case()
    assert torch.equal(pipe.edit(img, drag, prompt=None, seed=1, **FAST).latent,
                       pipe.edit(img, drag, prompt="", seed=1, **FAST).latent)


def test_generator_replaces_seed(pipe):
    img, drag = _case()
    by_seed = pipe.edit(img, drag, seed=7, **FAST)
    gen = torch.Generator("cpu").manual_seed(7)
    by_gen = pipe.edit(img, drag, generator=gen, seed=123, **FAST)
    assert torch.equal(by_seed.latent, by_gen.latent) and by_gen.seed is None
    assert gen.initial_seed() == 7 and not torch.equal(gen.get_state(), torch.Generator().manual_seed(7).get_state())
    with pytest.raises(TypeError, match="torch.Generator"):
        pipe.edit(img, drag, generator=7, **FAST)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(device):
    with pytest.raises(ValueError, match="CUDA is not available.*available devices: cpu"):
        resolve_device(device)
    with pytest.raises(ValueError, match="CUDA is not available"):  # before any loading
        RegionDragPipeline.from_pretrained("/no/such/model", device=device)


def test_unknown_device_names_the_available_ones():
    with pytest.raises(ValueError, match="not a torch device; available: cpu"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")


def test_drag_checks_need_no_model():
    """check_edit runs every image/drag check at pixel and latent scale without a model."""
    img, _ = _case()
    region = np.zeros((64, 64), np.uint8)
    region[8:24, 8:24] = 1
    with pytest.raises(ValueError, match="handle 1 at \\(40, 40\\) lies outside the region"):
        check_edit(img, rd.RegionPoints(region, [(10, 10), (40, 40)], [(20, 20), (50, 50)]))
    with pytest.raises(ValueError, match="outside the image"):
        check_edit(img, rd.PointPairs([(1, 1)], [(70, 1)]))
    tiny = np.zeros((64, 64), np.uint8)
    tiny[3, 3] = 1  # a single pixel: nothing left on the 8x8 latent grid
    with pytest.raises(ValueError, match="vanishes"):
        check_edit(img, rd.RegionPairs([tiny], [np.roll(tiny, 16, axis=1)]))
    inp = check_edit(img, rd.RegionPoints(region, [(10, 10)], [(30, 20)]), steps=10)
    assert inp.latent_points[0].shape == inp.latent_points[1].shape


def test_region_points_validate_refuses_a_handle_outside_the_region():
    region = np.zeros((32, 32), np.uint8)
    region[4:12, 4:12] = 1
    region[6:10, 6:10] = 0  # a hole: inside the outline, so a handle there is a reference (§14.3 step 2)
    rd.RegionPoints(region, [(7, 7)], [(20, 20)]).validate(32, 32)
    with pytest.raises(ValueError, match="handle 0 at \\(20, 5\\) lies outside the region"):
        rd.RegionPoints(region, [(20, 5)], [(25, 25)]).validate(32, 32)


def test_image_sides_are_bounded():
    from regiondrag.inputs import load_image

    with pytest.raises(ValueError, match="sides of at most 4096"):
        load_image(np.zeros((8, 4097, 3), np.uint8))


def test_progress_bars_per_stage_and_the_callback(pipe):
    """One bar per stage (the preview's inversion named apart), the callback told before every step,
    and set_progress_bar_config as in diffusers."""
    import io

    img, drag = _case()
    out, calls = io.StringIO(), []
    bars = RegionDragPipeline(pipe.components)
    bars.set_progress_bar_config(file=out, ascii=True)
    bars.edit(img, drag, method="cp_then_encode", progress=lambda *a: calls.append(a), **FAST)
    s = 2  # int(start_t * steps)
    assert calls == [(stage, i, s) for stage in ("inversion (preview)", "inversion", "sampling") for i in range(s)]
    text = out.getvalue()
    for stage in ("inversion (preview)", "inversion", "sampling"):
        assert f"{stage}: 100%" in text
    silent = io.StringIO()
    bars.set_progress_bar_config(disable=True, file=silent)
    bars.edit(img, drag, **FAST)
    assert silent.getvalue() == ""
