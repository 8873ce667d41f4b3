"""Self-attention K/V capture and replay (ALGORITHM.md §7) on the tiny SD-1.5-architecture model.

The reference recorded and overwrote the outputs of ``attn1.to_k`` / ``attn1.to_v`` with forward hooks;
the tests rebuild that hook mechanism independently and compare the processors with it.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from regiondrag.attention import KVReplayProcessor, KVStore, install_kv_processors, self_attention_layers
from regiondrag.drags import RegionPairs
from regiondrag.models import load_components
from regiondrag.pipeline import RegionDragPipeline
from regiondrag.schedule import make_schedule

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-sd15"


@pytest.fixture(scope="module")
def loaded():
    """(components, pristine UNet copy with diffusers' own processors, conditioning kwargs)."""
    torch.set_num_threads(2)
    comps = load_components(str(TINY), ip_adapter=str(TINY / "ip_adapter"))
    pristine = copy.deepcopy(comps.unet)
    gen = torch.Generator().manual_seed(1234)
    vis = comps.image_encoder.config
    n_tok = (vis.image_size // vis.patch_size) ** 2 + 1
    cond = torch.randn(1, 77, comps.unet.config.cross_attention_dim, generator=gen)
    image_embeds = [torch.randn(2, 1, n_tok, vis.hidden_size, generator=gen)]
    kwargs = dict(encoder_hidden_states=cond, added_cond_kwargs={"image_embeds": image_embeds})
    return comps, pristine, kwargs


def _fresh(pristine):
    return copy.deepcopy(pristine)


def _latents(seed: int, hw=(8, 8)) -> torch.Tensor:
    return torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(unet, x, t, kwargs) -> torch.Tensor:
    return unet(x, torch.tensor(t, dtype=torch.int64), **kwargs).sample


def _attn1_modules(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith(".attn1")}


# --------------------------------------------------------------------------- execution order
def test_self_attention_layers_is_execution_order(loaded):
    _, pristine, kwargs = loaded
    unet = _fresh(pristine)
    called: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=n: called.append(name))
               for n, m in _attn1_modules(unet).items()]
    try:
        _run(unet, _latents(0), 500, kwargs)
    finally:
        for h in handles:
            h.remove()
    names = self_attention_layers(unet)
    assert len(called) == len(set(called)) == len(names) == 6  # down 2, mid 1, up 3 in the tiny model
    assert names == called
    # the naive order (diffusers' attn_processors dict: down -> up -> mid) is different
    naive = [k[: -len(".processor")] for k in unet.attn_processors if k.endswith("attn1.processor")]
    assert sorted(naive) == sorted(called)
    assert naive != called
    assert called[2].startswith("mid_block.") and called[0].startswith("down_blocks.")
    assert called[-1].startswith("up_blocks.")


def test_install_touches_only_self_attention(loaded):
    _, pristine, _ = loaded
    unet = _fresh(pristine)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    store = install_kv_processors(unet)
    after = unet.attn_processors
    assert store.num_layers == 6
    for k, v in after.items():
        if k.endswith("attn1.processor"):
            assert isinstance(v, KVReplayProcessor) and v.store is store
        else:
            assert type(v) is before[k]  # attn2 (IP-Adapter) and the resampler untouched
    layers = [after[n + ".processor"].layer for n in self_attention_layers(unet)]
    assert layers == list(range(6))


# --------------------------------------------------------------------------- "off" == default
def test_off_mode_matches_default_attention_processor(loaded):
    _, pristine, kwargs = loaded
    plain = _fresh(pristine)
    assert all(isinstance(m.processor, AttnProcessor2_0) for m in _attn1_modules(plain).values())
    kv_unet = _fresh(pristine)
    store = install_kv_processors(kv_unet)
    assert store.mode == "off"
    for seed, t in ((0, 999), (1, 321), (2, 50)):
        x = _latents(seed)
        ref, got = _run(plain, x, t, kwargs), _run(kv_unet, x, t, kwargs)
        assert (ref - got).abs().max().item() < 1e-5
    assert store.calls == []  # nothing recorded when off


# --------------------------------------------------------------------------- capture / replay
class HookKV:
    """The reference's mechanism: forward hooks on attn1.to_k / attn1.to_v that record or overwrite."""

    def __init__(self, unet):
        self.mode, self.recorded, self.replay = "off", {}, {}
        self.handles = []
        for name, m in _attn1_modules(unet).items():
            for proj in ("to_k", "to_v"):
                key = f"{name}.{proj}"
                self.handles.append(getattr(m, proj).register_forward_hook(
                    lambda mod, inp, out, key=key: self._hook(key, out)))

    def _hook(self, key, out):
        if self.mode == "record":
            self.recorded[key] = out.detach().clone()
            return None
        if self.mode == "replace":
            return self.replay[key]
        return None

    def remove(self):
        for h in self.handles:
            h.remove()


