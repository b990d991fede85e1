"""Independent definitions of the spec files' patterns, written from the papers' formulas in
plain Python/numpy, sharing no code with attnc. They are the oracles the compiler is tested against.
"""
from __future__ import annotations

import numpy as np
import torch


def natten_window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's original window start (odd kernel, stride 1), in original coordinates."""
    half = kernel // 2
    if dilation <= 1:
        start = max(index - half, 0)
        if index + half >= length:
            start += length - index - half - 1
        return start
    ni = index - half * dilation
    if ni < 0:
        return index % dilation
    if index + half * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * half * dilation
        return a + imodd - kernel * dilation
    return ni


def natten_1d_keys(index: int, length: int, kernel: int, dilation: int) -> set[int]:
    start = natten_window_start(index, length, kernel, dilation)
    return {start + m * dilation for m in range(kernel)}


def natten2d_mask(H: int, W: int, kernel: int, dilation: int) -> np.ndarray:
    mask = np.zeros((H * W, H * W), dtype=bool)
    for y in range(H):
        ys = natten_1d_keys(y, H, kernel, dilation)
        for x in range(W):
            xs = natten_1d_keys(x, W, kernel, dilation)
            for ky in ys:
                for kx in xs:
                    mask[y * W + x, ky * W + kx] = True
    return mask


def causal_mask(M: int, N: int) -> np.ndarray:
    """Bottom-right aligned: key j visible to query i iff j <= i + N - M."""
    i = np.arange(M)[:, None]
    j = np.arange(N)[None, :]
    return j <= i + (N - M)


def sliding_window_mask(N: int, W: int) -> np.ndarray:
    i = np.arange(N)[:, None]
    j = np.arange(N)[None, :]
    return (i - W < j) & (j <= i)


def longformer_mask(N: int, W: int, G: int) -> np.ndarray:
    i = np.arange(N)[:, None]
    j = np.arange(N)[None, :]
    return (np.abs(i - j) <= W) | (i < G) | (j < G)


