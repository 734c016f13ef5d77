"""Open a process transport for this rank, from what rank discovery found.

Each transport class takes ``(rank, world_size, timeout_s, **options)`` and connects in an
explicit ``connect()``; this module picks the options each one accepts from one set of settings.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from .registry import transports

__all__ = ["TransportSettings", "open_transport"]


@dataclasses.dataclass(frozen=True)
class TransportSettings:
    """Settings a user can give for any process transport (``None``: the transport's default).

    Attributes:
        bind_addr: interface ``zmq`` binds (``0.0.0.0`` across machines).
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
