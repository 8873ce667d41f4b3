"""FLOP counting per stage (regiondrag.engine.flops) against torch.utils.flop_counter."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import regiondrag as rd
from helpers import reference_components
from regiondrag.engine.flops import StageFlops, count_edit_flops
from regiondrag.export.specs import make_specs
from regiondrag.pipeline import RegionDragPipeline
from regiondrag.schedule import make_schedule

SETTINGS = dict(steps=6, start_t=0.5, end_t=0.2, seed=3)


@pytest.fixture(scope="module")
def pipe():
    return RegionDragPipeline(reference_components())


def _drag(h, w):
    src, trg = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    src[8:32, 8:32] = 1
    trg[20:44, 30:54] = 1
    return rd.RegionPairs([src], [trg])


def _one_call(fn, args) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("method", ["encode_then_cp", "cp_then_encode"])
def test_stage_flops_are_the_network_calls_the_edit_makes(pipe, method):
    """Inversion = S calls of the variant that records keys/values (plus, for cp_then_encode, S plain
    calls on the preview); sampling = S replay calls, which skip the key/value projections; the whole
    edit agrees with torch's own FlopCounterMode."""
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    edit = lambda: pipe.edit(image, _drag(64, 64), method=method, **SETTINGS)  # noqa: E731
    by_stage = count_edit_flops(edit, pipe.runner)

    whole = FlopCounterMode(display=False)
    with torch.no_grad(), whole:
        edit()
    assert sum(by_stage.values()) == whole.get_total_flops() > 0

    r = pipe.runner
    specs = make_specs(r, 64, 64)
    unet_args = specs["unet"].sample()
    capture, replay = _one_call(r.unet_capture, unet_args), _one_call(r.unet_replay, specs["unet_replay"].sample())
    plain = _one_call(r.unet, unet_args)
    assert replay < capture and plain == capture  # replay takes K/V as inputs; capture only returns them
    s = make_schedule(SETTINGS["steps"], SETTINGS["start_t"], SETTINGS["end_t"], method == "encode_then_cp",
                      pipe.components.scheduler_config).num_steps
    assert by_stage["inversion"] == s * capture + (0 if method == "encode_then_cp" else s * plain)
    assert by_stage["sampling"] == s * replay
    encodes = 1 if method == "encode_then_cp" else 2  # the image, and the preview for cp_then_encode
    assert by_stage["vae_encode"] == encodes * _one_call(r.vae_encoder, specs["vae_encoder"].sample())
    assert by_stage["vae_decode"] == _one_call(r.vae_decoder, specs["vae_decoder"].sample())


def test_stage_flops_count_only_inside_the_mode():
    a = torch.randn(8, 16)
    b = torch.randn(16, 4)
    counter = StageFlops()
    with counter:
        a @ b
    a @ b
    assert dict(counter.by_stage) == {"other": 2 * 8 * 16 * 4}


def test_compiled_runners_are_counted_with_their_eager_networks():
    """Artifacts run outside torch's dispatcher: the count swaps in the eager networks (same variants) and
    puts the artifacts back afterwards, without preparing artifacts (only the eager runner's preparation)."""
    from regiondrag.engine.flops import eager_networks

    class Runner:
        name, device = "fake", torch.device("cpu")
        prepared = []

        def __init__(self):
            self.eager = {"unet": lambda x: x @ x}
            self.unet = lambda x: x  # an "artifact": no FLOPs visible to torch

        def prepare(self, height, width):
            self.prepared.append((height, width))

    runner = Runner()
    artifact = runner.unet
    x = torch.randn(4, 4)

    def edit():
        runner.prepare(64, 64)
        return runner.unet(x)

    assert count_edit_flops(edit, runner) == {"other": 2 * 4 * 4 * 4}
    assert runner.unet is artifact and runner.prepared == [] and "prepare" not in vars(runner)
    with eager_networks(runner):
        assert runner.unet is runner.eager["unet"]
    runner.prepare(8, 8)
    assert runner.prepared == [(8, 8)]
