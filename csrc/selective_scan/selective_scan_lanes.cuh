// Unidirectional selective scan with the time axis across the lanes of a warp ("lanes" kernels, config
// kLanesConfig); instantiated per dtype by the fwd/bwd launchers.
//
// One warp per (batch row, channel); windows of 256 steps, lane l holding steps 8l .. 8l+7 of the window (one
// 16-byte vector of a 16-bit dtype). Per state n the window's recurrence h_t = a_t h_{t-1} + x_t (a_t =
// exp2(d_t A_n log2 e), x_t = d_t u_t B_t) is composed in-thread over the lane's 8 steps into an affine map
// (prod a, x-part), the maps are scanned across the lanes (5 shuffle levels), and each lane replays its 8 steps
// from the state entering it. Lane 31's last state is the next window's carry. The forward saves the state at
// every window start (fp32, (batch, dim, nwin, N)); nothing else (the backward recomputes y for dz).
//
// Backward: windows last to first. Per state: recompute h over the window from its saved start state (the same
// forward scan), then the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} by the mirrored scan (shuffles down), with
// r = a_{t0} g_{t0} carried to the window before. With hx_t = h_t - x_t (= a_t h_{t-1}):
//     dC_t += dy_t h_t     dB_t += g_t d_t u_t     (fp32 atomics over the channels of a group)
//     du_t = d_t sum_n g_t B_t + D dy_t            dd_t = u_t sum_n g_t B_t + sum_n A_n g_t hx_t
//     dA_n += sum_t d_t g_t hx_t                   dh_init = r after the first window
// Beyond L the inputs read as zero and d as 0 (a = 1, x = 0): the state holds, the adjoint passes through.
// dB/dC use atomics, so the result is not bit-reproducible; the launcher takes another config when the caller
// asks for determinism.
#pragma once

#include <stdint.h>

#include "selective_scan_common.cuh"

namespace matten_scan {

constexpr int kLanesSteps = 8;     // steps per lane
constexpr int kLanesWindow = 256;  // steps per window
constexpr unsigned kFull = 0xffffffffu;

// Elements t0 .. t0+7 of a row as floats (zero beyond L); one or two 16-byte loads when `vec` (16-byte aligned
// rows) and the 8 elements are inside the row.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, int t0, int L, bool vec, bool ok,
                                      float (&v)[kLanesSteps]) {
  if (vec && t0 + kLanesSteps <= L) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (ok) raw = *reinterpret_cast<const uint4*>(row + t0);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) v[j] = to_float(e[j]);
    } else {
      float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
      if (ok) {
        lo = *reinterpret_cast<const float4*>(row + t0);
        hi = *reinterpret_cast<const float4*>(row + t0 + 4);
      }
      v[0] = to_float(lo.x), v[1] = to_float(lo.y), v[2] = to_float(lo.z), v[3] = to_float(lo.w);
      v[4] = to_float(hi.x), v[5] = to_float(hi.y), v[6] = to_float(hi.z), v[7] = to_float(hi.w);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) v[j] = (ok && t0 + j < L) ? to_float(row[t0 + j]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ row, int t0, int L, bool vec, const float (&v)[kLanesSteps]) {
  if (vec && t0 + kLanesSteps <= L) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) e[j] = from_float<T>(v[j]);
      *reinterpret_cast<uint4*>(row + t0) = raw;
    } else {
      *reinterpret_cast<float4*>(row + t0) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(row + t0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j)
      if (t0 + j < L) row[t0 + j] = from_float<T>(v[j]);
  }
}

// row[t0 + j] += v[j] for the steps inside L (fp32, atomic; 16-byte vector atomics on sm_90).
__device__ __forceinline__ void atomic_add8(float* row, int t0, int L, bool vec, const float (&v)[kLanesSteps]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (vec && t0 + kLanesSteps <= L) {
    atomicAdd(reinterpret_cast<float4*>(row + t0), make_float4(v[0], v[1], v[2], v[3]));
    atomicAdd(reinterpret_cast<float4*>(row + t0 + 4), make_float4(v[4], v[5], v[6], v[7]));
    return;
  }
#endif
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j)
    if (t0 + j < L) atomicAdd(row + t0 + j, v[j]);
}

// d = softplus(delta + bias) (optional) and d(d)/d(delta); d = 0 beyond L (the state then holds).
__device__ __forceinline__ void lanes_delta(float (&dt)[kLanesSteps], float (&sig)[kLanesSteps], float bias,
                                            bool softplus, int t0, int L) {
#pragma unroll
  for (int j = 0; j < kLanesSteps; ++j) {
    const float x = dt[j] + bias;
    float d = x, g = 1.f;
    if (softplus) softplus_and_grad(x, d, g);
    dt[j] = t0 + j < L ? d : 0.f;
    sig[j] = g;
  }
}

