#!/bin/sh
# The runs behind docs/BENCHMARKS.md (about two hours on a quiet 2-core machine: every point waits
# for the machine to be quiet first). Results land in $OUT/<step>/; copy the PNGs to
# docs/benchmarks/ and the tables into docs/BENCHMARKS.md.
#
#     sh benchmarks/run_all.sh [OUT [STEP...]]     (default out/bench, all steps; throttled: root)
#
# Steps: grid transports throttled plan targets profile
set -eu
OUT=${1:-out/bench}
[ $# -gt 0 ] && shift
STEPS=${*:-grid transports throttled plan targets profile}
PCPP=${PCPP:-.venv/bin/pcpp}
PY=${PY:-.venv/bin/python}
quiet() { $PY -c "from pcpp_runtime.bench.machine import wait_for_quiet as w; print('quiet:', w(max_wait_s=900).to_dict())"; }

for step in $STEPS; do
case $step in
grid)  # every policy, world sizes 1/2/4, latents 64 and 128, zmq
    $PCPP bench --policies sync,full,partial:0.3,partial:0.1,none --worlds 1,2,4 --sizes 64,128 \
        --transports zmq --quiet-wait 900 --out "$OUT/grid" ;;
transports)  # the other process transports on the points with speed-up targets
    $PCPP bench --policies full,partial:0.3 --worlds 2 --sizes 64,128 --transports torch,mpi \
        --quiet-wait 900 --out "$OUT/transports" ;;
throttled)  # one rank per network namespace, veth pair without and with tc tbf
    $PCPP bench --throttled-only --throttle veth,1gbit,100mbit --throttle-sizes 64,128 \
        --throttle-policies sync,full,partial:0.3,none --throttle-transports zmq \
        --quiet-wait 900 --out "$OUT/throttled"
    $PCPP bench --throttled-only --throttle veth,100mbit --throttle-sizes 128 \
        --throttle-policies full,partial:0.3 --throttle-transports torch \
        --quiet-wait 900 --out "$OUT/throttled-torch" ;;
plan)  # the cost model against the throttled runs, and its GPU predictions
    $PCPP plan --from "$OUT/throttled/results.json" --bandwidth 10gbit,1gbit,100mbit,10mbit \
        --json "$OUT/plan-cpu.json"
    $PCPP plan --from "$OUT/throttled-torch/results.json" --json "$OUT/plan-cpu-torch.json"
    $PCPP plan --policies sync,full,partial:0.3,partial:0.1,none --json "$OUT/plan-gpu.json"
    $PCPP plan --no-cfg-parallel --json "$OUT/plan-gpu-nocfg.json"
    $PCPP plan --fixed-ms 5 --json "$OUT/plan-gpu-fixed5ms.json" ;;
targets)  # the speed-up target points again: three alternating one-worker / N-worker runs each
    $PCPP bench --policies full,partial:0.3 --worlds 2 --sizes 64,128 --transports zmq,mpi --repeats 3 \
        --quiet-wait 900 --out "$OUT/targets"
    $PCPP bench --throttled-only --throttle 100mbit --throttle-sizes 128 --throttle-policies full,partial:0.3 \
        --throttle-transports zmq --repeats 3 --quiet-wait 900 --out "$OUT/throttled-targets" ;;
profile)  # where the time goes: compute of a strip alone, and py-spy over one worker and two
    quiet; $PY benchmarks/strip_compute.py | tee "$OUT/strip_compute.md"
    quiet; $PY benchmarks/profile_point.py --latent 64 --policy partial --out "$OUT/profile-64"
    quiet; $PY benchmarks/profile_point.py --latent 128 --policy partial --out "$OUT/profile-128"
    quiet; $PY benchmarks/exchange_times.py --latent 128 --policy full | tee "$OUT/exchange-times-128-full.txt" ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
done
