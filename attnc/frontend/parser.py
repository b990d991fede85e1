"""Text -> AST. Every failure becomes an AttncError with a location; no lark or Python error escapes."""
from __future__ import annotations

import functools
from pathlib import Path

import lark

from ..errors import AttncError, Span
from . import syntax as A

MAX_SOURCE_BYTES = 1 << 20
# Deeper expressions are rejected before any recursive pass sees them, so no stage can hit
# Python's recursion limit; real specs nest a handful of levels.
MAX_DEPTH = 100

_BINARY_RULES = {
    "add": "+", "sub": "-", "mul": "*", "floordiv": "//", "truediv": "/", "mod": "%",
    "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
    "and_op": "and", "or_op": "or",
    "bitand": "&", "bitor": "|", "bitxor": "^", "lshift": "<<", "rshift": ">>",
}
_NAMED_TERMINALS = {"NAME": "a name", "INT": "an integer", "FLOAT": "a number", "$END": "end of input"}


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    # Built on first use, not at import time.
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _terminal_names() -> dict[str, str]:
    names = dict(_NAMED_TERMINALS)
    for term in _parser().terminals:
        if term.name not in names and term.pattern.type == "str":
            names[term.name] = repr(term.pattern.value)
    return names


def decode(data: bytes, filename: str | None = None) -> str:
    """Bytes of a spec file -> text, with a located error for invalid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start].decode("utf-8", errors="replace")
        line = prefix.count("\n") + 1
        col = len(prefix) - (prefix.rfind("\n") + 1) + 1
        raise AttncError(
            f"spec is not valid UTF-8 text (byte 0x{data[exc.start]:02x})",
            Span(line, col, line, col + 1),
            filename=filename,
            hint="is this a binary file?",
        ) from None


def parse(source: str, filename: str | None = None) -> A.Attention:
    """Parse spec text into an AST. Raises AttncError (with file:line:col) on any problem."""
    try:
        return _parse(source)
    except AttncError as err:
        raise err.with_source(source, filename) from None


def _parse(source: str) -> A.Attention:
    # Editors on some systems start UTF-8 files with a byte-order mark; it is not part of the text.
    source = source.removeprefix("\ufeff")
    if len(source.encode("utf-8", errors="replace")) > MAX_SOURCE_BYTES:
        raise AttncError(f"spec is larger than {MAX_SOURCE_BYTES} bytes")
    if not source.strip() or all(
        not line.strip() or line.strip().startswith("#") for line in source.splitlines()
    ):
        raise AttncError("spec is empty", hint="a spec starts with `attention NAME(params) { ... }`")
    if "\x00" in source:
        line = source[: source.index("\x00")].count("\n") + 1
        col = source.index("\x00") - (source.rfind("\n", 0, source.index("\x00")) + 1) + 1
        raise AttncError("spec contains a NUL byte", Span(line, col, line, col + 1), hint="is this a binary file?")
    _check_bracket_depth(source)
    try:
        tree = _parser().parse(source)
    except lark.UnexpectedInput as exc:
        raise _syntax_error(exc, source) from None
    _check_tree_depth(tree)
    return _Builder().attention(tree.children[0])


def _check_bracket_depth(source: str) -> None:
    depth = 0
    line, col = 1, 0
    in_comment = False
    for ch in source:
        col += 1
        if ch == "\n":
            line, col, in_comment = line + 1, 0, False
        elif in_comment:
            continue
        elif ch == "#":
            in_comment = True
        elif ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise AttncError(
                    f"brackets nested more than {MAX_DEPTH} deep", Span(line, col, line, col + 1)
                )
        elif ch in ")]}":
            depth -= 1


def _check_tree_depth(tree: lark.Tree) -> None:
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise AttncError(f"expression nested more than {MAX_DEPTH} levels deep", _span(node))
        for child in node.children:
            if isinstance(child, lark.Tree):
                stack.append((child, depth + 1))


def _syntax_error(exc: lark.UnexpectedInput, source: str) -> AttncError:
    line = getattr(exc, "line", None)
    col = getattr(exc, "column", None)
    tok = getattr(exc, "token", None)
    if tok is not None and tok.type == "$END" and isinstance(tok.end_line, int):
        # Lark places end of input at the start of the last token; point just past it instead.
        line, col = tok.end_line, tok.end_column
    if not isinstance(line, int) or line < 1:
        # End of input: point just past the last character (lines end at "\n" only, as in lark).
        rows = source.rstrip().split("\n")
        line, col = len(rows), len(rows[-1]) + 1
    span = Span(line, col, line, col + 1)
    names = _terminal_names()
    expected = sorted({names.get(t, t) for t in (getattr(exc, "expected", None) or ())})
    expect = ""
    if expected:
        shown = expected if len(expected) <= 6 else expected[:6] + ["..."]
        expect = ", expected " + " or ".join(shown) if len(shown) <= 2 else ", expected one of " + ", ".join(shown)
    if isinstance(exc, lark.UnexpectedCharacters):
        char = source[exc.pos_in_stream] if exc.pos_in_stream < len(source) else ""
        return AttncError(f"unexpected character {char!r}", span)
    if isinstance(exc, lark.UnexpectedToken):
        tok = exc.token
        if tok.type == "$END":
            return AttncError("unexpected end of input" + expect, span, hint=_eof_hint(source))
        text = str(tok)
        span = Span(line, col, line, col + max(1, len(text)))
        hint = None
        if text == "=" and "'=='" in expected:  # `=` where a comparison could continue
            hint = "use '==' to compare values"
        return AttncError(f"unexpected {text!r}" + expect, span, hint=hint)
    return AttncError("unexpected end of input" + expect, span, hint=_eof_hint(source))


def _eof_hint(source: str) -> str | None:
    if source.count("{") > source.count("}"):
        return "the attention body is not closed with '}'"
    if source.count("(") > source.count(")"):
        return "a '(' is not closed"
    return None


def _span(node) -> Span | None:
    meta = getattr(node, "meta", None)
    if meta is not None and not getattr(meta, "empty", True):
        return Span(meta.line, meta.column, meta.end_line, meta.end_column)
    if isinstance(node, lark.Token) and node.line is not None:
        return Span(node.line, node.column, node.end_line, node.end_column)
    return None


class _Builder:
    """Parse tree -> AST (recursion is safe: depth was bounded above)."""

    def attention(self, tree: lark.Tree) -> A.Attention:
        name_tok, *rest = tree.children
        params = tuple(self.param(c) for c in rest if c.data == "param")
        body = tuple(self.stmt(c) for c in rest if c.data == "stmt")
        return A.Attention(str(name_tok), params, body, _span(tree))

    def param(self, tree: lark.Tree) -> A.Param:
        name = tree.children[0]
        default = self.expr(tree.children[1]) if len(tree.children) > 1 else None
        return A.Param(str(name), default, _span(name))

    def stmt(self, tree: lark.Tree) -> A.Stmt:
        *targets, value = tree.children
        names = tuple(A.Name(str(t), _span(t)) for t in targets)
        return A.Stmt(names, self.value(value), _span(tree))

    def value(self, node) -> A.Value:
        if isinstance(node, lark.Tree) and node.data == "segments":
            items = tuple(A.Segment(A.Name(str(s.children[0]), _span(s.children[0])), self.expr(s.children[1]),
                                    _span(s)) for s in node.children)
            return A.Segments(items, _span(node))
        if isinstance(node, lark.Tree) and node.data == "route":
            return A.Route(*(self.expr(k) for k in node.children), _span(node))
        return self.expr(node)

    def expr(self, node) -> A.Expr:
        span = _span(node)
        if isinstance(node, lark.Token):  # a bare NAME left by an inlined rule
            return A.Name(str(node), span)
        kind, kids = node.data, node.children
        if kind in _BINARY_RULES:
            return A.Binary(_BINARY_RULES[kind], self.expr(kids[0]), self.expr(kids[1]), span)
        if kind == "neg":
            return A.Unary("-", self.expr(kids[0]), span)
        if kind == "not_op":
            return A.Unary("not", self.expr(kids[0]), span)
        if kind == "int_lit":
            return A.Num(_int_literal(kids[0]), span)
        if kind == "float_lit":
            value = float(kids[0])
            if value != value or value in (float("inf"), float("-inf")):
                raise AttncError("number literal is too large", span)
            return A.Num(value, span)
        if kind == "true_lit":
            return A.Bool(True, span)
        if kind == "false_lit":
            return A.Bool(False, span)
        if kind == "name":
            return A.Name(str(kids[0]), span)
        if kind == "member":
            return A.Member(self.expr(kids[0]), A.Name(str(kids[1]), _span(kids[1])), span)
        if kind == "attr":
            return A.Attr(self.expr(kids[0]), str(kids[1]), span)
        if kind == "index":
            base = A.Name(str(kids[0]), _span(kids[0]))
            return A.Index(base, tuple(self.expr(k) for k in kids[1:]), span)
        if kind == "tuple":
            return A.Tuple(tuple(self.expr(k) for k in kids), span)
        if kind == "call":
            func = A.Name(str(kids[0]), _span(kids[0]))
            args, kwargs = [], []
            for arg in kids[1:]:
                if arg.data == "kwarg":
                    key = arg.children[0]
                    kwargs.append(A.Keyword(str(key), self.expr(arg.children[1]), _span(arg)))
                else:
                    if kwargs:
                        raise AttncError("positional argument after a keyword argument", _span(arg))
                    args.append(self.expr(arg.children[0]))
            return A.Call(func, tuple(args), tuple(kwargs), span)
        raise AssertionError(f"unhandled parse rule {kind}")  # grammar and builder out of sync


# Integers must fit the kernels' int32 arithmetic with room for products of coordinates.
MAX_INT_LITERAL = 2**31 - 1


def _int_literal(tok: lark.Token) -> int:
    text = str(tok)
    if len(text) > 12 or int(text) > MAX_INT_LITERAL:
        raise AttncError(f"integer literal {text[:20]}{'...' if len(text) > 20 else ''} is too large "
                         f"(limit {MAX_INT_LITERAL})", _span(tok))
    return int(text)
