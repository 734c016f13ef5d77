"""A throw-away SLURM cluster on this machine: munged, slurmctld and one slurmd per node.

Everything lives in a fresh folder (``tempfile.mkdtemp(dir="/tmp")``, mode 755: munged refuses a
socket below a folder that is not world-executable, which pytest's own temporary folders are not)
with its own ``slurm.conf`` and munge key; nothing in /etc is read or written, and every SLURM
command must be run with :meth:`SlurmCluster.env` (``SLURM_CONF`` pointing there). The ports are
picked free. Nodes are ``n1 .. nN``, all on this host (``NodeAddr=127.0.0.1``), each with ``cpus``
CPUs whatever the machine has (``SlurmdParameters=config_overrides``); the names ``n1``... do not
resolve, so jobs that rendezvous over TCP need ``MASTER_ADDR=127.0.0.1``.

:meth:`SlurmCluster.stop` cancels the jobs, then stops exactly the daemons :meth:`start` started
(by their ``Popen``, TERM then KILL), then kills any process still carrying this cluster's
``SLURM_CONF`` in its environment (a task the daemons left behind) and says so. SLURM 22.05 as
Debian 12 packages it (``slurmctld slurmd slurm-client munge``); needs root.

As a pytest fixture: ``from slurm_fixture import slurm_cluster`` (module scope, 2 nodes).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

__all__ = ["SlurmCluster", "slurm_cluster", "slurm_unavailable"]

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "srun", "scontrol")


def slurm_unavailable() -> str | None:
    """Why a throw-away cluster cannot run here, or ``None`` when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a throw-away SLURM cluster needs root (slurmd runs jobs as any user)"
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
               and not os.path.exists(f"/usr/sbin/{name}")]
    if missing:
        return (f"not installed: {', '.join(missing)} (apt-get install -y --no-install-recommends "
                "slurmctld slurmd slurm-client munge)")
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 a moment ago (held together while picked)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


class SlurmCluster:
    """``nodes`` simulated nodes of ``cpus`` CPUs each; :meth:`start`, use, :meth:`stop`."""

    def __init__(self, nodes: int = 2, cpus: int = 4):
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.base = Path(tempfile.mkdtemp(prefix="pcpp-slurm-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.conf = self.base / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.strays: list[str] = []

    # ------------------------------------------------------------------ setup
    def env(self, **extra: str) -> dict[str, str]:
        """This environment with ``SLURM_CONF`` set to this cluster's, and ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "w")
        with log:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env(),
                                                start_new_session=True)

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        """Start munged, slurmctld and the slurmds; return once every node is idle."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        base = self.base
        for sub in ("etc", "munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            (base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(base / "munge", 0o755)

        key, sock = base / "munge" / "munge.key", base / "munge" / "munge.socket"
        subprocess.run([_which("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True, timeout=30)
        os.chmod(key, 0o600)
        self._daemon("munged", [_which("munged"), "-F", f"--key-file={key}", f"--socket={sock}",
                                f"--pid-file={base / 'munge' / 'munged.pid'}",
                                f"--log-file={base / 'munge' / 'munged.log'}",
                                f"--seed-file={base / 'munge' / 'munged.seed'}"])
        self._wait(lambda: sock.exists() and subprocess.run(
            [_which("munge"), "-S", str(sock), "-n"], stdin=subprocess.DEVNULL, capture_output=True,
            timeout=5).returncode == 0, 10, "munged did not answer", "munged")

        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(ctld_port, node_ports))
        (base / "etc" / "plugstack.conf").write_text("")  # read from slurm.conf's folder

        self._daemon("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._daemon(f"slurmd-{node}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        self._wait(lambda: self.node_states() == {"idle"}, timeout,
                   "nodes not idle", "slurmctld", *(f"slurmd-{n}" for n in self.nodes))

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        b = self.base
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=pcpptest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={b / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={b / 'state'}",
            f"SlurmdSpoolDir={b / 'spool'}/%n",
            f"SlurmctldPidFile={b / 'slurmctld.pid'}",
            f"SlurmdPidFile={b / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={b / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={b / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SlurmdParameters=config_overrides",  # nodes may claim more CPUs than the machine has
            "ReturnToService=2",
            "EnforcePartLimits=ALL",  # a job too big fails at submission, not pending forever
            "MinJobAge=5",  # 2..5: `sbatch --wait` then polls every 2 s
            "KillWait=5",
            "InactiveLimit=0",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _wait(self, ready, timeout: float, what: str, *daemons: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in daemons:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.logs(name)}")
            try:
                if ready():
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{what} after {timeout:.0f} s:\n{self.logs(*daemons)}")

    # ------------------------------------------------------------------ use
    def node_states(self) -> set[str]:
        done = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%t"], env=self.env(),
                              capture_output=True, text=True, timeout=10)
        return set(done.stdout.split()) if done.returncode == 0 else {"?"}

    def job_ids(self) -> list[str]:
        done = subprocess.run([_which("squeue"), "-h", "-o", "%i"], env=self.env(),
                              capture_output=True, text=True, timeout=10)
        return done.stdout.split() if done.returncode == 0 else []

    def logs(self, *names: str, lines: int = 30) -> str:
        """The last lines of the named daemons' logs (all when none named)."""
        paths = sorted((self.base / "log").glob("*")) if not names else [
            p for n in names for p in ((self.base / "log" / f"{n}.out"), (self.base / "log" / f"{n}.log"))]
        out = []
        for path in paths:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def daemon_pids(self) -> set[int]:
        return {proc.pid for proc in self.procs.values()}

    # ------------------------------------------------------------------ teardown
    def stop(self, keep: bool = False) -> list[str]:
        """Cancel jobs; stop the daemons started here; kill what the cluster left running.

        Returns descriptions of the processes that had to be killed afterwards (should be none).
        Removes the cluster's folder unless ``keep``.
        """
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self.job_ids()
                if jobs:
                    subprocess.run([_which("scancel"), *jobs], env=self.env(), capture_output=True, timeout=10)
                    deadline = time.monotonic() + 15
                    while self.job_ids() and time.monotonic() < deadline:
                        time.sleep(0.2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.strays = self._kill_strays()
        if not keep:
            shutil.rmtree(self.base, ignore_errors=True)
        return self.strays

    def _kill_strays(self) -> list[str]:
        """Kill processes whose environment names this cluster's slurm.conf (tasks, slurmstepd)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        killed = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if marker in environ and _alive(int(entry)):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    killed.append(f"{entry}: {cmdline[:120]}")
                except ProcessLookupError:
                    pass
        return killed


@pytest.fixture(scope="module")
def slurm_cluster():
    """A two-node cluster for the module's tests; skipped, with the reason, where impossible."""
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = SlurmCluster(nodes=2, cpus=4)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"the throw-away SLURM cluster did not start: {exc}")
    try:
        yield cluster
    finally:
        strays = cluster.stop()
        assert not strays, f"processes left by the SLURM jobs (killed now): {strays}"
