"""Where a job's ranks come from, and what every rank does around its own work.

A job runs on one of three kinds of ranks:

* :class:`Threads` -- N threads of this process over the in-process transport (tests, ``pcpp
  generate --transport local``, the policy grid); ranks share the cores, so time is not a speed-up;
* :class:`Launched` -- this process is one rank of N that a launcher started (``pcpp launch``,
  ``pcpp generate --nproc``, ``mpirun``, ``torchrun``, ``srun``): rank discovery reads the launcher's
  environment and the named transport connects the ranks;
* a :class:`~pcpp_runtime.transports.base.Transport` the caller already holds, connected.

:func:`run_on_ranks` is the rank lifecycle, the same for all three: every rank *prepares* (loads
its model and checks that the job can run, before any peer waits on it), connects, *works*, and
sends its statistics to rank 0 over the transport's object path (msgpack), which returns its own
result with everyone's statistics. Other ranks return ``None``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar, Union

from .config import ParallelConfig
from .connect import TransportSettings
from .threads import RankFailed, run_in_threads
from .transports.base import Transport

__all__ = [
    "ConnectError",
    "Gathered",
    "Launched",
    "RankFailed",
    "RankPlace",
    "Ranks",
    "Threads",
    "gather_to_rank0",
    "run_on_ranks",
]

P = TypeVar("P")
V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class Threads:
    """``count`` ranks as threads of this process, over the in-process ``local`` transport."""

    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"Threads needs a whole number of ranks >= 1, got {self.count!r}")


@dataclasses.dataclass(frozen=True)
class Launched:
    """This process is one rank of a job a launcher started.

    Attributes:
        transport: the registered transport that connects the ranks (``torch``, ``mpi``, ``zmq``
            or a plugin's name).
        settings: addresses, ports and device buffers for that transport.
        rank, world_size, master_addr, master_port: explicit values that override what the
            launcher's environment says (``None``: the launcher's); ``rank`` and ``world_size``
            together replace the launcher (:func:`pcpp_runtime.launch.discover`).
        expected_world_size: refuse to run when the launcher started a different number of
            ranks (``pcpp generate --nproc N`` under a launcher).
    """

    transport: str
    settings: TransportSettings = TransportSettings()
    rank: int | None = None
    world_size: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    expected_world_size: int | None = None

    def overrides(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
        }


#: what :func:`run_on_ranks` accepts as ``ranks``
Ranks = Union[Threads, Launched, Transport]


@dataclasses.dataclass(frozen=True)
class RankPlace:
    """What a rank knows before it connects: who it is and where it computes."""

    rank: int
    world_size: int
    device: str  # "cpu" or "cuda:N"


@dataclasses.dataclass
class Gathered(Generic[V]):
    """What rank 0 gets back: its own result and every rank's statistics, in rank order."""

    value: V
    stats: list[dict[str, Any]]


class ConnectError(RuntimeError):
    """A rank could not connect to its peers (a :class:`RankFailed`'s cause)."""


def gather_to_rank0(transport: Transport, stats: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's ``stats`` on rank 0, in rank order (``None`` elsewhere), over the object path.
    ``stats`` must be msgpack-serialisable (numbers, strings, lists, dicts)."""
    if transport.rank != 0:
        transport.send_object(stats, 0)
        return None
    return [stats] + [transport.recv_object(peer) for peer in range(1, transport.world_size)]


def run_on_ranks(
    ranks: Ranks,
    config: ParallelConfig,
    prepare: Callable[[RankPlace], P],
    work: Callable[[P, Transport], tuple[V, dict[str, Any]]],
    *,
    device: str | None = None,
) -> Gathered[V] | None:
    """Run one job on ``ranks``: ``prepare(place)`` on every rank before it connects, then
    ``work(prepared, transport) -> (value, stats)``; rank 0 gets a :class:`Gathered` of its own
    value and everyone's ``stats``, other ranks ``None``.

    ``device`` is where the ranks compute: by default the CPU for threads and a held transport,
    and the GPU of the rank's local rank under a launcher (:func:`pcpp_runtime.launch.select_device`).

    Errors: what ``prepare`` raises (a bad shape, a model that does not load, a launcher
    environment that describes no rank) comes out as it is, before any rank waits on another.
    A rank that cannot connect, or fails while working, raises :class:`RankFailed` naming it
    (with threads, the first rank that failed on its own; the others are stopped at once).
    """
    if isinstance(ranks, Threads):
        return _on_threads(ranks.count, config, prepare, work, device or "cpu")
    if isinstance(ranks, Launched):
        return _on_launched(ranks, config, prepare, work, device)
    if isinstance(ranks, Transport):
        prepared = prepare(RankPlace(ranks.rank, ranks.world_size, device or "cpu"))
        return _work_and_gather(ranks, prepared, work)
    raise TypeError(f"ranks must be Threads(n), Launched(transport) or a connected Transport, got {type(ranks).__name__}")


def _on_threads(count: int, config: ParallelConfig, prepare, work, device: str) -> Gathered | None:
    # prepared here, one rank after another: loading diffusers models is not thread-safe
    prepared = [prepare(RankPlace(rank, count, device)) for rank in range(count)]
    results = run_in_threads(count, lambda transport: work(prepared[transport.rank], transport), config.timeout_s * 4)
    return Gathered(results[0][0], [stats for _, stats in results])


def _on_launched(ranks: Launched, config: ParallelConfig, prepare, work, device: str | None) -> Gathered | None:
    from .connect import open_transport
    from .launch import LaunchEnvironmentError, discover, select_device
    from .transports.base import TransportError

    info = discover(overrides=ranks.overrides())
    if ranks.expected_world_size is not None and ranks.expected_world_size != info.world_size:
        raise LaunchEnvironmentError(
            f"--nproc {ranks.expected_world_size} disagrees with the launcher's world size {info.world_size} "
            f"({info.source}): leave out --nproc under a launcher"
        )
    device = device or str(select_device(info))
    prepared = prepare(RankPlace(info.rank, info.world_size, device))
    settings = dataclasses.replace(ranks.settings, device=None if device == "cpu" else device)
    try:
        transport = open_transport(ranks.transport, info, config.timeout_s, config.fingerprint(), settings)
    except (TransportError, ValueError, ImportError) as exc:
        raise RankFailed(info.rank, ConnectError(f"could not connect over {ranks.transport}: {exc}")) from exc
    try:
        return _work_and_gather(transport, prepared, work)
    except Exception as exc:  # noqa: BLE001 - named with its rank; the cause is kept
        raise RankFailed(info.rank, exc) from exc
    finally:
        transport.close()


def _work_and_gather(transport: Transport, prepared, work) -> Gathered | None:
    value, stats = work(prepared, transport)
    everyone = gather_to_rank0(transport, stats)
    return None if everyone is None else Gathered(value, everyone)
