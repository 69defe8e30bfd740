// CUDA side of cuda_graph.h: capture with ATen's CUDAGraph, which routes the
// capture's allocations to a private memory pool that stays reserved for the
// replays.
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <exception>
#include <string>

#include "core/cuda_graph.h"
#include "core/error.h"

namespace patch::core {

namespace cuda {
namespace {

struct Graph : CudaGraph::Impl {
  Graph(const at::Device& d, int eager) : device(d), eager_left(eager) {}
  at::Device device;
  int eager_left;
  at::cuda::CUDAGraph graph;
  bool captured = false;
};

}  // namespace

std::unique_ptr<CudaGraph::Impl> make_graph(const at::Device& device, int eager_runs) {
  return std::make_unique<Graph>(device, eager_runs);
}

void run_graph(CudaGraph::Impl& impl, const std::function<void()>& step) {
  auto& g = static_cast<Graph&>(impl);
  const c10::cuda::CUDAGuard device_guard(g.device);
  if (g.eager_left > 0) {
    --g.eager_left;
    step();
    return;
  }
  if (!g.captured) {
    // A capture records without running; the replay below runs the step.
    const auto current = c10::cuda::getCurrentCUDAStream(g.device.index());
    const auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, g.device.index());
    c10::cuda::device_synchronize();
    // The eager runs' cached blocks go back to the driver: the graph's pool
    // holds a whole step's memory of its own, and both must fit.
    c10::cuda::CUDACachingAllocator::emptyCache();
    {
      const c10::cuda::CUDAStreamGuard stream_guard(side);
      g.graph.capture_begin();
      try {
        step();
      } catch (const std::exception& e) {
        // End the capture so that the error, not a broken stream, is what the user sees.
        cudaGraph_t partial = nullptr;
        cudaStreamEndCapture(side.stream(), &partial);
        if (partial) cudaGraphDestroy(partial);
        throw Error(std::string("CUDA graph capture: ") + e.what());
      }
      g.graph.capture_end();
    }
    at::cuda::CUDAEvent recorded;  // the current stream's later work waits for the capture stream
    recorded.record(side);
    recorded.block(current);
    g.captured = true;
  }
  g.graph.replay();
}

bool graph_captured(const CudaGraph::Impl& g) {
  return static_cast<const Graph&>(g).captured;
}

}  // namespace cuda
}  // namespace patch::core
