"""Bad input: every failure is an AttncError that says where and what, and nothing else escapes.

Pinned locations for malformed specs, binding errors, bad files, pathological inputs, the CLI,
and mutation fuzzing of the specs in specs/.
"""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import AttncError
from attnc.cli import main

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
SPEC_FILES = sorted(SPECS.glob("*.attn"))

# Python internals that must never show in a message.
LEAKS = ("lark", "Token(", "Tree(", "Traceback", "__ANON", "$END")


def spec(*body: str, head: str = "attention a(N) {") -> str:
    """`head` on line 1, each body line indented by 4 (so body line n is line n + 1), then `}`."""
    return head + "\n" + "".join(f"    {line}\n" for line in body) + "}\n"


def assert_clean(err: AttncError) -> str:
    text = str(err)
    assert text.strip(), "empty error message"
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} leaks into the message:\n{text}"
    return text


def assert_rendered(err: AttncError, where: str = "<spec>") -> list[str]:
    """`where:line:col: error: msg`, the source line, a caret under column col, maybe a hint."""
    text = assert_clean(err)
    lines = text.splitlines()
    assert lines[0] == f"{where}:{err.line}:{err.col}: error: {err.message}", text
    assert lines[1].startswith("    "), text
    caret = lines[2]
    assert re.fullmatch(r" *\^+", caret), text
    assert caret.index("^") == 4 + err.col - 1, text
    if err.hint:
        assert lines[-1] == f"hint: {err.hint}", text
    return lines


def parse_error(source) -> AttncError:
    with pytest.raises(AttncError) as info:
        attnc.parse(source)
    return info.value


def compile_error(source, **params) -> AttncError:
    with pytest.raises(AttncError) as info:
        attnc.compile(source, backend="reference", **params)
    return info.value


