"""Tile analysis: classify each BLOCK_M x BLOCK_N tile of the score matrix as EMPTY, FULL or
PARTIAL, and list per query tile the key tiles a kernel must visit. Tiles are cut in kernel
positions, so a layout (a token order) decides which tokens share a tile.

Version 1 evaluates the predicate over each tile (vectorised, one row of tiles at a time, so
memory stays O(BLOCK_M * Nk)). It is exact by construction. The interface (`analyse`) is what
later symbolic analyses replace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import limits
from ..errors import AttncError
from ..ir import nodes as N
from ..ir.bind import Bound
from ..ir.evaluate import evaluate, pair_coords, part_expr, reads_tensors
from .layout import Layout, row_major

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Schedule:
    """Which kv tiles each q tile visits, and whether the mask must be evaluated there.

    Per q tile `t`, FULL tiles are `full_idx[full_ptr[t]:full_ptr[t+1]]` and PARTIAL tiles are
    `part_idx[part_ptr[t]:part_ptr[t+1]]` (CSR). A kv tile that runs past the last key is never
    FULL, so FULL tiles need neither the predicate nor bounds checks.
    """

    block_m: int
    block_n: int
    nq: int
    nk: int
    classes: np.ndarray = field(repr=False)  # int8 [q tiles, kv tiles]
    row_counts: np.ndarray = field(repr=False)  # int64 [nq]: keys the query at each position sees
    full_ptr: np.ndarray = field(repr=False)
    full_idx: np.ndarray = field(repr=False)
    part_ptr: np.ndarray = field(repr=False)
    part_idx: np.ndarray = field(repr=False)
    # False when the mask reads runtime tensors: row_counts then counts the keys a query can
    # possibly see, and the true counts are known only at call time.
    exact: bool = True
    layout: Layout | None = field(default=None, repr=False)  # the token order tiles are cut in

    @property
    def q_tiles(self) -> int:
        return self.classes.shape[0]

    @property
    def kv_tiles(self) -> int:
        return self.classes.shape[1]

    def stats(self) -> dict[str, float]:
        total = self.classes.size
        full = int((self.classes == FULL).sum())
        part = int((self.classes == PARTIAL).sum())
        visible = int(self.row_counts.sum())
        return {
            "pairs_visible": visible,
            "density": visible / (self.nq * self.nk),
            "tiles": total,
            "tiles_full": full,
            "tiles_partial": part,
            "tiles_empty": total - full - part,
            "tile_density": (full + part) / total,
            # Of the score entries the kernel computes, the share that is actually visible.
            "tile_efficiency": visible / max(1, (full + part) * self.block_m * self.block_n),
        }


def mask_bounds(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(certainly visible, possibly visible) without runtime data: three-valued evaluation in
    which every comparison that reads a runtime tensor is unknown."""
    shape = (len(q_idx), len(k_idx))
    lo_out, hi_out = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    for part, sel, coords in pair_coords(bound, q_idx, k_idx):

        def rec(e: N.Expr, live):
            # live: where e may be evaluated. The right side of `and` / `or` is evaluated only
            # where the left side may not decide (docs/language.md, guards); an error there
            # (division by zero) is refused even when only runtime data could rule it out.
            if not reads_tensors(e):
                v = np.asarray(evaluate(e, bound.env, coords, live=live, span_of=bound.ir.span_of), dtype=bool)
                return v, v
            if isinstance(e, N.Unary) and e.op == "not":
                lo, hi = rec(e.operand, live)
                return ~hi, ~lo
            if isinstance(e, N.Binary) and e.op in ("and", "or"):
                alo, ahi = rec(e.lhs, live)
                inner = ahi if e.op == "and" else ~alo
                inner = inner if live is None else inner & live
                blo, bhi = rec(e.rhs, inner) if inner.any() else (np.zeros((), dtype=bool),) * 2
                if e.op == "and":
                    return alo & blo, ahi & bhi
                return alo | blo, ahi | bhi
            return np.zeros((), dtype=bool), np.ones((), dtype=bool)

        lo, hi = rec(part_expr(bound.ir.mask, part.name), None)
        part_shape = (len(q_idx), int(sel.sum()))
        lo_out[:, sel] = np.broadcast_to(lo, part_shape)
        hi_out[:, sel] = np.broadcast_to(hi, part_shape)
    return lo_out, hi_out




