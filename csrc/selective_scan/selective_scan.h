// Parameters and launchers of the CUDA selective scan (Mamba S6), uni- and bidirectional.
//
// Semantics: SPEC.md section 2. Plain C++ and the CUDA runtime only, so the kernel .cu files compile with
// `nvcc -c` without torch headers; the binding (selective_scan.cpp) fills these structs from tensors.
//
// Layout of the work. A thread owns NPT adjacent states of one channel (TPC threads per channel, TPC*NPT >= N) and
// runs the recurrence h_t = exp(d_t A) h_{t-1} + d_t B_t u_t sequentially over the whole sequence, in
// chunks of CHUNK time steps staged through shared memory (the next chunk's loads are in flight while the
// current one is computed). y_t = <C_t, h_t> is summed over the TPC threads of a channel in shared memory.
// The forward saves the state at the start of every chunk (fp32, (batch, dim, nchunks, N)); the backward
// recomputes h inside a chunk from that checkpoint and runs the adjoint recurrence backwards in time.
// A block holds CPB = 32*NWARPS/TPC channels of one batch row; its channels lie in one group of B/C for
// every direction (they come from one "segment" of `seg` channels, seg dividing dim/G of each direction).
// When batch*dim is too small to fill the GPU, the sequence is cut into `nsplit` splits run by different
// blocks: a light kernel first summarises each split (forward: the state it produces from zero and the sum
// of d over it, whose exp2(A*log2e*sum) is the split's total decay; backward: the adjoint it passes to its
// start from zero), then each block composes the summaries of the splits before it (after it, backward)
// into its starting state and scans its own split.
//
// Config kLanesConfig (the default for N <= 16 and L >= 256, uni- and bidirectional, outside deterministic mode)
// is a second layout: one warp per channel with the time axis across the lanes (selective_scan_lanes.cuh). Its
// forward is the "seq" kernel instead (selective_scan_seq.cuh: 4 states a lane, time sequential) where there are
// many channels (seq_fwd_applies and kSeqMinWarpsPerSM below); the backward is always the lanes one.
#pragma once

#include <cuda_runtime.h>

