"""Pairwise three-valued evaluation of the mask on explicit token pairs: the bias-table extents
scan, and row counts inside PARTIAL tiles. Work is proportional to the pairs asked for."""
from __future__ import annotations

import numpy as np

from ..ir import nodes as N
from ..ir.bind import Bound
from ..ir.evaluate import at, evaluate, pair_coords, pair_count, part_expr, reads_tensors, per_row


def mask_bounds(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(certainly visible, possibly visible) without runtime data: three-valued evaluation in
    which every comparison that reads a runtime tensor (or the head) is unknown."""
    shape = (len(q_idx), len(k_idx))
    lo_out, hi_out = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    for qpart, sel_q, part, sel, coords in pair_coords(bound, q_idx, k_idx):

        def rec(e: N.Expr, live):
            # live: where e may be evaluated. The right side of `and` / `or` is evaluated only
            # where the left side may not decide (docs/language.md, guards); an error there
            # (division by zero) is refused even when only runtime data could rule it out.
            if not reads_tensors(e) and not per_row(e):  # head, batch: unknown here, like data
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

        lo, hi = rec(part_expr(bound.ir.mask, part.name, qpart.name), None)
        part_shape = pair_count(sel_q, sel, len(q_idx))
        lo_out[at(sel_q, sel)] = np.broadcast_to(lo, part_shape)
        hi_out[at(sel_q, sel)] = np.broadcast_to(hi, part_shape)
    return lo_out, hi_out
