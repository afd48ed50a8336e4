// Forward of the selective scan with the time axis sequential in each thread ("seq" forward), uni- and
// bidirectional, for N <= 16: a drop-in for the lanes forward (selective_scan_lanes.cuh) with the same outputs
// (out, the state at every 256-step window start in scan order but the first, last_state), so the lanes backward
// reads them.
//
// Layout. A lane owns NPT = 4 adjacent states of one channel (TPC = 4 lanes per channel, CPW = 8 channels per warp,
// channels fastest across the lanes, all of one batch row and one B/C group) and runs h_t = exp2(d_t A_n log2 e)
// h_{t-1} + d_t u_t B_t over the whole sequence in chunks of 32 steps: one exp2 per (step, state) and no scan across
// lanes (~6 SASS instructions an element in the step loop; the lanes forward's shuffle scan needs ~14). Per chunk
// and warp:
//   stage  - each lane converts 16 of the chunk's 512 B and C values into the warp's shared (B, C) tile, and
//            computes d = softplus(delta + bias) and d*u for its EPL (channel, step) elements;
//   scan   - per step: (d, du) and this lane's (B, C) from shared memory, NPT states advanced in registers, the
//            lane's part of <C_t, h_t> per step to shared memory (8 steps at a time);
//   reduce - each lane sums the TPC parts of its EPL elements, adds D u, gates and stores them (one vector store).
// The next chunk's global loads are issued before the scan of the current one. A block is one warp (synchronised
// only with __syncwarp). Shared-memory traffic, not the instruction count, decides the speed: with the channels fastest a quarter-warp reads two (B, C) addresses (spatial
// XL forward 0.245 -> 0.197 ms on an H100, benchmarks/NOTES_scan.md, session 12). One warp runs a whole row, so with
// few channels (4.4 warps per SM at global XL) it is latency-bound and the lanes forward is faster.
// Bidirectional: two launches (LanesPass), the backward direction first (from the end, over the natural-order *_b
// inputs; its pre-gate y, D u included, to the fp32 scratch ws), then the forward one, which adds it, halves
// (divide_out), gates and stores out: no flipped copies and each out element is written once. (Until session 16 one
// launch of two-warp blocks, the warps meeting at the middle of the row: H100, bf16, bi spatial XL fwd 0.533 ms
// against 0.396 for the two launches, benchmarks/results/cuda-lanes-variants-NVIDIA-H100-80GB-HBM3-0bc7100-seq-split.json.)
// Requirements (seq_fwd_applies, selective_scan.h; else the lanes forward runs): N <= 16, L % 32 == 0, 16-byte
// aligned rows (p.lanes_vec), dim / G a multiple of CPW for every direction. The default only where there are many
// channels (kSeqMinWarpsPerSM): one warp runs a whole row, so with few channels the lanes forward is faster.
#pragma once

#include "selective_scan_lanes.cuh"

