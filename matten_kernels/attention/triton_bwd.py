"""Flash-attention backward for video attention: recompute the probabilities from the saved logsumexp.

Same sequence geometry and the same two program mappings as ``triton_fwd.py`` (read its docstring first).
With s = scale * q k^T, P = softmax(s), dO the output cotangent and delta = rowsum(dO * O):

    dV = P^T dO      dP = dO V^T      dS = P * (dP - delta)      dQ = scale * dS K      dK = scale * dS^T Q

Kernels:
1. ``_bwd_preprocess_kernel``: delta (batch, heads, F*S) fp32, one pass over O and dO.
2. ``_bwd_dkdv_kernel``: one program per key block (packed mode: per group of whole sequences) accumulates dK, dV
   over the query blocks of its sequence(s).
3. ``_bwd_dq_kernel``: one program per query block (packed: per group of sequences) accumulates dQ over the keys.
   Two kernels recompute Q K^T and dO V^T twice (7 matmuls instead of 5) but need no atomics: deterministic, and
   safe to autotune (no output to reset between trials).

Operand orientation follows Triton's fused-attention tutorial (q^T and k^T tiles loaded transposed from memory,
``tl.trans`` only of loaded tiles): on the H100 (Triton 3.6) a dot on ``tl.trans`` of a computed dS tile at 64 rows
gave wrong dQ, and an in-kernel atomic dQ variant is gone with it (NOTES_attention.md, run 1).

Cost model (per batch and head): FLOPs 2.5 x the forward's 4 * NSEQ * L^2 * head_dim counted as useful work; bytes
read q, k, v, o, dO once (preprocess + kernels re-read q, k, v, dO per pass), write dq, dk, dv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import (
    LOG2E,
    _bh_offset,
    _load_rows,
    _load_tile,
    _program_ids,
    _rows,
    _store_rows,
    _tile_ptrs,
    alignment,
    dot_precision,
    head_dim_blocks,
    launch,
    num_programs,
    pack_len,
    sequence_geometry,
)


@triton.jit
def _bwd_preprocess_kernel(
    p_o, p_do, p_delta,
    H, N_TOK,
    s_ob, s_on, s_oh, s_dob, s_don, s_doh, s_dod,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ALIGN: tl.constexpr,
):
    """delta[b, h, t] = sum_d O[b, t, h, d] * dO[b, t, h, d] in fp32."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    m_t = offs_t < N_TOK
    p_o_blk = _tile_ptrs(p_o + _bh_offset(i_b, i_h, s_ob, s_oh, ALIGN), offs_t, s_on, offs_d, 1, False, ALIGN)
    p_do_blk = _tile_ptrs(p_do + _bh_offset(i_b, i_h, s_dob, s_doh, ALIGN), offs_t, s_don, offs_d, s_dod, False, ALIGN)
    b_o = _load_tile(p_o_blk, m_t, offs_d, HEAD_DIM, True, BLOCK_D > HEAD_DIM, False)
    b_do = _load_tile(p_do_blk, m_t, offs_d, HEAD_DIM, True, BLOCK_D > HEAD_DIM, False)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(p_delta + i_bh.to(tl.int64) * N_TOK + offs_t, b_delta, mask=m_t)


