"""GPU checks of each kernel at the embedded demo model's training shapes (batch 128, 8 frames of 8x8 patch tokens,
hidden 128, 4 heads of 32): temporal attention over 8 frames (packed mode), spatial over 64 tokens, the BiMamba mixer
(conv + bidirectional scan) over 512 tokens with d_inner 256. Training this model diverged after ~2,500 steps while
the whole-model gradient check (tests/test_model.py::test_demo_training_step_triton_matches_ref_gpu) showed 10%
gradient errors; these tests name the op.

Rule: fp32 inputs; relative Frobenius error of the output and of every gradient vs the float64 reference <= 1e-2
(attention matmuls run in tf32, ~1e-3 relative; the scan is fp32 throughout, ~1e-5).
"""

from __future__ import annotations

import logging

import pytest
import torch

from matten_kernels import video_attention, video_attention_ref
from matten_kernels.modules import BiMamba

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
log = logging.getLogger(__name__)


def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("axis", ["temporal", "spatial"])
def test_attention_at_demo_shape(axis):
    B, F, S, H, D = 128, 8, 64, 4, 32
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, F * S, 3, H, D, device="cuda", generator=g)
    cot = torch.randn(B, F * S, H, D, device="cuda", generator=g)
    errs = {}
    outs = []
    for x in (qkv.clone().requires_grad_(), qkv.double().requires_grad_()):
        q, k, v = x.unbind(2)
        fn = video_attention if x.dtype == torch.float32 else video_attention_ref
        o = fn(q, k, v, num_frames=F, axis=axis)
        (dx,) = torch.autograd.grad(o, x, cot.to(x.dtype))
        outs.append((o, dx))
    errs["out"] = rel(outs[0][0], outs[1][0])
    for i, name in enumerate("qkv"):
        errs[f"d{name}"] = rel(outs[0][1][:, :, i], outs[1][1][:, :, i])
    log.info("attention %s: %s", axis, errs)
    assert all(e <= 1e-2 for e in errs.values()), errs


def test_bimamba_at_demo_shape():
    torch.manual_seed(0)
    fast = BiMamba(128, d_state=16, d_conv=4, expand=2, bimamba="v2").cuda()
    slow = BiMamba(128, d_state=16, d_conv=4, expand=2, bimamba="v2", use_fast_path=False).cuda().double()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(128, 512, 128, device="cuda")
    cot = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    ya, yb = fast(xa), slow(xb)
    ya.backward(cot)
    yb.backward(cot.double())
    errs = {"out": rel(ya, yb), "dx": rel(xa.grad, xb.grad)}
    for (n, pa), (_, pb) in zip(fast.named_parameters(), slow.named_parameters()):
        errs[n] = rel(pa.grad, pb.grad)
    log.info("bimamba: %s", errs)
    assert all(e <= 1e-2 for e in errs.values()), errs
