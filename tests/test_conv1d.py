"""Depthwise conv1d + SiLU (causal and bidirectional): Triton (the interpreter on CPU) and ref vs a float64 reference,
forward and every gradient, awkward sizes, strided input views, the flip identity of the anti-causal direction, the
custom-op registration (opcheck), determinism and bad input.

Tolerance rule (a forward-error bound for fp32 accumulation): max |out - ref64| <= 4 * eps_fp32 * n * (1 + max |ref64|),
with n the number of terms summed per output: 2k for x_f, x_b and dx (k taps a direction), batch * L for the weight
and bias gradients. GPU (bf16/fp16, Matten shapes): the error vs float64 is at most 2x that of the PyTorch reference
run at the same precision (its inputs rounded the same way), plus 1e-6 * (1 + max |ref64|).
"""

from __future__ import annotations

import logging

import pytest
import torch

from matten_kernels._backend import triton_interpreting
from matten_kernels.conv1d import (bi_depthwise_conv1d_silu, bi_depthwise_conv1d_silu_ref, depthwise_conv1d_silu,
                                   depthwise_conv1d_silu_ref)

logger = logging.getLogger(__name__)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _make_x(batch, channels, L, layout, dtype=torch.float32, device=DEVICE):
    """x (batch, channels, L) with the given memory layout, as the mixer or a user would pass it."""
    if layout == "contiguous":
        return torch.randn(batch, channels, L, dtype=dtype, device=device)
    if layout == "in_proj":  # the x half of in_proj's (batch, L, 2*channels) output, transposed: channel stride 1
        xz = torch.randn(batch, L, 2 * channels, dtype=dtype, device=device)
        return xz[..., :channels].transpose(1, 2)
    if layout == "strided":  # every other channel and position of a bigger tensor: no unit stride at all
        return torch.randn(batch, 2 * channels, 2 * L, dtype=dtype, device=device)[:, ::2, ::2]
    raise ValueError(layout)


def _check(name, got, ref, n_terms, rule=None):
    err = (got.double() - ref).abs()
    tol = 4 * EPS32 * n_terms * (1 + ref.abs().max().item()) if rule is None else rule
    logger.info("%s: max err %.3e mean err %.3e (tol %.3e)", name, err.max().item(), err.mean().item(), tol)
    assert err.max().item() <= tol, f"{name}: max error {err.max().item():.3e} > {tol:.3e}"


def _run_bi(backend, x, params, cot):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
    x_f, x_b = bi_depthwise_conv1d_silu(*leaves, backend=backend)
    ((x_f * cot[0].to(x_f.dtype)).sum() + (x_b * cot[1].to(x_b.dtype)).sum()).backward()
    return (x_f, x_b), [t.grad for t in leaves]


def _ref_bi(x, params, cot):
    leaves = [t.detach().double().clone().requires_grad_(True) for t in (x, *params)]
    x_f, x_b = bi_depthwise_conv1d_silu_ref(*leaves)
    ((x_f * cot[0]).sum() + (x_b * cot[1]).sum()).backward()
    return (x_f, x_b), [t.grad for t in leaves]


CASES = [  # (backend, batch, channels, L, k, layout): L = 1, 3 < k, 17, 130; channels not a multiple of the tile
    ("triton", 1, 5, 1, 4, "contiguous"),
    ("triton", 2, 3, 3, 4, "in_proj"),
    ("triton", 2, 37, 17, 3, "strided"),
    ("triton", 1, 70, 130, 4, "in_proj"),
    ("triton", 2, 19, 130, 2, "contiguous"),
    ("triton", 1, 37, 130, 4, "strided"),
    ("ref", 2, 37, 17, 3, "contiguous"),
    ("ref", 1, 5, 1, 4, "in_proj"),
]


