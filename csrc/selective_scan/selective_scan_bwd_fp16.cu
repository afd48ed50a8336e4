// BWD launcher of the selective scan for fp16 inputs (one translation unit per dtype keeps builds parallel).
#include "selective_scan_bwd.cuh"

namespace matten_scan {

cudaError_t launch_bwd_fp16(const ScanParams& p, int config, cudaStream_t stream) {
  return launch_bwd<__half>(p, config, stream);
}

cudaError_t launch_finish_fp16(const ScanParams& p, cudaStream_t stream) {
  return launch_finish<__half>(p, stream);
}

}  // namespace matten_scan