# -- pinned locations -------------------------------------------------------------------------
# (source, line, col, phrase in the message, phrase in the hint or None for no hint check)
PINNED = {
    # syntax
    "missing-close-brace": (
        "attention a(N) {\n    q, kv = seq(N)\n    mask = causal\n",
        3, 18, "unexpected end of input", "not closed with '}'"),
    "missing-close-paren-params": (
        spec("q, kv = seq(N)", head="attention a(N {"),
        1, 15, "unexpected '{', expected one of ')'", None),
    "missing-close-paren-expr": (
        spec("q, kv = seq(N)", "mask = (q.i < k.i"),
        4, 1, "unexpected '}', expected ')' or ','", None),
    "at-outside-route": (
        spec("q, kv = seq(N)", "mask = q.i @ k.i"),
        3, 16, "unexpected '@'", None),
    "stray-dollar": (
        spec("q, kv = seq(N)", "mask = $causal"),
        3, 12, "unexpected character '$'", None),
    "assign-for-compare": (
        spec("q, kv = seq(N)", "mask = q.i = k.i"),
        3, 16, "unexpected '='", "use '=='"),
    "end-of-input-mid-expression": (
        "attention a(N) {\n    q, kv = seq(N)\n    mask = q.i <",
        3, 17, "unexpected end of input", "not closed with '}'"),
    "end-of-input-in-params": (
        "attention a(N,\n",
        1, 15, "unexpected end of input", "'(' is not closed"),
    # unknown names
    "unknown-function": (
        spec("q, kv = grid(H, W)", "mask = windw(3)", head="attention a(H, W) {"),
        3, 12, "unknown function 'windw'", "did you mean 'window'"),
    "unknown-name": (
        spec("q, kv = seq(N)", "mask = causl"),
        3, 12, "unknown name 'causl'", "did you mean 'causal'?"),
    "unknown-axis": (
        spec("q, kv = grid(H, W)", "mask = q.z < k.x", head="attention a(H, W) {"),
        3, 12, "q has no axis 'z'; its axes are y, x, i", None),
    "misspelt-axis": (
        spec("q, kv = grid(H, W)", "mask = q.y < k.xx", head="attention a(H, W) {"),
        3, 18, "k has no axis 'xx'", "did you mean 'x'?"),
    "misspelt-param": (
        spec("q, kv = seq(N)", "mask = q.i - k.i < Wdie", head="attention a(N, Wide = 4) {"),
        3, 24, "unknown name 'Wdie'", "did you mean 'Wide'?"),
    "misspelt-window-keyword": (
        spec("q, kv = grid(H, W)", "mask = window(3, dilaton = 2)", head="attention a(H, W) {"),
        3, 22, "window has no argument 'dilaton'", "did you mean 'dilation'?"),
    # types
    "int-mask": (
        spec("q, kv = seq(N)", "mask = q.i + 1"),
        3, 12, "the mask must be a condition, but this is an integer", None),
    "float-coordinate-arithmetic": (
        spec("q, kv = seq(N)", "mask = q.i / 2 < k.i"),
        3, 12, "arithmetic on token coordinates must stay in integers", "use // for integer division"),
    "floordiv-by-float": (
        spec("q, kv = seq(N)", "mask = q.i // 2.5 < k.i"),
        3, 19, "'//' needs integers, but this is a float", None),
    "floordiv-by-float-param": (
        spec("q, kv = seq(N)", "mask = q.i // S < k.i", head="attention a(N, S = 2.0) {"),
        3, 19, "'//' needs integers, but this is a float", None),
    "not-of-int": (
        spec("q, kv = seq(N)", "mask = not q.i"),
        3, 16, "the operand of 'not' must be a condition", None),
    # definitions
    "duplicated-assignment": (
        spec("q, kv = seq(N)", "mask = causal", "mask = true"),
        4, 5, "'mask' is assigned twice", "first assigned at line 3"),
    "duplicated-param": (
        spec("q, kv = seq(N)", head="attention a(N, N) {"),
        1, 16, "parameter 'N' is declared twice", None),
    "reserved-param-backend": (
        spec("q, kv = seq(N)", head="attention a(N, backend) {"),
        1, 16, "parameter name 'backend' is reserved for attnc.compile", None),
    "reserved-param-tiles": (
        spec("q, kv = seq(N)", head="attention a(N, tiles = 3) {"),
        1, 16, "parameter name 'tiles' is reserved for attnc.compile", None),
    "reserved-param-layout": (
        spec("q, kv = seq(N)", head="attention a(N, layout) {"),
        1, 16, "parameter name 'layout' is reserved for attnc.compile", None),
    # attnc.compile(spec, ...) could never be given a parameter called `spec`.
    "reserved-param-spec": (
        spec("q, kv = seq(N)", head="attention a(N, spec) {"),
        1, 16, "parameter name 'spec' is reserved for attnc.compile", None),
    "reserved-param-q": (
        spec("q, kv = seq(q)", head="attention a(q) {"),
        1, 13, "parameter name 'q' is reserved", None),
    "reserved-param-window": (
        spec("q, kv = seq(N)", head="attention a(N, window) {"),
        1, 16, "parameter name 'window' is reserved", None),
    "missing-q": (
        spec("kv = seq(N)", "mask = true"),
        1, 1, "does not define its q token space", "q, kv = seq(N)"),
    "missing-kv": (
        spec("q = seq(N)"),
        1, 1, "does not define its kv token space", "q, kv = seq(N)"),
    "unused-local": (
        spec("q, kv = seq(N)", "mas = causal"),
        3, 5, "'mas' is defined but never used", "did you mean 'mask'?"),
    # arity
    "seq-two-sizes": (
        spec("q, kv = seq(N, N)"),
        2, 13, "seq() takes one size, got 2", None),
    "grid-one-size": (
        spec("q, kv = grid(H)", head="attention a(H) {"),
        2, 13, "grid() takes 2 or 3 sizes, got 1", None),
    "window-three-kernels-on-2d": (
        spec("q, kv = grid(H, W)", "mask = window(3, 3, 3)", head="attention a(H, W) {"),
        3, 12, "expected 1 or 2 kernel sizes (one per axis), got 3", None),
    "window-three-dilations-on-2d": (
        spec("q, kv = grid(H, W)", "mask = window(3, dilation = (1, 2, 3))", head="attention a(H, W) {"),
        3, 33, "expected 1 or 2 dilation values (one per axis), got 3", None),
    "window-two-kernels-on-seq": (
        spec("q, kv = seq(N)", "mask = window(3, 3)"),
        3, 12, "expected 1 kernel size, got 2", None),
    "window-cross-attention": (
        spec("q = seq(N)", "kv = seq(M)", "mask = window(3)", head="attention a(N, M) {"),
        4, 12, "window() needs q and kv in the same token space", None),
    "positional-after-keyword": (
        spec("q, kv = grid(H, W)", "mask = window(dilation = 1, 3)", head="attention a(H, W) {"),
        3, 33, "positional argument after a keyword argument", None),
    # literals
    "int-literal-too-large": (
        spec("q, kv = seq(N)", "mask = q.i - k.i < 99999999999999999999"),
        3, 24, "integer literal 99999999999999999999 is too large", None),
    "folded-constant-too-large": (
        spec("q, kv = seq(N)", "mask = q.i + 2147483647 * 2147483647 < k.i"),
        3, 18, "integer constant 4611686014132420609 is too large", None),
    "folded-constant-in-param-default": (
        spec("q, kv = seq(N)", "mask = q.i * M < k.i", head="attention a(N, M = 65536 * 65536) {"),
        1, 20, "integer constant 4294967296 is too large", None),
    "float-literal-too-large": (
        spec("q, kv = seq(N)", "score = softmax(scale = 1e400)"),
        3, 29, "number literal is too large", None),
    # coordinates where the spaces are not defined yet
    "coordinate-in-space-size": (
        spec("q, kv = seq(q.i)"),
        2, 17, "token coordinates cannot be used", None),
    "coordinate-in-param-default": (
        spec("q, kv = seq(N)", "mask = k.i < M", head="attention a(N, M = q.i) {"),
        1, 20, "token coordinates cannot be used", None),
    "causal-in-param-default": (
        spec("q, kv = seq(N)", head="attention a(N, M = causal) {"),
        1, 20, "token coordinates cannot be used", None),
    "window-in-space-size": (
        spec("q, kv = grid(H, window(3))", head="attention a(H) {"),
        2, 21, "token coordinates cannot be used", None),
}


