"""What a spec means: parameter binding, a vectorised evaluator of IR expressions, the dense mask
and the dense reference attention. This module is the oracle every kernel is tested against.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import AttncError, suggest
from . import nodes as N

# Kernels decode coordinates in int32; larger spaces are rejected rather than silently wrapped.
MAX_TOKENS = 2**31 - 1
MAX_HEADS = 2**16


@dataclass(frozen=True)
class KeyPart:
    """One segment of the key space under a binding (an unsegmented space is one nameless part)."""

    name: str | None
    space: N.Space
    dims: tuple[int, ...]
    offset: int  # flat index of its first key

    @property
    def size(self) -> int:
        return math.prod(self.dims)


@dataclass(frozen=True)
class Bound:
    """An IR with every parameter bound to a value, and the sizes that follow from them."""

    ir: N.Attention
    values: tuple[tuple[str, int | float], ...]
    q_dims: tuple[int, ...]
    kv_parts: tuple[KeyPart, ...]

    @property
    def env(self) -> dict[str, int | float]:
        return dict(self.values)

    @property
    def nq(self) -> int:
        return math.prod(self.q_dims)

    @property
    def nk(self) -> int:
        return sum(p.size for p in self.kv_parts)

    def describe(self) -> str:
        return _describe(self.values)


def _describe(values) -> str:
    return ", ".join(f"{k}={v}" for k, v in values)


def bind(ir: N.Attention, params: Mapping[str, Any]) -> Bound:
    """Check and bind parameter values; evaluate defaults and sizes; check builtin preconditions."""
    decls = {p.name: p for p in ir.params}
    for name in params:
        if name not in decls:
            raise AttncError(f"attention '{ir.name}' has no parameter '{name}'",
                             hint=suggest(name, decls) or f"its parameters are: {_param_list(ir)}")
    values: dict[str, int | float] = {}
    for p in ir.params:
        if p.name in params:
            values[p.name] = _check_value(ir, p, params[p.name])
        elif p.default is not None:
            values[p.name] = evaluate_uniform(p.default, values)
        else:
            missing = [d.name for d in ir.params if d.name not in params and d.default is None]
            raise AttncError(f"attention '{ir.name}' needs a value for parameter{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)}", hint=f"pass them to attnc.compile, e.g. {missing[0]}=64")
    # Preconditions first: they explain a size like H / 4 before the size itself is computed.
    for r in ir.requires:
        if not evaluate_uniform(r.cond, values):
            raise AttncError(f"{r.message}: {_show(r.cond)} is false for {_describe(values.items())}", r.span)
    q_dims = _dims(ir.q, values, "q")
    kv_parts, offset = [], 0
    for name, space in N.parts(ir.kv):
        dims = _dims(space, values, "kv" if name is None else f"kv segment '{name}'")
        kv_parts.append(KeyPart(name, space, dims, offset))
        offset += math.prod(dims)
    if offset > MAX_TOKENS:
        raise AttncError(f"kv space has {offset} tokens; at most {MAX_TOKENS} are supported")
    bound = Bound(ir, tuple(values.items()), q_dims, tuple(kv_parts))
    for w in windows(ir.mask):
        _check_window(w, values, bound)
    return bound


def _param_list(ir: N.Attention) -> str:
    return ", ".join(p.name for p in ir.params) or "(none)"


def _check_value(ir: N.Attention, p: N.ParamDecl, value: Any) -> int | float:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AttncError(f"parameter '{p.name}' of '{ir.name}' must be "
                         f"{'an integer' if p.type == N.INT else 'a number'}, got {type(value).__name__} {value!r}")
    if p.type == N.INT:
        if not isinstance(value, numbers.Integral):
            raise AttncError(f"parameter '{p.name}' of '{ir.name}' must be an integer, got {value!r}")
        value = int(value)
        if abs(value) > MAX_TOKENS:
            raise AttncError(f"parameter '{p.name}' = {value} is out of range (|value| <= {MAX_TOKENS})")
        return value
    value = float(value)
    if not math.isfinite(value):
        raise AttncError(f"parameter '{p.name}' must be finite, got {value}")
    return value


def _dims(space: N.Space, values, side: str) -> tuple[int, ...]:
    dims = tuple(int(evaluate_uniform(d, values)) for d in space.dims)
    for d, expr in zip(dims, space.dims):
        if d < 1:
            raise AttncError(f"{side} space size {_show(expr)} = {d}; sizes must be at least 1")
    if math.prod(dims) > MAX_TOKENS:
        raise AttncError(f"{side} space has {math.prod(dims)} tokens; at most {MAX_TOKENS} are supported")
    return dims


def _show(e: N.Expr) -> str:
    from .printer import format_expr

    return format_expr(e)


def _check_window(w: N.Window, values, bound: Bound) -> None:
    n, k, d, s = (int(evaluate_uniform(x, values)) for x in (w.length, w.kernel, w.dilation, w.stride))
    names = {x: _named(e, v) for x, e, v in (("k", w.kernel, k), ("d", w.dilation, d), ("s", w.stride, s),
                                                ("n", w.length, n))}
    where = f"window along axis {w.axis}"
    if d < 1:
        raise AttncError(f"{where}: dilation {names['d']} must be at least 1", w.span)
    if k < 2:
        raise AttncError(f"{where}: kernel {names['k']} must be at least 2", w.span)
    if k * d > n:
        raise AttncError(f"{where}: kernel {names['k']} times dilation {names['d']} exceeds the "
                         f"axis length {names['n']}", w.span, hint="NATTEN requires kernel * dilation <= length")
    if not 1 <= s <= k:
        raise AttncError(f"{where}: stride {names['s']} must be between 1 and the kernel size {k}", w.span)


def _named(e: N.Expr, value: int) -> str:
    """'3' for a literal, '3 (kernel)' for a value that came from a parameter expression."""
    return str(value) if isinstance(e, N.Const) else f"{value} ({_show(e)})"


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
                                     f"dimension {d} of '{e.tensor}' (size {size}) in `{_show(e)}`")
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
                    raise AttncError(f"division by zero in `{_show(e)}`")
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


def _parts(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray):
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
    for part, sel, coords in _parts(bound, q_idx, k_idx):
        m = evaluate(part_expr(bound.ir.mask, part.name), bound.env, coords, tensors=tensors)
        out[:, sel] = np.broadcast_to(np.asarray(m, dtype=bool), (len(q_idx), int(sel.sum())))
    return out


def dense_mask(bound: Bound, tensors=None) -> np.ndarray:
    return mask_block(bound, np.arange(bound.nq), np.arange(bound.nk), tensors)


def mask_bounds(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(certainly visible, possibly visible) without runtime data: three-valued evaluation in
    which every comparison that reads a runtime tensor is unknown."""
    shape = (len(q_idx), len(k_idx))
    lo_out, hi_out = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    for part, sel, coords in _parts(bound, q_idx, k_idx):

        def rec(e: N.Expr):
            if not reads_tensors(e):
                v = np.asarray(evaluate(e, bound.env, coords), dtype=bool)
                return v, v
            if isinstance(e, N.Unary) and e.op == "not":
                lo, hi = rec(e.operand)
                return ~hi, ~lo
            if isinstance(e, N.Binary) and e.op in ("and", "or"):
                (alo, ahi), (blo, bhi) = rec(e.lhs), rec(e.rhs)
                if e.op == "and":
                    return alo & blo, ahi & bhi
                return alo | blo, ahi | bhi
            return np.zeros((), dtype=bool), np.ones((), dtype=bool)

        lo, hi = rec(part_expr(bound.ir.mask, part.name))
        part_shape = (len(q_idx), int(sel.sum()))
        lo_out[:, sel] = np.broadcast_to(lo, part_shape)
        hi_out[:, sel] = np.broadcast_to(hi, part_shape)
    return lo_out, hi_out


