"""AST -> IR: name resolution, typing, desugaring of builtins. All errors are located."""
from __future__ import annotations



import dataclasses

from ..errors import AttncError, Span, suggest
from ..frontend import syntax as A
from ..frontend.parser import MAX_INT_LITERAL
from . import nodes as N

RESERVED_TARGETS = ("q", "kv", "mask", "score", "bias", "route")
# Keyword arguments of attnc.compile itself (`spec` too: it is positional-or-keyword); a spec
# parameter may not shadow them.
COMPILE_OPTIONS = ("spec", "backend", "tiles")
SPACE_FUNCS = ("seq", "grid")
SCORE_FUNCS = ("softmax", "sigmoid", "softplus")
INT_FUNCS = ("abs", "min", "max")
FLOAT_FUNCS = ("sqrt", "log", "exp")
MASK_FUNCS = ("window", "same_block", "same_window", "same_grid")
BUILTIN_VALUES = ("causal", "head_dim", "n_visible", "head", "true", "false")
ROUTE_FUNCS = ("top", "regions", "blocks", "mean")
# ROUTE_FUNCS are not reserved: they have a meaning only inside a `route = ...` rule.
BUILTINS = SPACE_FUNCS + SCORE_FUNCS + INT_FUNCS + FLOAT_FUNCS + MASK_FUNCS + BUILTIN_VALUES
# Locals are inlined, so short lines can still build an IR far deeper or larger than any line of
# the spec (`a1 = a0 + 1` repeated nests, `b1 = b0 and b0` doubles); every later pass recurses
# over the IR as a tree, so both are bounded here.
MAX_IR_DEPTH = 200
MAX_IR_NODES = 20_000


def lower(ast: A.Attention) -> N.Attention:
    return _Lowering(ast).run()


