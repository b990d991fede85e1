"""One compiled callable called from several threads at once gives the single-threaded results."""
import sys
import threading

import pytest
import torch

import attnc

THREADS = 6

DOCS_SOFTPLUS = """attention docs_softplus(N) {
    q, kv = seq(N)
    mask  = causal and doc[q.i] == doc[k.i]
    score = softplus(scale = log(n_visible) / sqrt(head_dim))
}"""


def _inputs(n, i, device, dtype):
    g = torch.Generator().manual_seed(100 + i)
    return [torch.randn(1, 2, n, 16, generator=g, dtype=dtype).to(device) for _ in range(3)]


def _docs(n, i, device):
    # A different partition per thread, so per-call state of one thread cannot pass for another's.
    cuts = sorted({(i * 7 + 3) % n, (i * 13 + 11) % n, n // 2 + i})
    doc = torch.zeros(n, dtype=torch.int64)
    for c in cuts:
        doc[c:] += 1
    return doc.to(device)


CASES = {
    "causal": ("specs/causal.attn", {"N": 64}, lambda n, i, device: {}),
    "document_causal": ("specs/document_causal.attn", {"N": 64}, lambda n, i, device: {"doc": _docs(n, i, device)}),
    "swin_bias": ("specs/swin_bias.attn", {"H": 7, "W": 14},
                  lambda n, i, device: {"rel_bias": torch.randn(2, 13, 13, generator=torch.Generator().manual_seed(i))
                                        .to(device)}),
    # n_visible counted per call from the runtime ids: the scores are per-call state.
    "docs_softplus": (DOCS_SOFTPLUS, {"N": 64}, lambda n, i, device: {"doc": _docs(n, i, device)}),
}


@pytest.fixture
def busy_switching():
    # Switch threads every few microseconds instead of every 5 ms, so that races show up.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_concurrent_calls_match_single_threaded(case, backend, device, busy_switching):
    spec, params, extra = CASES[case]
    fn = attnc.compile(spec, backend=backend, tiles=(16, 16), **params)
    n = fn.compiled.bound.nq
    dtype = torch.float32 if backend == "triton" else torch.float64
    calls = [(_inputs(n, i, device, dtype), extra(n, i, device)) for i in range(THREADS)]
    with torch.no_grad():
        expect = [fn(*qkv, **tensors) for qkv, tensors in calls]
    assert not all(torch.equal(expect[0], e) for e in expect[1:])  # distinct inputs, distinct outputs

    got: list = [None] * THREADS
    start = threading.Barrier(THREADS)

    def work(i):
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(2):
                    qkv, tensors = calls[i]
                    got[i] = fn(*qkv, **tensors)
                    if not torch.equal(got[i], expect[i]):
                        return
        except Exception as exc:  # reported below, with the thread it came from
            got[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (g, e) in enumerate(zip(got, expect)):
        assert not isinstance(g, BaseException), f"thread {i}: {g!r}"
        assert torch.equal(g, e), f"thread {i}: max difference {(g - e).abs().max().item()}"


def test_launch_guard_serialises_only_under_the_interpreter():
    from attnc.settings import launch_guard, settings

    guard = launch_guard()
    if not settings().interpret:
        with guard:  # native launches run concurrently: no lock at all
            pass
        return
    entered = threading.Event()
    inside = []

    def other():
        with launch_guard():
            inside.append(True)
        entered.set()

    with guard:
        t = threading.Thread(target=other)
        t.start()
        assert not entered.wait(0.2) and not inside  # the second launch waits for the first
    t.join(timeout=5)
    assert inside == [True]
