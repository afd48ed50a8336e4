"""Triton backward kernels of the selective scan (uni- and bidirectional) and their launcher.

Same blocks and grid as the forward (``triton_fwd.py``): ``[CHUNK, NL, BLOCK_D, NH]`` with the time axis in
registers, one program per (channel tile, batch, segment). The adjoint runs against scan order,

    q_t = C_t dy_t + r_t,   r_t = a_{t+1} q_{t+1}          (q_t = dL/dh_t)

so a segment needs the r entering it from the segments after it: a summary pass computes, per segment, the r it
leaves when entered with zero, and the main pass combines them (r = r_k + exp(A sum_k delta) r), as the forward does
with states. Inside a segment the program walks the SAVE-step blocks against scan order; per block it recomputes
the chunk-start states from the saved block-start state (kept in registers), then walks the chunks backwards:
recompute the states of the chunk, run the adjoint, and form every gradient (hb_t = h_t - x_t = a_t h_{t-1}):

    dC_t = sum_d dy_t h_t        dB_t = sum_d q_t d_t u_t      (reduced over the channel tile in the program)
    du_t = d_t sum_n q_t B_t + D dy_t
    dd_t = u_t sum_n q_t B_t + sum_n A q_t hb_t   (times sigmoid for softplus)
    dA   = sum_t d_t q_t hb_t     dD = sum_t dy_t u_t     ddelta_bias = sum_t dd_t     dh_init = a_0 q_0

dB, dC go into fp32 (batch, G, N, L) buffers with atomic adds across channel tiles, and dA, dD, ddelta_bias into
fp32 (dim, [N]) ones with atomic adds across segments and batch rows; when torch.are_deterministic_algorithms_enabled(),
all of them go into partial buffers (per tile; per segment and batch row) summed by the launcher in a fixed order
(bit-identical runs, more memory: at (512, 2304, 16, 16) the dA partials alone are 72 MiB).

Bidirectional: the program does the backward direction of its segment first, then the forward direction; gradients
of inputs the two directions share (a missing ``*_b``) and dz (which needs y_f + y_b) go through fp32 scratch
between the phases.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv, launch
from .triton_fwd import (SAVE_STEPS, _bt, _chunk_adjoint, _chunk_of, _chunk_scan, _exp2, _load_dt, _load_saved,
                         _lstride, _pick, n_saved_states, saved_layout, scan_config, time_contiguous)

SAVE = tl.constexpr(SAVE_STEPS)  # this backward reads the states every SAVE_STEPS steps (the forward's default)
MAIN_META_OVERRIDES: dict = {}  # benchmarks set meta-parameters (maxnreg, ...) of the main pass here for A/B runs


@triton.jit
def _bwd_direction(
    p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias, p_z, p_dout, p_states, p_h0, p_dlast, p_seg_r, p_seg_dt,
    p_du, p_du_acc, p_ddelta, p_ddelta_acc, p_dz, p_dz_acc, p_dB, p_dC, p_dA, p_dD, p_dbias, p_dh0,
    i_b, i_d, i_s, n_dtiles, batch, dim, L, N, n_chunks, seg_chunks, n_seg, G_B, G_C, dpg_B, dpg_C, o_seg,
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_do_b, s_do_d, s_do_l,
    scale,
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_DH0: tl.constexpr, REVERSE: tl.constexpr,
    ACC_U: tl.constexpr, ACC_DT: tl.constexpr, DZ_MODE: tl.constexpr, DETERMINISTIC: tl.constexpr,
    SUMMARY: tl.constexpr, FIRST: tl.constexpr,
):
    """Gradients of one direction over segment i_s. REVERSE: the direction's state runs from the end.

    ACC_U / ACC_DT: add the fp32 partial at p_du_acc / p_ddelta_acc (the other direction's, shared input).
    DZ_MODE 0: no z; 1: dz = dout * y * dsilu(z) (uni); 2: store dout * y * s * dsilu(z) to p_dz_acc (bi phase 1);
    3: add p_dz_acc and store dz (bi phase 2). SUMMARY: only the r this segment passes on when entered with zero
    and its sum of delta, stored at o_seg in the segment buffers.
    """
    BLOCK_N: tl.constexpr = NH * NL
    SAVE_EVERY: tl.constexpr = SAVE // CHUNK
    o_c = tl.arange(0, CHUNK)[:, None, None, None]
    o_k = tl.arange(0, SAVE_EVERY)[:, None, None, None]
    o_n4 = tl.arange(0, NL)[None, :, None, None] * NH + tl.arange(0, NH)[None, None, None, :]  # [1, NL, 1, NH]
    o_d4 = i_d * BLOCK_D + tl.arange(0, BLOCK_D)[None, None, :, None]
    zl = tl.zeros([1, NL, 1, 1], dtype=tl.int32)
    zd = tl.zeros([1, 1, BLOCK_D, 1], dtype=tl.int32)
    o_dl = o_d4 + zl
    m_d4 = o_dl < dim
    m_dn4 = (o_d4 < dim) & (o_n4 < N)
    m_lead = (tl.arange(0, NL) == 0)[None, :, None, None]
    i_b64 = i_b.to(tl.int64)
    g_B = (i_d * BLOCK_D) // dpg_B
    g_C = (i_d * BLOCK_D) // dpg_C

    b_Anat = tl.load(p_A + o_d4 * N + o_n4, mask=m_dn4, other=0.0)
    b_A = b_Anat * 1.4426950408889634
    b_bias = 0.0
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_dl, mask=m_d4, other=0.0)
    if HAS_D:
        b_Dv = tl.load(p_D + o_dl, mask=m_d4, other=0.0)
    o_st4 = (i_b64 * dim + o_d4) * N + o_n4

    p_u4 = p_u + i_b64 * s_u_b + o_dl.to(tl.int64) * s_u_d
    p_dt4 = p_delta + i_b64 * s_dt_b + o_dl.to(tl.int64) * s_dt_d
    p_do4 = p_dout + i_b64 * s_do_b + o_dl.to(tl.int64) * s_do_d
    p_B4 = p_Bt + ((i_b64 * G_B + g_B) * BLOCK_N + o_n4) * L + zd  # [1, NL, BLOCK_D, NH], time contiguous
    p_C4 = p_Ct + ((i_b64 * G_C + g_C) * BLOCK_N + o_n4) * L + zd  # [1, NL, BLOCK_D, NH], time contiguous
    o_g4 = (i_b64 * dim + o_dl) * L  # gradient outputs and scratch: contiguous (batch, dim, L)
    if HAS_Z:
        p_z4 = p_z + i_b64 * s_z_b + o_dl.to(tl.int64) * s_z_d
    n_saves = tl.cdiv(L, SAVE)
    p_st4 = p_states + ((i_b64 * dim + o_d4) * (n_saves - 1 + FIRST)) * N + o_n4  # kept_states a row
    # dB/dC (fp32 (batch, G, BLOCK_N, L) like Bt): atomics, or per-tile partials (n_dtiles, batch, BLOCK_N, L)
    if DETERMINISTIC:
        o_dB4 = ((i_d * batch + i_b64) * BLOCK_N + o_n4) * L
        o_dC4 = o_dB4
    else:
        o_dB4 = ((i_b64 * G_B + g_B) * BLOCK_N + o_n4) * L
        o_dC4 = ((i_b64 * G_C + g_C) * BLOCK_N + o_n4) * L

    c_lo = i_s * seg_chunks
    c_hi = tl.minimum(c_lo + seg_chunks, n_chunks)
    b_r = tl.zeros([1, NL, BLOCK_D, NH], dtype=tl.float32)
    if SUMMARY:
        b_sdt_acc = tl.zeros([1, NL, BLOCK_D, 1], dtype=tl.float32)
        n_c = c_hi - c_lo
        for i in range(0, n_c):
            c = _chunk_of(n_c - 1 - i, c_lo, c_hi, REVERSE)  # against scan order
            o_t4 = c * CHUNK + o_c
            m_t4 = (o_t4 < L) & m_d4
            _, b_dt = _load_dt(p_dt4, o_t4, s_dt_l, m_t4, b_bias, HAS_BIAS, SOFTPLUS)
            b_dy = tl.load(p_do4 + o_t4 * s_do_l, mask=m_t4, other=0.0).to(tl.float32) * scale
            if HAS_Z:
                b_z = tl.load(p_z4 + o_t4 * s_z_l, mask=m_t4, other=0.0).to(tl.float32)
                b_dy = b_dy * b_z * tl.sigmoid(b_z)
            b_C = tl.load(p_C4 + o_t4, mask=o_t4 < L, other=0.0)
            b_a = _exp2(b_dt * b_A)
            _, b_r = _chunk_adjoint(b_a, b_C * b_dy, b_r, o_c, CHUNK, REVERSE)
            b_sdt_acc += tl.sum(b_dt, axis=0, keep_dims=True)
        o_sk = (o_seg + i_b64 * dim + o_d4) * n_seg + i_s
        tl.store(p_seg_dt + o_sk + zl, b_sdt_acc, mask=m_d4 & m_lead)
        tl.store(p_seg_r + o_sk * N + o_n4, b_r, mask=m_dn4)
    else:
        # r entering the segment (against scan order): dlast_state, then the summaries of the later segments
        if HAS_DLAST:
            b_r = tl.load(p_dlast + o_st4, mask=m_dn4, other=0.0)
        if REVERSE:
            n_later = i_s
        else:
            n_later = n_seg - 1 - i_s
        for kk in range(0, n_later):
            if REVERSE:
                k = kk
            else:
                k = n_seg - 1 - kk
            o_sk = (o_seg + i_b64 * dim + o_d4) * n_seg + k
            b_sdt = tl.load(p_seg_dt + o_sk + zl, mask=m_d4, other=0.0)
            b_r = tl.load(p_seg_r + o_sk * N + o_n4, mask=m_dn4, other=0.0) + _exp2(b_A * b_sdt) * b_r

        b_dA = tl.zeros([1, NL, BLOCK_D, NH], dtype=tl.float32)
        b_dDv = tl.zeros([1, NL, BLOCK_D, 1], dtype=tl.float32)
        b_dbias = tl.zeros([1, NL, BLOCK_D, 1], dtype=tl.float32)
        blk_lo = c_lo // SAVE_EVERY
        n_blk = tl.cdiv(c_hi, SAVE_EVERY) - blk_lo
        for ib in range(0, n_blk):
            if REVERSE:
                blk = blk_lo + ib
            else:
                blk = blk_lo + n_blk - 1 - ib
            k_lo = blk * SAVE_EVERY
            k_hi = tl.minimum(k_lo + SAVE_EVERY, n_chunks)
            n_k = k_hi - k_lo
            # states entering each chunk of the block, recomputed from the saved one, kept in registers
            b_h = _load_saved(p_st4, p_h0 + o_st4, blk, n_saves, N, m_dn4, HAS_DH0, REVERSE, FIRST)
            b_hk = tl.zeros([SAVE_EVERY, NL, BLOCK_D, NH], dtype=tl.float32)
            for j in range(0, n_k - 1):
                b_hk = tl.where(o_k == j, b_h, b_hk)
                c = _chunk_of(j, k_lo, k_hi, REVERSE)
                o_t4 = c * CHUNK + o_c
                m_t4 = (o_t4 < L) & m_d4
                b_u = tl.load(p_u4 + o_t4 * s_u_l, mask=m_t4, other=0.0).to(tl.float32)
                _, b_dt = _load_dt(p_dt4, o_t4, s_dt_l, m_t4, b_bias, HAS_BIAS, SOFTPLUS)
                b_B = tl.load(p_B4 + o_t4, mask=o_t4 < L, other=0.0)
                _, b_h = _chunk_scan(_exp2(b_dt * b_A), (b_dt * b_u) * b_B, b_h, o_c, CHUNK, REVERSE)
            b_hk = tl.where(o_k == n_k - 1, b_h, b_hk)

            for jj in range(0, n_k):
                j = n_k - 1 - jj
                c = _chunk_of(j, k_lo, k_hi, REVERSE)
                b_h0 = _pick(b_hk, o_k == j)
                o_t4 = c * CHUNK + o_c
                m_t4 = (o_t4 < L) & m_d4
                m_tn4 = o_t4 < L
                b_u = tl.load(p_u4 + o_t4 * s_u_l, mask=m_t4, other=0.0).to(tl.float32)
                b_raw, b_dt = _load_dt(p_dt4, o_t4, s_dt_l, m_t4, b_bias, HAS_BIAS, SOFTPLUS)
                b_B = tl.load(p_B4 + o_t4, mask=m_tn4, other=0.0)
                b_C = tl.load(p_C4 + o_t4, mask=m_tn4, other=0.0)
                b_do = tl.load(p_do4 + o_t4 * s_do_l, mask=m_t4, other=0.0).to(tl.float32)
                b_a = _exp2(b_dt * b_A)
                b_du = b_dt * b_u
                b_x = b_du * b_B
                b_hs, _ = _chunk_scan(b_a, b_x, b_h0, o_c, CHUNK, REVERSE)
                o_g = o_g4 + o_t4
                m_g = m_t4 & m_lead

                # dy = dout * silu(z) * scale, and dz
                if HAS_Z:
                    b_z = tl.load(p_z4 + o_t4 * s_z_l, mask=m_t4, other=0.0).to(tl.float32)
                    b_sig = tl.sigmoid(b_z)
                    b_dy = b_do * b_z * b_sig * scale
                    b_y = tl.sum(tl.sum(b_hs * b_C, axis=3, keep_dims=True), axis=1, keep_dims=True)
                    if HAS_D:
                        b_y = b_y + b_Dv * b_u
                    b_dzf = b_do * b_sig * (1.0 + b_z * (1.0 - b_sig))  # d silu(z) / dz, times dout
                    if DZ_MODE == 1:
                        tl.store(p_dz + o_g, (b_dzf * b_y).to(p_dz.dtype.element_ty), mask=m_g)
                    elif DZ_MODE == 2:
                        tl.store(p_dz_acc + o_g, b_dzf * b_y * scale, mask=m_g)
                    elif DZ_MODE == 3:
                        b_dzv = b_dzf * b_y * scale + tl.load(p_dz_acc + o_g, mask=m_g, other=0.0)
                        tl.store(p_dz + o_g, b_dzv.to(p_dz.dtype.element_ty), mask=m_g)
                else:
                    b_dy = b_do * scale

                b_qs, b_r = _chunk_adjoint(b_a, b_C * b_dy, b_r, o_c, CHUNK, REVERSE)

                # gradients
                b_P = b_qs * (b_hs - b_x)  # q_t a_t h_{t-1}
                b_dA += tl.sum(b_P * b_dt, axis=0, keep_dims=True)
                b_S1 = tl.sum(tl.sum(b_qs * b_B, axis=3, keep_dims=True), axis=1, keep_dims=True)
                b_S2 = tl.sum(tl.sum(b_P * b_Anat, axis=3, keep_dims=True), axis=1, keep_dims=True)
                b_dC_t = tl.sum(b_hs * b_dy, axis=2, keep_dims=True)  # [CHUNK, NL, 1, NH]
                b_dB_t = tl.sum(b_qs * b_du, axis=2, keep_dims=True)
                b_duv = b_dt * b_S1
                if HAS_D:
                    b_duv += b_Dv * b_dy
                    b_dDv += tl.sum(b_dy * b_u, axis=0, keep_dims=True)
                b_ddt = b_u * b_S1 + b_S2
                if SOFTPLUS:
                    b_ddt = tl.where(b_raw > 20.0, b_ddt, b_ddt * tl.sigmoid(b_raw))
                b_ddt = tl.where(m_t4, b_ddt, 0.0)
                if HAS_BIAS:
                    b_dbias += tl.sum(b_ddt, axis=0, keep_dims=True)
                if ACC_U:
                    b_duv += tl.load(p_du_acc + o_g, mask=m_g, other=0.0)
                if ACC_DT:
                    b_ddt += tl.load(p_ddelta_acc + o_g, mask=m_g, other=0.0)
                tl.store(p_du + o_g, b_duv.to(p_du.dtype.element_ty), mask=m_g)
                tl.store(p_ddelta + o_g, b_ddt.to(p_ddelta.dtype.element_ty), mask=m_g)
                o_tn = o_t4
                if DETERMINISTIC:
                    tl.store(p_dB + o_dB4 + o_tn, b_dB_t, mask=m_tn4)
                    tl.store(p_dC + o_dC4 + o_tn, b_dC_t, mask=m_tn4)
                else:
                    tl.atomic_add(p_dB + o_dB4 + o_tn, b_dB_t, mask=m_tn4, sem="relaxed")
                    tl.atomic_add(p_dC + o_dC4 + o_tn, b_dC_t, mask=m_tn4, sem="relaxed")

        if DETERMINISTIC:  # per-(segment, batch) partials
            o_p2 = (i_s * batch + i_b64) * dim + o_dl
            tl.store(p_dA + (((i_s * batch + i_b64) * dim + o_d4) * N + o_n4), b_dA, mask=m_dn4)
            if HAS_D:
                tl.store(p_dD + o_p2, b_dDv, mask=m_d4 & m_lead)
            if HAS_BIAS:
                tl.store(p_dbias + o_p2, b_dbias, mask=m_d4 & m_lead)
        else:
            tl.atomic_add(p_dA + (o_d4 * N + o_n4), b_dA, mask=m_dn4, sem="relaxed")
            if HAS_D:
                tl.atomic_add(p_dD + o_dl, b_dDv, mask=m_d4 & m_lead, sem="relaxed")
            if HAS_BIAS:
                tl.atomic_add(p_dbias + o_dl, b_dbias, mask=m_d4 & m_lead, sem="relaxed")
        if HAS_DH0:
            if i_s == 0:
                tl.store(p_dh0 + o_st4, b_r, mask=m_dn4)  # dL/dh_init = a_0 q_0, the r left after step 0


@triton.jit
def _selective_scan_bwd_kernel(
    # forward direction inputs and gradients, shared, backward direction (bi only)
    p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_states, p_h0, p_dlast, p_seg_r, p_seg_dt,
    p_du, p_ddelta, p_dB, p_dC, p_dA, p_dD, p_dbias, p_dh0,
    p_z, p_dout, p_dz, p_dz_acc,
    p_ub, p_deltab, p_Ab, p_Bb, p_Cb, p_Db, p_biasb, p_states_b,
    p_dub, p_ddeltab, p_dBb, p_dCb, p_dAb, p_dDb, p_dbiasb,
    # sizes
    batch, dim, L, N, n_chunks, seg_chunks, n_seg, G_B, G_C, dpg_B, dpg_C, G_Bb, G_Cb, dpg_Bb, dpg_Cb,
    # strides
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l, s_do_b, s_do_d, s_do_l,
    s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l,
    scale,
    # meta
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_DH0: tl.constexpr, BIDIR: tl.constexpr, HAS_D_B: tl.constexpr,
    HAS_BIAS_B: tl.constexpr, SHARE_U: tl.constexpr, SHARE_DT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    SUMMARY: tl.constexpr, FIRST: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1)
    i_s = tl.program_id(2)
    n_dtiles = tl.num_programs(0)
    if SUMMARY:
        # grid axis 2: segment + n_seg * direction (1: the backward direction of bi)
        if i_s < n_seg:
            _bwd_direction(p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_dout, p_states, p_h0, p_dlast, p_seg_r,
                           p_seg_dt, p_du, p_du, p_ddelta, p_ddelta, p_dz, p_dz_acc, p_dB, p_dC, p_dA, p_dD,
                           p_dbias, p_dh0,
                           i_b, i_d, i_s, n_dtiles, batch, dim, L, N, n_chunks, seg_chunks, n_seg,
                           G_B, G_C, dpg_B, dpg_C, 0,
                           s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
                           s_do_b, s_do_d, s_do_l, scale,
                           BLOCK_D, NH, NL, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, False, False, False,
                           False, False, 0, DETERMINISTIC, True, FIRST)
        else:
            _bwd_direction(p_ub, p_deltab, p_Ab, p_Bb, p_Cb, p_Db, p_biasb, p_z, p_dout, p_states_b, p_h0, p_dlast,
                           p_seg_r, p_seg_dt, p_dub, p_dub, p_ddeltab, p_ddeltab, p_dz, p_dz_acc, p_dBb, p_dCb,
                           p_dAb, p_dDb, p_dbiasb, p_dh0,
                           i_b, i_d, i_s - n_seg, n_dtiles, batch, dim, L, N, n_chunks, seg_chunks, n_seg,
                           G_Bb, G_Cb, dpg_Bb, dpg_Cb, batch * dim,
                           s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l, s_z_b, s_z_d, s_z_l,
                           s_do_b, s_do_d, s_do_l, scale,
                           BLOCK_D, NH, NL, CHUNK, HAS_D_B, HAS_Z, HAS_BIAS_B, SOFTPLUS, False, False, True,
                           False, False, 0, DETERMINISTIC, True, FIRST)
    elif BIDIR:
        # phase 1: backward direction; shared gradients go to fp32 scratch (p_dub / p_ddeltab point there)
        _bwd_direction(p_ub, p_deltab, p_Ab, p_Bb, p_Cb, p_Db, p_biasb, p_z, p_dout, p_states_b, p_h0, p_dlast,
                       p_seg_r, p_seg_dt, p_dub, p_dub, p_ddeltab, p_ddeltab, p_dz, p_dz_acc, p_dBb, p_dCb,
                       p_dAb, p_dDb, p_dbiasb, p_dh0,
                       i_b, i_d, i_s, n_dtiles, batch, dim, L, N, n_chunks, seg_chunks, n_seg,
                       G_Bb, G_Cb, dpg_Bb, dpg_Cb, batch * dim,
                       s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l, s_z_b, s_z_d, s_z_l,
                       s_do_b, s_do_d, s_do_l, scale,
                       BLOCK_D, NH, NL, CHUNK, HAS_D_B, HAS_Z, HAS_BIAS_B, SOFTPLUS, False, False, True,
                       False, False, 2 if HAS_Z else 0, DETERMINISTIC, False, FIRST)
        tl.debug_barrier()  # phase 2 reads the scratch written above
        _bwd_direction(p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_dout, p_states, p_h0, p_dlast, p_seg_r,
                       p_seg_dt, p_du, p_dub, p_ddelta, p_ddeltab, p_dz, p_dz_acc, p_dB, p_dC, p_dA, p_dD,
                       p_dbias, p_dh0,
                       i_b, i_d, i_s, n_dtiles, batch, dim, L, N, n_chunks, seg_chunks, n_seg,
                       G_B, G_C, dpg_B, dpg_C, 0,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
                       s_do_b, s_do_d, s_do_l, scale,
                       BLOCK_D, NH, NL, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, False, False, False,
                       SHARE_U, SHARE_DT, 3 if HAS_Z else 0, DETERMINISTIC, False, FIRST)
    else:
        _bwd_direction(p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_dout, p_states, p_h0, p_dlast, p_seg_r,
                       p_seg_dt, p_du, p_du, p_ddelta, p_ddelta, p_dz, p_dz_acc, p_dB, p_dC, p_dA, p_dD,
                       p_dbias, p_dh0,
                       i_b, i_d, i_s, n_dtiles, batch, dim, L, N, n_chunks, seg_chunks, n_seg,
                       G_B, G_C, dpg_B, dpg_C, 0,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
                       s_do_b, s_do_d, s_do_l, scale,
                       BLOCK_D, NH, NL, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DLAST, HAS_DH0, False,
                       False, False, 1 if HAS_Z else 0, DETERMINISTIC, False, FIRST)


# ----------------------------------------------------------------------------------------------------------------
# launcher


def _finish_bc(buf, X, G, deterministic, batch, n_dtiles):
    """fp32 (.., BLOCK_N, L) accumulation buffer -> gradient shaped (batch, [G,] N, L) and typed like X."""
    N, L = X.shape[-2], X.shape[-1]
    if deterministic:
        # (n_dtiles, batch, BLOCK_N, L) per-tile partials; tiles g*tpg ... (g+1)*tpg - 1 belong to group g
        tpg = n_dtiles // G
        buf = buf.view(G, tpg, batch, buf.shape[-2], L).sum(1).transpose(0, 1)  # (batch, G, BLOCK_N, L)
    buf = buf[..., :N, :]  # (batch, G, N, L)
    if X.dim() == 3:
        buf = buf.reshape(batch, N, L)
    return buf.to(X.dtype)


def selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, states,
                       delta_softplus: bool,
                       u_b=None, delta_b=None, A_b=None, B_b=None, C_b=None, D_b=None, delta_bias_b=None,
                       states_b=None, bidirectional: bool = False, divide_out: bool = False, config=None,
                       deterministic=None):
    """Launch the backward kernels; returns a dict of gradients (keys as the argument names, '*_b' for bi)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    dout, u, delta, z, u_b, delta_b = map(time_contiguous, (dout, u, delta, z, u_b, delta_b))
    twin = lambda b, f: f if b is None else b  # noqa: E731
    share_u, share_dt = u_b is None, delta_b is None
    ub, dtb, Ab, Bb, Cb = twin(u_b, u), twin(delta_b, delta), twin(A_b, A), twin(B_b, B), twin(C_b, C)
    Db, biasb = twin(D_b, D), twin(delta_bias_b, delta_bias)
    Bt, G_B = _bt(B)
    Ct, G_C = _bt(C)
    Btb, G_Bb = _bt(Bb) if Bb is not B else (Bt, G_B)
    Ctb, G_Cb = _bt(Cb) if Cb is not C else (Ct, G_C)
    groups = (G_B, G_C, G_Bb, G_Cb) if bidirectional else (G_B, G_C)
    BLOCK_D, NH, NL, CHUNK, num_warps, n_seg = config or scan_config(
        batch, dim, N, L, u.dtype, groups, dev.index if dev.type == "cuda" else None, backward=True,
        bidirectional=bidirectional)
    BLOCK_N = NH * NL
    n_chunks = cdiv(L, CHUNK)
    n_saves = n_saved_states(L)
    save, first = saved_layout(states, L)
    assert save == SAVE_STEPS, "the segment backward reads the states every SAVE_STEPS steps"
    seg_chunks = cdiv(n_saves, n_seg) * (SAVE_STEPS // CHUNK)
    n_seg = cdiv(n_chunks, seg_chunks)
    n_dtiles = cdiv(dim, BLOCK_D)
    A, Ab = A.contiguous(), Ab.contiguous()
    f32 = torch.float32
    empty = torch.empty(0, device=dev, dtype=f32)

    du = torch.empty((batch, dim, L), device=dev, dtype=u.dtype)
    ddelta = torch.empty((batch, dim, L), device=dev, dtype=delta.dtype)

    def bc_buffer(G):
        if deterministic:
            return torch.empty((n_dtiles, batch, BLOCK_N, L), device=dev, dtype=f32)
        return torch.zeros((batch, G, BLOCK_N, L), device=dev, dtype=f32)

    def partials(*shape):  # sums over segments and batch rows: per (segment, batch row), or one atomic buffer
        if deterministic:
            return torch.empty((n_seg, batch, dim, *shape), device=dev, dtype=f32)
        return torch.zeros((1, 1, dim, *shape), device=dev, dtype=f32)

    dB, dC = bc_buffer(G_B), bc_buffer(G_C)
    dA = partials(N)
    dD = partials() if D is not None else empty
    dbias = partials() if delta_bias is not None else empty
    dh0 = torch.empty((batch, dim, N), device=dev, dtype=f32) if initial_state is not None else empty
    dz = torch.empty((batch, dim, L), device=dev, dtype=z.dtype) if z is not None else empty
    if bidirectional:
        # shared inputs: the backward direction's gradient goes to fp32 scratch, added by the forward phase
        dub = torch.empty((batch, dim, L), device=dev, dtype=f32 if share_u else u.dtype)
        ddeltab = torch.empty((batch, dim, L), device=dev, dtype=f32 if share_dt else delta.dtype)
        dz_acc = torch.empty((batch, dim, L), device=dev, dtype=f32) if z is not None else empty
        dBb = bc_buffer(G_Bb) if (deterministic or B_b is not None) else dB
        dCb = bc_buffer(G_Cb) if (deterministic or C_b is not None) else dC
        dAb = partials(N)
        dDb = partials() if Db is not None else empty
        dbiasb = partials() if biasb is not None else empty
    else:
        dub = ddeltab = dz_acc = dBb = dCb = dAb = dDb = dbiasb = empty
    n_dir = 2 if bidirectional else 1
    if n_seg > 1:
        seg_r = torch.empty((n_dir, batch, dim, n_seg, N), device=dev, dtype=f32)
        seg_dt = torch.empty((n_dir, batch, dim, n_seg), device=dev, dtype=f32)
    else:
        seg_r = seg_dt = empty
    zs = _lstride(z) if z is not None else (0, 0, 0)
    args = (
        u, delta, A, Bt, Ct, D if D is not None else empty, delta_bias if delta_bias is not None else empty, states,
        initial_state if initial_state is not None else empty, dlast_state if dlast_state is not None else empty,
        seg_r, seg_dt,
        du, ddelta, dB, dC, dA, dD, dbias, dh0,
        z if z is not None else empty, dout, dz, dz_acc,
        ub, dtb, Ab, Btb, Ctb, Db if Db is not None else empty, biasb if biasb is not None else empty,
        states_b if states_b is not None else empty,
        dub, ddeltab, dBb, dCb, dAb, dDb, dbiasb,
        batch, dim, L, N, n_chunks, seg_chunks, n_seg,
        G_B, G_C, dim // G_B, dim // G_C, G_Bb, G_Cb, dim // G_Bb, dim // G_Cb,
        *_lstride(u), *_lstride(delta), *zs, *_lstride(dout), *_lstride(ub), *_lstride(dtb),
        0.5 if divide_out else 1.0,
    )
    meta = dict(
        BLOCK_D=BLOCK_D, NH=NH, NL=NL, CHUNK=CHUNK,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_DLAST=dlast_state is not None, HAS_DH0=initial_state is not None, BIDIR=bidirectional,
        HAS_D_B=Db is not None, HAS_BIAS_B=biasb is not None, SHARE_U=share_u, SHARE_DT=share_dt,
        DETERMINISTIC=deterministic, FIRST=first, num_warps=num_warps,
    )
    if n_seg > 1:
        launch(_selective_scan_bwd_kernel, (n_dtiles, batch, n_dir * n_seg), args, dict(meta, SUMMARY=True))
    launch(_selective_scan_bwd_kernel, (n_dtiles, batch, n_seg), args, dict(meta, SUMMARY=False, **MAIN_META_OVERRIDES))

    grads = dict(u=du, delta=ddelta, A=dA.sum((0, 1)))
    grads["B"] = _finish_bc(dB, B, G_B, deterministic, batch, n_dtiles)
    grads["C"] = _finish_bc(dC, C, G_C, deterministic, batch, n_dtiles)
    grads["D"] = dD.sum((0, 1)) if D is not None else None
    grads["delta_bias"] = dbias.sum((0, 1)) if delta_bias is not None else None
    grads["z"] = dz if z is not None else None
    grads["initial_state"] = dh0 if initial_state is not None else None
    if bidirectional:
        grads["u_b"] = None if share_u else dub
        grads["delta_b"] = None if share_dt else ddeltab
        if A_b is None:
            grads["A"] = grads["A"] + dAb.sum((0, 1))
            grads["A_b"] = None
        else:
            grads["A_b"] = dAb.sum((0, 1))
        for name, X, Xb, buf, G in (("B", B, B_b, dBb, G_Bb), ("C", C, C_b, dCb, G_Cb)):
            if Xb is None:
                if deterministic:  # separate partials: add them (atomics already shared the buffer)
                    grads[name] = grads[name] + _finish_bc(buf, X, G, True, batch, n_dtiles)
                grads[name + "_b"] = None
            else:
                grads[name + "_b"] = _finish_bc(buf, Xb, G, deterministic, batch, n_dtiles)
        for name, X, Xb, buf in (("D", D, D_b, dDb), ("delta_bias", delta_bias, delta_bias_b, dbiasb)):
            if Xb is None:
                if X is not None:
                    grads[name] = grads[name] + buf.sum((0, 1))
                grads[name + "_b"] = None
            else:
                grads[name + "_b"] = buf.sum((0, 1))
    return grads
