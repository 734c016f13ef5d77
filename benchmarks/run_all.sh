#!/bin/sh
# The runs behind docs/BENCHMARKS.md, in order (about an hour on a quiet 2-core machine; each
# point waits for the machine to be quiet first). Results land in $OUT/{grid,transports,throttled};
# copy the PNGs to docs/benchmarks/ and the tables into docs/BENCHMARKS.md.
#
#     sh benchmarks/run_all.sh [OUT]          (default out/bench; the throttled runs need root)
set -eu
OUT=${1:-out/bench}
PCPP=${PCPP:-.venv/bin/pcpp}

# 1. the grid: every policy, world sizes 1/2/4, latents 64 and 128, zmq
$PCPP bench --policies sync,full,partial:0.3,partial:0.1,none --worlds 1,2,4 --sizes 64,128 \
    --transports zmq --quiet-wait 900 --out "$OUT/grid"

# 2. the other process transports on the points with speed-up targets
$PCPP bench --policies full,partial:0.3 --worlds 2 --sizes 64,128 --transports torch,mpi \
    --quiet-wait 900 --out "$OUT/transports"

# 3. the throttled link: one rank per network namespace, veth pair without and with tc tbf
$PCPP bench --throttled-only --throttle veth,1gbit,100mbit --throttle-sizes 64,128 \
    --throttle-policies sync,full,partial:0.3,none --throttle-transports zmq \
    --quiet-wait 900 --out "$OUT/throttled"
$PCPP bench --throttled-only --throttle veth,100mbit --throttle-sizes 128 \
    --throttle-policies full,partial:0.3 --throttle-transports torch \
    --quiet-wait 900 --out "$OUT/throttled-torch"

# 4. the cost model, checked against the throttled runs, and its GPU predictions
$PCPP plan --from "$OUT/throttled/results.json" --bandwidth 10gbit,1gbit,100mbit,10mbit \
    --json "$OUT/plan-cpu.json"
$PCPP plan --from "$OUT/throttled-torch/results.json" --json "$OUT/plan-cpu-torch.json"
$PCPP plan --policies sync,full,partial:0.3,partial:0.1,none --json "$OUT/plan-gpu.json"
$PCPP plan --no-cfg-parallel --json "$OUT/plan-gpu-nocfg.json"
