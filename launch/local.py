"""Run N workers of one command on this machine, torchrun-style.

:func:`run_workers` starts ``n`` subprocesses of ``argv``, each with the variables torchrun
would set (so :func:`pcpp_runtime.launch.discovery.discover` reads them with its torchrun
adapter, reporting the source ``local``)::

    RANK=k  WORLD_SIZE=n  LOCAL_RANK=k  LOCAL_WORLD_SIZE=n
    MASTER_ADDR=127.0.0.1  MASTER_PORT=<a free port>  PCPP_LAUNCHER=local

plus ``PYTHONUNBUFFERED=1`` and ``OMP_NUM_THREADS`` -- the number of CPUs a bound worker has, else
``max(1, cpus // n)`` -- unless the environment already sets them (so lines appear as they are
printed and N workers do not each start one thread per core). Every line a worker writes to stdout or stderr is copied to ours prefixed
with ``[rank k] ``, written in one call so lines of different workers never mix.

Failure handling, in the manner of torchrun and mpirun:

* the first worker to exit with a non-zero code fails the job: the others get SIGTERM, then
  SIGKILL after ``grace_s`` seconds, and :func:`run_workers` returns that worker's code;
* SIGINT and SIGTERM sent to the launcher (Ctrl-C) are forwarded to every worker; workers still
  alive ``grace_s`` seconds later are killed, as they are at once on a second signal. The
  return code is then ``128 + signal`` (130 for Ctrl-C), as a shell reports it;
* past ``timeout_s`` every worker is stopped the same way and the return code is 124, as with
  ``timeout(1)``.

Each worker runs in its own process group (so signals reach it once, from the launcher, and
stopping it stops its children too) and, on Linux, dies if the launcher is killed outright.
Every wait has a deadline; nothing here can hang.

CPU binding (``cpu_bind="cores"``, Linux): each worker and every thread it starts (PyTorch's,
libzmq's I/O thread) stays on its own share of the CPUs this launcher may use, as ``mpirun
--bind-to core`` and ``srun --cpu-bind=cores`` place ranks. :func:`cpu_sets` gives the shares:
contiguous blocks when there are at least as many CPUs as workers, one CPU each round robin when
there are fewer. Without binding the kernel moves ranks and their I/O threads between cores; on a
machine where every core computes, that can cost the blocking exchanges time (docs/BENCHMARKS.md).

Command line: ``python -m pcpp_runtime.launch.local --nproc 4 [--cpu-bind cores] -- pcpp generate ...``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import IO

__all__ = ["CPU_BIND_MODES", "TIMEOUT_EXIT_CODE", "cpu_sets", "free_port", "main", "run_workers"]

TIMEOUT_EXIT_CODE = 124
"""What :func:`run_workers` returns when ``timeout_s`` runs out (as ``timeout(1)`` does)."""

CPU_BIND_MODES = ("none", "cores")
"""Values of ``cpu_bind``: ``none`` (the kernel places the workers) or ``cores`` (see :func:`cpu_sets`)."""

_POLL_S = 0.02
_JOIN_S = 2.0  # how long to wait for the output of a stopped worker to drain


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it).

    Another process may take it before the workers bind it; that race is accepted, as in
    every launcher that does this (torchrun with ``--master-port 0`` included).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def worker_env(
    rank: int,
    n: int,
    port: int,
    base: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    threads: int | None = None,
) -> dict[str, str]:
    """The environment of worker ``rank`` of ``n``: ``base``, the torchrun variables, ``extra``.
    ``threads`` is the default ``OMP_NUM_THREADS`` (a bound worker's CPU count); without it, this
    machine's CPUs divided among the ``n`` workers."""
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // n)))
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(n),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(n),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PCPP_LAUNCHER="local",
    )
    env.update(extra or {})
    return env


def cpu_sets(n: int, cpus: Collection[int] | None = None) -> list[frozenset[int]]:
    """The CPUs each of ``n`` workers is bound to, from ``cpus`` (default: those this process may
    run on, which respects a cgroup's or a SLURM allocation's limits).

    With at least as many CPUs as workers, worker r gets the r-th contiguous block of the sorted
    CPUs (blocks differ in size by at most one, the larger ones first); with fewer, worker r gets
    CPU ``r mod len(cpus)`` alone.

        cpu_sets(2, [0, 1, 2, 3])  ->  [{0, 1}, {2, 3}]
        cpu_sets(3, [0, 1])        ->  [{0}, {1}, {0}]
    """
    if n < 1:
        raise ValueError(f"need at least one worker, got n={n}")
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):  # (and sched_setaffinity: both are Linux-only)
            raise ValueError(f"binding workers to CPUs needs Linux (os.sched_getaffinity), not {sys.platform}")
        cpus = os.sched_getaffinity(0)
    ordered = sorted(set(cpus))
    if not ordered:
        raise ValueError("no CPUs to bind workers to")
    if len(ordered) < n:
        return [frozenset({ordered[r % len(ordered)]}) for r in range(n)]
    size, larger = divmod(len(ordered), n)
    sets = []
    start = 0
    for r in range(n):
        end = start + size + (1 if r < larger else 0)
        sets.append(frozenset(ordered[start:end]))
        start = end
    return sets