def lookups(e: N.Expr) -> list[N.Lookup]:
    return [x for x in N.walk(e) if isinstance(x, N.Lookup)]


def reads_tensors(e: N.Expr) -> bool:
    return any(isinstance(x, N.Lookup) for x in N.walk(e))


def modifier_exprs(ir: N.Attention) -> list[N.Expr]:
    return [e for e in (ir.score.logit_bias, ir.score.sink) if e is not None]


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
            raise AttncError(f"index `{_show(lk.indices[d])}` into '{lk.tensor}' can be negative ({lo}) for "
                             f"{bound.describe()}")
        if hi >= MAX_TOKENS:
            raise AttncError(f"index `{_show(lk.indices[d])}` into '{lk.tensor}' can reach {hi} for "
                             f"{bound.describe()}; runtime tensors are indexed in int32")
        dims = need.setdefault(lk.tensor, [0] * len(lk.indices))
        dims[d] = max(dims[d], hi + 1)

    for part in bound.kv_parts:
        ranges = _coord_ranges(bound, part)
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
        for part, sel, coords in _parts(bound, rows, keys):
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


def score_reads_n_visible(score: N.Score) -> bool:
    return any(isinstance(x, N.NVisible) for e in (score.scale, score.bias) for x in N.walk(e))


def row_scores(bound: Bound, head_dim: int, row_counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-query score scale and bias (float64, the shape of row_counts: [Nq], or [B, H, Nq] when
    routing makes counts depend on the data); they may depend on n_visible.

    Rows that see no key get scale 0 and bias 0: they contribute nothing either way, and
    expressions like log(n_visible) are undefined there.
    """
    if row_counts is None:
        row_counts = dense_mask(bound).sum(axis=1)
    coords = {("q", "n_visible"): row_counts.astype(np.float64)}
    score = bound.ir.score
    out = []
    for what, expr in (("scale", score.scale), ("bias", score.bias)):
        val = np.broadcast_to(np.asarray(evaluate(expr, bound.env, coords, head_dim), dtype=np.float64),
                              row_counts.shape).copy()
        val[row_counts == 0] = 0.0
        bad = ~np.isfinite(val)
        if bad.any():
            # counts are [Nq], or [B, H, Nq] under routing: report the query position.
            at = np.unravel_index(int(np.argmax(bad)), bad.shape)
            raise AttncError(f"the {score.kind} {what} `{_show(expr)}` is {val[at]} for query {at[-1]} "
                             f"(n_visible = {row_counts[at]}, head_dim = {head_dim})")
        out.append(val)
    return out[0], out[1]


# -- integer ranges ---------------------------------------------------------------------------
INT32 = (-(2**31), 2**31 - 1)


def int_range(e: N.Expr, values, ranges: Mapping[tuple[str, str], tuple[int, int]], out: list | None = None):
    """Interval [lo, hi] of an integer expression over coordinate ranges (sound, maybe loose).

    Every intermediate interval is appended to `out`, so callers can check that a kernel's
    int32 arithmetic cannot overflow anywhere in the expression.
    """
    def rec(x: N.Expr) -> tuple[int, int]:
        if isinstance(x, N.Const):
            r = (int(x.value), int(x.value))
        elif isinstance(x, N.Param):
            r = (int(values[x.name]), int(values[x.name]))
        elif isinstance(x, N.HeadDim):
            r = (1, 1024)
        elif isinstance(x, N.Head):
            r = ranges.get(("q", "head"), (0, MAX_HEADS - 1))
        elif isinstance(x, N.Coord):
            r = ranges[(x.side, x.axis)]
        elif isinstance(x, N.Window):
            rec(x.expand())
            r = (0, 1)
        elif isinstance(x, N.Lookup):
            for i in x.indices:
                rec(i)
            r = INT32  # runtime tensors reach the kernel as int32
        elif isinstance(x, N.Unary):
            a = rec(x.operand)
            if x.op == "not":
                r = (0, 1)
            elif x.op == "neg":
                r = (-a[1], -a[0])
            else:
                r = (0 if a[0] <= 0 <= a[1] else min(abs(a[0]), abs(a[1])), max(abs(a[0]), abs(a[1])))
        elif isinstance(x, N.Binary):
            a, b = rec(x.lhs), rec(x.rhs)
            if x.op in ("and", "or") or x.op in N.COMPARISONS:
                r = (0, 1)
            elif x.op == "+":
                r = (a[0] + b[0], a[1] + b[1])
            elif x.op == "-":
                r = (a[0] - b[1], a[1] - b[0])
            elif x.op == "*":
                p = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
                r = (min(p), max(p))
            elif x.op == "min":
                r = (min(a[0], b[0]), min(a[1], b[1]))
            elif x.op == "max":
                r = (max(a[0], b[0]), max(a[1], b[1]))
            elif x.op == "%":
                m = max(abs(b[0]), abs(b[1]))
                r = (-m, m)
            elif x.op == "//":
                m = max(abs(a[0]), abs(a[1]))
                r = (-m, m)
            else:
                r = (0, 1)
        else:
            r = (0, 1)  # float subexpressions never reach integer kernels
        if out is not None:
            out.append(r)
        return r

    return rec(e)


def _coord_ranges(bound: Bound, part: KeyPart, heads: int = MAX_HEADS) -> dict[tuple[str, str], tuple[int, int]]:
    ranges = {("q", "i"): (0, bound.nq - 1), ("k", "i"): (0, part.size - 1), ("q", "head"): (0, heads - 1)}
    for axis, size in zip(bound.ir.q.axes, bound.q_dims):
        ranges[("q", axis)] = (0, size - 1)
    for axis, size in zip(part.space.axes, part.dims):
        ranges[("k", axis)] = (0, size - 1)
    return ranges


def needs_int64(bound: Bound) -> bool:
    """True when some integer intermediate of the mask or the score modifiers may leave int32
    over this binding's coordinates."""
    seen: list[tuple[int, int]] = []
    for part in bound.kv_parts:
        ranges = _coord_ranges(bound, part)
        int_range(part_expr(bound.ir.mask, part.name), bound.env, ranges, seen)
        for e in modifier_exprs(bound.ir):
            for x in _int_subtrees(part_expr(e, part.name)):
                int_range(x, bound.env, ranges, seen)
    lo, hi = INT32
    return any(r[0] < lo or r[1] > hi for r in seen)


def _int_subtrees(e: N.Expr):
    """The maximal integer-typed subexpressions of a float expression (indices, distances)."""
    stack = [e]
    while stack:
        x = stack.pop()
        if x.type == N.INT:
            yield x
        else:
            stack.extend(N.children(x))


# -- score modifiers ------------------------------------------------------------------------------
def softcap_value(bound: Bound, head_dim: int) -> float | None:
    cap = bound.ir.score.softcap
    if cap is None:
        return None
    value = float(evaluate_uniform(cap, bound.env, head_dim))
    if not (0 < value < 1e30):  # kernels hold it in float32
        raise AttncError(f"the softcap `{_show(cap)}` is {value} for {bound.describe()}; it must be positive "
                         "and below 1e30")
    return value


def _reads_float_tensor(e: N.Expr) -> bool:
    return any(isinstance(x, N.Lookup) and x.type == N.FLOAT for x in N.walk(e))


def evaluate_torch(e: N.Expr, bound: Bound, coords, tensors, head_dim: int, like):
    """Evaluate a float modifier expression with torch so that gradients reach the float runtime
    tensors it reads (bias tables, sink logits). Integer parts (indices, distances) go through
    the numpy evaluator above, so both paths share one definition of the arithmetic."""
    import torch

    def rec(x: N.Expr):
        if not _reads_float_tensor(x):
            v = np.asarray(evaluate(x, bound.env, coords, head_dim, strict=False), dtype=np.float64)
            return torch.as_tensor(v, dtype=like.dtype, device=like.device)
        if isinstance(x, N.Lookup):
            table = tensors[x.tensor]
            idx = [np.asarray(evaluate(i, bound.env, coords, head_dim)) for i in x.indices]
            if table.numel() == 0:  # only possible when no visible pair reads it
                return torch.zeros(np.broadcast_shapes(*(i.shape for i in idx)), dtype=like.dtype, device=like.device)
            if table.dim() == len(idx) + 1:  # a per-head table: its leading dimension is the head
                idx = [np.asarray(coords[("q", "head")])] + idx
            # Pairs the mask hides may index outside the table (only visible pairs are checked);
            # their logits are discarded, so any in-range value will do.
            idx = [np.clip(i, 0, n - 1) for i, n in zip(idx, table.shape)]
            idx = [torch.from_numpy(np.ascontiguousarray(i)).to(table.device) for i in np.broadcast_arrays(*idx)]
            return table.to(like.dtype)[tuple(idx)]
        if isinstance(x, N.Unary):
            v = rec(x.operand)
            return -v if x.op == "neg" else torch.abs(v)
        if isinstance(x, N.Call):
            return {"sqrt": torch.sqrt, "log": torch.log, "exp": torch.exp}[x.fn](rec(x.args[0]))
        if isinstance(x, N.Binary):
            a, b = rec(x.lhs), rec(x.rhs)
            ops = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div,
                   "min": torch.minimum, "max": torch.maximum}
            return ops[x.op](a, b)
        raise TypeError(f"not a float modifier expression: {x!r}")

    return rec(e)


