// Selective scan with the time axis across the lanes of a warp ("lanes" kernels, config kLanesConfig), uni- and
// bidirectional; instantiated per dtype by the fwd/bwd launchers.
//
// One warp per (batch row, channel); windows of 256 steps, lane l holding steps 8l .. 8l+7 of the window (one
// 16-byte vector of a 16-bit dtype). Per state n the window's recurrence h_t = a_t h_{t-1} + x_t (a_t =
// exp2(d_t A_n log2 e), x_t = d_t u_t B_t) is composed in-thread over the lane's 8 steps into an affine map
// (prod a, x-part), the maps are scanned across the lanes (5 shuffle levels), and each lane replays its 8 steps
// from the state entering it. Lane 31's last state is the next window's carry. The forward saves the state at
// every window start (fp32, (batch, dim, nwin, N)) and, with z, y before the gate (for dz, as mamba-ssm does).
// The block's 4 warps (channels of one B/C group) read B/C windows the block staged in shared memory (LANES_FWD_STAGE).
// Full staged windows of the 16-state forward with 16-bit inputs run in the pair layout instead (fwd_window_pair,
// LANES_FWD_PAIR16): each half-warp scans one state of a pair, lane l % 16 holding 16 steps (4 shuffle levels).
//
// Backward: windows last to first. Per state: recompute h over the window from its saved start state (the same
// forward scan), then the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} by the mirrored scan, with r = a_{t0} g_{t0}
// carried to the window before; on full windows both cross-lane scans go through shared memory, 4 states at a time
// (bwd_window_smem), elsewhere through shuffles (bwd_window). With hx_t = h_t - x_t (= a_t h_{t-1}):
//     dC_t += dy_t h_t     dB_t += g_t d_t u_t     (fp32 vector reductions over the channels of a group, summed
//                                                   over the block's 4 channels in shared memory first)
//     du_t = d_t sum_n g_t B_t + D dy_t            dd_t = u_t sum_n g_t B_t + sum_n A_n g_t hx_t
//     dA_n += sum_t d_t g_t hx_t                   dh_init = r after the first window
// Beyond L the inputs read as zero and d as 0 (a = 1, x = 0): the state holds, the adjoint passes through.
// Bidirectional: the backward direction runs the same code in reversed scan order (Order<true>: shuffles down for the
// state, up for the adjoint, each lane's steps from its last, windows from the end) over the natural-order inputs; in
// the forward its y goes to an fp32 scratch that the forward direction, run by a second launch (LanesPass), adds
// before the gate. dz = dout y silu'(z) from the pre-gate y the forward saves (so the backward computes no y; a
// probe build without it, H100, bf16: global XL fwd+bwd 0.955 -> 0.927 ms, bidirectional 1.942 -> 1.892; NOTES.md,
// session 18).
// dB/dC and dA (over batch rows) use atomics, so the result is not bit-reproducible; the launcher takes another
// config when the caller asks for determinism.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "selective_scan_common.cuh"

namespace matten_scan {

constexpr int kLanesSteps = 8;     // steps per lane
constexpr int kLanesWindow = 256;  // steps per window
#ifndef LANES_AHEAD
#define LANES_AHEAD 3
#endif
constexpr int kLanesAhead = LANES_AHEAD;  // states whose B/C loads are in flight while one is computed
// LANES_BWD_ROLL (default on): the smem-scan backward's loop over its 4 groups of states is not unrolled (a quarter
// of the code: 1,162 instructions a group against 5,252 a window). H100, bf16, fwd+bwd ms against the unrolled loop
// in one call (benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-f862446-roll.json): global XL 0.973 ->
// 0.949, long 2.410 -> 2.283, bidirectional long 4.945 -> 4.682. The forward rolled the same way was 35% slower.
// The forward direction's ws loads: issued this many states before a full window's end (0: at its end).
#ifndef LANES_WS_AHEAD
#define LANES_WS_AHEAD 4
#endif
// LANES_N8 (default on): N = 8 runs an instantiation for 8 states without row masks, N < 8 one for 8 with masked
// rows (else both run the masked 16-state one, whose schedule is poor too: cuda_sass_count.py scores its forward
// loop 10,440 cycles against 2,156 for the exact 8-state one). H100, bf16, fwd / fwd+bwd ms against LANES_N8=0 in one
// call (benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-fcb6ea4-n8-n4.json): (2, 2304, 8, 4096) 0.361 /
// 1.084 -> 0.141 / 0.563, bidirectional 0.794 / 2.238 -> 0.320 / 1.131; (2, 2304, 4, 4096) 0.314 / 0.900 -> 0.146 /
// 0.586, bidirectional 0.649 / 1.839 -> 0.332 / 1.223; N = 16 unchanged (0.231 / 0.932). (Defined in selective_scan.h.)
#ifndef LANES_BWD_ROLL
#define LANES_BWD_ROLL 1
#endif
constexpr unsigned kFull = 0xffffffffu;

// LANES_PROBE_CLOCK (timing probe only, wrong dA / last_state): the lanes backward (forward) accumulates the SM clock
// cycles of each phase of its full windows per warp and adds lane 0's sums, as floats, where dA_part (last_state)
// would go, phase k in slot k (benchmarks/lanes_clock_probe.py reads them back). Phases: kProbe* below.
#ifdef LANES_PROBE_CLOCK
struct LanesProbe {
  float c[16];
  unsigned t;
};
__device__ __forceinline__ unsigned probe_clock() {
  unsigned t;
  asm volatile("mov.u32 %0, %%clock;" : "=r"(t)::"memory");
  return t;
}
#define LANES_PROBE_PARAM , LanesProbe& pr
#define LANES_PROBE_ARG , pr
#define LANES_PROBE(k)                   \
  do {                                   \
    const unsigned t_ = probe_clock();   \
    pr.c[k] += (float)(t_ - pr.t);       \
    pr.t = t_;                           \
  } while (0)
#define LANES_PROBE_START() (pr.t = probe_clock())
#else
#define LANES_PROBE_PARAM
#define LANES_PROBE_ARG
#define LANES_PROBE(k) \
  do {                 \
  } while (0)
#define LANES_PROBE_START() ((void)0)
#endif
// Backward phases (per full window; states summed).
enum : int {
  kProbeWinBegin = 0,   // u, delta, dout, z loads, softplus, gate of dy
  kProbeStateBegin,     // B/C unpack, exps, the lanes' maps
  kProbeStateScan,      // the state scan across the lanes (shuffles)
  kProbeReplay,         // the lane's states and y
  kProbeAdjMaps,        // the adjoint's lane maps
  kProbeAdjScan,        // the adjoint scan across the lanes, r
  kProbeGrads,          // the per-step gradients
  kProbeStage,          // dB/dC staged in shared memory
  kProbeBarrier,        // the block barrier
  kProbeFlush,          // the block's dB/dC sums to global memory
  kProbeWinEnd,         // du / ddelta stores, dz
  kProbeWindows,        // count of full windows (not cycles)
};
// Forward phases.
enum : int {
  kProbeFwdWinBegin = 0,  // u, delta loads, softplus
  kProbeFwdStateBegin,    // B/C unpack, exps, the lanes' maps
  kProbeFwdStateScan,     // the state scan across the lanes
  kProbeFwdReplay,        // the lane's states and y
  kProbeFwdWinEnd,        // gate, store
  kProbeFwdWindows = 11,  // count of full windows
};
// Blocks of kLanesWarps warps per SM the register allocation must allow (3: <= 168 registers; H100 A/B in
// benchmarks/NOTES_scan.md: 4 (128 registers) spills and is 25% slower in the forward, 2 (255) no faster).
#ifndef LANES_FWD_MINB
#define LANES_FWD_MINB 3
#endif
#ifndef LANES_BWD_MINB
#define LANES_BWD_MINB 3
#endif

// 8 consecutive elements as loaded (one 16-byte vector for 16-bit types, two for fp32).
template <typename T>
struct Raw8 {
  uint4 v[sizeof(T) == 4 ? 2 : 1];
};

// Elements t0 .. t0+7 of a row. FULL: the window lies inside L and rows are 16-byte aligned: plain vector loads
// (no branch, so the compiler can issue them early). Otherwise element by element, zero beyond L or when !ok.
template <bool FULL, typename T>
__device__ __forceinline__ Raw8<T> ld8(const T* __restrict__ row, int t0, int L, bool ok = true) {
  Raw8<T> r;
  if constexpr (FULL) {
#pragma unroll
    for (int i = 0; i < (int)(sizeof(r.v) / 16); ++i) r.v[i] = reinterpret_cast<const uint4*>(row + t0)[i];
  } else {
    T* e = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) e[j] = (ok && t0 + j < L) ? row[t0 + j] : from_float<T>(0.f);
  }
  return r;
}

// K elements packed in 32-bit words -> fp32. bf16: one instruction an element (a shift or a mask; to_float of
// the high half of a word took two: PRMT + SHF).
template <typename T, int K>
__device__ __forceinline__ void unpack_words(const uint32_t* w, float (&v)[K]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = __uint_as_float(w[j]);
  } else {
#pragma unroll
    for (int i = 0; i < K / 2; ++i) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(w + i));
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void unpack8(const Raw8<T>& r, float (&v)[kLanesSteps]) {
  unpack_words<T>(reinterpret_cast<const uint32_t*>(&r), v);
}

template <bool FULL, typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, int t0, int L, float (&v)[kLanesSteps]) {
  unpack8(ld8<FULL>(row, t0, L), v);
}

// Row n of B or C (batch, G, N, L) at t0; rows n >= N read as zero (by a select, not a branch). EXACT: N == NMAX.
// Rows `stride` elements apart (0: L; kLanesWindow for a forward window staged in shared memory).
template <bool FULL, bool EXACT, typename T>
__device__ __forceinline__ Raw8<T> ld8_state(const T* __restrict__ base, int n, int N, int t0, int L, int stride = 0) {
#ifdef LANES_PROBE_BC_ROW0  // timing probe only (wrong results): every state reads row 0 (what B/C's misses cost)
  n = 0;
#endif
  const size_t rs = stride ? stride : L;
  if constexpr (EXACT) return ld8<FULL>(base + (size_t)n * rs, t0, L);
  const bool ok = n < N;
  Raw8<T> r = ld8<FULL>(base + (size_t)(ok ? n : 0) * rs, t0, L, ok);
  if constexpr (FULL) {
#pragma unroll
    for (int i = 0; i < (int)(sizeof(r.v) / 16); ++i) r.v[i] = ok ? r.v[i] : make_uint4(0u, 0u, 0u, 0u);
  }
  return r;
}

template <bool FULL, typename T>
__device__ __forceinline__ void store8(T* __restrict__ row, int t0, int L, const float (&v)[kLanesSteps]) {
  if constexpr (FULL) {
    Raw8<T> r;
    T* e = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) e[j] = from_float<T>(v[j]);
#pragma unroll
    for (int i = 0; i < (int)(sizeof(r.v) / 16); ++i) reinterpret_cast<uint4*>(row + t0)[i] = r.v[i];
  } else {
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j)
      if (t0 + j < L) row[t0 + j] = from_float<T>(v[j]);
  }
}

// dst[0..3] += v (global fp32, 16-byte aligned): one vector reduction on sm_90 (red.global.add.v4.f32; CUDA 13's
// atomicAdd(float4*) compiles to four scalar atomics with returns and address-space checks), four scalar ones before.
__device__ __forceinline__ void red_add4(float* dst, float4 v) {
#ifdef LANES_PROBE_NO_RED  // timing probe only (wrong dB/dC): what the reductions cost
  if (v.x != 12345.f) return;
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(dst)), "f"(v.x),
               "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
#else
  atomicAdd(dst, v.x), atomicAdd(dst + 1, v.y), atomicAdd(dst + 2, v.z), atomicAdd(dst + 3, v.w);
#endif
}

// row[t0 + j] += v[j] for the steps inside L (fp32 atomics). FULL windows (fp32 rows 16-byte aligned) go through
// the warp's shared buffer `xch` (256 floats): lane l then adds elements 4l..4l+3 and 128+4l..128+4l+3 of the
// window, so each 16-byte vector reduction of the warp covers 512 contiguous bytes (on sm_90; scalar, coalesced
// the same way, before).
template <bool FULL>
__device__ __forceinline__ void atomic_add8(float* row, int t0, int lane, int L, const float (&v)[kLanesSteps],
                                            float* xch) {
  if constexpr (FULL) {
    reinterpret_cast<float4*>(xch)[lane * 2] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(xch)[lane * 2 + 1] = make_float4(v[4], v[5], v[6], v[7]);
    __syncwarp();
    float* win = row + (t0 - lane * kLanesSteps);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const float4 s = reinterpret_cast<const float4*>(xch)[k * 32 + lane];
      float* dst = win + k * 128 + lane * 4;
      red_add4(dst, s);
    }
    __syncwarp();
  } else {
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j)
      if (t0 + j < L) atomicAdd(row + t0 + j, v[j]);
  }
}

