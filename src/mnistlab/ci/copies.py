"""Copies of the working tree that run the pipeline apart from it (the CI gate, the reproduction).

A copy holds the tracked and untracked-but-not-ignored files of this working tree
(uncommitted edits included; the caller excludes DVC outputs and dvc.lock), keeps its
own dvc.lock, DVC cache and ``mlflow.db`` across runs (an unchanged tree reruns
nothing), and gets its own ``params.yaml``: the repo's with overrides merged over it
(:func:`deep_merge`), relative local data sources made absolute so they still resolve
from there (:func:`rebase_sources`). DVC runs there without git (:func:`write_no_scm`);
the code's own git lookups walk up to this repository, so MLflow runs still name the
real commit. :func:`run_shards` runs ``dvc repro`` in several copies side by side;
with ``timed=True`` it runs their stages one by one and records where the time went
(:func:`timed_repro`, ``timings.json`` in each copy).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mnistlab import stageserver
from mnistlab.errors import MnistlabError
from mnistlab.utils import atomic_path, write_json

TIMINGS = "timings.json"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _absolute_location(loc: Any, root: Path) -> Any:
    """A relative local folder made absolute against ``root``; URLs and the rest unchanged."""
    if not isinstance(loc, str) or "://" in loc or os.path.isabs(loc):
        return loc
    return str((root / loc).resolve())


def rebase_sources(params: dict[str, Any], root: Path) -> dict[str, Any]:
    """Copy of ``params`` whose relative local ``sources`` resolve from anywhere."""
    sources = {}
    for name, spec in (params.get("sources") or {}).items():
        if isinstance(spec, str):
            spec = _absolute_location(spec, root)
        elif isinstance(spec, dict) and "mirrors" in spec:
            m = spec["mirrors"]
            spec = {**spec, "mirrors": [_absolute_location(x, root) for x in m]
                    if isinstance(m, list) else _absolute_location(m, root)}
        sources[name] = spec
    return {**params, "sources": sources}


def tree_files(root: Path, exclude: list[str]) -> list[str]:
    """Tracked + untracked-but-not-ignored files of the working tree, minus ``exclude`` prefixes."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        raise MnistlabError(f"{root}: not a git working tree (the CI copy lists files with git)") from None
    prefixes = [e.rstrip("/") for e in exclude]
    keep = []
    for f in filter(None, out.split("\0")):
        if any(f == p or f.startswith(p + "/") for p in prefixes):
            continue
        if (root / f).is_file():  # deleted-but-tracked files are listed too
            keep.append(f)
    return sorted(keep)


def sync_tree(root: Path, dest: Path, exclude: list[str]) -> int:
    """Mirror the working tree's files (see :func:`tree_files`) into ``dest``; return their count.

    Idempotent: a file is rewritten only when its content changed, so DVC reruns
    only the stages whose inputs did; files gone from the tree since the last
    sync are removed.
    """
    files = tree_files(root, exclude)
    manifest = dest / ".ci-files"
    old = set(manifest.read_text().split("\n")) - {""} if manifest.is_file() else set()
    for f in files:
        src, dst = root / f, dest / f
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for f in sorted(old - set(files)):
        (dest / f).unlink(missing_ok=True)
    with atomic_path(manifest) as tmp:
        tmp.write_text("\n".join(files) + "\n")
    return len(files)


def write_params(path: Path, params: dict[str, Any], note: str) -> None:
    """``note`` + ``params`` as YAML at ``path``, rewritten only when the text changes."""
    text = note + yaml.safe_dump(params, sort_keys=False, default_flow_style=None, width=100)
    if not path.is_file() or path.read_text() != text:  # unchanged: no new mtime
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def write_no_scm(copy: Path) -> None:
    """``copy/.dvc/config.local`` telling DVC there is no git in the copy.

    Without it DVC would look for one, and find the parent repo's.
    """
    with atomic_path(copy / ".dvc" / "config.local") as tmp:
        tmp.write_text("[core]\n    no_scm = true\n    analytics = false\n")


def _dvc(path: str | None) -> str:
    # absolute: a relative PATH entry would not resolve from inside the shards
    return os.path.abspath(shutil.which("dvc", path=path) or Path(sys.executable).parent / "dvc")


