// FWD launcher of the selective scan for fp32 inputs (one translation unit per dtype keeps builds parallel).
#include "selective_scan_fwd.cuh"

namespace matten_scan {

cudaError_t launch_fwd_fp32(const ScanParams& p, int config, cudaStream_t stream) {
  return launch_fwd<float>(p, config, stream);
}

}  // namespace matten_scan
