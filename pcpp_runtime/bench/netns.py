"""Two "hosts" on one machine for the throttled-link benchmark: two network namespaces joined
by a veth pair, with a token-bucket rate limit (``tc qdisc ... tbf``) on both ends.

::

    ns 0 (198.51.100.1/24) <== veth pair, tbf at RATE each way ==> (198.51.100.2/24) ns 1

Each namespace has its own loopback and one veth end, so the two ranks can reach each other
only over the (throttled) pair. Addresses are from TEST-NET-2 (RFC 5737). Needs root and
iproute2 (``ip``, ``tc``); :func:`unavailable` says why not, where it cannot work. ``netem``
(delay, loss) is not used: only the rate is limited.

The benchmark runner uses it as::

    with link_pair() as pair:
        set_rate(pair, "100mbit")
        ... start rank r with pair.exec_argv(r, argv) ...

(the same idea as the tests' ``tests/netns_fixture.py``, kept separate so the installed package
does not depend on the test suite.)
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

__all__ = ["ADDRESSES", "LinkPair", "create_pair", "destroy_pair", "link_pair", "parse_rate", "set_rate", "unavailable"]

ADDRESSES = ("198.51.100.1", "198.51.100.2")
_PREFIX = 24
_TIMEOUT_S = 10
_counter = itertools.count()


@dataclasses.dataclass(frozen=True)
class LinkPair:
    """Namespaces ``names[i]`` holding veth ends ``veths[i]`` with addresses ``addrs[i]``."""

    names: tuple[str, str]
    veths: tuple[str, str]
    addrs: tuple[str, str] = ADDRESSES

    def exec_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        return [_tool("ip"), "netns", "exec", self.names[index], *argv]


def _tool(name: str) -> str:
    return shutil.which(name) or name


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why a throttled pair cannot be made here (``None`` when it can; this probes)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the throttled-link mode needs root (ip netns add, tc qdisc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool} command (iproute2) is not installed"
    probe = f"pcpp{os.getpid()}p"
    try:
        done = _run([_tool("ip"), "netns", "add", probe], check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add failed: {exc}"
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip() or done.returncode}"
    _run([_tool("ip"), "netns", "del", probe], check=False)
    return None


def create_pair(tag: str | None = None) -> LinkPair:
    """Make the two namespaces and the veth pair (loopback up); undoes its work on failure."""
    tag = tag or f"b{os.getpid() % 100000}{next(_counter)}"
    pair = LinkPair(names=(f"pcpp{tag}x", f"pcpp{tag}y"), veths=(f"pcv{tag}x", f"pcv{tag}y"))
    if any(len(v) > 15 for v in pair.veths):
        raise ValueError(f"interface names {pair.veths} are longer than 15 characters")
    ip = _tool("ip")
    try:
        for name in pair.names:
            _run([ip, "netns", "add", name])
        _run([ip, "link", "add", pair.veths[0], "netns", pair.names[0], "type", "veth",
              "peer", "name", pair.veths[1], "netns", pair.names[1]])
        for name, veth, addr in zip(pair.names, pair.veths, pair.addrs):
            _run([ip, "-n", name, "link", "set", "lo", "up"])
            _run([ip, "-n", name, "addr", "add", f"{addr}/{_PREFIX}", "dev", veth])
            _run([ip, "-n", name, "link", "set", veth, "up"])
    except BaseException:
        destroy_pair(pair)
        raise
    return pair


def destroy_pair(pair: LinkPair) -> list[str]:
    """Kill what still runs in the namespaces and delete them (the veth pair goes with them);
    returns the errors of steps that failed."""
    ip = _tool("ip")
    errors = []
    for name in pair.names:
        if not os.path.exists(f"/run/netns/{name}"):
            continue
        for pid in _run([ip, "netns", "pids", name], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        done = _run([ip, "netns", "del", name], check=False)
        if done.returncode != 0:
            errors.append(f"ip netns del {name}: {done.stderr.strip()}")
    return errors


@contextlib.contextmanager
def link_pair(tag: str | None = None) -> Iterator[LinkPair]:
    pair = create_pair(tag)
    try:
        yield pair
    finally:
        destroy_pair(pair)


_UNITS = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(rate: str | float) -> float:
    """A tc rate (``100mbit``, ``1gbit``; ``mbps`` = megabytes/s) in bit/s."""
    if isinstance(rate, (int, float)):
        return float(rate)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", rate)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a tc rate: {rate!r} (e.g. 100mbit, 1gbit)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def set_rate(pair: LinkPair, rate: str | float | None, *, latency: str = "50ms") -> None:
    """Limit both directions to ``rate`` with tbf (``None``: remove the limit).

    The bucket holds 10 ms of traffic at ``rate`` (at least 16 KiB: one GSO segment plus the rate
    over a timer tick), so bursts are short against a denoising step.
    """
    tc = _tool("tc")
    for name, veth in zip(pair.names, pair.veths):
        _run([_tool("ip"), "netns", "exec", name, tc, "qdisc", "del", "dev", veth, "root"], check=False)
    if rate is None:
        return
    bits = parse_rate(rate)
    if bits <= 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    burst = max(16 * 1024, int(bits / 8 / 100))
    for name, veth in zip(pair.names, pair.veths):
        _run([_tool("ip"), "netns", "exec", name, tc, "qdisc", "replace", "dev", veth, "root", "tbf",
              "rate", f"{int(bits)}bit", "burst", str(burst), "latency", latency])
