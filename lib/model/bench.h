#pragma once
// GPU benchmark entry points for the decoder (not tests): forward+backward of
// loss() on a random-weight model of a real model's shape.
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "io/model_config.h"

namespace patch::model {

// Hyper-parameters of "qwen2.5-0.5b", "llama-3.2-1b", "llama-2-7b" and
// "llama-3.1-8b" (from their Hugging Face config.json). Throws
// core::ConfigError for other names.
io::ModelConfig model_shape(const std::string& name);
// The names model_shape() takes, as one line: "qwen2.5-0.5b, ..., llama-3.1-8b".
std::string model_shape_names();
bool is_model_shape(const std::string& name);

// Builds Decoder::random(cfg) on `device` in `dtype`, makes every linear's
// weight need a gradient (a provider that returns W tied to a leaf) so that
// backward runs through all blocks and computes every weight gradient, as mask
// training does, and drops each at once; then times `iters` steps of loss(ids).backward() on random ids
// [batch, seq] after `warmup` untimed steps. Returns JSON with median_ms,
// tokens_per_s, peak_gib (core::peak_memory_gib) and the run's parameters;
// with `profile`, also "profile" (profile_kernels of one more step). With
// `cuda_graph` the step is replayed as a CUDA graph (core::CudaGraph), the
// baseline of mask steps that are (train.cuda_graph).
nlohmann::json bench_forward_backward(const io::ModelConfig& cfg, at::Device device,
                                      at::ScalarType dtype, int64_t batch, int64_t seq,
                                      bool checkpointing, int warmup, int iters,
                                      bool profile = false, bool cuda_graph = false);

// Runs step() once more under the Kineto profiler (CUDA only) and sums the
// device time of its kernels, copies and fills by name: {"gpu_ms": total,
// "kernels": [{"name", "calls", "ms"}, ...]} (the `top` largest first), the
// idle device time between the first and the last kernel ("idle_ms") and its
// largest "gaps". Where a step's time goes, measured in the step.
nlohmann::json profile_kernels(const std::function<void()>& step, const at::Device& device,
                               int top = 60);

}  // namespace patch::model
