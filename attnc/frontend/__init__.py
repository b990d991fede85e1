"""Spec text -> AST: grammar, parser with located errors, and a printer."""
from .parser import decode, parse
from .printer import format_expr, format_spec
from .source import read_spec_file

__all__ = ["decode", "parse", "format_expr", "format_spec", "read_spec_file"]
