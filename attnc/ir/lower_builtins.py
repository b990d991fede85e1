"""AST -> IR, continued: token spaces, mask builtins (causal, window, same_*), scores and routing,
as a mixin of the lowering in lower.py (which owns the state these methods read). All errors are
located."""
from __future__ import annotations

from ..errors import AttncError, suggest
from ..frontend import syntax as A
from . import nodes as N
from .printer import format_space

RESERVED_TARGETS = ("q", "kv", "mask", "score", "bias", "route")
# Keyword arguments of attnc.compile itself (`spec` too: it is positional-or-keyword); a spec
# parameter may not shadow them.
COMPILE_OPTIONS = ("spec", "backend", "tiles", "layout")
SPACE_FUNCS = ("seq", "grid")
SCORE_FUNCS = ("softmax", "sigmoid", "softplus")
INT_FUNCS = ("abs", "min", "max", "ilog2")
FLOAT_FUNCS = ("sqrt", "log", "exp")
MASK_FUNCS = ("window", "same_block", "same_window", "same_grid")
BUILTIN_VALUES = ("causal", "head_dim", "n_visible", "head", "batch", "true", "false")
ROUTE_FUNCS = ("top", "regions", "blocks", "mean")
# ROUTE_FUNCS are not reserved: they have a meaning only inside a `route = ...` rule.
# Why a window of kernel 1 is refused, and what to write instead (also used when binding).
KERNEL_HINT = ("a query that sees only itself is `k.i == q.i` (on a grid, `k.y == q.y and k.x == q.x`); "
               "kernel 1 along one axis is equality on that axis")
BUILTINS = SPACE_FUNCS + SCORE_FUNCS + INT_FUNCS + FLOAT_FUNCS + MASK_FUNCS + BUILTIN_VALUES


