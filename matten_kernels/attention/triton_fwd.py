"""Flash-attention forward for video attention, reading the frame-major token layout through strides.

q, k, v: (batch, F*S, heads, head_dim), possibly strided views of a packed (batch, F*S, 3, heads, head_dim) tensor.
A *sequence* is the set of tokens that attend to each other; token ``t`` of sequence ``j`` sits at index
``j * SEQ_STRIDE + t * TOK_STRIDE`` of dim 1:

    axis       L (sequence length)  NSEQ (sequences per batch and head)  SEQ_STRIDE  TOK_STRIDE
    spatial    S                    F                                    S           1
    temporal   F                    S                                    1           S
    global     F*S                  1                                    0           1

Two ways to map sequences to programs (constexpr ``PACK_LEN``):

* ``PACK_LEN == 0`` (long sequences: spatial S=256, global): one program per (batch*head, sequence, query block of
  BLOCK_M rows); it loops over key blocks of BLOCK_N with the online softmax.
* ``PACK_LEN > 0`` (short sequences, L <= PACK_MAX_LEN, e.g. temporal F=16): one program holds BLOCK_M // PACK_LEN
  whole sequences, each padded to PACK_LEN = next_power_of_2(L) rows, and computes their attention as one
  BLOCK_M x BLOCK_M block-diagonal score tile (one key block, no loop). The off-diagonal waste (BLOCK_M / PACK_LEN
  times the FLOPs) is cheap at L = 16, and it fills the tensor cores that a 16 x 16 tile per program would not.

Numerics: scores and softmax in fp32 (base 2: the scale is folded with log2(e)), P cast to the input dtype for P @ V,
fp32 accumulators. The saved logsumexp ``lse`` is in base 2: lse = log2(sum_j 2^(s_j * scale * log2 e)); shape
(batch, heads, F*S) fp32, indexed by token position like the output.

Cost model (per batch and head): FLOPs 4 * NSEQ * L^2 * head_dim (two matmuls), bytes 4 * F*S * head_dim * itemsize
(q, k, v read once, o written once) plus 4 * F*S for lse.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._backend import triton_interpreting

LOG2E = 1.4426950408889634
PACK_MAX_LEN = 64  # sequences up to this length are packed several per program


def sequence_geometry(num_tokens: int, num_frames: int, axis: str):
    """Return (L, NSEQ, SEQ_STRIDE, TOK_STRIDE) in tokens for ``axis`` (see the module docstring)."""
    F, S = num_frames, num_tokens // num_frames
    if axis == "spatial":
        return S, F, S, 1
    if axis == "temporal":
        return F, S, 1, S
    if axis == "global":
        return F * S, 1, 0, 1
    raise ValueError(f"unknown axis {axis!r}")


def pack_len(L: int) -> int:
    """Rows each sequence gets in packed mode, or 0 for the looping (flash) mode."""
    return triton.next_power_of_2(L) if L <= PACK_MAX_LEN else 0


def block_d(head_dim: int) -> int:
    """Head-dim block: next power of two (masked), at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype) -> str:
    """fp32 inputs use tf32 on the GPU (relative error ~3e-4) and exact ieee fp32 in the interpreter."""
    return "ieee" if triton_interpreting() else "tf32"


