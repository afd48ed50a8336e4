"""Test configuration.

Without CUDA, Triton kernels run in the interpreter: ``TRITON_INTERPRET`` must be set before triton is imported,
so it is set here, before any test module imports matten_kernels. Tests marked ``gpu`` skip without CUDA, and also
under ``TRITON_INTERPRET=1`` on a CUDA machine (they test the compiled kernels; the interpreter would run them, very
slowly, on the host), so the README's test command runs the CPU suite on any machine. On a GPU machine, the GPU tests
run with ``python -m pytest -q -m gpu tests`` (no TRITON_INTERPRET).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
    elif _interpreting():
        skip = pytest.mark.skip(reason="TRITON_INTERPRET=1: GPU tests check the compiled kernels; run them without it "
                                       "(python -m pytest -q -m gpu tests)")
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    if torch.cuda.is_available() and not _interpreting():
        return ("CUDA machine without TRITON_INTERPRET: the CPU tests of the Triton kernels need the interpreter and "
                "fail here; run `-m gpu` for the GPU tests, and the CPU suite with TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
