#!/usr/bin/env bash
# pcpp-runtime with mpirun on the machines of a hostfile (no SLURM needed).
#
# Copy this file and ./hostfile, then edit:
#   1. hostfile: your machines and their slots (ranks per machine, one per GPU);
#   2. NP: the total number of ranks (the sum of the slots);
#   3. MPIRUN and MPI4PY_LIBMPI, to run on the cluster's MPI rather than the MPICH that the
#      `mpich` pip package puts in the venv (see "Which MPI" below);
#   4. TRANSPORT and the generation arguments under "Run".
# Run with:  ./mpirun.sh         or, without editing:  NP=8 HOSTFILE=~/hosts TRANSPORT=zmq ./mpirun.sh
#
# Which MPI. mpi4py loads the MPI library named by MPI4PY_LIBMPI (a path or a file name, e.g.
# /opt/openmpi/lib/libmpi.so.40) and otherwise the first one it finds, which in a venv is the
# pip `mpich` package's. Use the mpirun that belongs to the library you pick: OpenMPI's mpirun
# cannot start MPICH programs and the other way round. `python -m mpi4py --mpi-library` (mpi4py 4)
# prints the library in use.
#
# OpenMPI notes (this script detects OpenMPI and adds what it needs):
#   --allow-run-as-root  OpenMPI refuses to start as root (typical in containers) without it;
#                        set ALLOW_RUN_AS_ROOT=1 to add it (or export OMPI_ALLOW_RUN_AS_ROOT=1
#                        and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1).
#   --oversubscribe      lets NP exceed the slots (a test on a small machine); set OVERSUBSCRIBE=1.
#   -x NAME              OpenMPI forwards only the variables named with -x to remote machines;
#                        MPICH and Intel MPI forward the whole environment.
#
# Ranks come from OMPI_COMM_WORLD_* (OpenMPI) or PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH,
# Intel MPI); the GPU is the local rank. For torch and zmq the rendezvous is MASTER_ADDR (the
# first host of the hostfile) and MASTER_PORT, exported below.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---- Machines and MPI (edit) ------------------------------------------------------------
HOSTFILE="${HOSTFILE:-$HERE/hostfile}"
NP="${NP:-4}"
MPIRUN="${MPIRUN:-mpirun}"                 # e.g. /opt/openmpi/bin/mpirun
# export MPI4PY_LIBMPI=/opt/openmpi/lib/libmpi.so.40
TRANSPORT="${TRANSPORT:-mpi}"              # mpi | zmq | torch
PCPP="${PCPP:-pcpp}"                       # the pcpp command on every machine (a full path is safest)

MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ { sub(/:.*/, "", $1); print $1; exit }' "$HOSTFILE")}"
MASTER_PORT="${MASTER_PORT:-29500}"
export MASTER_ADDR MASTER_PORT

# ---- Run (edit) ---------------------------------------------------------------------------
MODEL="${MODEL:-demo}"
PROMPT="${PROMPT:-a red circle at the top left and a blue square at the bottom}"
STEPS="${STEPS:-20}"
POLICY="${POLICY:-partial}"      # sync | full | partial | none
PORTION="${PORTION:-0.3}"        # used by --policy partial
OUTPUT="${OUTPUT:-out.png}"
REPORT="${REPORT:-report.json}"

# ---- mpirun flags for the MPI at hand -----------------------------------------------------
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi"; then
    MPI_FLAGS=(--hostfile "$HOSTFILE" -x PATH -x LD_LIBRARY_PATH -x MASTER_ADDR -x MASTER_PORT)
    if [[ -n "${MPI4PY_LIBMPI:-}" ]]; then MPI_FLAGS+=(-x MPI4PY_LIBMPI); fi
    if [[ -n "${OMP_NUM_THREADS:-}" ]]; then MPI_FLAGS+=(-x OMP_NUM_THREADS); fi
    if [[ -n "${ALLOW_RUN_AS_ROOT:-}" ]]; then MPI_FLAGS+=(--allow-run-as-root); fi
    if [[ -n "${OVERSUBSCRIBE:-}" ]]; then MPI_FLAGS+=(--oversubscribe); fi
else
    # MPICH's Hydra and Intel MPI: hostfile lines are "host:N", not "host slots=N".
    HYDRA_HOSTFILE="$(mktemp)"
    trap 'rm -f "$HYDRA_HOSTFILE"' EXIT
    awk '!/^[[:space:]]*(#|$)/ {
             host = $1; slots = ""
             for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { slots = substr($i, 7) }
             print (slots == "" ? host : host ":" slots)
         }' "$HOSTFILE" > "$HYDRA_HOSTFILE"
    MPI_FLAGS=(-f "$HYDRA_HOSTFILE")
fi

read -r -a PCPP_CMD <<< "$PCPP"
"$MPIRUN" -n "$NP" "${MPI_FLAGS[@]}" \
    "${PCPP_CMD[@]}" generate \
        --model "$MODEL" \
        --prompt "$PROMPT" \
        --steps "$STEPS" \
        --policy "$POLICY" --portion "$PORTION" \
        --transport "$TRANSPORT" \
        --output "$OUTPUT" \
        --report "$REPORT"
