"""Forward Triton kernel of the depthwise conv1d + SiLU, causal and (optionally) anti-causal in one pass over x.

For each channel d and position t (k = K taps, x = 0 outside [0, L))::

    x_f[t] = silu(bias[d]   + sum_j weight[d, j]       * x[t - (K-1) + j])     causal   (shifts -(K-1) .. 0)
    x_b[t] = silu(bias_b[d] + sum_i weight_b[d, K-1-i] * x[t + i])             anti-causal (shifts 0 .. K-1)

The anti-causal form is Vision Mamba's ``flip(conv1d_b(flip(x)))`` written in natural order (see reference.py).
One program owns a (BLOCK_D channels) x (BLOCK_L positions) tile of one batch element; it loads each of the 2K-1
shifted x tiles once and feeds both accumulators, so both directions cost one read of x (the halo re-reads hit
L1/L2) and one write per output. x and the outputs are read/written through their strides: x may be the x half of
in_proj's (batch, L, 2*d_inner) output seen as (batch, d_inner, L).

Cost model (global XL: batch 2, channels 2304, L 4096, bf16): bytes = 2 B * b*d*L * (1 read + 2 writes) = 113 MB
-> ~38 us at 3.0 TB/s; FLOPs (2K-1 FMAs + 2 SiLU per element pair) are negligible next to that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._launch import cdiv, launch, next_power_of_2

from .interface import new_output


@triton.jit
def _dwconv_silu_fwd_kernel(
    # pointers
    p_x, p_w, p_bias, p_w_b, p_bias_b, p_y, p_y_b,
    # sizes
    D, L,
    # strides
    stride_x_b, stride_x_d, stride_x_l,
    stride_w_d, stride_w_k,
    stride_wb_d, stride_wb_k,
    stride_y_b, stride_y_d, stride_y_l,
    stride_yb_b, stride_yb_d, stride_yb_l,
    # meta-parameters
    K: tl.constexpr, BIDIR: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    i_d, i_l, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    m_d = o_d < D
    m_l = o_l < L
    p_x_tile = p_x + i_b.to(tl.int64) * stride_x_b + o_d[:, None] * stride_x_d  # (BLOCK_D, 1) row starts

    b_acc_f = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32) + \
        tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    b_acc_b = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if BIDIR:
        b_acc_b += tl.load(p_bias_b + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]

    # shift s - (K-1) runs over -(K-1) .. K-1; the causal taps use s <= K-1, the anti-causal ones s >= K-1
    for s in tl.static_range(2 * K - 1):
        if BIDIR or s <= K - 1:
            o_src = o_l + (s - (K - 1))
            m_src = m_d[:, None] & ((o_src >= 0) & (o_src < L))[None, :]
            b_x = tl.load(p_x_tile + o_src[None, :] * stride_x_l, mask=m_src, other=0.0).to(tl.float32)
            if s <= K - 1:  # causal tap j = s
                b_w = tl.load(p_w + o_d * stride_w_d + s * stride_w_k, mask=m_d, other=0.0).to(tl.float32)
                b_acc_f += b_w[:, None] * b_x
            if BIDIR:
                if s >= K - 1:  # anti-causal shift i = s - (K-1) uses weight_b[K-1-i] = weight_b[2K-2-s]
                    b_wb = tl.load(p_w_b + o_d * stride_wb_d + (2 * K - 2 - s) * stride_wb_k,
                                   mask=m_d, other=0.0).to(tl.float32)
                    b_acc_b += b_wb[:, None] * b_x

    m_out = m_d[:, None] & m_l[None, :]
    b_y = b_acc_f / (1.0 + tl.exp(-b_acc_f))  # silu
    p_y_tile = p_y + i_b.to(tl.int64) * stride_y_b + o_d[:, None] * stride_y_d + o_l[None, :] * stride_y_l
    tl.store(p_y_tile, b_y.to(p_y.dtype.element_ty), mask=m_out)
    if BIDIR:
        b_yb = b_acc_b / (1.0 + tl.exp(-b_acc_b))
        p_yb_tile = p_y_b + i_b.to(tl.int64) * stride_yb_b + o_d[:, None] * stride_yb_d + o_l[None, :] * stride_yb_l
        tl.store(p_yb_tile, b_yb.to(p_y_b.dtype.element_ty), mask=m_out)


def _fwd_config(x: torch.Tensor):
    """(BLOCK_D, BLOCK_L, num_warps). Channel-fastest x: 64 channels x 32 positions at 8 warps (128 B rows, 98
    registers a thread on sm_90); L-fastest x: 32 x 64 at 8 warps (48 registers)."""
    _, D, L = x.shape
    if x.stride(1) == 1:
        block_d, block_l = 64, 32
    else:
        block_d, block_l = 32, 64
    if triton_interpreting():  # registers do not matter there; bigger tiles mean fewer (slow) Python programs
        block_d, block_l = 32, 32
    block_d = min(block_d, max(16, next_power_of_2(D)))
    block_l = min(block_l, max(16, next_power_of_2(L)))
    return block_d, block_l, 8


def dwconv_silu_fwd_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           weight_b: torch.Tensor | None = None, bias_b: torch.Tensor | None = None):
    """Launch the forward kernel. Returns x_f, or (x_f, x_b) when weight_b/bias_b are given; layout: ``new_output``.

    Inputs are already validated by the public function: x (batch, D, L) any strides; weight(_b) (D, K) any strides;
    bias(_b) (D,) contiguous.
    """
    batch, D, L = x.shape
    K = weight.shape[1]
    bidir = weight_b is not None
    y = new_output(x)
    y_b = new_output(x) if bidir else y
    w_b, b_b = (weight_b, bias_b) if bidir else (weight, bias)  # dummies when not BIDIR (never read)
    bias, b_b = bias.contiguous(), b_b.contiguous()
    block_d, block_l, num_warps = _fwd_config(x)
    grid = (cdiv(D, block_d), cdiv(L, block_l), batch)
    launch(_dwconv_silu_fwd_kernel, grid, (
        x, weight, bias, w_b, b_b, y, y_b,
        D, L,
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(1),
        w_b.stride(0), w_b.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        y_b.stride(0), y_b.stride(1), y_b.stride(2),
    ), dict(K=K, BIDIR=bidir, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=num_warps))
    return (y, y_b) if bidir else y
