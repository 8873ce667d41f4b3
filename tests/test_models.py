"""Model loading: local directories, the tiny random model, clear errors for missing weights."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from helpers import TINY_IP, TINY_SD15
from regiondrag.models import ModelLoadError, load_components


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("REGIONDRAG_CACHE", str(tmp_path / "cache"))


def test_local_directory_with_ip_adapter():
    c = load_components(str(TINY_SD15), ip_adapter=str(TINY_IP))
    assert c.image_encoder is not None and c.ip_adapter_scale == 0.5
    assert "timestep_spacing" not in c.scheduler_config  # file keys only (see _explicit_scheduler_config)
    procs = c.unet.attn_processors
    assert all(type(p).__name__.startswith("IPAdapter") for n, p in procs.items() if "attn2" in n)
    assert all(p.scale == [0.5] for n, p in procs.items() if "attn2" in n)


def test_without_ip_adapter():
    c = load_components(str(TINY_SD15), ip_adapter=None)
    assert c.image_encoder is None and c.ip_adapter_scale is None


def test_tiny_is_deterministic_and_marked_random(offline, tmp_path):
    a = load_components("tiny")
    assert a.random_weights and a.image_encoder is not None
    ids = a.tokenizer("a photo of a dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 512
    # A second build in another cache gives identical weights (fixed seed, no download).
    import os

    os.environ["REGIONDRAG_CACHE"] = str(tmp_path / "cache2")
    b = load_components("tiny")
    for (na, pa), (nb, pb) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("model,match", [
    ("/no/such/dir", "neither an existing path nor a hub id"),
    ("nobody/no-such-model-xyz", "could not load model .*'tiny'"),
])
def test_missing_weights_error_names_alternatives(offline, model, match):
    with pytest.raises(ModelLoadError, match=match):
        load_components(model, ip_adapter=None)


def test_directory_without_model_index(offline, tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_components(str(tmp_path), ip_adapter=None)


def test_bad_ip_adapter_directory(offline, tmp_path):
    with pytest.raises(ModelLoadError, match="ip-adapter-plus_sd15"):
        load_components(str(TINY_SD15), ip_adapter=str(tmp_path))


def test_wrong_file_type(offline, tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_components(str(f), ip_adapter=None)


@pytest.mark.parametrize("part,file", [("vae", "diffusion_pytorch_model.safetensors"),
                                       ("text_encoder", "model.safetensors")])
def test_fingerprint_covers_every_compiled_network(tmp_path, part, file):
    """Compiled artifacts of the VAE and the text encoder are keyed by the fingerprint: a model whose
    only difference is in one of them must not reuse the other's artifacts."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "model"
    shutil.copytree(TINY_SD15, copy)
    weights = load_file(copy / part / file)
    name = next(n for n, t in weights.items() if t.is_floating_point())
    weights[name] = weights[name] + 0.5
    save_file(weights, copy / part / file)
    original = load_components(str(TINY_SD15), ip_adapter=None).fingerprint
    assert load_components(str(copy), ip_adapter=None).fingerprint != original
    assert load_components(str(TINY_SD15), ip_adapter=None).fingerprint == original


def test_loading_does_not_print_the_torchvision_fallback_notice(tmp_path):
    """transformers >= 5 without torchvision warns that it falls back to the PIL image processor; our load
    of the feature extractor is what triggers it, and the fallback is what we use, so the load is quiet.
    In a fresh process: transformers prints the notice once per process."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers uses it and prints no fallback notice")
    env = dict(os.environ, HF_HUB_OFFLINE="1", REGIONDRAG_CACHE=str(tmp_path / "cache"))
    code = ("from regiondrag.models import load_components\n"
            f"load_components({str(TINY_SD15)!r}, ip_adapter={str(TINY_IP)!r})\n"
            "from transformers import ViTImageProcessor\n"  # outside our loading: the notice still shows
            )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CLIPImageProcessor` requires torchvision" not in r.stderr
    assert "ViTImageProcessor` requires torchvision" in r.stderr  # the filter is scoped to our loads


def test_loading_prints_nothing_and_restores_library_settings(capfd):
    """Our loads silence what diffusers/transformers print about them (bars, accelerate, fp16 on CPU),
    then leave those libraries' settings as they were."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    before = (dlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.get_verbosity(), tlog.is_progress_bar_enabled())
    capfd.readouterr()
    load_components("tiny", device="cpu", dtype=torch.float16)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert (dlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.get_verbosity(),
            tlog.is_progress_bar_enabled()) == before
