#!/usr/bin/env bash
# pcpp-runtime with torchrun: one process per GPU on one or several machines.
#
# Copy this file, then edit:
#   1. NPROC_PER_NODE: processes (GPUs) on each machine;
#   2. for several machines: NNODES, MASTER_ADDR (the machine of node rank 0, reachable from all)
#      and MASTER_PORT; then run this script on every machine with its own NODE_RANK
#      (0 on the MASTER_ADDR machine, then 1, 2, ...);
#   3. TRANSPORT and the generation arguments under "Run".
# Run with:  ./torchrun.sh                                   (one machine)
#            NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 ./torchrun.sh   (on node01)
#            NNODES=2 NODE_RANK=1 MASTER_ADDR=node01 ./torchrun.sh   (on node02)
#
# torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for
# each process; pcpp reads them (the GPU is LOCAL_RANK). MASTER_PORT is then the port of
# torchrun's own rendezvous store, which torch.distributed joins; a transport that opens its own
# sockets (zmq) has to use another port.

set -euo pipefail

# ---- Machines (edit) ----------------------------------------------------------------------
NPROC_PER_NODE="${NPROC_PER_NODE:-4}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
TRANSPORT="${TRANSPORT:-torch}"            # torch | zmq | mpi (mpi needs mpirun: ./mpirun.sh)
PCPP="${PCPP:-pcpp}"                       # the pcpp command (a full path is safest)
TORCHRUN="${TORCHRUN:-torchrun}"

# ---- Run (edit) ---------------------------------------------------------------------------
MODEL="${MODEL:-demo}"
PROMPT="${PROMPT:-a red circle at the top left and a blue square at the bottom}"
STEPS="${STEPS:-20}"
POLICY="${POLICY:-partial}"      # sync | full | partial | none
PORTION="${PORTION:-0.3}"        # used by --policy partial
OUTPUT="${OUTPUT:-out.png}"
REPORT="${REPORT:-report.json}"

read -r -a PCPP_CMD <<< "$PCPP"
# --no-python: run the pcpp command itself rather than `python <script>`.
"$TORCHRUN" \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    --no-python \
    "${PCPP_CMD[@]}" generate \
        --model "$MODEL" \
        --prompt "$PROMPT" \
        --steps "$STEPS" \
        --policy "$POLICY" --portion "$PORTION" \
        --transport "$TRANSPORT" \
        --output "$OUTPUT" \
        --report "$REPORT"
