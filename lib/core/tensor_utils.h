#pragma once
// Device and dtype helpers shared by every module that touches tensors.
#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

namespace patch::core {

// "auto" picks CUDA when a GPU is visible, else CPU; "cpu", "cuda", "cuda:N".
at::Device resolve_device(const std::string& name);
// "auto" is float32 on CPU and bfloat16 on CUDA; also float32|bfloat16|float16
// (and the short forms fp32|bf16|fp16).
at::ScalarType resolve_dtype(const std::string& name, const at::Device& device);
std::string dtype_name(at::ScalarType dtype);
// Peak device memory in GiB since the last reset (0 on CPU).
double peak_memory_gib(const at::Device& device);
void reset_peak_memory(const at::Device& device);
// Device memory the caching allocator holds now, in GiB (0 on CPU): with a
// CUDA graph, its private pool, which no other allocation can use, counts.
double reserved_memory_gib(const at::Device& device);
// Waits for the device's queued work (no-op on the CPU): benchmark timing.
void synchronize(const at::Device& device);
// Benchmark timing: hands the allocator's cached blocks back (an earlier
// benchmark's in this process), runs step() `warmup` times, resets the peak
// memory, then times `iters` synchronized calls; the times in milliseconds,
// sorted. A `graph_step` (core::CudaGraph::run) warms up at least twice, so
// that its eager run and its capture are not timed, and its peak counts the
// warm-up: a replay allocates nothing, the capture does.
std::vector<double> time_steps(const std::function<void()>& step, const at::Device& device,
                               int warmup, int iters, bool graph_step = false);

}  // namespace patch::core
