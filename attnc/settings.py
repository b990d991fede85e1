"""Process-wide settings, read from the environment in one place.

Whether kernels run through Triton's interpreter is decided once, when attnc is imported
(`decide_interpret`), so that Triton, imported later by attnc or by anyone else, agrees with it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import AttncError


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    interpret: bool  # run Triton kernels through the interpreter (CPU tensors)

    @staticmethod
    def from_env() -> "Settings":
        cache = os.environ.get("ATTNC_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attnc"
        )
        return Settings(cache_dir=Path(cache), interpret=decide_interpret())


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


_settings: Settings | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


# -- interpreter mode ---------------------------------------------------------------------------
_interpret: bool | None = None
_mode_lock = threading.Lock()
_conflict: str | None = None  # why interpreted launches cannot work in this process, if they cannot


def decide_interpret() -> bool:
    """Interpreter or native kernels, decided once per process: TRITON_INTERPRET when set, else
    the interpreter exactly when there is no CUDA. In interpreter mode, Triton is told so."""
    global _interpret
    if _interpret is None:
        with _mode_lock:
            if _interpret is None:
                flag = os.environ.get("TRITON_INTERPRET")
                if flag is None:
                    interpret = not _cuda_available()
                else:
                    interpret = flag.strip().lower() in ("1", "true", "yes", "on")
                if interpret:
                    _enter_interpreter()
                _interpret = interpret
    return _interpret


def _enter_interpreter() -> None:
    global _conflict
    # Triton reads TRITON_INTERPRET in triton.jit, each time a function is decorated (os.getenv
    # in 3.2, knobs.runtime.interpret in 3.6 and 3.9), so also when triton.language decorates
    # its own helpers on import.
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" not in sys.modules:
        return
    # Triton came first, perhaps in compiled mode (torch._inductor and FlexAttention import it).
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        knobs = getattr(triton, "knobs", None)
        if knobs is not None and hasattr(knobs.runtime, "interpret"):
            knobs.runtime.interpret = True  # also overrides an explicit False set in Python
    except (ImportError, AttributeError) as exc:  # pragma: no cover - a Triton we do not know
        _conflict = f"Triton was imported before attnc and could not be switched to its interpreter ({exc})"
        return
    _interpret_compiled_helpers(JITFunction, InterpretedFunction)


def _interpret_compiled_helpers(JITFunction, InterpretedFunction) -> None:
    """If Triton was imported in compiled mode, tl.zeros, tl.sum, tl.cdiv... are JITFunctions,
    which refuse to be called (JITFunction.__call__ in triton/runtime/jit.py: "Cannot call
    @triton.jit'd outside of the scope of a kernel"), while an interpreted kernel calls them as
    Python functions. Call them the way Triton would have built them under TRITON_INTERPRET=1;
    in interpreter mode no JITFunction is launched natively, so nothing else is affected."""
    if getattr(JITFunction.__call__, "_attnc_interpreted", False):
        return
    interpreted: dict = {}

    def __call__(self, *args, **kwargs):
        fn = interpreted.get(self.fn)
        if fn is None:
            fn = interpreted[self.fn] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    __call__._attnc_interpreted = True
    JITFunction.__call__ = __call__


# Triton's interpreter is not reentrant across threads: a launch patches triton.language's
# builtins and restores them when it ends (_patch_lang / _LangPatchScope in
# triton/runtime/interpreter.py), and the program id lives in one global InterpreterBuilder
# (set_grid_idx). Two concurrent launches see each other's patches and program ids.
_launch_lock = threading.RLock()


def launch_guard():
    """Context for one kernel launch: serialised under the interpreter, free on native runs."""
    if not decide_interpret():
        return contextlib.nullcontext()
    if _conflict is not None:
        raise AttncError(_conflict, hint="import attnc before anything that imports Triton (torch._inductor, "
                                         "FlexAttention), or set TRITON_INTERPRET=1 before starting Python")
    return _launch_lock
