#include "model/bench.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "core/cuda_graph.h"
#include "core/error.h"
#include "core/tensor_utils.h"
#include "model/decoder.h"

namespace patch::model {

namespace {

// The names model_shape() takes, in its order.
const std::vector<std::string> kShapeNames = {"qwen2.5-0.5b", "llama-3.2-1b", "llama-2-7b",
                                              "llama-3.1-8b"};

// W itself, made to need a gradient by a leaf `token` that gets none: backward
// computes every dL/dW (as a mask step does, and as a dense step with trainable
// weights does) and drops it at once, without a W * s copy of the weights in
// forward or a reduction of dL/dW in backward.
struct GradSink : torch::autograd::Function<GradSink> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& weight, const at::Tensor&) {
    return weight.alias();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list) {
    return {at::Tensor(), at::Tensor()};
  }
};

class WeightGradSink : public WeightProvider {
 public:
  explicit WeightGradSink(at::Tensor token) : token_(std::move(token)) {}
  at::Tensor effective_weight(const at::Tensor& weight) override { return GradSink::apply(weight, token_); }

 private:
  at::Tensor token_;
};

io::ModelConfig llama(int64_t hidden, int64_t inter, int64_t layers, int64_t heads,
                      int64_t kv_heads, int64_t vocab) {
  io::ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.vocab_size = vocab;
  c.rms_norm_eps = 1e-5;
  return c;
}

io::RopeScaling llama3_scaling(double factor) {
  io::RopeScaling r;
  r.type = "llama3";
  r.factor = factor;
  r.low_freq_factor = 1.0;
  r.high_freq_factor = 4.0;
  r.original_max_position_embeddings = 8192;
  return r;
}

}  // namespace

io::ModelConfig model_shape(const std::string& name) {
  if (name == "qwen2.5-0.5b") {
    io::ModelConfig c = llama(896, 4864, 24, 14, 2, 151936);
    c.model_type = "qwen2";
    c.rms_norm_eps = 1e-6;
    c.rope_theta = 1000000.0;
    c.max_position_embeddings = 32768;
    c.tie_word_embeddings = true;
    c.attention_bias = true;
    c.bos_token_id = 151643;
    c.eos_token_id = 151643;
    c.torch_dtype = "bfloat16";
    return c;
  }
  if (name == "llama-3.2-1b") {
    io::ModelConfig c = llama(2048, 8192, 16, 32, 8, 128256);
    c.rope_theta = 500000.0;
    c.rope_scaling = llama3_scaling(32.0);
    c.max_position_embeddings = 131072;
    c.tie_word_embeddings = true;
    c.bos_token_id = 128000;
    c.eos_token_id = 128001;
    c.torch_dtype = "bfloat16";
    return c;
  }
  if (name == "llama-2-7b") {
    io::ModelConfig c = llama(4096, 11008, 32, 32, 32, 32000);
    c.max_position_embeddings = 4096;
    c.bos_token_id = 1;
    c.eos_token_id = 2;
    c.torch_dtype = "float16";
    return c;
  }
  if (name == "llama-3.1-8b") {
    io::ModelConfig c = llama(4096, 14336, 32, 32, 8, 128256);
    c.rope_theta = 500000.0;
    c.rope_scaling = llama3_scaling(8.0);
    c.max_position_embeddings = 131072;
    c.bos_token_id = 128000;
    c.eos_token_id = 128001;
    c.torch_dtype = "bfloat16";
    return c;
  }
  throw core::ConfigError(
      core::str("model shape: expected one of ", model_shape_names(), ", got '", name, "'"));
}

std::string model_shape_names() {
  std::string s;
  for (const auto& n : kShapeNames) s += (s.empty() ? "" : ", ") + n;
  return s;
}

bool is_model_shape(const std::string& name) {
  return std::find(kShapeNames.begin(), kShapeNames.end(), name) != kShapeNames.end();
}

