"""Who am I in this job? Rank discovery from the launcher's environment.

Every launcher tells its processes their place in the job through environment variables, each
in its own words. One small adapter per launcher turns those words into a :class:`RankInfo`:

=========  ==========================================================================  ==========
source     variables read (``(x)``: optional)                                          adapter
=========  ==========================================================================  ==========
torchrun   RANK, WORLD_SIZE, LOCAL_RANK, (LOCAL_WORLD_SIZE), MASTER_ADDR, MASTER_PORT  TORCHRUN
openmpi    OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE                       OPENMPI
slurm      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NODELIST or           SLURM
           SLURM_JOB_NODELIST; on several nodes SLURM_NODEID, SLURM_STEP_TASKS_PER_NODE;
           (SLURMD_NODENAME)
pmi        PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS                          PMI
flags      the ``overrides`` given to :func:`discover` (``pcpp --rank --world-size ...``)
single     nothing at all: one process, rank 0 of 1
=========  ==========================================================================  ==========

:func:`discover` picks the first adapter whose variables are present, in this order, and says
why in each case:

1. **explicit flags** (``rank`` and ``world_size`` both given): the user said so; the environment
   is not consulted for ranks at all. Flags given alone (``master_port`` only, say) instead
   override single fields of whatever the environment describes.
2. **torchrun** (``RANK``/``WORLD_SIZE`` set): torchrun is often started by ``srun`` or
   ``mpirun`` once per node, so SLURM or MPI variables describe the torchrun agents, not the
   workers. The innermost launcher wins. :func:`pcpp_runtime.launch.local.run_workers` sets the
   same variables (and ``PCPP_LAUNCHER=local``; the source then reads ``local``).
3. **OpenMPI** (``OMPI_COMM_WORLD_RANK`` set): ``mpirun`` inside an sbatch script starts its
   daemons with ``srun``, one per node, so ``SLURM_PROCID`` there numbers nodes, not ranks.
4. **SLURM** (``SLURM_PROCID`` set): under ``srun --mpi=pmi2`` both SLURM and PMI variables
   exist and agree; SLURM also knows the local rank and the node list, so it goes first.
   *Exception:* when both are present and disagree on the rank or the size, MPICH's Hydra
   (``mpiexec``) was started inside an allocation and launched its proxies with ``srun``; the
   SLURM variables then describe the proxies, and PMI wins.
5. **PMI** (``PMI_RANK`` set): MPICH's Hydra ``mpiexec`` and Intel MPI.
6. **single**: no launcher variables at all.

An incomplete environment raises :class:`LaunchEnvironmentError` naming the missing variable,
in the manner of torch's ``env://`` rendezvous: ``environment variable WORLD_SIZE expected
(torchrun sets RANK, WORLD_SIZE, ...), but not set``. Values that are not integers and ranks
outside the world are errors too, quoting the variables they came from. Nothing falls back
silently.

**Rendezvous address and port.** Transports that rendezvous over TCP (``torch``, ``zmq``) need
``master_addr:master_port``; ``mpi`` does not. torchrun gives both, but its ``MASTER_PORT`` is
the port of torchrun's own TCPStore, already listening on node 0
(``TORCHELASTIC_USE_AGENT_STORE=True``): ``torch.distributed``'s ``env://`` joins that store,
while a transport that binds its own socket there (``zmq``) fails with "address in use" and must
use another port. The local launcher leaves ``MASTER_PORT`` free. For the other launchers:

* ``master_addr``: ``MASTER_ADDR`` if set; else the first host of the SLURM node list
  (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``: ``mpirun`` inside an allocation puts
  rank 0 there by default); else ``127.0.0.1`` when every rank is on this node; else ``""``,
  meaning unknown: :meth:`RankInfo.require_rendezvous` then fails naming ``MASTER_ADDR`` and
  ``--master-addr``.
* ``master_port``: ``MASTER_PORT`` if set; else derived from the job so that every rank of one
  job computes the same port and two jobs on one node rarely collide:
  ``29500 + job_id % 1000`` with the job id from ``SLURM_JOB_ID``, ``PMI_JOBID``,
  ``OMPI_MCA_ess_base_jobid`` or ``PMIX_NAMESPACE`` (the first one set; a non-numeric id is
  hashed with CRC-32); else 29500, torch's default. Two job steps running at once in one
  allocation get the same port: give one of them ``MASTER_PORT`` or ``--master-port``.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .hostlist import expand_hostlist, expand_tasks_per_node

if TYPE_CHECKING:  # torch is imported lazily, in select_device
    import torch

__all__ = [
    "ADAPTERS",
    "DEFAULT_PORT",
    "OPENMPI",
    "OVERRIDE_FIELDS",
    "PMI",
    "SLURM",
    "TORCHRUN",
    "LaunchEnvironmentError",
    "LauncherAdapter",
    "RankInfo",
    "discover",
    "expand_hostlist",
    "expand_tasks_per_node",
    "job_port",
    "select_device",
]

DEFAULT_PORT = 29500
"""torch's default rendezvous port; the base of ports derived from a job id."""

