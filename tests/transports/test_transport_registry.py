"""Registration, lazy imports and constructors without side effects."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from pcpp_runtime.transports import MPITransport, TorchDistTransport, ZmqTransport

from pcpp_runtime.registry import transports


def test_builtins_are_registered() -> None:
    assert {"local", "torch", "mpi", "zmq"} <= set(transports.names())
    assert transports.get("torch") is TorchDistTransport
    assert transports.get("mpi") is MPITransport
    assert transports.get("zmq") is ZmqTransport


@pytest.mark.timeout(60)
def test_import_does_not_load_backends() -> None:
    code = (
        "import sys, pcpp_runtime.transports as t; from pcpp_runtime.registry import transports; transports.names();"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('zmq', 'mpi4py')];"
        "import torch.distributed as d; assert not bad, bad; assert not d.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_constructors_have_no_side_effects() -> None:
    before = threading.active_count()
    objs = [
        TorchDistTransport(0, 2, 5.0, master_port=1),
        MPITransport(0, 2, 5.0),
        ZmqTransport(0, 2, 5.0, master_port=1),
    ]
    assert threading.active_count() == before
    import torch.distributed as dist

    assert not dist.is_initialized()
    for t in objs:
        with pytest.raises(Exception, match="not connected"):
            t.send_object({}, 1)
        t.close()


def test_missing_mpi4py_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "from pcpp_runtime.transports import MPITransport\n"
        "try:\n    MPITransport(0, 1, 5.0).connect()\n"
        "except ImportError as e:\n    assert 'pip install mpi4py' in str(e), e; print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    assert "ok" in out.stdout
