// Forward kernel of the selective scan (template; instantiated per dtype in selective_scan_fwd_*.cu).
//
// Per chunk of CHUNK steps: (1) the block stages d = softplus(delta + bias), d*u, u, z and (B, C) of its
// channels in shared memory (loads for the next chunk are issued right after, so they overlap the compute);
// (2) each thread advances its NPT states (n = k*NPT + i) over the chunk in fp32 registers and stores its part
// of <C_t, h_t> in s_yp (one store per step, no shuffles); (3) the block sums the TPC parts of each element,
// adds D*u, combines directions, gates with silu(z) and writes `out` (and y before the gate, for the backward).
// Bidirectional: one block runs the backward direction first (its y goes to the fp32 scratch `ws`), then the
// forward direction, which adds it; both read the same natural-order inputs, the backward one from the end.
#pragma once

#include "selective_scan_common.cuh"
#include "selective_scan_lanes.cuh"
#include "selective_scan_seq.cuh"

namespace matten_scan {

template <typename T, int TPC, int NPT, int CHUNK, int NWARPS, int MINB = (NPT == 1 && TPC >= 16 ? 32 : 16) / NWARPS>
__global__ void __launch_bounds__(NWARPS * 32, MINB) scan_fwd_kernel(const ScanParams p) {
  using Shape = TileShape<TPC, NPT, CHUNK, NWARPS>;
  constexpr int NT = Shape::NT, CPB = Shape::CPB, NP = Shape::NP, TILE = Shape::TILE, EPT = Shape::EPT;
  constexpr int BC_TILE = Shape::BC_TILE, BPT = Shape::BPT;
  static_assert(NT % TPC == 0 && 32 % TPC == 0 && CHUNK <= 32 && NT % CHUNK == 0, "bad configuration");

  __shared__ float2 s_ddu[CPB][CHUNK];   // (d, d*u)
  __shared__ float s_u[CPB][CHUNK];
  __shared__ float s_z[CPB][CHUNK];
  __shared__ alignas(16) float s_yp[CHUNK][NT + 4];  // per-lane parts of <C_t, h_t>; +4 spreads the reads
  __shared__ alignas(16) float2 s_bc[CHUNK][NP + 2];  // (B, C); +2: staging writes go down a column

  const int tid = threadIdx.x;
  const int c_loc = tid / TPC;           // this thread's channel within the block
  const int k = tid % TPC;               // ... and its lane within the channel: states k*NPT .. k*NPT+NPT-1
  const int b = blockIdx.z;
  const int nb = gridDim.x / p.nsplit;   // blocks per segment of channels
  const int si = blockIdx.x / nb;         // this block's split of the sequence
  const int seg_start = blockIdx.y * p.seg;
  const int c0 = seg_start + (blockIdx.x % nb) * CPB;
  const int c_end = seg_start + p.seg;
  const int chan = c0 + c_loc;
  const bool chan_ok = chan < c_end;
  const int L = p.L, N = p.N, dim = p.dim;
  const int nchunks = (L + CHUNK - 1) / CHUNK;
  const int c_lo = si * p.split_chunks;
  const int c_hi = min(c_lo + p.split_chunks, nchunks);
  const bool has_z = p.z != nullptr;

  for (int di = p.dir_hi; di >= p.dir_lo; --di) {
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
    // batch strides: index offsets from the contiguous layout's (the sums are the true, non-negative indices)
    const long long zoff = (long long)b * (p.z_bstride - (long long)dim * L);
    const long long boff = (long long)b * (dp.B_bstride - (long long)G * N * L);
    const long long coff = (long long)b * (dp.C_bstride - (long long)G * N * L);

    float A2[NPT], h[NPT];
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int n = k * NPT + i;
      const bool ok = chan_ok && n < N;
      A2[i] = ok ? dp.A[(size_t)chan * N + n] * kLog2e : 0.f;
      h[i] = (ok && p.initial_state != nullptr && !p.bidirectional)
                 ? p.initial_state[((size_t)b * dim + chan) * N + n] : 0.f;
      // Compose the summaries of the earlier splits: h <- exp2(A2 * sum_d) h + h_split.
      for (int s2 = 0; s2 < si && ok; ++s2) {
        const size_t row = split_row(p, di, s2, b, chan);
        h[i] = fmaf(fast_exp2(A2[i] * p.split_sumd[row]), h[i], p.split_state[row * N + n]);
      }
    }

    // Registers holding the next chunk's raw inputs.
    float row_bias[EPT], row_D[EPT];  // per-row constants, read once
    tile_row_consts<EPT, NT, TILE, CHUNK>(dp.delta_bias, c0, c_end, row_bias);
    tile_row_consts<EPT, NT, TILE, CHUNK>(dp.D, c0, c_end, row_D);
    T r_u[EPT], r_dt[EPT], r_z[EPT], r_B[BPT], r_C[BPT];
    auto load = [&](int c) {
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const bool ok = e < TILE && tau < L && c0 + row < c_end;
        const size_t idx = ((size_t)b * dim + c0 + row) * L + natural_t(tau, L, reverse);
        r_u[r] = load_or_zero(u, idx, ok);
        r_dt[r] = load_or_zero(delta, idx, ok);
        r_z[r] = load_or_zero(zp, idx + zoff, ok && load_z);
      }
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT, n = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const bool ok = e < BC_TILE && n < N && tau < L;
        const size_t idx = (((size_t)b * G + g) * N + n) * L + natural_t(tau, L, reverse);
        r_B[r] = load_or_zero(Bp, idx + boff, ok);
        r_C[r] = load_or_zero(Cp, idx + coff, ok);
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
          x += row_bias[r];
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

    load(c_lo);
    for (int c = c_lo; c < c_hi; ++c) {
      if (dp.states != nullptr && chan_ok && c > 0) {  // chunk 0's is initial_state or zero (kept_slots)
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
          const int n = k * NPT + i;
          if (n < N) dp.states[(((size_t)b * dim + chan) * kept_slots(nchunks) + c - 1) * N + n] = h[i];
        }
      }
      __syncthreads();  // the previous chunk's output pass is done with shared memory
      stage(c);
      __syncthreads();
      if (c + 1 < c_hi) load(c + 1);

#pragma unroll
      for (int j = 0; j < CHUNK; ++j) {
        const float2 ddu = s_ddu[c_loc][j];
        float2 bc[NPT];
        load_bc<NPT>(s_bc, j, k, bc);
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
          const float a = fast_exp2(ddu.x * A2[i]);
          h[i] = fmaf(a, h[i], ddu.y * bc[i].x);
          acc = fmaf(bc[i].y, h[i], acc);
        }
        s_yp[j][tid] = acc;
      }
      __syncthreads();

