"""The whole compiler in one place: each stage a function of the last, each artifact kept.

    text --parse--> AST --lower--> IR --bind--> Bound --layout--> Layout --analyse--> Schedule
         --emit--> Triton source (cached) --import--> module
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import AttncError
from .frontend import decode, parse as parse_text
from .frontend import syntax as A
from .analysis.extents import tensor_extents
from .analysis.layout import AUTO, Layout, choose
from .analysis.tiles import Schedule, analyse
from .ir import nodes as N
from .ir.bind import Bound, bind
from .ir.intervals import needs_int64
from .ir.lower import lower

BACKENDS = ("triton", "reference")
DEFAULT_TILES = (64, 64)


@dataclass(frozen=True, eq=False)
class Spec:
    """A parsed and checked spec: its text, AST and (parameter-symbolic) IR."""

    text: str
    filename: str | None
    ast: A.Attention
    ir: N.Attention

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def params(self) -> tuple[N.ParamDecl, ...]:
        return self.ir.params


@dataclass(frozen=True, eq=False)
class Compiled:
    """Every stage's artifact for one binding, kept so `explain` prints rather than recomputes."""

    spec: Spec
    bound: Bound
    backend: str
    schedule: Schedule | None = None
    layout: Layout | None = None
    int64: bool = False
    tensor_extents: dict = field(default_factory=dict)  # runtime tensor -> smallest valid shape
    kernel_path: Path | None = None
    kernel_source: str | None = None
    module: Any = field(default=None, repr=False)


def _looks_like_source(spec: str) -> bool:
    return "{" in spec or "\n" in spec


def parse(spec: "str | os.PathLike | Spec") -> Spec:
    """Parse and check a spec given as a path, as source text, or as an already parsed Spec."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, bytes):
        text, filename = decode(spec), None
    elif isinstance(spec, os.PathLike) or (isinstance(spec, str) and not _looks_like_source(spec)):
        text, filename = _read(Path(spec)), str(spec)
    elif isinstance(spec, str):
        text, filename = spec, None
    else:
        raise AttncError(f"a spec is a path, source text or attnc.Spec, not {type(spec).__name__}")
    ast = parse_text(text, filename)
    try:
        ir = lower(ast)
    except AttncError as err:
        raise err.with_source(text, filename) from None
    return Spec(text, filename, ast, ir)


def _read(path: Path) -> str:
    from .frontend.source import read_spec_file  # regular files only, bounded: see there

    return read_spec_file(path)


def build(spec, params: dict[str, Any], backend: str = "triton", tiles: tuple[int, int] = DEFAULT_TILES,
          layout: "str | Layout" = AUTO, progress: Callable[[int, int], None] | None = None) -> Compiled:
    """Run the pipeline for one binding of the parameters."""
    parsed = parse(spec)
    if backend not in BACKENDS:
        raise AttncError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    tiles = _check_tiles(tiles)
    try:
        bound = bind(parsed.ir, params)
        extents = tensor_extents(bound)
        # The cost model weighs candidate orders by their tile analyses (kernels only).
        order = choose(bound, layout, *tiles, analyse=None if backend == "reference" else analyse)
        if backend == "reference":  # the oracle computes densely in row-major order, whatever the layout
            return Compiled(parsed, bound, backend, layout=order, tensor_extents=extents)
        schedule = order.analysed(bound, *tiles) or analyse(bound, *tiles, order, progress=progress)
    except AttncError as err:
        raise err.with_source(parsed.text, parsed.filename) from None
    from .codegen.cache import load_module
    from .settings import settings

    module, path, source = load_module(parsed.ir, settings().cache_dir)
    return Compiled(parsed, bound, backend, schedule, order, needs_int64(bound), extents, path, source, module)


def _check_tiles(tiles) -> tuple[int, int]:
    try:
        bm, bn = (int(t) for t in tiles)
    except (TypeError, ValueError):
        raise AttncError(f"tiles must be a pair of integers (BLOCK_M, BLOCK_N), got {tiles!r}") from None
    return bm, bn