PORT_SPAN = 1000
"""Derived ports lie in ``[DEFAULT_PORT, DEFAULT_PORT + PORT_SPAN)``."""

OVERRIDE_FIELDS = (
    "rank",
    "world_size",
    "local_rank",
    "local_world_size",
    "master_addr",
    "master_port",
)
"""The keys :func:`discover` accepts in ``overrides`` (``None`` values are ignored)."""

_LOOPBACK = "127.0.0.1"

_RANK_FIELDS = ("rank", "world_size", "local_rank", "local_world_size")


class LaunchEnvironmentError(ValueError):
    """The launcher's environment (or the explicit flags) do not describe a valid rank."""


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """One process's place in the job.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes in the job.
        local_rank: rank among the processes on this node; picks the GPU (:func:`select_device`).
        local_world_size: number of processes on this node.
        node: the node's name or index as the launcher gives it, for logs; ``None`` if unknown.
        master_addr: host of rank 0's rendezvous; ``""`` when the launcher does not say
            (fine for the ``mpi`` transport; see :meth:`require_rendezvous`).
        master_port: the rendezvous port; ``None`` for a single process.
        source: which adapter produced it: ``torchrun``, ``local``, ``openmpi``, ``slurm``,
            ``pmi``, ``flags`` or ``single``; ``+flags`` is appended when flags overrode fields.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: str | None
    master_addr: str
    master_port: int | None
    source: str

    def __post_init__(self) -> None:
        _check(dataclasses.asdict(self), {})

    @property
    def is_single(self) -> bool:
        """True for a job of one process (nothing to rendezvous with)."""
        return self.world_size == 1

    def require_rendezvous(self) -> tuple[str, int]:
        """``(master_addr, master_port)`` for a TCP rendezvous, or an error saying what to set."""
        if not self.master_addr:
            raise LaunchEnvironmentError(
                f"no rendezvous address: {self.source} does not say where rank 0 runs; "
                "set MASTER_ADDR or pass --master-addr (the host of rank 0)"
            )
        if self.master_port is None:
            return self.master_addr, DEFAULT_PORT
        return self.master_addr, self.master_port

    def describe(self) -> str:
        """One line for logs.

        ``rank 1/4 (local 1/2 on node01) from slurm, rendezvous node01:29742``
        """
        if self.node is None:
            where = ""
        else:
            where = f" on node {self.node}" if self.node.isdigit() else f" on {self.node}"
        addr = self.master_addr or "?"
        port = "?" if self.master_port is None else str(self.master_port)
        return (
            f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}"
            f"{where}) from {self.source}, rendezvous {addr}:{port}"
        )


def _check(values: Mapping[str, Any], origin: Mapping[str, str]) -> None:
    """Raise if the fields do not describe a valid rank; ``origin`` says where each came from."""

    def said(field: str) -> str:
        return f"{values[field]} ({origin[field]})" if field in origin else str(values[field])

    for field in _RANK_FIELDS:
        value = values[field]
        if not isinstance(value, int) or isinstance(value, bool):
            raise LaunchEnvironmentError(f"{field} must be an integer, got {value!r}")
    if values["world_size"] < 1:
        raise LaunchEnvironmentError(f"world size {said('world_size')} must be at least 1")
    if not 0 <= values["rank"] < values["world_size"]:
        raise LaunchEnvironmentError(
            f"rank {said('rank')} must be in [0, world size {said('world_size')})"
        )
    if not 1 <= values["local_world_size"] <= values["world_size"]:
        raise LaunchEnvironmentError(
            f"local world size {said('local_world_size')} must be in [1, world size "
            f"{said('world_size')}]"
        )
    if not 0 <= values["local_rank"] < values["local_world_size"]:
        raise LaunchEnvironmentError(
            f"local rank {said('local_rank')} must be in [0, local world size "
            f"{said('local_world_size')})"
        )
    if not isinstance(values["master_addr"], str):
        raise LaunchEnvironmentError(f"master_addr must be a string, got {values['master_addr']!r}")
    port = values["master_port"]
    if port is not None and (
        not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536
    ):
        raise LaunchEnvironmentError(f"master port {said('master_port')} must be in [1, 65535]")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


class _Reader:
    """Reads one launcher's variables; flags in ``overrides`` win over them.

    Every value read is noted in ``origin`` (``"RANK=4"`` or ``"--rank 4"``) for error messages.
    """

    def __init__(
        self, env: Mapping[str, str], overrides: Mapping[str, Any], launcher: str, sets: str
    ):
        self.env = env
        self.overrides = overrides
        self.launcher = launcher
        self.sets = sets
        self.origin: dict[str, str] = {}

    def has(self, var: str) -> bool:
        return bool(self.env.get(var, "").strip())

    def missing(self, var: str) -> LaunchEnvironmentError:
        value = self.env.get(var)
        how = "but not set" if value is None else "but it is empty"
        return LaunchEnvironmentError(
            f"environment variable {var} expected ({self.launcher} sets {self.sets}), {how}"
        )

    def override(self, field: str) -> Any:
        """The flag given for ``field``, or ``None``."""
        if field not in self.overrides:
            return None
        value = self.overrides[field]
        self.origin[field] = f"{_flag(field)} {value}"
        return value

    def text(self, var: str, field: str | None = None, *, required: bool = True) -> str | None:
        if field is not None and field in self.overrides:
            return self.override(field)
        if not self.has(var):
            if required:
                raise self.missing(var)
            return None
        value = self.env[var].strip()
        if field is not None:
            self.origin[field] = f"{var}={value}"
        return value

    def int(self, var: str, field: str | None = None, *, required: bool = True) -> int | None:
        value = self.text(var, field, required=required)
        if value is None or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            raise LaunchEnvironmentError(
                f"environment variable {var}={value!r} is not an integer "
                f"({self.launcher} sets {self.sets})"
            ) from None

    def first(self, variables: tuple[str, ...]) -> tuple[str, str] | None:
        """The first of ``variables`` that is set, as ``(name, value)``."""
        for var in variables:
            if self.has(var):
                return var, self.env[var].strip()
        return None


class LauncherAdapter:
    """Turns one launcher's environment into a :class:`RankInfo`.

    Subclasses set ``name``, ``markers`` (any of them present means this launcher started the
    process), ``who`` and ``sets`` (who sets which variables, for error messages), and implement
    ``_read``.
    Call an adapter with an environment: ``TORCHRUN(os.environ)``.
    """

    name: str = ""
    markers: tuple[str, ...] = ()
    who: str = ""
    sets: str = ""

    def detect(self, env: Mapping[str, str]) -> bool:
        """Whether this launcher's variables are present in ``env``."""
        return any(var in env for var in self.markers)

    def __call__(
        self, env: Mapping[str, str], overrides: Mapping[str, Any] | None = None
    ) -> RankInfo:
        overrides = dict(overrides or {})
        reader = _Reader(env, overrides, self.who, self.sets)
        values = self._read(reader)
        _check(values, reader.origin)
        source = values.pop("source", self.name)
        if overrides:
            source += "+flags"
        return RankInfo(**values, source=source)

    def _read(self, r: _Reader) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class TorchrunAdapter(LauncherAdapter):
    """torchrun, ``torch.distributed.launch`` and anything that mimics them (our local launcher).

    ``LOCAL_WORLD_SIZE`` is optional because the legacy ``torch.distributed.launch`` does not set
    it; without it the whole world is taken to be on this node. ``GROUP_RANK`` (the node's index)
    becomes ``node`` when set.
    """

    name = "torchrun"
    who = "torchrun"
    markers = ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")
    sets = "RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT"

    def _read(self, r: _Reader) -> dict[str, Any]:
        rank = r.int("RANK", "rank")
        world_size = r.int("WORLD_SIZE", "world_size")
        local_rank = r.int("LOCAL_RANK", "local_rank")
        local_world_size = r.int("LOCAL_WORLD_SIZE", "local_world_size", required=False)
        if local_world_size is None:
            local_world_size = world_size
            r.origin["local_world_size"] = "WORLD_SIZE, as LOCAL_WORLD_SIZE is not set"
        values = dict(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            node=r.text("GROUP_RANK", required=False),
            master_addr=r.text("MASTER_ADDR", "master_addr"),
            master_port=r.int("MASTER_PORT", "master_port"),
        )
        if r.env.get("PCPP_LAUNCHER") == "local":
            values["source"] = "local"
        return values