#ifndef LANES_BLOCK_REDUCE
#define LANES_BLOCK_REDUCE 1
#endif
#ifndef LANES_BWD_STATES_PER_BARRIER
#define LANES_BWD_STATES_PER_BARRIER 2
#endif
// States whose dB/dC one block barrier covers (a divisor of 16). H100, bf16, fwd+bwd ms against 1 in one call
// (benchmarks/results/cuda-lanes-variants-...-202e3c1-barrier.json): long 2.829 vs 2.899, bi global XL 2.488 vs 2.579,
// bi long 6.126 vs 6.369; 4 (dynamic shared memory) no better. Session 25 (dA in one register), against 1: global XL
// 0.802 vs 0.827, bi global XL 1.617 vs 1.663; 1 with 4 blocks an SM (LANES_BWD_MINB=4, 128 registers) 0.867 / 1.764.
constexpr int kLanesStatesPerBarrier = LANES_BWD_STATES_PER_BARRIER;
static_assert(16 % kLanesStatesPerBarrier == 0, "LANES_BWD_STATES_PER_BARRIER divides 16");
// LANES_BLOCK_REDUCE (default on; 0 for A/B runs): on full windows with N = 16, the 4 warps (channels) of a block sum
// their dB/dC of a state and window in shared memory (double-buffered, one barrier per kLanesStatesPerBarrier
// states) and add the block's sum with one 16-byte reduction per thread and state: a quarter of the global
// reductions (H100, global XL fwd+bwd 1.44 -> 1.21 ms, csrc/selective_scan/NOTES.md).
// `buf` (dynamic shared memory, kLanesBlockReduceBytes): 2 x kLanesStatesPerBarrier slots of kLanesWarps x 512 floats.
constexpr int kLanesSlot = kLanesWarps * 2 * kLanesWindow;
constexpr int kLanesBlockReduceBytes = LANES_BLOCK_REDUCE ? 2 * kLanesStatesPerBarrier * kLanesSlot * 4 : 0;

// This warp's dB/dC of one state and window into its part of `slot`.
__device__ __forceinline__ void block_stage(const float (&dBv)[kLanesSteps], const float (&dCv)[kLanesSteps],
                                            float* slot) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float4* mine = reinterpret_cast<float4*>(slot + warp * 2 * kLanesWindow);
  mine[lane * 2] = make_float4(dBv[0], dBv[1], dBv[2], dBv[3]);
  mine[lane * 2 + 1] = make_float4(dBv[4], dBv[5], dBv[6], dBv[7]);
  mine[64 + lane * 2] = make_float4(dCv[0], dCv[1], dCv[2], dCv[3]);
  mine[64 + lane * 2 + 1] = make_float4(dCv[4], dCv[5], dCv[6], dCv[7]);
}

// After a barrier: the block's sum of one staged state added to global memory (thread t: 4 values of dB or dC).
__device__ __forceinline__ void block_flush(float* dB_row, float* dC_row, int wbase, const float* slot) {
  const int tid = threadIdx.x;
  float4 acc = reinterpret_cast<const float4*>(slot)[tid];
#pragma unroll
  for (int w = 1; w < kLanesWarps; ++w) {
    const float4 v = reinterpret_cast<const float4*>(slot + w * 2 * kLanesWindow)[tid];
    acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
  }
  float* dst = tid < 64 ? dB_row + wbase + tid * 4 : dC_row + wbase + (tid - 64) * 4;
  red_add4(dst, acc);
}

// Whether the forward saves the state entering natural window w (of nwin) in scan order, at slot w /
// kLanesStateStride: the first window in scan order of each group of kLanesStateStride (REV: a group's last window,
// or the row's last).
__device__ __forceinline__ bool lanes_saves_state(int w, int nwin, bool rev) {
  constexpr int K = kLanesStateStride;
  return K == 1 || (rev ? (w % K == K - 1 || w == nwin - 1) : w % K == 0);
}

// d = softplus(delta + bias) (optional); d = 0 beyond L (the state then holds). The lanes kernels use the MUFU
// softplus and sigmoid (fast_softplus / fast_sigmoid: ~10 and 4 instructions against ~25 for log1pf and the IEEE
// reciprocal) in the forward and the backward alike, so the backward recomputes the forward's d exactly.
template <bool FULL>
__device__ __forceinline__ void lanes_delta(float (&dt)[kLanesSteps], float bias, bool softplus, int t0, int L) {
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) {
    const float x = dt[j] + bias;
    const float d = softplus ? fast_softplus(x) : x;
    dt[j] = (FULL || t0 + j < L) ? d : 0.f;
  }
}

// Scan order. REV: t = L-1 .. 0 (the backward direction of the bidirectional scan), so within a window lane 31
// scans first and each lane takes its steps from the last; the data layout does not change.
template <bool REV>
struct Order {
  static constexpr int first = REV ? 31 : 0;  // the lane that scans first
  static constexpr int last = REV ? 0 : 31;
  // index of a lane's k-th step in scan order
  static __device__ __forceinline__ constexpr int step(int k) { return REV ? kLanesSteps - 1 - k : k; }
  // v of the lane `off` places earlier (prev) / later (next) in scan order; own v where there is none
  static __device__ __forceinline__ float prev(float v, int off) {
    return REV ? __shfl_down_sync(kFull, v, off) : __shfl_up_sync(kFull, v, off);
  }
  static __device__ __forceinline__ float next(float v, int off) {
    return REV ? __shfl_up_sync(kFull, v, off) : __shfl_down_sync(kFull, v, off);
  }
};

// A scan level is PTX whose update is predicated on the shuffle's own in-range flag (`shfl.sync ... d|p`), not on a
// lane test: ptxas then updates (xa, pa) in place. With the lane test it computed into temporaries and moved them
// under the predicate (forward loop, bf16, sm_90: 137 MOV + 35 IMAD.MOV a window, 1,963 instructions; with the PTX
// levels 10 MOV, 1,780; H100 global XL 0.186 / 0.864 -> 0.174 / 0.845 ms, NOTES.md "Session 22").
// (pa, xa) <- (pa pp, pa xp + xa) with (pp, xp) the lane's `off` places lower (DOWN: higher), where there is one.
#define LANES_SCAN_LEVEL(MODE, C)                                \
  "{\n\t.reg .pred p;\n\t.reg .f32 xp, pp;\n\t"                 \
  "shfl.sync." MODE ".b32 xp|p, %0, %2, " C ", -1;\n\t"             \
  "shfl.sync." MODE ".b32 pp, %1, %2, " C ", -1;\n\t"               \
  "@p fma.rn.f32 %0, %1, xp, %0;\n\t"                              \
  "@p mul.rn.f32 %1, %1, pp;\n\t}"
// W: the lanes scanned together, the whole warp (32) or each half-warp (16: fwd_window_pair).
template <bool DOWN, int W = 32>
__device__ __forceinline__ void compose_shfl(float& pa, float& xa, int off) {
  static_assert(W == 32 || W == 16, "a warp or a half-warp");
  if constexpr (DOWN && W == 32) {
    asm(LANES_SCAN_LEVEL("down", "0x1f") : "+f"(xa), "+f"(pa) : "r"(off));
  } else if constexpr (DOWN) {
    asm(LANES_SCAN_LEVEL("down", "0x101f") : "+f"(xa), "+f"(pa) : "r"(off));
  } else if constexpr (W == 32) {
    asm(LANES_SCAN_LEVEL("up", "0") : "+f"(xa), "+f"(pa) : "r"(off));
  } else {
    asm(LANES_SCAN_LEVEL("up", "0x1000") : "+f"(xa), "+f"(pa) : "r"(off));
  }
}
#undef LANES_SCAN_LEVEL

// The state entering this lane: the lanes' affine maps (pa, xa) (h -> pa h + xa over the lane's steps) scanned
// across the warp and applied to `carry`, the state entering the first lane; `carry` becomes the state leaving the
// last lane (the next window's carry).
// PTX false: the levels as C++, the update under a lane test (the masked 8-state forward: with the PTX levels ptxas
// spilled 116 B there against 20, and global XL at d_state 4 ran its forward in 0.226 ms against 0.145; H100, bf16).
template <bool REV, bool PTX = true>
__device__ __forceinline__ float lanes_state_in(float pa, float xa, float& carry, int lane) {
  using O = Order<REV>;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    if constexpr (PTX) {
      compose_shfl<REV>(pa, xa, off);
    } else {
      const float pp = O::prev(pa, off), xp = O::prev(xa, off);
      if (REV ? lane + off < 32 : lane >= off) {
        xa = fmaf(pa, xp, xa);
        pa *= pp;
      }
    }
  }
  const float h_out = fmaf(pa, carry, xa);  // the state after this lane's steps
  float h_in = O::prev(h_out, 1);
  if (lane == O::first) h_in = carry;
  carry = __shfl_sync(kFull, h_out, O::last);
  return h_in;
}

// The adjoint entering this lane from the lane after it in scan order (or r for the last lane): the lanes' maps
// (q, s) (G -> q G + s, G = the adjoint entering the lane) scanned against scan order and applied to r. g0 becomes
// the adjoint at this lane's first step.
template <bool REV>
__device__ __forceinline__ float lanes_adjoint_in(float q, float s, float r, int lane, float& g0) {
  using O = Order<REV>;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) compose_shfl<!REV>(q, s, off);
  g0 = fmaf(q, r, s);
  float g_in = O::next(g0, 1);
  if (lane == O::last) g_in = r;
  return g_in;
}

// Per-channel pointers of one warp and one direction.
template <typename T>
struct LanesRows {
  const T *u, *delta, *B, *C, *z, *dout;
  T *out, *du, *ddelta, *dz;
  T* ys;            // forward: y before the gate, saved for dz (with z, when the backward follows)
  const T* ys_in;   // backward: the same
  float *dB, *dC, *ws;
  int bc_stride;    // B / C's row stride as the forward window reads them (L, or kLanesWindow when staged)
};

// The B/C group of channel chan in direction d.
__device__ __forceinline__ int lanes_group(const ScanParams& p, int d, int chan) {
  return chan / (p.dim / p.dir[d].groups);
}

template <typename T>
__device__ __forceinline__ LanesRows<T> lanes_rows(const ScanParams& p, int d, int b, int chan,
                                                   int g /* lanes_group */) {
  const DirParams& dp = p.dir[d];
  const size_t row = ((size_t)b * p.dim + chan) * p.L;
  const size_t bc = ((size_t)b * dp.groups + g) * p.N * p.L;  // the dB/dC partial sums' layout (contiguous)
  const size_t gi = (size_t)g * p.N * p.L, ci = (size_t)chan * p.L;  // within a batch row of B / C, z / dz
  LanesRows<T> r;
  r.u = static_cast<const T*>(dp.u) + row;
  r.delta = static_cast<const T*>(dp.delta) + row;
  r.B = static_cast<const T*>(dp.B) + (size_t)b * dp.B_bstride + gi;
  r.C = static_cast<const T*>(dp.C) + (size_t)b * dp.C_bstride + gi;
  r.z = p.z ? static_cast<const T*>(p.z) + (size_t)b * p.z_bstride + ci : nullptr;
  r.dout = p.dout ? static_cast<const T*>(p.dout) + row : nullptr;
  r.out = p.out ? static_cast<T*>(p.out) + row : nullptr;
  r.ys = p.y_saved ? static_cast<T*>(p.y_saved) + row : nullptr;
  r.ys_in = p.y_saved_in ? static_cast<const T*>(p.y_saved_in) + row : nullptr;
  r.du = dp.du ? static_cast<T*>(dp.du) + row : nullptr;
  r.ddelta = dp.ddelta ? static_cast<T*>(dp.ddelta) + row : nullptr;
  r.dz = p.dz ? static_cast<T*>(p.dz) + (size_t)b * p.dz_bstride + ci : nullptr;
  r.dB = dp.dB_part ? dp.dB_part + bc : nullptr;
  r.dC = dp.dC_part ? dp.dC_part + bc : nullptr;
  r.ws = p.ws ? p.ws + row : nullptr;
  r.bc_stride = p.L;
  return r;
}

template <typename T>
__device__ __forceinline__ LanesRows<T> lanes_rows(const ScanParams& p, int d, int b, int chan) {
  return lanes_rows<T>(p, d, b, chan, lanes_group(p, d, chan));
}

