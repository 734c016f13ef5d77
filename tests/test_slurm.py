"""The project's sbatch templates, submitted for real to a throw-away two-node SLURM cluster.

Each template is copied and only what its header says to edit is changed, by exact textual
substitution (a template that drifts from these lines fails here rather than testing something
else): the ``#SBATCH`` lines (tasks per node, no GPUs on this cluster, one CPU per task, a short
time limit), the "Environment" section (this venv's ``activate``) and the "Run" section (tiny-sd,
4 steps, ``--policy sync``, 32x32 px, ``--compare``, the image and report names). ``TRANSPORT`` is
given with ``sbatch --export=ALL,TRANSPORT=...``, as the multi-node header says. The simulated
nodes ``n1``, ``n2`` do not resolve, so jobs get ``MASTER_ADDR=127.0.0.1`` (and a free
``MASTER_PORT``) from the environment, as both templates allow.

* ``single_node.sbatch``: 1 node x 2 tasks over ``torch`` (gloo);
* ``multi_node.sbatch``: ``-N 2``, 2 tasks per node (4 ranks) over ``mpi`` (``srun --mpi=pmi2``,
  mpi4py over the MPICH wheel) and over ``zmq``.

Each job must exit 0 and rank 0 must write one worker's image (within one gray level) and a report
saying the world size, the transport and the policy, with ``max_abs_diff`` <= 1e-4.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pcpp_runtime.launch as launch
from launch_jobs import HEIGHT, PROMPT, STEPS, WIDTH, check_job, descendants, job_env, tail
from slurm_fixture import slurm_cluster  # noqa: F401 - a fixture

TEMPLATES = Path(launch.__file__).resolve().parent / "slurm"
VENV = Path(sys.prefix)
JOB_TIMEOUT_S = 150


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the template no longer has exactly one line {old!r}"
    return text.replace(old, new)


def prepare(template: str, folder: Path, tasks_per_node: int) -> Path:
    """A copy of ``template`` with the edits its header asks for, in ``folder``."""
    text = (TEMPLATES / template).read_text()
    # 1. the #SBATCH lines: tasks per node; no GPUs here (the header pairs them with the tasks)
    text = edit(text, "#SBATCH --ntasks-per-node=4\n", f"#SBATCH --ntasks-per-node={tasks_per_node}\n")
    text = edit(text, "#SBATCH --gpus-per-node=4\n", "")
    text = edit(text, "#SBATCH --cpus-per-task=8\n", "#SBATCH --cpus-per-task=1\n")
    text = edit(text, "#SBATCH --time=00:30:00\n", "#SBATCH --time=00:05:00\n")
    # 2. Environment: this venv
    text = edit(text, '# source "$HOME/pcpp-runtime/.venv/bin/activate"\n', f'source "{VENV}/bin/activate"\n')
    if template == "multi_node.sbatch":
        # pip's mpich under srun --mpi=pmi2, as the header says: over UCX, MPI_Init failed in 2
        # of 3 jobs here ("mpi/pmi2: value not properly terminated"), over ofi in none of 6
        text = edit(text, "# export MPIR_CVAR_CH4_NETMOD=ofi ", "export MPIR_CVAR_CH4_NETMOD=ofi   ")
    # 3. Run: the generation arguments
    text = edit(text, 'PROMPT="${PROMPT:-a red circle at the top left and a blue square at the bottom}"',
                f'PROMPT="${{PROMPT:-{PROMPT}}}"')
    text = edit(text, 'STEPS="${STEPS:-20}"', f'STEPS="${{STEPS:-{STEPS}}}"')
    text = edit(text, 'POLICY="${POLICY:-partial}"', 'POLICY="${POLICY:-sync}"')
    text = edit(text, 'OUTPUT="${OUTPUT:-out-${SLURM_JOB_ID}.png}"', 'OUTPUT="${OUTPUT:-o.png}"')
    text = edit(text, 'REPORT="${REPORT:-report-${SLURM_JOB_ID}.json}"', 'REPORT="${REPORT:-r.json}"')
    text = edit(text, '        --steps "$STEPS" \\\n',
                f'        --steps "$STEPS" --height {HEIGHT} --width {WIDTH} --compare --timeout 60 \\\n')
    text = edit(text, 'MODEL="${MODEL:-demo}"', 'MODEL="${MODEL:-tiny-sd}"')
    script = folder / template
    script.write_text(text)
    return script


def submit(cluster, script: Path, *sbatch_args: str, **export: str) -> subprocess.CompletedProcess:
    """``sbatch --wait`` from the script's folder; on timeout cancel the job and fail."""
    folder = script.parent
    env = cluster.env(**job_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch.free_port()), **export))
    argv = ["sbatch", "--wait", "--parsable", *sbatch_args, str(script.name)]
    proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", "pcpp"], env=env, capture_output=True, timeout=10)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        pytest.fail(f"{script.name} ran past {JOB_TIMEOUT_S} s; job output:\n{job_output(folder)}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def job_output(folder: Path) -> str:
    outs = sorted(folder.glob("pcpp-*.out"))  # --output=%x-%j.out
    return "\n".join(f"--- {p.name}\n{tail(p, 60)}" for p in outs) or "(no pcpp-*.out)"


def check(cluster, folder: Path, done: subprocess.CompletedProcess, transport: str, world: int) -> dict:
    assert done.returncode == 0, (f"sbatch exited {done.returncode}: {done.stderr}\n{job_output(folder)}"
                                  f"\n{cluster.logs('slurmctld')}")
    outs = list(folder.glob("pcpp-*.out"))
    assert len(outs) == 1, outs  # the template's --output=%x-%j.out, in the submission folder
    report = check_job(folder, transport=transport, world_size=world, log=outs[0])
    return report


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid}: (gone)"


@pytest.fixture
def no_leftover_tasks(slurm_cluster):  # noqa: F811
    """After each job: no job left in the queue, and no process under us but the daemons."""
    yield
    deadline = time.monotonic() + 10
    while slurm_cluster.job_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not slurm_cluster.job_ids(), "a job is still in the queue"
    daemons = slurm_cluster.daemon_pids()  # and their helpers (slurmctld's slurmscriptd)
    daemons |= {pid for daemon in list(daemons) for pid in descendants(daemon)}
    extra = set(descendants(os.getpid())) - daemons
    assert not extra, f"processes left under the test: {[cmdline(pid) for pid in extra]}"


@pytest.mark.timeout(200)
def test_single_node_sbatch_torch(slurm_cluster, one_worker_png, tmp_path, no_leftover_tasks):  # noqa: F811
    script = prepare("single_node.sbatch", tmp_path, tasks_per_node=2)
    done = submit(slurm_cluster, script)
    check(slurm_cluster, tmp_path, done, transport="torch", world=2)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("transport", ["mpi", "zmq"])
def test_multi_node_sbatch(transport, slurm_cluster, one_worker_png, tmp_path, no_leftover_tasks):  # noqa: F811
    script = prepare("multi_node.sbatch", tmp_path, tasks_per_node=2)
    done = submit(slurm_cluster, script, "-N", "2", "--export", f"ALL,TRANSPORT={transport}")
    check(slurm_cluster, tmp_path, done, transport=transport, world=4)
    log = next(tmp_path.glob("pcpp-*.out")).read_text(errors="replace")
    assert f"pcpp: 2 nodes, 4 ranks, transport {transport}" in log, log[-2000:]
    # --label: lines of both nodes' ranks; rank 0 wrote the summary
    assert "0:   report: r.json" in log, log[-2000:]
