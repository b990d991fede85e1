import os
import tempfile

# A fresh kernel cache per test session, so tests exercise generation as well as reuse.
os.environ.setdefault("ATTNC_CACHE_DIR", tempfile.mkdtemp(prefix="attnc-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


# Kernels run natively on a GPU when there is one, else through Triton's interpreter. Tests that
# hand tensors to the triton backend take them from here (the `device` fixture, or DEVICE in
# helpers), so the whole suite passes in both settings.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, where there is none."""
    if DEVICE == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
