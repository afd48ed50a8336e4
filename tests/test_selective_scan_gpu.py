"""GPU checks of the Triton selective scan (marker ``gpu``; skipped without CUDA).

Tolerance rule (mamba_ssm's table): the op in dtype X vs selective_scan_ref on the same X inputs (fp32 maths,
output cast to X) must satisfy torch.allclose with (rtol, atol) = fp32 (6e-4, 2e-3), fp16 (3e-3, 5e-3),
bf16 (3e-2, 5e-2) on the output and last_state; gradients (vs the reference's autograd in fp32 on the upcast
inputs) get GRAD_MULT x those tolerances, scaled by max|ref grad| for the reductions (dA, dD, ddelta_bias, dB, dC),
whose sums over L run thousands of terms. Errors are logged before asserting.
"""

from __future__ import annotations

import logging

import pytest
import torch

from matten_kernels import bi_selective_scan, bi_selective_scan_ref, selective_scan, selective_scan_ref

pytestmark = pytest.mark.gpu
log = logging.getLogger(__name__)
TOLS = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
GRAD_MULT = 5
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
REDUCED = {"A", "D", "delta_bias", "B", "C", "initial_state", "A_b", "D_b", "delta_bias_b", "B_b", "C_b"}


def inputs(batch, dim, L, N, dtype, G=None, seed=0, z=True, big_delta=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    bc = (batch, N, L) if G is None else (batch, G, N, L)
    x = dict(u=r(batch, dim, L).to(dtype), delta=(0.5 * r(batch, dim, L)).to(dtype),
             A=-torch.rand(dim, N, device="cuda", generator=g) * 4 - 0.1, B=r(*bc).to(dtype), C=r(*bc).to(dtype),
             D=r(dim), z=r(batch, dim, L).to(dtype) if z else None, delta_bias=0.5 * r(dim) - 1.0)
    if big_delta:  # delta + delta_bias = 30 everywhere
        x["delta"] = torch.full((batch, dim, L), 30.0, device="cuda").to(dtype)
        x["delta_bias"] = torch.zeros(dim, device="cuda")
    return x


def close(name, got, ref, rtol, atol, scale_by_max=False):
    got, ref = got.float(), ref.float()
    if scale_by_max:
        s = max(1.0, ref.abs().max().item())
        rtol, atol = rtol, atol * s
    err = (got - ref).abs()
    log.info("%s: max err %.3e mean err %.3e (rtol %.1e atol %.1e)", name, err.max().item(), err.mean().item(),
             rtol, atol)
    assert torch.isfinite(got).all(), f"{name}: non-finite"
    assert torch.allclose(got, ref, rtol=rtol, atol=atol), f"{name}: max err {err.max().item():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 96, 4096, 16, None), (1, 40, 16384, 16, None), (3, 64, 257, 64, 2),
                                   (4, 33, 16, 8, None), (1, 8, 1000, 256, None)],
                         ids=["L4096", "L16384", "L257-N64-G2", "L16-dim33", "N256"])
def test_uni_dtypes(dtype, shape):
    _uni_case(dtype, shape)


# The lanes forward (chosen by shape: long 16-bit sequences over many channels) forced on fewer channels: whole windows
# only (L 4096), whole windows and a masked last one (4100, with G = 2 and N = 5), and a partial window alone (200).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 96, 4096, 16, None), (2, 64, 4100, 5, 2), (3, 16, 200, 16, None)],
                         ids=["L4096", "L4100-N5-G2", "L200"])
@pytest.mark.parametrize("cpw", [1, 2], ids=["cpw1", "cpw2"])
def test_uni_lanes_forward(dtype, shape, cpw, monkeypatch):
    from matten_kernels.selective_scan import triton_fwd_lanes

    monkeypatch.setattr(triton_fwd_lanes, "CPW_OVERRIDE", cpw)  # one or two channels a warp (lanes_fwd_cpw)
    _forced_lanes_case("use_lanes", dtype, shape, monkeypatch)


def _forced_lanes_case(chooser, dtype, shape, monkeypatch):
    from matten_kernels.selective_scan import _ops

    chosen = []
    monkeypatch.setattr(_ops, chooser, lambda *a, **k: chosen.append(True) or True)
    _uni_case(dtype, shape)
    assert chosen, f"{chooser} was not consulted"


