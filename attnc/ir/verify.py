"""The IR's invariants, as code: what lowering guarantees and every later stage may rely on.

`verify(ir)` raises IRError on the first violation. A violation is a compiler bug, not bad
input, so IRError is not an AttncError. Lowering runs it on every IR it builds (attnc/ir/lower.py).

Invariants:
- parameters are declared once, typed int or float (a bool one is an int, flagged, with a
  condition as its default); a default has its parameter's type and
  reads only earlier parameters; every Param node names a declared parameter, with its type;
- nodes are well typed: conditions where conditions belong, integers for `//`, `%`, bit
  operations, ilog2, indices,
  sizes and window arguments; the mask is a condition and integer-valued throughout;
- spaces: seq has one size, grid two or three; sizes, preconditions and routing counts read
  only constants and parameters; segment names are unique;
- coordinates exist: q.<axis> in q's space, k.<axis> in every key segment where the expression
  reads it (after `k in s` is decided for that segment); `k in s` names a segment;
- each value reads only what its place allows: n_visible in a score's scale and bias only, head
  in the mask, `bias` and the sink only, head_dim in score arguments, `bias` and the sink only (the mask is
  analysed before q exists), tokens and tables in the mask, `bias` and (tables) the sink only,
  windows in the mask only, over one unsegmented space equal to q's, along one of its axes;
- every Lookup names a declared tensor, with its rank and dtype: integer tensors are read by the
  mask, float tables by `bias` and the sink; tensors are declared once and each is read;
- the score kind is known, a sink only with softmax, a score bias only with sigmoid;
- a route groups q == kv by blocks (seq, one size) or regions (grid, one size per axis).
"""
from __future__ import annotations

from . import nodes as N

_UNARY = ("neg", "not", "abs", "ilog2")
_ARITH = ("+", "-", "*", "min", "max")
_INT_ONLY = ("//", "%") + N.BIT_OPS
_FLOAT_FUNCS = ("sqrt", "log", "exp")
_NUMERIC = (N.INT, N.FLOAT)

# What may appear in each place (beyond constants, parameters and operators).
_UNIFORM = (N.Call,)  # parameter defaults may be float math: `scale = sqrt(2.0)`
_MASK = (N.Coord, N.Lookup, N.Member, N.Window, N.Head, N.Batch)  # no head_dim: tile analysis runs before q exists
_SCORE_ARG = (N.HeadDim, N.NVisible, N.Call)
_SOFTCAP = (N.HeadDim, N.Call)
_LOGIT_BIAS = (N.Coord, N.Lookup, N.Member, N.Head, N.HeadDim, N.Call)
_SINK = (N.Lookup, N.Head, N.HeadDim, N.Call)
_ALWAYS = (N.Const, N.Param, N.Unary, N.Binary)


class IRError(AssertionError):
    """The IR breaks an invariant: a bug in the compiler (lowering or a pass), not in the spec."""


def verify(ir: N.Attention) -> None:
    _Verifier(ir).run()


