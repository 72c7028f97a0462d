"""The pipeline's stages, one module each: what ``stages/<name>.py`` runs for dvc.yaml.

Each module has a ``*Paths`` dataclass (every file the stage reads or writes, all
passed in by dvc.yaml) and one function ``(params, [dataset, arch, seed,] paths) -> summary``.
The thin scripts in ``stages/`` call :func:`cli`, which turns the Paths fields into
command-line options, so a script names its stage and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnistlab.config import load_params, seed_arg
from mnistlab.errors import run_script

# How an item's text becomes its value (any other item stays a string): done here, once, so that
# every stage function gets a checked ``seed: int`` and a bad --seed is one line like any error.
ITEM_TYPES: dict[str, Callable[[str], Any]] = {"seed": seed_arg}


def cli(fn: Callable[..., Any], paths_cls: type, doc: str | None,
        items: tuple[str, ...] = ("dataset", "arch", "seed"),
        show: Callable[[Any], str] | None = None) -> None:
    """Parse ``--<item>`` and one ``--<field>`` per ``paths_cls`` field, run ``fn``, print its result.

    ``fn(params, *items, paths)`` runs under :func:`mnistlab.errors.run_stage` (one-line
    errors, exit 2); its result is printed as one JSON line, or with ``show``. Then the
    process exits (:func:`mnistlab.errors.run_script`): this is a stage script's top level.
    """
    def main() -> None:
        ap = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        for item in items:
            ap.add_argument(f"--{item}", required=True)
        for f in dataclasses.fields(paths_cls):
            ap.add_argument(f"--{f.name.replace('_', '-')}", required=True, type=Path)
        ap.add_argument("--params", default="params.yaml")
        args = vars(ap.parse_args())
        paths = paths_cls(**{f.name: args[f.name] for f in dataclasses.fields(paths_cls)})
        values = [ITEM_TYPES.get(i, str)(args[i]) for i in items]
        result = fn(load_params(args["params"]), *values, paths)
        out = show(result) if show else json.dumps({**dict(zip(items, values, strict=True)), **result})
        print(out, end="" if out.endswith("\n") else "\n")

    run_script(main)
