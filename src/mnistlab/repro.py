"""``make run``: ``dvc repro`` with the pipeline's independent parts on parallel workers.

::

    python -m mnistlab.repro              # one worker per usable core
    python -m mnistlab.repro --jobs 1     # exactly `dvc repro`

Why: ``dvc repro`` runs one stage at a time, and on the digits quickstart most of a stage is
single-threaded start-up, not training: the interpreter, torch, MLflow and its store, DVC's
lock file (benchmarks/results/pipeline-cpu-digits.md: 63 % of the wall time). One stage at a
time leaves the second core of a 2-core machine idle for most of the run.

How: DVC names every stage of a ``foreach``/``matrix`` ``<group>@<key>``. The stages that share
a key form a *chain* (``download@digits`` -> ``split@digits``; ``train@digits-mlp-1234`` ->
``evaluate@digits-mlp-1234`` -> ``features@digits-mlp-1234``), run in DVC's order by one
``dvc repro --single-item`` process. A chain starts once every chain that its stages depend on
has finished, on the next idle worker, in DVC's own stage order. That is safe because DVC holds
its repository lock only around a stage's bookkeeping, not while the stage's command runs (the
"manually parallel" ``dvc repro`` its per-path read/write locks exist for), ``--wait-for-lock``
makes a worker wait for that lock rather than fail, and chains never write the same path. What
no chain holds (``compare``, which reads every chain's results) runs last, in the foreground
(``dvc repro --single-item compare``), so its output, ending with compare's pointers, is what
the user sees last. The lock file and the
results are the ones ``dvc repro`` writes: ``dvc status`` is clean afterwards.

Threads: a stage's torch thread count changes its weights' last bits (threads.py), so a count
that depended on which stages happened to overlap would make reruns differ. Each worker's
stages get ``cores // workers`` threads (``OMP_NUM_THREADS``, unless already set; an explicit
``train.threads`` still wins), the same on every run on the same machine; so does compare.

Every stage forks from a stage server started here (:mod:`mnistlab.stageserver`) with the
stages' environment, instead of importing torch, MLflow and the rest afresh.

A chain's output goes to ``<logs>/<key>.log``; the terminal gets one line as each chain starts
and ends and, when it is a terminal, under those one live line per running chain: its train
stage's progress bar (epoch, ETA, running loss, validation accuracy; the stages draw it into the
log when ``MNISTLAB_PROGRESS=always``, which is set for them then) or else its latest line. When
a chain fails, no new one starts, the running ones finish, and the command exits 2 naming the
chain, its log and the error lines in it. Ctrl-C stops every worker.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import graphlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from mnistlab import stageserver, tracking
from mnistlab.config import (
    PROGRESS_ENV,
    CompareSettings,
    DownloadSettings,
    EvaluateSettings,
    FeatureSettings,
    TrainSettings,
    load_params,
    seed_of,
)
from mnistlab.errors import MnistlabError, run_script
from mnistlab.threads import usable_cores

LOGS = Path("build/run")
# What the stages and DVC print when something goes wrong: shown when a chain fails.
ERROR_PREFIXES = ("error:", "ERROR:", "Traceback")


@dataclasses.dataclass(frozen=True)
class Chain:
    """Stages sharing one foreach/matrix key, in DVC's order, and the chains they wait for."""

    key: str
    stages: tuple[str, ...]
    needs: frozenset[str]


def key_of(stage: str) -> str | None:
    """``train@digits-mlp-1234`` -> ``digits-mlp-1234``; None for a stage outside any foreach/matrix."""
    name = stage.rpartition(":")[2]  # sub/dvc.yaml:train@x names a stage of another dvc.yaml
    return name.partition("@")[2] or None


