"""The reference backend: the spec's attention computed densely, in float64 when asked, and
differentiable through torch autograd. This is the oracle every kernel is tested against; only
tests and `backend="reference"` import it, never analysis, codegen or the Triton runtime.
"""
from __future__ import annotations

import numpy as np

from ... import limits
from ...errors import AttncError
from ...ir.bind import Bound
from ...ir.evaluate import mask_block, pair_coords, part_expr, per_batch, per_head, show
from ...ir.scores import evaluate_torch, row_scores, sink_logits, softcap_value
from ..inputs import host_ints
from .routing import routed_mask


def dense_mask(bound: Bound, tensors=None, heads: int | None = None, batch: int | None = None) -> np.ndarray:
    """bool [Nq, Nk]: the mask at every pair, row-major tokens; with `heads`, for a mask that
    reads `head`, [heads, Nq, Nk]; with `batch` too, for one that reads `batch`, [batch, heads or
    1, Nq, Nk]."""
    q, k, what = np.arange(bound.nq), np.arange(bound.nk), "the reference backend's dense mask"
    if batch is not None:
        return np.stack([np.stack([mask_block(bound, q, k, tensors, what=what, head=h, batch=b)
                                   for h in (range(heads) if heads is not None else [None])])
                         for b in range(batch)])
    if heads is None:
        return mask_block(bound, q, k, tensors, what=what)
    return np.stack([mask_block(bound, q, k, tensors, what=what, head=h) for h in range(heads)])


def check_dense(bound: Bound, batch: int, heads: int, itemsize: int) -> None:
    """Refuse, before any work, dense [B, H, Nq, Nk] tensors (scores, weights) beyond the limit."""
    limits.check_bytes("the reference backend's dense scores", (batch, heads, bound.nq, bound.nk), itemsize,
                       limits.MAX_REFERENCE_BYTES, "MAX_REFERENCE_BYTES")


def logit_bias(bound: Bound, heads: int, tensors, head_dim: int, like):
    """The logit bias as a torch tensor broadcastable to [heads, Nq, Nk] (None when absent)."""
    import torch

    e = bound.ir.score.logit_bias
    if e is None:
        return None
    head = np.arange(heads)[:, None, None]
    out = torch.zeros((heads, bound.nq, bound.nk), dtype=like.dtype, device=like.device)
    rows = np.arange(bound.nq)
    for qpart, sel_q, part, sel, coords in pair_coords(bound, rows, np.arange(bound.nk)):
        coords = {key: v[None] for key, v in coords.items()} | {("q", "head"): head}
        val = evaluate_torch(part_expr(e, part.name, qpart.name), bound, coords, tensors, head_dim, like)
        q_at = rows if sel_q is None else np.nonzero(sel_q)[0]
        k_at = np.nonzero(sel)[0]
        index = tuple(torch.from_numpy(a).to(like.device) for a in np.ix_(np.arange(heads), q_at, k_at))
        out = out.index_put(index, val.expand(heads, len(q_at), len(k_at)))  # differentiable
    return out



def _check_visible_bias(bound: Bound, bias, mask) -> None:
    """A bias that is nan or +inf where a query sees a key is an error (-inf hides the pair).
    bias: [heads, Nq, Nk]; mask: [Nq, Nk], or [B, heads, Nq, Nk] under routing."""
    import torch

    bad = (torch.isnan(bias) | (bias == float("inf"))) & mask
    if bad.any():
        h, i, j = (int(x) for x in bad.nonzero()[0][-3:])
        raise AttncError(f"the bias `{show(bound.ir.score.logit_bias)}` is {bias[h, i, j].item()} at head {h}, "
                         f"query {i}, key {j}, which the query sees")


# -- the dense reference attention ---------------------------------------------------------------
def reference_attention(bound: Bound, q, k, v, mask=None, tensors=None, return_lse: bool = False):
    """The spec's attention, densely, in the inputs' dtype (use float64 for an oracle).

    `tensors` maps runtime tensor names to torch tensors. Rows that see no key output exactly 0.
    Differentiable through torch autograd, including the float runtime tensors (bias tables).
    With return_lse (softmax only), also the logsumexp per row [B, Hq, Nq] over the visible
    logits and the sink: -inf for a row that sees nothing and has no sink.
    """
    import torch

    if return_lse and bound.ir.score.kind != "softmax":
        raise AttncError(f"return_lse needs softmax scoring; this spec scores with {bound.ir.score.kind}")
    check_dense(bound, q.shape[0], q.shape[1], q.element_size())
    tensors = tensors or {}
    host = host_ints(tensors)
    if mask is None and bound.ir.route is not None:
        mask = routed_mask(bound, q, k, host)  # [B, Hq, Nq, Nk]: routing depends on the data
    by_head = q.shape[1] if per_head(bound.ir.mask) else None
    by_batch = q.shape[0] if per_batch(bound.ir.mask) else None
    dense = dense_mask(bound, host, by_head, by_batch) if mask is None else mask.cpu().numpy()
    mask = torch.from_numpy(dense).to(q.device)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    # n_visible: per query, or under routing per (batch, head, query): the chosen keys it sees.
    counts = dense.sum(axis=-1) if bound.ir.route is not None else dense.reshape(-1, bound.nq, bound.nk)[0].sum(axis=-1)
    scale, bias = (torch.from_numpy(x).to(q.device, q.dtype)[..., None] for x in row_scores(bound, d, counts))
    s = (q @ k.transpose(-1, -2)) * scale
    extra = logit_bias(bound, hq, tensors, d, q)
    if extra is not None:
        _check_visible_bias(bound, extra, mask)
        # A bias may be nan or inf where the mask hides the pair: keep it out of everything
        # after (a soft-cap's or sigmoid's derivative there would turn a zero gradient into nan).
        s = torch.where(mask, s + extra, torch.zeros((), dtype=s.dtype, device=s.device))
    cap = softcap_value(bound, d)
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    kind = bound.ir.score.kind
    # torch.where, not a product: values at hidden pairs (inf, nan from a bias) must not leak.
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if kind == "sigmoid":
        return torch.where(mask, torch.sigmoid(s + bias), zero) @ v
    if kind == "softplus":
        p = torch.where(mask, torch.nn.functional.softplus(s), zero)
        denom = p.sum(dim=-1, keepdim=True)
    else:
        s = s.masked_fill(~mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        sink = sink_logits(bound, hq, tensors, d, q)
        if sink is not None:
            sink = sink[None, :, None, None]
            m = torch.maximum(m, sink)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
        p = torch.where(mask, torch.exp(s - m), zero)
        denom = p.sum(dim=-1, keepdim=True)
        if sink is not None:
            denom = denom + torch.exp(sink - m)
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    out = (p @ v) / safe
    if not return_lse:
        return out
    lse = torch.where(denom == 0, torch.full_like(denom, float("-inf")), m + torch.log(safe))
    return out, lse.squeeze(-1)

