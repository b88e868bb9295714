"""Fixtures shared by the test files."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter
# (tests/test_triton.py). Triton reads TRITON_INTERPRET when a kernel is defined, so it is set
# here, before any test module can import the kernels. It changes nothing else: only the
# Triton backend reads it (torch.compile's CPU code is C++, never Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: a second thread gains nothing there,
    and on a machine shared with benchmarks its barrier waits made those files several times
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device: skipped where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