class _MPIAdapter(LauncherAdapter):
    """An MPI launcher: four variables give the ranks, ``hostname_var`` (or SLURM's node name
    under ``srun``) the node, and the rendezvous is derived (:func:`_rendezvous`), as MPI
    launchers give none.

    Subclasses set ``rank_vars``: the variables of ``rank``, ``world_size``, ``local_rank`` and
    ``local_world_size``, in this order (also what the error messages say the launcher sets).
    """

    rank_vars: tuple[str, str, str, str] = ("", "", "", "")
    hostname_var: str = ""

    @property
    def sets(self) -> str:
        """The rank variables, named in error messages."""
        return ", ".join(self.rank_vars)

    def _read(self, r: _Reader) -> dict[str, Any]:
        values: dict[str, Any] = {
            field: r.int(var, field) for field, var in zip(_RANK_FIELDS, self.rank_vars)
        }
        values["node"] = _slurm_node(r) or r.text(self.hostname_var, required=False)
        return values | _rendezvous(r, values)


class OpenMPIAdapter(_MPIAdapter):
    """OpenMPI's ``mpirun``/``mpiexec`` (also what ``srun --mpi=pmix`` gives OpenMPI programs)."""

    name = "openmpi"
    who = "OpenMPI's mpirun"
    markers = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
    rank_vars = (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    )
    hostname_var = "PMIX_HOSTNAME"


