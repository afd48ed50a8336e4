"""The cached launch path's key (matten_kernels._launch): every property Triton specialises a kernel on must change
it, so a compiled kernel is never reused for arguments Triton would have compiled differently. The GPU side (the
same op through aligned and misaligned inputs) is tests/test_selective_scan_gpu.py::test_cached_launch_respects_
specialisation."""

import numpy as np
import pytest
import torch

from matten_kernels._backend import triton_interpreting
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


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
def test_eager_calls_take_the_autograd_function_path():
    # plain eager calls skip the torch.library dispatch layers (host time); torch.compile and dispatch modes use the
    # custom ops (covered by the opcheck / compile / FlopCounterMode tests)
    from matten_kernels import bi_selective_scan, selective_scan, video_attention
    from matten_kernels.conv1d import bi_depthwise_conv1d_silu

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r = lambda *s: torch.randn(*s, device=dev, requires_grad=True)  # noqa: E731
    u, delta, B, C = r(1, 4, 8), r(1, 4, 8), r(1, 2, 8), r(1, 2, 8)
    A = (-torch.rand(4, 2, device=dev)).requires_grad_()
    q = r(1, 4, 1, 16)
    outs = {
        "_ScanFunction": selective_scan(u, delta, A, B, C, backend="triton"),
        "_BiScanFunction": bi_selective_scan(u, delta, A, B, C, backend="triton"),
        "_ConvFunction": bi_depthwise_conv1d_silu(u, r(4, 4), r(4), r(4, 4), r(4), backend="triton")[0],
        "_VideoAttentionFunction": video_attention(q, q, q, num_frames=2, axis="temporal", backend="triton"),
    }
    for name, out in outs.items():
        assert type(out.grad_fn).__name__ == name + "Backward", (name, out.grad_fn)
