"""The Triton path as torch custom ops: `attnc::attention` and `attnc::attention_backward`, each
with a fake (meta) implementation, and the autograd formula that connects them.

torch.compile sees two opaque ops with known output shapes, so a model that calls a compiled
spec traces without a graph break, and shapes may be symbolic (the batch size, say). The ops
find their callable through an integer handle: a spec and its binding are not tensors.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Optional

import torch

from ...errors import AttncError

_handles = itertools.count(1)
_registry: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def register(fn) -> int:
    """A handle for `fn` (an AttentionFn) that the ops accept; the registry holds it weakly."""
    with _lock:
        handle = next(_handles)
        _registry[handle] = fn
    return handle


def _fn(handle: int):
    fn = _registry.get(handle)
    if fn is None:
        raise AttncError(f"the compiled attention (handle {handle}) no longer exists",
                         hint="keep the object attnc.compile returned alive while a model uses it")
    return fn


@torch.library.custom_op("attnc::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor], handle: int,
              kernel_order: bool, checked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out and the row statistic (see launch.forward). `checked`: the caller validated the
    inputs already (eager calls do; a traced call checks here, with real tensors)."""
    from .launch import forward

    fn = _fn(handle)
    named = fn._named(tensors)
    if not checked:
        fn._check(q, k, v)
        named = fn._check_tensors(named, heads=q.shape[1], device=q.device, batch=q.shape[0])
    return forward(fn.compiled, fn._host, q, k, v, named, kernel_order)


@attention.register_fake
def _(q, k, v, tensors, handle, kernel_order, checked):
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, Nq, v.shape[3])), q.new_empty((B, Hq, Nq), dtype=torch.float32)


@torch.library.custom_op("attnc::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, dstat: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, stat: torch.Tensor, tensors: list[torch.Tensor],
                       handle: int, kernel_order: bool, wanted: list[bool]) -> list[torch.Tensor]:
    """[dq, dk, dv, then per runtime tensor its gradient], contiguous, each where `wanted`
    ([q, k, v, *tensors]) asks for it and an empty tensor elsewhere (integer tensors included)."""
    from .backward import backward

    fn = _fn(handle)
    named = fn._named(tensors)
    want = {name for name, w in zip(named, wanted[3:]) if w}
    dq, dk, dv, grads = backward(fn.compiled, fn._host, q, k, v, out, stat, dout.contiguous(), dstat, named,
                                 kernel_order, want_q=wanted[0], want_kv=wanted[1] or wanted[2], want=want)
    firsts = [x.contiguous() if w and x is not None else q.new_empty(0) for x, w in zip((dq, dk, dv), wanted)]
    rest = [(grads[name].contiguous() if name in grads else torch.zeros_like(t, memory_format=torch.contiguous_format))
            if w else t.new_empty(0) for (name, t), w in zip(named.items(), wanted[3:])]
    return [*firsts, *rest]


@attention_backward.register_fake
def _(dout, dstat, q, k, v, out, stat, tensors, handle, kernel_order, wanted):
    # Contiguous, like the real outputs (compiled graphs check strides against these).
    return [x.new_empty(x.shape) if w else x.new_empty(0) for x, w in zip([q, k, v, *tensors], wanted)]


def _setup(ctx, inputs, output):
    q, k, v, tensors, handle, kernel_order, _ = inputs
    out, stat = output
    ctx.save_for_backward(q, k, v, out, stat, *tensors)
    ctx.wanted = [bool(x.requires_grad) for x in (q, k, v)] + \
        [bool(t.requires_grad and t.dtype.is_floating_point) for t in tensors]
    ctx.handle, ctx.kernel_order = handle, kernel_order
    # Keep the callable (and so its registry entry) alive until backward. Under torch.compile
    # with dynamic shapes the handle may be traced as a symbolic int: nothing to hold there.
    ctx.fn = _registry.get(handle) if isinstance(handle, int) else None


def _backward(ctx, dout, dstat):
    q, k, v, out, stat, *tensors = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    grads = attention_backward(dout, dstat, q, k, v, out, stat, tensors, ctx.handle, ctx.kernel_order, ctx.wanted)
    grads = [g if w else None for g, w in zip(grads, ctx.wanted)]
    return grads[0], grads[1], grads[2], grads[3:], None, None, None


attention.register_autograd(_backward, setup_context=_setup)


def _no_double_backward(ctx, *grads):
    raise AttncError("attnc's backward kernels are not differentiable (no double backward)",
                     hint="use backend='reference' for higher-order gradients")


def _setup_nothing(ctx, inputs, output):
    pass


attention_backward.register_autograd(_no_double_backward, setup_context=_setup_nothing)