def logit_bias(bound: Bound, heads: int, tensors, head_dim: int, like):
    """The logit bias as a torch tensor broadcastable to [heads, Nq, Nk] (None when absent)."""
    import torch

    e = bound.ir.score.logit_bias
    if e is None:
        return None
    head = np.arange(heads)[:, None, None]
    out = torch.zeros((heads, bound.nq, bound.nk), dtype=like.dtype, device=like.device)
    cols = []
    for part, sel, coords in _parts(bound, np.arange(bound.nq), np.arange(bound.nk)):
        coords = {key: v[None] for key, v in coords.items()} | {("q", "head"): head}
        val = evaluate_torch(part_expr(e, part.name), bound, coords, tensors, head_dim, like)
        cols.append((torch.from_numpy(np.nonzero(sel)[0]).to(like.device), val))
    for idx, val in cols:
        out = out.index_copy(2, idx, val.expand(heads, bound.nq, len(idx)).contiguous())
    return out


def sink_logits(bound: Bound, heads: int, tensors, head_dim: int, like):
    """Per-head sink logits [heads] (None when the score has no sink)."""
    import torch

    e = bound.ir.score.sink
    if e is None:
        return None
    coords = {("q", "head"): np.arange(heads)}
    sink = evaluate_torch(e, bound, coords, tensors, head_dim, like).expand(heads)
    # Kernels hold sink * log2(e) in float32; -inf (no sink) is fine, nan never is.
    bad = torch.isnan(sink) | ((sink.abs() > 1e30) & (sink != float("-inf")))
    if bad.any():
        raise AttncError(f"the sink logit `{_show(e)}` is {sink[bad][0].item()} for head "
                         f"{int(bad.nonzero()[0])}; it must lie within ±1e30 (or be -inf)")
    return sink