@triton.heuristics({"MASK_M": lambda a: a["PACK_LEN"] > 0 or a["L"] % a["BLOCK_M"] != 0})
@triton.jit
def _bwd_dkdv_kernel(
    # pointers
    p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv,
    # sizes
    H, N_TOK, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, scale, qk_scale,
    # strides (elements); dk, dv are contiguous and share strides s_g*
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_dob, s_don, s_doh, s_dod,
    s_gb, s_gn, s_gh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PACK_LEN: tl.constexpr, MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """One program: dK, dV for BLOCK_N keys (looping mode) or for whole sequences (packed mode).
    Head-dim chunks as in the forward: main [0, BLOCK_D), tail (suffix 2) when BLOCK_DT > 0. Query-side pointers
    are built once and advanced by BLOCK_M tokens per iteration."""
    # Program ids over key blocks (BLOCK_N plays the role the forward's BLOCK_M plays).
    i_n, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_N, PACK_LEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    p_k_bh = p_k + _bh_offset(i_b, i_h, s_kb, s_kh, ALIGN)
    p_v_bh = p_v + _bh_offset(i_b, i_h, s_vb, s_vh, ALIGN)
    o_g_bh = _bh_offset(i_b, i_h, s_gb, s_gh, ALIGN)
    D_MASK: tl.constexpr = BLOCK_D > HEAD_DIM

    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    tok_k, slot_k, m_k = _rows(i_g, i_n, tl.arange(0, BLOCK_N), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_N, PACK_LEN)
    tok_q, slot_q, m_q = _rows(i_g, 0, offs_m, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_M, PACK_LEN)
    b_k = _load_rows(p_k_bh, tok_k, s_kn, offs_d, s_kd, m_k, HEAD_DIM, D_MASK, ALIGN)
    b_v = _load_rows(p_v_bh, tok_k, s_vn, offs_d, s_vd, m_k, HEAD_DIM, D_MASK, ALIGN)
    p_q_bh = p_q + _bh_offset(i_b, i_h, s_qb, s_qh, ALIGN)
    p_do_bh = p_do + _bh_offset(i_b, i_h, s_dob, s_doh, ALIGN)
    p_qt = _tile_ptrs(p_q_bh, tok_q, s_qn, offs_d, s_qd, True, ALIGN)  # q^T (BLOCK_D, BLOCK_M)
    p_dom = _tile_ptrs(p_do_bh, tok_q, s_don, offs_d, s_dod, False, ALIGN)  # dO (BLOCK_M, BLOCK_D)
    p_lse_m = p_lse + i_bh.to(tl.int64) * N_TOK + tok_q
    p_delta_m = p_delta + i_bh.to(tl.int64) * N_TOK + tok_q
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_DT > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_DT)
        b_k2 = _load_rows(p_k_bh, tok_k, s_kn, offs_d2, s_kd, m_k, HEAD_DIM, True, ALIGN)
        b_v2 = _load_rows(p_v_bh, tok_k, s_vn, offs_d2, s_vd, m_k, HEAD_DIM, True, ALIGN)
        p_qt2 = _tile_ptrs(p_q_bh, tok_q, s_qn, offs_d2, s_qd, True, ALIGN)
        p_dom2 = _tile_ptrs(p_do_bh, tok_q, s_don, offs_d2, s_dod, False, ALIGN)
        b_dk2 = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
        b_dv2 = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
    step_tok = tl.full([], BLOCK_M, tl.int64) * TOK_STRIDE
    step_q = step_tok * s_qn
    step_do = step_tok * s_don

    m_end = BLOCK_M if PACK_LEN > 0 else L
    for start_m in range(0, m_end, BLOCK_M):
        if PACK_LEN == 0:
            if MASK_M:
                m_q = (start_m + offs_m) < L
        b_qt = _load_tile(p_qt, m_q, offs_d, HEAD_DIM, MASK_M, D_MASK, True)
        b_do = _load_tile(p_dom, m_q, offs_d, HEAD_DIM, MASK_M, D_MASK, False)
        if MASK_M:
            b_lse = tl.load(p_lse_m, mask=m_q, other=0.0)
            b_delta = tl.load(p_delta_m, mask=m_q, other=0.0)
        else:
            b_lse = tl.load(p_lse_m)
            b_delta = tl.load(p_delta_m)

        # Transposed tiles (keys x queries), as the dK/dV accumulators are indexed by key.
        b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION)  # S^T (BLOCK_N, BLOCK_M)
        if BLOCK_DT > 0:
            b_qt2 = _load_tile(p_qt2, m_q, offs_d2, HEAD_DIM, MASK_M, True, True)
            b_do2 = _load_tile(p_dom2, m_q, offs_d2, HEAD_DIM, MASK_M, True, False)
            b_st = tl.dot(b_k2, b_qt2, b_st, input_precision=DOT_PRECISION)
        b_pt = tl.exp2(b_st * qk_scale - b_lse[None, :])
        if PACK_LEN > 0:
            b_pt = tl.where((slot_k[:, None] == slot_q[None, :]) & m_q[None, :], b_pt, 0.0)
        elif MASK_M:
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
        p_qt += step_q
        p_dom += step_do
        p_lse_m += step_tok
        p_delta_m += step_tok

    _store_rows(p_dk + o_g_bh, tok_k, s_gn, offs_d, m_k, b_dk * scale, HEAD_DIM, ALIGN)
    _store_rows(p_dv + o_g_bh, tok_k, s_gn, offs_d, m_k, b_dv, HEAD_DIM, ALIGN)
    if BLOCK_DT > 0:
        _store_rows(p_dk + o_g_bh, tok_k, s_gn, offs_d2, m_k, b_dk2 * scale, HEAD_DIM, ALIGN)
        _store_rows(p_dv + o_g_bh, tok_k, s_gn, offs_d2, m_k, b_dv2, HEAD_DIM, ALIGN)


