#!/usr/bin/env bash
# One device call: build with CUDA, the GPU tests, the demo in CUDA mode, then the benches, each step
# bounded so that the whole fits one 10-minute command. Logs go to $OUT (at most 8 files come back).
# Run from this checkout's root on the GPU machine: ./scripts/gpu_check.sh [steps...]
# Steps (default all): build tests demo pipeline transfer
set -u
OUT=${OUT:-/tmp/kvbm-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# kvbm is built in place here, not installed: the bench scripts import this checkout's.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${BUDGET:-570}          # seconds for every step together
steps=${*:-build tests demo pipeline transfer}
left() { echo $(( BUDGET - SECONDS )); }

step() {  # step NAME MAX_SECONDS CMD...: runs CMD with the smaller of MAX_SECONDS and what is left
    local name=$1 max=$2; shift 2
    local t; t=$(left); (( t > max )) && t=$max
    if (( t < 20 )); then echo "=== $name: skipped, ${t}s left"; return 1; fi
    echo "=== $name (limit ${t}s): $*"
    local t0=$SECONDS
    timeout "$t" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $(( SECONDS - t0 ))s"
    tail -n "${TAILN:-8}" "$OUT/$name.log"
    return $rc
}

{
    nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,clocks.sm,temperature.gpu --format=csv
    python3 -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    nvcc --version | tail -2
    nproc; free -g | head -2; df -h /dev/shm | tail -1
} >"$OUT/build.log" 2>&1

for s in $steps; do
    case $s in
        build)
            rm -rf build kvbm/_fast/*.so kvbm/_fast/*.cpp
            step build 240 python3 setup.py build_ext --inplace
            grep -q "native library = CUDA" "$OUT/build.log" || { echo "=== build is not CUDA: stop"; exit 1; }
            # SASS for each arch and PTX of the highest, so newer GPUs JIT the kernels.
            cuobjdump --list-elf --list-ptx kvbm/_fast/native*.so >>"$OUT/build.log" 2>&1 \
                && grep -E "ELF file|PTX file" "$OUT/build.log" | sed 's/^/    /' ;;
        tests)
            TAILN=25 step tests 330 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu tests/unit/test_copy.py ;;
        demo)
            step demo 90 python3 -m kvbm.demo ;;
        pipeline)
            TAILN=20 step pipeline 300 python3 bench/bench_pipeline.py --markdown --total-mib 4096 --latency-n 500 --batches 1,64,256 ;;
        transfer)
            TAILN=30 step transfer 120 python3 bench/bench_transfer.py --sizes 16K,1M --only kernel@8,dma,staged,auto --out "$OUT" ;;
    esac
done
echo "=== all steps done in ${SECONDS}s"
