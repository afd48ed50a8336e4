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
    _load_cols,
    _load_rows,
    _program_ids,
    _rows,
    _store_rows,
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[b, h, t] = sum_d O[b, t, h, d] * dO[b, t, h, d] in fp32."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    m_td = (offs_t[:, None] < N_TOK) & (offs_d[None, :] < HEAD_DIM)
    b_o = tl.load(p_o + i_b * s_ob + i_h * s_oh + offs_t[:, None] * s_on + offs_d[None, :], mask=m_td, other=0.0)
    b_do = tl.load(
        p_do + i_b * s_dob + i_h * s_doh + offs_t[:, None] * s_don + offs_d[None, :] * s_dod, mask=m_td, other=0.0
    )
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(p_delta + i_bh.to(tl.int64) * N_TOK + offs_t, b_delta, mask=offs_t < N_TOK)


@triton.heuristics({"EVEN_M": lambda a: a["PACK_LEN"] == 0 and a["L"] % a["BLOCK_M"] == 0})
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
    BLOCK_N: tl.constexpr, PACK_LEN: tl.constexpr, EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dK, dV for BLOCK_N keys (looping mode) or for whole sequences (packed mode).
    Head-dim chunks as in the forward: main [0, BLOCK_D), tail (suffix 2) when BLOCK_DT > 0."""
    # Program ids over key blocks (BLOCK_N plays the role the forward's BLOCK_M plays).
    i_n, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_N, PACK_LEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    p_q_bh = p_q + i_b * s_qb + i_h * s_qh
    p_do_bh = p_do + i_b * s_dob + i_h * s_doh
    p_k_bh = p_k + i_b * s_kb + i_h * s_kh
    p_v_bh = p_v + i_b * s_vb + i_h * s_vh
    p_lse_bh = p_lse + i_bh.to(tl.int64) * N_TOK
    p_delta_bh = p_delta + i_bh.to(tl.int64) * N_TOK
    o_g_bh = i_b * s_gb + i_h * s_gh

    offs_d = tl.arange(0, BLOCK_D)
    tok_k, slot_k, m_k = _rows(i_g, i_n, tl.arange(0, BLOCK_N), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_N, PACK_LEN)
    b_k = _load_rows(p_k_bh, tok_k, s_kn, offs_d, s_kd, m_k, HEAD_DIM)  # (BLOCK_N, BLOCK_D)
    b_v = _load_rows(p_v_bh, tok_k, s_vn, offs_d, s_vd, m_k, HEAD_DIM)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_DT > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_DT)
        b_k2 = _load_rows(p_k_bh, tok_k, s_kn, offs_d2, s_kd, m_k, HEAD_DIM)
        b_v2 = _load_rows(p_v_bh, tok_k, s_vn, offs_d2, s_vd, m_k, HEAD_DIM)
        b_dk2 = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
        b_dv2 = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)

    m_end = BLOCK_M if PACK_LEN > 0 else L
    for start_m in range(0, m_end, BLOCK_M):
        tok_q, slot_q, m_q = _rows(
            i_g, start_m // BLOCK_M, tl.arange(0, BLOCK_M), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_M, PACK_LEN
        )
        b_qt = _load_cols(p_q_bh, tok_q, s_qn, offs_d, s_qd, m_q, HEAD_DIM)  # q^T (BLOCK_D, BLOCK_M)
        b_do = _load_rows(p_do_bh, tok_q, s_don, offs_d, s_dod, m_q, HEAD_DIM)  # (BLOCK_M, BLOCK_D)
        b_lse = tl.load(p_lse_bh + tok_q, mask=m_q, other=0.0)
        b_delta = tl.load(p_delta_bh + tok_q, mask=m_q, other=0.0)

        # Transposed tiles (keys x queries), as the dK/dV accumulators are indexed by key.
        b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION)  # S^T (BLOCK_N, BLOCK_M)
        if BLOCK_DT > 0:
            b_qt2 = _load_cols(p_q_bh, tok_q, s_qn, offs_d2, s_qd, m_q, HEAD_DIM)
            b_do2 = _load_rows(p_do_bh, tok_q, s_don, offs_d2, s_dod, m_q, HEAD_DIM)
            b_st = tl.dot(b_k2, b_qt2, b_st, input_precision=DOT_PRECISION)
        b_pt = tl.exp2(b_st * qk_scale - b_lse[None, :])
        if PACK_LEN > 0:
            b_pt = tl.where((slot_k[:, None] == slot_q[None, :]) & m_q[None, :], b_pt, 0.0)
        elif not EVEN_M:
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

    _store_rows(p_dk + o_g_bh, tok_k, s_gn, offs_d, m_k, b_dk * scale, HEAD_DIM)
    _store_rows(p_dv + o_g_bh, tok_k, s_gn, offs_d, m_k, b_dv, HEAD_DIM)
    if BLOCK_DT > 0:
        _store_rows(p_dk + o_g_bh, tok_k, s_gn, offs_d2, m_k, b_dk2 * scale, HEAD_DIM)
        _store_rows(p_dv + o_g_bh, tok_k, s_gn, offs_d2, m_k, b_dv2, HEAD_DIM)


@triton.heuristics({"EVEN_N": lambda a: a["PACK_LEN"] == 0 and a["L"] % a["BLOCK_N"] == 0})
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
    BLOCK_N: tl.constexpr, PACK_LEN: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dQ for BLOCK_M queries over all keys of their sequence(s)."""
    i_m, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_M, PACK_LEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    p_q_bh = p_q + i_b * s_qb + i_h * s_qh
    p_do_bh = p_do + i_b * s_dob + i_h * s_doh
    p_k_bh = p_k + i_b * s_kb + i_h * s_kh
    p_v_bh = p_v + i_b * s_vb + i_h * s_vh

    offs_d = tl.arange(0, BLOCK_D)
    tok_q, slot_q, m_q = _rows(i_g, i_m, tl.arange(0, BLOCK_M), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_M, PACK_LEN)
    b_q = _load_rows(p_q_bh, tok_q, s_qn, offs_d, s_qd, m_q, HEAD_DIM)
    b_do = _load_rows(p_do_bh, tok_q, s_don, offs_d, s_dod, m_q, HEAD_DIM)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_DT > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_DT)
        b_q2 = _load_rows(p_q_bh, tok_q, s_qn, offs_d2, s_qd, m_q, HEAD_DIM)
        b_do2 = _load_rows(p_do_bh, tok_q, s_don, offs_d2, s_dod, m_q, HEAD_DIM)
        b_dq2 = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    b_lse = tl.load(p_lse + i_bh.to(tl.int64) * N_TOK + tok_q, mask=m_q, other=0.0)
    b_delta = tl.load(p_delta + i_bh.to(tl.int64) * N_TOK + tok_q, mask=m_q, other=0.0)

    n_end = BLOCK_N if PACK_LEN > 0 else L
    for start_n in range(0, n_end, BLOCK_N):
        tok_k, slot_k, m_k = _rows(
            i_g, start_n // BLOCK_N, tl.arange(0, BLOCK_N), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_N, PACK_LEN
        )
        b_kt = _load_cols(p_k_bh, tok_k, s_kn, offs_d, s_kd, m_k, HEAD_DIM)  # (BLOCK_D, BLOCK_N)
        b_vt = _load_cols(p_v_bh, tok_k, s_vn, offs_d, s_vd, m_k, HEAD_DIM)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            b_kt2 = _load_cols(p_k_bh, tok_k, s_kn, offs_d2, s_kd, m_k, HEAD_DIM)
            b_vt2 = _load_cols(p_v_bh, tok_k, s_vn, offs_d2, s_vd, m_k, HEAD_DIM)
            b_s = tl.dot(b_q2, b_kt2, b_s, input_precision=DOT_PRECISION)
            b_dp = tl.dot(b_do2, b_vt2, b_dp, input_precision=DOT_PRECISION)
        b_p = tl.exp2(b_s * qk_scale - b_lse[:, None])
        if PACK_LEN > 0:
            b_p = tl.where((slot_q[:, None] == slot_k[None, :]) & m_k[None, :], b_p, 0.0)
        elif not EVEN_N:
            b_p = tl.where(m_k[None, :], b_p, 0.0)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q.dtype)
        b_dq = tl.dot(b_ds, tl.trans(b_kt), b_dq, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            b_dq2 = tl.dot(b_ds, tl.trans(b_kt2), b_dq2, input_precision=DOT_PRECISION)

    _store_rows(p_dq + i_b * s_gb + i_h * s_gh, tok_q, s_gn, offs_d, m_q, b_dq * scale, HEAD_DIM)
    if BLOCK_DT > 0:
        _store_rows(p_dq + i_b * s_gb + i_h * s_gh, tok_q, s_gn, offs_d2, m_q, b_dq2 * scale, HEAD_DIM)


# Autotuning, narrowly (key: L, NSEQ, HEAD_DIM, head-dim split). dK/dV programs hold k, v, dk, dv
# (4 x BLOCK_N x BLOCK_D) and stream query blocks: a wide key block and a narrow query block, as in
# flash-attention 2 and Triton's tutorial (32 x 128); dQ programs are the mirror image (128 x 32). First entry =
# the config used without autotuning, the one verified on the H100 in run 1. ptxas (sm_90, hd 72 split): all
# compile in 255 registers without spills except dkdv 64 x 128 (48 B).
# Packed mode: rows per program as in the forward (first: 32 rows, verified in run 1; 64 rows at 4 warps spills
# 120 B in dkdv, so 8 warps).
def _packed_configs(plen: int):
    return [triton.Config({"BLOCK_M": r, "BLOCK_N": r}, num_warps=w, num_stages=1)
            for r, w in ((max(32, plen), 4), (max(64, plen), 8), (max(16, plen), 4))]


def _dkdv_configs(plen: int):
    if plen > 0:
        return _packed_configs(plen)
    return [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    ]


def _dq_configs(plen: int):
    if plen > 0:
        return _packed_configs(plen)
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    ]


def video_attention_bwd_launch(do, q, k, v, o, lse, num_frames: int, axis: str, softmax_scale: float):
    """Launcher: returns (dq, dk, dv), each (batch, F*S, heads, head_dim) contiguous in the dtype of q."""
    batch, num_tokens, heads, head_dim = q.shape
    L, nseq, seq_stride, tok_stride = sequence_geometry(num_tokens, num_frames, axis)
    plen = pack_len(L)
    bd, bdt = head_dim_blocks(head_dim)

    delta = torch.empty((batch, heads, num_tokens), device=q.device, dtype=torch.float32)
    block_t = 64
    _bwd_preprocess_kernel[(triton.cdiv(num_tokens, block_t), batch * heads)](
        o, do, delta, heads, num_tokens, *o.stride()[:3], *do.stride(),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_T=block_t,
    )

    dq = torch.empty((batch, num_tokens, heads, head_dim), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    sizes = (heads, num_tokens, L, nseq, seq_stride, tok_stride, softmax_scale, softmax_scale * LOG2E)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3])
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, PACK_LEN=plen, DOT_PRECISION=dot_precision(q.dtype))
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
