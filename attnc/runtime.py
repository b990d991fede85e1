"""The callable users get: input validation, dispatch to a backend, the dense mask."""
from __future__ import annotations

import os

import numpy as np
import torch

from .analysis.extents import check_divisors, tensor_extents
from .analysis.layout import AUTO, Layout, inverse
from .backends.inputs import host_ints
from .backends.triton.host import HostState
from .backends.triton.op import attention as attention_op, register
from .errors import AttncError, suggest
from .ir import nodes as N
from .ir.evaluate import mask_block, per_batch, per_head
from .limits import MAX_FLOAT
from .pipeline import DEFAULT_TILES, Compiled, build

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def compile(spec: "str | os.PathLike", backend: str = "triton", tiles: tuple[int, int] = DEFAULT_TILES,
            layout: "str | Layout" = AUTO, **params) -> "AttentionFn":
    """Compile a spec into a PyTorch callable `fn(q, k, v)`.

    spec: a path to a .attn file, .attn source text, or a Spec from `attnc.parse`.
    backend: "triton" (generated kernels; Triton's interpreter for CPU tensors) or "reference"
    (dense float evaluation, the oracle). tiles: (BLOCK_M, BLOCK_N). layout: the token order
    the kernels work in ("auto", "row_major", a family such as "boxes", a candidate's name, or a
    Layout); results are row-major whatever it is.
    params: the spec's parameters.
    """
    return AttentionFn(build(spec, params, backend, tiles, layout))