@pytest.mark.parametrize("source, line, col, phrase, hint", PINNED.values(), ids=PINNED.keys())
def test_pinned_location(source, line, col, phrase, hint):
    err = parse_error(source)
    assert (err.line, err.col) == (line, col), str(err)
    assert phrase in err.message, str(err)
    if hint is not None:
        assert err.hint is not None and hint in err.hint, str(err)
    assert_rendered(err)


def test_assign_hint_only_where_a_comparison_fits():
    # `=` where an expression must start: suggesting `==` would be wrong.
    err = parse_error(spec("q, kv = = seq(N)"))
    assert (err.line, err.col) == (2, 13)
    assert err.hint is None or "==" not in err.hint, str(err)


def test_errors_point_at_the_same_line_lark_counts():
    # Form feeds and lone carriage returns are whitespace, not line breaks: the quoted source line
    # must be the one the line number names.
    for sep in ("\x0c", "\r", "\x0b", "\u2028", "\x85"):
        source = f"attention a(N) {{{sep}  q, kv = seq(N)\n    mask = q.i @ k.i\n}}\n"
        err = parse_error(source)
        lines = assert_rendered(err)
        if sep in ("\x0c", "\r"):
            assert (err.line, err.col) == (2, 16)
            assert lines[1] == "    " + "    mask = q.i @ k.i"
        else:  # not whitespace in the language: the character itself is the error
            assert (err.line, err.col) == (1, 17) and "unexpected character" in err.message


def test_crlf_line_endings():
    source = spec("q, kv = seq(N)", "mask = q.i @ k.i").replace("\n", "\r\n")
    err = parse_error(source)
    assert (err.line, err.col) == (3, 16)
    assert assert_rendered(err)[1] == "    " + "    mask = q.i @ k.i"


def test_tabs_count_one_column_and_keep_the_caret_aligned():
    err = parse_error("attention a(N) {\n\tq, kv = seq(N)\n\tmask = q.i @ k.i\n}\n")
    assert (err.line, err.col) == (3, 13)
    assert assert_rendered(err)[1] == "    " + " mask = q.i @ k.i"


def test_first_error_wins_and_later_lines_are_not_blamed():
    source = spec("q, kv = seq(N)", "mask = causl", "score = sofmax")
    err = parse_error(source)
    assert (err.line, err.col) == (3, 12)


def test_filename_in_located_parse_error(tmp_path):
    path = tmp_path / "bad.attn"
    path.write_text(spec("q, kv = seq(N)", "mask = q.i @ k.i"))
    err = parse_error(str(path))
    assert err.filename == str(path)
    assert_rendered(err, where=str(path))
    err = parse_error(path)  # a PathLike as well as a str
    assert str(err).startswith(f"{path}:3:16: error: unexpected '@'")


# -- binding errors ----------------------------------------------------------------------------
NATTEN = SPECS / "natten2d.attn"
LONGFORMER = SPECS / "longformer.attn"


def test_missing_parameter():
    err = compile_error(NATTEN)
    assert "needs a value for parameters H, W" in err.message
    assert "H=" in err.hint
    assert str(err).startswith(f"{NATTEN}: error: ")
    assert_clean(err)


