"""The smallest shape of each runtime tensor: what the spec can index, checked before a launch."""
from __future__ import annotations

import numpy as np

from .. import limits
from ..errors import AttncError
from ..ir import nodes as N
from ..ir.bind import MAX_TOKENS, Bound
from ..ir.evaluate import at, evaluate, lookups, pair_coords, part_expr, show
from ..ir.intervals import coord_ranges, int_range
from .dense import mask_bounds


def tensor_extents(bound: Bound, heads: int | None = None, batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """The smallest shape each runtime tensor must have so that every index the spec forms is in
    range; a negative index is an error. A per-head float table also has a leading [heads]
    dimension (not listed).

    Mask tensors are indexed at every token pair where the lookup is evaluated: everywhere,
    except where a guard on the left of `and` / `or` rules it out (kernels load with bounds
    checks, so what a guard rules out is never read). Their extents come from interval analysis
    under those guards (attnc/ir/intervals.py). Score modifiers are read only
    where a query sees a key, so their tables need to cover only the pairs the mask can make
    visible: `rel_bias[q.y - k.y + 6, ...]` under a 7 x 7 window. That is measured by scanning
    the possibly visible pairs (O(Nq * Nk), like tile analysis v1), and only when `heads` is
    given: modifier tables are checked when the attention runs.
    """
    need: dict[str, list[int]] = {}

    def widen(lk: N.Lookup, d: int, lo: int, hi: int) -> None:
        if lo < 0:
            raise AttncError(f"index `{show(lk.indices[d])}` into '{lk.tensor}' can be negative ({lo}) for "
                             f"{bound.describe()}", bound.ir.span_of(lk))
        if hi >= MAX_TOKENS:
            raise AttncError(f"index `{show(lk.indices[d])}` into '{lk.tensor}' can reach {hi} for "
                             f"{bound.describe()}; runtime tensors are indexed in int32", bound.ir.span_of(lk))
        dims = need.setdefault(lk.tensor, [0] * len(lk.indices))
        dims[d] = max(dims[d], hi + 1)

    def read(lk: N.Lookup, idx) -> None:
        for d, r in enumerate(idx):
            widen(lk, d, *r)

    for qpart, part in bound.pairs:
        # Indices are ranged where they are read: a guard on the left of `and` / `or` narrows
        # them (`k.i >= P and anc[q.i, k.i - P] == 1` never indexes below 0).
        # A mask that reads `head` (`batch`) indexes by the query heads (sequences) of the call
        # (one without `heads` (`batch`): fn.mask).
        ranges = coord_ranges(bound, part, heads=1 if heads is None else heads, q_part=qpart,
                              batch=1 if batch is None else batch)
        int_range(part_expr(bound.ir.mask, part.name, qpart.name), bound.env, ranges, on_lookup=read)
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
    limits.check_count("checking where bias tables are read", bound.nq * bound.nk * heads,
                       limits.MAX_ANALYSED_PAIRS, "MAX_ANALYSED_PAIRS", unit="(head, query, key) triples")
    found: dict[tuple[N.Lookup, int], list[int]] = {}
    rows_per_chunk = max(1, (1 << 22) // max(1, bound.nk * heads))
    keys = np.arange(bound.nk)
    for start in range(0, bound.nq, rows_per_chunk):
        rows = np.arange(start, min(bound.nq, start + rows_per_chunk))
        _, possible = mask_bounds(bound, rows, keys)
        for qpart, sel_q, part, sel, coords in pair_coords(bound, rows, keys):
            seen = possible[at(sel_q, sel)][None]  # [1, part rows, part keys]
            if not seen.any():
                continue
            coords = {key: v[None] for key, v in coords.items()} | {("q", "head"): head}
            for lk in lookups(part_expr(bound.ir.score.logit_bias, part.name, qpart.name)):
                for d, idx in enumerate(lk.indices):
                    # Read only where visible: what a hidden pair would index is no error.
                    val = np.broadcast_to(np.asarray(evaluate(idx, bound.env, coords, live=seen)),
                                          np.broadcast_shapes(seen.shape, (heads, 1, 1)))
                    val = val[np.broadcast_to(seen, val.shape)]
                    if val.size:
                        r = found.setdefault((lk, d), [int(val.min()), int(val.max())])
                        r[0], r[1] = min(r[0], int(val.min())), max(r[1], int(val.max()))
    for (lk, d), (lo, hi) in found.items():
        yield lk, d, lo, hi




def tensor_divisors(ir: N.Attention) -> list[N.Binary]:
    """The `//` and `%` of the mask whose divisor reads a runtime tensor."""
    return [x for x in N.walk(ir.mask, expand_windows=True)
            if isinstance(x, N.Binary) and x.op in ("//", "%") and any(isinstance(y, N.Lookup) for y in N.walk(x.rhs))]


def check_divisors(bound: Bound, tensors, spec=None) -> None:
    """Refuse a call whose runtime tensors could make a mask divisor 0 where it is evaluated
    (`q.i // len[k.i]` with a 0 in `len`): kernels would divide by zero silently.

    Sound and conservative: each lookup ranges over the minimum and maximum of the tensor's
    entries at the indices it can take (interval analysis under guards, so `len[k.i] > 0 and
    q.i // len[k.i] == 1` passes), not over the entries actually read at each pair. `tensors`
    maps names to torch tensors or arrays; `spec` (an attnc.Spec) lets the error quote the line.
    """
    divisors = tensor_divisors(bound.ir)
    if not divisors:
        return
    data = {}

    def array(name: str) -> np.ndarray:
        if name not in data:
            t = tensors[name]
            if hasattr(t, "detach"):  # torch
                t = t.detach().cpu().numpy()
            data[name] = np.asarray(t).astype(np.int64, copy=False)
        return data[name]

    def value(lk: N.Lookup, idx):
        if lk.tensor not in tensors:
            return None  # int32, as kernels read it
        a = array(lk.tensor)
        box = tuple(slice(max(lo, 0), min(hi, n - 1) + 1) for (lo, hi), n in zip(idx, a.shape))
        sub = a[box]
        return (int(sub.min()), int(sub.max())) if sub.size else None

    def divide(x: N.Binary, divisor) -> None:
        if divisor[0] <= 0 <= divisor[1] and any(isinstance(y, N.Lookup) for y in N.walk(x.rhs)):
            read = sorted({y.tensor for y in N.walk(x.rhs) if isinstance(y, N.Lookup)})
            err = AttncError(
                f"the divisor `{show(x.rhs)}` in `{show(x)}` can be 0 for this call: runtime tensor"
                f"{'s' if len(read) > 1 else ''} {', '.join(repr(r) for r in read)} give"
                f"{'' if len(read) > 1 else 's'} it values in [{divisor[0]}, {divisor[1]}] where the mask reads it",
                bound.ir.span_of(x),
                hint="make the tensor nonzero there, or guard the division (`d[k.i] > 0 and q.i // d[k.i] ...`); "
                     "the check uses the range of the entries the spec can read, so it may be conservative")
            if spec is not None:
                err.with_source(spec.text, spec.filename)
            raise err

    for qpart, part in bound.pairs:
        int_range(part_expr(bound.ir.mask, part.name, qpart.name), bound.env, coord_ranges(bound, part, q_part=qpart),
                  lookup=value, on_divide=divide)