@triton.heuristics({"MASK_N": lambda a: a["PACK_LEN"] > 0 or a["L"] % a["BLOCK_N"] != 0})
@triton.jit
def _bwd_dq_kernel(
    # pointers
    p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq,
    # sizes
    H, N_TOK, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, scale, qk_scale,
    # strides (elements)
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_dob, s_don, s_doh, s_dod,
    s_gb, s_gn, s_gh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PACK_LEN: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """One program: dQ for BLOCK_M queries over all keys of their sequence(s); key pointers advance per block."""
    i_m, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_M, PACK_LEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    p_q_bh = p_q + _bh_offset(i_b, i_h, s_qb, s_qh, ALIGN)
    p_do_bh = p_do + _bh_offset(i_b, i_h, s_dob, s_doh, ALIGN)
    p_k_bh = p_k + _bh_offset(i_b, i_h, s_kb, s_kh, ALIGN)
    p_v_bh = p_v + _bh_offset(i_b, i_h, s_vb, s_vh, ALIGN)
    D_MASK: tl.constexpr = BLOCK_D > HEAD_DIM

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok_q, slot_q, m_q = _rows(i_g, i_m, tl.arange(0, BLOCK_M), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_M, PACK_LEN)
    tok_k, slot_k, m_k = _rows(i_g, 0, offs_n, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_N, PACK_LEN)
    b_q = _load_rows(p_q_bh, tok_q, s_qn, offs_d, s_qd, m_q, HEAD_DIM, D_MASK, ALIGN)
    b_do = _load_rows(p_do_bh, tok_q, s_don, offs_d, s_dod, m_q, HEAD_DIM, D_MASK, ALIGN)
    p_kt = _tile_ptrs(p_k_bh, tok_k, s_kn, offs_d, s_kd, True, ALIGN)  # (BLOCK_D, BLOCK_N)
    p_vt = _tile_ptrs(p_v_bh, tok_k, s_vn, offs_d, s_vd, True, ALIGN)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_DT > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_DT)
        b_q2 = _load_rows(p_q_bh, tok_q, s_qn, offs_d2, s_qd, m_q, HEAD_DIM, True, ALIGN)
        b_do2 = _load_rows(p_do_bh, tok_q, s_don, offs_d2, s_dod, m_q, HEAD_DIM, True, ALIGN)
        p_kt2 = _tile_ptrs(p_k_bh, tok_k, s_kn, offs_d2, s_kd, True, ALIGN)
        p_vt2 = _tile_ptrs(p_v_bh, tok_k, s_vn, offs_d2, s_vd, True, ALIGN)
        b_dq2 = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    b_lse = tl.load(p_lse + i_bh.to(tl.int64) * N_TOK + tok_q, mask=m_q, other=0.0)
    b_delta = tl.load(p_delta + i_bh.to(tl.int64) * N_TOK + tok_q, mask=m_q, other=0.0)
    step_k = tl.full([], BLOCK_N, tl.int64) * TOK_STRIDE * s_kn
    step_v = tl.full([], BLOCK_N, tl.int64) * TOK_STRIDE * s_vn

    n_end = BLOCK_N if PACK_LEN > 0 else L
    for start_n in range(0, n_end, BLOCK_N):
        if PACK_LEN == 0:
            if MASK_N:
                m_k = (start_n + offs_n) < L
        b_kt = _load_tile(p_kt, m_k, offs_d, HEAD_DIM, MASK_N, D_MASK, True)
        b_vt = _load_tile(p_vt, m_k, offs_d, HEAD_DIM, MASK_N, D_MASK, True)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            b_kt2 = _load_tile(p_kt2, m_k, offs_d2, HEAD_DIM, MASK_N, True, True)
            b_vt2 = _load_tile(p_vt2, m_k, offs_d2, HEAD_DIM, MASK_N, True, True)
            b_s = tl.dot(b_q2, b_kt2, b_s, input_precision=DOT_PRECISION)
            b_dp = tl.dot(b_do2, b_vt2, b_dp, input_precision=DOT_PRECISION)
        b_p = tl.exp2(b_s * qk_scale - b_lse[:, None])
        if PACK_LEN > 0:
            b_p = tl.where((slot_q[:, None] == slot_k[None, :]) & m_k[None, :], b_p, 0.0)
        elif MASK_N:
            b_p = tl.where(m_k[None, :], b_p, 0.0)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q.dtype)
        b_dq = tl.dot(b_ds, tl.trans(b_kt), b_dq, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            b_dq2 = tl.dot(b_ds, tl.trans(b_kt2), b_dq2, input_precision=DOT_PRECISION)
            p_kt2 += step_k
            p_vt2 += step_v
        p_kt += step_k
        p_vt += step_v

    p_dq_bh = p_dq + _bh_offset(i_b, i_h, s_gb, s_gh, ALIGN)
    _store_rows(p_dq_bh, tok_q, s_gn, offs_d, m_q, b_dq * scale, HEAD_DIM, ALIGN)
    if BLOCK_DT > 0:
        _store_rows(p_dq_bh, tok_q, s_gn, offs_d2, m_q, b_dq2 * scale, HEAD_DIM, ALIGN)


# Autotuning, narrowly (key: L, NSEQ, HEAD_DIM, head-dim split): the first two configs per kernel ran correctly on
# the H100 in run 2 (NOTES_attention.md; a set with 64 x 128 dK/dV and 128 x 64 dQ tiles at 2 stages crashed); the
# third is new in run 3 (dK/dV 64 x 64 at 8 warps; dQ at 4 warps / 4 stages, the shape of Triton's tutorial).
# dK/dV programs hold k, v, dk, dv (4 x BLOCK_N x BLOCK_D) and stream query blocks: a wide key block and a narrow
# query block, as in flash-attention 2 and Triton's tutorial (32 x 128); dQ programs are the mirror image
# (128 x 32). ptxas (sm_90, hd 72 split): no spills. Packed mode: 2 or more sequences per program, 32 or 64 rows.
def _packed_configs(plen: int):
    return [triton.Config({"BLOCK_M": r, "BLOCK_N": r}, num_warps=w, num_stages=1)
            for r, w in ((max(32, 2 * plen), 4), (max(64, 2 * plen), 8))]


def _dkdv_configs(plen: int):
    if plen > 0:
        return _packed_configs(plen)
    return [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    ]


def _dq_configs(plen: int):
    if plen > 0:
        return _packed_configs(plen)
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
    ]