def test_unknown_parameter_with_suggestion():
    err = compile_error(LONGFORMER, N=64, WW=4)
    assert "has no parameter 'WW'" in err.message
    assert err.hint == "did you mean 'W'?"
    assert str(err).startswith(f"{LONGFORMER}: error: ")
    assert_clean(err)


def test_unknown_parameter_lists_the_parameters():
    err = compile_error(SPECS / "causal.attn", N=64, M=3)
    assert "has no parameter 'M'" in err.message and "N" in err.hint
    assert_clean(err)


@pytest.mark.parametrize("value, phrase", [
    (64.0, "must be an integer, got 64.0"),
    (64.5, "must be an integer, got 64.5"),
    (True, "must be an integer, got bool True"),
    ("64", "must be an integer, got str '64'"),
    (None, "must be an integer, got NoneType None"),
    (1j, "must be an integer, got complex 1j"),
    (2**40, "out of range"),
    (0, "sizes must be at least 1"),
    (-3, "sizes must be at least 1"),
], ids=["float", "fractional", "bool", "str", "none", "complex", "huge", "zero", "negative"])
def test_bad_parameter_values(value, phrase):
    path = SPECS / "causal.attn"
    err = compile_error(path, N=value)
    assert "'N'" in err.message or "N = " in err.message, str(err)
    assert phrase in err.message, str(err)
    if "sizes" in phrase:  # the spec's space is where the size is formed
        assert (err.line, err.col) == (3, 13), str(err)
        assert_rendered(err, str(path))
    else:  # a bad value in the call: unlocated, but the file is named
        assert str(err).startswith(f"{path}: error: ")
    assert_clean(err)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", True])
def test_bad_float_parameter_values(value):
    source = spec("q, kv = seq(N)", "score = softmax(scale = s)", head="attention a(N, s = 1.0) {")
    err = compile_error(source, N=8, s=value)
    assert "'s'" in err.message, str(err)
    assert_clean(err)


def test_float_parameter_accepts_an_int():
    source = spec("q, kv = seq(N)", "score = softmax(scale = s)", head="attention a(N, s = 1.0) {")
    attnc.compile(source, backend="reference", N=8, s=2)


@pytest.mark.parametrize("params, phrase", [
    (dict(H=8, W=16, kernel=3, dilation=3), "window along axis y: kernel 3 (kernel) times dilation 3 (dilation) "
                                            "exceeds the axis length 8 (H)"),
    (dict(H=16, W=8, kernel=5, dilation=2), "window along axis x: kernel 5 (kernel) times dilation 2 (dilation) "
                                            "exceeds the axis length 8 (W)"),
    (dict(H=8, W=8, kernel=1), "kernel 1 (kernel) must be at least 2"),
    (dict(H=8, W=8, kernel=3, dilation=0), "dilation 0 (dilation) must be at least 1"),
], ids=["kernel-dilation-exceeds-H", "kernel-dilation-exceeds-W", "kernel-1", "dilation-0"])
def test_window_preconditions_from_a_file(params, phrase):
    err = compile_error(NATTEN, **params)
    assert phrase in err.message, str(err)
    assert (err.line, err.col) == (5, 13)
    lines = assert_rendered(err, where=str(NATTEN))
    assert "window(kernel, kernel, dilation = dilation)" in lines[1]


def test_window_stride_larger_than_kernel(tmp_path):
    path = tmp_path / "strided.attn"
    path.write_text(spec("q, kv = seq(N)", "mask = window(K, stride = S)", head="attention s(N, K = 3, S = 1) {"))
    err = compile_error(path, N=16, S=4)
    assert "window along axis i: stride 4 (S) must be between 1 and the kernel size 3" in err.message
    assert (err.line, err.col) == (3, 12)
    assert_rendered(err, where=str(path))
    # Stride 0 and a default that breaks the precondition fail the same way.
    assert "stride 0 (S)" in compile_error(path, N=16, S=0).message
    assert "kernel 3 (K)" in compile_error(path, N=2).message


def test_bad_compile_options():
    with pytest.raises(AttncError, match="unknown backend 'cuda'"):
        attnc.compile(SPECS / "causal.attn", backend="cuda", N=8)
    with pytest.raises(AttncError, match="tiles must be a pair of integers"):
        attnc.compile(SPECS / "causal.attn", backend="reference", tiles="64x64", N=8)
    with pytest.raises(AttncError, match="a spec is a path, source text or attnc.Spec"):
        attnc.parse(42)