class _Lowering:
    def __init__(self, ast: A.Attention):
        self.ast = ast
        self.params: dict[str, N.ParamDecl] = {}
        self.locals: dict[str, N.Expr] = {}
        self.local_spans: dict[str, Span | None] = {}
        self.used: set[str] = set()
        self.measured: dict[int, tuple[N.Expr, int, int]] = {}  # id -> (node, depth, tree size)
        self.q: N.Space | None = None
        self.kv: N.Space | N.Segments | None = None
        self.requires: list[N.Require] = []
        self.in_score = False  # n_visible exists only in score expressions
        self.in_mask = False  # integer runtime tensors are read by the mask
        self.in_modifier = False  # bias and sink: float tensors, `head`, float arithmetic on coordinates
        self.in_size = False  # `/` in space sizes is exact integer division
        self.tensors: dict[str, N.TensorDecl] = {}

    # -- statements ---------------------------------------------------------------------------
    def run(self) -> N.Attention:
        for p in self.ast.params:
            self.declare(p)
        lines: dict[str, int] = {}
        seen: dict[str, A.Name] = {}
        for stmt in self.ast.body:
            for t in stmt.targets:
                if t.id in seen:
                    raise AttncError(f"'{t.id}' is assigned twice", t.span,
                                     hint=f"first assigned at line {seen[t.id].span.line}" if seen[t.id].span else None)
                seen[t.id] = t
        # Spaces first: predicates anywhere in the body may refer to q and k coordinates.
        for stmt in self.ast.body:
            ids = tuple(t.id for t in stmt.targets)
            if "q" in ids or "kv" in ids:
                self.space_stmt(stmt, ids)
                for name in ids:
                    lines[name] = stmt.span.line if stmt.span else 0
        if self.q is None or self.kv is None:
            missing = "q" if self.q is None else "kv"
            raise AttncError(f"attention '{self.ast.name}' does not define its {missing} token space",
                             self.ast.span, hint="add `q, kv = seq(N)` (or `q = ...` and `kv = ...`)")
        mask: N.Expr = N.Const(True)
        score: N.Score | None = None
        logit_bias: N.Expr | None = None
        route: N.Route | None = None
        for stmt in self.ast.body:
            ids = tuple(t.id for t in stmt.targets)
            if "q" in ids or "kv" in ids:
                continue
            if len(ids) > 1:
                raise AttncError("only `q, kv = ...` may assign several names at once", stmt.targets[1].span)
            name = ids[0]
            if isinstance(stmt.value, A.Segments):
                raise AttncError("only the key space `kv` may be made of segments", stmt.value.span)
            if isinstance(stmt.value, A.Route) and name != "route":
                raise AttncError("a `top(k) of ... by ...` selection can only be assigned to `route`",
                                 stmt.value.span)
            if name == "mask":
                self.in_mask = True
                mask = self.expect(stmt.value, N.BOOL, "the mask")
                self.in_mask = False
                self.check_segment_axes(mask, stmt.value)
            elif name == "score":
                score = self.score(stmt.value)
            elif name == "bias":
                logit_bias = self.logit_bias(stmt.value)
            elif name == "route":
                route = self.route(stmt.value)
            else:
                self.define_local(stmt)
            lines[name] = stmt.span.line if stmt.span else 0
        for name, span in self.local_spans.items():
            if name not in self.used:
                raise AttncError(f"'{name}' is defined but never used", span,
                                 hint=suggest(name, RESERVED_TARGETS))
        if score is None:
            score = N.Softmax(_default_scale())
        if logit_bias is not None:
            score = dataclasses.replace(score, logit_bias=logit_bias)
        # Folding may drop a lookup (`false and t[q.i] == 1`): a tensor nothing reads is not asked for.
        read = {x.tensor for e in (mask, score.logit_bias, score.sink) if e is not None
                for x in N.walk(e, expand_windows=True) if isinstance(x, N.Lookup)}
        self.tensors = {name: t for name, t in self.tensors.items() if name in read}
        return N.Attention(self.ast.name, tuple(self.params.values()), self.q, self.kv, mask, score,
                           tuple(self.requires), tuple(self.tensors.values()), route,
                           lines=tuple(sorted(lines.items())))

    def declare(self, p: A.Param) -> None:
        if p.name in self.params:
            raise AttncError(f"parameter '{p.name}' is declared twice", p.span)
        if p.name in BUILTINS or p.name in RESERVED_TARGETS or p.name in ("k",):
            raise AttncError(f"parameter name '{p.name}' is reserved", p.span)
        if p.name in COMPILE_OPTIONS:
            raise AttncError(f"parameter name '{p.name}' is reserved for attnc.compile options", p.span)
        default = None
        type_ = N.INT
        if p.default is not None:
            default = self.uniform(p.default, "a parameter default")
            if default.type == N.BOOL:
                raise AttncError("parameter defaults must be numbers", p.default.span)
            type_ = default.type
        self.params[p.name] = N.ParamDecl(p.name, type_, default)

    def space_stmt(self, stmt: A.Stmt, ids: tuple[str, ...]) -> None:
        if ids not in (("q",), ("kv",), ("q", "kv")):
            raise AttncError("token spaces are assigned as `q, kv = ...`, `q = ...` or `kv = ...`",
                             stmt.targets[0].span)
        if isinstance(stmt.value, A.Segments):
            if ids != ("kv",):
                raise AttncError("only the key space may be made of segments: write `q = ...` and "
                                 "`kv = name: ..., name: ...` separately", stmt.value.span)
            self.kv = self.segments(stmt.value)
            return
        if isinstance(stmt.value, A.Route):
            raise AttncError("expected a token space, not a routing rule", stmt.value.span)
        space = self.space(stmt.value)
        if "q" in ids:
            self.q = space
        if "kv" in ids:
            self.kv = space

    def segments(self, e: A.Segments) -> N.Segments:
        seen: dict[str, A.Name] = {}
        out = []
        for seg in e.items:
            name = seg.name
            if name.id in seen:
                raise AttncError(f"segment '{name.id}' is defined twice", name.span)
            if name.id in ("q", "k", "kv", "v") or name.id in BUILTINS:
                raise AttncError(f"segment name '{name.id}' is reserved", name.span)
            seen[name.id] = name
            out.append((name.id, self.space(seg.space)))
        return N.Segments(tuple(out))

    def space(self, e: A.Expr) -> N.Space:
        if not isinstance(e, A.Call) or e.func.id not in SPACE_FUNCS:
            raise AttncError("expected a token space: seq(N), grid(H, W) or grid(T, H, W)", e.span,
                             hint=suggest(e.func.id, SPACE_FUNCS) if isinstance(e, A.Call) else None)
        self.no_kwargs(e)
        arity = (1,) if e.func.id == "seq" else (2, 3)
        if len(e.args) not in arity:
            want = "one size" if e.func.id == "seq" else "2 or 3 sizes"
            raise AttncError(f"{e.func.id}() takes {want}, got {len(e.args)}", e.span)
        self.in_size = True
        try:
            dims = tuple(self.uniform_int(a, "a space size") for a in e.args)
        finally:
            self.in_size = False
        return N.Space(e.func.id, dims)

    def score(self, e: A.Expr) -> N.Score:
        func = e if isinstance(e, A.Name) else e.func if isinstance(e, A.Call) else None
        if func is None or func.id not in SCORE_FUNCS:
            name = func.id if func is not None else ""
            raise AttncError("expected a score function: softmax, sigmoid or softplus",
                             getattr(func, "span", None) or e.span, hint=suggest(name, SCORE_FUNCS))
        allowed = ("scale", "bias", "softcap") if func.id == "sigmoid" else \
            ("scale", "softcap", "sink") if func.id == "softmax" else ("scale", "softcap")
        args: dict[str, N.Expr | None] = {"scale": _default_scale(), "bias": N.Const(0.0), "softcap": None, "sink": None}
        if isinstance(e, A.Call):
            if e.args:
                raise AttncError(f"{func.id} takes only keyword arguments: "
                                 f"{func.id}({' = ..., '.join(allowed)} = ...)", e.args[0].span)
            for kw in e.kwargs:
                if kw.name not in allowed:
                    hint = "a sink logit needs softmax normalisation" if kw.name == "sink" else None
                    raise AttncError(f"{func.id} has no argument '{kw.name}'", kw.span,
                                     hint=hint or suggest(kw.name, allowed) or f"it takes {', '.join(allowed)}")
                if kw.name == "sink":
                    args["sink"] = self.sink(kw.value)
                    continue
                self.in_score = kw.name != "softcap"  # n_visible: per-row values only
                try:
                    val = self.uniform(kw.value, f"the {func.id} {kw.name}")
                finally:
                    self.in_score = False
                if val.type == N.BOOL:
                    raise AttncError(f"the {func.id} {kw.name} must be a number", kw.value.span)
                args[kw.name] = val
        return N.Score(func.id, args["scale"], args["bias"], softcap=args["softcap"], sink=args["sink"])

    def modifier(self, e: A.Expr, what: str) -> N.Expr:
        self.in_modifier = True
        try:
            out = self.expr(e)
        finally:
            self.in_modifier = False
        if out.type == N.BOOL:
            raise AttncError(f"{what} must be a number, but this is a condition", e.span,
                             hint="masks go in `mask = ...`")
        return out

    def logit_bias(self, e: A.Expr) -> N.Expr:
        """`bias = rel_bias[q.y - k.y + 6, q.x - k.x + 6]`: added to every logit; may read float
        runtime tensors, the query head `head` and token coordinates."""
        out = self.modifier(e, "the bias")
        self.check_segment_axes(out, e)
        return out

    def sink(self, e: A.Expr) -> N.Expr:
        """`sink = sink_logits[head]`: the logit of a virtual key with value 0, one per head."""
        out = self.modifier(e, "the sink logit")
        if _mentions(out, (N.Coord, N.Window, N.Member)):
            raise AttncError("the sink logit is one number per head; it cannot use token coordinates", e.span)
        return out

    def define_local(self, stmt: A.Stmt) -> None:
        name = stmt.targets[0]
        if name.id in BUILTINS or name.id in self.params or name.id == "k":
            raise AttncError(f"'{name.id}' is a {'parameter' if name.id in self.params else 'builtin'} "
                             "and cannot be redefined", name.span)
        self.locals[name.id] = self.expr(stmt.value)
        self.local_spans[name.id] = name.span

    # -- expressions --------------------------------------------------------------------------
    def expect(self, e: A.Expr, type_: str, what: str) -> N.Expr:
        out = self.expr(e)
        if out.type != type_ and not (type_ == N.FLOAT and out.type == N.INT):
            raise AttncError(f"{what} must be {_article(type_)}, but this is {_article(out.type)}", e.span)
        return out

    def uniform(self, e: A.Expr, what: str) -> N.Expr:
        out = self.expr(e)
        if _varies(out):
            raise AttncError(f"{what} cannot depend on token coordinates", e.span)
        if what in ("a parameter default", "a space size") and _mentions(out, (N.HeadDim, N.NVisible)):
            raise AttncError(f"{what} is fixed at compile time and cannot use head_dim or n_visible", e.span)
        return out

    def uniform_int(self, e: A.Expr, what: str) -> N.Expr:
        out = self.uniform(e, what)
        if out.type != N.INT:
            raise AttncError(f"{what} must be an integer, but this is {_article(out.type)}", e.span,
                             hint="use // for integer division" if out.type == N.FLOAT else None)
        return out

    def expr(self, e: A.Expr) -> N.Expr:
        out = self._expr(e)
        self.bounded(out, e)
        if out.type == N.FLOAT and _varies(out) and not self.in_modifier:
            raise AttncError("arithmetic on token coordinates must stay in integers", e.span,
                             hint="use // for integer division (float arithmetic is allowed in `bias`)")
        out = N.fold(out)
        # Folding multiplies literals into integers no literal may be (and no int64 can hold).
        if isinstance(out, N.Const) and out.type == N.INT and abs(out.value) > MAX_INT_LITERAL:
            raise AttncError(f"integer constant {out.value} is too large (limit {MAX_INT_LITERAL})", e.span)
        return out

    def _expr(self, e: A.Expr) -> N.Expr:
        if isinstance(e, A.Num):
            return N.Const(e.value)
        if isinstance(e, A.Bool):
            return N.Const(e.value)
        if isinstance(e, A.Name):
            return self.name(e)
        if isinstance(e, A.Attr):
            return self.coord(e)
        if isinstance(e, A.Tuple):
            raise AttncError("a tuple is only allowed as a per-axis argument, e.g. dilation = (1, 2)", e.span)
        if isinstance(e, A.Unary):
            if e.op == "not":
                return N.Unary("not", self.expect(e.operand, N.BOOL, "the operand of 'not'"))
            return N.Unary("neg", self.number(e.operand, "-"))
        if isinstance(e, A.Binary):
            return self.binary(e)
        if isinstance(e, A.Call):
            return self.call(e)
        if isinstance(e, A.Index):
            return self.lookup(e)
        if isinstance(e, A.Member):
            return self.member(e)
        raise TypeError(f"unknown AST node {e!r}")

    def lookup(self, e: A.Index) -> N.Expr:
        name = e.base.id
        if name in self.params or name in self.locals or name in BUILTINS or name in RESERVED_TARGETS \
                or name in ("k", "v"):
            raise AttncError(f"'{name}' is not a runtime tensor and cannot be indexed", e.base.span)
        if name in COMPILE_OPTIONS or name == "return_lse":
            raise AttncError(f"a runtime tensor cannot be called '{name}'", e.base.span)
        if not (self.in_mask or self.in_modifier):
            raise AttncError(f"runtime tensors such as '{name}' can only be read in the mask, the bias "
                             "and the sink logit", e.span)
        rank = len(e.indices)
        dtype = N.FLOAT if self.in_modifier else N.INT
        seen = self.tensors.get(name)
        if seen is not None and seen.rank != rank:
            raise AttncError(f"'{name}' is indexed with {rank} indices here but {seen.rank} elsewhere", e.span)
        if seen is not None and seen.dtype != dtype:
            raise AttncError(f"'{name}' is read by the mask (integers) and by a score modifier (floats); "
                             "use two tensors", e.span)
        indices = []
        for i in e.indices:
            idx = self.expr(i)
            if idx.type != N.INT:
                raise AttncError(f"an index into '{name}' must be an integer, but this is {_article(idx.type)}",
                                 i.span)
            indices.append(idx)
        by_head = any(_mentions(i, (N.Head,)) for i in indices)
        per_head = dtype == N.FLOAT and not by_head and (seen is None or seen.per_head)
        self.tensors[name] = N.TensorDecl(name, rank, dtype, per_head)
        return N.Lookup(name, tuple(indices), dtype)

    def member(self, e: A.Member) -> N.Expr:
        side = e.value.id if isinstance(e.value, A.Name) else None
        if side not in ("q", "k"):
            raise AttncError("`in` tests a token's segment: write `k in NAME`", e.value.span)
        if side == "q":
            raise AttncError("the query space has no segments; `in` applies to keys (`k in NAME`)", e.value.span)
        self.spaces(e)
        if not isinstance(self.kv, N.Segments):
            raise AttncError("the key space has no segments to test", e.span,
                             hint="name them: `kv = hi: grid(H, W), lo: grid(H / 4, W / 4)`")
        names = [n for n, _ in self.kv.parts]
        if e.segment.id not in names:
            raise AttncError(f"the key space has no segment '{e.segment.id}'; its segments are {', '.join(names)}",
                             e.segment.span, hint=suggest(e.segment.id, names))
        return N.Member("k", e.segment.id)

    def check_segment_axes(self, out: N.Expr, e: A.Expr) -> None:
        """Each segment must give a value to every key coordinate its branch of the expression reads:
        `k.y` is fine on a grid segment, and on a seq segment only where `k in grid_part` guards it."""
        if not isinstance(self.kv, N.Segments):
            return
        for seg, space in self.kv.parts:
            axes = set(space.axes) | {"i"}
            for x in N.walk(N.specialise(out, seg), expand_windows=True):
                if isinstance(x, N.Coord) and x.side == "k" and x.axis not in axes:
                    raise AttncError(f"k.{x.axis} is read for keys of segment '{seg}' ({space.kind}), which has "
                                     f"no axis {x.axis}", e.span,
                                     hint=f"guard it, e.g. `k in other and ... k.{x.axis} ...`, or use k.i")

    def name(self, e: A.Name) -> N.Expr:
        if e.id in self.params:
            return N.Param(e.id, self.params[e.id].type)
        if e.id in self.locals:
            self.used.add(e.id)
            return self.locals[e.id]
        if e.id == "causal":
            return self.causal(e)
        if e.id == "head_dim":
            return N.HeadDim()
        if e.id == "head":
            if not self.in_modifier:
                raise AttncError("head (the query head index) is only defined in `bias` and the sink logit",
                                 e.span)
            return N.Head()
        if e.id == "n_visible":
            if not self.in_score:
                raise AttncError("n_visible (keys a query sees) is only defined in a score's scale and bias",
                                 e.span)
            return N.NVisible()
        if e.id in ("q", "k"):
            raise AttncError(f"'{e.id}' is a token; use one of its coordinates, e.g. {e.id}.i", e.span)
        if e.id == "kv":
            raise AttncError("'kv' names the key space; in expressions use k.<axis>", e.span)
        if e.id in BUILTINS:
            raise AttncError(f"'{e.id}' is a function; call it with arguments", e.span)
        if e.id in ("mask", "score"):
            raise AttncError(f"'{e.id}' cannot be used inside an expression", e.span)
        known = list(self.params) + list(self.locals) + list(BUILTINS)
        raise AttncError(f"unknown name '{e.id}'", e.span, hint=suggest(e.id, known))

    def coord(self, e: A.Attr) -> N.Expr:
        if not isinstance(e.value, A.Name) or e.value.id not in ("q", "k"):
            hint = "use k.<axis> for key coordinates" if isinstance(e.value, A.Name) and e.value.id == "kv" else None
            raise AttncError("only q.<axis> and k.<axis> have attributes", e.span, hint=hint)
        side = e.value.id
        q, kv = self.spaces(e)
        spaces = [s for _, s in N.parts(kv)] if side == "k" else [q]
        axes = tuple(dict.fromkeys(a for sp in spaces for a in sp.axes + ("i",)))
        if e.attr not in axes:
            raise AttncError(f"{side} has no axis '{e.attr}'; its axes are {', '.join(axes)}", e.span,
                             hint=suggest(e.attr, axes))
        return N.Coord(side, e.attr)

    def number(self, e: A.Expr, op: str) -> N.Expr:
        out = self.expr(e)
        if out.type == N.BOOL:
            raise AttncError(f"'{op}' needs a number, but this is a condition", e.span)
        return out

    def binary(self, e: A.Binary) -> N.Expr:
        if e.op in ("and", "or"):
            return N.Binary(e.op, self.expect(e.lhs, N.BOOL, f"the operand of '{e.op}'"),
                            self.expect(e.rhs, N.BOOL, f"the operand of '{e.op}'"))
        lhs, rhs = self.number(e.lhs, e.op), self.number(e.rhs, e.op)
        if e.op == "/" and self.in_size and lhs.type == rhs.type == N.INT:
            # Sizes are integers: `H / 4` is exact division, and H must be a multiple of 4.
            self.require(rhs.ge(N.Const(1)), "a size must be divided by a positive number", e)
            self.require((lhs % rhs).eq(N.Const(0)), "a size divided with / must divide exactly", e)
            return N.Binary("//", lhs, rhs)
        if e.op in ("/", "//", "%") and isinstance(rhs, N.Const) and rhs.value == 0:
            raise AttncError("division by zero", e.rhs.span)
        if e.op in ("//", "%"):
            for side, val in ((e.lhs, lhs), (e.rhs, rhs)):
                if val.type != N.INT:
                    raise AttncError(f"'{e.op}' needs integers, but this is a float", side.span)
        return N.Binary(e.op, lhs, rhs)

    def call(self, e: A.Call) -> N.Expr:
        fn = e.func.id
        if fn in self.params or fn in self.locals:
            raise AttncError(f"'{fn}' is not a function", e.func.span)
        if fn == "window":
            return self.window(e)
        if fn == "same_block":
            return self.same_block(e)
        if fn == "same_window":
            return self.same_window(e)
        if fn == "same_grid":
            return self.same_grid(e)
        if fn == "causal":
            if e.args or e.kwargs:
                raise AttncError("causal takes no arguments", e.span)
            return self.causal(e)
        if fn in INT_FUNCS:
            self.no_kwargs(e)
            args = [self.number(a, fn) for a in e.args]
            if fn == "abs":
                if len(args) != 1:
                    raise AttncError(f"abs() takes 1 argument, got {len(args)}", e.span)
                return N.Unary("abs", args[0])
            if len(args) < 2:
                raise AttncError(f"{fn}() takes at least 2 arguments, got {len(args)}", e.span)
            out = args[0]
            for a in args[1:]:
                out = N.Binary(fn, out, a)
            return out
        if fn in FLOAT_FUNCS:
            self.no_kwargs(e)
            if len(e.args) != 1:
                raise AttncError(f"{fn}() takes 1 argument, got {len(e.args)}", e.span)
            return N.Call(fn, (self.number(e.args[0], fn),))
        if fn in SPACE_FUNCS or fn in SCORE_FUNCS:
            raise AttncError(f"{fn}() is not allowed inside an expression", e.func.span)
        if fn in ROUTE_FUNCS:
            raise AttncError(f"{fn}() belongs in a routing rule: `route = top(k) of blocks(B) by q @ mean(k)`",
                             e.func.span)
        known = list(INT_FUNCS + FLOAT_FUNCS + MASK_FUNCS)
        raise AttncError(f"unknown function '{fn}'", e.func.span, hint=suggest(fn, known))

    def route(self, e: A.Expr) -> N.Route:
        """`top(K [, own = true]) of regions(a, b) | blocks(B) by mean(q) | q @ mean(k)`."""
        if not isinstance(e, A.Route):
            raise AttncError("route must be a selection: `top(K) of blocks(B) by q @ mean(k)`", e.span)
        top = e.top
        if not (isinstance(top, A.Call) and top.func.id == "top"):
            raise AttncError("a routing rule starts with top(K)", top.span)
        if len(top.args) != 1:
            raise AttncError(f"top() takes one count, got {len(top.args)}", top.span)
        k = self.uniform_int(top.args[0], "the number of routed groups")
        own = False
        for kw in top.kwargs:
            if kw.name != "own":
                raise AttncError(f"top has no argument '{kw.name}'", kw.span, hint=suggest(kw.name, ["own"]))
            if not isinstance(kw.value, A.Bool):
                raise AttncError("own must be true or false", kw.value.span)
            own = kw.value.value
        self.require(k.ge(N.Const(1)), "top(K): K must be at least 1", top)
        groups = e.groups
        if not (isinstance(groups, A.Call) and groups.func.id in ("regions", "blocks")):
            raise AttncError("route over regions(...) of a grid or blocks(B) of a sequence", groups.span,
                             hint=suggest(groups.func.id, ["regions", "blocks"]) if isinstance(groups, A.Call) else None)
        self.no_kwargs(groups)
        q, kv = self.spaces(groups)
        if q != kv:
            raise AttncError("routing needs q and kv in the same token space", groups.span)
        kind = groups.func.id
        if kind == "blocks" and q.kind != "seq":
            raise AttncError("blocks(B) routes a seq space; use regions(...) on a grid", groups.span)
        if kind == "regions" and q.kind != "grid":
            raise AttncError("regions(...) routes a grid space; use blocks(B) on a seq", groups.span)
        if kind == "blocks" and len(groups.args) != 1:
            raise AttncError(f"blocks() takes one block size, got {len(groups.args)}", groups.span)
        sizes = tuple(self.per_axis(groups.args, len(q.dims), groups, "region sizes"))
        for size in sizes:
            self.require(size.ge(N.Const(1)), f"{kind}: sizes must be at least 1", groups)
        query = self.pooled(e.query, "q")
        if self.pooled(e.key, "k") != "mean":
            raise AttncError("keys are pooled per group: write `@ mean(k)`", e.key.span)
        return N.Route(k, kind, sizes, query, own)

    @staticmethod
    def pooled(e: A.Expr, side: str) -> str:
        if isinstance(e, A.Name) and e.id == side:
            return "token"
        if isinstance(e, A.Call) and e.func.id == "mean" and not e.kwargs and len(e.args) == 1 \
                and isinstance(e.args[0], A.Name) and e.args[0].id == side:
            return "mean"
        raise AttncError(f"expected `{side}` or `mean({side})` here", e.span)

    def causal(self, e: A.Expr) -> N.Expr:
        # Bottom-right aligned (DESIGN.md section 3): key j visible to query i iff j <= i + Nk - Nq.
        q, kv = self.spaces(e)
        if isinstance(kv, N.Segments):
            raise AttncError("causal is ambiguous on a segmented key space", e.span,
                             hint="write it per segment, e.g. `k in ctx and k.i <= q.i`")
        nq, nk = q.size(), kv.size()
        offset = N.Const(0) if nq == nk else nk - nq
        return N.Coord("k", "i").le(N.Coord("q", "i") + offset)

    def window(self, e: A.Call) -> N.Expr:
        space = self.same_space(e)
        ndim = len(space.dims)
        kernels = self.per_axis(e.args, ndim, e, "kernel sizes")
        opts = {"dilation": [N.Const(1)] * ndim, "stride": [N.Const(1)] * ndim}
        causal = [False] * ndim
        for kw in e.kwargs:
            if kw.name in opts:
                items = kw.value.items if isinstance(kw.value, A.Tuple) else (kw.value,)
                opts[kw.name] = self.per_axis(items, ndim, kw.value, f"{kw.name} values")
            elif kw.name == "causal":
                items = kw.value.items if isinstance(kw.value, A.Tuple) else (kw.value,)
                if not all(isinstance(i, A.Bool) for i in items):
                    raise AttncError("causal must be true/false or a tuple of them", kw.value.span)
                flags = [i.value for i in items]
                if len(flags) not in (1, ndim):
                    want = "1 causal flag" if ndim == 1 else f"1 or {ndim} causal flags"
                    raise AttncError(f"expected {want}, got {len(flags)}", kw.value.span)
                causal = flags * ndim if len(flags) == 1 else flags
            else:
                raise AttncError(f"window has no argument '{kw.name}'", kw.span,
                                 hint=suggest(kw.name, ["dilation", "stride", "causal"]))
        return _all(N.Window(axis, space.dims[a], kernels[a], opts["dilation"][a], opts["stride"][a], causal[a],
                             span=e.span) for a, axis in enumerate(space.axes))

    def same_block(self, e: A.Call) -> N.Expr:
        self.no_kwargs(e)
        space = self.same_space(e)
        sizes = self.per_axis(e.args, len(space.dims), e, "block sizes")
        return _all((N.Coord("q", axis) // sizes[a]).eq(N.Coord("k", axis) // sizes[a])
                    for a, axis in enumerate(space.axes))

    def same_window(self, e: A.Call) -> N.Expr:
        """Swin (shifted) windows of size M: same floor((c + M - shift) / M) on every axis, which
        equals Swin's roll-by-shift plus region mask (DESIGN.md section 3)."""
        space = self.same_space(e)
        ndim = len(space.dims)
        sizes = self.per_axis(e.args, ndim, e, "window sizes")
        shifts = [N.Const(0)] * ndim
        for kw in e.kwargs:
            if kw.name != "shift":
                raise AttncError(f"same_window has no argument '{kw.name}'", kw.span, hint=suggest(kw.name, ["shift"]))
            items = kw.value.items if isinstance(kw.value, A.Tuple) else (kw.value,)
            shifts = self.per_axis(items, ndim, kw.value, "shift values")
        terms = []
        for a, axis in enumerate(space.axes):
            m, s, n = sizes[a], shifts[a], space.dims[a]
            self.require(m.ge(N.Const(1)), f"same_window: the window along axis {axis} must be "
                         "at least 1", e)
            self.require((n % m).eq(N.Const(0)), f"same_window: axis {axis} length must be a multiple of the window", e)
            self.require(N.Const(0).le(s).and_(s.lt(m)),
                         f"same_window: the shift along axis {axis} must be in [0, window)", e)
            terms.append(((N.Coord("q", axis) + m - s) // m).eq((N.Coord("k", axis) + m - s) // m))
        return _all(terms)

    def same_grid(self, e: A.Call) -> N.Expr:
        """MaxViT grid attention over a G x G grid: same y mod (H / G) and x mod (W / G)."""
        self.no_kwargs(e)
        space = self.same_space(e)
        grids = self.per_axis(e.args, len(space.dims), e, "grid sizes")
        terms = []
        for a, axis in enumerate(space.axes):
            g, n = grids[a], space.dims[a]
            self.require(g.ge(N.Const(1)), f"same_grid: the grid size along axis {axis} must be "
                         "at least 1", e)
            self.require((n % g).eq(N.Const(0)), f"same_grid: axis {axis} length must be a multiple of the grid size", e)
            cell = n // g
            terms.append((N.Coord("q", axis) % cell).eq(N.Coord("k", axis) % cell))
        return _all(terms)

    def require(self, cond: N.Expr, message: str, e: A.Expr) -> None:
        cond = N.fold(cond)
        if cond == N.Const(True):
            return
        if cond == N.Const(False):
            raise AttncError(message, e.span)
        self.requires.append(N.Require(cond, message, e.span))

    def same_space(self, e: A.Call) -> N.Space:
        q, kv = self.spaces(e)
        if q != kv:
            what = "an unsegmented key space equal to q's" if isinstance(kv, N.Segments) else "q and kv in the same token space"
            raise AttncError(f"{e.func.id}() needs {what}", e.func.span)
        return q

    def spaces(self, e: A.Expr) -> tuple[N.Space, N.Space]:
        # Parameter defaults and space sizes are lowered before q and kv exist.
        if self.q is None or self.kv is None:
            raise AttncError("token coordinates cannot be used in parameter defaults or token space sizes",
                             e.span)
        return self.q, self.kv

    def per_axis(self, items, ndim: int, where: A.Expr, what: str) -> list[N.Expr]:
        if len(items) not in (1, ndim):
            want = f"1 {what[:-1]}" if ndim == 1 else f"1 or {ndim} {what} (one per axis)"
            raise AttncError(f"expected {want}, got {len(items)}", where.span)
        vals = [self.uniform_int(i, what[:-1]) for i in items]
        return vals * ndim if len(vals) == 1 else vals

    def bounded(self, out: N.Expr, e: A.Expr) -> None:
        """Refuse an IR deeper than MAX_IR_DEPTH or with more than MAX_IR_NODES as a tree.

        Shared subtrees (inlined locals) are measured once, by identity, and iteratively, so a
        40-line spec that stands for 2**40 nodes is refused in 40 steps without recursion.
        """
        stack = [out]
        while stack:
            node = stack[-1]
            if id(node) in self.measured:
                stack.pop()
                continue
            kids = N.children(node)
            todo = [k for k in kids if id(k) not in self.measured]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            depth = 1 + max((self.measured[id(k)][1] for k in kids), default=0)
            size = 1 + sum(self.measured[id(k)][2] for k in kids)
            self.measured[id(node)] = (node, depth, size)  # holding the node keeps its id unique
        _, depth, size = self.measured[id(out)]
        if depth > MAX_IR_DEPTH or size > MAX_IR_NODES:
            what = f"{depth} levels deep (limit {MAX_IR_DEPTH})" if depth > MAX_IR_DEPTH \
                else f"{size} terms (limit {MAX_IR_NODES})"
            raise AttncError(f"expression is too large once local definitions are substituted: {what}", e.span)

    @staticmethod
    def no_kwargs(e: A.Call) -> None:
        if e.kwargs:
            raise AttncError(f"{e.func.id}() takes no keyword arguments", e.kwargs[0].span)


def _all(terms) -> N.Expr:
    """The conjunction of per-axis terms, in axis order."""
    terms = list(terms)
    out = terms[0]
    for t in terms[1:]:
        out = out.and_(t)
    return out


def _default_scale() -> N.Expr:
    return N.Binary("/", N.Const(1.0), N.Call("sqrt", (N.HeadDim(),)))


def _article(type_: str) -> str:
    return {"int": "an integer", "float": "a float", "bool": "a condition"}[type_]


def _mentions(e: N.Expr, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(x, kinds) for x in N.walk(e))


def _varies(e: N.Expr) -> bool:
    """Does the expression depend on token coordinates (or runtime data)?"""
    return _mentions(e, (N.Coord, N.Window, N.Lookup))


__all__ = ["lower", "COMPILE_OPTIONS"]
