#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "catch.h"
#include "config/config.h"
#include "core/error.h"
#include "test_util.h"

using namespace patch;
using config::Json;

namespace {

// A subcommand that requires no key, for checks unrelated to required keys.
const std::string kNoRequirements = "help";

std::string write(const test::TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.file(name);
  std::ofstream(path) << text;
  return path;
}

// The message of the ConfigError that f throws ("" when it throws none).
std::string config_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const core::ConfigError& e) {
    CHECK(e.exit_code() == core::kExitUsage);
    return e.what();
  }
  return "";
}

void check_mentions(const std::string& msg, const std::vector<std::string>& parts) {
  INFO("message: " << msg);
  REQUIRE(!msg.empty());
  CHECK(msg.find('\n') == std::string::npos);
  for (const auto& p : parts) CHECK(msg.find(p) != std::string::npos);
}

config::Config resolve_yaml(const test::TempDir& dir, const std::string& text,
                            const config::Overrides& ov = {}) {
  return config::resolve(write(dir, "run.yaml", text), ov, kNoRequirements);
}

}  // namespace

TEST_CASE("defaults come from the schema - in schema order") {
  const auto cfg = config::resolve(std::nullopt, {}, kNoRequirements);
  CHECK(cfg.get_float("mask.target_sparsity") == 0.45);
  CHECK(cfg.get_int_list("mask.tile") == std::vector<int64_t>{128, 128});
  CHECK(cfg.get_bool("model.checkpointing"));
  CHECK(cfg.get_string_list("mask.include") == std::vector<std::string>{"*"});
  CHECK_FALSE(cfg.has("model.path"));
  CHECK(cfg.tree().begin().key() == "model");
  // Getters name the key when it is absent or of another type.
  check_mentions(config_error([&] { cfg.get_string("model.path"); }), {"model.path", "not set"});
  check_mentions(config_error([&] { cfg.get_int("train.lr"); }),
                 {"train.lr", "expected an integer"});
}

TEST_CASE("YAML and JSON files with the same settings give equal trees") {
  test::TempDir dir;
  const std::string yaml = write(dir, "run.yml", R"(# comment
model:
  path: /models/tiny
  checkpointing: false
mask:
  tile: [64, 32]
  target_sparsity: 0.3
  include: ["*", model.layers.*.mlp.*]
  tau_24: [4, 1e-06]
train:
  lr: 5e-4
  steps: 1e3
output:
)");
  const std::string json = write(dir, "run.json", R"({
  "train": {"steps": 1000, "lr": 0.0005},
  "mask": {"tile": [64, 32], "target_sparsity": 0.3, "include": ["*", "model.layers.*.mlp.*"],
           "tau_24": [4.0, 0.000001]},
  "model": {"checkpointing": false, "path": "/models/tiny"}
})");
  const auto a = config::resolve(yaml, {}, "eval");
  const auto b = config::resolve(json, {}, "eval");
  CHECK(a.tree() == b.tree());
  CHECK(a.get_float("train.lr") == 5e-4);
  CHECK(a.get_int("train.steps") == 1000);
  CHECK(a.tree()["mask"]["tau_24"][0].is_number_float());  // int given for a float: coerced
  CHECK(a.get_string_list("mask.include")[1] == "model.layers.*.mlp.*");
}

TEST_CASE("precedence: defaults < file < shortcut options < --set") {
  test::TempDir dir;
  const std::string text = "model:\n  path: from-file\ntrain:\n  lr: 0.01\n  steps: 7\n";
  config::Overrides ov;
  auto cfg = resolve_yaml(dir, text, ov);
  CHECK(cfg.get_string("model.path") == "from-file");  // file over default
  CHECK(cfg.get_int("train.steps") == 7);
  CHECK(cfg.get_int("train.warmup_steps") == 10);  // untouched default

  ov.values.emplace_back("model.path", "from-option");
  CHECK(resolve_yaml(dir, text, ov).get_string("model.path") ==
        "from-option");  // shortcut over file

  ov.sets = {"model.path=from-set",
             "train.lr=5e-4",
             "mask.tile=[64,64]",
             "model.checkpointing=false",
             "train.min_lr_ratio=1",
             "mask.include=[*, \"a,b\"]",
             "data.document_separator=<|endoftext|>"};
  cfg = resolve_yaml(dir, text, ov);
  CHECK(cfg.get_string("model.path") == "from-set");  // --set over shortcut
  CHECK(cfg.get_float("train.lr") == 5e-4);           // --set over file, exact double
  CHECK(cfg.get_int_list("mask.tile") == std::vector<int64_t>{64, 64});
  CHECK_FALSE(cfg.get_bool("model.checkpointing"));
  CHECK(cfg.tree()["train"]["min_lr_ratio"].is_number_float());
  CHECK(cfg.get_string_list("mask.include") == std::vector<std::string>{"*", "a,b"});
  CHECK(cfg.get_string("data.document_separator") == "<|endoftext|>");
}

