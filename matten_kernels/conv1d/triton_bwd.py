"""Backward Triton kernel of the depthwise conv1d + SiLU (causal and anti-causal directions in one pass).

With pre-activations a_f, a_b (see triton_fwd.py) and g = dy * silu'(a) per direction::

    dx[t]          = sum_m weight[K-1-m] * g_f[t+m]  +  sum_m weight_b[K-1-m] * g_b[t-m]      (m = 0 .. K-1)
    dweight[j]     = sum_{batch, t} g_f[t] * x[t - (K-1) + j]
    dweight_b[K-1-i] = sum_{batch, t} g_b[t] * x[t + i]
    dbias = sum g_f,   dbias_b = sum g_b

Nothing is saved by the forward: the pre-activations are recomputed here from x (the seven x tiles at shifts -3 .. 3,
held in registers), so the backward reads x, dy_f, dy_b once from DRAM (the halo re-reads hit L1/L2) and writes dx
once; no (batch, D, L) scratch tensor is materialised. Two loop bodies (``GATHER``), by x's layout (``_bwd_config``):

* the gather kernel (L-major x, the mixer's): each gate once a position; the g at t+1..t+3 (t-3..t-1) that dx[t]
  needs are gathered within the tile (register shuffles: the tile's L axis lies in a warp). A tile of BLOCK_L
  positions yields BLOCK_L - 8 outputs (4-position halos on both sides). 2 sigmoids a position;
* the per-tap kernel (channel-fastest x): each g recomputed at the four dx positions it reaches. 8 sigmoids a
  position, no exchange between threads.

The bodies are written for 4 taps; K < 4 runs as a width-4 conv with zero leading taps (``_tap``).

Determinism: one program owns BLOCK_D channels x one chunk of L of one batch element and loops over the chunk's
tiles; it writes its partial dweight/dbias sums to its own row of a (chunks*batch, ...) fp32 buffer, which the
launcher reduces with one ``sum(0)`` in a fixed order. No atomics.

Cost model (global XL bf16, both directions): bytes = 2 B * b*d*L * (3 reads + 1 write) = 151 MB -> ~50 us at
3.0 TB/s. Both kernels issue-bound on an H100: offline (sm_90 SASS) the loop costs 8.4 warp-instructions an output
(per-tap, 8 x 64 tiles) against 5.5 (gather, 8 x 64) and 4.5 (gather, 8 x 128); measured 0.251 / 0.233 / 0.220 ms at
global XL: the gathers' shuffles and the halos do not issue as the count says (predicted ~0.14 ms).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._launch import cdiv, launch, next_power_of_2

from .interface import new_output


@triton.jit
def _gate(b_a, p_dy_rows, o_pos, stride_dy_l, m_d, L):
    """g = dy * silu'(a) at positions o_pos (0 outside [0, L)): silu'(a) = sig(a) * (1 + a * (1 - sig(a)))."""
    m_pos = m_d[:, None] & ((o_pos >= 0) & (o_pos < L))[None, :]
    b_dy = tl.load(p_dy_rows + o_pos[None, :] * stride_dy_l, mask=m_pos, other=0.0).to(tl.float32)
    b_sig = 1.0 / (1.0 + tl.exp(-b_a))
    return b_dy * b_sig * (1.0 + b_a * (1.0 - b_sig))


@triton.jit
def _shifted(p_x_rows, o_l, SHIFT: tl.constexpr, stride_x_l, m_d, L):
    """The x tile at positions o_l + SHIFT (0 outside [0, L)), in x's dtype: seven of these stay live, and 16-bit
    tiles take half the registers; every use multiplies by an fp32 weight, which promotes to fp32."""
    o_src = o_l + SHIFT
    m_src = m_d[:, None] & ((o_src >= 0) & (o_src < L))[None, :]
    return tl.load(p_x_rows + o_src[None, :] * stride_x_l, mask=m_src, other=0.0)


@triton.jit
def _tap(p_w, o_d, m_d, stride_w_d, stride_w_k, J: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tap J of the weight left-padded to 4 taps: weight[:, J - (4-K)], or 0 for J < 4-K. A causal conv of width
    K equals the width-4 conv with zero leading taps, so the kernel body is written once, for 4 taps."""
    b_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if J >= 4 - K:
        b_w = tl.load(p_w + o_d * stride_w_d + (J - (4 - K)) * stride_w_k, mask=m_d, other=0.0).to(tl.float32)
    return b_w


