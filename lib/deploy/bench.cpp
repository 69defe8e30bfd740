#include "deploy/bench.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <regex>

#include "core/error.h"
#include "core/tensor_utils.h"
#include "deploy/generate.h"
#if PATCH_WITH_CUTLASS
#include <ATen/cuda/CUDAContext.h>

#include "deploy/cutlass_sparse_gemm.h"
#endif
#include "deploy/hybrid_linear.h"
#include "deploy/hybrid_split_plan.h"
#include "model/bench.h"
#include "model/decoder.h"
#include "sparsity/patterns.h"

namespace patch::deploy {
namespace {

using nlohmann::ordered_json;

struct LayerShape {
  std::vector<std::string> names;  // layers of a block with this shape
  int64_t out, in;
};

// A shape of deploy.shapes: a model's (its block's linears, a block row and
// the end-to-end rows) or "OUTxIN" (one linear of that shape, nothing else).
struct BenchShape {
  std::string name;
  std::optional<io::ModelConfig> model;
  std::vector<LayerShape> layers;
};

// A decoder block's linears, identical shapes merged (q/o, k/v, gate/up).
std::vector<LayerShape> block_shapes(const io::ModelConfig& c) {
  const int64_t h = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim,
                f = c.intermediate_size;
  std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>> all = {
      {"q_proj", {q, h}},    {"k_proj", {kv, h}}, {"v_proj", {kv, h}},  {"o_proj", {h, q}},
      {"gate_proj", {f, h}}, {"up_proj", {f, h}}, {"down_proj", {h, f}}};
  std::vector<LayerShape> out;
  for (const auto& [name, shape] : all) {
    const auto dims = shape;  // lambdas may not capture structured bindings before C++20
    auto it = std::find_if(out.begin(), out.end(), [&](const LayerShape& s) {
      return s.out == dims.first && s.in == dims.second;
    });
    if (it == out.end())
      out.push_back({{name}, shape.first, shape.second});
    else
      it->names.push_back(name);
  }
  return out;
}

// Checked before any GPU work, so that a typo fails at once on every build.
BenchShape bench_shape(const std::string& name) {
  static const std::regex linear("([0-9]{1,9})x([0-9]{1,9})");
  std::smatch m;
  if (model::is_model_shape(name)) {
    auto cfg = model::model_shape(name);
    return {name, cfg, block_shapes(cfg)};
  }
  if (std::regex_match(name, m, linear)) {
    const int64_t out = std::stoll(m[1].str()), in = std::stoll(m[2].str());
    if (out > 0 && in > 0) return {name, std::nullopt, {{{"linear"}, out, in}}};
  }
  throw core::ConfigError(core::str("deploy.shapes: expected one of ", model::model_shape_names(),
                                    " or OUTxIN (one linear, e.g. 11008x4096), got '", name, "'"));
}

#if PATCH_WITH_CUDA
std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

// Median wall time of fn() in milliseconds over `repeats` synchronized calls.
double wall_ms(const std::function<void()>& fn, const at::Device& d, int repeats) {
  const auto t = core::time_steps(fn, d, /*warmup=*/1, repeats);
  return t[t.size() / 2];
}

// Whether `names` (a merged layer shape) is among deploy.layers (all when empty).
bool layer_selected(const DeployBenchOptions& o, const BenchShape& shape, const std::vector<std::string>& names) {
  return !shape.model || o.layers.empty() || std::any_of(names.begin(), names.end(), [&](const auto& n) {
           return std::find(o.layers.begin(), o.layers.end(), n) != o.layers.end();
         });
}

// One timing of a packed layer against cuBLAS on the same masked weight.
struct LayerTiming {
  int64_t tokens = 0;
  double dense_us = 0, hybrid_us = 0, max_rel_err = 0;
  std::string path;
  int copies = 0;
  int64_t device_bytes = 0;  // of the kernel's weight format on the GPU
};

// Times `packed` at every token count of `o`, after checking the kernel's
// output against the masked dense matmul; `label` names the layer in errors.
std::vector<LayerTiming> time_layer(const PackedLayer& packed, const DeployBenchOptions& o,
                                    const std::string& label) {
  const int64_t in = packed.grid.in();
  const auto dense_w = unpack_layer(packed).to(o.device);
  // Enough copies that a pass over them streams min_bytes: no weight is still
  // in L2 when it is read again.
  const int copies = static_cast<int>(std::clamp<int64_t>(o.min_bytes / packed.bytes() + 1, 2, 256));
  std::vector<at::Tensor> dense(copies);
  std::vector<HybridLinear> hybrid;
  hybrid.reserve(copies);
  hybrid.emplace_back(packed, o.device, o.hybrid);
  // Each launch timed on its own, as cuBLAS's are: back to back, one would
  // start streaming while the one before ends, a gain the end-to-end decode
  // steps measure where a model has it.
  hybrid.front().set_overlap(false);
  for (int i = 0; i < copies; ++i) dense[i] = dense_w.clone();
  for (int i = 1; i < copies; ++i) hybrid.push_back(hybrid.front().clone());
  std::vector<LayerTiming> timings;
  for (int64_t tokens : o.tokens) {
    const auto x = at::randn({tokens, in}, at::TensorOptions(o.device).dtype(at::kBFloat16));
    const auto ref = at::linear(x.to(at::kFloat), dense_w.to(at::kFloat));
    const auto y = hybrid.front().forward(x).to(at::kFloat);
    const double err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item<double>();
    // A timing of wrong outputs is worthless: stop instead (bf16 rounding of
    // the output is 4e-3 of the largest one; the tests allow 8e-3 too).
    core::check(err <= 8e-3, "bench-deploy",
                core::str(label, " at ", tokens, " tokens: the hybrid output is off the masked dense matmul by ",
                          err, " of its largest value (path ", path_name(hybrid.front().path(tokens)), ")"));
    const int n = std::max(copies, 8);
    LayerTiming t;
    t.tokens = tokens;
    const auto us = cuda::graph_times_us({[&](int i) { at::linear(x, dense[i % copies]); },
                                          [&](int i) { hybrid[i % copies].forward(x); }},
                                         n, o.repeats);
    t.dense_us = us[0];
    t.hybrid_us = us[1];
    t.max_rel_err = err;
    t.path = path_name(hybrid.front().path(tokens));
    t.copies = copies;
    t.device_bytes = hybrid.front().device_bytes();
    timings.push_back(t);
  }
  return timings;
}

void bench_layers(const DeployBenchOptions& o, const BenchShape& shape,
                  const std::function<void(const nlohmann::json&)>& emit) {
  const std::string& shape_name = shape.name;
  // Per (sparsity, tokens): a block's seven linears summed.
  std::map<std::pair<double, int64_t>, std::pair<double, double>> block;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  for (const auto& s : shape.layers) {
    if (!layer_selected(o, shape, s.names)) continue;
    const sparsity::TileGrid grid(s.out, s.in, o.tile_rows, o.tile_cols);
    const auto w = (at::randn({s.out, s.in}, gen, at::kFloat) * 0.02).to(at::kBFloat16);
    for (double sp : o.sparsities) {
      const auto packed = pack_layer(w, random_layer_mask(s.names.front(), grid, sp, gen));
      const auto timings = time_layer(packed, o, core::str(shape_name, " ", joined(s.names), " at sparsity ", sp));
      for (const auto& t : timings) {
        const double mult = static_cast<double>(s.names.size());
        auto& b = block[{sp, t.tokens}];
        b.first += mult * t.dense_us;
        b.second += mult * t.hybrid_us;
        ordered_json j{
            {"bench", "deploy_layer"},
            {"shape", shape_name},
            {"layers", joined(s.names)},
            {"out", s.out},
            {"in", s.in},
            {"tile", core::str(o.tile_rows, "x", o.tile_cols)},
            {"target_sparsity", sp},
            {"sparsity", packed.sparsity()},
            {"sparse_tiles", packed.sparse_tile_fraction()},
            {"tokens", t.tokens},
            {"path", t.path},
            {"dense_us", t.dense_us},
            {"hybrid_us", t.hybrid_us},
            {"speedup", t.dense_us / t.hybrid_us},
            {"weight_bytes_ratio", static_cast<double>(packed.bytes()) / (2.0 * s.out * s.in)},
            {"device_bytes_ratio", static_cast<double>(t.device_bytes) / (2.0 * s.out * s.in)},
            {"max_rel_err", t.max_rel_err},
            {"copies", t.copies}};
        emit(j);
      }
    }
  }
  if (!o.layers.empty() || !shape.model) return;  // a block needs all seven
  for (const auto& [key, t] : block)
    emit(ordered_json{{"bench", "deploy_block"},
                      {"shape", shape_name},
                      {"target_sparsity", key.first},
                      {"tokens", key.second},
                      {"dense_us", t.first},
                      {"hybrid_us", t.second},
                      {"speedup", t.first / t.second}});
}

// One sparse GEMM y = x W^T of a 2:4 weight, checked against the masked dense
// matmul and timed; a kernel that cannot run the shape gives its reason.
struct SparseKernel {
  std::string name;
  std::function<void(const at::Tensor& x, at::Tensor& y)> run;
  int64_t device_bytes = 0;
  std::string error;  // set instead of run when the kernel refused the weight
};

std::vector<SparseKernel> sparse_kernels(const at::Tensor& w) {
  std::vector<SparseKernel> kernels;
  auto lt = std::make_shared<cuda::SparseGemm>(w);
  kernels.push_back({"cusparselt", [lt](const at::Tensor& x, at::Tensor& y) { lt->multiply(x, y); }, lt->bytes(), ""});
#if PATCH_WITH_CUTLASS
  if (cutlass_sm90::available()) {
    for (const auto v : cutlass_sm90::variants()) {
      SparseKernel k{cutlass_sm90::variant_name(v), {}, 0, ""};
      try {
        auto sw = std::make_shared<cutlass_sm90::SparseWeight>(w.data_ptr(), w.size(0), w.size(1), v,
                                                               at::cuda::getCurrentCUDAStream().stream());
        k.device_bytes = static_cast<int64_t>(sw->bytes());
        k.run = [sw](const at::Tensor& x, at::Tensor& y) {
          sw->run(x.data_ptr(), y.data_ptr(), x.size(0), at::cuda::getCurrentCUDAStream().stream());
        };
      } catch (const std::exception& e) {
        k.error = e.what();
      }
      kernels.push_back(std::move(k));
    }
  }
#endif
  return kernels;
}

// Each linear shape as a layer of 2:4 tiles only (sparsity 0.5): cuBLAS on
// the masked weight against every sparse GEMM at deploy.gemm_tokens.
void bench_sparse_gemms(const DeployBenchOptions& o, const BenchShape& shape,
                        const std::function<void(const nlohmann::json&)>& emit) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1);
  for (const auto& s : shape.layers) {
    if (!layer_selected(o, shape, s.names)) continue;
    const sparsity::TileGrid grid(s.out, s.in, o.tile_rows, o.tile_cols);
    const auto w = (at::randn({s.out, s.in}, gen, at::kFloat) * 0.02).to(at::kBFloat16);
    const auto masked = unpack_layer(pack_layer(w, random_layer_mask(s.names.front(), grid, 0.5, gen))).to(o.device);
    const auto wf = masked.to(at::kFloat);
    auto kernels = sparse_kernels(masked);
    for (int64_t tokens : o.gemm_tokens) {
      const auto x = at::randn({tokens, s.in}, at::TensorOptions(o.device).dtype(at::kBFloat16));
      const auto ref = at::linear(x.to(at::kFloat), wf);
      const double dense_us = cuda::graph_time_us([&](int) { at::linear(x, masked); }, 8, o.repeats);
      for (auto& k : kernels) {
        ordered_json j{{"bench", "deploy_sparse_gemm"}, {"shape", shape.name}, {"layers", joined(s.names)},
                       {"out", s.out},  {"in", s.in},     {"tokens", tokens},
                       {"kernel", k.name}, {"dense_us", dense_us}};
        if (!k.error.empty()) {
          j["error"] = k.error;
          emit(j);
          continue;
        }
        auto y = at::empty({tokens, s.out}, x.options());
        k.run(x, y);
        const double err = ((y.to(at::kFloat) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item<double>();
        // Timings of wrong outputs are worthless (bf16 rounding is 4e-3).
        core::check(err <= 8e-3, "bench-deploy",
                    core::str(shape.name, " ", joined(s.names), " at ", tokens, " tokens: ", k.name,
                              " is off the masked dense matmul by ", err, " of its largest value"));
        const double sparse_us = cuda::graph_time_us([&](int) { k.run(x, y); }, 8, o.repeats);
        j["sparse_us"] = sparse_us;
        j["s"] = dense_us / sparse_us;
        j["max_rel_err"] = err;
        j["device_bytes_ratio"] = static_cast<double>(k.device_bytes) / (2.0 * s.out * s.in);
        emit(j);
      }
    }
  }
}

// Hybrid layers (deploy.sparsities, 128 x 128 tiles) in one tensor-core
// kernel (cutlass_hybrid_gemm.h), each kernel (split: dense tiles as two 2:4
// halves; mixed: dense tiles on the dense wgmma) against cuBLAS on the masked
// weight at deploy.gemm_tokens.
void bench_split_hybrid(const DeployBenchOptions& o, const BenchShape& shape,
                        const std::function<void(const nlohmann::json&)>& emit) {
#if PATCH_WITH_CUTLASS
  if (o.tile_rows != kSplitTile || o.tile_cols != kSplitTile) return;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 2);
  for (const auto& s : shape.layers) {
    const sparsity::TileGrid grid(s.out, s.in, kSplitTile, kSplitTile);
    if (!layer_selected(o, shape, s.names) || !split_supported(grid, o.device)) continue;
    const auto w = (at::randn({s.out, s.in}, gen, at::kFloat) * 0.02).to(at::kBFloat16);
    for (double sp : o.sparsities) {
      const auto mask = random_layer_mask(s.names.front(), grid, sp, gen);
      const auto masked_cpu = unpack_layer(pack_layer(w, mask));
      const auto masked = masked_cpu.to(o.device);
      const auto wf = masked.to(at::kFloat);
      using cutlass_sm90::HybridKernel;
      const int64_t sms = at::cuda::getDeviceProperties(o.device.index())->multiProcessorCount;
      for (const HybridKernel kernel :
           {HybridKernel::kSplit, HybridKernel::kMixed128, HybridKernel::kMixed64, HybridKernel::kMixedSerial}) {
        const char* name = cutlass_sm90::hybrid_kernel_name(kernel);
        std::unique_ptr<cuda::SplitGemm> gemm;
        std::string error;
        try {
          gemm = std::make_unique<cuda::SplitGemm>(masked_cpu, mask.tile_dense, o.device, kernel);
        } catch (const std::exception& e) {
          error = e.what();
        }
        for (int64_t tokens : o.gemm_tokens) {
          const auto x = at::randn({tokens, s.in}, at::TensorOptions(o.device).dtype(at::kBFloat16));
          const double dense_us = cuda::graph_time_us([&](int) { at::linear(x, masked); }, 8, o.repeats);
          ordered_json j{{"bench", "deploy_hybrid_gemm"}, {"kernel", name},
                         {"shape", shape.name},         {"layers", joined(s.names)},
                         {"out", s.out},                {"in", s.in},
                         {"target_sparsity", sp},       {"tokens", tokens},
                         {"dense_us", dense_us}};
          // Which width deploy.split_kernel=mixed runs at this token count.
          if (kernel == HybridKernel::kMixed128 || kernel == HybridKernel::kMixed64)
            j["mixed_picks"] = (kernel == HybridKernel::kMixed64) == cutlass_sm90::mixed_narrow(s.out, tokens, sms);
          if (!gemm) {
            j["error"] = error;
            emit(j);
            continue;
          }
          auto y = at::empty({tokens, s.out}, x.options());
          const auto run = [&] { gemm->multiply(x, y); };
          run();
          const auto ref = at::linear(x.to(at::kFloat), wf);
          const double err =
              ((y.to(at::kFloat) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item<double>();
          core::check(err <= 8e-3, "bench-deploy",
                      core::str(shape.name, " ", joined(s.names), " at sparsity ", sp, " and ", tokens,
                                " tokens: the ", name,
                                " hybrid GEMM is off the masked dense matmul by ", err, " of its largest value"));
          const double hybrid_us = cuda::graph_time_us([&](int) { run(); }, 8, o.repeats);
          j["hybrid_us"] = hybrid_us;
          j["speedup"] = dense_us / hybrid_us;
          j["max_rel_err"] = err;
          j["device_bytes_ratio"] = static_cast<double>(gemm->bytes()) / (2.0 * s.out * s.in);
          emit(j);
        }
      }
    }
  }
#else
  (void)o;
  (void)shape;
  (void)emit;
#endif
}

// The whole model: prefill of e2e_prefill tokens (eager, median wall time) and
// single-token steps (a CUDA graph of the forward; no KV cache, so attention
// sees only the new token: the weight-streaming cost of a decode step).
void bench_model(const DeployBenchOptions& o, const std::string& shape_name, io::ModelConfig cfg,
                 const std::function<void(const nlohmann::json&)>& emit) {
  cfg.max_position_embeddings =
      std::max<int64_t>({cfg.max_position_embeddings, o.e2e_prefill, o.gen_prompt + o.gen_new_tokens});
  model::DecoderOptions dopts;
  dopts.device = o.device;
  dopts.dtype = at::kBFloat16;
  auto dec = model::Decoder::random(cfg, dopts);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1);
  // One packed layer per shape, cloned for every layer of that shape: distinct
  // memory, so each layer streams its own weights as in a real model.
  std::map<std::pair<int64_t, int64_t>, std::unique_ptr<HybridLinear>> proto;
  NamedKernels kernels;
  int64_t total = 0;
  for (auto* lin : dec.linears()) {
    const int64_t out = lin->weight().size(0), in = lin->weight().size(1);
    auto& p = proto[{out, in}];
    if (!p) {
      const sparsity::TileGrid grid(out, in, o.tile_rows, o.tile_cols);
      const auto packed =
          pack_layer(lin->weight(), random_layer_mask(lin->name(), grid, o.e2e_sparsity, gen));
      p = std::make_unique<HybridLinear>(packed, o.device, o.hybrid);
    }
    total += 1;
    kernels.emplace_back(lin->name(), std::make_shared<HybridLinear>(p->clone()));
  }
  const auto prefill_ids = at::randint(0, cfg.vocab_size, {1, o.e2e_prefill},
                                       at::TensorOptions(o.device).dtype(at::kLong));
  const auto step_ids =
      at::randint(0, cfg.vocab_size, {1, 1}, at::TensorOptions(o.device).dtype(at::kLong));
  auto set_kernels = [&](bool on) {
    if (on) install_kernels(dec, kernels, shape_name);
    else remove_kernels(dec);
  };
  at::NoGradGuard no_grad;
  ordered_json j{{"bench", "deploy_model"},
                 {"shape", shape_name},
                 {"target_sparsity", o.e2e_sparsity},
                 {"prefill_tokens", o.e2e_prefill},
                 {"linears", total}};
  // Prefill in turns, dense then hybrid, each after one untimed forward: the
  // clock drifts as the GPU heats up, and both should see the same drift.
  std::map<bool, std::vector<double>> prefill;
  for (int round = 0; round < 5; ++round)
    for (bool hybrid : {false, true}) {
      set_kernels(hybrid);
      prefill[hybrid].push_back(wall_ms([&] { dec.forward(prefill_ids); }, o.device, 1));
    }
  for (bool hybrid : {false, true}) {
    set_kernels(hybrid);
    const std::string key = hybrid ? "hybrid" : "dense";
    auto& ms = prefill[hybrid];
    std::sort(ms.begin(), ms.end());
    j[key + "_prefill_ms"] = ms[ms.size() / 2];
    const double step_us = cuda::graph_time_us([&](int) { dec.forward(step_ids); }, 4, o.repeats);
    j[key + "_decode_step_ms"] = step_us / 1000.0;
    j[key + "_decode_tokens_per_s"] = 1e6 / step_us;
  }
  set_kernels(false);
  j["prefill_speedup"] = j["dense_prefill_ms"].get<double>() / j["hybrid_prefill_ms"].get<double>();
  j["decode_speedup"] =
      j["dense_decode_step_ms"].get<double>() / j["hybrid_decode_step_ms"].get<double>();
  emit(j);
  if (o.gen_prompt <= 0) return;

  // Generation as `patch-train generate` runs it: random prompts, greedy, no
  // end-of-sequence token (every sequence runs all its steps).
  GenerateOptions go;
  go.max_new_tokens = o.gen_new_tokens;
  go.cuda_graph = true;
  for (int64_t batch : o.gen_batches) {
    std::vector<std::vector<int64_t>> prompts(static_cast<size_t>(batch));
    const auto ids = at::randint(0, cfg.vocab_size, {batch, o.gen_prompt}, gen, at::kLong);
    for (int64_t i = 0; i < batch; ++i)
      prompts[static_cast<size_t>(i)] = std::vector<int64_t>(ids[i].data_ptr<int64_t>(),
                                                             ids[i].data_ptr<int64_t>() + o.gen_prompt);
    ordered_json g{{"bench", "deploy_generate"},   {"shape", shape_name},
                   {"target_sparsity", o.e2e_sparsity}, {"batch", batch},
                   {"prompt_tokens", o.gen_prompt}, {"new_tokens", o.gen_new_tokens}};
    for (bool hybrid : {false, true}) {
      set_kernels(hybrid);
      const std::string key = hybrid ? "hybrid" : "dense";
      // One untimed generation of the same size first: a shorter one left the
      // first timed batch-1 prefill at 2.5-3x its later time (cuDNN and cuBLAS
      // plans for the cache's full length are made on first use).
      generate(dec, prompts, go);
      core::reset_peak_memory(o.device);
      const Generation r = generate(dec, prompts, go);
      g[key + "_prefill_ms"] = r.prefill_ms;
      g[key + "_decode_tokens_per_s"] =
          static_cast<double>(batch * r.decode_steps) / std::max(r.decode_ms / 1e3, 1e-9);
      g[key + "_peak_memory_gib"] = core::peak_memory_gib(o.device);
    }
    set_kernels(false);
    g["prefill_speedup"] = g["dense_prefill_ms"].get<double>() / g["hybrid_prefill_ms"].get<double>();
    g["decode_speedup"] =
        g["hybrid_decode_tokens_per_s"].get<double>() / g["dense_decode_tokens_per_s"].get<double>();
    emit(g);
  }
}
#endif

}  // namespace

maskfile::LayerMask random_layer_mask(const std::string& name, const sparsity::TileGrid& grid,
                                      double sparsity, at::Generator& gen) {
  maskfile::LayerMask m;
  m.name = name;
  m.grid = grid;
  const int64_t tiles = grid.num_tiles();
  const int64_t sparse =
      std::llround(std::clamp(2.0 * sparsity, 0.0, 1.0) * static_cast<double>(tiles));
  auto td = at::ones({tiles}, at::kByte);
  td.index_fill_(0, at::randperm(tiles, gen, at::kLong).slice(0, 0, sparse), 0);
  m.tile_dense = td.view({grid.rows(), grid.cols()});
  m.pattern = at::randint(0, sparsity::kNumPatterns, {grid.out(), grid.groups()}, gen, at::kByte);
  return m;
}

void bench_packed(const PackedModel& packed, const DeployBenchOptions& o,
                  const std::function<void(const nlohmann::json&)>& emit) {
#if PATCH_WITH_CUDA
  if (!o.device.is_cuda())
    throw core::ConfigError("bench-deploy: the hybrid kernels run on a CUDA device (model.device=cuda)");
  // Per token count: every layer of the file summed.
  std::map<int64_t, std::pair<double, double>> total;
  for (const auto& layer : packed.layers) {
    for (const auto& t : time_layer(layer, o, core::str(packed.path, ": ", layer.name))) {
      auto& sum = total[t.tokens];
      sum.first += t.dense_us;
      sum.second += t.hybrid_us;
      emit(ordered_json{{"bench", "deploy_packed_layer"},
                        {"packed", packed.path},
                        {"layer", layer.name},
                        {"out", layer.grid.out()},
                        {"in", layer.grid.in()},
                        {"sparsity", layer.sparsity()},
                        {"sparse_tiles", layer.sparse_tile_fraction()},
                        {"tokens", t.tokens},
                        {"path", t.path},
                        {"dense_us", t.dense_us},
                        {"hybrid_us", t.hybrid_us},
                        {"speedup", t.dense_us / t.hybrid_us},
                        {"max_rel_err", t.max_rel_err}});
    }
  }
  for (const auto& [tokens, t] : total)
    emit(ordered_json{{"bench", "deploy_packed_total"},
                      {"packed", packed.path},
                      {"layers", packed.layers.size()},
                      {"sparsity", packed.sparsity()},
                      {"tokens", tokens},
                      {"dense_us", t.first},
                      {"hybrid_us", t.second},
                      {"speedup", t.first / t.second}});
#else
  (void)packed;
  (void)o;
  (void)emit;
  throw core::ConfigError("bench-deploy: this build has no CUDA kernels (configure with PATCH_WITH_CUDA=ON)");
#endif
}

void bench_deploy(const DeployBenchOptions& o,
                  const std::function<void(const nlohmann::json&)>& emit) {
  std::vector<BenchShape> shapes;
  for (const auto& name : o.shapes) shapes.push_back(bench_shape(name));
#if PATCH_WITH_CUDA
  if (!o.device.is_cuda())
    throw core::ConfigError(
        "bench-deploy: the hybrid kernels run on a CUDA device (model.device=cuda)");
  for (const auto& shape : shapes) {
    bench_layers(o, shape, emit);
    if (!o.gemm_tokens.empty()) bench_sparse_gemms(o, shape, emit);
    if (!o.gemm_tokens.empty()) bench_split_hybrid(o, shape, emit);
    if (o.end_to_end && shape.model) bench_model(o, shape.name, *shape.model, emit);
  }
#else
  (void)shapes;
  (void)emit;
  throw core::ConfigError(
      "bench-deploy: this build has no CUDA kernels (configure with PATCH_WITH_CUDA=ON)");
#endif
}

}  // namespace patch::deploy