namespace matten_scan {

// kSeqChunk (steps per chunk), kSeqN (states per channel; N < 16 masked: A = B = C = 0), kSeqNpt: selective_scan.h
constexpr int kSeqSaveChunks = kLanesWindow / kSeqChunk;  // chunks per saved state (the lanes backward's window)

template <typename T, int E>
struct alignas(sizeof(T) * E > 16 ? 16 : sizeof(T) * E) SeqVec {
  T v[E];
};

template <typename T, int E>
__device__ __forceinline__ SeqVec<T, E> seq_load(const T* __restrict__ p) {
  return *reinterpret_cast<const SeqVec<T, E>*>(p);
}

template <int NPT>
struct SeqShape {
  static constexpr int TPC = kSeqN / NPT;         // lanes per channel
  static constexpr int CPW = 32 / TPC;            // channels per warp
  static constexpr int EPL = kSeqChunk / TPC;     // (channel, step) elements per lane and chunk
};

template <int NPT>
struct SeqSmem {
  float2 bc[kSeqChunk][kSeqN];                      // (B, C) per step and state
  float2 ddu[SeqShape<NPT>::CPW][kSeqChunk + 2];    // (d, d u) per channel and step; +2: rows on different banks
  float yp[32][kSeqChunk + 4];                      // per-lane parts of y; +4: conflict-free 16-byte access
};

// The raw global loads of one chunk for one lane.
template <typename T, int NPT>
struct SeqRaw {
  SeqVec<T, SeqShape<NPT>::EPL> u, dt, z;
  SeqVec<T, 16> B, C;
};

template <typename T, int NPT>
struct SeqRows {
  const T *u, *dt, *z, *B, *C;  // u / dt / z: this lane's channel row; B / C: this lane's state row (or null)
  T* out;
  T* ys;  // y before the gate (with z, when saved for the backward) or null
  float* ws;
};

// One direction of the forward for one warp, chunks c_first, c_first +- 1, .. (count of them). PHASE: 0 =
// unidirectional (out written); bidirectional: 1 = the backward direction (y to ws), 2 = the forward one (+ ws, out
// written).
template <typename T, int NPT, bool REV>
__device__ __forceinline__ void seq_fwd_chunks(const ScanParams& p, const SeqRows<T, NPT>& r,
                                               SeqSmem<NPT>& s, int c_first, int count, int phase,
                                               const float (&A2)[NPT], float (&h)[NPT], float* states_row,
                                               float bias, float Dv) {
  using S = SeqShape<NPT>;
  constexpr int EPL = S::EPL;
  const int lane = threadIdx.x & 31, cw = lane % S::CPW, k = lane / S::CPW;  // channels fastest: a quarter-warp reads few (B, C) addresses
  const int nB = lane >> 1, half = lane & 1;
  const bool softplus = p.delta_softplus;
  const bool gate = r.z != nullptr && phase != 1;
  const float scale = p.divide_out ? 0.5f : 1.f;
  const int nwin = (p.L + kLanesWindow - 1) / kLanesWindow;
  auto chunk_of = [&](int i) { return REV ? c_first - i : c_first + i; };
  auto load = [&](int c, SeqRaw<T, NPT>& raw) {
    const int t0 = c * kSeqChunk;
    raw.u = seq_load<T, EPL>(r.u + t0 + k * EPL);
    raw.dt = seq_load<T, EPL>(r.dt + t0 + k * EPL);
    if (gate) raw.z = seq_load<T, EPL>(r.z + t0 + k * EPL);
    if (r.B) {
      raw.B = seq_load<T, 16>(r.B + t0 + half * 16);
      raw.C = seq_load<T, 16>(r.C + t0 + half * 16);
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) raw.B.v[i] = raw.C.v[i] = from_float<T>(0.f);
    }
  };
  if (count <= 0) return;
  SeqRaw<T, NPT> raw;
  load(chunk_of(0), raw);
  for (int i = 0; i < count; ++i) {
    const int c = chunk_of(i);
    // the state entering a 256-step window in scan order (forward: before its first step, backward: before its last)
    // (one in kLanesStateStride windows: the first of its group in scan order, at slot w / kLanesStateStride)
    if (states_row && (REV ? ((c + 1) % kSeqSaveChunks == 0 || c == p.L / kSeqChunk - 1) : c % kSeqSaveChunks == 0)) {
      const int w = REV ? min(c / kSeqSaveChunks, nwin - 1) : c / kSeqSaveChunks;
      const int s = w / kLanesStateStride, first = REV ? (nwin - 1) / kLanesStateStride : 0;
      if (s != first && lanes_saves_state(w, nwin, REV)) {  // the first slot is not kept (kept_slots)
#pragma unroll
        for (int q = 0; q < NPT; ++q)
          if (k * NPT + q < p.N) states_row[(size_t)saved_index(s, first) * p.N + k * NPT + q] = h[q];
      }
    }
    // stage
    float uu[EPL], zz[EPL];
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      uu[e] = to_float(raw.u.v[e]);
      zz[e] = gate ? to_float(raw.z.v[e]) : 0.f;
      float d = to_float(raw.dt.v[e]) + bias;
      if (softplus) d = fast_softplus(d);
      s.ddu[cw][k * EPL + e] = make_float2(d, d * uu[e]);
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) s.bc[half * 16 + j][nB] = make_float2(to_float(raw.B.v[j]), to_float(raw.C.v[j]));
    __syncwarp();
    if (i + 1 < count) load(chunk_of(i + 1), raw);
    // scan, 8 steps at a time (their parts of y go to shared memory as two 16-byte stores)
#pragma unroll 1
    for (int sub = 0; sub < kSeqChunk / 8; ++sub) {
      const int j0 = REV ? kSeqChunk - 8 - sub * 8 : sub * 8;
      float acc[8];
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int jl = REV ? 7 - jj : jj;
        const float2 ddu = s.ddu[cw][j0 + jl];
        float2 bc[NPT];
        load_bc<NPT>(s.bc, j0 + jl, k, bc);
        float y = 0.f;
#pragma unroll
        for (int q = 0; q < NPT; ++q) {
          h[q] = fmaf(fast_exp2(ddu.x * A2[q]), h[q], ddu.y * bc[q].x);
          y = fmaf(bc[q].y, h[q], y);
        }
        acc[jl] = y;
      }
      *reinterpret_cast<float4*>(&s.yp[lane][j0]) = make_float4(acc[0], acc[1], acc[2], acc[3]);
      *reinterpret_cast<float4*>(&s.yp[lane][j0 + 4]) = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    // reduce over the TPC lanes of the channel
    __syncwarp();
    float y[EPL];
#pragma unroll
    for (int e = 0; e < EPL; ++e) y[e] = Dv * uu[e];
#pragma unroll
    for (int kk = 0; kk < S::TPC; ++kk) {
      const float* part = &s.yp[kk * S::CPW + cw][k * EPL];
#pragma unroll
      for (int e = 0; e < EPL; e += 2) {
        const float2 v = *reinterpret_cast<const float2*>(part + e);
        y[e] += v.x, y[e + 1] += v.y;
      }
    }
    // y out
    const int t = c * kSeqChunk + k * EPL;
    if (phase == 1) {
#pragma unroll
      for (int e = 0; e < EPL; e += 2) *reinterpret_cast<float2*>(r.ws + t + e) = make_float2(y[e], y[e + 1]);
      continue;
    }
    if (phase == 2) {
#pragma unroll
      for (int e = 0; e < EPL; e += 2) {
        const float2 v = *reinterpret_cast<const float2*>(r.ws + t + e);
        y[e] = (y[e] + v.x) * scale, y[e + 1] = (y[e + 1] + v.y) * scale;
      }
    }
    SeqVec<T, EPL> o;
    if (gate && r.ys) {  // y before the gate, for the backward's dz
#pragma unroll
      for (int e = 0; e < EPL; ++e) o.v[e] = from_float<T>(y[e]);
      *reinterpret_cast<SeqVec<T, EPL>*>(r.ys + t) = o;
    }
#pragma unroll
    for (int e = 0; e < EPL; ++e) o.v[e] = from_float<T>(gate ? y[e] * zz[e] * fast_sigmoid(zz[e]) : y[e]);
    *reinterpret_cast<SeqVec<T, EPL>*>(r.out + t) = o;
  }
}

