// BWD launcher of the selective scan for fp32 inputs (one translation unit per dtype keeps builds parallel).
#include "selective_scan_bwd.cuh"

namespace matten_scan {

cudaError_t launch_bwd_fp32(const ScanParams& p, int config, cudaStream_t stream) {
  return launch_bwd<float>(p, config, stream);
}

cudaError_t launch_finish_fp32(const ScanParams& p, cudaStream_t stream) {
  return launch_finish<float>(p, stream);
}

}  // namespace matten_scan
