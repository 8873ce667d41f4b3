"""The latency benchmark on the CPU: its baseline is a faithful mirror, the command runs end to end, the
report regenerates the README table. No timing is asserted anywhere."""
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import regiondrag as rd
from regiondrag.engine import bench_workloads
from helpers import METHOD_NAMES, TINY_IP, TINY_SD15, TOLERANCES, golden_case, reference_components

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
CASES = ["etcp_onepair_fullmask", "cpte_twopairs_partmask"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def baseline_components():
    """A fresh load: the engine's runners modify the UNet, the baseline must see it as diffusers loads it."""
    from regiondrag.models import load_components

    return load_components(str(TINY_SD15), ip_adapter=str(TINY_IP))


@pytest.mark.parametrize("name", CASES)
def test_baseline_equals_engine_and_reference(baseline_components, name):
    baseline = _load("baseline")
    d = golden_case(name)
    drag = rd.RegionPairs(list(d["src_regions"]), list(d["trg_regions"]))
    params = dict(prompt=str(d["prompt"]), method=METHOD_NAMES[str(d["method"])], steps=int(d["steps"]),
                  start_t=float(d["start_t"]), end_t=float(d["end_t"]), noise_scale=float(d["noise_scale"]),
                  seed=int(d["seed"]), mask=d["mask"], preview=d["preview"])
    engine = rd.RegionDragPipeline(reference_components()).edit(d["ori_image"], drag, **params)
    src, trg = drag.to_points(1 / 8)
    base = baseline.baseline_edit(baseline_components, d["ori_image"], src * 8, trg * 8, **params)
    tol = TOLERANCES["float32"]
    assert (base.latent - engine.latent).abs().max().item() <= tol["latent"]
    assert (base.latent - torch.from_numpy(d["final_latent"])).abs().max().item() <= tol["latent"]
    assert np.abs(np.asarray(base.image, int) - np.asarray(engine.image, int)).max() <= tol["image"]
    assert set(base.timings) >= {"inversion", "sampling", "region_ops", "vae_decode", "total"}
    assert 0 < base.timings["region_ops"] < base.timings["sampling"]


def test_baseline_refuses_components_modified_by_the_engine():
    baseline = _load("baseline")
    comps = reference_components()
    rd.RegionDragPipeline(comps)  # installs the engine's K/V processors on this UNet
    with pytest.raises(ValueError, match="freshly loaded"):
        baseline.baseline_edit(comps, np.zeros((64, 64, 3), np.uint8), [[8, 8]], [[16, 16]])


def test_bench_command_on_cpu(tmp_path):
    out = tmp_path / "res" / "bench.json"
    before = sorted(p.name for p in (BENCH / "results").iterdir())
    env = dict(os.environ, REGIONDRAG_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    env.pop("REGIONDRAG_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "regiondrag.engine", "bench", "--model", "tiny", "--workloads",
                        "default", "--size", "128x128", "--steps", "4", "--backends", "torch,baseline",
                        "--runs", "2", "--warmup", "1", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not GPU figures" in r.stdout and "not GPU figures" in r.stderr
    assert "| workload | backend | e2e median ms |" in r.stdout
    assert "[2/2] baseline 128x128 4 steps done" in r.stderr  # progress per measurement
    assert "sampling:" not in r.stderr  # not the edits' own progress bars
    table = out.with_suffix(".md").read_text()  # the Markdown table file README promises
    assert "| workload | backend | e2e median ms |" in table and "| 128x128 4 steps | torch |" in table
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["smoke"] is True  # on the CPU without --full
    assert doc["device_type"] == "cpu" and doc["device"].startswith("CPU")
    assert doc["weights"] == "random" and doc["model"] == "tiny" and doc["full_size"] is False
    assert {"torch", "diffusers", "transformers", "python"} <= set(doc["versions"])
    assert doc["matmul_tflops"] > 0
    rows = {r["backend"]: r for r in doc["results"]}
    assert set(rows) == {"torch", "baseline"}
    for row in rows.values():
        # Named by what ran (the "default" workload at another size and step count).
        assert row["error"] is None and row["workload"] == "128x128 4 steps" and (row["width"], row["height"]) == (128, 128)
        assert row["e2e_ms_median"] > 0 and row["e2e_ms_p90"] >= row["e2e_ms_median"]
        assert row["first_call_ms"] >= row["load_ms"] > 0 and len(row["e2e_ms_runs"]) == 2
        assert {"text_encode", "image_encode", "vae_encode", "inversion", "sampling", "region_ops",
                "vae_decode"} <= set(row["stages_ms"])
        assert 0 < row["stages_ms"]["region_ops"] < row["stages_ms"]["sampling"]
        assert row["peak_mem_gb"] is None  # CPU: no device allocator to read
        assert row["latent_max_abs_diff_vs_baseline"] <= 1e-4
    assert rows["baseline"]["ratio_to_baseline"] == 1.0
    assert rows["torch"]["ratio_to_baseline"] == pytest.approx(
        rows["torch"]["e2e_ms_median"] / rows["baseline"]["e2e_ms_median"])
    assert doc["ratio_to_baseline"]["torch"]["128x128 4 steps"] == rows["torch"]["ratio_to_baseline"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert doc["chart"] == "bench.png" and out.with_suffix(".png").stat().st_size > 0
    else:
        assert doc["chart"] is None and any("matplotlib" in n for n in doc["notes"])
    assert sorted(p.name for p in (BENCH / "results").iterdir()) == before  # nothing written into the repo


@pytest.mark.parametrize("args,match", [
    (["--backends", "torch,nope"], "allowed values"),
    (["--backends", "tensorrt", "--device", "cpu"], "TensorRT needs a CUDA device"),
    (["--workloads", "huge"], "allowed values"),
    (["--size", "100x7"], "multiples of 8"),
    (["--runs", "0"], "--runs must be an integer in [1, 1000]"),
    (["--steps", "5000"], "steps must be an integer in [2, 1000]"),
    (["--size", "4096x4096"], "from 64 to 2048"),
    (["--out", "README.md/x.json"], "cannot be written"),
    (["--device", "cuda:7"], "device 'cuda:7'"),
])
def test_bench_bad_options_fail_before_loading(capsys, args, match):
    from regiondrag.engine.cli import main

    assert main(["bench", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and match in err


def _fake_run(device, timestamp, e2e_torch, device_type="cuda", full_size=True, settings=None):
    rows = []
    for backend, e2e in (("baseline", 1500.0), ("torch", e2e_torch)):
        rows.append(dict(backend=backend, workload="default", e2e_ms_median=e2e, e2e_ms_p90=e2e * 1.1,
                         first_call_ms=9000.0, stages_ms={"sampling": e2e / 3}, peak_mem_gb=3.5,
                         ratio_to_baseline=e2e / 1500.0, speedup_vs_baseline=1500.0 / e2e,
                         tflops={"sampling": 100.0}, error=None))
    return dict(schema="regiondrag-bench-pipeline/1", timestamp=timestamp, device=device, device_type=device_type,
                model="random-sd15", weights="random", full_size=full_size, dtype="float16",
                versions={"torch": "2.9", "cuda": "12.8"}, matmul_tflops=700.0,
                settings={"runs": 10, "warmup": 2, "size": None, "steps": None, **(settings or {})},
                results=rows, chart=None)


def test_report_regenerates_the_readme_table(tmp_path):
    report = _load("report")
    from regiondrag.engine import bench  # the report keeps its own copies of the names (it needs no torch)

    assert report.BACKENDS == bench.BACKENDS and report.WORKLOADS == tuple(bench_workloads.WORKLOADS)
    res = tmp_path / "results"
    res.mkdir()
    runs = {"gpu-a-old.json": _fake_run("NVIDIA A100-SXM4-80GB", "2025-01-01T10:00:00+00:00", 811.0),
            "gpu-a-new.json": _fake_run("NVIDIA A100-SXM4-80GB", "2025-03-01T10:00:00+00:00", 222.0),
            "gpu-b.json": _fake_run("NVIDIA H100 80GB HBM3", "2025-02-01T10:00:00+00:00", 133.0),
            "cpu-2025-04-01.json": _fake_run("CPU: AMD EPYC", "2025-04-01T10:00:00+00:00", 444.0, device_type="cpu"),
            "tiny-gpu.json": _fake_run("NVIDIA H100 80GB HBM3", "2025-05-01T10:00:00+00:00", 555.0, full_size=False),
            "smoke-gpu.json": _fake_run("NVIDIA H100 80GB HBM3", "2025-06-01T10:00:00+00:00", 666.0,
                                        settings={"size": "128x128"}),
            "partial-gpu.json": {**_fake_run("NVIDIA H100 80GB HBM3", "2025-07-01T10:00:00+00:00", 777.0),
                                 "complete": False}}
    cold = _fake_run("CPU: AMD EPYC", "2025-03-15T10:00:00+00:00", 750.0, device_type="cpu")
    cold["results"][1]["artifact_build_s"] = 50.0  # it built artifacts: listed beside the newer cached run
    runs["cpu-cold.json"] = cold
    for name, doc in runs.items():
        (res / name).write_text(json.dumps(doc))
    (res / "kernels-NVIDIA_H100.json").write_text(json.dumps({"device": "NVIDIA H100", "region_ops": []}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro\n\n{report.BEGIN}\nstale table\n{report.END}\n\nfooter\n")

    assert report.main(["--results", str(res), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Bench\n\nintro\n") and text.endswith("\n\nfooter\n") and "stale table" not in text
    table = [line for line in text.splitlines() if line.startswith("| NVIDIA")]
    assert len(table) == 4  # two GPUs x (baseline, torch)
    assert "| NVIDIA A100-SXM4-80GB | default | torch | 222.0 |" in text  # the newer A100 run wins
    assert "811.0" not in text
    assert "| NVIDIA H100 80GB HBM3 | default | torch | 133.0 |" in text  # tiny/smoke runs are not comparable
    assert "555.0" not in text and "666.0" not in text
    assert "777.0" not in text  # an interrupted run is not listed
    # A full-size CPU run never enters the GPU table: it has a section of its own, labelled as CPU timings.
    gpu_part, cpu_part = text.split("CPU reference runs (CPU timings, not GPU figures")
    assert "444" not in gpu_part and "CPU: AMD EPYC" not in gpu_part
    assert "| CPU: AMD EPYC, cached | default | torch | 0.4 | 1.00× | 3.38× |" in cpu_part  # 1500 / 444
    assert "| CPU: AMD EPYC, cold cache | default | torch | 0.8 | 1.00× | 2.00× | 9 | 50 |" in cpu_part
    assert cpu_part.index("cold cache |") < cpu_part.index("cached |")
    assert "6.76×" in text  # 1500 / 222
    assert report.main(["--results", str(res), "--readme", str(readme), "--check"]) == 0


def test_random_sd15_is_the_full_size_architecture():
    """The full-size random model's shapes, built on the meta device (nothing allocated)."""
    from regiondrag.tiny import IP_PLUS_SD15, VIT_H14, _ip_adapter_state, random_sd15_modules

    with torch.device("meta"):
        unet, vae, text, vision = random_sd15_modules()
    count = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text, vision)]
    assert count == [859_520_964, 83_653_863, 123_060_480, 632_076_800]  # SD-1.5 UNet/VAE/CLIP-L, ViT-H/14
    ip = _ip_adapter_state(unet, VIT_H14["hidden_size"], torch.Generator().manual_seed(1), **IP_PLUS_SD15)
    assert ip["image_proj.latents"].shape == (1, 16, 768)  # 16 tokens of 768
    assert ip["image_proj.proj_in.weight"].shape == (768, 1280)
    assert ip["image_proj.layers.0.0.to_q.weight"].shape == (768, 768)  # 12 heads of 64
    assert len([k for k in ip if k.startswith("image_proj.layers.") and k.endswith("0.to_q.weight")]) == 4
    assert len([k for k in ip if k.endswith("to_k_ip.weight")]) == 16


def _bench_args(*argv):
    from regiondrag.engine.cli import build_parser

    return build_parser().parse_args(["bench", *argv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_cpu_default_is_a_labelled_smoke_run():
    from regiondrag.engine.bench_cli import SMOKE, config_from_args

    cfg = config_from_args(_bench_args(), lambda m: None)
    assert cfg.smoke and cfg.model == "tiny" and (cfg.runs, cfg.warmup) == (SMOKE["runs"], SMOKE["warmup"])
    assert [(w.name, w.width, w.height, w.method) for w in cfg.workloads] == [
        ("256x256", 256, 256, "encode_then_cp"), ("256x256 cp_then_encode", 256, 256, "cp_then_encode")]
    full = config_from_args(_bench_args("--full"), lambda m: None)
    assert not full.smoke and full.runs == 10 and [w.name for w in full.workloads] == list(bench_workloads.WORKLOADS)
    # Overridden sizes collapse workloads that became the same edit, each named by what runs.
    sized = config_from_args(_bench_args("--full", "--size", "128x64", "--steps", "10"), lambda m: None)
    assert [w.name for w in sized.workloads] == ["128x64 10 steps", "128x64 cp_then_encode 10 steps"]


def test_results_are_written_after_each_measurement(tmp_path):
    """An interrupted run keeps what it measured: the document is handed over after every row."""
    from regiondrag.engine.bench import BenchConfig, run_bench

    w = replace(bench_workloads.WORKLOADS["default"], name="tiny64", width=64, height=64, steps=4)
    cfg = BenchConfig(model="tiny", ip_adapter=None, device=torch.device("cpu"), dtype=torch.float32,
                      backends=["torch", "baseline"], workloads=[w, replace(w, name="tiny64b", seed=1)],
                      runs=1, warmup=1)
    seen, said = [], []
    final = run_bench(cfg, said.append, on_update=seen.append)
    assert [len(d["results"]) for d in seen] == [1, 2, 3, 4]
    assert all(d["complete"] is False and any("INCOMPLETE" in n for n in d["notes"]) for d in seen)
    assert final["complete"] is True and not any("INCOMPLETE" in n for n in final["notes"])
    assert [m.split(" done")[0] for m in said if m.startswith("[")] == [
        "[1/4] torch tiny64", "[2/4] torch tiny64b", "[3/4] baseline tiny64", "[4/4] baseline tiny64b"]
    assert "left" in [m for m in said if m.startswith("[1/4]")][0]


def test_a_backend_killed_midway_costs_only_its_rows(tmp_path):
    """Each backend runs in its own process: one killed (as the kernel kills for memory) is recorded as
    errors for its workloads and the next backend still runs; every row records the peak host memory."""
    import multiprocessing
    import signal

    from regiondrag.engine.bench import BenchConfig, run_bench

    w = replace(bench_workloads.WORKLOADS["default"], name="tiny64", width=64, height=64, steps=4)
    cfg = BenchConfig(model="tiny", ip_adapter=None, device=torch.device("cpu"), dtype=torch.float32,
                      backends=["torch", "baseline"], workloads=[w, replace(w, name="tiny64b", seed=1)],
                      runs=1, warmup=1)
    killed = []

    def say(message):
        if message.startswith("torch: loading") and not killed:
            for child in multiprocessing.active_children():
                if child.name == "bench-torch":
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)

    doc = run_bench(cfg, say)
    assert killed
    rows = {(r["backend"], r["workload"]): r for r in doc["results"]}
    for name in ("tiny64", "tiny64b"):
        assert "exited with code -9" in rows[("torch", name)]["error"]
        ok = rows[("baseline", name)]
        assert ok["error"] is None and 0 < ok["peak_rss_gb"] < 64 and 0 < ok["peak_anon_gb"] < 64
    assert doc["complete"] is True


def test_compiled_backends_count_flops_first_and_free_the_eager_weights(tmp_path, monkeypatch):
    """At one resolution an artifact backend has its artifacts built first, each network by a process of
    its own whose peak memory counts in the backend's; its benchmark process then counts its FLOPs with
    the eager networks, frees the eager weights its artifacts replace and loads them from the cache:
    the counts are the eager backend's."""
    pytest.importorskip("onnxruntime")
    from regiondrag.engine.bench import BenchConfig, run_bench

    monkeypatch.setenv("REGIONDRAG_CACHE", str(tmp_path / "cache"))
    w = replace(bench_workloads.WORKLOADS["default"], name="tiny64", width=64, height=64, steps=4)
    cfg = BenchConfig(model="tiny", ip_adapter=None, device=torch.device("cpu"), dtype=torch.float32,
                      backends=["torch", "onnxruntime"], workloads=[w], runs=1, warmup=1)
    said = []
    rows = {r["backend"]: r for r in run_bench(cfg, said.append)["results"]}
    assert all(r["error"] is None for r in rows.values())
    assert rows["torch"]["eager_weights_kept"] is None and rows["onnxruntime"]["eager_weights_kept"] is False
    assert rows["onnxruntime"]["flops"] == rows["torch"]["flops"] and rows["torch"]["flops"]["sampling"] > 0
    assert any("freed" in m and "eager weights" in m for m in said)
    ort = rows["onnxruntime"]
    assert ort["artifacts_built_apart"] and ort["artifacts"] == "built" and ort["artifact_build_s"] > 0
    assert 0 < ort["build_peak_anon_gb"] <= ort["peak_anon_gb"] < 64
    assert ort["first_call_ms"] > ort["load_ms"] + ort["first_edit_ms"]  # the build processes' time
    assert not any(m.startswith("building") for m in said[said.index("onnxruntime: loading tiny"):])


def test_process_tree_memory_counts_anonymous_memory_of_children():
    """The parent's sampler sees what a backend's children (a build's compiler) hold."""
    from regiondrag.engine.hardware import TreeMemorySampler, process_tree_memory_gb

    if process_tree_memory_gb(os.getpid()) is None:
        pytest.skip("no /proc here")
    code = "import time; x = b'x' * (300 * 2**20); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        own_rss, own_anon = process_tree_memory_gb(child.pid)
        sampler = TreeMemorySampler(os.getpid(), interval=0.05)
        sampler.stop()
        assert 300 / 1024 <= own_anon <= own_rss
        assert sampler.peak_anon_gb > own_anon and sampler.peak_rss_gb >= sampler.peak_anon_gb
    finally:
        child.kill()
        child.wait()
    assert process_tree_memory_gb(child.pid) is None  # gone


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_bench_takes_its_backend_process_with_it():
    """SIGKILL on the bench (no clean-up of its own runs) ends the backend process it started, which would
    otherwise hold the CPU and the model's memory for minutes."""
    import signal
    import time

    if not Path("/proc/self/task").exists():
        pytest.skip("no /proc here")
    code = ("import torch, sys\n"
            "from dataclasses import replace\n"
            "from regiondrag.engine import bench_workloads\n"
            "from regiondrag.engine.bench import BenchConfig, run_bench\n"
            "w = replace(bench_workloads.WORKLOADS['default'], name='t', width=64, height=64, steps=4)\n"
            "cfg = BenchConfig(model='tiny', ip_adapter=None, device=torch.device('cpu'), dtype=torch.float32,\n"
            "                  backends=['torch'], workloads=[w], runs=1000, warmup=1)\n"
            "run_bench(cfg, lambda m: print(m, flush=True))\n")
    bench = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for line in bench.stdout:
            if line.startswith("torch: loading"):
                break
        workers = [p for p in _children(bench.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert workers, "no backend process found"
    finally:
        bench.send_signal(signal.SIGKILL)
        bench.wait()
    deadline = time.monotonic() + 30
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in workers if _running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, "the backend process outlived the bench"
