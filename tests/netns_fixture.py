"""Two "hosts" on one machine: a pair of network namespaces joined by a veth pair.

::

    ns0 (198.51.100.1/24, veth0) <=====> (veth1, 198.51.100.2/24) ns1

Each namespace has its own loopback (brought up) and one end of the veth pair, so a process
started with ``ip netns exec NS ...`` sees only its own address and its peer's: what binds to
127.0.0.1 in one namespace cannot be reached from the other, as on two machines. The addresses are
from TEST-NET-2 (RFC 5737; 192.0.2.x, TEST-NET-1, is taken by this machine's own interface).

Names are unique per process and call (``pcpp<tag>x``/``y``), so parallel runs do not collide, and
:func:`destroy_pair` removes exactly what :func:`create_pair` made, even after a failure half way.
Needs root and iproute2; :func:`netns_unavailable` says why not where it cannot work. The
implementation is the product's :mod:`pcpp_runtime.bench.netns` (the benchmark's throttled links).

Use it as the pytest fixture :func:`ns_pair` (``from netns_fixture import ns_pair`` in a test
module) or, e.g. in a benchmark, as a context manager::

    with netns_pair() as pair:
        throttle(pair, "100mbit")            # tc tbf on both veth ends
        subprocess.run(pair.exec_argv(0, ["python", "-c", "..."]))
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

# One implementation: the benchmark's throttled-link mode uses the same module.
from pcpp_runtime.bench.netns import ADDRESSES, create_pair, destroy_pair, parse_rate, set_rate
from pcpp_runtime.bench.netns import LinkPair as NsPair
from pcpp_runtime.bench.netns import link_pair as netns_pair
from pcpp_runtime.bench.netns import unavailable as netns_unavailable

__all__ = [
    "ADDRESSES",
    "NsPair",
    "create_pair",
    "destroy_pair",
    "netns_pair",
    "netns_unavailable",
    "ns_pair",
    "parse_rate",
    "throttle",
    "unthrottle",
]


def throttle(ns_pair: NsPair, rate: str | int | float, *, latency: str = "50ms") -> None:
    """Limit both directions of the link to ``rate`` (``"100mbit"`` or bit/s) with tc tbf."""
    set_rate(ns_pair, rate, latency=latency)


def unthrottle(ns_pair: NsPair) -> None:
    """Remove :func:`throttle`'s limit (both ends); no error when none is set."""
    set_rate(ns_pair, None)


@pytest.fixture(scope="module")
def ns_pair() -> Iterator[NsPair]:
    """Two namespaces joined by a veth pair for the module's tests; skipped where impossible."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    try:
        pair = create_pair()
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot make a veth pair between two namespaces: {exc}")
    try:
        yield pair
    finally:
        errors = destroy_pair(pair)
        assert not errors, errors
