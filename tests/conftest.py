"""Test configuration.

Without CUDA, Triton kernels run in the interpreter: ``TRITON_INTERPRET`` must be set before triton is imported,
so it is set here, before any test module imports matten_kernels. Two markers split the suite by what it needs:

- ``gpu``: checks the compiled kernels on CUDA tensors. Skipped without CUDA, and also under ``TRITON_INTERPRET=1``
  on a CUDA machine (the interpreter would run them, very slowly, on the host).
- ``interpreter``: runs Triton kernels on CPU tensors, which only the interpreter can. Skipped on a CUDA machine
  without ``TRITON_INTERPRET=1``; the ``gpu`` tests cover the same kernels there.

So the README's test command (``TRITON_INTERPRET=1 python -m pytest -q``) runs the CPU suite on any machine, and on
a GPU machine ``python -m pytest -q tests`` runs the GPU tests and every test that needs neither.
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
        marker, reason = "gpu", "needs a CUDA GPU"
    elif _interpreting():
        marker, reason = "gpu", ("TRITON_INTERPRET=1: GPU tests check the compiled kernels; run them without it "
                                 "(python -m pytest -q -m gpu tests)")
    else:
        marker, reason = "interpreter", ("runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (the README's test "
                                         "command); the gpu tests cover these kernels")
    for item in items:
        if marker in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_report_header(config):
    if torch.cuda.is_available() and not _interpreting():
        return ("CUDA machine without TRITON_INTERPRET: the GPU tests run; the CPU tests of the Triton kernels "
                "(marker interpreter) skip, run them with TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