// The rows again inside a loop (LANES_BWD_REMAT): b, chan and g pass through an opaque move, so that
// the compiler recomputes the pointers from the parameters there instead of hoisting them out of the loop and spilling
// them.
template <typename T>
__device__ __forceinline__ LanesRows<T> lanes_rows_fresh(const ScanParams& p, int d, int b, int chan, int g) {
  int bo, co, go;
  asm volatile("mov.b32 %0, %1;" : "=r"(bo) : "r"(b));
  asm volatile("mov.b32 %0, %1;" : "=r"(co) : "r"(chan));
  asm volatile("mov.b32 %0, %1;" : "=r"(go) : "r"(g));
  return lanes_rows<T>(p, d, bo, co, go);
}

// What a window does with its y (the scan's output before the gate, D u included):
enum LanesMode : int {
  kUni = 0,     // unidirectional: gate, store out (backward: dz from the saved y)
  kToWs = 1,    // bidirectional, backward direction (runs first): y to the fp32 scratch ws (backward: no dz)
  kAddWs = 2,   // bidirectional, forward direction: y + ws, halved with divide_out, gate, store out (backward: dz)
};

// What one launch of a lanes (or seq) kernel covers. The bidirectional scan is two launches, one a direction, with
// the kernels of the unidirectional one: a single launch running both directions in each warp (session 7 to 15)
// spilled 420 B a thread against 88-128 and was slower, most at short rows (H100, bf16, fwd / fwd+bwd ms, one call,
// benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-275a2d7-bi-split.json: spatial XL 0.532 / 3.152 ->
// 0.532 / 2.230, global XL 0.580 / 2.268 -> 0.503 / 2.128, long 1.444 / 5.532 -> 1.259 / 5.208).
enum LanesPass : int {
  kPassUni = 0,    // the unidirectional scan
  kPassBiRev = 1,  // the backward direction (first launch; its y to the fp32 scratch ws)
  kPassBiFwd = 2,  // the forward direction (second launch; reads ws)
};

// The pre-gate y of the other direction, added (kAddWs), or this one's stored (kToWs).
template <bool FULL>
__device__ __forceinline__ void ws_add8(const float* ws, int t0, int L, float (&y)[kLanesSteps]) {
  if constexpr (FULL) {
    const float4 lo = reinterpret_cast<const float4*>(ws + t0)[0], hi = reinterpret_cast<const float4*>(ws + t0)[1];
    y[0] += lo.x, y[1] += lo.y, y[2] += lo.z, y[3] += lo.w, y[4] += hi.x, y[5] += hi.y, y[6] += hi.z, y[7] += hi.w;
  } else {
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j)
      if (t0 + j < L) y[j] += ws[t0 + j];
  }
}

template <bool FULL>
__device__ __forceinline__ void ws_store8(float* ws, int t0, int L, const float (&y)[kLanesSteps]) {
  if constexpr (FULL) {
    reinterpret_cast<float4*>(ws + t0)[0] = make_float4(y[0], y[1], y[2], y[3]);
    reinterpret_cast<float4*>(ws + t0)[1] = make_float4(y[4], y[5], y[6], y[7]);
  } else {
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j)
      if (t0 + j < L) ws[t0 + j] = y[j];
  }
}

// Whether the forward's z is given: known to the compiler (the unidirectional kernel, one instantiation each: the
// gate's code and the store of y for dz, present but not run, made it 3-6% slower without z; H100, bf16, global XL
// 0.230 vs 0.238 ms, long 0.571 vs 0.605) or checked at run time (kPassBiFwd: its kernel without z compiled to 68 B
// of spills, the bidirectional forward 0.505 ms at global XL against 0.478 with the check; NOTES.md, session 18).
enum LanesZ : int { kZNo = 0, kZYes = 1, kZRuntime = 2 };
// LANES_BIFWD_ZT (default on; 0 for A/B runs): kPassBiFwd instantiated with and without z (kZYes / kZNo), as the
// unidirectional kernel, instead of kZRuntime. With the staged B/C its kernel without z spilled 164 B under
// kZRuntime, 84 B so: bidirectional forward at global XL 0.488 -> 0.460 ms, long 1.131 -> 1.057 (H100, bf16, one
// call, same file as LANES_PA_EXP). Before the staging (session 18) the same split had spilled more and lost.
#ifndef LANES_BIFWD_ZT
#define LANES_BIFWD_ZT 1
#endif

struct LanesScalars {
  float bias, Dv, scale;  // delta_bias, D of the channel; 0.5 for divide_out (bidirectional), else 1
  bool softplus;
  int mode;
};

// A forward window's y (D u included) for this lane's 8 steps from t0: to the scratch (kToWs), or plus the other
// direction's (kAddWs; on full windows `ws_early` holds it, loaded during the window), halved with divide_out, gated
// by silu(z) (y before the gate saved for the backward's dz when asked) and stored. Z: kZNo / kZYes / kZRuntime.
template <bool FULL, int Z, typename T>
__device__ __forceinline__ void fwd_finish8(const LanesRows<T>& r, int t0, int L, const LanesScalars& c,
                                            float (&y)[kLanesSteps], const float4* ws_early) {
  if (c.mode == kToWs) {
    ws_store8<FULL>(r.ws, t0, L, y);
    return;
  }
  if (c.mode == kAddWs) {
    if (FULL && ws_early) {
      y[0] += ws_early[0].x, y[1] += ws_early[0].y, y[2] += ws_early[0].z, y[3] += ws_early[0].w;
      y[4] += ws_early[1].x, y[5] += ws_early[1].y, y[6] += ws_early[1].z, y[7] += ws_early[1].w;
    } else {
      ws_add8<FULL>(r.ws, t0, L, y);
    }
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) y[j] *= c.scale;
  }
  if (Z == kZYes || (Z == kZRuntime && r.z)) {
    if (r.ys) store8<FULL>(r.ys, t0, L, y);
    float zz[kLanesSteps];
    load8<FULL>(r.z, t0, L, zz);
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) y[j] *= zz[j] * fast_sigmoid(zz[j]);
  }
  store8<FULL>(r.out, t0, L, y);
}

// LANES_PA_EXP (default on; 0 for A/B runs): a lane's decay over its steps, pa = prod_j exp2(d_j A2), as one
// exp2(A2 sum_j d_j): one FMUL and one MUFU a state instead of 7 FMULs (forward loop 2,121 -> 2,049 instructions a
// window), one rounding instead of 8. H100, bf16, fwd / fwd+bwd ms, one call: global XL 0.223 / 0.923 -> 0.217 /
// 0.912, long 0.502 / 2.168 -> 0.491 / 2.136 (benchmarks/results/cuda-lanes-variants-...-5026acb-bst-pa-zt.json).
#ifndef LANES_PA_EXP
#define LANES_PA_EXP 1
#endif

__device__ __forceinline__ float lane_dsum(const float (&dt)[kLanesSteps]) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) s += dt[j];
  return s;
}

// A window's per-step inputs: u, d (softplus, zero beyond L), d*u, the lane's sum of d; the B/C loads of the first
// kLanesAhead states.
template <bool FULL, bool EXACT, typename T, int NMAX>
__device__ __forceinline__ void window_begin(const LanesRows<T>& r, int t0, int L, int N, const LanesScalars& c,
                                             float (&uu)[kLanesSteps], float (&dt)[kLanesSteps],
                                             float (&du)[kLanesSteps], float& sdt, Raw8<T> (&rb)[NMAX],
                                             Raw8<T> (&rc)[NMAX]) {
#pragma unroll
  for (int k = 0; k < kLanesAhead && k < NMAX; ++k)
    rb[k] = ld8_state<FULL, EXACT>(r.B, k, N, t0, L, r.bc_stride),
    rc[k] = ld8_state<FULL, EXACT>(r.C, k, N, t0, L, r.bc_stride);
  load8<FULL>(r.u, t0, L, uu);
  load8<FULL>(r.delta, t0, L, dt);
  lanes_delta<FULL>(dt, c.bias, c.softplus, t0, L);
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) du[j] = dt[j] * uu[j];
  sdt = LANES_PA_EXP ? lane_dsum(dt) : 0.f;
}

// State n of a window: the B/C loads of state n + kLanesAhead issued, n's B/C unpacked, a = exp2(d A2) and the
// lane's affine map (pa, xa) of its steps in scan order.
template <bool REV, bool FULL, bool EXACT, typename T, int NMAX>
__device__ __forceinline__ void state_begin(const LanesRows<T>& r, int n, int t0, int L, int N, float A2,
                                            Raw8<T> (&rb)[NMAX], Raw8<T> (&rc)[NMAX], const float (&dt)[kLanesSteps],
                                            const float (&du)[kLanesSteps], float sdt, float (&Bv)[kLanesSteps],
                                            float (&Cv)[kLanesSteps], float (&a)[kLanesSteps], float& pa, float& xa) {
  if (n + kLanesAhead < NMAX)
    rb[n + kLanesAhead] = ld8_state<FULL, EXACT>(r.B, n + kLanesAhead, N, t0, L, r.bc_stride),
    rc[n + kLanesAhead] = ld8_state<FULL, EXACT>(r.C, n + kLanesAhead, N, t0, L, r.bc_stride);
  unpack8(rb[n], Bv);
  unpack8(rc[n], Cv);
  pa = LANES_PA_EXP ? fast_exp2(sdt * A2) : 1.f, xa = 0.f;
#pragma unroll
  for (int k = 0; k < kLanesSteps; ++k) {
    const int j = Order<REV>::step(k);
    a[j] = fast_exp2(dt[j] * A2);
    xa = fmaf(a[j], xa, du[j] * Bv[j]);
    if (!LANES_PA_EXP) pa *= a[j];
  }
}

// One forward window. A2_l / h_l: lane n holds state n's A*log2(e) and carry. Z: whether z is given, known to the
// compiler or not (see LanesZ).
template <bool REV, bool FULL, bool EXACT, typename T, int NMAX, int Z>
__device__ __forceinline__ void fwd_window(const LanesRows<T>& r, int t0, int L, int N, int lane,
                                           const LanesScalars& c, float A2_l, float& h_l LANES_PROBE_PARAM) {
  using O = Order<REV>;
  LANES_PROBE_START();
  float uu[kLanesSteps], dt[kLanesSteps], du[kLanesSteps], y[kLanesSteps], sdt;
  Raw8<T> rb[NMAX], rc[NMAX];
  window_begin<FULL, EXACT>(r, t0, L, N, c, uu, dt, du, sdt, rb, rc);
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) y[j] = c.Dv * uu[j];
  float4 wse[2];  // the other direction's y (kAddWs), loaded LANES_WS_AHEAD states before the window's end
  LANES_PROBE(kProbeFwdWinBegin);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    float Bv[kLanesSteps], Cv[kLanesSteps], a[kLanesSteps], pa, xa;
    state_begin<REV, FULL, EXACT>(r, n, t0, L, N, __shfl_sync(kFull, A2_l, n), rb, rc, dt, du, sdt, Bv, Cv, a, pa,
                                  xa);
    if (FULL && n == NMAX - LANES_WS_AHEAD && c.mode == kAddWs)
      wse[0] = reinterpret_cast<const float4*>(r.ws + t0)[0], wse[1] = reinterpret_cast<const float4*>(r.ws + t0)[1];
    float carry = __shfl_sync(kFull, h_l, n);
    LANES_PROBE(kProbeFwdStateBegin);
    float hh = lanes_state_in<REV, EXACT || !FULL || NMAX != 8>(pa, xa, carry, lane);
    h_l = lane == n ? carry : h_l;
    LANES_PROBE(kProbeFwdStateScan);
#pragma unroll
    for (int k = 0; k < kLanesSteps; ++k) {
      const int j = O::step(k);
      hh = fmaf(a[j], hh, du[j] * Bv[j]);
      y[j] = fmaf(Cv[j], hh, y[j]);
    }
    LANES_PROBE(kProbeFwdReplay);
  }
  fwd_finish8<FULL, Z>(r, t0, L, c, y, (FULL && LANES_WS_AHEAD > 0) ? wse : nullptr);
  LANES_PROBE(kProbeFwdWinEnd);
#ifdef LANES_PROBE_CLOCK
  pr.c[kProbeFwdWindows] += 1.f;
#endif
}

// The partial-window / unaligned path, kept out of line so that its registers do not count against the fast path.
// Its callers pass copies of their running values (h_l here; r_l, dA, dD, dbias to bwd_window_generic): a value whose
// address goes to a call lives in local memory for its whole life, and the fast path then stored h_l to the stack
// at every state (16 STL a window) and kept dA there. H100, bf16, fwd+bwd ms in one call: global XL 0.869 -> 0.863,
// global S 1.151 -> 1.132, bi global XL 1.752 -> 1.733, bi long 3.555 -> 3.475; forward global S 0.251 -> 0.243
// (benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-e3281be-generic-copy.json).
template <bool REV, typename T, int NMAX, int Z>
__device__ __noinline__ void fwd_window_generic(const LanesRows<T> r, int t0, int L, int N, int lane,
                                                const LanesScalars c, float A2_l, float& h_l) {
#ifdef LANES_PROBE_CLOCK
  LanesProbe pr{};  // partial windows are not counted
#endif
  fwd_window<REV, false, false, T, NMAX, Z>(r, t0, L, N, lane, c, A2_l, h_l LANES_PROBE_ARG);
}

