"""Per-call schedules for masks that read runtime tensors (document ids, lengths).

The compile-time schedule cannot know the data, so tiles that depend on it are PARTIAL. At call
time the same symbolic classification runs again with each lookup's value range taken from the
data: `doc[q.i]` over a box of query tokens ranges over the smallest and largest id in that
range of tokens (a sparse table answers each range in O(1); building it is O(N log N)). So
`doc[q.i] == doc[k.i]` is certain on a tile whose queries and keys all hold one id, impossible
when their id ranges do not meet: packed documents get FULL tiles, as FlashMask's per-column
bounds do. Tensors of rank > 1 use their whole value range (sound, coarse).
"""
from __future__ import annotations

import math

import numpy as np

from ..ir import nodes as N
from ..ir.evaluate import part_expr
from .tiles import Schedule, _csr, classify_tiles


class RangeTable:
    """Range minimum and maximum over a 1-D integer array (a sparse table)."""

    def __init__(self, values: np.ndarray):
        v = np.asarray(values, dtype=np.int64).reshape(-1)
        self.n = len(v)
        self.mins, self.maxs = [v], [v]
        width = 1
        while 2 * width <= self.n:
            lo, hi = self.mins[-1], self.maxs[-1]
            self.mins.append(np.minimum(lo[:-width], lo[width:]))
            self.maxs.append(np.maximum(hi[:-width], hi[width:]))
            width *= 2

    def query(self, lo, hi) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) over [lo, hi] per entry, indices clipped to the array (an index outside it
        is never read where the mask is evaluated: extents and guards ensure that)."""
        lo = np.clip(lo, 0, self.n - 1)
        hi = np.clip(hi, 0, self.n - 1)
        lo, hi = np.broadcast_arrays(np.minimum(lo, hi), np.maximum(lo, hi))
        level = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
        out_lo = np.empty(lo.shape, dtype=np.int64)
        out_hi = np.empty(lo.shape, dtype=np.int64)
        for k in np.unique(level):
            sel = level == k
            a, b = lo[sel], hi[sel] - (1 << int(k)) + 1
            out_lo[sel] = np.minimum(self.mins[k][a], self.mins[k][b])
            out_hi[sel] = np.maximum(self.maxs[k][a], self.maxs[k][b])
        return out_lo, out_hi


def data_lookup(ints: dict[str, np.ndarray]):
    """A `lookup` for symbolic evaluation that reads value ranges from the call's data."""
    tables: dict[str, RangeTable] = {}
    whole = {name: (int(a.min()), int(a.max())) if a.size else (0, 0) for name, a in ints.items()}

    def lookup(node: N.Lookup, index):
        data = ints[node.tensor]
        if data.size == 0:
            return np.int64(0), np.int64(0)
        if data.ndim != 1:
            lo, hi = whole[node.tensor]
            return np.int64(lo), np.int64(hi)
        if node.tensor not in tables:
            tables[node.tensor] = RangeTable(data)
        return tables[node.tensor].query(*index[0])

    return lookup


def data_schedule(static: Schedule, ints: dict[str, np.ndarray]) -> Schedule:
    """The schedule for this call's runtime tensors: the static one reclassified with the data."""
    bound, layout = static.bound, static.layout
    exprs = [part_expr(bound.ir.mask, kp.name, qp.name) for qp, kp in bound.pairs]
    (fq, fk), partial = classify_tiles(bound, exprs, layout, static.block_m, static.block_n,
                                       lookup=data_lookup(ints))
    n_qt, n_kt = math.ceil(bound.nq / static.block_m), math.ceil(bound.nk / static.block_n)
    full_ptr, full_idx = _csr(fq, fk, n_qt, n_kt)
    part_ptr, part_idx = _csr(*partial, n_qt, n_kt)
    return Schedule(static.block_m, static.block_n, static.nq, static.nk, full_ptr, full_idx, part_ptr, part_idx,
                    exact=True, layout=layout, bound=bound, tensors=ints)
