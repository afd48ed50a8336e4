"""Triton backward of the (unidirectional) selective scan with the time axis across lanes.

The segment backward (:mod:`.triton_bwd`) keeps time in registers and needs a summary pass over segments for long
sequences; the CUDA backend's lanes backward (``csrc/selective_scan/selective_scan_lanes.cuh``) showed the layout
that wins at global shapes: time across the lanes of a warp. This is that design in Triton:

* a warp holds ``CPW`` channels (of one batch row) over ``TL = 32 / CPW`` lanes each, a program ``NW`` warps
  (``C = CPW * NW`` channels sharing one B/C group); windows of ``W = TL x VEC`` steps (one 16-byte vector of u per
  lane), walked from the last to the first. A window's tensors are ``[TL, C, VEC]`` (time lane, channel, step of the
  lane), split into ``VEC`` ``[TL, C]`` columns (register moves: :func:`_cols`) where a step depends on its
  neighbour. The lane axis comes first so that Triton's coalescer gives every load the same layout;
* per state n: the states over the window are recomputed from the state the forward saved at its start (the forward
  saves one a window for rows this kernel will take, :func:`lanes_save_steps`, and one every 64 steps otherwise): a =
  exp2(delta A_n log2 e), x = delta u B_n, each lane composes its VEC steps into one affine map, a shuffle scan over
  the TL lanes (``tl.gather`` along the lanes: one ``shfl.idx`` each) gives each lane its entering state, and the
  steps follow in-thread. The adjoint runs the same way against time: with q_t = dL/dh_t and r_t = a_t q_t (what flows
  to step t - 1),

      q_t = C_t dy_t + r_{t+1},

  each lane composes its steps into the map r_{lane end} -> r_{lane start}, a suffix scan over the lanes (shuffles
  from the lanes above) gives each lane its entering r, and q follows in-thread. The r leaving lane 0 is the next
  (earlier) window's carry; after the first window it is dL/d initial_state;
* every gradient in the same pass (hb_t = h_t - x_t stands for a_t h_{t-1}):

      dC_t = sum_d dy_t h_t        dB_t = sum_d q_t delta_t u_t        (summed over a warp's CPW channels)
      du_t = delta_t sum_n q_t B_t + D dy_t
      ddelta_t = u_t sum_n q_t B_t + sum_n A q_t hb_t   (times sigmoid for softplus)
      dA = sum_t delta_t q_t hb_t    dD = sum_t dy_t u_t    ddelta_bias = sum_t ddelta_t

  dB, dC go into fp32 (batch, G, BLOCK_N, L) buffers as 16-byte vector atomics (so not bit-reproducible:
  deterministic mode keeps the segment backward); dA is added per window, dD / ddelta_bias stored per (batch,
  channel) and summed by the launcher.

What decided the shape (H100, bf16, global XL, launcher level, the segment backward 1.41 ms in the same runs;
benchmarks/NOTES_scan.md "Session 8"): the dB/dC atomics, not the arithmetic, were the cost. One channel per warp
(CPW 1) took 2.26-2.69 ms, of which the atomics 1.4 ms (1.09 without them); summing over the 4 warps of a program
first (Triton's cross-warp reduction through shared memory) took 7.8 ms; two channels per warp summed by one
shuffle level halves the atomic traffic: 1.41 ms, and B/C/A/states two states ahead 1.35 ms (four channels per warp:
1.95, the sum's layout no longer matches the atomics'). No summary pass, and y is recomputed for dz from the
recomputed states. When it is used: :func:`use_lanes_bwd` (16-bit dtypes, long sequences in whole windows, N <= 16,
enough channels for one round of programs).

The kernel compiles at 255 registers: 8 warps an SM, so global XL's 576 programs were 3 rounds on an H200's 264
slots, the last 18% full, and Nsight Compute counted 12% occupancy and 37% of cycles issuing. Where whole rows leave
such a round, a row's windows are split into NSEG segments (:func:`lanes_bwd_segments`), each a program that waits for
the adjoint carry r of the one before it in scan-adjoint order (a flag, release / acquire; programs take their
segment from a ticket in the order they start, so one waits only on a program already running). H200, bf16,
launcher level, NSEG 1 and the default in one run (5d91651): global XL 1.347 -> 1.051 ms (4 segments), long
3.422 -> 2.094 (7), the bidirectional backward with z at global XL 3.102 -> 2.510 (4).

The bidirectional scan's backward runs as two launches of this kernel (:func:`bi_selective_scan_bwd_lanes`, where
:func:`use_lanes_bi_bwd` takes the rows), no flipped copies: the backward direction in reverse scan order (``REV``:
lane l holds the window's chunk TL - 1 - l, its steps taken in reverse by reversing the tuple of columns, which costs
no instructions; windows in ascending time), its recomputed y into an fp32 scratch, then the forward direction,
whose dz reads it. H200, bf16, op level, against the segment kernel's one launch in the same call: fwd+bwd global XL
3.331 -> 3.278 ms, global S 4.262 -> 3.583 (benchmarks/NOTES_scan.md "Session 30").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import launch, next_power_of_2
from .triton_fwd import SAVE_STEPS, _exp2, _mask_if, _sm_count, _softplus, saved_layout
from .triton_fwd_lanes import _channel_params, lanes_bc


@triton.jit
def _cols(x, TL: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr):
    """[TL, C, VEC] -> the VEC columns x[:, :, j] as a tuple of [TL, C] (register moves: the axis is in-thread)."""
    e, o = tl.split(tl.reshape(x, [TL, C, VEC // 2, 2]))  # steps 0, 2, .. and 1, 3, ..
    if VEC == 4:
        c0, c2 = tl.split(e)
        c1, c3 = tl.split(o)
        return (c0, c1, c2, c3)
    else:
        ee, eo = tl.split(tl.reshape(e, [TL, C, 2, 2]))  # steps 0, 4 and 2, 6
        oe, oo = tl.split(tl.reshape(o, [TL, C, 2, 2]))  # steps 1, 5 and 3, 7
        c0, c4 = tl.split(ee)
        c2, c6 = tl.split(eo)
        c1, c5 = tl.split(oe)
        c3, c7 = tl.split(oo)
        return (c0, c1, c2, c3, c4, c5, c6, c7)


@triton.jit
def _uncols(c, TL: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr):
    """The inverse of :func:`_cols`: a tuple of VEC [TL, C] columns -> [TL, C, VEC]."""
    if VEC == 4:
        e = tl.join(c[0], c[2])
        o = tl.join(c[1], c[3])
    else:
        e = tl.reshape(tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6])), [TL, C, 4])
        o = tl.reshape(tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7])), [TL, C, 4])
    return tl.reshape(tl.join(e, o), [TL, C, VEC])


@triton.jit
def _rev_tuple(c, VEC: tl.constexpr):
    r = ()
    for j in tl.static_range(VEC):
        r = r + (c[VEC - 1 - j],)
    return r


@triton.jit
def _scols(x, TL: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr, REV: tl.constexpr):
    """:func:`_cols` in scan order: a lane's steps descending where REV (the tuple reversed: no instructions)."""
    if REV:
        return _rev_tuple(_cols(x, TL, C, VEC), VEC)
    else:
        return _cols(x, TL, C, VEC)


