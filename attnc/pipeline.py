"""The whole compiler in one place: each stage a function of the last, each artifact kept.

    text --parse--> AST --lower--> IR --bind--> Bound --analyse--> Schedule --emit--> Triton source
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import AttncError
from .frontend import decode, parse as parse_text
from .frontend import syntax as A
from .ir import nodes as N
from .ir.analysis import Schedule, analyse
from .ir.lower import lower
from .ir.routing import check_routable
from .ir.semantics import Bound, bind, needs_int64, tensor_extents

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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AttncError(f"no such spec file: {path}",
                         hint="pass a path to a .attn file or the spec's source text") from None
    except IsADirectoryError:
        raise AttncError(f"{path} is a directory, not a spec file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise AttncError(f"cannot read {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    return decode(data, str(path))


def build(spec, params: dict[str, Any], backend: str = "triton", tiles: tuple[int, int] = DEFAULT_TILES,
          progress: Callable[[int, int], None] | None = None) -> Compiled:
    """Run the pipeline for one binding of the parameters."""
    parsed = parse(spec)
    if backend not in BACKENDS:
        raise AttncError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    tiles = _check_tiles(tiles)
    try:
        bound = bind(parsed.ir, params)
        extents = tensor_extents(bound)
        if backend == "reference":
            return Compiled(parsed, bound, backend, tensor_extents=extents)
        check_routable(parsed.ir)
        schedule = analyse(bound, *tiles, progress=progress)
    except AttncError as err:
        raise err.with_source(parsed.text, parsed.filename) from None
    from .codegen.cache import load_module
    from .settings import settings

    module, path, source = load_module(parsed.ir, settings().cache_dir)
    return Compiled(parsed, bound, backend, schedule, needs_int64(bound), extents, path, source, module)


def _check_tiles(tiles) -> tuple[int, int]:
    try:
        bm, bn = (int(t) for t in tiles)
    except (TypeError, ValueError):
        raise AttncError(f"tiles must be a pair of integers (BLOCK_M, BLOCK_N), got {tiles!r}") from None
    return bm, bn


def compile(spec, backend: str = "triton", tiles: tuple[int, int] = DEFAULT_TILES, **params):
    """Compile a spec into a PyTorch callable `fn(q, k, v)`.

    spec: a path to a .attn file, .attn source text, or a Spec from `attnc.parse`.
    backend: "triton" (generated kernels; Triton's interpreter for CPU tensors) or "reference"
    (dense float evaluation, the oracle). tiles: (BLOCK_M, BLOCK_N). params: the spec's parameters.
    """
    from .runtime import AttentionFn

    return AttentionFn(build(spec, params, backend, tiles))
