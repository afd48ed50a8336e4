"""Linear layers over (batch, channels, L) sequences that keep the time axis contiguous, forward and backward.

The scan and conv kernels read every (batch, channel) row with unit stride along time. ``nn.Linear`` on a
(batch, L, channels) tensor gives the transpose of that, and the fast kernels then copy it (a transposing copy of
every activation, twice per mixer call for u and delta, and again for the incoming gradient: ~0.1 ms each at
2 x 2304 x 4096 bf16 on an H100). :func:`channel_linear` computes ``y[i] = W @ x[i]`` as one batched GEMM
(cuBLAS reads the other layout through its transpose flags), so the mixer's tensors are born time-contiguous and
its gradients arrive time-contiguous; the weight gradient sums the per-sequence products without materialising a
transposed activation.
"""

from __future__ import annotations

import torch

from .._backend import autocast_dtype

ACCUMULATE_MAX = 4  # sum_of_products: up to this many per-sequence products accumulate in place


def _stackable(t: torch.Tensor) -> bool:
    """True when (n, C, L) -> (C, n * L) is a view (the time axis of one sequence continues into the next's)."""
    return t.shape[0] == 1 or t.stride(0) == t.shape[2] * t.stride(2)


def sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i a[i] @ b[i]^T for a (n, P, L), b (n, Q, L), any strides -> (P, Q).

    One GEMM over the stacked n * L axis when that costs less memory traffic than the n partial products (a copy of
    whole time rows, never a transpose, is made of an operand that does not stack as a view), else the n products
    (few long sequences: the global mixer's weight gradients): for n <= ACCUMULATE_MAX each added into the first by
    the GEMM's epilogue (beta = 1; no (n, P, Q) stack and no reduction kernel), else one batched GEMM summed."""
    n, P, L = a.shape
    Q = b.shape[1]
    if n == 1:
        return a[0] @ b[0].t()
    copies = sum(t.shape[1] * n * L for t in (a, b) if not _stackable(t))
    if n * P * Q <= copies:
        if n > ACCUMULATE_MAX:
            return torch.bmm(a, b.mT).sum(0)
        out = a[0] @ b[0].t()
        for i in range(1, n):
            out.addmm_(a[i], b[i].t())
        return out
    return a.transpose(0, 1).reshape(P, n * L) @ b.transpose(0, 1).reshape(Q, n * L).t()


class _ChannelLinear(torch.autograd.Function):
    """y[i] = W @ x[i] (+ b); x given as (n, K, L) or, with ``transpose_in``, as its (n, L, K) transpose; y returned as
    (n, O, L) or, with ``transpose_out``, as (n, L, O). Every output and gradient is contiguous in its layout. The
    bias is the GEMM's C operand (no add kernel, no autograd node of its own)."""

    @staticmethod
    def forward(ctx, x, weight, bias, transpose_in: bool, transpose_out: bool):
        n = x.shape[0]
        xc = x.mT if transpose_in else x  # (n, K, L) view
        if transpose_out:
            a, b = xc.mT, weight.t().expand(n, -1, -1)  # (n, L, K) @ (n, K, O)
            c = None if bias is None else bias.expand(n, xc.shape[2], -1)
        else:
            a, b = weight.expand(n, -1, -1), xc  # (n, O, K) @ (n, K, L)
            c = None if bias is None else bias[:, None].expand(n, -1, xc.shape[2])
        y = torch.bmm(a, b) if c is None else torch.baddbmm(c, a, b)
        ctx.save_for_backward(x, weight)
        ctx.transpose_in, ctx.transpose_out = transpose_in, transpose_out
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        n = x.shape[0]
        gc = g.mT if ctx.transpose_out else g  # (n, O, L) view
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.transpose_in:
                dx = torch.bmm(gc.mT, weight.expand(n, -1, -1))  # (n, L, K)
            else:
                dx = torch.bmm(weight.t().expand(n, -1, -1), gc)  # (n, K, L)
        if ctx.needs_input_grad[1]:
            dw = sum_of_products(gc, x.mT if ctx.transpose_in else x)  # (O, K)
        if ctx.needs_input_grad[2]:
            db = g.sum((0, 1) if ctx.transpose_out else (0, 2))
        return dx, dw, db, None, None


def channel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   transpose_in: bool = False, transpose_out: bool = False) -> torch.Tensor:
    """``y[i] = weight @ x[i] + bias`` for every sequence i, time kept contiguous.

    x: (n, K, L), or (n, L, K) with ``transpose_in`` (a token-major input such as a block's hidden states).
    weight (O, K), bias (O,) or None. Returns (n, O, L) contiguous, or (n, L, O) with ``transpose_out``.
    Under autocast it computes in the autocast dtype, as ``nn.Linear`` would.
    """
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"channel_linear: x must be 3-d and weight 2-d, got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    K = x.shape[2] if transpose_in else x.shape[1]
    if weight.shape[1] != K:
        raise ValueError(f"channel_linear: weight {tuple(weight.shape)} does not match x {tuple(x.shape)} "
                         f"(transpose_in={transpose_in}: {K} input channels)")
    dtype = autocast_dtype(x)
    return _ChannelLinear.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), transpose_in,
                                transpose_out)
