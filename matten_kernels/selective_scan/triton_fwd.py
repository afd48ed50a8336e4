"""Triton forward kernel of the selective scan (uni- and bidirectional) and its launcher.

One program per (channel tile of BLOCK_D, batch). The state h [BLOCK_D, N] is carried in fp32 registers while the
program walks the sequence in chunks of CHUNK steps. Inside a chunk the recurrence h_t = a_t h_{t-1} + b_t is an
associative scan over the time axis of [BLOCK_D, N, CHUNK] blocks, combine (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2);
then h = cumprod(a) * h_carry + scanned b. Loads of u/delta/z are [BLOCK_D, CHUNK] tiles (contiguous along L),
B/C are [N, CHUNK] tiles loaded once per channel tile. Softplus, D, the z gate and the output cast are fused.

Bidirectional: the same program first scans the backward-direction inputs from the end (reversed indexing, no
flipped copies) into an fp32 scratch y_b, then scans the forward direction and writes out = (y_f + y_b) * s * silu(z)
once. The state at the start of every chunk (in scan order) is saved, fp32 (batch, dim, n_chunks, N), so the
backward can recompute any chunk without a (batch, dim, L, N) tensor.

Cost model (global XL, 2 x 2304 x 16 x 4096, bf16): 302M exp2 (one per (b, d, n, t)); bytes u, delta, out 2 B and
B, C 2 B/(b, n, t): ~0.11 GB, ~0.04 ms at 3 TB/s. The exp count at ~4 T/s (16 ex2/clk/SM) is the floor, ~0.07 ms.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _ssm_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): x -> a2 (a1 x + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # softplus(x) = x for x > 20 (as the reference and mamba); log(1 + e^x) ~ e^x for very negative x.
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _fwd_direction(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_h0, p_states, p_hlast, p_ybuf, p_out,
    i_b, i_d, dim, L, N, n_chunks, dpg_B, dpg_C,
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l,
    scale,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_LAST: tl.constexpr, REVERSE: tl.constexpr, MODE: tl.constexpr,
):
    """Scan one direction over the whole sequence for one (batch, channel tile).

    MODE 0: write out (uni). MODE 1: write y to the fp32 scratch (bi, first direction).
    MODE 2: add the scratch, scale, gate, write out (bi, second direction).
    """
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, CHUNK)
    m_d = o_d < dim
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    i_b64 = i_b.to(tl.int64)
    # The tile lies in one group of B and of C (the launcher picks BLOCK_D to divide dim / G when G > 1).
    g_B = (i_d * BLOCK_D) // dpg_B
    g_C = (i_d * BLOCK_D) // dpg_C

    # A is pre-scaled by log2(e) so the decay is one exp2; masked states get A = 0 (decay 1, input 0: stay 0).
    b_A = tl.load(p_A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0) * 1.4426950408889634
    if HAS_D:
        b_Dv = tl.load(p_D + o_d, mask=m_d, other=0.0)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_d, mask=m_d, other=0.0)
    if HAS_H0:
        b_h = tl.load(p_h0 + (i_b64 * dim + o_d[:, None]) * N + o_n[None, :], mask=m_dn, other=0.0)
    else:
        b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

    p_u_row = p_u + i_b64 * s_u_b + o_d[:, None].to(tl.int64) * s_u_d
    p_dt_row = p_delta + i_b64 * s_dt_b + o_d[:, None].to(tl.int64) * s_dt_d
    p_B_row = p_B + i_b64 * s_B_b + g_B * s_B_g + o_n[:, None] * s_B_n
    p_C_row = p_C + i_b64 * s_C_b + g_C * s_C_g + o_n[:, None] * s_C_n
    p_st_row = p_states + ((i_b64 * dim + o_d[:, None]) * n_chunks) * N + o_n[None, :]
    o_y_row = (i_b64 * dim + o_d[:, None]) * L  # out and the scratch are contiguous (batch, dim, L)
    if HAS_Z:
        p_z_row = p_z + i_b64 * s_z_b + o_d[:, None].to(tl.int64) * s_z_d

    for i_c in range(0, n_chunks):
        if REVERSE:
            c = n_chunks - 1 - i_c
        else:
            c = i_c
        # state entering this chunk (in scan order), kept for the backward
        tl.store(p_st_row + c * N, b_h, mask=m_dn)

        o_t = c * CHUNK + o_c
        m_t = o_t < L
        m_dt = m_d[:, None] & m_t[None, :]
        b_u = tl.load(p_u_row + o_t[None, :] * s_u_l, mask=m_dt, other=0.0).to(tl.float32)
        b_dt = tl.load(p_dt_row + o_t[None, :] * s_dt_l, mask=m_dt, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_dt = b_dt + b_bias[:, None]
        if SOFTPLUS:
            b_dt = _softplus(b_dt)
        b_dt = tl.where(m_dt, b_dt, 0.0)  # padded steps: decay 1, input 0 (identity of the scan)
        m_nt = m_n[:, None] & m_t[None, :]
        b_B = tl.load(p_B_row + o_t[None, :] * s_B_l, mask=m_nt, other=0.0).to(tl.float32)
        b_C = tl.load(p_C_row + o_t[None, :] * s_C_l, mask=m_nt, other=0.0).to(tl.float32)

        b_a = tl.exp2(b_dt[:, None, :] * b_A[:, :, None])  # [BLOCK_D, BLOCK_N, CHUNK]
        b_x = (b_dt * b_u)[:, None, :] * b_B[None, :, :]
        b_ac, b_hc = tl.associative_scan((b_a, b_x), axis=2, combine_fn=_ssm_combine, reverse=REVERSE)
        b_hc = b_ac * b_h[:, :, None] + b_hc
        b_y = tl.sum(b_hc * b_C[None, :, :], axis=1)  # [BLOCK_D, CHUNK]
        # carry: the state after the last step of this chunk in scan order
        if REVERSE:
            b_h = tl.sum(tl.where((o_c == 0)[None, None, :], b_hc, 0.0), axis=2)
        else:
            b_h = tl.sum(tl.where((o_c == CHUNK - 1)[None, None, :], b_hc, 0.0), axis=2)

        if HAS_D:
            b_y = b_y + b_Dv[:, None] * b_u
        o_y = o_y_row + o_t[None, :]
        if MODE == 1:
            tl.store(p_ybuf + o_y, b_y, mask=m_dt)
        else:
            if MODE == 2:
                b_y = (b_y + tl.load(p_ybuf + o_y, mask=m_dt, other=0.0)) * scale
            if HAS_Z:
                b_z = tl.load(p_z_row + o_t[None, :] * s_z_l, mask=m_dt, other=0.0).to(tl.float32)
                b_y = b_y * b_z * tl.sigmoid(b_z)
            tl.store(p_out + o_y, b_y.to(p_out.dtype.element_ty), mask=m_dt)

    if STORE_LAST:
        tl.store(p_hlast + (i_b64 * dim + o_d[:, None]) * N + o_n[None, :], b_h, mask=m_dn)


@triton.jit
def _selective_scan_fwd_kernel(
    # pointers: forward direction, shared, backward direction (bi only; the launcher passes twins), outputs
    p_u, p_delta, p_A, p_B, p_C, p_D, p_bias,
    p_z, p_h0, p_out, p_hlast, p_states, p_ybuf,
    p_ub, p_deltab, p_Ab, p_Bb, p_Cb, p_Db, p_biasb, p_states_b,
    # sizes
    dim, L, N, n_chunks, dpg_B, dpg_C, dpg_Bb, dpg_Cb,
    # strides (elements)
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l,
    s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l,
    s_Bb_b, s_Bb_g, s_Bb_n, s_Bb_l, s_Cb_b, s_Cb_g, s_Cb_n, s_Cb_l,
    scale,
    # meta
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, BIDIR: tl.constexpr, HAS_D_B: tl.constexpr, HAS_BIAS_B: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1)
    if BIDIR:
        # backward direction first (state runs from the end), into the fp32 scratch
        _fwd_direction(p_ub, p_deltab, p_Ab, p_Bb, p_Cb, p_Db, p_biasb, p_z, p_h0, p_states_b, p_hlast, p_ybuf, p_out,
                       i_b, i_d, dim, L, N, n_chunks, dpg_Bb, dpg_Cb,
                       s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l,
                       s_Bb_b, s_Bb_g, s_Bb_n, s_Bb_l, s_Cb_b, s_Cb_g, s_Cb_n, s_Cb_l, s_z_b, s_z_d, s_z_l,
                       scale, BLOCK_D, BLOCK_N, CHUNK, HAS_D_B, HAS_Z, HAS_BIAS_B, SOFTPLUS,
                       False, False, True, 1)
        tl.debug_barrier()  # the scratch written above is read back below by other threads of this program
        _fwd_direction(p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_h0, p_states, p_hlast, p_ybuf, p_out,
                       i_b, i_d, dim, L, N, n_chunks, dpg_B, dpg_C,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                       s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l,
                       scale, BLOCK_D, BLOCK_N, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                       False, False, False, 2)
    else:
        _fwd_direction(p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_h0, p_states, p_hlast, p_ybuf, p_out,
                       i_b, i_d, dim, L, N, n_chunks, dpg_B, dpg_C,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                       s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l,
                       scale, BLOCK_D, BLOCK_N, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                       HAS_H0, True, False, 0)


# ----------------------------------------------------------------------------------------------------------------
# launcher


def _bc_strides(X):
    """(batch, N, L) or (batch, G, N, L) -> (G, strides b, g, n, l); G = 1 for the ungrouped layout."""
    if X.dim() == 3:
        return 1, (X.stride(0), 0, X.stride(1), X.stride(2))
    return X.shape[1], (X.stride(0), X.stride(1), X.stride(2), X.stride(3))


def scan_config(batch: int, dim: int, N: int, L: int, groups=(1,), backward: bool = False):
    """(BLOCK_D, BLOCK_N, CHUNK, num_warps) for a problem.

    The chunk block [BLOCK_D, BLOCK_N, CHUNK] is kept near 2048 fp32 elements (4096 in the backward halves it) so the
    scan operands fit in registers of 4 warps. BLOCK_D shrinks when batch * dim / BLOCK_D would leave the 132 SMs of
    an H100 with fewer than ~4 programs each: the sequence is not split across programs, so small channel tiles are
    the parallelism for long L with small batch. With G > 1, BLOCK_D divides dim / G so a tile lies in one group.
    """
    BLOCK_N = triton.next_power_of_2(N)
    CHUNK = 32 if L > 16 else 16
    budget = 2048 if not backward else 1024
    BLOCK_D = max(1, min(16, budget // (BLOCK_N * CHUNK)))
    if BLOCK_N * CHUNK > budget:
        CHUNK = max(16, budget // BLOCK_N)
    # Filling the GPU is moot in the CPU interpreter, where every program costs Python time: keep the tiles large.
    while BLOCK_D > 1 and batch * triton.cdiv(dim, BLOCK_D) < 4 * 132 and not triton_interpreting():
        BLOCK_D //= 2
    for G in groups:
        while BLOCK_D > 1 and (dim // G) % BLOCK_D != 0 and G > 1:
            BLOCK_D //= 2
    num_warps = 4
    return BLOCK_D, BLOCK_N, CHUNK, num_warps


def _lstride(x):
    return (x.stride(0), x.stride(1), x.stride(2))


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool,
                       u_b=None, delta_b=None, A_b=None, B_b=None, C_b=None, D_b=None, delta_bias_b=None,
                       bidirectional: bool = False, divide_out: bool = False, config=None):
    """Launch the forward kernel. Inputs validated by the caller, on one CUDA device (or the interpreter).

    Returns (out, last_state, states, states_b): out (batch, dim, L) in u.dtype; last_state (batch, dim, N) fp32
    (uni only, else an empty tensor); states / states_b (batch, dim, n_chunks, N) fp32, the state entering every
    chunk in scan order (states_b: the backward direction's; empty for uni).
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    twin = lambda b, f: f if b is None else b  # noqa: E731
    u_b, delta_b, A_b, B_b, C_b = twin(u_b, u), twin(delta_b, delta), twin(A_b, A), twin(B_b, B), twin(C_b, C)
    G_B, sB = _bc_strides(B)
    G_C, sC = _bc_strides(C)
    G_Bb, sBb = _bc_strides(B_b)
    G_Cb, sCb = _bc_strides(C_b)
    groups = (G_B, G_C, G_Bb, G_Cb) if bidirectional else (G_B, G_C)
    BLOCK_D, BLOCK_N, CHUNK, num_warps = config or scan_config(batch, dim, N, L, groups)
    n_chunks = triton.cdiv(L, CHUNK)
    A, A_b = A.contiguous(), A_b.contiguous()

    out = torch.empty((batch, dim, L), device=dev, dtype=u.dtype)
    states = torch.empty((batch, dim, n_chunks, N), device=dev, dtype=torch.float32)
    empty = torch.empty(0, device=dev, dtype=torch.float32)
    if bidirectional:
        states_b = torch.empty_like(states)
        ybuf = torch.empty((batch, dim, L), device=dev, dtype=torch.float32)
        last_state = empty
    else:
        states_b, ybuf = empty, empty
        last_state = torch.empty((batch, dim, N), device=dev, dtype=torch.float32)
    zs = _lstride(z) if z is not None else (0, 0, 0)
    grid = (triton.cdiv(dim, BLOCK_D), batch)
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else empty, delta_bias if delta_bias is not None else empty,
        z if z is not None else empty, initial_state if initial_state is not None else empty,
        out, last_state, states, ybuf,
        u_b, delta_b, A_b, B_b, C_b, D_b if D_b is not None else (D if D is not None else empty),
        delta_bias_b if delta_bias_b is not None else (delta_bias if delta_bias is not None else empty), states_b,
        dim, L, N, n_chunks, dim // G_B, dim // G_C, dim // G_Bb, dim // G_Cb,
        *_lstride(u), *_lstride(delta), *sB, *sC, *zs, *_lstride(u_b), *_lstride(delta_b), *sBb, *sCb,
        0.5 if divide_out else 1.0,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, CHUNK=CHUNK,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=initial_state is not None, BIDIR=bidirectional,
        HAS_D_B=(D_b if D_b is not None else D) is not None,
        HAS_BIAS_B=(delta_bias_b if delta_bias_b is not None else delta_bias) is not None,
        num_warps=num_warps,
    )
    return out, last_state, states, states_b