def analyse(bound: Bound, block_m: int, block_n: int, layout: Layout | None = None,
            progress: Callable[[int, int], None] | None = None) -> Schedule:
    """The schedule of `bound` under `layout` (row-major when None); every array of the result
    is indexed by kernel position."""
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise AttncError(f"{name} = {b}: tile sizes must be powers of two, at least 16")
    nq, nk = bound.nq, bound.nk
    n_qt, n_kt = math.ceil(nq / block_m), math.ceil(nk / block_n)
    check_limits(nq, nk, n_qt, n_kt)
    classes = np.zeros((n_qt, n_kt), dtype=np.int8)
    row_counts = np.zeros(nq, dtype=np.int64)
    layout = layout or row_major(nq, nk)
    keys = layout.kv_perm
    pad = n_kt * block_n - nk
    for t in range(n_qt):
        rows = np.arange(t * block_m, min(nq, (t + 1) * block_m))
        # Certainly / possibly visible: equal unless the mask reads runtime tensors (unknown here).
        certain, possible = mask_bounds(bound, layout.q_perm[rows], keys)
        row_counts[rows] = possible.sum(axis=1)
        # Padding keys count as hidden, so a ragged kv tile (which needs bounds checks) is never FULL.
        any_ = np.pad(possible, ((0, 0), (0, pad))).reshape(len(rows), n_kt, block_n).any(axis=(0, 2))
        all_ = np.pad(certain, ((0, 0), (0, pad))).reshape(len(rows), n_kt, block_n).all(axis=(0, 2))
        classes[t] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
        if progress is not None:
            progress(t + 1, n_qt)
    full_ptr, full_idx = _csr(classes == FULL)
    part_ptr, part_idx = _csr(classes == PARTIAL)
    return Schedule(block_m, block_n, nq, nk, classes, row_counts, full_ptr, full_idx, part_ptr, part_idx,
                    exact=not reads_tensors(bound.ir.mask), layout=layout)


def check_limits(nq: int, nk: int, q_tiles: int, kv_tiles: int) -> None:
    """Refuse, before any work, a tile analysis that cannot fit in memory or time."""
    tiles = q_tiles * kv_tiles
    if tiles > limits.MAX_TILES:
        raise AttncError(f"the tile map would have {limits.show_count(tiles)} tiles ([{q_tiles}, {kv_tiles}]); "
                         f"the limit is {limits.show_count(limits.MAX_TILES)} (attnc.limits.MAX_TILES)")
    # int8 classes, plus int32 CSR indices for every tile in the worst case and two offset arrays.
    size = tiles * 5 + (q_tiles + 1) * 8
    if size > limits.MAX_TILE_MAP_BYTES:
        raise AttncError(f"the tile map and its tile lists would allocate {limits.show_bytes(size)} for "
                         f"{limits.show_shape((q_tiles, kv_tiles))} tiles; the limit is "
                         f"{limits.show_bytes(limits.MAX_TILE_MAP_BYTES)} (attnc.limits.MAX_TILE_MAP_BYTES)")
    limits.check_count("tile analysis", nq * nk, limits.MAX_ANALYSED_PAIRS, "MAX_ANALYSED_PAIRS")


def _csr(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = sel.sum(axis=1)
    ptr = np.zeros(sel.shape[0] + 1, dtype=np.int32)
    np.cumsum(counts, out=ptr[1:])
    idx = np.nonzero(sel)[1].astype(np.int32)  # row-major order: grouped by q tile
    return ptr, idx


def dense_from_schedule(s: Schedule) -> np.ndarray:
    """Rebuild the tile-class map from the CSR lists (documents the format; used by tests)."""
    out = np.zeros((s.q_tiles, s.kv_tiles), dtype=np.int8)
    for t in range(s.q_tiles):
        out[t, s.full_idx[s.full_ptr[t]:s.full_ptr[t + 1]]] = FULL
        out[t, s.part_idx[s.part_ptr[t]:s.part_ptr[t + 1]]] = PARTIAL
    return out


def tile_picture(s: Schedule, max_cells: int = 64) -> str:
    """ASCII map of the tile classes: '#' FULL, '+' PARTIAL, '.' EMPTY.

    Large maps are downsampled; a cell shows the 'busiest' class among the tiles it covers.
    """
    rows = math.ceil(s.q_tiles / max(1, math.ceil(s.q_tiles / max_cells)))
    cols = math.ceil(s.kv_tiles / max(1, math.ceil(s.kv_tiles / max_cells)))
    fy, fx = math.ceil(s.q_tiles / rows), math.ceil(s.kv_tiles / cols)
    glyph = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
    lines = []
    for r in range(math.ceil(s.q_tiles / fy)):
        line = []
        for c in range(math.ceil(s.kv_tiles / fx)):
            cell = s.classes[r * fy:(r + 1) * fy, c * fx:(c + 1) * fx]
            kinds = set(cell.flatten().tolist())
            line.append(glyph[PARTIAL] if PARTIAL in kinds or len(kinds) > 1 else glyph[kinds.pop()])
        lines.append("".join(line))
    scale = "" if fy == fx == 1 else f"  (each cell {fy}x{fx} tiles)"
    return "\n".join(lines) + (f"\n{scale.strip()}" if scale else "")
