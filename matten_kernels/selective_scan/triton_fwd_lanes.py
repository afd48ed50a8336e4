"""Triton forward of the (unidirectional) selective scan with the time axis across lanes: one pass, one exp.

The segment kernel (:mod:`.triton_fwd`) keeps time in registers and splits long sequences into segments, which
costs a summary pass that evaluates every decay a second time. This kernel parallelises time inside a warp instead,
so each decay exp(delta * A) is evaluated once (the floor's count) and no summary pass exists:

* one program (one warp) per (batch, ``CPW`` channels): each channel on ``TL`` = 32 / CPW lanes; the sequence is
  walked in windows of ``W`` = TL x ``VEC`` steps (``VEC`` = one 16-byte vector of u: 8 steps in 16-bit dtypes);
* for each state n (a static loop over the ``BLOCK_N`` <= 16 states): a = exp2(delta * A_n log2 e) and
  x = delta * u * B_n over the window, then ``tl.associative_scan`` of (a, x) pairs along the window (in-thread
  over a lane's VEC steps, shuffles across lanes), and y += C_n * h;
* the state carried between windows enters as x_0 += a_0 * carry, so the scan yields the states directly; each
  lane's last state (a register move) is saved every ``SAVE`` steps for the backward (64, or the lanes backward's
  window: :func:`.triton_bwd_lanes.lanes_save_steps`; block 0's, the initial state, only where ``FIRST``:
  :func:`.triton_fwd.keeps_first`), the state after the last step is ``last_state``, and a channel's last lane's
  is broadcast (``tl.gather``: one shuffle) as the next window's carry, kept with the A values in every lane's
  registers (``[CPW, TL, BLOCK_N]``, picked by register moves);
* B, C rows are copied into shared memory one window ahead (the pipeline, below) and read from there three states
  ahead of their use, u and delta of the next window loaded while this one is scanned (the kernel is
  latency-bound: session 6 measured each state of prefetch distance).

B and C are read in u's dtype, not as fp32 copies: every channel's program reads them, so they are the kernel's
largest traffic (L2 to SM), and halving it was measured 13% faster at global XL (H100, session 6: 0.361 -> 0.324
ms) despite the conversions (in bf16 the unidirectional scan loads them two elements to a 32-bit word and unpacks
them with one instruction an element, :func:`_f32`: 5% faster). Two channels a warp halve it again (their lanes read the same vectors: one request)
where the grid allows (:func:`lanes_fwd_cpw`). Windows are whole (no masks, vector loads) except an optional last
partial window, which a second launch (``TAIL``) runs with masks after loading its carry from the saved states, so
the masked code's registers do not lower the main loop's occupancy.

The window loop runs through Triton's software pipeline (``STAGES`` 2: the next window's B/C rows as asynchronous
copies into shared memory, 16 KB a program at global XL; 20% faster there than loading them into registers three
states ahead). ``NW`` > 1 (an A/B knob, default 1) puts NW warps (NW x CPW channels) in a program that load B/C as
one row [1, W] for all of them, so the warps share one copy, as the CUDA forward's blocks stage B/C: measured slower
(H200: global XL 0.288 ms at NW 2 against 0.208). Without the pipeline that row is converted between layouts
through shared memory every state (offline: 4,817 loop instructions against 1,913), so NW > 1 is meant with
``STAGES`` > 1.

The bidirectional scan runs as two launches of this kernel (:func:`bi_selective_scan_fwd_lanes`), no flipped
copies: the backward direction in reverse scan order (``REV``: lane l takes the window's chunk TL - 1 - l and its
steps in reverse, register moves), its y into an fp32 scratch, then the forward direction, which adds it, scales,
gates and writes out once.

When it is used: :func:`use_lanes` (16-bit dtypes, long sequences, enough channels to fill the GPU, vector-aligned
rows; bidirectional, :func:`use_lanes_bi`: both directions' rows, whole windows). Everything else takes the segment
kernel; both give the same outputs and saved states (same backward).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._launch import launch, next_power_of_2
from .triton_fwd import LOG2E, SAVE_STEPS, _exp2, _maximum, _sm_count, _softplus, keeps_first, kept_states


@triton.jit
def _ld(p, m, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(p)
    else:
        return tl.load(p, mask=m, other=0.0)


@triton.jit
def _ld_raw(p, base, t, tw, m, EVEN: tl.constexpr, WORDS: tl.constexpr):
    """Elements p + t of a 16-bit row as loaded: WORDS, two a 32-bit word, from (p + base) + tw (tw: word offsets,
    base even: t = base + the elements of tw); else the elements themselves (masked unless EVEN)."""
    if WORDS:
        return tl.load((p + base).to(tl.pointer_type(tl.int32), bitcast=True) + tw)
    else:
        return _ld(p + t, m, EVEN)


@triton.jit
def _f32(x, WORDS: tl.constexpr):
    """Loaded elements -> fp32. WORDS (bf16 pairs in int32 words, the last axis): one instruction an element, the
    low half shifted up and the high half masked (Triton's bf16 -> fp32 of a high half takes two: PRMT + SHF)."""
    if WORDS:
        return tl.interleave((x << 16).to(tl.float32, bitcast=True), (x & -65536).to(tl.float32, bitcast=True))
    else:
        return x.to(tl.float32)


@triton.jit
def _pick_last_axis_max(x, m):
    """x[..., j] where the mask m is true at j only (a register move: the last axis is in-thread)."""
    return tl.reduce(tl.where(m, x, float("-inf")), len(x.shape) - 1, _maximum, keep_dims=True)


@triton.jit
def _pick_last_axis_sum(x, m):
    """:func:`_pick_last_axis_max` for the interpreter (see :func:`.triton_fwd._pick_sum`)."""
    return tl.sum(tl.where(m, x, 0.0), len(x.shape) - 1, keep_dims=True)


_pick_last_axis = _pick_last_axis_sum if triton_interpreting() else _pick_last_axis_max


@triton.jit
def _channel_params(p_bias, p_D, offs, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """delta_bias and D of the channels at offs (0.0 when absent)."""
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(p_bias + offs)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(p_D + offs)
    return bias, Dv


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _rev2(x):
    """[.., .., 2] -> the last axis reversed (register moves: it is in-thread)."""
    a, b = tl.split(x)
    return tl.join(b, a)


@triton.jit
def _rev4(x, S0: tl.constexpr, S1: tl.constexpr):
    e, o = tl.split(tl.reshape(x, [S0, S1, 2, 2]))  # steps 0, 2 and 1, 3
    return tl.reshape(tl.join(_rev2(o), _rev2(e)), [S0, S1, 4])


@triton.jit
def _rev_steps(x, CPW: tl.constexpr, TL: tl.constexpr, VEC: tl.constexpr):
    """[CPW, TL * VEC] -> each lane's VEC steps in reverse order (register moves)."""
    if VEC == 4:
        r = _rev4(tl.reshape(x, [CPW, TL, 4]), CPW, TL)
    else:
        e, o = tl.split(tl.reshape(x, [CPW, TL, 4, 2]))  # steps 0, 2, 4, 6 and 1, 3, 5, 7
        r = tl.join(_rev4(o, CPW, TL), _rev4(e, CPW, TL))
    return tl.reshape(r, [CPW, TL * VEC])


@triton.jit
def _window(w, u_raw, dt_raw, carry, A2, bias, Dv, scale, p_z1, p_B1, p_C1, p_out1, p_ws1, p_st, p_hl, L, N,
            n_saves, o_t, o_tw, o_tb, o_twb, o_l, o_v, o_c3, o_n2, CPW: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, EVEN: tl.constexpr,
            SAVE: tl.constexpr, REV: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr, NW: tl.constexpr,
            CB: tl.constexpr):
    """Scan window w (steps w * W ..) of the program's CPW channels from the carried states; returns the states after
    it. [CPW, W] tensors (channel, step in scan order), viewed as [CPW, TL, VEC] (channel, time lane, step of the
    lane). REV: scan order is descending time: lane l holds the window's chunk TL - 1 - l (``o_t``, loaded as
    16-byte vectors), its steps reversed in registers (:func:`_rev_steps`). MODE (as the segment kernel's) 0: out;
    1: y into the fp32 scratch ws; 2: out = (y + ws) * scale, gated."""
    TL: tl.constexpr = 32 // CPW
    VEC: tl.constexpr = W // TL
    C: tl.constexpr = CPW * NW  # the program's channels: CPW a warp, NW warps
    o_last = o_v == VEC - 1
    o_first = (o_l == 0) & (o_v == 0)
    t = w * W + o_t  # [CPW, W]: the steps each element loads (the same in every channel's row)
    m = t < L
    u = _f32(u_raw, WORDS)
    dt = _f32(dt_raw, WORDS) + bias
    if REV:
        u = _rev_steps(u, C, TL, VEC)
        dt = _rev_steps(dt, C, TL, VEC)
    if SOFTPLUS:
        dt = _softplus(dt)
    if not EVEN:
        dt = tl.where(m, dt, 0.0)  # padded steps: decay 1, input 0, so the state passes through them unchanged
    du2 = tl.reshape(dt * u, [C, TL, VEC])
    dt2 = tl.reshape(dt, [C, TL, VEC])
    y = tl.zeros([C, W], dtype=tl.float32)
    # the state after each lane's last step in scan order is kept where that ends a SAVE block: forward, the state
    # entering block i_save (the slot after the last one is the last state); REV (windows whole), the one entering
    # block i_save - 1 from its end, which the lane's chunk start t_end begins
    if REV:
        t_end = w * W + (TL - 1 - o_l) * VEC  # [1, TL, 1]
        i_save = t_end // SAVE - 1
        m_save = (t_end % SAVE == 0) & (t_end > 0)
        p_save = p_st + i_save * N
    else:
        t_end = w * W + (o_l + 1) * VEC
        i_save = t_end // SAVE
        m_save = (t_end % SAVE == 0) & (i_save <= n_saves)
        p_save = tl.where(i_save < n_saves, p_st + i_save * N, p_hl)  # [CPW, TL, 1]
    # B, C of states n+1, n+2, n+3 are in flight while state n is scanned (each state's chain of exp, scan and
    # shuffles is short next to an L2 round trip: 1 state ahead 0.337, 2 ahead 0.319, 3 ahead 0.315 ms at global XL).
    # The CPW channels share B/C: their lanes load the same addresses, which one request serves.
    # B/C rows [CB, W] at offsets o_tb / o_twb: CB = CPW (the same addresses in every channel's row), or, NW > 1, 1:
    # one row the program's warps share (one copy in shared memory where the window loop is pipelined, STAGES > 1),
    # broadcast over the channels
    tb = w * W + o_tb
    mb = tb < L
    b1 = _ld_raw(p_B1, w * W, tb, o_twb, mb, EVEN, WORDS)
    c1 = _ld_raw(p_C1, w * W, tb, o_twb, mb, EVEN, WORDS)
    b2, c2, b3, c3 = b1, c1, b1, c1
    if BLOCK_N > 1:
        b2 = _ld_raw(p_B1 + L, w * W, tb, o_twb, mb, EVEN, WORDS)
        c2 = _ld_raw(p_C1 + L, w * W, tb, o_twb, mb, EVEN, WORDS)
    if BLOCK_N > 2:
        b3 = _ld_raw(p_B1 + 2 * L, w * W, tb, o_twb, mb, EVEN, WORDS)
        c3 = _ld_raw(p_C1 + 2 * L, w * W, tb, o_twb, mb, EVEN, WORDS)
    for n in tl.static_range(BLOCK_N):
        b_n = _f32(b1, WORDS)
        c_n = _f32(c1, WORDS)
        if REV:
            b_n = _rev_steps(b_n, CB, TL, VEC)
            c_n = _rev_steps(c_n, CB, TL, VEC)
        b1, c1, b2, c2 = b2, c2, b3, c3
        if n + 3 < BLOCK_N:
            b3 = _ld_raw(p_B1 + (n + 3) * L, w * W, tb, o_twb, mb, EVEN, WORDS)
            c3 = _ld_raw(p_C1 + (n + 3) * L, w * W, tb, o_twb, mb, EVEN, WORDS)
        a2 = _exp2(dt2 * _pick_last_axis(A2, o_n2 == n))
        x2 = du2 * tl.reshape(b_n, [CB, TL, VEC])
        x2 = tl.where(o_first, x2 + a2 * _pick_last_axis(carry, o_n2 == n), x2)  # the carry enters at step 0
        _, h = tl.associative_scan((tl.reshape(a2, [C, W]), tl.reshape(x2, [C, W])), 1, _combine)
        y += h * c_n
        h_end = _pick_last_axis(tl.reshape(h, [C, TL, VEC]), o_last)  # [C, TL, 1]: the state after each lane
        if n < N:
            tl.store(p_save + n, h_end, mask=m_save)
        carry = tl.where(o_n2 == n, tl.gather(h_end, o_l * 0 + (TL - 1) + o_c3 * 0, 1), carry)
    if HAS_D:
        y += Dv * u
    if REV:
        y = _rev_steps(y, C, TL, VEC)  # back to the loaded order
    if MODE == 1:
        if EVEN:
            tl.store(p_ws1 + t, y)
        else:
            tl.store(p_ws1 + t, y, mask=m)
    else:
        if MODE == 2:
            y = (y + _ld(p_ws1 + t, m, EVEN)) * scale
        if HAS_Z:
            z = _f32(_ld_raw(p_z1, w * W, t, o_tw, m, EVEN, WORDS), WORDS)
            y = y * z * tl.sigmoid(z)
        if EVEN:
            tl.store(p_out1 + t, y.to(p_out1.dtype.element_ty))
        else:
            tl.store(p_out1 + t, y.to(p_out1.dtype.element_ty), mask=m)
    return carry


@triton.jit
def _selective_scan_fwd_lanes_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_h0, p_out, p_hlast, p_states, p_ws,
    dim, L, N, G_B, G_C, dpg_B, dpg_C, s_u_b, s_u_d, s_dt_b, s_dt_d, s_z_b, s_z_d, scale,
    BLOCK_N: tl.constexpr, CPW: tl.constexpr, W: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, TAIL: tl.constexpr, FIRST: tl.constexpr,
    SAVE: tl.constexpr, REV: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr, NW: tl.constexpr,
    STAGES: tl.constexpr,
):
    """TAIL False: the whole windows of channels C program_id(0) .. + C - 1 (C = CPW * NW: CPW a warp, NW warps) of
    batch row program_id(1); TAIL True: their last partial window (not with REV: a direction that starts at the
    row's end needs whole windows). REV / MODE: :func:`_window` (the bidirectional scan's two launches: REV with MODE
    1, then MODE 2). STAGES > 1: Triton's software pipeline over the windows (loads of the next window issued as
    asynchronous copies into shared memory); with NW > 1 the warps share one copy of B/C (A/B knobs, default 1)."""
    TL: tl.constexpr = 32 // CPW
    VEC: tl.constexpr = W // TL
    C: tl.constexpr = CPW * NW
    i_b = tl.program_id(1).to(tl.int64)
    d0 = tl.program_id(0) * C  # the program's channels share one B group and one C group (the launcher's check)
    o_c = tl.arange(0, C)[:, None]  # [C, 1]
    o_c3 = tl.arange(0, C)[:, None, None]
    o_i = tl.arange(0, W)[None, :]
    if REV:  # element i of a window loads step (TL - 1 - i // VEC) VEC + i % VEC: lanes in reverse, vectors whole
        o_t1 = (TL - 1 - o_i // VEC) * VEC + o_i % VEC
    else:
        o_t1 = o_i  # [1, W]
    o_t = o_t1 + o_c * 0  # [C, W]
    # WORDS: the same elements two a 32-bit word ([C, W / 2], word offsets)
    VW: tl.constexpr = VEC // 2
    o_iw = tl.arange(0, W // 2)[None, :]
    if REV:
        o_tw1 = (TL - 1 - o_iw // VW) * VW + o_iw % VW
    else:
        o_tw1 = o_iw
    o_tw = o_tw1 + o_c * 0
    if NW > 1:  # B/C: one row for the program's warps ([1, W], [1, W / 2])
        o_tb = o_t1
        o_twb = o_tw1
        CB: tl.constexpr = 1
    else:
        o_tb = o_t
        o_twb = o_tw
        CB: tl.constexpr = CPW
    o_l = tl.arange(0, TL)[None, :, None]  # [1, TL, 1]
    o_v = tl.arange(0, VEC)[None, None, :]
    o_n2 = tl.arange(0, BLOCK_N)[None, None, :] + o_l * 0 + o_c3 * 0  # [C, TL, BLOCK_N]: every lane, every state
    m_n2 = o_n2 < N
    d2, d3 = d0 + o_c, d0 + o_c3
    row2, row3 = i_b * dim + d2, i_b * dim + d3
    n_saves = tl.cdiv(L, SAVE)
    # block i's state at p_st + i * N. The state a direction starts from is kept only where FIRST (kept_states):
    # forward, block 0's (without it the same indexing, one slot back); REV, the last block's (the slot after the
    # others)
    if FIRST or REV:
        p_st = p_states + row3 * (n_saves - 1 + FIRST) * N
    else:
        p_st = p_states + row3 * (n_saves - 1) * N - N
    A2 = tl.load(p_A + d3 * N + o_n2, mask=m_n2, other=0.0) * 1.4426950408889634  # padded states: decay 1
    n_full = L // W
    carry = tl.zeros([C, TL, BLOCK_N], dtype=tl.float32)
    if TAIL and n_full > 0:
        carry = tl.load(p_st + ((n_full * W) // SAVE) * N + o_n2, mask=m_n2, other=0.0)  # saved by the main launch
    else:
        if HAS_H0:
            carry = tl.load(p_h0 + row3 * N + o_n2, mask=m_n2, other=0.0)
        if FIRST:  # the state entering the first SAVE block in scan order
            if REV:
                tl.store(p_st + (n_saves - 1) * N + o_n2, carry, mask=m_n2 & (o_l == 0))
            else:
                tl.store(p_st + o_n2, carry, mask=m_n2 & (o_l == 0))
    bias, Dv = _channel_params(p_bias, p_D, d2, HAS_BIAS, HAS_D)
    p_u1 = p_u + i_b * s_u_b + d2 * s_u_d
    p_dt1 = p_delta + i_b * s_dt_b + d2 * s_dt_d
    p_z1 = p_z + i_b * s_z_b + d2 * s_z_d
    p_out1 = p_out + row2 * L
    p_ws1 = p_ws + row2 * L
    p_hl = p_hlast + row3 * N
    p_B1 = p_B + (i_b * G_B + d0 // dpg_B) * BLOCK_N * L
    p_C1 = p_C + (i_b * G_C + d0 // dpg_C) * BLOCK_N * L
    if TAIL:
        t = n_full * W + o_t
        u_raw = tl.load(p_u1 + t, mask=t < L, other=0.0)
        dt_raw = tl.load(p_dt1 + t, mask=t < L, other=0.0)
        _window(n_full, u_raw, dt_raw, carry, A2, bias, Dv, scale, p_z1, p_B1, p_C1, p_out1, p_ws1, p_st, p_hl, L,
                N, n_saves, o_t, o_tw, o_tb, o_twb, o_l, o_v, o_c3, o_n2, CPW, W, BLOCK_N, HAS_D, HAS_Z, SOFTPLUS,
                False, SAVE, REV, MODE, False, NW, CB)
    else:
        w0 = (n_full - 1) * REV  # the first window in scan order
        u_raw = _ld_raw(p_u1, w0 * W, w0 * W + o_t, o_tw, None, True, WORDS)
        dt_raw = _ld_raw(p_dt1, w0 * W, w0 * W + o_t, o_tw, None, True, WORDS)
        for i_w in tl.range(0, n_full, num_stages=STAGES):
            if REV:
                w = n_full - 1 - i_w
                w_next = tl.maximum(w - 1, 0)  # the next window (the last one loads itself again)
            else:
                w = i_w
                w_next = tl.minimum(w + 1, n_full - 1)
            u_next = _ld_raw(p_u1, w_next * W, w_next * W + o_t, o_tw, None, True, WORDS)
            dt_next = _ld_raw(p_dt1, w_next * W, w_next * W + o_t, o_tw, None, True, WORDS)
            carry = _window(w, u_raw, dt_raw, carry, A2, bias, Dv, scale, p_z1, p_B1, p_C1, p_out1, p_ws1, p_st,
                            p_hl, L, N, n_saves, o_t, o_tw, o_tb, o_twb, o_l, o_v, o_c3, o_n2, CPW, W, BLOCK_N,
                            HAS_D, HAS_Z, SOFTPLUS, True, SAVE, REV, MODE, WORDS, NW, CB)
            u_raw = u_next
            dt_raw = dt_next


# ----------------------------------------------------------------------------------------------------------------
# launcher

LANES_MIN_L = 1024
LANES_WARPS_PER_SM = 12  # one-warp programs an SM at the kernel's 168 registers
CPW_OVERRIDE: int | None = None  # benchmarks set a channels-per-warp variant here for A/B runs
META_OVERRIDES: dict = {}  # and meta-parameters (maxnreg, ...)


def lanes_fwd_cpw(batch: int, dim: int, G_B: int, G_C: int, W1: int, save: int, n_sm: int) -> int:
    """Channels per warp (program): 2 where that costs no waves of the programs' work and still fills one whole
    round of programs, else 1.

    At 2 a pair of channels (one B group, one C group) splits the warp's lanes, 16 each, so the pair's lanes read
    each B/C vector with one request: half the L2 -> SM traffic of B/C, the kernel's largest. Its window is half of
    ``W1`` (the 1-channel one) and must be whole ``save`` blocks. The catch is the grid: half the programs, each with
    twice the work, at the same ~12 a SM (168 registers). Taken when rounds x work a program is not larger,
    ``2 ceil(waves at 2) <= ceil(waves at 1)``, and the programs at 2 fill at least one round (under it the whole
    kernel runs below the 12 warps an SM). H200, bf16, launcher level, one call at c584dbb (benchmarks/NOTES_scan.md
    "Session 34"): global S 0.2744 -> 0.2676 ms at 2 (1.94 rounds); long (1, 2304, 16, 16384) 0.443 at 1 against
    0.515 at 2 (0.73 of a round); global XL 0.209 at 1 against 0.228 at 2 (1.45 rounds, 4 > 3 waves)."""
    if CPW_OVERRIDE is not None:
        return CPW_OVERRIDE
    if (dim // G_B) % 2 or (dim // G_C) % 2 or (W1 // 2) % save:
        return 1
    slots = LANES_WARPS_PER_SM * n_sm
    waves2 = batch * dim / 2 / slots
    return 2 if waves2 >= 1 and 2 * math.ceil(waves2) <= math.ceil(batch * dim / slots) else 1


def use_lanes(u, delta, z, N: int, device_index=None) -> bool:
    """Whether the uni forward takes this kernel: where it was measured faster than the segment kernel (H200, bf16,
    launcher level, one call at c584dbb: global XL 0.208 vs 0.420 ms, global S 0.270 vs 0.471, long (1, 2304, 16,
    16384) 0.443 vs 0.695) and not where it was slower (H100, session 6: spatial XL, L = 256: 0.309 vs 0.246, one
    window a row). Needs 16-bit inputs (its window is one 16-byte vector per lane), N <= 16 (all states in every
    lane's registers), L >= 1024, batch * dim channels filling one round of programs (12 one-warp programs an SM:
    1,584 channels on an H200; long's 2,304 are 1.45 rounds), and rows of u, delta, z, out and B/C starting
    16-element aligned (vector loads)."""
    batch, dim, L = u.shape
    if u.dtype not in (torch.bfloat16, torch.float16) or next_power_of_2(N) > 16 or L < LANES_MIN_L:
        return False
    if batch * dim < LANES_WARPS_PER_SM * _sm_count(device_index):
        return False
    rows = [u, delta] + ([z] if z is not None else [])
    return all(x.stride(2) == 1 and x.stride(0) % 16 == 0 and x.stride(1) % 16 == 0 and x.data_ptr() % 16 == 0
               for x in rows) and L % 16 == 0


def _bc(X, dtype):
    """B or C -> (batch, G, BLOCK_N, L) in ``dtype``, time contiguous, states padded to a power of 2 (a view when
    it already is), and G."""
    G = 1 if X.dim() == 3 else X.shape[1]
    N = X.shape[-2]
    Xt = X.reshape(X.shape[0], G, N, X.shape[-1]).to(dtype)
    BLOCK_N = next_power_of_2(N)
    if BLOCK_N != N:
        Xt = torch.nn.functional.pad(Xt, (0, 0, 0, BLOCK_N - N))
    return Xt.contiguous(), G


def lanes_bc(u, B, C):
    """B and C for the lanes kernels (:func:`_bc` in u's dtype): (Bt, G_B, Ct, G_C, BLOCK_N)."""
    Bt, G_B = _bc(B, u.dtype)
    Ct, G_C = _bc(C, u.dtype)
    return Bt, G_B, Ct, G_C, Bt.shape[2]


def _launch_pass(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save, out, last_state, states,
                 ws, scale, REV, MODE):
    """One launch of the lanes forward over whole windows (and a TAIL launch for a partial last one, not REV)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    Bt, G_B, Ct, G_C, BLOCK_N = lanes_bc(u, B, C)
    W1 = 32 * (16 // u.element_size())  # one channel a warp: 32 lanes x one 16-byte vector
    CPW = lanes_fwd_cpw(batch, dim, G_B, G_C, W1, save, _sm_count(u.device.index if u.is_cuda else None))
    W = W1 // CPW
    assert save % SAVE_STEPS == 0 and W % save == 0 and dim % CPW == 0, "windows are whole save-step blocks"
    assert not REV or L % W == 0, "the reverse direction starts at the row's end: whole windows"
    empty = u.new_empty(0, dtype=torch.float32)
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    args = (
        u, delta, A.contiguous(), Bt, Ct, D if D is not None else empty,
        delta_bias if delta_bias is not None else empty, z if z is not None else empty,
        initial_state if initial_state is not None else empty, out, last_state, states, ws,
        dim, L, N, G_B, G_C, dim // G_B, dim // G_C, u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), *zs,
        scale,
    )
    meta = dict(BLOCK_N=BLOCK_N, CPW=CPW, W=W, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_H0=initial_state is not None,
                FIRST=keeps_first(L), SAVE=save, REV=REV, MODE=MODE, NW=1, STAGES=2)
    # bf16 rows as 32-bit words (_f32), in the unidirectional scan only. H200, bf16, launcher level, against the
    # element loads in one call (benchmarks/NOTES_scan.md "Session 31"): global XL 0.2745 -> 0.2605 ms, global S 0.339
    # -> 0.322, long 0.669 -> 0.635, with z 0.2955 -> 0.2758; the bidirectional scan's two launches 0.565 -> 0.778
    # (with z 0.581 -> 0.801), although their SASS has the same loads, fewer instructions and no more spills.
    meta["WORDS"] = u.dtype == torch.bfloat16 and MODE == 0
    # 12 programs an SM, and a better schedule: uncapped, ptxas takes 254-255 registers with z, with ws or at CPW 2
    # (B/C loads hoisted) and 163-168 otherwise, and every launch was slower than at 168 (H200, bf16, ms uncapped ->
    # 168; benchmarks/NOTES_scan.md "Session 29"): global XL forward 0.296 -> 0.278, with z 0.346 -> 0.289, the
    # bidirectional scan's reverse direction 0.444 -> 0.259, its forward one 0.392 -> 0.309; CPW 2 at global S 0.392
    # -> 0.340. Lower caps spill (160: 0.329, 144: 0.424 at global XL).
    meta["maxnreg"] = 168
    # STAGES 2: the window loop through Triton's software pipeline, the next window's B/C rows as asynchronous copies
    # into shared memory (16 KB a program at global XL: the 12 programs an SM still fit). H200, bf16, launcher
    # level, against STAGES 1 in one call at 5695200 (benchmarks/NOTES_scan.md "Session 34"): global XL 0.2606 ->
    # 0.2080 ms, global S 0.3226 -> 0.2693; the bidirectional scan's two launches 0.554 -> 0.495 and 0.679 -> 0.607.
    # NW 2 / 4 warps sharing one copy lost (global XL 0.288 / 0.294).
    meta.update(META_OVERRIDES)
    if meta.get("maxnreg", 0) is None:  # an A/B run's "uncapped"
        del meta["maxnreg"]
    C = CPW * meta["NW"]
    assert dim % C == 0 and ((dim // G_B) % C == 0 or C == CPW) and ((dim // G_C) % C == 0 or C == CPW), \
        "a program's channels share one B group and one C group"
    meta["num_warps"] = meta["NW"]
    if L >= W:
        launch(_selective_scan_fwd_lanes_kernel, (dim // C, batch), args, dict(meta, TAIL=False))
    if L % W:
        launch(_selective_scan_fwd_lanes_kernel, (dim // C, batch), args, dict(meta, TAIL=True))


def selective_scan_fwd_lanes(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool,
                             save: int = SAVE_STEPS):
    """Launch the lanes forward. Inputs validated by the caller; u, delta, z time contiguous.

    Returns (out, last_state, states) as :func:`.triton_fwd.selective_scan_fwd` does for the uni scan, a state
    saved every ``save`` steps.
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    f32 = torch.float32
    out = torch.empty((batch, dim, L), device=u.device, dtype=u.dtype)
    states = torch.empty((batch, dim, kept_states(L, save), N), device=u.device, dtype=f32)
    last_state = torch.empty((batch, dim, N), device=u.device, dtype=f32)
    _launch_pass(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save, out, last_state, states,
                 u.new_empty(0, dtype=f32), 1.0, False, 0)
    return out, last_state, states


def use_lanes_bi(u, delta, u_b, delta_b, z, N: int, device_index=None) -> bool:
    """Whether the bidirectional forward takes this kernel (a launch a direction): :func:`use_lanes` for both
    directions' rows and whole windows (the reverse direction starts at the row's end)."""
    W1 = 32 * (16 // u.element_size())
    return (use_lanes(u, delta, z, N, device_index) and use_lanes(u_b, delta_b, None, N, device_index)
            and u.shape[2] % W1 == 0)


def bi_selective_scan_fwd_lanes(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                                delta_softplus: bool, divide_out: bool, save: int = SAVE_STEPS):
    """The bidirectional forward in two launches, no flipped copies: the backward direction in reverse scan order
    (REV), its y (D included) into an fp32 scratch, then the forward direction, which adds it, scales, gates and
    stores out. Returns (out, states, states_b) as :func:`.triton_fwd.selective_scan_fwd` does for the bidirectional
    scan (a state every ``save`` steps: SAVE_STEPS for the segment backward, the window for the lanes one). Inputs
    validated by the caller; every row time contiguous; L whole windows (:func:`use_lanes_bi`)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    f32 = torch.float32
    out = torch.empty((batch, dim, L), device=u.device, dtype=u.dtype)
    ws = torch.empty((batch, dim, L), device=u.device, dtype=f32)
    states = torch.empty((batch, dim, kept_states(L, save), N), device=u.device, dtype=f32)
    states_b = torch.empty_like(states)
    last_state = torch.empty((batch, dim, N), device=u.device, dtype=f32)  # written by the forward one, unused
    _launch_pass(u_b, delta_b, A_b, B_b, C_b, D_b, None, delta_bias_b, None, delta_softplus, save, out,
                 last_state, states_b, ws, 1.0, True, 1)
    _launch_pass(u, delta, A, B, C, D, z, delta_bias, None, delta_softplus, save, out, last_state, states, ws,
                 0.5 if divide_out else 1.0, False, 2)
    return out, states, states_b