def test_capture_stores_to_k_to_v_outputs_in_execution_order(loaded):
    _, pristine, kwargs = loaded
    x, t = _latents(10), 400
    ref_unet = _fresh(pristine)
    hooks = HookKV(ref_unet)
    hooks.mode = "record"
    _run(ref_unet, x, t, kwargs)
    hooks.remove()

    unet = _fresh(pristine)
    store = install_kv_processors(unet)
    store.start_capture()
    store.new_call()
    _run(unet, x, t, kwargs)
    store.stop()
    assert len(store.calls) == 1
    for i, name in enumerate(self_attention_layers(unet)):
        k, v = store.calls[0][i]
        torch.testing.assert_close(k, hooks.recorded[f"{name}.to_k"], atol=1e-6, rtol=0)
        torch.testing.assert_close(v, hooks.recorded[f"{name}.to_v"], atol=1e-6, rtol=0)
        assert k.dim() == 3 and k.shape[0] == 1  # 1 x HW x C, before the head split


def test_replay_round_trip_and_hook_reference(loaded):
    _, pristine, kwargs = loaded
    x_a, x_b, t = _latents(20), _latents(21), 600
    plain = _fresh(pristine)
    out_a_plain, out_b_plain = _run(plain, x_a, t, kwargs), _run(plain, x_b, t, kwargs)

    unet = _fresh(pristine)
    store = install_kv_processors(unet)
    store.start_capture()
    store.new_call()
    out_a_capture = _run(unet, x_a, t, kwargs)
    store.stop()
    assert (out_a_capture - out_a_plain).abs().max().item() < 1e-5  # capturing does not change the output

    # replaying A's K/V on A: K/V equal what would be computed anyway
    store.use_call(0)
    out_a_replay = _run(unet, x_a, t, kwargs)
    assert (out_a_replay - out_a_plain).abs().max().item() < 1e-5

    # replaying A's K/V on B: different from plain B ...
    store.use_call(0)
    out_b_replay = _run(unet, x_b, t, kwargs)
    assert (out_b_replay - out_b_plain).abs().max().item() > 1e-3

    # ... and equal to the hook mechanism of the reference
    ref_unet = _fresh(pristine)
    hooks = HookKV(ref_unet)
    hooks.mode = "record"
    _run(ref_unet, x_a, t, kwargs)
    hooks.replay, hooks.mode = dict(hooks.recorded), "replace"
    out_b_hooks = _run(ref_unet, x_b, t, kwargs)
    hooks.remove()
    assert (out_b_hooks - out_b_plain).abs().max().item() > 1e-3
    assert (out_b_replay - out_b_hooks).abs().max().item() < 1e-5


def test_replay_reads_the_selected_call(loaded):
    """Two captured calls (different latents and levels); use_call(k) must replay call k."""
    _, pristine, kwargs = loaded
    inputs = [(_latents(30), 700), (_latents(31), 200)]
    x_b, t_b = _latents(32), 450

    unet = _fresh(pristine)
    store = install_kv_processors(unet)
    store.start_capture()
    for x, t in inputs:
        store.new_call()
        _run(unet, x, t, kwargs)
    store.stop()
    assert len(store.calls) == 2 and all(kv is not None for call in store.calls for kv in call)

    ref_unet = _fresh(pristine)
    hooks = HookKV(ref_unet)
    expected = []
    for x, t in inputs:
        hooks.mode, hooks.recorded = "record", {}
        _run(ref_unet, x, t, kwargs)
        hooks.replay, hooks.mode = dict(hooks.recorded), "replace"
        expected.append(_run(ref_unet, x_b, t_b, kwargs))
    hooks.remove()
    assert (expected[0] - expected[1]).abs().max().item() > 1e-3

    for k in (1, 0, 1):
        store.use_call(k)
        got = _run(unet, x_b, t_b, kwargs)
        assert (got - expected[k]).abs().max().item() < 1e-5
    with pytest.raises(IndexError):
        store.use_call(2)


