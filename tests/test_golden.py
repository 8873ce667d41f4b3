"""Golden fidelity: edits on the reference's tiny model reproduce the reference implementation's outputs.

The fixtures (tests/fixtures/*.npz, ALGORITHM.md §16) were produced by the paper's own code on the CPU in
float32. The edit is driven the way a user drives it (RegionPairs built from the region masks), so the
mapping, the schedule, the random draws, the K/V replay and the postprocess are all under test.
"""
import numpy as np
import pytest
import torch

import regiondrag as rd
from helpers import METHOD_NAMES, TOLERANCES, golden_case, reference_components
from regiondrag.pipeline import RegionDragPipeline

CASES = ["etcp_onepair_fullmask", "cpte_twopairs_partmask"]


@pytest.fixture(scope="module")
def pipe():
    return RegionDragPipeline(reference_components())


def _edit(pipe, d, **overrides):
    drag = rd.RegionPairs(list(d["src_regions"]), list(d["trg_regions"]))
    kwargs = dict(prompt=str(d["prompt"]), method=METHOD_NAMES[str(d["method"])], steps=int(d["steps"]),
                  start_t=float(d["start_t"]), end_t=float(d["end_t"]), noise_scale=float(d["noise_scale"]),
                  seed=int(d["seed"]), mask=d["mask"])
    kwargs.update(overrides)
    return pipe.edit(d["ori_image"], drag, **kwargs)


@pytest.mark.parametrize("name", CASES)
def test_edit_matches_reference(pipe, name):
    d = golden_case(name)
    result = _edit(pipe, d)
    tol = TOLERANCES["float32"]
    latent_err = (result.latent - torch.from_numpy(d["final_latent"])).abs().max().item()
    assert latent_err <= tol["latent"], f"final latent off by {latent_err}"
    image = np.asarray(result.image)
    assert image.shape == d["output_image"].shape
    assert np.abs(image.astype(int) - d["output_image"]).max() <= tol["image"]
    assert set(result.timings) >= {"inversion", "sampling", "vae_decode", "total"}


@pytest.mark.parametrize("name", CASES)
def test_point_roles_match_reference(pipe, name):
    """§3.3: latent copy/paste/blur points of the reference, from the user's region masks."""
    from regiondrag.drags import border_points

    d = golden_case(name)
    drag = rd.RegionPairs(list(d["src_regions"]), list(d["trg_regions"]))
    src, trg = drag.to_points(1 / 8)
    np.testing.assert_array_equal(src * 8, d["source_pts_img"])
    np.testing.assert_array_equal(trg * 8, d["target_pts_img"])
    sde = METHOD_NAMES[str(d["method"])] == "encode_then_cp"
    blur = src if sde else np.concatenate([border_points(trg), src])
    np.testing.assert_array_equal(blur, d["blur_pts_latent"])
    np.testing.assert_array_equal(src if sde else trg, d["copy_pts_latent"])
    np.testing.assert_array_equal(trg, d["paste_pts_latent"])


@pytest.mark.parametrize("name", CASES)
def test_intermediates_match_reference(pipe, name):
    """Conditioning, VAE posterior sample and the inversion trajectory of the reference."""
    from regiondrag import schedule as sch

    d = golden_case(name)
    cond = pipe._encode_text(str(d["prompt"]))
    assert (cond - torch.from_numpy(d["text_embed_cond"])).abs().max() < 1e-5
    ip = pipe._encode_image(d["ori_image"])  # the reference's image embeddings, projected once
    ref_ip = pipe.runner.image_encoder.projection([torch.from_numpy(d["image_embeds"])])[0]
    assert ip.shape == ref_ip.shape and (ip - ref_ip).abs().max() < 1e-5
    gen = torch.Generator().manual_seed(int(d["seed"]))
    z0 = pipe._encode_latent(d["ori_image"], gen)
    assert (z0 - torch.from_numpy(d["vae_latent_ori"])).abs().max() < 1e-5
    sde = str(d["method"]) == "Encode then CP"
    plan = sch.make_schedule(int(d["steps"]), float(d["start_t"]), float(d["end_t"]), sde, pipe.components.scheduler_config)
    unet = pipe._unet_fns(cond, ip, plan)
    noop = lambda *a: None  # noqa: E731
    kv = []
    if sde:
        hooks, noises = pipe._invert_sde(plan, z0, gen, unet.capture(kv), noop)
        ref_noises = torch.from_numpy(d["forward0_noises"])
        assert max((n - r).abs().max().item() for n, r in zip(noises, ref_noises)) < 1e-4
    else:
        z0_prev = pipe._encode_latent(d["preview"], gen)
        assert (z0_prev - torch.from_numpy(d["vae_latent_preview"])).abs().max() < 1e-5
        hooks = pipe._invert_ode(plan, z0_prev, unet.plain, noop)
        start = pipe._invert_ode(plan, z0, unet.capture(kv), noop)[-1]
        ref_start = torch.from_numpy(d["backward_start_latent_before_blur"])
        assert (start - ref_start).abs().max() < 1e-4
    assert len(kv) == plan.num_steps and all(len(call) == 2 * pipe.runner.num_layers for call in kv)
    ref_hooks = torch.from_numpy(d["forward0_hook_latents"])
    assert len(hooks) == len(ref_hooks)
    assert max((h - r).abs().max().item() for h, r in zip(hooks, ref_hooks)) < 1e-4


def test_default_preview_is_the_pixel_copy_paste(pipe):
    """CPTE with preview=None uses drag.preview(image), as the paper's UI does."""
    d = golden_case("cpte_twopairs_partmask")
    result = _edit(pipe, d, preview=None)
    assert (result.latent - torch.from_numpy(d["final_latent"])).abs().max() <= TOLERANCES["float32"]["latent"]


def test_seed_changes_the_result(pipe):
    d = golden_case("etcp_onepair_fullmask")
    result = _edit(pipe, d, seed=int(d["seed"]) + 1)
    assert (result.latent - torch.from_numpy(d["final_latent"])).abs().max() > 1e-2
