"""pytest-benchmark regression timings of the kernels at Matten-XL/2 sizes (GPU only; skipped without CUDA).

Run: ``python -m pytest tests/test_bench_kernels.py --benchmark-only`` on a GPU machine; compare runs with
``--benchmark-autosave`` / ``--benchmark-compare``. Each timed call ends with ``torch.cuda.synchronize()`` so the
wall clock covers the kernels. Shapes: bf16, batch 2, D = 1152 (16 heads x 72, d_inner 2304, N = 16), the sequences
of spatial (256 tokens, 32 of them), temporal (16 tokens, 512 of them) and global (4096 tokens) modelling. Every test
also checks that the output is finite and shaped right, so a broken kernel fails rather than times.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

SCAN_SHAPES = {"spatial": (32, 2304, 16, 256), "temporal": (512, 2304, 16, 16), "global": (2, 2304, 16, 4096)}


def _timed(benchmark, fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    run()  # compile / autotune outside the timing
    return benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)


def _scan_inputs(batch, dim, N, L, requires_grad=False):
    dev, dt = "cuda", torch.bfloat16
    t = {k: torch.randn(batch, dim, L, device=dev, dtype=dt) for k in ("u", "delta", "z", "u_b", "delta_b")}
    t.update({k: torch.randn(batch, N, L, device=dev, dtype=dt) for k in ("B", "C", "B_b", "C_b")})
    for v in t.values():
        v.requires_grad_(requires_grad)
    A = -torch.arange(1, N + 1, dtype=torch.float32, device=dev).repeat(dim, 1)
    return t, A


def _bi_scan(t, A, dim):
    from matten_kernels import bi_selective_scan

    ones, bias = torch.ones(dim, device="cuda"), torch.full((dim,), -3.0, device="cuda")
    return bi_selective_scan(t["u"], t["delta"], A, t["B"], t["C"], ones, z=t["z"], delta_bias=bias,
                             delta_softplus=True, u_b=t["u_b"], delta_b=t["delta_b"], A_b=A, B_b=t["B_b"],
                             C_b=t["C_b"], D_b=ones, delta_bias_b=bias, backend="triton")


@pytest.mark.parametrize("axis", list(SCAN_SHAPES))
def test_bench_bi_scan_fwd(benchmark, axis):
    batch, dim, N, L = SCAN_SHAPES[axis]
    t, A = _scan_inputs(batch, dim, N, L)
    out = _timed(benchmark, lambda: _bi_scan(t, A, dim))
    assert out.shape == (batch, dim, L) and torch.isfinite(out).all()


@pytest.mark.parametrize("axis", list(SCAN_SHAPES))
def test_bench_bi_scan_fwdbwd(benchmark, axis):
    batch, dim, N, L = SCAN_SHAPES[axis]
    t, A = _scan_inputs(batch, dim, N, L, requires_grad=True)
    dout = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)
    inputs = list(t.values())
    grads = _timed(benchmark, lambda: torch.autograd.grad(_bi_scan(t, A, dim), inputs, dout))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("axis", ["spatial", "temporal", "global"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_bench_video_attention(benchmark, axis, mode):
    from matten_kernels import video_attention

    qkv = torch.randn(2, 16 * 256, 3, 16, 72, device="cuda", dtype=torch.bfloat16, requires_grad=mode == "fwdbwd")
    dout = torch.randn(2, 16 * 256, 16, 72, device="cuda", dtype=torch.bfloat16)

    def fwd():
        q, k, v = qkv.unbind(2)
        return video_attention(q, k, v, num_frames=16, axis=axis, backend="triton")

    if mode == "fwd":
        with torch.no_grad():
            out = _timed(benchmark, fwd)
        assert out.shape == (2, 4096, 16, 72) and torch.isfinite(out).all()
    else:
        (g,) = _timed(benchmark, lambda: torch.autograd.grad(fwd(), qkv, dout))
        assert torch.isfinite(g).all()
