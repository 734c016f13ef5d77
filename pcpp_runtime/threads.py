"""Run N ranks as threads of this process over the in-process transport.

Used by ``pcpp generate --transport local`` and by the tests: the numerics of N ranks without
starting processes. If one rank raises, the fabric is aborted so every other rank stops waiting
at once; the first failing rank's exception is re-raised with its rank named.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from .transports.local import LocalFabric, LocalTransport

__all__ = ["RankFailed", "run_in_threads"]

T = TypeVar("T")


class RankFailed(RuntimeError):
    """A rank raised; ``rank`` says which, ``__cause__`` is its exception."""

    def __init__(self, rank: int, exc: BaseException) -> None:
        super().__init__(f"rank {rank} failed: {type(exc).__name__}: {exc}")
        self.rank = rank


def run_in_threads(world_size: int, target: Callable[[LocalTransport], T], timeout_s: float = 300.0) -> list[T]:
    """Call ``target(transport)`` for every rank, each in its own thread; return their results
    in rank order. ``timeout_s`` is both every wait's timeout and the limit on the whole run."""
    fabric = LocalFabric(world_size)
    results: list[T | None] = [None] * world_size
    errors: dict[int, BaseException] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = target(fabric.transport(rank, timeout_s))
        except BaseException as exc:  # noqa: BLE001 - reported below with the rank
            errors[rank] = exc
            fabric.abort(f"rank {rank} failed: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(r,), name=f"pcpp-rank-{r}", daemon=True) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
        if thread.is_alive():
            fabric.abort(f"{thread.name} did not finish within {timeout_s:.0f} s")
            raise TimeoutError(f"{thread.name} did not finish within {timeout_s:.0f} s")
    if errors:
        # the first rank that failed on its own, not one woken by the abort
        from .transports.base import PeerFailed

        own = {r: e for r, e in errors.items() if not isinstance(e, PeerFailed)} or errors
        rank = min(own)
        raise RankFailed(rank, own[rank]) from own[rank]
    return results  # type: ignore[return-value]
