"""Open a process transport for this rank, from what rank discovery found.

Each transport class takes ``(rank, world_size, timeout_s, **options)`` and connects in an
explicit ``connect()``; this module picks the options each one accepts from one set of settings.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
from typing import Any

from .registry import transports

__all__ = ["TransportSettings", "open_transport"]


@dataclasses.dataclass(frozen=True)
class TransportSettings:
    """Settings a user can give for any process transport (``None``: the transport's default).

    Attributes:
        bind_addr: interface ``zmq`` binds (``0.0.0.0`` across machines); for ``torch``, the
            interface gloo (and NCCL) use, given as its address (see :func:`_pin_torch_interface`).
        advertise_addr: address peers use to reach this rank (``zmq``).
        port_range: ``(lo, hi)`` for ``zmq``'s data ports (firewalls).
        device: where buffers live (``cpu`` or ``cuda:N``).
    """

    bind_addr: str | None = None
    advertise_addr: str | None = None
    port_range: tuple[int, int] | None = None
    device: str | None = None


def open_transport(name: str, info: Any, timeout_s: float, config_hash: str, settings: TransportSettings | None = None):
    """Create and connect transport ``name`` for the rank ``info`` describes
    (a :class:`pcpp_runtime.launch.RankInfo`)."""
    cls = transports.get(name)
    settings = settings or TransportSettings()
    accepted = inspect.signature(cls).parameters
    options: dict[str, Any] = {}
    if name == "torch":
        _check_one_gpu_per_rank(info, settings.device)
    if name == "torch" and "bind_addr" not in accepted and settings.bind_addr is not None:
        _pin_torch_interface(settings.bind_addr, settings.device)
        settings = dataclasses.replace(settings, bind_addr=None)
    if "config_hash" in accepted:
        options["config_hash"] = config_hash
    if "master_addr" in accepted or "master_port" in accepted:
        addr, port = info.require_rendezvous()
        if name == "zmq" and info.source.startswith("torchrun"):
            # torchrun's own TCPStore already listens on MASTER_PORT (see launch.discovery)
            port += 1
        options.update(master_addr=addr, master_port=port)
    for key, value in dataclasses.asdict(settings).items():
        if value is None:
            continue
        if key not in accepted:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to the {name!r} transport")
        options[key] = value
    return cls(info.rank, info.world_size, timeout_s, **options).connect()


def _check_one_gpu_per_rank(info: Any, device: str | None) -> None:
    """NCCL (the ``torch`` transport on CUDA) cannot run two ranks on one GPU: refuse a node that
    starts more ranks than it has GPUs, before NCCL fails on it."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count()
    if info.local_world_size > count:
        raise ValueError(
            f"the torch transport uses NCCL on GPUs, which runs one rank per GPU, but this node starts "
            f"{info.local_world_size} ranks on {count} GPU(s): start at most {count} rank(s) per node, "
            "or use --transport zmq or mpi (they share a GPU between ranks), or --device cpu"
        )


def _pin_torch_interface(bind_addr: str, device: str | None) -> None:
    """Make torch.distributed use the interface that holds ``bind_addr``.

    gloo (and NCCL's bootstrap) pick their interface from the address the host name resolves to,
    which is often loopback (``127.0.1.1 host`` in Debian's /etc/hosts, containers): peers on
    other machines are then told to connect to 127.0.0.1. They take an interface *name* from
    ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``; this sets them (unless already set) to the
    interface holding ``bind_addr``. ``0.0.0.0`` leaves the choice to torch.
    """
    if bind_addr in ("0.0.0.0", "*", ""):
        return
    try:
        addr = socket.gethostbyname(bind_addr)
    except OSError as exc:
        raise ValueError(f"--bind-addr {bind_addr!r} does not resolve: {exc}") from None
    iface = _interface_holding(addr)
    if iface is None:
        raise ValueError(
            f"--bind-addr {bind_addr}: no network interface here has the address {addr} "
            "(or set GLOO_SOCKET_IFNAME to the interface name)"
        )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    if device is not None and device.startswith("cuda"):
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


def _interface_holding(addr: str) -> str | None:
    """The name of the interface whose (primary) IPv4 address is ``addr``; ``None`` if none is."""
    try:
        import fcntl
        import struct
    except ImportError:  # pragma: no cover - not POSIX
        return None
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == addr:
                return name
    return None
