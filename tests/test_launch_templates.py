"""The sbatch, mpirun and torchrun templates: valid bash, the right command, ranks as intended.

Each template runs for real with ``pcpp`` replaced by a stub that prints what discovery makes of
its environment: the sbatch scripts under a fake ``srun``/``scontrol`` (2 nodes x 2 tasks),
``mpirun.sh`` under the MPICH Hydra of the venv, ``torchrun.sh`` under the venv's torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pcpp_runtime.launch as launch

pytestmark = pytest.mark.timeout(60)

LAUNCH = Path(launch.__file__).resolve().parent
ROOT = LAUNCH.parent
TEMPLATES = [
    LAUNCH / "slurm" / "single_node.sbatch",
    LAUNCH / "slurm" / "multi_node.sbatch",
    LAUNCH / "examples" / "mpirun.sh",
    LAUNCH / "examples" / "torchrun.sh",
]
GENERATE_FLAGS = [
    "--model",
    "--prompt",
    "--steps",
    "--policy",
    "--portion",
    "--transport",
    "--output",
    "--report",
]

# prints "<rank> <world> <local> <local world> <addr> <port> <source> <node> | <transport>"
STUB = """
import sys
sys.path.insert(0, sys.argv[1])
from launch.discovery import discover
i = discover()
args = sys.argv[2:]
assert args[0] == "generate", args
fields = (i.rank, i.world_size, i.local_rank, i.local_world_size, i.master_addr, i.master_port,
          i.source, i.node, "|", args[args.index("--transport") + 1])
sys.stdout.write(" ".join(map(str, fields)) + "\\n")  # one write: the ranks share one pipe
sys.stdout.flush()
"""

FAKE_SRUN = """#!/usr/bin/env bash
# 2 nodes x 2 tasks of "$@", with the variables srun sets; prints its own flags to stderr
while [[ "$1" == --* ]]; do echo "srun flag $1" >&2; shift; done
pids=()
for t in 0 1 2 3; do
  SLURM_PROCID=$t SLURM_LOCALID=$((t % 2)) SLURM_NODEID=$((t / 2)) SLURMD_NODENAME=node0$((t / 2 + 1)) \\
  SLURM_STEP_NODELIST="node[01-02]" SLURM_STEP_TASKS_PER_NODE="2(x2)" SLURM_STEP_NUM_TASKS=4 \\
  SLURM_NTASKS=4 "$@" & pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""

FAKE_SCONTROL = f"""#!/usr/bin/env bash
# scontrol show hostnames LIST
exec {sys.executable} -c 'import sys; sys.path.insert(0, sys.argv[1]); from launch.hostlist import expand_hostlist; print("\\n".join(expand_hostlist(sys.argv[2])))' {ROOT} "$3"
"""


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def stub_bin(tmp_path: Path) -> Path:
    """A bin folder with a ``pcpp`` stub, and a fake ``srun`` and ``scontrol``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (tmp_path / "stub.py").write_text(STUB)
    write_exe(
        folder / "pcpp",
        f'#!/usr/bin/env bash\nexec {sys.executable} {tmp_path / "stub.py"} {ROOT} "$@"\n',
    )
    write_exe(folder / "srun", FAKE_SRUN)
    write_exe(folder / "scontrol", FAKE_SCONTROL)
    return folder


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without launcher variables, plus ``extra``."""
    prefixes = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_",
        "MASTER_",
        "OMPI_",
        "PMI_",
        "MPI_LOCAL",
        "SLURM",
        "TORCHELASTIC",
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    return env | extra


def run(template: Path, stub_bin: Path, cwd: Path, *, code: int = 0, **env: str) -> subprocess.CompletedProcess:
    """``bash template`` with the stubs first on PATH and ``env`` added to :func:`clean_env`'s;
    it must exit with ``code``."""
    env = clean_env(PATH=f"{stub_bin}:{os.environ['PATH']}", **env)
    done = subprocess.run(["bash", str(template)], env=env, cwd=cwd, capture_output=True, text=True, timeout=50)
    assert done.returncode == code, f"exit code {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def ranks(stdout: str) -> list[str]:
    return sorted(line for line in stdout.splitlines() if "|" in line)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_template_is_valid_bash_with_an_edit_header(template: Path):
    done = subprocess.run(["bash", "-n", str(template)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    text = template.read_text()
    assert "Copy this file" in text and "then edit" in text
    assert "pcpp" in text and " generate" in text
    for flag in GENERATE_FLAGS:
        assert flag in text, flag


def test_hostfile_example():
    lines = [
        line
        for line in (LAUNCH / "examples" / "hostfile").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines and all("slots=" in line for line in lines)


@pytest.mark.parametrize(
    ("script", "transport"),
    [
        ("single_node", "torch"),
        ("multi_node", "torch"),
        ("multi_node", "zmq"),
        ("multi_node", "mpi"),
    ],
)
def test_sbatch_templates_under_fake_srun(
    stub_bin: Path, tmp_path: Path, script: str, transport: str
):
    slurm = dict(SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2", SLURM_NTASKS="4")
    done = run(LAUNCH / "slurm" / f"{script}.sbatch", stub_bin, tmp_path, **slurm, SLURM_CPUS_PER_TASK="2",
               TRANSPORT=transport)
    want = "torch" if script == "single_node" else transport
    assert ranks(done.stdout) == [
        f"{rank} 4 {rank % 2} 2 node01 29956 slurm node0{rank // 2 + 1} | {want}"
        for rank in range(4)
    ]
    assert "srun flag --kill-on-bad-exit=1" in done.stderr
    assert ("srun flag --mpi=pmi2" in done.stderr) == (want == "mpi")


def test_multi_node_sbatch_rejects_an_unknown_transport(stub_bin: Path, tmp_path: Path):
    slurm = dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", SLURM_NTASKS="1")
    done = run(LAUNCH / "slurm" / "multi_node.sbatch", stub_bin, tmp_path, code=2, **slurm, TRANSPORT="carrier-pigeon")
    assert "TRANSPORT must be torch, zmq or mpi" in done.stderr


def test_mpirun_example_under_hydra(mpiexec: str, stub_bin: Path, tmp_path: Path):
    mpirun = Path(mpiexec).with_name("mpirun")  # the mpich wheel installs both
    version = subprocess.run([str(mpirun), "--version"], capture_output=True, text=True, timeout=10)
    assert "HYDRA" in version.stdout + version.stderr, (
        f"{mpirun} is not MPICH's Hydra: pip install -e '.[test]' installs it (the mpich wheel)\n"
        f"{version.stdout}{version.stderr}"
    )
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# one machine\nlocalhost slots=2\n")
    done = run(LAUNCH / "examples" / "mpirun.sh", stub_bin, tmp_path, MPIRUN=str(mpirun), HOSTFILE=str(hostfile),
               NP="2", TRANSPORT="zmq")
    node = ranks(done.stdout)[0].split()[7]  # Hydra's PMI_HOSTNAME: this machine's name
    assert ranks(done.stdout) == [
        f"{rank} 2 {rank} 2 localhost 29500 pmi {node} | zmq" for rank in range(2)
    ]


def test_torchrun_example(torchrun: Path, stub_bin: Path, tmp_path: Path):
    port = str(launch.free_port())
    done = run(LAUNCH / "examples" / "torchrun.sh", stub_bin, tmp_path, TORCHRUN=str(torchrun), NPROC_PER_NODE="2",
               MASTER_PORT=port, TRANSPORT="torch")
    assert ranks(done.stdout) == [
        f"{rank} 2 {rank} 2 127.0.0.1 {port} torchrun 0 | torch" for rank in range(2)
    ]
