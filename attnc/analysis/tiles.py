"""Tile analysis: classify each BLOCK_M x BLOCK_N tile of the score matrix as EMPTY, FULL or
PARTIAL, and list per query tile the key tiles a kernel must visit. Tiles are cut in kernel
positions, so a layout (a token order) decides which tokens share a tile.

Classification is symbolic: a block of tiles holds boxes of tokens on each side (boxes.py), and
three-valued interval evaluation of the mask over every pair of boxes (symbolic.py) decides
EMPTY (no pair possible), FULL (every pair certain) or undecided. Refinement is hierarchical:
square blocks of 2**L x 2**L tiles are classified from the largest level down, and only
undecided blocks are split, so the work follows the boundary tiles, never all tile pairs.
Exactness is a property (tests): never EMPTY when a pair is visible, never FULL when one is
hidden; PARTIAL may be conservative. Row counts are computed on demand from the tiles.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import limits
from ..errors import AttncError
from ..ir import nodes as N
from ..ir.bits import undefined
from ..ir.bind import Bound
from ..ir.evaluate import evaluate_uniform, mask_block, part_expr, per_row, reads_tensors
from .boxes import SideBoxes
from .dense import mask_bounds
from .layout import Layout, row_major
from .symbolic import Lookup, evaluate_boxes, fits

EMPTY, PARTIAL, FULL = 0, 1, 2
_CHUNK = 1 << 15  # box pairs evaluated at once: bounds the memory of one evaluation


@dataclass(frozen=True, eq=False)
class Schedule:
    """Which kv tiles each q tile visits, and whether the mask must be evaluated there.

    Per q tile `t`, FULL tiles are `full_idx[full_ptr[t]:full_ptr[t+1]]` and PARTIAL tiles are
    `part_idx[part_ptr[t]:part_ptr[t+1]]` (CSR, ascending). A kv tile that runs past the last
    key is never FULL, so FULL tiles need neither the predicate nor bounds checks. Memory is
    proportional to the tiles kept; `classes` (dense) and `row_counts` are built on demand.
    """

    block_m: int
    block_n: int
    nq: int
    nk: int
    full_ptr: np.ndarray = field(repr=False)
    full_idx: np.ndarray = field(repr=False)
    part_ptr: np.ndarray = field(repr=False)
    part_idx: np.ndarray = field(repr=False)
    # False when the mask reads runtime tensors: tiles that depend on them are PARTIAL, and
    # row_counts counts the keys a query can possibly see.
    exact: bool = True
    layout: Layout | None = field(default=None, repr=False)  # the token order tiles are cut in
    bound: Bound | None = field(default=None, repr=False)
    # The runtime integer tensors (host int64 arrays) a per-call schedule was classified with.
    tensors: dict | None = field(default=None, repr=False)

    @property
    def q_tiles(self) -> int:
        return math.ceil(self.nq / self.block_m)

    @property
    def kv_tiles(self) -> int:
        return math.ceil(self.nk / self.block_n)

    @property
    def tiles_full(self) -> int:
        return int(self.full_ptr[-1])

    @property
    def tiles_partial(self) -> int:
        return int(self.part_ptr[-1])

    @functools.cached_property
    def classes(self) -> np.ndarray:
        """int8 [q tiles, kv tiles], dense (0 EMPTY, 1 PARTIAL, 2 FULL)."""
        limits.check_bytes("the dense tile map", (self.q_tiles, self.kv_tiles), 1, limits.MAX_DENSE_MASK_BYTES,
                           "MAX_DENSE_MASK_BYTES")
        return dense_from_schedule(self)

    @functools.cached_property
    def row_counts(self) -> np.ndarray:
        """int64 [nq]: keys the query at each kernel position (possibly) sees. FULL tiles count
        whole; PARTIAL tiles are evaluated pair by pair (work proportional to them)."""
        return _row_counts(self)

    @functools.cached_property
    def transposed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The schedule per kv tile, for the dK/dV kernel: (full_ptr, full_idx, part_ptr, part_idx)
        with the q tiles that visit each kv tile, ascending (CSR). O(tiles kept)."""
        return (*_transpose(self.full_ptr, self.full_idx, self.kv_tiles),
                *_transpose(self.part_ptr, self.part_idx, self.kv_tiles))

    def stats(self) -> dict[str, float]:
        total = self.q_tiles * self.kv_tiles
        full, part = self.tiles_full, self.tiles_partial
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


