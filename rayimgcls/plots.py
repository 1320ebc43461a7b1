"""Pictures of numbers, headless: the matplotlib setup every plot shares and the confusion matrix that training's
TensorBoard log, `evaluate` and the reports draw. Class names are user text, so mathtext is off: a class called
`$\\frac$` is drawn as written, not parsed (and not a crash). matplotlib is imported when a plot is drawn."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np

MAX_SIDE_INCHES = 20.0  # at 100 dpi a 2000-pixel square, whatever the class count
NEAREST_CLASSES = 1200  # up to this, each cell of the matrix has at least one pixel of the 20-inch plot


@contextlib.contextmanager
def pyplot() -> Iterator[Any]:
    """matplotlib's pyplot, headless, with text shown literally: a `$` in a class name is not mathtext."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and safe in Ray workers and CI
    import matplotlib.pyplot as plt

    style = {"text.parse_math": False, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}
    with plt.rc_context(style):
        yield plt


def figure_png(fig: Any, dpi: int = 100, compress_level: int = 6) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (a report draws many). `compress_level` is
    zlib's: 1 encodes a 2000-pixel square several times faster, for a file about twice the size."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()  # not savefig's bbox_inches="tight", which draws the figure twice
    fig.set_layout_engine(None)  # laid out: left set, savefig would draw it once more before drawing it
    fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"compress_level": compress_level})
    plt.close(fig)
    return buf.getvalue()


def confusion_png(names: list[str], cm: np.ndarray) -> bytes:
    """The matrix as a PNG: colour = share of the true class (row), class names while they fit (60), counts
    written in while they fit (25), at most MAX_SIDE_INCHES on a side."""
    n = len(names)
    side = min(max(4.0, 0.45 * n + 2), MAX_SIDE_INCHES)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    with pyplot() as plt:
        fig, ax = plt.subplots(figsize=(side, side))
        # Nearest-neighbour while every cell gets a pixel of its own (its filter-free drawing is several times
        # faster); past that, matplotlib's antialiasing averages the cells that share a pixel.
        smooth = "nearest" if n <= NEAREST_CLASSES else "antialiased"
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation=smooth)
        if n <= 60:
            ax.set_xticks(range(n), names, rotation=90)
            ax.set_yticks(range(n), names)
        if n <= 25:
            for i in range(n):
                for j in range(n):
                    color = "white" if share[i, j] > 0.5 else "black"
                    # inside the axes: tight_layout need not measure each one
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=8, in_layout=False)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix\n(colour: share of the true class)", fontsize=10)
        return figure_png(fig, compress_level=1 if n > 60 else 6)
