#!/usr/bin/env bash
# The checks only a GPU can do, in one run (docs/BENCHMARKS.md, section "GPU"):
#
#   bash benchmarks/gpu_check.sh [SECTION...]     SECTION: info strip tests bandwidth (default: all four)
#
# info       nvidia-smi, versions, the MPI library and whether it is CUDA-aware
# strip      benchmarks/gpu_strip_compute.py: SDXL's UNet, fp16, 1024x1024, one strip of N = 1, 2, 4, 8
#            (on a machine without CUDA: the tiny model on the CPU, a dry run)
# tests      pytest -m gpu (tests/test_gpu.py, tests/transports/test_transport_gpu.py): NCCL at world
#            size 1, two processes sharing the GPU over zmq, mpi and torch (gloo), the engine on CUDA
# bandwidth  device-buffer ping-pong between two processes on the GPU (zmq, mpi, torch/gloo)
#
# Output goes to $OUT (set by the device tool) or out/gpu_check: log, info.txt, gpu_strip.json,
# gpu_tests.jsonl, pytest.xml. Without CUDA the GPU tests skip. Python packages the machine lacks
# can be carried as wheels in .whl/ (installed with --prefix /tmp/site; mpich's libmpi and mpiexec
# come from there).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
SECTIONS=${*:-info strip tests bandwidth}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1  # no cwd on sys.path: the installed package wins
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}  # one machine
status=0
note() { echo "=== $(date +%T) $*"; }

# ------------------------------------------------------------------ carried wheels and the package
if [ "$PY" = python3 ] && ls .whl/*.whl >/dev/null 2>&1; then  # not into a local .venv
    note "installing carried wheels: $(cd .whl && echo *.whl)"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/site .whl/*.whl || status=1
    site=$(ls -d /tmp/site/lib/python3*/site-packages 2>/dev/null | head -1)
    [ -n "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    [ -d /tmp/site/bin ] && export PATH="/tmp/site/bin:$PATH"
    [ -e /tmp/site/lib/libmpi.so.12 ] && export MPI4PY_LIBMPI=/tmp/site/lib/libmpi.so.12 \
        LD_LIBRARY_PATH="/tmp/site/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ! $PY -c "import pcpp_runtime.transports, pcpp_runtime.models, pcpp_runtime.launch" 2>/dev/null; then
    # the source tree as the installed package (pyproject maps the top-level folders into it)
    note "pcpp_runtime is not installed: using a copy of the tree in /tmp/pcpp-pkg"
    rm -rf /tmp/pcpp-pkg && mkdir -p /tmp/pcpp-pkg
    cp -r pcpp_runtime /tmp/pcpp-pkg/
    for sub in transports models launch; do cp -r "$sub" "/tmp/pcpp-pkg/pcpp_runtime/$sub"; done
    export PYTHONPATH="/tmp/pcpp-pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

for section in $SECTIONS; do
    case $section in
    info)
        note "info"
        {
            nvidia-smi 2>&1 || echo "no nvidia-smi"
            $PY - <<'EOF'
import importlib, shutil, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, p.total_memory // 2**20, "MiB", p.multi_processor_count, "SMs",
          "nccl", torch.cuda.nccl.version())
for name in ("diffusers", "transformers", "zmq", "msgpack", "mpi4py", "pytest", "xdist"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), m.__file__)
    except Exception as exc:
        print(name, "MISSING", exc)
print("mpiexec", shutil.which("mpiexec"))
try:
    from mpi4py import MPI
    print("MPI", MPI.Get_library_version().splitlines()[0], "cuda-aware:",
          MPI.Query_cuda_support() if hasattr(MPI, "Query_cuda_support") else "unknown")
except Exception as exc:
    print("MPI unavailable:", exc)
EOF
        } 2>&1 | tee "$OUT/info.txt"
        ;;
    strip)
        note "strip compute"
        if [ "$HAS_CUDA" = 1 ]; then
            timeout 170 $PY benchmarks/gpu_strip_compute.py --out "$OUT/gpu_strip.json" || status=1
        else
            timeout 600 $PY benchmarks/gpu_strip_compute.py --model tiny --latent 32 --repeats 2 --warmup 1 \
                --steps 6 --warmup-steps 2 --out "$OUT/gpu_strip.json" || status=1
        fi
        ;;
    tests | bandwidth)
        note "pytest -m gpu ($section)"
        export PCPP_TEST_MODEL_CACHE=/tmp/pcpp-test-models PCPP_GPU_RESULTS="$OUT"
        PCPP_MODEL_CACHE=$PCPP_TEST_MODEL_CACHE $PY -c "from pcpp_runtime.models.builtin import builtin_model_path as b; b('tiny-sd')"
        args=(-m gpu -v -rA -p no:cacheprovider)
        if [ "$section" = tests ]; then
            args+=(-k "not bandwidth" --junitxml "$OUT/pytest.xml")
            $PY -c "import xdist" 2>/dev/null && [ "$HAS_CUDA" = 1 ] && args+=(-n 4)
            limit=220
        else
            args+=(-k bandwidth --junitxml "$OUT/pytest_bandwidth.xml")
            limit=90
        fi
        timeout $limit $PY -m pytest "${args[@]}" tests || status=1
        ;;
    *)
        echo "unknown section $section (info strip tests bandwidth)"
        status=2
        ;;
    esac
done
note "done, status $status"
exit $status
