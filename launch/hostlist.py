"""SLURM's compressed host lists and task counts.

``SLURM_JOB_NODELIST=node[01-03,07],gpu5`` and ``SLURM_TASKS_PER_NODE=2(x3),1`` come compressed;
these expand them in SLURM's order. Malformed text raises ``ValueError``.
"""

from __future__ import annotations

import re

__all__ = ["expand_hostlist", "expand_tasks_per_node"]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list syntax, keeping its order.

    Brackets hold comma-separated numbers and ranges; a range keeps the zero padding of its
    lower bound; several bracket groups in one name expand as a product, leftmost slowest.

    >>> expand_hostlist("node[01-03,07],gpu5,a[1-2]-ib")
    ['node01', 'node02', 'node03', 'node07', 'gpu5', 'a1-ib', 'a2-ib']
    >>> expand_hostlist("r[1-2]n[8-9]")
    ['r1n8', 'r1n9', 'r2n8', 'r2n9']
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        hosts.extend(_expand_item(item, hostlist))
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            if depth:
                raise ValueError(f"nested '[' in host list {hostlist!r}")
            depth = 1
        elif char == "]":
            if not depth:
                raise ValueError(f"unmatched ']' in host list {hostlist!r}")
            depth = 0
        elif char == "," and not depth:
            items.append(hostlist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unmatched '[' in host list {hostlist!r}")
    items.append(hostlist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, hostlist: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    tails = _expand_item(rest, hostlist)
    return [prefix + value + tail for value in _expand_ranges(body, hostlist) for tail in tails]


def _expand_ranges(body: str, hostlist: str) -> list[str]:
    values: list[str] = []
    for part in body.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in host list {hostlist!r}")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {part!r} in host list {hostlist!r}")
        width = len(low)
        values.extend(f"{n:0{width}d}" for n in range(int(low), int(high) + 1))
    return values


_TASKS_ITEM = re.compile(r"^\s*(\d+)\s*(?:\(x(\d+)\))?\s*$")


def expand_tasks_per_node(text: str) -> list[int]:
    """Expand SLURM's tasks-per-node syntax.

    >>> expand_tasks_per_node("2(x3),1")
    [2, 2, 2, 1]
    """
    counts: list[int] = []
    for item in text.split(","):
        match = _TASKS_ITEM.match(item)
        if match is None:
            raise ValueError(f"bad tasks-per-node entry {item!r} in {text!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
