"""Two "hosts" on one machine: a pair of network namespaces joined by a veth pair.

::

    ns0 (198.51.100.1/24, veth0) <=====> (veth1, 198.51.100.2/24) ns1

Each namespace has its own loopback (brought up) and one end of the veth pair, so a process
started with ``ip netns exec NS ...`` sees only its own address and its peer's: what binds to
127.0.0.1 in one namespace cannot be reached from the other, as on two machines. The addresses are
from TEST-NET-2 (RFC 5737; 192.0.2.x, TEST-NET-1, is taken by this machine's own interface).

Names are unique per process (``pcpp<pid>a`` ...), so parallel runs do not collide, and
:func:`destroy_pair` removes exactly what :func:`create_pair` made, even after a failure half way.
Needs root and iproute2; :func:`netns_unavailable` says why not where it cannot work.

Use it as the pytest fixture :func:`ns_pair` (``from netns_fixture import ns_pair`` in a test
module) or, e.g. in a benchmark, as a context manager::

    with netns_pair() as pair:
        throttle(pair, "100mbit")            # tc tbf on both veth ends
        subprocess.run(pair.exec_argv(0, ["python", "-c", "..."]))
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence

import pytest

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

ADDRESSES = ("198.51.100.1", "198.51.100.2")
PREFIX_LEN = 24
_IP_TIMEOUT_S = 10
_counter = itertools.count()


@dataclasses.dataclass(frozen=True)
class NsPair:
    """Two namespaces ``names[i]``, each holding ``veths[i]`` with address ``addrs[i]``."""

    names: tuple[str, str]
    veths: tuple[str, str]
    addrs: tuple[str, str] = ADDRESSES

    def exec_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside namespace ``index`` (0 or 1)."""
        return [_ip(), "netns", "exec", self.names[index], *argv]


def _ip() -> str:
    return shutil.which("ip") or "ip"


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or ``None`` when they can (this probes)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"pcpp{os.getpid()}probe"
    try:
        done = _run([_ip(), "netns", "add", probe], check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add failed: {exc}"
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip() or done.returncode}"
    _run([_ip(), "netns", "del", probe], check=False)
    return None


def create_pair(tag: str | None = None) -> NsPair:
    """Make two namespaces joined by a veth pair (lo up in each); removes its work on failure."""
    tag = tag or f"{os.getpid()}{next(_counter)}"
    pair = NsPair(names=(f"pcpp{tag}a", f"pcpp{tag}b"), veths=(f"pcv{tag}a", f"pcv{tag}b"))
    if any(len(name) > 15 for name in pair.veths):  # IFNAMSIZ - 1
        raise ValueError(f"interface names {pair.veths} are longer than 15 characters")
    ip = _ip()
    try:
        for name in pair.names:
            _run([ip, "netns", "add", name])
        _run([ip, "link", "add", pair.veths[0], "netns", pair.names[0],
              "type", "veth", "peer", "name", pair.veths[1], "netns", pair.names[1]])
        for name, veth, addr in zip(pair.names, pair.veths, pair.addrs):
            _run([ip, "-n", name, "link", "set", "lo", "up"])
            _run([ip, "-n", name, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", veth])
            _run([ip, "-n", name, "link", "set", veth, "up"])
    except BaseException:
        destroy_pair(pair)
        raise
    return pair


def destroy_pair(pair: NsPair) -> list[str]:
    """Kill what still runs in the namespaces and delete them (the veth pair goes with them).

    Returns the error lines of steps that failed (a namespace that never existed is no error).
    """
    ip = _ip()
    errors = []
    for name in pair.names:
        if not os.path.exists(f"/run/netns/{name}"):
            continue
        pids = _run([ip, "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        done = _run([ip, "netns", "del", name], check=False)
        if done.returncode != 0:
            errors.append(f"ip netns del {name}: {done.stderr.strip()}")
    return errors


@contextlib.contextmanager
def netns_pair(tag: str | None = None) -> Iterator[NsPair]:
    """:func:`create_pair` ... :func:`destroy_pair`, whatever happens in between."""
    pair = create_pair(tag)
    try:
        yield pair
    finally:
        destroy_pair(pair)


_UNITS = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


def parse_rate(rate: str | int | float) -> float:
    """A tc rate (``"100mbit"``, ``"1gbit"``, ``"10mbps"`` = bytes/s, or a number of bit/s) in bit/s."""
    if isinstance(rate, (int, float)):
        return float(rate)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", rate)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a tc rate: {rate!r} (e.g. 100mbit, 1gbit, 10mbps)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def throttle(ns_pair: NsPair, rate: str | int | float, *, burst: int | None = None,
             latency: str = "50ms") -> None:
    """Limit both directions of the link to ``rate`` with a token bucket (``tc ... tbf``).

    ``rate`` is a tc rate (``"100mbit"``) or bit/s. ``burst`` (bytes) defaults to 10 ms worth of
    ``rate`` but at least 16 KiB (tbf needs at least one MTU plus the rate over a timer tick);
    ``latency`` is how long a packet may wait in the bucket before it is dropped. Replaces an
    earlier limit; :func:`unthrottle` removes it.
    """
    bits = parse_rate(rate)
    if bits <= 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    burst = burst or max(16 * 1024, int(bits / 8 / 100))
    for name, veth in zip(ns_pair.names, ns_pair.veths):
        _run([_ip(), "netns", "exec", name, shutil.which("tc") or "tc", "qdisc", "replace",
              "dev", veth, "root", "tbf", "rate", f"{int(bits)}bit", "burst", str(burst),
              "latency", latency])


def unthrottle(ns_pair: NsPair) -> None:
    """Remove :func:`throttle`'s limit (both ends); no error when none is set."""
    for name, veth in zip(ns_pair.names, ns_pair.veths):
        _run([_ip(), "netns", "exec", name, shutil.which("tc") or "tc", "qdisc", "del", "dev", veth,
              "root"], check=False)


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