@triton.jit
def _suncols(c, TL: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr, REV: tl.constexpr):
    """The inverse of :func:`_scols`: scan-order columns -> [TL, C, VEC] in time order."""
    if REV:
        return _uncols(_rev_tuple(c, VEC), TL, C, VEC)
    else:
        return _uncols(c, TL, C, VEC)


@triton.jit
def _red_add(p, x, TL: tl.constexpr, CPW: tl.constexpr, NW: tl.constexpr, VEC: tl.constexpr, REV: tl.constexpr,
             RS: tl.constexpr):
    """Add x [TL, NW * CPW, VEC] (fp32), summed over each warp's CPW channels, at p + chunk * VEC + step (time
    contiguous; the chunk is the lane's, TL - 1 - lane where REV) with atomics. The channel sum is a butterfly over
    lanes; the atomics go in 16-byte pieces, since Triton gives an atomic at most 4 fp32 per thread and lays out a
    wider one differently from x (a shared-memory conversion), while halves of 4 keep x's layout (one vector
    reduction each). RS (an A/B knob, CPW 2 and VEC 8 only): a reduce-scatter instead, each of a pair's lanes
    keeping the sums of 4 of the 8 steps (channel 0 the first 4) and sending the other 4 to its partner (a gather
    along the pair: 4 shuffles where the butterfly moves 8), then one 16-byte atomic each."""
    chunk = tl.arange(0, TL)
    if REV:
        chunk = TL - 1 - chunk
    if RS and CPW == 2 and VEC == 8:
        x4 = tl.reshape(x, [TL, NW, CPW, VEC])
        lo, hi = tl.split(tl.permute(tl.reshape(x4, [TL, NW, CPW, 2, 4]), [0, 1, 2, 4, 3]))  # steps 0-3, 4-7
        ch = tl.arange(0, CPW)[None, None, :, None] + tl.zeros([TL, NW, CPW, 4], tl.int32)
        keep = tl.where(ch == 0, lo, hi)
        recv = tl.gather(tl.where(ch == 0, hi, lo), 1 - ch, 2)  # the partner's half of this lane's steps
        # the atomic as [CPW, TL, NW, 4], contiguous along the last axis only: the coalescer then lays it out as the
        # gather's result (lanes over the pair, then time; warps over NW); as [TL, NW, CPW, 4] with a pair's 8 steps
        # seen contiguous it spread the pair over warps, reached through shared memory and a barrier each time
        o = (tl.arange(0, CPW)[:, None, None, None] * 4 + chunk[None, :, None, None] * VEC
             + tl.arange(0, 4)[None, None, None, :] + tl.zeros([1, 1, NW, 1], tl.int32))
        o = tl.max_contiguous(o, [1, 1, 1, 4])
        tl.atomic_add(p + o, tl.permute(keep + recv, [2, 0, 1, 3]), sem="relaxed")
        return
    xs = tl.sum(tl.reshape(x, [TL, NW, CPW, VEC]), axis=2)  # [TL, NW, VEC]
    if VEC == 4 or CPW > 1:  # the CPW lanes holding the sum share its VEC values: VEC / CPW <= 4 each
        o = (chunk[:, None] * VEC + tl.arange(0, VEC)[None, :])[:, None, :] + tl.zeros([1, NW, 1], tl.int32)
        tl.atomic_add(p + o, xs, sem="relaxed")
    else:
        o = (chunk[:, None] * VEC + tl.arange(0, 4)[None, :])[:, None, :] + tl.zeros([1, NW, 1], tl.int32)
        x0, x1 = tl.split(tl.permute(tl.reshape(xs, [TL, NW, 2, 4]), [0, 1, 3, 2]))  # steps 0-3 and 4-7
        tl.atomic_add(p + o, x0, sem="relaxed")
        tl.atomic_add(p + o + 4, x1, sem="relaxed")


