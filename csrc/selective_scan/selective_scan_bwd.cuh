// Backward kernel of the selective scan (template; instantiated per dtype in selective_scan_bwd_*.cu).
//
// With a_t = exp(d_t A), b_t = d_t B_t u_t, gy_t = dout_t * silu(z_t) [/ 2], the adjoint of the state is
//     lambda_t = a_{t+1} lambda_{t+1} + gy_t C_t,         lambda_{L-1} starts from dlast_state (or 0)
// and the gradients are (sums over the states n of a channel unless the target is per state):
//     dC_t += gy_t h_t          dB_t += lambda_t d_t u_t     (summed over the channels of a group)
//     du_t  = d_t sum_n lambda_t B_t + D gy_t
//     dd_t  = u_t sum_n lambda_t B_t + sum_n A lambda_t a_t h_{t-1};   ddelta_t = dd_t * softplus'(x_t)
//     dA   += lambda_t a_t h_{t-1} d_t      dD += gy_t u_t     dbias += ddelta_t     dh_{-1} = a_0 lambda_0
//     dz_t  = dout_t y_t silu'(z_t)         (y_t before the gate, saved by the forward)
// The two directions of the bidirectional scan run in different blocks (nothing couples their backward passes;
// dz comes from the forward direction's blocks). Chunks are visited last to first. For each, h is recomputed
// from the chunk's saved start state into registers (CHUNK * NPT floats per thread), then the chunk is walked
// backwards. The per-channel sums over n
// go through shared memory (one part per lane and step, summed in the output pass); dB/dC are summed over the
// warp's channels by shuffles, over the block's warps in shared memory (fixed order), and written per block to
// dB_part/dC_part, which the caller sums (deterministic), or, with p.atomic_sums, added with atomics into one part
// (dA likewise over splits and batch rows).
#pragma once

#include <algorithm>

#include "selective_scan_common.cuh"
#include "selective_scan_lanes.cuh"

