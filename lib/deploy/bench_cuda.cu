// CUDA-graph timing for bench-deploy: replaying a captured graph measures the
// GPU time of short kernels without the host's launch overhead.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "deploy/bench.h"

namespace patch::deploy::cuda {

double graph_time_us(const std::function<void(int)>& launch, int n, int repeats) {
  // Capture needs a stream other than the legacy default one; warm up there
  // first so lazily built state (cuBLAS handles, cuSPARSELt plans) exists.
  auto stream = at::cuda::getStreamFromPool();
  const at::cuda::CUDAStreamGuard guard(stream);
  for (int i = 0; i < n; ++i) launch(i);
  stream.synchronize();
  at::cuda::CUDAGraph graph;
  graph.capture_begin();
  for (int i = 0; i < n; ++i) launch(i);
  graph.capture_end();
  graph.replay();
  std::vector<double> us;
  for (int r = 0; r < repeats; ++r) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record(stream);
    graph.replay();
    stop.record(stream);
    stop.synchronize();
    us.push_back(static_cast<double>(start.elapsed_time(stop)) * 1000.0 / n);
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace patch::deploy::cuda