# The lanes backward (chosen by shape: long 16-bit sequences over many channels) forced on fewer channels: two channels
# per warp and four warps (dim 96), B/C in two groups with N = 5 (dim 64), one channel per warp (dim 6), L = 4096,
# 1024 and 256 (the shortest it is chosen for: two windows); fp32 too (4 steps per lane), which the shape choice
# never takes.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 96, 4096, 16, None), (2, 64, 4096, 5, 2), (3, 6, 1024, 16, None),
                                   (5, 40, 256, 16, None)],
                         ids=["L4096", "L4096-N5-G2", "L1024-dim6", "L256"])
def test_uni_lanes_backward(dtype, shape, monkeypatch):
    _forced_lanes_case("use_lanes_bwd", dtype, shape, monkeypatch)


def test_lanes_backward_by_shape_saves_a_state_a_window():
    """Chosen by shape (3,200 channels fill the GPU; bf16, L 1024), the lanes backward reads the states the forward
    saved one a 128-step window (not every 64 steps): their layout, then output and every gradient against the
    reference."""
    from matten_kernels.selective_scan import _ops, triton_fwd

    batch, dim, L, N = 2, 1600, 1024, 16
    x = inputs(batch, dim, L, N, torch.bfloat16)
    if not _ops.use_lanes_bwd(x["u"], N, x["u"].device.index):
        pytest.skip("3,200 channels do not fill this GPU for the lanes backward (24 a SM needed)")
    states = _ops.selective_scan_fwd_op(*(x[k] for k in NAMES), None, True)[2]
    assert triton_fwd.saved_layout(states, L) == (128, True) and states.shape == (batch, dim, L // 128, N)
    _uni_case(torch.bfloat16, (batch, dim, L, N, None))


def _uni_case(dtype, shape):
    batch, dim, L, N, G = shape
    x = inputs(batch, dim, L, N, dtype, G)
    h0 = torch.randn(batch, dim, N, device="cuda")
    rtol, atol = TOLS[dtype]
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
    leaves["initial_state"] = h0.clone().requires_grad_()
    ref_leaves = {k: v.detach().float().requires_grad_() for k, v in leaves.items()}
    out, last = selective_scan(*(leaves.get(k) for k in NAMES), True, True, initial_state=leaves["initial_state"],
                               backend="triton")
    ref, ref_last = selective_scan_ref(*(ref_leaves.get(k) for k in NAMES), True, True,
                                       initial_state=ref_leaves["initial_state"])
    close("out", out, ref.to(dtype), rtol, atol)
    close("last_state", last, ref_last, rtol, atol, scale_by_max=True)
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last)
    torch.autograd.backward([out, last], [dout, dlast])
    torch.autograd.backward([ref, ref_last], [dout.float(), dlast])
    for k in leaves:
        close(f"d{k}", leaves[k].grad, ref_leaves[k].grad, rtol * GRAD_MULT, atol * GRAD_MULT,
              scale_by_max=k in REDUCED)


# forward "lanes": the lanes kernels' two launches forced (use_lanes_bi: rows of whole windows, L = 1536), one or two
# channels a warp; backward "lanes": the lanes backward's two launches forced (use_lanes_bi_bwd; the forward then
# saves a state a window); "auto": the shape's choice (the segment kernels here)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["v2", "v1", "shared"])
@pytest.mark.parametrize("forward, backward", [("auto", "auto"), ("lanes", "auto"), ("lanes-cpw2", "auto"),
                                               ("auto", "lanes"), ("lanes", "lanes"), ("lanes-cpw2", "lanes")])