      // Output pass: one thread per (channel, step) element.
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, j = e % CHUNK;
        const int tau = c * CHUNK + j, ch = c0 + row;
        if (e < TILE && tau < L && ch < c_end) {
          const size_t idx = ((size_t)b * dim + ch) * L + natural_t(tau, L, reverse);
          float y = sum_parts<TPC>(&s_yp[j][row * TPC]);
          y = fmaf(row_D[r], s_u[row][j], y);
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

    if (!p.bidirectional && p.last_state != nullptr && chan_ok && si == p.nsplit - 1) {
#pragma unroll
      for (int i = 0; i < NPT; ++i) {
        const int n = k * NPT + i;
        if (n < N) p.last_state[((size_t)b * dim + chan) * N + n] = h[i];
      }
    }
  }
}

// Split summaries of the forward: for every split but the last, the state reached from zero at its end and the
// sum of d over it (the same grid and thread layout as scan_fwd_kernel; no outputs per step).
template <typename T, int TPC, int NPT, int CHUNK, int NWARPS>
__global__ void __launch_bounds__(NWARPS * 32) scan_fwd_split_kernel(const ScanParams p) {
  using Shape = TileShape<TPC, NPT, CHUNK, NWARPS>;
  constexpr int NT = Shape::NT, CPB = Shape::CPB, NP = Shape::NP, TILE = Shape::TILE, EPT = Shape::EPT;
  constexpr int BC_TILE = Shape::BC_TILE, BPT = Shape::BPT;
  __shared__ float2 s_ddu[CPB][CHUNK];
  __shared__ alignas(16) float2 s_b[CHUNK][NP + 2];  // (B, 0): the layout load_bc reads

  const int tid = threadIdx.x, c_loc = tid / TPC, k = tid % TPC;
  const int b = blockIdx.z;
  const int nb = gridDim.x / p.nsplit;
  const int si = blockIdx.x / nb;
  if (si == p.nsplit - 1) return;  // nothing composes the last split's summary (uniform per block)
  const int seg_start = blockIdx.y * p.seg;
  const int c0 = seg_start + (blockIdx.x % nb) * CPB;
  const int c_end = seg_start + p.seg;
  const int chan = c0 + c_loc;
  const bool chan_ok = chan < c_end;
  const int L = p.L, N = p.N, dim = p.dim;
  const int c_lo = si * p.split_chunks, c_hi = c_lo + p.split_chunks;  // not the last split: all chunks full

  for (int di = p.bidirectional ? 1 : 0; di >= 0; --di) {
    const DirParams& dp = p.dir[di];
    const bool reverse = di == 1;
    const int G = dp.groups;
    const int g = c0 / (dim / G);
    const T* __restrict__ u = static_cast<const T*>(dp.u);
    const T* __restrict__ delta = static_cast<const T*>(dp.delta);
    const T* __restrict__ Bp = static_cast<const T*>(dp.B);
    const long long boff = (long long)b * (dp.B_bstride - (long long)G * N * L);
    float A2[NPT], h[NPT];
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int n = k * NPT + i;
      A2[i] = (chan_ok && n < N) ? dp.A[(size_t)chan * N + n] * kLog2e : 0.f;
      h[i] = 0.f;
    }
    float row_bias[EPT];
    tile_row_consts<EPT, NT, TILE, CHUNK>(dp.delta_bias, c0, c_end, row_bias);
    T r_u[EPT], r_dt[EPT], r_B[BPT];
    auto load = [&](int c) {
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const bool ok = e < TILE && c0 + row < c_end;
        const size_t idx = ((size_t)b * dim + c0 + row) * L + natural_t(tau, L, reverse);
        r_u[r] = load_or_zero(u, idx, ok);
        r_dt[r] = load_or_zero(delta, idx, ok);
      }
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT, n = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const size_t idx = (((size_t)b * G + g) * N + n) * L + natural_t(tau, L, reverse);
        r_B[r] = load_or_zero(Bp, idx + boff, e < BC_TILE && n < N);
      }
    };
    float sum_d = 0.f;
    load(c_lo);
    for (int c = c_lo; c < c_hi; ++c) {
      __syncthreads();
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, j = e % CHUNK;
        if (e < TILE) {
          const bool ok = c0 + row < c_end;
          const float x = to_float(r_dt[r]) + row_bias[r];
          float d = x, unused;
          if (p.delta_softplus) softplus_and_grad(x, d, unused);
          if (!ok) d = 0.f;
          s_ddu[row][j] = make_float2(d, d * to_float(r_u[r]));
        }
      }
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT;
        if (e < BC_TILE) s_b[e % CHUNK][e / CHUNK] = make_float2(to_float(r_B[r]), 0.f);
      }
      __syncthreads();
      if (c + 1 < c_hi) load(c + 1);
