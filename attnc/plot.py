"""Tile maps as pictures (`attnc explain FILE --plot map.png`): the chosen layout beside
row-major, EMPTY / PARTIAL / FULL in three colours. matplotlib is an optional extra
(`pip install attnc[plot]`); nothing else in attnc imports this module."""
from __future__ import annotations

import math

import numpy as np

from .analysis.tiles import Schedule
from .errors import AttncError

_MAX_CELLS = 512  # larger maps are downsampled: a cell shows the busiest class it covers


def _image(s: Schedule) -> np.ndarray:
    """int8 classes [rows, cols], at most _MAX_CELLS a side (max over the tiles a cell covers)."""
    fy, fx = math.ceil(s.q_tiles / _MAX_CELLS), math.ceil(s.kv_tiles / _MAX_CELLS)
    rows, cols = math.ceil(s.q_tiles / fy), math.ceil(s.kv_tiles / fx)
    img = np.zeros((rows, cols), dtype=np.int8)
    # FULL first, then PARTIAL over it: in a downsampled cell, PARTIAL wins (as in the text picture).
    for cls, ptr, idx in ((2, s.full_ptr, s.full_idx), (1, s.part_ptr, s.part_idx)):
        q = np.repeat(np.arange(s.q_tiles), np.diff(ptr)) // fy
        img[q, idx.astype(np.int64) // fx] = cls
    return img


def plot_tile_maps(panels: list[tuple[str, Schedule]], path: str) -> None:
    """Write the tile maps of `panels` (title, schedule), side by side, to `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise AttncError("--plot needs matplotlib", hint="pip install matplotlib (or attnc[plot])") from None
    colours = ListedColormap(["#f4f4f4", "#f0a030", "#2060c0"])  # EMPTY, PARTIAL, FULL
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, s) in zip(axes[0], panels):
        ax.imshow(_image(s), cmap=colours, vmin=0, vmax=2, interpolation="nearest")
        full, part = s.tiles_full, s.tiles_partial
        ax.set_title(f"{title}\n{full} full, {part} partial of {s.q_tiles * s.kv_tiles} tiles", fontsize=10)
        ax.set_xlabel(f"kv tiles ({s.block_n} keys)")
        ax.set_ylabel(f"q tiles ({s.block_m} queries)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i)) for i in range(3)]
    fig.legend(handles, ["EMPTY", "PARTIAL", "FULL"], loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise AttncError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