def video_attention_bwd_launch(do, q, k, v, o, lse, num_frames: int, axis: str, softmax_scale: float):
    """Launcher: returns (dq, dk, dv), each (batch, F*S, heads, head_dim) contiguous in the dtype of q."""
    batch, num_tokens, heads, head_dim = q.shape
    L, nseq, seq_stride, tok_stride = sequence_geometry(num_tokens, num_frames, axis)
    plen = pack_len(L)
    bd, bdt = head_dim_blocks(head_dim)

    dq = torch.empty((batch, num_tokens, heads, head_dim), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    align = alignment(q, k, v, do, o, dq)

    delta = torch.empty((batch, heads, num_tokens), device=q.device, dtype=torch.float32)
    block_t = 64
    _bwd_preprocess_kernel[(triton.cdiv(num_tokens, block_t), batch * heads)](
        o, do, delta, heads, num_tokens, *o.stride()[:3], *do.stride(),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_T=block_t, ALIGN=align,
    )
    sizes = (heads, num_tokens, L, nseq, seq_stride, tok_stride, softmax_scale, softmax_scale * LOG2E)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3])
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, PACK_LEN=plen, DOT_PRECISION=dot_precision(q.dtype),
                ALIGN=align)
    small = {"BLOCK_M": max(16, 2 * plen), "BLOCK_N": max(16, 2 * plen)} if plen else {"BLOCK_M": 16, "BLOCK_N": 16}

    launch(
        ("dkdv", plen), _bwd_dkdv_kernel, _dkdv_configs(plen), small,
        lambda c: num_programs(batch * heads, L, nseq, c["BLOCK_N"], plen),
        (q, k, v, do, lse, delta, dk, dv, *sizes, *strides), meta,
    )
    launch(
        ("dq", plen), _bwd_dq_kernel, _dq_configs(plen), small,
        lambda c: num_programs(batch * heads, L, nseq, c["BLOCK_M"], plen),
        (q, k, v, do, lse, delta, dq, *sizes, *strides), meta,
    )
    return dq, dk, dv
