"""dvc.yaml's code deps, checked against (or rewritten from) the real import graph.

::

    python -m mnistlab.ci.deps          # exit 1 and name every stage whose deps differ
    python -m mnistlab.ci.deps --fix    # rewrite each stage's src/mnistlab/ deps in place

A stage's code deps are its script plus every mnistlab source file the script runs
(:func:`mnistlab.codegraph.closure`): no more, since an edit to a module the stage
never runs must not re-run it (and open new MLflow runs), and no less, since an edit
to one it runs must. ``--fix`` replaces only the ``- src/mnistlab/...`` lines of each
stage, so comments and every other dep stay as written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from mnistlab import codegraph
from mnistlab.errors import MnistlabError, run_script

CODE_DEP = re.compile(r"^(\s*)- (src/mnistlab/\S+\.py)\s*$")


def script_of(cmd: str) -> str:
    """The ``stages/<name>.py`` a stage's command runs."""
    m = re.search(r"(stages/\w+\.py)", cmd)
    if not m:
        raise MnistlabError(f"dvc.yaml: command {cmd!r} runs no stages/<name>.py script")
    return m.group(1)


def expected_deps(root: Path, script: str) -> list[str]:
    """The script and every ``src/mnistlab`` file it runs, as dvc.yaml paths, sorted."""
    src = root / "src" / "mnistlab"
    files = codegraph.closure(root / script, src)
    return [script] + sorted(str(f.relative_to(root)) for f in files)


def problems(root: Path) -> list[str]:
    """One line per stage whose code deps differ from its import closure (empty: all agree)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = script_of(body["cmd"])
        listed = {d for d in body.get("deps", []) if isinstance(d, str)
                  and (d.startswith("src/mnistlab/") or d.startswith("stages/"))}
        want = set(expected_deps(root, script))
        missing, extra = sorted(want - listed), sorted(listed - want)
        if missing or extra:
            out.append(f"dvc.yaml stage {name!r}: "
                       + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                 extra and f"not run by {script}: {', '.join(extra)}"])))
    return out


def fix(root: Path) -> None:
    """Rewrite every stage's ``src/mnistlab`` deps to its import closure, keeping all else."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    lines = (root / "dvc.yaml").read_text().splitlines(keepends=True)
    out: list[str] = []
    current, written = None, set()
    for line in lines:
        top = re.match(r"^  (\w+):\s*$", line)
        if top and top.group(1) in stages:
            current = top.group(1)
        m = CODE_DEP.match(line)
        if m and current is not None:
            if current not in written:
                body = stages[current].get("do", stages[current])
                deps = expected_deps(root, script_of(body["cmd"]))[1:]
                out += [f"{m.group(1)}- {d}\n" for d in deps]
                written.add(current)
            continue
        out.append(line)
    (root / "dvc.yaml").write_text("".join(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnistlab.ci.deps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--fix", action="store_true", help="rewrite dvc.yaml's code deps")
    args = ap.parse_args(argv)
    if args.fix:
        fix(args.root)
    found = problems(args.root)
    for p in found:
        print(p, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    run_script(main)
