// CUDA-graph timing for bench-deploy: replaying a captured graph measures the
// GPU time of short kernels without the host's launch overhead.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "deploy/bench.h"

namespace patch::deploy::cuda {

std::vector<double> graph_times_us(const std::vector<std::function<void(int)>>& launches, int n, int repeats) {
  // Capture needs a stream other than the legacy default one; warm up there
  // first so lazily built state (cuBLAS handles, cuSPARSELt plans) exists.
  auto stream = at::cuda::getStreamFromPool();
  const at::cuda::CUDAStreamGuard guard(stream);
  std::vector<std::unique_ptr<at::cuda::CUDAGraph>> graphs;
  for (const auto& launch : launches) {
    for (int i = 0; i < n; ++i) launch(i);
    stream.synchronize();
    graphs.push_back(std::make_unique<at::cuda::CUDAGraph>());
    graphs.back()->capture_begin();
    for (int i = 0; i < n; ++i) launch(i);
    graphs.back()->capture_end();
    graphs.back()->replay();
  }
  // Round robin: a clock that drifts (power, heat) over the timing weighs on
  // every graph alike instead of on the later ones.
  std::vector<std::vector<double>> us(graphs.size());
  for (int r = 0; r < repeats; ++r)
    for (size_t g = 0; g < graphs.size(); ++g) {
      at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
      start.record(stream);
      graphs[g]->replay();
      stop.record(stream);
      stop.synchronize();
      us[g].push_back(static_cast<double>(start.elapsed_time(stop)) * 1000.0 / n);
    }
  std::vector<double> medians;
  for (auto& u : us) {
    std::sort(u.begin(), u.end());
    medians.push_back(u[u.size() / 2]);
  }
  return medians;
}

double graph_time_us(const std::function<void(int)>& launch, int n, int repeats) {
  return graph_times_us({launch}, n, repeats).front();
}

}  // namespace patch::deploy::cuda