class AttentionFn:
    """`fn(q, k, v)` for one compiled spec and binding of its parameters.

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> [B, Hq, Nq, Dv], tokens in the
    row-major order of each space. Hq must be a multiple of Hkv (grouped-query attention).
    """

    def __init__(self, compiled: Compiled):
        self.compiled = compiled
        self._host = HostState(compiled) if compiled.backend == "triton" else None
        self._handle = register(self) if compiled.backend == "triton" else None
        self._extent_cache: dict[tuple, dict[str, tuple[int, ...]]] = {}

    @property
    def spec(self):
        return self.compiled.spec

    @property
    def ir(self) -> N.Attention:
        return self.compiled.spec.ir

    @property
    def backend(self) -> str:
        return self.compiled.backend

    @property
    def params(self) -> dict:
        return self.compiled.bound.env

    @property
    def schedule(self):
        return self.compiled.schedule

    @property
    def kernel_source(self) -> str | None:
        return self.compiled.kernel_source

    @property
    def layout(self) -> Layout:
        """The token order the kernels work in: `.name`, `.q_order`, `.kv_order`."""
        return self.compiled.layout

    def tile_map(self, **tensors: torch.Tensor) -> torch.Tensor:
        """int8 [q tiles, kv tiles] in kernel order: 0 EMPTY, 1 PARTIAL, 2 FULL, exactly the
        classes the kernel uses: for a mask that reads runtime tensors, those of this data."""
        if self.compiled.schedule is None:
            raise AttncError("the reference backend has no tiles; compile with backend='triton'")
        checked = self._check_tensors(tensors, heads=None)
        return torch.from_numpy(self._host.schedule(host_ints(checked)).classes.copy())

    def gpu_report(self, arch: int = 90, dtype=torch.bfloat16, head_dim: int = 128, sass: bool = False,
                   num_warps: int | None = None, num_stages: int | None = None) -> list[dict]:
        """The spec's kernels (forward, dQ, dK/dV) compiled for sm_`arch` without a GPU: one dict
        per kernel with kernel, registers, spill_bytes, shared_bytes, tensor_cores ('wgmma',
        'mma' or 'none'), num_warps, num_stages, loops (SASS instructions per main loop) and
        cubin; with sass=True also the SASS. See codegen/target.py."""
        from .codegen.abi import kernel_params, param_name
        from .ir.evaluate import evaluate_uniform
        from .codegen.target import gpu_report

        if self.compiled.schedule is None:
            raise AttncError("the reference backend has no kernels; compile with backend='triton'")
        s, lay = self.compiled.schedule, self.compiled.layout
        flags = {"Q_PERMUTED": not lay.q_identity, "KV_PERMUTED": not lay.kv_identity, "INT64": bool(self.compiled.int64)}
        bound = self.compiled.bound
        values = {"Nq": bound.nq, "Nk": bound.nk,
                  **{param_name(p.name): bound.env[p.name] for p in kernel_params(self.ir) if p.type == N.INT}}
        if self.ir.route is not None:
            values["ROUTE_K"] = int(evaluate_uniform(self.ir.route.top, bound.env))
        return gpu_report(self.spec.text, self.ir, int(arch), dtype, int(head_dim), s.block_m, s.block_n,
                          num_warps=num_warps, num_stages=num_stages, sass=sass, flags=flags, values=values)

    def to_flex(self, *, block_size: int = 128, **tensors: torch.Tensor):
        """The same pattern for PyTorch FlexAttention: a FlexExport with `mask_mod`, `score_mod`
        (None where the score has no Flex form) and a `block_mask` built from attnc's own tile
        map (no N^2 evaluation). Runtime tensors of the spec are passed by name. See
        docs/coming_from_flex.md."""
        from .interop.flex import export

        return export(self, block_size=block_size, **tensors)

    def __repr__(self) -> str:
        return f"<attnc.AttentionFn {self.ir.name}({self.compiled.bound.describe()}) backend={self.backend}>"

    def mask(self, *, head: int | None = None, batch: int | None = None, **tensors: torch.Tensor) -> torch.Tensor:
        """Dense bool [Nq, Nk] visibility matrix, row-major token order (for small sizes), of
        query head `head` when the mask reads `head`, of sequence `batch` of the batch when it
        reads `batch` (required then).

        Specs whose mask reads runtime tensors need them here too: `fn.mask(doc=doc_ids)`.
        """
        if self.ir.route is not None:
            raise AttncError("a routed spec's visibility depends on q and k; use fn.routed_mask(q, k)")
        if head is None and per_head(self.ir.mask):
            raise AttncError(f"'{self.ir.name}' has a mask that reads head: ask for one head, fn.mask(head=h)")
        if head is not None and (not isinstance(head, int) or isinstance(head, bool) or head < 0):
            raise AttncError(f"head must be a head index (an int >= 0), not {head!r}")
        if batch is None and per_batch(self.ir.mask):
            raise AttncError(f"'{self.ir.name}' has a mask that reads batch: ask for one sequence, fn.mask(batch=b)")
        if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 0):
            raise AttncError(f"batch must be a batch index (an int >= 0), not {batch!r}")
        checked = self._check_tensors(tensors, heads=None, batch=None if batch is None else batch + 1)
        bound = self.compiled.bound
        return torch.from_numpy(mask_block(bound, np.arange(bound.nq), np.arange(bound.nk), host_ints(checked),
                                           head=head, batch=batch))

    def routed_mask(self, q: torch.Tensor, k: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
        """Visibility of a routed spec: bool [B, Hq, Nq, Nk] (the mask and the top-k selection)."""
        if self.ir.route is None:
            raise AttncError(f"'{self.ir.name}' has no route; use fn.mask()")
        from .backends.reference import routed_mask  # the definition (kernels select on the fly, per call)

        self._check(q, k, k)
        checked = self._check_tensors(tensors, heads=None)
        return routed_mask(self.compiled.bound, q, k, host_ints(checked))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False,
                 kernel_order: bool = False, **tensors: torch.Tensor):
        """Attention of q, k, v (row-major tokens). With kernel_order=True, q, k, v and the
        results are in the layout's kernel order instead (`fn.layout.q_order[p]` is the token at
        position p): callers that keep tensors in that order across layers pay no permutation.
        Runtime tensors (ids, tables) are always indexed by row-major token."""
        if return_lse and self.ir.score.kind != "softmax":
            raise AttncError(f"return_lse needs softmax scoring; this spec scores with {self.ir.score.kind}")
        traced = torch.compiler.is_compiling()
        if not traced:  # under torch.compile the op checks, with the real tensors
            self._check(q, k, v)
            tensors = self._check_tensors(tensors, heads=q.shape[1], device=q.device, batch=q.shape[0])
        if self.backend == "reference":
            from .backends.reference import reference_attention

            if not kernel_order:
                return reference_attention(self.compiled.bound, q, k, v, tensors=tensors, return_lse=return_lse)
            lay = self.layout  # to row-major, and the results back into kernel order
            q, k, v = (x[:, :, torch.from_numpy(inverse(perm)).to(x.device)]
                       for x, perm in ((q, lay.q_perm), (k, lay.kv_perm), (v, lay.kv_perm)))
            res = reference_attention(self.compiled.bound, q, k, v, tensors=tensors, return_lse=return_lse)
            order = lay.q_order.to(q.device)
            return tuple(r[:, :, order] for r in res) if return_lse else res[:, :, order]
        # A custom op with a registered backward: gradients flow to q, k, v and float tables.
        out, lse = attention_op(q, k, v, self._ordered(tensors), self._handle, kernel_order, not traced)
        return (out, lse) if return_lse else out

    def _ordered(self, tensors: dict) -> list[torch.Tensor]:
        """The runtime tensors in declaration order (the custom op takes a list)."""
        self._refuse_unknown(tensors)  # eager calls checked already; traced ones did not
        missing = [t.name for t in self.ir.tensors if t.name not in tensors]
        if missing:
            raise AttncError(f"'{self.ir.name}' reads runtime tensor '{missing[0]}'; pass it as {missing[0]}=tensor")
        return [tensors[t.name] for t in self.ir.tensors]

    def _refuse_unknown(self, given: dict) -> None:
        names = [t.name for t in self.ir.tensors]
        for name in given:
            if name not in names:
                hint = suggest(name, names) or (f"it reads: {', '.join(names)}" if names else "it reads none")
                raise AttncError(f"'{self.ir.name}' reads no runtime tensor '{name}'", hint=hint)

    def _named(self, tensors: list) -> dict[str, torch.Tensor]:
        return {decl.name: t for decl, t in zip(self.ir.tensors, tensors, strict=True)}

    # -- runtime tensors ------------------------------------------------------------------------
    def _check_tensors(self, given: dict, heads: int | None, device: torch.device | None = None,
                       batch: int | None = None) -> dict[str, torch.Tensor]:
        """Validate the runtime tensors the spec reads and return them unchanged (the reference
        backend differentiates through float tables). With heads=None (fn.mask), only the
        integer tensors the mask reads are required. `batch`: the sequences of the call (a mask
        tensor indexed by `batch` needs one row per sequence)."""
        decls = {t.name: t for t in self.ir.tensors}
        self._refuse_unknown(given)
        extents = self.compiled.tensor_extents if heads is None and batch is None else self._extents(heads, batch)
        out = {}
        for name, decl in decls.items():
            floating = decl.dtype == N.FLOAT
            if floating and heads is None:
                continue
            need = extents.get(name, (0,) * decl.rank)
            if name not in given:
                shape = ([heads] if decl.per_head else []) + list(need)
                what = f"a float tensor of shape {list(need)} or {shape} (per head)" if decl.per_head \
                    else f"{'a float' if floating else 'an integer'} tensor of shape {list(need)}"
                raise AttncError(f"'{self.ir.name}' reads runtime tensor '{name}'; pass it as {name}=tensor",
                                 hint=what)
            t = given[name]
            if not isinstance(t, torch.Tensor):
                raise AttncError(f"runtime tensor '{name}' must be a torch.Tensor, got {type(t).__name__}")
            if floating and not t.dtype.is_floating_point:
                raise AttncError(f"runtime tensor '{name}' is read by a score modifier and must be floating "
                                 f"point, got {t.dtype}")
            if not floating and (t.dtype.is_floating_point or t.dtype.is_complex):
                raise AttncError(f"runtime tensor '{name}' must have an integer dtype (or bool), got {t.dtype}")
            shape = list(t.shape)
            if floating and decl.per_head and t.dim() == decl.rank + 1:
                if shape[0] != heads:
                    raise AttncError(f"runtime tensor '{name}' has shape {shape}: a per-head table's first "
                                     f"dimension must be the {heads} query heads")
                shape = shape[1:]
            if len(shape) != decl.rank or any(s < n for s, n in zip(shape, need)):
                per_head = f" (or [{heads}, ...] per head)" if floating and decl.per_head else ""
                raise AttncError(f"runtime tensor '{name}' has shape {list(t.shape)}; the spec indexes it up to "
                                 f"shape {list(need)}{per_head} for {self._sizes()}")
            if device is not None and t.device != device:
                raise AttncError(f"runtime tensor '{name}' is on {t.device} but q is on {device}")
            # Host syncs: the value checks below (int range, nan / +inf) are the only ones in a call,
            # with the per-call row counts of host.visible_counts when a score needs them.
            if not floating and t.numel() and not _fits_int32(t.dtype):
                lo, hi = int(t.min()), int(t.max())  # as Python ints: no overflow in t's own dtype
                if lo < -(2**31) or hi >= 2**31:
                    raise AttncError(f"runtime tensor '{name}' has values in [{lo}, {hi}], outside int32",
                                     hint="kernels read integer tensors as int32")
            if floating and t.numel() and (torch.isnan(t).any() or (t == float("inf")).any()):
                raise AttncError(f"runtime tensor '{name}' contains NaN or +inf",
                                 hint="-inf is allowed: it hides a pair (a logit of -cap under a soft-cap) or silences a sink")
            # finite beyond float32 would be inf (or nan) in kernels
            if floating and t.numel() and (big := torch.isfinite(t) & (t.abs() > MAX_FLOAT)).any():
                raise AttncError(f"runtime tensor '{name}' holds {t[big].flatten()[0].item():.4g}; kernels read "
                                 f"tables in float32 (finite up to 3.4e38), so values must lie within ±{MAX_FLOAT:.0e}",
                                 hint="-inf is allowed: it hides a pair (a logit of -cap under a soft-cap) or silences a sink")
            out[name] = t
        check_divisors(  # a mask divisor read from a tensor: no 0 where read
            self.compiled.bound, out, self.compiled.spec)
        return out

    def _extents(self, heads: int | None, batch: int | None = None) -> dict[str, tuple[int, ...]]:
        batch = batch if per_batch(self.ir.mask) else None  # other specs' extents do not depend on it
        extents = self._extent_cache.get((heads, batch))
        if extents is None:  # computed before it is published: threads may share this callable
            extents = self._extent_cache[(heads, batch)] = tensor_extents(self.compiled.bound, heads, batch)
        return extents

    # -- validation -----------------------------------------------------------------------------
    def _check(self, q, k, v) -> None:
        bound = self.compiled.bound
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise AttncError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise AttncError(f"{name} must have 4 dimensions [batch, heads, tokens, head_dim], "
                                 f"got shape {tuple(t.shape)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise AttncError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not q.dtype.is_floating_point:
            raise AttncError(f"q, k and v must be floating point, got {q.dtype}")
        if not (q.device == k.device == v.device):
            raise AttncError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
        B, Hq, Nq, D = q.shape
        expect_k = (B, "Hkv", bound.nk, D)
        if k.shape[0] != B or k.shape[2] != bound.nk or k.shape[3] != D:
            raise AttncError(f"k has shape {tuple(k.shape)}; expected [{', '.join(map(str, expect_k))}] "
                             f"(batch and head_dim of q, {bound.nk} keys for {self._sizes()})")
        if v.shape[:3] != k.shape[:3]:
            raise AttncError(f"v has shape {tuple(v.shape)}; expected [{k.shape[0]}, {k.shape[1]}, {k.shape[2]}, Dv] "
                             "(batch, heads and tokens of k)")
        if Nq != bound.nq:
            raise AttncError(f"q has {Nq} tokens (dim 2) but {self._sizes()} gives {bound.nq} queries")
        Hkv = k.shape[1]
        if Hkv == 0 or Hq % Hkv:
            raise AttncError(f"q has {Hq} heads and k has {Hkv}; the q heads must be a multiple of the kv heads")
        if min(B, Hq, D, v.shape[3]) == 0:
            raise AttncError(f"empty dimension in q {tuple(q.shape)} or v {tuple(v.shape)}")
        if self.backend == "triton":
            if q.dtype not in _TRITON_DTYPES:
                raise AttncError(f"the triton backend supports float16, bfloat16 and float32, got {q.dtype}",
                                 hint="use backend='reference' for float64")
            if max(D, v.shape[3]) > MAX_HEAD_DIM:
                raise AttncError(f"head_dim {max(D, v.shape[3])} exceeds the supported {MAX_HEAD_DIM}")
            from .settings import settings

            interpret = settings().interpret
            if q.device.type == "cpu" and not interpret:
                raise AttncError("CPU tensors need Triton's interpreter, but this process runs native kernels",
                                 hint="set TRITON_INTERPRET=1 before starting Python, move the tensors to CUDA, "
                                      "or use backend='reference'")
            if q.device.type != "cpu" and interpret:
                raise AttncError(f"tensors on {q.device} cannot run in Triton's interpreter mode",
                                 hint="unset TRITON_INTERPRET, or pass CPU tensors")
            if q.device.type == "cpu" and q.dtype == torch.bfloat16:
                raise AttncError("Triton's interpreter has no bfloat16; use float16 or float32 on CPU")

    def _sizes(self) -> str:
        return f"'{self.ir.name}' with {self.compiled.bound.describe()}"


def _fits_int32(dtype: torch.dtype) -> bool:
    if dtype == torch.bool:
        return True
    info = torch.iinfo(dtype)
    return info.min >= -(2**31) and info.max < 2**31
