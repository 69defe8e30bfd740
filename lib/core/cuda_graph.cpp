#include "core/cuda_graph.h"

#include "core/error.h"

namespace patch::core {

CudaGraph::CudaGraph(const at::Device& device, int eager_runs) {
  if (!device.is_cuda())
    throw ConfigError(str("CUDA graphs need a CUDA device, got ", device.str()));
#if PATCH_WITH_CUDA
  impl_ = cuda::make_graph(device, eager_runs);
#else
  (void)eager_runs;
  throw ConfigError("CUDA graphs need a build with PATCH_WITH_CUDA");
#endif
}

CudaGraph::~CudaGraph() = default;

void CudaGraph::run(const std::function<void()>& step) {
#if PATCH_WITH_CUDA
  cuda::run_graph(*impl_, step);
#else
  (void)step;
#endif
}

bool CudaGraph::captured() const {
#if PATCH_WITH_CUDA
  return cuda::graph_captured(*impl_);
#else
  return false;
#endif
}

}  // namespace patch::core