// The state entering this lane: the lanes' affine maps (pa, xa) (h -> pa h + xa over the lane's steps) scanned
// across the warp and applied to the carry entering lane 0.
__device__ __forceinline__ float lanes_state_in(float pa, float xa, float carry, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float pp = __shfl_up_sync(kFull, pa, off), xp = __shfl_up_sync(kFull, xa, off);
    if (lane >= off) {
      xa = fmaf(pa, xp, xa);
      pa *= pp;
    }
  }
  float pe = __shfl_up_sync(kFull, pa, 1), xe = __shfl_up_sync(kFull, xa, 1);
  if (lane == 0) pe = 1.f, xe = 0.f;
  return fmaf(pe, carry, xe);
}

// The adjoint entering this lane from the next one (g at the next lane's first step, or r for lane 31): the
// lanes' maps (q, s) (G -> q G + s, G = the adjoint entering the lane) scanned down the warp, applied to r.
__device__ __forceinline__ float lanes_adjoint_in(float q, float s, float r, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float qn = __shfl_down_sync(kFull, q, off), sn = __shfl_down_sync(kFull, s, off);
    if (lane + off < 32) {
      s = fmaf(q, sn, s);
      q *= qn;
    }
  }
  float qe = __shfl_down_sync(kFull, q, 1), se = __shfl_down_sync(kFull, s, 1);
  if (lane == 31) qe = 1.f, se = 0.f;
  return fmaf(qe, r, se);
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kLanesWarps * 32) scan_fwd_lanes_kernel(const ScanParams p) {
  const int lane = threadIdx.x & 31;
  const int chan = blockIdx.x * kLanesWarps + (threadIdx.x >> 5);
  const int b = blockIdx.y;
  if (chan >= p.dim) return;  // a whole warp; no block-level synchronisation below
  const DirParams& dp = p.dir[0];
  const int L = p.L, N = p.N, dim = p.dim;
  const int g = chan / (dim / dp.groups);
  const size_t row = (size_t)b * dim + chan;
  const T* __restrict__ u = static_cast<const T*>(dp.u) + row * L;
  const T* __restrict__ delta = static_cast<const T*>(dp.delta) + row * L;
  const T* __restrict__ Bp = static_cast<const T*>(dp.B) + ((size_t)b * dp.groups + g) * N * L;
  const T* __restrict__ Cp = static_cast<const T*>(dp.C) + ((size_t)b * dp.groups + g) * N * L;
  const T* __restrict__ z = p.z ? static_cast<const T*>(p.z) + row * L : nullptr;
  T* __restrict__ out = static_cast<T*>(p.out) + row * L;
  const bool vec = p.lanes_vec;
  const int nwin = (L + kLanesWindow - 1) / kLanesWindow;
  float* __restrict__ states = dp.states ? dp.states + row * nwin * N : nullptr;

  float A2[NMAX], h[NMAX];
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    A2[n] = n < N ? dp.A[(size_t)chan * N + n] * kLog2e : 0.f;
    h[n] = (n < N && p.initial_state) ? p.initial_state[row * N + n] : 0.f;
  }
  const float bias = dp.delta_bias ? dp.delta_bias[chan] : 0.f;
  const float Dv = dp.D ? dp.D[chan] : 0.f;

  for (int w = 0; w < nwin; ++w) {
    const int t0 = w * kLanesWindow + lane * kLanesSteps;
    float uu[kLanesSteps], dt[kLanesSteps], sig[kLanesSteps], du[kLanesSteps], y[kLanesSteps];
    load8(u, t0, L, vec, true, uu);
    load8(delta, t0, L, vec, true, dt);
    lanes_delta(dt, sig, bias, p.delta_softplus, t0, L);
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) du[j] = dt[j] * uu[j], y[j] = Dv * uu[j];
    if (states) {
      float mine = 0.f;
#pragma unroll
      for (int n = 0; n < NMAX; ++n) mine = lane == n ? h[n] : mine;
      if (lane < N) states[(size_t)w * N + lane] = mine;
    }