// LANES_FWD_PAIR16 (default on): full staged windows of the 16-state forward in the pair layout (fwd_window_pair).
// Where it applies: lanes_fwd_pair below. H100, bf16, fwd / fwd+bwd ms against the 32-lane window (0) in one call,
// with LANES_PAIR_SPLIT=1 (benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-a45c21e-pair.json): global XL
// 0.176 / 0.850 -> 0.174 / 0.843, long 0.387 / 2.002 -> 0.385 / 1.990, bidirectional global XL 0.372 / 1.717 ->
// 0.361 / 1.699, bidirectional long 0.840 / 3.486 -> 0.811 / 3.442 (offline 1,780 -> 1,690 loop instructions).
#ifndef LANES_FWD_PAIR16
#define LANES_FWD_PAIR16 1
#endif
#ifndef LANES_PAIR_AHEAD  // rounds (pairs of states) whose B/C loads are in flight while one is computed
#define LANES_PAIR_AHEAD 2
#endif
// LANES_PAIR_SPLIT: a lane's 16 steps as two chains of 8 (its map composed of the halves' maps, the second half's
// replay started from its own entering state): half the dependent latency a round for 5 more instructions. Default on:
// in the call above one chain of 16 gave 0.175 / 0.849 (global XL) and 0.362 / 1.714 (bidirectional).
// Computing 2, 4 or 8 rounds together, phase by phase (maps, shuffle levels, replays; the one-warp model 3,944 ->
// 2,871 cycles at 8) gave the same times: global XL forward 0.175 -> 0.176, 0.177, 0.176, issue rate 72% -> 71% at 8
// (H100, bf16, one call: benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-81bb68a-pair-ilp.json; removed).
#ifndef LANES_PAIR_SPLIT
#define LANES_PAIR_SPLIT 1
#endif

// Where a staged row's 16-byte chunk c lies in the pair layout: chunks 8..15 and 24..31 swap neighbours, so that the
// 8 lanes of a quarter-warp reading chunks 2l (or 2l + 1) hit 8 different bank quads.
__host__ __device__ constexpr int lanes_pair_chunk(int c) { return c ^ ((c >> 3) & 1); }

template <typename T>
__device__ __forceinline__ Raw8<T> lds8(const T* p) {
  Raw8<T> r;
  r.v[0] = *reinterpret_cast<const uint4*>(p);
  return r;
}

// Two 16-byte vectors of a 16-bit dtype -> 16 floats.
template <typename T>
__device__ __forceinline__ void unpack16(const Raw8<T> (&r)[2], float (&v)[2 * kLanesSteps]) {
  static_assert(sizeof(T) == 2, "16-bit inputs");
  const uint32_t w[8] = {r[0].v[0].x, r[0].v[0].y, r[0].v[0].z, r[0].v[0].w,
                         r[1].v[0].x, r[1].v[0].y, r[1].v[0].z, r[1].v[0].w};
  unpack_words<T>(w, v);
}

// A full staged window of the 16-state forward, 16-bit inputs, in the pair layout: each half-warp scans one state
// of a pair (half h: states 2k + h, k = 0..7) over the whole window, lane l (l = lane % 16) holding steps
// 16 l .. 16 l + 15, so the cross-lane scan has 4 levels instead of 5 and its cost, the carries' shuffles and the
// state's exp2 of the summed steps are spread over twice the steps. Per state ~80 instructions a warp against ~111
// in fwd_window (counted by hand; benchmarks/cuda_sass_count.py has the compiled counts). The lane computes d, d u
// of 8 of its steps (chunk 2 l + h; the partner lane, lane ^ 16, the other 8) and they trade them: the softplus runs
// once an element, as in fwd_window. At the end the halves add their y (even and odd states) the same way, and each
// lane finishes its chunk (D u, gate, store) as fwd_finish8 does. tile: the staged window (stage_window, PAIR).
template <bool REV, typename T, int Z>
__device__ __forceinline__ void fwd_window_pair(const LanesRows<T>& r, const T* tile, int wbase, int L, int lane,
                                                const LanesScalars& c, float A2_l, float& h_l) {
  constexpr int S = 2 * kLanesSteps, kRounds = 8, kAhead = LANES_PAIR_AHEAD;
  const int h = lane >> 4, hl = lane & 15, own = 2 * hl + h;
  const int first = REV ? 15 : 0, last = REV ? 0 : 15;
  const int t0 = wbase + own * kLanesSteps;  // the lane's own chunk, in the row
  const T* urow = tile + (2 * 16 + (threadIdx.x >> 5)) * kLanesWindow;
  float u8[kLanesSteps], d8[kLanesSteps];
  unpack8(lds8(urow + lanes_pair_chunk(own) * kLanesSteps), u8);
  unpack8(lds8(urow + kLanesWarps * kLanesWindow + lanes_pair_chunk(own) * kLanesSteps), d8);
  lanes_delta<true>(d8, c.bias, c.softplus, t0, L);
  float dt[S], du[S], y[S];
  const float s8 = lane_dsum(d8), ps = __shfl_xor_sync(kFull, s8, 16);
  const float sdt = s8 + ps;
  // the summed steps of the lane's first and second 8 in scan order (LANES_PAIR_SPLIT)
  const float s_lo = h ? ps : s8, s_hi = h ? s8 : ps;
  const float sA = REV ? s_hi : s_lo, sB = REV ? s_lo : s_hi;
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) {
    const float mu = d8[j] * u8[j];
    const float pd = __shfl_xor_sync(kFull, d8[j], 16), pu = __shfl_xor_sync(kFull, mu, 16);
    dt[j] = h ? pd : d8[j], dt[kLanesSteps + j] = h ? d8[j] : pd;
    du[j] = h ? pu : mu, du[kLanesSteps + j] = h ? mu : pu;
    y[j] = 0.f, y[kLanesSteps + j] = 0.f;
  }
  // B / C rows of state 2 k + h: this lane's chunks 2 hl, 2 hl + 1
  const int o0 = lanes_pair_chunk(2 * hl) * kLanesSteps, o1 = lanes_pair_chunk(2 * hl + 1) * kLanesSteps;
  const T* bB = tile + h * kLanesWindow;
  const T* bC = bB + 16 * kLanesWindow;
  Raw8<T> rb[kRounds][2], rc[kRounds][2];
#pragma unroll
  for (int k = 0; k < kAhead; ++k)
    rb[k][0] = lds8(bB + 2 * k * kLanesWindow + o0), rb[k][1] = lds8(bB + 2 * k * kLanesWindow + o1),
    rc[k][0] = lds8(bC + 2 * k * kLanesWindow + o0), rc[k][1] = lds8(bC + 2 * k * kLanesWindow + o1);
  float4 wse[2];
#pragma unroll
  for (int k = 0; k < kRounds; ++k) {
    if (k + kAhead < kRounds) {
      const int o = 2 * (k + kAhead) * kLanesWindow;
      rb[k + kAhead][0] = lds8(bB + o + o0), rb[k + kAhead][1] = lds8(bB + o + o1);
      rc[k + kAhead][0] = lds8(bC + o + o0), rc[k + kAhead][1] = lds8(bC + o + o1);
    }
    if (k == kRounds - 2 && c.mode == kAddWs)
      wse[0] = reinterpret_cast<const float4*>(r.ws + t0)[0], wse[1] = reinterpret_cast<const float4*>(r.ws + t0)[1];
    const int n = 2 * k + h;
    const float A2 = __shfl_sync(kFull, A2_l, n);
    float Bv[S], Cv[S], a[S];
    unpack16(rb[k], Bv);
    unpack16(rc[k], Cv);
    float pa, xa = 0.f, paA = 0.f, xaA = 0.f;
    if constexpr (LANES_PAIR_SPLIT) {  // scan order: steps i < 8 are part A, the rest part B
      float xaB = 0.f;
#pragma unroll
      for (int i = 0; i < kLanesSteps; ++i) {
        const int jA = REV ? S - 1 - i : i, jB = REV ? kLanesSteps - 1 - i : kLanesSteps + i;
        a[jA] = fast_exp2(dt[jA] * A2), a[jB] = fast_exp2(dt[jB] * A2);
        xaA = fmaf(a[jA], xaA, du[jA] * Bv[jA]);
        xaB = fmaf(a[jB], xaB, du[jB] * Bv[jB]);
      }
      paA = fast_exp2(sA * A2);
      const float paB = fast_exp2(sB * A2);
      pa = paA * paB, xa = fmaf(paB, xaA, xaB);
    } else {
      pa = fast_exp2(sdt * A2);
#pragma unroll
      for (int i = 0; i < S; ++i) {
        const int j = REV ? S - 1 - i : i;
        a[j] = fast_exp2(dt[j] * A2);
        xa = fmaf(a[j], xa, du[j] * Bv[j]);
      }
    }
    const float carry = __shfl_sync(kFull, h_l, n);
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) compose_shfl<REV, 16>(pa, xa, off);
    const float h_out = fmaf(pa, carry, xa);  // the state after this lane's steps
    float hh = REV ? __shfl_down_sync(kFull, h_out, 1, 16) : __shfl_up_sync(kFull, h_out, 1, 16);
    if (hl == first) hh = carry;
    const float next = __shfl_sync(kFull, h_out, 16 * (lane & 1) + last);  // lanes 2k, 2k + 1: states 2k, 2k + 1
    h_l = (lane >> 1) == k ? next : h_l;
    if constexpr (LANES_PAIR_SPLIT) {
      float hB = fmaf(paA, hh, xaA);  // the state entering part B
#pragma unroll
      for (int i = 0; i < kLanesSteps; ++i) {
        const int jA = REV ? S - 1 - i : i, jB = REV ? kLanesSteps - 1 - i : kLanesSteps + i;
        hh = fmaf(a[jA], hh, du[jA] * Bv[jA]);
        hB = fmaf(a[jB], hB, du[jB] * Bv[jB]);
        y[jA] = fmaf(Cv[jA], hh, y[jA]);
        y[jB] = fmaf(Cv[jB], hB, y[jB]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < S; ++i) {
        const int j = REV ? S - 1 - i : i;
        hh = fmaf(a[j], hh, du[j] * Bv[j]);
        y[j] = fmaf(Cv[j], hh, y[j]);
      }
    }
  }
  float y8[kLanesSteps];  // this lane's chunk: its half's states plus the partner's
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) {
    const float keep = h ? y[kLanesSteps + j] : y[j], send = h ? y[j] : y[kLanesSteps + j];
    y8[j] = fmaf(c.Dv, u8[j], keep + __shfl_xor_sync(kFull, send, 16));
  }
  fwd_finish8<true, Z>(r, t0, L, c, y8, LANES_WS_AHEAD > 0 ? wse : nullptr);
}

// LANES_FWD_STAGE (default on): the forward's B/C windows staged in shared memory by the block. A block's 4 warps
// (channels of one B/C group) read the same B/C rows, each from L1, whose misses (L2 hits) were exposed: a probe
// reading row 0 for every state (LANES_PROBE_BC_ROW0: always L1 hits) ran global XL at 0.197 ms against 0.230 (H100,
// bf16; benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-94b7beb-bc-row0-probe.json), and L1 prefetches
// of the next window did not recover it (slower at global XL: ...-94b7beb-prefetch*.json). Here the block copies the
// next window's rows (2 x NMAX x 256 elements) with cp.async (L2 only, no registers) while it computes the current
// one, double-buffered, one barrier a window; the warps read theirs from shared memory. (LANES_FWD_STAGE and where
// it applies, lanes_fwd_stages_dir: selective_scan.h.) Staging fp32 copies of 16-bit B/C instead (no unpacking in
// the warps: 14% fewer instructions a window) lost: global XL forward 0.199 -> 0.265 ms in window order, 0.381 with
// the rows in conflict-free halves (H100, bf16; benchmarks/results/cuda-lanes-variants-...-75353e0-stage-f32.json,
// ...-ba95c22-stage-f32-halves.json).