def test_runtime_errors_in_the_mask_are_attnc_errors():
    # A divisor that is 0 at some token pairs only (a parameter that is 0 is refused, located, when
    # binding: tests/test_lowering_defects.py).
    source = spec("q, kv = seq(N)", "mask = q.i // (k.i - 3) < k.i")
    fn = attnc.compile(source, backend="reference", N=8)
    with pytest.raises(AttncError, match="division by zero"):
        fn.mask()


# -- bad files ----------------------------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    path = tmp_path / "nope.attn"
    err = parse_error(str(path))
    assert f"no such spec file: {path}" in err.message
    assert_clean(err)


def test_directory(tmp_path):
    err = parse_error(str(tmp_path))
    assert "is a directory" in err.message
    assert_clean(err)


def test_path_with_a_nul_byte():
    err = parse_error("specs/causal\x00.attn")
    assert "cannot read" in err.message
    assert_clean(err)


def test_byte_order_mark_is_ignored():
    assert attnc.parse("\ufeffattention a(N) { q, kv = seq(N) }").name == "a"


def test_head_dim_in_a_parameter_default_is_located():
    err = parse_error("attention a(N, M = head_dim) { q, kv = seq(N) }")
    assert (err.line, err.col) == (1, 20) and "head_dim" in err.message


@pytest.mark.parametrize("content", ["", "   \n\t\n", "# only a comment\n", "\n# a\n   # b\n\n"],
                         ids=["empty", "whitespace", "comment", "comments-and-blanks"])
def test_empty_files(tmp_path, content):
    path = tmp_path / "empty.attn"
    path.write_text(content)
    err = parse_error(str(path))
    assert err.message == "spec is empty" and "attention NAME" in err.hint
    assert str(err).startswith(f"{path}: error: spec is empty")
    assert_clean(err)


def test_binary_garbage(tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "garbage.attn"
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))
        path.write_bytes(data)
        err = parse_error(str(path))
        assert err.line is not None and err.col is not None, str(err)
        assert str(err).startswith(f"{path}:{err.line}:{err.col}: error: "), str(err)
        assert_clean(err)


def test_invalid_utf8_is_located(tmp_path):
    path = tmp_path / "latin1.attn"
    path.write_bytes(spec("q, kv = seq(N)", "mask = caf\xe9").encode("latin-1"))
    err = parse_error(str(path))
    assert (err.line, err.col) == (3, 15)
    assert "not valid UTF-8" in err.message and "0xe9" in err.message
    assert str(err).startswith(f"{path}:3:15: error: ")
    assert_clean(err)


def test_invalid_utf8_bytes_given_directly():
    err = parse_error(b"attention a(N) {\n  \xff\n}\n")
    assert (err.line, err.col) == (2, 3)
    assert_clean(err)


def test_nul_byte(tmp_path):
    path = tmp_path / "nul.attn"
    path.write_bytes(b"attention a(N) {\n    q, kv = seq(N)\x00\n}\n")
    err = parse_error(str(path))
    assert (err.line, err.col) == (2, 19)
    assert "NUL byte" in err.message
    # A binary file is named and located, but its content is not echoed (tests/test_input_files.py).
    assert str(err).startswith(f"{path}:2:19: error: ") and "seq(N)" not in str(err)
    assert_clean(err)


def test_non_ascii_text_is_located():
    err = parse_error(spec("q, kv = seq(N)", "mask = q.i < é"))
    assert (err.line, err.col) == (3, 18) and "'é'" in err.message
    assert_rendered(err)


def test_deeply_nested_parentheses():
    source = spec("q, kv = seq(N)", "mask = " + "(" * 5000 + "true" + ")" * 5000)
    err = parse_error(source)
    assert (err.line, err.col) == (3, 12 + 99)  # the body's `{` is the first level
    assert "nested more than 100 deep" in err.message
    assert_clean(err)


@pytest.mark.parametrize("expr", [
    "q.i < " + " + ".join(["1"] * 20000),
    " or ".join(["q.i < k.i"] * 20000),
    "not " * 20000 + "true",
    "q.i < " + "-" * 20000 + "1",
], ids=["sum", "or", "not", "negation"])
def test_very_long_expressions(expr):
    source = spec("q, kv = seq(N)", "mask = " + expr)
    err = parse_error(source)  # an AttncError, never RecursionError
    assert err.line == 3 and "nested more than" in err.message
    assert_clean(err)


