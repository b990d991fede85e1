"""Per-call schedules per query head, for masks that read `head` (DuoAttention's retrieval and
streaming heads: `causal and (retrieval[head] == 1 or k.i < S or q.i - k.i < W)`).

The compiled schedule classifies such a mask with the head unknown (any head: sound, so tiles
that depend on the head are PARTIAL). Per call, the mask is specialised to each head: `head`
becomes the constant h, a runtime tensor read at constant indices (`retrieval[h]`) becomes its
value, and the result is folded; heads whose specialised masks are equal share one
classification (analysis/data.py's, with the call's data for what still reads tensors). The
kernels then take one CSR row per (batch * head, q tile), as routed specs do, and dK/dV one per
(batch * kv head, kv tile): the union over the query heads of the kv head's group (FULL only
where FULL for every one of them; the per-element mask, which receives the head, decides the rest).
"""
from __future__ import annotations


import numpy as np

from ..ir import nodes as N
from ..ir.evaluate import part_expr, reads_tensors
from .data import data_lookup
from .tiles import EMPTY, FULL, PARTIAL, Schedule, classify_tiles


def specialise_head(e: N.Expr, head: int, ints: dict[str, np.ndarray]) -> N.Expr:
    """The mask for one head: head -> h, reads at constant in-range indices -> their values."""
    def fn(x):
        if isinstance(x, N.Head):
            return N.Const(head)
        return None

    e = N.substitute(e, fn)

    def value(x):
        if isinstance(x, N.Lookup) and x.tensor in ints and all(isinstance(i, N.Const) for i in x.indices):
            data = ints[x.tensor]
            at = tuple(int(i.value) for i in x.indices)
            if data.ndim == len(at) and all(0 <= a < d for a, d in zip(at, data.shape)):
                return N.Const(int(data[at]))
        return None

    return N.substitute(e, value)


def head_classes(static: Schedule, ints: dict[str, np.ndarray], heads: int) -> np.ndarray:
    """int8 [heads, q tiles, kv tiles]: each head's tile classes under this call's data."""
    bound, layout = static.bound, static.layout
    n_qt, n_kt = static.q_tiles, static.kv_tiles
    out = np.zeros((heads, n_qt, n_kt), np.int8)
    seen: dict[tuple, np.ndarray] = {}
    for h in range(heads):
        exprs = tuple(specialise_head(part_expr(bound.ir.mask, kp.name, qp.name), h, ints) for qp, kp in bound.pairs)
        if exprs not in seen:
            data = any(reads_tensors(e) for e in exprs)
            (fq, fk), (pq, pk) = classify_tiles(bound, list(exprs), layout, static.block_m, static.block_n,
                                                lookup=data_lookup(ints) if data else None)
            cls = np.full((n_qt, n_kt), EMPTY, np.int8)
            cls[pq, pk] = PARTIAL
            cls[fq, fk] = FULL
            seen[exprs] = cls
        out[h] = seen[exprs]
    return out


def head_tables(static: Schedule, ints: dict[str, np.ndarray], batch: int, heads: int, kv_heads: int) -> dict:
    """The kernels' schedule arguments (numpy int32) for a per-head mask: FULL_*/PART_* per
    (batch * head, q tile), FULL_T_*/PART_T_* per (batch * kv head, kv tile)."""
    cls = head_classes(static, ints, heads)
    group = cls.reshape(kv_heads, heads // kv_heads, *cls.shape[1:])
    full_t = (group == FULL).all(1)
    part_t = (group != EMPTY).any(1) & ~full_t
    out = {}
    for name, grids in (("", (cls == FULL, cls == PARTIAL)),
                        ("_T", (full_t.transpose(0, 2, 1), part_t.transpose(0, 2, 1)))):
        for kind, keep in zip(("FULL", "PART"), grids):
            keep = np.broadcast_to(keep[None], (batch, *keep.shape)).reshape(-1, keep.shape[-1])
            ptr = np.zeros(keep.shape[0] + 1, np.int64)
            ptr[1:] = np.cumsum(keep.sum(1))
            out[f"{kind}{name}_PTR"] = ptr
            out[f"{kind}{name}_IDX"] = np.nonzero(keep)[1]
    return out


__all__ = ["head_classes", "head_tables", "specialise_head"]