def plan(order: Sequence[str], edges: Iterable[tuple[str, str]]) -> tuple[list[Chain], list[str]]:
    """The chains of a pipeline, and the stages left to run after every chain, in the foreground.

    ``order``: every stage, dependencies first (DVC's order); ``edges``: ``(stage, upstream)``
    pairs. A stage outside any foreach/matrix is a chain of its own when some chain needs it
    (a shared ``prepare`` stage upstream of every ``train@...``), and otherwise left to the end.
    Chains that would wait on each other give no chains: every stage is left to the end. Pure.
    """
    ups: dict[str, set[str]] = {s: set() for s in order}
    downs: dict[str, set[str]] = {s: set() for s in order}
    for stage, upstream in edges:
        ups[stage].add(upstream)
        downs[upstream].add(stage)
    keyed = {s for s in order if key_of(s)}
    feeds_keyed: set[str] = set()  # unkeyed stages upstream of some keyed stage
    for s in reversed(order):
        if s not in keyed and any(d in keyed or d in feeds_keyed for d in downs[s]):
            feeds_keyed.add(s)
    group = {s: key_of(s) or s for s in keyed | feeds_keyed}
    members: dict[str, list[str]] = {}
    for s in order:
        if s in group:
            members.setdefault(group[s], []).append(s)
    chains = [Chain(key, tuple(stages),
                    frozenset(group[u] for s in stages for u in ups[s] if group[u] != key))
              for key, stages in members.items()]
    try:  # acyclic stages can still make chains that wait on each other (a per-dataset
        # summary@d after train@d-a, which needs split@d): then DVC alone, one stage at a time
        graphlib.TopologicalSorter({c.key: c.needs for c in chains}).prepare()
    except graphlib.CycleError:
        return [], list(order)
    return chains, [s for s in order if s not in group]


@dataclasses.dataclass
class Running:
    chain: Chain
    proc: subprocess.Popen
    log: Path
    started: float


def error_lines(log: Path, limit: int = 5) -> list[str]:
    """The lines of a failed chain's log worth showing: its error lines, else its last lines."""
    try:
        lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []
    errors = [line for line in lines if line.lstrip().startswith(ERROR_PREFIXES)]
    return (errors or lines)[-limit:]