// LANES_FWD_STAGE_UD (default on): the window's u and delta rows of the block's 4 channels staged too (8 more rows a
// window), so that a window starts on shared-memory loads, not on the global ones that all 4 warps of a block issue at
// once after the barrier: global XL 0.199 / 0.896 -> 0.188 / 0.880 ms, bi 0.407 / 1.797 -> 0.385 / 1.774, long
// 0.441 -> 0.411 forward (H100, bf16, one call: benchmarks/results/cuda-lanes-variants-...-42bee73-ud-ahead2.json).
// 16-bit inputs only (fp32's 80 KB a block would leave 2 blocks an SM). Three buffers (the copy of window i + 2
// issued at window i's barrier) did not help, with or without it (same file: 0.197 / 0.889, bi 0.413 / 1.809;
// removed).
#ifndef LANES_FWD_STAGE_UD
#define LANES_FWD_STAGE_UD 1
#endif
template <typename T>
__host__ __device__ constexpr bool lanes_stage_ud() {
  return LANES_FWD_STAGE_UD && sizeof(T) == 2;
}

// Elements of one staged window: B's and C's rows, then (lanes_stage_ud) u's and delta's of the block's channels.
template <typename T, int NMAX>
__host__ __device__ constexpr int lanes_stage_tile() {
  return (2 * NMAX + (lanes_stage_ud<T>() ? 2 * kLanesWarps : 0)) * kLanesWindow;
}

template <typename T, int NMAX>
__host__ __device__ constexpr int lanes_stage_bytes() {
  return 2 * lanes_stage_tile<T, NMAX>() * (int)sizeof(T);  // double-buffered
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(smem)),
               "l"(__cvta_generic_to_global(gmem))
               : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
#endif
}

// The block copies window w's B and C rows (full, 16-byte aligned) into `tile`: rows of kLanesWindow elements, B's
// NMAX rows then C's. Thread t copies 16-byte chunk t % kPerRow of rows t / kPerRow + k kRowStep (k = 0, 1, ..):
// whether a row is B's or C's is known to the compiler, one address computation a chunk (the per-chunk row and
// column arithmetic it replaced cost 85 instructions a window in the forward's loop and ~7% of its time: H100, bf16,
// global XL 0.216 -> 0.200 ms, across two calls: cuda-lanes-variants-...-5026acb-bst-pa-zt.json, ...-75353e0-*.json).
// PAIR: 16-byte chunk c of a row lands at lanes_pair_chunk(c) (fwd_window_pair's conflict-free reads).
template <int NMAX, bool PAIR = false, typename T>
__device__ __forceinline__ void stage_bc_window(const T* B, const T* C, int w, int L, T* tile) {
  constexpr int kPerRow = kLanesWindow * (int)sizeof(T) / 16, kElems = 16 / (int)sizeof(T);
  constexpr int kThreads = kLanesWarps * 32, kRowStep = kThreads / kPerRow;
  static_assert(kThreads % kPerRow == 0 && NMAX % kRowStep == 0, "whole rows a pass of the block");
  const int row0 = threadIdx.x / kPerRow, chunk = threadIdx.x % kPerRow, col = chunk * kElems;
  const size_t off = (size_t)row0 * L + (size_t)w * kLanesWindow + col;
  T* dst = tile + row0 * kLanesWindow + (PAIR ? lanes_pair_chunk(chunk) * kElems : col);
#pragma unroll
  for (int rk = 0; rk < 2 * NMAX; rk += kRowStep)
    cp_async16(dst + rk * kLanesWindow, (rk < NMAX ? B + (size_t)rk * L : C + (size_t)(rk - NMAX) * L) + off);
}

// Window w's rows staged by the block: B's and C's, and with UD (lanes_stage_ud) u's and delta's of its 4 channels
// (rows L apart from the block's first channel, this warp's (threadIdx.x / 32) rows before its own). (The rows as
// pointers: a LanesRows reference here changed the default kernels' register allocation.)
template <int NMAX, bool UD, bool PAIR = false, typename T>
__device__ __forceinline__ void stage_window(const T* B, const T* C, const T* u, const T* delta, int w, int L,
                                             T* tile) {
  stage_bc_window<NMAX, PAIR>(B, C, w, L, tile);
  if constexpr (UD) {
    const size_t warp = threadIdx.x >> 5;
    stage_bc_window<kLanesWarps, PAIR>(u - warp * L, delta - warp * L, w, L, tile + 2 * NMAX * kLanesWindow);
  }
}

// One direction of the forward over the whole row: windows in scan order, the state entering each saved.
// STAGE: B/C windows staged in `stage`, the block's shared memory (lanes_stage_bytes; every warp of the block alive,
// in one B/C group, p.lanes_vec).
template <bool REV, bool EXACT, typename T, int NMAX, int Z, bool STAGE>
__device__ __forceinline__ void fwd_direction(const ScanParams& p, int d, int b, int chan, int lane, int mode,
                                              T* stage) {
  const DirParams& dp = p.dir[d];
  const int L = p.L, N = p.N;
  const size_t row = (size_t)b * p.dim + chan;
  const LanesRows<T> rows = lanes_rows<T>(p, d, b, chan);
  const int nwin = (L + kLanesWindow - 1) / kLanesWindow;
  const int nsave = (nwin + kLanesStateStride - 1) / kLanesStateStride;
  float* __restrict__ states = dp.states ? dp.states + row * kept_slots(nsave) * N : nullptr;
  const float A2_l = lane < N ? dp.A[(size_t)chan * N + lane] * kLog2e : 0.f;
  float h_l = (lane < N && p.initial_state && !p.bidirectional) ? p.initial_state[row * N + lane] : 0.f;
  const LanesScalars c{dp.delta_bias ? dp.delta_bias[chan] : 0.f, dp.D ? dp.D[chan] : 0.f,
                       p.divide_out ? 0.5f : 1.f, (bool)p.delta_softplus, mode};
#ifdef LANES_PROBE_CLOCK
  LanesProbe pr{};
#endif
  constexpr int kTile = lanes_stage_tile<T, NMAX>();  // elements of a staged window
  const int nfull = p.lanes_vec ? L / kLanesWindow : 0;  // windows 0 .. nfull-1 are full
  // window i in scan order: REV ? nwin - 1 - i : i, staged in buffer i & 1 when full
  constexpr bool kUD = lanes_stage_ud<T>();
  constexpr bool kPair = LANES_FWD_PAIR16 && STAGE && EXACT && NMAX == 16 && kUD && sizeof(T) == 2;
  if constexpr (STAGE) {
    if ((REV ? nwin - 1 : 0) < nfull)
      stage_window<NMAX, kUD, kPair>(rows.B, rows.C, rows.u, rows.delta, REV ? nwin - 1 : 0, L, stage);
  }
  for (int i = 0; i < nwin; ++i) {
    const int w = REV ? nwin - 1 - i : i;
    const int t0 = w * kLanesWindow + lane * kLanesSteps;
    if constexpr (STAGE) {   // window w's copy landed and every warp is done with window i - 1's
      cp_async_wait_all();  // buffer: refill it
#ifndef LANES_PROBE_FWD_NO_BARRIER  // timing probe only (races: wrong results): what the window barrier costs
      __syncthreads();
#endif
      const int wn = REV ? w - 1 : w + 1;
#ifndef LANES_PROBE_FWD_NO_COPY  // timing probe only (stale rows: wrong results): what the staging copies cost
      if (i + 1 < nwin && wn < nfull)
        stage_window<NMAX, kUD, kPair>(rows.B, rows.C, rows.u, rows.delta, wn, L, stage + ((i + 1) & 1) * kTile);
#endif
    }
    if (states && lane < N && i > 0 && lanes_saves_state(w, nwin, REV))  // i = 0: the first slot (kept_slots)
      states[(size_t)saved_index(w / kLanesStateStride, REV ? nsave - 1 : 0) * N + lane] = h_l;
    if (w >= nfull) {
      float h = h_l;  // a copy to the out-of-line call (fwd_window_generic's note)
      fwd_window_generic<REV, T, NMAX, Z>(rows, t0, L, N, lane, c, A2_l, h);
      h_l = h;
    } else if constexpr (kPair) {
      fwd_window_pair<REV, T, Z>(rows, stage + (i & 1) * kTile, w * kLanesWindow, L, lane, c, A2_l, h_l);
    } else if constexpr (STAGE) {
      LanesRows<T> sr = rows;  // B/C rows of window w from shared memory, indexed by t0 as in global memory
      sr.B = stage + (i & 1) * kTile - (size_t)w * kLanesWindow;
      sr.C = sr.B + NMAX * kLanesWindow;
      sr.bc_stride = kLanesWindow;
      if constexpr (kUD) {  // this warp's u / delta rows, indexed by t0 too
        sr.u = sr.B + (2 * NMAX + (threadIdx.x >> 5)) * kLanesWindow;
        sr.delta = sr.u + kLanesWarps * kLanesWindow;
      }
      fwd_window<REV, true, EXACT, T, NMAX, Z>(sr, t0, L, N, lane, c, A2_l, h_l LANES_PROBE_ARG);
    } else {
      fwd_window<REV, true, EXACT, T, NMAX, Z>(rows, t0, L, N, lane, c, A2_l, h_l LANES_PROBE_ARG);
    }
  }
#ifdef LANES_PROBE_CLOCK
  h_l = 0.f;  // lane k: its phase k
#pragma unroll
  for (int k = 0; k < 16; ++k) h_l = lane == k ? pr.c[k] : h_l;
#endif
  if (p.last_state && lane < N) p.last_state[row * N + lane] = h_l;
}

// Bidirectional: two launches on one stream, the backward direction (kPassBiRev: its y into ws), then the forward one
// (kPassBiFwd: adds it, gates and stores out). Z: z given (kPassBiRev never gates; kPassBiFwd checks at run time
// with LANES_BIFWD_ZT=0).
// STAGE: B/C windows staged in shared memory (LANES_FWD_STAGE; lanes_fwd_stages says where).
template <typename T, int NMAX, bool EXACT, int PASS, bool Z, bool STAGE>
__global__ void __launch_bounds__(kLanesWarps * 32, LANES_FWD_MINB) scan_fwd_lanes_kernel(const ScanParams p) {
  const int lane = threadIdx.x & 31;
  const int chan = blockIdx.y * kLanesWarps + (threadIdx.x >> 5);
  const int b = blockIdx.x;  // batch rows first: warps running together add dB/dC into different rows
  if (chan >= p.dim) return;  // a whole warp; only when !STAGE (block barriers)
  T* stage = nullptr;
  if constexpr (STAGE) {
    extern __shared__ uint4 s_stage[];
    stage = reinterpret_cast<T*>(s_stage);
  }
  if constexpr (PASS == kPassBiRev)
    fwd_direction<true, EXACT, T, NMAX, kZNo, STAGE>(p, 1, b, chan, lane, kToWs, stage);
  else if constexpr (PASS == kPassBiFwd)
    fwd_direction<false, EXACT, T, NMAX, LANES_BIFWD_ZT ? (Z ? kZYes : kZNo) : kZRuntime, STAGE>(p, 0, b, chan, lane,
                                                                                            kAddWs, stage);
  else
    fwd_direction<false, EXACT, T, NMAX, Z ? kZYes : kZNo, STAGE>(p, 0, b, chan, lane, kUni, stage);
}

// Whether a forward pass stages B/C (every warp of each block alive and in one B/C group of the direction it scans,
// aligned rows; the N = 16 and N = 8 kernels without row masks).
template <bool EXACT, int PASS>
bool lanes_fwd_stages(const ScanParams& p) {
  return EXACT && lanes_fwd_stages_dir(p, PASS == kPassBiRev ? 1 : 0);
}

