"""attnc: a compiler for attention patterns.

    >>> import attnc
    >>> fn = attnc.compile("specs/causal.attn", N=64)        # doctest: +SKIP
    >>> out = fn(q, k, v)                                      # doctest: +SKIP
"""
__version__ = "0.1.0"

from .errors import AttncError  # noqa: E402
from .pipeline import Spec, parse  # noqa: E402
from .runtime import AttentionFn, compile  # noqa: E402

__all__ = ["AttncError", "AttentionFn", "Spec", "compile", "parse", "__version__"]
