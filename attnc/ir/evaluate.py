"""What an IR expression means: a vectorised evaluator over numpy coordinate arrays, and the
mask evaluated on a block of (query, key) pairs. Binding, analysis, host-side preparation and the
reference backend all evaluate through here, so they share one definition of the arithmetic.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Mapping

import numpy as np

from .. import limits
from ..errors import AttncError
from . import bits
from . import nodes as N
from .printer import format_expr

if TYPE_CHECKING:
    from .bind import Bound


def show(e: N.Expr) -> str:
    return format_expr(e)


@functools.lru_cache(maxsize=256)
def part_expr(e: N.Expr, segment: str | None, q_segment: str | None = None) -> N.Expr:
    """An expression (mask or bias) as seen by keys of one segment and queries of one query
    segment (cached: IR is hashable)."""
    return N.specialise(e, segment, q_segment)


def windows(e: N.Expr):
    """All Window nodes in an expression."""
    return [x for x in N.walk(e) if isinstance(x, N.Window)]


# -- evaluation -------------------------------------------------------------------------------
_ARITH = {
    "+": np.add, "-": np.subtract, "*": np.multiply, "min": np.minimum, "max": np.maximum,
    "==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
    ">=": np.greater_equal, "and": np.logical_and, "or": np.logical_or,
}
_FLOAT_FUNCS = {"sqrt": np.sqrt, "log": np.log, "exp": np.exp}


def evaluate(e: N.Expr, values: Mapping[str, int | float], coords: Mapping[tuple[str, str], np.ndarray],
             head_dim: int | None = None, tensors: Mapping[str, np.ndarray] | None = None, strict: bool = True,
             live=None, span_of=None):
    """Evaluate an expression; coordinates are int64 arrays that broadcast against each other.

    `tensors` holds the runtime tensors (int64 numpy arrays) that Lookup nodes read. With
    strict=False a true division by zero gives inf or nan instead of an error: score modifiers
    are evaluated at every pair, and only the values at visible pairs are checked (by the caller).

    Guards (docs/language.md, "Runtime tensors"): in `a and b`, b is evaluated only where a
    holds; in `a or b`, only where a fails. Evaluation is vectorised, so b is computed at every
    element, but an out-of-range index or a division by zero is an error only where b is *live*;
    elsewhere the index is clipped and the divisor replaced, and the value (never used) is
    arbitrary. `live` (a bool array broadcasting against the coordinates, None for everywhere)
    says where e itself is evaluated. `span_of` (an IR's Attention.span_of) locates a division by
    zero in the spec.
    """
    tensors = tensors or {}

    def anywhere(cond, live) -> bool:
        cond = np.asarray(cond)
        if live is None:
            return bool(cond.any())
        return bool(np.logical_and(cond, live).any())

    def domain(e: N.Expr, bad, operand, live):
        """Where a shift count or an ilog2 argument is out of its domain: an error where live (as
        a division by zero), else replaced by the caller (the value is never used)."""
        bad = np.asarray(bad)
        if bad.any() and anywhere(bad, live):
            at = np.broadcast_arrays(operand, bad if live is None else np.logical_and(bad, live))
            what = bits.undefined(e)[2]
            raise AttncError(f"{what} in `{show(e)}`: {show(bits.undefined(e)[0])} = {int(at[0][at[1]].flat[0])}",
                             span_of(e) if span_of else None)
        return bad

    def rec(e: N.Expr, live):
        if isinstance(e, N.Lookup):
            if e.tensor not in tensors:
                raise AttncError(f"the mask reads runtime tensor '{e.tensor}'; pass it, e.g. {e.tensor}=tensor")
            table = tensors[e.tensor]
            idx = [np.asarray(rec(i, live)) for i in e.indices]
            for d, (i, size) in enumerate(zip(idx, table.shape)):
                bad = (i < 0) | (i >= size)
                if bad.any():
                    if anywhere(bad, live):
                        vals, hit = np.broadcast_arrays(i, bad if live is None else np.logical_and(bad, live))
                        at = vals[hit]
                        raise AttncError(f"index {int(at.flat[0])} is out of range for dimension {d} of '{e.tensor}' "
                                         f"(size {size}) in `{show(e)}`")
                    if size == 0:  # never read where it is live: any value will do
                        return np.zeros(np.broadcast_shapes(*(j.shape for j in idx)), dtype=table.dtype)
                    idx[d] = np.clip(i, 0, size - 1)  # not live there: the value is never used
            return table[tuple(np.broadcast_arrays(*idx))] if len(idx) > 1 else table[idx[0]]
        if isinstance(e, N.Const):
            return e.value
        if isinstance(e, N.Param):
            return values[e.name]
        if isinstance(e, N.HeadDim):
            if head_dim is None:
                raise AttncError("head_dim is only known when the attention runs")
            return head_dim
        if isinstance(e, N.NVisible):
            if ("q", "n_visible") not in coords:
                raise AttncError("n_visible is only defined in a score's scale and bias")
            return coords[("q", "n_visible")]
        if isinstance(e, N.Coord):
            return coords[(e.side, e.axis)]
        if isinstance(e, N.Head):
            return coords[("q", "head")]
        if isinstance(e, N.Batch):
            return coords[("q", "batch")]
        if isinstance(e, N.Window):
            return rec(e.expand(), live)
        if isinstance(e, N.Unary) and e.op == "ilog2":
            x = np.asarray(rec(e.operand, live), dtype=np.int64)
            out = bits.ilog2_np(np.where(domain(e, x <= 0, x, live), 1, x))
            return out[()] if out.ndim == 0 else out
        if isinstance(e, N.Unary):
            x = rec(e.operand, live)
            return np.logical_not(x) if e.op == "not" else np.negative(x) if e.op == "neg" else np.abs(x)
        if isinstance(e, N.Call):
            x = np.asarray(rec(e.args[0], live), dtype=np.float64)
            # Out-of-domain values become nan/inf here and are reported by whoever uses them.
            with np.errstate(all="ignore"):
                out = _FLOAT_FUNCS[e.fn](x)
            return out.item() if out.ndim == 0 else out
        if isinstance(e, N.Binary):
            a = rec(e.lhs, live)
            if e.op in ("and", "or"):
                # The right side is live where the left side does not decide the result.
                a = np.asarray(a, dtype=bool)
                inner = a if e.op == "and" else ~a
                inner = inner if live is None else np.logical_and(live, inner)
                if not inner.any():
                    return a  # the left side decides everywhere: the right side is never read
                b = rec(e.rhs, inner)
                return _ARITH[e.op](a, b)
            b = rec(e.rhs, live)
            if e.op in N.BIT_OPS:
                if e.op in ("<<", ">>"):
                    b = np.asarray(b, dtype=np.int64)
                    b = np.where(domain(e, (b < bits.SHIFT_LO) | (b > bits.SHIFT_HI), b, live), 0, b)
                return bits.apply(e.op, a, b)
            if e.op in ("//", "%", "/"):
                if e.op == "/" and not strict:
                    with np.errstate(all="ignore"):
                        return np.true_divide(np.asarray(a, dtype=np.float64), b)
                zero = np.asarray(b) == 0
                if zero.any():
                    if anywhere(zero, live):
                        raise AttncError(f"division by zero in `{show(e)}`", span_of(e) if span_of else None)
                    b = np.where(zero, 1, b)  # not live there: the quotient is never used
                if e.op == "/":
                    return np.true_divide(a, b)
                return np.floor_divide(a, b) if e.op == "//" else np.remainder(a, b)
            return _ARITH[e.op](a, b)
        raise TypeError(f"not an IR expression: {e!r}")

    # Integer arithmetic where a guard rules a pair out may wrap: that value is never used.
    with np.errstate(over="ignore"):
        return rec(e, live)


def evaluate_uniform(e: N.Expr, values, head_dim: int | None = None) -> int | float:
    out = evaluate(e, values, {}, head_dim)
    return out.item() if isinstance(out, np.generic) else out


def decode(dims: tuple[int, ...], axes: tuple[str, ...], flat: np.ndarray) -> dict[str, np.ndarray]:
    """Row-major flat token index -> coordinates per axis (plus 'i', the flat index itself)."""
    out = {"i": flat}
    rest = flat
    for axis, size in zip(reversed(axes), reversed(dims)):
        out[axis] = rest % size
        rest = rest // size
    return out



def pair_coords(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray):
    """Per (query segment, key segment): (query part, selection of q_idx in it, key part,
    selection of k_idx in it, pair coordinates [selected queries, selected keys]). Coordinates
    are those within each token's own segment. `sel_q` is None when every query is selected."""
    q_idx, k_idx = q_idx.astype(np.int64), k_idx.astype(np.int64)
    for qpart in bound.q_parts:
        sel_q = (q_idx >= qpart.offset) & (q_idx < qpart.offset + qpart.size)
        if not sel_q.any():
            continue
        whole = bool(sel_q.all())
        qc = decode(qpart.dims, qpart.space.axes, (q_idx if whole else q_idx[sel_q])[:, None] - qpart.offset)
        qc = {("q", a): v for a, v in qc.items()}
        for part in bound.kv_parts:
            sel = (k_idx >= part.offset) & (k_idx < part.offset + part.size)
            if not sel.any():
                continue
            kc = decode(part.dims, part.space.axes, k_idx[sel][None, :] - part.offset)
            yield qpart, None if whole else sel_q, part, sel, qc | {("k", a): v for a, v in kc.items()}


def at(sel_q, sel):
    """Index of the [queries, keys] block pair_coords selected, for an array [queries, keys]."""
    return (slice(None), sel) if sel_q is None else np.ix_(sel_q, sel)


def pair_count(sel_q, sel, n_q: int) -> tuple[int, int]:
    return (n_q if sel_q is None else int(sel_q.sum())), int(sel.sum())


def mask_block(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray, tensors=None,
               what: str = "fn.mask()", head: int | None = None, batch: int | None = None) -> np.ndarray:
    """Visibility of queries q_idx against keys k_idx: bool [len(q_idx), len(k_idx)], for query
    head `head` and sequence `batch` of the batch (needed when the mask reads `head`, `batch`).

    The output is refused above limits.MAX_DENSE_MASK_BYTES (`what` names the caller in the
    message); it is evaluated in chunks of rows, so the int64 intermediates stay small."""
    shape = (len(q_idx), len(k_idx))
    limits.check_bytes(what, shape, 1, limits.MAX_DENSE_MASK_BYTES, "MAX_DENSE_MASK_BYTES")
    out = np.zeros(shape, dtype=bool)
    step = max(1, limits.EVAL_CHUNK_PAIRS // max(1, len(k_idx)))
    for start in range(0, len(q_idx), step):
        rows = q_idx[start:start + step]
        block = out[start:start + len(rows)]
        for qpart, sel_q, part, sel, coords in pair_coords(bound, rows, k_idx):
            if head is not None:
                coords = coords | {("q", "head"): np.int64(head)}
            elif per_head(bound.ir.mask):
                raise AttncError(f"{what}: this mask reads `head`; ask for one head's visibility")
            if batch is not None:
                coords = coords | {("q", "batch"): np.int64(batch)}
            elif per_batch(bound.ir.mask):
                raise AttncError(f"{what}: this mask reads `batch`; ask for one sequence's visibility")
            m = evaluate(part_expr(bound.ir.mask, part.name, qpart.name), bound.env, coords, tensors=tensors,
                         span_of=bound.ir.span_of)
            block[at(sel_q, sel)] = np.broadcast_to(np.asarray(m, dtype=bool), pair_count(sel_q, sel, len(rows)))
    return out



def lookups(e: N.Expr) -> list[N.Lookup]:
    return [x for x in N.walk(e) if isinstance(x, N.Lookup)]


def reads_tensors(e: N.Expr) -> bool:
    return any(isinstance(x, N.Lookup) for x in N.walk(e))


def per_head(e: N.Expr) -> bool:
    """Does the expression read the query head index (a mask that differs per head)?"""
    return any(isinstance(x, N.Head) for x in N.walk(e, expand_windows=True))


def per_batch(e: N.Expr) -> bool:
    """Does the expression read the batch index (a mask that differs per sequence)?"""
    return any(isinstance(x, N.Batch) for x in N.walk(e, expand_windows=True))


def per_row(e: N.Expr) -> bool:
    """Does the mask differ per (batch, head): scheduled per call, per row (analysis/rows.py)?"""
    return any(isinstance(x, (N.Head, N.Batch)) for x in N.walk(e, expand_windows=True))


def modifier_exprs(ir: N.Attention) -> list[N.Expr]:
    return [e for e in (ir.score.logit_bias, ir.score.sink) if e is not None]


