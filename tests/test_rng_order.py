"""Order, shapes and values of the random draws of an edit (ALGORITHM.md §13, §3.4, §5, §8)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from regiondrag.drags import RegionPairs, border_points
from regiondrag.models import load_components
from regiondrag.pipeline import RegionDragPipeline
from regiondrag.schedule import make_schedule, timestep_grid

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-sd15"
STEPS, START_T = 10, 0.5
S = int(START_T * STEPS)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    comps = load_components(str(TINY), ip_adapter=str(TINY / "ip_adapter"))
    return RegionDragPipeline(comps)


@pytest.fixture(scope="module")
def edit_inputs():
    """64x64 image; a source square dragged onto a LARGER target, so source points repeat."""
    image = np.random.default_rng(11).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    src = np.zeros((64, 64), np.uint8)
    src[8:24, 8:24] = 1
    trg = np.zeros((64, 64), np.uint8)
    trg[24:56, 16:48] = 1
    drag = RegionPairs([src], [trg])
    src_pts, trg_pts = drag.to_points(1 / 8)
    assert len(np.unique(src_pts, axis=0)) < len(src_pts)  # duplicates present: they count in N_blur
    return image, drag


class DrawRecorder:
    """Wraps ``torch.randn``: records (shape, generator, values) of every call."""

    def __init__(self):
        self.draws = []
        self._real = torch.randn

    def __call__(self, *args, **kwargs):
        out = self._real(*args, **kwargs)
        if "size" in kwargs:
            shape = kwargs["size"]
        elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
            shape = args[0]
        else:
            shape = args
        self.draws.append((tuple(int(s) for s in shape), kwargs.get("generator"), out.detach().clone()))
        return out

    @property
    def shapes(self):
        return [d[0] for d in self.draws]


def _recorded_edit(pipe, monkeypatch, *args, **kwargs):
    rec = DrawRecorder()
    global_state = torch.get_rng_state()
    with monkeypatch.context() as m:
        m.setattr(torch, "randn", rec)
        result = pipe.edit(*args, **kwargs)
    assert torch.randn is rec._real
    # nothing was drawn from the global generator behind our back (randn_like, rand, dropout, ...)
    assert torch.equal(torch.get_rng_state(), global_state)
    return rec, result


def _check_one_generator_replays(rec, seed):
    """Every draw came from one generator, in order: a fresh generator seeded with ``seed`` drawing the
    same shapes reproduces every recorded value."""
    gens = {id(g) for _, g, _ in rec.draws}
    assert len(gens) == 1 and rec.draws[0][1] is not None
    fresh = torch.Generator().manual_seed(seed)
    for shape, _, values in rec.draws:
        assert torch.equal(values, torch.randn(shape, generator=fresh))


def _recorded_method(pipe, monkeypatch, edit_inputs, method: str, seed: int):
    """The draws of one edit with ``method`` on the 64x64 inputs (an 8x8 latent)."""
    image, drag = edit_inputs
    rec, _ = _recorded_edit(pipe, monkeypatch, image, drag, method=method, steps=STEPS, start_t=START_T,
                            noise_scale=0.6, seed=seed)
    return rec, drag, 8, 8


def test_etcp_draw_order(pipe, monkeypatch, edit_inputs):
    seed = 123
    rec, drag, h, w = _recorded_method(pipe, monkeypatch, edit_inputs, "encode_then_cp", seed)
    n_blur = len(drag.to_points(1 / 8)[0])
    assert rec.shapes == [(1, 4, h, w)] + [(1, 4, h, w)] * S + [(4, n_blur)]
    _check_one_generator_replays(rec, seed)
    # golden: the VAE posterior noise is the first draw of a fresh generator seeded with `seed`
    assert torch.equal(rec.draws[0][2], torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(seed)))


def test_cpte_draw_order(pipe, monkeypatch, edit_inputs):
    seed = 321
    rec, drag, h, w = _recorded_method(pipe, monkeypatch, edit_inputs, "cp_then_encode", seed)
    src_pts, trg_pts = drag.to_points(1 / 8)
    n_blur = len(border_points(trg_pts)) + len(src_pts)
    assert len(border_points(trg_pts)) > 0
    assert rec.shapes == [(1, 4, h, w), (1, 4, h, w), (4, n_blur)] + [(1, 4, h, w)] * S
    _check_one_generator_replays(rec, seed)
    assert torch.equal(rec.draws[0][2], torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("method", ["encode_then_cp", "cp_then_encode"])
def test_seed_determinism(pipe, edit_inputs, method):
    image, drag = edit_inputs
    kw = dict(method=method, steps=STEPS, start_t=START_T, noise_scale=0.6)
    a = pipe.edit(image, drag, seed=5, **kw).latent
    b = pipe.edit(image, drag, seed=5, **kw).latent
    c = pipe.edit(image, drag, seed=6, **kw).latent
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-3


def test_global_rng_does_not_change_the_result(pipe, edit_inputs):
    image, drag = edit_inputs
    kw = dict(method="encode_then_cp", steps=STEPS, start_t=START_T, noise_scale=0.6, seed=9)
    torch.manual_seed(0)
    a = pipe.edit(image, drag, **kw).latent
    torch.manual_seed(999)
    torch.randn(1000)
    b = pipe.edit(image, drag, **kw).latent
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- against the reference run
def _fixture_edit(pipe, monkeypatch, case):
    ref = np.load(FIXTURES / f"{case}.npz")
    method = "encode_then_cp" if str(ref["method"]) == "Encode then CP" else "cp_then_encode"
    drag = RegionPairs(list(ref["src_regions"]), list(ref["trg_regions"]))
    encoded = []
    real_encode = pipe._encode_latent

    def encode_spy(image, gen):
        z = real_encode(image, gen)
        encoded.append(z)
        return z

    monkeypatch.setattr(pipe, "_encode_latent", encode_spy)
    rec, _ = _recorded_edit(
        pipe, monkeypatch, ref["ori_image"], drag, prompt=str(ref["prompt"]), method=method,
        steps=int(ref["steps"]), start_t=float(ref["start_t"]), end_t=float(ref["end_t"]),
        noise_scale=float(ref["noise_scale"]), seed=int(ref["seed"]), mask=ref["mask"],
        preview=None if method == "encode_then_cp" else ref["preview"])
    monkeypatch.undo()
    return ref, rec, encoded


def test_etcp_draws_match_reference_fixture(pipe, monkeypatch):
    ref, rec, encoded = _fixture_edit(pipe, monkeypatch, "etcp_onepair_fullmask")
    steps, s_ref = int(ref["steps"]), len(ref["forward0_timesteps"])
    lat = tuple(ref["vae_latent_ori"].shape)
    assert rec.shapes == [lat] * (1 + s_ref) + [(4, len(ref["blur_pts_latent"]))]
    # (1) the VAE posterior sample uses the first draw: the latent equals the reference's z0
    torch.testing.assert_close(encoded[0], torch.from_numpy(ref["vae_latent_ori"]), atol=1e-5, rtol=0)
    # (2) the reference's forward noise ξ_j, recovered from its hook latents, is draw 1 + j
    plan = make_schedule(steps, float(ref["start_t"]), float(ref["end_t"]), True, pipe.components.scheduler_config)
    hooks = torch.from_numpy(ref["forward0_hook_latents"])
    for j, c in enumerate(plan.forward):
        xi_ref = (hooks[j + 1] - c.c_prev * hooks[j]) / c.c_noise
        torch.testing.assert_close(rec.draws[1 + j][2], xi_ref, atol=1e-5, rtol=0)


def test_cpte_draws_match_reference_fixture(pipe, monkeypatch):
    ref, rec, encoded = _fixture_edit(pipe, monkeypatch, "cpte_twopairs_partmask")
    s_ref = len(ref["forward0_timesteps"])
    lat = tuple(ref["vae_latent_ori"].shape)
    assert rec.shapes == [lat, lat, (4, len(ref["blur_pts_latent"]))] + [lat] * s_ref
    torch.testing.assert_close(encoded[0], torch.from_numpy(ref["vae_latent_ori"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(encoded[1], torch.from_numpy(ref["vae_latent_preview"]), atol=1e-5, rtol=0)


def test_loaded_scheduler_config_uses_linspace_grid(pipe):
    """diffusers fills PNDM's default ``timestep_spacing="leading"`` into the loaded config; the
    components must expose the keys the file really sets, so the grid is DPMSolver's linspace one."""
    cfg = pipe.components.scheduler_config
    assert cfg.get("timestep_spacing", "linspace") == "linspace"
    assert timestep_grid(20, cfg).tolist()[:3] == [999, 949, 899]
    assert timestep_grid(20, cfg).tolist()[-1] == 50
