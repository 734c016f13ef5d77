"""Point-to-point ping-pong between ranks 0 and 1 of a transport: one-way time of a message.

Used by ``benchmarks/transport_bandwidth.py`` (host buffers) and the GPU checks
(``tests/gpu_worker.py``, device buffers).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

__all__ = ["one_way_seconds"]


def one_way_seconds(t: Any, buf: Any, warmup: int, rounds: int) -> float:
    """Median one-way time, in seconds, of ``buf`` between ranks 0 and 1 of transport ``t``.

    Both ranks call this with a buffer of the same size (either rank's ``buf`` is overwritten).
    Each of ``warmup + rounds`` round trips is rank 0 -> 1 -> 0; the last ``rounds`` are timed,
    including a device synchronisation for a CUDA buffer, and half the median is returned.
    """
    import torch

    peer = 1 - t.rank
    times = []
    t.barrier()
    for i in range(warmup + rounds):
        start = time.perf_counter()
        if t.rank == 0:
            t.isend(buf, peer, 1).wait()
            t.irecv(buf, peer, 2).wait()
        else:
            t.irecv(buf, peer, 1).wait()
            t.isend(buf, peer, 2).wait()
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) / 2