def _transpose(ptr: np.ndarray, idx: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))
    order = np.argsort(idx, kind="stable")  # stable: the q tiles of a kv tile stay ascending
    counts = np.bincount(idx, minlength=columns) if len(idx) else np.zeros(columns, np.int64)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), rows[order]


def analyse(bound: Bound, block_m: int, block_n: int, layout: Layout | None = None,
            progress: Callable[[int, int], None] | None = None) -> Schedule:
    """The schedule of `bound` under `layout` (row-major when None); every array of the result
    is indexed by kernel position. `progress(done, total)` is called once per level."""
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise AttncError(f"{name} = {b}: tile sizes must be powers of two, at least 16")
    nq, nk = bound.nq, bound.nk
    n_qt, n_kt = math.ceil(nq / block_m), math.ceil(nk / block_n)
    layout = layout or row_major(nq, nk)
    exprs = [part_expr(bound.ir.mask, kp.name, qp.name) for qp, kp in bound.pairs]
    (fq, fk), partial = classify_tiles(bound, exprs, layout, block_m, block_n, progress)
    check_divisors(bound, layout, block_m, block_n)
    full_ptr, full_idx = _csr(fq, fk, n_qt, n_kt)
    part_ptr, part_idx = _csr(*partial, n_qt, n_kt)
    return Schedule(block_m, block_n, nq, nk, full_ptr, full_idx, part_ptr, part_idx,
                    exact=not (reads_tensors(bound.ir.mask) or per_row(bound.ir.mask)), layout=layout, bound=bound)