@triton.jit
def _rows(p, i_b64, stride_b, o_d, stride_d):
    """Pointers to the starts of batch element i_b64's rows o_d, as a (BLOCK_D, 1) tile."""
    return p + i_b64 * stride_b + o_d[:, None] * stride_d


@triton.jit
def _taps(p_w, p_bias, o_d, m_d, stride_w_d, stride_w_k, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The 4 (left-padded) taps and the bias of channels o_d, as fp32 (BLOCK_D, 1) columns. Causal: taps 0..3 multiply
    x[t-3] .. x[t]; anti-causal (weight_b): x_b[t] = sum_i tap[3-i] x[t+i]."""
    w0 = _tap(p_w, o_d, m_d, stride_w_d, stride_w_k, 0, K, BLOCK_D)[:, None]
    w1 = _tap(p_w, o_d, m_d, stride_w_d, stride_w_k, 1, K, BLOCK_D)[:, None]
    w2 = _tap(p_w, o_d, m_d, stride_w_d, stride_w_k, 2, K, BLOCK_D)[:, None]
    w3 = _tap(p_w, o_d, m_d, stride_w_d, stride_w_k, 3, K, BLOCK_D)[:, None]
    b_bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    return w0, w1, w2, w3, b_bias


@triton.jit
def _partial_sums(BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Zeroed per-position partial sums of dweight taps 0..3 and dbias (reduced over L once, by _store_partials)."""
    z = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    return z, z, z, z, z


@triton.jit
def _store_partials(p_dw_part, p_dbias_part, row, stride_part, o_d, m_d, b_dbias, b_dw0, b_dw1, b_dw2, b_dw3,
                    K: tl.constexpr):
    """One program's partial dbias / dweight sums (kept per position in its loop, reduced over L once here: no
    per-tile cross-warp reductions) into row ``row`` (``stride_part`` elements apart) of the (chunks*batch, D) /
    (chunks*batch, D, K) partial sums; padded tap J is weight column J - (4-K)."""
    p_dw_row = p_dw_part + row * stride_part + o_d * K - (4 - K)
    tl.store(p_dbias_part + row * stride_part + o_d, tl.sum(b_dbias, axis=1), mask=m_d)
    if K >= 4:
        tl.store(p_dw_row + 0, tl.sum(b_dw0, axis=1), mask=m_d)
    if K >= 3:
        tl.store(p_dw_row + 1, tl.sum(b_dw1, axis=1), mask=m_d)
    if K >= 2:
        tl.store(p_dw_row + 2, tl.sum(b_dw2, axis=1), mask=m_d)
    tl.store(p_dw_row + 3, tl.sum(b_dw3, axis=1), mask=m_d)


@triton.jit
def _shift(b_g, o_j, M: tl.constexpr, BLOCK_L: tl.constexpr):
    """b_g[:, j + M] at column j (clamped at the tile's ends; those columns are not stored): a gather along the tile's
    L axis, which stays within a warp for the L-major layout (register shuffles, no memory)."""
    idx = tl.minimum(tl.maximum(o_j + M, 0), BLOCK_L - 1)
    return tl.gather(b_g, tl.broadcast_to(idx[None, :], b_g.shape), axis=1)


@triton.jit
def _dwconv_silu_bwd_kernel(
    # pointers
    p_x, p_w, p_bias, p_w_b, p_bias_b, p_dy, p_dy_b,
    p_dx, p_dw_part, p_dbias_part, p_dwb_part, p_dbiasb_part,
    # sizes
    D, L, TILES_PER_PROG,
    # strides
    stride_x_b, stride_x_d, stride_x_l,
    stride_w_d, stride_w_k,
    stride_wb_d, stride_wb_k,
    stride_dy_b, stride_dy_d, stride_dy_l,
    stride_dyb_b, stride_dyb_d, stride_dyb_l,
    stride_dx_b, stride_dx_d, stride_dx_l,
    stride_part,
    # meta-parameters
    K: tl.constexpr, BIDIR: tl.constexpr, GATHER: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """GATHER (the gather kernel, module docstring): a tile covers BLOCK_L positions from HALO = 4 before its
    OUT = BLOCK_L - 8 output positions, computes g_f and g_b there once and reads the shifted g each dx needs (g_f at
    t+1..t+3, g_b at t-3..t-1) by gathers within the tile; tiles step by OUT, the halos' gates are computed twice.
    Else (the per-tap kernel): tiles of BLOCK_L outputs, each g recomputed at the four dx positions it reaches.
    Written out for 4 taps (K <= 4 via zero-padded leading taps, see _tap): the x tiles at shifts -3 .. 3 are loaded
    once per tile and held in registers (xm3 .. xp3); a Triton loop cannot keep a list of tiles."""
    HALO: tl.constexpr = 4
    OUT: tl.constexpr = BLOCK_L - 2 * HALO
    i_d, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_b = tl.num_programs(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_j = tl.arange(0, BLOCK_L)
    i_b64 = i_b.to(tl.int64)
    p_x_rows = _rows(p_x, i_b64, stride_x_b, o_d, stride_x_d)
    p_dy_rows = _rows(p_dy, i_b64, stride_dy_b, o_d, stride_dy_d)
    p_dyb_rows = _rows(p_dy_b, i_b64, stride_dyb_b, o_d, stride_dyb_d)
    p_dx_rows = _rows(p_dx, i_b64, stride_dx_b, o_d, stride_dx_d)

    w0, w1, w2, w3, b_bias = _taps(p_w, p_bias, o_d, m_d, stride_w_d, stride_w_k, K, BLOCK_D)
    b_dw0, b_dw1, b_dw2, b_dw3, b_dbias = _partial_sums(BLOCK_D, BLOCK_L)
    if BIDIR:
        u0, u1, u2, u3, b_bias_b = _taps(p_w_b, p_bias_b, o_d, m_d, stride_wb_d, stride_wb_k, K, BLOCK_D)
        b_du0, b_du1, b_du2, b_du3, b_dbias_b = _partial_sums(BLOCK_D, BLOCK_L)

    for i_t in range(0, TILES_PER_PROG):
        if GATHER:
            t0 = (i_c * TILES_PER_PROG + i_t) * OUT
            o_l = t0 - HALO + o_j  # the tile's positions; outputs are columns HALO .. HALO + OUT - 1
            m_out = m_d[:, None] & ((o_j >= HALO) & (o_j < HALO + OUT) & (o_l < L))[None, :]
            xm3 = _shifted(p_x_rows, o_l, -3, stride_x_l, m_d, L)
            xm2 = _shifted(p_x_rows, o_l, -2, stride_x_l, m_d, L)
            xm1 = _shifted(p_x_rows, o_l, -1, stride_x_l, m_d, L)
            x0 = _shifted(p_x_rows, o_l, 0, stride_x_l, m_d, L)
            g_f = _gate(b_bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0, p_dy_rows, o_l, stride_dy_l, m_d, L)
            g_o = tl.where(m_out, g_f, 0.0)  # the weight sums take each position once: its output tile's
            b_dbias += g_o
            b_dw0 += g_o * xm3
            b_dw1 += g_o * xm2
            b_dw2 += g_o * xm1
            b_dw3 += g_o * x0
            b_dx = w3 * g_f + w2 * _shift(g_f, o_j, 1, BLOCK_L) + w1 * _shift(g_f, o_j, 2, BLOCK_L) + \
                w0 * _shift(g_f, o_j, 3, BLOCK_L)
            if BIDIR:
                xp1 = _shifted(p_x_rows, o_l, 1, stride_x_l, m_d, L)
                xp2 = _shifted(p_x_rows, o_l, 2, stride_x_l, m_d, L)
                xp3 = _shifted(p_x_rows, o_l, 3, stride_x_l, m_d, L)
                g_b = _gate(b_bias_b + u3 * x0 + u2 * xp1 + u1 * xp2 + u0 * xp3, p_dyb_rows, o_l, stride_dyb_l, m_d, L)
                g_o = tl.where(m_out, g_b, 0.0)
                b_dbias_b += g_o
                b_du3 += g_o * x0
                b_du2 += g_o * xp1
                b_du1 += g_o * xp2
                b_du0 += g_o * xp3
                b_dx += u3 * g_b + u2 * _shift(g_b, o_j, -1, BLOCK_L) + u1 * _shift(g_b, o_j, -2, BLOCK_L) + \
                    u0 * _shift(g_b, o_j, -3, BLOCK_L)
            tl.store(p_dx_rows + o_l[None, :] * stride_dx_l, b_dx.to(p_dx.dtype.element_ty), mask=m_out)
        else:
            o_l = (i_c * TILES_PER_PROG + i_t) * BLOCK_L + tl.arange(0, BLOCK_L)
            xm3 = _shifted(p_x_rows, o_l, -3, stride_x_l, m_d, L)
            xm2 = _shifted(p_x_rows, o_l, -2, stride_x_l, m_d, L)
            xm1 = _shifted(p_x_rows, o_l, -1, stride_x_l, m_d, L)
            x0 = _shifted(p_x_rows, o_l, 0, stride_x_l, m_d, L)
            xp1 = _shifted(p_x_rows, o_l, 1, stride_x_l, m_d, L)
            xp2 = _shifted(p_x_rows, o_l, 2, stride_x_l, m_d, L)
            xp3 = _shifted(p_x_rows, o_l, 3, stride_x_l, m_d, L)

            # causal direction: g_f at t + m (m = 0..3) reaches dx[t] through w[3-m]
            g0 = _gate(b_bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0, p_dy_rows, o_l, stride_dy_l, m_d, L)
            b_dx = w3 * g0
            b_dbias += g0
            b_dw0 += g0 * xm3
            b_dw1 += g0 * xm2
            b_dw2 += g0 * xm1
            b_dw3 += g0 * x0
            b_dx += w2 * _gate(b_bias + w0 * xm2 + w1 * xm1 + w2 * x0 + w3 * xp1, p_dy_rows, o_l + 1, stride_dy_l, m_d, L)
            b_dx += w1 * _gate(b_bias + w0 * xm1 + w1 * x0 + w2 * xp1 + w3 * xp2, p_dy_rows, o_l + 2, stride_dy_l, m_d, L)
            b_dx += w0 * _gate(b_bias + w0 * x0 + w1 * xp1 + w2 * xp2 + w3 * xp3, p_dy_rows, o_l + 3, stride_dy_l, m_d, L)
            if BIDIR:
                # anti-causal direction: g_b at t - m reaches dx[t] through u[3-m]
                gb0 = _gate(b_bias_b + u3 * x0 + u2 * xp1 + u1 * xp2 + u0 * xp3, p_dyb_rows, o_l, stride_dyb_l, m_d, L)
                b_dx += u3 * gb0
                b_dbias_b += gb0
                b_du3 += gb0 * x0
                b_du2 += gb0 * xp1
                b_du1 += gb0 * xp2
                b_du0 += gb0 * xp3
                b_dx += u2 * _gate(b_bias_b + u3 * xm1 + u2 * x0 + u1 * xp1 + u0 * xp2,
                                   p_dyb_rows, o_l - 1, stride_dyb_l, m_d, L)
                b_dx += u1 * _gate(b_bias_b + u3 * xm2 + u2 * xm1 + u1 * x0 + u0 * xp1,
                                   p_dyb_rows, o_l - 2, stride_dyb_l, m_d, L)
                b_dx += u0 * _gate(b_bias_b + u3 * xm3 + u2 * xm2 + u1 * xm1 + u0 * x0,
                                   p_dyb_rows, o_l - 3, stride_dyb_l, m_d, L)
            m_out = m_d[:, None] & (o_l < L)[None, :]
            tl.store(p_dx_rows + o_l[None, :] * stride_dx_l, b_dx.to(p_dx.dtype.element_ty), mask=m_out)

    row = (i_c * n_b + i_b).to(tl.int64)
    _store_partials(p_dw_part, p_dbias_part, row, stride_part, o_d, m_d, b_dbias, b_dw0, b_dw1, b_dw2, b_dw3, K)
    if BIDIR:
        _store_partials(p_dwb_part, p_dbiasb_part, row, stride_part, o_d, m_d, b_dbias_b, b_du0, b_du1, b_du2, b_du3,
                        K)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few chunks, so tests exercise the multi-chunk reduction


def _bwd_config(x: torch.Tensor):
    """(gather, BLOCK_D, BLOCK_L, num_warps): which kernel and its tile. L-major x (the mixer's): the gather kernel on
    8 x 128 tiles (4 elements a thread, 237 registers on sm_90, no spills). Channel-fastest x (the transpose of a
    token-major tensor): the per-tap kernel on 64 channels x 8 positions (128 B rows, 97 registers), where a gather
    along L would cross warps. ``MATTEN_CONV_BWD=old`` forces the per-tap kernel (8 x 64) for L-major x too (A/B).

    H100, bf16, both directions, ms (``benchmarks/conv_bwd_ab.py``, session 15): global XL (2, 2304, 4096) per-tap
    0.251, gather 8 x 64 0.233, 8 x 128 0.220; spatial XL (32, 2304, 256) 0.255, 0.264, 0.247."""
    _, D, L = x.shape
    gather = x.stride(1) != 1 and os.environ.get("MATTEN_CONV_BWD", "gather") != "old"
    if x.stride(1) == 1:
        block_d, block_l = 64, 8
    else:
        block_d, block_l = 8, 128 if gather else 64
    if triton_interpreting():  # registers do not matter there; bigger tiles mean fewer (slow) Python programs
        block_d, block_l = 32, 32
    block_d = min(block_d, max(8, next_power_of_2(D)))
    block_l = min(block_l, max(16 if gather else 8, next_power_of_2(L)))  # gather: at least 8 outputs a tile
    return gather, block_d, block_l, 8


def dwconv_silu_bwd_launch(dy: torch.Tensor, dy_b: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, weight_b: torch.Tensor | None = None,
                           bias_b: torch.Tensor | None = None, dx_out: torch.Tensor | None = None,
                           grads_as_views: bool = False):
    """Gradients (dx, dweight, dbias[, dweight_b, dbias_b]); dx in x's dtype and ``new_output`` layout (or written
    into ``dx_out``, any strides: the mixer core's slice of d(xz)), the others in their parameter's dtype. ``dy_b``
    (and weight_b, bias_b) None: the causal direction only. ``grads_as_views``: the parameters' gradients may be
    slices of one tensor (one sum and one cast for all of them; a custom op may not return aliased outputs)."""
    batch, D, L = x.shape
    K = weight.shape[1]
    bidir = weight_b is not None
    gather, block_d, block_l, num_warps = _bwd_config(x)
    step = block_l - 8 if gather else block_l  # output positions a tile
    n_d, n_tiles = cdiv(D, block_d), cdiv(L, step)
    # Chunks of L per program: about 8 programs an SM (4 waves at 2 resident CTAs), few enough partial-sum rows.
    n_chunks = max(1, min(n_tiles, cdiv(8 * _num_sms(x.device), n_d * batch)))
    tiles_per_prog = cdiv(n_tiles, n_chunks)
    n_chunks = cdiv(n_tiles, tiles_per_prog)

    dx = new_output(x) if dx_out is None else dx_out
    # The partial sums, a row a program: dweight (D*K), dbias (D), then the anti-causal direction's; one buffer, so
    # that one sum and one cast finish all of them.
    ndir = 2 if bidir else 1
    width = D * K + D
    part = torch.empty((n_chunks * batch, ndir * width), device=x.device, dtype=torch.float32)
    dw_part, dbias_part = part[:, :D * K], part[:, D * K:width]
    if bidir:
        dwb_part, dbiasb_part = part[:, width:width + D * K], part[:, width + D * K:]
        w_b, b_b, g_b = weight_b, bias_b.contiguous(), dy_b
    else:
        dwb_part, dbiasb_part = dw_part, dbias_part  # never written
        w_b, b_b, g_b = weight, bias, dy
    grid = (n_d, n_chunks, batch)
    launch(_dwconv_silu_bwd_kernel, grid, (
        x, weight, bias.contiguous(), w_b, b_b, dy, g_b,
        dx, dw_part, dbias_part, dwb_part, dbiasb_part,
        D, L, tiles_per_prog,
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(1),
        w_b.stride(0), w_b.stride(1),
        dy.stride(0), dy.stride(1), dy.stride(2),
        g_b.stride(0), g_b.stride(1), g_b.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2),
        part.stride(0),
    ), dict(K=K, BIDIR=bidir, GATHER=gather, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=num_warps))
    params = (weight, bias, weight_b, bias_b) if bidir else (weight, bias)
    dtypes = [p.dtype for p in params]
    if grads_as_views:
        total = part.sum(0)  # a fixed order: deterministic
        if all(d == dtypes[0] for d in dtypes):
            total = total.to(dtypes[0])
        grads = [t.to(d) for t, d in zip(total.split([D * K, D] * ndir), dtypes)]
    else:
        grads = [t.sum(0).to(d) for t, d in zip(part.split([D * K, D] * ndir, dim=1), dtypes)]
    grads[0::2] = [t.view(D, K) for t in grads[0::2]]
    return (dx, *grads)