namespace matten_scan {

// (id, TPC threads per channel, NPT states per thread, CHUNK steps per tile, NWF / NWB warps per block of the
// forward / backward). The backward keeps CHUNK*NPT recomputed states per thread in registers, hence smaller chunks
// for large N; the forward uses small blocks (an even spread over the SMs), the backward larger ones (fewer dB/dC
// partial sums to write).
#define MATTEN_SCAN_CONFIGS(X) \
  X(0, 4, 1, 32, 4, 4)         \
  X(1, 8, 1, 32, 4, 4)         \
  X(2, 16, 1, 32, 4, 8)        \
  X(3, 16, 1, 16, 4, 8)        \
  X(4, 8, 2, 16, 4, 8)         \
  X(5, 32, 1, 32, 4, 8)        \
  X(6, 32, 2, 32, 4, 4)        \
  X(7, 32, 4, 16, 4, 4)        \
  X(8, 32, 8, 8, 4, 4)

constexpr int kNumConfigs = 10;

// Config 9 is the "lanes" kernel pair (selective_scan_lanes.cuh): N <= 16, one warp per channel with time across the
// lanes, states saved every 256-step window, dB/dC by atomics (not bit-reproducible).
constexpr int kLanesConfig = 9;
constexpr int kLanesMaxN = 16;
constexpr int kLanesWarps = 4;  // channels (one warp each) per block of the lanes kernels
#ifndef LANES_STATE_STRIDE
#define LANES_STATE_STRIDE 1
#endif
// 256-step windows per state the lanes forward saves (A/B, not yet measured: K > 1 saves K times less memory, and the
// backward recomputes the other K - 1 window-start states of each group by a states-only forward pass).
constexpr int kLanesStateStride = LANES_STATE_STRIDE;

// Saved states a row keeps of its nslots chunk / window starts: all but its direction's first, which is initial_state
// or zero (saved_index / saved_state in selective_scan_common.cuh).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline constexpr int kept_slots(int nslots) { return nslots - 1; }

struct ConfigInfo {
  int tpc, npt, chunk, nwarps_fwd, nwarps_bwd;
};

inline ConfigInfo config_info(int config) {
  switch (config) {
#define MATTEN_SCAN_INFO_CASE(ID, TPC, NPT, CHUNK, NWF, NWB) \
  case ID:                                                   \
    return ConfigInfo{TPC, NPT, CHUNK, NWF, NWB};
    MATTEN_SCAN_CONFIGS(MATTEN_SCAN_INFO_CASE)
#undef MATTEN_SCAN_INFO_CASE
    case kLanesConfig:
      // 32 lanes per channel, windows of 256 steps (a state saved every kLanesStateStride), 4 channels per block
      return ConfigInfo{32, 1, 256 * kLanesStateStride, 4, 4};
    default:
      return ConfigInfo{0, 0, 0, 0, 0};
  }
}

// Default configuration for state size N and sequence length L (deterministic: no atomics).
inline int choose_config(int N, int L, bool bidirectional = false, bool deterministic = true) {
  if (!deterministic && N <= kLanesMaxN && L >= 256) return kLanesConfig;
  if (N <= 4) return 0;
  if (N <= 8) return 1;
  if (N <= 16) return 3;
  if (N <= 32) return 5;
  if (N <= 64) return 6;
  if (N <= 128) return 7;
  return 8;
}

// Splits of the sequence: as many as fit in one wave of `capacity` resident threads (more would leave a tail
// wave of whole splits), at least 8 chunks per split.
inline int choose_splits(long batch, long dim, int tpc, int nchunks, long capacity) {
  const long threads = batch * dim * tpc;
  long n = capacity / threads;
  const long most = nchunks / 8;
  if (n > most) n = most;
  return n < 1 ? 1 : static_cast<int>(n);
}

enum Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One scan direction. Tensors contiguous, except B and C (and z, dz in ScanParams): their rows are, their batch
// stride is any (channel slices of a larger tensor, e.g. the x_proj output [dt; B; C]: no copy). "dtype" tensors
// have the input dtype, the rest are fp32.
struct DirParams {
  const void* u;              // (batch, dim, L) dtype
  const void* delta;          // (batch, dim, L) dtype
  const float* A;             // (dim, N)
  const void* B;              // (batch, G, N, L) dtype, batch stride B_bstride elements
  const void* C;              // (batch, G, N, L) dtype, batch stride C_bstride elements
  long long B_bstride, C_bstride;
  const float* D;             // (dim,) or nullptr
  const float* delta_bias;    // (dim,) or nullptr
  int groups;                 // G
  float* states;              // (batch, dim, nchunks - 1, N): the state before each chunk but the first
                              //   (kept_slots, saved_index in selective_scan_common.cuh; forward: written,
                              //   nullptr = not saved; backward: read)
  // Backward outputs.
  void* du;                   // (batch, dim, L) dtype
  void* ddelta;               // (batch, dim, L) dtype
  float* dA_part;             // (nsplit, batch, dim, N): per split and batch row, summed by the caller; with
                              //   ScanParams::atomic_sums (dim, N), zero-filled, atomics
  float* dB_part;             // (P, batch, G, N, L): per block of channels, summed by the caller (atomic_sums:
                              //   P = 1, zero-filled, atomics)
  float* dC_part;             // (P, batch, G, N, L)
  float* dD_part;             // (nsplit, batch, dim)
  float* dbias_part;          // (nsplit, batch, dim)
  int parts;                  // P
  // The finish (launch_finish_*): the partial sums summed (fixed order) and dB/dC cast; nullptr: not wanted.
  float* dA;                  // (dim, N)
  void* dB;                   // (batch, G, N, L) dtype
  void* dC;                   // (batch, G, N, L) dtype
  float* dD;                  // (dim,)
  float* dbias;               // (dim,)
};

struct ScanParams {
  int batch, dim, L, N;
  int seg;                    // channels per segment (grid.y = dim / seg)
  int bidirectional;          // dir[1] scans t = L-1 .. 0 and its y is added to dir[0]'s
  int delta_softplus;
  int divide_out;             // bidirectional: out = (y_f + y_b) / 2 [* silu(z)]
  int nsplit;                 // splits of the sequence (grid.x = blocks per segment * nsplit)
  int split_chunks;           // chunks per split (the last may have fewer)
  int dir_lo, dir_hi;         // the directions this forward launch runs (set by the launcher)
  int lanes_vec;              // lanes kernels: every (batch, dim, L) and B/C row starts 16-byte aligned
  int fwd_kernel;             // forward of config kLanesConfig: 0 default (the seq forward of selective_scan_seq.cuh
                              //   where it applies and the GPU has enough of its warps, else lanes), 1 lanes, 2 seq
  int sms;                    // multiprocessors of the device
  int atomic_sums;            // backward: dB/dC and dA added with fp32 atomics into one zero-filled buffer each (the
                              //   lanes config always; the others unless torch's deterministic mode is on), else
                              //   per-block / per-row partials summed by the finish in a fixed order (bit-identical)
  float* split_state;         // (ndir, nsplit, batch, dim, N) split summaries (see above), when nsplit > 1
  float* split_sumd;          // (ndir, nsplit, batch, dim)
  DirParams dir[2];
  const void* z;              // (batch, dim, L) dtype or nullptr, batch stride z_bstride elements
  long long z_bstride;
  const float* initial_state; // (batch, dim, N) or nullptr (unidirectional only; read by the backward too: the
                              //   state entering the first chunk is not saved)
  // Forward outputs.
  void* out;                  // (batch, dim, L) dtype
  float* last_state;          // (batch, dim, N) or nullptr (unidirectional only)
  void* y_saved;              // (batch, dim, L) dtype: y before the gate, written when z is given and non-null
  float* ws;                  // (batch, dim, L) fp32 scratch for the backward direction's y (bidirectional forward)
  // Backward inputs and outputs.
  const void* dout;           // (batch, dim, L) dtype
  const float* dlast_state;   // (batch, dim, N) or nullptr
  const void* y_saved_in;     // (batch, dim, L) dtype, when z is given
  void* dz;                   // (batch, dim, L) dtype, when z is given; batch stride dz_bstride elements
  long long dz_bstride;
  float* dinitial_state;      // (batch, dim, N) or nullptr
  // Backward of the bidirectional lanes config: the two directions' launches share no buffer, so the backward
  // direction's may run on side_stream (forked from the caller's stream and joined back by the caller) and each
  // launch's last wave overlaps the other's; nullptr: both on the caller's stream.
  cudaStream_t side_stream;
};

// The seq forward (selective_scan_seq.cuh, the lanes config's forward where there are many channels): 4 states per
// lane, 8 channels per warp, chunks of 32 steps; it needs N <= 16, L % 32 == 0, 16-byte aligned rows and every warp's
// channels in one B/C group.
constexpr int kSeqNpt = 4, kSeqCpw = 8, kSeqChunk = 32, kSeqN = 16;
// Default only with at least this many of its warps per SM (no sequence split: with few channels the lanes forward is
// faster). H100, bf16, fwd ms seq vs lanes (benchmarks/NOTES_scan.md, session 12), warps an SM in brackets:
// unidirectional (2, 2304, 16, 4096) [4.4] 0.444 vs 0.255, (8, 2304, 16, 4096) [17.5] 1.044 vs 0.945, (16, 2304, 16,
// 1024) [35] 0.432 vs 0.467, spatial XL [70] 0.197 vs 0.273. The bidirectional scan is two launches of the same
// kernels, so the same threshold applies to one direction's warps.
constexpr int kSeqMinWarpsPerSM = 32;

inline bool seq_fwd_applies(const ScanParams& p) {
  if (p.N > kSeqN || !p.lanes_vec || p.L % kSeqChunk != 0 || p.dim % kSeqCpw != 0 || p.batch > 65535) return false;
  for (int d = 0; d < (p.bidirectional ? 2 : 1); ++d)
    if ((p.dim / p.dir[d].groups) % kSeqCpw != 0) return false;
  return true;
}

// Whether the seq forward runs (p.fwd_kernel: 0 = the default, seq where it applies and there are enough channels;
// 1 = lanes; 2 = seq, an error where it does not apply).
inline bool seq_fwd_runs(const ScanParams& p) {
  if (p.fwd_kernel == 1 || !seq_fwd_applies(p)) return false;
  return p.fwd_kernel == 2 || (long)p.batch * p.dim / kSeqCpw >= (long)kSeqMinWarpsPerSM * p.sms;
}

// The lanes forward stages its B/C windows in shared memory (LANES_FWD_STAGE in selective_scan_lanes.cuh) where every
// block's 4 channels are in one B/C group, the rows are 16-byte aligned and N = 16 (or 8) exactly.
#ifndef LANES_FWD_STAGE
#define LANES_FWD_STAGE 1
#endif
#ifndef LANES_N8
#define LANES_N8 1
#endif
inline bool lanes_fwd_stages_dir(const ScanParams& p, int d) {
  return LANES_FWD_STAGE && (p.N == kLanesMaxN || (LANES_N8 && p.N == 8)) && p.lanes_vec && p.L >= 256 &&
         p.dim % kLanesWarps == 0 && (p.dim / p.dir[d].groups) % kLanesWarps == 0;
}

// Channels per block of the backward (its grid is (ceil(seg / CPB), dim / seg, batch); dB_part holds one
// partial sum per block of a group).
inline int bwd_channels_per_block(int config) {
  const ConfigInfo c = config_info(config);
  return c.tpc > 0 ? 32 * c.nwarps_bwd / c.tpc : 0;
}

// Launchers, one per dtype (selective_scan_{fwd,bwd}_{fp32,fp16,bf16}.cu). Return the launch's error code.
cudaError_t launch_fwd_fp32(const ScanParams& p, int config, cudaStream_t stream);
cudaError_t launch_fwd_fp16(const ScanParams& p, int config, cudaStream_t stream);
cudaError_t launch_fwd_bf16(const ScanParams& p, int config, cudaStream_t stream);
cudaError_t launch_bwd_fp32(const ScanParams& p, int config, cudaStream_t stream);
cudaError_t launch_bwd_fp16(const ScanParams& p, int config, cudaStream_t stream);
cudaError_t launch_bwd_bf16(const ScanParams& p, int config, cudaStream_t stream);
// The backward's finish, after every backward launch of both directions: one launch that sums each direction's
// partial sums (dA_part, dB_part, dC_part, dD_part, dbias_part) into dA, dB, dC, dD, dbias (dB/dC cast to dtype).
cudaError_t launch_finish_fp32(const ScanParams& p, cudaStream_t stream);
cudaError_t launch_finish_fp16(const ScanParams& p, cudaStream_t stream);
cudaError_t launch_finish_bf16(const ScanParams& p, cudaStream_t stream);

}  // namespace matten_scan
