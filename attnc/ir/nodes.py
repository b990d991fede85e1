"""attnc IR: frozen, hashable dataclasses with a canonical text form.

Expressions are typed (int, float, bool) by construction in `lower.py`. Parameters stay
symbolic: one IR (and one generated kernel) serves every binding of the sizes, which are
passed to kernels as runtime arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..errors import Span

INT, FLOAT, BOOL = "int", "float", "bool"
_NOCMP = dict(compare=False, repr=False, hash=False)


@dataclass(frozen=True, eq=False)
class Const:
    value: int | float | bool

    # Typed equality: Python's 2 == 2.0 == True would let memos and caches (which key on IR
    # nodes) hand out `2.0` where the integer 2 belongs, or `0` for `false`.
    def __eq__(self, other) -> bool:
        return isinstance(other, Const) and type(self.value) is type(other.value) and self.value == other.value

    def __hash__(self) -> int:
        return hash((Const, type(self.value).__name__, self.value))

    @property
    def type(self) -> str:
        return BOOL if isinstance(self.value, bool) else INT if isinstance(self.value, int) else FLOAT


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # INT or FLOAT (a bool parameter is read as `Param(name, INT) != 0`, see ParamDecl)


@dataclass(frozen=True)
class HeadDim:
    """The head dimension D of q and k, known when the callable runs."""

    type = INT


@dataclass(frozen=True)
class NVisible:
    """The number of keys the query sees (a per-row count from tile analysis); score scales only."""

    type = INT


@dataclass(frozen=True)
class Head:
    """The query head index h (0 <= h < Hq); only in score modifiers, which may differ per head."""

    type = INT


@dataclass(frozen=True)
class Batch:
    """The batch index b (0 <= b < B) of the call; only in the mask (per-sequence packings)."""

    type = INT


@dataclass(frozen=True)
class Member:
    """`k in name` / `q in name`: the token lies in the named segment of its segmented space."""

    side: str
    segment: str
    type = BOOL


@dataclass(frozen=True)
class Coord:
    """A coordinate of the query ('q') or key ('k') token: axis 'i' (flat index), 't', 'y' or 'x'.

    In a segmented key space a key's coordinates are those within its own segment.
    """

    side: str
    axis: str
    type = INT


@dataclass(frozen=True)
class Lookup:
    """An element of a runtime tensor: integer in masks (document ids, `doc[q.i]`), float in
    score modifiers (bias tables, `rel_bias[q.y - k.y + 6, q.x - k.x + 6]`)."""

    tensor: str
    indices: tuple["Expr", ...]
    type: str = INT


@dataclass(frozen=True)
class Unary:
    op: str  # 'neg', 'not', 'abs', 'ilog2' (floor(log2(x)), x >= 1; see bits.py)
    operand: "Expr"

    @property
    def type(self) -> str:
        return BOOL if self.op == "not" else self.operand.type


@dataclass(frozen=True)
class Binary:
    op: str  # + - * // % / min max & | ^ << >> == != < <= > >= and or
    lhs: "Expr"
    rhs: "Expr"

    @property
    def type(self) -> str:
        if self.op in COMPARISONS or self.op in ("and", "or"):
            return BOOL
        if self.op == "/":
            return FLOAT
        return FLOAT if FLOAT in (self.lhs.type, self.rhs.type) else INT


@dataclass(frozen=True)
class Call:
    """Float math: sqrt, log, exp."""

    fn: str
    args: tuple["Expr", ...]
    type = FLOAT


@dataclass(frozen=True)
class Window:
    """NATTEN neighborhood along one axis (DESIGN.md section 3); `length` is the axis size."""

    axis: str
    length: "Expr"
    kernel: "Expr"
    dilation: "Expr"
    stride: "Expr"
    causal: bool
    span: Span | None = field(default=None, **_NOCMP)
    type = BOOL

    def expand(self) -> "Expr":
        """The window as plain integer arithmetic: the one definition reference and kernels share
        (built once per node: analysis expands windows often)."""
        out = self.__dict__.get("_expanded")
        if out is None:
            out = self._expand()
            object.__setattr__(self, "_expanded", out)
        return out

    def bounds(self) -> tuple["Expr", "Expr", "Expr"]:
        """(group, start, end) of the query's neighborhood: keys j with j % d == group and
        start <= j // d < end, in the query's dilation group (all three read q only)."""
        i = Coord("q", self.axis)
        n, k, d, s = self.length, self.kernel, self.dilation, self.stride
        group = i % d
        ip = i // d
        n_group = (n - group + d - Const(1)) // d
        if self.causal:
            leader = (ip // s * s + s - Const(1)).min(n_group - Const(1))
            return group, (leader - k + Const(1)).max(Const(0)), ip + Const(1)
        leader = (ip // s * s + s // Const(2)).min(n_group - Const(1))
        start = (leader - k // Const(2)).min(n_group - k).max(Const(0))
        return group, start, start + k

    def _expand(self) -> "Expr":
        j, d = Coord("k", self.axis), self.dilation
        group, start, end = self.bounds()
        jp = j // d
        return (j % d).eq(group).and_(start.le(jp)).and_(jp.lt(end))


COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")
BIT_OPS = ("&", "|", "^", "<<", ">>")  # integers only; shift counts within SHIFT_LIMITS
SHIFT_LIMITS = (0, 31)  # a count outside is an error where evaluated (kernels shift int32 values)
Expr = Union[Const, Param, HeadDim, NVisible, Head, Batch, Member, Coord, Lookup, Unary, Binary, Call, Window]


def _cache_hash(cls) -> None:
    """Memoise a frozen node's hash: the generated one hashes the whole subtree on every call,
    and analysis keys dicts on nodes of deep trees (quadratic without the cache). The cached
    value is not pickled: string hashes differ between processes."""
    compute = cls.__hash__

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = compute(self)
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_expanded")}

    cls.__hash__ = __hash__
    cls.__getstate__ = __getstate__


for _cls in (Member, Coord, Lookup, Unary, Binary, Call, Window):
    _cache_hash(_cls)


_FOLD = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "//": lambda a, b: a // b, "%": lambda a, b: a % b, "min": min, "max": max,
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
    "and": lambda a, b: a and b, "or": lambda a, b: a or b,
    "&": lambda a, b: a & b, "|": lambda a, b: a | b, "^": lambda a, b: a ^ b,
    "<<": lambda a, b: a << b, ">>": lambda a, b: a >> b,
}


def _defined(op: str, a, b) -> bool:
    """Can a constant operation be folded? Not a division by zero or a shift count out of range:
    those are left for evaluation to report, at their place."""
    if op in ("//", "%"):
        return b != 0
    if op in ("<<", ">>"):
        return SHIFT_LIMITS[0] <= b <= SHIFT_LIMITS[1]
    return True


def fold(e: "Expr") -> "Expr":
    """Fold integer/boolean constants and identities (x + 0, x * 1, x // 1, true and x).

    Floats are left alone so that evaluation stays in one place; division by a constant zero
    is left for evaluation to report.
    """
    if isinstance(e, Unary) and isinstance(e.operand, Const) and not isinstance(e.operand.value, float):
        v = e.operand.value
        if e.op == "ilog2":
            return Const(v.bit_length() - 1) if v >= 1 else e  # x <= 0 is left for evaluation
        return Const(not v if e.op == "not" else -v if e.op == "neg" else abs(v))
    if not isinstance(e, Binary):
        return e
    a, b = e.lhs, e.rhs
    ca, cb = isinstance(a, Const), isinstance(b, Const)
    if ca and cb and e.op in _FOLD and not isinstance(a.value, float) and not isinstance(b.value, float):
        if _defined(e.op, a.value, b.value):
            return Const(_FOLD[e.op](a.value, b.value))
    if cb and e.op in ("+", "-") and isinstance(a, Binary) and a.op in ("+", "-") \
            and isinstance(a.rhs, Const) and type(a.rhs.value) is int and type(b.value) is int:
        # (x + c1) - c2  ->  x + (c1 - c2): window and shift arithmetic reads as written.
        c = (a.rhs.value if a.op == "+" else -a.rhs.value) + (b.value if e.op == "+" else -b.value)
        return fold(Binary("+" if c >= 0 else "-", a.lhs, Const(abs(c))))
    if cb and not isinstance(b.value, float):
        if (e.op in ("+", "-") and b.value == 0 and not isinstance(b.value, bool)) or \
                (e.op in ("*", "//") and b.value == 1 and not isinstance(b.value, bool)):
            return a
        if e.op == "and" and b.value is True or e.op == "or" and b.value is False:
            return a
        if e.op == "and" and b.value is False or e.op == "or" and b.value is True:
            return b  # expressions are pure, so the other side may be dropped
    if ca and not isinstance(a.value, float):
        if (e.op == "+" and a.value == 0 and not isinstance(a.value, bool)) or \
                (e.op == "*" and a.value == 1 and not isinstance(a.value, bool)):
            return b
        if e.op == "and" and a.value is True or e.op == "or" and a.value is False:
            return b
        if e.op == "and" and a.value is False or e.op == "or" and a.value is True:
            return a
    return e


def _binop(op):
    def method(self, other):
        return fold(Binary(op, self, other))
    return method


# Small builder methods keep expansions (Window, causal, blocks) readable.
for _cls in (Const, Param, HeadDim, NVisible, Head, Batch, Member, Coord, Lookup, Unary, Binary, Call, Window):
    _cls.__add__ = _binop("+")
    _cls.__sub__ = _binop("-")
    _cls.__mul__ = _binop("*")
    _cls.__floordiv__ = _binop("//")
    _cls.__mod__ = _binop("%")
    _cls.min = _binop("min")
    _cls.max = _binop("max")
    _cls.eq = _binop("==")
    _cls.lt = _binop("<")
    _cls.le = _binop("<=")
    _cls.ge = _binop(">=")
    _cls.and_ = _binop("and")


def children(e: "Expr") -> tuple["Expr", ...]:
    """Direct sub-expressions (a Window's are its size arguments, not its expansion)."""
    if isinstance(e, Unary):
        return (e.operand,)
    if isinstance(e, Binary):
        return (e.lhs, e.rhs)
    if isinstance(e, Call):
        return e.args
    if isinstance(e, Lookup):
        return e.indices
    if isinstance(e, Window):
        return (e.length, e.kernel, e.dilation, e.stride)
    return ()


def walk(e: "Expr", expand_windows: bool = False):
    """Every node of an expression, iteratively; with expand_windows, Windows as plain arithmetic."""
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        if expand_windows and isinstance(x, Window):
            stack.append(x.expand())
        else:
            stack.extend(children(x))


def substitute(e: "Expr", fn) -> "Expr":
    """Rebuild an expression bottom-up, replacing each node x by fn(x) (or x when fn returns
    None) and folding the result. Windows are kept whole (their children are sizes)."""
    import dataclasses

    memo: dict = {}

    def rec(x):
        if x in memo:
            return memo[x]
        out = fn(x)
        if out is None:
            if isinstance(x, Unary):
                out = fold(Unary(x.op, rec(x.operand)))
            elif isinstance(x, Binary):
                out = fold(Binary(x.op, rec(x.lhs), rec(x.rhs)))
            elif isinstance(x, Call):
                out = Call(x.fn, tuple(rec(a) for a in x.args))
            elif isinstance(x, Lookup):
                out = dataclasses.replace(x, indices=tuple(rec(i) for i in x.indices))
            else:
                out = x
        memo[x] = out
        return out

    return rec(e)


@dataclass(frozen=True)
class Space:
    """A token space: `seq(N)` (axes i) or `grid(H, W)` / `grid(T, H, W)` (axes y x / t y x)."""

    kind: str  # 'seq' or 'grid'
    dims: tuple[Expr, ...]

    @property
    def axes(self) -> tuple[str, ...]:
        return ("i",) if self.kind == "seq" else ("t", "y", "x")[3 - len(self.dims):]

    def size(self) -> Expr:
        total = self.dims[0]
        for d in self.dims[1:]:
            total = total * d
        return total


@dataclass(frozen=True)
class Segments:
    """A token space (keys, or queries) made of named segments, concatenated in order:
    `hi: grid(H, W), lo: seq(M)`. Token t of segment s has flat index offset(s) + (its index
    within s); its coordinates are those within s, and `k in s` (`q in s`) holds for it.
    """

    parts: tuple[tuple[str, Space], ...]
    kind = "segments"

    def size(self) -> Expr:
        total = self.parts[0][1].size()
        for _, space in self.parts[1:]:
            total = total + space.size()
        return total

    def offsets(self) -> list[Expr]:
        out, at = [], Const(0)
        for _, space in self.parts:
            out.append(at)
            at = at + space.size()
        return out


def parts(kv: "Space | Segments") -> tuple[tuple[str | None, Space], ...]:
    """A token space as its segments; an unsegmented space is one nameless segment."""
    return kv.parts if isinstance(kv, Segments) else ((None, kv),)


def specialise(mask: Expr, segment: str | None, q_segment: str | None = None) -> Expr:
    """The mask for keys of one segment (and queries of one query segment): `k in s` becomes
    true for that key segment, false for others; `q in s` likewise for the query segment. A side
    given as None keeps its Members."""
    if segment is None and q_segment is None:
        return mask
    own = {"k": segment, "q": q_segment}
    return substitute(mask, lambda x: Const(x.segment == own[x.side])
                      if isinstance(x, Member) and own[x.side] is not None else None)


SCORE_KINDS = ("softmax", "sigmoid", "softplus")


@dataclass(frozen=True)
class Score:
    """How logits become weights (DESIGN.md section 3, docs/language.md "Scores").

    z = scale * q.k + logit_bias;  z = softcap * tanh(z / softcap) when a cap is given; then
    softmax:  w = exp(z) / (exp(sink) + sum_visible exp(z))   (no sink: the plain softmax)
    sigmoid:  w = sigmoid(z + bias)                           (no row normalisation)
    softplus: w = softplus(z) / sum_visible softplus(z)
    scale and bias are float expressions over parameters, head_dim and n_visible (one value per
    query row); logit_bias varies per (head, query, key); sink per head.
    """

    kind: str
    scale: Expr
    bias: Expr = Const(0.0)
    logit_bias: Expr | None = None
    softcap: Expr | None = None
    sink: Expr | None = None

    @property
    def modified(self) -> bool:
        return self.logit_bias is not None or self.softcap is not None or self.sink is not None


def Softmax(scale: Expr) -> Score:
    return Score("softmax", scale)


@dataclass(frozen=True)
class Require:
    """A precondition on parameter values (e.g. H % 7 == 0 for Swin windows), checked at bind."""

    cond: Expr
    message: str
    span: Span | None = field(default=None, **_NOCMP)


@dataclass(frozen=True)
class TensorDecl:
    """A runtime tensor the spec reads; passed as fn(q, k, v, NAME=tensor)."""

    name: str
    rank: int
    dtype: str = INT
    # A float table not indexed by `head` may also be passed with a leading [heads] dimension.
    per_head: bool = False


@dataclass(frozen=True)
class ParamDecl:
    """A parameter. A bool parameter (`causal = false`) has type INT and boolean=True: it is
    bound to True or False only, and carried as the integer 1 or 0, so that one kernel (which
    takes integer parameters as arguments) serves both values; expressions read it as
    `Param(name, INT) != 0`. Its default is a condition."""

    name: str
    type: str
    default: Expr | None
    boolean: bool = False


@dataclass(frozen=True)
class Route:
    """Routing (BiFormer, MoBA): each query (or query group) keeps the `top` key groups with the
    highest pooled score; see docs/language.md "Routing" for the exact rule.

    groups: 'regions' (boxes of `sizes` on a grid) or 'blocks' (runs of `sizes[0]` tokens);
    query: 'mean' (pooled over the query's group) or 'token'; own: the query's own group is
    always kept and counts toward `top`.
    """

    top: Expr
    groups: str
    sizes: tuple[Expr, ...]
    query: str
    own: bool = False


@dataclass(frozen=True)
class Attention:
    name: str
    params: tuple[ParamDecl, ...]
    q: "Space | Segments"
    kv: "Space | Segments"
    mask: Expr  # bool expression over coordinates and parameters
    score: Score
    requires: tuple[Require, ...] = ()
    tensors: tuple[TensorDecl, ...] = ()
    route: Route | None = None
    # Source line of each part, for comments in generated code; not part of identity.
    lines: tuple[tuple[str, int], ...] = field(default=(), **_NOCMP)
    # Where the spec writes each division, lookup and token space, for errors that only binding
    # can find (a divisor that is 0 for these parameters); not part of identity.
    spans: tuple[tuple[object, Span], ...] = field(default=(), **_NOCMP)

    def line_of(self, part: str) -> int | None:
        return dict(self.lines).get(part)

    def span_of(self, node) -> Span | None:
        """The source span of an IR division, Lookup or Space of this spec, or None."""
        return dict(self.spans).get(node)