#pragma unroll
    for (int n = 0; n < NMAX; ++n) {
      const bool ok = n < N;
      float Bv[kLanesSteps], Cv[kLanesSteps], a[kLanesSteps];
      load8(Bp + (size_t)(ok ? n : 0) * L, t0, L, vec, ok, Bv);
      load8(Cp + (size_t)(ok ? n : 0) * L, t0, L, vec, ok, Cv);
      float pa = 1.f, xa = 0.f;
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) {
        a[j] = fast_exp2(dt[j] * A2[n]);
        xa = fmaf(a[j], xa, du[j] * Bv[j]);
        pa *= a[j];
      }
      float hh = lanes_state_in(pa, xa, h[n], lane);
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) {
        hh = fmaf(a[j], hh, du[j] * Bv[j]);
        y[j] = fmaf(Cv[j], hh, y[j]);
      }
      h[n] = __shfl_sync(kFull, hh, 31);
    }
    if (z) {
      float zz[kLanesSteps];
      load8(z, t0, L, vec, true, zz);
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) y[j] *= zz[j] * sigmoid(zz[j]);
    }
    store8(out, t0, L, vec, y);
  }
  if (p.last_state) {
    float mine = 0.f;
#pragma unroll
    for (int n = 0; n < NMAX; ++n) mine = lane == n ? h[n] : mine;
    if (lane < N) p.last_state[row * N + lane] = mine;
  }
}

template <typename T, int NMAX>
__global__ void __launch_bounds__(kLanesWarps * 32) scan_bwd_lanes_kernel(const ScanParams p) {
  const int lane = threadIdx.x & 31;
  const int chan = blockIdx.x * kLanesWarps + (threadIdx.x >> 5);
  const int b = blockIdx.y;
  if (chan >= p.dim) return;
  const DirParams& dp = p.dir[0];
  const int L = p.L, N = p.N, dim = p.dim;
  const int g = chan / (dim / dp.groups);
  const size_t row = (size_t)b * dim + chan;
  const size_t bc_row = ((size_t)b * dp.groups + g) * N * L;
  const T* __restrict__ u = static_cast<const T*>(dp.u) + row * L;
  const T* __restrict__ delta = static_cast<const T*>(dp.delta) + row * L;
  const T* __restrict__ Bp = static_cast<const T*>(dp.B) + bc_row;
  const T* __restrict__ Cp = static_cast<const T*>(dp.C) + bc_row;
  const T* __restrict__ z = p.z ? static_cast<const T*>(p.z) + row * L : nullptr;
  const T* __restrict__ dout = static_cast<const T*>(p.dout) + row * L;
  T* __restrict__ du_out = static_cast<T*>(dp.du) + row * L;
  T* __restrict__ dd_out = static_cast<T*>(dp.ddelta) + row * L;
  T* __restrict__ dz_out = p.dz ? static_cast<T*>(p.dz) + row * L : nullptr;
  float* __restrict__ dB = dp.dB_part + bc_row;
  float* __restrict__ dC = dp.dC_part + bc_row;
  const bool vec = p.lanes_vec, vec32 = L % 4 == 0;
  const int nwin = (L + kLanesWindow - 1) / kLanesWindow;
  const float* __restrict__ states = dp.states + row * nwin * N;

  float r[NMAX], dA[NMAX];
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    r[n] = (n < N && p.dlast_state) ? p.dlast_state[row * N + n] : 0.f;
    dA[n] = 0.f;
  }
  const float bias = dp.delta_bias ? dp.delta_bias[chan] : 0.f;
  const float Dv = dp.D ? dp.D[chan] : 0.f;
  float dD = 0.f, dbias = 0.f;

  for (int w = nwin - 1; w >= 0; --w) {
    const int t0 = w * kLanesWindow + lane * kLanesSteps;
    float uu[kLanesSteps], dt[kLanesSteps], sig[kLanesSteps], du[kLanesSteps], dy[kLanesSteps];
    float zz[kLanesSteps], y[kLanesSteps], sgB[kLanesSteps], ddt[kLanesSteps];
    load8(u, t0, L, vec, true, uu);
    load8(delta, t0, L, vec, true, dt);
    load8(dout, t0, L, vec, true, dy);
    lanes_delta(dt, sig, bias, p.delta_softplus, t0, L);
    if (z) {
      load8(z, t0, L, vec, true, zz);
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) dy[j] *= zz[j] * sigmoid(zz[j]);
    }
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) {
      du[j] = dt[j] * uu[j];
      y[j] = Dv * uu[j];
      sgB[j] = 0.f;
      ddt[j] = 0.f;
    }
    const float h_start = lane < N ? states[(size_t)w * N + lane] : 0.f;