template <typename T, int NPT>
__device__ __forceinline__ SeqRows<T, NPT> seq_rows(const ScanParams& p, const DirParams& dp, int b, int chan,
                                                    int nB) {
  const size_t row = ((size_t)b * p.dim + chan) * p.L;
  const int g = chan / (p.dim / dp.groups);
  const size_t bc = ((size_t)g * p.N + nB) * p.L;  // within a batch row of B / C
  SeqRows<T, NPT> r;
  r.u = static_cast<const T*>(dp.u) + row;
  r.dt = static_cast<const T*>(dp.delta) + row;
  r.z = p.z ? static_cast<const T*>(p.z) + (size_t)b * p.z_bstride + (size_t)chan * p.L : nullptr;
  r.B = nB < p.N ? static_cast<const T*>(dp.B) + (size_t)b * dp.B_bstride + bc : nullptr;
  r.C = nB < p.N ? static_cast<const T*>(dp.C) + (size_t)b * dp.C_bstride + bc : nullptr;
  r.out = static_cast<T*>(p.out) + row;
  r.ys = p.y_saved ? static_cast<T*>(p.y_saved) + row : nullptr;
  r.ws = p.ws ? p.ws + row : nullptr;
  return r;
}

// Block: one warp; PASS (LanesPass): the unidirectional scan or one direction of the bidirectional one (two launches,
// as the lanes kernels). grid (dim / CPW, batch).
template <typename T, int NPT, int PASS>
__global__ void __launch_bounds__(32, 16) scan_fwd_seq_kernel(const ScanParams p) {
  using S = SeqShape<NPT>;
  __shared__ alignas(16) SeqSmem<NPT> s;
  const int dir = PASS == kPassBiRev ? 1 : 0;
  const int lane = threadIdx.x & 31, cw = lane % S::CPW, k = lane / S::CPW;  // channels fastest: a quarter-warp reads few (B, C) addresses
  const int b = blockIdx.y;
  const int chan = blockIdx.x * S::CPW + cw;
  const DirParams& dp = p.dir[dir];
  const size_t row = (size_t)b * p.dim + chan;
  constexpr int kSaveSpan = kLanesWindow * kLanesStateStride;  // steps per saved state
  const int nch = p.L / kSeqChunk, nsave = (p.L + kSaveSpan - 1) / kSaveSpan;
  float A2[NPT], h[NPT];
#pragma unroll
  for (int q = 0; q < NPT; ++q) {
    const int n = k * NPT + q;
    A2[q] = n < p.N ? dp.A[(size_t)chan * p.N + n] * kLog2e : 0.f;
    h[q] = (PASS == kPassUni && n < p.N && p.initial_state) ? p.initial_state[row * p.N + n] : 0.f;
  }
  const float bias = dp.delta_bias ? dp.delta_bias[chan] : 0.f, Dv = dp.D ? dp.D[chan] : 0.f;
  float* states_row = dp.states ? dp.states + row * kept_slots(nsave) * p.N : nullptr;
  const SeqRows<T, NPT> r = seq_rows<T, NPT>(p, dp, b, chan, lane >> 1);
  if constexpr (PASS == kPassBiRev) {
    seq_fwd_chunks<T, NPT, true>(p, r, s, nch - 1, nch, 1, A2, h, states_row, bias, Dv);  // y to ws
  } else if constexpr (PASS == kPassBiFwd) {
    seq_fwd_chunks<T, NPT, false>(p, r, s, 0, nch, 2, A2, h, states_row, bias, Dv);  // + ws, out
  } else {
    seq_fwd_chunks<T, NPT, false>(p, r, s, 0, nch, 0, A2, h, states_row, bias, Dv);
    if (p.last_state) {
#pragma unroll
      for (int q = 0; q < NPT; ++q)
        if (k * NPT + q < p.N) p.last_state[row * p.N + k * NPT + q] = h[q];
    }
  }
}