def attention(q, k, v, mask: np.ndarray, scale: float | None = None) -> torch.Tensor:
    """Masked softmax attention in float64, looping over rows; fully masked rows give 0."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    m = torch.from_numpy(mask)
    for row in range(q.shape[2]):
        keys = m[row].nonzero().flatten()
        if len(keys) == 0:
            continue
        s = torch.einsum("bhd,bhnd->bhn", q[:, :, row], k[:, :, keys]) * scale
        out[:, :, row] = torch.einsum("bhn,bhnd->bhd", torch.softmax(s, -1), v[:, :, keys])
    return out


def gna_1d_keys(i: int, n: int, k: int, d: int, s: int, causal: bool) -> set[int]:
    """Keys of query i along one axis (GNA: NATTEN with stride), looping in original coordinates."""
    group = [x for x in range(n) if x % d == i % d]   # dilation group, in order
    pos = group.index(i)
    if causal:
        leader = min((pos // s) * s + s - 1, len(group) - 1)
        return {group[p] for p in range(max(leader - k + 1, 0), pos + 1)}
    leader = min((pos // s) * s + s // 2, len(group) - 1)
    start = leader - k // 2
    start = max(0, min(start, len(group) - k))  # shift the window inward at the borders
    return {group[p] for p in range(start, start + k)}


def gna_mask(dims, kernel, dilation, stride, causal) -> np.ndarray:
    """AND of the per-axis neighborhoods on a row-major grid of any rank."""
    import itertools

    coords = list(itertools.product(*(range(n) for n in dims)))
    per_axis = [
        {x: gna_1d_keys(x, n, k, d, s, c) for x in range(n)}
        for n, k, d, s, c in zip(dims, kernel, dilation, stride, causal)
    ]
    mask = np.zeros((len(coords), len(coords)), dtype=bool)
    for a, qc in enumerate(coords):
        for b, kc in enumerate(coords):
            mask[a, b] = all(kc[ax] in per_axis[ax][qc[ax]] for ax in range(len(dims)))
    return mask


def streaming_sink_mask(N: int, W: int, S: int) -> np.ndarray:
    i = np.arange(N)[:, None]
    j = np.arange(N)[None, :]
    return (j <= i) & ((j < S) | (i - j < W))


def swin_shifted_mask(H: int, W: int, M: int, s: int) -> np.ndarray:
    """Swin's own construction: roll the image by -s, partition into M x M windows, and mask
    pairs from different regions of the rolled image (the attn_mask of SwinTransformerBlock)."""
    img = np.zeros((H, W), dtype=np.int64)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img[hs, ws] = cnt
            cnt += 1
    # Position (a, b) of the rolled image holds original token ((a + s) % H, (b + s) % W).
    mask = np.zeros((H * W, H * W), dtype=bool)
    for a1 in range(H):
        for b1 in range(W):
            for a2 in range(H):
                for b2 in range(W):
                    if a1 // M == a2 // M and b1 // M == b2 // M and img[a1, b1] == img[a2, b2]:
                        t1 = ((a1 + s) % H) * W + (b1 + s) % W
                        t2 = ((a2 + s) % H) * W + (b2 + s) % W
                        mask[t1, t2] = True
    return mask


def maxvit_grid_mask(H: int, W: int, G: int) -> np.ndarray:
    """MaxViT grid attention: split into G x G cells of size (H/G, W/G); token (y, x) sits at
    offset (y mod H/G, x mod W/G) in its cell; equal offsets attend to each other."""
    ch, cw = H // G, W // G
    offset = [(y % ch, x % cw) for y in range(H) for x in range(W)]
    return np.array([[a == b for b in offset] for a in offset], dtype=bool)


def sigmoid_attention(q, k, v, mask: np.ndarray, bias: float) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    return (1 / (1 + torch.exp(-s)) * torch.from_numpy(mask)) @ v


def softplus_attention(q, k, v, mask: np.ndarray) -> torch.Tensor:
    """LSSA: softplus(log(n_visible)/sqrt(d) * q.k), l1-normalised over visible keys."""
    q, k, v = q.double(), k.double(), v.double()
    m = torch.from_numpy(mask)
    n_vis = m.sum(-1, keepdim=True).double()
    c = torch.log(n_vis.clamp(min=1)) / q.shape[-1] ** 0.5
    w = torch.log1p(torch.exp(c * (q @ k.transpose(-1, -2)))) * m
    return w @ v / w.sum(-1, keepdim=True).clamp(min=1e-300)


def document_causal_mask(doc: np.ndarray) -> np.ndarray:
    """Packed documents: same document id and j <= i."""
    n = len(doc)
    return np.array([[doc[i] == doc[j] and j <= i for j in range(n)] for i in range(n)], dtype=bool)


def scale_dit_mask(H: int, W: int, radius: int = 8) -> np.ndarray:
    """Scale-DiT: keys are the H x W grid (plain radius, clipped at borders) then the
    (H/4) x (W/4) grid, all visible."""
    hi = np.zeros((H * W, H * W), dtype=bool)
    for a in range(H * W):
        for b in range(H * W):
            hi[a, b] = abs(a // W - b // W) <= radius and abs(a % W - b % W) <= radius
    lo = np.ones((H * W, (H // 4) * (W // 4)), dtype=bool)
    return np.concatenate([hi, lo], axis=1)


def modified_attention(q, k, v, mask: np.ndarray, bias=None, softcap=None, sink=None) -> torch.Tensor:
    """Softmax attention, row by row, with an additive logit bias [heads, Nq, Nk], Gemma-2's
    soft-cap and gpt-oss's sink (an extra logit per head whose value vector is zero)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    m = torch.from_numpy(mask)
    for row in range(q.shape[2]):
        keys = m[row].nonzero().flatten()
        s = torch.einsum("bhd,bhnd->bhn", q[:, :, row], k[:, :, keys]) / q.shape[-1] ** 0.5
        if bias is not None:
            s = s + bias[:, row, keys].double()[None]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if sink is not None:
            s = torch.cat([s, sink.double()[None, :, None].expand(s.shape[0], -1, 1)], dim=-1)
        if s.shape[-1] == 0:
            continue
        w = torch.softmax(s, -1)
        if sink is not None:
            w = w[..., :-1]
        out[:, :, row] = torch.einsum("bhn,bhnd->bhd", w, v[:, :, keys])
    return out


