"""A group of ranks seen as a job of its own.

:class:`GroupTransport` gives a subset of a transport's ranks their own numbering ``0..k-1``
over the same connections, as CFG parallelism needs: each half of the ranks splits the latent
among themselves while the whole job gathers the outputs. Messages keep their tags; groups are
disjoint, so a group's messages never meet another group's. Bytes are counted in the parent's
counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Transport, Work

__all__ = ["GroupTransport"]


class GroupTransport(Transport):
    """Ranks ``ranks`` of ``parent`` (which must include ``parent.rank``), renumbered from 0.

    The parent stays owned by the caller: closing the group releases nothing (the inherited
    :meth:`~.base.Transport.close` only marks the group closed).
    """

    def __init__(self, parent: Transport, ranks: Sequence[int]) -> None:
        ranks = list(ranks)
        if parent.rank not in ranks:
            raise ValueError(f"{parent.describe(op='group')}: this rank is not in the group {ranks}")
        if len(set(ranks)) != len(ranks) or any(not 0 <= r < parent.world_size for r in ranks):
            raise ValueError(f"{parent.describe(op='group')}: group ranks must be distinct ranks of the job, got {ranks}")
        super().__init__(ranks.index(parent.rank), len(ranks), parent.timeout_s)
        self.parent = parent
        self.ranks = ranks
        self.name = f"{parent.name} (group of ranks {ranks[0]}-{ranks[-1]})"
        self.counters = parent.counters

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        self._check_peer(dst, "isend")
        return self.parent.isend(buf, self.ranks[dst], tag)

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        self._check_peer(src, "irecv")
        return self.parent.irecv(buf, self.ranks[src], tag)

    def send_object(self, obj: Any, dst: int) -> None:
        self._check_peer(dst, "send_object")
        self.parent.send_object(obj, self.ranks[dst])

    def recv_object(self, src: int, timeout: float | None = None) -> Any:
        self._check_peer(src, "recv_object")
        return self.parent.recv_object(self.ranks[src], timeout)
