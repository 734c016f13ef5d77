"""Rank discovery: every launcher adapter against recorded environments, their errors, precedence.

The environments below are copied from real launches (torchrun 2.13 and MPICH 5 Hydra on this
machine) or from the launchers' documentation (OpenMPI 4.1, SLURM 23), trimmed to the
variables that matter plus some noise.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pcpp_runtime.launch import discovery
from pcpp_runtime.launch.discovery import (
    OPENMPI,
    PMI,
    SLURM,
    TORCHRUN,
    LaunchEnvironmentError,
    RankInfo,
    discover,
    expand_hostlist,
    expand_tasks_per_node,
    job_port,
    select_device,
)

pytestmark = pytest.mark.timeout(20)

NOISE = {"PATH": "/usr/bin:/bin", "HOME": "/home/user", "LANG": "C.UTF-8"}

# torchrun --nproc-per-node 2 (recorded), worker 1
TORCHRUN_ENV = NOISE | {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "localhost",
    "MASTER_PORT": "38799",
    "GROUP_RANK": "0",
    "ROLE_RANK": "1",
    "TORCHELASTIC_RUN_ID": "8752f06e-0bc7-4d93-b598-db9fed95443c",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
}

# torchrun --nnodes 2 --nproc-per-node 4, second node, worker 5
TORCHRUN_2NODES_ENV = NOISE | {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29500",
}

# mpirun -n 4 --hostfile (2 hosts x 2 slots), OpenMPI 4.1, rank 3
OPENMPI_ENV = NOISE | {
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_UNIVERSE_SIZE": "4",
    "OMPI_MCA_ess_base_jobid": "2389639169",
    "OMPI_MCA_orte_hnp_uri": "2389639168.0;tcp://10.0.0.1:40155",
    "PMIX_NAMESPACE": "2389639169",
    "PMIX_RANK": "3",
}

# mpiexec -n 2 (MPICH 5.0.2 Hydra, recorded), rank 1
HYDRA_ENV = NOISE | {
    "PMI_RANK": "1",
    "PMI_SIZE": "2",
    "PMI_FD": "9",
    "PMI_HOSTNAME": "vm",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "2",
    "HYDI_CONTROL_FD": "7",
}

# srun -N 4 --ntasks-per-node 2 in a job on node[01-03,07], task 5 (second task of node03)
SLURM_ENV = NOISE | {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_NPROCS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_STEP_NODELIST": "node[01-03,07]",
    "SLURM_JOB_NODELIST": "node[01-03,07]",
    "SLURM_NODELIST": "node[01-03,07]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
    "SLURM_TASKS_PER_NODE": "2(x4)",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NUM_NODES": "4",
    "SLURM_NNODES": "4",
    "SLURMD_NODENAME": "node03",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOBID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_CPUS_PER_TASK": "8",
}

# the same task under `srun --mpi=pmi2`: SLURM's PMI2 plugin adds these
SLURM_PMI2_ENV = SLURM_ENV | {
    "PMI_RANK": "5",
    "PMI_SIZE": "8",
    "PMI_FD": "12",
    "PMI_JOBID": "4242.0",
}

# `mpiexec -n 8` (Hydra) inside a 2-node allocation: Hydra starts one proxy per node with srun,
# so SLURM_* describe proxy 1 of 2; rank 5 is local rank 1 of 4 on node02
HYDRA_IN_SLURM_ENV = NOISE | {
    "PMI_RANK": "5",
    "PMI_SIZE": "8",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "4",
    "PMI_FD": "9",
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURMD_NODENAME": "node02",
    "SLURM_JOB_ID": "5150",
}


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {key: value for key, value in env.items() if key not in names}


# ---- one launcher at a time -------------------------------------------------------------------


def test_no_launcher_is_a_single_process():
    info = discover(NOISE)
    assert info == RankInfo(0, 1, 0, 1, None, "127.0.0.1", None, "single")
    assert info.is_single


def test_torchrun():
    info = discover(TORCHRUN_ENV)
    assert info == RankInfo(1, 2, 1, 2, "0", "localhost", 38799, "torchrun")
    assert info.require_rendezvous() == ("localhost", 38799)
    assert TORCHRUN(TORCHRUN_ENV) == info


def test_torchrun_second_node():
    info = discover(TORCHRUN_2NODES_ENV)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert info.node == "1"
    assert (
        info.describe() == "rank 5/8 (local 1/4 on node 1) from torchrun, rendezvous node01:29500"
    )


def test_openmpi_on_two_hosts():
    info = discover(OPENMPI_ENV)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert info.source == "openmpi"
    assert info.master_addr == ""  # OpenMPI does not say where rank 0 runs
    assert info.master_port == 29500 + 2389639169 % 1000
    with pytest.raises(LaunchEnvironmentError, match="MASTER_ADDR.*--master-addr"):
        info.require_rendezvous()


def test_openmpi_with_master_addr_and_port():
    info = discover(OPENMPI_ENV | {"MASTER_ADDR": "head", "MASTER_PORT": "31000"})
    assert info.require_rendezvous() == ("head", 31000)


def test_hydra():
    info = discover(HYDRA_ENV)
    assert info == RankInfo(1, 2, 1, 2, "vm", "127.0.0.1", 29500, "pmi")
    assert PMI(HYDRA_ENV) == info


def test_slurm():
    info = discover(SLURM_ENV)
    assert info == RankInfo(5, 8, 1, 2, "node03", "node01", 29500 + 4242 % 1000, "slurm")
    assert SLURM(SLURM_ENV) == info


def test_slurm_master_addr_and_port_from_environment_win():
    info = discover(SLURM_ENV | {"MASTER_ADDR": "node01-ib", "MASTER_PORT": "12345"})
    assert info.require_rendezvous() == ("node01-ib", 12345)


def test_srun_mpi_pmi2_reads_as_slurm():
    assert discover(SLURM_PMI2_ENV) == discover(SLURM_ENV)


# An environment a launcher sets in a particular way -> the fields discover() must read from it.
READS = {
    "torchrun_without_local_world_size_assumes_one_node": (
        without(TORCHRUN_ENV, "LOCAL_WORLD_SIZE"), dict(world_size=2, local_world_size=2)),
    "local_launcher_variables_read_as_local": (TORCHRUN_ENV | {"PCPP_LAUNCHER": "local"}, dict(source="local")),
    "openmpi_on_one_host_rendezvous_on_loopback": (
        OPENMPI_ENV | {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, dict(master_addr="127.0.0.1")),
    # mpirun in an sbatch script: its daemons were started by srun, one per node
    "openmpi_inside_slurm_allocation_uses_first_host_and_job_id": (
        OPENMPI_ENV | {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                       "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "777", "SLURMD_NODENAME": "gpu02"},
        dict(source="openmpi", rank=3, world_size=4, local_rank=1, master_addr="gpu01", master_port=29500 + 777,
             node="gpu02")),
    "slurm_node_name_from_node_list_when_slurmd_nodename_missing": (
        without(SLURM_ENV, "SLURMD_NODENAME") | {"SLURM_PROCID": "7", "SLURM_NODEID": "3"}, dict(node="node07")),
    "slurm_uses_job_node_list_when_no_step_node_list": (
        without(SLURM_ENV, "SLURM_STEP_NODELIST") | {"SLURM_JOB_NODELIST": "gpu[5-8]"}, dict(master_addr="gpu5")),
    "slurm_uneven_tasks_per_node": (
        SLURM_ENV | {"SLURM_NTASKS": "7", "SLURM_STEP_NUM_TASKS": "7", "SLURM_PROCID": "6", "SLURM_LOCALID": "0",
                     "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"},
        dict(rank=6, world_size=7, local_rank=0, local_world_size=1)),
    "slurm_single_node_needs_no_tasks_per_node": (
        {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2", "SLURM_JOB_NODELIST": "gpu7"},
        dict(local_world_size=4, master_addr="gpu7", master_port=29500)),
    "hydra_inside_slurm_allocation_reads_as_pmi": (
        HYDRA_IN_SLURM_ENV,
        dict(source="pmi", rank=5, world_size=8, local_rank=1, local_world_size=4, master_addr="node01",
             master_port=29500 + 5150 % 1000, node="node02")),
}


@pytest.mark.parametrize(("env", "fields"), READS.values(), ids=list(READS))
def test_discover_reads(env, fields):
    info = discover(env)
    assert {name: getattr(info, name) for name in fields} == fields


# ---- precedence ---------------------------------------------------------------------------------


def test_torchrun_inside_srun_reads_as_torchrun():
    # srun starts one torchrun per node; torchrun's workers are the ranks
    env = SLURM_ENV | TORCHRUN_2NODES_ENV
    assert discover(env).source == "torchrun"
    assert discover(env).rank == 5


def test_torchrun_beats_openmpi_and_pmi():
    assert discover(OPENMPI_ENV | HYDRA_ENV | TORCHRUN_ENV).source == "torchrun"


def test_openmpi_beats_slurm_and_pmi():
    assert discover(SLURM_PMI2_ENV | OPENMPI_ENV).source == "openmpi"


def test_slurm_beats_pmi_when_they_agree():
    assert discover(SLURM_PMI2_ENV).source == "slurm"


def test_explicit_flags_beat_every_launcher():
    env = SLURM_PMI2_ENV | OPENMPI_ENV | TORCHRUN_ENV
    info = discover(env, {"rank": 2, "world_size": 3, "master_addr": "h0", "master_port": 4000})
    assert info == RankInfo(2, 3, 2, 3, None, "h0", 4000, "flags")


def test_explicit_flags_ignore_a_broken_environment():
    info = discover({"RANK": "x"}, {"rank": 0, "world_size": 2, "master_addr": "h0"})
    assert (info.rank, info.world_size, info.source) == (0, 2, "flags")


def test_explicit_flags_take_the_rendezvous_from_the_environment():
    info = discover({"MASTER_ADDR": "h1", "MASTER_PORT": "4100"}, {"rank": 1, "world_size": 2})
    assert info.require_rendezvous() == ("h1", 4100)


def test_explicit_flags_without_an_address_say_what_to_pass():
    info = discover({}, {"rank": 1, "world_size": 2})
    assert (info.master_addr, info.master_port) == ("", 29500)
    with pytest.raises(LaunchEnvironmentError, match="--master-addr"):
        info.require_rendezvous()
    assert discover({}, {"rank": 0, "world_size": 1}).master_addr == "127.0.0.1"


def test_explicit_local_rank():
    info = discover({}, {"rank": 5, "world_size": 8, "local_rank": 1, "local_world_size": 4})
    assert (info.local_rank, info.local_world_size) == (1, 4)


def test_partial_flags_override_single_fields_of_the_launcher():
    info = discover(SLURM_ENV, {"master_port": 31337, "rank": None, "world_size": None})
    assert (info.rank, info.master_addr, info.master_port) == (5, "node01", 31337)
    assert info.source == "slurm+flags"


def test_partial_flags_stand_in_for_missing_variables():
    env = without(TORCHRUN_ENV, "MASTER_ADDR", "MASTER_PORT")
    info = discover(env, {"master_addr": "h2", "master_port": "4200"})
    assert info.require_rendezvous() == ("h2", 4200)


def test_partial_flags_without_a_launcher():
    assert discover({}, {"master_port": 4300}).master_port == 4300
    with pytest.raises(LaunchEnvironmentError, match="--rank given without --world-size"):
        discover({}, {"rank": 1})
    with pytest.raises(LaunchEnvironmentError, match="--world-size given without --rank"):
        discover({}, {"world_size": 2})


def test_flag_errors():
    with pytest.raises(ValueError, match="unknown override"):
        discover({}, {"ranks": 1})
    with pytest.raises(LaunchEnvironmentError, match="--world-size must be an integer"):
        discover({}, {"rank": 0, "world_size": "two"})
    with pytest.raises(
        LaunchEnvironmentError, match=r"rank 3 \(--rank 3\).*world size 2 \(--world-size 2\)"
    ):
        discover({}, {"rank": 3, "world_size": 2})
    with pytest.raises(LaunchEnvironmentError, match="--master-addr must be a host name"):
        discover({}, {"rank": 0, "world_size": 2, "master_addr": " "})
    with pytest.raises(LaunchEnvironmentError, match="master port"):
        discover({}, {"rank": 0, "world_size": 2, "master_port": 70000})


def test_discover_reads_os_environ_by_default(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith(("RANK", "WORLD_SIZE", "OMPI_", "SLURM_", "PMI_", "MASTER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "1")
    monkeypatch.setenv("MPI_LOCALRANKID", "0")
    monkeypatch.setenv("MPI_LOCALNRANKS", "1")
    assert discover().source == "pmi"


# ---- errors for missing and bad variables -----------------------------------------------------

REQUIRED = [
    (TORCHRUN, TORCHRUN_ENV, "RANK"),
    (TORCHRUN, TORCHRUN_ENV, "WORLD_SIZE"),
    (TORCHRUN, TORCHRUN_ENV, "LOCAL_RANK"),
    (TORCHRUN, TORCHRUN_ENV, "MASTER_ADDR"),
    (TORCHRUN, TORCHRUN_ENV, "MASTER_PORT"),
    (OPENMPI, OPENMPI_ENV, "OMPI_COMM_WORLD_RANK"),
    (OPENMPI, OPENMPI_ENV, "OMPI_COMM_WORLD_SIZE"),
    (OPENMPI, OPENMPI_ENV, "OMPI_COMM_WORLD_LOCAL_RANK"),
    (OPENMPI, OPENMPI_ENV, "OMPI_COMM_WORLD_LOCAL_SIZE"),
    (SLURM, SLURM_ENV, "SLURM_PROCID"),
    (SLURM, without(SLURM_ENV, "SLURM_STEP_NUM_TASKS"), "SLURM_NTASKS"),
    (SLURM, SLURM_ENV, "SLURM_LOCALID"),
    (SLURM, without(SLURM_ENV, "SLURM_TASKS_PER_NODE"), "SLURM_STEP_TASKS_PER_NODE"),
    (SLURM, SLURM_ENV, "SLURM_NODEID"),
    (PMI, HYDRA_ENV, "PMI_RANK"),
    (PMI, HYDRA_ENV, "PMI_SIZE"),
    (PMI, HYDRA_ENV, "MPI_LOCALRANKID"),
    (PMI, HYDRA_ENV, "MPI_LOCALNRANKS"),
]


@pytest.mark.parametrize(
    ("adapter", "env", "name"), REQUIRED, ids=[name for _, _, name in REQUIRED]
)
def test_missing_variable_is_named(adapter, env, name):
    broken = without(env, name)
    with pytest.raises(
        LaunchEnvironmentError, match=rf"environment variable {name} expected \(.*\), but not set"
    ) as caught:
        adapter(broken)
    assert isinstance(caught.value, ValueError)
    if adapter.detect(broken):  # still recognisable: discover says the same
        with pytest.raises(LaunchEnvironmentError, match=rf"environment variable {name} expected"):
            discover(broken)


def test_missing_variable_message_reads_like_torch():
    with pytest.raises(LaunchEnvironmentError) as caught:
        discover(without(TORCHRUN_ENV, "WORLD_SIZE"))
    assert str(caught.value) == (
        "environment variable WORLD_SIZE expected (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, "
        "LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), but not set"
    )


def test_missing_slurm_node_list():
    env = without(SLURM_ENV, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    with pytest.raises(
        LaunchEnvironmentError,
        match="SLURM_STEP_NODELIST or SLURM_JOB_NODELIST expected.*MASTER_ADDR",
    ):
        discover(env)
    assert discover(env | {"MASTER_ADDR": "node01"}).master_addr == "node01"


def test_empty_variable():
    with pytest.raises(LaunchEnvironmentError, match="LOCAL_RANK expected .*but it is empty"):
        discover(TORCHRUN_ENV | {"LOCAL_RANK": ""})


@pytest.mark.parametrize(
    ("env", "name"),
    [
        (TORCHRUN_ENV | {"RANK": "one"}, "RANK"),
        (TORCHRUN_ENV | {"MASTER_PORT": "29500a"}, "MASTER_PORT"),
        (OPENMPI_ENV | {"OMPI_COMM_WORLD_SIZE": "4.0"}, "OMPI_COMM_WORLD_SIZE"),
        (SLURM_ENV | {"SLURM_LOCALID": "x"}, "SLURM_LOCALID"),
        (HYDRA_ENV | {"PMI_SIZE": ""}, "PMI_SIZE"),
    ],
)
def test_non_integer_variable(env, name):
    with pytest.raises(LaunchEnvironmentError, match=name):
        discover(env)


@pytest.mark.parametrize(
    ("env", "pattern"),
    [
        (
            TORCHRUN_ENV | {"RANK": "2"},
            r"rank 2 \(RANK=2\) must be in \[0, world size 2 \(WORLD_SIZE=2\)\)",
        ),
        (TORCHRUN_ENV | {"RANK": "-1"}, r"rank -1 \(RANK=-1\)"),
        (
            TORCHRUN_ENV | {"WORLD_SIZE": "0", "RANK": "0"},
            r"world size 0 \(WORLD_SIZE=0\) must be at least 1",
        ),
        (TORCHRUN_ENV | {"LOCAL_RANK": "2"}, r"local rank 2 \(LOCAL_RANK=2\)"),
        (TORCHRUN_ENV | {"LOCAL_WORLD_SIZE": "3"}, r"local world size 3 \(LOCAL_WORLD_SIZE=3\)"),
        (TORCHRUN_ENV | {"MASTER_PORT": "70000"}, r"master port 70000 \(MASTER_PORT=70000\)"),
        (
            OPENMPI_ENV | {"OMPI_COMM_WORLD_RANK": "4"},
            r"OMPI_COMM_WORLD_RANK=4.*OMPI_COMM_WORLD_SIZE=4",
        ),
        (SLURM_ENV | {"SLURM_PROCID": "8"}, r"SLURM_PROCID=8.*SLURM_STEP_NUM_TASKS=8"),
        (HYDRA_ENV | {"MPI_LOCALRANKID": "2"}, r"MPI_LOCALRANKID=2.*MPI_LOCALNRANKS=2"),
        (
            SLURM_ENV | {"SLURM_NODEID": "4"},
            r"SLURM_NODEID=4 has no entry in SLURM_STEP_TASKS_PER_NODE",
        ),
        (SLURM_ENV | {"SLURM_STEP_NODELIST": "node[01-03"}, r"SLURM_STEP_NODELIST: unmatched '\['"),
        (
            SLURM_ENV | {"SLURM_STEP_TASKS_PER_NODE": "2(4)"},
            r"SLURM_STEP_TASKS_PER_NODE: bad tasks-per-node",
        ),
    ],
)
def test_inconsistent_environment(env, pattern):
    with pytest.raises(LaunchEnvironmentError, match=pattern):
        discover(env)


def test_rank_info_checks_itself():
    with pytest.raises(LaunchEnvironmentError, match="rank 4 must be in"):
        RankInfo(4, 4, 0, 1, None, "h", 1, "test")
    with pytest.raises(LaunchEnvironmentError, match="must be an integer"):
        RankInfo("0", 4, 0, 1, None, "h", 1, "test")  # type: ignore[arg-type]
    info = RankInfo(0, 1, 0, 1, None, "h", None, "test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rank = 1  # type: ignore[misc]
    assert info.require_rendezvous() == ("h", 29500)


# ---- host lists and ports -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        (
            "node[01-03,07],gpu5,a[1-2]-ib",
            ["node01", "node02", "node03", "node07", "gpu5", "a1-ib", "a2-ib"],
        ),
        ("gpu5", ["gpu5"]),
        ("a,b, c", ["a", "b", "c"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[007]", ["n007"]),
        ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
        ("x[1,3-4]y,z[2]", ["x1y", "x3y", "x4y", "z2"]),
        ("", []),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    "hostlist", ["n[1-2", "n1-2]", "n[[1]]", "n[3-1]", "n[a-b]", "n[1-]", "n[]"]
)
def test_expand_hostlist_rejects_malformed(hostlist):
    with pytest.raises(ValueError):
        expand_hostlist(hostlist)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(y3)")


def test_job_port_is_deterministic_per_job():
    assert job_port({"SLURM_JOB_ID": "123456"}) == (29956, "29500 + SLURM_JOB_ID % 1000")
    assert job_port({}) == (29500, "default port, no job id in the environment")
    port, how = job_port({"PMIX_NAMESPACE": "prterun-host-1234@1"})
    assert 29500 <= port < 30500 and "PMIX_NAMESPACE" in how
    assert port == job_port({"PMIX_NAMESPACE": "prterun-host-1234@1"})[0]
    assert job_port(SLURM_PMI2_ENV)[0] == job_port(SLURM_ENV)[0]


# ---- devices --------------------------------------------------------------------------------------


def test_select_device_on_cpu():
    info = discover(SLURM_ENV)
    assert select_device(info, prefer_cuda=False).type == "cpu"
    import torch

    if not torch.cuda.is_available():
        assert select_device(info).type == "cpu"


def test_select_device_uses_the_local_rank(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    info = discover(SLURM_ENV)  # global rank 5, local rank 1
    assert select_device(info) == torch.device("cuda", 1)
    assert select_device(dataclasses.replace(info, local_rank=0)) == torch.device("cuda", 0)
    assert select_device(info, prefer_cuda=False) == torch.device("cpu")
    # more ranks on a node than GPUs: they share
    three = RankInfo(3, 4, 3, 4, None, "h", 1, "test")
    assert select_device(three) == torch.device("cuda", 1)


def test_launch_package_does_not_import_torch():
    root = Path(discovery.__file__).resolve().parent.parent
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import launch; "
        "launch.discover({}); assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=15
    )
    assert done.returncode == 0, done.stderr


def test_torch_transport_refuses_more_ranks_than_gpus_on_a_node(monkeypatch):
    """NCCL runs one rank per GPU: two local ranks on one GPU are refused before NCCL starts."""
    import torch

    from pcpp_runtime.connect import TransportSettings, open_transport
    from pcpp_runtime.launch import RankInfo

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    info = RankInfo(rank=1, world_size=2, local_rank=1, local_world_size=2, node=None,
                    master_addr="127.0.0.1", master_port=29500, source="flags")
    with pytest.raises(ValueError, match="2 ranks on 1 GPU.*zmq or mpi"):
        open_transport("torch", info, 5.0, "hash", TransportSettings(device="cuda:0"))