template <typename T, int NMAX, bool EXACT, int PASS, bool Z>
cudaError_t launch_fwd_lanes(const ScanParams& p, dim3 grid, cudaStream_t stream) {
  if constexpr (EXACT && LANES_FWD_STAGE) {
    if (lanes_fwd_stages<EXACT, PASS>(p)) {
      constexpr int smem = lanes_stage_bytes<T, NMAX>();
      auto kernel = scan_fwd_lanes_kernel<T, NMAX, EXACT, PASS, Z, true>;
      if constexpr (smem > 48 * 1024) {
        static bool opted_in[64] = {};  // once per instantiation and device
        int dev = 0;
        cudaGetDevice(&dev);
        if (dev >= 64 || !opted_in[dev]) {
          const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
          if (e != cudaSuccess) return e;
          if (dev < 64) opted_in[dev] = true;
        }
      }
      kernel<<<grid, kLanesWarps * 32, smem, stream>>>(p);
      return cudaGetLastError();
    }
  }
  scan_fwd_lanes_kernel<T, NMAX, EXACT, PASS, Z, false><<<grid, kLanesWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// A lane's states h over its steps in scan order from hh, the state entering it.
template <bool REV>
__device__ __forceinline__ void bwd_replay(float hh, const float (&a)[kLanesSteps], const float (&du)[kLanesSteps],
                                           const float (&Bv)[kLanesSteps], float (&h)[kLanesSteps]) {
#pragma unroll
  for (int k = 0; k < kLanesSteps; ++k) {
    const int j = Order<REV>::step(k);
    hh = fmaf(a[j], hh, du[j] * Bv[j]);
    h[j] = hh;
  }
}

// A backward window's per-step values besides those of window_begin: dy (gated by silu(z), times the output scale)
// and the per-step sums over the states zeroed; with z, dz from the forward's saved pre-gate y (the backward
// direction of the bidirectional scan, kToWs, leaves dz to the forward one).
template <bool FULL, typename T>
__device__ __forceinline__ void bwd_dy(const LanesRows<T>& r, int t0, int L, const LanesScalars& c,
                                       float (&dy)[kLanesSteps], float (&sgB)[kLanesSteps],
                                       float (&ddt)[kLanesSteps]) {
  load8<FULL>(r.dout, t0, L, dy);
  if (r.z) {
    float zz[kLanesSteps], ys[kLanesSteps], dzv[kLanesSteps];
    load8<FULL>(r.z, t0, L, zz);
    const bool dz = c.mode != kToWs;
    if (dz) load8<FULL>(r.ys_in, t0, L, ys);
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) {
      const float sg = fast_sigmoid(zz[j]);
      if (dz) dzv[j] = dy[j] * ys[j] * sg * (1.f + zz[j] * (1.f - sg));
      dy[j] *= zz[j] * sg;
    }
    if (dz) store8<FULL>(r.dz, t0, L, dzv);
  }
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) {
    dy[j] *= c.scale;
    sgB[j] = 0.f, ddt[j] = 0.f;
  }
}

// State n's gradients over the lane's steps, from its states h and gg = a g entering the lane's last step in scan
// order; dB/dC added to the partial sums (through the block's shared memory on full windows with N = 16). Returns
// the lane's part of dA_n.
template <bool REV, bool FULL, bool EXACT, typename T, int NMAX>
__device__ __forceinline__ float bwd_state_grads(const LanesRows<T>& r, int n, int t0, int L, int N, int lane, float An,
                                                float gg, const float (&a)[kLanesSteps],
                                                const float (&h)[kLanesSteps], const float (&Bv)[kLanesSteps],
                                                const float (&Cv)[kLanesSteps], const float (&dt)[kLanesSteps],
                                                const float (&du)[kLanesSteps], const float (&dy)[kLanesSteps],
                                                float (&sgB)[kLanesSteps], float (&ddt)[kLanesSteps], float* xch,
                                                float* bxch LANES_PROBE_PARAM) {
  using O = Order<REV>;
  float dBv[kLanesSteps], dCv[kLanesSteps], dAl = 0.f;
#pragma unroll
  for (int k = kLanesSteps - 1; k >= 0; --k) {
    const int j = O::step(k);
    gg = fmaf(Cv[j], dy[j], gg);  // g_j
    dCv[j] = dy[j] * h[j];
    dBv[j] = gg * du[j];
    sgB[j] = fmaf(gg, Bv[j], sgB[j]);
    const float ghx = gg * (h[j] - du[j] * Bv[j]);  // g_j a_j h_(previous step)
    ddt[j] = fmaf(An, ghx, ddt[j]);
    dAl = fmaf(dt[j], ghx, dAl);
    if (k > 0) gg *= a[j];  // a_j g_j: what the previous step receives
  }
  LANES_PROBE(kProbeGrads);
  if (LANES_BLOCK_REDUCE && FULL && EXACT && bxch) {
    constexpr int K = kLanesStatesPerBarrier;
    const int k = n % K;
    float* slots = bxch + ((n / K) & 1) * (K * kLanesSlot);
    block_stage(dBv, dCv, slots + k * kLanesSlot);
    LANES_PROBE(kProbeStage);
    if (k == K - 1 || n == NMAX - 1) {
#ifndef LANES_PROBE_NO_BARRIER  // timing probe only (races: wrong dB/dC): what the barrier's waits cost
      __syncthreads();
#endif
      LANES_PROBE(kProbeBarrier);
#pragma unroll
      for (int i = 0; i <= k; ++i)
        block_flush(r.dB + (size_t)(n - k + i) * L, r.dC + (size_t)(n - k + i) * L, t0 - lane * kLanesSteps,
                    slots + i * kLanesSlot);
      LANES_PROBE(kProbeFlush);
    }
  } else if (n < N) {
    atomic_add8<FULL>(r.dB + (size_t)n * L, t0, lane, L, dBv, xch);
    atomic_add8<FULL>(r.dC + (size_t)n * L, t0, lane, L, dCv, xch + kLanesWindow);
  }
  return dAl;
}

// A backward window's end: du, ddelta stored, dD / dbias summed.
template <bool FULL, typename T>
__device__ __forceinline__ void bwd_window_end(const LanesRows<T>& r, int t0, int L, const LanesScalars& c,
                                               const float (&uu)[kLanesSteps], const float (&dt)[kLanesSteps],
                                               const float (&dy)[kLanesSteps], const float (&sgB)[kLanesSteps],
                                               const float (&ddt)[kLanesSteps], float& dD, float& dbias) {
  float du_o[kLanesSteps], dd_o[kLanesSteps];
  float raw[kLanesSteps];
  load8<FULL>(r.delta, t0, L, raw);
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) {
    const float sig = c.softplus ? fast_sigmoid(raw[j] + c.bias) : 1.f;  // d softplus / dx
    du_o[j] = fmaf(dt[j], sgB[j], c.Dv * dy[j]);
    dd_o[j] = (FULL || t0 + j < L) ? fmaf(uu[j], sgB[j], ddt[j]) * sig : 0.f;
    dD = fmaf(dy[j], uu[j], dD);
    dbias += dd_o[j];
  }
  store8<FULL>(r.du, t0, L, du_o);
  store8<FULL>(r.ddelta, t0, L, dd_o);
}

// dA over the warp, kept in one register a lane: the per-lane partials v of states 4 i .. 4 i + 3 (group i) are summed
// over the lanes (a reduce-scatter: 6 shuffles) and state 4 i + m added in lane 8 m + i (dA_lane reads it back).
// Replaced an array dA[NMAX] of per-lane partials: the smem-scan backward's group loop (LANES_BWD_ROLL) indexes its
// states at run time, so that array lived in local memory, one LDL / STL pair a state whose latency was the kernel's
// largest stall (16% of the warp samples; Nsight Compute, H100, global XL, csrc/selective_scan/NOTES.md "Session 25").
__device__ __forceinline__ void dA_fold4(float& acc, const float (&v)[4], int i, int lane) {
  const bool hi = lane & 16, b3 = lane & 8;
  float k0 = hi ? v[2] : v[0], k1 = hi ? v[3] : v[1];
  k0 += __shfl_xor_sync(kFull, hi ? v[0] : v[2], 16);
  k1 += __shfl_xor_sync(kFull, hi ? v[1] : v[3], 16);
  float k = b3 ? k1 : k0;
  k += __shfl_xor_sync(kFull, b3 ? k0 : k1, 8);
#pragma unroll
  for (int off = 4; off > 0; off >>= 1) k += __shfl_xor_sync(kFull, k, off);
  acc += (lane & 7) == i ? k : 0.f;
}

// Every group of an array of per-lane partials dA[NMAX] folded into acc.
template <int NMAX>
__device__ __forceinline__ void dA_fold(float& acc, const float (&dA)[NMAX], int lane) {
  static_assert(NMAX % 4 == 0 && NMAX <= 32, "groups of 4 states, at most 8");
#pragma unroll
  for (int g = 0; g < NMAX / 4; ++g) {
    const float v[4] = {dA[4 * g], dA[4 * g + 1], dA[4 * g + 2], dA[4 * g + 3]};
    dA_fold4(acc, v, g, lane);
  }
}

// Lane n's dA_n from the folded accumulator (every lane must call it).
__device__ __forceinline__ float dA_lane(float acc, int lane) {
  return __shfl_sync(kFull, acc, 8 * (lane & 3) + ((lane >> 2) & 7));
}

// One backward window. A_l / h0_l / r_l: lane n holds state n's A, the saved state entering the window and the
// adjoint carry r entering from the window after it in scan order (left as the one for the window before);
// dA_acc: dA over the warp so far (dA_fold4).
template <bool REV, bool FULL, bool EXACT, typename T, int NMAX>
__device__ __forceinline__ void bwd_window(const LanesRows<T>& r, int t0, int L, int N, int lane,
                                           const LanesScalars& c, float A_l, float h0_l, float& r_l,
                                           float& dA_acc, float& dD, float& dbias, float* xch,
                                           float* bxch LANES_PROBE_PARAM) {
  using O = Order<REV>;
  LANES_PROBE_START();
  float uu[kLanesSteps], dt[kLanesSteps], du[kLanesSteps], dy[kLanesSteps], sdt, dA[NMAX];
  float sgB[kLanesSteps], ddt[kLanesSteps];
  Raw8<T> rb[NMAX], rc[NMAX];
  window_begin<FULL, EXACT>(r, t0, L, N, c, uu, dt, du, sdt, rb, rc);
  bwd_dy<FULL>(r, t0, L, c, dy, sgB, ddt);
  LANES_PROBE(kProbeWinBegin);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    const float An = __shfl_sync(kFull, A_l, n);
    float Bv[kLanesSteps], Cv[kLanesSteps], a[kLanesSteps], h[kLanesSteps], pa, xa;
    // forward: the states of the window
    state_begin<REV, FULL, EXACT>(r, n, t0, L, N, An * kLog2e, rb, rc, dt, du, sdt, Bv, Cv, a, pa, xa);
    float h0 = __shfl_sync(kFull, h0_l, n);
    LANES_PROBE(kProbeStateBegin);
    float hh = lanes_state_in<REV>(pa, xa, h0, lane);
    LANES_PROBE(kProbeStateScan);
    bwd_replay<REV>(hh, a, du, Bv, h);
    LANES_PROBE(kProbeReplay);
    // adjoint, against scan order: g_j = C_j dy_j + a_{j'} g_{j'} (j' the next step in scan order); after the lane's
    // last step that is the next lane's first one (for the last lane r holds a g already)
    constexpr int j_first = O::step(0), j_last = O::step(kLanesSteps - 1);
    float a_next = O::next(a[j_first], 1);
    if (lane == O::last) a_next = 1.f;
    float s = Cv[j_last] * dy[j_last], q = a_next;
#pragma unroll
    for (int k = kLanesSteps - 2; k >= 0; --k) {
      const int j = O::step(k), jn = O::step(k + 1);
      s = fmaf(a[jn], s, Cv[j] * dy[j]);
      q *= a[jn];
    }
    LANES_PROBE(kProbeAdjMaps);
    float g0;
    float gg = lanes_adjoint_in<REV>(q, s, __shfl_sync(kFull, r_l, n), lane, g0) * a_next;
    g0 = __shfl_sync(kFull, a[j_first] * g0, O::first);  // a g at the window's first step: the next window's r
    r_l = lane == n ? g0 : r_l;
    LANES_PROBE(kProbeAdjScan);
    dA[n] = bwd_state_grads<REV, FULL, EXACT, T, NMAX>(r, n, t0, L, N, lane, An, gg, a, h, Bv, Cv, dt, du, dy, sgB,
                                                        ddt, xch, bxch LANES_PROBE_ARG);
  }
  dA_fold(dA_acc, dA, lane);
  bwd_window_end<FULL>(r, t0, L, c, uu, dt, dy, sgB, ddt, dD, dbias);
  LANES_PROBE(kProbeWinEnd);
#ifdef LANES_PROBE_CLOCK
  pr.c[kProbeWindows] += 1.f;
#endif
}

