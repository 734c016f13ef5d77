"""`pcpp generate` as a user runs it: a subprocess, its files and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PCPP = [sys.executable, "-m", "pcpp_runtime.cli"]


def run(args, timeout=300):
    return subprocess.run(PCPP + args, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_help_is_quick():
    start = time.monotonic()
    result = run(["--help"])
    assert result.returncode == 0 and "generate" in result.stdout
    # 0.5 s measured here; the bound leaves room for a loaded CI machine. What keeps it quick:
    assert time.monotonic() - start < 5.0
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pcpp_runtime.cli as c; c.build_parser(); print(sorted(m for m in "
         "('torch', 'diffusers', 'zmq', 'mpi4py') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # no heavy import before a command needs it


def test_generate_writes_image_and_report(tmp_path, tiny_sd_path):
    image, report = tmp_path / "out.png", tmp_path / "report.json"
    result = run(["generate", "--model", "tiny-sd", "--nproc", "2", "--steps", "6", "--warmup-steps", "2", "--policy", "partial",
                  "--compare", "--output", str(image), "--report", str(report)])
    assert result.returncode == 0, result.stderr
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.read_text())
    for key in ("world_size", "policy", "portion", "warmup_steps", "transport", "steps", "height", "width",
                "denoise_seconds", "bytes_sent_per_step", "bytes_received_per_step", "psnr_db", "max_abs_diff"):
        assert key in data, key
    assert data["world_size"] == 2 and data["transport"] == "local" and len(data["bytes_received_per_step"]) == 2
    # partial(0.3) after 2 warm-up steps of 6 on 2 ranks: 53.7 dB measured (torch 2.13 CPU)
    assert data["psnr_db"] > 48 and data["max_abs_diff"] > 0, data["psnr_db"]
    assert data["engine_bytes_received"] == data["transport_bytes_received"]
    assert "vs one worker" in result.stdout


def test_a_folder_with_the_positional_unet_loads_in_a_fresh_process(tmp_path, builtin_model):
    """``pcpp generate --model FOLDER`` on a pipeline whose model_index.json names
    PositionalUNet2DConditionModel (the demo model's UNet): the process has not imported that
    class's module before loading, which diffusers needs (a ValueError naming the module if not)."""
    folder = Path(builtin_model("tiny-sd-pos").path)  # built here, loaded by its path there
    assert "positional_unet" in (folder / "model_index.json").read_text()
    result = run(["generate", "--model", str(folder), "--steps", "2", "--output", str(tmp_path / "pos.png")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "pos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--policy", "fastest"], "unknown policy 'fastest'"),
    (["--portion", "0"], "portion must be a number in (0, 1], got 0.0"),
    (["--portion", "1.5"], "got 1.5"),
    (["--warmup-steps", "-1"], "warmup_steps must be an integer >= 0, got -1"),
    (["--nproc", "0"], "expected a number >= 1, got 0"),
    (["--height", "24", "--nproc", "4"], "at least 32 px or at most 3 rank(s)"),
    (["--height", "60"], "not a multiple of 8 px"),
    (["--scheduler", "nonsense"], "unknown scheduler 'nonsense'"),
    (["--cpu-bind", "cores"], "--cpu-bind places the worker processes --nproc starts"),  # threads: nothing to bind
])
def test_bad_input_is_a_clear_error_without_traceback(args, message, tiny_sd_path):
    result = run(["generate", "--model", "tiny-sd", "--steps", "2"] + args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
