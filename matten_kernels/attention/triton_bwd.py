"""Flash-attention backward for video attention: recompute the probabilities from the saved logsumexp.

Same sequence geometry and the same two program mappings as ``triton_fwd.py`` (read its docstring first).
With s = scale * q k^T, P = softmax(s), dO the output cotangent and delta = rowsum(dO * O):

    dV = P^T dO      dP = dO V^T      dS = P * (dP - delta)      dQ = scale * dS K      dK = scale * dS^T Q

Kernels:
1. ``_bwd_preprocess_kernel``: delta (batch, heads, F*S) fp32, one pass over O and dO.
2. ``_bwd_dkdv_kernel``: one program per key block (looping mode) accumulates dK, dV over all query blocks of its
   sequence; in packed mode the program owns whole sequences, so it also writes dQ (no second kernel).
3. ``_bwd_dq_kernel`` (looping mode only): one program per query block accumulates dQ over the key blocks.
   Two kernels recompute Q K^T twice (7 matmuls instead of 5) but need no atomics: deterministic, and safe to
   autotune (no output to reset between trials).

Cost model (per batch and head): FLOPs 2.5 x the forward's 4 * NSEQ * L^2 * head_dim counted as useful work; bytes
read q, k, v, o, dO once (preprocess + kernels re-read q, k, v, dO per pass), write dq, dk, dv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .triton_fwd import LOG2E, _program_ids, _rows, block_d, dot_precision, num_programs, pack_len, sequence_geometry


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
    p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, p_dk, p_dv,
    # sizes
    H, N_TOK, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, scale, qk_scale,
    # strides (elements); dq, dk, dv are contiguous and share strides s_g*
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_dob, s_don, s_doh, s_dod,
    s_gb, s_gn, s_gh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACK_LEN: tl.constexpr, EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program ids over key blocks (BLOCK_N plays the role the forward's BLOCK_M plays).
    i_n, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_N, PACK_LEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM

    tok_k, slot_k, m_k = _rows(i_g, i_n, tl.arange(0, BLOCK_N), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_N, PACK_LEN)
    m_kd = m_k[:, None] & m_d[None, :]
    b_k = tl.load(p_k + i_b * s_kb + i_h * s_kh + tok_k[:, None] * s_kn + offs_d[None, :] * s_kd, mask=m_kd, other=0.0)
    b_v = tl.load(p_v + i_b * s_vb + i_h * s_vh + tok_k[:, None] * s_vn + offs_d[None, :] * s_vd, mask=m_kd, other=0.0)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    p_lse_bh = p_lse + i_bh.to(tl.int64) * N_TOK
    p_delta_bh = p_delta + i_bh.to(tl.int64) * N_TOK

    m_end = BLOCK_M if PACK_LEN > 0 else L
    for start_m in range(0, m_end, BLOCK_M):
        tok_q, slot_q, m_q = _rows(
            i_g, start_m // BLOCK_M, tl.arange(0, BLOCK_M), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_M, PACK_LEN
        )
        m_qd = m_q[:, None] & m_d[None, :]
        b_q = tl.load(
            p_q + i_b * s_qb + i_h * s_qh + tok_q[:, None] * s_qn + offs_d[None, :] * s_qd, mask=m_qd, other=0.0
        )
        b_do = tl.load(
            p_do + i_b * s_dob + i_h * s_doh + tok_q[:, None] * s_don + offs_d[None, :] * s_dod, mask=m_qd, other=0.0
        )
        b_lse = tl.load(p_lse_bh + tok_q, mask=m_q, other=0.0)
        b_delta = tl.load(p_delta_bh + tok_q, mask=m_q, other=0.0)

        # Transposed tiles (keys x queries), as the dK/dV accumulators are indexed by key.
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        b_pt = tl.exp2(b_st - b_lse[None, :])
        if PACK_LEN > 0:
            b_pt = tl.where((slot_k[:, None] == slot_q[None, :]) & m_q[None, :] & m_k[:, None], b_pt, 0.0)
        elif not EVEN_M:
            b_pt = tl.where(m_q[None, :], b_pt, 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
        if PACK_LEN > 0:
            # The program holds whole sequences: dQ = scale * dS K is complete here.
            b_dq = tl.dot(tl.trans(b_dst).to(b_k.dtype), b_k, input_precision=DOT_PRECISION) * scale
            p_dq_blk = p_dq + i_b * s_gb + i_h * s_gh + tok_q[:, None] * s_gn + offs_d[None, :]
            tl.store(p_dq_blk, b_dq.to(p_dq.dtype.element_ty), mask=m_qd)

    o_g = i_b * s_gb + i_h * s_gh + tok_k[:, None] * s_gn + offs_d[None, :]
    tl.store(p_dk + o_g, (b_dk * scale).to(p_dk.dtype.element_ty), mask=m_kd)
    tl.store(p_dv + o_g, b_dv.to(p_dv.dtype.element_ty), mask=m_kd)


@triton.heuristics({"EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0})
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Looping mode only (PACK_LEN == 0): dQ for one query block."""
    i_m, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_M, 0)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM

    tok_q, slot_q, m_q = _rows(i_g, i_m, tl.arange(0, BLOCK_M), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_M, 0)
    m_qd = m_q[:, None] & m_d[None, :]
    b_q = tl.load(p_q + i_b * s_qb + i_h * s_qh + tok_q[:, None] * s_qn + offs_d[None, :] * s_qd, mask=m_qd, other=0.0)
    b_do = tl.load(
        p_do + i_b * s_dob + i_h * s_doh + tok_q[:, None] * s_don + offs_d[None, :] * s_dod, mask=m_qd, other=0.0
    )
    b_lse = tl.load(p_lse + i_bh.to(tl.int64) * N_TOK + tok_q, mask=m_q, other=0.0)
    b_delta = tl.load(p_delta + i_bh.to(tl.int64) * N_TOK + tok_q, mask=m_q, other=0.0)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, L, BLOCK_N):
        tok_k, slot_k, m_k = _rows(
            i_g, start_n // BLOCK_N, tl.arange(0, BLOCK_N), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_N, 0
        )
        p_kt = p_k + i_b * s_kb + i_h * s_kh + tok_k[None, :] * s_kn + offs_d[:, None] * s_kd  # (BLOCK_D, BLOCK_N)
        p_vt = p_v + i_b * s_vb + i_h * s_vh + tok_k[None, :] * s_vn + offs_d[:, None] * s_vd
        b_kt = tl.load(p_kt, mask=m_k[None, :] & m_d[:, None], other=0.0)
        b_vt = tl.load(p_vt, mask=m_k[None, :] & m_d[:, None], other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale
        b_p = tl.exp2(b_s - b_lse[:, None])
        if not EVEN_N:
            b_p = tl.where(m_k[None, :], b_p, 0.0)
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_q.dtype), tl.trans(b_kt), input_precision=DOT_PRECISION)

    p_dq_blk = p_dq + i_b * s_gb + i_h * s_gh + tok_q[:, None] * s_gn + offs_d[None, :]
    tl.store(p_dq_blk, (b_dq * scale).to(p_dq.dtype.element_ty), mask=m_qd)


