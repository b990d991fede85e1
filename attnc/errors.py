"""The one error type attnc raises for bad input, with source locations for spec errors."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of spec source: 1-based line/column of the first and one-past-last character."""

    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.line}:{self.col}"


class AttncError(Exception):
    """Base class of every error attnc raises on bad input.

    Spec errors carry a span; `str(err)` is then `file:line:col: error: message`, the source
    line, a caret under the offending text and an optional hint.
    """

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        source: str | None = None,
        filename: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.span = span
        self.source = source
        self.filename = filename
        self.hint = hint
        super().__init__(self.render())

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def col(self) -> int | None:
        return self.span.col if self.span else None

    def with_source(self, source: str, filename: str | None) -> "AttncError":
        """Attach the spec text (once, at the public boundary) so the message can quote it."""
        if self.source is None:
            self.source = source
        if self.filename is None:
            self.filename = filename
        self.args = (self.render(),)
        return self

    def render(self) -> str:
        where = self.filename or "<spec>"
        if self.span is None:
            head = f"{self.filename}: error: {self.message}" if self.filename else f"error: {self.message}"
            return head + (f"\nhint: {self.hint}" if self.hint else "")
        lines = [f"{where}:{self.span.line}:{self.span.col}: error: {self.message}"]
        text = _source_line(self.source, self.span.line)
        if text is not None:
            width = 1
            if self.span.end_line == self.span.line:
                width = max(1, self.span.end_col - self.span.col)
            width = min(width, max(1, len(text) - self.span.col + 1))
            lines.append("    " + text)
            lines.append("    " + " " * (self.span.col - 1) + "^" * width)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _source_line(source: str | None, line: int) -> str | None:
    if source is None:
        return None
    # Only "\n" ends a line, as the parser counts them; splitlines() would also split on form
    # feeds, lone "\r" and Unicode separators and quote the wrong line.
    rows = source.split("\n")
    if 1 <= line <= len(rows):
        # Tabs would misalign the caret; printable stand-ins keep columns honest.
        return "".join(ch if ch.isprintable() else " " for ch in rows[line - 1].removesuffix("\r"))
    return None


def suggest(name: str, candidates) -> str | None:
    """A 'did you mean' hint for an unknown name, or None."""
    import difflib

    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