class SlurmAdapter(LauncherAdapter):
    """Tasks started by ``srun`` (with or without ``--mpi=pmi2``/``pmix``).

    The node list is expanded with :func:`expand_hostlist`; its first host is the rendezvous
    address unless ``MASTER_ADDR`` is set. The local world size comes from
    ``SLURM_STEP_TASKS_PER_NODE`` (else ``SLURM_TASKS_PER_NODE``) at index ``SLURM_NODEID``; on one
    node it is the world size. ``node`` is ``SLURMD_NODENAME``, else the node list's entry at
    ``SLURM_NODEID``. The world size is ``SLURM_STEP_NUM_TASKS`` when set (the step's own task
    count), else ``SLURM_NTASKS``.

    Run the program through ``srun``: in the batch script itself SLURM describes the batch step
    (one process), not the tasks.
    """

    name = "slurm"
    who = "srun"
    markers = ("SLURM_PROCID",)
    sets = (
        "SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NODELIST, "
        "SLURM_STEP_TASKS_PER_NODE"
    )

    _NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    _TASKS_PER_NODE = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")

    def _read(self, r: _Reader) -> dict[str, Any]:
        rank = r.int("SLURM_PROCID", "rank")
        world_var = "SLURM_STEP_NUM_TASKS" if r.has("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
        world_size = r.int(world_var, "world_size")
        local_rank = r.int("SLURM_LOCALID", "local_rank")

        hosts: list[str] = []
        found = r.first(self._NODELISTS)
        if found is not None:
            hosts = _expand_var(*found)
        elif not r.has("MASTER_ADDR") and "master_addr" not in r.overrides:
            raise LaunchEnvironmentError(
                f"environment variable SLURM_STEP_NODELIST or SLURM_JOB_NODELIST expected "
                f"(srun sets {self.sets}), but not set; or set MASTER_ADDR"
            )
        node_id = r.int("SLURM_NODEID", required=False)

        local_world_size = r.override("local_world_size")
        if local_world_size is None:
            local_world_size = self._local_world_size(r, world_size, hosts, node_id)

        node = r.text("SLURMD_NODENAME", required=False)
        if node is None and node_id is not None and 0 <= node_id < len(hosts):
            node = hosts[node_id]
        elif node is None and node_id is not None:
            node = str(node_id)

        master_addr = r.text("MASTER_ADDR", "master_addr", required=False)
        if master_addr is None:  # then a node list was found, or we raised above
            master_addr = hosts[0]
            r.origin["master_addr"] = f"first host of {found[0]}"
        master_port = r.int("MASTER_PORT", "master_port", required=False)
        if master_port is None:
            master_port, r.origin["master_port"] = job_port(r.env)
        return dict(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            node=node,
            master_addr=master_addr,
            master_port=master_port,
        )

    def _local_world_size(
        self, r: _Reader, world_size: int, hosts: list[str], node_id: int | None
    ) -> int:
        if len(hosts) == 1:
            r.origin["local_world_size"] = "world size, as the node list has one host"
            return world_size
        found = r.first(self._TASKS_PER_NODE)
        if found is None:
            raise r.missing("SLURM_STEP_TASKS_PER_NODE")
        if node_id is None:
            raise r.missing("SLURM_NODEID")
        var, text = found
        try:
            counts = expand_tasks_per_node(text)
        except ValueError as error:
            raise LaunchEnvironmentError(f"environment variable {var}: {error}") from None
        if not 0 <= node_id < len(counts):
            raise LaunchEnvironmentError(
                f"SLURM_NODEID={node_id} has no entry in {var}={text!r} ({len(counts)} nodes)"
            )
        r.origin["local_world_size"] = f"{var}={text} at SLURM_NODEID={node_id}"
        return counts[node_id]


class PMIAdapter(_MPIAdapter):
    """MPICH's Hydra ``mpiexec`` and Intel MPI (PMI-1/PMI-2 process managers).

    ``MPI_LOCALRANKID``/``MPI_LOCALNRANKS`` are Hydra's; a bare PMI process manager without them
    (MPICH's ``mpiexec.gforker``, say) cannot be told apart from a multi-node one, so they are
    required. ``PMI_HOSTNAME`` becomes ``node``.
    """

    name = "pmi"
    who = "Hydra's mpiexec"
    markers = ("PMI_RANK",)
    rank_vars = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    hostname_var = "PMI_HOSTNAME"


TORCHRUN = TorchrunAdapter()
OPENMPI = OpenMPIAdapter()
SLURM = SlurmAdapter()
PMI = PMIAdapter()
ADAPTERS: tuple[LauncherAdapter, ...] = (TORCHRUN, OPENMPI, SLURM, PMI)
"""The environment adapters in the order :func:`discover` tries them (after explicit flags)."""


def _slurm_node(r: _Reader) -> str | None:
    return r.text("SLURMD_NODENAME", required=False)


def _rendezvous(r: _Reader, values: Mapping[str, Any]) -> dict[str, Any]:
    """``master_addr``/``master_port`` for MPI launchers, which give neither (module docstring)."""
    addr = r.text("MASTER_ADDR", "master_addr", required=False)
    if addr is None:
        found = r.first(SlurmAdapter._NODELISTS)
        if found is not None:
            addr = _expand_var(*found)[0]
            r.origin["master_addr"] = f"first host of {found[0]}"
        elif values["local_world_size"] == values["world_size"]:
            addr = _LOOPBACK  # every rank runs on this node
        else:
            addr = ""  # unknown: RankInfo.require_rendezvous says what to set
    port = r.int("MASTER_PORT", "master_port", required=False)
    if port is None:
        port, r.origin["master_port"] = job_port(r.env)
    return {"master_addr": addr, "master_port": port}


_JOB_ID_VARS = (
    "SLURM_JOB_ID",
    "SLURM_JOBID",
    "PMI_JOBID",
    "OMPI_MCA_ess_base_jobid",
    "PMIX_NAMESPACE",
)


def job_port(env: Mapping[str, str]) -> tuple[int, str]:
    """A rendezvous port every rank of one job derives alike, and how it was derived.

    ``29500 + job_id % 1000`` with the job id from the first of ``SLURM_JOB_ID``, ``SLURM_JOBID``,
    ``PMI_JOBID``, ``OMPI_MCA_ess_base_jobid``, ``PMIX_NAMESPACE`` that is set (a non-numeric id
    is hashed with CRC-32); 29500 when none is.

    >>> job_port({"SLURM_JOB_ID": "123456"})
    (29956, '29500 + SLURM_JOB_ID % 1000')
    """
    for var in _JOB_ID_VARS:
        value = env.get(var, "").strip()
        if value:
            number = int(value) if value.isdigit() else zlib.crc32(value.encode())
            return DEFAULT_PORT + number % PORT_SPAN, f"{DEFAULT_PORT} + {var} % {PORT_SPAN}"
    return DEFAULT_PORT, "default port, no job id in the environment"


def _expand_var(var: str, text: str) -> list[str]:
    try:
        hosts = expand_hostlist(text)
    except ValueError as error:
        raise LaunchEnvironmentError(f"environment variable {var}: {error}") from None
    if not hosts:
        raise LaunchEnvironmentError(f"environment variable {var}={text!r} names no host")
    return hosts


def _normalise_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(given) - set(OVERRIDE_FIELDS))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; known: {', '.join(OVERRIDE_FIELDS)}")
    for key, value in given.items():
        if key == "master_addr":
            if not isinstance(value, str) or not value.strip():
                raise LaunchEnvironmentError(f"{_flag(key)} must be a host name, got {value!r}")
            given[key] = value.strip()
            continue
        if isinstance(value, bool):
            raise LaunchEnvironmentError(f"{_flag(key)} must be an integer, got {value!r}")
        try:
            given[key] = int(value)
        except (TypeError, ValueError):
            raise LaunchEnvironmentError(
                f"{_flag(key)} must be an integer, got {value!r}"
            ) from None
    return given