namespace matten_scan {

template <int TPC, int NPT, int CHUNK, int NWARPS>
struct BwdSmem {
  static constexpr int NT = NWARPS * 32;
  static constexpr int CPB = NT / TPC;
  static constexpr int NP = TPC * NPT;
  float2 ddu[CPB][CHUNK];   // (d, d*u)
  float u[CPB][CHUNK];
  float gy[CPB][CHUNK];
  float sig[CPB][CHUNK];    // d(d)/d(delta)
  alignas(16) float2 bc[CHUNK][NP + 2];  // (B, C); +2: the staging writes go down a column
  alignas(16) float q[CHUNK][NT + 4];    // per-lane parts of sum_n lambda B; +4 spreads the output pass's reads
  alignas(16) float w[CHUNK][NT + 4];    // per-lane parts of sum_n A lambda a h_{t-1}
  float dB[CHUNK][NWARPS][NP];
  float dC[CHUNK][NWARPS][NP];
};

// Register budget per thread (sets the blocks per SM the compiler must allow): the recomputed states, six
// per-state values, the prefetch registers, and ~48 for the rest.
template <int TPC, int NPT, int CHUNK, int NWARPS>
constexpr int bwd_min_blocks() {
  constexpr int regs = CHUNK * NPT + 6 * NPT + 48 + 8 * (CHUNK / TPC);
  constexpr int blocks = 65536 / (NWARPS * 32 * regs);
  return blocks > 0 ? blocks : 1;
}

template <typename T, int TPC, int NPT, int CHUNK, int NWARPS, int MINB = bwd_min_blocks<TPC, NPT, CHUNK, NWARPS>()>
__global__ void __launch_bounds__(NWARPS * 32, MINB) scan_bwd_kernel(const ScanParams p) {
  using Shape = TileShape<TPC, NPT, CHUNK, NWARPS>;
  constexpr int NT = Shape::NT, CPB = Shape::CPB, TILE = Shape::TILE, EPT = Shape::EPT, BC_TILE = Shape::BC_TILE;
  constexpr int BPT = Shape::BPT;
  static_assert(NT % TPC == 0 && 32 % TPC == 0 && CHUNK <= 32 && NT % CHUNK == 0 && TPC % 4 == 0,
                "bad configuration");
  using Smem = BwdSmem<TPC, NPT, CHUNK, NWARPS>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& S = *reinterpret_cast<Smem*>(smem_raw);

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid / 32;
  const int c_loc = tid / TPC;
  const int k = tid % TPC;
  const int ndir = p.bidirectional ? 2 : 1;  // the directions run in different blocks: grid.z = batch * ndir
  const int b = blockIdx.z / ndir;
  const int dir = blockIdx.z % ndir;
  const int nb = gridDim.x / p.nsplit;   // blocks per segment of channels
  const int si = blockIdx.x / nb;         // this block's split of the sequence
  const int cb = blockIdx.x % nb;
  const int seg_start = blockIdx.y * p.seg;
  const int c0 = seg_start + cb * CPB;
  const int c_end = seg_start + p.seg;
  const int chan = c0 + c_loc;
  const bool chan_ok = chan < c_end;
  const int L = p.L, N = p.N, dim = p.dim, batch = p.batch;
  const int nchunks = (L + CHUNK - 1) / CHUNK;
  const int c_lo = si * p.split_chunks;
  const int c_hi = min(c_lo + p.split_chunks, nchunks);
  const bool has_z = p.z != nullptr;
  const T* __restrict__ zp = static_cast<const T*>(p.z);
  const T* __restrict__ doutp = static_cast<const T*>(p.dout);
  const T* __restrict__ ysp = static_cast<const T*>(p.y_saved_in);

  for (int di = dir; di <= dir; ++di) {
    const DirParams& dp = p.dir[di];
    const bool reverse = di == 1;
    const int G = dp.groups;
    const int dpg = dim / G;
    const int g = c0 / dpg;
    const int segs_per_group = dpg / p.seg;
    const int part = (blockIdx.y % segs_per_group) * nb + cb;  // index into dB_part
    const T* __restrict__ u = static_cast<const T*>(dp.u);
    const T* __restrict__ delta = static_cast<const T*>(dp.delta);
    const T* __restrict__ Bp = static_cast<const T*>(dp.B);
    const T* __restrict__ Cp = static_cast<const T*>(dp.C);
    // batch strides: index offsets from the contiguous layout's (the sums are the true, non-negative indices)
    const long long zoff = (long long)b * (p.z_bstride - (long long)dim * L);
    const long long dzoff = (long long)b * (p.dz_bstride - (long long)dim * L);
    const long long boff = (long long)b * (dp.B_bstride - (long long)G * N * L);
    const long long coff = (long long)b * (dp.C_bstride - (long long)G * N * L);
    const bool do_dz = has_z && di == 0;

    float A[NPT], A2[NPT], lam[NPT], a_next[NPT], dA_acc[NPT];
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int n = k * NPT + i;
      const bool ok = chan_ok && n < N;
      A[i] = ok ? dp.A[(size_t)chan * N + n] : 0.f;
      A2[i] = A[i] * kLog2e;
      lam[i] = (ok && p.dlast_state != nullptr && !p.bidirectional)
                   ? p.dlast_state[((size_t)b * dim + chan) * N + n] : 0.f;
      // Compose the summaries of the later splits: rho <- exp2(A2 * sum_d) rho + rho_split (rho = a * lambda).
      for (int s2 = p.nsplit - 1; s2 > si && ok; --s2) {
        const size_t row = split_row(p, di, s2, b, chan);
        lam[i] = fmaf(fast_exp2(A2[i] * p.split_sumd[row]), lam[i], p.split_state[row * N + n]);
      }
      a_next[i] = 1.f;
      dA_acc[i] = 0.f;
    }
    float accD[EPT], accBias[EPT];
#pragma unroll
    for (int r = 0; r < EPT; ++r) accD[r] = accBias[r] = 0.f;

    float row_bias[EPT], row_D[EPT];  // per-row constants, read once
    tile_row_consts<EPT, NT, TILE, CHUNK>(dp.delta_bias, c0, c_end, row_bias);
    tile_row_consts<EPT, NT, TILE, CHUNK>(dp.D, c0, c_end, row_D);
    T r_u[EPT], r_dt[EPT], r_do[EPT], r_z[EPT], r_ys[EPT], r_B[BPT], r_C[BPT];
    float r_h0[NPT];  // the chunk's saved start state
    auto load = [&](int c) {
#pragma unroll
      for (int i = 0; i < NPT; ++i) {
        const int n = k * NPT + i;
        const size_t row = (size_t)b * dim + chan;
        r_h0[i] = (chan_ok && n < N) ? saved_state(p, dp.states + row * kept_slots(nchunks) * N, c, 0, row, n) : 0.f;
      }
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const bool ok = e < TILE && tau < L && c0 + row < c_end;
        const size_t idx = ((size_t)b * dim + c0 + row) * L + natural_t(tau, L, reverse);
        r_u[r] = load_or_zero(u, idx, ok);
        r_dt[r] = load_or_zero(delta, idx, ok);
        r_do[r] = load_or_zero(doutp, idx, ok);
        r_z[r] = load_or_zero(zp, idx + zoff, ok && has_z);
        r_ys[r] = load_or_zero(ysp, idx, ok && do_dz);
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
          const int tau = c * CHUNK + j;
          const bool ok = tau < L && c0 + row < c_end;
          float uu = to_float(r_u[r]);
          float x = to_float(r_dt[r]);
          x += row_bias[r];
          float d = x, sig = 1.f;
          if (p.delta_softplus) softplus_and_grad(x, d, sig);
          const float go = to_float(r_do[r]);
          float gy = go;
          if (has_z) {
            const float zz = to_float(r_z[r]);
            const float sz = sigmoid(zz);
            gy = go * zz * sz;
            if (do_dz && ok) {
              const float dz = go * to_float(r_ys[r]) * sz * (1.f + zz * (1.f - sz));
              const size_t idx = ((size_t)b * dim + c0 + row) * L + natural_t(tau, L, reverse);
              static_cast<T*>(p.dz)[idx + dzoff] = from_float<T>(dz);
            }
          }
          if (p.divide_out) gy *= 0.5f;
          if (!ok) d = uu = gy = 0.f;
          S.ddu[row][j] = make_float2(d, d * uu);
          S.u[row][j] = uu;
          S.gy[row][j] = gy;
          S.sig[row][j] = sig;
        }
      }
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT;
        if (e < BC_TILE) S.bc[e % CHUNK][e / CHUNK] = make_float2(to_float(r_B[r]), to_float(r_C[r]));
      }
    };

    load(c_hi - 1);
    for (int c = c_hi - 1; c >= c_lo; --c) {
      __syncthreads();
      stage(c);
      __syncthreads();
      // Recompute the chunk's states from its saved start state.
      float h0[NPT], hs[CHUNK][NPT];
#pragma unroll
      for (int i = 0; i < NPT; ++i) h0[i] = r_h0[i];
      if (c > c_lo) load(c - 1);

#pragma unroll
      for (int j = 0; j < CHUNK; ++j) {
        const float2 ddu = S.ddu[c_loc][j];
        float2 bc[NPT];
        load_bc<NPT>(S.bc, j, k, bc);
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
          const float a = fast_exp2(ddu.x * A2[i]);
          hs[j][i] = fmaf(a, j > 0 ? hs[j - 1][i] : h0[i], ddu.y * bc[i].x);
        }
      }

      // Walk the chunk backwards. The only carried dependency is lambda; the per-lane parts of the sums over n
      // go to shared memory.
