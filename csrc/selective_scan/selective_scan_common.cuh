// Device helpers shared by the forward and backward scan kernels: dtype conversion, softplus, and the warp
// reduce-scatter that sums per-state partials over the threads of a channel. CUDA headers only.
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

// Sum RT values over the TPC lanes of a channel (an aligned group of TPC lanes; RT <= TPC, powers of 2) by
// recursive halving: each step (lane mask M) a lane keeps half of its values and adds the partner's copy of
// that half. After log2(RT) steps every lane holds one full sum, of value index `idx`; the remaining
// log2(TPC/RT) steps are a plain all-reduce. `writer` is true for exactly one lane per index. Templates
// (not loops) so that every register index is a compile-time constant. All 32 lanes must call this.
template <int M, int CNT, int RT>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[RT], int lane, int& off) {
  if constexpr (M >= 1) {
    if constexpr (CNT >= 2) {
      constexpr int HALF = CNT / 2;
      const bool upper = (lane & M) != 0;
#pragma unroll
      for (int i = 0; i < HALF; ++i) {
        const float send = upper ? v[i] : v[i + HALF];
        const float keep = upper ? v[i + HALF] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, M);
      }
      off += upper ? HALF : 0;
      reduce_scatter_step<M / 2, HALF, RT>(v, lane, off);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], M);
      reduce_scatter_step<M / 2, 1, RT>(v, lane, off);
    }
  }
}

template <int TPC, int RT>
__device__ __forceinline__ float reduce_scatter(float (&v)[RT], int lane, int& idx, bool& writer) {
  static_assert(RT <= TPC && (RT & (RT - 1)) == 0 && (TPC & (TPC - 1)) == 0, "RT <= TPC, powers of two");
  int off = 0;
  reduce_scatter_step<TPC / 2, RT, RT>(v, lane, off);
  idx = off;
  writer = (lane & (TPC / RT - 1)) == 0;
  return v[0];
}

// Scan position tau (0 .. L-1 in the order of the recurrence) -> index along L.
__device__ __forceinline__ int natural_t(int tau, int L, bool reverse) { return reverse ? L - 1 - tau : tau; }

}  // namespace matten_scan
