#!/bin/sh
# The GPU checks of issue #14 in one go, for a GPU machine held briefly (`make benchmark-gpu`):
#   1. the CUDA tests (pytest -m gpu);
#   2. the classic loop vs mnistlab on full MNIST, every arch (benchmarks/compare_loops.py);
#   3. one `dvc repro` over every arch on full MNIST, timed and split (benchmarks/pipeline.py);
#   4. step 2 again with train.compile: reduce-overhead (CUDA graphs; compile time counted).
# Each step has its own time limit and log, and a failing step does not stop the next, so
# one short lease yields every number it can. Results go to benchmarks/results/ (or $1),
# logs to $LOGS (default: the results folder).
#   MNIST=<folder of the four MNIST files>  (default ../shared/datasets/mnist)
#   PYTHON=<interpreter with mnistlab's requirements>  (default: python)
#   DEADLINE=<epoch seconds>  no step runs past it (a lease's end); each step's own limit is
#     TESTS_LIMIT, LOOPS_LIMIT, PIPELINE_LIMIT, COMPILED_LIMIT (seconds)
set -u
out=${1:-benchmarks/results}
logs=${LOGS:-$out}
py=${PYTHON:-python}
mnist=${MNIST:-../shared/datasets/mnist}
mkdir -p "$out" "$logs"
export PYTHONUNBUFFERED=1
status=0

clamp() {  # clamp SECONDS: SECONDS, or the time left before $DEADLINE if that is less
    left=$(( ${DEADLINE:-0} - $(date +%s) ))  # one clock reading: compared and returned alike
    if [ -n "${DEADLINE:-}" ] && [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log to $logs/NAME.log
    name=$1 limit=$(clamp "$2")
    shift 2
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped (deadline)"; status=1; return; fi
    echo "== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start ))s"
    tail -n 25 "$logs/$name.log"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
step cuda-tests "${TESTS_LIMIT:-240}" "$py" -m pytest -q -p no:cacheprovider -m gpu tests
step loops "${LOOPS_LIMIT:-180}" "$py" benchmarks/compare_loops.py --data "$mnist" --out "$out" ${LOOPS_ARGS:-}
# pipeline.py stops dvc repro itself (--timeout) so that it still reports the stages done
plimit=$(clamp "${PIPELINE_LIMIT:-300}")
step pipeline "$plimit" "$py" benchmarks/pipeline.py --data "$mnist" --out "$out" \
    --timeout $(( plimit > 60 ? plimit - 30 : plimit / 2 )) ${PIPELINE_ARGS:-}
step loops-compiled "${COMPILED_LIMIT:-240}" "$py" benchmarks/compare_loops.py --data "$mnist" --out "$out" \
    --compile reduce-overhead ${LOOPS_ARGS:-}
exit $status
