"""AST -> IR: name resolution, typing, desugaring of builtins. All errors are located."""
from __future__ import annotations

import dataclasses

from ..errors import AttncError, Span, suggest
from ..frontend import syntax as A
from ..frontend.parser import MAX_INT_LITERAL
from . import nodes as N
from .lower_builtins import (BUILTINS, COMPILE_OPTIONS, FLOAT_FUNCS, INT_FUNCS, MASK_FUNCS, RESERVED_TARGETS,
                             ROUTE_FUNCS, SCORE_FUNCS, SPACE_FUNCS, Builtins, _default_scale, _mentions,
                             check_head_mask)
from .verify import verify

# Locals are inlined, so short lines can still build an IR far deeper or larger than any line of
# the spec (`a1 = a0 + 1` repeated nests, `b1 = b0 and b0` doubles); every later pass recurses
# over the IR as a tree, so both are bounded here.
MAX_IR_DEPTH = 200
MAX_IR_NODES = 20_000
# Where an expression may stand decides what it may read (tensors, head, n_visible) and how a
# lookup is typed: (in_mask, in_modifier, in_score). A local is lowered once for each, when it is
# defined, so a chain of locals never recurses and each use gets the meaning its place gives it.
_MASK, _MODIFIER, _SCORE = (True, False, False), (False, True, False), (False, False, True)
_PLAIN = (False, False, False)  # softcap, routing: none of the above
LOCAL_CONTEXTS = (_MASK, _MODIFIER, _SCORE, _PLAIN)
_CONTEXT_NAMES = {_MASK: "in the mask", _MODIFIER: "in `bias` or the sink logit",
                  _SCORE: "in a score's scale or bias", _PLAIN: "here"}


def lower(ast: A.Attention) -> N.Attention:
    ir = _Lowering(ast).run()
    # The IR's invariants, checked on every IR: well under a millisecond for the specs in specs/
    # (about as long as lowering itself); a violation is an IRError, a compiler bug.
    verify(ir)
    return ir


