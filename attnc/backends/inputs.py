"""Call-time inputs as both backends read them on the host."""
from __future__ import annotations

import numpy as np
import torch


def host_ints(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The integer runtime tensors as int64 numpy arrays (any integer dtype or bool)."""
    return {name: t.detach().to(torch.int64).cpu().numpy() for name, t in tensors.items()
            if not t.dtype.is_floating_point}