def test_long_chain_of_local_definitions():
    # Each line is tiny, but inlining the locals nests 2000 levels deep (a parameter term, so
    # constant folding cannot flatten the chain).
    body = ["q, kv = seq(N)", "a0 = q.i"] + [f"a{i} = a{i - 1} + N" for i in range(1, 2000)]
    err = parse_error(spec(*body, "mask = a1999 < k.i"))
    # a200 (line 203) is the first definition past 200 levels.
    assert (err.line, err.col) == (203, 12), str(err)
    assert "too large once local definitions are substituted: 201 levels deep" in err.message
    assert_rendered(err)


def test_exponential_local_definitions():
    # 40 doublings: a tree of 2**40 nodes behind a 40-line spec must be refused, and quickly.
    body = ["q, kv = seq(N)", "b0 = q.i < k.i"] + [f"b{i} = b{i - 1} and b{i - 1}" for i in range(1, 40)]
    start = time.perf_counter()
    err = parse_error(spec(*body, "mask = b39"))
    assert time.perf_counter() - start < 5
    # b13 (line 16) is the first to stand for more than 20000 nodes.
    assert (err.line, err.col) == (16, 11), str(err)
    assert "too large once local definitions are substituted: 32767 terms" in err.message
    assert_rendered(err)


def test_local_chains_just_under_the_limit_go_through_every_stage(device):
    # Every pass after lowering recurses over the IR: at the depth limit they must all still work.
    body = ["q, kv = seq(N)", "a0 = q.i"] + [f"a{i} = a{i - 1} + 1" for i in range(1, 196)]
    source = spec(*body, "mask = a195 - 195 <= k.i and window(3)")
    ref = attnc.compile(source, backend="reference", N=16)
    assert ref.mask().sum().item() == 32  # window(3) rows 3 + 14 * 2 + 1, keys at or after the query
    fn = attnc.compile(source, backend="triton", tiles=(16, 16), N=16)
    assert "def visible(" in fn.kernel_source
    q = torch.randn(1, 1, 16, 16, device=device)
    torch.testing.assert_close(fn(q, q, q).cpu(), ref(q.cpu(), q.cpu(), q.cpu()), atol=1e-4, rtol=1e-4)


def test_file_over_one_mebibyte(tmp_path):
    path = tmp_path / "huge.attn"
    path.write_text("attention a(N) {\n    q, kv = seq(N)\n" + "# padding padding padding\n" * 45000 + "}\n")
    assert path.stat().st_size > 1 << 20
    err = parse_error(str(path))
    assert "larger than 1048576 bytes" in err.message
    assert_clean(err)


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_check_reports_located_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.attn"
    bad.write_text(spec("q, kv = seq(N)", "mask = q.i @ k.i"))
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3:16: error: unexpected '@'" in err
    assert "^" in err
    assert main(["check", "specs/causal.attn"]) == 0
    captured = capsys.readouterr()
    assert "ok: specs/causal.attn" in captured.out and captured.err == ""
    # One bad file among good ones fails the run but every file is reported.
    assert main(["check", "specs/causal.attn", str(bad), "specs/natten2d.attn"]) == 1
    captured = capsys.readouterr()
    assert "ok: specs/causal.attn" in captured.out and "ok: specs/natten2d.attn" in captured.out
    assert f"{bad}:3:16:" in captured.err