def test_store_bookkeeping():
    store = KVStore(3)
    store.start_capture()
    store.new_call()
    store.put(2, torch.zeros(1), torch.ones(1))
    store.new_call()
    assert store.active == 1 and len(store.calls) == 2
    assert store.calls[0][:2] == [None, None]
    store.use_call(0)
    k, v = store.get(2)
    assert torch.equal(k, torch.zeros(1)) and torch.equal(v, torch.ones(1))
    with pytest.raises(AssertionError):
        store.get(0)  # never captured
    store.clear()
    assert store.calls == [] and store.mode == "off"


# --------------------------------------------------------------------------- replay order in the pipeline
def _tiny_edit_inputs():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    src = np.zeros((64, 64), np.uint8)
    src[8:32, 8:32] = 1
    trg = np.zeros((64, 64), np.uint8)
    trg[24:48, 24:48] = 1
    return image, RegionPairs([src], [trg])


@pytest.mark.parametrize("method", ["encode_then_cp", "cp_then_encode"])
def test_pipeline_replays_forward_call_s_minus_1_minus_i(loaded, monkeypatch, method):
    comps, pristine, _ = loaded
    comps = dataclasses.replace(comps, unet=_fresh(pristine))
    pipe = RegionDragPipeline(comps)
    image, drag = _tiny_edit_inputs()
    steps, start_t = 10, 0.5
    plan = make_schedule(steps, start_t, 0.2, method == "encode_then_cp", comps.scheduler_config)
    S, L = plan.num_steps, pipe.runner.num_layers
    assert S == 5 and L == 6

    events = []  # (layer, mode, data_ptr of the key used) for every self-attention evaluation
    real_call = KVReplayProcessor.__call__

    def recording_call(self, attn, hidden_states, *args, **kwargs):
        mode = self.store.mode
        used = self.store.get(self.layer)[0].data_ptr() if mode == "replay" else None
        out = real_call(self, attn, hidden_states, *args, **kwargs)
        if mode == "capture":
            used = self.store.get(self.layer)[0].data_ptr()
        events.append((self.layer, mode, used))
        return out

    monkeypatch.setattr(KVReplayProcessor, "__call__", recording_call)

    unet_t = []
    pipe.components.unet.register_forward_pre_hook(
        lambda mod, args, kw: unet_t.append(int((args[1] if len(args) > 1 else kw["timestep"]).item())),
        with_kwargs=True)

    pipe.edit(image, drag, method=method, steps=steps, start_t=start_t, seed=0)

    calls = [events[i:i + L] for i in range(0, len(events), L)]  # one entry per UNet call
    assert all([e[0] for e in call] == list(range(L)) for call in calls)  # layers in execution order
    modes = [{e[1] for e in call} for call in calls]
    if method == "encode_then_cp":
        assert modes == [{"capture"}] * S + [{"replay"}] * S
        # ε levels: SDE inversion at F[j] + Δ, sampling at B[i]
        assert unet_t == [200, 300, 400, 500, 600] + [599, 500, 400, 300, 200]
    else:
        # CPTE: the preview inversion records nothing; the original's inversion is recorded
        assert modes == [{"off"}] * S + [{"capture"}] * S + [{"replay"}] * S
        assert unet_t == [100, 200, 300, 400, 500] * 2 + [599, 500, 400, 300, 200]
    captured = [[e[2] for e in call] for call in calls[-2 * S:-S]]
    replayed = [[e[2] for e in call] for call in calls[-S:]]
    # Sampling call i uses, layer by layer, exactly the keys recorded by inversion call S-1-i.
    assert replayed == [captured[S - 1 - i] for i in range(S)]
    assert len({p for call in captured for p in call}) == S * L  # distinct tensors were recorded
    assert pipe.runner.store.calls == [] and pipe.runner.store.mode == "off"  # released after each call


@pytest.mark.parametrize("height,width", [(64, 64), (72, 40), (40, 104)], ids=["even", "odd-9x5", "odd-5x13"])
def test_kv_shapes_match_the_captured_keys(height, width):
    """The K/V shapes the compiled backends export (and the attention choice is made for) are the
    ones the UNet really produces, also where a downsampler meets an odd latent side (it rounds up)."""
    from regiondrag.export.specs import kv_shapes, make_specs
    from regiondrag.runner import TorchRunner

    comps = load_components(str(TINY), ip_adapter=str(TINY / "ip_adapter"))  # own copy: processors change
    runner = TorchRunner(comps)
    eps, *kv = runner.unet_capture(*make_specs(runner, height, width)["unet_capture"].sample())
    keys = kv[:runner.num_layers]
    assert [tuple(k.shape[1:]) for k in keys] == kv_shapes(comps.unet, height, width)