nlohmann::json bench_forward_backward(const io::ModelConfig& cfg, at::Device device,
                                      at::ScalarType dtype, int64_t batch, int64_t seq,
                                      bool checkpointing, int warmup, int iters, bool profile,
                                      bool cuda_graph) {
  if (batch < 1 || seq < 2 || warmup < 0 || iters < 1)
    throw core::ConfigError(
        core::str("bench: expected batch >= 1, seq >= 2, warmup >= 0, iters >= 1, got ", batch,
                  ", ", seq, ", ", warmup, ", ", iters));
  DecoderOptions opts;
  opts.device = device;
  opts.dtype = dtype;
  opts.checkpointing = checkpointing;
  Decoder decoder = Decoder::random(cfg, opts);
  const at::Tensor token =
      at::zeros({}, at::TensorOptions().dtype(dtype).device(device)).requires_grad_(true);
  auto provider = std::make_shared<WeightGradSink>(token);
  for (LinearImpl* l : decoder.linears()) l->set_provider(provider);
  const at::Tensor ids = at::randint(cfg.vocab_size, {batch, seq},
                                     at::TensorOptions().dtype(at::kLong).device(device));

  auto body = [&] { decoder.loss(ids).backward(); };
  std::optional<core::CudaGraph> graph;
  if (cuda_graph) graph.emplace(device);
  auto step = [&] { graph ? graph->run(body) : body(); };
  const auto ms = core::time_steps(step, device, warmup, iters, /*graph_step=*/cuda_graph);
  const size_t n = ms.size();
  const double median = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  int64_t params = 0;
  for (LinearImpl* l : decoder.linears()) params += l->weight().numel();
  nlohmann::json j = {{"model_type", cfg.model_type},
          {"device", device.str()},
          {"dtype", core::dtype_name(dtype)},
          {"batch", batch},
          {"seq", seq},
          {"checkpointing", checkpointing},
          {"cuda_graph", cuda_graph},
          {"warmup", warmup},
          {"iters", iters},
          {"block_linear_params", params},
          {"median_ms", median},
          {"min_ms", ms.front()},
          {"tokens_per_s", static_cast<double>(batch * seq) / (median / 1000.0)},
          {"peak_gib", core::peak_memory_gib(device)},
          {"reserved_gib", core::reserved_memory_gib(device)}};
  if (profile) j["profile"] = profile_kernels(step, device);
  return j;
}

nlohmann::json profile_kernels(const std::function<void()>& step, const at::Device& device, int top) {
  namespace prof = torch::profiler::impl;
  if (!device.is_cuda())
    throw core::ConfigError("bench.profile: kernel times need a CUDA device (model.device=cuda)");
  const prof::ProfilerConfig config(prof::ProfilerState::KINETO);
  const std::set<prof::ActivityType> activities{prof::ActivityType::CPU, prof::ActivityType::CUDA};
  core::synchronize(device);
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
  step();
  core::synchronize(device);
  const auto result = torch::autograd::profiler::disableProfiler();
  struct Span {
    uint64_t start, end;
    std::string name;
  };
  std::vector<Span> spans;
  std::map<std::string, std::pair<int64_t, double>> by_name;
  double total = 0.0;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;
    spans.push_back({e.startNs(), e.endNs(), e.name()});
    const double ms = static_cast<double>(e.durationNs()) / 1e6;
    auto& slot = by_name[e.name()];
    slot.first += 1;
    slot.second += ms;
    total += ms;
  }
  core::check(!spans.empty(), "bench.profile", "the profiler saw no kernel (is CUPTI available?)");
  // Idle device time between the first and last kernel, and its largest gaps
  // with the kernels around them: where the host, not the GPU, set the pace.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.start < b.start; });
  std::vector<std::pair<uint64_t, size_t>> gaps;  // (gap ns, index of the kernel after it)
  uint64_t busy_end = spans[0].end, idle = 0;
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].start > busy_end) {
      idle += spans[i].start - busy_end;
      gaps.emplace_back(spans[i].start - busy_end, i);
    }
    busy_end = std::max(busy_end, spans[i].end);
  }
  std::sort(gaps.begin(), gaps.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  nlohmann::json largest = nlohmann::json::array();
  for (size_t i = 0; i < gaps.size() && i < 12; ++i)
    largest.push_back({{"ms", static_cast<double>(gaps[i].first) / 1e6},
                       {"at_ms", static_cast<double>(spans[gaps[i].second].start - spans[0].start) / 1e6},
                       {"before", spans[gaps[i].second - 1].name.substr(0, 80)},
                       {"after", spans[gaps[i].second].name.substr(0, 80)}});
  std::vector<std::pair<std::string, std::pair<int64_t, double>>> rows(by_name.begin(), by_name.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.second > b.second.second; });
  nlohmann::json kernels = nlohmann::json::array();
  for (size_t i = 0; i < rows.size() && static_cast<int>(i) < top; ++i)
    kernels.push_back({{"name", rows[i].first.substr(0, 160)},
                       {"calls", rows[i].second.first},
                       {"ms", rows[i].second.second}});
  return {{"gpu_ms", total},
          {"span_ms", static_cast<double>(busy_end - spans[0].start) / 1e6},
          {"idle_ms", static_cast<double>(idle) / 1e6},
          {"gaps", largest},
          {"kernels", kernels}};
}

}  // namespace patch::model
