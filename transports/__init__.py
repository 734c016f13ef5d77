"""Transports: one interface (:mod:`.base`), several implementations.

Built-in names: ``local`` (threads in one process), ``torch`` (torch.distributed: NCCL on CUDA,
gloo on CPU), ``mpi`` (mpi4py), ``zmq`` (pyzmq + msgpack). Heavy libraries (mpi4py, zmq,
torch.distributed backends) are imported only when a transport connects.
"""

from .base import (
    COLLECTIVE_TAG_BASE,
    ByteCounters,
    CompletedWork,
    MultiWork,
    PeerFailed,
    Transport,
    TransportError,
    TransportTimeout,
    Work,
)
from .group import GroupTransport
from .local import LocalFabric, LocalTransport
from .mpi import MPITransport, install_abort_on_error
from .torch_dist import TorchDistTransport
from .zeromq import ZmqTransport

__all__ = [
    "COLLECTIVE_TAG_BASE",
    "ByteCounters",
    "CompletedWork",
    "GroupTransport",
    "LocalFabric",
    "LocalTransport",
    "MPITransport",
    "MultiWork",
    "PeerFailed",
    "Transport",
    "TransportError",
    "TorchDistTransport",
    "TransportTimeout",
    "Work",
    "ZmqTransport",
    "install_abort_on_error",
]


def _register_builtins() -> None:
    from pcpp_runtime.registry import transports

    transports.register("local", LocalTransport)
    transports.register("torch", TorchDistTransport)
    transports.register("mpi", MPITransport)
    transports.register("zmq", ZmqTransport)


_register_builtins()
