"""attnc: a compiler for attention patterns.

    >>> import attnc
    >>> fn = attnc.compile("specs/causal.attn", N=64)        # doctest: +SKIP
    >>> out = fn(q, k, v)                                      # doctest: +SKIP
"""
from .version import __version__  # noqa: E402,F401

from .settings import decide_interpret  # noqa: E402

decide_interpret()  # before anything of attnc imports Triton, so that Triton agrees with it

from .errors import AttncError  # noqa: E402
from .pipeline import Spec, parse  # noqa: E402
from .runtime import AttentionFn, compile  # noqa: E402
from .module import Attention  # noqa: E402
from . import natten  # noqa: E402  (NATTEN-compatible na1d / na2d / na3d)

__all__ = ["Attention", "AttncError", "AttentionFn", "Spec", "compile", "natten", "parse", "__version__"]