def last_status(log: Path, tail: int = 4096) -> str:
    """What a running chain shows last: its progress bar's latest state (tqdm redraws it
    after a carriage return), or else its last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    parts = [p.strip() for p in text.replace("\r", "\n").split("\n")]
    return next((p for p in reversed(parts) if p), "")


class Display:
    """The terminal during a parallel run: event lines, and on a terminal, under them, one
    live line per running chain (its bar or last line), redrawn in place."""

    def __init__(self, out: TextIO, live: bool, every: float = 0.5):
        self.out, self.live, self.every = out, live, every
        self.drawn, self.last = 0, 0.0

    def event(self, line: str) -> None:
        self.clear()
        print(line, file=self.out, flush=True)

    def status(self, running: Sequence[Running]) -> None:
        if not self.live or time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        width = shutil.get_terminal_size().columns - 1
        lines = []
        for r in running:
            status = last_status(r.log)
            status = status.removeprefix(f"{r.chain.key}:").lstrip()  # the bar's own label
            lines.append(f"  {r.chain.key} ({time.monotonic() - r.started:.0f} s): {status}"[:width])
        self.clear()
        self.out.write("".join(f"{line}\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)

    def clear(self) -> None:
        """Erase the live lines: up to the first of them, then to the end of the screen."""
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.out.flush()
            self.drawn = 0


def stages_ran(log: Path) -> int:
    """How many stages DVC says it ran (the others were up to date)."""
    try:
        return log.read_text(errors="replace").count("Running stage '")
    except OSError:
        return 0


def schedule(chains: Sequence[Chain], jobs: int, start: Callable[[Chain], Running],
             say: Callable[[str], None], poll: float = 0.2, grace: float = 15.0,
             tick: Callable[[Sequence[Running]], None] | None = None) -> list[str]:
    """Run ``chains`` on ``jobs`` workers, each when the chains it needs have succeeded.

    ``start`` launches one chain. Returns the keys of the chains that failed (empty: all ran).
    After a failure nothing new starts; the running chains finish. Ready chains start in
    ``chains``' order. Interrupted (Ctrl-C, a stop signal), it stops the workers (:func:`stop`,
    ``grace`` seconds a step) and re-raises. ``tick``, if given, sees the running chains at
    every poll (the live display).
    """
    t0 = time.monotonic()
    pending = list(chains)
    running: list[Running] = []
    done: set[str] = set()
    failed: list[str] = []
    try:
        while pending or running:
            while not failed and len(running) < jobs:
                ready = next((c for c in pending if c.needs <= done), None)
                if ready is None:
                    break
                pending.remove(ready)
                running.append(start(ready))
                say(f"[{time.monotonic() - t0:6.1f} s] {ready.key}: {', '.join(ready.stages)}")
            if not running:
                break  # after a failure: what is pending never starts
            time.sleep(poll)
            if tick is not None:
                tick(running)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                took = time.monotonic() - r.started
                if r.proc.returncode == 0:
                    done.add(r.chain.key)
                    ran = stages_ran(r.log)
                    say(f"[{time.monotonic() - t0:6.1f} s] {r.chain.key} done in {took:.1f} s "
                        f"({ran} ran, {len(r.chain.stages) - ran} up to date)")
                else:
                    failed.append(r.chain.key)
                    say(f"[{time.monotonic() - t0:6.1f} s] {r.chain.key} FAILED (exit {r.proc.returncode}) "
                        f"after {took:.1f} s; its log: {r.log}")
                    for line in error_lines(r.log):
                        say(f"    {line}")
    except BaseException:
        stop(running, grace)
        raise
    return failed


def stop(running: Sequence[Running], grace: float) -> None:
    """Stop the workers: Ctrl-C, then SIGTERM, then SIGKILL to what outlives ``grace`` seconds.

    Ctrl-C or a stop signal reached this process only (each worker has a process group of its
    own). SIGINT to a worker's group is the Ctrl-C of a foreground `dvc repro`: the stage stops
    cleanly, a train stage resumable from its checkpoint. But a process started with SIGINT
    ignored (a background job of a non-interactive shell, as CI scripts start them) ignores it
    too, so what is still running after ``grace`` gets SIGTERM (the stages' own clean stop),
    and then SIGKILL: this command never hangs on a worker.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        alive = [r for r in running if r.proc.poll() is None]
        for r in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, sig)
        deadline = time.monotonic() + grace
        for r in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(max(0.0, deadline - time.monotonic()))


