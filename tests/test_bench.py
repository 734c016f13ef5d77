"""`pcpp bench` and `pcpp plan`: the benchmark runs on a tiny case and writes its files; the
cost model, the targets and the report behave. No timings are checked (benchmarks are not tests)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from pcpp_runtime.bench import costmodel, netns, report, runner, targets
from pcpp_runtime.bench.model import MODELS, build_unet, parameter_count

PCPP = [sys.executable, "-m", "pcpp_runtime.cli"]


def test_benchmark_model_is_an_sdxl_shaped_unet():
    unet = build_unet("bench")
    assert round(parameter_count(unet) / 1e6, 2) == 24.06
    config = unet.config
    assert config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert config.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert tuple(config.block_out_channels) == (64, 128, 256)
    assert config.addition_embed_type == "text_time" and config.projection_class_embeddings_input_dim == 80
    assert MODELS["bench"].text_embeds_dim == 80 - 6 * 8


def test_policy_spec_parsing():
    assert runner.PolicySpec.parse("partial:0.1") == runner.PolicySpec("partial", 0.1)
    assert runner.PolicySpec.parse("full").label == "full"
    assert runner.PolicySpec.parse("partial").label == "partial(0.3)"
    with pytest.raises(ValueError, match="not a number"):
        runner.PolicySpec.parse("partial:x")


def test_bench_tiny_case_writes_its_files(tmp_path):
    """Two fresh worker processes over zmq and one worker beside them: every file written."""
    from pcpp_runtime.cli import main

    out = tmp_path / "bench"
    # the runner runs here (torch is imported already); the workers and the one worker are fresh processes
    code = main(["bench", "--model", "tiny", "--worlds", "2", "--policies", "partial:0.3", "--no-wait", "--no-progress",
                 "--point-timeout", "150", "--out", str(out)])
    assert code == 0, "\n".join(log.read_text()[-3000:] for log in (out / "runs").glob("*/log.txt"))
    for name in ("results.json", "results.csv", "results.md"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert len(data["points"]) == 1 and not data["failures"]
    assert data["meta"]["cpu_bind"] == "cores"  # the default: each worker on its share of the CPUs
    point = data["points"][0]
    assert point["world_size"] == 2 and point["transport"] == "zmq" and point["label"] == "partial(0.3)"
    assert point["seconds"] > 0 and point["baseline_seconds"] > 0 and point["speedup"] > 0
    # partial(0.3) on 2 workers against one: 58.3 dB measured (torch 2.13 CPU)
    assert point["psnr_db"] is not None and point["psnr_db"] > 53, point["psnr_db"]
    # engine ledger = transport counter = formulas
    assert point["bytes_agree"] and point["formula_agrees"]
    assert point["engine_bytes_received"] == point["transport_bytes_received"]
    assert set(point["received_by_kind_mean"]) == {"attention_kv", "halo", "norm", "output"}
    assert all(b > 0 for b in point["stale_buffer_bytes"]) and all(m > 0 for m in point["peak_rss_bytes"])
    assert len(point["step_seconds"]) == MODELS["tiny"].steps
    assert "loadavg" in point["machine_before"] and "foreign_cpu_cores" in point["machine_during"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["label"] == "partial(0.3)"
    text = (out / "results.md").read_text()
    assert "| 32x32 | 2 | partial(0.3) | zmq |" in text and "## Targets" in text
    assert "each bound to its share of the CPUs" in text
    logs = "".join(log.read_text() for log in (out / "runs").glob("*/log.txt"))
    assert "[launcher] binding workers to CPUs: rank 0: CPU" in logs
    # the plots need matplotlib, which the test extras install (without it the report skips them:
    # test_targets_report_measured_figures_and_misses)
    assert importlib.util.find_spec("matplotlib"), "matplotlib is missing: pip install -e '.[test]'"
    for name in ("speedup_vs_world.png", "bytes_by_kind.png", "psnr_vs_bytes.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_world_size_one_runs_stock_and_wrapped_alike(tmp_path, capsys):
    from pcpp_runtime.bench import worker

    spec = {"model": "tiny", "latent": 32, "policy": "partial", "portion": 0.3, "warmup": 1, "steps": 2, "seed": 0,
            "repeats": 1}
    result = worker.run_overhead(spec, tmp_path)
    assert result["identical"] is True and len(result["stock_seconds"]) == len(result["wrapped_seconds"]) == 1
    assert json.loads((tmp_path / "result.json").read_text())["identical"] is True
    assert "@@pcpp-bench progress 4 4" in capsys.readouterr().out


def test_plan_predicts_sdxl_on_gpus(tmp_path, capsys):
    from pcpp_runtime.cli import main

    target = tmp_path / "plan.json"
    assert main(["plan", "--gpus", "8", "--links", "100gbe", "--json", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "measured on NVIDIA H100" in printed and "2.36-8.02x" in printed
    rows = {r["policy"]: r for r in json.loads(target.read_text())["gpus"]}
    full, partial = rows["full"], rows["partial(0.3)"]
    assert partial["received_per_step_max"] < 0.35 * full["received_per_step_max"]
    assert 1 < full["speedup"] < partial["speedup"] <= 8


def test_gpu_compute_measured_per_strip_or_ideal_scaling():
    """The strip times come from docs/benchmarks/gpu_strip_times.json (read as a user's file would be)."""
    times = costmodel.GpuTimes.load(targets.default_data_file("gpu_strip_times.json"))
    measured = times.strip_times["h100"]["ms"]
    one, c_sync, c_disp = costmodel.gpu_compute(times, "h100", 4, 1, "partial", 0.3)  # 8 GPUs in 2 CFG groups
    assert one == measured[2][1]["stock"] / 1e3 and c_disp == measured[1][4]["partial(0.3)"] / 1e3
    one, c_sync, c_disp = costmodel.gpu_compute(times, "a100", 4, 1, "full")
    assert c_sync == c_disp == pytest.approx(one / 8)
    assert costmodel.gpu_compute(times, "h100", 4, 1, "full", step_time_s=0.8)[1:] == pytest.approx((0.1, 0.1))
    with pytest.raises(ValueError, match=r"partial\(0.1\)"):
        costmodel.gpu_compute(times, "h100-eager", 2, 2, "partial", 0.1)
    with pytest.raises(ValueError, match="unknown GPU compute"):
        costmodel.gpu_compute(times, "v100", 2, 2, "full")
    with pytest.raises(ValueError, match="cannot read them"):
        costmodel.GpuTimes.load(targets.default_data_file("targets.json"))  # not a strip times file


def test_generation_time_is_compute_or_link_bound():
    ranks = [{"rank": 0, "sync_exchanges": 10,
              "sync": {"total": 10e6, "output": 1e6}, "displaced": {"total": 5e6, "output": 1e6}}]
    fast = costmodel.Link("fast", 1e12, 0.0)
    slow = costmodel.Link("slow", 1e6, 0.0)  # 1 MB/s: 4 s per displaced step of stale context
    t = costmodel.generation_time(1.0, 0.5, ranks, fast, steps=10, warmup=2)
    assert t["seconds"] == pytest.approx(2 * 1.0 + 8 * 0.5, rel=1e-3)
    t = costmodel.generation_time(1.0, 0.5, ranks, slow, steps=10, warmup=2)
    assert t["displaced_step"] == pytest.approx(4.0 + 1.0)  # transfer-bound + the output gather
    assert t["sync_step"] == pytest.approx(1.0 + 10.0)
    assert t["seconds"] == pytest.approx(2 * 11.0 + 4.0 + 8 * 5.0)
    sync = costmodel.generation_time(1.0, 0.5, ranks, slow, steps=10, warmup=2, synchronous_policy=True)
    assert sync["seconds"] == pytest.approx(10 * 11.0)
    link = costmodel.tbf_link("100mbit")
    assert link.bytes_per_s == pytest.approx(12.5e6 * 1448 / 1514)
    # a token bucket (tbf) refills while the rank computes between the exchanges of a synchronous step
    bucket = costmodel.Link("bucket", 1e6, 0.0, burst_bytes=0.5e6)
    layered = [dict(ranks[0], sync_exchanges=3, sync_layer_bytes=[3e6, 3e6, 3e6])]  # 9 MB in 3 exchanges
    t = costmodel.generation_time(2.0, 0.5, layered, bucket, steps=1, warmup=1)  # 0.67 s between exchanges
    assert t["sync_step"] == pytest.approx(2.0 + 3 * (3.0 - 0.5) + 1.0)  # the bucket's 0.5 MB go at once


def test_formula_bytes_of_the_benchmark_model_meet_the_byte_targets():
    """Bytes are a property of the model and the policy (no timing): every byte target of
    docs/benchmarks/targets.json holds on the formulas."""
    cache: dict = {}
    byte_targets = [t for t in targets.load_targets(targets.default_data_file("targets.json")) if t["kind"] == "bytes"]
    assert len(byte_targets) == 3
    for target in byte_targets:
        policy = runner.PolicySpec.parse(target["label"].replace("(", ":").rstrip(")"))
        ranks = costmodel.formula_bytes("bench", target["latent"], target["world_size"], policy.name, policy.portion,
                                        cache=cache)
        per_rank = [r["displaced"]["total"] / 1e6 for r in ranks]
        value = max(per_rank) if target["statistic"] == "max" else sum(per_rank) / len(per_rank)
        assert value <= target["max_mb"], target
        for rank in ranks:  # the per-exchange split adds up to the synchronous step's context
            assert sum(rank["sync_layer_bytes"]) == rank["sync"]["total"] - rank["sync"]["output"]


def _record(**fields):
    base = dict(kind="parallel", model="bench", latent=64, world_size=2, label="partial(0.3)", policy="partial",
                portion=0.3, transport="zmq", link="loopback", seconds=5.0, baseline_seconds=9.0, speedup=1.8,
                received_per_step_mean=2.0e6, received_per_step_max=2.1e6, stale_buffer_bytes=[1, 1],
                received_by_kind_mean={k: 0.5e6 for k in report.KINDS}, psnr_db=50.0, peak_rss_bytes=[1, 1])
    base.update(fields)
    return base


def test_targets_report_measured_figures_and_misses(tmp_path, monkeypatch):
    results = {
        "meta": {"model": "bench", "steps": 20, "warmup_steps": 4, "seed": 0},
        "points": [
            _record(),
            _record(latent=128, seconds=30.0, baseline_seconds=46.0, speedup=46 / 30),
            _record(world_size=4, label="full", policy="full", received_per_step_max=8.0e6, stale_buffer_bytes=[10, 10, 10, 10]),
            _record(world_size=4, received_per_step_mean=2.0e6, stale_buffer_bytes=[3, 3, 3, 4]),
        ],
        "throttled": [],
        "throttled_skipped": "the throttled-link mode needs root (ip netns add, tc qdisc)",
        "failures": [],
    }
    project = targets.load_targets(targets.default_data_file("targets.json"))
    rows = {t["target"]: t for t in targets.evaluate_targets(results, project)}
    assert rows["bytes-2w-partial"]["ok"] is True
    assert rows["speedup-64-partial"]["ok"] is True
    assert rows["speedup-128-partial"]["ok"] is False and "1.53x" in rows["speedup-128-partial"]["measured"]
    assert rows["stale-memory"]["ok"] is False and "40.0%" in rows["stale-memory"]["measured"]
    assert rows["throttled-100mbit"]["ok"] is None and "needs root" in rows["throttled-100mbit"]["measured"]
    assert rows["world1"]["ok"] is None  # not measured in this run
    # without matplotlib: tables written, plots skipped with the way to get them
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    results["meta"]["targets_file"] = "targets.json"
    report.write_outputs(results, tmp_path, targets=project, say=lambda _: None)
    text = (tmp_path / "results.md").read_text()
    assert "pip install 'pcpp-runtime[bench]'" in text and "From `targets.json`." in text
    assert not list(tmp_path.glob("*.png"))


def test_a_malformed_targets_file_is_refused_naming_it(tmp_path):
    bad = tmp_path / "targets.json"
    bad.write_text('{"targets": [{"id": "x", "kind": "speed"}]}')
    with pytest.raises(ValueError, match="targets.json.*needs an id and a kind of bytes"):
        targets.load_targets(bad)
    from pcpp_runtime.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--targets", str(bad), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2


def test_throttled_mode_skips_with_the_reason_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = netns.unavailable()
    assert reason is not None and "root" in reason
    results = {"throttled": [], "throttled_skipped": None, "failures": []}
    said = []
    runner._run_throttled(runner.BenchOptions(throttle=["100mbit"]), None, results, said.append)
    assert results["throttled_skipped"] == reason and "skipped" in said[0]


def test_help_stays_quick():
    start = time.monotonic()
    result = subprocess.run(PCPP + ["--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "bench" in result.stdout and "plan" in result.stdout
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, pcpp_runtime.cli as c; c.build_parser(); print(' '.join(sys.modules))"],
        capture_output=True, text=True, timeout=30,
    ).stdout.split()
    assert time.monotonic() - start < 5  # generous on a loaded machine; the import check above is the real one