def test_cli_check_missing_file(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.attn")]) == 1
    assert "no such spec file" in capsys.readouterr().err


# -- fuzzing ---------------------------------------------------------------------------------------
SPEC_TEXTS = [p.read_text() for p in SPEC_FILES]
_TOKEN = re.compile(r"\s+|#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]*)?|==|!=|<=|>=|//|.", re.S)
VOCAB = [
    "(", ")", "{", "}", "[", "]", ",", ";", ".", "=", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*",
    "/", "//", "%", "<<", ">>", "ilog2", "and", "or", "not", "true", "false", "attention", "q", "k", "kv", "q.i", "k.i",
    "q.x", "k.y", "q.t", "seq", "grid", "seq(N)", "grid(H, W)", "grid(2, H, W)", "window", "window(3)",
    "window(2, stride = 2, causal = true)", "same_block(2)", "causal", "softmax", "softmax(scale = 0.5)",
    "mask", "score", "abs", "min", "max", "sqrt", "log", "exp", "head_dim", "N", "M", "W", "G", "H",
    "kernel", "dilation", "stride", "scale", "backend", "tiles", "spec", "0", "1", "-1", "2", "3", "8",
    "1 / 0", "// 0", "% 0", "(1, 2)", "2147483647", "2147483648", "99999999999999999999", "1e400",
    "1e-400", "* 2147483647", "0.5", ".5", "5.", "1e3", "@", "$", "`", "\\", "'", '"', "?", "!", "~", "^", "&", "|",
    ":", "\x00", "é", "ÿ", "\ufeff", "\u2028", "\x85", "\x0c", "\x0b", "\r", "\t", "\n", " ", "#",
    "# comment\n", "\U0001f642", "∞",
]


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def mutate(tokens: list[str], ops: list[tuple[int, int, int, str]]) -> str:
    """Apply (kind, i, j, token) mutations: 0 delete, 1 duplicate, 2 insert, 3 swap, 4 replace."""
    toks = list(tokens)
    for kind, i, j, tok in ops:
        if not toks:
            toks = [tok]
            continue
        i %= len(toks)
        if kind == 0:
            del toks[i]
        elif kind == 1:
            toks.insert(i, toks[i])
        elif kind == 2:
            toks.insert(i, tok)
        elif kind == 4:
            toks[i] = tok
        else:
            j %= len(toks)
            toks[i], toks[j] = toks[j], toks[i]
    return "".join(toks)


def check_input(text: str, rng: random.Random | None = None) -> str:
    """Parse, compile and evaluate `text`; only AttncError may escape. Returns how far it got.

    Parameters without a default get 28 (which meets every spec file's preconditions: Swin's
    multiples of 7, Scale-DiT's multiples of 4, MaxViT's grid divisibility, window sizes); with
    `rng`, any parameter may get another small value.
    """
    if "\n" not in text:
        text += "\n"  # keep it source text: a string without braces or newlines is a path
    try:
        parsed = attnc.parse(text)
    except AttncError as err:
        assert_clean(err)
        # Only size and emptiness checks are unlocated; every other spec error says where.
        if err.message != "spec is empty" and "larger than" not in err.message:
            assert err.line is not None and err.col is not None, str(err)
            assert 1 <= err.line <= text.count("\n") + 1 and err.col >= 1, str(err)
            assert "^" in str(err), str(err)
        return "parse"
    params = {p.name: 28 for p in parsed.params if p.default is None}
    if rng is not None:
        for p in parsed.params:
            if rng.random() < 0.3:
                params[p.name] = rng.choice([-1, 0, 1, 2, 3, 5, 8, 2.5])
    try:
        fn = attnc.compile(text, backend="reference", **params)
        bound = fn.compiled.bound
        if bound.nq * bound.nk <= 1 << 16:
            # Runtime tensors (document ids...) of the smallest valid shape, all zeros.
            tensors = {name: torch.zeros(shape, dtype=torch.long) for name, shape in fn.compiled.tensor_extents.items()}
            if parsed.ir.route is not None:
                fn.routed_mask(torch.randn(1, 1, bound.nq, 4), torch.randn(1, 1, bound.nk, 4), **tensors)
            else:
                fn.mask(**tensors)
    except AttncError as err:
        assert_clean(err)
        return "bind"
    return "ok"


def test_unmutated_specs_compile():
    for text in SPEC_TEXTS:
        assert check_input(text) == "ok"


_ops = st.lists(
    st.tuples(
        st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 10_000),
        st.one_of(st.sampled_from(VOCAB), st.binary(min_size=1, max_size=3).map(lambda b: b.decode("latin-1"))),
    ),
    min_size=1, max_size=4,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SPEC_TEXTS), _ops)
def test_fuzz_mutations_hypothesis(text, ops):
    check_input(mutate(tokenize(text), ops))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SPEC_TEXTS), st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_fuzz_raw_bytes(text, pos, junk):
    data = text.encode()
    pos %= len(data) + 1
    mutated = data[:pos] + junk + data[pos:]
    try:
        attnc.parse(mutated)
    except AttncError as err:
        assert_clean(err)
        assert err.line is not None, str(err)


def test_fuzz_mutations_seeded():
    rng = random.Random(20240611)
    token_lists = [tokenize(t) for t in SPEC_TEXTS]
    deadline = time.perf_counter() + 25
    outcomes = {"parse": 0, "bind": 0, "ok": 0}
    for n in range(20_000):
        if time.perf_counter() > deadline:
            break
        toks = rng.choice(token_lists)
        ops = []
        for _ in range(rng.randint(1, 3)):
            tok = rng.choice(VOCAB) if rng.random() < 0.9 else \
                bytes(rng.randrange(256) for _ in range(rng.randint(1, 3))).decode("latin-1")
            ops.append((rng.randrange(5), rng.randrange(10_000), rng.randrange(10_000), tok))
        text = mutate(toks, ops)
        try:
            outcomes[check_input(text, rng)] += 1
        except Exception as exc:
            raise AssertionError(f"mutation {n} of {text!r}: {type(exc).__name__}: {exc}") from exc
    assert sum(outcomes.values()) >= 500, outcomes
    # The mutations reach every stage, not just the parser.
    assert all(outcomes.values()), outcomes
    print(outcomes)


