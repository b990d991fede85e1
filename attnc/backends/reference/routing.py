"""What a `route` means (BiFormer, MoBA): the reference definition kernels will be tested against.

Tokens are partitioned into groups: `blocks(B)` on seq(N) puts token t in group t // B;
`regions(a, b)` on grid(H, W) puts (y, x) in group (y // a) * ceil(W / b) + x // b (3-D alike).
Partial groups at the end of an axis are allowed; means are over the tokens they hold.

For each batch and query head, a query *unit* (its group for `mean(q)`, itself for `q`) scores
every key group g by  mean(q over the unit) . mean(k over g)  (k of the matching kv head; no scale,
it would not change the order). Candidates are the groups holding at least one key the mask lets
some query of the unit see. With `own = true` the unit's own group (the group of the query's
position) is taken first; the remaining places go to the highest-scoring candidates, ties to the
lower group index, until `top` groups (or all candidates) are chosen. A query sees key j iff the
mask holds and j's group was chosen for its unit.
"""
from __future__ import annotations

import math

import numpy as np

from ... import limits
from ...errors import AttncError
from ...ir.bind import Bound
from ...ir.evaluate import decode, evaluate_uniform, mask_block


def group_of(bound: Bound) -> tuple[np.ndarray, int]:
    """Group index of every token (q and kv share one space), and the number of groups."""
    route = bound.ir.route
    sizes = [int(evaluate_uniform(s, bound.env)) for s in route.sizes]
    counts = [math.ceil(d / s) for d, s in zip(bound.q_dims, sizes)]
    coords = decode(bound.q_dims, bound.ir.q.axes, np.arange(bound.nq))
    group = np.zeros(bound.nq, dtype=np.int64)
    for axis, s, n in zip(bound.ir.q.axes, sizes, counts):
        group = group * n + coords[axis] // s
    return group, math.prod(counts)


def routed_mask(bound: Bound, q, k, tensors=None):
    """bool [B, Hq, Nq, Nk]: the mask and the top-k selection (see the module docstring)."""
    import torch

    route = bound.ir.route
    if route is None:
        raise AttncError(f"'{bound.ir.name}' has no route")
    limits.check_bytes("the routed mask", (q.shape[0], q.shape[1], bound.nq, bound.nk), 1,
                       limits.MAX_REFERENCE_BYTES, "MAX_REFERENCE_BYTES")
    mask = torch.from_numpy(mask_block(bound, np.arange(bound.nq), np.arange(bound.nk), tensors,
                                       what="the routed mask")).to(q.device)
    top = int(evaluate_uniform(route.top, bound.env))
    Hq, hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(Hq // hkv, dim=1) if Hq != hkv else k
    group_np, n_groups = group_of(bound)
    group = torch.from_numpy(group_np).to(q.device)  # of keys, and of queries (one space)

    def mean_over(onehot, x):  # [N, U] one-hot membership, x [B, H, N, D] -> [B, H, U, D]
        return (onehot.T @ x.to(torch.float64)) / onehot.sum(0)[:, None]

    onehot_k = torch.nn.functional.one_hot(group, n_groups).to(torch.float64)  # [Nk, G]
    k_mean = mean_over(onehot_k, kk)
    if route.query == "mean":
        unit, n_units = group, n_groups
        q_unit = mean_over(onehot_k, q)
        own = torch.arange(n_units, device=q.device)
    else:
        unit, n_units = torch.arange(bound.nq, device=q.device), bound.nq
        q_unit = q.to(torch.float64)
        own = group
    scores = q_unit @ k_mean.transpose(-1, -2)  # [B, H, U, G]
    # Candidates: the mask lets some query of the unit see some key of the group.
    seen = torch.zeros((n_units, n_groups), dtype=torch.float64, device=q.device)
    seen.index_add_(0, unit, mask.to(torch.float64) @ onehot_k)
    cand = seen > 0
    scores = scores.masked_fill(~cand, float("-inf"))
    if route.own:
        own_hot = torch.nn.functional.one_hot(own, n_groups).bool() & cand
        scores = scores.masked_fill(own_hot, float("inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n_groups, device=q.device).expand_as(order))
    chosen = (rank < top) & cand  # [B, H, U, G]
    visible = chosen[:, :, unit][..., group]  # [B, H, Nq, Nk]
    return visible & mask