def test_bi_dtypes(dtype, mode, forward, backward, monkeypatch):
    from matten_kernels.selective_scan import _ops, triton_fwd_lanes

    batch, dim, L, N = 2, 72, 1500, 16
    chosen = []
    if forward != "auto":
        monkeypatch.setattr(_ops, "use_lanes_bi", lambda *a, **k: chosen.append("fwd") or True)
        monkeypatch.setattr(triton_fwd_lanes, "CPW_OVERRIDE", 2 if forward == "lanes-cpw2" else 1)
        L = 1536
    if backward != "auto":
        monkeypatch.setattr(_ops, "use_lanes_bi_bwd", lambda *a, **k: chosen.append("bwd") or True)
        L = 1536
    _bi_case(dtype, mode, batch, dim, L, N)
    assert ("fwd" in chosen) == (forward != "auto") and ("bwd" in chosen) == (backward != "auto"), chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bi_lanes_backward_at_256_steps(dtype, monkeypatch):
    """The shortest rows use_lanes_bi_bwd takes (spatial XL: two 128-step windows a row in bf16), forced on few
    channels: the segment forward saves a state a window for it; output and every gradient against the reference
    (Vim v2, z)."""
    from matten_kernels.selective_scan import _ops

    chosen = []
    monkeypatch.setattr(_ops, "use_lanes_bi_bwd", lambda *a, **k: chosen.append(True) or True)
    _bi_case(dtype, "v2", 3, 40, 256, 16)
    assert chosen, "use_lanes_bi_bwd was not consulted"


