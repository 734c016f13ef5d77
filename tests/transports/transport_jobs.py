"""Start a transport test job in real processes and collect every rank's outcome.

``torch`` and ``zmq``: one ``subprocess`` per rank running ``transport_worker.py`` (ports are
random free ports on 127.0.0.1); as soon as one rank fails, the others get a short grace period
and are then killed, like ``torchrun`` does. ``mpi``: ``mpiexec -n N`` from the directory of
``sys.executable`` (the venv's MPICH). Every job has a hard deadline; nothing is left running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "transport_worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpiexec_path() -> str | None:
    candidate = Path(sys.executable).parent / "mpiexec"
    if candidate.exists():
        return str(candidate)
    return shutil.which("mpiexec")


def skip_without_mpiexec(transport: str) -> None:
    """Fail the calling test if it runs ``transport`` ``mpi`` and there is no ``mpiexec``: on
    Linux ``pip install -e '.[test]'`` installs MPICH's (the ``mpich`` wheel), so a missing one is
    a broken install, not something to skip. Elsewhere, where that wheel does not exist, skip."""
    if transport != "mpi" or mpiexec_path() is not None:
        return
    where = f"next to {sys.executable} or on PATH"
    if not sys.platform.startswith("linux"):
        pytest.skip(f"no mpiexec {where}; the mpich wheel is Linux-only: install an MPI with mpiexec")
    pytest.fail(f"no mpiexec {where}: pip install -e '.[test]' installs it (the mpich wheel)", pytrace=False)


@dataclasses.dataclass
class JobResult:
    returncodes: list[int | None]
    results: dict[int, dict[str, Any]]
    logs: dict[str, str]
    elapsed: float
    timed_out: bool

    def report(self) -> str:
        """Every rank's outcome and traceback, and the tail of every log, for assertion messages."""
        lines = [f"exit codes {self.returncodes}, {self.elapsed:.1f} s, timed out: {self.timed_out}"]
        for rank in sorted(self.results):
            res = self.results[rank]
            if res.get("ok"):
                lines.append(f"--- rank {rank}: ok")
            else:
                lines.append(
                    f"--- rank {rank}: {res.get('error_type')}: {res.get('error')}\n{res.get('traceback', '')}"
                )
        for name, text in self.logs.items():
            if text.strip():
                lines.append(f"--- {name} (last 3000 chars)\n{text[-3000:]}")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(code == 0 for code in self.returncodes)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PCPP_TEST_SPAWNED_AT=str(time.time()),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(HERE) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def run_job(
    transport: str,
    world_size: int,
    scenario: str = "conformance",
    *,
    timeout_s: float = 30.0,
    job_timeout: float = 120.0,
    kill_grace: float = 2.0,
    device: str = "cpu",
) -> JobResult:
    """Run ``scenario`` on ``world_size`` ranks of ``transport``; never blocks past ``job_timeout``."""
    out = Path(tempfile.mkdtemp(prefix=f"pcpp-{transport}-{scenario}-"))
    common = [
        "--transport",
        transport,
        "--scenario",
        scenario,
        "--timeout",
        str(timeout_s),
        "--out",
        str(out),
        "--device",
        device,
    ]
    start = time.monotonic()
    try:
        if transport == "mpi":
            mpiexec = mpiexec_path()
            if mpiexec is None:
                raise RuntimeError("mpiexec not found next to sys.executable or on PATH")
            cmd = [mpiexec, "-n", str(world_size), sys.executable, str(WORKER), *common]
            procs = [_popen(cmd, out / "mpiexec.log")]
        else:
            port = free_port()
            procs = [
                _popen(
                    [
                        sys.executable,
                        str(WORKER),
                        *common,
                        "--rank",
                        str(r),
                        "--world-size",
                        str(world_size),
                        "--port",
                        str(port),
                    ],
                    out / f"rank{r}.log",
                )
                for r in range(world_size)
            ]
        timed_out = _supervise(procs, start + job_timeout, kill_grace)
        elapsed = time.monotonic() - start
        results = {}
        for path in out.glob("rank*.json"):
            data = json.loads(path.read_text())
            results[int(data["rank"])] = data
        logs = {p.name: p.read_text(errors="replace") for p in sorted(out.glob("*.log"))}
        return JobResult([p.returncode for p in procs], results, logs, elapsed, timed_out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _popen(cmd: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    proc._log_handle = handle  # type: ignore[attr-defined]
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _supervise(procs: list[subprocess.Popen], deadline: float, kill_grace: float) -> bool:
    """Wait for every process; after the first failure give the rest ``kill_grace`` seconds."""
    failed_at = None
    timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline:
                timed_out = True
                break
            if failed_at is not None and now - failed_at > kill_grace:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            _kill(p)
            p._log_handle.close()  # type: ignore[attr-defined]
    return timed_out
