"""The real import graph of mnistlab, read from the source (stdlib ``ast``, nothing is imported).

In a DVC project a module boundary is a cache boundary: a stage must depend on
exactly the files it runs. dvc.yaml's ``deps`` are checked against
:func:`closure` of each stage script by a test, and the training checkpoint's
code fingerprint hashes the same closure (:func:`mnistlab.checkpoint.code_digest`),
so neither is a hand-kept copy of the imports.

Every ``import mnistlab...`` / ``from mnistlab... import ...`` counts, wherever it
stands (a function-level import is lazy, not absent), and importing
``mnistlab.a.b`` also runs ``mnistlab/__init__.py`` and ``mnistlab/a/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mnistlab"
SRC = Path(__file__).resolve().parent  # src/mnistlab


def module_file(name: str, src: Path = SRC) -> Path | None:
    """``mnistlab.a.b`` → ``src/mnistlab/a/b.py`` (or its package ``__init__.py``); None if absent."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = src.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path) -> set[str]:
    """Dotted names of mnistlab modules ``path`` imports (``from m import x`` → m, and m.x if a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == PACKAGE:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def closure(start: Path, src: Path = SRC) -> set[Path]:
    """Every mnistlab source file that running ``start`` (a script or module file) executes."""
    seen: set[Path] = set()
    todo = [start.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # parent packages' __init__ run first
                f = module_file(".".join(parts[:i]), src)
                if f is not None and f not in seen:
                    todo.append(f)
    return {p for p in seen if p.is_relative_to(src)}