def read_pipeline(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every stage of the repository at ``root``, dependencies first, and its ``(stage, upstream)`` edges."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:  # in root: a stage's addressing is relative to the working directory
        with contextlib.chdir(root), Repo(".") as repo:
            graph = repo.index.graph  # edges point from a stage to the stages it depends on
            position = {s: i for i, s in enumerate(repo.index.stages)}  # dvc.yaml order
            order = list(nx.lexicographical_topological_sort(graph.reverse(copy=False),
                                                              key=position.__getitem__))
            return ([s.addressing for s in order],
                    [(a.addressing, b.addressing) for a, b in graph.edges])
    except DvcException as e:
        raise MnistlabError(f"{root}: DVC cannot read the pipeline: {' '.join(str(e).split())}") from e


def workers(jobs: int | None, chains: Sequence[Chain]) -> int:
    """``jobs`` (default: the usable cores), but no more workers than chains."""
    return max(1, min(jobs or usable_cores(), len(chains)))


def dvc() -> str:
    """The ``dvc`` beside this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).with_name("dvc")
    return str(here) if here.is_file() else (shutil.which("dvc") or "dvc")


def check_settings(params: dict[str, Any]) -> None:
    """Every setting a stage of this run will read, validated the way that stage does.

    Why before DVC: DVC deletes a stage's cached outputs before it starts the stage, so a
    setting the stage then refuses (``train.device: gpu``, a negative lr) cost the outputs
    of every stage it reached, to be brought back with ``dvc checkout``. It also expands
    dvc.yaml's matrices over ``datasets``, ``archs`` and ``seeds`` first: one that is not a
    list stops it with "unexpected error - 'Value' object is not iterable", and a seed
    listed twice trains twice before compare refuses it. Here each error names its key.
    (The split fractions are checked against the data, by the split stage.)
    """
    # here: these import torch, which a run stopped by a bad setting never needs otherwise
    from mnistlab.data.sources import resolve_source
    from mnistlab.data.split import split_settings
    from mnistlab.hparams import HParams
    from mnistlab.utils import pick_device

    CompareSettings.from_params(params)  # datasets, archs, seeds: lists of distinct names
    seed_of(params)
    split_settings(params)
    DownloadSettings.from_params(params)
    for dataset in params["datasets"]:
        resolve_source(params, dataset)
    for arch in params["archs"]:
        HParams.from_params(params, arch)
    pick_device(TrainSettings.from_params(params).device, "train.device")
    pick_device(EvaluateSettings.from_params(params).device, "evaluate.device")
    pick_device(FeatureSettings.from_params(params).device, "features.device")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnistlab.repro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=None,
                    help="workers (default: the usable cores); 1 runs plain `dvc repro`")
    ap.add_argument("--logs", type=Path, default=LOGS, help=f"one log per chain (default {LOGS})")
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    root = Path.cwd()
    # Without a params.yaml (not this project's pipeline), DVC says what it cannot read.
    if (root / "params.yaml").is_file():
        check_settings(load_params(root / "params.yaml"))
    # Every stage probes the tracking server too, but only after DVC has deleted its outputs
    # (all but persist ones): a server that is down would cost every stage it reaches them.
    tracking.check_reachable()

    chains, rest = ([], []) if args.jobs == 1 else plan(*read_pipeline(root))
    n = workers(args.jobs, chains)
    env = dict(os.environ)
    if n > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // n)))
    # Every stage forked from one process that has done the imports (stageserver.py: 5-8 s of
    # each stage process on the 2-core machines here), unless MNISTLAB_STAGE_SERVER=off.
    with stageserver.serving(env) as env:
        if n == 1:
            return subprocess.run([dvc(), "repro"], cwd=root, env=env).returncode
        return run_chains(root, chains, rest, n, env, args.logs)


def run_chains(root: Path, chains: Sequence[Chain], rest: Sequence[str], n: int,
               env: dict[str, str], logs: Path) -> int:
    """The chains on ``n`` workers, then ``rest`` (compare) in the foreground (the module doc)."""
    live = sys.stdout.isatty()
    if live:  # the train stages draw their bars into the logs, for the live lines
        env = {PROGRESS_ENV: "always", **env}
    logs.mkdir(parents=True, exist_ok=True)
    print(f"dvc repro on {n} workers, {env['OMP_NUM_THREADS']} torch thread(s) per stage "
          f"({len(chains)} chains, logs in {logs}/; then {', '.join(rest) or 'nothing'})",
          flush=True)

    def start(chain: Chain) -> Running:
        log = logs / f"{chain.key}.log"
        with open(log, "w") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen([dvc(), "--wait-for-lock", "repro", "--single-item", *chain.stages],
                                    cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, process_group=0)
        return Running(chain, proc, log, time.monotonic())

    display = Display(sys.stdout, live)
    try:
        failed = schedule(chains, n, start, display.event, tick=display.status)
    finally:
        display.clear()
    if failed:
        raise MnistlabError(f"dvc repro: chain(s) {', '.join(failed)} failed; see the lines above "
                            f"and {logs}/<chain>.log")
    # What no chain holds (compare), in DVC's order; every chain is up to date by now. With the
    # workers' environment (their thread count), which is the stage server's: compare forked
    # from it took 14-15 s on an H100's 16-core host against 26-29 s fresh with all 16 threads.
    return subprocess.run([dvc(), "repro", "--single-item", *rest], cwd=root, env=env).returncode if rest else 0


if __name__ == "__main__":
    run_script(main)