def _from_flags(env: Mapping[str, str], flags: Mapping[str, Any]) -> RankInfo:
    """Ranks from explicit flags alone; the environment only fills the rendezvous.

    Without ``local_rank`` the ranks are taken to share one node (``local_rank = rank``); on
    several nodes pass it. Without ``master_addr`` and ``MASTER_ADDR``, a job of several ranks
    has no rendezvous address (``""``); a single rank gets ``127.0.0.1``.
    """
    values: dict[str, Any] = {
        "rank": flags["rank"],
        "world_size": flags["world_size"],
        "local_rank": flags.get("local_rank", flags["rank"]),
        "local_world_size": flags.get("local_world_size", flags["world_size"]),
        "node": None,
    }
    origin = {field: f"{_flag(field)} {flags[field]}" for field in flags}
    addr = flags.get("master_addr") or env.get("MASTER_ADDR", "").strip()
    values["master_addr"] = addr or (_LOOPBACK if flags["world_size"] == 1 else "")
    port = flags.get("master_port")
    if port is None:
        port = _Reader(env, {}, "the environment", "MASTER_ADDR, MASTER_PORT").int(
            "MASTER_PORT", "master_port", required=False
        )
    values["master_port"] = DEFAULT_PORT if port is None else port
    _check(values, origin)
    return RankInfo(**values, source="flags")


