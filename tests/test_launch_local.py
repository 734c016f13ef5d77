"""The local launcher: environment, prefixed output, failure propagation, signals, no leftovers.

Workers are tiny ``python -c`` programs (no torch) so each test takes well under a second of
real time apart from the Python start-ups. Tests that signal a launcher run it as a separate
process (``python launch/local.py``, which needs nothing of pcpp_runtime) so they can signal it.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcpp_runtime.launch import discover, free_port, local, run_workers
from pcpp_runtime.launch.local import TIMEOUT_EXIT_CODE, cpu_sets, worker_env

pytestmark = pytest.mark.timeout(30)

PY = sys.executable
LOCAL_PY = str(Path(local.__file__).resolve())

PRINT_ENV = (
    "import os, sys; "
    "print(' '.join(os.environ.get(k, '-') for k in sys.argv[1:]), flush=True); "
    "print('to stderr', file=sys.stderr, flush=True)"
)
ENV_KEYS = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PCPP_LAUNCHER",
    "EXTRA",
]

# rank FAIL_RANK (from the environment) exits with code FAIL_CODE at once; the others report
# their pid and sleep; IGNORE_TERM makes the sleepers ignore SIGTERM and SIGINT
SLEEPER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", os.getpid(), flush=True)
if str(rank) == os.environ.get("FAIL_RANK"):
    time.sleep(float(os.environ.get("FAIL_AFTER", "0.3")))
    sys.exit(int(os.environ["FAIL_CODE"]))
time.sleep(60)
"""


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether process ``pid`` has ended (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def pids_in(text: str) -> list[int]:
    return [int(line.split()[-1]) for line in text.splitlines() if " ready " in line]


# ---- environment and output -----------------------------------------------------------------------


def test_free_port_is_bindable():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_all_succeed_with_prefixed_output(capfd):
    code = run_workers(
        3,
        [PY, "-c", PRINT_ENV, *ENV_KEYS],
        extra_env_for_rank=lambda rank: {"EXTRA": f"x{rank}"},
        timeout_s=20,
    )
    assert code == 0
    out, err = capfd.readouterr()
    lines = sorted(out.splitlines())
    assert len(lines) == 3
    port = lines[0].split()[7]
    assert int(port) > 0
    assert lines == [f"[rank {k}] {k} 3 {k} 3 127.0.0.1 {port} local x{k}" for k in range(3)]
    assert sorted(line for line in err.splitlines() if line.startswith("[rank")) == [
        f"[rank {k}] to stderr" for k in range(3)
    ]


def test_long_and_unterminated_lines_are_prefixed(capfd):
    code = run_workers(
        2, [PY, "-c", "import sys; sys.stdout.write('a' * 70000 + '\\nlast')"], timeout_s=20
    )
    assert code == 0
    out = capfd.readouterr().out
    lines = out.splitlines()
    assert all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in lines)
    assert sorted(line for line in lines if line.endswith("last")) == [
        "[rank 0] last",
        "[rank 1] last",
    ]
    assert (
        sum(len(line) - len("[rank 0] ") for line in lines if not line.endswith("last"))
        == 2 * 70000
    )


def test_progress_bar_redraws_are_prefixed_as_they_come(capfd):
    """tqdm redraws its line with \\r; each redraw is forwarded with the rank prefix."""
    script = "import sys; sys.stderr.write('\\rbar 1\\rbar 2\\r\\nnext\\n')"
    assert run_workers(1, [PY, "-c", script], timeout_s=20) == 0
    err = capfd.readouterr().err
    assert "\r[rank 0] bar 1\r[rank 0] bar 2" in err
    assert "[rank 0] next\n" in err


