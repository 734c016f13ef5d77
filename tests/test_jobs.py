"""The job API (`pcpp_runtime.jobs.run`) on every kind of ranks, its typed result and versioned
report, the job as data for child processes, and the README's Python examples run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from pcpp_runtime import ParallelConfig
from pcpp_runtime.connect import TransportSettings
from pcpp_runtime.jobs import REPORT_SCHEMA_PATH, SCHEMA_VERSION, JobSpec, Threads, run
from pcpp_runtime.partition import ShapeError
from pcpp_runtime.pipelines import load_pipelines
from pcpp_runtime.threads import run_in_threads
from pcpp_runtime.worker import GenerateJob

REPO = Path(__file__).resolve().parent.parent
SPEC = JobSpec(model="tiny-sd", prompt="a red circle at the top left", steps=4, seed=2)
CONFIG = ParallelConfig(policy="partial", portion=0.3, warmup_steps=1, timeout_s=60)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(REPORT_SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def two_pipes(tiny_sd_path):
    return load_pipelines("tiny-sd", 2)


def test_threads_result_is_typed_and_its_report_follows_the_schema(two_pipes, schema):
    result = run(SPEC, CONFIG, Threads(2), compare=True, pipelines=two_pipes, progress=False)
    assert result.world_size == 2 and result.transport == "local" and (result.height, result.width) == (64, 64)
    assert result.latents.shape == (1, 4, 32, 32) and result.pixels.shape == (3, 64, 64)
    assert result.image.size == (64, 64)
    assert [r.rank for r in result.ranks] == [0, 1]
    assert all(r.engine_bytes_received == r.transport_counters["payload_received"] > 0 for r in result.ranks)
    report = result.to_json()
    jsonschema.validate(report, schema)
    assert report["schema"] == SCHEMA_VERSION == schema["properties"]["schema"]["const"]
    assert set(report) == set(schema["properties"])  # every key described, none missing
    c = result.comparison
    assert not c.identical and c.max_abs_diff > 0
    assert c.psnr_db > 40  # 45.8 dB measured (torch 2.13 CPU): partial(0.3) after one warm-up step of four
    assert c.speedup == pytest.approx(c.baseline_seconds / result.denoise_seconds)
    # without compare the report has no comparison keys, and still follows the schema
    plain = run(SPEC, CONFIG, Threads(2), pipelines=two_pipes, progress=False).to_json()
    jsonschema.validate(plain, schema)
    assert "psnr_db" not in plain and "speedup" not in plain


def test_the_pipelines_given_come_back_unwrapped(two_pipes):
    """run() takes its hooks off again: the same pipelines give the same latent twice, and rank
    0's pipeline alone is the stock pipeline."""
    first = run(SPEC, CONFIG, Threads(2), pipelines=two_pipes, progress=False)
    again = run(SPEC, CONFIG, Threads(2), pipelines=two_pipes, progress=False)
    assert torch.equal(first.latents, again.latents)
    assert not two_pipes[0].unet._forward_hooks and not two_pipes[0].unet._forward_pre_hooks
    one = run(SPEC, CONFIG, Threads(1), pipelines=two_pipes[:1], progress=False)
    assert torch.equal(one.latents, run(SPEC, CONFIG, Threads(1), pipelines=two_pipes[1:], progress=False).latents)


def test_a_held_transport_runs_the_same_job_as_threads(two_pipes):
    """ranks can be transports the caller holds: rank 0 gets the result, the other rank None,
    and the latent is the one Threads(2) gives, bit for bit."""
    expected = run(SPEC, CONFIG, Threads(2), pipelines=two_pipes, progress=False)

    def rank(transport):
        return run(SPEC, CONFIG, transport, pipelines=[two_pipes[transport.rank]], progress=False)

    results = run_in_threads(2, rank, timeout_s=120)
    assert results[1] is None
    assert results[0].transport == "local" and torch.equal(results[0].latents, expected.latents)
    assert [r.to_dict() for r in results[0].ranks][0]["denoiser_calls"] == SPEC.steps


def test_bad_input_is_refused_before_any_rank_waits(two_pipes):
    with pytest.raises(ShapeError, match="at most 3 rank"):
        run(JobSpec(model="tiny-sd", height=24, steps=2), CONFIG, Threads(4), progress=False)
    with pytest.raises(ValueError, match="2 pipeline\\(s\\) needed here"):
        run(SPEC, CONFIG, Threads(2), pipelines=two_pipes[:1], progress=False)
    with pytest.raises(ValueError, match="whole number of ranks"):
        Threads(0)
    with pytest.raises(TypeError, match="Threads\\(n\\), Launched\\(transport\\) or a connected Transport"):
        run(SPEC, CONFIG, 2, progress=False)


def test_a_generate_job_goes_to_child_processes_as_data():
    job = GenerateJob(
        JobSpec(model="tiny-sd", prompt='say "hi"', height=64, steps=3),
        ParallelConfig(policy="partial", portion=0.2, partitioner="weighted", weights=(2, 1), timeout_s=30),
        "zmq",
        TransportSettings(bind_addr="0.0.0.0", advertise_addr="198.51.100.1", port_range=(40000, 40100)),
        device="cpu",
        compare=True,
        output="out.png",
        report=None,
    )
    text = json.dumps(job.to_json())
    assert GenerateJob.from_json(json.loads(text)) == job


def test_the_worker_refuses_what_is_not_a_job():
    done = subprocess.run([sys.executable, "-m", "pcpp_runtime.worker", "{not json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "not a job pcpp generate wrote" in done.stderr and "Traceback" not in done.stderr


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_readmes_python_examples_run_as_written(tmp_path):
    """Every Python block of the README, each in a fresh interpreter in an empty folder: the
    threads example and the parallelize example run as they are; the launched example (job.py)
    runs under `pcpp launch -n 2` as its comment says."""
    blocks = _readme_python_blocks()
    assert len(blocks) >= 4, "README's Python examples"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for index, block in enumerate(blocks):
        if "register_policy" in block:
            continue  # the plugin example: tests/test_plugins.py runs its policy
        script = tmp_path / ("job.py" if "Launched(" in block else f"example_{index}.py")
        script.write_text(block)
        if "Launched(" in block:
            command = [str(Path(sys.executable).parent / "pcpp"), "launch", "-n", "2", "--", sys.executable, script.name]
        else:
            command = [sys.executable, script.name]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, f"README block {index}:\n{block}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["schema"] == SCHEMA_VERSION
    assert (tmp_path / "job.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