TEST_CASE("invalid files name the file - the key and the expectation") {
  test::TempDir dir;
  struct Case {
    std::string yaml;
    std::vector<std::string> mentions;
  };
  const Case cases[] = {
      {"mask:\n  target_sparsty: 0.3\n",
       {"run.yaml: unknown key 'mask.target_sparsty' (did you mean 'mask.target_sparsity'?)"}},
      {"maks:\n  tile: [64, 64]\n", {"run.yaml: unknown section 'maks' (did you mean 'mask'?)"}},
      {"mask: 0.5\n", {"run.yaml: mask: expected a section", "0.5"}},
      {"train:\n  lr: fast\n", {"run.yaml: train.lr: expected a number", "\"fast\""}},
      {"train:\n  lr: '0.1'\n", {"run.yaml: train.lr: expected a number", "\"0.1\""}},
      {"model:\n  checkpointing: 1\n",
       {"run.yaml: model.checkpointing: expected true or false, got 1"}},
      {"train:\n  steps: 2.5\n", {"run.yaml: train.steps: expected an integer >= 1, got 2.5"}},
      {"data:\n  train: [a.txt, 3]\n", {"run.yaml: data.train[1]: expected a string, got 3"}},
      {"mask:\n  target_sparsity: 0.7\n",
       {"run.yaml: mask.target_sparsity: expected a number in [0, 0.5], got 0.7"}},
      {"mask:\n  mode: fancy\n",
       {"run.yaml: mask.mode: expected one of joint, tile, maskllm, got \"fancy\""}},
      {"mask:\n  tile: [64, 64, 64]\n",
       {"run.yaml: mask.tile: expected a list of 2 integers >= 1, got [64,64,64]"}},
      {"mask:\n  tile: 64\n", {"run.yaml: mask.tile: expected a list of 2 integers"}},
      {"mask:\n  tile: [0, 64]\n", {"run.yaml: mask.tile[0]: expected an integer >= 1, got 0"}},
      {"mask:\n  tile: [64, 62]\n", {"run.yaml: mask.tile:", "multiple of 4", "[64, 62]"}},
      {"train:\n  micro_batch: 3\n",
       {"run.yaml: train.global_batch: expected a multiple of train.micro_batch (3), got 8"}},
      {"mask:\n  prior: file\n", {"run.yaml: mask.prior_file:", "mask.prior is 'file'"}},
      {"deploy:\n  prefill_split: true\n  prefill_dense_copy: true\n",
       {"run.yaml: deploy.prefill_split: expected false when deploy.prefill_dense_copy is true"}},
      {"deploy:\n  split_kernel: fast\n",
       {"run.yaml: deploy.split_kernel: expected one of mixed, split, got \"fast\""}},
      {"sweep:\n  targets: [0.25, 0.6]\n",
       {"run.yaml: sweep.targets[1]: expected a number in [0, 0.5]"}},
      {"- 1\n- 2\n", {"run.yaml: expected a mapping of sections"}},
      {"train:\n  lr: 0.1\n   steps: 3\n", {"run.yaml:3: invalid YAML: "}},
      {"train:\n  lr: 0.1\ntrain:\n  steps: 3\n", {"run.yaml:3: duplicate key 'train'"}},
  };
  for (const auto& c : cases) {
    INFO("config: " << c.yaml);
    check_mentions(config_error([&] { resolve_yaml(dir, c.yaml); }), c.mentions);
  }

  const std::string json = write(dir, "run.json", "{\n  \"mask\": {\"tile\": [64, 64],}\n}\n");
  check_mentions(config_error([&] { config::resolve(json, {}, kNoRequirements); }),
                 {"run.json:2: invalid JSON: ", "syntax error"});
  const std::string json_range = write(dir, "range.json", R"({"mask": {"target_sparsity": 0.7}})");
  check_mentions(config_error([&] { config::resolve(json_range, {}, kNoRequirements); }),
                 {"range.json: mask.target_sparsity: expected a number in [0, 0.5], got 0.7"});
  const std::string toml = write(dir, "run.toml", "x = 1\n");
  check_mentions(config_error([&] { config::resolve(toml, {}, kNoRequirements); }),
                 {toml + ": expected a .yaml, .yml or .json config file"});
  check_mentions(config_error([&] { config::resolve(dir.file("nope.yaml"), {}, kNoRequirements); }),
                 {dir.file("nope.yaml") + ": cannot open config file"});
}