def _check_visible_bias(bound: Bound, bias, mask) -> None:
    """A bias that is nan or +inf where a query sees a key is an error (-inf hides the pair).
    bias: [heads, Nq, Nk]; mask: [Nq, Nk], or [B, heads, Nq, Nk] under routing."""
    import torch

    bad = (torch.isnan(bias) | (bias == float("inf"))) & mask
    if bad.any():
        h, i, j = (int(x) for x in bad.nonzero()[0][-3:])
        raise AttncError(f"the bias `{_show(bound.ir.score.logit_bias)}` is {bias[h, i, j].item()} at head {h}, "
                         f"query {i}, key {j}, which the query sees")


# -- the dense reference attention ---------------------------------------------------------------
def reference_attention(bound: Bound, q, k, v, mask=None, tensors=None):
    """The spec's attention, densely, in the inputs' dtype (use float64 for an oracle).

    `tensors` maps runtime tensor names to torch tensors. Rows that see no key output exactly 0.
    Differentiable through torch autograd, including the float runtime tensors (bias tables).
    """
    import torch

    tensors = tensors or {}
    host = {n: t.detach().cpu().numpy().astype(np.int64) for n, t in tensors.items() if not t.dtype.is_floating_point}
    if mask is None and bound.ir.route is not None:
        from .routing import routed_mask

        mask = routed_mask(bound, q, k, host)  # [B, Hq, Nq, Nk]: routing depends on the data
    dense = dense_mask(bound, host) if mask is None else mask.cpu().numpy()
    mask = torch.from_numpy(dense).to(q.device)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale, bias = (torch.from_numpy(x).to(q.device, q.dtype)[..., None]
                   for x in row_scores(bound, d, dense.sum(axis=-1)))
    s = (q @ k.transpose(-1, -2)) * scale
    extra = logit_bias(bound, hq, tensors, d, q)
    if extra is not None:
        _check_visible_bias(bound, extra, mask)
        s = s + extra
    cap = softcap_value(bound, d)
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    kind = bound.ir.score.kind
    # torch.where, not a product: values at hidden pairs (inf, nan from a bias) must not leak.
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if kind == "sigmoid":
        return torch.where(mask, torch.sigmoid(s + bias), zero) @ v
    if kind == "softplus":
        p = torch.where(mask, torch.nn.functional.softplus(s), zero)
        denom = p.sum(dim=-1, keepdim=True)
    else:
        s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        sink = sink_logits(bound, hq, tensors, d, q)
        if sink is not None:
            sink = sink[None, :, None, None]
            m = torch.maximum(m, sink)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
        p = torch.where(mask, torch.exp(s - m), zero)
        denom = p.sum(dim=-1, keepdim=True)
        if sink is not None:
            denom = denom + torch.exp(sink - m)
    return (p @ v) / torch.where(denom == 0, torch.ones_like(denom), denom)
