"""``make run PROFILE=<name>``: a named set of params overrides, run as a DVC experiment.

``profiles/<name>.yaml`` holds params.yaml keys (nested like params.yaml); this prints
one ``-S key=value`` per leaf, shell-quoted, for ``dvc exp run``. An experiment rather
than a second params file: DVC records the overrides with the results, ``dvc exp show``
compares them with the quickstart's, and ``dvc exp apply`` / ``git checkout params.yaml``
go back.

    python -m mnistlab.profile thorough   # -> -S 'train.min_steps=1500'
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import yaml

from mnistlab.config import load_params
from mnistlab.errors import MnistlabError, run_script

PROFILES = Path("profiles")


def leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"train": {"min_steps": 1}}`` -> ``[("train.min_steps", 1)]`` (lists stay whole)."""
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += leaves(value, f"{name}.")
        else:
            out.append((name, value))
    return out


def set_args(path: Path) -> list[str]:
    """The ``dvc exp run`` arguments for the profile at ``path``."""
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise MnistlabError(f"{path}: no such profile (profiles: {', '.join(known) or 'none'})")
    tree = load_params(path, what="profile")
    if not tree:
        raise MnistlabError(f"{path}: the profile sets nothing")
    # flow-style YAML for values: DVC parses `-S key=value` values as YAML
    return [a for k, v in leaves(tree)
            for a in ("-S", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnistlab.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="profiles/<name>.yaml")
    ap.add_argument("--dir", type=Path, default=PROFILES)
    args = ap.parse_args(argv)
    print(shlex.join(set_args(args.dir / f"{args.name}.yaml")))
    return 0


if __name__ == "__main__":
    run_script(main)
