"""Binding: parameter values checked and bound to an IR, and the sizes that follow from them."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import AttncError, suggest
from . import nodes as N
from .evaluate import evaluate_uniform, show, windows

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
            raise AttncError(f"{r.message}: {show(r.cond)} is false for {_describe(values.items())}", r.span)
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
            raise AttncError(f"{side} space size {show(expr)} = {d}; sizes must be at least 1")
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
        raise AttncError(f"{where}: kernel {names['k']} must be at least 2", w.span)
    if k * d > n:
        raise AttncError(f"{where}: kernel {names['k']} times dilation {names['d']} exceeds the "
                         f"axis length {names['n']}", w.span, hint="NATTEN requires kernel * dilation <= length")
    if not 1 <= s <= k:
        raise AttncError(f"{where}: stride {names['s']} must be between 1 and the kernel size {k}", w.span)


def _named(e: N.Expr, value: int) -> str:
    """'3' for a literal, '3 (kernel)' for a value that came from a parameter expression."""
    return str(value) if isinstance(e, N.Const) else f"{value} ({show(e)})"