def swin_window_attention(q, k, v, H: int, W: int, M: int, shift: int, table) -> torch.Tensor:
    """Swin's shifted-window attention as its code does it: roll by -shift, cut M x M windows,
    add the relative position bias B[relative_position_index] and the region mask, attend, roll
    back. table: [heads, 2M - 1, 2M - 1] (Swin's [(2M-1)^2, heads] table, reshaped)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hh, N, D = q.shape

    def windows(x):  # [B, H, N, C] -> [B, H, nW, M*M, C] after the cyclic shift
        x = x.reshape(B, Hh, H, W, -1).roll((-shift, -shift), dims=(2, 3))
        x = x.reshape(B, Hh, H // M, M, W // M, M, -1).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, Hh, (H // M) * (W // M), M * M, -1)

    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (M - 1)
    index = rel[..., 0] * (2 * M - 1) + rel[..., 1]  # relative_position_index
    bias = table.double().reshape(Hh, -1)[:, index]  # [heads, M*M, M*M]
    img = torch.zeros(H, W)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -shift), slice(-shift, None)):
        for ws in (slice(0, -M), slice(-M, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    regions = img.reshape(H // M, M, W // M, M).permute(0, 2, 1, 3).reshape(-1, M * M)
    same = regions[:, :, None] == regions[:, None, :]  # [nW, M*M, M*M]
    s = windows(q) @ windows(k).transpose(-1, -2) / D ** 0.5 + bias[None, :, None]
    s = s.masked_fill(~same[None, None], float("-inf"))
    o = torch.softmax(s, -1) @ windows(v)
    o = o.reshape(B, Hh, H // M, W // M, M, M, -1).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, Hh, H, W, -1)
    return o.roll((shift, shift), dims=(2, 3)).reshape(B, Hh, N, -1)


def biformer_attention(q, k, v, H: int, W: int, R: int, topk: int) -> torch.Tensor:
    """BiFormer's bi-level routing attention per head: mean-pool q and k over R x R regions,
    route each region to its top-k regions by the pooled affinity (torch.topk), gather their
    tokens and attend. H and W multiples of R."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hh, N, D = q.shape
    S = (H // R) * (W // R)

    def regions(x):  # [B, H, N, C] -> [B, H, S, R*R, C]
        x = x.reshape(B, Hh, H // R, R, W // R, R, -1).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, Hh, S, R * R, -1)

    qr, kr, vr = regions(q), regions(k), regions(v)
    affinity = qr.mean(3) @ kr.mean(3).transpose(-1, -2)  # [B, H, S, S]
    idx = torch.topk(affinity, topk, dim=-1).indices  # [B, H, S, topk]
    out = torch.zeros(B, Hh, S, R * R, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hh):
            for r in range(S):
                keys = kr[b, h, idx[b, h, r]].reshape(-1, D)
                vals = vr[b, h, idx[b, h, r]].reshape(-1, v.shape[-1])
                out[b, h, r] = torch.softmax(qr[b, h, r] @ keys.T / D ** 0.5, -1) @ vals
    out = out.reshape(B, Hh, H // R, W // R, R, R, -1).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(B, Hh, N, -1)


def moba_attention(q, k, v, block: int, topk: int) -> torch.Tensor:
    """MoBA, per query: gate s_b = q . mean(k of block b); future blocks get -inf, the current
    block +inf (always selected); keep the top-k blocks; causal attention over their keys."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hh, N, D = q.shape
    n_blocks = -(-N // block)
    out = torch.zeros(B, Hh, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hh):
            means = torch.stack([k[b, h, j * block:(j + 1) * block].mean(0) for j in range(n_blocks)])
            for i in range(N):
                gate = means @ q[b, h, i]
                cur = i // block
                gate[cur + 1:] = float("-inf")
                gate[cur] = float("inf")
                chosen = torch.topk(gate, min(topk, cur + 1)).indices.tolist()
                keys = [j for c in chosen for j in range(c * block, min((c + 1) * block, i + 1))]
                s = k[b, h, keys] @ q[b, h, i] / D ** 0.5
                out[b, h, i] = torch.softmax(s, -1) @ v[b, h, keys]
    return out