#pragma unroll
      for (int j = CHUNK - 1; j >= 0; --j) {
        const float2 ddu = S.ddu[c_loc][j];
        const float gy = S.gy[c_loc][j];
        float2 bc[NPT];
        load_bc<NPT>(S.bc, j, k, bc);
        float q_acc = 0.f, w_acc = 0.f;
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
          const int n = k * NPT + i;
          lam[i] = fmaf(a_next[i], lam[i], gy * bc[i].y);
          const float h_prev = j > 0 ? hs[j - 1][i] : h0[i];
          const float a = fast_exp2(ddu.x * A2[i]);
          float dBp = lam[i] * ddu.y;
          float dCp = gy * hs[j][i];
#pragma unroll
          for (int m = TPC; m < 32; m *= 2) {  // sum over the warp's channels
            dBp += __shfl_xor_sync(0xffffffffu, dBp, m);
            dCp += __shfl_xor_sync(0xffffffffu, dCp, m);
          }
          if (lane < TPC) {
            S.dB[j][warp][n] = dBp;
            S.dC[j][warp][n] = dCp;
          }
          const float w = lam[i] * a * h_prev;
          dA_acc[i] = fmaf(w, ddu.x, dA_acc[i]);
          q_acc = fmaf(lam[i], bc[i].x, q_acc);
          w_acc = fmaf(w, A[i], w_acc);
          a_next[i] = a;
        }
        S.q[j][tid] = q_acc;
        S.w[j][tid] = w_acc;
      }
      __syncthreads();

      // Per (channel, step): du, ddelta; accumulate dD, dbias.
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, j = e % CHUNK;
        const int tau = c * CHUNK + j, ch = c0 + row;
        if (e < TILE && tau < L && ch < c_end) {
          const size_t idx = ((size_t)b * dim + ch) * L + natural_t(tau, L, reverse);
          const float sq = sum_parts<TPC>(&S.q[j][row * TPC]);  // padding states contribute zeros
          const float saw = sum_parts<TPC>(&S.w[j][row * TPC]);
          const float d = S.ddu[row][j].x, uu = S.u[row][j], gy = S.gy[row][j];
          float du = d * sq;
          du = fmaf(row_D[r], gy, du);
          const float ddelta = fmaf(uu, sq, saw) * S.sig[row][j];
          static_cast<T*>(dp.du)[idx] = from_float<T>(du);
          static_cast<T*>(dp.ddelta)[idx] = from_float<T>(ddelta);
          accD[r] = fmaf(gy, uu, accD[r]);
          accBias[r] += ddelta;
        }
      }
      // Per (state, step): dB, dC summed over the block's warps.
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT, n = e / CHUNK, j = e % CHUNK;
        const int tau = c * CHUNK + j;
        if (e < BC_TILE && n < N && tau < L) {
          float sB = 0.f, sC = 0.f;
#pragma unroll
          for (int w = 0; w < NWARPS; ++w) {
            sB += S.dB[j][w][n];
            sC += S.dC[j][w][n];
          }
          const size_t idx = ((((size_t)(p.atomic_sums ? 0 : part) * batch + b) * G + g) * N + n) * L +
                             natural_t(tau, L, reverse);
          if (p.atomic_sums) {
            atomicAdd(dp.dB_part + idx, sB);
            atomicAdd(dp.dC_part + idx, sC);
          } else {
            dp.dB_part[idx] = sB;
            dp.dC_part[idx] = sC;
          }
        }
      }
    }

    // Per-thread results: dA (per split and batch row), dinitial_state, dD and dbias (summed over the row's
    // lanes, per split and batch row).
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int n = k * NPT + i;
      if (chan_ok && n < N) {
        const size_t idx = ((size_t)b * dim + chan) * N + n;
        if (p.atomic_sums)
          atomicAdd(dp.dA_part + (size_t)chan * N + n, dA_acc[i]);
        else
          dp.dA_part[(size_t)si * batch * dim * N + idx] = dA_acc[i];
        if (!p.bidirectional && p.dinitial_state != nullptr && si == 0) p.dinitial_state[idx] = a_next[i] * lam[i];
      }
    }