@triton.jit
def _rows(i_g, i_m, offs, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK: tl.constexpr, PACK_LEN: tl.constexpr):
    """Token index (dim 1), sequence slot within the program and validity of BLOCK rows (query or key side).

    Packed: the program's sequence group i_g holds BLOCK // PACK_LEN sequences; row r is token r % PACK_LEN of
    sequence slot r // PACK_LEN. Looping: row r is token i_m * BLOCK + r of sequence i_g.
    """
    if PACK_LEN > 0:
        slot = offs // PACK_LEN
        t = offs % PACK_LEN
        seq = i_g * (BLOCK // PACK_LEN) + slot
        valid = (t < L) & (seq < NSEQ)
    else:
        slot = offs * 0
        t = i_m * BLOCK + offs
        seq = i_g
        valid = t < L
    tok = seq * SEQ_STRIDE + t * TOK_STRIDE
    return tok, slot, valid


@triton.jit
def _program_ids(L, NSEQ, BLOCK_M: tl.constexpr, PACK_LEN: tl.constexpr):
    """Split the flat program id into (query block, sequence group, batch*head); query block fastest."""
    pid = tl.program_id(0)
    if PACK_LEN > 0:
        num_m = 1
        num_g = tl.cdiv(NSEQ, BLOCK_M // PACK_LEN)
    else:
        num_m = tl.cdiv(L, BLOCK_M)
        num_g = NSEQ
    i_m = pid % num_m
    i_g = (pid // num_m) % num_g
    i_bh = pid // (num_m * num_g)
    return i_m, i_g, i_bh


def num_programs(batch_heads: int, L: int, NSEQ: int, block_m: int, plen: int) -> int:
    if plen > 0:
        return batch_heads * triton.cdiv(NSEQ, block_m // plen)
    return batch_heads * NSEQ * triton.cdiv(L, block_m)


@triton.heuristics({"EVEN_N": lambda a: a["PACK_LEN"] == 0 and a["L"] % a["BLOCK_N"] == 0})
@triton.jit
def _video_attn_fwd_kernel(
    # pointers
    p_q, p_k, p_v, p_o, p_lse,
    # sizes
    H, N_TOK, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, qk_scale,
    # strides (elements)
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_ob, s_on, s_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACK_LEN: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_m, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_M, PACK_LEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM
    tok_q, slot_q, m_q = _rows(i_g, i_m, tl.arange(0, BLOCK_M), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_M, PACK_LEN)

    p_q_blk = p_q + i_b * s_qb + i_h * s_qh + tok_q[:, None] * s_qn + offs_d[None, :] * s_qd
    b_q = tl.load(p_q_blk, mask=m_q[:, None] & m_d[None, :], other=0.0)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 scaled scores)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Packed mode: one key block (the same sequences as the queries). Looping mode: all L keys of the sequence.
    n_end = BLOCK_N if PACK_LEN > 0 else L
    for start_n in range(0, n_end, BLOCK_N):
        tok_k, slot_k, m_k = _rows(
            i_g, start_n // BLOCK_N, tl.arange(0, BLOCK_N), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_N, PACK_LEN
        )
        p_kt = p_k + i_b * s_kb + i_h * s_kh + tok_k[None, :] * s_kn + offs_d[:, None] * s_kd  # (BLOCK_D, BLOCK_N)
        p_v_blk = p_v + i_b * s_vb + i_h * s_vh + tok_k[:, None] * s_vn + offs_d[None, :] * s_vd
        b_kt = tl.load(p_kt, mask=m_k[None, :] & m_d[:, None], other=0.0)
        b_v = tl.load(p_v_blk, mask=m_k[:, None] & m_d[None, :], other=0.0)

        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        # Finite fill (not -inf): fully masked padding rows then stay NaN-free; valid rows always see their own
        # sequence's first key in the first block, so the fill never wins a max for them.
        if PACK_LEN > 0:
            b_s = tl.where((slot_q[:, None] == slot_k[None, :]) & m_k[None, :], b_s, -1.0e30)
        elif not EVEN_N:
            b_s = tl.where(m_k[None, :], b_s, -1.0e30)

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_alpha = tl.exp2(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new

    b_o = b_acc / b_l[:, None]
    p_o_blk = p_o + i_b * s_ob + i_h * s_oh + tok_q[:, None] * s_on + offs_d[None, :]
    tl.store(p_o_blk, b_o.to(p_o.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
    p_lse_blk = p_lse + i_bh.to(tl.int64) * N_TOK + tok_q
    tl.store(p_lse_blk, b_m + tl.log2(b_l), mask=m_q)


# Autotuning, narrowly. Looping mode (spatial S=256, global 4096): the usual flash-attention tiles for a head-dim
# block of 64..128; BLOCK_N 64 keeps the fp32 score tile + the (BLOCK_M, 128) accumulator within registers at 8
# warps. Packed mode (temporal F=16): rows per program 32/64/128 trades tensor-core fill against block-diagonal waste
# and against the number of programs (B*H*S / sequences per program must still fill 132 SMs).
# Key: L and NSEQ (the sequence-length bucket and count); head_dim and dtype specialise the kernel anyway.
def _fwd_configs(plen: int):
    if plen > 0:
        return [triton.Config({"BLOCK_M": r, "BLOCK_N": r}, num_warps=w, num_stages=1)
                for r, w in ((max(32, plen), 4), (max(64, plen), 4), (max(128, plen), 8))]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]


def _interp_config(plen: int):
    """Small fixed tiles for the CPU interpreter: several key blocks so the loop and its masks are exercised."""
    if plen > 0:
        r = max(16, 2 * plen)
        return {"BLOCK_M": r, "BLOCK_N": r}
    return {"BLOCK_M": 16, "BLOCK_N": 16}


_TUNED = {}


def _tuned_fwd(plen: int):
    if plen not in _TUNED:
        _TUNED[plen] = triton.autotune(configs=_fwd_configs(plen), key=["L", "NSEQ", "HEAD_DIM"])(
            _video_attn_fwd_kernel
        )
    return _TUNED[plen]


def video_attention_fwd_launch(q, k, v, num_frames: int, axis: str, softmax_scale: float):
    """Launcher: returns (o, lse). o: (batch, F*S, heads, head_dim) contiguous, dtype of q; lse: (batch, heads, F*S)
    fp32, base-2 logsumexp of the scaled scores."""
    import torch

    batch, num_tokens, heads, head_dim = q.shape
    L, nseq, seq_stride, tok_stride = sequence_geometry(num_tokens, num_frames, axis)
    plen = pack_len(L)
    o = torch.empty((batch, num_tokens, heads, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, num_tokens), device=q.device, dtype=torch.float32)
    args = (
        q, k, v, o, lse,
        heads, num_tokens, L, nseq, seq_stride, tok_stride, softmax_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3],
    )
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), PACK_LEN=plen, DOT_PRECISION=dot_precision(q.dtype))
    if triton_interpreting():
        cfg = _interp_config(plen)
        grid = (num_programs(batch * heads, L, nseq, cfg["BLOCK_M"], plen),)
        _video_attn_fwd_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda META: (num_programs(batch * heads, L, nseq, META["BLOCK_M"], plen),)  # noqa: E731
        _tuned_fwd(plen)[grid](*args, **meta)
    return o, lse
