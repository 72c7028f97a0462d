# Every dvc.yaml stage command starts here, so it runs with the project's Python
# however DVC was started (`make run`, `.venv/bin/dvc repro` without activating the
# venv, an activated venv, `dvc exp run`, `--temp`, the queue):
#
#   sh stages/run.sh python stages/split.py --dataset digits ...
#   sh stages/run.sh torchrun --standalone --nproc_per_node 2 stages/train.py ...
#
# (the word after run.sh is train.launcher for the train stage, `python` for the rest).
# The interpreter is the first of these that can import mnistlab:
#   1. $MNISTLAB_PYTHON, when set (then nothing else is tried);
#   2. $VIRTUAL_ENV/bin/python: an activated venv;
#   3. .venv/bin/python beside this dvc.yaml (what `make setup` makes);
#   4. python, then python3, on PATH: how the CI copies (build/ci/<name>/, no .venv
#      of their own) find the venv that `make` puts first on PATH;
#   5. .venv/bin/python beside an enclosing dvc.yaml: `dvc exp run --temp` and the
#      queue run in .dvc/tmp/exps/<tmp>/ of the repo, with no .venv and maybe a bare PATH.
# A leading `python`/`python3` word becomes that interpreter, and its bin folder goes
# first on PATH, as in an activated venv, so `torchrun` and whatever the stage starts
# come from the same environment. None of them imports mnistlab: one `error:` line
# naming what was tried and the fix, exit 2, no traceback.
#
# Run with `sh`, not executed: no exec bit to lose in an archive. POSIX sh builtins
# only (no dirname), so it works with any PATH. Deliberately no dep of any stage:
# which interpreter runs a stage is not an input of its results.

case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
root=$(CDPATH='' cd -- "$here/.." && pwd) || exit 2
[ $# -gt 0 ] || { echo "usage: sh stages/run.sh python|LAUNCHER stages/<name>.py [ARGS...]" >&2; exit 2; }
tried=""
py=""

candidate() {  # candidate PYTHON [LABEL]: take PYTHON if it imports mnistlab
    [ -n "$py" ] && return
    case ", $tried, " in *", $1$2, "*) return ;; esac  # already tried
    tried="${tried:+$tried, }$1$2"
    [ -x "$1" ] && "$1" -c "import mnistlab" >/dev/null 2>&1 && py=$1
}

if [ -n "${MNISTLAB_PYTHON:-}" ]; then
    case $MNISTLAB_PYTHON in
        */*) candidate "$MNISTLAB_PYTHON" " (MNISTLAB_PYTHON)" ;;
        *) candidate "$(command -v "$MNISTLAB_PYTHON" || echo "$MNISTLAB_PYTHON")" " (MNISTLAB_PYTHON)" ;;
    esac
else
    [ -n "${VIRTUAL_ENV:-}" ] && candidate "$VIRTUAL_ENV/bin/python"
    [ -x "$root/.venv/bin/python" ] && candidate "$root/.venv/bin/python"
    for name in python python3; do
        found=$(command -v "$name") && candidate "$found"
    done
    dir=${root%/*}
    while [ -z "$py" ] && [ -n "$dir" ]; do
        [ -f "$dir/dvc.yaml" ] && [ -x "$dir/.venv/bin/python" ] && candidate "$dir/.venv/bin/python"
        dir=${dir%/*}
    done
fi

if [ -z "$py" ]; then
    problem="cannot import mnistlab with $tried"
    [ -n "$tried" ] || problem="no Python found (no venv, none on PATH)"
    echo "error: $problem: run 'make setup' or activate .venv" >&2
    exit 2
fi
case $1 in
    python | python3)
        shift
        # Through the stage server when make run, the CI gate or the tests started one
        # (src/mnistlab/stageserver.py); that client runs `$py SCRIPT ARGS` itself otherwise.
        if [ -n "${MNISTLAB_STAGE_SERVER:-}" ]; then
            set -- "$py" -m mnistlab.stageserver run "$@"
        else
            set -- "$py" "$@"
        fi ;;
esac
PATH="${py%/*}:$PATH"
export PATH
exec "$@"
