"""Timestep lists and step formulas (ALGORITHM.md §0, §4-6, §9b), checked against diffusers, the spec's
worked numbers, the reference fixtures and a float64 re-derivation written from the spec's text."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from regiondrag.schedule import (
    alphas_cumprod_from_config,
    forward_ode_step,
    forward_sde_step,
    make_schedule,
    sample_step,
    timestep_grid,
)

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ("etcp_onepair_fullmask", "cpte_twopairs_partmask")


@pytest.fixture(scope="module")
def sd15_config() -> dict:
    """SD-1.5's scheduler config (the tiny model copies it): no ``timestep_spacing`` key."""
    cfg = json.loads((FIXTURES / "tiny-sd15" / "scheduler" / "scheduler_config.json").read_text())
    assert "timestep_spacing" not in cfg
    assert cfg["beta_schedule"] == "scaled_linear" and cfg["num_train_timesteps"] == 1000
    return cfg


def _diffusers_timesteps(cfg: dict, steps: int) -> np.ndarray:
    sched = DPMSolverMultistepScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    return sched.timesteps.numpy().astype(np.int64)


# --------------------------------------------------------------------------- §0 timestep grid
def test_grid_sd15_20_steps_matches_spec_worked_list(sd15_config):
    expected = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    grid = timestep_grid(20, sd15_config)
    assert grid.dtype == np.int64
    assert grid.tolist() == expected


def test_grid_sd15_10_steps_matches_spec_worked_list(sd15_config):
    assert timestep_grid(10, sd15_config).tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


def test_grid_leading_differs_from_default(sd15_config):
    leading = timestep_grid(20, dict(sd15_config, timestep_spacing="leading"))
    # 1000 // 21 = 47; k * 47 for k = 20..1, plus steps_offset = 1
    assert leading.tolist() == [47 * k + 1 for k in range(20, 0, -1)]
    assert leading[0] == 941 and leading[-1] == 48
    assert leading.tolist() != timestep_grid(20, sd15_config).tolist()