class Builtins:
    """Lowering of the builtins; mixed into lower._Lowering, whose state and expression methods
    (expr, uniform, uniform_int, require, no_kwargs, ...) these use."""

    def space_stmt(self, stmt: A.Stmt, ids: tuple[str, ...]) -> None:
        if ids not in (("q",), ("kv",), ("q", "kv")):
            raise AttncError("token spaces are assigned as `q, kv = ...`, `q = ...` or `kv = ...`",
                             stmt.targets[0].span)
        if isinstance(stmt.value, A.Segments):
            if len(ids) > 1:
                raise AttncError("segmented spaces are assigned one at a time: write `q = name: ..., name: ...` "
                                 "and `kv = name: ..., name: ...` separately", stmt.value.span)
            if ids == ("q",):
                self.q = self.segments(stmt.value)
            else:
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
        space = N.Space(e.func.id, dims)
        self.spans.setdefault(space, e.span)
        return space

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

    def member(self, e: A.Member) -> N.Expr:
        side = e.value.id if isinstance(e.value, A.Name) else None
        if side not in ("q", "k"):
            raise AttncError("`in` tests a token's segment: write `k in NAME`", e.value.span)
        self.spaces(e)
        space, what = (self.q, "query") if side == "q" else (self.kv, "key")
        if not isinstance(space, N.Segments):
            if side == "q":
                raise AttncError("the query space has no segments; `in` applies to keys (`k in NAME`)",
                                 e.value.span, hint="or name the query segments: `q = a: grid(H, W), b: seq(M)`")
            raise AttncError("the key space has no segments to test", e.span,
                             hint="name them: `kv = hi: grid(H, W), lo: grid(H / 4, W / 4)`")
        names = [n for n, _ in space.parts]
        if e.segment.id not in names:
            raise AttncError(f"the {what} space has no segment '{e.segment.id}'; its segments are {', '.join(names)}",
                             e.segment.span, hint=suggest(e.segment.id, names))
        return N.Member(side, e.segment.id)

    def check_segment_axes(self, out: N.Expr, e: A.Expr) -> None:
        """Each segment must give a value to every key coordinate its branch of the expression reads:
        `k.y` is fine on a grid segment, and on a seq segment only where `k in grid_part` guards it."""
        if not isinstance(self.kv, N.Segments) and not isinstance(self.q, N.Segments):
            return
        for qseg, qspace in N.parts(self.q):
            for seg, space in N.parts(self.kv):
                sub = N.specialise(out, seg, qseg)
                w = next((x for x in N.walk(sub) if isinstance(x, N.Window)), None)
                if w is not None and seg is not None and space != qspace:
                    raise AttncError(f"a window is read for keys of segment '{seg}' ({format_space(space)}), which is "
                                     f"not the query space ({format_space(qspace)})", w.span or e.span,
                                     hint="a window on a segmented key space needs a segment with q's space; guard "
                                          "it, e.g. `k in other and window(...)`")
                for side, name, sp in (("q", qseg, qspace), ("k", seg, space)):
                    axes = set(sp.axes) | {"i"}
                    for x in N.walk(sub, expand_windows=True):
                        if isinstance(x, N.Coord) and x.side == side and x.axis not in axes and name is not None:
                            who = "queries" if side == "q" else "keys"
                            raise AttncError(f"{side}.{x.axis} is read for {who} of segment '{name}' ({sp.kind}), "
                                             f"which has no axis {x.axis}", e.span,
                                             hint=f"guard it, e.g. `{side} in other and ... {side}.{x.axis} ...`, "
                                                  f"or use {side}.i")

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
        if q != kv or isinstance(q, N.Segments):
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

    def head_or_batch(self, e: A.Name) -> N.Expr:
        """`head` (the query head: the mask, `bias`, the sink) or `batch` (the sequence of the
        batch: the mask only; docs/language.md)."""
        if e.id == "batch":
            if not self.in_mask:
                raise AttncError("batch (the index of the sequence in the batch) is only defined in the mask",
                                 e.span)
            return N.Batch()
        if not (self.in_modifier or self.in_mask):
            raise AttncError("head (the query head index) is only defined in the mask, `bias` and the sink "
                             "logit", e.span)
        return N.Head()

    def causal(self, e: A.Expr) -> N.Expr:
        # Bottom-right aligned (DESIGN.md section 3): key j visible to query i iff j <= i + Nk - Nq.
        q, kv = self.spaces(e)
        if isinstance(q, N.Segments):
            raise AttncError("causal needs an unsegmented query space", e.span,
                             hint="write it per segment, e.g. `q in x and k in x and k.i <= q.i`")
        if isinstance(kv, N.Segments):
            # Bottom-right alignment on the concatenation, allowed only where it is also the
            # per-segment reading: the last segment is q's own space (a context, then the sequence
            # itself, as FlashAttention's causal over `cat(cache, new)`), so every earlier key is
            # visible and keys of the last segment are visible iff k.i <= q.i (docs/language.md).
            last, space = kv.parts[-1]
            if space != q:
                raise AttncError("causal on a segmented key space needs the last segment to be the query space "
                                 f"itself (here q = {format_space(q)}, segment '{last}' = {format_space(space)})",
                                 e.span, hint="write it per segment, e.g. `(k in ctx) or (k in x and k.i <= q.i)`")
            return N.Binary("or", N.Unary("not", N.Member("k", last)), N.Coord("k", "i").le(N.Coord("q", "i")))
        nq, nk = q.size(), kv.size()
        offset = N.Const(0) if nq == nk else nk - nq
        return N.Coord("k", "i").le(N.Coord("q", "i") + offset)

    def window(self, e: A.Call) -> N.Expr:
        q, kv = self.spaces(e)
        # On a segmented key space a window relates q to the keys of a segment with q's own space:
        # check_segment_axes refuses it wherever it is read for keys of any other segment.
        space = q if isinstance(kv, N.Segments) and isinstance(q, N.Space) and \
            any(sp == q for _, sp in kv.parts) else self.same_space(e)
        ndim = len(space.dims)
        kernels = self.per_axis(e.args, ndim, e, "kernel sizes")
        opts = {"dilation": [N.Const(1)] * ndim, "stride": [N.Const(1)] * ndim}
        causal: list[N.Expr] = [N.Const(False)] * ndim
        for kw in e.kwargs:
            if kw.name in opts:
                items = kw.value.items if isinstance(kw.value, A.Tuple) else (kw.value,)
                opts[kw.name] = self.per_axis(items, ndim, kw.value, f"{kw.name} values")
            elif kw.name == "causal":
                items = kw.value.items if isinstance(kw.value, A.Tuple) else (kw.value,)
                flags = [self.flag(i) for i in items]
                if len(flags) not in (1, ndim):
                    want = "1 causal flag" if ndim == 1 else f"1 or {ndim} causal flags"
                    raise AttncError(f"expected {want}, got {len(flags)}", kw.value.span)
                causal = flags * ndim if len(flags) == 1 else flags
            else:
                raise AttncError(f"window has no argument '{kw.name}'", kw.span,
                                 hint=suggest(kw.name, ["dilation", "stride", "causal"]))
        for arg, k in zip(e.args * ndim if len(e.args) == 1 else e.args, kernels):
            if isinstance(k, N.Const) and k.value < 2:
                raise AttncError(f"window kernel size {k.value}: NATTEN's neighborhood is defined for kernel sizes "
                                 "of at least 2 (its check is `kernel_size >= 2`)", arg.span, hint=KERNEL_HINT)

        def axis_window(a: int, axis: str, causal: bool) -> N.Window:
            return N.Window(axis, space.dims[a], kernels[a], opts["dilation"][a], opts["stride"][a], causal, span=e.span)

        terms = []
        for a, axis in enumerate(space.axes):
            flag = causal[a]
            if isinstance(flag, N.Const):
                terms.append(axis_window(a, axis, flag.value))
            else:
                # A bool parameter: both windows, one selected by the flag (uniform, so tile analysis
                # decides it exactly, and one kernel serves both values; docs/language.md).
                terms.append(N.Binary("or", N.Binary("and", flag, axis_window(a, axis, True)),
                                      N.Binary("and", _negate(flag), axis_window(a, axis, False))))
        return _all(terms)

    def flag(self, e: A.Expr) -> N.Expr:
        """A flag fixed when parameters are bound: true, false, or a condition on bool parameters."""
        out = self.uniform(e, "a causal flag")
        if out.type != N.BOOL:
            raise AttncError("causal must be true/false, a bool parameter, or a tuple of them", e.span)
        return out

    def bit_op(self, e: A.Binary) -> N.Expr:
        """`& | ^ << >>` on integers (ir/bits.py has their exact meaning)."""
        sides = []
        for side in (e.lhs, e.rhs):
            val = self.expr(side)
            if val.type != N.INT:
                what = "a float" if val.type == N.FLOAT else "a condition"
                raise AttncError(f"'{e.op}' needs integers, but this is {what}", side.span,
                                 hint="combine conditions with `and`, `or`, `not`" if val.type == N.BOOL else None)
            sides.append(val)
        lhs, rhs = sides
        if e.op in ("<<", ">>"):
            lo, hi = N.SHIFT_LIMITS
            self.check_domain(rhs, e.rhs, "a shift count", lambda v: not lo <= v <= hi,
                              f"must be in [{lo}, {hi}]")
        out = N.Binary(e.op, lhs, rhs)
        self.spans.setdefault(out, e.rhs.span if e.op in ("<<", ">>") else e.span)
        return out

    def ilog2(self, e: A.Call, args: list[N.Expr]) -> N.Expr:
        if len(args) != 1:
            raise AttncError(f"ilog2() takes 1 argument, got {len(args)}", e.span)
        if args[0].type != N.INT:
            raise AttncError("ilog2() needs an integer, but this is a float", e.args[0].span)
        self.check_domain(args[0], e.args[0], "ilog2's argument", lambda v: v < 1, "must be at least 1")
        out = N.Unary("ilog2", args[0])
        self.spans.setdefault(out, e.span)
        return out

    @staticmethod
    def check_domain(val: N.Expr, at: A.Expr, what: str, bad, need: str) -> None:
        """A constant out of an operation's domain is refused here, where the spec writes it; one
        that depends on parameters or tokens is checked when bound or evaluated (ir/bits.py)."""
        if isinstance(val, N.Const) and bad(val.value):
            raise AttncError(f"{what} {need}, but this is {val.value}", at.span)
        if _mentions(val, (N.Lookup,)):
            raise AttncError(f"{what} cannot read a runtime tensor (not supported yet)", at.span,
                             hint="its domain could not be checked before the kernels run")

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

    def same_space(self, e: A.Call) -> N.Space:
        q, kv = self.spaces(e)
        if q != kv or isinstance(q, N.Segments):
            what = "an unsegmented key space equal to q's" if isinstance(kv, N.Segments) else \
                "an unsegmented query space" if isinstance(q, N.Segments) else "q and kv in the same token space"
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


