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
