"""What an IR expression means: a vectorised evaluator over numpy coordinate arrays, and the
mask evaluated on a block of (query, key) pairs. Binding, analysis, host-side preparation and the
reference backend all evaluate through here, so they share one definition of the arithmetic.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..errors import AttncError
from . import nodes as N
from .printer import format_expr

if TYPE_CHECKING:
    from .bind import Bound


def show(e: N.Expr) -> str:
    return format_expr(e)


@functools.lru_cache(maxsize=256)
def part_expr(e: N.Expr, segment: str | None) -> N.Expr:
    """An expression (mask or bias) as seen by keys of one segment (cached: IR is hashable)."""
    return N.specialise(e, segment)


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
             head_dim: int | None = None, tensors: Mapping[str, np.ndarray] | None = None, strict: bool = True):
    """Evaluate an expression; coordinates are int64 arrays that broadcast against each other.

    `tensors` holds the runtime tensors (int64 numpy arrays) that Lookup nodes read. With
    strict=False a true division by zero gives inf or nan instead of an error: score modifiers
    are evaluated at every pair, and only the values at visible pairs are checked (by the caller).
    """
    tensors = tensors or {}

    def rec(e: N.Expr):
        if isinstance(e, N.Lookup):
            if e.tensor not in tensors:
                raise AttncError(f"the mask reads runtime tensor '{e.tensor}'; pass it, e.g. {e.tensor}=tensor")
            table = tensors[e.tensor]
            idx = [np.asarray(rec(i)) for i in e.indices]
            for d, (i, size) in enumerate(zip(idx, table.shape)):
                if i.size and (i.min() < 0 or i.max() >= size):
                    raise AttncError(f"index {int(i.min()) if i.min() < 0 else int(i.max())} is out of range for "
                                     f"dimension {d} of '{e.tensor}' (size {size}) in `{show(e)}`")
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
        if isinstance(e, N.Window):
            return rec(e.expand())
        if isinstance(e, N.Unary):
            x = rec(e.operand)
            return np.logical_not(x) if e.op == "not" else np.negative(x) if e.op == "neg" else np.abs(x)
        if isinstance(e, N.Call):
            x = np.asarray(rec(e.args[0]), dtype=np.float64)
            # Out-of-domain values become nan/inf here and are reported by whoever uses them.
            with np.errstate(all="ignore"):
                out = _FLOAT_FUNCS[e.fn](x)
            return out.item() if out.ndim == 0 else out
        if isinstance(e, N.Binary):
            a = rec(e.lhs)
            b = rec(e.rhs)
            if e.op in ("//", "%", "/"):
                if e.op == "/" and not strict:
                    with np.errstate(all="ignore"):
                        return np.true_divide(np.asarray(a, dtype=np.float64), b)
                if np.any(np.asarray(b) == 0):
                    raise AttncError(f"division by zero in `{show(e)}`")
                if e.op == "/":
                    return np.true_divide(a, b)
                return np.floor_divide(a, b) if e.op == "//" else np.remainder(a, b)
            return _ARITH[e.op](a, b)
        raise TypeError(f"not an IR expression: {e!r}")

    return rec(e)


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
    """Per key segment: (part, selection of k_idx in it, pair coordinates [len(q), selected])."""
    ir = bound.ir
    qc = decode(bound.q_dims, ir.q.axes, q_idx.astype(np.int64)[:, None])
    qc = {("q", a): v for a, v in qc.items()}
    k_idx = k_idx.astype(np.int64)
    for part in bound.kv_parts:
        sel = (k_idx >= part.offset) & (k_idx < part.offset + part.size)
        if not sel.any():
            continue
        kc = decode(part.dims, part.space.axes, k_idx[sel][None, :] - part.offset)
        yield part, sel, qc | {("k", a): v for a, v in kc.items()}


def mask_block(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray, tensors=None) -> np.ndarray:
    """Visibility of queries q_idx against keys k_idx: bool [len(q_idx), len(k_idx)]."""
    out = np.zeros((len(q_idx), len(k_idx)), dtype=bool)
    for part, sel, coords in pair_coords(bound, q_idx, k_idx):
        m = evaluate(part_expr(bound.ir.mask, part.name), bound.env, coords, tensors=tensors)
        out[:, sel] = np.broadcast_to(np.asarray(m, dtype=bool), (len(q_idx), int(sel.sum())))
    return out



def lookups(e: N.Expr) -> list[N.Lookup]:
    return [x for x in N.walk(e) if isinstance(x, N.Lookup)]


def reads_tensors(e: N.Expr) -> bool:
    return any(isinstance(x, N.Lookup) for x in N.walk(e))


def modifier_exprs(ir: N.Attention) -> list[N.Expr]:
    return [e for e in (ir.score.logit_bias, ir.score.sink) if e is not None]


