"""Launch anywhere, end to end: ``pcpp generate`` started by real launchers gives one worker's image.

Each job runs tiny-sd (4 steps, 32x32 px) on two processes under ``--policy sync`` (exact), with
``--compare --report r.json --output o.png``; the report's ``max_abs_diff`` (final latent against
one worker, same seed) must be at most 1e-4 and the PNG must equal the one that
``pcpp generate --nproc 1 --transport local`` writes within one gray level.

* ``mpiexec -n 2`` (MPICH's Hydra, from the ``mpich`` wheel) over ``--transport mpi``;
* ``torchrun --nproc-per-node 2`` over ``--transport torch`` (gloo): torchrun's ``MASTER_PORT`` is
  its own TCPStore, already listening, which the torch transport must join (a transport that bound
  it would fail with "address in use"); and over ``zmq``, which must move to another port;
* ``pcpp launch -n 2 --transport zmq --cpu-bind cores -- pcpp generate``, and
  ``pcpp generate --nproc 2 --transport zmq --cpu-bind cores`` (which starts its own workers).

The helpers here (:func:`one_worker_reference`, :func:`check_job`, :func:`run_job`, ...) are also
used by ``test_two_hosts.py`` and ``test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PCPP = BIN / "pcpp"
MPIEXEC = BIN / "mpiexec"
TORCHRUN = BIN / "torchrun"

STEPS, HEIGHT, WIDTH = 4, 32, 32
PROMPT = "a red circle at the top left"
JOB_ARGS = ["--model", "tiny-sd", "--prompt", PROMPT, "--policy", "sync", "--steps", str(STEPS),
            "--height", str(HEIGHT), "--width", str(WIDTH), "--seed", "0"]
"""What every job here generates (the one-worker reference included)."""

MAX_LATENT_DIFF = 1e-4
MAX_GRAY_LEVELS = 1
JOB_TIMEOUT_S = 150

# Variables by which a launcher tells a process its rank: a test run under SLURM, torchrun or
# mpiexec must not hand its own to the jobs it starts.
_LAUNCHER_PREFIXES = ("SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "TORCHELASTIC_", "HYDRA_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "PCPP_LAUNCHER", "PCPP_TRANSPORT", "GLOO_SOCKET_IFNAME")


def job_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables, one thread per rank, and ``extra``.

    ``PCPP_MODEL_CACHE`` (set by conftest's ``model_cache``) passes through, so every job loads
    the tiny-sd built once per session.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error",
               DIFFUSERS_VERBOSITY="error")
    assert env.get("PCPP_MODEL_CACHE"), "conftest's model_cache fixture sets PCPP_MODEL_CACHE"
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- processes
def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first found, by walking /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything it started (found before any of them dies), then reap it."""
    if proc.poll() is None:
        pids = descendants(proc.pid) + [proc.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_job(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a job, output in ``cwd/job.log``; on timeout kill it and all it started, and fail."""
    log_path = cwd / "job.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env or job_env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"{' '.join(map(str, argv[:4]))} ... ran past {timeout} s; output:\n{tail(log_path)}")
        finally:
            kill_tree(proc)
    return subprocess.CompletedProcess(argv, code, log_path.read_text(errors="replace"), "")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    # progress bars are one long line of carriage returns: keep the lines that say something
    kept = [line for line in text.splitlines() if "denoising" not in line or "Error" in line]
    return "\n".join(kept[-lines:])


@pytest.fixture
def no_leftovers():
    """After the test: nothing this test process started is still running."""
    yield
    deadline = time.monotonic() + 5
    while descendants(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = descendants(os.getpid())
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left running after the test: {left}"


# ----------------------------------------------------------------------------- checks
_REFERENCE: dict[str, Path] = {}


def one_worker_reference() -> Path:
    """The PNG of ``pcpp generate --nproc 1 --transport local`` for :data:`JOB_ARGS`.

    Made once per session (kept next to the model cache, which is per session too).
    """
    cache = os.environ["PCPP_MODEL_CACHE"]
    if cache in _REFERENCE and _REFERENCE[cache].exists():
        return _REFERENCE[cache]
    folder = Path(cache) / "one-worker-reference"
    png = folder / "one.png"
    if not png.exists():
        folder.mkdir(parents=True, exist_ok=True)
        done = run_job([PCPP, "generate", "--nproc", "1", "--transport", "local", *JOB_ARGS,
                        "--output", png, "--report", folder / "one.json"], cwd=folder)
        assert done.returncode == 0, tail(folder / "job.log")
        assert png.exists()
    _REFERENCE[cache] = png
    return png


def max_gray_difference(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    with Image.open(a) as ia, Image.open(b) as ib:
        pa, pb = np.asarray(ia.convert("RGB"), dtype=np.int16), np.asarray(ib.convert("RGB"), dtype=np.int16)
    assert pa.shape == pb.shape, f"{a}: {pa.shape}, {b}: {pb.shape}"
    return int(np.abs(pa - pb).max())


def check_job(folder: Path, *, transport: str, world_size: int, png: str = "o.png",
              report: str = "r.json", compare: bool = True, log: Path | None = None) -> dict:
    """The job in ``folder`` wrote one worker's image and a report that says what ran."""
    log = log or folder / "job.log"
    assert (folder / report).exists(), f"no report {folder / report}; output:\n{tail(log)}"
    assert (folder / png).exists(), f"no image {folder / png}; output:\n{tail(log)}"
    data = json.loads((folder / report).read_text())
    assert data["world_size"] == world_size, data
    assert data["transport"] == transport, data
    assert data["policy"] == "sync", data
    assert data["prompt"] == PROMPT and data["model"] == "tiny-sd", data
    assert (data["steps"], data["height"], data["width"]) == (STEPS, HEIGHT, WIDTH), data
    if compare:
        assert data["max_abs_diff"] <= MAX_LATENT_DIFF, data
        assert data["identical"] or data["psnr_db"] > 100, data
    diff = max_gray_difference(folder / png, one_worker_reference())
    assert diff <= MAX_GRAY_LEVELS, f"{folder / png} differs from one worker's by {diff} gray levels"
    return data


# ----------------------------------------------------------------------------- the launchers
OUT = ["--compare", "--report", "r.json", "--output", "o.png", "--timeout", "60"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    return one_worker_reference()


@pytest.mark.timeout(200)
def test_mpiexec_mpi(tmp_path, reference, no_leftovers):
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec at {MPIEXEC} (the mpich wheel installs it)")
    done = run_job([MPIEXEC, "-n", "2", PCPP, "generate", "--transport", "mpi", *JOB_ARGS, *OUT], cwd=tmp_path)
    assert done.returncode == 0, tail(tmp_path / "job.log")
    check_job(tmp_path, transport="mpi", world_size=2)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_torchrun(transport, tmp_path, reference, no_leftovers):
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun at {TORCHRUN}")
    port = free_port()
    done = run_job([TORCHRUN, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                    "--master-port", str(port), "--no-python",
                    PCPP, "generate", "--transport", transport, *JOB_ARGS, *OUT], cwd=tmp_path)
    assert done.returncode == 0, tail(tmp_path / "job.log")
    check_job(tmp_path, transport=transport, world_size=2)


@pytest.mark.timeout(200)
def test_generate_nproc_starts_its_own_bound_workers(tmp_path, reference, no_leftovers):
    # `pcpp generate --nproc 2 --transport zmq` starts two workers of itself (without --nproc and
    # --cpu-bind, which the workers would refuse under a launcher)
    done = run_job([PCPP, "generate", "--nproc", "2", "--transport", "zmq", "--cpu-bind", "cores", *JOB_ARGS, *OUT],
                   cwd=tmp_path)
    assert done.returncode == 0, tail(tmp_path / "job.log")
    check_job(tmp_path, transport="zmq", world_size=2)
    assert "[launcher] binding workers to CPUs: rank 0: CPU" in done.stdout


@pytest.mark.timeout(200)
def test_pcpp_launch_zmq(tmp_path, reference, no_leftovers):
    # no --transport for generate: `pcpp launch --transport zmq` sets PCPP_TRANSPORT, its default
    # --cpu-bind cores: each rank on its share of the CPUs (the launcher says which)
    done = run_job([PCPP, "launch", "-n", "2", "--transport", "zmq", "--timeout", str(JOB_TIMEOUT_S - 10),
                    "--cpu-bind", "cores", "--", PCPP, "generate", *JOB_ARGS, *OUT], cwd=tmp_path)
    assert done.returncode == 0, tail(tmp_path / "job.log")
    check_job(tmp_path, transport="zmq", world_size=2)
    assert "[rank 0]   report: r.json" in done.stdout  # rank 0's summary, under the launcher's prefix
    assert "[launcher] binding workers to CPUs: rank 0: CPU" in done.stdout
