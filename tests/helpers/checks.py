"""Checks of what a run left behind: the one-line error of a failed stage, a PNG that decodes,
a titled picture of a readable size."""

from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image


def assert_one_line_error(p: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Exit ``code`` (2: a user error; 128 + N: stopped by signal N), no traceback, exactly one
    ``error:`` line on stderr (the last), holding ``fragments``."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and p.stderr.rstrip().splitlines()[-1] == errors[0], p.stderr
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def assert_png(path: Path, min_side: int = 20) -> tuple[int, int]:
    """``path`` is a PNG that decodes, of a plausible size; returns (width, height)."""
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes every pixel: a truncated file fails here
        assert min(im.size) >= min_side, (path, im.size)
        return im.size


MIN_SIDE = 400  # px: issue #15 (a 32x482 kernel strip, a 150x210 grid with its title cut off)


def assert_picture(path: Path, *title_has: str, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """A stage's picture: a PNG at least ``min_side`` px wide and tall whose ``Title`` text
    chunk (what ``plots.save`` writes from the figure's title) holds every ``title_has``."""
    size = assert_png(path, min_side)
    with Image.open(path) as im:
        title = im.text.get("Title", "")
    assert title.strip(), f"{path.name}: no Title in the PNG"
    for part in title_has:
        assert part in title, (path.name, part, title)
    return size
