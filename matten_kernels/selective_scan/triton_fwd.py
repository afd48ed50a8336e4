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
def _pick_last(a, b):
    return b


@triton.jit
def _pick_first(a, b):
    return a


@triton.jit
def _fwd_direction(
    p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias, p_z, p_h0, p_states, p_hlast, p_ybuf, p_out,
    i_b, i_d, dim, L, N, n_chunks, G_B, G_C, dpg_B, dpg_C,
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_bt_n,
    scale,
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_LAST: tl.constexpr, REVERSE: tl.constexpr, MODE: tl.constexpr,
):
    """Scan one direction over the whole sequence for one (batch, channel tile).

    Blocks are 4-d [CHUNK, NH, BLOCK_D, NL] with state index n = nl * NH + nh: Triton's default layout then puts
    the lanes on (BLOCK_D, NL) and keeps the time axis and NH in each thread, so the scan over time runs
    sequentially in registers (no shuffles) and the sum over n is NH in-thread adds plus log2(NL) shuffles.
    B and C come as fp32 (batch, G, L, N) copies (Bt, Ct), contiguous along n, so a thread's NH states load as one
    vector. MODE 0: write out (uni). MODE 1: write y to the fp32 scratch (bi, first direction). MODE 2: add the
    scratch, scale, gate, write out (bi, second direction).
    """
    BLOCK_N: tl.constexpr = NH * NL
    o_dd = tl.arange(0, BLOCK_D)
    o_d = i_d * BLOCK_D + o_dd
    o_c = tl.arange(0, CHUNK)
    o_n4 = tl.arange(0, NL)[None, None, None, :] * NH + tl.arange(0, NH)[None, :, None, None]  # [1, NH, 1, NL]
    o_d4 = o_d[None, None, :, None]  # [1, 1, BLOCK_D, 1]
    m_d4 = o_d4 < dim
    m_n4 = o_n4 < N
    m_dn4 = m_d4 & m_n4
    i_b64 = i_b.to(tl.int64)
    g_B = (i_d * BLOCK_D) // dpg_B  # the tile lies in one group (BLOCK_D divides dim / G when G > 1)
    g_C = (i_d * BLOCK_D) // dpg_C
    zero4 = tl.zeros([CHUNK, NH, BLOCK_D, NL], dtype=tl.int32)

    # A pre-scaled by log2(e): the decay is one exp2; masked states get A = 0 (decay 1, input 0: they stay 0)
    b_A = tl.load(p_A + o_d4 * N + o_n4, mask=m_dn4, other=0.0) * 1.4426950408889634
    if HAS_D:
        b_Dv = tl.load(p_D + o_d, mask=o_d < dim, other=0.0)[None, :]  # [1, BLOCK_D]
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_d4, mask=m_d4, other=0.0)  # [1, 1, BLOCK_D, 1]
    o_st4 = (i_b64 * dim + o_d4) * N + o_n4  # (batch, dim, N) offsets
    if HAS_H0:
        b_h = tl.load(p_h0 + o_st4, mask=m_dn4, other=0.0)
    else:
        b_h = tl.zeros([1, NH, BLOCK_D, NL], dtype=tl.float32)

    p_u4 = p_u + i_b64 * s_u_b + o_d4.to(tl.int64) * s_u_d
    p_dt4 = p_delta + i_b64 * s_dt_b + o_d4.to(tl.int64) * s_dt_d
    # s_bt_n = 1 at run time but not specialised: with no contiguity visible, the loads keep the compute layout
    p_B4 = p_Bt + ((i_b64 * G_B + g_B) * L) * N + o_n4 * s_bt_n + zero4
    p_C4 = p_Ct + ((i_b64 * G_C + g_C) * L) * N + o_n4 * s_bt_n + zero4
    p_st4 = p_states + ((i_b64 * dim + o_d4) * n_chunks) * N + o_n4
    o_y2 = (i_b64 * dim + o_d[None, :]) * L  # [1, BLOCK_D]; out and the scratch are contiguous (batch, dim, L)
    if HAS_Z:
        p_z2 = p_z + i_b64 * s_z_b + o_d[None, :].to(tl.int64) * s_z_d

    for i_c in range(0, n_chunks):
        if REVERSE:
            c = n_chunks - 1 - i_c
        else:
            c = i_c
        tl.store(p_st4 + c * N, b_h, mask=m_dn4)  # state entering this chunk (in scan order), for the backward
        o_t = c * CHUNK + o_c
        o_t4 = o_t[:, None, None, None]
        m_t4 = o_t4 < L
        m_dt4 = m_t4 & m_d4
        b_u = tl.load(p_u4 + o_t4 * s_u_l, mask=m_dt4, other=0.0).to(tl.float32)  # [CHUNK, 1, BLOCK_D, 1]
        b_dt = tl.load(p_dt4 + o_t4 * s_dt_l, mask=m_dt4, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_dt = b_dt + b_bias
        if SOFTPLUS:
            b_dt = _softplus(b_dt)
        b_dt = tl.where(m_dt4, b_dt, 0.0)  # padded steps: decay 1, input 0 (identity of the scan)
        m_tn4 = m_t4 & m_n4
        b_B = tl.load(p_B4 + o_t4 * N, mask=m_tn4, other=0.0)  # [CHUNK, NH, BLOCK_D, NL] (same over BLOCK_D)
        b_C = tl.load(p_C4 + o_t4 * N, mask=m_tn4, other=0.0)

        b_a = tl.exp2(b_dt * b_A)
        b_x = (b_dt * b_u) * b_B
        # fold the carried state into the first step (in scan order), then a plain scan of h_t = a_t h_{t-1} + x_t
        if REVERSE:
            b_x = tl.where((o_c == CHUNK - 1)[:, None, None, None], b_x + b_a * b_h, b_x)
        else:
            b_x = tl.where((o_c == 0)[:, None, None, None], b_x + b_a * b_h, b_x)
        _, b_hc = tl.associative_scan((b_a, b_x), axis=0, combine_fn=_ssm_combine, reverse=REVERSE)
        b_y = tl.sum(tl.sum(b_hc * b_C, axis=3), axis=1)  # [CHUNK, BLOCK_D]
        if REVERSE:
            b_h = tl.reduce(b_hc, 0, _pick_first, keep_dims=True)
        else:
            b_h = tl.reduce(b_hc, 0, _pick_last, keep_dims=True)

        o_t2 = o_t[:, None]
        m_dt2 = (o_t2 < L) & (o_d[None, :] < dim)
        if HAS_D:
            b_y = b_y + b_Dv * tl.sum(tl.sum(b_u, axis=3), axis=1)
        o_y = o_y2 + o_t2
        if MODE == 1:
            tl.store(p_ybuf + o_y, b_y, mask=m_dt2)
        else:
            if MODE == 2:
                b_y = (b_y + tl.load(p_ybuf + o_y, mask=m_dt2, other=0.0)) * scale
            if HAS_Z:
                b_z = tl.load(p_z2 + o_t2 * s_z_l, mask=m_dt2, other=0.0).to(tl.float32)
                b_y = b_y * b_z * tl.sigmoid(b_z)
            tl.store(p_out + o_y, b_y.to(p_out.dtype.element_ty), mask=m_dt2)

    if STORE_LAST:
        tl.store(p_hlast + o_st4, b_h, mask=m_dn4)


@triton.jit(do_not_specialize=["s_u_l", "s_dt_l", "s_z_l", "s_ub_l", "s_dtb_l", "s_bt_n"])
def _selective_scan_fwd_kernel(
    # pointers: forward direction, shared, backward direction (bi only; the launcher passes twins), outputs
    p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias,
    p_z, p_h0, p_out, p_hlast, p_states, p_ybuf,
    p_ub, p_deltab, p_Ab, p_Btb, p_Ctb, p_Db, p_biasb, p_states_b,
    # sizes
    dim, L, N, n_chunks, G_B, G_C, dpg_B, dpg_C, G_Bb, G_Cb, dpg_Bb, dpg_Cb,
    # strides (elements); the time strides are not specialised on 1, so Triton keeps the time axis in-thread
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
    s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l, s_bt_n,
    scale,
    # meta
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, BIDIR: tl.constexpr, HAS_D_B: tl.constexpr, HAS_BIAS_B: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1)
    if BIDIR:
        # backward direction first (state runs from the end), into the fp32 scratch
        _fwd_direction(p_ub, p_deltab, p_Ab, p_Btb, p_Ctb, p_Db, p_biasb, p_z, p_h0, p_states_b, p_hlast, p_ybuf,
                       p_out, i_b, i_d, dim, L, N, n_chunks, G_Bb, G_Cb, dpg_Bb, dpg_Cb,
                       s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l, s_z_b, s_z_d, s_z_l, s_bt_n,
                       scale, BLOCK_D, NH, NL, CHUNK, HAS_D_B, HAS_Z, HAS_BIAS_B, SOFTPLUS,
                       False, False, True, 1)
        tl.debug_barrier()  # the scratch written above is read back below by other threads of this program
        _fwd_direction(p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias, p_z, p_h0, p_states, p_hlast, p_ybuf, p_out,
                       i_b, i_d, dim, L, N, n_chunks, G_B, G_C, dpg_B, dpg_C,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_bt_n,
                       scale, BLOCK_D, NH, NL, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                       False, False, False, 2)
    else:
        _fwd_direction(p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias, p_z, p_h0, p_states, p_hlast, p_ybuf, p_out,
                       i_b, i_d, dim, L, N, n_chunks, G_B, G_C, dpg_B, dpg_C,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_bt_n,
                       scale, BLOCK_D, NH, NL, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                       HAS_H0, True, False, 0)


# ----------------------------------------------------------------------------------------------------------------
# launcher


def _bc_strides(X):
    """(batch, N, L) or (batch, G, N, L) -> (G, strides b, g, n, l); G = 1 for the ungrouped layout."""
    if X.dim() == 3:
        return 1, (X.stride(0), 0, X.stride(1), X.stride(2))
    return X.shape[1], (X.stride(0), X.stride(1), X.stride(2), X.stride(3))


def scan_config(batch: int, dim: int, N: int, L: int, groups=(1,), backward: bool = False):
    """(BLOCK_D, NH, NL, CHUNK, num_warps) for a problem.

    Blocks are [CHUNK, NH, BLOCK_D, NL]: NL lanes share a channel's states (NH each, in registers), 32 / NL channels
    per warp. Each thread handles CHUNK * NH elements per chunk (~32 keeps the backward in registers). One warp per
    program: the grid is the parallelism (batch * dim / BLOCK_D programs), and every cross-lane reduction stays in
    a warp. With G > 1, BLOCK_D divides dim / G so that a tile lies in one group.
    """
    BLOCK_N = triton.next_power_of_2(N)
    NL = min(BLOCK_N, 4 if BLOCK_N <= 32 else 8)
    NH = BLOCK_N // NL
    CHUNK = max(1, min(16, 32 // NH))
    num_warps = 1
    BLOCK_D = (32 // NL) * num_warps
    for G in groups:
        while BLOCK_D > 1 and G > 1 and (dim // G) % BLOCK_D != 0:
            BLOCK_D //= 2
    return BLOCK_D, NH, NL, CHUNK, num_warps


def _bt(X):
    """B or C -> fp32 (batch, G, L, N) contiguous along N (tiny next to u), and G."""
    G = 1 if X.dim() == 3 else X.shape[1]
    return X.to(torch.float32).transpose(-1, -2).contiguous(), G


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
    Bt, G_B = _bt(B)
    Ct, G_C = _bt(C)
    Btb, G_Bb = _bt(B_b) if B_b is not B else (Bt, G_B)
    Ctb, G_Cb = _bt(C_b) if C_b is not C else (Ct, G_C)
    groups = (G_B, G_C, G_Bb, G_Cb) if bidirectional else (G_B, G_C)
    BLOCK_D, NH, NL, CHUNK, num_warps = config or scan_config(batch, dim, N, L, groups)
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
        u, delta, A, Bt, Ct, D if D is not None else empty, delta_bias if delta_bias is not None else empty,
        z if z is not None else empty, initial_state if initial_state is not None else empty,
        out, last_state, states, ybuf,
        u_b, delta_b, A_b, Btb, Ctb, D_b if D_b is not None else (D if D is not None else empty),
        delta_bias_b if delta_bias_b is not None else (delta_bias if delta_bias is not None else empty), states_b,
        dim, L, N, n_chunks, G_B, G_C, dim // G_B, dim // G_C, G_Bb, G_Cb, dim // G_Bb, dim // G_Cb,
        *_lstride(u), *_lstride(delta), *zs, *_lstride(u_b), *_lstride(delta_b), 1,
        0.5 if divide_out else 1.0,
        BLOCK_D=BLOCK_D, NH=NH, NL=NL, CHUNK=CHUNK,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=initial_state is not None, BIDIR=bidirectional,
        HAS_D_B=(D_b if D_b is not None else D) is not None,
        HAS_BIAS_B=(delta_bias_b if delta_bias_b is not None else delta_bias) is not None,
        num_warps=num_warps,
    )
    return out, last_state, states, states_b