# Autotuning, narrowly (key: L, NSEQ, HEAD_DIM). dK/dV programs hold k, v, dk, dv (4 x BLOCK_N x BLOCK_D) and stream
# query blocks: a wide key block and a narrow query block, as in flash-attention 2. dQ programs are the mirror
# image. Packed mode: rows per program as in the forward, the block-diagonal tile is recomputed once.
def _dkdv_configs(plen: int):
    if plen > 0:
        return [triton.Config({"BLOCK_M": r, "BLOCK_N": r}, num_warps=w, num_stages=1)
                for r, w in ((max(32, plen), 4), (max(64, plen), 4), (max(128, plen), 8))]
    return [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]


def _dq_configs():
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]


_TUNED = {}


def _tuned(name: str, plen: int):
    if (name, plen) not in _TUNED:
        kernel, configs = (_bwd_dkdv_kernel, _dkdv_configs(plen)) if name == "dkdv" else (_bwd_dq_kernel, _dq_configs())
        _TUNED[name, plen] = triton.autotune(configs=configs, key=["L", "NSEQ", "HEAD_DIM"])(kernel)
    return _TUNED[name, plen]


def video_attention_bwd_launch(do, q, k, v, o, lse, num_frames: int, axis: str, softmax_scale: float):
    """Launcher: returns (dq, dk, dv), each (batch, F*S, heads, head_dim) contiguous in the dtype of q."""
    batch, num_tokens, heads, head_dim = q.shape
    L, nseq, seq_stride, tok_stride = sequence_geometry(num_tokens, num_frames, axis)
    plen = pack_len(L)
    bd = block_d(head_dim)

    delta = torch.empty((batch, heads, num_tokens), device=q.device, dtype=torch.float32)
    block_t = 64
    _bwd_preprocess_kernel[(triton.cdiv(num_tokens, block_t), batch * heads)](
        o, do, delta, heads, num_tokens, *o.stride()[:3], *do.stride(), HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_T=block_t
    )

    dq = torch.empty((batch, num_tokens, heads, head_dim), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    args = (
        q, k, v, do, lse, delta,
        heads, num_tokens, L, nseq, seq_stride, tok_stride, softmax_scale, softmax_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3],
    )
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=bd, DOT_PRECISION=dot_precision(q.dtype))
    interp = triton_interpreting()

    # dK, dV (and dQ in packed mode): programs over key blocks.
    if interp:
        cfg = {"BLOCK_M": max(16, 2 * plen), "BLOCK_N": max(16, 2 * plen)} if plen else {"BLOCK_M": 16, "BLOCK_N": 16}
        grid = (num_programs(batch * heads, L, nseq, cfg["BLOCK_N"], plen),)
        _bwd_dkdv_kernel[grid](*args[:6], dq, dk, dv, *args[6:], **meta, PACK_LEN=plen, **cfg)
    else:
        grid = lambda META: (num_programs(batch * heads, L, nseq, META["BLOCK_N"], plen),)  # noqa: E731
        _tuned("dkdv", plen)[grid](*args[:6], dq, dk, dv, *args[6:], **meta, PACK_LEN=plen)

    if plen == 0:
        if interp:
            cfg = {"BLOCK_M": 16, "BLOCK_N": 16}
            grid = (num_programs(batch * heads, L, nseq, cfg["BLOCK_M"], 0),)
            _bwd_dq_kernel[grid](*args[:6], dq, *args[6:], **meta, **cfg)
        else:
            grid = lambda META: (num_programs(batch * heads, L, nseq, META["BLOCK_M"], 0),)  # noqa: E731
            _tuned("dq", 0)[grid](*args[:6], dq, *args[6:], **meta)
    return dq, dk, dv
