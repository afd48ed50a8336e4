"""Triton backward kernel of the selective scan (uni- and bidirectional) and its launcher.

One program per (channel tile, batch), walking the chunks in the reverse of the scan order. Per chunk it
recomputes the states from the saved chunk-start state (forward associative scan, exactly as the forward kernel),
then runs the adjoint recurrence as a second associative scan in the other direction:

    q_t = C_t dy_t + a_{t+1} q_{t+1}          (q_t = dL/dh_t; a_{t+1} from delta shifted by one step)

Everything else is elementwise on the chunk block and reductions of it, fused (hb_t = h_t - b_t = a_t h_{t-1}):
    dC_t = sum_d dy_t h_t        dB_t = sum_d q_t d_t u_t      (reduced over the channel tile in the program)
    du_t = d_t sum_n q_t B_t + D dy_t
    dd_t = u_t sum_n q_t B_t + sum_n A q_t hb_t   (times sigmoid for softplus)
    dA   = sum_t d_t q_t hb_t     dD = sum_t dy_t u_t     ddelta_bias = sum_t dd_t     dh_init = a_0 q_0
dA, dD, ddelta_bias leave the program as per-batch partials (batch, dim, ...) summed by the launcher (deterministic).
dB, dC go into fp32 (batch, G, N, L) buffers with atomic adds across channel tiles, or, when
torch.are_deterministic_algorithms_enabled(), into per-tile partial buffers summed by the launcher (bit-identical
runs, more memory).

Bidirectional: the program does the backward direction first, then the forward direction; gradients of inputs the
two directions share (a missing ``*_b``) and dz (which needs y_f + y_b) go through fp32 scratch between the phases.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import _bc_strides, _lstride, _softplus, _ssm_combine, scan_config


@triton.jit
def _bwd_direction(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_dout, p_states, p_dlast,
    p_du, p_du_acc, p_ddelta, p_ddelta_acc, p_dz, p_dz_acc, p_dB, p_dC, p_dA, p_dD, p_dbias, p_dh0,
    i_b, i_d, n_dtiles, batch, dim, L, N, n_chunks, G_B, G_C, dpg_B, dpg_C,
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l, s_do_b, s_do_d, s_do_l,
    scale,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_DH0: tl.constexpr, REVERSE: tl.constexpr,
    ACC_U: tl.constexpr, ACC_DT: tl.constexpr, DZ_MODE: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """Gradients of one direction. REVERSE: this direction's state runs from the end (bi's backward direction).

    ACC_U / ACC_DT: add the fp32 partial at p_du_acc / p_ddelta_acc (the other direction's, shared input).
    DZ_MODE 0: no z; 1: dz = dout * y * dsilu(z) (uni); 2: store dout * y * s * dsilu(z) to p_dz_acc (bi phase 1);
    3: add p_dz_acc and store dz (bi phase 2).
    """
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, CHUNK)
    m_d = o_d < dim
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    i_b64 = i_b.to(tl.int64)
    g_B = (i_d * BLOCK_D) // dpg_B
    g_C = (i_d * BLOCK_D) // dpg_C

    b_Anat = tl.load(p_A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0)
    b_A = b_Anat * 1.4426950408889634
    if HAS_D:
        b_Dv = tl.load(p_D + o_d, mask=m_d, other=0.0)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_d, mask=m_d, other=0.0)
    if HAS_DLAST:
        b_q = tl.load(p_dlast + (i_b64 * dim + o_d[:, None]) * N + o_n[None, :], mask=m_dn, other=0.0)
    else:
        b_q = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    b_dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    b_dDv = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_dbias = tl.zeros([BLOCK_D], dtype=tl.float32)

    p_u_row = p_u + i_b64 * s_u_b + o_d[:, None].to(tl.int64) * s_u_d
    p_dt_row = p_delta + i_b64 * s_dt_b + o_d[:, None].to(tl.int64) * s_dt_d
    p_do_row = p_dout + i_b64 * s_do_b + o_d[:, None].to(tl.int64) * s_do_d
    p_B_row = p_B + i_b64 * s_B_b + g_B * s_B_g + o_n[:, None] * s_B_n
    p_C_row = p_C + i_b64 * s_C_b + g_C * s_C_g + o_n[:, None] * s_C_n
    p_st_row = p_states + ((i_b64 * dim + o_d[:, None]) * n_chunks) * N + o_n[None, :]
    o_g_row = (i_b64 * dim + o_d[:, None]) * L  # gradient outputs and scratch: contiguous (batch, dim, L)
    if HAS_Z:
        p_z_row = p_z + i_b64 * s_z_b + o_d[:, None].to(tl.int64) * s_z_d
    # dB/dC: atomics into (batch, G, N, L), or per-tile partials (n_dtiles, batch, N, L) when deterministic
    if DETERMINISTIC:
        o_dB_row = ((i_d * batch + i_b64) * N + o_n[:, None]) * L
        o_dC_row = o_dB_row
    else:
        o_dB_row = ((i_b64 * G_B + g_B) * N + o_n[:, None]) * L
        o_dC_row = ((i_b64 * G_C + g_C) * N + o_n[:, None]) * L

    for i_c in range(0, n_chunks):
        if REVERSE:
            c = i_c
        else:
            c = n_chunks - 1 - i_c
        b_h0 = tl.load(p_st_row + c * N, mask=m_dn, other=0.0)
        o_t = c * CHUNK + o_c
        m_t = o_t < L
        m_dt = m_d[:, None] & m_t[None, :]
        m_nt = m_n[:, None] & m_t[None, :]
        b_u = tl.load(p_u_row + o_t[None, :] * s_u_l, mask=m_dt, other=0.0).to(tl.float32)
        b_dtr = tl.load(p_dt_row + o_t[None, :] * s_dt_l, mask=m_dt, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_dtr = b_dtr + b_bias[:, None]
        if SOFTPLUS:
            b_dt = _softplus(b_dtr)
        else:
            b_dt = b_dtr
        b_dt = tl.where(m_dt, b_dt, 0.0)
        # delta one step later in scan order: the decay that carries q back to this step
        if REVERSE:
            o_ts = o_t - 1
            m_ts = m_d[:, None] & (o_ts >= 0)[None, :] & m_t[None, :]
        else:
            o_ts = o_t + 1
            m_ts = m_d[:, None] & (o_ts < L)[None, :]
        b_dts = tl.load(p_dt_row + o_ts[None, :] * s_dt_l, mask=m_ts, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_dts = b_dts + b_bias[:, None]
        if SOFTPLUS:
            b_dts = _softplus(b_dts)
        b_dts = tl.where(m_ts, b_dts, 0.0)
        b_B = tl.load(p_B_row + o_t[None, :] * s_B_l, mask=m_nt, other=0.0).to(tl.float32)
        b_C = tl.load(p_C_row + o_t[None, :] * s_C_l, mask=m_nt, other=0.0).to(tl.float32)
        b_do = tl.load(p_do_row + o_t[None, :] * s_do_l, mask=m_dt, other=0.0).to(tl.float32)

        # recompute the states of this chunk
        b_a = tl.exp2(b_dt[:, None, :] * b_A[:, :, None])
        b_du = b_dt * b_u
        b_x = b_du[:, None, :] * b_B[None, :, :]
        b_ac, b_hc = tl.associative_scan((b_a, b_x), axis=2, combine_fn=_ssm_combine, reverse=REVERSE)
        b_hc = b_ac * b_h0[:, :, None] + b_hc

        # dy = dout * silu(z) * scale, and dz
        if HAS_Z:
            b_z = tl.load(p_z_row + o_t[None, :] * s_z_l, mask=m_dt, other=0.0).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
            b_dy = b_do * b_z * b_sig * scale
            b_y = tl.sum(b_hc * b_C[None, :, :], axis=1)
            if HAS_D:
                b_y = b_y + b_Dv[:, None] * b_u
            b_dzf = b_do * b_sig * (1.0 + b_z * (1.0 - b_sig))  # d silu(z) / dz, times dout
            o_g = o_g_row + o_t[None, :]
            if DZ_MODE == 1:
                tl.store(p_dz + o_g, (b_dzf * b_y).to(p_dz.dtype.element_ty), mask=m_dt)
            elif DZ_MODE == 2:
                tl.store(p_dz_acc + o_g, b_dzf * b_y * scale, mask=m_dt)
            elif DZ_MODE == 3:
                b_dzv = b_dzf * b_y * scale + tl.load(p_dz_acc + o_g, mask=m_dt, other=0.0)
                tl.store(p_dz + o_g, b_dzv.to(p_dz.dtype.element_ty), mask=m_dt)
        else:
            b_dy = b_do * scale

        # adjoint scan (other direction), with carry q from the chunk after this one in scan order
        b_al = tl.exp2(b_dts[:, None, :] * b_A[:, :, None])
        b_g = b_C[None, :, :] * b_dy[:, None, :]
        b_aq, b_qc = tl.associative_scan((b_al, b_g), axis=2, combine_fn=_ssm_combine, reverse=not REVERSE)
        b_qc = b_aq * b_q[:, :, None] + b_qc
        if REVERSE:
            b_q = tl.sum(tl.where((o_c == CHUNK - 1)[None, None, :], b_qc, 0.0), axis=2)
        else:
            b_q = tl.sum(tl.where((o_c == 0)[None, None, :], b_qc, 0.0), axis=2)

        # gradients
        b_P = b_qc * (b_hc - b_x)  # q_t a_t h_{t-1}
        b_dA += tl.sum(b_P * b_dt[:, None, :], axis=2)
        b_S1 = tl.sum(b_qc * b_B[None, :, :], axis=1)
        b_S2 = tl.sum(b_P * b_Anat[:, :, None], axis=1)
        b_dC_t = tl.sum(b_hc * b_dy[:, None, :], axis=0)  # [BLOCK_N, CHUNK]
        b_dB_t = tl.sum(b_qc * b_du[:, None, :], axis=0)
        b_duv = b_dt * b_S1
        if HAS_D:
            b_duv += b_Dv[:, None] * b_dy
            b_dDv += tl.sum(tl.where(m_dt, b_dy * b_u, 0.0), axis=1)
        b_ddt = b_u * b_S1 + b_S2
        if SOFTPLUS:
            b_ddt = tl.where(b_dtr > 20.0, b_ddt, b_ddt * tl.sigmoid(b_dtr))
        b_ddt = tl.where(m_dt, b_ddt, 0.0)
        if HAS_BIAS:
            b_dbias += tl.sum(b_ddt, axis=1)
        o_g = o_g_row + o_t[None, :]
        if ACC_U:
            b_duv += tl.load(p_du_acc + o_g, mask=m_dt, other=0.0)
        if ACC_DT:
            b_ddt += tl.load(p_ddelta_acc + o_g, mask=m_dt, other=0.0)
        tl.store(p_du + o_g, b_duv.to(p_du.dtype.element_ty), mask=m_dt)
        tl.store(p_ddelta + o_g, b_ddt.to(p_ddelta.dtype.element_ty), mask=m_dt)
        if DETERMINISTIC:
            tl.store(p_dB + o_dB_row + o_t[None, :], b_dB_t, mask=m_nt)
            tl.store(p_dC + o_dC_row + o_t[None, :], b_dC_t, mask=m_nt)
        else:
            tl.atomic_add(p_dB + o_dB_row + o_t[None, :], b_dB_t, mask=m_nt, sem="relaxed")
            tl.atomic_add(p_dC + o_dC_row + o_t[None, :], b_dC_t, mask=m_nt, sem="relaxed")

    o_dn = (i_b64 * dim + o_d[:, None]) * N + o_n[None, :]
    tl.store(p_dA + o_dn, b_dA, mask=m_dn)
    if HAS_D:
        tl.store(p_dD + i_b64 * dim + o_d, b_dDv, mask=m_d)
    if HAS_BIAS:
        tl.store(p_dbias + i_b64 * dim + o_d, b_dbias, mask=m_d)
    if HAS_DH0:
        # dL/dh_init = a_0 q_0 (q now holds q_0, the adjoint of the state after step 0)
        b_dt0 = tl.load(p_delta + i_b64 * s_dt_b + o_d.to(tl.int64) * s_dt_d, mask=m_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_dt0 = b_dt0 + b_bias
        if SOFTPLUS:
            b_dt0 = _softplus(b_dt0)
        b_a0 = tl.exp2(b_dt0[:, None] * b_A)
        tl.store(p_dh0 + o_dn, b_a0 * b_q, mask=m_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    # forward direction inputs and gradients, shared, backward direction (bi only)
    p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_states, p_dlast,
    p_du, p_ddelta, p_dB, p_dC, p_dA, p_dD, p_dbias, p_dh0,
    p_z, p_dout, p_dz, p_dz_acc,
    p_ub, p_deltab, p_Ab, p_Bb, p_Cb, p_Db, p_biasb, p_states_b,
    p_dub, p_ddeltab, p_dBb, p_dCb, p_dAb, p_dDb, p_dbiasb,
    # sizes
    batch, dim, L, N, n_chunks, G_B, G_C, dpg_B, dpg_C, G_Bb, G_Cb, dpg_Bb, dpg_Cb,
    # strides
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l, s_do_b, s_do_d, s_do_l,
    s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l,
    s_Bb_b, s_Bb_g, s_Bb_n, s_Bb_l, s_Cb_b, s_Cb_g, s_Cb_n, s_Cb_l,
    scale,
    # meta
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_DH0: tl.constexpr, BIDIR: tl.constexpr, HAS_D_B: tl.constexpr,
    HAS_BIAS_B: tl.constexpr, SHARE_U: tl.constexpr, SHARE_DT: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1)
    n_dtiles = tl.num_programs(0)
    if BIDIR:
        # phase 1: backward direction; shared gradients go to fp32 scratch (p_dub / p_ddeltab point there)
        _bwd_direction(p_ub, p_deltab, p_Ab, p_Bb, p_Cb, p_Db, p_biasb, p_z, p_dout, p_states_b, p_dlast,
                       p_dub, p_dub, p_ddeltab, p_ddeltab, p_dz, p_dz_acc, p_dBb, p_dCb, p_dAb, p_dDb, p_dbiasb,
                       p_dh0,
                       i_b, i_d, n_dtiles, batch, dim, L, N, n_chunks, G_Bb, G_Cb, dpg_Bb, dpg_Cb,
                       s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l,
                       s_Bb_b, s_Bb_g, s_Bb_n, s_Bb_l, s_Cb_b, s_Cb_g, s_Cb_n, s_Cb_l, s_z_b, s_z_d, s_z_l,
                       s_do_b, s_do_d, s_do_l, scale,
                       BLOCK_D, BLOCK_N, CHUNK, HAS_D_B, HAS_Z, HAS_BIAS_B, SOFTPLUS, False, False, True,
                       False, False, 2 if HAS_Z else 0, DETERMINISTIC)
        tl.debug_barrier()  # phase 2 reads the scratch written above
        _bwd_direction(p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_dout, p_states, p_dlast,
                       p_du, p_dub, p_ddelta, p_ddeltab, p_dz, p_dz_acc, p_dB, p_dC, p_dA, p_dD, p_dbias, p_dh0,
                       i_b, i_d, n_dtiles, batch, dim, L, N, n_chunks, G_B, G_C, dpg_B, dpg_C,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                       s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l,
                       s_do_b, s_do_d, s_do_l, scale,
                       BLOCK_D, BLOCK_N, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, False, False, False,
                       SHARE_U, SHARE_DT, 3 if HAS_Z else 0, DETERMINISTIC)
    else:
        _bwd_direction(p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_dout, p_states, p_dlast,
                       p_du, p_du, p_ddelta, p_ddelta, p_dz, p_dz_acc, p_dB, p_dC, p_dA, p_dD, p_dbias, p_dh0,
                       i_b, i_d, n_dtiles, batch, dim, L, N, n_chunks, G_B, G_C, dpg_B, dpg_C,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                       s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l,
                       s_do_b, s_do_d, s_do_l, scale,
                       BLOCK_D, BLOCK_N, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DLAST, HAS_DH0, False,
                       False, False, 1 if HAS_Z else 0, DETERMINISTIC)


# ----------------------------------------------------------------------------------------------------------------
# launcher


def _finish_bc(buf, X, G, deterministic, batch, n_dtiles):
    """fp32 accumulation buffer -> gradient shaped and typed like X."""
    N, L = X.shape[-2], X.shape[-1]
    if deterministic:
        # (n_dtiles, batch, N, L) per-tile partials; tiles g*tpg ... (g+1)*tpg - 1 belong to group g
        tpg = n_dtiles // G
        buf = buf.view(G, tpg, batch, N, L).sum(1).transpose(0, 1)  # (batch, G, N, L)
    if X.dim() == 3:
        buf = buf.reshape(batch, N, L)
    return buf.to(X.dtype)


def selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, states,
                       delta_softplus: bool,
                       u_b=None, delta_b=None, A_b=None, B_b=None, C_b=None, D_b=None, delta_bias_b=None,
                       states_b=None, bidirectional: bool = False, divide_out: bool = False, config=None,
                       deterministic=None):
    """Launch the backward kernel; returns a dict of gradients (keys as the argument names, '*_b' for bi)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    twin = lambda b, f: f if b is None else b  # noqa: E731
    share_u, share_dt = u_b is None, delta_b is None
    ub, dtb, Ab, Bb, Cb = twin(u_b, u), twin(delta_b, delta), twin(A_b, A), twin(B_b, B), twin(C_b, C)
    Db, biasb = twin(D_b, D), twin(delta_bias_b, delta_bias)
    G_B, sB = _bc_strides(B)
    G_C, sC = _bc_strides(C)
    G_Bb, sBb = _bc_strides(Bb)
    G_Cb, sCb = _bc_strides(Cb)
    groups = (G_B, G_C, G_Bb, G_Cb) if bidirectional else (G_B, G_C)
    BLOCK_D, BLOCK_N, CHUNK, num_warps = config or scan_config(batch, dim, N, L, groups)
    n_chunks = triton.cdiv(L, CHUNK)
    assert states.shape[2] == n_chunks, "forward and backward must use the same chunk size"
    n_dtiles = triton.cdiv(dim, BLOCK_D)
    A, Ab = A.contiguous(), Ab.contiguous()
    f32 = torch.float32
    empty = torch.empty(0, device=dev, dtype=f32)

    du = torch.empty((batch, dim, L), device=dev, dtype=u.dtype)
    ddelta = torch.empty((batch, dim, L), device=dev, dtype=delta.dtype)

    def bc_buffer():
        if deterministic:
            return torch.empty((n_dtiles, batch, N, L), device=dev, dtype=f32)
        return None

    dB = bc_buffer() if deterministic else torch.zeros((batch, G_B, N, L), device=dev, dtype=f32)
    dC = bc_buffer() if deterministic else torch.zeros((batch, G_C, N, L), device=dev, dtype=f32)
    dA = torch.empty((batch, dim, N), device=dev, dtype=f32)
    dD = torch.empty((batch, dim), device=dev, dtype=f32) if D is not None else empty
    dbias = torch.empty((batch, dim), device=dev, dtype=f32) if delta_bias is not None else empty
    dh0 = torch.empty((batch, dim, N), device=dev, dtype=f32) if initial_state is not None else empty
    dz = torch.empty((batch, dim, L), device=dev, dtype=z.dtype) if z is not None else empty
    if bidirectional:
        # shared inputs: the backward direction's gradient goes to fp32 scratch, added by the forward phase
        dub = torch.empty((batch, dim, L), device=dev, dtype=f32 if share_u else u.dtype)
        ddeltab = torch.empty((batch, dim, L), device=dev, dtype=f32 if share_dt else delta.dtype)
        dz_acc = torch.empty((batch, dim, L), device=dev, dtype=f32) if z is not None else empty
        dBb = bc_buffer() if deterministic else (
            dB if B_b is None else torch.zeros((batch, G_Bb, N, L), device=dev, dtype=f32))
        dCb = bc_buffer() if deterministic else (
            dC if C_b is None else torch.zeros((batch, G_Cb, N, L), device=dev, dtype=f32))
        dAb = torch.empty((batch, dim, N), device=dev, dtype=f32)
        dDb = torch.empty((batch, dim), device=dev, dtype=f32) if Db is not None else empty
        dbiasb = torch.empty((batch, dim), device=dev, dtype=f32) if biasb is not None else empty
    else:
        dub = ddeltab = dz_acc = dBb = dCb = dAb = dDb = dbiasb = empty
    zs = _lstride(z) if z is not None else (0, 0, 0)
    grid = (n_dtiles, batch)
    _selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else empty, delta_bias if delta_bias is not None else empty, states,
        dlast_state if dlast_state is not None else empty,
        du, ddelta, dB, dC, dA, dD, dbias, dh0,
        z if z is not None else empty, dout, dz, dz_acc,
        ub, dtb, Ab, Bb, Cb, Db if Db is not None else empty, biasb if biasb is not None else empty,
        states_b if states_b is not None else empty,
        dub, ddeltab, dBb, dCb, dAb, dDb, dbiasb,
        batch, dim, L, N, n_chunks, G_B, G_C, dim // G_B, dim // G_C, G_Bb, G_Cb, dim // G_Bb, dim // G_Cb,
        *_lstride(u), *_lstride(delta), *sB, *sC, *zs, *_lstride(dout), *_lstride(ub), *_lstride(dtb), *sBb, *sCb,
        0.5 if divide_out else 1.0,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, CHUNK=CHUNK,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_DLAST=dlast_state is not None, HAS_DH0=initial_state is not None, BIDIR=bidirectional,
        HAS_D_B=Db is not None, HAS_BIAS_B=biasb is not None, SHARE_U=share_u, SHARE_DT=share_dt,
        DETERMINISTIC=deterministic, num_warps=num_warps,
    )
    grads = dict(u=du, delta=ddelta, A=dA.sum(0), dB_buf=dB, dC_buf=dC)
    grads["B"] = _finish_bc(dB, B, G_B, deterministic, batch, n_dtiles)
    grads["C"] = _finish_bc(dC, C, G_C, deterministic, batch, n_dtiles)
    del grads["dB_buf"], grads["dC_buf"]
    grads["D"] = dD.sum(0) if D is not None else None
    grads["delta_bias"] = dbias.sum(0) if delta_bias is not None else None
    grads["z"] = dz if z is not None else None
    grads["initial_state"] = dh0 if initial_state is not None else None
    if bidirectional:
        grads["u_b"] = None if share_u else dub
        grads["delta_b"] = None if share_dt else ddeltab
        if A_b is None:
            grads["A"] = grads["A"] + dAb.sum(0)
            grads["A_b"] = None
        else:
            grads["A_b"] = dAb.sum(0)
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
                    grads[name] = grads[name] + buf.sum(0)
                grads[name + "_b"] = None
            else:
                grads[name + "_b"] = buf.sum(0)
    return grads
