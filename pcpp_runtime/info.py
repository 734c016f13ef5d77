"""What `pcpp info` reports: which transports can start here, plugins, built-in models, devices."""

from __future__ import annotations

import os
from typing import Any

from .registry import partitioners, policies, transports

__all__ = ["builtin_models", "collect_info", "transport_status"]


def transport_status(name: str) -> tuple[bool, str]:
    """(can start, why) for a built-in transport; plugins are reported as registered."""
    try:
        if name == "local":
            return True, "threads of one process"
        if name == "torch":
            import torch
            import torch.distributed as dist

            if not dist.is_available():
                return False, "this torch build has no torch.distributed"
            parts = ["gloo" if dist.is_gloo_available() else "no gloo"]
            if torch.cuda.is_available():
                parts.append(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if dist.is_nccl_available() else "no NCCL")
            else:
                parts.append("no CUDA (NCCL unused)")
            return dist.is_gloo_available() or dist.is_nccl_available(), ", ".join(parts)
        if name == "mpi":
            import mpi4py

            mpi4py.rc.initialize = False  # look, don't start MPI
            from mpi4py import MPI

            version = MPI.Get_library_version().splitlines()[0].strip()
            return True, f"mpi4py {mpi4py.__version__}, {version}"
        if name == "zmq":
            import msgpack
            import zmq

            return True, f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, msgpack {msgpack.version}"
    except ImportError as exc:
        return False, f"not installed ({exc.name or exc}); pip install the missing package"
    except Exception as exc:  # noqa: BLE001 - reported, not raised: info must always print
        return False, f"{type(exc).__name__}: {exc}"
    return True, "plugin"


def builtin_models() -> list[str]:
    """Built-in model names, the trained ones marked with whether their weights are here."""
    from .models.builtin import TRAINED_MODELS
    from .models.tiny import TINY_MODELS

    names = []
    for name, folder in sorted(TRAINED_MODELS.items()):
        state = "trained" if (folder / "model_index.json").exists() else "weights missing: make train-demo"
        names.append(f"{name} ({state})")
    return names + [f"{name} (random weights)" for name in sorted(TINY_MODELS)]


def collect_info() -> dict[str, Any]:
    names = transports.names()
    info: dict[str, Any] = {
        "transports": {name: transport_status(name) for name in names},
        "policies": policies.names(),
        "partitioners": partitioners.names(),
        "models": builtin_models(),
    }
    import torch

    devices = [f"cpu: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        devices.append("cuda: none")
    info["devices"] = devices
    return info