template <typename T, int NPT>
cudaError_t launch_seq_fwd_n(const ScanParams& p, cudaStream_t stream) {
  const dim3 grid(p.dim / SeqShape<NPT>::CPW, p.batch);
  if (!p.bidirectional) {
    scan_fwd_seq_kernel<T, NPT, kPassUni><<<grid, 32, 0, stream>>>(p);
  } else {
    scan_fwd_seq_kernel<T, NPT, kPassBiRev><<<grid, 32, 0, stream>>>(p);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    scan_fwd_seq_kernel<T, NPT, kPassBiFwd><<<grid, 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// p.fwd_kernel: 0 = the default (seq where it applies and there are enough channels, else lanes), 1 = lanes, 2 = seq
// (an error where it does not apply). Returns cudaErrorNotSupported when the lanes forward should run instead.
template <typename T>
cudaError_t launch_seq_fwd(const ScanParams& p, cudaStream_t stream) {
  static_assert(SeqShape<kSeqNpt>::CPW == kSeqCpw, "selective_scan.h's kSeqCpw");
  if (p.fwd_kernel == 2 && !seq_fwd_applies(p)) return cudaErrorInvalidValue;
  // (seq_fwd_runs, selective_scan.h: the warps of one launch, a direction of the bidirectional scan, counted)
  return seq_fwd_runs(p) ? launch_seq_fwd_n<T, kSeqNpt>(p, stream) : cudaErrorNotSupported;
}

}  // namespace matten_scan