class _Verifier:
    def __init__(self, ir: N.Attention):
        self.ir = ir
        self.params: dict[str, N.ParamDecl] = {}
        self.reads: dict[str, list[tuple[N.Lookup, str]]] = {}  # tensor -> (lookup, where)

    def fail(self, what: str) -> None:
        raise IRError(f"IR of '{self.ir.name}': {what}")

    def run(self) -> None:
        ir = self.ir
        if not isinstance(ir, N.Attention):
            self.fail(f"not an Attention: {type(ir).__name__}")
        for p in ir.params:
            if not isinstance(p, N.ParamDecl) or p.type not in _NUMERIC:
                self.fail(f"parameter {p!r} is not an int or float ParamDecl")
            if p.name in self.params:
                self.fail(f"parameter '{p.name}' is declared twice")
            if p.boolean and p.type != N.INT:
                self.fail(f"bool parameter '{p.name}' must be carried as an int")
            if p.default is not None:
                t = self.check(p.default, f"the default of '{p.name}'", _UNIFORM)
                if t != (N.BOOL if p.boolean else p.type):
                    self.fail(f"parameter '{p.name}' is {p.type} but its default is {t}")
            self.params[p.name] = p  # after its default: a default reads only earlier parameters
        for side, sp in (("q", ir.q), ("kv", ir.kv)):
            if isinstance(sp, N.Segments):
                names = [name for name, _ in sp.parts]
                if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                    self.fail(f"{side} segments must be named, uniquely: {names}")
                for name, space in sp.parts:
                    self.space(space, f"{side} segment '{name}'")
            else:
                self.space(sp, side)
        for r in ir.requires:
            if not isinstance(r, N.Require) or not isinstance(r.message, str) or not r.message:
                self.fail(f"a precondition needs a message: {r!r}")
            self.expect(r.cond, N.BOOL, f"the precondition '{r.message}'", _UNIFORM)
        self.expect(ir.mask, N.BOOL, "the mask", _MASK)
        self.score(ir.score)
        if ir.route is not None:
            self.route(ir.route)
        self.tensors()

    # -- parts ---------------------------------------------------------------------------------
    def space(self, space: N.Space, what: str) -> None:
        if not isinstance(space, N.Space) or space.kind not in ("seq", "grid"):
            self.fail(f"{what} is not a seq or grid space: {space!r}")
        if len(space.dims) not in ((1,) if space.kind == "seq" else (2, 3)):
            self.fail(f"{what}: {space.kind} with {len(space.dims)} sizes")
        for d in space.dims:
            self.expect(d, N.INT, f"a size of {what}", _UNIFORM)

    def score(self, s: N.Score) -> None:
        if not isinstance(s, N.Score) or s.kind not in N.SCORE_KINDS:
            self.fail(f"unknown score {s!r}")
        self.expect(s.scale, _NUMERIC, "the score scale", _SCORE_ARG)
        self.expect(s.bias, _NUMERIC, "the score bias", _SCORE_ARG)
        if s.kind != "sigmoid" and s.bias != N.Const(0.0):
            self.fail(f"a {s.kind} score has a bias (only sigmoid takes one)")
        if s.logit_bias is not None:
            self.expect(s.logit_bias, _NUMERIC, "the bias", _LOGIT_BIAS)
        if s.softcap is not None:
            self.expect(s.softcap, _NUMERIC, "the softcap", _SOFTCAP)
        if s.sink is not None:
            if s.kind != "softmax":
                self.fail(f"a sink under {s.kind} (softmax only)")
            self.expect(s.sink, _NUMERIC, "the sink logit", _SINK)

    def route(self, r: N.Route) -> None:
        q = self.ir.q
        if self.ir.kv != q or isinstance(q, N.Segments):
            self.fail("routing needs q and kv in the same unsegmented space")
        self.expect(r.top, N.INT, "the routed group count", _UNIFORM)
        if r.groups not in ("blocks", "regions") or r.query not in ("mean", "token") or not isinstance(r.own, bool):
            self.fail(f"malformed route {r!r}")
        want = (1, "seq") if r.groups == "blocks" else (len(q.dims), "grid")
        if (len(r.sizes), q.kind) != want:
            self.fail(f"route {r.groups} with {len(r.sizes)} sizes over a {q.kind} of rank {len(q.dims)}")
        for size in r.sizes:
            self.expect(size, N.INT, "a routing group size", _UNIFORM)

    def tensors(self) -> None:
        decls: dict[str, N.TensorDecl] = {}
        for t in self.ir.tensors:
            if not isinstance(t, N.TensorDecl) or t.dtype not in _NUMERIC or t.rank < 1:
                self.fail(f"malformed tensor declaration {t!r}")
            if t.name in decls:
                self.fail(f"tensor '{t.name}' is declared twice")
            if t.name in self.params:
                self.fail(f"'{t.name}' is both a parameter and a tensor")
            decls[t.name] = t
        for name, reads in self.reads.items():
            t = decls.get(name)
            if t is None:
                self.fail(f"'{name}' is read but not declared as a tensor")
            for lk, where in reads:
                if len(lk.indices) != t.rank or lk.type != t.dtype:
                    self.fail(f"{where} reads '{name}' with {len(lk.indices)} indices as {lk.type}; "
                              f"it is declared {t.dtype} of rank {t.rank}")
                if (t.dtype == N.INT) != (where == "the mask"):
                    self.fail(f"{where} reads {t.dtype} tensor '{name}' (the mask reads integer tensors, "
                              "the bias and sink float tables)")
                if t.per_head and any(isinstance(x, N.Head) for i in lk.indices for x in _post_order(i)):
                    self.fail(f"'{name}' is indexed by head, so it cannot also take a leading heads dimension")
            if t.per_head and t.dtype != N.FLOAT:
                self.fail(f"integer tensor '{name}' is marked per head")
        unread = set(decls) - set(self.reads)
        if unread:
            self.fail(f"tensors declared but never read: {sorted(unread)}")

    # -- expressions ---------------------------------------------------------------------------
    def expect(self, e, types, what: str, allowed: tuple[type, ...]) -> None:
        t = self.check(e, what, allowed)
        if t not in (types if isinstance(types, tuple) else (types,)):
            self.fail(f"{what} is {t}, expected {types}")

    def check(self, e, what: str, allowed: tuple[type, ...]) -> str:
        """Type every node of e bottom-up (memoised by identity: shared subtrees are typed once),
        check that each is allowed in this place, and check coordinates per key segment."""
        types: dict[int, str] = {}
        for x in _post_order(e):
            if not isinstance(x, _ALWAYS + allowed):
                self.fail(f"{type(x).__name__} is not allowed in {what}: {x!r}"[:300])
            types[id(x)] = self.type_of(x, types, what)
            if what == "the mask" and types[id(x)] == N.FLOAT:
                self.fail(f"the mask is integer arithmetic, but {x!r} is a float"[:300])
        self.coordinates(e, what)
        return types[id(e)]

    def type_of(self, x, types: dict[int, str], what: str) -> str:
        kid = [types[id(c)] for c in N.children(x)]
        if isinstance(x, N.Const):
            if not isinstance(x.value, (bool, int, float)):
                self.fail(f"constant {x.value!r} in {what}")
            return x.type
        if isinstance(x, N.Param):
            decl = self.params.get(x.name)
            if decl is None:
                self.fail(f"{what} reads undeclared (or later) parameter '{x.name}'")
            if decl.type != x.type:
                self.fail(f"parameter '{x.name}' is {decl.type} but read as {x.type} in {what}")
            return x.type
        if isinstance(x, (N.HeadDim, N.NVisible, N.Head, N.Batch, N.Coord)):
            return N.INT
        if isinstance(x, N.Member):
            return N.BOOL
        if isinstance(x, N.Lookup):
            if not x.indices or any(k != N.INT for k in kid) or x.type not in _NUMERIC:
                self.fail(f"lookup into '{x.tensor}' in {what}: indices {kid}, type {x.type}")
            self.reads.setdefault(x.tensor, []).append((x, what))
            return x.type
        if isinstance(x, N.Unary):
            if x.op not in _UNARY or (kid[0] == N.BOOL) != (x.op == "not") or (x.op == "ilog2" and kid[0] != N.INT):
                self.fail(f"'{x.op}' applied to {kid[0]} in {what}")
            return kid[0]
        if isinstance(x, N.Binary):
            a, b = kid
            if x.op in ("and", "or"):
                if a != N.BOOL or b != N.BOOL:
                    self.fail(f"'{x.op}' of {a} and {b} in {what}")
                return N.BOOL
            if a not in _NUMERIC or b not in _NUMERIC:
                self.fail(f"'{x.op}' of {a} and {b} in {what}")
            if x.op in N.COMPARISONS:
                return N.BOOL
            if x.op in _INT_ONLY:
                if a != N.INT or b != N.INT:
                    self.fail(f"'{x.op}' of {a} and {b} in {what}")
                return N.INT
            if x.op == "/":
                return N.FLOAT
            if x.op not in _ARITH:
                self.fail(f"unknown operator '{x.op}' in {what}")
            return N.FLOAT if N.FLOAT in (a, b) else N.INT
        if isinstance(x, N.Call):
            if x.fn not in _FLOAT_FUNCS or len(kid) != 1 or kid[0] not in _NUMERIC:
                self.fail(f"{x.fn}({', '.join(kid)}) in {what}")
            return N.FLOAT
        if isinstance(x, N.Window):
            self.window(x, kid)
            return N.BOOL
        self.fail(f"not an IR expression in {what}: {x!r}")

    def window(self, w: N.Window, kid: list[str]) -> None:
        q, kv = self.ir.q, self.ir.kv
        if isinstance(q, N.Segments) or kv != q and not (isinstance(kv, N.Segments) and any(sp == q for _, sp in kv.parts)):
            self.fail("a window needs an unsegmented q and a key space (or key segment) equal to it")
        if w.axis not in q.axes or not isinstance(w.causal, bool) or any(k != N.INT for k in kid):
            self.fail(f"malformed window {w!r}")
        if w.length != q.dims[q.axes.index(w.axis)]:
            self.fail(f"window along {w.axis}: length {w.length!r} is not the axis size")
        varying = (N.Coord, N.Lookup, N.Member, N.Window, N.Head, N.Batch, N.NVisible)
        for arg in N.children(w):
            if any(isinstance(x, varying) for x in _post_order(arg)):
                self.fail(f"window arguments must be uniform: {arg!r}")

    def coordinates(self, e, what: str) -> None:
        q, kv = self.ir.q, self.ir.kv
        segments = {side: dict(sp.parts) if isinstance(sp, N.Segments) else None for side, sp in (("q", q), ("k", kv))}
        for x in _post_order(e):
            if isinstance(x, N.Coord) and x.side not in ("q", "k"):
                self.fail(f"coordinate of side '{x.side}' in {what}")
            if isinstance(x, N.Member):
                names = segments.get(x.side)
                if names is None or x.segment not in names:
                    whose = "key" if x.side == "k" else "query"
                    self.fail(f"`{x.side} in {x.segment}` in {what}, but the {whose} segments are "
                              f"{sorted(names) if names else 'none'}")
        # Coordinates are those of the token's own segment: each must exist wherever it is read.
        for qseg, qspace in N.parts(q):
            for seg, space in N.parts(kv):
                sub = N.specialise(e, seg, qseg)
                if seg is not None and space != qspace and any(isinstance(x, N.Window) for x in _post_order(sub)):
                    self.fail(f"a window in {what} is read for keys of segment '{seg}', whose space is not q's")
                for side, name, sp in (("q", qseg, qspace), ("k", seg, space)):
                    axes = set(sp.axes) | {"i"}
                    for x in _post_order(sub, expand_windows=True):
                        if isinstance(x, N.Coord) and x.side == side and x.axis not in axes:
                            where = f"segment '{name}'" if name else ("kv" if side == "k" else "q")
                            whom = "keys" if side == "k" else "queries"
                            self.fail(f"{side}.{x.axis} in {what} is read for {whom} of {where}, which has axes "
                                      f"{sorted(axes)}")


def _post_order(e, expand_windows: bool = False):
    """Each distinct node of e (by identity) once, after its children, without recursion: the
    IR is a DAG (inlined locals share subtrees), so a tree walk could be exponentially longer."""
    seen: set[int] = set()
    stack = [(e, False)]
    while stack:
        x, ready = stack.pop()
        if ready:
            yield x
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        stack.append((x, True))
        kids = (x.expand(),) if expand_windows and isinstance(x, N.Window) else N.children(x)
        stack.extend((k, False) for k in kids)


__all__ = ["IRError", "verify"]