#pragma unroll
    for (int r = 0; r < EPT; ++r) {
#pragma unroll
      for (int m = 1; m < CHUNK; m *= 2) {
        accD[r] += __shfl_xor_sync(0xffffffffu, accD[r], m);
        accBias[r] += __shfl_xor_sync(0xffffffffu, accBias[r], m);
      }
      const int e = tid + r * NT, row = e / CHUNK;
      if (e < TILE && e % CHUNK == 0 && c0 + row < c_end) {
        const size_t idx = ((size_t)si * batch + b) * dim + c0 + row;
        dp.dD_part[idx] = accD[r];
        dp.dbias_part[idx] = accBias[r];
      }
    }
  }
}

// Split summaries of the backward: for every split but the first, the adjoint rho = a * lambda it passes to its
// start when run from zero (rho_t = a_t (rho_{t+1} + gy_t C_t)), and the sum of d over it.
template <typename T, int TPC, int NPT, int CHUNK, int NWARPS>
__global__ void __launch_bounds__(NWARPS * 32) scan_bwd_split_kernel(const ScanParams p) {
  using Shape = TileShape<TPC, NPT, CHUNK, NWARPS>;
  constexpr int NT = Shape::NT, CPB = Shape::CPB, NP = Shape::NP, TILE = Shape::TILE, EPT = Shape::EPT;
  constexpr int BC_TILE = Shape::BC_TILE, BPT = Shape::BPT;
  __shared__ float2 s_dg[CPB][CHUNK];                 // (d, gy)
  __shared__ alignas(16) float2 s_c[CHUNK][NP + 2];  // (0, C): the layout load_bc reads

  const int tid = threadIdx.x, c_loc = tid / TPC, k = tid % TPC;
  const int ndir = p.bidirectional ? 2 : 1;  // the directions run in different blocks: grid.z = batch * ndir
  const int b = blockIdx.z / ndir;
  const int dir = blockIdx.z % ndir;
  const int nb = gridDim.x / p.nsplit;
  const int si = blockIdx.x / nb;
  if (si == 0) return;  // nothing composes the first split's summary (uniform per block)
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
  const T* __restrict__ zp = static_cast<const T*>(p.z);
  const T* __restrict__ doutp = static_cast<const T*>(p.dout);

  for (int di = dir; di <= dir; ++di) {
    const DirParams& dp = p.dir[di];
    const bool reverse = di == 1;
    const int G = dp.groups;
    const int g = c0 / (dim / G);
    const T* __restrict__ delta = static_cast<const T*>(dp.delta);
    const T* __restrict__ Cp = static_cast<const T*>(dp.C);
    const long long zoff = (long long)b * (p.z_bstride - (long long)dim * L);
    const long long coff = (long long)b * (dp.C_bstride - (long long)G * N * L);
    float A2[NPT], rho[NPT];
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int n = k * NPT + i;
      A2[i] = (chan_ok && n < N) ? dp.A[(size_t)chan * N + n] * kLog2e : 0.f;
      rho[i] = 0.f;
    }
    float row_bias[EPT];
    tile_row_consts<EPT, NT, TILE, CHUNK>(dp.delta_bias, c0, c_end, row_bias);
    T r_dt[EPT], r_do[EPT], r_z[EPT], r_C[BPT];
    auto load = [&](int c) {
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const bool ok = e < TILE && tau < L && c0 + row < c_end;
        const size_t idx = ((size_t)b * dim + c0 + row) * L + natural_t(tau, L, reverse);
        r_dt[r] = load_or_zero(delta, idx, ok);
        r_do[r] = load_or_zero(doutp, idx, ok);
        r_z[r] = load_or_zero(zp, idx + zoff, ok && has_z);
      }
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT, n = e / CHUNK, tau = c * CHUNK + e % CHUNK;
        const size_t idx = (((size_t)b * G + g) * N + n) * L + natural_t(tau, L, reverse);
        r_C[r] = load_or_zero(Cp, idx + coff, e < BC_TILE && n < N && tau < L);
      }
    };
    float sum_d = 0.f;
    load(c_hi - 1);
    for (int c = c_hi - 1; c >= c_lo; --c) {
      __syncthreads();
#pragma unroll
      for (int r = 0; r < EPT; ++r) {
        const int e = tid + r * NT, row = e / CHUNK, j = e % CHUNK;
        if (e < TILE) {
          const bool ok = c * CHUNK + j < L && c0 + row < c_end;
          const float x = to_float(r_dt[r]) + row_bias[r];
          float d = x, unused;
          if (p.delta_softplus) softplus_and_grad(x, d, unused);
          float gy = to_float(r_do[r]);
          if (has_z) {
            const float zz = to_float(r_z[r]);
            gy *= zz * sigmoid(zz);
          }
          if (p.divide_out) gy *= 0.5f;
          if (!ok) d = gy = 0.f;
          s_dg[row][j] = make_float2(d, gy);
        }
      }
#pragma unroll
      for (int r = 0; r < BPT; ++r) {
        const int e = tid + r * NT;
        if (e < BC_TILE) s_c[e % CHUNK][e / CHUNK] = make_float2(0.f, to_float(r_C[r]));
      }
      __syncthreads();
      if (c > c_lo) load(c - 1);
#pragma unroll
      for (int j = CHUNK - 1; j >= 0; --j) {
        const float2 dg = s_dg[c_loc][j];
        float2 bc[NPT];
        load_bc<NPT>(s_c, j, k, bc);
        sum_d += dg.x;
#pragma unroll
        for (int i = 0; i < NPT; ++i) rho[i] = fast_exp2(dg.x * A2[i]) * fmaf(dg.y, bc[i].y, rho[i]);
      }
    }
    if (chan_ok) store_split_summary<NPT>(p, split_row(p, di, si, b, chan), k, rho, sum_d);
  }
}