@pytest.mark.parametrize("backend,batch,channels,L,k,layout", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_bi_conv_vs_float64(backend, batch, channels, L, k, layout):
    x = _make_x(batch, channels, L, layout)
    params = [torch.randn(channels, k, device=DEVICE), torch.randn(channels, device=DEVICE),
              torch.randn(channels, k, device=DEVICE), torch.randn(channels, device=DEVICE)]
    cot = [torch.randn(batch, channels, L, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    (x_f, x_b), grads = _run_bi(backend, x, params, cot)
    (r_f, r_b), r_grads = _ref_bi(x, params, cot)
    assert x_f.shape == x_b.shape == (batch, channels, L) and x_f.dtype == x.dtype
    _check("x_f", x_f, r_f, 2 * k)
    _check("x_b", x_b, r_b, 2 * k)
    for name, g, r in zip(["dx", "dweight", "dbias", "dweight_b", "dbias_b"], grads, r_grads):
        _check(name, g, r, 2 * k if name == "dx" else batch * L)
    if backend == "triton":  # the backward is deterministic: a second run gives bit-identical gradients
        _, grads2 = _run_bi(backend, x, params, cot)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.parametrize("batch,channels,L,k,layout", [(2, 37, 17, 4, "in_proj"), (1, 6, 2, 1, "in_proj"),
                                                        (2, 11, 75, 4, "contiguous"), (1, 9, 130, 3, "strided")],
                         ids=["d37-L17-k4", "d6-L2-k1", "d11-L75-k4-contiguous", "d9-L130-k3-strided"])
@pytest.mark.parametrize("backend", ["triton", "ref"])
def test_causal_conv_vs_float64(backend, batch, channels, L, k, layout):
    x = _make_x(batch, channels, L, layout)
    w, bias = torch.randn(channels, k, device=DEVICE), torch.randn(channels, device=DEVICE)
    cot = torch.randn(batch, channels, L, dtype=torch.float64, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, bias)]
    out = depthwise_conv1d_silu(*leaves, backend=backend)
    (out * cot.to(out.dtype)).sum().backward()
    ref_leaves = [t.detach().double().clone().requires_grad_(True) for t in (x, w, bias)]
    ref = depthwise_conv1d_silu_ref(*ref_leaves)
    (ref * cot).sum().backward()
    _check("out", out, ref, k)
    for name, a, b in zip(["dx", "dweight", "dbias"], leaves, ref_leaves):
        _check(name, a.grad, b.grad, k if name == "dx" else batch * L)


def test_anticausal_is_flipped_causal_and_natural_order_formula():
    """The reference defines x_b by flips (Vim's conv1d_b on the flipped sequence); check it equals the natural-order
    formula x_b[t] = silu(bias_b + sum_i weight_b[k-1-i] * x[t+i]) that the kernels implement, and that the kernel's
    causal half is nn.Conv1d(padding=k-1) truncated to L."""
    batch, channels, L, k = 2, 6, 11, 4
    x = _randn(batch, channels, L, dtype=torch.float64)
    w, b, wb, bb = _randn(channels, k, dtype=torch.float64), _randn(channels, dtype=torch.float64), \
        _randn(channels, k, dtype=torch.float64), _randn(channels, dtype=torch.float64)
    x_f, x_b = bi_depthwise_conv1d_silu_ref(x, w, b, wb, bb)
    xpad = torch.nn.functional.pad(x, (k - 1, k - 1))  # x = 0 outside [0, L)
    expect_b = torch.stack([bb + sum(wb[:, k - 1 - i] * xpad[..., k - 1 + t + i] for i in range(k))
                            for t in range(L)], dim=-1)
    expect_f = torch.stack([b + sum(w[:, j] * xpad[..., t + j] for j in range(k)) for t in range(L)], dim=-1)
    torch.testing.assert_close(x_b, torch.nn.functional.silu(expect_b), rtol=0, atol=1e-12)
    torch.testing.assert_close(x_f, torch.nn.functional.silu(expect_f), rtol=0, atol=1e-12)
    conv = torch.nn.Conv1d(channels, channels, k, groups=channels, padding=k - 1).double().to(DEVICE)
    with torch.no_grad():
        conv.weight.copy_(w[:, None, :])
        conv.bias.copy_(b)
        torch.testing.assert_close(x_f, torch.nn.functional.silu(conv(x)[..., :L]), rtol=0, atol=1e-12)
    tri_f, tri_b = bi_depthwise_conv1d_silu(x.float(), w.float(), b.float(), wb.float(), bb.float(), backend="triton")
    _check("triton x_b vs natural-order formula", tri_b, torch.nn.functional.silu(expect_b), 2 * k)


def test_one_output_unused_and_layout():
    """Only x_f reaches the loss: x_b's gradient is None and contributes nothing. Output layout follows x."""
    x = _make_x(2, 9, 13, "in_proj")
    params = [_randn(9, 4), _randn(9), _randn(9, 4), _randn(9)]
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
    x_f, x_b = bi_depthwise_conv1d_silu(*leaves, backend="triton")
    assert x_f.stride(1) == 1 and x_b.stride(1) == 1  # (batch, L, channels) memory, ready for x_proj
    x_f.sum().backward()
    ref = [t.detach().double().clone().requires_grad_(True) for t in (x, *params)]
    bi_depthwise_conv1d_silu_ref(*ref)[0].sum().backward()
    for name, a, b in zip(["dx", "dweight", "dbias"], leaves, ref):
        _check(name, a.grad, b.grad, 2 * 26)
    assert torch.all(leaves[3].grad == 0) and torch.all(leaves[4].grad == 0)
    y = bi_depthwise_conv1d_silu(_make_x(2, 9, 13, "contiguous"), *params, backend="triton")[0]
    assert y.is_contiguous()


@pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreting(), reason="the launcher needs CUDA or TRITON_INTERPRET=1")
def test_backward_dx_into_a_slice():
    """dx_out (the mixer core's half of d(xz)): the same gradients, dx written into a strided slice in place."""
    from matten_kernels.conv1d.triton_bwd import dwconv_silu_bwd_launch

    x = _make_x(2, 19, 40, "contiguous")
    params = [_randn(19, 4), _randn(19), _randn(19, 4), _randn(19)]
    dy, dy_b = _randn(2, 19, 40), _randn(2, 19, 40)
    want = dwconv_silu_bwd_launch(dy, dy_b, x, *params)
    dxz = torch.zeros(2, 38, 40, device=DEVICE)
    got = dwconv_silu_bwd_launch(dy, dy_b, x, *params, dx_out=dxz[:, :19])
    assert got[0].data_ptr() == dxz.data_ptr() and torch.all(dxz[:, 19:] == 0)
    for name, a, b in zip(["dx", "dweight", "dbias", "dweight_b", "dbias_b"], got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_opcheck():
    from matten_kernels.conv1d import interface

    x = _make_x(1, 3, 5, "in_proj").requires_grad_(False)
    w, b, wb, bb = _randn(3, 4), _randn(3), _randn(3, 4), _randn(3)
    for t in (w, b, wb, bb):
        t.requires_grad_(True)
    torch.library.opcheck(interface._bi_conv_fwd, (x.detach().requires_grad_(True), w, b, wb, bb))
    torch.library.opcheck(interface._conv_fwd, (x.detach().requires_grad_(True), w, b))
    dy = _randn(1, 3, 5)
    torch.library.opcheck(interface._bi_conv_bwd, (dy, dy.clone(), x, w.detach(), b.detach(), wb.detach(),
                                                   bb.detach()))
    torch.library.opcheck(interface._conv_bwd, (dy, x, w.detach(), b.detach()))


def test_bad_input(monkeypatch):
    x, w, b = torch.randn(2, 4, 7), torch.randn(4, 4), torch.randn(4)
    f = bi_depthwise_conv1d_silu
    with pytest.raises(ValueError, match="x must have 3"):
        f(x[0], w, b, w, b)
    with pytest.raises(TypeError, match="x must have dtype"):
        f(x.long(), w, b, w, b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        f(x.tolist(), w, b, w, b)
    with pytest.raises(ValueError, match="weight must have shape"):
        f(x, torch.randn(5, 4), b, w, b)
    with pytest.raises(ValueError, match="weight_b has width"):
        f(x, w, b, torch.randn(4, 5), b)
    with pytest.raises(ValueError, match="bias_b must have shape"):
        f(x, w, b, w, torch.randn(5))
    with pytest.raises(ValueError, match="weight_b must have the shape of weight"):
        f(x, w, b, torch.randn(4, 3), b)
    with pytest.raises(TypeError, match="weight must have dtype"):
        f(x, w.double(), b, w, b)
    with pytest.raises(ValueError, match="non-empty"):
        f(torch.randn(2, 4, 0), w, b, w, b)
    with pytest.raises(ValueError, match="unknown backend"):
        f(x, w, b, w, b, backend="cuda")
    with pytest.raises(ValueError, match="bias must have shape"):
        depthwise_conv1d_silu(x, w, torch.randn(4, 1))
    with pytest.raises(ValueError, match="weight_b is on meta"):
        f(x, w, b, w.to("meta"), b)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            f(x, w, b, w, b, backend="triton")


# ------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["in_proj", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bi_conv_matten_shape_gpu(dtype, layout):
    """Global XL: batch 2, channels 2304, L 4096; x the x half of in_proj's output transposed (channel stride 1: the
    channel-fastest backward kernel) or time-contiguous as the mixer's channel_linear gives it (the gather kernel)."""
    batch, channels, L, k = 2, 2304, 4096, 4
    x = _make_x(batch, channels, L, layout, dtype=dtype, device="cuda")
    params = [torch.randn(channels, k, device="cuda", dtype=dtype) * 0.5, torch.randn(channels, device="cuda",
              dtype=dtype), torch.randn(channels, k, device="cuda", dtype=dtype) * 0.5,
              torch.randn(channels, device="cuda", dtype=dtype)]
    cot = [torch.randn(batch, channels, L, dtype=torch.float64, device="cuda") for _ in range(2)]
    out, grads = _run_bi("triton", x, params, cot)
    ref_out, ref_grads = _ref_bi(x, params, cot)
    same_prec_out, same_prec_grads = _run_bi("ref", x, params, cot)  # PyTorch at the same precision
    names = ["x_f", "x_b", "dx", "dweight", "dbias", "dweight_b", "dbias_b"]
    for name, got, ref, base in zip(names, [*out, *grads], [*ref_out, *ref_grads], [*same_prec_out, *same_prec_grads]):
        if dtype == torch.float32:
            _check(name, got, ref, 2 * k if name in ("x_f", "x_b", "dx") else batch * L)
        else:
            base_err = (base.double() - ref).abs().max().item()
            _check(name, got, ref, 0, rule=2 * base_err + 1e-6 * (1 + ref.abs().max().item()))
