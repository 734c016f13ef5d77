"""One rank of a transport test job: ``python transport_worker.py --transport T --scenario S ...``.

Started by ``transport_jobs.py`` (one process per rank for ``torch``/``zmq``, ``mpiexec -n N`` for
``mpi``). Writes ``<out>/rank<r>.json`` with ``ok``, the result or the error (type, message,
traceback) and exits 0 or 1; under MPI an error then aborts the job (``install_abort_on_error``).

Scenarios: ``conformance`` (the whole suite), ``never_sends`` (both ranks wait for a message the
other never sends), ``exits`` (rank 1 exits mid-run without closing), ``killed`` (rank 1 kills
itself with SIGKILL), ``zmq_security`` (rank 1 and a stray socket send malformed and pickled
messages to rank 0), ``config_mismatch`` (rank 1 has another config_hash), ``bench`` (ping-pong).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import msgpack  # noqa: E402
import torch  # noqa: E402
from pcpp_runtime.transports import Transport  # noqa: E402

torch.set_num_threads(1)


def make_transport(args: argparse.Namespace, rank: int) -> Transport:
    if args.device == "cuda":  # one GPU per rank where there are enough, else all on GPU 0
        args.device = f"cuda:{rank % torch.cuda.device_count()}"
    if args.transport == "torch":
        from pcpp_runtime.transports.torch_dist import TorchDistTransport

        return TorchDistTransport(rank, args.world_size, args.timeout, master_port=args.port, device=args.device)
    if args.transport == "zmq":
        from pcpp_runtime.transports.zeromq import ZmqTransport

        config_hash = "job-config-b" if (args.scenario == "config_mismatch" and rank == 1) else "job-config-a"
        return ZmqTransport(
            rank, args.world_size, args.timeout, master_port=args.port, config_hash=config_hash, device=args.device
        )
    if args.transport == "mpi":
        from pcpp_runtime.transports.mpi import MPITransport, install_abort_on_error

        install_abort_on_error()
        return MPITransport(rank, args.world_size, args.timeout, device=args.device)
    raise SystemExit(f"unknown transport {args.transport}")


# ---------------------------------------------------------------------------- scenarios
def scenario_conformance(t: Transport, args: argparse.Namespace) -> Any:
    from transport_conformance import run_conformance

    return run_conformance(t)


def scenario_conformance_batched(t: Transport, args: argparse.Namespace) -> Any:
    """The suite with point-to-point operations queued and launched as batches (NCCL's path),
    run on gloo so that CPU-only machines test it too."""
    from transport_conformance import run_conformance

    assert args.transport == "torch"
    t._batch_p2p = True  # type: ignore[attr-defined]
    return run_conformance(t)


def scenario_gpu(t: Transport, args: argparse.Namespace) -> Any:
    """CUDA buffers: p2p of every tested dtype both ways, all_gather, objects."""
    from transport_conformance import DTYPES, pattern

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    peer = 1 - t.rank
    for i, dtype in enumerate(DTYPES):
        data = pattern(1 << 16, dtype, t.rank + i).to(dev)
        buf = torch.empty(1 << 16, dtype=dtype, device=dev)
        _swap(t, peer, data, buf, 20 + i)
        assert buf.device == dev and torch.equal(buf.cpu(), pattern(1 << 16, dtype, peer + i))
    outs = [torch.empty(q + 3, device=dev) for q in range(t.world_size)]
    t.all_gather(outs, torch.full((t.rank + 3,), float(t.rank), device=dev))
    for q in range(t.world_size):
        assert torch.equal(outs[q].cpu(), torch.full((q + 3,), float(q)))
    t.send_object({"gpu": t.rank}, peer)
    assert t.recv_object(peer) == {"gpu": peer}
    t.barrier()
    return {"counters": t.counters.snapshot()}


def scenario_never_sends(t: Transport, args: argparse.Namespace) -> Any:
    peer = 1 - t.rank
    t.barrier()  # both ranks start their timed wait together, so both time out together
    t.irecv(torch.empty(4), peer, 5 + t.rank).wait()  # nobody sends tag 5 or 6
    return "unreachable"


def _swap(t: Transport, peer: int, data: torch.Tensor, buf: torch.Tensor, tag: int) -> None:
    """Send ``data`` to ``peer`` and receive its message into ``buf``, both on ``tag``."""
    works = [t.irecv(buf, peer, tag), t.isend(data, peer, tag)]
    for w in works:
        w.wait()


def _rank1_leaves(t: Transport, leave: Callable[[], Any]) -> Any:
    """After a first exchange rank 1 calls ``leave()`` and returns what it returns (if it
    returns at all); rank 0 waits for a message (tag 2) that rank 1 never sends."""
    _swap(t, 1 - t.rank, torch.ones(4), torch.empty(4), 1)
    if t.rank == 1:
        return leave()
    t.irecv(torch.empty(4), 1, 2).wait()
    return "unreachable"


def scenario_exits(t: Transport, args: argparse.Namespace) -> Any:
    def leave() -> None:
        time.sleep(0.5)
        # gone without closing anything. Under MPICH a rank that ends with status 0 without
        # MPI_Finalize makes mpiexec kill the others and report 0, so the MPI run uses status 3.
        os._exit(3 if args.transport == "mpi" else 0)

    return _rank1_leaves(t, leave)


def scenario_exits_clean(t: Transport, args: argparse.Namespace) -> Any:
    # rank 1 returns: main closes its transport and exits 0 while rank 0 still waits
    return _rank1_leaves(t, lambda: "left early")


def scenario_killed(t: Transport, args: argparse.Namespace) -> Any:
    def leave() -> None:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    return _rank1_leaves(t, leave)


def scenario_config_mismatch(t: Transport, args: argparse.Namespace) -> Any:
    return "connected although config_hash differs"


def scenario_zmq_security(t: Transport, args: argparse.Namespace) -> Any:
    """Rank 1 injects bad frames on its real connection; rank 0 also gets bad frames from a
    stray socket that never did the handshake. Rank 0 must reject all and keep working."""
    import zmq
    from pcpp_runtime.transports.zeromq import PROTOCOL_VERSION

    evil = pickle.dumps({"__reduce__": "os.system('echo owned')"})

    def header(**over: Any) -> bytes:
        h = {"v": PROTOCOL_VERSION, "k": "t", "src": 1, "dst": 0, "tag": 50, "dtype": "float32", "nbytes": 16}
        h.update(over)
        return msgpack.packb({k: v for k, v in h.items() if v is not None})

    if t.rank == 1:
        bad = [
            [evil, b"x" * 16],  # pickle as header
            [msgpack.packb([1, 2, 3])],  # msgpack, but not a map
            [b"\xc1\xc1 not msgpack"],  # invalid msgpack
            [header(), evil],  # payload length does not match the header
            [header(v=99), b"y" * 16],  # protocol version
            [header(extra="field"), b"z" * 16],  # unknown field
            [header(src=0), b"w" * 16],  # claims another source
            [header(dtype="object"), b"q" * 16],  # unknown dtype
        ]
        for frames in bad:
            t._inject_frames(0, frames)
        t.isend(torch.arange(4.0), 0, 51).wait()
        t.send_object({"still": "works"}, 0)
        t.barrier()
        # a well-formed message that does not fit rank 0's buffer: that receive fails
        t._inject_frames(0, [header(tag=52, dtype="int64", nbytes=32), b"\x00" * 32])
        t.isend(torch.arange(6.0), 0, 53).wait()
        t.barrier()
        t.barrier()
        t.isend(torch.arange(8.0), 0, 54).wait()
        return "sent"

    out = torch.empty(4)
    t.irecv(out, 1, 51).wait()
    assert torch.equal(out, torch.arange(4.0))
    assert t.recv_object(1) == {"still": "works"}
    t.barrier()
    failed = None
    try:
        t.irecv(torch.empty(4), 1, 52).wait()
    except Exception as exc:  # noqa: BLE001
        failed = f"{type(exc).__name__}: {exc}"
    assert failed is not None and "does not fit" in failed, failed
    out6 = torch.empty(6)
    t.irecv(out6, 1, 53).wait()
    assert torch.equal(out6, torch.arange(6.0))
    # a stray socket: no handshake, then a hello with another config
    ctx = zmq.Context.instance()
    stray = ctx.socket(zmq.DEALER)
    stray.setsockopt(zmq.LINGER, 0)
    stray.connect(t.endpoint)
    stray.send_multipart([evil, b"x" * 16])
    stray.send_multipart([header(), b"x" * 16])
    stray.send(
        msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "k": "hello",
                "magic": "pcpp-zmq",
                "src": 1,
                "dst": 0,
                "world_size": 2,
                "config_hash": "other-job",
                "job": "0",
            }
        )
    )
    # the transport answers inside its waits and progress() calls: drive it until the stray hears back
    deadline = time.monotonic() + 5.0
    while not stray.poll(10):
        assert time.monotonic() < deadline, "no answer to a bad hello"
        t.progress(0.05)
    answer = msgpack.unpackb(stray.recv())
    assert answer["k"] == "reject" and "config_hash" in answer["reason"], answer
    stray.close()
    t.barrier()
    t.barrier()
    out8 = torch.empty(8)
    t.irecv(out8, 1, 54).wait()
    assert torch.equal(out8, torch.arange(8.0))
    return {"rejected": list(t.rejected), "recv_error": failed}


SCENARIOS = {name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", required=True)
    parser.add_argument("--scenario", default="conformance")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = (
        args.rank
        if args.rank is not None
        else int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    )
    if args.world_size is None:
        args.world_size = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    out = Path(args.out) / f"rank{rank}.json"
    start = time.monotonic()
    record: dict[str, Any] = {
        "rank": rank,
        "import_s": round(time.time() - float(os.environ.get("PCPP_TEST_SPAWNED_AT", time.time())), 3),
    }
    t = None
    try:
        t = make_transport(args, rank)
        t.connect()
        record["connect_s"] = round(time.monotonic() - start, 3)
        record["result"] = SCENARIOS[args.scenario](t, args)
        record["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        record.update(ok=False, error_type=type(exc).__name__, error=str(exc), traceback=traceback.format_exc())
        _write_record(out, record, start)
        # Leave the peer a moment to record its own error before this rank goes away: a failed
        # MPI rank makes mpiexec kill the others, and a closed gloo/zmq connection turns the peer's
        # own timeout, due a few ms later, into PeerFailed (both seen in make test runs).
        time.sleep(1.0)
        raise
    finally:
        if t is not None and (record.get("ok") or args.transport != "mpi"):
            closing = time.monotonic()
            t.close()  # under MPI an error aborts the job instead
            record["close_s"] = round(time.monotonic() - closing, 3)
    _write_record(out, record, start)
    return 0


def _write_record(out: Path, record: dict[str, Any], start: float) -> None:
    """Write this rank's outcome, with the seconds since ``start``, for the test to read."""
    record["elapsed"] = time.monotonic() - start
    out.write_text(json.dumps(record, default=str))


if __name__ == "__main__":
    sys.exit(main())