def classify_tiles(bound: Bound, exprs: list, layout: Layout, block_m: int, block_n: int,
                   progress: Callable[[int, int], None] | None = None, lookup: Lookup | None = None):
    """((q, kv) tile indices of FULL tiles, (q, kv) of PARTIAL tiles) of a predicate given per
    (query segment, key segment) (`exprs[n]` for bound.pairs[n]); a ragged last kv tile is never FULL. `lookup`
    gives runtime tensors' value ranges (per-call data); without it they are unknown."""
    nq, nk = bound.nq, bound.nk
    n_qt, n_kt = math.ceil(nq / block_m), math.ceil(nk / block_n)
    sides = SideBoxes(bound, layout, "q"), SideBoxes(bound, layout, "k")
    exprs = [(e, fits(e, bound.env, _whole_space(bound, qp, kp))) for e, (qp, kp) in zip(exprs, bound.pairs)]
    top = max(n_qt, n_kt)
    top = top.bit_length() - (1 if top & (top - 1) == 0 else 0)  # the level whose one block covers all
    qb, kb = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    full_blocks: list[tuple[int, np.ndarray, np.ndarray]] = []
    partial = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    for level in range(top, -1, -1):
        size = 1 << level
        cls = _classify(bound, exprs, sides, qb, kb, block_m * size, block_n * size, lookup)
        full_blocks.append((level, qb[cls == FULL], kb[cls == FULL]))
        open_ = cls == PARTIAL
        if level == 0:
            partial = (qb[open_], kb[open_])
        else:  # split each undecided block into its (up to) four children
            q2, k2 = _children(qb[open_], kb[open_])
            keep = (q2 < -(-n_qt // (size >> 1))) & (k2 < -(-n_kt // (size >> 1)))
            qb, kb = q2[keep], k2[keep]
        if progress is not None:
            progress(top - level + 1, top + 1)
    check_kept(sum(len(q) << (2 * level) for level, q, _ in full_blocks) + len(partial[0]), n_qt, n_kt)
    fq, fk = _expand(full_blocks, n_qt, n_kt)
    if nk % block_n:  # a ragged last kv tile needs bounds checks: never FULL
        ragged = fk == n_kt - 1
        partial = (np.concatenate([partial[0], fq[ragged]]), np.concatenate([partial[1], fk[ragged]]))
        fq, fk = fq[~ragged], fk[~ragged]
    return (fq, fk), partial


def check_divisors(bound: Bound, layout: Layout, block_m: int, block_n: int) -> None:
    """A division whose divisor varies per pair must not divide by zero where it is evaluated
    (the kernel would compute garbage there). The tiles where `guard and divisor == 0` may hold
    are found symbolically, and only those are evaluated pair by pair, which raises the located
    error (evaluate.py) if a live division by zero is there."""
    suspects = []
    for qpart, part in bound.pairs:
        expr = part_expr(bound.ir.mask, part.name, qpart.name)
        zero = [guard.and_(bad) for operand, bad, guard in _divisions(expr)
                if _varies(operand) or evaluate_uniform(bad, bound.env)]
        suspects.append(_any(zero))
    if all(isinstance(z, N.Const) and z.value is False for z in suspects):
        return
    (fq, fk), (pq, pk) = classify_tiles(bound, suspects, layout, block_m, block_n)
    q_tiles, k_tiles = np.concatenate([fq, pq]), np.concatenate([fk, pk])
    for t in np.unique(q_tiles):
        rows = np.arange(t * block_m, min(bound.nq, (t + 1) * block_m))
        keys = (k_tiles[q_tiles == t][:, None] * block_n + np.arange(block_n)).reshape(-1)
        mask_bounds(bound, layout.q_perm[rows], layout.kv_perm[keys[keys < bound.nk]])


def _divisions(e: N.Expr, guard: N.Expr = N.Const(True)):
    """(operand, condition, guard) of every // and % (divisor, == 0) and every other partial
    operation (ir/bits.py: shift counts, ilog2); the guard is what must hold for it to be
    evaluated (the left sides of enclosing `and`, negated for `or`)."""
    if isinstance(e, N.Binary) and e.op in ("and", "or"):
        yield from _divisions(e.lhs, guard)
        yield from _divisions(e.rhs, guard.and_(e.lhs if e.op == "and" else N.fold(N.Unary("not", e.lhs))))
        return
    partial = undefined(e)
    if partial is not None and not isinstance(partial[0], N.Const):
        yield partial[0], partial[1], guard
    if isinstance(e, N.Window):
        e = e.expand()
        yield from _divisions(e, guard)
        return
    for c in N.children(e):
        yield from _divisions(c, guard)


def _varies(e: N.Expr) -> bool:
    return any(isinstance(x, (N.Coord, N.Lookup, N.Head, N.Batch)) for x in N.walk(e, expand_windows=True))


def _any(terms: list) -> N.Expr:
    out: N.Expr = N.Const(False)
    for t in terms:
        out = N.fold(N.Binary("or", out, t))
    return out


def _classify(bound: Bound, exprs, sides, qb: np.ndarray, kb: np.ndarray, span_q: int, span_k: int,
              lookup: Lookup | None = None) -> np.ndarray:
    """EMPTY / PARTIAL (undecided) / FULL for each block pair (qb[p], kb[p]) of the given spans.
    Every (q box, kv box) combination of one key segment is evaluated in one batch."""
    n = len(qb)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    # Boxes per distinct block (a block takes part in many pairs), gathered per pair below.
    uq, iq = _distinct(qb)
    uk, ik = _distinct(kb)
    q_slots = sides[0].slots(uq * span_q, (uq + 1) * span_q, span_q)
    k_slots = sides[1].slots(uk * span_k, (uk + 1) * span_k, span_k)
    uncertain = np.zeros(n, dtype=np.int64)  # combinations not certainly visible, per pair
    possible = np.zeros(n, dtype=np.int64)  # combinations possibly visible, per pair
    n_kv = len(bound.kv_parts)
    for part, (expr, safe) in enumerate(exprs):
        # (q slot, kv slot, the pairs where both hold boxes), cut so that one evaluation covers
        # at most _CHUNK box pairs: every node's interval is held until it returns.
        pieces = [(a, b, live[i:i + _CHUNK]) for a in q_slots for b in k_slots
                  if a.part == part // n_kv and b.part == part % n_kv
                  for live in (np.nonzero(a.valid[iq] & b.valid[ik])[0],) for i in range(0, len(live), _CHUNK)]
        while pieces:
            batch, total = [], 0
            while pieces and total + len(pieces[0][2]) <= _CHUNK:
                batch.append(pieces.pop(0))
                total += len(batch[-1][2])
            sel = np.concatenate([c[2] for c in batch])
            coords, mods = {}, {}
            for side, slot_of, inv in (("q", 0, iq), ("k", 1, ik)):
                rows = [inv[c[2]] for c in batch]
                for ax in batch[0][slot_of].coords:
                    coords[(side, ax)] = tuple(np.concatenate([c[slot_of].coords[ax][e][r] for c, r in zip(batch, rows)])
                                               for e in (0, 1))
                for ax in batch[0][slot_of].mods or ():
                    mods[(side, ax)] = tuple(np.concatenate([c[slot_of].mods[ax][e][r] for c, r in zip(batch, rows)])
                                             for e in (0, 1))
            c, p = evaluate_boxes(expr, bound.env, coords, len(sel), lookup=lookup, safe=safe, mods=mods)
            uncertain += np.bincount(sel[~np.broadcast_to(c, sel.shape)], minlength=n)
            possible += np.bincount(sel[np.broadcast_to(p, sel.shape)], minlength=n)
    return np.where(possible == 0, EMPTY, np.where(uncertain == 0, FULL, PARTIAL)).astype(np.int8)


def _distinct(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, index of each block in them): every block index up to the largest when that is
    not much more than the blocks given (no sort: pairs outnumber blocks at the fine levels),
    else the distinct ones."""
    top = int(blocks.max()) + 1
    if top <= 4 * len(blocks):
        return np.arange(top, dtype=blocks.dtype), blocks
    return np.unique(blocks, return_inverse=True)


def _whole_space(bound: Bound, qpart, part) -> dict:
    """Coordinate ranges of every query of one query segment and every key of one key segment."""
    ranges = {("q", "i"): (0, qpart.size - 1), ("k", "i"): (0, part.size - 1)}
    ranges |= {("q", a): (0, d - 1) for a, d in zip(qpart.space.axes, qpart.dims)}
    ranges |= {("k", a): (0, d - 1) for a, d in zip(part.space.axes, part.dims)}
    return ranges


def _children(qb: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = (2 * qb)[:, None] + np.array([0, 0, 1, 1])
    k = (2 * kb)[:, None] + np.array([0, 1, 0, 1])
    return q.reshape(-1), k.reshape(-1)


def _expand(blocks, n_qt: int, n_kt: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile coordinates of every tile inside the FULL blocks (clipped to the tile grid)."""
    qs, ks = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for level, qb, kb in blocks:
        if not len(qb):
            continue
        size = 1 << level
        dq, dk = np.divmod(np.arange(size * size), size)
        q = (qb * size)[:, None] + dq
        k = (kb * size)[:, None] + dk
        inside = (q < n_qt) & (k < n_kt)
        qs.append(q[inside])
        ks.append(k[inside])
    return np.concatenate(qs), np.concatenate(ks)


def _csr(q: np.ndarray, k: np.ndarray, n_qt: int, n_kt: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(n_qt + 1, dtype=np.int32)
    np.cumsum(np.bincount(q, minlength=n_qt), out=ptr[1:])
    if n_kt is not None and n_qt * n_kt <= max(1 << 22, 8 * len(q)):  # a dense mark beats a sort
        grid = np.zeros(n_qt * n_kt, dtype=bool)
        grid[q * n_kt + k] = True
        return ptr, (np.flatnonzero(grid) % n_kt).astype(np.int32)
    order = np.lexsort((k, q))
    return ptr, k[order].astype(np.int32)


def _row_counts(s: Schedule) -> np.ndarray:
    counts = np.zeros(s.nq, dtype=np.int64)
    counts += (s.block_n * np.diff(s.full_ptr).astype(np.int64)).repeat(s.block_m)[:s.nq]
    lay, bound = s.layout, s.bound
    for t in range(s.q_tiles):
        tiles = s.part_idx[s.part_ptr[t]:s.part_ptr[t + 1]]
        if not len(tiles):
            continue
        rows = np.arange(t * s.block_m, min(s.nq, (t + 1) * s.block_m))
        keys = (tiles[:, None].astype(np.int64) * s.block_n + np.arange(s.block_n)).reshape(-1)
        keys = keys[keys < s.nk]
        if s.tensors is not None and not per_row(bound.ir.mask):  # a per-call schedule: the data decides
            seen = mask_block(bound, lay.q_perm[rows], lay.kv_perm[keys], s.tensors, what="row counts")
        else:
            _, seen = mask_bounds(bound, lay.q_perm[rows], lay.kv_perm[keys])
        counts[rows] += seen.sum(axis=1)
    return counts


def check_kept(kept: int, q_tiles: int, kv_tiles: int) -> None:
    """Refuse, before listing them, more kept tiles than a schedule can hold."""
    if kept > limits.MAX_TILES:
        raise AttncError(f"the schedule would keep {limits.show_count(kept)} tiles of [{q_tiles}, {kv_tiles}]; "
                         f"the limit is {limits.show_count(limits.MAX_TILES)} (attnc.limits.MAX_TILES)")
    size = kept * 20 + (q_tiles + 1) * 8  # two int64 coordinates and an int32 index per tile
    if size > limits.MAX_TILE_MAP_BYTES:
        raise AttncError(f"the schedule's tile lists would allocate {limits.show_bytes(size)} for "
                         f"{limits.show_count(kept)} kept tiles of {limits.show_shape((q_tiles, kv_tiles))}; the "
                         f"limit is {limits.show_bytes(limits.MAX_TILE_MAP_BYTES)} (attnc.limits.MAX_TILE_MAP_BYTES)")


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