class _Lowering(Builtins):
    """Statements, expressions and locals; token spaces, builtins and scores are in Builtins."""

    def __init__(self, ast: A.Attention):
        self.ast = ast
        self.params: dict[str, N.ParamDecl] = {}
        # name -> {context: (IR, effects) or the AttncError lowering raised in that context}
        self.locals: dict[str, dict[tuple, tuple[N.Expr, list] | AttncError]] = {}
        self.local_spans: dict[str, Span | None] = {}
        self.priming = 0  # > 0 while a local's definition is being lowered
        # Side effects of lowering that a local's use must repeat: tensor reads and preconditions.
        self.effects: list[tuple[str, object]] = []
        # IR node (division, lookup, token space) -> where the spec writes it, for errors raised
        # once parameters are bound (attnc/ir/nodes.py, Attention.spans).
        self.spans: dict[object, Span] = {}
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
        mask_span = None
        for stmt in self.ast.body:
            ids = tuple(t.id for t in stmt.targets)
            if "q" in ids or "kv" in ids:
                continue
            if len(ids) > 1:
                raise AttncError("only `q, kv = ...` may assign several names at once", stmt.targets[1].span)
            name = ids[0]
            if isinstance(stmt.value, A.Segments):
                raise AttncError("only the token spaces `q` and `kv` may be made of segments", stmt.value.span)
            if isinstance(stmt.value, A.Route) and name != "route":
                raise AttncError("a `top(k) of ... by ...` selection can only be assigned to `route`",
                                 stmt.value.span)
            if name == "mask":
                self.in_mask = True
                mask = self.expect(stmt.value, N.BOOL, "the mask")
                mask_span = stmt.value.span
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
        check_head_mask(mask, score, route, mask_span)
        # Folding may drop a lookup (`false and t[q.i] == 1`): a tensor nothing reads is not asked for.
        read = {x.tensor for e in (mask, score.logit_bias, score.sink) if e is not None
                for x in N.walk(e, expand_windows=True) if isinstance(x, N.Lookup)}
        self.tensors = {name: t for name, t in self.tensors.items() if name in read}
        return N.Attention(self.ast.name, tuple(self.params.values()), self.q, self.kv, mask, score,
                           tuple(self.requires), tuple(self.tensors.values()), route,
                           lines=tuple(sorted(lines.items())),
                           spans=tuple((k, v) for k, v in self.spans.items() if v is not None))

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
            type_ = default.type
        # A bool parameter is carried as an integer (nodes.ParamDecl): one kernel for both values.
        self.params[p.name] = N.ParamDecl(p.name, N.INT if type_ == N.BOOL else type_, default, type_ == N.BOOL)

    def define_local(self, stmt: A.Stmt) -> None:
        """A local stands for its expression: it is lowered here once per context it could be used
        in, and each use takes the lowering (and the tensor reads and preconditions) of its own
        context. An error that every context gives is the definition's and is reported here; one
        that only some give is reported at a use in such a context."""
        name = stmt.targets[0]
        if name.id in BUILTINS or name.id in self.params or name.id == "k":
            raise AttncError(f"'{name.id}' is a {'parameter' if name.id in self.params else 'builtin'} "
                             "and cannot be redefined", name.span)
        plain = self.prime(stmt.value, _PLAIN)
        if not isinstance(plain, AttncError) and _same_everywhere(plain[0]):
            lowered = dict.fromkeys(LOCAL_CONTEXTS, plain)
        else:
            lowered = {ctx: plain if ctx == _PLAIN else self.prime(stmt.value, ctx) for ctx in LOCAL_CONTEXTS}
        errors = list(lowered.values())
        if all(isinstance(r, AttncError) for r in errors) and \
                len({(r.message, r.span, r.hint) for r in errors}) == 1:
            raise errors[0]
        self.locals[name.id] = lowered
        self.local_spans[name.id] = name.span

    def context(self) -> tuple[bool, bool, bool]:
        return (self.in_mask, self.in_modifier, self.in_score)

    def prime(self, e: A.Expr, ctx: tuple[bool, bool, bool]) -> tuple[N.Expr, list] | AttncError:
        """Lower a local's expression as if it stood in context ctx, capturing its effects."""
        saved = (self.context(), self.in_size, self.tensors, self.requires, self.effects)
        self.in_mask, self.in_modifier, self.in_score = ctx
        self.in_size = False
        self.tensors, self.requires, self.effects = {}, [], []
        self.priming += 1
        try:
            return self.expr(e), self.effects
        except AttncError as err:
            return err
        finally:
            self.priming -= 1
            (self.in_mask, self.in_modifier, self.in_score), self.in_size, self.tensors, self.requires, \
                self.effects = saved

    def use_local(self, e: A.Name) -> N.Expr:
        self.used.add(e.id)
        lowered = self.locals[e.id]
        ctx = self.context()
        if ctx not in lowered:  # not reachable with today's contexts; stay correct regardless
            lowered[ctx] = self.prime(self.local_definition(e.id), ctx)
        out = lowered[ctx]
        if isinstance(out, AttncError):
            if self.priming:  # inside another local: the innermost cause is reported at the use
                raise out
            at = out.span
            where = f"; the cause is in its definition, at line {at.line}, column {at.col}" if at else ""
            raise AttncError(f"'{e.id}' cannot be used {_CONTEXT_NAMES.get(ctx, 'here')}: {out.message}",
                             e.span, hint=(out.hint + where) if out.hint else where[2:] or None)
        expr, effects = out
        for kind, item in effects:
            if kind == "tensor":
                self.read_tensor(*item)
            else:
                self.add_require(item)
        return expr

    def local_definition(self, name: str) -> A.Expr:
        for stmt in self.ast.body:
            if stmt.targets[0].id == name:
                return stmt.value
        raise AssertionError(name)

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
        """Sizes, builtin arguments, routing counts: fixed when parameters are bound."""
        out = self.uniform(e, what)
        if _mentions(out, (N.HeadDim, N.NVisible)):
            raise AttncError(f"{what} is fixed at compile time and cannot use head_dim or n_visible", e.span)
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
        self.check_tensor(name, rank, dtype, e.span)
        indices = []
        for i in e.indices:
            idx = self.expr(i)
            if idx.type != N.INT:
                raise AttncError(f"an index into '{name}' must be an integer, but this is {_article(idx.type)}",
                                 i.span)
            if isinstance(idx, N.Const) and idx.value < 0:
                raise AttncError(f"index {idx.value} into '{name}' is negative", i.span,
                                 hint="runtime tensors are indexed from 0; there is no indexing from the end")
            indices.append(idx)
        by_head = any(_mentions(i, (N.Head,)) for i in indices)
        self.read_tensor(name, rank, dtype, by_head, e.span)
        out = N.Lookup(name, tuple(indices), dtype)
        self.spans.setdefault(out, e.span)
        return out

    def check_tensor(self, name: str, rank: int, dtype: str, span: Span | None) -> None:
        seen = self.tensors.get(name)
        if seen is not None and seen.rank != rank:
            raise AttncError(f"'{name}' is indexed with {rank} indices here but {seen.rank} elsewhere", span)
        if seen is not None and seen.dtype != dtype:
            raise AttncError(f"'{name}' is read by the mask (integers) and by a score modifier (floats); "
                             "use two tensors", span)

    def read_tensor(self, name: str, rank: int, dtype: str, by_head: bool, span: Span | None) -> None:
        """Declare (or re-check) a runtime tensor read; a local's use repeats its reads here."""
        self.check_tensor(name, rank, dtype, span)
        seen = self.tensors.get(name)
        per_head = dtype == N.FLOAT and not by_head and (seen is None or seen.per_head)
        self.tensors[name] = N.TensorDecl(name, rank, dtype, per_head)
        self.effects.append(("tensor", (name, rank, dtype, by_head, span)))

    def name(self, e: A.Name) -> N.Expr:
        if e.id in self.params:
            decl = self.params[e.id]
            return N.Binary("!=", N.Param(e.id, N.INT), N.Const(0)) if decl.boolean else N.Param(e.id, decl.type)
        if e.id in self.locals:
            return self.use_local(e)
        if e.id == "causal":
            return self.causal(e)
        if e.id == "head_dim":
            if self.in_mask:  # tile analysis decides the mask before q and k exist
                raise AttncError("head_dim is only known when the attention runs; the mask cannot use it",
                                 e.span, hint="head_dim may be used in the score's arguments and in `bias`")
            return N.HeadDim()
        if e.id in ("head", "batch"):
            return self.head_or_batch(e)
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
        spaces = [s for _, s in N.parts(kv if side == "k" else q)]
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
        if e.op in N.BIT_OPS:
            return self.bit_op(e)
        lhs, rhs = self.number(e.lhs, e.op), self.number(e.rhs, e.op)
        if e.op in N.COMPARISONS and self.in_mask:
            # The mask compares integers (docs/language.md): `q.i - k.i < 2.5` would round one way
            # in float32 kernels and another in interval analysis and the float64 reference.
            for side, val in ((e.lhs, lhs), (e.rhs, rhs)):
                if val.type == N.FLOAT:
                    raise AttncError("the mask compares integers, but this is a float", side.span,
                                     hint=_float_hint(val))
        if e.op == "/" and self.in_size and lhs.type == rhs.type == N.INT:
            # Sizes are integers: `H / 4` is exact division, and H must be a multiple of 4.
            self.require(rhs.ge(N.Const(1)), "a size must be divided by a positive number", e)
            self.require((lhs % rhs).eq(N.Const(0)), "a size divided with / must divide exactly", e)
            out = N.Binary("//", lhs, rhs)
            self.spans.setdefault(out, e.rhs.span)
            return out
        if e.op in ("/", "//", "%") and isinstance(rhs, N.Const) and rhs.value == 0:
            raise AttncError("division by zero", e.rhs.span)
        if e.op in ("//", "%"):
            for side, val in ((e.lhs, lhs), (e.rhs, rhs)):
                if val.type != N.INT:
                    raise AttncError(f"'{e.op}' needs integers, but this is a float", side.span)
        out = N.Binary(e.op, lhs, rhs)
        # A divisor that is 0 once parameters are bound is located at the divisor; an overflow
        # (intervals.check_int64) at the whole operation.
        self.spans.setdefault(out, e.rhs.span if e.op in ("/", "//", "%") else e.span)
        return out

    def call(self, e: A.Call) -> N.Expr:
        fn = e.func.id
        if fn in self.params or fn in self.locals:
            raise AttncError(f"'{fn}' is not a function", e.func.span)
        if fn in MASK_FUNCS:
            out = getattr(self, fn)(e)
            # Their expansions divide by their arguments: a zero block size is located at the call.
            for x in N.walk(out):
                if isinstance(x, N.Binary) and x.op in ("//", "%"):
                    self.spans.setdefault(x, e.span)
            return out
        if fn == "causal":
            if e.args or e.kwargs:
                raise AttncError("causal takes no arguments", e.span)
            return self.causal(e)
        if fn in INT_FUNCS:
            self.no_kwargs(e)
            args = [self.number(a, fn) for a in e.args]
            if fn == "ilog2":
                return self.ilog2(e, args)
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

    def require(self, cond: N.Expr, message: str, e: A.Expr) -> None:
        cond = N.fold(cond)
        if cond == N.Const(True):
            return
        if cond == N.Const(False):
            raise AttncError(message, e.span)
        self.add_require(N.Require(cond, message, e.span))

    def add_require(self, r: N.Require) -> None:
        self.requires.append(r)
        self.effects.append(("require", r))  # each use of a local states its preconditions again

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


def _same_everywhere(e: N.Expr) -> bool:
    """Does an expression lowered in the plain context (so without tensors, head or n_visible)
    lower the same in every context? Only floats (refused in mask comparisons) and head_dim
    (refused in the mask) tell contexts apart then. Shared nodes are visited once."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if x.type == N.FLOAT or isinstance(x, N.HeadDim):
            return False
        stack.extend(N.children(x))
    return True


def _float_hint(e: N.Expr) -> str:
    floats = sorted({x.name for x in N.walk(e) if isinstance(x, N.Param) and x.type == N.FLOAT})
    if floats:
        return f"'{floats[0]}' is a float parameter (its default is a float); give it an integer default"
    return "compare with integers; use // for integer division"


def _article(type_: str) -> str:
    return {"int": "an integer", "float": "a float", "bool": "a condition"}[type_]


def _varies(e: N.Expr) -> bool:
    """Does the expression depend on token coordinates (or runtime data)?"""
    return _mentions(e, (N.Coord, N.Window, N.Lookup))


__all__ = ["lower", "COMPILE_OPTIONS"]