def _all(terms) -> N.Expr:
    """The conjunction of per-axis terms, in axis order."""
    terms = list(terms)
    out = terms[0]
    for t in terms[1:]:
        out = out.and_(t)
    return out


def _negate(cond: N.Expr) -> N.Expr:
    """not cond, with a comparison (a bool parameter reads as `p != 0`) turned around."""
    flip = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}
    if isinstance(cond, N.Binary) and cond.op in flip:
        return N.Binary(flip[cond.op], cond.lhs, cond.rhs)
    return N.fold(N.Unary("not", cond))


def _default_scale() -> N.Expr:
    return N.Binary("/", N.Const(1.0), N.Call("sqrt", (N.HeadDim(),)))


def _mentions(e: N.Expr, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(x, kinds) for x in N.walk(e))


def check_head_mask(mask: N.Expr, score: N.Score, route, span) -> None:
    """A mask that reads `head` (`batch`) is scheduled per head (sequence) at call time; two
    things that need one schedule for all of them are refused with it (not yet supported)."""
    read = [name for name, kind in (("head", N.Head), ("batch", N.Batch))
            if any(isinstance(x, kind) for x in N.walk(mask, expand_windows=True))]
    if not read:
        return
    if route is not None:
        raise AttncError(f"a routed spec's mask cannot read {read[0]} (not supported yet)", span)
    if any(isinstance(x, N.NVisible) for e in (score.scale, score.bias) if e is not None for x in N.walk(e)):
        raise AttncError(f"n_visible cannot be used with a mask that reads {read[0]} (not supported yet)", span)
