"""Process-wide settings, read from the environment in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    interpret: bool  # run Triton kernels through the interpreter (CPU tensors)

    @staticmethod
    def from_env() -> "Settings":
        cache = os.environ.get("ATTNC_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attnc"
        )
        flag = os.environ.get("TRITON_INTERPRET")
        if flag is None:
            interpret = not _cuda_available()
        else:
            interpret = flag.strip().lower() in ("1", "true", "yes", "on")
        return Settings(cache_dir=Path(cache), interpret=interpret)


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
        if _settings.interpret:
            # Triton reads this both when kernels are decorated and when they launch.
            os.environ["TRITON_INTERPRET"] = "1"
    return _settings