@pytest.mark.parametrize("spacing", [None, "linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [2, 3, 7, 10, 20, 25, 50, 100])
def test_grid_matches_diffusers_dpmsolver(sd15_config, spacing, steps):
    cfg = dict(sd15_config) if spacing is None else dict(sd15_config, timestep_spacing=spacing)
    np.testing.assert_array_equal(timestep_grid(steps, cfg), _diffusers_timesteps(cfg, steps))


def test_grid_leading_without_steps_offset_matches_diffusers(sd15_config):
    cfg = {k: v for k, v in sd15_config.items() if k != "steps_offset"}
    cfg["timestep_spacing"] = "leading"
    np.testing.assert_array_equal(timestep_grid(20, cfg), _diffusers_timesteps(cfg, 20))
    assert timestep_grid(20, cfg)[-1] == 47


@pytest.mark.parametrize("case", CASES)
def test_grid_matches_reference_fixture(sd15_config, case):
    ref = np.load(FIXTURES / f"{case}.npz")
    np.testing.assert_array_equal(timestep_grid(int(ref["steps"]), sd15_config), ref["scheduler_timesteps"])


# --------------------------------------------------------------------------- §0 alphas_cumprod
def test_alphas_cumprod_matches_diffusers_and_fixture(sd15_config):
    ac = alphas_cumprod_from_config(sd15_config)
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert torch.equal(ac, DPMSolverMultistepScheduler.from_config(sd15_config).alphas_cumprod)
    for case in CASES:
        ref = np.load(FIXTURES / f"{case}.npz")["alphas_cumprod"]
        assert ref.dtype == np.float32
        np.testing.assert_array_equal(ac.numpy(), ref)


def test_alphas_cumprod_matches_spec_formula_float64(sd15_config):
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    ac64 = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(alphas_cumprod_from_config(sd15_config).numpy(), ac64, rtol=2e-5, atol=0)


def test_alphas_cumprod_linear_schedule_matches_diffusers(sd15_config):
    cfg = dict(sd15_config, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    ac = alphas_cumprod_from_config(cfg)
    assert torch.equal(ac, DPMSolverMultistepScheduler.from_config(cfg).alphas_cumprod)
    assert not torch.equal(ac, alphas_cumprod_from_config(sd15_config))


# --------------------------------------------------------------------------- §4 lists, §9b copy mask
def test_make_schedule_defaults_20_steps(sd15_config):
    sc = make_schedule(20, 0.5, 0.2, True, sd15_config)
    assert sc.num_steps == 10
    assert sc.forward_t == tuple(range(50, 501, 50))
    assert sc.backward_t == (549, 500, 450, 400, 350, 300, 250, 200, 150, 100)
    # QUIRK: E = int(0.2 * 20) = 4 is compared with timestep values >= 100 -> always copy
    assert sc.copy_mask == (True,) * 10
    assert len(sc.forward) == len(sc.backward) == 10
    # the UNet runs at the NEW level in the SDE inversion, at the current one when sampling
    assert [c.t_model for c in sc.forward] == list(range(100, 551, 50))
    assert [c.t_model for c in sc.backward] == list(sc.backward_t)


def test_make_schedule_ode_unet_levels(sd15_config):
    sc = make_schedule(20, 0.5, 0.2, False, sd15_config)
    assert sc.forward_t == tuple(range(50, 501, 50))
    # DDIM inversion evaluates ε at the CURRENT (less noisy) level
    assert [c.t_model for c in sc.forward] == list(range(50, 501, 50))
    assert all(c.sigma == 0.0 for c in sc.forward + sc.backward)


def test_make_schedule_plus_minus_one_quirk_10_steps(sd15_config):
    sc = make_schedule(10, 0.7, 0.2, True, sd15_config)
    assert sc.num_steps == 7
    assert sc.forward_t == (100, 200, 300, 400, 500, 599, 699)
    # forward outputs ..., 600, 699, 799
    assert [c.t_model for c in sc.forward] == [200, 300, 400, 500, 600, 699, 799]
    # backward 799, 699, 599 (-> 499), 500, ...
    assert sc.backward_t == (799, 699, 599, 500, 400, 300, 200)
    sq = math.sqrt
    ac = alphas_cumprod_from_config(sd15_config).double()
    # backward step at 599 lands on 499 (not 500): its sqrt(a_p) is that of level 499
    assert sc.backward[2].sqrt_a_next == pytest.approx(sq(ac[499].item()), abs=1e-6)
    assert sc.backward[2].sqrt_a_next != pytest.approx(sq(ac[500].item()), abs=1e-6)


def test_copy_mask_quirk_threshold_disables_copy(sd15_config):
    sc = make_schedule(100, 0.5, 0.5, True, sd15_config)  # E = 50 compared with timestep values
    assert sc.num_steps == 50
    t = np.array(sc.backward_t)
    assert t.min() < 50 <= t.max()
    assert list(sc.copy_mask) == [bool(x >= 50) for x in t]
    assert sc.backward_t[-5:] == (60, 50, 40, 30, 20)  # B stops at T[steps-2] = 20
    assert sc.copy_mask[-5:] == (True, True, False, False, False)  # skipped exactly for t < 50
    assert sum(not m for m in sc.copy_mask) == 3


@pytest.mark.parametrize("case", CASES)
def test_schedule_matches_reference_fixture(sd15_config, case):
    ref = np.load(FIXTURES / f"{case}.npz")
    sde = str(ref["method"]) == "Encode then CP"
    sc = make_schedule(int(ref["steps"]), float(ref["start_t"]), float(ref["end_t"]), sde, sd15_config)
    np.testing.assert_array_equal(np.array(sc.backward_t), ref["backward_timesteps"])
    np.testing.assert_array_equal(np.array(sc.forward_t), ref["forward0_timesteps"])
    np.testing.assert_array_equal(np.array(sc.copy_mask), ref["backward_copy_mask"])
    if "forward1_timesteps" in ref.files:
        np.testing.assert_array_equal(np.array(sc.forward_t), ref["forward1_timesteps"])
    assert bool(ref["forward0_sde"]) == sde


# --------------------------------------------------------------------------- §5-6 coefficients
def _coeff_pairs(sc, delta):
    """(forward j, backward i) whose levels agree: forward s -> s+Δ and backward s+Δ -> s."""
    pairs = []
    for j, s in enumerate(sc.forward_t):
        i = sc.num_steps - 1 - j
        if sc.backward_t[i] == s + delta:
            pairs.append((j, i))
    return pairs


def _nonlinear_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.tanh(1.3 * x + 0.001 * t) + 0.05 * torch.sin(3.0 * x) + 1e-4 * t


@pytest.mark.parametrize("steps,start_t,n_pairs", [(20, 0.5, 9), (10, 0.7, 6), (25, 0.6, 14)])
def test_sde_forward_then_sample_is_identity(sd15_config, steps, start_t, n_pairs):
    """§5.6: n makes the sampler map x_u back to x_s when it sees the same ε (ε = ε(x_u, u) on both
    sides, so any deterministic ε works)."""
    sc = make_schedule(steps, start_t, 0.2, True, sd15_config)
    pairs = _coeff_pairs(sc, 1000 // steps)
    assert len(pairs) == n_pairs  # only the ±1-quirk pairs are excluded
    gen = torch.Generator().manual_seed(0)
    for j, i in pairs:
        x_s = torch.randn(1, 4, 8, 8, generator=gen)
        xi = torch.randn(1, 4, 8, 8, generator=gen)
        x_u, n = forward_sde_step(sc.forward[j], x_s, xi, _nonlinear_eps)
        assert not torch.allclose(x_u, x_s, atol=1e-2)
        back = sample_step(sc.backward[i], x_u, n, _nonlinear_eps)
        torch.testing.assert_close(back, x_s, atol=2e-5, rtol=1e-5)


def test_sde_top_quirk_pair_is_not_an_exact_inverse(sd15_config):
    """The top forward step lands on 550 while the first backward step runs 549 -> 499 (QUIRK §4)."""
    sc = make_schedule(20, 0.5, 0.2, True, sd15_config)
    assert sc.forward[-1].t_model == 550 and sc.backward[0].t_model == 549
    gen = torch.Generator().manual_seed(1)
    x_s, xi = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    eps_const = torch.randn(1, 4, 8, 8, generator=gen)
    x_u, n = forward_sde_step(sc.forward[-1], x_s, xi, lambda x, t: eps_const)
    back = sample_step(sc.backward[0], x_u, n, lambda x, t: eps_const)
    assert (back - x_s).abs().max() > 1e-4


@pytest.mark.parametrize("steps,start_t", [(20, 0.5), (10, 0.7), (50, 0.4)])
def test_ode_forward_then_sample_with_constant_eps_is_identity(sd15_config, steps, start_t):
    sc = make_schedule(steps, start_t, 0.2, False, sd15_config)
    pairs = _coeff_pairs(sc, 1000 // steps)
    assert pairs
    gen = torch.Generator().manual_seed(2)
    for j, i in pairs:
        x_s = torch.randn(1, 4, 8, 8, generator=gen)
        e = torch.randn(1, 4, 8, 8, generator=gen)
        x_u = forward_ode_step(sc.forward[j], x_s, lambda x, t: e)
        # DDIM with σ = 0 ignores the noise it is handed
        junk = 100.0 * torch.randn(1, 4, 8, 8, generator=gen)
        back = sample_step(sc.backward[i], x_u, junk, lambda x, t: e)
        torch.testing.assert_close(back, x_s, atol=2e-5, rtol=1e-5)


def test_eps_is_called_at_the_spec_levels(sd15_config):
    sc_sde = make_schedule(20, 0.5, 0.2, True, sd15_config)
    sc_ode = make_schedule(20, 0.5, 0.2, False, sd15_config)
    x = torch.ones(1, 4, 2, 2)
    seen = []

    def eps(x_in, t):
        seen.append((t, x_in.clone()))
        return torch.zeros_like(x_in)

    xi = torch.full_like(x, 2.0)
    x_u, _ = forward_sde_step(sc_sde.forward[3], x, xi, eps)  # 200 -> 250, ε at the NEW level and x_u
    assert seen[-1][0] == 250 and torch.equal(seen[-1][1], x_u)
    forward_ode_step(sc_ode.forward[3], x, eps)  # ε at the CURRENT level and x_s
    assert seen[-1][0] == 200 and torch.equal(seen[-1][1], x)
    sample_step(sc_sde.backward[2], x, x, eps)
    assert seen[-1][0] == 450 and torch.equal(seen[-1][1], x)


def _ac64(cfg):
    return alphas_cumprod_from_config(cfg).double().numpy()


def test_sigma_and_coefficients_match_hand_computation(sd15_config):
    ac = _ac64(sd15_config)
    sc = make_schedule(20, 0.5, 0.2, True, sd15_config)
    # forward step 4: s = 250 -> u = 300
    a_s, a_u = ac[250], ac[300]
    sigma = math.sqrt((1 - a_s) / (1 - a_u)) * math.sqrt(1 - a_u / a_s)
    c = sc.forward[4]
    assert c.t_model == 300
    assert c.sigma == pytest.approx(sigma, abs=1e-6)
    assert c.c_prev == pytest.approx(math.sqrt(a_u / a_s), abs=1e-6)
    assert c.c_noise == pytest.approx(math.sqrt(1 - a_u / a_s), abs=1e-6)
    assert c.c_eps == pytest.approx(math.sqrt(1 - a_s - sigma**2), abs=1e-6)
    # backward step at t = 300 -> p = 250: same σ (that is why the pair inverts)
    b = sc.backward[5]
    assert b.t_model == 300
    assert b.sigma == pytest.approx(sigma, abs=1e-6)
    assert b.sqrt_a == pytest.approx(math.sqrt(a_u), abs=1e-6)
    assert b.sqrt_1m_a == pytest.approx(math.sqrt(1 - a_u), abs=1e-6)
    assert b.sqrt_a_next == pytest.approx(math.sqrt(a_s), abs=1e-6)
    assert b.c_eps == pytest.approx(math.sqrt(1 - a_s - sigma**2), abs=1e-6)
    # worked value: σ is a genuinely nonzero number here
    assert 0.05 < sigma < 0.5
    # the ODE sampler has σ = 0 and c_eps = sqrt(1 - a_p)
    bo = make_schedule(20, 0.5, 0.2, False, sd15_config).backward[5]
    assert bo.sigma == 0.0 and bo.c_eps == pytest.approx(math.sqrt(1 - a_s), abs=1e-6)


def test_step_functions_match_float64_spec_formulas(sd15_config):
    """forward_sde_step / forward_ode_step / sample_step against a float64 transcription of §5-6."""
    ac = _ac64(sd15_config)
    sq = math.sqrt
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    xi = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)

    def eps64(v, t):
        return _nonlinear_eps(v.double(), t)

    def eps32(v, t):
        return _nonlinear_eps(v, t)

    x32, xi32, noise32 = x.float(), xi.float(), noise.float()
    sde = make_schedule(20, 0.5, 0.2, True, sd15_config)
    ode = make_schedule(20, 0.5, 0.2, False, sd15_config)

    # SDE forward, 300 -> 350
    s, u = 300, 350
    a_s, a_u = ac[s], ac[u]
    x_u = sq(a_u / a_s) * x + sq(1 - a_u / a_s) * xi
    e = eps64(x_u, u)
    sig = sq((1 - a_s) / (1 - a_u)) * sq(1 - a_u / a_s)
    x0 = (x_u - sq(1 - a_u) * e) / sq(a_u)
    n = (x - sq(a_s) * x0 - sq(1 - a_s - sig**2) * e) / sig
    assert sde.forward[5].t_model == u and ode.forward[5].t_model == s
    got_xu, got_n = forward_sde_step(sde.forward[5], x32, xi32, eps32)
    torch.testing.assert_close(got_xu.double(), x_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_n.double(), n, atol=1e-4, rtol=1e-4)

    # ODE forward, 300 -> 350
    e = eps64(x, s)
    x0 = (x - sq(1 - a_s) * e) / sq(a_s)
    want = sq(a_u) * x0 + sq(1 - a_u) * e
    torch.testing.assert_close(forward_ode_step(ode.forward[5], x32, eps32).double(), want, atol=1e-5, rtol=1e-5)

    # SDE / ODE sampling, t = 400 -> p = 350 (backward index 3)
    t, p = 400, 350
    a_t, a_p = ac[t], ac[p]
    e = eps64(x, t)
    x0 = (x - sq(1 - a_t) * e) / sq(a_t)
    sig = sq((1 - a_p) / (1 - a_t)) * sq(1 - a_t / a_p)
    want_sde = sq(a_p) * x0 + sq(1 - a_p - sig**2) * e + sig * noise
    want_ode = sq(a_p) * x0 + sq(1 - a_p) * e
    assert sde.backward[3].t_model == t
    torch.testing.assert_close(sample_step(sde.backward[3], x32, noise32, eps32).double(), want_sde, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample_step(ode.backward[3], x32, noise32, eps32).double(), want_ode, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs", [
    dict(steps=1, start_t=0.5, end_t=0.2),
    dict(steps=0, start_t=0.5, end_t=0.2),
    dict(steps=-5, start_t=0.5, end_t=0.2),
    dict(steps=20.0, start_t=0.5, end_t=0.2),
    dict(steps=20, start_t=0.0, end_t=0.2),
    dict(steps=20, start_t=1.0, end_t=0.2),
    dict(steps=20, start_t=-0.1, end_t=0.2),
    dict(steps=20, start_t=1.5, end_t=0.2),
    dict(steps=20, start_t=float("nan"), end_t=0.2),
    dict(steps=4, start_t=0.1, end_t=0.2),  # int(0.4) = 0 inversion steps
    dict(steps=20, start_t=0.04, end_t=0.2),  # int(0.8) = 0
    dict(steps=20, start_t=0.5, end_t=-0.01),
    dict(steps=20, start_t=0.5, end_t=1.01),
    dict(steps=20, start_t=0.5, end_t=float("nan")),
])
@pytest.mark.parametrize("sde", [True, False])
def test_bad_arguments_raise_value_error(sd15_config, kwargs, sde):
    with pytest.raises(ValueError):
        make_schedule(kwargs["steps"], kwargs["start_t"], kwargs["end_t"], sde, sd15_config)


def test_boundary_arguments_are_accepted(sd15_config):
    assert make_schedule(20, 0.05, 0.0, True, sd15_config).num_steps == 1
    assert make_schedule(20, 0.99, 1.0, True, sd15_config).num_steps == 19
    assert make_schedule(4, 0.25, 0.2, False, sd15_config).num_steps == 1


def test_unknown_timestep_spacing_raises(sd15_config):
    cfg = dict(sd15_config, timestep_spacing="karras")
    with pytest.raises(ValueError):
        timestep_grid(20, cfg)
    with pytest.raises(ValueError):
        make_schedule(20, 0.5, 0.2, True, cfg)


def test_unknown_beta_schedule_raises(sd15_config):
    cfg = dict(sd15_config, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError):
        alphas_cumprod_from_config(cfg)
    with pytest.raises(ValueError):
        make_schedule(20, 0.5, 0.2, True, cfg)


@pytest.mark.parametrize("sde", [True, False])
def test_inversion_past_level_999_raises_value_error(sd15_config, sde):
    """steps=2 (S=1) would invert to T[1] + Δ = 500 + 500 = 1000, past ᾱ[999]."""
    with pytest.raises(ValueError, match="beyond the schedule's last level"):
        make_schedule(2, 0.5, 0.2, sde, sd15_config)


def test_numpy_integer_steps_are_accepted(sd15_config):
    assert make_schedule(np.int64(20), 0.5, 0.2, True, sd15_config).num_steps == 10
