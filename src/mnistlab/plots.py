"""Matplotlib helpers shared by the report-writing stages: headless, atomic PNG files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnistlab.utils import atomic_path

log = logging.getLogger(__name__)

# Every picture the evaluate and features stages write is at least this many pixels
# wide and tall (issue #15: 32x482 kernel strips and 150x210 grids were unreadable).
MIN_SIDE = 400
DPI = 100


def figure(**kw: Any):
    """A new matplotlib figure on the Agg backend (files only: CI machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(**kw)


def save(fig, path: Path, tight: bool = True, title: str | None = None) -> None:
    """Write ``fig`` as a PNG through a temp file + rename, then free it.

    The title (``title``, else the figure's suptitle) is also written into the PNG's
    ``Title`` text chunk, so a test, an image viewer or ``PIL.Image.open(p).text`` can
    tell what a picture shows without reading its pixels. Any title or label that runs
    past the picture's edge is logged as a warning (tests fail on it).

    Args:
        fig: The figure.
        path: Where the PNG goes.
        tight: Apply ``tight_layout`` first (off for figures laid out by hand).
        title: The picture's title for the metadata, if it is not the suptitle
            (one axes' title, as in a single-panel plot).
    """
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    title = " ".join((title or fig.get_suptitle()).split())  # unwrapped: one line
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Title": title} if title else None)
    for text in clipped(fig):
        log.warning("%s: text %r runs past the edge of the picture", Path(path).name, text)
    plt.close(fig)


def clipped(fig) -> list[str]:
    """The figure's texts and axes titles that do not fit inside it (drawn cut off)."""
    renderer = fig.canvas.get_renderer()
    w, h = fig.bbox.width, fig.bbox.height
    out = []
    for t in [*fig.texts, *(ax.title for ax in fig.axes)]:
        if t.get_visible() and t.get_text():
            b = t.get_window_extent(renderer)
            if b.x0 < -1 or b.y0 < -1 or b.x1 > w + 1 or b.y1 > h + 1:
                out.append(t.get_text())
    return out


def wrapped_title(fig, text: str, fontsize: float = 10.0, pad: float = 8.0):
    """Set ``text`` as the figure's suptitle, word-wrapped to the figure's width.

    Returns:
        The suptitle's ``Text`` at matplotlib's default place (which a layout engine
        moves and makes room for); its height in pixels is ``get_window_extent().height``.
    """
    renderer = fig.canvas.get_renderer()
    t = fig.suptitle(text, fontsize=fontsize)
    lines: list[str] = []
    for word in text.split(" "):
        if lines:
            t.set_text(f"{lines[-1]} {word}")
            if t.get_window_extent(renderer).width <= fig.bbox.width - 2 * pad:
                lines[-1] = f"{lines[-1]} {word}"
                continue
        lines.append(word)
    t.set_text("\n".join(lines))
    return t


# --------------------------------------------------------------------------- image grids


@dataclass
class Grid:
    """Small images drawn side by side, ``ncol`` to a row, in reading order.

    Attributes:
        cells: [n, h, w] floats, any scale: each cell is contrast-stretched on its own
            (kernels and feature maps of one layer differ widely in scale).
        ncol: Cells per row.
        cell_labels: A label above each cell (``k0``, ``u12``), or None.
        row_labels: A label left of each row, or None.
        col_labels: A label under each column, or None.
        xlabel: What the columns are (under the column labels).
        ylabel: What the rows are (left of the row labels).
        stretch: Contrast-stretch each cell on its own; False: the cells are already in
            [0, 1] (test images, whose own scale is the point).
        invert: Draw 0 as white and 1 as black (ink on paper, as matplotlib's ``gray_r``).
    """

    cells: np.ndarray
    ncol: int
    cell_labels: list[str] | None = None
    row_labels: list[str] | None = None
    col_labels: list[str] | None = None
    xlabel: str = ""
    ylabel: str = ""
    stretch: bool = True
    invert: bool = False

    @property
    def nrow(self) -> int:
        return -(-len(self.cells) // self.ncol)


def grid_scale(grid: Grid) -> int:
    """Whole-pixel zoom of a grid's cells: its larger side near 720 px, 1x to 8x."""
    h, w = grid.cells.shape[1:]
    return int(np.clip(np.ceil(720 / max(grid.ncol * w, grid.nrow * h)), 1, 8))


def text_width(fig, labels: list[str], fontsize: float) -> int:
    """The widest line of ``labels`` at ``fontsize`` on ``fig``, in whole pixels (0 for none)."""
    if not labels:
        return 0
    renderer = fig.canvas.get_renderer()
    t = fig.text(0, 0, "", fontsize=fontsize)
    widest = 0.0
    for line in {line for label in labels for line in label.split("\n")}:
        t.set_text(line)
        widest = max(widest, t.get_window_extent(renderer).width)
    t.remove()
    return int(np.ceil(widest))


def image_grid(grid: Grid, path: Path, text: str, min_width: int = MIN_SIDE) -> None:
    """Draw ``grid`` with its labels under the title ``text`` as a PNG at least MIN_SIDE px each way.

    Cells are zoomed by a whole factor (:func:`grid_scale`) with nearest-neighbour
    repetition and put on the canvas pixel for pixel (``figimage``): each source
    pixel stays a sharp square block, with no resampling by matplotlib. It is one
    image and a few texts, whatever the number of cells: 40 test images with their
    labels took 1.8 s as 40 matplotlib axes, 0.4 s this way (PNG written).

    Args:
        grid: The cells and their labels. A cell label may have several lines; a column
            is as wide as its widest label line, so labels never run into each other.
        path: Where the PNG goes.
        text: The title (word-wrapped to the picture's width).
        min_width: Narrowest picture in px (room for a long title over a few cells).
    """
    gap, char = 4, 7  # px; char: width of an 8 pt glyph
    label_pt, line_px = 7, 11  # cell labels: 7 pt, 11 px a line
    s = grid_scale(grid)
    n, h, w = grid.cells.shape
    ch, cw = h * s, w * s
    fig = figure(figsize=(min_width / DPI, MIN_SIDE / DPI), dpi=DPI)
    lines = max((label.count("\n") + 1 for label in grid.cell_labels or []), default=0)
    band = 14 + line_px * (lines - 1) if lines else 0
    col_w = max(cw, text_width(fig, grid.cell_labels or [], label_pt) + 2)
    pitch_x, pitch_y = col_w + gap, ch + gap + band
    gw, gh = grid.ncol * pitch_x + gap, grid.nrow * pitch_y + gap

    cells = grid.cells.astype(np.float32)
    if grid.stretch:
        lo = cells.min(axis=(1, 2), keepdims=True)
        span = cells.max(axis=(1, 2), keepdims=True) - lo
        cells = (cells - lo) / np.where(span > 0, span, 1.0)
    cells = np.clip(cells, 0.0, 1.0)
    if grid.invert:
        cells = 1.0 - cells
    canvas = np.ones((gh, gw), np.float32)  # white between cells
    for i, cell in enumerate(cells):
        r, c = divmod(i, grid.ncol)
        y0, x0 = r * pitch_y + gap + band, c * pitch_x + gap + (col_w - cw) // 2
        canvas[y0 - 1:y0 + ch + 1, x0 - 1:x0 + cw + 1] = 0.6  # a 1 px grey frame
        canvas[y0:y0 + ch, x0:x0 + cw] = np.kron(cell, np.ones((s, s), np.float32))

    left = 8 + (char * max(map(len, grid.row_labels)) + 6 if grid.row_labels else 0) \
        + (18 if grid.ylabel else 0)
    bottom = 8 + (16 if grid.col_labels else 0) + (18 if grid.xlabel else 0)
    width = max(MIN_SIDE, min_width, left + gw + 8)
    fig.set_size_inches(width / DPI, MIN_SIDE / DPI)
    t = wrapped_title(fig, text)
    top = int(np.ceil(t.get_window_extent().height)) + 16
    height = max(MIN_SIDE, top + gh + bottom)
    fig.set_size_inches(width / DPI, height / DPI)
    t.set_y(1 - 8 / height)  # 8 px from the top, as the margin above assumed
    # the grid's top-left corner in pixels from the figure's left and top: centred in what is left
    gx = left + (width - left - gw - 8) // 2
    gy = top + (height - top - gh - bottom) // 2
    rgb = np.repeat(np.rint(canvas * 255).astype(np.uint8)[..., None], 3, axis=2)  # no colormap pass
    fig.figimage(rgb, xo=gx, yo=height - gy - gh, origin="upper")

    def at(x: float, y: float, label: str, **kw: Any) -> None:  # x, y: px from left and top
        fig.text(x / width, 1 - y / height, label, **kw)

    for i, lab in enumerate(grid.cell_labels or []):
        r, c = divmod(i, grid.ncol)
        at(gx + c * pitch_x + gap + col_w / 2, gy + r * pitch_y + gap + band - 2, lab,
           fontsize=label_pt, ha="center", va="bottom", linespacing=1.1)
    for r, lab in enumerate(grid.row_labels or []):
        at(gx - 4, gy + r * pitch_y + gap + band + ch / 2, lab, fontsize=8, ha="right", va="center")
    for c, lab in enumerate(grid.col_labels or []):
        at(gx + c * pitch_x + gap + col_w / 2, gy + gh + 2, lab, fontsize=8, ha="center", va="top")
    if grid.xlabel:
        at(gx + gw / 2, gy + gh + (18 if grid.col_labels else 2), grid.xlabel, fontsize=9,
           ha="center", va="top")
    if grid.ylabel:
        at(gx - left + 4 + 8, gy + gh / 2, grid.ylabel, fontsize=9, ha="left", va="center",
           rotation=90)
    save(fig, path, tight=False)
