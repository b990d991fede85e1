"""Sizes that cannot run are refused before anything is allocated or evaluated (attnc/limits.py),
quickly, with a message that names the limit and the size asked for. Limits that today's
defaults cannot reach on their own are lowered here to exercise their check."""
from __future__ import annotations

import time

import pytest
import torch

import attnc
from attnc import AttncError, limits

CAUSAL = "attention causal(N) { q, kv = seq(N)\n mask = causal }"
CROSS = "attention cross(M, N) { q = seq(M)\n kv = seq(N)\n mask = k.i <= q.i }"


def _refused(make, *fragments):
    start = time.perf_counter()
    with pytest.raises(AttncError) as info:
        make()
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"took {elapsed:.1f} s"
    for f in fragments:
        assert f in info.value.message, info.value.message
    return info.value


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_token_arrays_near_int32(backend):
    _refused(lambda: attnc.compile(CAUSAL, backend=backend, N=2**31 - 1),
             "token arrays", "16 GiB for [2147483647]", "the limit is 4 GiB", "MAX_TOKEN_ARRAY_BYTES")


def test_tile_analysis_is_not_limited_by_pairs():
    # Symbolic analysis never evaluates pairs: 1.1e12 of them is no obstacle.
    fn = attnc.compile(CAUSAL, N=2**20)
    assert fn.schedule.tiles_full + fn.schedule.tiles_partial == 16384 * 16385 // 2


def test_tile_map_memory(monkeypatch):
    monkeypatch.setattr(limits, "MAX_TILE_MAP_BYTES", 1 << 20)
    _refused(lambda: attnc.compile(CAUSAL, tiles=(16, 16), N=2**15),
             "tile lists would allocate 40 MiB for 2.1e6 kept tiles of [2048, 2048]", "the limit is 1 MiB",
             "MAX_TILE_MAP_BYTES")


def test_tile_count(monkeypatch):
    monkeypatch.setattr(limits, "MAX_TILES", 1000)
    _refused(lambda: attnc.compile(CAUSAL, tiles=(16, 16), N=1024),
             "schedule would keep 2080 tiles of [64, 64]", "the limit is 1000", "MAX_TILES")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dense_mask(backend, monkeypatch):
    if backend == "triton":  # the analysis itself would refuse 2**17 x 2**17 pairs first
        monkeypatch.setattr(limits, "MAX_DENSE_MASK_BYTES", 1 << 20)
        fn = attnc.compile(CROSS, tiles=(64, 64), M=1024, N=2048)
        _refused(fn.mask, "fn.mask() would allocate 2 MiB for [1024, 2048]", "the limit is 1 MiB",
                 "MAX_DENSE_MASK_BYTES")
        return
    fn = attnc.compile(CAUSAL, backend="reference", N=2**17)
    _refused(fn.mask, "fn.mask() would allocate 16 GiB for [131072, 131072]", "the limit is 4 GiB",
             "MAX_DENSE_MASK_BYTES")


def test_reference_dense_scores():
    fn = attnc.compile(CAUSAL, backend="reference", N=2**15)
    x = torch.zeros(1, 1, 1, 8, dtype=torch.float64).expand(4, 8, 2**15, 8)  # no memory behind it
    _refused(lambda: fn(x, x, x), "the reference backend's dense scores would allocate 256 GiB for "
             "[4, 8, 32768, 32768]", "the limit is 4 GiB", "MAX_REFERENCE_BYTES")


def test_reference_dense_mask(monkeypatch):
    monkeypatch.setattr(limits, "MAX_DENSE_MASK_BYTES", 1 << 10)
    fn = attnc.compile(CAUSAL, backend="reference", N=64)
    x = torch.zeros(1, 1, 64, 8, dtype=torch.float64)
    _refused(lambda: fn(x, x, x), "the reference backend's dense mask would allocate 4 KiB for [64, 64]",
             "MAX_DENSE_MASK_BYTES")


def test_routed_mask(monkeypatch):
    monkeypatch.setattr(limits, "MAX_REFERENCE_BYTES", 1 << 10)
    src = "attention moba(N, B = 8, K = 2) { q, kv = seq(N)\n mask = causal\n route = top(K) of blocks(B) by q @ mean(k) }"
    fn = attnc.compile(src, backend="reference", N=64)
    x = torch.zeros(1, 2, 64, 8, dtype=torch.float64)
    _refused(lambda: fn.routed_mask(x, x), "the routed mask would allocate 8 KiB for [1, 2, 64, 64]",
             "MAX_REFERENCE_BYTES")


def test_bias_table_scan(monkeypatch):
    monkeypatch.setattr(limits, "MAX_ANALYSED_PAIRS", 10_000)
    src = "attention a(N) { q, kv = seq(N)\n mask = k.i <= q.i\n bias = tab[q.i - k.i] }"
    fn = attnc.compile(src, backend="reference", N=64)
    x = torch.zeros(1, 4, 64, 8, dtype=torch.float64)
    _refused(lambda: fn(x, x, x, tab=torch.zeros(64, dtype=torch.float64)),
             "would evaluate 16384 (head, query, key) triples", "the limit is 10000", "MAX_ANALYSED_PAIRS")


def test_limits_are_named_constants():
    for name in ("MAX_TOKENS", "MAX_HEADS", "MAX_TOKEN_ARRAY_BYTES", "MAX_ANALYSED_PAIRS", "MAX_TILE_MAP_BYTES",
                 "MAX_TILES", "MAX_DENSE_MASK_BYTES", "MAX_REFERENCE_BYTES", "MAX_FLOAT"):
        assert isinstance(getattr(limits, name), (int, float))
    # Sizes below every limit still compile and run.
    fn = attnc.compile(CAUSAL, tiles=(16, 16), N=64)
    assert fn.mask().shape == (64, 64)