#pragma unroll
      for (int j = 0; j < CHUNK; ++j) {
        const float2 ddu = s_ddu[c_loc][j];
        float2 bc[NPT];
        load_bc<NPT>(s_b, j, k, bc);
        sum_d += ddu.x;
#pragma unroll
        for (int i = 0; i < NPT; ++i) h[i] = fmaf(fast_exp2(ddu.x * A2[i]), h[i], ddu.y * bc[i].x);
      }
    }
    if (chan_ok) store_split_summary<NPT>(p, split_row(p, di, si, b, chan), k, h, sum_d);
  }
}

template <typename T, int TPC, int NPT, int CHUNK, int NWARPS>
cudaError_t launch_fwd_config(const ScanParams& p0, cudaStream_t stream) {
  constexpr int CPB = NWARPS * 32 / TPC;
  ScanParams p = p0;
  const dim3 grid((p.seg + CPB - 1) / CPB * p.nsplit, p.dim / p.seg, p.batch);
  if (p.nsplit > 1) scan_fwd_split_kernel<T, TPC, NPT, CHUNK, NWARPS><<<grid, NWARPS * 32, 0, stream>>>(p);
  if (p.bidirectional && p.nsplit > 1) {
    // Splits of the backward direction write ws for positions that other blocks' forward splits read: two launches.
    p.dir_lo = p.dir_hi = 1;
    scan_fwd_kernel<T, TPC, NPT, CHUNK, NWARPS><<<grid, NWARPS * 32, 0, stream>>>(p);
    p.dir_lo = p.dir_hi = 0;
  } else {
    p.dir_lo = 0;
    p.dir_hi = p.bidirectional ? 1 : 0;
  }
  scan_fwd_kernel<T, TPC, NPT, CHUNK, NWARPS><<<grid, NWARPS * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const ScanParams& p, int config, cudaStream_t stream) {
  if (config == kLanesConfig) {
    const cudaError_t err = launch_seq_fwd<T>(p, stream);
    return err == cudaErrorNotSupported ? launch_lanes<T, true>(p, stream) : err;
  }
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
