"""The device parametrization every device test shares (not a test module itself).

``DEVICES`` runs a test on the CPU and, marked ``cuda`` and skipped without a GPU, on CUDA;
``CUDA`` is that mark pair, for tests or parameters that need a GPU (``pytest -m cuda``).
"""

import pytest
import torch

CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def needs_cuda(test):
    """Mark a test as needing a GPU: in the ``cuda`` selection, skipped without one."""
    for mark in reversed(CUDA):
        test = mark(test)
    return test
