import os
import tempfile

# A fresh kernel cache per test session, so tests exercise generation as well as reuse.
os.environ.setdefault("ATTNC_CACHE_DIR", tempfile.mkdtemp(prefix="attnc-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    """Kernels run natively on a GPU when there is one, else through Triton's interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
