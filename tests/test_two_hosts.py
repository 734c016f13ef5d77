"""Two hosts, one machine: a rank in each of two network namespaces joined by a veth pair.

Rank 0 runs in the namespace holding 198.51.100.1, rank 1 in the one holding 198.51.100.2; neither
can reach the other's loopback, so everything a rank tells its peer must be its real address, as
between two machines. Each rank is started by hand (``--rank R --world-size 2 --master-addr
198.51.100.1 --master-port P --bind-addr <own address>``), over ``zmq`` and over ``torch`` (gloo),
and rank 0's image and report must equal one worker's under ``--policy sync``.

Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``, ``ip netns add``
refused, as in many containers).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from launch_jobs import JOB_ARGS, JOB_TIMEOUT_S, PCPP, check_job, job_env, kill_tree, tail
from netns_fixture import netns_pair, ns_pair, throttle, unthrottle  # noqa: F401 - ns_pair is a fixture

MASTER_PORT = 29511  # each namespace has a network stack of its own: every port is free there


def run_two_hosts(pair, transport: str, folder: Path, timeout: float = JOB_TIMEOUT_S) -> None:
    """Rank r in namespace r; wait for both; on failure or timeout kill both and fail."""
    common = ["generate", "--transport", transport, *JOB_ARGS, "--world-size", "2",
              "--master-addr", pair.addrs[0], "--master-port", str(MASTER_PORT), "--timeout", "60"]
    procs, logs = [], []
    try:
        for rank in (0, 1):
            argv = [str(PCPP), *common, "--rank", str(rank), "--bind-addr", pair.addrs[rank]]
            if rank == 0:
                argv += ["--compare", "--report", "r.json", "--output", "o.png"]
            logs.append(folder / f"rank{rank}.log")
            with open(logs[-1], "w") as log:
                procs.append(subprocess.Popen(pair.exec_argv(rank, argv), cwd=folder, env=job_env(),
                                              stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: the other may wait long
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for proc in procs:
            kill_tree(proc)
    outputs = "\n".join(f"--- rank {r} (exit {codes[r]}):\n{tail(log)}" for r, log in enumerate(logs))
    assert codes == [0, 0], f"{transport} across namespaces failed or ran past {timeout} s\n{outputs}"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("transport", ["zmq", "torch"])
def test_one_rank_per_namespace(transport, ns_pair, one_worker_png, tmp_path, no_leftovers):  # noqa: F811
    run_two_hosts(ns_pair, transport, tmp_path)
    check_job(tmp_path, transport=transport, world_size=2, log=tmp_path / "rank0.log")


def _qdisc(pair, index: int) -> str:
    return subprocess.run(pair.exec_argv(index, ["tc", "qdisc", "show", "dev", pair.veths[index]]),
                          capture_output=True, text=True, timeout=10).stdout


@pytest.mark.timeout(30)
def test_throttle_sets_and_removes_a_token_bucket(ns_pair):  # noqa: F811
    throttle(ns_pair, "100mbit")
    try:
        for index in (0, 1):
            shown = _qdisc(ns_pair, index)
            assert "tbf" in shown and "rate 100Mbit" in shown, shown
    finally:
        unthrottle(ns_pair)
    assert all("tbf" not in _qdisc(ns_pair, index) for index in (0, 1))


@pytest.mark.timeout(30)
def test_namespaces_are_removed_after_a_failure(ns_pair):  # noqa: F811 - ns_pair: skip where impossible
    with pytest.raises(RuntimeError, match="inside"):
        with netns_pair(tag=f"{os.getpid()}x") as pair:
            assert all(os.path.exists(f"/run/netns/{name}") for name in pair.names)
            raise RuntimeError("a test failing inside")
    assert not any(os.path.exists(f"/run/netns/{name}") for name in pair.names)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout
    assert pair.veths[0] not in links and pair.veths[1] not in links