// ---- The backward with the cross-lane scans through shared memory (LANES_SMEM_SCAN, default on) ----
// bwd_window runs, per state, two chains of dependent shuffles (the state scan and the adjoint scan across the lanes,
// 7 shuffles each). Here the states go in groups of kScanGroup: (1) every lane computes its decays (kept in shared
// memory), its forward map (pa, xa: h -> pa h + xa over its steps in scan order) and its adjoint map (pa, sa:
// R -> pa R + sa, from R = a g entering its last step to the R leaving its first), (2) the warp scans both for all the
// group's states at once, thread (m, s) composing state m's maps over the kScanGroup lanes of segment s and the
// segments joined by shuffles, into the state and the R entering every lane, (3) every lane replays its states from
// there and computes the gradients (bwd_state_grads). The replay's B/C are loaded again before (2), in flight during
// it (L1 hits mostly). H100, bf16, fwd+bwd ms against bwd_window in one call (benchmarks/results/cuda-lanes-variants-
// NVIDIA-H100-80GB-HBM3-ecfb245-smem-scan.json): global XL 1.042 -> 0.951, long 2.563 -> 2.325, bidirectional
// global XL 2.136 -> 1.954. The forward done the same way was slower (0.272 vs 0.232 ms at global XL: its shuffle
// chains overlap across states already; csrc/selective_scan/NOTES.md, session 17).
#ifndef LANES_SMEM_SCAN
#define LANES_SMEM_SCAN 1
#endif
constexpr int kScanGroup = 4;                // states a group; also the lanes a segment
constexpr int kScanSegs = 32 / kScanGroup;  // segments of lanes
constexpr int kHinStride = 32 + 4;          // floats a state row of the values entering the lanes (padded)
struct LanesBwdScanSmem {  // one warp's
  float4 a[kScanGroup][2][32];
  float4 maps[kScanGroup][33];  // (pa, xa, sa, -) a lane; padded: the scan's 16-byte reads are conflict-free
  float hin[kScanGroup][kHinStride];
  float rin[kScanGroup][kHinStride];
};
// The backward kernel's static shared memory a warp for the scan (floats; xch is separate: the dB/dC atomics of full
// windows without the block reduction use it while the scan's is live).
constexpr int kLanesBwdScanFloats = LANES_SMEM_SCAN ? (int)(sizeof(LanesBwdScanSmem) / 4) : 0;

// Phase (2) of a group (states g0 .. g0 + kScanGroup - 1): the state entering every lane (from h0_l, lane n: the saved
// state n entering the window) to sm.hin, the R entering every lane (from r_l, lane n: state n's carry) to sm.rin;
// r_l of the group's states becomes the R leaving the window's first lane (the window before's carry).
template <bool REV>
__device__ __forceinline__ void group_scan_bwd(LanesBwdScanSmem& sm, int g0, int lane, float h0_l, float& r_l) {
  constexpr int G = kScanGroup;
  const int m = lane % G, sg = lane / G;
  const int sp = REV ? kScanSegs - 1 - sg : sg;  // the segment's physical lanes: G sp .. G sp + G - 1
  float P[G], X[G], S[G];
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const float4 v = sm.maps[m][G * sp + i];
    P[i] = v.x, X[i] = v.y, S[i] = v.z;
  }
  float Pf = 1.f, Xf = 0.f, Sb = 0.f;
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const int k = REV ? G - 1 - i : i;  // scan order
    Xf = fmaf(P[k], Xf, X[k]);
    Pf *= P[k];
    const int kb = REV ? i : G - 1 - i;  // against scan order
    Sb = fmaf(P[kb], Sb, S[kb]);
  }
  // inclusive prefix of the forward maps over the segments, inclusive suffix of the adjoint maps
  float Pp = Pf, Xp = Xf, Ps = Pf, Ss = Sb;
#pragma unroll
  for (int off = G; off < 32; off <<= 1) {
    compose_shfl<false>(Pp, Xp, off);
    compose_shfl<true>(Ps, Ss, off);
  }
  const float h0 = __shfl_sync(kFull, h0_l, g0 + m), r0 = __shfl_sync(kFull, r_l, g0 + m);
  const float pe = __shfl_up_sync(kFull, Pp, G), xe = __shfl_up_sync(kFull, Xp, G);
  const float pn = __shfl_down_sync(kFull, Ps, G), sn = __shfl_down_sync(kFull, Ss, G);
  float h = sg == 0 ? h0 : fmaf(pe, h0, xe);
  float R = sg == kScanSegs - 1 ? r0 : fmaf(pn, r0, sn);
  float hv[G], rv[G];
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const int k = REV ? G - 1 - i : i;
    hv[k] = h;
    h = fmaf(P[k], h, X[k]);
    const int kb = REV ? i : G - 1 - i;
    rv[kb] = R;
    R = fmaf(P[kb], R, S[kb]);
  }
  float4* ho = reinterpret_cast<float4*>(&sm.hin[m][G * sp]);
  float4* ro = reinterpret_cast<float4*>(&sm.rin[m][G * sp]);
#pragma unroll
  for (int i = 0; i < G / 4; ++i) {
    ho[i] = make_float4(hv[4 * i], hv[4 * i + 1], hv[4 * i + 2], hv[4 * i + 3]);
    ro[i] = make_float4(rv[4 * i], rv[4 * i + 1], rv[4 * i + 2], rv[4 * i + 3]);
  }
  const float r_new = __shfl_sync(kFull, R, (lane - g0) & (G - 1));  // the first segment's: the window's r
  if (lane >= g0 && lane < g0 + G) r_l = r_new;
}

template <bool REV, bool EXACT, typename T, int NMAX>
__device__ __forceinline__ void bwd_window_smem(const LanesRows<T>& r, int t0, int L, int N, int lane,
                                                const LanesScalars& c, float A_l, float h0_l, float& r_l,
                                                float& dA_acc, float& dD, float& dbias, float* xch, float* bxch,
                                                LanesBwdScanSmem& sm LANES_PROBE_PARAM) {
  using O = Order<REV>;
  constexpr int G = kScanGroup;
  static_assert(NMAX % G == 0 && G == 4, "groups of 4 states");
  LANES_PROBE_START();
  float uu[kLanesSteps], dt[kLanesSteps], du[kLanesSteps], dy[kLanesSteps];
  float sgB[kLanesSteps], ddt[kLanesSteps];
  load8<true>(r.u, t0, L, uu);
  load8<true>(r.delta, t0, L, dt);
  lanes_delta<true>(dt, c.bias, c.softplus, t0, L);
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) du[j] = dt[j] * uu[j];
  const float sdt = LANES_PA_EXP ? lane_dsum(dt) : 0.f;
  bwd_dy<true>(r, t0, L, c, dy, sgB, ddt);
  LANES_PROBE(kProbeWinBegin);
#if LANES_BWD_ROLL
#pragma unroll 1
#else
#pragma unroll
#endif
  for (int g0 = 0; g0 < NMAX; g0 += G) {
    // (1) the lanes' maps (B/C loaded here: issued earlier, during the previous group, they cost more registers
    // than their latency: LANES_BWD_AHEAD in csrc/selective_scan/NOTES.md, session 17)
    Raw8<T> rb[G], rc[G];
#pragma unroll
    for (int m = 0; m < G; ++m)
      rb[m] = ld8_state<true, EXACT>(r.B, g0 + m, N, t0, L), rc[m] = ld8_state<true, EXACT>(r.C, g0 + m, N, t0, L);
#pragma unroll
    for (int m = 0; m < G; ++m) {
      float Bv[kLanesSteps], Cv[kLanesSteps], a[kLanesSteps], xa = 0.f, sa = 0.f;
      unpack8(rb[m], Bv);
      unpack8(rc[m], Cv);
      const float A2 = __shfl_sync(kFull, A_l, g0 + m) * kLog2e;
      float pa = LANES_PA_EXP ? fast_exp2(sdt * A2) : 1.f;
#pragma unroll
      for (int k = 0; k < kLanesSteps; ++k) {
        const int j = O::step(k);
        a[j] = fast_exp2(dt[j] * A2);
        xa = fmaf(a[j], xa, du[j] * Bv[j]);
        if (!LANES_PA_EXP) pa *= a[j];
      }
#pragma unroll
      for (int k = kLanesSteps - 1; k >= 0; --k) {
        const int j = O::step(k);
        sa = a[j] * fmaf(Cv[j], dy[j], sa);
      }
      sm.a[m][0][lane] = make_float4(a[0], a[1], a[2], a[3]);
      sm.a[m][1][lane] = make_float4(a[4], a[5], a[6], a[7]);
      sm.maps[m][lane] = make_float4(pa, xa, sa, 0.f);
    }
    // the replay's B/C again (L1 hits mostly), in flight during the scan
    Raw8<T> qb[G], qc[G];
#pragma unroll
    for (int m = 0; m < G; ++m)
      qb[m] = ld8_state<true, EXACT>(r.B, g0 + m, N, t0, L), qc[m] = ld8_state<true, EXACT>(r.C, g0 + m, N, t0, L);
    __syncwarp();
    LANES_PROBE(kProbeStateBegin);
    // (2) both scans of the group
    group_scan_bwd<REV>(sm, g0, lane, h0_l, r_l);
    __syncwarp();
    LANES_PROBE(kProbeStateScan);
    // (3) per state: the lane's states, then its gradients
    float dAg[G];
#pragma unroll
    for (int m = 0; m < G; ++m) {
      const int n = g0 + m;
      const float An = __shfl_sync(kFull, A_l, n);
      float Bv[kLanesSteps], Cv[kLanesSteps], h[kLanesSteps];
      unpack8(qb[m], Bv);
      unpack8(qc[m], Cv);
      const float4 a0 = sm.a[m][0][lane], a1 = sm.a[m][1][lane];
      const float a[kLanesSteps] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float gg = sm.rin[m][lane];
      bwd_replay<REV>(sm.hin[m][lane], a, du, Bv, h);
      LANES_PROBE(kProbeReplay);
      dAg[m] = bwd_state_grads<REV, true, EXACT, T, NMAX>(r, n, t0, L, N, lane, An, gg, a, h, Bv, Cv, dt, du, dy,
                                                          sgB, ddt, xch, bxch LANES_PROBE_ARG);
    }
    dA_fold4(dA_acc, dAg, g0 / G, lane);
    __syncwarp();  // the next group overwrites sm
  }
  bwd_window_end<true>(r, t0, L, c, uu, dt, dy, sgB, ddt, dD, dbias);
  LANES_PROBE(kProbeWinEnd);
#ifdef LANES_PROBE_CLOCK
  pr.c[kProbeWindows] += 1.f;
#endif
}

template <bool REV, typename T, int NMAX>
__device__ __noinline__ void bwd_window_generic(const LanesRows<T> r, int t0, int L, int N, int lane,
                                                const LanesScalars c, float A_l, float h0_l, float& r_l,
                                                float& dA_acc, float& dD, float& dbias) {
#ifdef LANES_PROBE_CLOCK
  LanesProbe pr{};  // partial windows are not counted
#endif
  bwd_window<REV, false, false, T, NMAX>(r, t0, L, N, lane, c, A_l, h0_l, r_l, dA_acc, dD, dbias, nullptr,
                                         nullptr LANES_PROBE_ARG);
}

// A states-only forward window (kLanesStateStride > 1): h_l (lane n: state n) from the state entering the window to
// the one leaving it, without y (no C, no replay, no stores).
template <bool REV, bool FULL, bool EXACT, typename T, int NMAX>
__device__ __forceinline__ void state_window(const LanesRows<T>& r, int t0, int L, int N, int lane,
                                             const LanesScalars& c, float A2_l, float& h_l) {
  using O = Order<REV>;
  float uu[kLanesSteps], dt[kLanesSteps], du[kLanesSteps];
  load8<FULL>(r.u, t0, L, uu);
  load8<FULL>(r.delta, t0, L, dt);
  lanes_delta<FULL>(dt, c.bias, c.softplus, t0, L);
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) du[j] = dt[j] * uu[j];
  Raw8<T> rb[NMAX];
#pragma unroll
  for (int k = 0; k < kLanesAhead && k < NMAX; ++k) rb[k] = ld8_state<FULL, EXACT>(r.B, k, N, t0, L);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    if (n + kLanesAhead < NMAX) rb[n + kLanesAhead] = ld8_state<FULL, EXACT>(r.B, n + kLanesAhead, N, t0, L);
    float Bv[kLanesSteps];
    unpack8(rb[n], Bv);
    const float A2 = __shfl_sync(kFull, A2_l, n);
    float pa = 1.f, xa = 0.f;
#pragma unroll
    for (int k = 0; k < kLanesSteps; ++k) {
      const int j = O::step(k);
      const float a = fast_exp2(dt[j] * A2);
      xa = fmaf(a, xa, du[j] * Bv[j]);
      pa *= a;
    }
    float carry = __shfl_sync(kFull, h_l, n);
    lanes_state_in<REV>(pa, xa, carry, lane);  // carry: the state leaving the window
    h_l = lane == n ? carry : h_l;
  }
}

template <bool REV, typename T, int NMAX>
__device__ __noinline__ void state_window_generic(const LanesRows<T> r, int t0, int L, int N, int lane,
                                                  const LanesScalars c, float A2_l, float& h_l) {
  state_window<REV, false, false, T, NMAX>(r, t0, L, N, lane, c, A2_l, h_l);
}

