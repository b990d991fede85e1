"""Per-call schedules per query head, for masks that read `head` (DuoAttention's retrieval and
streaming heads: `causal and (retrieval[head] == 1 or k.i < S or q.i - k.i < W)`), and per
(sequence, head) for masks that read `batch` (`doc[batch, q.i] == doc[batch, k.i]`: a different
packing per sequence).

The compiled schedule classifies such a mask with the head unknown (any head: sound, so tiles
that depend on the head are PARTIAL). Per call, the mask is specialised to each head: `head`
becomes the constant h (and `batch` the sequence b: rows are then (b, h)), a runtime tensor read at constant indices (`retrieval[h]`) becomes its
value, and the result is folded; heads whose specialised masks are equal share one
classification (analysis/data.py's, with the call's data for what still reads tensors). The
kernels then take one CSR row per (batch * head, q tile), as routed specs do, and dK/dV one per
(batch * kv head, kv tile): the union over the query heads of the kv head's group (FULL only
where FULL for every one of them; the per-element mask, which receives the head, decides the rest).
"""
from __future__ import annotations


import numpy as np

from ..ir import nodes as N
from ..ir.evaluate import part_expr, per_batch, reads_tensors
from .data import data_lookup
from .tiles import EMPTY, FULL, PARTIAL, Schedule, classify_tiles


def specialise_head(e: N.Expr, head: int, ints: dict[str, np.ndarray], batch: int = 0) -> N.Expr:
    """The mask for one head (and sequence): head -> h, batch -> b, reads at constant in-range
    indices -> their values. A read whose leading indices only are constant (`doc[1, q.i]`)
    becomes a read of that slice, added to `ints` under the name `doc[1]` (analysis/data.py
    then ranges it by value, as a 1-D tensor)."""
    def fn(x):
        if isinstance(x, N.Head):
            return N.Const(head)
        if isinstance(x, N.Batch):
            return N.Const(batch)
        return None

    e = N.substitute(e, fn)

    def value(x):
        if not (isinstance(x, N.Lookup) and x.tensor in ints):
            return None
        data = ints[x.tensor]
        lead = 0
        while lead < len(x.indices) and isinstance(x.indices[lead], N.Const):
            lead += 1
        at = tuple(int(i.value) for i in x.indices[:lead])
        if lead == 0 or data.ndim != len(x.indices) or not all(0 <= a < d for a, d in zip(at, data.shape)):
            return None
        if lead == len(x.indices):
            return N.Const(int(data[at]))
        name = f"{x.tensor}[{', '.join(map(str, at))}]"
        ints.setdefault(name, np.ascontiguousarray(data[at]))
        return N.Lookup(name, x.indices[lead:], x.type)

    return N.substitute(e, value)


def head_classes(static: Schedule, ints: dict[str, np.ndarray], heads: int) -> np.ndarray:
    """int8 [heads, q tiles, kv tiles]: each head's tile classes under this call's data (of the
    first sequence, for a mask that reads `batch`)."""
    return row_classes(static, ints, heads, 1)[0]


def row_classes(static: Schedule, ints: dict[str, np.ndarray], heads: int, batch: int) -> np.ndarray:
    """int8 [batch, heads, q tiles, kv tiles]: each (sequence, head)'s tile classes under this
    call's data (one sequence, broadcast, when the mask does not read `batch`)."""
    bound, layout = static.bound, static.layout
    n_qt, n_kt = static.q_tiles, static.kv_tiles
    rows = batch if per_batch(bound.ir.mask) else 1
    out = np.zeros((rows, heads, n_qt, n_kt), np.int8)
    seen: dict[tuple, np.ndarray] = {}
    ints = dict(ints)  # slices are added per call
    for b, h in np.ndindex(rows, heads):
        exprs = tuple(specialise_head(part_expr(bound.ir.mask, kp.name, qp.name), h, ints, b)
                      for qp, kp in bound.pairs)
        if exprs not in seen:
            data = any(reads_tensors(e) for e in exprs)
            (fq, fk), (pq, pk) = classify_tiles(bound, list(exprs), layout, static.block_m, static.block_n,
                                                lookup=data_lookup(ints) if data else None)
            cls = np.full((n_qt, n_kt), EMPTY, np.int8)
            cls[pq, pk] = PARTIAL
            cls[fq, fk] = FULL
            seen[exprs] = cls
        out[b, h] = seen[exprs]
    return np.broadcast_to(out, (batch, heads, n_qt, n_kt))


def head_tables(static: Schedule, ints: dict[str, np.ndarray], batch: int, heads: int, kv_heads: int) -> dict:
    """The kernels' schedule arguments (numpy int32) for a per-head (per-sequence) mask: FULL_*/PART_* per
    (batch * head, q tile), FULL_T_*/PART_T_* per (batch * kv head, kv tile)."""
    cls = row_classes(static, ints, heads, batch)
    group = cls.reshape(batch, kv_heads, heads // kv_heads, *cls.shape[2:])
    full_t = (group == FULL).all(2).reshape(batch * kv_heads, *cls.shape[2:])
    part_t = (group != EMPTY).any(2).reshape(batch * kv_heads, *cls.shape[2:]) & ~full_t
    cls = cls.reshape(batch * heads, *cls.shape[2:])
    out = {}
    for name, grids in (("", (cls == FULL, cls == PARTIAL)),
                        ("_T", (full_t.transpose(0, 2, 1), part_t.transpose(0, 2, 1)))):
        for kind, keep in zip(("FULL", "PART"), grids):
            keep = keep.reshape(-1, keep.shape[-1])
            ptr = np.zeros(keep.shape[0] + 1, np.int64)
            ptr[1:] = np.cumsum(keep.sum(1))
            out[f"{kind}{name}_PTR"] = ptr
            out[f"{kind}{name}_IDX"] = np.nonzero(keep)[1]
    return out


__all__ = ["head_classes", "head_tables", "row_classes", "specialise_head"]
