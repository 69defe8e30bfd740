#include "core/tensor_utils.h"

#include <ATen/Context.h>
#include <torch/cuda.h>
#if __has_include(<c10/cuda/CUDACachingAllocator.h>)
#include <c10/cuda/CUDACachingAllocator.h>
#define PATCH_HAS_CUDA_ALLOCATOR 1
#endif

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace patch::core {

at::Device resolve_device(const std::string& name) {
  if (name == "auto") return at::hasCUDA() ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  try {
    at::Device d(name);
    if (d.is_cuda() && !at::hasCUDA())
      throw ConfigError(str("model.device: '", name, "' requested but no CUDA device is available"));
    // A bare "cuda" means device 0: memory statistics need an explicit index.
    if (d.is_cuda() && !d.has_index()) d = at::Device(at::kCUDA, 0);
    return d;
  } catch (const c10::Error&) {
    throw ConfigError(str("model.device: expected auto, cpu, cuda or cuda:N, got '", name, "'"));
  }
}

at::ScalarType resolve_dtype(const std::string& name, const at::Device& device) {
  if (name == "auto") return device.is_cuda() ? at::kBFloat16 : at::kFloat;
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  throw ConfigError(str("model.dtype: expected auto, float32, bfloat16 or float16, got '", name, "'"));
}

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    default: return c10::toString(dtype);
  }
}

namespace {

// An aggregate statistic of the caching allocator in GiB: the peak of the
// allocated bytes, or the bytes it holds now (0 on the CPU).
double allocator_gib(const at::Device& device, bool reserved_now) {
#ifdef PATCH_HAS_CUDA_ALLOCATOR
  if (!device.is_cuda()) return 0.0;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  const int64_t bytes =
      reserved_now ? stats.reserved_bytes[all].current : stats.allocated_bytes[all].peak;
  return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0);
#else
  (void)device;
  (void)reserved_now;
  return 0.0;
#endif
}

}  // namespace

double peak_memory_gib(const at::Device& device) {
  return allocator_gib(device, /*reserved_now=*/false);
}

double reserved_memory_gib(const at::Device& device) {
  return allocator_gib(device, /*reserved_now=*/true);
}

void reset_peak_memory(const at::Device& device) {
#ifdef PATCH_HAS_CUDA_ALLOCATOR
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#else
  (void)device;
#endif
}

void synchronize(const at::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

std::vector<double> time_steps(const std::function<void()>& step, const at::Device& device,
                               int warmup, int iters, bool graph_step) {
  synchronize(device);
#ifdef PATCH_HAS_CUDA_ALLOCATOR
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
  if (graph_step) {
    warmup = std::max(warmup, 2);
    reset_peak_memory(device);
  }
  for (int i = 0; i < warmup; ++i) step();
  synchronize(device);
  if (!graph_step) reset_peak_memory(device);
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    synchronize(device);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms;
}

}  // namespace patch::core