@triton.jit
def _ld_state(p_A, p_h, p_b, p_c, n, L, N, o_l, FIRST: tl.constexpr, m_h):
    """State n's A and saved window-start state [TL, C] (not FIRST: 0 where not m_h), and its B, C over the window
    [TL, C, VEC] (u's dtype)."""
    m = (o_l * 0 + n) < N
    if FIRST:
        h = tl.load(p_h + n, mask=m, other=0.0)
    else:
        h = tl.load(p_h + n, mask=_mask_if(m, m_h), other=0.0)
    return tl.load(p_A + n, mask=m, other=0.0), h, tl.load(p_b + n * L), tl.load(p_c + n * L)


@triton.jit
def _scan_up(a, x, o_l, TL: tl.constexpr):
    """Inclusive scan over the TL lanes (axis 0) of the maps h -> a h + x in lane order: the map of lanes 0 .. l."""
    for k in tl.static_range(5):
        if (1 << k) < TL:
            src = tl.maximum(o_l - (1 << k), 0)
            a_p = tl.gather(a, src, 0)
            x_p = tl.gather(x, src, 0)
            has = o_l >= (1 << k)
            x = tl.where(has, a * x_p + x, x)
            a = tl.where(has, a * a_p, a)
    return a, x


@triton.jit
def _scan_down(m, v, o_l, TL: tl.constexpr):
    """Inclusive suffix scan over the TL lanes of the maps r -> v + m r: the map of lanes TL - 1 .. l (r enters the
    last lane)."""
    for k in tl.static_range(5):
        if (1 << k) < TL:
            src = tl.minimum(o_l + (1 << k), TL - 1)
            m_n = tl.gather(m, src, 0)
            v_n = tl.gather(v, src, 0)
            has = o_l + (1 << k) < TL
            v = tl.where(has, v + m * v_n, v)
            m = tl.where(has, m * m_n, m)
    return m, v


