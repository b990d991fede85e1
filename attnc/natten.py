"""NATTEN-compatible neighborhood attention: `na1d`, `na2d`, `na3d`.

Same tensor layout as NATTEN (`[batch, *spatial, heads, head_dim]`), same argument names and
order (`kernel_size, stride, dilation, is_causal, scale`, then `additional_keys/values`), same
semantics and the same argument checks. Each call compiles, once per shape and arguments, an
attnc spec built on the `window` builtin (whose definition follows NATTEN / GNA) and runs it.
docs/coming_from_natten.md lists what is drop-in and what differs.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from .errors import AttncError
from .runtime import AttentionFn, compile as _compile

__all__ = ["na1d", "na2d", "na3d"]

# Spec parameter names of the spatial sizes, per rank (only ever these fixed strings, plus
# integers and true/false generated from validated values, go into spec text).
_SIZES = {1: ("L",), 2: ("H", "W"), 3: ("T", "H", "W")}
_LAYOUT = {1: "[batch, seqlen, heads, head_dim]", 2: "[batch, height, width, heads, head_dim]",
           3: "[batch, depth, height, width, heads, head_dim]"}
# NATTEN's kernel selections: attnc has one kernel backend, so they all select it.
_NATTEN_BACKENDS = ("cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna")
# NATTEN's performance knobs: accepted so that NATTEN calls run unchanged; they cannot change
# results, and attnc chooses its tiles and token order itself.
_IGNORED = frozenset({"attention_kwargs", "q_tile_shape", "kv_tile_shape", "backward_q_tile_shape",
                      "backward_kv_tile_shape", "backward_kv_splits", "backward_use_pt_reduction",
                      "run_persistent_kernel", "kernel_schedule", "torch_compile"})


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, *, return_lse=False, backend=None, **natten_options):
    """1-D neighborhood attention. query [B, L, heads, D], key [B, L, heads_kv, D],
    value [B, L, heads_kv, Dv] -> [B, L, heads, Dv] (and logsumexp [B, L, heads] with
    return_lse=True). See `na2d` for the arguments."""
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale,
               additional_keys, additional_values, return_lse, backend, natten_options)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, *, return_lse=False, backend=None, **natten_options):
    """2-D neighborhood attention, NATTEN's `natten.na2d`.

    query [B, H, W, heads, D], key [B, H, W, heads_kv, D], value [B, H, W, heads_kv, Dv]
    -> [B, H, W, heads, Dv]; heads must be a multiple of heads_kv (GQA / MQA).
    kernel_size, stride, dilation: an int for every axis or a tuple with one per axis;
    kernel_size >= 2, stride in [1, kernel_size], dilation >= 1, kernel_size * dilation <= the
    axis length. is_causal: a bool or a tuple of bools. scale: defaults to D ** -0.5.
    additional_keys [B, M, heads_kv, D] / additional_values [B, M, heads_kv, Dv]: extra context
    every query also attends to (neighborhood cross-attention). return_lse: also return the
    logsumexp [B, H, W, heads] (float32). backend: None or "triton" (generated kernels),
    "reference" (the float64-exact oracle, for tests); NATTEN's backend names select "triton".
    NATTEN's tiling and scheduling options are accepted and ignored.
    """
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale,
               additional_keys, additional_values, return_lse, backend, natten_options)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, *, return_lse=False, backend=None, **natten_options):
    """3-D neighborhood attention. query [B, T, H, W, heads, D] -> [B, T, H, W, heads, Dv].
    See `na2d` for the arguments."""
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale,
               additional_keys, additional_values, return_lse, backend, natten_options)


def _na(nd, q, k, v, kernel_size, stride, dilation, is_causal, scale, add_k, add_v, return_lse, backend,
        options):
    fname = f"na{nd}d"
    unknown = sorted(set(options) - _IGNORED)
    if unknown:
        raise AttncError(f"{fname}() got an unexpected keyword argument '{unknown[0]}'")
    backend = _backend(fname, backend)
    _check_tensors(fname, nd, q, k, v)
    dims = tuple(int(n) for n in q.shape[1:1 + nd])
    kernel = _ints(fname, nd, "kernel_size", kernel_size, 2)
    strides = _ints(fname, nd, "stride", 1 if stride is None else stride, 1)  # None: 1, as in NATTEN
    dilations = _ints(fname, nd, "dilation", 1 if dilation is None else dilation, 1)
    causal = _bools(fname, nd, is_causal)
    for ax, (n, kk, s, d) in enumerate(zip(dims, kernel, strides, dilations)):
        if kk * d > n:
            raise AttncError(f"{fname}: kernel_size * dilation must not exceed the input size along any axis; "
                             f"axis {ax} has size {n} but kernel_size {kk} * dilation {d} = {kk * d}",
                             hint=f"input spatial shape {list(dims)}, kernel_size {kernel}, dilation {dilations}")
        if s > kk:
            raise AttncError(f"{fname}: stride cannot be larger than kernel_size along any axis; axis {ax} has "
                             f"stride {s} > kernel_size {kk}")
    scale = _scale(fname, scale)
    if (add_k is None) != (add_v is None):
        raise AttncError(f"{fname}: additional_keys and additional_values must both be tensors or both be None")
    if add_k is not None:
        _check_additional(fname, q, k, v, add_k, add_v)

    fn = _neighborhood(dims, kernel, strides, dilations, causal, scale, backend)
    B, heads = q.shape[0], q.shape[-2]
    # [B, *spatial, heads, D] -> [B, heads, N, D], tokens row-major: a strided view, no copy
    qf, kf, vf = (x.flatten(1, nd).transpose(1, 2) for x in (q, k, v))
    if add_k is None:
        out, lse = fn(qf, kf, vf, return_lse=True) if return_lse else (fn(qf, kf, vf), None)
    else:  # NATTEN's neighborhood cross-attention: two attentions merged by their logsumexp
        extra = _cross(qf.shape[2], add_k.shape[1], scale, backend)
        out, lse = _merge(fn(qf, kf, vf, return_lse=True),
                          extra(qf, add_k.transpose(1, 2), add_v.transpose(1, 2), return_lse=True))
    # Contiguous, as NATTEN's fused kernels return: callers may .view() the result.
    out = out.transpose(1, 2).reshape(B, *dims, heads, out.shape[-1]).contiguous()
    if not return_lse:
        return out
    return out, lse.transpose(1, 2).reshape(B, *dims, heads).contiguous()


# -- compiled specs (cached: the key holds only validated ints, bools, floats and strings) -------

def _per_axis(values: list[str]) -> str:
    return values[0] if len(values) == 1 else "(" + ", ".join(values) + ")"


def _spec_text(nd: int, causal: tuple[bool, ...], scaled: bool) -> str:
    sizes = _SIZES[nd]
    ks, ss, ds = ([f"{p}{a + 1}" for a in range(nd)] for p in "KSD")
    params = ", ".join([*sizes, *ks, *ss, *ds] + (["qk_scale = 1.0"] if scaled else []))
    space = f"seq({sizes[0]})" if nd == 1 else f"grid({', '.join(sizes)})"
    flags = _per_axis(["true" if c else "false" for c in causal])
    return (f"attention na{nd}d({params}) {{\n"
            f"    q, kv = {space}\n"
            f"    mask  = window({', '.join(ks)}, dilation = {_per_axis(ds)}, stride = {_per_axis(ss)}, "
            f"causal = {flags})\n"
            f"    score = {'softmax(scale = qk_scale)' if scaled else 'softmax'}\n"
            "}\n")


@functools.lru_cache(maxsize=128)
def _neighborhood(dims: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                  dilation: tuple[int, ...], causal: tuple[bool, ...], scale: float | None,
                  backend: str) -> AttentionFn:
    nd = len(dims)
    params = dict(zip(_SIZES[nd], dims))
    for prefix, values in (("K", kernel), ("S", stride), ("D", dilation)):
        params.update({f"{prefix}{a + 1}": val for a, val in enumerate(values)})
    if scale is not None:
        params["qk_scale"] = scale
    return _compile(_spec_text(nd, causal, scale is not None), backend=backend, **params)


@functools.lru_cache(maxsize=32)
def _cross(n: int, m: int, scale: float | None, backend: str) -> AttentionFn:
    """Every query sees every additional key (NATTEN attends the extra context non-causally)."""
    params = "N, M" + (", qk_scale = 1.0" if scale is not None else "")
    score = "softmax(scale = qk_scale)" if scale is not None else "softmax"
    text = f"attention na_additional({params}) {{\n    q = seq(N)\n    kv = seq(M)\n    score = {score}\n}}\n"
    extra = {} if scale is None else {"qk_scale": scale}
    return _compile(text, backend=backend, N=n, M=m, **extra)


def _merge(a, b):
    """Attention over the union of two disjoint key sets, from each part's output and
    logsumexp (differentiable: both parts' logsumexp carry gradients)."""
    (oa, la), (ob, lb) = a, b
    lse = torch.logaddexp(la, lb)
    wa, wb = torch.exp(la - lse).unsqueeze(-1), torch.exp(lb - lse).unsqueeze(-1)
    return (oa * wa + ob * wb).to(oa.dtype), lse


# -- argument checks (NATTEN's conditions, attnc's error type) -----------------------------------

def _backend(fname: str, backend) -> str:
    if backend is None or backend in _NATTEN_BACKENDS:
        return "triton"
    if backend in ("triton", "reference"):
        return backend
    raise AttncError(f"{fname}: unknown backend {backend!r}",
                     hint="None or 'triton' (generated kernels), 'reference' (the oracle); NATTEN's "
                          f"{', '.join(_NATTEN_BACKENDS)} select 'triton'")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _ints(fname: str, nd: int, name: str, value, least: int) -> tuple[int, ...]:
    what = f"an integer or a tuple of {nd} integers, all >= {least}"
    if _is_int(value):
        values = (int(value),) * nd
    elif isinstance(value, (tuple, list, torch.Size)) and all(_is_int(x) for x in value):
        if len(value) != nd:
            raise AttncError(f"{fname}: {name} has {len(value)} values for {nd} spatial axes", hint=f"expected {what}")
        values = tuple(int(x) for x in value)
    else:
        raise AttncError(f"{fname}: invalid {name} {value!r} ({type(value).__name__})", hint=f"expected {what}")
    if min(values) < least:
        hint = "NATTEN requires kernel_size >= 2 too" if name == "kernel_size" else None
        raise AttncError(f"{fname}: {name} must be >= {least} on every axis, got {value!r}", hint=hint)
    return values


def _bools(fname: str, nd: int, value) -> tuple[bool, ...]:
    if value is None:
        return (False,) * nd
    if isinstance(value, bool):
        return (value,) * nd
    if isinstance(value, (tuple, list)) and all(isinstance(c, bool) for c in value):
        if len(value) != nd:
            raise AttncError(f"{fname}: is_causal has {len(value)} values for {nd} spatial axes")
        return tuple(value)
    raise AttncError(f"{fname}: invalid is_causal {value!r} ({type(value).__name__})",
                     hint=f"expected a bool or a tuple of {nd} bools")


def _scale(fname: str, scale) -> float | None:
    if scale is None:
        return None  # the spec's default, 1 / sqrt(head_dim), NATTEN's default too
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(float(scale)):
        raise AttncError(f"{fname}: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _check_tensors(fname: str, nd: int, q, k, v) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise AttncError(f"{fname}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != nd + 3:
            raise AttncError(f"{fname}: {name} must be {nd + 3}-D, {_LAYOUT[nd]}, got shape {list(t.shape)}",
                             hint="NATTEN's layout puts heads after the spatial axes; na1d takes 4-D, "
                                  "na2d 5-D, na3d 6-D tensors")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttncError(f"{fname}: query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttncError(f"{fname}: query, key and value must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise AttncError(f"{fname}: query, key and value must match in batch size, got "
                         f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if not (q.shape[1:1 + nd] == k.shape[1:1 + nd] == v.shape[1:1 + nd]):
        raise AttncError(f"{fname}: query, key and value must have the same spatial shape, got "
                         f"{list(q.shape[1:1 + nd])}, {list(k.shape[1:1 + nd])}, {list(v.shape[1:1 + nd])}")
    if q.shape[-1] != k.shape[-1]:
        raise AttncError(f"{fname}: query and key head dims must match, got {q.shape[-1]} and {k.shape[-1]}")
    _check_heads(fname, q.shape[-2], k.shape[-2], v.shape[-2])


def _check_heads(fname: str, hq: int, hk: int, hv: int) -> None:
    if hk != hv:
        raise AttncError(f"{fname}: key and value must have the same number of heads, got {hk} and {hv}")
    if hk == 0 or hq % hk:
        raise AttncError(f"{fname}: key/value heads must evenly divide query heads (GQA / MQA), "
                         f"got {hq} query heads and {hk} key/value heads")


def _check_additional(fname: str, q, k, v, ak, av) -> None:
    for name, t in (("additional_keys", ak), ("additional_values", av)):
        if not isinstance(t, torch.Tensor):
            raise AttncError(f"{fname}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttncError(f"{fname}: {name} must be 4-D, [batch, tokens, heads_kv, head_dim], "
                             f"got shape {list(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise AttncError(f"{fname}: {name} must have query's dtype and device ({q.dtype}, {q.device}), "
                             f"got {t.dtype}, {t.device}")
    if not (ak.shape[0] == av.shape[0] == q.shape[0]) or ak.shape[1] != av.shape[1]:
        raise AttncError(f"{fname}: additional_keys {list(ak.shape)} and additional_values {list(av.shape)} must "
                         f"match query's batch size {q.shape[0]} and each other's token count")
    if ak.shape[1] == 0:
        raise AttncError(f"{fname}: additional_keys has no tokens")
    if ak.shape[-2:] != k.shape[-2:] or av.shape[-2:] != v.shape[-2:]:
        raise AttncError(f"{fname}: additional keys/values must match key/value in heads and head dim, got "
                         f"{list(ak.shape[-2:])} vs {list(k.shape[-2:])} and {list(av.shape[-2:])} vs "
                         f"{list(v.shape[-2:])}")
