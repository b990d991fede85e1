"""The training benchmark's cases (bench/training.py): each an attnc spec at a GPU size and a smoke
size, its mask written independently as a FlexAttention mask_mod, the exact count of its visible
pairs, and the inputs every system of the case is given.

The mask_mods are written from the specs' definitions (the 2-D neighborhood is bench/cases.py's),
not from attnc's code, and use only elementwise torch ops, so one function serves Flex, the
chunked pair count and SDPA's dense mask. No torch at module level: the child process imports it
once TRITON_INTERPRET is set, and passes it in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.cases import NATTEN2D, document_lengths

SYSTEMS = ("attnc", "flex", "sdpa")
LABEL = {"attnc": "attnc", "flex": "FlexAttention", "sdpa": "SDPA"}
MODES = ("fwd", "fwd_bwd")
MODE_LABEL = {"fwd": "forward", "fwd_bwd": "forward+backward"}
BWD_FACTOR = 2.5  # backward FLOPs = 2.5 x forward (FlashAttention's convention: 5 matmuls vs 2)
RESERVED = ("batch", "heads", "dim", "mean_doc")  # case parameters that are not the spec's


# -- cases ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    title: str
    spec: str  # file under specs/
    kind: str  # causal | window | natten | document | alibi | softcap_sink | sigmoid
    gpu: dict  # spec parameters plus batch, heads, dim (and mean_doc): the benchmarked size
    smoke: dict  # the same at 128-256 tokens, for --smoke


CASES = [
    Case("causal_8k", "causal, N = 8,192", "causal.attn", "causal",
         {"N": 8192, "batch": 2, "heads": 16, "dim": 128}, {"N": 128, "batch": 1, "heads": 2, "dim": 32}),
    Case("causal_16k", "causal, N = 16,384", "causal.attn", "causal",
         {"N": 16384, "batch": 1, "heads": 16, "dim": 128}, {"N": 256, "batch": 1, "heads": 2, "dim": 32}),
    Case("sliding_window", "causal sliding window W = 1,024, N = 16,384", "sliding_window.attn", "window",
         {"N": 16384, "W": 1024, "batch": 2, "heads": 16, "dim": 64},
         {"N": 256, "W": 64, "batch": 1, "heads": 2, "dim": 32}),
    Case("natten2d_7x7", "2-D 7×7 neighborhood on 128 × 128", "natten2d.attn", "natten",
         {"H": 128, "W": 128, "kernel": 7, "dilation": 1, "batch": 2, "heads": 16, "dim": 64},
         {"H": 16, "W": 16, "kernel": 7, "dilation": 1, "batch": 1, "heads": 2, "dim": 32}),
    Case("document_causal", "document-causal, packed docs (log-normal, mean 2,048), N = 16,384",
         "document_causal.attn", "document",
         {"N": 16384, "mean_doc": 2048, "batch": 2, "heads": 16, "dim": 128},
         {"N": 256, "mean_doc": 48, "batch": 1, "heads": 2, "dim": 32}),
    Case("alibi_causal", "ALiBi causal (slopes table, with its gradient), N = 8,192", "alibi_causal.attn", "alibi",
         {"N": 8192, "batch": 2, "heads": 16, "dim": 128}, {"N": 128, "batch": 1, "heads": 2, "dim": 32}),
    Case("softcap_sink", "soft-cap 50 + sinks on a window W = 1,024, N = 8,192", "softcap_sink.attn", "softcap_sink",
         {"N": 8192, "W": 1024, "cap": 50.0, "batch": 2, "heads": 16, "dim": 128},
         {"N": 192, "W": 64, "cap": 50.0, "batch": 1, "heads": 2, "dim": 32}),
    Case("sigmoid_causal", "sigmoid causal (FlashSigmoid), N = 8,192", "sigmoid_causal.attn", "sigmoid",
         {"N": 8192, "batch": 2, "heads": 16, "dim": 128}, {"N": 128, "batch": 1, "heads": 2, "dim": 32}),
]
BY_NAME = {c.name: c for c in CASES}

# Why a peer does not run a case at all (not expressible), shown as "skipped".
NOT_EXPRESSIBLE = {
    ("flex", "sigmoid"): "sigmoid attention has no row normalisation; FlexAttention always normalises with a "
                         "softmax over the visible keys, and a score_mod only changes the logits before it",
    ("sdpa", "sigmoid"): "SDPA computes softmax attention only",
    ("sdpa", "softcap_sink"): "soft-capping is a nonlinear function of the logits and a sink needs the row "
                              "logsumexp; SDPA takes only an additive mask and returns no logsumexp",
}


def spec_params(p: dict) -> dict:
    return {k: v for k, v in p.items() if k not in RESERVED}


def n_tokens(case: Case, p: dict) -> int:
    return p["H"] * p["W"] if case.kind == "natten" else p["N"]


def doc_lengths(p: dict):
    return document_lengths(p["N"], p["mean_doc"])


def closed_form_pairs(case: Case, p: dict) -> int:
    """Visible (query, key) pairs per (batch, head), from each pattern's closed form."""
    n = n_tokens(case, p)
    if case.kind in ("window", "softcap_sink"):  # sum over i of min(i + 1, W)
        w = min(p["W"], n)
        return w * (w + 1) // 2 + (n - w) * w
    if case.kind == "natten":  # shifted inward at the borders: every query sees kernel^2 keys
        return NATTEN2D.pairs(spec_params(p))
    if case.kind == "document":
        lengths = doc_lengths(p)
        return int((lengths * (lengths + 1) // 2).sum())
    return n * (n + 1) // 2  # causal, alibi, sigmoid


def mask_mod_for(case: Case, p: dict, doc=None):
    """The case's mask as a FlexAttention mask_mod, written from the spec's definition. Elementwise
    torch ops only, so it also evaluates on broadcast index tensors (pair counts, SDPA's mask)."""
    if case.kind == "natten":
        return NATTEN2D.mask_mod(spec_params(p))  # bench/cases.py: NATTEN's window, from DESIGN.md §3
    if case.kind in ("window", "softcap_sink"):
        w = p["W"]

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

        return sliding
    if case.kind == "document":
        def document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

        return document_causal

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return causal


# -- inputs --------------------------------------------------------------------------------------
def make_inputs(torch, case: Case, p: dict, device, dtype):
    """q, k, v and the backward's dout [B, H, N, D] (seeded, so every system and every process of a
    case gets the same), the float tables attnc differentiates, the integer tensors it reads, and a
    summary of the documents (None unless the case has them)."""
    n, B, H, D = n_tokens(case, p), p["batch"], p["heads"], p["dim"]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt)

    q, k, v, dout = (randn(B, H, n, D) for _ in range(4))
    tables, ints, documents = {}, {}, None  # float tables and integer tensors, as attnc names them
    if case.kind == "alibi":
        tables["slopes"] = 2.0 ** (-8.0 * torch.arange(1, H + 1, device=device, dtype=torch.float32) / H)
    if case.kind == "softcap_sink":
        tables["sinks"] = randn(H, dt=torch.float32)
    if case.kind == "document":
        lengths = doc_lengths(p)
        ints["doc"] = torch.from_numpy(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)).to(device)
        documents = {"count": len(lengths), "min": int(lengths.min()), "max": int(lengths.max())}
    return (q, k, v, dout), tables, ints, documents


def mask_mod_count(torch, mask_mod, n: int, device) -> int:
    """Visible pairs per (batch, head) by evaluating the mask_mod on the device, in row chunks."""
    idx = torch.arange(n, device=device)
    rows, counted = max(1, (1 << 24) // n), 0
    for s in range(0, n, rows):
        counted += int(mask_mod(0, 0, idx[s:s + rows, None], idx[None, :]).sum())
    return counted