template <typename T, int TPC, int NPT, int CHUNK, int NWARPS>
cudaError_t launch_bwd_config(const ScanParams& p, cudaStream_t stream) {
  constexpr int CPB = NWARPS * 32 / TPC;
  constexpr size_t smem = sizeof(BwdSmem<TPC, NPT, CHUNK, NWARPS>);
  auto kernel = scan_bwd_kernel<T, TPC, NPT, CHUNK, NWARPS>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.seg + CPB - 1) / CPB * p.nsplit, p.dim / p.seg, p.batch * (p.bidirectional ? 2 : 1));
  if (p.nsplit > 1) scan_bwd_split_kernel<T, TPC, NPT, CHUNK, NWARPS><<<grid, NWARPS * 32, 0, stream>>>(p);
  kernel<<<grid, NWARPS * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const ScanParams& p, int config, cudaStream_t stream) {
  if (config == kLanesConfig) return launch_lanes<T, false>(p, stream);
  switch (config) {
#define MATTEN_SCAN_BWD_CASE(ID, TPC, NPT, CHUNK, NWF, NWB) \
  case ID:                                                  \
    return launch_bwd_config<T, TPC, NPT, CHUNK, NWB>(p, stream);
    MATTEN_SCAN_CONFIGS(MATTEN_SCAN_BWD_CASE)
#undef MATTEN_SCAN_BWD_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace matten_scan

namespace matten_scan {

// The backward's finish: every direction's partial sums summed in a fixed order (deterministic) into the gradients,
// dB/dC cast to T, in one launch (grid.y: the direction). It replaced five torch kernels a direction (four sums or
// casts and a fill) whose launches and gaps cost ~2 us each after the backward. Work items, grid-stride: dB's and
// dC's elements by fours, then dA's, then dD's and dbias's.
template <typename T>
__global__ void __launch_bounds__(256) scan_finish_kernel(const ScanParams p) {
  const DirParams& q = p.dir[blockIdx.y];
  const long long nbc = (long long)p.batch * q.groups * p.N * p.L;  // elements of dB (and of dC)
  const long long nquad = (nbc + 3) / 4, nA = (long long)p.dim * p.N;
  const int rows = p.nsplit * p.batch;  // partial sums of dD / dbias (and of dA without atomic_sums)
  const int rows_A = p.atomic_sums ? 1 : rows;
  const long long total = 2 * nquad + nA + 2 * (long long)p.dim;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    if (i < 2 * nquad) {
      const bool c = i >= nquad;
      const float* src = c ? q.dC_part : q.dB_part;
      T* dst = static_cast<T*>(c ? q.dC : q.dB);
      if (dst == nullptr) continue;
      const long long k = (i - (c ? nquad : 0)) * 4;
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      if (nbc % 4 == 0) {  // every quad 16-byte aligned
        for (int part = 0; part < q.parts; ++part) {
          const float4 v = *reinterpret_cast<const float4*>(src + part * nbc + k);
          s[0] += v.x, s[1] += v.y, s[2] += v.z, s[3] += v.w;
        }
      } else {
        for (int part = 0; part < q.parts; ++part)
          for (int j = 0; j < 4; ++j)
            if (k + j < nbc) s[j] += src[part * nbc + k + j];
      }
      for (int j = 0; j < 4; ++j)
        if (k + j < nbc) dst[k + j] = from_float<T>(s[j]);
    } else if (i < 2 * nquad + nA) {
      const long long k = i - 2 * nquad;
      float s = 0.f;
      for (int r = 0; r < rows_A; ++r) s += q.dA_part[r * nA + k];
      if (q.dA) q.dA[k] = s;
    } else {
      const long long k = i - 2 * nquad - nA;
      const bool bias = k >= p.dim;
      const int c = (int)(bias ? k - p.dim : k);
      float* dst = bias ? q.dbias : q.dD;
      if (dst == nullptr) continue;
      const float* src = bias ? q.dbias_part : q.dD_part;
      float s = 0.f;
      for (int r = 0; r < rows; ++r) s += src[(long long)r * p.dim + c];
      dst[c] = s;
    }
  }
}

template <typename T>
cudaError_t launch_finish(const ScanParams& p, cudaStream_t stream) {
  const int ndir = p.bidirectional ? 2 : 1;
  long long most = 0;
  for (int d = 0; d < ndir; ++d) {
    const DirParams& q = p.dir[d];
    most = std::max(most, 2 * (((long long)p.batch * q.groups * p.N * p.L + 3) / 4) + (long long)p.dim * p.N +
                              2 * (long long)p.dim);
  }
  const long long blocks = std::min<long long>((most + 255) / 256, 4 * 1024);
  scan_finish_kernel<T><<<dim3((unsigned)blocks, ndir), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace matten_scan
