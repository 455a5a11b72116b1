"""Test-wide set-up.

Without a GPU, Triton kernels run through its interpreter: TRITON_INTERPRET must be set before
Triton is first imported, so it is set here, before any test module imports a kernel.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _reference_backend_by_default():
    """Every test starts on the reference backend unless it selects another."""
    import nest_fast

    prev = nest_fast.get_backend()
    nest_fast.set_backend("reference")
    yield
    nest_fast.set_backend(prev)
