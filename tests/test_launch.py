"""The cached launch path's key (matten_kernels._launch): every property Triton specialises a kernel on must change
it, so a compiled kernel is never reused for arguments Triton would have compiled differently. The GPU side (the
same op through aligned and misaligned inputs) is tests/test_selective_scan_gpu.py::test_cached_launch_respects_
specialisation."""

import numpy as np
import pytest
import torch

from matten_kernels._launch import _spec


def test_key_separates_what_triton_specialises_on():
    buf = torch.zeros(64)
    assert _spec(buf) != _spec(buf[1:])  # 16-byte aligned data pointer or not
    assert _spec(buf) != _spec(buf.half())  # dtype
    assert _spec(buf[4:]) == _spec(buf[8:])  # both aligned, same dtype
    assert len({_spec(1), _spec(16), _spec(17), _spec(32)}) == 3  # == 1, divisible by 16, neither
    assert _spec(16) == _spec(32) and _spec(17) == _spec(19)
    assert _spec(2**31 + 16) != _spec(16)  # int64 vs int32
    assert _spec(True) != _spec(False) and _spec(True) != _spec(1)
    assert _spec(0.5) == _spec(2.0) and _spec(None) != _spec(0.5)


def test_key_refuses_types_it_cannot_describe():
    with pytest.raises(TypeError, match="int64"):
        _spec(np.int64(16))
    with pytest.raises(TypeError, match="str"):
        _spec("x")
