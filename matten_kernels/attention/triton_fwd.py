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

Head dim: blocks must be powers of two; a head dim like 72 is covered by a 64 main chunk plus a masked 16 tail chunk
(two dots per product, see ``head_dim_blocks``), or by one masked 128 chunk when ``SPLIT_HEAD_DIM`` is off.

Numerics: scores and softmax in fp32 (base 2: the scale is folded with log2(e)), P cast to the input dtype for P @ V,
fp32 accumulators. The saved logsumexp ``lse`` is in base 2: lse = log2(sum_j 2^(s_j * scale * log2 e)); shape
(batch, heads, F*S) fp32, indexed by token position like the output.

Cost model (per batch and head): FLOPs 4 * NSEQ * L^2 * head_dim (two matmuls), bytes 4 * F*S * head_dim * itemsize
(q, k, v read once, o written once) plus 4 * F*S for lse.

Launch path: no autotuner. Each kernel has a short list of tile configs per mode whose index 0 is what
``triton.autotune`` picked on the H100 (NOTES_attention.md); ``pick_config`` takes index 0 (or MATTEN_ATTN_CONFIG), and
everything a launch needs apart from the tensors (sequence geometry, config, grid, constexprs) is computed once per
shape class (``functools.lru_cache``). Launches go through ``matten_kernels._launch.launch``, which calls the compiled
kernel's launcher directly: about 100 us of Python per launch through the autotuner on the H100 host dominated the
short-sequence timings.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._launch import cdiv, launch, next_power_of_2

LOG2E = 1.4426950408889634
# Sequences up to this length are packed, at least two per program. On the H100 (Triton 3.6) every packed case
# verified correct had PACK_LEN <= 16 (L = 5, 16); PACK_LEN 64 (one sequence per program) gave wrong dQ, then an
# illegal memory access, and a run with PACK_LEN 32 (and 4) crashed too (NOTES_attention.md, runs 1-3). Longer
# sequences take the looping kernels, verified at L = 37, 185, 256, 4096.
PACK_MAX_LEN = 16


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
    return next_power_of_2(L) if L <= PACK_MAX_LEN else 0


SPLIT_HEAD_DIM = True  # cover a non-power-of-two head dim by two chunks (72 -> 64 + 16) instead of padding


def head_dim_blocks(head_dim: int, split: bool | None = None):
    """(BLOCK_D, BLOCK_DT): main and tail chunks of the head dim; tl.dot needs power-of-two blocks of >= 16.

    Padding 72 to 128 spends 1.78x the tensor-core work of the real head dim; 64 + 16 = 80 spends 1.11x (two
    dots per product instead of one). BLOCK_DT = 0: one chunk, next power of two, masked.
    """
    padded = max(16, next_power_of_2(head_dim))
    split = SPLIT_HEAD_DIM if split is None else split
    if split and head_dim > 16:
        main = next_power_of_2(head_dim) // 2
        tail = max(16, next_power_of_2(head_dim - main))
        if main + tail < padded:
            return main, tail
    return padded, 0


def alignment(*tensors) -> int:
    """Elements per 16 bytes if head_dim and every (4-D) tensor's batch, token and head strides are multiples of
    that and its data pointer is 16-byte aligned, else 1. Triton only learns divisibility by 16 from integer arguments, so a head
    stride of 72 (Matten-XL) would otherwise turn every tile load into 2-byte scalar loads; the kernels pass this to
    tl.multiple_of on their row and (batch, head) offsets."""
    align = 16 // tensors[0].element_size()
    if tensors[0].shape[-1] % align:
        # the outputs (o, dq, dk, dv) are allocated contiguous, head stride = head_dim: their rows are aligned only
        # when head_dim is a multiple of `align`, whatever the inputs' strides
        return 1
    for t in tensors:
        s_b, s_n, s_h, _ = t.stride()
        if t.data_ptr() % 16 or s_b % align or s_n % align or s_h % align:
            return 1
    return align