@triton.jit
def _selective_scan_bwd_lanes_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_bias, p_z, p_dout, p_states, p_h0, p_dlast,
    p_du, p_ddelta, p_dz, p_dB, p_dC, p_dA, p_dD, p_dbias, p_dh0, p_ws, p_du_acc, p_ddt_acc, p_sync, p_carry,
    batch, dim, L, N, G_B, G_C, dpg_B, dpg_C, s_u_b, s_u_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_do_b, s_do_d, scale,
    BLOCK_N: tl.constexpr, VEC: tl.constexpr, CPW: tl.constexpr, NW: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
    HAS_DH0: tl.constexpr, FIRST: tl.constexpr, SAVE: tl.constexpr, REV: tl.constexpr, MODE: tl.constexpr,
    ACC_U: tl.constexpr, ACC_DT: tl.constexpr, NSEG: tl.constexpr, RS: tl.constexpr,
):
    """Channels program_id(1) * C .. + C - 1 (C = CPW * NW) of batch row program_id(0), every window, every
    gradient. A warp holds CPW channels over TL = 32 / CPW lanes each; windows are TL * VEC steps.

    The bidirectional scan's backward is two launches (:func:`bi_selective_scan_bwd_lanes`). REV: the backward
    direction, scanned in descending time: lane l holds the window's chunk TL - 1 - l and takes its steps in reverse
    (the columns' tuple reversed), so the scan and adjoint below run unchanged in scan order; windows go in ascending
    time. dy = dout * scale (* silu(z)); MODE 1 (REV's launch) writes its recomputed y (D u included) into the fp32
    scratch ws instead of dz, MODE 2 (the forward direction's) adds ws to its y for dz. ACC_U / ACC_DT add the other
    direction's du / ddelta (fp32 scratch) to this one's, where the two directions share u / delta.

    NSEG > 1: a row's windows are NSEG segments, each its own program, so that the grid's last wave is not a third
    of the kernel's time (:func:`lanes_bwd_segments`). A segment starts from the r its predecessor (the windows
    after it in scan-adjoint order) stored in p_carry and flagged in p_sync; programs take their unit from a ticket
    (p_sync[0]) in the order they start, segment-major, so a segment waits only on one that has started."""
    TL: tl.constexpr = 32 // CPW
    C: tl.constexpr = CPW * NW
    W: tl.constexpr = TL * VEC
    if NSEG == 1:
        i_b = tl.program_id(0).to(tl.int64)
        i_c = tl.program_id(1)
        seg = 0
    else:
        n_rp = batch * (dim // C)  # programs a segment
        unit = tl.atomic_add(p_sync, 1, sem="relaxed")
        seg = unit // n_rp
        i_rp = unit - seg * n_rp
        i_b = (i_rp % batch).to(tl.int64)
        i_c = i_rp // batch
    # Shapes are [lane, channel(, step)]: Triton 3.6's coalescer orders dimensions of equal contiguity ascending, so
    # with the time lanes first a load maps dim 0 to TL lanes and dim 1 to the other lanes, then the warps (the
    # layout every tensor here shares: any other would be a shared-memory conversion per use)
    o_w = tl.arange(0, C)[None, :]  # [1, C]
    o_l = tl.arange(0, TL)[:, None] + o_w * 0  # [TL, C]: the time lane
    i_d = i_c * C + o_w  # [1, C]: the channel
    o_d3 = i_d[:, :, None]  # [1, C, 1]
    chunk = tl.arange(0, TL)
    if REV:
        chunk = TL - 1 - chunk
    o_t3 = (chunk[:, None] * VEC + tl.arange(0, VEC)[None, :])[:, None, :]  # [TL, 1, VEC]: time in the window
    row = i_b * dim + i_d  # [1, C]
    n_saves = tl.cdiv(L, SAVE)
    if FIRST or REV:  # [1, C]: block i's state at p_st + i * N (REV: entering it from its end; the last block's,
        # zero, is kept only where FIRST, after the others)
        p_st = p_states + row * (n_saves - 1 + FIRST) * N
    else:  # block 0's is not kept (kept_states): the same indexing, one slot back
        p_st = p_states + row * (n_saves - 1) * N - N
    p_u3 = p_u + i_b * s_u_b + o_d3 * s_u_d + o_t3
    p_dt3 = p_delta + i_b * s_dt_b + o_d3 * s_dt_d + o_t3
    p_do3 = p_dout + i_b * s_do_b + o_d3 * s_do_d + o_t3
    p_z3 = p_z + i_b * s_z_b + o_d3 * s_z_d + o_t3
    p_g3 = (i_b * dim + o_d3) * L + o_t3  # du, ddelta, dz: contiguous (batch, dim, L)
    g_B = (i_c * C) // dpg_B  # the program's channels share one B group and one C group
    g_C = (i_c * C) // dpg_C
    o_B3 = (i_b * G_B + g_B) * BLOCK_N * L + o_t3 + o_d3 * 0  # [TL, C, VEC]: every channel reads the same B
    o_C3 = (i_b * G_C + g_C) * BLOCK_N * L + o_t3 + o_d3 * 0

    # the r each state carries from window to window: a tuple of [TL, C] (every lane holds every state's)
    if NSEG > 1:
        p_sync_in = p_sync + 1 + (seg - 1) * n_rp + i_rp
        if seg > 0:  # the predecessor's r (release / acquire through its flag)
            while tl.atomic_add(p_sync_in, 0, sem="acquire") == 0:
                pass
    r = ()
    for n in tl.static_range(BLOCK_N):
        r_n = tl.zeros([TL, C], dtype=tl.float32)
        if HAS_DLAST:
            r_n = tl.load(p_dlast + row * N + n + o_l * 0, mask=_mask_if((o_l * 0 + n) < N, seg == 0), other=0.0)
        if NSEG > 1:
            r_n += tl.load(p_carry + ((seg - 1) * batch * dim + row) * BLOCK_N + n + o_l * 0,
                           mask=_mask_if(o_l * 0 == 0, seg > 0), other=0.0, cache_modifier=".cg")
        r = r + (r_n,)
    bias, Dv = _channel_params(p_bias, p_D, o_d3, HAS_BIAS, HAS_D)
    dD = tl.zeros([TL, C], dtype=tl.float32)
    dbias = tl.zeros([TL, C], dtype=tl.float32)
    lane0 = o_l == 0
    p_A1 = p_A + i_d * N + o_l * 0  # [TL, C]
    p_dA1 = p_dA + row * N + o_l * 0

    n_win = L // W
    for i_w in range((seg * n_win) // NSEG, ((seg + 1) * n_win) // NSEG):
        if REV:
            w = i_w
        else:
            w = n_win - 1 - i_w
        t0 = w * W
        dt = tl.load(p_dt3 + t0).to(tl.float32) + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        du = dt * tl.load(p_u3 + t0).to(tl.float32)
        dy = tl.load(p_do3 + t0).to(tl.float32)
        if MODE != 0:
            dy = dy * scale
        if HAS_Z:
            zv = tl.load(p_z3 + t0).to(tl.float32)
            dy = dy * zv * tl.sigmoid(zv)
            y = tl.zeros([TL, C, VEC], dtype=tl.float32)
        dt_c = _scols(dt, TL, C, VEC, REV)
        du_c = _scols(du, TL, C, VEC, REV)
        dy_c = _scols(dy, TL, C, VEC, REV)
        # [TL, C]: the state the forward saved at the window's start in scan order
        if REV:
            p_h = p_st + ((t0 + W) // SAVE - 1) * N + o_l * 0
            m_h = t0 + W < L  # not FIRST: the last window's (zero) was not saved
        else:
            p_h = p_st + (t0 // SAVE) * N + o_l * 0
            m_h = t0 > 0
            if not FIRST and HAS_DH0:  # not FIRST: the first window's state was not saved: initial_state (or zero)
                p_h = tl.where(m_h, p_h, p_h0 + row * N + o_l * 0)
                m_h = t0 >= 0
        p_b = p_B + o_B3 + t0
        p_c = p_C + o_C3 + t0
        S1 = tl.zeros([TL, C, VEC], dtype=tl.float32)  # sum_n q B
        S2 = tl.zeros([TL, C, VEC], dtype=tl.float32)  # sum_n A q hb
        r_next = ()
        # A, the saved state, B and C of state n + 2 are loaded while state n is worked on (H100, global XL: none
        # ahead 1.80 ms, one 1.41, two 1.35)
        A_1, h_1, b_1, c_1 = _ld_state(p_A1, p_h, p_b, p_c, 0, L, N, o_l, FIRST, m_h)
        if BLOCK_N > 1:
            A_2, h_2, b_2, c_2 = _ld_state(p_A1, p_h, p_b, p_c, 1, L, N, o_l, FIRST, m_h)
        for n in tl.static_range(BLOCK_N):
            A_n, h_in, b3, c3 = A_1, h_1, b_1, c_1
            if n + 1 < BLOCK_N:
                A_1, h_1, b_1, c_1 = A_2, h_2, b_2, c_2
            if n + 2 < BLOCK_N:
                A_2, h_2, b_2, c_2 = _ld_state(p_A1, p_h, p_b, p_c, n + 2, L, N, o_l, FIRST, m_h)
            b3 = b3.to(tl.float32)
            c3 = c3.to(tl.float32)
            b_c = _scols(b3, TL, C, VEC, REV)
            c_c = _scols(c3, TL, C, VEC, REV)
            A2_n = A_n * 1.4426950408889634
            # states: each lane's steps as one map, the lanes scanned, the steps again from the lane's entering state
            a = ()
            x = ()
            for j in tl.static_range(VEC):
                a = a + (_exp2(dt_c[j] * A2_n),)
                x = x + (du_c[j] * b_c[j],)
            ag = a[0]
            xg = x[0]
            for j in tl.static_range(1, VEC):
                xg = a[j] * xg + x[j]
                ag = a[j] * ag
            ag, xg = _scan_up(ag, xg, o_l, TL)
            h_end = xg + ag * h_in  # the state after each lane's last step
            hl = tl.where(lane0, h_in, tl.gather(h_end, tl.maximum(o_l - 1, 0), 0))
            h = ()
            for j in tl.static_range(VEC):
                hl = a[j] * hl + x[j]
                h = h + (hl,)
            # adjoint: g_t = C_t dy_t, q_t = g_t + r_{t+1}, r_t = a_t q_t; per lane the map r_end -> r_start
            g = ()
            for j in tl.static_range(VEC):
                g = g + (c_c[j] * dy_c[j],)
            al = g[VEC - 1]
            be = tl.full([TL, C], 1.0, tl.float32)
            for jj in tl.static_range(1, VEC):  # steps VEC - 2 .. 0
                al = g[VEC - 1 - jj] + a[VEC - jj] * al
                be = a[VEC - jj] * be
            m_s, v_s = _scan_down(a[0] * be, a[0] * al, o_l, TL)
            r_start = v_s + m_s * r[n]  # r leaving each lane (towards the earlier lanes)
            ql = tl.where(o_l == TL - 1, r[n], tl.gather(r_start, tl.minimum(o_l + 1, TL - 1), 0))  # r entering each lane
            r_next = r_next + (tl.gather(r_start, o_l * 0, 0),)  # lane 0's: the earlier window's carry
            ql = g[VEC - 1] + ql
            q = (ql,)
            for jj in tl.static_range(1, VEC):  # steps VEC - 2 .. 0
                ql = g[VEC - 1 - jj] + a[VEC - jj] * ql
                q = (ql,) + q
            # gradients of this state
            h3 = _suncols(h, TL, C, VEC, REV)
            q3 = _suncols(q, TL, C, VEC, REV)
            P3 = q3 * (h3 - _suncols(x, TL, C, VEC, REV))  # q_t a_t h_{t-1}
            S1 += q3 * b3
            S2 += P3 * A_n[:, :, None]
            if HAS_Z:
                y += h3 * c3
            # dA: the window's sum over the lanes, added by lane 0. Per-state accumulators in registers instead
            # (no branch per state, but 16 more live values) spilled and took 2.85 ms instead of 1.41 (H100).
            tl.atomic_add(p_dA1 + n, tl.sum(tl.sum(P3 * dt, axis=2), axis=0, keep_dims=True) + o_l * 0.0,
                          mask=lane0 & ((o_l * 0 + n) < N), sem="relaxed")
            _red_add(p_dB + (i_b * G_B + g_B) * BLOCK_N * L + n * L + t0, q3 * du, TL, CPW, NW, VEC, REV, RS)
            _red_add(p_dC + (i_b * G_C + g_C) * BLOCK_N * L + n * L + t0, h3 * dy, TL, CPW, NW, VEC, REV, RS)
        r = r_next
        # u, delta (and dout, z) again rather than kept through the states (registers); L1 or L2 hits
        u = tl.load(p_u3 + t0).to(tl.float32)
        dt_raw = tl.load(p_dt3 + t0).to(tl.float32) + bias
        du_out = dt * S1
        if HAS_D:
            du_out += Dv * dy
            dD += tl.sum(dy * u, axis=2)
        ddt = u * S1 + S2
        if SOFTPLUS:
            ddt = tl.where(dt_raw > 20.0, ddt, ddt * tl.sigmoid(dt_raw))
        if HAS_BIAS:
            dbias += tl.sum(ddt, axis=2)
        if HAS_Z:
            if HAS_D:
                y += Dv * u
            if MODE == 1:
                tl.store(p_ws + p_g3 + t0, y)
            else:
                if MODE == 2:
                    y = (y + tl.load(p_ws + p_g3 + t0)) * scale
                dout = tl.load(p_do3 + t0).to(tl.float32)
                sig = tl.sigmoid(zv)
                dz = dout * sig * (1.0 + zv * (1.0 - sig)) * y
                tl.store(p_dz + p_g3 + t0, dz.to(p_dz.dtype.element_ty))
        if ACC_U:
            du_out += tl.load(p_du_acc + p_g3 + t0)
        if ACC_DT:
            ddt += tl.load(p_ddt_acc + p_g3 + t0)
        tl.store(p_du + p_g3 + t0, du_out.to(p_du.dtype.element_ty))
        tl.store(p_ddelta + p_g3 + t0, ddt.to(p_ddelta.dtype.element_ty))

    if NSEG > 1:
        if seg < NSEG - 1:  # r for the next segment, then its flag
            for n in tl.static_range(BLOCK_N):
                tl.store(p_carry + (seg * batch * dim + row) * BLOCK_N + n + o_l * 0, r[n], mask=lane0)
            tl.debug_barrier()
            tl.atomic_xchg(p_sync + 1 + seg * n_rp + i_rp, 1, sem="release")
    # per-(segment, batch, channel) sums; lane 0 stores the warp's
    if HAS_DH0:
        for n in tl.static_range(BLOCK_N):
            tl.store(p_dh0 + row * N + n + o_l * 0, r[n], mask=_mask_if(lane0 & ((o_l * 0 + n) < N), seg == NSEG - 1))
    if HAS_D:
        tl.store(p_dD + seg * batch * dim + row + o_l * 0, tl.sum(dD, axis=0, keep_dims=True) + o_l * 0, mask=lane0)
    if HAS_BIAS:
        tl.store(p_dbias + seg * batch * dim + row + o_l * 0, tl.sum(dbias, axis=0, keep_dims=True) + o_l * 0,
                 mask=lane0)


# ----------------------------------------------------------------------------------------------------------------
# launcher

LANES_BWD_MIN_L = 256
_CONFIG = (2, 4)  # (CPW, NW) before lanes_bwd_config fits it to the shape
_META_OVERRIDES: dict = {}  # benchmarks/triton_lanes_bwd_ab.py sets variants here (CPW, NW and meta-parameters)


def lanes_bwd_config(dim: int, G_B: int, G_C: int, elt: int):
    """(CPW, NW): channels per warp and warps per program. CPW channels share a warp (32 / CPW time lanes each) so
    that dB/dC are summed over them by shuffles before the atomics; a program's CPW * NW channels must share one B
    group and one C group, and a window (32 / CPW lanes x one 16-byte vector) must be whole SAVE_STEPS blocks (so it
    can start from states saved every SAVE_STEPS steps too)."""
    cpw, nw = _CONFIG
    vec = 16 // elt
    while cpw > 1 and ((32 // cpw) * vec) % SAVE_STEPS:
        cpw //= 2
    while cpw * nw > 1 and ((dim // G_B) % (cpw * nw) or (dim // G_C) % (cpw * nw)):
        if nw > 1:
            nw //= 2
        else:
            cpw //= 2
    return cpw, nw


# The kernel compiles at 255 registers (Triton 3.6, sm_90): 8 warps an SM, two programs of four.
_WARPS_PER_SM = 8
_MIN_SEGMENT_WINDOWS = 4


def lanes_bwd_segments(u, B, C, device_index=None) -> int:
    """How many segments (programs) a row's windows are split into: the fewest that bring the grid's rounds of
    programs, ceil(programs x segments / slots) / segments in units of a whole row's time, 3% or more closer to the
    ideal programs / slots, with at least _MIN_SEGMENT_WINDOWS windows a segment. Global XL (576 programs of 4 warps,
    264 slots on an H200): 3 rounds of whole rows, of which the last 18% full; 4 segments make it 2.25."""
    if "NSEG" in _META_OVERRIDES:
        return _META_OVERRIDES["NSEG"]
    batch, dim, L = u.shape
    cpw, nw, _, W = _lanes_meta(u, B, C)
    programs = batch * dim // (cpw * nw)
    slots = _sm_count(device_index) * max(1, _WARPS_PER_SM // nw)
    best, rounds = 1, -(-programs // slots)
    for nseg in range(2, 9):
        if (L // W) // nseg < _MIN_SEGMENT_WINDOWS:
            break
        r = -(-programs * nseg // slots) / nseg
        if r < 0.97 * rounds:
            best, rounds = nseg, r
    return best


def _groups(X) -> int:
    return 1 if X.dim() == 3 else X.shape[1]


def _lanes_meta(u, B, C):
    """(CPW, NW, the remaining meta-parameter overrides, the window W in steps) of the launch for these inputs."""
    over = {k: v for k, v in _META_OVERRIDES.items() if k != "NSEG"}
    if "CPW" in over:
        cpw, nw = over.pop("CPW"), over.pop("NW")
    else:
        cpw, nw = lanes_bwd_config(u.shape[1], _groups(B), _groups(C), u.element_size())
    return cpw, nw, over, 32 // cpw * (16 // u.element_size())


def use_lanes_bwd(u, N: int, device_index=None) -> bool:
    """Whether the uni backward takes this kernel: where it was measured faster than the segment backward (launcher
    level, bf16, each in one run: H100, session 8: global XL 1.35 vs 1.41 ms, global S 1.47 vs 1.79; H200 at 5d91651
    with segments: global XL 1.051 vs 1.418, long (1, 2304, 16, 16384) 2.094 vs 2.733, which before segments took
    3.42; H200 at 5695200: spatial XL (32, 2304, 16, 256), two windows a row, 1.065 vs 1.194). Needs 16-bit inputs
    (one 16-byte vector of u per lane and window), N <= 16 (every state of the window in registers), whole windows
    (L a multiple of 256), 24 channels an SM, or, in rows of 2048 steps or more
    (16 windows: room for 4 segments of 4), one whole round of programs (two channels a warp, _WARPS_PER_SM warps an
    SM: 2,112 channels on an H200; segments split the rest, :func:`lanes_bwd_segments`), and torch's deterministic
    mode off (dB/dC are added with atomics)."""
    batch, dim, L = u.shape
    if u.dtype not in (torch.bfloat16, torch.float16) or next_power_of_2(N) > 16 or L < LANES_BWD_MIN_L:
        return False
    if L % (32 * (16 // u.element_size())) or torch.are_deterministic_algorithms_enabled():
        return False
    n_sm = _sm_count(device_index)
    return batch * dim >= 24 * n_sm or (L >= 2048 and batch * dim >= _CONFIG[0] * _WARPS_PER_SM * n_sm)


def lanes_save_steps(u, B, C) -> int:
    """The spacing of the states the forward saves for this kernel: its window (128 steps at 2 channels a warp in
    16-bit dtypes, 256 at one), the only states it reads. Against SAVE_STEPS (64) that halves the saved states or
    more: 18 -> 9 MiB at global XL. The caller decides with :func:`use_lanes_bwd` that this kernel will read them."""
    return _lanes_meta(u, B, C)[3]


def use_lanes_bi_bwd(u, B, C, B_b, C_b, N: int, device_index=None) -> bool:
    """Whether the bidirectional backward takes this kernel (a launch a direction): :func:`use_lanes_bwd`, with one
    window for both directions (their B/C groups may differ), so that one spacing of saved states serves both."""
    return use_lanes_bwd(u, N, device_index) and lanes_save_steps(u, B, C) == lanes_save_steps(u, B_b, C_b)


def _grad_buffers(u, delta, A, B, C, D, z, delta_bias, initial_state, nseg, du_dtype=None, ddelta_dtype=None,
                  dB=None, dC=None, dA=None):
    """The gradient buffers one launch of nseg segments a row writes: du, ddelta, dz (empty without z); dB, dC (fp32
    (batch, G, BLOCK_N, L)) and dA (fp32 (batch, dim, N)), zero-filled and added to with atomics, unless given
    (shared with the other direction's); dD, ddelta_bias (fp32 per (segment, batch, channel), as (nseg * batch,
    dim)); dinitial_state; the segments' sync words (ticket, flags) and r carries."""
    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    f32 = torch.float32
    empty = torch.empty(0, device=dev, dtype=f32)
    BLOCK_N = next_power_of_2(N)
    return dict(
        u=torch.empty((batch, dim, L), device=dev, dtype=du_dtype or u.dtype),
        delta=torch.empty((batch, dim, L), device=dev, dtype=ddelta_dtype or delta.dtype),
        z=torch.empty((batch, dim, L), device=dev, dtype=z.dtype) if z is not None else empty,
        B=dB if dB is not None else torch.zeros((batch, _groups(B), BLOCK_N, L), device=dev, dtype=f32),
        C=dC if dC is not None else torch.zeros((batch, _groups(C), BLOCK_N, L), device=dev, dtype=f32),
        A=dA if dA is not None else torch.zeros((batch, dim, N), device=dev, dtype=f32),
        D=torch.empty((nseg * batch, dim), device=dev, dtype=f32) if D is not None else empty,
        delta_bias=torch.empty((nseg * batch, dim), device=dev, dtype=f32) if delta_bias is not None else empty,
        initial_state=torch.empty((batch, dim, N), device=dev, dtype=f32) if initial_state is not None else empty,
        sync=torch.zeros(1 + (nseg - 1) * batch * dim, device=dev, dtype=torch.int32) if nseg > 1 else empty,
        carry=torch.empty((nseg - 1) * batch * dim * BLOCK_N, device=dev, dtype=f32) if nseg > 1 else empty,
        nseg=nseg,
    )


def _launch_bwd(g, dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, states,
                delta_softplus: bool, REV=False, MODE=0, scale=1.0, ws=None, du_acc=None, ddelta_acc=None):
    """One launch of the lanes backward into the buffers g (:func:`_grad_buffers`). REV / MODE / scale / ws and the
    accumulated scratches (du_acc, ddelta_acc): the bidirectional scan's launches (see the kernel)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    Bt, G_B, Ct, G_C, BLOCK_N = lanes_bc(u, B, C)
    CPW, NW, over, W = _lanes_meta(u, B, C)
    VEC = 16 // u.element_size()
    save, first = saved_layout(states, L)
    assert L % W == 0 and W % save == 0, "windows must be whole and start on saved states"
    assert not REV or (initial_state is None and dlast_state is None), "the bidirectional scan has no end states"
    empty = u.new_empty(0, dtype=torch.float32)
    opt = lambda x: x if x is not None else empty  # noqa: E731
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    args = (
        u, delta, A.contiguous(), Bt, Ct, opt(D), opt(delta_bias), opt(z), dout, states, opt(initial_state),
        opt(dlast_state), g["u"], g["delta"], g["z"], g["B"], g["C"], g["A"], g["D"], g["delta_bias"],
        g["initial_state"], opt(ws), opt(du_acc), opt(ddelta_acc), g["sync"], g["carry"],
        # batch only where segments use it: Triton compiles a 1 as a constant, and NSEG 1 as it was before segments
        batch if g["nseg"] > 1 else 1, dim, L, N, G_B, G_C, dim // G_B, dim // G_C, u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        *zs, dout.stride(0), dout.stride(1), scale,
    )
    meta = dict(BLOCK_N=BLOCK_N, VEC=VEC, CPW=CPW, NW=NW, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_DLAST=dlast_state is not None,
                HAS_DH0=initial_state is not None, FIRST=first, SAVE=save, REV=REV, MODE=MODE,
                ACC_U=du_acc is not None, ACC_DT=ddelta_acc is not None, NSEG=g["nseg"], RS=0)
    meta.update(over)
    nseg = g["nseg"]
    grid = (batch, dim // (CPW * NW)) if nseg == 1 else (nseg * batch * dim // (CPW * NW),)
    launch(_selective_scan_bwd_lanes_kernel, grid, args, dict(meta, num_warps=NW))


def _finish(g, u, B, C, D, z, delta_bias, initial_state):
    """The buffers of :func:`_grad_buffers` -> gradients as :func:`.triton_bwd.selective_scan_bwd` returns them."""
    batch, _, L = u.shape
    N = g["A"].shape[2]

    def bc(buf, X):
        buf = buf[:, :, :N]
        return (buf.reshape(batch, N, L) if X.dim() == 3 else buf).to(X.dtype)

    return dict(u=g["u"], delta=g["delta"], A=g["A"].sum(0), B=bc(g["B"], B), C=bc(g["C"], C),
                D=g["D"].sum(0) if D is not None else None,
                delta_bias=g["delta_bias"].sum(0) if delta_bias is not None else None,
                z=g["z"] if z is not None else None,
                initial_state=g["initial_state"] if initial_state is not None else None)


def selective_scan_bwd_lanes(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, states,
                             delta_softplus: bool):
    """Launch the lanes backward. Inputs validated by the caller; dout, u, delta, z time contiguous; L a multiple of
    the window (32 / CPW lanes x one 16-byte vector). Returns a dict of gradients as
    :func:`.triton_bwd.selective_scan_bwd`."""
    nseg = lanes_bwd_segments(u, B, C, u.device.index if u.is_cuda else None)
    g = _grad_buffers(u, delta, A, B, C, D, z, delta_bias, initial_state, nseg)
    _launch_bwd(g, dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, states, delta_softplus)
    return _finish(g, u, B, C, D, z, delta_bias, initial_state)


def bi_selective_scan_bwd_lanes(dout, u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b,
                                delta_bias_b, states, states_b, delta_softplus: bool, divide_out: bool):
    """The bidirectional backward in two launches, no flipped copies: the backward direction (REV, from states_b)
    with its recomputed y into an fp32 scratch, then the forward direction, which adds it for dz. A ``*_b`` left out
    is its forward twin: where u / delta are shared the backward direction's du / ddelta go to fp32 scratch that the
    second launch adds; shared B, C, A take both directions' atomics in one buffer; D, delta_bias are added here.
    Returns a dict of gradients as :func:`.triton_bwd.selective_scan_bwd` does for the bidirectional scan. Inputs
    validated by the caller; every row time contiguous; L whole windows; states of both directions saved a window
    apart (:func:`use_lanes_bi_bwd`, :func:`lanes_save_steps`)."""
    twin = lambda b, f: f if b is None else b  # noqa: E731
    ub, dtb, Ab, Bb, Cb = twin(u_b, u), twin(delta_b, delta), twin(A_b, A), twin(B_b, B), twin(C_b, C)
    Db, biasb = twin(D_b, D), twin(delta_bias_b, delta_bias)
    f32 = torch.float32
    scale = 0.5 if divide_out else 1.0
    nseg = lanes_bwd_segments(u, B, C, u.device.index if u.is_cuda else None)
    gf = _grad_buffers(u, delta, A, B, C, D, z, delta_bias, None, nseg)
    gb = _grad_buffers(ub, dtb, Ab, Bb, Cb, Db, None, biasb, None, nseg, du_dtype=f32 if u_b is None else None,
                       ddelta_dtype=f32 if delta_b is None else None, dB=gf["B"] if B_b is None else None,
                       dC=gf["C"] if C_b is None else None, dA=gf["A"] if A_b is None else None)
    ws = torch.empty(u.shape, device=u.device, dtype=f32) if z is not None else None
    _launch_bwd(gb, dout, None, ub, dtb, Ab, Bb, Cb, Db, z, biasb, None, states_b, delta_softplus, REV=True, MODE=1,
                scale=scale, ws=ws)
    _launch_bwd(gf, dout, None, u, delta, A, B, C, D, z, delta_bias, None, states, delta_softplus, MODE=2,
                scale=scale, ws=ws, du_acc=gb["u"] if u_b is None else None,
                ddelta_acc=gb["delta"] if delta_b is None else None)
    grads = _finish(gf, u, B, C, D, z, delta_bias, None)
    back = _finish(gb, ub, Bb, Cb, Db, None, biasb, None)
    grads["u_b"] = None if u_b is None else back["u"]
    grads["delta_b"] = None if delta_b is None else back["delta"]
    grads["A_b"] = None if A_b is None else back["A"]  # shared: one buffer took both directions
    grads["B_b"] = None if B_b is None else back["B"]
    grads["C_b"] = None if C_b is None else back["C"]
    for name, X, Xb in (("D", D, D_b), ("delta_bias", delta_bias, delta_bias_b)):
        if Xb is None:
            if X is not None:
                grads[name] = grads[name] + back[name]
            grads[name + "_b"] = None
        else:
            grads[name + "_b"] = back[name]
    return grads