TEST_CASE("command-line errors name --set or the option and the key") {
  const auto with_sets = [](std::vector<std::string> sets) {
    config::Overrides ov;
    ov.sets = std::move(sets);
    return config_error([&] { config::resolve(std::nullopt, ov, kNoRequirements); });
  };
  CHECK(with_sets({"foo"}) == "--set 'foo': expected KEY=VALUE");
  CHECK(with_sets({"=3"}) == "--set '=3': expected KEY=VALUE");
  check_mentions(with_sets({"train.lrr=0.1"}),
                 {"--set: unknown key 'train.lrr' (did you mean 'train.lr'?)"});
  check_mentions(with_sets({"mask.target_sparsity=0.7"}),
                 {"--set: mask.target_sparsity: expected a number in [0, 0.5], got 0.7"});
  check_mentions(with_sets({"model.checkpointing=yes"}),
                 {"--set: model.checkpointing: expected true or false"});
  check_mentions(with_sets({"mask.tile=[64,"}), {"--set 'mask.tile=[64,': invalid YAML value"});
  check_mentions(with_sets({"mask.tile=[64,30]"}), {"--set: mask.tile:", "multiple of 4"});
  // The source of a cross-key problem is the one that set either key last.
  check_mentions(with_sets({"train.micro_batch=3"}), {"--set: train.global_batch:", "multiple"});

  // The command line tells which option sets which key (apps: key_options).
  config::Overrides flags_only;
  flags_only.flags = {{"model.path", "--model"}};
  CHECK(config_error([&] { config::resolve(std::nullopt, flags_only, "eval"); }) ==
        "model.path: required by 'eval' (set it in the config file, with --model, or --set "
        "model.path=...)");
  CHECK(config_error([] { config::resolve(std::nullopt, {}, "eval"); }) ==
        "model.path: required by 'eval' (set it in the config file or with --set model.path=...)");
  config::Overrides ov = flags_only;
  ov.values.emplace_back("model.path", 3);
  check_mentions(config_error([&] { config::resolve(std::nullopt, ov, "eval"); }),
                 {"--model: model.path: expected a string, got 3"});
}

TEST_CASE("dump_yaml reloads to the same configuration") {
  test::TempDir dir;
  const auto round_trip = [&](const config::Config& cfg) {
    const std::string text = config::dump_yaml(cfg);
    INFO(text);
    const std::string path = write(dir, "dump.yaml", text);
    CHECK(config::resolve(path, {}, kNoRequirements).tree() == cfg.tree());
    CHECK(config::load_file(path) == cfg.tree());
    return text;
  };

  const auto defaults = config::resolve(std::nullopt, {}, kNoRequirements);
  const std::string text = round_trip(defaults);
  CHECK(text.find("  # Target sparsity over all masked weights") != std::string::npos);
  CHECK(text.find("  target_sparsity: 0.45\n") != std::string::npos);
  CHECK(text.find("  tile: [128, 128]\n") != std::string::npos);
  CHECK(text.find("  init_std: 1.0\n") != std::string::npos);
  CHECK(text.find("  include: [\"*\"]\n") != std::string::npos);
  CHECK(text.find("  path: null\n") != std::string::npos);
  CHECK(text.find("\nmodel:\n") < text.find("\ndata:\n"));
  CHECK(text.find("\ndata:\n") < text.find("\nmask:\n"));
  CHECK(text.find("\nmask:\n") < text.find("\ntrain:\n"));

  // Strings that YAML would read as another type, and floats that need all 17 digits.
  config::Overrides ov;
  ov.sets = {"train.lr=5e-4",
             "mask.tau_24=[4, 1e-06]",
             "train.weight_decay=1e-06",
             "mask.target_sparsity=0.30000000000000004",
             "train.grad_clip=1e+20",
             "train.betas=[0.9, 0.1]"};
  auto cfg = config::resolve(std::nullopt, ov, kNoRequirements);
  cfg.set("model.path", "true");
  cfg.set("model.device", "1.0");
  cfg.set("data.document_separator", "");
  cfg.set("data.jsonl_field", "a: b # c\n\"quoted\" \\ tab\t é");
  cfg.set("data.cache_dir", "@data/cache");
  cfg.set("data.train",
          Json::array({"*", "yes", "null", "~/x", "-1", "a,b", "[x]", "0x10", ".inf"}));
  const std::string modified = round_trip(cfg);
  CHECK(modified.find("  lr: 0.0005\n") != std::string::npos);
  CHECK(modified.find("  weight_decay: 1.0e-06\n") != std::string::npos);
  CHECK(modified.find("  dtype: auto\n") != std::string::npos);     // plain where it is safe
  CHECK(modified.find("  path: \"true\"\n") != std::string::npos);  // quoted where needed
  CHECK(modified.find("  document_separator: \"\"\n") != std::string::npos);

  const auto reloaded = config::resolve(write(dir, "dump.yaml", modified), {}, kNoRequirements);
  CHECK(reloaded.get_float("train.lr") == 5e-4);
  CHECK(reloaded.get_float_list("mask.tau_24")[1] == 1e-06);
  CHECK(reloaded.get_float("train.weight_decay") == 1e-06);
  CHECK(reloaded.get_float("mask.target_sparsity") == 0.1 + 0.2);
}
