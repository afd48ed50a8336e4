"""Flash-attention backward for video attention: recompute the probabilities from the saved logsumexp.

Same sequence geometry and the same two program mappings as ``triton_fwd.py`` (read its docstring first).
With s = scale * q k^T, P = softmax(s), dO the output cotangent and delta = rowsum(dO * O):

    dV = P^T dO      dP = dO V^T      dS = P * (dP - delta)      dQ = scale * dS K      dK = scale * dS^T Q

One kernel, ``_video_attn_bwd_kernel``, made of two passes (constexprs DKDV, DQ):

* dK/dV pass (``_dkdv_pass``): a held block of BLOCK_HELD keys (packed mode: the group's whole sequences)
  accumulates dK, dV while streaming the queries of its sequence(s) in blocks of BLOCK_STREAM.
* dQ pass (``_dq_pass``): a held block of BLOCK_HELD queries accumulates dQ while streaming the keys.

Program i of a sequence (or group) runs its passes on key block i and query block i, so every output row has one
owner: no atomics, deterministic. The passes recompute Q K^T and dO V^T (7 matmuls instead of 5).

Launches per backward (``_bwd_plan``); previously every axis took 3 (a delta preprocess, dK/dV, dQ):

* L <= FUSED_BWD_MAX_LEN (temporal F=16 packed, spatial S=256): one launch running both passes. delta is recomputed
  from the O and dO tiles where a pass needs it (the dK/dV pass once per streamed query block; the tiles are
  L2-resident and the extra work is small next to the 4 matmuls per block). Grid = the dK/dV kernel's
  (sequences x heads x L / BLOCK_HELD: 2048 programs at Matten-XL spatial), so the machine stays as full as before.
* longer L (global): a dQ-only launch that also writes delta (once per query row, before its key loop), then a
  dK/dV-only launch that reads it: the dK/dV pass is the longest kernel there and keeps its lean inner loop.

Operand orientation follows Triton's fused-attention tutorial (q^T and k^T tiles loaded transposed from memory,
``tl.trans`` only of loaded tiles): on the H100 (Triton 3.6) a dot on ``tl.trans`` of a computed dS tile at 64 rows
gave wrong dQ, and an in-kernel atomic dQ variant is gone with it (NOTES_attention.md, run 1). The fused kernel runs
the same two passes one after the other, so it uses only orientations verified there.

Cost model (per batch and head): FLOPs 2.5 x the forward's 4 * NSEQ * L^2 * head_dim counted as useful work; bytes
read q, k, v, o, dO once (the passes re-read them from L2), write dq, dk, dv.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._launch import launch
from . import triton_fwd
from .triton_fwd import (
    LOG2E,
    _bh_offset,
    _load_rows,
    _load_tile,
    _out_offset,
    _program_ids,
    _rows,
    _store_rows,
    _tile_ptrs,
    alignment,
    config_meta,
    num_programs,
    pick_config,
    shape_class,
)

# Sequences up to this length (packed ones included) take the single fused launch; see the module docstring. 256
# covers Matten-XL's spatial axis (S = 16 x 16) and keeps delta's recomputation in the dK/dV loop (L / BLOCK_HELD
# extra reads of each O row from L2) small; global (4096) keeps the two-launch path. Read per call (part of the plan
# key): a benchmark or test may lower it to run the two-launch path at short L.
FUSED_BWD_MAX_LEN = 256


@triton.jit
def _rowdot(b_a, b_b):
    """rowsum(a * b) in fp32: delta = rowsum(dO * O) over one head-dim chunk."""
    return tl.sum(b_a.to(tl.float32) * b_b.to(tl.float32), 1)


@triton.jit
def _load_vec(p, m, MASK: tl.constexpr):
    """Per-row fp32 values (lse, delta) of a streamed block; masked rows read 0."""
    if MASK:
        b_x = tl.load(p, mask=m, other=0.0)
    else:
        b_x = tl.load(p)
    return b_x


@triton.jit
def _dkdv_pass(
    p_q_bh, p_k_bh, p_v_bh, p_o_bh, p_do_bh, p_lse_bh, p_delta_bh, p_dk_bh, p_dv_bh,
    i_blk, i_g, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, scale, qk_scale,
    s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_don, s_dod, s_on, s_gn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_HELD: tl.constexpr,
    BLOCK_STREAM: tl.constexpr, PACK_LEN: tl.constexpr, MASK_STREAM: tl.constexpr, DELTA_IN_BUFFER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):
    """dK, dV of key block i_blk of sequence i_g (packed: of group i_g's whole sequences), streaming the queries of
    their sequence(s); stores them. Head-dim chunks as in the forward: main [0, BLOCK_D), tail (suffix 2) when
    BLOCK_DT > 0. delta: read from p_delta (DELTA_IN_BUFFER) or recomputed from the streamed O and dO tiles.
    Query-side pointers are built once and advanced by BLOCK_STREAM tokens per iteration. s_on / s_gn: token
    strides of o and of dk, dv (head-dim stride 1 for all three)."""
    D_MASK: tl.constexpr = BLOCK_D > HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_STREAM)
    tok_k, slot_k, m_k = _rows(i_g, i_blk, tl.arange(0, BLOCK_HELD), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_HELD,
                               PACK_LEN)
    tok_q, slot_q, m_q = _rows(i_g, 0, offs_m, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_STREAM, PACK_LEN)
    b_k = _load_rows(p_k_bh, tok_k, s_kn, offs_d, s_kd, m_k, HEAD_DIM, D_MASK, ALIGN)
    b_v = _load_rows(p_v_bh, tok_k, s_vn, offs_d, s_vd, m_k, HEAD_DIM, D_MASK, ALIGN)
    p_qt = _tile_ptrs(p_q_bh, tok_q, s_qn, offs_d, s_qd, True, ALIGN)  # q^T (BLOCK_D, BLOCK_STREAM)
    p_dom = _tile_ptrs(p_do_bh, tok_q, s_don, offs_d, s_dod, False, ALIGN)  # dO (BLOCK_STREAM, BLOCK_D)
    p_lse_m = p_lse_bh + tok_q
    if DELTA_IN_BUFFER:
        p_delta_m = p_delta_bh + tok_q
    else:
        p_om = _tile_ptrs(p_o_bh, tok_q, s_on, offs_d, 1, False, ALIGN)  # O (BLOCK_STREAM, BLOCK_D)
    b_dk = tl.zeros([BLOCK_HELD, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_HELD, BLOCK_D], dtype=tl.float32)
    if BLOCK_DT > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_DT)
        b_k2 = _load_rows(p_k_bh, tok_k, s_kn, offs_d2, s_kd, m_k, HEAD_DIM, True, ALIGN)
        b_v2 = _load_rows(p_v_bh, tok_k, s_vn, offs_d2, s_vd, m_k, HEAD_DIM, True, ALIGN)
        p_qt2 = _tile_ptrs(p_q_bh, tok_q, s_qn, offs_d2, s_qd, True, ALIGN)
        p_dom2 = _tile_ptrs(p_do_bh, tok_q, s_don, offs_d2, s_dod, False, ALIGN)
        if not DELTA_IN_BUFFER:
            p_om2 = _tile_ptrs(p_o_bh, tok_q, s_on, offs_d2, 1, False, ALIGN)
        b_dk2 = tl.zeros([BLOCK_HELD, BLOCK_DT], dtype=tl.float32)
        b_dv2 = tl.zeros([BLOCK_HELD, BLOCK_DT], dtype=tl.float32)
    step_tok = tl.full([], BLOCK_STREAM, tl.int64) * TOK_STRIDE
    step_q = step_tok * s_qn
    step_do = step_tok * s_don
    step_o = step_tok * s_on

    # Packed mode: one query block (the same sequences as the keys). Looping mode: all L queries of the sequence.
    m_end = BLOCK_STREAM if PACK_LEN > 0 else L
    for start_m in range(0, m_end, BLOCK_STREAM):
        if PACK_LEN == 0:
            if MASK_STREAM:
                m_q = (start_m + offs_m) < L
        b_qt = _load_tile(p_qt, m_q, offs_d, HEAD_DIM, MASK_STREAM, D_MASK, True)
        b_do = _load_tile(p_dom, m_q, offs_d, HEAD_DIM, MASK_STREAM, D_MASK, False)
        b_lse = _load_vec(p_lse_m, m_q, MASK_STREAM)
        if DELTA_IN_BUFFER:
            b_delta = _load_vec(p_delta_m, m_q, MASK_STREAM)
        else:
            b_delta = _rowdot(_load_tile(p_om, m_q, offs_d, HEAD_DIM, MASK_STREAM, D_MASK, False), b_do)

        # Transposed tiles (keys x queries), as the dK/dV accumulators are indexed by key.
        b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION)  # S^T (BLOCK_HELD, BLOCK_STREAM)
        if BLOCK_DT > 0:
            b_qt2 = _load_tile(p_qt2, m_q, offs_d2, HEAD_DIM, MASK_STREAM, True, True)
            b_do2 = _load_tile(p_dom2, m_q, offs_d2, HEAD_DIM, MASK_STREAM, True, False)
            if not DELTA_IN_BUFFER:
                b_delta += _rowdot(_load_tile(p_om2, m_q, offs_d2, HEAD_DIM, MASK_STREAM, True, False), b_do2)
            b_st = tl.dot(b_k2, b_qt2, b_st, input_precision=DOT_PRECISION)
        b_pt = tl.exp2(b_st * qk_scale - b_lse[None, :])
        if PACK_LEN > 0:
            b_pt = tl.where((slot_k[:, None] == slot_q[None, :]) & m_q[None, :], b_pt, 0.0)
        elif MASK_STREAM:
            b_pt = tl.where(m_q[None, :], b_pt, 0.0)
        b_ppt = b_pt.to(b_do.dtype)
        b_dv = tl.dot(b_ppt, b_do, b_dv, input_precision=DOT_PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # dP^T
        if BLOCK_DT > 0:
            b_dv2 = tl.dot(b_ppt, b_do2, b_dv2, input_precision=DOT_PRECISION)
            b_dpt = tl.dot(b_v2, tl.trans(b_do2), b_dpt, input_precision=DOT_PRECISION)
        b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(b_qt.dtype)  # dS^T
        b_dk = tl.dot(b_dst, tl.trans(b_qt), b_dk, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            b_dk2 = tl.dot(b_dst, tl.trans(b_qt2), b_dk2, input_precision=DOT_PRECISION)
            p_qt2 += step_q
            p_dom2 += step_do
            if not DELTA_IN_BUFFER:
                p_om2 += step_o
        p_qt += step_q
        p_dom += step_do
        p_lse_m += step_tok
        if DELTA_IN_BUFFER:
            p_delta_m += step_tok
        else:
            p_om += step_o

    _store_rows(p_dk_bh, tok_k, s_gn, offs_d, m_k, b_dk * scale, HEAD_DIM, ALIGN)
    _store_rows(p_dv_bh, tok_k, s_gn, offs_d, m_k, b_dv, HEAD_DIM, ALIGN)
    if BLOCK_DT > 0:
        _store_rows(p_dk_bh, tok_k, s_gn, offs_d2, m_k, b_dk2 * scale, HEAD_DIM, ALIGN)
        _store_rows(p_dv_bh, tok_k, s_gn, offs_d2, m_k, b_dv2, HEAD_DIM, ALIGN)


@triton.jit
def _dq_pass(
    p_q_bh, p_k_bh, p_v_bh, p_o_bh, p_do_bh, p_lse_bh, p_delta_bh, p_dq_bh,
    i_blk, i_g, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, scale, qk_scale,
    s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_don, s_dod, s_on, s_gn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_HELD: tl.constexpr,
    BLOCK_STREAM: tl.constexpr, PACK_LEN: tl.constexpr, MASK_STREAM: tl.constexpr, DELTA_IN_BUFFER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):
    """dQ of query block i_blk of sequence i_g (packed: of group i_g's whole sequences), streaming the keys of their
    sequence(s); stores it. delta of the held rows is computed from O and dO before the key loop and, with
    DELTA_IN_BUFFER, written to p_delta for a dK/dV pass launched after this one. Key pointers advance per block."""
    D_MASK: tl.constexpr = BLOCK_D > HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_STREAM)
    tok_q, slot_q, m_q = _rows(i_g, i_blk, tl.arange(0, BLOCK_HELD), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_HELD,
                               PACK_LEN)
    tok_k, slot_k, m_k = _rows(i_g, 0, offs_n, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_STREAM, PACK_LEN)
    b_q = _load_rows(p_q_bh, tok_q, s_qn, offs_d, s_qd, m_q, HEAD_DIM, D_MASK, ALIGN)
    b_do = _load_rows(p_do_bh, tok_q, s_don, offs_d, s_dod, m_q, HEAD_DIM, D_MASK, ALIGN)
    b_delta = _rowdot(_load_rows(p_o_bh, tok_q, s_on, offs_d, 1, m_q, HEAD_DIM, D_MASK, ALIGN), b_do)
    p_kt = _tile_ptrs(p_k_bh, tok_k, s_kn, offs_d, s_kd, True, ALIGN)  # k^T (BLOCK_D, BLOCK_STREAM)
    p_vt = _tile_ptrs(p_v_bh, tok_k, s_vn, offs_d, s_vd, True, ALIGN)
    b_dq = tl.zeros([BLOCK_HELD, BLOCK_D], dtype=tl.float32)
    if BLOCK_DT > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_DT)
        b_q2 = _load_rows(p_q_bh, tok_q, s_qn, offs_d2, s_qd, m_q, HEAD_DIM, True, ALIGN)
        b_do2 = _load_rows(p_do_bh, tok_q, s_don, offs_d2, s_dod, m_q, HEAD_DIM, True, ALIGN)
        b_delta += _rowdot(_load_rows(p_o_bh, tok_q, s_on, offs_d2, 1, m_q, HEAD_DIM, True, ALIGN), b_do2)
        p_kt2 = _tile_ptrs(p_k_bh, tok_k, s_kn, offs_d2, s_kd, True, ALIGN)
        p_vt2 = _tile_ptrs(p_v_bh, tok_k, s_vn, offs_d2, s_vd, True, ALIGN)
        b_dq2 = tl.zeros([BLOCK_HELD, BLOCK_DT], dtype=tl.float32)
    if DELTA_IN_BUFFER:
        tl.store(p_delta_bh + tok_q, b_delta, mask=m_q)
    b_lse = tl.load(p_lse_bh + tok_q, mask=m_q, other=0.0)
    step_k = tl.full([], BLOCK_STREAM, tl.int64) * TOK_STRIDE * s_kn
    step_v = tl.full([], BLOCK_STREAM, tl.int64) * TOK_STRIDE * s_vn

    n_end = BLOCK_STREAM if PACK_LEN > 0 else L
    for start_n in range(0, n_end, BLOCK_STREAM):
        if PACK_LEN == 0:
            if MASK_STREAM:
                m_k = (start_n + offs_n) < L
        b_kt = _load_tile(p_kt, m_k, offs_d, HEAD_DIM, MASK_STREAM, D_MASK, True)
        b_vt = _load_tile(p_vt, m_k, offs_d, HEAD_DIM, MASK_STREAM, D_MASK, True)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            b_kt2 = _load_tile(p_kt2, m_k, offs_d2, HEAD_DIM, MASK_STREAM, True, True)
            b_vt2 = _load_tile(p_vt2, m_k, offs_d2, HEAD_DIM, MASK_STREAM, True, True)
            b_s = tl.dot(b_q2, b_kt2, b_s, input_precision=DOT_PRECISION)
            b_dp = tl.dot(b_do2, b_vt2, b_dp, input_precision=DOT_PRECISION)
        b_p = tl.exp2(b_s * qk_scale - b_lse[:, None])
        if PACK_LEN > 0:
            b_p = tl.where((slot_q[:, None] == slot_k[None, :]) & m_k[None, :], b_p, 0.0)
        elif MASK_STREAM:
            b_p = tl.where(m_k[None, :], b_p, 0.0)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q.dtype)
        b_dq = tl.dot(b_ds, tl.trans(b_kt), b_dq, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            b_dq2 = tl.dot(b_ds, tl.trans(b_kt2), b_dq2, input_precision=DOT_PRECISION)
            p_kt2 += step_k
            p_vt2 += step_v
        p_kt += step_k
        p_vt += step_v

    _store_rows(p_dq_bh, tok_q, s_gn, offs_d, m_q, b_dq * scale, HEAD_DIM, ALIGN)
    if BLOCK_DT > 0:
        _store_rows(p_dq_bh, tok_q, s_gn, offs_d2, m_q, b_dq2 * scale, HEAD_DIM, ALIGN)


@triton.jit
def _video_attn_bwd_kernel(
    # pointers (o contiguous; dq, dk, dv: the GRAD_GROUP slots of a contiguous (batch, F*S, GRAD_GROUP, heads,
    # head_dim) buffer, see the launcher; p_delta: fp32 (batch, heads, F*S), used only with DELTA_IN_BUFFER)
    p_q, p_k, p_v, p_o, p_do, p_lse, p_delta, p_dq, p_dk, p_dv,
    # sizes
    H, N_TOK, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, scale, qk_scale,
    # strides (elements)
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_dob, s_don, s_doh, s_dod,
    # meta-parameters, all passed by the launcher (matten_kernels._launch wants every constexpr)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_HELD: tl.constexpr,
    BLOCK_STREAM: tl.constexpr, PACK_LEN: tl.constexpr, MASK_STREAM: tl.constexpr, DKDV: tl.constexpr,
    DQ: tl.constexpr, DELTA_IN_BUFFER: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    GRAD_GROUP: tl.constexpr,
):
    """One program: the dK/dV pass (DKDV) of key block i and/or the dQ pass (DQ) of query block i of one sequence
    (packed mode: both passes over one group of whole sequences). MASK_STREAM: streamed blocks need a token mask
    (packed mode, or L not a multiple of BLOCK_STREAM). GRAD_GROUP: 1 for three separate contiguous gradients, 3
    when dq, dk, dv are the slots of one packed dqkv (token stride 3 * H * HEAD_DIM)."""
    i_blk, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_HELD, PACK_LEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    p_q_bh = p_q + _bh_offset(i_b, i_h, s_qb, s_qh, ALIGN)
    p_k_bh = p_k + _bh_offset(i_b, i_h, s_kb, s_kh, ALIGN)
    p_v_bh = p_v + _bh_offset(i_b, i_h, s_vb, s_vh, ALIGN)
    p_do_bh = p_do + _bh_offset(i_b, i_h, s_dob, s_doh, ALIGN)
    o_o_bh = _out_offset(i_b, i_h, N_TOK, H, HEAD_DIM, ALIGN)  # o
    o_g_bh = _out_offset(i_b, i_h, N_TOK, GRAD_GROUP * H, HEAD_DIM, ALIGN)  # dq, dk, dv
    o_row_bh = i_bh.to(tl.int64) * N_TOK  # lse, delta
    if DKDV:
        _dkdv_pass(
            p_q_bh, p_k_bh, p_v_bh, p_o + o_o_bh, p_do_bh, p_lse + o_row_bh, p_delta + o_row_bh, p_dk + o_g_bh,
            p_dv + o_g_bh, i_blk, i_g, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, scale, qk_scale,
            s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_don, s_dod, H * HEAD_DIM, GRAD_GROUP * H * HEAD_DIM,
            HEAD_DIM, BLOCK_D, BLOCK_DT, BLOCK_HELD, BLOCK_STREAM, PACK_LEN, MASK_STREAM, DELTA_IN_BUFFER,
            DOT_PRECISION, ALIGN,
        )
    if DQ:
        _dq_pass(
            p_q_bh, p_k_bh, p_v_bh, p_o + o_o_bh, p_do_bh, p_lse + o_row_bh, p_delta + o_row_bh, p_dq + o_g_bh,
            i_blk, i_g, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, scale, qk_scale,
            s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_don, s_dod, H * HEAD_DIM, GRAD_GROUP * H * HEAD_DIM,
            HEAD_DIM, BLOCK_D, BLOCK_DT, BLOCK_HELD, BLOCK_STREAM, PACK_LEN, MASK_STREAM, DELTA_IN_BUFFER,
            DOT_PRECISION, ALIGN,
        )


# ---------------------------------------------------------------------------------------------------------------
# Configs and launch plans (see triton_fwd.py: index 0 of each list runs unless MATTEN_ATTN_CONFIG says otherwise)
# ---------------------------------------------------------------------------------------------------------------

# BLOCK_HELD: the rows a program owns (keys in the dK/dV pass, queries in the dQ pass); BLOCK_STREAM: the rows it
# loops over. dK/dV programs hold k, v, dk, dv and stream narrow query blocks, dQ programs the mirror image, as in
# flash-attention 2 and Triton's tutorial. Index 0 of the two-launch lists is what the autotuner picked on the H100
# (dK/dV held 64 / streamed 32 at 4 warps; dQ held 128 / streamed 32 at 8 warps); the fused list starts from the
# dK/dV pick (its dQ pass then runs at held 64 / streamed 32, 4 warps, the dQ list's index 1). Packed mode: 2 or more
# whole sequences per program, held = streamed = the program's rows. Registers (ptxas, sm_90): NOTES_attention.md.
def _packed_configs(plen: int):
    return [triton.Config({"BLOCK_HELD": r, "BLOCK_STREAM": r}, num_warps=w, num_stages=1)
            for r, w in ((max(32, 2 * plen), 4), (max(64, 2 * plen), 8))]


def _looping(held_stream_warps_stages):
    """Looping-mode configs from (BLOCK_HELD, BLOCK_STREAM, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_HELD": h, "BLOCK_STREAM": s}, num_warps=w, num_stages=st)
            for h, s, w, st in held_stream_warps_stages]


def _dkdv_configs(plen: int):
    """Configs of the dK/dV launch of the two-launch backward (L > FUSED_BWD_MAX_LEN)."""
    if plen > 0:
        return _packed_configs(plen)
    return _looping([(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3)])


def _fused_configs(plen: int):
    """Configs of the single-launch backward (L <= FUSED_BWD_MAX_LEN): the dK/dV list, whose pass dominates; the dQ
    pass runs at the same held / streamed sizes."""
    return _dkdv_configs(plen)


def _dq_configs(plen: int):
    """Configs of the dQ launch of the two-launch backward (L > FUSED_BWD_MAX_LEN)."""
    if plen > 0:
        return _packed_configs(plen)
    return _looping([(128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 4, 4)])


def _interp_bwd_config(plen: int):
    """Small fixed tiles for the CPU interpreter; held != streamed in looping mode, so a mix-up of the two (the dQ
    pass holds queries, the dK/dV pass keys) cannot pass the tests."""
    r = max(16, 2 * plen)
    held, stream = (r, r) if plen > 0 else (32, 16)
    return triton.Config({"BLOCK_HELD": held, "BLOCK_STREAM": stream}, num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)
def _bwd_plan(batch: int, heads: int, num_tokens: int, head_dim: int, num_frames: int, axis: str, align: int,
              split: bool, fused_max_len: int, grad_group: int):
    """(runtime sizes, launches ((grid, meta), ...) in order, whether a delta buffer is needed) of the backward of one
    shape class, computed once."""
    L, nseq, plen, sizes, meta = shape_class(num_tokens, head_dim, num_frames, axis, align, split)
    meta["GRAD_GROUP"] = grad_group
    interp = _interp_bwd_config(plen)

    def plan(name, configs, **passes):
        cfg = pick_config(name, configs, interp, (L, nseq, head_dim, split))
        held, stream = cfg.kwargs["BLOCK_HELD"], cfg.kwargs["BLOCK_STREAM"]
        grid = (num_programs(batch * heads, L, nseq, held, plen),)
        return grid, dict(meta, **config_meta(cfg), MASK_STREAM=plen > 0 or L % stream != 0, **passes)

    if L <= fused_max_len:
        launches = (plan("bwd_packed" if plen else "bwd_fused", _fused_configs(plen), DKDV=True, DQ=True,
                         DELTA_IN_BUFFER=False),)
    else:  # the dQ launch writes delta, the dK/dV launch after it reads it
        launches = (plan("bwd_dq", _dq_configs(plen), DKDV=False, DQ=True, DELTA_IN_BUFFER=True),
                    plan("bwd_dkdv", _dkdv_configs(plen), DKDV=True, DQ=False, DELTA_IN_BUFFER=True))
    return (heads, *sizes), launches, len(launches) > 1


def video_attention_bwd_launch(do, q, k, v, o, lse, num_frames: int, axis: str, softmax_scale: float,
                               packed: bool = False):
    """Launcher: returns (dq, dk, dv), each (batch, F*S, heads, head_dim) contiguous in the dtype of q, or with
    ``packed`` one dqkv (batch, F*S, 3, heads, head_dim) contiguous, the gradient of a packed qkv whose slots q, k, v
    are (the kernel writes the three slots directly: no stacking copy). ``o`` is the forward's output (contiguous;
    made so otherwise), ``lse`` its logsumexp; ``do`` may have any strides."""
    batch, num_tokens, heads, head_dim = q.shape
    if not o.is_contiguous():
        o = o.contiguous()
    group = 3 if packed else 1
    sizes, launches, needs_delta = _bwd_plan(batch, heads, num_tokens, head_dim, num_frames, axis,
                                             alignment(q, k, v, o, do), triton_fwd.SPLIT_HEAD_DIM, FUSED_BWD_MAX_LEN,
                                             group)
    if packed:
        dqkv = q.new_empty((batch, num_tokens, 3, heads, head_dim))
        dq, dk, dv = dqkv.unbind(2)
    else:
        shape = (batch, num_tokens, heads, head_dim)
        dq, dk, dv = q.new_empty(shape), q.new_empty(shape), q.new_empty(shape)
    delta = q.new_empty((batch, heads, num_tokens), dtype=torch.float32) if needs_delta else lse
    args = (q, k, v, o, do, lse, delta, dq, dk, dv, *sizes, softmax_scale, softmax_scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *do.stride())
    for grid, meta in launches:
        launch(_video_attn_bwd_kernel, grid, args, meta)
    return dqkv if packed else (dq, dk, dv)
