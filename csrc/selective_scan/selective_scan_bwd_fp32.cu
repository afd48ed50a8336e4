// BWD launcher of the selective scan for fp32 inputs (one translation unit per dtype keeps builds parallel).
#include "selective_scan_bwd.cuh"

namespace matten_scan {

cudaError_t launch_bwd_fp32(const ScanParams& p, int config, cudaStream_t stream) {
  return launch_bwd<float>(p, config, stream);
}

}  // namespace matten_scan
