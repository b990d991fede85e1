"""Spec AST: plain frozen dataclasses built from the parse tree, every node with its source span.

Spans are excluded from equality so that parse -> print -> parse round-trips compare structure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..errors import Span

_SPAN = dict(compare=False, repr=False)


@dataclass(frozen=True)
class Num:
    value: int | float
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Name:
    id: str
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Attr:
    """`q.y`, `k.i`: a coordinate of the query or key token."""

    value: "Expr"
    attr: str
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Unary:
    op: str  # '-', 'not'
    operand: "Expr"
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / // % & | ^ << >> == != < <= > >= and or
    lhs: "Expr"
    rhs: "Expr"
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Keyword:
    name: str
    value: "Expr"
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Call:
    func: Name
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...]
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Index:
    """`doc[q.i]`: a lookup in a runtime tensor passed to the compiled function."""

    base: Name
    indices: tuple["Expr", ...]
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Member:
    """`k in hi`: is the key token in the named segment of the key space?"""

    value: "Expr"
    segment: Name
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Segment:
    name: Name
    space: "Expr"
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Segments:
    """`hi: grid(H, W), lo: grid(H / 4, W / 4)`: a key space made of named parts, in order."""

    items: tuple[Segment, ...]
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Route:
    """`top(4) of regions(7, 7) by mean(q) @ mean(k)`: data-dependent selection of key groups."""

    top: "Expr"
    groups: "Expr"
    query: "Expr"
    key: "Expr"
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Tuple:
    items: tuple["Expr", ...]
    span: Span | None = field(default=None, **_SPAN)


Expr = Union[Num, Bool, Name, Attr, Unary, Binary, Call, Index, Member, Tuple]
Value = Union[Expr, Segments, Route]  # what a statement may assign


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Stmt:
    targets: tuple[Name, ...]
    value: Value
    span: Span | None = field(default=None, **_SPAN)


@dataclass(frozen=True)
class Attention:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span | None = field(default=None, **_SPAN)
