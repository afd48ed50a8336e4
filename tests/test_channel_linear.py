"""channel_linear (the mixer's time-contiguous projections) against nn.functional.linear, and the layouts it makes."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import matten_kernels.modules.bimamba as bimamba_mod
from matten_kernels.modules import BiMamba, channel_linear
from matten_kernels.modules.channel_linear import sum_of_products

# (n, K, O, L): few long sequences take the summed batched products for dW, many short ones the stacked GEMM
SHAPES = [(2, 5, 7, 33), (9, 6, 4, 3), (1, 3, 5, 4)]


def _reference(x, w, b, transpose_in, transpose_out):
    """The same map through F.linear on token-major tensors."""
    x_tok = x if transpose_in else x.transpose(1, 2)  # (n, L, K)
    y = F.linear(x_tok, w, b)  # (n, L, O)
    return y if transpose_out else y.transpose(1, 2)


@pytest.mark.parametrize("n,K,O,L", SHAPES)
@pytest.mark.parametrize("transpose_in,transpose_out", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear_float64(n, K, O, L, transpose_in, transpose_out, bias):
    g = torch.Generator().manual_seed(n * 100 + K)
    x = torch.randn(n, L, K, generator=g, dtype=torch.float64) if transpose_in else \
        torch.randn(n, 2 * K, L, generator=g, dtype=torch.float64)[:, 1:K + 1]  # a strided channel slice
    x.requires_grad_(True)
    w = torch.randn(O, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(O, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = channel_linear(x, w, b, transpose_in=transpose_in, transpose_out=transpose_out)
    y_ref = _reference(x, w, b, transpose_in, transpose_out)
    assert y.shape == y_ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    for name, got, want in zip(("x", "weight", "bias"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"d{name}: {m}")
    assert grads[0].stride(-1 if transpose_in else 2) == 1  # the gradient comes back in x's own layout


# products accumulated in place (n = 2, 3), one batched GEMM summed (n = 6 > ACCUMULATE_MAX), the stacked GEMM (n = 30)
@pytest.mark.parametrize("n,P,Q,L", [(2, 3, 4, 50), (3, 3, 4, 50), (6, 2, 2, 100), (30, 6, 5, 2), (1, 2, 3, 4)])
def test_sum_of_products_all_strategies(n, P, Q, L):
    a = torch.randn(n, P, L, dtype=torch.float64)
    b_tok = torch.randn(n, L, Q, dtype=torch.float64)
    for b in (b_tok.mT, b_tok.mT.contiguous()):  # stackable view and a contiguous (n, Q, L) that needs a copy
        want = torch.einsum("npl,nql->pq", a, b)
        torch.testing.assert_close(sum_of_products(a, b), want, rtol=1e-12, atol=1e-12)


def test_autocast_computes_in_autocast_dtype():
    x = torch.randn(2, 8, 16)
    w = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = channel_linear(x, w)
        y_ref = F.linear(x.transpose(1, 2), w).transpose(1, 2)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32


def test_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        channel_linear(torch.randn(2, 3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="3-d"):
        channel_linear(torch.randn(3, 4), torch.randn(5, 3))


class _Copies(TorchDispatchMode):
    """Records the copies (clone / copy_ / contiguous) of tensors with at least ``min_numel`` elements."""

    def __init__(self, min_numel):
        super().__init__()
        self.min_numel, self.seen = min_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
            t = args[-1] if func is torch.ops.aten.copy_.default else args[0]
            if t.numel() >= self.min_numel:
                self.seen.append((str(func), tuple(t.shape), t.stride()))
        return func(*args, **(kwargs or {}))


def test_mixer_slow_path_makes_no_copies_and_hands_time_contiguous_tensors(monkeypatch):
    """The mixer's tensors are born time-contiguous: the scan gets unit time strides, no activation-sized copy is
    made in the forward or backward (the slow path runs the same projections and layouts as the fast path)."""
    E, L = 32, 24
    m = BiMamba(16, d_state=4, bimamba="v2", use_fast_path=False).double()
    h = torch.randn(2, L, 16, dtype=torch.float64, requires_grad=True)
    strides, grad_strides = {}, []

    def spy(u, delta, A, B, C, D=None, z=None, **kw):
        """Records the layouts the mixer hands over; an elementwise stand-in for the scan (whose own working copies
        are not the mixer's) that still sends a gradient to every input."""
        strides.update(u=u.stride(), delta=delta.stride(), B=B.stride(), z=z.stride(), u_b=kw["u_b"].stride(),
                       delta_b=kw["delta_b"].stride())
        bc = (B.sum(1, keepdim=True) + C.sum(1, keepdim=True) + kw["B_b"].sum(1, keepdim=True)
              + kw["C_b"].sum(1, keepdim=True))  # (batch, 1, L)
        y = u * delta * z + kw["u_b"] * kw["delta_b"] + bc
        y.register_hook(lambda g: grad_strides.append(g.stride()))
        return y

    monkeypatch.setattr(bimamba_mod, "bi_selective_scan_ref", spy)
    with _Copies(min_numel=2 * E * L) as copies:
        m(h).sum().backward()
    assert all(s[-1] == 1 for s in strides.values()), strides
    assert grad_strides and grad_strides[0][-1] == 1, grad_strides
    assert copies.seen == [], copies.seen
