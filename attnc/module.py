"""`attnc.Attention`: an nn.Module that owns the learned float tables a spec reads.

    attn = Attention("specs/swin_bias.attn", heads=4, H=14, W=14)   # attn.rel_bias: [4, 13, 13]
    out = attn(q, k, v)                                               # fn(q, k, v, rel_bias=attn.rel_bias)

Every float table of the spec (bias tables, sink logits: TensorDecl.dtype == FLOAT) becomes a
parameter named after it, shaped from the spec: the smallest shape the spec indexes
(`analysis.extents.tensor_extents`), with a leading [heads] dimension for a per-head copy of a
table the spec does not index by `head`. Integer tensors (document ids) stay per-call arguments.
See docs/training.md.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .analysis.extents import tensor_extents
from .analysis.layout import AUTO, Layout
from .errors import AttncError, suggest
from .ir import nodes as N
from .pipeline import DEFAULT_TILES
from .runtime import AttentionFn, compile as compile_spec


class Attention(nn.Module):
    """Attention over a compiled spec, owning the learned tables the spec reads.

    spec, backend, tiles, layout, **params: as for `attnc.compile`; the AttentionFn is `self.fn`.
    heads: the number of query heads. Needed when a table is indexed by `head` (ALiBi slopes,
        sink logits: the table then has `heads` entries along that axis); when given, a table the
        spec does not index by `head` (Swin's rel_bias) gets one copy per head, [heads, ...], and
        forward checks that q has `heads` heads. Leave it out to share such a table across heads.
    init: {table: initial value}, copied; its shape must be the table's (see `table_shapes`).
        Tables not named here start at zero (docs/training.md says why).
    frozen: names of tables registered as buffers (saved in the state dict, moved by `.to`, not
        learned) instead of parameters, e.g. ALiBi's fixed slopes.

    forward(q, k, v, *, return_lse=False, kernel_order=False, **runtime_tensors) is
    `self.fn(q, k, v, <the tables>, **runtime_tensors)`: runtime_tensors are the integer tensors
    the spec reads (document ids); passing a table the module owns is an error.
    """

    def __init__(self, spec: "str | os.PathLike", *, heads: int | None = None, backend: str = "triton",
                 tiles: tuple[int, int] = DEFAULT_TILES, layout: "str | Layout" = AUTO,
                 init: Mapping[str, Any] | None = None, frozen: Iterable[str] = (), **params):
        super().__init__()
        if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise AttncError(f"heads must be a positive int, got {heads!r}")
        fn = compile_spec(spec, backend=backend, tiles=tiles, layout=layout, **params)
        self.fn: AttentionFn = fn
        # How to compile fn again where it cannot be copied (pickling: torch.save of the module).
        self._recipe = dict(spec=fn.spec, backend=backend, tiles=tuple(tiles),
                            layout=layout if isinstance(layout, str) else fn.layout.name, params=dict(params))
        self.heads = heads
        shapes = _table_shapes(fn, heads)
        init = dict(init or {})
        frozen = (frozen,) if isinstance(frozen, str) else tuple(frozen)
        for what, names in (("init", init), ("frozen", frozen)):
            for name in names:
                if name not in shapes:
                    raise AttncError(f"{what}: '{fn.ir.name}' has no float table '{name}'",
                                     hint=_owned_hint(fn, name, shapes))
        self._tables: tuple[str, ...] = tuple(shapes)
        for name, shape in shapes.items():
            value = _initial(name, shape, init[name]) if name in init else torch.zeros(shape)
            if hasattr(type(self), name) or name in self.__dict__:  # methods, properties, attributes
                raise AttncError(f"'{fn.ir.name}' reads a table named '{name}', which nn.Module or "
                                 "attnc.Attention already uses as an attribute",
                                 hint="rename the table in the spec")
            if name in frozen:
                self.register_buffer(name, value)
            else:
                self.register_parameter(name, nn.Parameter(value))

    @property
    def table_shapes(self) -> dict[str, tuple[int, ...]]:
        """{table: shape} of the tables the module owns, in the spec's order."""
        return {name: tuple(getattr(self, name).shape) for name in self._tables}

    def tables(self) -> dict[str, torch.Tensor]:
        """{table: tensor}: what forward passes to `self.fn` (parameters and frozen buffers)."""
        return {name: getattr(self, name) for name in self._tables}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False,
                kernel_order: bool = False, **runtime_tensors: torch.Tensor):
        for name in runtime_tensors:
            if name in self._tables:
                kind = "buffer" if name in self._buffers else "parameter"
                raise AttncError(f"'{name}' is a table this module owns (attn.{name}, a {kind}); "
                                 "do not pass it to forward",
                                 hint="set its value with init= at construction, or copy into it under "
                                      f"torch.no_grad(): attn.{name}.copy_(value)")
        if self.heads is not None and isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] != self.heads:
            raise AttncError(f"q has {q.shape[1]} heads but this Attention was built with heads={self.heads}")
        return self.fn(q, k, v, return_lse=return_lse, kernel_order=kernel_order,
                       **self.tables(), **runtime_tensors)

    # -- copies ------------------------------------------------------------------------------------
    # The compiled callable holds kernels (Python modules) that neither copy nor pickle. Copies
    # share it: it is immutable and thread-safe. A pickled module compiles its spec again on load
    # (from the kernel cache, usually).
    def __deepcopy__(self, memo):
        memo[id(self.fn)] = self.fn
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["fn"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        r = self._recipe
        self.fn = compile_spec(r["spec"], backend=r["backend"], tiles=r["tiles"], layout=r["layout"], **r["params"])

    def extra_repr(self) -> str:
        fn = self.fn
        parts = [f"{fn.ir.name}({fn.compiled.bound.describe()})", f"backend={fn.backend}"]
        if fn.layout is not None:
            parts.append(f"layout={fn.layout.name}")
        if self.heads is not None:
            parts.append(f"heads={self.heads}")
        tables = []
        for name in self._tables:
            t = getattr(self, name)
            tables.append(f"{name}{list(t.shape)}" + (" frozen" if name in self._buffers else ""))
        if tables:
            parts.append("tables: " + ", ".join(tables))
        return ", ".join(parts)


def _table_shapes(fn: AttentionFn, heads: int | None) -> dict[str, tuple[int, ...]]:
    """The shape of each float table of the spec (see Attention)."""
    floats = [t for t in fn.ir.tensors if t.dtype == N.FLOAT]
    if not floats:
        return {}
    # A float table is per_head (may take a leading [heads]) exactly when no read indexes it by
    # `head`; one that is indexed by `head` needs the count to size that axis.
    by_head = [t.name for t in floats if not t.per_head]
    if by_head and heads is None:
        raise AttncError(f"'{fn.ir.name}' indexes {', '.join(repr(n) for n in by_head)} by `head`, so the "
                         "table's shape depends on the number of heads",
                         hint="pass heads=H, the number of query heads (q.shape[1])")
    try:  # the head count matters only to tables indexed by `head` (and the scan grows with it)
        extents = tensor_extents(fn.compiled.bound, heads if by_head else 1)
    except AttncError as err:
        raise err.with_source(fn.spec.text, fn.spec.filename) from None
    shapes = {}
    for t in floats:
        extent = tuple(extents.get(t.name, (0,) * t.rank))
        shapes[t.name] = (heads, *extent) if t.per_head and heads is not None else extent
    return shapes


def _initial(name: str, shape: tuple[int, ...], value: Any) -> torch.Tensor:
    if isinstance(value, nn.Parameter):
        value = value.data
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise AttncError(f"init['{name}'] is not a tensor: {err}") from None
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise AttncError(f"init['{name}'] must hold real numbers, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise AttncError(f"init['{name}'] has shape {list(t.shape)}; the table has shape {list(shape)}",
                         hint="shapes come from the spec and `heads`; see Attention(...).table_shapes")
    # Like a freshly built nn.Module: on the CPU, in the default dtype, until `.to(...)`. Values
    # are checked at each call (NaN and +inf are refused there; -inf hides a pair or a sink).
    return t.detach().to(device="cpu", dtype=torch.get_default_dtype()).clone()


def _owned_hint(fn: AttentionFn, name: str, shapes) -> str:
    ints = [t.name for t in fn.ir.tensors if t.dtype != N.FLOAT]
    if name in ints:
        return f"'{name}' is an integer runtime tensor: pass it to forward, {name}=tensor"
    return suggest(name, shapes) or (f"its float tables: {', '.join(shapes)}" if shapes else "it reads no float table")


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's fixed per-head slopes (Press et al., 2022): the geometric sequence starting at
    2 ** (-8 / n) with that ratio for n = heads a power of two; otherwise the paper's rule
    (the slopes of the closest smaller power of two, then every other slope of twice that)."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise AttncError(f"heads must be a positive int, got {heads!r}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        slopes = power_of_two(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.get_default_dtype())
