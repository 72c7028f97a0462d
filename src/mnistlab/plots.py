"""Matplotlib helpers shared by the report-writing stages: headless, atomic PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnistlab.utils import atomic_path


def figure(**kw: Any):
    """A new matplotlib figure on the Agg backend (files only: CI machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(**kw)


def save(fig, path: Path, tight: bool = True) -> None:
    """Write ``fig`` as a PNG through a temp file + rename, then free it.

    Args:
        fig: The figure.
        path: Where the PNG goes.
        tight: Apply ``tight_layout`` first (off for figures laid out by hand).
    """
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
