// Forward kernel of the selective scan (template; instantiated per dtype in selective_scan_fwd_*.cu).
//
// Per chunk of CHUNK steps: (1) the block stages d = softplus(delta + bias), d*u, u, z and (B, C) of its
// channels in shared memory (loads for the next chunk are issued right after, so they overlap the compute);
// (2) each thread advances its NPT states over the chunk in fp32 registers and forms its part of <C_t, h_t>;
// (3) the parts are summed over the channel's TPC lanes (reduce_scatter) into s_y; (4) the block adds D*u,
// combines directions, gates with silu(z) and writes `out` (and y before the gate, for the backward).
// Bidirectional: one block runs the backward direction first (its y goes to the fp32 scratch `ws`), then the
// forward direction, which adds it; both read the same natural-order inputs, the backward one from the end.
#pragma once

#include "selective_scan_common.cuh"

namespace matten_scan {

template <typename T, int TPC, int NPT, int CHUNK, int NWARPS, int MINB = (NPT == 1 && TPC >= 16 ? 32 : 16) / NWARPS>
__global__ void __launch_bounds__(NWARPS * 32, MINB) scan_fwd_kernel(const ScanParams p) {
  constexpr int NT = NWARPS * 32;        // threads per block
  constexpr int CPB = NT / TPC;          // channels per block
  constexpr int NP = TPC * NPT;          // states per channel, padded
  constexpr int RT = CHUNK < TPC ? CHUNK : TPC;  // steps per reduce_scatter
  constexpr int TILE = CPB * CHUNK;      // (channel, step) elements of a tile
  constexpr int EPT = (TILE + NT - 1) / NT;
  constexpr int BC_TILE = NP * CHUNK;    // (state, step) elements of the B/C tile
  constexpr int BPT = (BC_TILE + NT - 1) / NT;
  static_assert(NT % TPC == 0 && 32 % TPC == 0 && CHUNK <= 32 && NT % CHUNK == 0, "bad configuration");

  __shared__ float2 s_ddu[CPB][CHUNK];   // (d, d*u)
  __shared__ float s_u[CPB][CHUNK];
  __shared__ float s_z[CPB][CHUNK];
  __shared__ float s_y[CPB][CHUNK];      // <C_t, h_t>
  __shared__ float2 s_bc[CHUNK][NP + 1];  // (B, C); +1: the staging writes go down a column

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int c_loc = tid / TPC;           // this thread's channel within the block
  const int k = tid % TPC;               // ... and its lane within the channel: states k, k + TPC, ...
  const int b = blockIdx.z;
  const int seg_start = blockIdx.y * p.seg;
  const int c0 = seg_start + blockIdx.x * CPB;
  const int c_end = seg_start + p.seg;
  const int chan = c0 + c_loc;
  const bool chan_ok = chan < c_end;
  const int L = p.L, N = p.N, dim = p.dim;
  const int nchunks = (L + CHUNK - 1) / CHUNK;
  const bool has_z = p.z != nullptr;

  for (int di = p.bidirectional ? 1 : 0; di >= 0; --di) {
    const DirParams& dp = p.dir[di];
    const bool reverse = di == 1;
    const int G = dp.groups;
    const int g = c0 / (dim / G);
    const T* __restrict__ u = static_cast<const T*>(dp.u);
    const T* __restrict__ delta = static_cast<const T*>(dp.delta);
    const T* __restrict__ Bp = static_cast<const T*>(dp.B);
    const T* __restrict__ Cp = static_cast<const T*>(dp.C);
    const T* __restrict__ zp = static_cast<const T*>(p.z);
    const bool load_z = has_z && di == 0;

    float A2[NPT], h[NPT];
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int n = k + TPC * i;
      const bool ok = chan_ok && n < N;
      A2[i] = ok ? dp.A[(size_t)chan * N + n] * kLog2e : 0.f;
      h[i] = (ok && p.initial_state != nullptr && !p.bidirectional)
                 ? p.initial_state[((size_t)b * dim + chan) * N + n] : 0.f;
    }

    // Registers holding the next chunk's raw inputs.
    T r_u[EPT], r_dt[EPT], r_z[EPT], r_B[BPT], r_C[BPT];
    auto load = [&](int c) {
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const bool ok = e < TILE && tau < L && c0 + row < c_end;
        const size_t idx = ((size_t)b * dim + c0 + row) * L + natural_t(tau, L, reverse);
        r_u[r] = load_or_zero(u, idx, ok);
        r_dt[r] = load_or_zero(delta, idx, ok);
        r_z[r] = load_or_zero(zp, idx, ok && load_z);
      }
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT, n = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const bool ok = e < BC_TILE && n < N && tau < L;
        const size_t idx = (((size_t)b * G + g) * N + n) * L + natural_t(tau, L, reverse);
        r_B[r] = load_or_zero(Bp, idx, ok);
        r_C[r] = load_or_zero(Cp, idx, ok);
      }
    };
    auto stage = [&](int c) {
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, j = e % CHUNK;
        if (e < TILE) {
          const bool ok = c * CHUNK + j < L && c0 + row < c_end;
          const float uu = to_float(r_u[r]);
          float x = to_float(r_dt[r]);
          if (dp.delta_bias != nullptr && ok) x += dp.delta_bias[c0 + row];
          float d = x, unused;
          if (p.delta_softplus) softplus_and_grad(x, d, unused);
          if (!ok) d = 0.f;  // padding steps: exp(0) = 1 and d*B*u = 0 keep the state
          s_ddu[row][j] = make_float2(d, d * uu);
          s_u[row][j] = uu;
          s_z[row][j] = to_float(r_z[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT;
        if (e < BC_TILE) s_bc[e % CHUNK][e / CHUNK] = make_float2(to_float(r_B[r]), to_float(r_C[r]));
      }
    };

    load(0);
    for (int c = 0; c < nchunks; ++c) {
      if (dp.states != nullptr && chan_ok) {
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
          const int n = k + TPC * i;
          if (n < N) dp.states[(((size_t)b * dim + chan) * nchunks + c) * N + n] = h[i];
        }
      }
      __syncthreads();  // the previous chunk's output pass is done with shared memory
      stage(c);
      __syncthreads();
      if (c + 1 < nchunks) load(c + 1);

#pragma unroll
      for (int j0 = 0; j0 < CHUNK; j0 += RT) {
        float yp[RT];
#pragma unroll
        for (int jj = 0; jj < RT; ++jj) {
          const float2 ddu = s_ddu[c_loc][j0 + jj];
          float acc = 0.f;
#pragma unroll
          for (int i = 0; i < NPT; ++i) {
            const float2 bc = s_bc[j0 + jj][k + TPC * i];
            const float a = fast_exp2(ddu.x * A2[i]);
            h[i] = fmaf(a, h[i], ddu.y * bc.x);
            acc = fmaf(bc.y, h[i], acc);
          }
          yp[jj] = acc;
        }
        int idx;
        bool writer;
        const float y = reduce_scatter<TPC, RT>(yp, lane, idx, writer);
        if (writer) s_y[c_loc][j0 + idx] = y;
      }
      __syncthreads();

      // Output pass: one thread per (channel, step) element.
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, j = e % CHUNK;
        const int tau = c * CHUNK + j, ch = c0 + row;
        if (e < TILE && tau < L && ch < c_end) {
          const size_t idx = ((size_t)b * dim + ch) * L + natural_t(tau, L, reverse);
          float y = s_y[row][j];
          if (dp.D != nullptr) y = fmaf(dp.D[ch], s_u[row][j], y);
          if (reverse) {
            p.ws[idx] = y;
          } else {
            if (p.bidirectional) y += p.ws[idx];
            if (p.divide_out) y *= 0.5f;
            if (has_z) {
              if (p.y_saved != nullptr) static_cast<T*>(p.y_saved)[idx] = from_float<T>(y);
              const float zz = s_z[row][j];
              y *= zz * sigmoid(zz);
            }
            static_cast<T*>(p.out)[idx] = from_float<T>(y);
          }
        }
      }
    }

    if (!p.bidirectional && p.last_state != nullptr && chan_ok) {
#pragma unroll
      for (int i = 0; i < NPT; ++i) {
        const int n = k + TPC * i;
        if (n < N) p.last_state[((size_t)b * dim + chan) * N + n] = h[i];
      }
    }
  }
}

template <typename T, int TPC, int NPT, int CHUNK, int NWARPS>
cudaError_t launch_fwd_config(const ScanParams& p, cudaStream_t stream) {
  constexpr int CPB = NWARPS * 32 / TPC;
  const dim3 grid((p.seg + CPB - 1) / CPB, p.dim / p.seg, p.batch);
  scan_fwd_kernel<T, TPC, NPT, CHUNK, NWARPS><<<grid, NWARPS * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const ScanParams& p, int config, cudaStream_t stream) {
  switch (config) {
#define MATTEN_SCAN_FWD_CASE(ID, TPC, NPT, CHUNK, NWF, NWB) \
  case ID:                                                  \
    return launch_fwd_config<T, TPC, NPT, CHUNK, NWF>(p, stream);
    MATTEN_SCAN_CONFIGS(MATTEN_SCAN_FWD_CASE)
#undef MATTEN_SCAN_FWD_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace matten_scan