def timed_repro(shard: Path) -> int:
    """``dvc repro`` in ``shard`` one stage at a time, in the pipeline's order, each timed.

    Writes ``shard/timings.json``: ``{"stages": [{"stage", "seconds"}], "total_seconds"}``.
    Each stage's seconds are what a user's ``dvc repro`` spends on it: DVC's own work
    (hashing, lock file), the stage process's start-up (imports of torch, mlflow) and
    the stage's work. ``dvc stage list`` gives the stages in dvc.yaml order, which is the
    dependency order here (download, split, train, evaluate, features, compare). Returns
    the first failing ``dvc repro``'s exit status, or 0.
    """
    dvc = _dvc(os.environ.get("PATH"))
    names = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=shard, check=True,
                           capture_output=True, text=True).stdout.split()
    rows, t_all = [], time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        rc = subprocess.call([dvc, "repro", "--single-item", name], cwd=shard)
        rows.append({"stage": name, "seconds": time.perf_counter() - t0})
        if rc:
            return rc
    write_json(shard / TIMINGS, {"stages": rows, "total_seconds": time.perf_counter() - t_all})
    return 0


def run_shards(shards: list[Path], jobs: int, threads: int, what: str, timed: bool = False,
               targets: list[str] | None = None) -> None:
    """``dvc repro [targets]`` in every copy of ``shards``, ``jobs`` at a time; each one's log is
    printed whole. ``targets``: stage names (with everything upstream of them); none: every stage.

    Every shard runs with ``threads`` torch/OpenMP threads, whatever the machine:
    CPU kernels may split their reductions by thread count, and a baseline must not
    depend on how many cores made it. MLflow is pinned to each shard's own sqlite
    store, so these runs never mix with the developer's runs or go to a tracking
    server set in the environment. Each shard imports mnistlab from its own ``src/``
    (``PYTHONPATH``), not from the editable install: otherwise an edit made in the
    working tree while the copies run would reach their later stages, and a copy
    would run code it was never synced with. ``timed``: each copy runs
    :func:`timed_repro` (stage by stage, ``timings.json``) instead of one ``dvc repro``.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           # beats train.threads too, should params.yaml pin a count (mnistlab.threads)
           "MNISTLAB_THREADS": str(threads)}
    env.pop("DVC_EXP_NAME", None)
    dvc = _dvc(env.get("PATH"))
    if timed and targets:
        raise ValueError("timed runs time every stage: no targets")
    command = ([os.path.abspath(sys.executable), "-m", "mnistlab.ci.copies", "timed-repro"] if timed
               else [dvc, "repro", *(targets or [])])
    shown = " ".join(["dvc", "repro", *(targets or [])])  # what each copy runs, for its log line
    pending = list(shards)
    running: list[tuple[Path, subprocess.Popen, Any, float, stageserver.Server]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            shard = pending.pop(0)
            out = open(shard / "repro.log", "w")  # noqa: SIM115 - closed when the process ends
            print(f"[{shard.name}] {shown} (log: {shard / 'repro.log'})", flush=True)
            shard_env = {**env, "PYTHONPATH": os.pathsep.join(
                filter(None, [str((shard / "src").resolve()), env.get("PYTHONPATH")]))}
            # One stage server per copy: its stages fork from a process with their imports
            # done (mnistlab.stageserver), which has mnistlab from the copy's src/ on its path.
            server = stageserver.Server(shard_env)
            running.append((shard, subprocess.Popen(command, cwd=shard, env=server.start(),
                                                    stdout=out, stderr=subprocess.STDOUT),
                            out, time.time(), server))
        time.sleep(0.5)
        for item in [r for r in running if r[1].poll() is not None]:
            shard, proc, out, t0, server = item
            running.remove(item)
            server.stop()
            out.close()
            print(f"----- [{shard.name}] dvc repro exited {proc.returncode} after "
                  f"{time.time() - t0:.0f}s; its output:", flush=True)
            print((shard / "repro.log").read_text(), flush=True)
            if proc.returncode:
                failed.append(f"{shard} (exit {proc.returncode})")
    if failed:
        raise MnistlabError(f"{what} failed in {', '.join(failed)}; its output is above")


if __name__ == "__main__":
    # ``python -m mnistlab.ci.copies timed-repro``, run by run_shards(timed=True) in a copy
    if sys.argv[1:] != ["timed-repro"]:
        sys.exit("usage: python -m mnistlab.ci.copies timed-repro")
    sys.exit(timed_repro(Path.cwd()))
