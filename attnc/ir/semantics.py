"""What a spec means: parameter binding, a vectorised evaluator of IR expressions, the dense mask
and the dense reference attention. This module is the oracle every kernel is tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import AttncError, suggest
from . import nodes as N

# Kernels decode coordinates in int32; larger spaces are rejected rather than silently wrapped.
MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class Bound:
    """An IR with every parameter bound to a value, and the sizes that follow from them."""

    ir: N.Attention
    values: tuple[tuple[str, int | float], ...]
    q_dims: tuple[int, ...]
    kv_dims: tuple[int, ...]

    @property
    def env(self) -> dict[str, int | float]:
        return dict(self.values)

    @property
    def nq(self) -> int:
        return math.prod(self.q_dims)

    @property
    def nk(self) -> int:
        return math.prod(self.kv_dims)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values)


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
    q_dims = _dims(ir.q, values, "q")
    kv_dims = _dims(ir.kv, values, "kv")
    bound = Bound(ir, tuple(values.items()), q_dims, kv_dims)
    for w in windows(ir.mask):
        _check_window(w, values, bound)
    for r in ir.requires:
        if not evaluate_uniform(r.cond, values):
            raise AttncError(f"{r.message}: {_show(r.cond)} is false for {bound.describe()}", r.span)
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
             head_dim: int | None = None, tensors: Mapping[str, np.ndarray] | None = None):
    """Evaluate an expression; coordinates are int64 arrays that broadcast against each other.

    `tensors` holds the runtime tensors (int64 numpy arrays) that Lookup nodes read.
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
                raise AttncError("n_visible is only defined in score expressions")
            return coords[("q", "n_visible")]
        if isinstance(e, N.Coord):
            return coords[(e.side, e.axis)]
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


def _pair_coords(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray) -> dict:
    ir = bound.ir
    qc = decode(bound.q_dims, ir.q.axes, q_idx.astype(np.int64)[:, None])
    kc = decode(bound.kv_dims, ir.kv.axes, k_idx.astype(np.int64)[None, :])
    return {("q", a): v for a, v in qc.items()} | {("k", a): v for a, v in kc.items()}


def mask_block(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray, tensors=None) -> np.ndarray:
    """Visibility of queries q_idx against keys k_idx: bool [len(q_idx), len(k_idx)]."""
    out = evaluate(bound.ir.mask, bound.env, _pair_coords(bound, q_idx, k_idx), tensors=tensors)
    return np.broadcast_to(np.asarray(out, dtype=bool), (len(q_idx), len(k_idx)))


def dense_mask(bound: Bound, tensors=None) -> np.ndarray:
    return mask_block(bound, np.arange(bound.nq), np.arange(bound.nk), tensors).copy()


def mask_bounds(bound: Bound, q_idx: np.ndarray, k_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(certainly visible, possibly visible) without runtime data: three-valued evaluation in
    which every comparison that reads a runtime tensor is unknown."""
    coords = _pair_coords(bound, q_idx, k_idx)
    shape = (len(q_idx), len(k_idx))

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

    lo, hi = rec(bound.ir.mask)
    return np.broadcast_to(lo, shape), np.broadcast_to(hi, shape)


def lookups(e: N.Expr) -> list[N.Lookup]:
    return [x for x in N.walk(e) if isinstance(x, N.Lookup)]


def reads_tensors(e: N.Expr) -> bool:
    return any(isinstance(x, N.Lookup) for x in N.walk(e))


def tensor_extents(bound: Bound) -> dict[str, tuple[int, ...]]:
    """The smallest shape each runtime tensor must have so that every index the mask can form
    (by interval analysis over all token pairs) is in range; a negative index is an error."""
    ranges = _coord_ranges(bound)
    need: dict[str, list[int]] = {}
    for lk in lookups(bound.ir.mask):
        dims = need.setdefault(lk.tensor, [0] * len(lk.indices))
        for d, idx in enumerate(lk.indices):
            lo, hi = int_range(idx, bound.env, ranges)
            if lo < 0:
                raise AttncError(f"index `{_show(idx)}` into '{lk.tensor}' can be negative ({lo}) for "
                                 f"{bound.describe()}")
            dims[d] = max(dims[d], hi + 1)
    return {k: tuple(v) for k, v in need.items()}


def score_reads_n_visible(score: N.Score) -> bool:
    return any(isinstance(x, N.NVisible) for e in (score.scale, score.bias) for x in N.walk(e))


def row_scores(bound: Bound, head_dim: int, row_counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-query score scale and bias (float64 [Nq]); they may depend on n_visible.

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
            row = int(np.argmax(bad))
            raise AttncError(f"the {score.kind} {what} `{_show(expr)}` is {val[row]} for query {row} "
                             f"(n_visible = {row_counts[row]}, head_dim = {head_dim})")
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


def _coord_ranges(bound: Bound) -> dict[tuple[str, str], tuple[int, int]]:
    ranges = {}
    for side, space, dims in (("q", bound.ir.q, bound.q_dims), ("k", bound.ir.kv, bound.kv_dims)):
        ranges[(side, "i")] = (0, math.prod(dims) - 1)
        for axis, size in zip(space.axes, dims):
            ranges[(side, axis)] = (0, size - 1)
    return ranges


def needs_int64(bound: Bound) -> bool:
    """True when some intermediate of the mask may leave int32 over this binding's coordinates."""
    seen: list[tuple[int, int]] = []
    int_range(bound.ir.mask, bound.env, _coord_ranges(bound), seen)
    lo, hi = INT32
    return any(r[0] < lo or r[1] > hi for r in seen)


# -- the dense reference attention ---------------------------------------------------------------
def reference_attention(bound: Bound, q, k, v, mask=None, tensors=None):
    """softmax(scale * q k^T, masked) v in the inputs' dtype (use float64 for an oracle).

    Rows that see no key output exactly 0. Differentiable through torch autograd.
    """
    import torch

    dense = dense_mask(bound, tensors) if mask is None else mask.cpu().numpy()
    mask = torch.from_numpy(dense).to(q.device)
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale, bias = (torch.from_numpy(x).to(q.device, q.dtype)[:, None]
                   for x in row_scores(bound, q.shape[-1], dense.sum(axis=1)))
    s = (q @ k.transpose(-1, -2)) * scale
    kind = bound.ir.score.kind
    if kind == "sigmoid":
        return (torch.sigmoid(s + bias) * mask) @ v
    if kind == "softplus":
        p = torch.nn.functional.softplus(s) * mask
    else:
        s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
        p = torch.exp(s - m) * mask
    denom = p.sum(dim=-1, keepdim=True)
    return (p @ v) / torch.where(denom == 0, torch.ones_like(denom), denom)