def dot_precision() -> str:
    """Matmul precision for fp32 inputs (bf16/fp16 ignore it): 3xTF32 on the GPU (fp32-level accuracy on tensor
    cores), exact ieee fp32 in the interpreter.

    Plain tf32 is not enough here: the backward forms dS = P * (dP - delta) with delta = rowsum(dO * O) (flash
    attention), which relies on rowsum(P * dP) == delta. With dP rounded to tf32 (~1e-3) the rows of dS no longer
    sum to zero, and the error is systematic: it survives the cancellation in parameter gradients. On the demo
    model's training step (H100) that put a 5.6% relative error into the fp32 parameter gradients, against 0.12%
    for the reference path with tf32 matmuls (benchmarks/demo_grad_attribution.py)."""
    return "ieee" if triton_interpreting() else "tf32x3"


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
        return batch_heads * cdiv(NSEQ, block_m // plen)
    return batch_heads * NSEQ * cdiv(L, block_m)


@triton.jit
def _bh_offset(i_b, i_h, s_b, s_h, ALIGN: tl.constexpr):
    """Element offset of (batch, head); a multiple of ALIGN (the launcher checked the strides)."""
    return tl.multiple_of(i_b * s_b + i_h * s_h, ALIGN)


@triton.jit
def _out_offset(i_b, i_h, N_TOK, H, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    """Element offset of (batch, head) in a contiguous (batch, N_TOK, H, HEAD_DIM) tensor (o, dq, dk, dv: the
    launchers allocate them, so their strides are not passed); its token stride is H * HEAD_DIM. i_b is int64."""
    return tl.multiple_of((i_b * N_TOK) * (H * HEAD_DIM) + i_h * HEAD_DIM, ALIGN)


@triton.jit
def _tile_ptrs(p_base, tok, s_n, offs_d, s_d, TRANSPOSED: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers to a (tokens, d-chunk) tile of a (tokens, head_dim) slice, or its transpose (d-chunk, tokens).
    ALIGN: row offsets are multiples of ALIGN elements (16 bytes), so rows load as 16-byte vectors.
    (One return statement: the Triton compiler, unlike the interpreter, rejects returns of different shapes.)"""
    o_tok = tl.multiple_of(tok * s_n, ALIGN)
    if TRANSPOSED:
        p = p_base + o_tok[None, :] + offs_d[:, None] * s_d
    else:
        p = p_base + o_tok[:, None] + offs_d[None, :] * s_d
    return p


@triton.jit
def _load_tile(p, m_tok, offs_d, HEAD_DIM: tl.constexpr, TOK_MASK: tl.constexpr, D_MASK: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """Load a tile from ``_tile_ptrs``; masked tokens and d >= HEAD_DIM read as 0. Masks only where needed
    (constexpr flags): a full tile is a plain load."""
    if TRANSPOSED:
        m_t = m_tok[None, :]
        m_dd = (offs_d < HEAD_DIM)[:, None]
    else:
        m_t = m_tok[:, None]
        m_dd = (offs_d < HEAD_DIM)[None, :]
    if TOK_MASK and D_MASK:
        b_x = tl.load(p, mask=m_t & m_dd, other=0.0)
    elif TOK_MASK:
        b_x = tl.load(p, mask=m_t, other=0.0)
    elif D_MASK:
        b_x = tl.load(p, mask=m_dd, other=0.0)
    else:
        b_x = tl.load(p)
    return b_x


@triton.jit
def _load_rows(p_base, tok, s_n, offs_d, s_d, m_tok, HEAD_DIM: tl.constexpr, D_MASK: tl.constexpr,
               ALIGN: tl.constexpr):
    """One-off (rows, d-chunk) tile load outside the loops (token-masked)."""
    p = _tile_ptrs(p_base, tok, s_n, offs_d, s_d, False, ALIGN)
    return _load_tile(p, m_tok, offs_d, HEAD_DIM, True, D_MASK, False)


@triton.jit
def _store_rows(p_base, tok, s_n, offs_d, m_row, b_x, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    """Store a (rows, d-chunk) tile into a contiguous (tokens, head_dim) slice (outputs, gradients)."""
    o_tok = tl.multiple_of(tok * s_n, ALIGN)
    tl.store(p_base + o_tok[:, None] + offs_d[None, :], b_x.to(p_base.dtype.element_ty),
             mask=m_row[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _video_attn_fwd_kernel(
    # pointers (o contiguous)
    p_q, p_k, p_v, p_o, p_lse,
    # sizes
    H, N_TOK, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, qk_scale,
    # strides (elements)
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    # meta-parameters, all passed by the launcher (matten_kernels._launch wants every constexpr)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PACK_LEN: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """One program: BLOCK_M query rows against all keys of their sequence(s). The head dim is covered by a main
    chunk [0, BLOCK_D) and, when BLOCK_DT > 0, a tail chunk [BLOCK_D, BLOCK_D + BLOCK_DT) (see head_dim_blocks).
    Key pointers are built once and advanced by BLOCK_N tokens per iteration (address math stays out of the loop).
    MASK_N: key blocks need a token mask (packed mode, or L not a multiple of BLOCK_N)."""
    i_m, i_g, i_bh = _program_ids(L, NSEQ, BLOCK_M, PACK_LEN)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    p_q_bh = p_q + _bh_offset(i_b, i_h, s_qb, s_qh, ALIGN)
    p_k_bh = p_k + _bh_offset(i_b, i_h, s_kb, s_kh, ALIGN)
    p_v_bh = p_v + _bh_offset(i_b, i_h, s_vb, s_vh, ALIGN)
    D_MASK: tl.constexpr = BLOCK_D > HEAD_DIM  # main chunk sticks out of the head dim (unsplit, padded)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok_q, slot_q, m_q = _rows(i_g, i_m, tl.arange(0, BLOCK_M), L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_M, PACK_LEN)
    tok_k, slot_k, m_k = _rows(i_g, 0, offs_n, L, NSEQ, SEQ_STRIDE, TOK_STRIDE, BLOCK_N, PACK_LEN)
    b_q = _load_rows(p_q_bh, tok_q, s_qn, offs_d, s_qd, m_q, HEAD_DIM, D_MASK, ALIGN)
    p_kt = _tile_ptrs(p_k_bh, tok_k, s_kn, offs_d, s_kd, True, ALIGN)  # k^T (BLOCK_D, BLOCK_N)
    p_vn = _tile_ptrs(p_v_bh, tok_k, s_vn, offs_d, s_vd, False, ALIGN)  # v (BLOCK_N, BLOCK_D)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_DT > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_DT)
        b_q2 = _load_rows(p_q_bh, tok_q, s_qn, offs_d2, s_qd, m_q, HEAD_DIM, True, ALIGN)
        p_kt2 = _tile_ptrs(p_k_bh, tok_k, s_kn, offs_d2, s_kd, True, ALIGN)
        p_vn2 = _tile_ptrs(p_v_bh, tok_k, s_vn, offs_d2, s_vd, False, ALIGN)
        b_acc2 = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    step_k = tl.full([], BLOCK_N, tl.int64) * TOK_STRIDE * s_kn
    step_v = tl.full([], BLOCK_N, tl.int64) * TOK_STRIDE * s_vn

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 scaled scores)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m)

    # Packed mode: one key block (the same sequences as the queries). Looping mode: all L keys of the sequence.
    n_end = BLOCK_N if PACK_LEN > 0 else L
    for start_n in range(0, n_end, BLOCK_N):
        if PACK_LEN == 0:
            if MASK_N:
                m_k = (start_n + offs_n) < L
        b_kt = _load_tile(p_kt, m_k, offs_d, HEAD_DIM, MASK_N, D_MASK, True)
        b_v = _load_tile(p_vn, m_k, offs_d, HEAD_DIM, MASK_N, D_MASK, False)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if BLOCK_DT > 0:
            b_kt2 = _load_tile(p_kt2, m_k, offs_d2, HEAD_DIM, MASK_N, True, True)
            b_v2 = _load_tile(p_vn2, m_k, offs_d2, HEAD_DIM, MASK_N, True, False)
            b_s = tl.dot(b_q2, b_kt2, b_s, input_precision=DOT_PRECISION)
        b_s = b_s * qk_scale  # base-2 units
        # Finite fill (not -inf): fully masked padding rows then stay NaN-free; valid rows always see their own
        # sequence's first key in the first block, so the fill never wins a max for them.
        if PACK_LEN > 0:
            b_s = tl.where((slot_q[:, None] == slot_k[None, :]) & m_k[None, :], b_s, -1.0e30)
        elif MASK_N:
            b_s = tl.where(m_k[None, :], b_s, -1.0e30)

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_alpha = tl.exp2(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_p = b_p.to(b_v.dtype)
        b_acc = tl.dot(b_p, b_v, b_acc * b_alpha[:, None], input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            b_acc2 = tl.dot(b_p, b_v2, b_acc2 * b_alpha[:, None], input_precision=DOT_PRECISION)
            p_kt2 += step_k
            p_vn2 += step_v
        b_m = b_m_new
        p_kt += step_k
        p_vn += step_v

    p_o_bh = p_o + _out_offset(i_b, i_h, N_TOK, H, HEAD_DIM, ALIGN)
    _store_rows(p_o_bh, tok_q, H * HEAD_DIM, offs_d, m_q, b_acc / b_l[:, None], HEAD_DIM, ALIGN)
    if BLOCK_DT > 0:
        _store_rows(p_o_bh, tok_q, H * HEAD_DIM, offs_d2, m_q, b_acc2 / b_l[:, None], HEAD_DIM, ALIGN)
    tl.store(p_lse + i_bh.to(tl.int64) * N_TOK + tok_q, b_m + tl.log2(b_l), mask=m_q)


# ---------------------------------------------------------------------------------------------------------------
# Configs and launch plans (no autotuner: see the module docstring)
# ---------------------------------------------------------------------------------------------------------------

# Tile configs per mode. Index 0 is what triton.autotune picked on the H100 (Triton 3.6, bf16, hd 72: spatial S=256,
# temporal F=16, global 4096); the others are the alternatives it chose among, all correct there (bench
# --sweep-configs; tile sets with 128 x 128 / 2-stage backward tiles crashed, NOTES_attention.md run 2).
# Looping mode: flash-attention tiles; BLOCK_N 64 keeps the fp32 score tile plus the (BLOCK_M, 64 + 16) accumulators
# in registers. Packed mode (temporal F=16): 64 or 32 rows per program trade tensor-core fill (wgmma needs 64 rows)
# against block-diagonal waste and the program count.
def _fwd_configs(plen: int):
    if plen > 0:
        return [triton.Config({"BLOCK_M": r, "BLOCK_N": r}, num_warps=4, num_stages=1)
                for r in (max(64, 2 * plen), max(32, 2 * plen))]
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    ]


def _interp_fwd_config(plen: int):
    """Small fixed tiles for the CPU interpreter: several key blocks so the loop and its masks are exercised."""
    r = max(16, 2 * plen) if plen > 0 else 16
    return triton.Config({"BLOCK_M": r, "BLOCK_N": r}, num_warps=4, num_stages=1)


# MATTEN_ATTN_CONFIG=i: run config i of each list (clamped to its length) instead of index 0; the benchmark's
# --sweep-configs runs each index in its own process. CONFIG_SUBSET: config indices allowed in this process (the
# sweep sets it to those that passed); the lowest allowed index runs. Both are read when a shape class is first
# planned, so set them before the first launch.
_fixed = os.environ.get("MATTEN_ATTN_CONFIG", "")
FIXED_CONFIG = int(_fixed) if _fixed.strip() else None
CONFIG_SUBSET = None
_CHOSEN = {}  # {kernel name: {shape class: config}} for tuned_configs()


def pick_config(name: str, configs, interp_config, key):
    """The config kernel ``name`` runs for shape class ``key``: ``interp_config`` under the interpreter, else
    ``configs[i]``, i = MATTEN_ATTN_CONFIG if set, else the lowest index in CONFIG_SUBSET, else 0."""
    if triton_interpreting():
        cfg = interp_config
    else:
        i = FIXED_CONFIG if FIXED_CONFIG is not None else min(CONFIG_SUBSET) if CONFIG_SUBSET else 0
        cfg = configs[min(i, len(configs) - 1)]
    _CHOSEN.setdefault(name, {})[str(key)] = str(cfg)
    return cfg


def tuned_configs():
    """{kernel name: {shape class: config}} of the configs this process has launched (for benchmark notes)."""
    return {name: dict(chosen) for name, chosen in _CHOSEN.items()}


def config_meta(cfg) -> dict:
    """A config's launch keywords: its block sizes, num_warps, num_stages."""
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def shape_class(num_tokens: int, head_dim: int, num_frames: int, axis: str, align: int, split: bool):
    """What the forward and backward plans share: (L, NSEQ, PACK_LEN, runtime sizes, constexprs).

    sizes: (H is prepended by the caller) N_TOK, L, NSEQ, SEQ_STRIDE, TOK_STRIDE. ALIGN covers the inputs (``align``,
    from ``alignment``) and the contiguous outputs the launchers allocate (token stride heads * head_dim)."""
    L, nseq, seq_stride, tok_stride = sequence_geometry(num_tokens, num_frames, axis)
    plen = pack_len(L)
    block_d, block_dt = head_dim_blocks(head_dim, split)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DT=block_dt, PACK_LEN=plen, DOT_PRECISION=dot_precision(),
                ALIGN=align if head_dim % align == 0 else 1)
    return L, nseq, plen, (num_tokens, L, nseq, seq_stride, tok_stride), meta


@functools.lru_cache(maxsize=None)
def _fwd_plan(batch: int, heads: int, num_tokens: int, head_dim: int, num_frames: int, axis: str, align: int,
              split: bool):
    """(grid, runtime sizes, meta) of the forward launch of one shape class, computed once."""
    L, nseq, plen, sizes, meta = shape_class(num_tokens, head_dim, num_frames, axis, align, split)
    cfg = pick_config("fwd_packed" if plen else "fwd", _fwd_configs(plen), _interp_fwd_config(plen),
                      (L, nseq, head_dim, split))
    meta = dict(meta, **config_meta(cfg), MASK_N=plen > 0 or L % cfg.kwargs["BLOCK_N"] != 0)
    grid = (num_programs(batch * heads, L, nseq, cfg.kwargs["BLOCK_M"], plen),)
    return grid, (heads, *sizes), meta


def video_attention_fwd_launch(q, k, v, num_frames: int, axis: str, softmax_scale: float):
    """Launcher: returns (o, lse). o: (batch, F*S, heads, head_dim) contiguous, dtype of q; lse: (batch, heads, F*S)
    fp32, base-2 logsumexp of the scaled scores."""
    batch, num_tokens, heads, head_dim = q.shape
    grid, sizes, meta = _fwd_plan(batch, heads, num_tokens, head_dim, num_frames, axis, alignment(q, k, v),
                                  SPLIT_HEAD_DIM)
    o = q.new_empty((batch, num_tokens, heads, head_dim))
    lse = q.new_empty((batch, heads, num_tokens), dtype=torch.float32)
    launch(_video_attn_fwd_kernel, grid,
           (q, k, v, o, lse, *sizes, softmax_scale * LOG2E, *q.stride(), *k.stride(), *v.stride()), meta)
    return o, lse
