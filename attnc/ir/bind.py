"""Binding: parameter values checked and bound to an IR, and the sizes that follow from them."""
from __future__ import annotations

import math
import numbers

import numpy as np
from dataclasses import dataclass
from typing import Any, Mapping

from .. import limits
from ..errors import AttncError, suggest
from ..limits import MAX_TOKENS  # kernels decode tokens in int32 (also imported from here)
from . import nodes as N
from .bits import undefined
from .evaluate import evaluate_uniform, show, windows
from .floats import check_float_constants
from .intervals import check_int64


@dataclass(frozen=True)
class KeyPart:
    """One segment of the key (or query) space under a binding (an unsegmented space is one
    nameless part)."""

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
    q_dims: tuple[int, ...]  # a segmented query space: (its number of tokens,); see q_parts
    kv_parts: tuple[KeyPart, ...]
    q_parts: tuple[KeyPart, ...] = ()  # set by bind(); one nameless part for an unsegmented q

    @property
    def pairs(self) -> list[tuple[KeyPart, KeyPart]]:
        """(query part, key part) of every combination of segments, queries outer."""
        return [(qp, kp) for qp in self.q_parts for kp in self.kv_parts]

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
            _check_divisors(ir, p.default, values)
            value = evaluate_uniform(p.default, values)
            values[p.name] = bool(value) if p.boolean else value
        else:
            missing = [d.name for d in ir.params if d.name not in params and d.default is None]
            raise AttncError(f"attention '{ir.name}' needs a value for parameter{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)}", hint=f"pass them to attnc.compile, e.g. {missing[0]}=64")
    # Preconditions first: they explain a size like H / 4 before the size itself is computed.
    for r in ir.requires:
        _check_divisors(ir, r.cond, values)
        if not evaluate_uniform(r.cond, values):
            raise AttncError(f"{r.message}: {show(r.cond)} is false for {_describe(values.items())}", r.span)
    score = ir.score
    for e in (*(d for side in (ir.q, ir.kv) for _, sp in N.parts(side) for d in sp.dims), ir.mask, score.scale, score.bias,
              score.logit_bias, score.softcap, score.sink, *((ir.route.top, *ir.route.sizes) if ir.route else ())):
        if e is not None:
            _check_divisors(ir, e, values)
    sides = {}
    for side, space_of in (("q", ir.q), ("kv", ir.kv)):
        found, offset = [], 0
        for name, space in N.parts(space_of):
            dims = _dims(ir, space, values, side if name is None else f"{side} segment '{name}'")
            found.append(KeyPart(name, space, dims, offset))
            offset += math.prod(dims)
        if offset > MAX_TOKENS:
            raise AttncError(f"{side} space has {offset} tokens; at most {MAX_TOKENS} are supported")
        # Every path allocates int64 arrays indexed by token (layout orders, row counts).
        limits.check_bytes(f"the {side} token arrays (layout order, row counts)", (offset,), 8,
                           limits.MAX_TOKEN_ARRAY_BYTES, "MAX_TOKEN_ARRAY_BYTES")
        sides[side] = (tuple(found), offset)
    q_parts, nq = sides["q"]
    q_dims = q_parts[0].dims if len(q_parts) == 1 and q_parts[0].name is None else (nq,)
    bound = Bound(ir, tuple(values.items()), q_dims, sides["kv"][0], q_parts)
    for w in windows(ir.mask):
        _check_window(w, values, bound)
    check_int64(bound)  # integer ranges: nothing the kernels or the evaluator compute may wrap
    check_float_constants(bound)  # float constants that reach float32 kernels
    return bound


def _param_list(ir: N.Attention) -> str:
    return ", ".join(p.name for p in ir.params) or "(none)"


def _check_value(ir: N.Attention, p: N.ParamDecl, value: Any) -> int | float:
    if p.boolean:  # True/False only: 0/1 would hide a mix-up with an integer parameter
        if not isinstance(value, (bool, np.bool_)):
            raise AttncError(f"parameter '{p.name}' of '{ir.name}' must be true or false (a Python bool), "
                             f"got {type(value).__name__} {value!r}")
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
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


def _check_divisors(ir: N.Attention, e: N.Expr, values) -> None:
    """Refuse `//` or `%` by a divisor that does not depend on tokens and is 0 for these values
    (or a shift count or ilog2 argument out of its domain, ir/bits.py), at its place in the spec
    (evaluation would report it without a place), wherever the operation is certainly evaluated.
    Guards are honoured (docs/language.md): in `a and b` / `a or b`, b is
    checked when a does not depend on tokens and does not decide; under a guard that depends on
    tokens, whether b is read at all is left to evaluation."""
    varies = (N.Coord, N.Lookup, N.Window, N.Head, N.NVisible, N.HeadDim, N.Member)
    uniform: dict[int, bool] = {}
    for x in reversed(list(N.walk(e))):  # descendants before their ancestors
        uniform[id(x)] = not isinstance(x, varies) and all(uniform[id(c)] for c in N.children(x))

    def visit(x: N.Expr) -> None:  # recursion is bounded: lowering limits IR depth (MAX_IR_DEPTH)
        if isinstance(x, N.Binary) and x.op in ("and", "or"):
            visit(x.lhs)
            if uniform[id(x.lhs)] and bool(evaluate_uniform(x.lhs, values)) == (x.op == "and"):
                visit(x.rhs)
            return
        for c in N.children(x):
            visit(c)
        partial = undefined(x)
        if partial is not None and uniform[id(partial[0])] and evaluate_uniform(partial[1], values):
            operand, _, what = partial
            raise AttncError(f"{what}: `{show(operand)}` is {evaluate_uniform(operand, values)} for "
                             f"{_describe(values.items())}", ir.span_of(x))

    visit(e)


def _dims(ir: N.Attention, space: N.Space, values, side: str) -> tuple[int, ...]:
    dims = tuple(int(evaluate_uniform(d, values)) for d in space.dims)
    for d, expr in zip(dims, space.dims):
        if d < 1:
            raise AttncError(f"{side} space size {show(expr)} = {d}; sizes must be at least 1", ir.span_of(space))
    if math.prod(dims) > MAX_TOKENS:
        raise AttncError(f"{side} space has {math.prod(dims)} tokens; at most {MAX_TOKENS} are supported")
    return dims



def _check_window(w: N.Window, values, bound: Bound) -> None:
    n, k, d, s = (int(evaluate_uniform(x, values)) for x in (w.length, w.kernel, w.dilation, w.stride))
    names = {x: _named(e, v) for x, e, v in (("k", w.kernel, k), ("d", w.dilation, d), ("s", w.stride, s),
                                                ("n", w.length, n))}
    where = f"window along axis {w.axis}"
    if d < 1:
        raise AttncError(f"{where}: dilation {names['d']} must be at least 1", w.span)
    if k < 2:
        from .lower_builtins import KERNEL_HINT

        raise AttncError(f"{where}: kernel {names['k']} must be at least 2: NATTEN's neighborhood is defined "
                         "for kernel sizes of at least 2", w.span, hint=KERNEL_HINT)
    if k * d > n:
        raise AttncError(f"{where}: kernel {names['k']} times dilation {names['d']} exceeds the "
                         f"axis length {names['n']}", w.span, hint="NATTEN requires kernel * dilation <= length")
    if not 1 <= s <= k:
        raise AttncError(f"{where}: stride {names['s']} must be between 1 and the kernel size {k}", w.span)


def _named(e: N.Expr, value: int) -> str:
    """'3' for a literal, '3 (kernel)' for a value that came from a parameter expression."""
    return str(value) if isinstance(e, N.Const) else f"{value} ({show(e)})"


