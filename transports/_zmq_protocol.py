"""Wire format of the zmq transport: msgpack header frames and their strict validation.

Every frame that arrives from a socket is decoded here before anything else looks at it.
:func:`decode` accepts only a msgpack map of bounded size with exactly the fields of one known
message kind, each of the right type, and the current protocol version; anything else (a Python
pickle, malformed msgpack, an unknown kind or field, a bool where an int belongs) raises
:class:`Rejected` with a reason fit for a log line. Nothing is ever unpickled.

Kinds: ``t`` tensor header (followed by the raw payload frame), ``o`` object (followed by msgpack
bytes), ``bye``, ``hello``/``ack``/``reject`` (peer handshake), ``reg``/``table``/``rdv_reject``
(rendezvous with rank 0).

A rank says which job it belongs to twice: in ``reg`` (to rank 0) and in ``hello`` (to every peer).
Both carry the fields of :func:`identity`, and the receiving rank checks them with
:func:`identity_mismatch`.
"""

from __future__ import annotations

from typing import Any

import msgpack
import torch

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "MAGIC",
    "MAX_HEADER",
    "MAX_OBJECT",
    "PROTOCOL_VERSION",
    "Rejected",
    "decode",
    "identity",
    "identity_mismatch",
    "looks_like_pickle",
    "pack",
]

PROTOCOL_VERSION = 1
MAGIC = "pcpp-zmq"
MAX_HEADER = 4096
MAX_OBJECT = 64 << 20
MAX_REJECTIONS = 100

_DTYPE_LIST = "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex64 complex128"
#: dtypes a tensor header may name (by their torch name without ``torch.``)
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _DTYPE_LIST.split()}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# kind -> exact field set and types (bool is not accepted where int is expected)
SCHEMAS: dict[str, dict[str, type]] = {
    "t": {"v": int, "k": str, "src": int, "dst": int, "tag": int, "dtype": str, "nbytes": int},
    "o": {"v": int, "k": str, "src": int, "dst": int, "nbytes": int},
    "bye": {"v": int, "k": str, "src": int, "dst": int},
    "hello": {
        "v": int,
        "k": str,
        "magic": str,
        "src": int,
        "dst": int,
        "world_size": int,
        "config_hash": str,
        "job": str,
    },
    "ack": {"v": int, "k": str, "src": int, "dst": int},
    "reject": {"v": int, "k": str, "src": int, "dst": int, "reason": str},
    "reg": {"v": int, "k": str, "magic": str, "rank": int, "world_size": int, "config_hash": str, "endpoint": str},
    "table": {"v": int, "k": str, "job": str, "endpoints": tuple},
    "rdv_reject": {"v": int, "k": str, "reason": str},
}


class Rejected(Exception):
    """An inbound message failed validation; the text says why."""


def pack(kind: str, **fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "k": kind, **fields}, use_bin_type=True)


def identity(world_size: int, config_hash: str) -> dict[str, Any]:
    """The fields by which a ``reg`` or ``hello`` says which job its sender belongs to."""
    return {"magic": MAGIC, "world_size": world_size, "config_hash": config_hash}


def identity_mismatch(msg: dict[str, Any], world_size: int, config_hash: str, whose: str) -> str:
    """Why a decoded ``reg`` or ``hello`` belongs to another job than the receiving rank's, or
    ``""`` if it does not (:func:`decode` has already checked the protocol version).

    ``whose`` names the receiving rank in the reason, e.g. ``"rank 0's"`` or ``"this rank's"``.
    """
    if msg["magic"] != MAGIC:
        return f"not a pcpp zmq peer (magic {msg['magic']!r})"
    if msg["world_size"] != world_size:
        return f"world_size {msg['world_size']} does not match {whose} {world_size}"
    if msg["config_hash"] != config_hash:
        return f"config_hash {msg['config_hash']!r} does not match {whose} {config_hash!r}"
    return ""


def looks_like_pickle(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def decode(data: bytes, kinds: tuple[str, ...], max_array: int = 0) -> dict[str, Any]:
    """Strictly decode one header frame, or raise :class:`Rejected`."""
    if len(data) > MAX_HEADER + 1100 * max_array:
        raise Rejected(f"header frame of {len(data)} bytes is too large")
    if looks_like_pickle(data):
        raise Rejected(f"header frame is a Python pickle (protocol {data[1]}); pickles are never accepted")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=1024,
            max_bin_len=0,
            max_array_len=max_array,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise Rejected(f"header frame is not valid msgpack ({detail})") from None
    if not isinstance(obj, dict):
        raise Rejected(f"header is a msgpack {type(obj).__name__}, expected a map")
    if obj.get("v") != PROTOCOL_VERSION:
        raise Rejected(f"protocol version {obj.get('v')!r}, this side speaks {PROTOCOL_VERSION}")
    kind = obj.get("k")
    if kind not in kinds:
        raise Rejected(f"unexpected message kind {kind!r} (expected one of {', '.join(kinds)})")
    schema = SCHEMAS[kind]
    if set(obj) != set(schema):
        raise Rejected(f"{kind!r} header has fields {sorted(obj)}, expected {sorted(schema)}")
    for key, typ in schema.items():
        value = obj[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise Rejected(f"{kind!r} header field {key!r} is {type(value).__name__}, expected {typ.__name__}")
    return obj