// kLanesStateStride > 1: the state entering window w (natural index) in scan order, lane n: state n. On the first
// window of a group that the backward reaches (the last of the group in scan order), the group's window-start states
// are recomputed from its saved one by states-only forward windows into `hs` (per warp: kLanesStateStride x 32
// floats); every window of the group reads its own from there.
template <bool REV, bool EXACT, typename T, int NMAX>
__device__ __forceinline__ float bwd_window_state(const ScanParams& p, const LanesRows<T>& rows, const float* states,
                                                  size_t row, int w, int nwin, int lane, const LanesScalars& c,
                                                  float A_l, float* hs) {
  const int N = p.N;
  constexpr int K = kLanesStateStride;
  const int g0 = w - w % K, g1 = min(g0 + K, nwin) - 1;  // the group's windows (natural order)
  if (w == (REV ? g0 : g1)) {  // the backward's first window of the group: recompute
    const int nsave = (nwin + K - 1) / K;
    float h_l = lane < N ? saved_state(p, states, w / K, REV ? nsave - 1 : 0, row, lane) : 0.f;
    const float A2_l = A_l * kLog2e;
    for (int i = 0; i <= g1 - g0; ++i) {  // scan order
      const int ww = REV ? g1 - i : g0 + i;
      hs[(ww - g0) * 32 + lane] = h_l;
      if (ww == w) break;
      const int t0 = ww * kLanesWindow + lane * kLanesSteps;
      if (p.lanes_vec && (ww + 1) * kLanesWindow <= p.L)
        state_window<REV, true, EXACT, T, NMAX>(rows, t0, p.L, N, lane, c, A2_l, h_l);
      else
        state_window_generic<REV, T, NMAX>(rows, t0, p.L, N, lane, c, A2_l, h_l);
    }
    __syncwarp();
  }
  return hs[(w - g0) * 32 + lane];
}

// LANES_BWD_REMAT (default on; 0 for A/B runs): the backward recomputes its rows' pointers each window from the
// kernel's parameters and (b, chan, group), which held across the loop had been spilled (180 B) and reloaded at every
// window start, each reload the head of a chain LDL -> address -> LDG -> use (Nsight Compute: ~5% of the warp samples).
// Offline (sm_90, bf16, uni exact): spills 180 -> 20 B, a window's loop body 1,696 -> 1,821 instructions. H100, bf16,
// fwd+bwd ms against 0 in one call (benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-7948c6e-remat.json):
// global XL 0.803 -> 0.784, long 1.862 -> 1.816, global S 1.059 -> 1.039, bidirectional global XL 1.623 -> 1.586.
#ifndef LANES_BWD_REMAT
#define LANES_BWD_REMAT 1
#endif
// One direction of the backward over the whole row: windows against scan order; per-channel sums at the end.
template <bool REV, bool EXACT, typename T, int NMAX>
__device__ __forceinline__ void bwd_direction(const ScanParams& p, int d, int b, int chan, int lane, int mode,
                                              float* xch, float* bxch, float* hs, LanesBwdScanSmem* scan) {
  const DirParams& dp = p.dir[d];
  const int L = p.L, N = p.N;
  const size_t row = (size_t)b * p.dim + chan;
#if LANES_BWD_REMAT
  const int grp = lanes_group(p, d, chan);
#else
  const LanesRows<T> rows = lanes_rows<T>(p, d, b, chan);
#endif
  const int nwin = (L + kLanesWindow - 1) / kLanesWindow;
  const int nsave = (nwin + kLanesStateStride - 1) / kLanesStateStride;
  const float* __restrict__ states = dp.states + row * kept_slots(nsave) * N;
  const float A_l = lane < N ? dp.A[(size_t)chan * N + lane] : 0.f;
  const bool uni = !p.bidirectional;
  float r_l = (uni && lane < N && p.dlast_state) ? p.dlast_state[row * N + lane] : 0.f;
  const LanesScalars c{dp.delta_bias ? dp.delta_bias[chan] : 0.f, dp.D ? dp.D[chan] : 0.f,
                       p.divide_out ? 0.5f : 1.f, (bool)p.delta_softplus, mode};
  float dA = 0.f, dD = 0.f, dbias = 0.f;  // dA: folded (dA_fold4)
#ifdef LANES_PROBE_CLOCK
  LanesProbe pr{};
#endif

  for (int i = 0; i < nwin; ++i) {
    const int w = REV ? i : nwin - 1 - i;
    const int t0 = w * kLanesWindow + lane * kLanesSteps;
#if LANES_BWD_REMAT
    const LanesRows<T> rows = lanes_rows_fresh<T>(p, d, b, chan, grp);
#endif
#if LANES_STATE_STRIDE > 1
    const float h0_l = bwd_window_state<REV, EXACT, T, NMAX>(p, rows, states, row, w, nwin, lane, c, A_l, hs);
#else
    const float h0_l = lane < N ? saved_state(p, states, w, REV ? nwin - 1 : 0, row, lane) : 0.f;
#endif
    if (p.lanes_vec && (w + 1) * kLanesWindow <= L)
#if LANES_SMEM_SCAN
      bwd_window_smem<REV, EXACT, T, NMAX>(rows, t0, L, N, lane, c, A_l, h0_l, r_l, dA, dD, dbias, xch, bxch, *scan
                                           LANES_PROBE_ARG);
#else
      bwd_window<REV, true, EXACT, T, NMAX>(rows, t0, L, N, lane, c, A_l, h0_l, r_l, dA, dD, dbias, xch,
                                            bxch LANES_PROBE_ARG);
#endif
    else
    {  // copies to the out-of-line call (fwd_window_generic's note)
      float rr = r_l, dAc = dA, dDc = dD, dbc = dbias;
      bwd_window_generic<REV, T, NMAX>(rows, t0, L, N, lane, c, A_l, h0_l, rr, dAc, dDc, dbc);
      r_l = rr, dA = dAc, dD = dDc, dbias = dbc;
    }
  }
  // per-channel sums over the warp: dD / dbias partials per batch row (summed by the caller), dA added atomically
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    dD += __shfl_xor_sync(kFull, dD, off);
    dbias += __shfl_xor_sync(kFull, dbias, off);
  }
  float dA_l = dA_lane(dA, lane);
  if (lane < N) {
#ifdef LANES_PROBE_CLOCK
    dA_l = 0.f;  // lane k: its phase k (the lanes of a warp run in step)
#pragma unroll
    for (int k = 0; k < 16; ++k) dA_l = lane == k ? pr.c[k] : dA_l;
#endif
    atomicAdd(dp.dA_part + (size_t)chan * N + lane, dA_l);  // summed over batch rows (p.atomic_sums)
    if (uni && p.dinitial_state) p.dinitial_state[row * N + lane] = r_l;
  }
  if (lane == 0) {
    dp.dD_part[row] = dD;
    dp.dbias_part[row] = dbias;
  }
}

// Bidirectional: two launches, the backward direction (kPassBiRev), then the forward one (kPassBiFwd: dz too).
template <typename T, int NMAX, bool EXACT, int PASS>
__global__ void __launch_bounds__(kLanesWarps * 32, LANES_BWD_MINB) scan_bwd_lanes_kernel(const ScanParams p) {
  const int lane = threadIdx.x & 31;
  const int chan = blockIdx.y * kLanesWarps + (threadIdx.x >> 5);
  const int b = blockIdx.x;
  // xch, per warp: dB, dC of one state and window, staged for the atomics where the block does not reduce them; in
  // the block reduction's buffer, which such a kernel or block leaves unused (EXACT false, or bxch null below)
#if LANES_BLOCK_REDUCE
  extern __shared__ float4 s_bxch[];  // kLanesBlockReduceBytes
  static_assert(kLanesBlockReduceBytes >= kLanesWarps * 2 * kLanesWindow * 4, "xch fits in the block buffer");
  float* xch = reinterpret_cast<float*>(s_bxch) + (threadIdx.x >> 5) * 2 * kLanesWindow;
#else
  __shared__ alignas(16) float s_xch[kLanesWarps][2 * kLanesWindow];
  float* xch = s_xch[threadIdx.x >> 5];
#endif
#if LANES_SMEM_SCAN
  __shared__ LanesBwdScanSmem s_scan[kLanesWarps];
  LanesBwdScanSmem* scan = &s_scan[threadIdx.x >> 5];
#else
  LanesBwdScanSmem* scan = nullptr;
#endif
  float* bxch = nullptr;
#if LANES_BLOCK_REDUCE
  // every warp of the block alive and in one B/C group (block-uniform)
  if (p.dim % kLanesWarps == 0 && (p.dim / p.dir[0].groups) % kLanesWarps == 0 &&
      (PASS == kPassUni || (p.dim / p.dir[1].groups) % kLanesWarps == 0))
    bxch = reinterpret_cast<float*>(s_bxch);
#endif
  if (chan >= p.dim) return;
#if LANES_STATE_STRIDE > 1
  __shared__ float s_hs[kLanesWarps][kLanesStateStride * 32];  // per warp: a group's recomputed window-start states
  float* hs = s_hs[threadIdx.x >> 5];
#else
  float* hs = nullptr;
#endif
  if constexpr (PASS == kPassBiRev) {
    bwd_direction<true, EXACT, T, NMAX>(p, 1, b, chan, lane, kToWs, xch, bxch, hs, scan);
  } else if constexpr (PASS == kPassBiFwd) {
    bwd_direction<false, EXACT, T, NMAX>(p, 0, b, chan, lane, kAddWs, xch, bxch, hs, scan);
  } else {
    bwd_direction<false, EXACT, T, NMAX>(p, 0, b, chan, lane, kUni, xch, bxch, hs, scan);
  }
}

template <typename T, bool FWD, int NMAX, bool EXACT, int PASS>
cudaError_t launch_lanes_pass(const ScanParams& p, cudaStream_t stream) {
  const dim3 grid(p.batch, (p.dim + kLanesWarps - 1) / kLanesWarps);
  if constexpr (FWD) {
    if constexpr (PASS == kPassUni || (LANES_BIFWD_ZT && PASS == kPassBiFwd)) {
      if (p.z) return launch_fwd_lanes<T, NMAX, EXACT, PASS, true>(p, grid, stream);
    }
    return launch_fwd_lanes<T, NMAX, EXACT, PASS, false>(p, grid, stream);
  } else {
    constexpr int smem = kLanesBlockReduceBytes;
    constexpr int xch = LANES_BLOCK_REDUCE ? 0 : 2 * kLanesWindow;  // static shared memory too
    if constexpr (smem + kLanesWarps * (xch + kLanesBwdScanFloats) * 4 > 48 * 1024) {
      static bool opted_in[64] = {};  // once per instantiation and device
      int dev = 0;
      cudaGetDevice(&dev);
      if (dev >= 64 || !opted_in[dev]) {
        const cudaError_t e = cudaFuncSetAttribute(scan_bwd_lanes_kernel<T, NMAX, EXACT, PASS>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess) return e;
        if (dev < 64) opted_in[dev] = true;
      }
    }
    scan_bwd_lanes_kernel<T, NMAX, EXACT, PASS><<<grid, kLanesWarps * 32, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, bool FWD, int NMAX, bool EXACT, bool BI>
cudaError_t launch_lanes_n(const ScanParams& p, cudaStream_t stream) {
  if constexpr (!BI) {
    return launch_lanes_pass<T, FWD, NMAX, EXACT, kPassUni>(p, stream);
  } else {
    // the forward direction's forward reads the backward one's ws; their backwards are independent (side_stream)
    const cudaError_t e = launch_lanes_pass<T, FWD, NMAX, EXACT, kPassBiRev>(
        p, (!FWD && p.side_stream) ? p.side_stream : stream);
    return e != cudaSuccess ? e : launch_lanes_pass<T, FWD, NMAX, EXACT, kPassBiFwd>(p, stream);
  }
}

template <typename T, bool FWD, bool BI>
cudaError_t launch_lanes_bi(const ScanParams& p, cudaStream_t stream) {
  // N = 16 (Mamba's default) and N = 8 without row masks; other N with masked rows, in the 8- or 16-state kernel
  if (p.N == 16) return launch_lanes_n<T, FWD, 16, true, BI>(p, stream);
#if LANES_N8
  if (p.N == 8) return launch_lanes_n<T, FWD, 8, true, BI>(p, stream);
  if (p.N < 8) return launch_lanes_n<T, FWD, 8, false, BI>(p, stream);
#endif
  return launch_lanes_n<T, FWD, 16, false, BI>(p, stream);
}

// N <= kLanesMaxN (checked by the binding).
template <typename T, bool FWD>
cudaError_t launch_lanes(const ScanParams& p, cudaStream_t stream) {
  if (p.N > kLanesMaxN) return cudaErrorInvalidValue;
  if ((p.dim + kLanesWarps - 1) / kLanesWarps > 65535) return cudaErrorInvalidConfiguration;  // grid.y
  return p.bidirectional ? launch_lanes_bi<T, FWD, true>(p, stream) : launch_lanes_bi<T, FWD, false>(p, stream);
}

}  // namespace matten_scan
