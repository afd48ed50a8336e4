"""Triton forward kernels of the selective scan (uni- and bidirectional), shared helpers, and the launcher.

Blocks are 4-d ``[CHUNK, NL, BLOCK_D, NH]``: a state index is n = nl * NH + nh, the NL lanes of a channel share its
states (NH each in registers), 32 / NL channels per warp. The time axis stays in each thread, so the recurrence
h_t = a_t h_{t-1} + x_t over a chunk runs sequentially in registers (:func:`_chunk_scan`: one FMA per element, the
step picked by masks that fold to register moves) and the sum over n is NH in-thread adds plus log2(NL) shuffles.
Loads are shaped so that Triton's coalescer gives them that same thread mapping (no layout conversion in the loop
with Triton 3.6, which orders tied dimensions ascending): u, delta, z ``[CHUNK, NL, BLOCK_D, 1]`` (time contiguous,
CHUNK = 4 steps), B and C as fp32 ``(batch, G, N, L)`` copies (tiny next to u) ``[CHUNK, NL, BLOCK_D, NH]``.

Parallelism: one program per (channel tile, batch, segment of the sequence). When batch * dim channels cannot fill
the GPU (global and long shapes), the sequence is split into segments: a summary pass computes, per segment, the
state it ends in when started from zero and the sum of its softplus(delta) (its total decay is exp(A * that sum));
the main pass combines the summaries of the segments before it into its starting state, then scans the segment.
The state is saved (fp32) every ``SAVE`` steps for the backward (the first, the initial state or zero, only in rows
of at least 1024 steps: :func:`keeps_first`), never a (batch, dim, L, N) tensor. ``SAVE`` is ``SAVE_STEPS`` (64,
what the segment backward reads) or, for rows the lanes backward will take, that kernel's window (128 or 256 steps,
the only states it reads: :func:`.triton_bwd_lanes.lanes_save_steps`).

Long 16-bit sequences over many channels take the one-pass forward of :mod:`.triton_fwd_lanes` instead (same
outputs and saved states; bidirectional: one launch a direction), which evaluates each decay once; this kernel
serves every other shape.

Bidirectional: the main program first scans its segment of the backward-direction inputs in reverse (reversed
indexing, no flipped copies) into an fp32 scratch, then the forward direction, and writes
out = (y_f + y_b) * s * silu(z) once.

Cost (global XL, 2 x 2304 x 16 x 4096, bf16): one exp2 per (b, d, n, t) element (302M; 16/clk/SM: ~0.08 ms on an
H100); the chunk loop is ~15.7 SASS instructions and 1.5 MUFU per element (sm_90, Triton 3.6; NOTES_scan.md).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._launch import cdiv, launch, next_power_of_2

LOG2E = 1.4426950408889634
SAVE_STEPS = 64  # the forward saves the state every SAVE_STEPS steps (or a multiple: save_every); a multiple of CHUNK
# Rows at least this long also save the state entering their first SAVE-step block (see kept_states).
KEEP_FIRST_MIN_L = 1024
MAIN_META_OVERRIDES: dict = {}  # benchmarks set meta-parameters (maxnreg, ...) of the main pass here for A/B runs


@triton.jit
def _exp2_asm(x):
    # MUFU.EX2 alone: ftz, so no denormal fix-up around it (tl.exp2 adds three instructions); decays below 2^-126
    # flush to zero, which the recurrence cannot tell from their true value.
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _log2_asm(x):
    # MUFU.LG2 alone (tl.log2 is a ~20-instruction polynomial); used on 1 + e^x >= 1 only
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _exp2_portable(x):
    return tl.exp2(x)


@triton.jit
def _log2_portable(x):
    return tl.log2(x)


# The CPU interpreter cannot run PTX: it takes the portable forms (the environment is read once, at import).
_exp2 = _exp2_portable if triton_interpreting() else _exp2_asm
_log2 = _log2_portable if triton_interpreting() else _log2_asm


@triton.jit
def _softplus(x):
    # softplus(x) = x for x > 20 (as the reference and mamba); log(1 + e^x) ~ e^x for very negative x. In base 2,
    # so both transcendentals are single MUFU instructions (tl.log, tl.log2 are ~20-instruction polynomials).
    sp = 0.6931471805599453 * _log2(1.0 + _exp2(x * 1.4426950408889634))
    return tl.where(x > 20.0, x, tl.where(x < -15.0, _exp2(x * 1.4426950408889634), sp))


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pick_max(x, m):
    """x[j] along axis 0 where the mask m is true at j only (a register move when axis 0 is in-thread and m is
    known at compile time). A NaN-propagating max against -inf, which LLVM folds to x: the masked sum this replaced
    left one FADD per element (Triton's reduction starts from +0.0, and 0 + x is not x for x = -0)."""
    return tl.reduce(tl.where(m, x, float("-inf")), 0, _maximum, keep_dims=True)


@triton.jit
def _pick_sum(x, m):
    """:func:`_pick_max` for the interpreter, which runs a reduction with our own combine function one Python call
    per element pair (420 of one mixer test's 430 s) and tl.sum as one numpy call. The same x[j], except a -0
    that comes out +0."""
    return tl.sum(tl.where(m, x, 0.0), 0, keep_dims=True)


_pick = _pick_sum if triton_interpreting() else _pick_max


@triton.jit
def _saved_index(blk, n_saves, REVERSE: tl.constexpr, FIRST: tl.constexpr):
    """Where the state entering SAVE-step block blk (natural order) of a row's n_saves is kept among its
    kept_states. FIRST (keeps_first): every block's, at blk. Else -1 for the block its direction starts from (0; the
    reverse direction's last), which is not saved."""
    if FIRST:
        return blk
    elif REVERSE:
        return tl.where(blk == n_saves - 1, -1, blk)
    else:
        return blk - 1


@triton.jit
def _mask_if(mask, cond):
    """mask where the scalar cond holds, else all False. Not `mask & cond`: Triton 3.9's interpreter gives a tensor
    and a scalar comparison combined that way an int32 mask, which its loads reject; the compiled code is the same."""
    return tl.where(cond, mask, False)


@triton.jit
def _load_saved(p_st, p_h0, blk, n_saves, N, mask, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                FIRST: tl.constexpr):
    """The state entering SAVE-step block blk: saved (p_st: the row's kept states), or (not FIRST) for the
    direction's first block the initial state (p_h0, offset like p_st; HAS_H0) or zero."""
    if FIRST:
        return tl.load(p_st + blk * N, mask=mask, other=0.0)
    i = _saved_index(blk, n_saves, REVERSE, FIRST)
    h = tl.load(p_st + tl.maximum(i, 0) * N, mask=_mask_if(mask, i >= 0), other=0.0)
    if HAS_H0:
        h += tl.load(p_h0, mask=_mask_if(mask, i < 0), other=0.0)
    return h


@triton.jit
def _chunk_scan(a, x, h, o_c, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """h_t = a_t h_{t-1} + x_t along axis 0 in scan order (descending t if REVERSE), from the carry h [1, ...].

    Returns (the states of every step, the state after the last step in scan order).
    """
    hs = tl.zeros_like(x)
    for j in tl.static_range(CHUNK):
        if REVERSE:
            m = o_c == CHUNK - 1 - j
        else:
            m = o_c == j
        h = _pick(a, m) * h + _pick(x, m)
        hs = tl.where(m, h, hs)
    return hs, h


@triton.jit
def _chunk_adjoint(a, g, r, o_c, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """The adjoint of :func:`_chunk_scan`, against scan order: q_t = g_t + r, then r = a_t q_t.

    r comes in as a_{t+1} q_{t+1} from the next chunk in scan order (0 after the end) and leaves as a_t q_t of the
    chunk's first step. Returns (q of every step, r).
    """
    qs = tl.zeros_like(g)
    for j in tl.static_range(CHUNK):
        if REVERSE:
            m = o_c == j
        else:
            m = o_c == CHUNK - 1 - j
        q = _pick(g, m) + r
        qs = tl.where(m, q, qs)
        r = _pick(a, m) * q
    return qs, r


@triton.jit
def _chunk_of(i, c_lo, c_hi, REVERSE: tl.constexpr):
    """The i-th chunk of [c_lo, c_hi) in scan order."""
    if REVERSE:
        return c_hi - 1 - i
    return c_lo + i


@triton.jit
def _load_dt(p_dt4, o_t4, s_dt_l, m_t4, b_bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw delta + bias, softplus of it) of a chunk, fp32; padded steps give decay 1 and input 0."""
    b_raw = tl.load(p_dt4 + o_t4 * s_dt_l, mask=m_t4, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_raw = b_raw + b_bias
    if SOFTPLUS:
        b_dt = _softplus(b_raw)
    else:
        b_dt = b_raw
    return b_raw, tl.where(m_t4, b_dt, 0.0)


@triton.jit
def _fwd_direction(
    p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias, p_z, p_h0, p_seg_h, p_seg_dt, p_states, p_hlast, p_ybuf, p_out,
    i_b, i_d, i_s, dim, L, N, n_chunks, seg_chunks, n_seg, G_B, G_C, dpg_B, dpg_C, o_seg,
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
    scale,
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_LAST: tl.constexpr, REVERSE: tl.constexpr, MODE: tl.constexpr,
    FIRST: tl.constexpr, SAVE: tl.constexpr,
):
    """Scan one direction over segment i_s for one (batch, channel tile).

    MODE 0: write out (uni). MODE 1: write y to the fp32 scratch (bi, first direction). MODE 2: add the scratch,
    scale, gate, write out (bi, second direction). MODE 3: summary: start from zero, store the end state and the sum
    of delta of the segment (at o_seg in the segment buffers), nothing else.
    """
    BLOCK_N: tl.constexpr = NH * NL
    SAVE_EVERY: tl.constexpr = SAVE // CHUNK
    o_c = tl.arange(0, CHUNK)[:, None, None, None]
    o_n4 = tl.arange(0, NL)[None, :, None, None] * NH + tl.arange(0, NH)[None, None, None, :]  # [1, NL, 1, NH]
    o_d4 = i_d * BLOCK_D + tl.arange(0, BLOCK_D)[None, None, :, None]  # [1, 1, BLOCK_D, 1]
    zl = tl.zeros([1, NL, 1, 1], dtype=tl.int32)
    zd = tl.zeros([1, 1, BLOCK_D, 1], dtype=tl.int32)
    o_dl = o_d4 + zl  # [1, NL, BLOCK_D, 1]: the NL lanes of a channel load its u, delta, z (a warp broadcast)
    m_d4 = o_dl < dim
    m_dn4 = (o_d4 < dim) & (o_n4 < N)
    m_lead = (tl.arange(0, NL) == 0)[None, :, None, None]  # one lane per channel stores y
    i_b64 = i_b.to(tl.int64)
    g_B = (i_d * BLOCK_D) // dpg_B  # the tile lies in one group (BLOCK_D divides dim / G when G > 1)
    g_C = (i_d * BLOCK_D) // dpg_C

    # A pre-scaled by log2(e): the decay is one exp2; padded states get A = 0 (decay 1, input 0: they stay 0)
    b_A = tl.load(p_A + o_d4 * N + o_n4, mask=m_dn4, other=0.0) * 1.4426950408889634
    b_bias = 0.0
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_dl, mask=m_d4, other=0.0)
    if HAS_D:
        b_Dv = tl.load(p_D + o_dl, mask=m_d4, other=0.0)
    o_st4 = (i_b64 * dim + o_d4) * N + o_n4  # (batch, dim, N)

    # the state entering the segment (scan order): the initial state, then the summaries of the segments before it
    b_h = tl.zeros([1, NL, BLOCK_D, NH], dtype=tl.float32)
    if MODE != 3:
        if HAS_H0:
            b_h = tl.load(p_h0 + o_st4, mask=m_dn4, other=0.0)
        if REVERSE:
            n_prev = n_seg - 1 - i_s
        else:
            n_prev = i_s
        for kk in range(0, n_prev):
            if REVERSE:
                k = n_seg - 1 - kk
            else:
                k = kk
            o_k = (o_seg + i_b64 * dim + o_d4) * n_seg + k
            b_sdt = tl.load(p_seg_dt + o_k + zl, mask=m_d4, other=0.0)
            b_he = tl.load(p_seg_h + o_k * N + o_n4, mask=m_dn4, other=0.0)
            b_h = _exp2(b_A * b_sdt) * b_h + b_he
    b_sdt_acc = tl.zeros([1, NL, BLOCK_D, 1], dtype=tl.float32)

    p_u4 = p_u + i_b64 * s_u_b + o_dl.to(tl.int64) * s_u_d
    p_dt4 = p_delta + i_b64 * s_dt_b + o_dl.to(tl.int64) * s_dt_d
    p_B4 = p_Bt + ((i_b64 * G_B + g_B) * BLOCK_N + o_n4) * L + zd  # [1, NL, BLOCK_D, NH], time contiguous
    p_C4 = p_Ct + ((i_b64 * G_C + g_C) * BLOCK_N + o_n4) * L + zd  # [1, NL, BLOCK_D, NH], time contiguous
    o_y4 = (i_b64 * dim + o_dl) * L  # out and the scratch are contiguous (batch, dim, L)
    if HAS_Z:
        p_z4 = p_z + i_b64 * s_z_b + o_dl.to(tl.int64) * s_z_d
    n_saves = tl.cdiv(L, SAVE)
    p_st4 = p_states + ((i_b64 * dim + o_d4) * (n_saves - 1 + FIRST)) * N + o_n4  # kept_states a row

    c_lo = i_s * seg_chunks
    c_hi = tl.minimum(c_lo + seg_chunks, n_chunks)
    for i in range(0, c_hi - c_lo):
        c = _chunk_of(i, c_lo, c_hi, REVERSE)
        if MODE != 3:
            # the state entering every SAVE-step block (in scan order; the first only if FIRST) is kept
            if REVERSE:
                save = ((c + 1) % SAVE_EVERY == 0) | (c == n_chunks - 1)
            else:
                save = c % SAVE_EVERY == 0
            i_save = _saved_index(c // SAVE_EVERY, n_saves, REVERSE, FIRST)
            if save & (i_save >= 0):
                tl.store(p_st4 + i_save * N, b_h, mask=m_dn4)
        o_t4 = c * CHUNK + o_c
        m_t4 = (o_t4 < L) & m_d4
        b_u = tl.load(p_u4 + o_t4 * s_u_l, mask=m_t4, other=0.0).to(tl.float32)  # [CHUNK, NL, BLOCK_D, 1]
        _, b_dt = _load_dt(p_dt4, o_t4, s_dt_l, m_t4, b_bias, HAS_BIAS, SOFTPLUS)
        m_tn4 = o_t4 < L
        b_B = tl.load(p_B4 + o_t4, mask=m_tn4, other=0.0)  # [CHUNK, NL, BLOCK_D, NH]
        b_a = _exp2(b_dt * b_A)
        b_x = (b_dt * b_u) * b_B
        b_hs, b_h = _chunk_scan(b_a, b_x, b_h, o_c, CHUNK, REVERSE)
        if MODE == 3:
            b_sdt_acc += tl.sum(b_dt, axis=0, keep_dims=True)
        else:
            b_C = tl.load(p_C4 + o_t4, mask=m_tn4, other=0.0)
            b_y = tl.sum(tl.sum(b_hs * b_C, axis=3, keep_dims=True), axis=1, keep_dims=True)  # [CHUNK, 1, BLOCK_D, 1]
            b_y = b_y + tl.zeros([1, NL, 1, 1], dtype=tl.float32)
            if HAS_D:
                b_y = b_y + b_Dv * b_u
            o_y = o_y4 + o_t4
            m_y = m_t4 & m_lead
            if MODE == 1:
                tl.store(p_ybuf + o_y, b_y, mask=m_y)
            else:
                if MODE == 2:
                    b_y = (b_y + tl.load(p_ybuf + o_y, mask=m_y, other=0.0)) * scale
                if HAS_Z:
                    b_z = tl.load(p_z4 + o_t4 * s_z_l, mask=m_t4, other=0.0).to(tl.float32)
                    b_y = b_y * b_z * tl.sigmoid(b_z)
                tl.store(p_out + o_y, b_y.to(p_out.dtype.element_ty), mask=m_y)

    if MODE == 3:
        o_k = (o_seg + i_b64 * dim + o_d4) * n_seg + i_s
        tl.store(p_seg_dt + o_k + zl, b_sdt_acc, mask=m_d4 & m_lead)
        tl.store(p_seg_h + o_k * N + o_n4, b_h, mask=m_dn4)
    if STORE_LAST:
        if i_s == n_seg - 1:
            tl.store(p_hlast + o_st4, b_h, mask=m_dn4)


@triton.jit
def _selective_scan_fwd_kernel(
    # pointers: forward direction, shared, backward direction (bi only; the launcher passes twins), outputs
    p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias,
    p_z, p_h0, p_out, p_hlast, p_states, p_ybuf, p_seg_h, p_seg_dt,
    p_ub, p_deltab, p_Ab, p_Btb, p_Ctb, p_Db, p_biasb, p_states_b,
    # sizes
    batch, dim, L, N, n_chunks, seg_chunks, n_seg, G_B, G_C, dpg_B, dpg_C, G_Bb, G_Cb, dpg_Bb, dpg_Cb,
    # strides (elements)
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
    s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l,
    scale,
    # meta
    BLOCK_D: tl.constexpr, NH: tl.constexpr, NL: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, BIDIR: tl.constexpr, HAS_D_B: tl.constexpr, HAS_BIAS_B: tl.constexpr,
    SUMMARY: tl.constexpr, FIRST: tl.constexpr, SAVE: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1)
    i_s = tl.program_id(2)
    if SUMMARY:
        # grid axis 2: segment + n_seg * direction (1: the backward direction of bi)
        if i_s < n_seg:
            _fwd_direction(p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias, p_z, p_h0, p_seg_h, p_seg_dt, p_states,
                           p_hlast, p_ybuf, p_out, i_b, i_d, i_s, dim, L, N, n_chunks, seg_chunks, n_seg,
                           G_B, G_C, dpg_B, dpg_C, 0,
                           s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, scale,
                           BLOCK_D, NH, NL, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, False, False, False, 3, FIRST, SAVE)
        else:
            _fwd_direction(p_ub, p_deltab, p_Ab, p_Btb, p_Ctb, p_Db, p_biasb, p_z, p_h0, p_seg_h, p_seg_dt,
                           p_states_b, p_hlast, p_ybuf, p_out, i_b, i_d, i_s - n_seg, dim, L, N, n_chunks,
                           seg_chunks, n_seg, G_Bb, G_Cb, dpg_Bb, dpg_Cb, batch * dim,
                           s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l, s_z_b, s_z_d, s_z_l, scale,
                           BLOCK_D, NH, NL, CHUNK, HAS_D_B, HAS_Z, HAS_BIAS_B, SOFTPLUS, False, False, True, 3, FIRST, SAVE)
    elif BIDIR:
        # backward direction first (state runs from the end), into the fp32 scratch
        _fwd_direction(p_ub, p_deltab, p_Ab, p_Btb, p_Ctb, p_Db, p_biasb, p_z, p_h0, p_seg_h, p_seg_dt, p_states_b,
                       p_hlast, p_ybuf, p_out, i_b, i_d, i_s, dim, L, N, n_chunks, seg_chunks, n_seg,
                       G_Bb, G_Cb, dpg_Bb, dpg_Cb, batch * dim,
                       s_ub_b, s_ub_d, s_ub_l, s_dtb_b, s_dtb_d, s_dtb_l, s_z_b, s_z_d, s_z_l, scale,
                       BLOCK_D, NH, NL, CHUNK, HAS_D_B, HAS_Z, HAS_BIAS_B, SOFTPLUS, False, False, True, 1, FIRST, SAVE)
        tl.debug_barrier()  # the scratch written above is read back below by other threads of this program
        _fwd_direction(p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias, p_z, p_h0, p_seg_h, p_seg_dt, p_states,
                       p_hlast, p_ybuf, p_out, i_b, i_d, i_s, dim, L, N, n_chunks, seg_chunks, n_seg,
                       G_B, G_C, dpg_B, dpg_C, 0,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, scale,
                       BLOCK_D, NH, NL, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, False, False, False, 2, FIRST, SAVE)
    else:
        _fwd_direction(p_u, p_delta, p_A, p_Bt, p_Ct, p_D, p_bias, p_z, p_h0, p_seg_h, p_seg_dt, p_states,
                       p_hlast, p_ybuf, p_out, i_b, i_d, i_s, dim, L, N, n_chunks, seg_chunks, n_seg,
                       G_B, G_C, dpg_B, dpg_C, 0,
                       s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, scale,
                       BLOCK_D, NH, NL, CHUNK, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_H0, True, False, 0, FIRST, SAVE)


# ----------------------------------------------------------------------------------------------------------------
# launcher


@functools.lru_cache(maxsize=None)
def _sm_count(device_index) -> int:
    if triton_interpreting() or not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments; called on every launch (host time)
def scan_config(batch: int, dim: int, N: int, L: int, dtype=torch.bfloat16, groups=(1,), device=None,
                backward: bool = False, bidirectional: bool = False):
    """(BLOCK_D, NH, NL, CHUNK, num_warps, n_seg) for a problem.

    CHUNK: 4 time steps (one 16-byte vector of the fp32 B/C copies). NL lanes share a channel's states,
    NH each; BLOCK_D = 32 / NL channels per warp. n_seg: sequence segments per (batch, channel tile), enough that
    the grid holds ~2 waves of the SMs at the occupancy the registers allow; segments are whole SAVE_STEPS blocks.
    With G > 1, BLOCK_D divides dim / G so that a tile lies in one group.
    """
    BLOCK_N = next_power_of_2(N)
    CHUNK = 4
    # H100 sweeps, bf16: the backward, which keeps ~4x more arrays live, is fastest with 4 states per thread
    # (a6324a5). The forward of long sequences with all of N <= 16 states in one thread (session 5, 7be530f: global
    # XL / global S / long 0.386 / 0.502 / 0.741 -> 0.374 / 0.482 / 0.715 ms against 8 per thread: the sum over n
    # needs no shuffle, the softplus is computed once per channel and step); short ones with 8 per thread (at 16,
    # a5a1191 measured spatial XL 0.248 -> 0.274 and temporal XL 0.241 -> 0.292 ms: half the programs); larger N
    # with 8 per thread (a6324a5, not re-swept). One warp per program in both.
    if backward:
        NL = min(BLOCK_N, 32, max(4, BLOCK_N // 4))
    elif BLOCK_N <= 16 and L >= 1024:
        NL = 1
    else:
        NL = min(BLOCK_N, 32, max(2, BLOCK_N // 8))
    NH = BLOCK_N // NL
    num_warps = 1
    BLOCK_D = (32 // NL) * num_warps
    for G in groups:
        while BLOCK_D > 1 and G > 1 and (dim // G) % BLOCK_D != 0:
            BLOCK_D //= 2
    num_warps = max(1, BLOCK_D * NL // 32)
    n_saves = cdiv(L, SAVE_STEPS)
    warps = batch * cdiv(dim, BLOCK_D) * num_warps
    # warps to aim for, from the session-5 sweep: the backward's segments doubled (global XL / global S / long backward
    # 1.436 / 1.917 / 2.812 -> 1.412 / 1.863 / 2.712 ms); the forward keeps the segment count it had at 8 states per
    # thread (twice as many segments were 10-15% slower at 16 per thread)
    target = 2 * _sm_count(device) * (32 if backward else 12 if NL == 1 else 24)
    n_seg = 1
    if not triton_interpreting():
        n_seg = max(1, min(n_saves, target // max(warps, 1)))
    seg_saves = cdiv(n_saves, n_seg)
    n_seg = cdiv(n_saves, seg_saves)
    return BLOCK_D, NH, NL, CHUNK, num_warps, n_seg


def n_saved_states(L: int, save: int = SAVE_STEPS) -> int:
    """The number of save-step blocks of a row, whose entering states the backward starts from."""
    return cdiv(L, save)


def keeps_first(L: int) -> bool:
    """Whether the forward saves the state entering a direction's first save-step block too (the initial state or
    zero, which the backward can read itself). Short rows leave it out: it is all a one-block row saves (72 MiB at
    (512, 2304, 16, 16)) and a quarter at L = 256. Rows of KEEP_FIRST_MIN_L steps or more keep it: there it is 1/16 of
    the states or less, and leaving it out cost the lanes backward (255 registers, at its spill cliff) 3% at global
    XL and S (H200, bf16, benchmarks/NOTES_scan.md "Session 27")."""
    return L >= KEEP_FIRST_MIN_L


def kept_states(L: int, save: int = SAVE_STEPS) -> int:
    """The states the forward saves per (batch, channel) when it saves every ``save`` steps: one a block, but for the
    block its direction starts from where not :func:`keeps_first` (nothing then for L <= save steps)."""
    return n_saved_states(L, save) - (0 if keeps_first(L) else 1)


def saved_layout(states, L: int) -> tuple[int, bool]:
    """From the saved states' shape (batch, dim, kept, N): (the steps between them, whether the first block's is
    kept). The spacing is SAVE_STEPS or a power-of-2 multiple of it (:func:`.triton_bwd_lanes.lanes_save_steps`);
    the candidates give distinct counts wherever they differ in layout."""
    first = keeps_first(L)
    save = SAVE_STEPS
    while save <= max(L, SAVE_STEPS):
        if states.shape[2] == kept_states(L, save):
            return save, first
        save *= 2
    raise AssertionError(f"saved states {tuple(states.shape)} fit no spacing for L = {L}")


def _bt(X):
    """B or C -> fp32 (batch, G, BLOCK_N, L), time contiguous, states padded to a power of 2 (tiny next to u), and G."""
    G = 1 if X.dim() == 3 else X.shape[1]
    N = X.shape[-2]
    Xt = X.reshape(X.shape[0], G, N, X.shape[-1]).to(torch.float32)
    BLOCK_N = next_power_of_2(N)
    if BLOCK_N != N:
        Xt = torch.nn.functional.pad(Xt, (0, 0, 0, BLOCK_N - N))
    return Xt.contiguous(), G


def _lstride(x):
    return (x.stride(0), x.stride(1), x.stride(2))


def time_contiguous(x):
    """x with unit stride along L (copied only if not): the kernels vectorise loads along time, and Triton lays the
    blocks out from that contiguity (a channel-last view would put the time axis across lanes)."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool,
                       u_b=None, delta_b=None, A_b=None, B_b=None, C_b=None, D_b=None, delta_bias_b=None,
                       bidirectional: bool = False, divide_out: bool = False, config=None,
                       save: int = SAVE_STEPS):
    """Launch the forward kernels. Inputs validated by the caller, on one CUDA device (or the interpreter).

    Returns (out, last_state, states, states_b): out (batch, dim, L) in u.dtype; last_state (batch, dim, N) fp32
    (uni only, else an empty tensor); states / states_b (batch, dim, kept_states(L, save), N) fp32, the state
    entering every ``save``-step block (SAVE_STEPS or a multiple) in scan order, the direction's first only where
    :func:`keeps_first` (states_b: the backward direction's; empty for uni).
    """
    assert save % SAVE_STEPS == 0
    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    u, delta, z, u_b, delta_b = map(time_contiguous, (u, delta, z, u_b, delta_b))
    twin = lambda b, f: f if b is None else b  # noqa: E731
    u_b, delta_b, A_b, B_b, C_b = twin(u_b, u), twin(delta_b, delta), twin(A_b, A), twin(B_b, B), twin(C_b, C)
    Bt, G_B = _bt(B)
    Ct, G_C = _bt(C)
    Btb, G_Bb = _bt(B_b) if B_b is not B else (Bt, G_B)
    Ctb, G_Cb = _bt(C_b) if C_b is not C else (Ct, G_C)
    groups = (G_B, G_C, G_Bb, G_Cb) if bidirectional else (G_B, G_C)
    BLOCK_D, NH, NL, CHUNK, num_warps, n_seg = config or scan_config(
        batch, dim, N, L, u.dtype, groups, dev.index if dev.type == "cuda" else None, bidirectional=bidirectional)
    n_chunks = cdiv(L, CHUNK)
    seg_chunks = cdiv(n_saved_states(L, save), n_seg) * (save // CHUNK)  # segments of whole save-step blocks
    n_seg = cdiv(n_chunks, seg_chunks)
    A, A_b = A.contiguous(), A_b.contiguous()
    f32 = torch.float32

    out = torch.empty((batch, dim, L), device=dev, dtype=u.dtype)
    states = torch.empty((batch, dim, kept_states(L, save), N), device=dev, dtype=f32)
    empty = torch.empty(0, device=dev, dtype=f32)
    if bidirectional:
        states_b = torch.empty_like(states)
        ybuf = torch.empty((batch, dim, L), device=dev, dtype=f32)
        last_state = empty
    else:
        states_b, ybuf = empty, empty
        last_state = torch.empty((batch, dim, N), device=dev, dtype=f32)
    n_dir = 2 if bidirectional else 1
    if n_seg > 1:
        seg_h = torch.empty((n_dir, batch, dim, n_seg, N), device=dev, dtype=f32)
        seg_dt = torch.empty((n_dir, batch, dim, n_seg), device=dev, dtype=f32)
    else:
        seg_h = seg_dt = empty
    zs = _lstride(z) if z is not None else (0, 0, 0)
    D_b = D_b if D_b is not None else D
    delta_bias_b = delta_bias_b if delta_bias_b is not None else delta_bias
    args = (
        u, delta, A, Bt, Ct, D if D is not None else empty, delta_bias if delta_bias is not None else empty,
        z if z is not None else empty, initial_state if initial_state is not None else empty,
        out, last_state, states, ybuf, seg_h, seg_dt,
        u_b, delta_b, A_b, Btb, Ctb, D_b if D_b is not None else empty,
        delta_bias_b if delta_bias_b is not None else empty, states_b,
        batch, dim, L, N, n_chunks, seg_chunks, n_seg,
        G_B, G_C, dim // G_B, dim // G_C, G_Bb, G_Cb, dim // G_Bb, dim // G_Cb,
        *_lstride(u), *_lstride(delta), *zs, *_lstride(u_b), *_lstride(delta_b),
        0.5 if divide_out else 1.0,
    )
    meta = dict(
        BLOCK_D=BLOCK_D, NH=NH, NL=NL, CHUNK=CHUNK,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=initial_state is not None, BIDIR=bidirectional, HAS_D_B=D_b is not None,
        HAS_BIAS_B=delta_bias_b is not None, FIRST=keeps_first(L), SAVE=save, num_warps=num_warps,
    )
    n_dtiles = cdiv(dim, BLOCK_D)
    if n_seg > 1:
        launch(_selective_scan_fwd_kernel, (n_dtiles, batch, n_dir * n_seg), args, dict(meta, SUMMARY=True))
    launch(_selective_scan_fwd_kernel, (n_dtiles, batch, n_seg), args, dict(meta, SUMMARY=False, **MAIN_META_OVERRIDES))
    return out, last_state, states, states_b