#pragma unroll
    for (int n = 0; n < NMAX; ++n) {
      const bool ok = n < N;
      const float An = ok ? dp.A[(size_t)chan * N + n] : 0.f;
      const float A2 = An * kLog2e;
      float Bv[kLanesSteps], Cv[kLanesSteps], a[kLanesSteps], h[kLanesSteps];
      load8(Bp + (size_t)(ok ? n : 0) * L, t0, L, vec, ok, Bv);
      load8(Cp + (size_t)(ok ? n : 0) * L, t0, L, vec, ok, Cv);
      // forward: the states of the window
      float pa = 1.f, xa = 0.f;
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) {
        a[j] = fast_exp2(dt[j] * A2);
        xa = fmaf(a[j], xa, du[j] * Bv[j]);
        pa *= a[j];
      }
      float hh = lanes_state_in(pa, xa, __shfl_sync(kFull, h_start, n), lane);
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) {
        hh = fmaf(a[j], hh, du[j] * Bv[j]);
        h[j] = hh;
        y[j] = fmaf(Cv[j], hh, y[j]);
      }
      // adjoint: g_j = C_j dy_j + a_{j+1} g_{j+1}; a_8 is the next lane's a_0 (lane 31: r holds it already)
      float a_next = __shfl_down_sync(kFull, a[0], 1);
      if (lane == 31) a_next = 1.f;
      float s = Cv[kLanesSteps - 1] * dy[kLanesSteps - 1], q = a_next;
#pragma unroll
      for (int j = kLanesSteps - 2; j >= 0; --j) {
        s = fmaf(a[j + 1], s, Cv[j] * dy[j]);
        q *= a[j + 1];
      }
      float gg = lanes_adjoint_in(q, s, r[n], lane) * a_next;
      float dBv[kLanesSteps], dCv[kLanesSteps], dAl = 0.f;
#pragma unroll
      for (int j = kLanesSteps - 1; j >= 0; --j) {
        gg = fmaf(Cv[j], dy[j], gg);  // g_j
        dCv[j] = dy[j] * h[j];
        dBv[j] = gg * du[j];
        sgB[j] = fmaf(gg, Bv[j], sgB[j]);
        const float ghx = gg * (h[j] - du[j] * Bv[j]);
        ddt[j] = fmaf(An, ghx, ddt[j]);
        dAl = fmaf(dt[j], ghx, dAl);
        gg *= a[j];  // a_j g_j: what step j-1 receives
      }
      dA[n] += dAl;
      r[n] = __shfl_sync(kFull, gg, 0);
      if (ok) {
        atomic_add8(dB + (size_t)n * L, t0, L, vec32, dBv);
        atomic_add8(dC + (size_t)n * L, t0, L, vec32, dCv);
      }
    }
    float du_o[kLanesSteps], dd_o[kLanesSteps];
#pragma unroll
    for (int j = 0; j < kLanesSteps; ++j) {
      du_o[j] = fmaf(dt[j], sgB[j], Dv * dy[j]);
      dd_o[j] = t0 + j < L ? fmaf(uu[j], sgB[j], ddt[j]) * sig[j] : 0.f;
      dD = fmaf(dy[j], uu[j], dD);
      dbias += dd_o[j];
    }
    store8(du_out, t0, L, vec, du_o);
    store8(dd_out, t0, L, vec, dd_o);
    if (z) {
      float dzv[kLanesSteps];
      float go[kLanesSteps];
      load8(dout, t0, L, vec, true, go);
#pragma unroll
      for (int j = 0; j < kLanesSteps; ++j) {
        const float sg = sigmoid(zz[j]);
        dzv[j] = go[j] * y[j] * sg * (1.f + zz[j] * (1.f - sg));
      }
      store8(dz_out, t0, L, vec, dzv);
    }
  }
  // per-channel sums over the warp; partials per batch row (summed by the caller)
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    dD += __shfl_xor_sync(kFull, dD, off);
    dbias += __shfl_xor_sync(kFull, dbias, off);
  }
  float dA_mine = 0.f, r_mine = 0.f;
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    float v = dA[n];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
    dA_mine = lane == n ? v : dA_mine;
    r_mine = lane == n ? r[n] : r_mine;
  }
  if (lane < N) {
    dp.dA_part[row * N + lane] = dA_mine;
    if (p.dinitial_state) p.dinitial_state[row * N + lane] = r_mine;
  }
  if (lane == 0) {
    dp.dD_part[row] = dD;
    dp.dbias_part[row] = dbias;
  }
}

template <typename T, bool FWD, int NMAX>
cudaError_t launch_lanes_n(const ScanParams& p, cudaStream_t stream) {
  const dim3 grid((p.dim + kLanesWarps - 1) / kLanesWarps, p.batch);
  if constexpr (FWD)
    scan_fwd_lanes_kernel<T, NMAX><<<grid, kLanesWarps * 32, 0, stream>>>(p);
  else
    scan_bwd_lanes_kernel<T, NMAX><<<grid, kLanesWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// Unidirectional, N <= kLanesMaxN (checked by the binding).
template <typename T, bool FWD>
cudaError_t launch_lanes(const ScanParams& p, cudaStream_t stream) {
  if (p.bidirectional || p.N > kLanesMaxN) return cudaErrorInvalidValue;
  return p.N <= 8 ? launch_lanes_n<T, FWD, 8>(p, stream) : launch_lanes_n<T, FWD, 16>(p, stream);
}

}  // namespace matten_scan
