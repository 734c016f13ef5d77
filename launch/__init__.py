"""Starting ranks and finding out who they are.

* :func:`discover` reads this process's :class:`RankInfo` from explicit flags or the launcher's
  environment (torchrun, OpenMPI, SLURM, MPICH/Intel MPI); :func:`select_device` picks its GPU
  from the local rank.
* :func:`run_workers` starts N local workers of one command, torchrun-style.
* ``slurm/*.sbatch`` and ``examples/`` hold templates to copy: sbatch scripts for one and several
  nodes, an mpirun script with a hostfile, a torchrun script.

No module here imports torch at import time; select_device imports it when called.
"""

from .discovery import (
    ADAPTERS,
    LaunchEnvironmentError,
    RankInfo,
    discover,
    job_port,
    select_device,
)
from .hostlist import expand_hostlist, expand_tasks_per_node
from .local import free_port, run_workers

__all__ = [
    "ADAPTERS",
    "LaunchEnvironmentError",
    "RankInfo",
    "discover",
    "expand_hostlist",
    "expand_tasks_per_node",
    "free_port",
    "job_port",
    "run_workers",
    "select_device",
]
