// torch.library binding of the CUDA selective scan: ops matten_cuda::selective_scan_fwd / _bwd (CUDA kernels)
// and matten_cuda::selective_scan_configs (the configuration table: 5 ints per config, for the Python layer).
//
// Both ops take the forward direction's inputs and, for the bidirectional scan, the backward direction's
// (u_b given <=> bidirectional; the Python layer passes the forward twin for a missing *_b input, so autograd
// adds the twin's two gradients). All tensors must be contiguous (the Python layer makes them so), except z, B and
// C, whose batch stride may be any (channel slices of a larger tensor: the mixer's z = xz[:, E:] and B, C slices of
// the x_proj output); B and C are (batch, G, N, L). selective_scan_bwd_into writes dz into `dz_out` (the same
// layout rule; e.g. the z half of d(xz)) and then returns an empty dz. Autograd and fake kernels are registered in
// matten_kernels/selective_scan/cuda.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "selective_scan.h"

namespace {

// Checks throw std::invalid_argument (Python ValueError) and launch failures std::runtime_error (RuntimeError), with
// messages built as plain strings. Not TORCH_CHECK: on the device machine (torch 2.11.0+cu130 wheel, extensions JIT-
// built with the system g++ 13) streaming an integer into a std::ostream from the extension crashes the process
// (segmentation fault in std::ostream::_M_insert<long>, under c10::str for TORCH_CHECK's message), which turned every
// failed check into a crash (csrc/selective_scan/NOTES.md, session 12).
inline std::string to_str(const char* s) { return s; }
inline std::string to_str(const std::string& s) { return s; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
std::string to_str(T v) { return std::to_string(v); }
inline std::string to_str(at::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
inline std::string to_str(at::ScalarType t) { return c10::toString(t); }
inline std::string to_str(const at::Device& d) { return d.str(); }

template <typename E, typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::string s;
  ((s += to_str(args)), ...);
  throw E(s);
}
// The bidirectional lanes backward's two launches on two streams (0: one stream; an A/B knob, csrc/selective_scan/
// NOTES.md session 18).
#ifndef LANES_BI_BWD_STREAMS
#define LANES_BI_BWD_STREAMS 1
#endif

#define MATTEN_CHECK(cond, ...) \
  do {                          \
    if (!(cond)) fail<std::invalid_argument>(__VA_ARGS__); \
  } while (0)
#define MATTEN_CHECK_LAUNCH(err, what)                                                                          \
  do {                                                                                                            \
    if ((err) != cudaSuccess)                                                                                     \
      fail<std::runtime_error>("selective_scan (cuda): ", what, " launch failed: ", cudaGetErrorString(err));      \
  } while (0)

using at::Tensor;
using OptTensor = std::optional<Tensor>;

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }
const float* fptr_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_meta(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                const at::Device& device) {
  MATTEN_CHECK(t.device() == device, "selective_scan (cuda): ", name, " is on ", t.device(), ", expected ", device);
  MATTEN_CHECK(t.scalar_type() == dtype, "selective_scan (cuda): ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  MATTEN_CHECK(t.sizes() == shape, "selective_scan (cuda): ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_input(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                 const at::Device& device) {
  check_meta(t, name, dtype, shape, device);
  MATTEN_CHECK(t.is_contiguous(), "selective_scan (cuda): ", name, " must be contiguous");
}

// As check_input, but any batch stride (dim 0): every other dimension contiguous within a batch row.
void check_rows(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                const at::Device& device) {
  check_meta(t, name, dtype, shape, device);
  int64_t expect = 1;
  for (int64_t k = t.dim() - 1; k >= 1; --k) {
    MATTEN_CHECK(t.size(k) == 1 || t.stride(k) == expect, "selective_scan (cuda): ", name,
                " must be contiguous but for its batch stride, got strides ", t.strides());
    expect *= t.size(k);
  }
  MATTEN_CHECK(t.stride(0) >= 0, "selective_scan (cuda): ", name, " has a negative batch stride");
}

// Batch stride in elements (that of a contiguous tensor when the batch has one row).
int64_t bstride(const Tensor& t) { return t.size(0) == 1 ? t.numel() : t.stride(0); }

struct Dir {
  Tensor u, delta, A, B, C;
  OptTensor D, delta_bias;
};

// Check one direction's inputs against u's shape; return G.
int check_dir(const Dir& d, int64_t batch, int64_t dim, int64_t L, int64_t N, const at::Device& dev,
              at::ScalarType dt) {
  check_input(d.u, "u", dt, {batch, dim, L}, dev);
  check_input(d.delta, "delta", dt, {batch, dim, L}, dev);
  check_input(d.A, "A", at::kFloat, {dim, N}, dev);
  MATTEN_CHECK(d.B.dim() == 4 && d.C.dim() == 4, "selective_scan (cuda): B and C must be (batch, G, N, L)");
  const int64_t G = d.B.size(1);
  MATTEN_CHECK(G >= 1 && dim % G == 0, "selective_scan (cuda): dim must be a multiple of B's group count");
  check_rows(d.B, "B", dt, {batch, G, N, L}, dev);
  check_rows(d.C, "C", dt, {batch, G, N, L}, dev);
  if (d.D) check_input(*d.D, "D", at::kFloat, {dim}, dev);
  if (d.delta_bias) check_input(*d.delta_bias, "delta_bias", at::kFloat, {dim}, dev);
  return static_cast<int>(G);
}

void fill_dir(matten_scan::DirParams& p, const Dir& d, int G) {
  p.u = d.u.data_ptr();
  p.delta = d.delta.data_ptr();
  p.A = d.A.data_ptr<float>();
  p.B = d.B.data_ptr();
  p.C = d.C.data_ptr();
  p.B_bstride = bstride(d.B);
  p.C_bstride = bstride(d.C);
  p.D = fptr_or_null(d.D);
  p.delta_bias = fptr_or_null(d.delta_bias);
  p.groups = G;
}

// Segment size: the largest channel count that divides dim / G of every direction.
int segment(int dim, int G0, int G1) { return std::gcd(dim / G0, dim / G1); }

// What the forward and the backward check alike: the sizes and dtype (from u), each direction's inputs and its number
// of B/C groups (G1 = G0 without a backward direction).
struct Inputs {
  int64_t batch, dim, L, N;
  at::Device dev;
  at::ScalarType dt;
  bool bi;
  Dir f, r;
  int G0, G1;
};

Inputs check_inputs(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                    const OptTensor& D, const OptTensor& delta_bias, const OptTensor& u_b, const OptTensor& delta_b,
                    const OptTensor& A_b, const OptTensor& B_b, const OptTensor& C_b, const OptTensor& D_b,
                    const OptTensor& delta_bias_b) {
  MATTEN_CHECK(u.is_cuda(), "selective_scan (cuda): tensors must be on a CUDA device");
  Inputs in{u.size(0), u.size(1), u.size(2), A.size(1), u.device(), u.scalar_type(), u_b.has_value(),
            Dir{u, delta, A, B, C, D, delta_bias}, Dir{}, 0, 0};
  in.G0 = in.G1 = check_dir(in.f, in.batch, in.dim, in.L, in.N, in.dev, in.dt);
  if (in.bi) {
    MATTEN_CHECK(delta_b && A_b && B_b && C_b, "selective_scan (cuda): bidirectional needs every *_b tensor");
    in.r = Dir{*u_b, *delta_b, *A_b, *B_b, *C_b, D_b, delta_bias_b};
    in.G1 = check_dir(in.r, in.batch, in.dim, in.L, in.N, in.dev, in.dt);
  }
  return in;
}

// The launch parameters the forward and the backward fill alike. split_state / split_sumd (sized for nsplit > 1, empty
// otherwise) stay with the caller for the launch.
matten_scan::ScanParams scan_params(const Inputs& in, bool delta_softplus, bool divide_out, int nsplit,
                                    int split_chunks, Tensor& split_state, Tensor& split_sumd) {
  const int ndir = in.bi ? 2 : 1;
  const auto f32 = in.f.u.options().dtype(at::kFloat);
  split_state = at::empty({nsplit > 1 ? ndir * nsplit * in.batch * in.dim * in.N : 0}, f32);
  split_sumd = at::empty({nsplit > 1 ? ndir * nsplit * in.batch * in.dim : 0}, f32);
  matten_scan::ScanParams p{};
  p.batch = (int)in.batch;
  p.dim = (int)in.dim;
  p.L = (int)in.L;
  p.N = (int)in.N;
  p.seg = segment((int)in.dim, in.G0, in.G1);
  p.bidirectional = in.bi;
  p.delta_softplus = delta_softplus;
  p.divide_out = divide_out;
  p.nsplit = nsplit;
  p.split_chunks = split_chunks;
  p.split_state = split_state.data_ptr<float>();
  p.split_sumd = split_sumd.data_ptr<float>();
  return p;
}

int resolve_config(int64_t config, int64_t N, int64_t L, bool bi) {
  const int c = config >= 0 ? static_cast<int>(config) : matten_scan::choose_config((int)N, (int)L, bi);
  MATTEN_CHECK(c < matten_scan::kNumConfigs, "selective_scan (cuda): unknown config ", config);
  if (c == matten_scan::kLanesConfig) {
    MATTEN_CHECK(N <= matten_scan::kLanesMaxN, "selective_scan (cuda): the lanes config (", c, ") holds at most ",
                matten_scan::kLanesMaxN, " states, N = ", N);
  }
  const matten_scan::ConfigInfo info = matten_scan::config_info(c);
  MATTEN_CHECK(info.tpc * info.npt >= N, "selective_scan (cuda): config ", c, " holds at most ",
              info.tpc * info.npt, " states, N = ", N);
  return c;
}

int multiprocessors() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return std::max(sms, 1);
}

// Splits of the sequence for a launch of `tpc` threads per channel and about `threads_per_sm` resident threads
// per SM; MATTEN_SCAN_SPLITS overrides (benchmarks, tests). Returns (nsplit, chunks per split).
std::pair<int, int> splits(int64_t batch, int64_t dim, int tpc, int64_t nchunks, long threads_per_sm) {
  int n = matten_scan::choose_splits(batch, dim, tpc, (int)nchunks, (long)multiprocessors() * threads_per_sm);
  if (const char* env = std::getenv("MATTEN_SCAN_SPLITS")) n = std::max(1, std::atoi(env));
  n = (int)std::min<int64_t>(n, nchunks);
  const int per = (int)((nchunks + n - 1) / n);
  return {(int)((nchunks + per - 1) / per), per};
}

// Lanes kernels: 16-byte vector access needs every row start 16-byte aligned (L a multiple of 16 bytes / element,
// and so the batch strides).
bool rows_aligned(int64_t L, at::ScalarType dt, std::initializer_list<Tensor> ts, const OptTensor& z) {
  const int64_t esize = (int64_t)c10::elementSize(dt);
  if ((L * esize) % 16 != 0) return false;
  auto ok = [esize](const Tensor& t) {
    return t.numel() == 0 ||
           (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (bstride(t) * esize) % 16 == 0);
  };
  for (const Tensor& t : ts)
    if (!ok(t)) return false;
  return !z || ok(*z);
}

cudaError_t launch(bool fwd, at::ScalarType dt, const matten_scan::ScanParams& p, int config,
                   cudaStream_t stream) {
  using namespace matten_scan;
  switch (dt) {
    case at::kFloat: return fwd ? launch_fwd_fp32(p, config, stream) : launch_bwd_fp32(p, config, stream);
    case at::kHalf: return fwd ? launch_fwd_fp16(p, config, stream) : launch_bwd_fp16(p, config, stream);
    case at::kBFloat16: return fwd ? launch_fwd_bf16(p, config, stream) : launch_bwd_bf16(p, config, stream);
    default: MATTEN_CHECK(false, "selective_scan (cuda): unsupported dtype ", dt);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_finish(at::ScalarType dt, const matten_scan::ScanParams& p, cudaStream_t stream) {
  using namespace matten_scan;
  switch (dt) {
    case at::kFloat: return launch_finish_fp32(p, stream);
    case at::kHalf: return launch_finish_fp16(p, stream);
    case at::kBFloat16: return launch_finish_bf16(p, stream);
    default: MATTEN_CHECK(false, "selective_scan (cuda): unsupported dtype ", dt);
  }
  return cudaErrorInvalidValue;
}

// Returns (out, last_state, states, y_saved). last_state is empty for the bidirectional scan; states (ndir,
// batch, dim, nchunks - 1, N): the state entering every chunk but each direction's first (initial_state or zero,
// never saved: matten_scan::kept_slots), and y_saved (the pre-gate y, only with z) are empty (0,) unless
// save_for_backward.
std::tuple<Tensor, Tensor, Tensor, Tensor> selective_scan_fwd(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const OptTensor& D,
    const OptTensor& delta_bias, const OptTensor& z, const OptTensor& initial_state, const OptTensor& u_b,
    const OptTensor& delta_b, const OptTensor& A_b, const OptTensor& B_b, const OptTensor& C_b,
    const OptTensor& D_b, const OptTensor& delta_bias_b, bool delta_softplus, bool divide_out,
    bool save_for_backward, int64_t config) {
  const Inputs in = check_inputs(u, delta, A, B, C, D, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b);
  const auto& [batch, dim, L, N, dev, dt, bi, f, r, G0, G1] = in;
  const c10::cuda::CUDAGuard guard(dev);
  MATTEN_CHECK(!(bi && initial_state), "selective_scan (cuda): initial_state is unidirectional only");
  if (z) check_rows(*z, "z", dt, {batch, dim, L}, dev);
  if (initial_state) check_input(*initial_state, "initial_state", at::kFloat, {batch, dim, N}, dev);
  const int cfg = resolve_config(config, N, L, bi);
  const bool lanes = cfg == matten_scan::kLanesConfig;
  const int chunk = matten_scan::config_info(cfg).chunk;
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const int ndir = bi ? 2 : 1;

  Tensor out = at::empty({batch, dim, L}, u.options());
  Tensor last_state = bi ? at::empty({0}, u.options().dtype(at::kFloat))
                         : at::empty({batch, dim, N}, u.options().dtype(at::kFloat));
  const int64_t kept = matten_scan::kept_slots((int)nchunks);
  Tensor states = save_for_backward ? at::empty({ndir, batch, dim, kept, N}, u.options().dtype(at::kFloat))
                                    : at::empty({0}, u.options().dtype(at::kFloat));
  // y before the gate, for the backward's dz (as mamba-ssm saves it).
  Tensor y_saved = (save_for_backward && z) ? at::empty({batch, dim, L}, u.options()) : at::empty({0}, u.options());
  Tensor ws = bi ? at::empty({batch, dim, L}, u.options().dtype(at::kFloat)) : Tensor();
  const auto info = matten_scan::config_info(cfg);
  const auto [nsplit, split_chunks] =
      lanes ? std::pair<int, int>{1, (int)nchunks} : splits(batch, dim, info.tpc, nchunks, 1024);  // 64-register kernels
  Tensor split_state, split_sumd;
  matten_scan::ScanParams p = scan_params(in, delta_softplus, divide_out, nsplit, split_chunks, split_state, split_sumd);
  fill_dir(p.dir[0], f, G0);
  if (bi) fill_dir(p.dir[1], r, G1);
  const int64_t dir_states = batch * dim * kept * N;
  for (int d = 0; d < ndir; ++d)
    p.dir[d].states = save_for_backward ? states.data_ptr<float>() + d * dir_states : nullptr;
  p.z = ptr_or_null(z);
  p.z_bstride = z ? bstride(*z) : 0;
  p.initial_state = fptr_or_null(initial_state);
  p.out = out.data_ptr();
  p.last_state = bi ? nullptr : last_state.data_ptr<float>();
  p.y_saved = y_saved.numel() ? y_saved.data_ptr() : nullptr;
  p.ws = bi ? ws.data_ptr<float>() : nullptr;
  p.lanes_vec = lanes && rows_aligned(L, dt, {u, delta, B, C, out}, z) &&
                (!bi || rows_aligned(L, dt, {r.u, r.delta, r.B, r.C}, z));
  // MATTEN_SCAN_FWD_KERNEL: the lanes config's forward kernel (tests, benchmarks; see ScanParams::fwd_kernel)
  if (const char* env = std::getenv("MATTEN_SCAN_FWD_KERNEL")) p.fwd_kernel = std::atoi(env);
  p.sms = multiprocessors();
  MATTEN_CHECK(p.fwd_kernel != 2 || (cfg == matten_scan::kLanesConfig && matten_scan::seq_fwd_applies(p)),
              "selective_scan (cuda): MATTEN_SCAN_FWD_KERNEL=2 asks for the seq forward, which needs config ",
              matten_scan::kLanesConfig, ", N <= ", matten_scan::kSeqN, ", L % ", matten_scan::kSeqChunk,
              " == 0, 16-byte aligned rows and (dim / G) % ", matten_scan::kSeqCpw, " == 0; got N = ", N, ", L = ", L,
              ", dim = ", dim);
  const cudaError_t err = launch(true, dt, p, cfg, c10::cuda::getCurrentCUDAStream().stream());
  MATTEN_CHECK_LAUNCH(err, "forward");
  return {out, last_state, states, y_saved};
}

// Returns [du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, dinitial_state, du_b, ddelta_b, dA_b, dB_b, dC_b, dD_b,
// ddelta_bias_b]; entries for absent inputs are empty tensors (dz too when written into dz_out). dB/dC are
// (batch, G, N, L) in the input dtype.
std::vector<Tensor> scan_bwd(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& delta_bias, const OptTensor& z,
    const OptTensor& initial_state, const Tensor& states, const Tensor& y_saved, const OptTensor& u_b,
    const OptTensor& delta_b, const OptTensor& A_b, const OptTensor& B_b, const OptTensor& C_b,
    const OptTensor& D_b, const OptTensor& delta_bias_b, bool delta_softplus, bool divide_out, int64_t config,
    const OptTensor& dz_out) {
  const Inputs in = check_inputs(u, delta, A, B, C, D, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b);
  const auto& [batch, dim, L, N, dev, dt, bi, f, r, G0, G1] = in;
  const c10::cuda::CUDAGuard guard(dev);
  check_input(dout, "dout", dt, {batch, dim, L}, dev);
  if (dlast_state) check_input(*dlast_state, "dlast_state", at::kFloat, {batch, dim, N}, dev);
  if (z) check_rows(*z, "z", dt, {batch, dim, L}, dev);
  if (dz_out) {
    MATTEN_CHECK(z, "selective_scan (cuda): dz_out is given without z");
    check_rows(*dz_out, "dz_out", dt, {batch, dim, L}, dev);
    MATTEN_CHECK(batch == 1 || dz_out->stride(0) >= dim * L, "selective_scan (cuda): dz_out's batch rows overlap");
  }
  const int cfg = resolve_config(config, N, L, bi);
  const bool lanes = cfg == matten_scan::kLanesConfig;
  const int chunk = matten_scan::config_info(cfg).chunk;
  if (z) check_input(y_saved, "y_saved", dt, {batch, dim, L}, dev);
  const int cpb = lanes ? matten_scan::kLanesWarps : matten_scan::bwd_channels_per_block(cfg);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const int ndir = bi ? 2 : 1;
  const int64_t kept = matten_scan::kept_slots((int)nchunks);
  check_input(states, "states", at::kFloat, {ndir, batch, dim, kept, N}, dev);

  const int seg = segment((int)dim, G0, G1);
  const int blocks_per_seg = (seg + cpb - 1) / cpb;
  const auto f32 = u.options().dtype(at::kFloat);
  // The directions run in different blocks.
  const auto [nsplit, split_chunks] =
      lanes ? std::pair<int, int>{1, (int)nchunks}
            : splits(batch * ndir, dim, matten_scan::config_info(cfg).tpc, nchunks, 768);
  Tensor split_state, split_sumd;
  matten_scan::ScanParams p = scan_params(in, delta_softplus, divide_out, nsplit, split_chunks, split_state, split_sumd);
  struct DirGrads {
    Tensor du, ddelta, dA_part, dB_part, dC_part, dD_part, dbias_part, dA, dB, dC, dD, dbias;
  } grads[2];
  const Dir* dirs[2] = {&f, &r};
  const int Gs[2] = {G0, G1};
  const OptTensor* Ds[2] = {&D, &D_b};
  const OptTensor* biases[2] = {&delta_bias, &delta_bias_b};
  const Tensor none = at::empty({0}, f32);
  // dB/dC and dA sums: fp32 atomics into one buffer each (the lanes kernels always; the others unless torch's
  // deterministic mode asks for bit-identical runs), else per-block / per-row partials (216 MiB of them at (512, 2304,
  // 16, 16)). Every direction's dB/dC, then (atomic) its dA, in one buffer: atomics need it zeroed (one fill).
  const bool atomic = lanes || !at::globalContext().deterministicAlgorithms();
  p.atomic_sums = atomic;
  int64_t parts[2] = {0, 0}, bc_elems = 0;
  for (int d = 0; d < ndir; ++d) {
    parts[d] = atomic ? 1 : (int64_t)(dim / Gs[d] / seg) * blocks_per_seg;
    bc_elems += 2 * parts[d] * batch * Gs[d] * N * L;
  }
  const int64_t a_elems = atomic ? ndir * dim * N : 0;
  const Tensor bc_part = atomic ? at::zeros({bc_elems + a_elems}, f32) : at::empty({bc_elems}, f32);
  int64_t bc_at = 0;
  for (int d = 0; d < ndir; ++d) {
    const int G = Gs[d];
    DirGrads& g = grads[d];
    g.du = at::empty({batch, dim, L}, u.options());
    g.ddelta = at::empty({batch, dim, L}, u.options());
    const int64_t n = parts[d] * batch * G * N * L;
    g.dB_part = bc_part.narrow(0, bc_at, n).view({parts[d], batch, G, N, L});
    g.dC_part = bc_part.narrow(0, bc_at + n, n).view({parts[d], batch, G, N, L});
    bc_at += 2 * n;
    g.dA_part = atomic ? bc_part.narrow(0, bc_elems + d * dim * N, dim * N).view({dim, N})
                       : at::empty({nsplit, batch, dim, N}, f32);
    g.dD_part = at::empty({nsplit, batch, dim}, f32);
    g.dbias_part = at::empty({nsplit, batch, dim}, f32);
    g.dA = at::empty({dim, N}, f32);
    g.dB = at::empty({batch, G, N, L}, u.options());
    g.dC = at::empty({batch, G, N, L}, u.options());
    g.dD = Ds[d]->has_value() ? at::empty({dim}, f32) : none;
    g.dbias = biases[d]->has_value() ? at::empty({dim}, f32) : none;
    matten_scan::DirParams& q = p.dir[d];
    fill_dir(q, *dirs[d], G);
    q.states = states.data_ptr<float>() + d * batch * dim * kept * N;
    q.du = g.du.data_ptr();
    q.ddelta = g.ddelta.data_ptr();
    q.dA_part = g.dA_part.data_ptr<float>();
    q.dB_part = g.dB_part.data_ptr<float>();
    q.dC_part = g.dC_part.data_ptr<float>();
    q.dD_part = g.dD_part.data_ptr<float>();
    q.dbias_part = g.dbias_part.data_ptr<float>();
    q.parts = (int)parts[d];
    q.dA = g.dA.data_ptr<float>();
    q.dB = g.dB.data_ptr();
    q.dC = g.dC.data_ptr();
    q.dD = Ds[d]->has_value() ? g.dD.data_ptr<float>() : nullptr;
    q.dbias = biases[d]->has_value() ? g.dbias.data_ptr<float>() : nullptr;
  }
  Tensor dz = (z && !dz_out) ? at::empty({batch, dim, L}, u.options()) : at::empty({0}, u.options());
  const Tensor& dz_dst = dz_out ? *dz_out : dz;
  Tensor dinit = initial_state ? at::empty({batch, dim, N}, f32) : at::empty({0}, f32);
  p.z = ptr_or_null(z);
  p.z_bstride = z ? bstride(*z) : 0;
  p.dout = dout.data_ptr();
  p.dlast_state = fptr_or_null(dlast_state);
  p.y_saved_in = z ? y_saved.data_ptr() : nullptr;
  p.dz = z ? dz_dst.data_ptr() : nullptr;
  p.dz_bstride = z ? bstride(dz_dst) : 0;
  p.initial_state = fptr_or_null(initial_state);  // the state entering the first chunk (never saved)
  p.dinitial_state = initial_state ? dinit.data_ptr<float>() : nullptr;
  p.ws = nullptr;
  const Tensor ys = z ? y_saved : dout;  // rows_aligned's list: y_saved when it is read
  p.lanes_vec = lanes && rows_aligned(L, dt, {u, delta, B, C, dout, ys, grads[0].du, grads[0].ddelta, dz_dst}, z) &&
                (!bi || rows_aligned(L, dt, {r.u, r.delta, r.B, r.C, grads[1].du, grads[1].ddelta}, z));
  // Bidirectional lanes backward with fewer than two waves of blocks a direction: the backward direction's launch on
  // a pool stream, forked from and joined to the current one (CUDA graph capture records both branches), so each
  // launch's part-empty last wave is filled by the other's blocks. H100, bf16, fwd+bwd ms, one stream vs two: long
  // (1.45 waves) 4.714 vs 3.930; global XL (2.9 waves) 1.873 vs 1.880, spatial XL (47) 1.938 vs 1.954.
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  std::optional<c10::cuda::CUDAStream> side;
  at::cuda::CUDAEvent fork_ev, join_ev;
  const int64_t lanes_blocks = batch * ((dim + matten_scan::kLanesWarps - 1) / matten_scan::kLanesWarps);
  if (LANES_BI_BWD_STREAMS && lanes && bi && lanes_blocks < 2 * 3 * (int64_t)multiprocessors()) {  // 3 blocks an SM
    side = c10::cuda::getStreamFromPool(false, stream.device_index());
    fork_ev.record(stream);
    fork_ev.block(*side);
    p.side_stream = side->stream();
  }
  const cudaError_t err = launch(false, dt, p, cfg, stream.stream());
  if (side) {
    join_ev.record(*side);
    join_ev.block(stream);
  }
  MATTEN_CHECK_LAUNCH(err, "backward");
  // The partial sums summed (deterministic) and dB/dC cast, both directions in one launch.
  MATTEN_CHECK_LAUNCH(launch_finish(dt, p, stream.stream()), "backward finish");

  std::vector<Tensor> res;
  for (int d = 0; d < 2; ++d) {
    if (d >= ndir) {
      for (int i = 0; i < 7; ++i) res.push_back(none);
      break;
    }
    const DirGrads& g = grads[d];
    for (const Tensor* t : {&g.du, &g.ddelta, &g.dA, &g.dB, &g.dC, &g.dD, &g.dbias}) res.push_back(*t);
    if (d == 0) {
      res.push_back(dz);
      res.push_back(dinit);
    }
  }
  return res;
}

std::vector<Tensor> selective_scan_bwd(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& delta_bias, const OptTensor& z,
    const OptTensor& initial_state, const Tensor& states, const Tensor& y_saved, const OptTensor& u_b,
    const OptTensor& delta_b, const OptTensor& A_b, const OptTensor& B_b, const OptTensor& C_b,
    const OptTensor& D_b, const OptTensor& delta_bias_b, bool delta_softplus, bool divide_out, int64_t config) {
  return scan_bwd(dout, dlast_state, u, delta, A, B, C, D, delta_bias, z, initial_state, states, y_saved, u_b,
                  delta_b, A_b, B_b, C_b, D_b, delta_bias_b, delta_softplus, divide_out, config, std::nullopt);
}

std::vector<Tensor> selective_scan_bwd_into(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& delta_bias, const Tensor& z,
    const OptTensor& initial_state, const Tensor& states, const Tensor& y_saved, const OptTensor& u_b,
    const OptTensor& delta_b, const OptTensor& A_b, const OptTensor& B_b, const OptTensor& C_b,
    const OptTensor& D_b, const OptTensor& delta_bias_b, bool delta_softplus, bool divide_out, int64_t config,
    Tensor& dz_out) {
  return scan_bwd(dout, dlast_state, u, delta, A, B, C, D, delta_bias, z, initial_state, states, y_saved, u_b,
                  delta_b, A_b, B_b, C_b, D_b, delta_bias_b, delta_softplus, divide_out, config, dz_out);
}

std::vector<int64_t> selective_scan_configs() {
  std::vector<int64_t> table;
  for (int c = 0; c < matten_scan::kNumConfigs; ++c) {
    const matten_scan::ConfigInfo info = matten_scan::config_info(c);
    table.insert(table.end(), {info.tpc, info.npt, info.chunk, info.nwarps_fwd, info.nwarps_bwd});
  }
  return table;
}

}  // namespace

TORCH_LIBRARY(matten_cuda, m) {
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, "
      "Tensor? z, Tensor? initial_state, Tensor? u_b, Tensor? delta_b, Tensor? A_b, Tensor? B_b, Tensor? C_b, "
      "Tensor? D_b, Tensor? delta_bias_b, bool delta_softplus, bool divide_out, bool save_for_backward, "
      "int config) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? delta_bias, Tensor? z, Tensor? initial_state, Tensor states, Tensor y_saved, "
      "Tensor? u_b, Tensor? delta_b, Tensor? A_b, Tensor? B_b, Tensor? C_b, Tensor? D_b, Tensor? delta_bias_b, "
      "bool delta_softplus, bool divide_out, int config) -> Tensor[]");
  // The same, dz written into dz_out (returned empty): for eager fused callers (the BiMamba core writes it into the z
  // half of d(xz)). A separate op, so the one above stays functional for torch.compile.
  m.def(
      "selective_scan_bwd_into(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? delta_bias, Tensor z, Tensor? initial_state, Tensor states, Tensor y_saved, "
      "Tensor? u_b, Tensor? delta_b, Tensor? A_b, Tensor? B_b, Tensor? C_b, Tensor? D_b, Tensor? delta_bias_b, "
      "bool delta_softplus, bool divide_out, int config, Tensor(a!) dz_out) -> Tensor[]");
  m.def("selective_scan_configs() -> int[]", &selective_scan_configs);
}

TORCH_LIBRARY_IMPL(matten_cuda, CUDA, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("selective_scan_bwd_into", &selective_scan_bwd_into);
}
