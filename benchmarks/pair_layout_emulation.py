"""The index algebra of the CUDA pair forward (``fwd_window_pair``, LANES_FWD_PAIR16), lane by lane in numpy (CPU).

Mirrors the kernel's steps for one channel and one window, float64: the staged rows' chunk order
(``lanes_pair_chunk``), the partner lanes' trade of d and d u, the half-warp scan levels with their in-segment
predicate, the carries in lanes 0..15, the replay (one chain of 16 steps or, LANES_PAIR_SPLIT, two of 8) and the
halves' y added at the end; both scan directions. Checks the output and the carries leaving the window against a
sequential scan. It checks the layout's arithmetic, not the CUDA code (cuda_lanes_variants.py checks that on a GPU).

Usage: python benchmarks/pair_layout_emulation.py
"""

import numpy as np

WINDOW, N, LANES, STEPS = 256, 16, 32, 16  # STEPS: a lane's steps


def pair_chunk(c: int) -> int:
    """Where a staged row's 16-byte chunk c lies (csrc: lanes_pair_chunk)."""
    return c ^ ((c >> 3) & 1)


def staged(row: np.ndarray) -> np.ndarray:
    out = np.empty_like(row)
    for c in range(WINDOW // 8):
        out[pair_chunk(c) * 8:pair_chunk(c) * 8 + 8] = row[c * 8:c * 8 + 8]
    return out


def sequential(d, u, B, C, A2, h0, D, reverse):
    """y (D u included) and the final state of the plain scan over the window."""
    h, y = h0.copy(), D * u
    for t in (range(WINDOW - 1, -1, -1) if reverse else range(WINDOW)):
        h = np.exp2(d[t] * A2) * h + d[t] * u[t] * B[:, t]
        y[t] += C[:, t] @ h
    return y, h


def in_segment(src: int, lane: int) -> bool:
    """A width-16 shuffle's in-range flag: the source lane exists and is in this lane's half."""
    return 0 <= src < LANES and src >> 4 == lane >> 4


def pair_window(d, u, B, C, A2, h0, D, reverse, split):
    """y and the carries (lane n holds state n's) as fwd_window_pair computes them."""
    sB, sC = np.stack([staged(r) for r in B]), np.stack([staged(r) for r in C])
    su, sd = staged(u), staged(d)
    half = [lane >> 4 for lane in range(LANES)]
    hl = [lane & 15 for lane in range(LANES)]
    own = [2 * hl[lane] + half[lane] for lane in range(LANES)]  # the lane's chunk of u, delta and y
    first, last = (15, 0) if reverse else (0, 15)
    h_l = np.array([h0[lane] if lane < N else 0.0 for lane in range(LANES)])
    A2_l = np.array([A2[lane] if lane < N else 0.0 for lane in range(LANES)])
    u8 = [su[pair_chunk(own[lane]) * 8:][:8] for lane in range(LANES)]
    d8 = [sd[pair_chunk(own[lane]) * 8:][:8] for lane in range(LANES)]

    # the partner lanes (lane ^ 16) trade d and d u: each lane then holds its 16 steps
    dt, du, y = (np.zeros((LANES, STEPS)) for _ in range(3))
    s_lo, s_hi = np.zeros(LANES), np.zeros(LANES)
    for lane in range(LANES):
        p = lane ^ 16
        mine, theirs = (1, 0) if half[lane] else (0, 1)  # which 8 of the 16 steps are the lane's own
        dt[lane, 8 * mine:][:8], dt[lane, 8 * theirs:][:8] = d8[lane], d8[p]
        du[lane, 8 * mine:][:8], du[lane, 8 * theirs:][:8] = d8[lane] * u8[lane], d8[p] * u8[p]
        s_lo[lane], s_hi[lane] = dt[lane, :8].sum(), dt[lane, 8:].sum()
    s_first, s_second = (s_hi, s_lo) if reverse else (s_lo, s_hi)  # the lane's first / second 8 in scan order
    order = list(range(STEPS - 1, -1, -1) if reverse else range(STEPS))

    for k in range(8):  # rounds: half h scans state 2k + h
        n = [2 * k + half[lane] for lane in range(LANES)]
        A2v = np.array([A2_l[n[lane]] for lane in range(LANES)])
        Bv, Cv = np.zeros((LANES, STEPS)), np.zeros((LANES, STEPS))
        for lane in range(LANES):
            o0, o1 = pair_chunk(2 * hl[lane]) * 8, pair_chunk(2 * hl[lane] + 1) * 8
            Bv[lane] = np.concatenate([sB[n[lane], o0:o0 + 8], sB[n[lane], o1:o1 + 8]])
            Cv[lane] = np.concatenate([sC[n[lane], o0:o0 + 8], sC[n[lane], o1:o1 + 8]])
        a = np.exp2(dt * A2v[:, None])
        x = du * Bv
        pa, xa, pa_first, xa_first = (np.zeros(LANES) for _ in range(4))
        for lane in range(LANES):  # the lane's map h -> pa h + xa over its steps
            if split:
                xf = xs = 0.0
                for j in order[:8]:
                    xf = a[lane, j] * xf + x[lane, j]
                for j in order[8:]:
                    xs = a[lane, j] * xs + x[lane, j]
                pa_first[lane], xa_first[lane] = np.exp2(s_first[lane] * A2v[lane]), xf
                pa_second = np.exp2(s_second[lane] * A2v[lane])
                pa[lane], xa[lane] = pa_first[lane] * pa_second, pa_second * xf + xs
            else:
                pa[lane] = np.exp2((s_lo[lane] + s_hi[lane]) * A2v[lane])
                for j in order:
                    xa[lane] = a[lane, j] * xa[lane] + x[lane, j]
        carry = np.array([h_l[n[lane]] for lane in range(LANES)])
        for off in (1, 2, 4, 8):  # the half-warp scan levels
            pa0, xa0 = pa.copy(), xa.copy()
            for lane in range(LANES):
                src = lane + off if reverse else lane - off
                if in_segment(src, lane):
                    xa[lane], pa[lane] = pa0[lane] * xa0[src] + xa0[lane], pa0[lane] * pa0[src]
        h_out = pa * carry + xa
        h_in = np.zeros(LANES)
        for lane in range(LANES):
            src = lane + 1 if reverse else lane - 1
            h_in[lane] = carry[lane] if hl[lane] == first else h_out[src if in_segment(src, lane) else lane]
        nxt = [h_out[16 * (lane & 1) + last] for lane in range(LANES)]
        for lane in range(LANES):
            if lane >> 1 == k:
                h_l[lane] = nxt[lane]
        for lane in range(LANES):  # the replay
            chains = ([(order[:8], h_in[lane]), (order[8:], pa_first[lane] * h_in[lane] + xa_first[lane])] if split
                      else [(order, h_in[lane])])
            for steps, h in chains:
                for j in steps:
                    h = a[lane, j] * h + x[lane, j]
                    y[lane, j] += Cv[lane, j] * h

    out = np.zeros(WINDOW)
    for lane in range(LANES):  # each lane's chunk: its half's states plus the partner's, plus D u
        mine = 8 * half[lane]
        out[own[lane] * 8:][:8] = D * u8[lane] + (y[lane, mine:mine + 8] + y[lane ^ 16, mine:mine + 8])
    return out, h_l[:N]


def main():
    rng = np.random.default_rng(0)
    for reverse in (False, True):
        for split in (False, True):
            d, u = rng.uniform(0.01, 0.2, WINDOW), rng.standard_normal(WINDOW)
            B, C = rng.standard_normal((N, WINDOW)), rng.standard_normal((N, WINDOW))
            A2, h0, D = -rng.uniform(0.5, 3.0, N), rng.standard_normal(N), 0.7
            y_ref, h_ref = sequential(d, u, B, C, A2, h0, D, reverse)
            y, h = pair_window(d, u, B, C, A2, h0, D, reverse, split)
            err_y, err_h = np.abs(y - y_ref).max() / np.abs(y_ref).max(), np.abs(h - h_ref).max()
            print(f"reverse={reverse} split={split}: y rel. err {err_y:.1e}, carries abs. err {err_h:.1e}")
            assert err_y < 1e-12 and err_h < 1e-12


if __name__ == "__main__":
    main()