def test_worker_environment_reads_as_local_rank():
    env = worker_env(2, 4, 29999, {"PATH": "/bin", "OMP_NUM_THREADS": "3"}, {"X": "1"})
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (2, 4, 2, 4)
    assert info.require_rendezvous() == ("127.0.0.1", 29999)
    assert info.source == "local"
    assert env["OMP_NUM_THREADS"] == "3" and env["X"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert "OMP_NUM_THREADS" in worker_env(0, 1, 1, {})


def test_env_argument_replaces_os_environ(capfd):
    env = {"PATH": os.environ.get("PATH", ""), "ONLY_HERE": "yes"}
    code = run_workers(1, [PY, "-c", PRINT_ENV, "ONLY_HERE", "HOME"], env=env, timeout_s=20)
    assert code == 0
    assert "[rank 0] yes -" in capfd.readouterr().out


# the worker's affinity, and that of a thread it starts afterwards (as torch and libzmq do)
PRINT_AFFINITY = """
import os, threading
seen = []
thread = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
thread.start(); thread.join()
print(os.environ["RANK"], sorted(os.sched_getaffinity(0)), seen[0], os.environ["OMP_NUM_THREADS"], flush=True)
"""


def test_cpu_sets_split_the_cpus():
    assert cpu_sets(2, [0, 1, 2, 3]) == [{0, 1}, {2, 3}]
    assert cpu_sets(3, [4, 0, 1, 2, 3]) == [{0, 1}, {2, 3}, {4}]  # sorted, larger blocks first
    assert cpu_sets(1, [3, 1]) == [{1, 3}]
    assert cpu_sets(3, [0, 1]) == [{0}, {1}, {0}]  # fewer CPUs than workers: round robin
    with pytest.raises(ValueError, match="at least one worker"):
        cpu_sets(0, [0])
    with pytest.raises(ValueError, match="no CPUs"):
        cpu_sets(1, [])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU binding is Linux-only")
def test_cpu_bind_cores_binds_each_worker_and_its_threads(capfd):
    n = 3
    expected = cpu_sets(n)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert run_workers(n, [PY, "-c", PRINT_AFFINITY], env=env, cpu_bind="cores", timeout_s=20) == 0
    out, err = capfd.readouterr()
    seen = {}
    for line in out.splitlines():
        rank, rest = line.split("] ", 1)[1].split(" ", 1)
        seen[int(rank)] = rest
    # each worker, and a thread it starts, on its share; one OpenMP thread per CPU of the share
    assert seen == {r: f"{sorted(s)} {sorted(s)} {len(s)}" for r, s in enumerate(expected)}
    assert "[launcher] binding workers to CPUs: rank 0: CPU" in err
    # without binding every worker may run anywhere this process may
    assert run_workers(1, [PY, "-c", PRINT_AFFINITY], env=dict(env, OMP_NUM_THREADS="7"), timeout_s=20) == 0
    everywhere = sorted(os.sched_getaffinity(0))
    assert capfd.readouterr().out.strip() == f"[rank 0] 0 {everywhere} {everywhere} 7"


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one worker"):
        run_workers(0, [PY, "-c", "pass"])
    with pytest.raises(ValueError, match="cpu_bind must be one of none, cores, got 'socket'"):
        run_workers(1, [PY, "-c", "pass"], cpu_bind="socket")
    with pytest.raises(ValueError, match="argv is empty"):
        run_workers(1, [])
    with pytest.raises(FileNotFoundError):
        run_workers(2, ["/nonexistent/pcpp-worker"], timeout_s=5)


# ---- failures --------------------------------------------------------------------------------------


def test_failing_worker_stops_the_others(capfd):
    start = time.monotonic()
    code = run_workers(
        3, [PY, "-c", SLEEPER], env=os.environ | {"FAIL_RANK": "1", "FAIL_CODE": "3"}, timeout_s=25
    )
    elapsed = time.monotonic() - start
    assert code == 3
    assert elapsed < 5, f"took {elapsed:.1f} s to stop the sleepers"
    out, err = capfd.readouterr()
    pids = pids_in(out)
    assert len(pids) == 3
    assert all(gone(pid, within=0.5) for pid in pids)
    assert "[launcher] rank 1 exited with code 3; stopping the other workers" in err


def test_worker_ignoring_sigterm_is_killed_after_the_grace_period(capfd):
    start = time.monotonic()
    code = run_workers(
        2,
        [PY, "-c", SLEEPER],
        env=os.environ
        | {"FAIL_RANK": "0", "FAIL_CODE": "7", "IGNORE_TERM": "1", "FAIL_AFTER": "0.5"},
        timeout_s=25,
        grace_s=0.5,
    )
    assert code == 7
    assert time.monotonic() - start < 5
    assert all(gone(pid, within=0.5) for pid in pids_in(capfd.readouterr().out))


def test_worker_killed_by_a_signal_gives_128_plus_signal():
    code = run_workers(
        2, [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], timeout_s=20
    )
    assert code == 128 + signal.SIGKILL


def test_timeout_stops_everyone(capfd):
    start = time.monotonic()
    code = run_workers(2, [PY, "-c", SLEEPER], timeout_s=1.0, grace_s=1.0)
    assert code == TIMEOUT_EXIT_CODE
    assert time.monotonic() - start < 6
    out, err = capfd.readouterr()
    assert all(gone(pid, within=0.5) for pid in pids_in(out))
    assert "timed out after 1.0 s" in err


# ---- signals, with the launcher in its own process ---------------------------------------------


def start_launcher(
    n: int, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, list[int]]:
    """Start ``python launch/local.py`` with ``n`` sleepers; return it and the sleepers' pids."""
    launcher = subprocess.Popen(
        [PY, LOCAL_PY, "--nproc", str(n), *extra, "--", PY, "-c", SLEEPER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or dict(os.environ),
    )
    pids: list[int] = []
    buffer = b""
    deadline = time.monotonic() + 15
    with selectors.DefaultSelector() as selector:
        selector.register(launcher.stdout, selectors.EVENT_READ)
        while len(pids) < n:
            if time.monotonic() > deadline or launcher.poll() is not None:
                launcher.kill()
                raise AssertionError(f"workers did not start: {launcher.stderr.read().decode()}")
            if selector.select(timeout=0.2):
                chunk = os.read(launcher.stdout.fileno(), 4096)
                buffer += chunk
                pids = pids_in(buffer.decode())
    return launcher, pids


def signal_launcher(launcher: subprocess.Popen, *signals: int, pause: float = 0.3) -> int:
    """Send ``signals`` to the launcher, ``pause`` seconds apart; its exit code (killed in any case)."""
    try:
        for i, sig in enumerate(signals):
            if i:
                time.sleep(pause)
            launcher.send_signal(sig)
        return launcher.wait(timeout=10)
    finally:
        launcher.kill()


def test_ctrl_c_is_forwarded_to_the_workers():
    launcher, pids = start_launcher(2, "--grace", "2")
    code = signal_launcher(launcher, signal.SIGINT)
    assert code == 128 + signal.SIGINT
    assert all(gone(pid) for pid in pids)
    err = launcher.stderr.read().decode()
    assert "got SIGINT; forwarding it to the workers" in err
    assert "[rank 0] KeyboardInterrupt" in err and "[rank 1] KeyboardInterrupt" in err


def test_sigterm_then_kill_for_workers_that_ignore_it():
    env = dict(os.environ, IGNORE_TERM="1")
    launcher, pids = start_launcher(2, "--grace", "0.5", env=env)
    start = time.monotonic()
    code = signal_launcher(launcher, signal.SIGTERM)
    assert time.monotonic() - start < 5
    assert code == 128 + signal.SIGTERM
    assert all(gone(pid) for pid in pids)


def test_second_ctrl_c_kills_at_once():
    env = dict(os.environ, IGNORE_TERM="1")
    launcher, pids = start_launcher(2, "--grace", "30", env=env)
    code = signal_launcher(launcher, signal.SIGINT, signal.SIGINT, pause=0.3)
    assert code == 128 + signal.SIGINT
    assert all(gone(pid) for pid in pids)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="parent-death signal is Linux only"
)
def test_workers_die_with_a_killed_launcher():
    launcher, pids = start_launcher(2)
    launcher.kill()
    launcher.wait(timeout=10)
    assert all(gone(pid) for pid in pids)
