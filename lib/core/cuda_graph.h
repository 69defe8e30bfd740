#pragma once
// A step of GPU work replayed as one CUDA graph. On small models a training
// step is thousands of short kernels, and the host issuing them one by one,
// not the GPU, sets the pace; a replay is one launch. What changes from step
// to step must then live in device memory the step reads (see
// sparsity::StepScalars, and input buffers copied before each run), and the
// step must not read device values on the host.
#include <ATen/ATen.h>

#include <functional>
#include <memory>

namespace patch::core {

class CudaGraph {
 public:
  // Throws ConfigError unless `device` is a CUDA device of a build with
  // PATCH_WITH_CUDA. The first `eager_runs` runs are eager (lazy set-up such
  // as library handles and plans must not happen inside a capture).
  explicit CudaGraph(const at::Device& device, int eager_runs = 1);
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  // Runs `step` on the current stream: eagerly during the first eager_runs
  // calls, then captured once (on a side stream, after the allocator's unused
  // cached blocks are released) and replayed; later calls only replay, so
  // `step`'s host code runs no more. Tensors `step` creates at the capture
  // stay valid and are rewritten by each replay.
  void run(const std::function<void()>& step);
  bool captured() const;

  // The CUDA side's state (cuda_graph_cuda.cu).
  struct Impl {
    virtual ~Impl() = default;
  };

 private:
  std::unique_ptr<Impl> impl_;
};

#if PATCH_WITH_CUDA
namespace cuda {
std::unique_ptr<CudaGraph::Impl> make_graph(const at::Device& device, int eager_runs);
void run_graph(CudaGraph::Impl& graph, const std::function<void()>& step);
bool graph_captured(const CudaGraph::Impl& graph);
}  // namespace cuda
#endif

}  // namespace patch::core
