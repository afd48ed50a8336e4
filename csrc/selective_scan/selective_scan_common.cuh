// Device helpers shared by the forward and backward scan kernels: dtype conversion, exp2, softplus, and the
// shared-memory reads of (B, C) pairs and of per-lane partial sums. CUDA headers only.
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

}  // namespace matten_scan
