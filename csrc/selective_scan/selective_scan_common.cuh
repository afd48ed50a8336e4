// Device helpers shared by the forward and backward scan kernels: dtype conversion, exp2, softplus, the
// shared-memory reads of (B, C) pairs and of per-lane partial sums, and the channel-tile kernels' shape and split
// summaries. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "selective_scan.h"

namespace matten_scan {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Load element i of p, or zero when !ok (a predicated load: no access when !ok).
template <typename T>
__device__ __forceinline__ T load_or_zero(const T* p, size_t i, bool ok) {
  return ok ? p[i] : from_float<T>(0.f);
}

// 2^x in one MUFU.EX2 (relative error ~2^-22; results below 2^-126 flush to 0, harmless for a decay factor).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Saved states. The forward saves the fp32 state entering each of a row's `nslots` slots (the tile kernels' chunks in
// scan order; the lanes and seq kernels' 256-step windows, or groups of kLanesStateStride of them, in natural order)
// but the one its direction starts from, `first` (0 in scan order; the reverse direction's last natural slot): that
// state is initial_state or zero, so a row keeps kept_slots(nslots) = nslots - 1 (none for a one-chunk row).
__device__ __forceinline__ int saved_index(int s, int first) { return s > first ? s - 1 : s; }

// State n entering slot s of row `row` (row_states: that row's kept slots): the saved one, or for the first slot
// initial_state (unidirectional scans that have one) or zero.
__device__ __forceinline__ float saved_state(const ScanParams& p, const float* row_states, int s, int first,
                                             size_t row, int n) {
  if (s == first) return (p.initial_state && !p.bidirectional) ? p.initial_state[row * p.N + n] : 0.f;
  return row_states[(size_t)saved_index(s, first) * p.N + n];
}

__device__ __forceinline__ float sigmoid(float x) { return __frcp_rn(1.f + __expf(-x)); }

// d = softplus(x) (= x for x > 20, as the reference) and its derivative sigmoid(x).
__device__ __forceinline__ void softplus_and_grad(float x, float& d, float& dd_dx) {
  if (x > 20.f) {
    d = x;
    dd_dx = 1.f;
  } else {
    const float e = __expf(x);
    d = log1pf(e);
    dd_dx = __fdividef(e, 1.f + e);
  }
}

// softplus(x) in ~10 instructions (log1pf is ~20): log2(1 + 2^(x log2 e)) ln 2 for x >= -5 (relative error <= 1e-5
// there, from the rounding of 1 + e), the series e - e^2/2 + e^3/3 below (e < 0.0068: truncation error < 1e-7
// relative), x itself above 20 (as the reference).
__device__ __forceinline__ float fast_softplus(float x) {
  const float e = fast_exp2(x * kLog2e);
  float l;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l) : "f"(1.f + e));
  const float series = e * fmaf(e, fmaf(e, 1.f / 3.f, -0.5f), 1.f);
  return x > 20.f ? x : (x < -5.f ? series : l * 0.69314718055994531f);
}

// sigmoid with the approximate reciprocal (the IEEE one has a slow path: a call per element).
__device__ __forceinline__ float fast_sigmoid(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + fast_exp2(-x * kLog2e)));
  return r;
}

// (B, C) of this thread's NPT adjacent states n = k*NPT + i at step j of a [CHUNK][NP + 2] float2 tile; pairs
// are read as one 16-byte load (rows are 16-byte multiples: NP is even or NPT is 1).
template <int NPT, int ROW>
__device__ __forceinline__ void load_bc(const float2 (*bc)[ROW], int j, int k, float2 (&out)[NPT]) {
  if constexpr (NPT % 2 == 0) {
#pragma unroll
    for (int i = 0; i < NPT; i += 2) {
      const float4 v = *reinterpret_cast<const float4*>(&bc[j][k * NPT + i]);
      out[i] = make_float2(v.x, v.y);
      out[i + 1] = make_float2(v.z, v.w);
    }
  } else {
#pragma unroll
    for (int i = 0; i < NPT; ++i) out[i] = bc[j][k * NPT + i];
  }
}

// Sum of the TPC per-lane parts of one (channel, step) element, stored contiguously (16-byte aligned).
template <int TPC>
__device__ __forceinline__ float sum_parts(const float* p) {
  static_assert(TPC % 4 == 0, "TPC must be a multiple of 4");
  float s = 0.f;
#pragma unroll
  for (int q = 0; q < TPC; q += 4) {
    const float4 v = *reinterpret_cast<const float4*>(p + q);
    s += (v.x + v.y) + (v.z + v.w);
  }
  return s;
}

// Scan position tau (0 .. L-1 in the order of the recurrence) -> index along L.
__device__ __forceinline__ int natural_t(int tau, int L, bool reverse) { return reverse ? L - 1 - tau : tau; }

// ---------------------------------------------------------------------------------------------------------------
// The channel-tile kernels (scan_fwd_kernel, scan_bwd_kernel and their split summaries): NWARPS warps a block, TPC
// threads a channel holding NPT states each, tiles of CHUNK steps; blockIdx.x = split * (blocks a segment) + block
// within the segment, blockIdx.y = segment of p.seg channels.
template <int TPC, int NPT, int CHUNK, int NWARPS>
struct TileShape {
  static constexpr int NT = NWARPS * 32;              // threads per block
  static constexpr int CPB = NT / TPC;                // channels per block
  static constexpr int NP = TPC * NPT;                // states per channel, padded
  static constexpr int TILE = CPB * CHUNK;            // (channel, step) elements of a tile
  static constexpr int EPT = (TILE + NT - 1) / NT;    // ... a thread
  static constexpr int BC_TILE = NP * CHUNK;          // (state, step) elements of the B/C tile
  static constexpr int BPT = (BC_TILE + NT - 1) / NT;  // ... a thread
};

// A per-channel constant (delta_bias, D; null: 0) of each tile row this thread stages, read once.
template <int EPT, int NT, int TILE, int CHUNK>
__device__ __forceinline__ void tile_row_consts(const float* v, int c0, int c_end, float (&out)[EPT]) {
#pragma unroll
  for (int r = 0; r < EPT; ++r) {
    const int row = (threadIdx.x + r * NT) / CHUNK;
    const bool ok = threadIdx.x + r * NT < TILE && c0 + row < c_end;
    out[r] = (ok && v != nullptr) ? v[c0 + row] : 0.f;
  }
}

// Row of split s's summary (p.split_state: N floats a row, p.split_sumd: one) of direction di, batch b, channel chan.
__device__ __forceinline__ size_t split_row(const ScanParams& p, int di, int s, int b, int chan) {
  return ((size_t)(di * p.nsplit + s) * p.batch + b) * p.dim + chan;
}

// A split kernel's result: this thread's NPT states of the summary (n = k*NPT + i < N) and, from lane 0, sum_d.
template <int NPT>
__device__ __forceinline__ void store_split_summary(const ScanParams& p, size_t row, int k, const float (&s)[NPT],
                                                    float sum_d) {
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int n = k * NPT + i;
    if (n < p.N) p.split_state[row * p.N + n] = s[i];
  }
  if (k == 0) p.split_sumd[row] = sum_d;
}

}  // namespace matten_scan