def discover(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> RankInfo:
    """This process's :class:`RankInfo`, from explicit flags and the launcher's environment.

    Args:
        env: the environment to read (default ``os.environ``).
        overrides: explicit flags, keys from :data:`OVERRIDE_FIELDS`; ``None`` values are
            ignored, so ``vars(args)``-style dicts of unset flags pass through. ``rank`` and
            ``world_size`` together replace the launcher entirely; other flags override single
            fields of what the launcher says.

    The order in which launchers are tried, and why, is in the module docstring.

    Raises:
        LaunchEnvironmentError: the environment or the flags are incomplete or inconsistent.
    """
    if env is None:
        import os

        env = os.environ
    flags = _normalise_overrides(overrides)
    if "rank" in flags and "world_size" in flags:
        return _from_flags(env, flags)
    adapter = _pick(env)
    if adapter is not None:
        return adapter(env, flags)
    for field in ("rank", "world_size"):
        if field in flags:
            other = "--world-size" if field == "rank" else "--rank"
            raise LaunchEnvironmentError(
                f"{_flag(field)} given without {other}, and no launcher variables to take "
                f"{other} from (checked {', '.join(a.name for a in ADAPTERS)})"
            )
    values: dict[str, Any] = dict(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        node=None,
        master_addr=_LOOPBACK,
        master_port=None,
    ) | {key: value for key, value in flags.items() if key in ("master_addr", "master_port")}
    if "local_rank" in flags or "local_world_size" in flags:
        values["local_rank"] = flags.get("local_rank", 0)
        values["local_world_size"] = flags.get("local_world_size", 1)
    _check(values, {field: f"{_flag(field)} {flags[field]}" for field in flags})
    return RankInfo(**values, source="single+flags" if flags else "single")


def _pick(env: Mapping[str, str]) -> LauncherAdapter | None:
    """The adapter for ``env``, in :data:`ADAPTERS` order, with the Hydra-under-SLURM exception."""
    if (
        SLURM.detect(env)
        and PMI.detect(env)
        and not TORCHRUN.detect(env)
        and not OPENMPI.detect(env)
    ):
        same_rank = env.get("SLURM_PROCID", "").strip() == env.get("PMI_RANK", "").strip()
        slurm_size = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "")
        same_size = slurm_size.strip() == env.get("PMI_SIZE", "").strip()
        if not (same_rank and same_size):
            return PMI  # Hydra's proxies were started by srun; SLURM_* describes them
    for adapter in ADAPTERS:
        if adapter.detect(env):
            return adapter
    return None


def select_device(info: RankInfo, prefer_cuda: bool = True) -> torch.device:
    """The device this rank computes on.

    ``cuda:{local_rank % device_count}`` when CUDA is available and preferred: the *local* rank,
    never the global one, which would name a GPU that does not exist on the second node. Several
    ranks share a GPU when a node runs more ranks than it has GPUs. Otherwise the CPU.
    """
    import torch

    if prefer_cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count > 0:
            return torch.device("cuda", info.local_rank % count)
    return torch.device("cpu")
