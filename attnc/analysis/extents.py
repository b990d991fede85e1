"""The smallest shape of each runtime tensor: what the spec can index, checked before a launch."""
from __future__ import annotations

import numpy as np

from ..errors import AttncError
from ..ir import nodes as N
from ..ir.bind import MAX_TOKENS, Bound
from ..ir.evaluate import evaluate, lookups, pair_coords, part_expr, show
from ..ir.intervals import coord_ranges, int_range
from .tiles import mask_bounds

def tensor_extents(bound: Bound, heads: int | None = None) -> dict[str, tuple[int, ...]]:
    """The smallest shape each runtime tensor must have so that every index the spec forms is in
    range; a negative index is an error. A per-head float table also has a leading [heads]
    dimension (not listed).

    Mask tensors are indexed at every token pair (the kernel evaluates the mask on whole tiles),
    so their extents come from interval analysis over all pairs. Score modifiers are read only
    where a query sees a key, so their tables need to cover only the pairs the mask can make
    visible: `rel_bias[q.y - k.y + 6, ...]` under a 7 x 7 window. That is measured by scanning
    the possibly visible pairs (O(Nq * Nk), like tile analysis v1), and only when `heads` is
    given: modifier tables are checked when the attention runs.
    """
    need: dict[str, list[int]] = {}

    def widen(lk: N.Lookup, d: int, lo: int, hi: int) -> None:
        if lo < 0:
            raise AttncError(f"index `{show(lk.indices[d])}` into '{lk.tensor}' can be negative ({lo}) for "
                             f"{bound.describe()}")
        if hi >= MAX_TOKENS:
            raise AttncError(f"index `{show(lk.indices[d])}` into '{lk.tensor}' can reach {hi} for "
                             f"{bound.describe()}; runtime tensors are indexed in int32")
        dims = need.setdefault(lk.tensor, [0] * len(lk.indices))
        dims[d] = max(dims[d], hi + 1)

    for part in bound.kv_parts:
        ranges = coord_ranges(bound, part)
        for lk in lookups(part_expr(bound.ir.mask, part.name)):
            for d, idx in enumerate(lk.indices):
                widen(lk, d, *int_range(idx, bound.env, ranges))
    if heads is not None and bound.ir.score.logit_bias is not None:
        for lk, d, lo, hi in _visible_index_ranges(bound, heads):
            widen(lk, d, lo, hi)
    if heads is not None and bound.ir.score.sink is not None:
        # The sink is read once per head, whatever the mask.
        for lk in lookups(bound.ir.score.sink):
            for d, idx in enumerate(lk.indices):
                val = np.broadcast_to(evaluate(idx, bound.env, {("q", "head"): np.arange(heads)}), (heads,))
                widen(lk, d, int(val.min()), int(val.max()))
    return {k: tuple(v) for k, v in need.items()}


def _visible_index_ranges(bound: Bound, heads: int):
    """(lookup, dimension, min, max) of every modifier index over the possibly visible pairs."""
    head = np.arange(heads)[:, None, None]
    found: dict[tuple[N.Lookup, int], list[int]] = {}
    rows_per_chunk = max(1, (1 << 22) // max(1, bound.nk * heads))
    keys = np.arange(bound.nk)
    for start in range(0, bound.nq, rows_per_chunk):
        rows = np.arange(start, min(bound.nq, start + rows_per_chunk))
        _, possible = mask_bounds(bound, rows, keys)
        for part, sel, coords in pair_coords(bound, rows, keys):
            seen = possible[:, sel][None]  # [1, rows, part keys]
            if not seen.any():
                continue
            coords = {key: v[None] for key, v in coords.items()} | {("q", "head"): head}
            for lk in lookups(part_expr(bound.ir.score.logit_bias, part.name)):
                for d, idx in enumerate(lk.indices):
                    val = np.broadcast_to(np.asarray(evaluate(idx, bound.env, coords)),
                                          np.broadcast_shapes(seen.shape, (heads, 1, 1)))
                    val = val[np.broadcast_to(seen, val.shape)]
                    if val.size:
                        r = found.setdefault((lk, d), [int(val.min()), int(val.max())])
                        r[0], r[1] = min(r[0], int(val.min())), max(r[1], int(val.max()))
    for (lk, d), (lo, hi) in found.items():
        yield lk, d, lo, hi


