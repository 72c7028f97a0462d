#!/bin/sh
# The GPU checks of issue #14 in one go, for a GPU machine held briefly (`make benchmark-gpu`):
#   1. the CUDA tests (pytest -m gpu), among them the CUDA-graph step against the eager one;
#   2. the classic loop vs mnistlab on full MNIST, every arch (benchmarks/compare_loops.py),
#      with params.yaml's settings (train.cuda_graph: true);
#   3. the whole pipeline over every arch on full MNIST, as `make run` runs it
#      (python -m mnistlab.repro --jobs $JOBS, default 6: one worker per arch), timed and split
#      (benchmarks/pipeline.py);
#   4. step 3 with every stage a fresh interpreter (--no-stage-server): what the stage server
#      (src/mnistlab/stageserver.py) saves, on the same machine;
#   5. step 2 with train.cuda_graph: false (the eager step, on the same machine, for the graph's
#      own effect; last, so a short lease drops it first).
# (train.compile: reduce-overhead is not run: on an H200 it did not repay its compile time in
# one epoch, loops-cuda-compile-reduce-overhead-partial.json; `compare_loops.py --compile` runs it.)
# Each step has its own time limit and log, and a failing step does not stop the next, so
# one short lease yields every number it can. Results go to benchmarks/results/ (or $1),
# logs to $LOGS (default: the results folder).
#   MNIST=<folder of the four MNIST files>  (default ../shared/datasets/mnist)
#   PYTHON=<interpreter with mnistlab's requirements>  (default: python)
#   DEADLINE=<epoch seconds>  no step runs past it (a lease's end); each step's own limit is
#     TESTS_LIMIT, LOOPS_LIMIT, PIPELINE_LIMIT, EAGER_LIMIT (seconds)
#   TESTS_ARGS, LOOPS_ARGS, PIPELINE_ARGS: extra arguments of steps 1, 2 and 5, and 3 and 4
#   STEPS=<names>  the steps to run, in this script's order (default: all of
#     cuda-tests loops pipeline pipeline-fresh loops-no-graph)
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
    case " ${STEPS:-cuda-tests loops pipeline pipeline-fresh loops-no-graph} " in
        *" $name "*) ;;
        *) return ;;
    esac
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
step cuda-tests "${TESTS_LIMIT:-150}" "$py" -m pytest -q -p no:cacheprovider -m gpu ${TESTS_ARGS:-} tests
step loops "${LOOPS_LIMIT:-150}" "$py" benchmarks/compare_loops.py --data "$mnist" --out "$out" ${LOOPS_ARGS:-}
# pipeline.py stops its run itself (--timeout) so that it still reports the stages done
plimit=$(clamp "${PIPELINE_LIMIT:-200}")
step pipeline "$plimit" "$py" benchmarks/pipeline.py --data "$mnist" --out "$out" --jobs "${JOBS:-6}" \
    --timeout $(( plimit > 60 ? plimit - 20 : plimit / 2 )) ${PIPELINE_ARGS:-}
plimit=$(clamp "${PIPELINE_LIMIT:-200}")
step pipeline-fresh "$plimit" "$py" benchmarks/pipeline.py --data "$mnist" --out "$out" --jobs "${JOBS:-6}" \
    --timeout $(( plimit > 60 ? plimit - 20 : plimit / 2 )) --no-stage-server ${PIPELINE_ARGS:-}
step loops-no-graph "${EAGER_LIMIT:-150}" "$py" benchmarks/compare_loops.py --data "$mnist" --out "$out" \
    --cuda-graph false ${LOOPS_ARGS:-}
exit $status