@pytest.mark.parametrize("spec_file, params, phrase", [
    ("swin_shifted", dict(H=14, W=15), "axis x length must be a multiple of the window: W % 7 == 0 is false"),
    ("swin_shifted", dict(H=10, W=14), "axis y length must be a multiple of the window: H % 7 == 0 is false"),
    ("maxvit_grid", dict(H=8, W=8, G=3), "axis y length must be a multiple of the grid size: H % G == 0"),
    ("maxvit_grid", dict(H=8, W=8, G=0), "grid size along axis y must be at least 1"),
])
def test_builtin_preconditions_name_the_parameter(spec_file, params, phrase):
    path = SPECS / f"{spec_file}.attn"
    err = compile_error(path, **params)
    assert phrase in err.message, str(err)
    assert err.line is not None and str(err).startswith(f"{path}:{err.line}:")
    assert_clean(err)


@pytest.mark.parametrize("source, phrase", [
    ("attention a(N) { q, kv = seq(N) mask = k.i < n_visible }", "only defined in a score's scale and bias"),
    ("attention a(N) { q, kv = seq(N) score = softmax(bias = 1.0) }", "softmax has no argument 'bias'"),
    ("attention a(N) { q, kv = seq(N) score = softplus(2.0) }", "takes only keyword arguments"),
    ("attention a(N) { q, kv = seq(N) score = sigmoid(scale = q.i) }", "cannot depend on token coordinates"),
    ("attention a(N) { q, kv = seq(N) score = softmx }", "expected a score function"),
    ("attention a(N) { q, kv = seq(N) mask = same_window(4, shift = 4) }", "shift along axis i must be in [0, window)"),
])
def test_score_and_builtin_errors_are_located(source, phrase):
    err = parse_error(source) if "shift" not in source else compile_error(source, N=8)
    assert phrase in err.message, str(err)
    assert err.line == 1
    assert_clean(err)


@pytest.mark.parametrize("tensors, phrase", [
    ({}, "reads runtime tensor 'doc'; pass it as doc=tensor"),
    ({"doc": torch.zeros(24), "dco": torch.zeros(24, dtype=torch.long)}, "reads no runtime tensor 'dco'"),
    ({"doc": torch.zeros(24)}, "must have an integer dtype"),
    ({"doc": torch.zeros(20, dtype=torch.long)}, "has shape [20]; the spec indexes it up to shape [24]"),
    ({"doc": torch.zeros(24, 1, dtype=torch.long)}, "has shape [24, 1]"),
    ({"doc": [0] * 24}, "must be a torch.Tensor"),
    ({"doc": torch.full((24,), 2**40)}, "outside int32"),
])
def test_runtime_tensor_validation(tensors, phrase):
    fn = attnc.compile(SPECS / "document_causal.attn", N=24)
    q = k = v = torch.zeros(1, 1, 24, 16)
    with pytest.raises(AttncError) as info:
        fn(q, k, v, **tensors)
    assert phrase in info.value.message, str(info.value)
    assert_clean(info.value)


@pytest.mark.parametrize("source, line, col, phrase", [
    ("attention a(N) { q, kv = seq(N) mask = N[q.i] == 0 }", 1, 40, "'N' is not a runtime tensor"),
    ("attention a(N) { q, kv = seq(N) mask = d[q.i] == d[q.i, k.i] }", 1, 50, "indexed with 2 indices here but 1"),
    ("attention a(N) { q, kv = seq(N) mask = d[N / 2] == 0 }", 1, 42, "must be an integer"),
    ("attention a(N) { q, kv = seq(N) score = softmax(scale = d[0]) }", 1, 57, "can only be read in the mask"),
])
def test_runtime_tensor_spec_errors(source, line, col, phrase):
    err = parse_error(source)
    assert (err.line, err.col) == (line, col), str(err)
    assert phrase in err.message


def test_negative_tensor_index_is_an_error():
    err = compile_error("attention a(N) { q, kv = seq(N) mask = d[q.i - k.i] == 0 }", N=8)
    assert "can be negative" in err.message