def _bi_inputs(dtype, mode, batch, dim, L, N):
    x = inputs(batch, dim, L, N, dtype)
    o = inputs(batch, dim, L, N, dtype, seed=1, z=False)
    xb = {"v2": {k + "_b": o[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")}, "v1": {"A_b": o["A"]},
          "shared": {}}[mode]
    return x, xb


def _bi_case(dtype, mode, batch, dim, L, N):
    x, xb = _bi_inputs(dtype, mode, batch, dim, L, N)
    rtol, atol = TOLS[dtype]
    lx = {k: v.clone().requires_grad_() for k, v in {**x, **xb}.items() if v is not None}
    rx = {k: v.detach().float().requires_grad_() for k, v in lx.items()}
    kb = lambda d: {k: d[k] for k in xb}  # noqa: E731
    out = bi_selective_scan(*(lx.get(k) for k in NAMES), True, **kb(lx), divide_out=True, backend="triton")
    ref = bi_selective_scan_ref(*(rx.get(k) for k in NAMES), True, **kb(rx), divide_out=True)
    close("out", out, ref.to(dtype), rtol, atol)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.float())
    for k in lx:
        close(f"d{k}", lx[k].grad, rx[k].grad, rtol * GRAD_MULT, atol * GRAD_MULT, scale_by_max=k in REDUCED)


def test_bi_lanes_backward_by_shape_saves_a_state_a_window():
    """Chosen by shape (3,200 channels fill the GPU; bf16, L 1024, Vim v2), the bidirectional forward saves both
    directions' states a 128-step window apart (not every 64 steps) and the lanes backward reads them: their layout,
    then output and every gradient against the reference."""
    from matten_kernels.selective_scan import _ops, triton_fwd

    batch, dim, L, N = 2, 1600, 1024, 16
    x, xb = _bi_inputs(torch.bfloat16, "v2", batch, dim, L, N)
    if not _ops.use_lanes_bi_bwd(x["u"], x["B"], x["C"], xb["B_b"], xb["C_b"], N, x["u"].device.index):
        pytest.skip("3,200 channels do not fill this GPU for the lanes backward (24 a SM needed)")
    args = [x[k] for k in NAMES] + [xb[k + "_b"] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    _, states, states_b = _ops.bi_selective_scan_fwd_op(*args, True, False)
    assert triton_fwd.saved_layout(states, L) == (128, True) and states.shape == (batch, dim, L // 128, N)
    assert states_b.shape == states.shape
    _bi_case(torch.bfloat16, "v2", batch, dim, L, N)


@pytest.mark.parametrize("forward", ["auto", "lanes"])
def test_large_delta_bf16_finite(forward, monkeypatch):
    """delta + delta_bias = 30 (softplus passes it through; decays exp(30 A) underflow to 0): no NaN/Inf, with the
    kernels the shape picks and with the lanes forward and backward forced."""
    if forward == "lanes":
        from matten_kernels.selective_scan import _ops

        monkeypatch.setattr(_ops, "use_lanes", lambda *a, **k: True)
        monkeypatch.setattr(_ops, "use_lanes_bi", lambda *a, **k: True)
        monkeypatch.setattr(_ops, "use_lanes_bwd", lambda *a, **k: True)
        monkeypatch.setattr(_ops, "use_lanes_bi_bwd", lambda *a, **k: True)
    x = inputs(2, 64, 2048, 16, torch.bfloat16, big_delta=True)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
    for bi in (False, True):
        if bi:
            out = bi_selective_scan(*(leaves.get(k) for k in NAMES), True, backend="triton")
        else:
            out = selective_scan(*(leaves.get(k) for k in NAMES), True, backend="triton")
        out.float().square().mean().backward()
        assert torch.isfinite(out).all()
        for k, v in leaves.items():
            assert torch.isfinite(v.grad).all(), f"d{k} not finite (bi={bi})"
            v.grad = None
    ref = selective_scan_ref(*(x.get(k) for k in NAMES), True)
    close("out vs ref", selective_scan(*(x.get(k) for k in NAMES), True, backend="triton"), ref,
          *TOLS[torch.bfloat16])


def test_deterministic_bit_identical():
    """With torch.use_deterministic_algorithms(True) two runs give bit-identical outputs and gradients."""
    x = inputs(2, 256, 2048, 16, torch.bfloat16)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
            out = bi_selective_scan(*(leaves.get(k) for k in NAMES), True, A_b=x["A"] * 0.5, backend="triton")
            out.backward(torch.ones_like(out))
            out2 = selective_scan(*(leaves.get(k) for k in NAMES), True, backend="triton")
            out2.backward(torch.ones_like(out2))
            runs.append([out, out2] + [leaves[k].grad for k in sorted(leaves)])
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(prev)


def test_cached_launch_respects_specialisation():
    """matten_kernels._launch reuses a compiled kernel only for arguments Triton would specialise the same way: the
    same values given through 16-byte-misaligned copies (other pointer alignment) and at a length whose strides are
    not multiples of 16 must still match the reference, before and after the aligned call populated the cache."""
    rtol, atol = TOLS[torch.float32]
    for L in (4096, 4097):
        x = inputs(2, 96, L, 16, torch.float32)
        ref = selective_scan_ref(*(x[k] for k in NAMES), True)
        aligned = selective_scan(*(x[k] for k in NAMES), True, backend="triton")
        shifted = {}
        for k, v in x.items():
            buf = torch.empty(v.numel() + 1, device="cuda", dtype=v.dtype)
            shifted[k] = buf[1:].view(v.shape).copy_(v)  # data pointer 4 bytes past a 16-byte boundary
            assert shifted[k].data_ptr() % 16 != 0
        misaligned = selective_scan(*(shifted[k] for k in NAMES), True, backend="triton")
        close(f"aligned L={L}", aligned, ref, rtol, atol)
        close(f"misaligned L={L}", misaligned, ref, rtol, atol)


@pytest.mark.parametrize("shape", [(2, 2304, 4096, 16), (512, 2304, 16, 16), (1, 2304, 16384, 16)],
                         ids=["global-XL", "temporal-XL", "long"])
def test_benchmark_shapes_forward(shape):
    """The SPEC section 7 shapes run and agree with the reference on a slice of channels (bf16 tolerances)."""
    batch, dim, L, N = shape
    x = inputs(batch, dim, L, N, torch.bfloat16, z=False)
    out, last = selective_scan(*(x.get(k) for k in NAMES), True, True, backend="triton")
    sl = slice(0, 16)
    xs = {k: (v[:, sl] if k in ("u", "delta") else v[sl] if k in ("A", "D", "delta_bias") else v)
          for k, v in x.items() if v is not None}
    ref, ref_last = selective_scan_ref(*(xs.get(k) for k in NAMES), True, True)
    close("out[:, :16]", out[:, sl], ref, *TOLS[torch.bfloat16])
    close("last[:, :16]", last[:, sl], ref_last, *TOLS[torch.bfloat16], scale_by_max=True)


def test_compile_inductor():
    torch._dynamo.reset()
    x = inputs(2, 64, 512, 16, torch.bfloat16)

    def f(u, delta, A, B, C, D, z, delta_bias):
        return bi_selective_scan(u * 2, delta, A, B, C, D, z, delta_bias, True, backend="triton").float().sum()

    leaves = [x[k].clone().requires_grad_() for k in NAMES]
    loss = torch.compile(f, fullgraph=True)(*leaves)
    loss.backward()
    ref = f(*x.values())
    assert torch.allclose(loss, ref, rtol=1e-3, atol=1e-2)