def _describe_sets(sets: Sequence[Collection[int]]) -> str:
    return ", ".join(f"rank {r}: CPU {','.join(map(str, sorted(s)))}" for r, s in enumerate(sets))


def _preexec(die_with_parent: Callable[[], None] | None, cpus: Collection[int] | None) -> Callable[[], None] | None:
    """The child's ``preexec_fn``: bind it to ``cpus`` (inherited by its threads and by what it
    execs), then ask for SIGKILL when the launcher dies."""
    if cpus is None:
        return die_with_parent

    def preexec() -> None:
        os.sched_setaffinity(0, cpus)
        if die_with_parent is not None:
            die_with_parent()

    return preexec


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the launcher dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


class _Output:
    """Copies one worker's pipe to ``sink`` line by line, prefixed, one write per line.

    A carriage return starts a new unit too, so a progress bar that redraws its line with
    ``\r`` (tqdm) is shown as it moves -- ``\r[rank 0] denoising: 40%...`` -- instead of
    arriving in one piece when it ends.
    """

    def __init__(self, pipe: IO[bytes], prefix: bytes, sink: IO[str], lock: threading.Lock):
        self._pipe, self._prefix, self._sink, self._lock = pipe, prefix, sink, lock
        self.thread = threading.Thread(target=self._copy, name=f"output {prefix!r}", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        pending = b""
        with self._pipe:
            for chunk in iter(lambda: self._pipe.read1(1 << 16), b""):
                pending = self._emit_complete(pending + chunk)
            if pending:
                self._emit(pending if pending.endswith(b"\n") else pending + b"\n")

    def _emit_complete(self, pending: bytes) -> bytes:
        """Write every finished unit of ``pending``; return the unfinished rest."""
        while True:
            newline = pending.find(b"\n")
            redraw = pending.find(b"\r", 1)  # a leading \r belongs to its own unit
            if redraw != -1 and (newline == -1 or redraw < newline) and pending[redraw : redraw + 2] != b"\r\n":
                self._emit(pending[:redraw])
                pending = pending[redraw:]
            elif newline != -1:
                self._emit(pending[: newline + 1])
                pending = pending[newline + 1 :]
            else:
                return pending

    def _emit(self, unit: bytes) -> None:
        if unit.startswith(b"\r"):
            self._write(b"\r" + self._prefix + unit[1:])
        elif unit:
            self._write(self._prefix + unit)

    def _write(self, data: bytes) -> None:
        with self._lock:
            try:
                buffer = getattr(self._sink, "buffer", None)
                if buffer is not None:
                    self._sink.flush()
                    buffer.write(data)
                    buffer.flush()
                else:
                    self._sink.write(data.decode(errors="replace"))
                    self._sink.flush()
            except (OSError, ValueError):  # our own stdout is gone; keep draining the pipe
                pass


def _signal(proc: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the worker's process group (it leads one), if the worker is alive.

    A worker already reaped is skipped: its pid, and so its group id, may belong to someone
    else by now. An exited but unreaped worker still holds its pid, so the check is safe.
    """
    if proc.poll() is not None:
        return
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signum)
        else:  # pragma: no cover - not POSIX
            proc.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(returncode: int) -> int:
    """A process exit status: ``-N`` (killed by signal N) becomes ``128 + N``."""
    return 128 - returncode if returncode < 0 else returncode


def _say(message: str) -> None:
    print(f"[launcher] {message}", file=sys.stderr, flush=True)


def run_workers(
    n: int,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_env_for_rank: Callable[[int], Mapping[str, str]] | None = None,
    timeout_s: float | None = None,
    grace_s: float = 5.0,
    cpu_bind: str = "none",
) -> int:
    """Run ``n`` workers of ``argv`` on this machine and return the job's exit code.

    Args:
        n: number of workers (``WORLD_SIZE``).
        argv: the command each worker runs, e.g. ``["pcpp", "generate", ...]``.
        env: the workers' base environment (default ``os.environ``).
        extra_env_for_rank: ``rank -> {name: value}`` applied last, e.g. to pin
            ``CUDA_VISIBLE_DEVICES``.
        timeout_s: stop every worker after this many seconds (``None``: no limit).
        grace_s: how long stopped workers get between SIGTERM (or a forwarded signal) and
            SIGKILL.
        cpu_bind: ``none``, or ``cores`` to bind worker r and its threads to ``cpu_sets(n)[r]``
            (Linux; the launcher says which CPUs each rank got on stderr).

    Returns:
        0 if every worker exited with 0; else the exit code of the first worker that failed
        (``128 + N`` if signal N killed it); ``128 + N`` if the launcher got signal N;
        :data:`TIMEOUT_EXIT_CODE` on timeout. Details in the module docstring.

    Signals are forwarded only when this runs in the main thread (Python lets only the main
    thread install handlers); elsewhere the caller stops the workers by its own means.
    """
    if n < 1:
        raise ValueError(f"need at least one worker, got n={n}")
    argv = list(argv)
    if not argv:
        raise ValueError("argv is empty: no command to run")
    if cpu_bind not in CPU_BIND_MODES:
        raise ValueError(f"cpu_bind must be one of {', '.join(CPU_BIND_MODES)}, got {cpu_bind!r}")
    bound = cpu_sets(n) if cpu_bind == "cores" else None
    base = dict(os.environ if env is None else env)
    port = free_port()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    procs: list[subprocess.Popen] = []
    outputs: list[_Output] = []
    received: list[int] = []  # signals the launcher got, in order
    lock = threading.Lock()

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)

    stop_at: float | None = None  # when survivors get SIGKILL; set once stopping begins
    killed_at: float | None = None
    try:
        die_with_parent = _die_with_parent()
        if bound is not None:
            _say(f"binding workers to CPUs: {_describe_sets(bound)}")
        for rank in range(n):
            extra = extra_env_for_rank(rank) if extra_env_for_rank is not None else None
            proc = subprocess.Popen(
                argv,
                env=worker_env(rank, n, port, base, extra, None if bound is None else len(bound[rank])),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_preexec(die_with_parent, None if bound is None else bound[rank]),
            )
            procs.append(proc)
            prefix = f"[rank {rank}] ".encode()
            outputs.append(_Output(proc.stdout, prefix, sys.stdout, lock))
            outputs.append(_Output(proc.stderr, prefix, sys.stderr, lock))

        result: int | None = None
        forwarded = 0
        while True:
            codes = [proc.poll() for proc in procs]
            if all(code is not None for code in codes):
                break
            now = time.monotonic()
            if forwarded < len(received):  # a (new) signal for the launcher
                signum = received[forwarded]
                forwarded = len(received)
                if stop_at is None:
                    name = signal.Signals(signum).name
                    _say(f"got {name}; forwarding it to the workers")
                    _stop(procs, signum)
                    stop_at = now + grace_s
                else:
                    stop_at = now  # a second signal: kill at once
                result = 128 + signum if result is None else result
            if result is None:
                failed = next(
                    (rank for rank, code in enumerate(codes) if code is not None and code != 0),
                    None,
                )
                if failed is not None:
                    result = _exit_code(codes[failed])
                    _say(f"rank {failed} exited with code {result}; stopping the other workers")
                    _stop(procs, signal.SIGTERM)
                    stop_at = now + grace_s
                elif deadline is not None and now >= deadline:
                    result = TIMEOUT_EXIT_CODE
                    _say(f"timed out after {timeout_s} s; stopping the workers")
                    _stop(procs, signal.SIGTERM)
                    stop_at = now + grace_s
            if killed_at is None and stop_at is not None and now >= stop_at:
                _stop(procs, signal.SIGKILL)
                killed_at = now
            elif killed_at is not None and now >= killed_at + _JOIN_S:
                alive = [rank for rank, proc in enumerate(procs) if proc.poll() is None]
                _say(f"ranks {alive} survive SIGKILL (stuck in the kernel?); giving up on them")
                break
            time.sleep(_POLL_S)
        if result is None:
            codes = [proc.returncode for proc in procs]
            result = next((_exit_code(code) for code in codes if code != 0), 0)
        return result
    finally:
        for proc in procs:  # an exception above (e.g. a command not found) leaves none behind
            if proc.poll() is None:
                _signal(proc, signal.SIGKILL)
                try:
                    proc.wait(timeout=_JOIN_S)
                except subprocess.TimeoutExpired:
                    pass
        for output in outputs:
            output.thread.join(timeout=_JOIN_S)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(procs: Sequence[subprocess.Popen], signum: int) -> None:
    """Send ``signum`` to the process group of every worker still running."""
    for proc in procs:
        _signal(proc, signum)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pcpp_runtime.launch.local --nproc N [--timeout S] [--cpu-bind cores] -- COMMAND ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m pcpp_runtime.launch.local",
        description="Run N workers of COMMAND on this machine with torchrun-style variables.",
    )
    parser.add_argument("--nproc", "-n", type=int, required=True, help="number of workers")
    parser.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL"
    )
    parser.add_argument(
        "--cpu-bind", choices=CPU_BIND_MODES, default="none", help="cores: bind each worker to its share of the CPUs"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    return run_workers(args.nproc, command, timeout_s=args.timeout, grace_s=args.grace, cpu_bind=args.cpu_bind)


if __name__ == "__main__":
    sys.exit(main())
