// patch-train sweep as a user runs it: stopped by SIGTERM in the middle of a
// training point, then continued with --resume, skipping finished points.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "catch.h"
#include "core/atomic_file.h"
#include "test_util.h"

using namespace patch;
namespace fs = std::filesystem;

namespace {

std::string sweep_cmd(const std::string& out, const std::string& extra) {
  return test::train_bin() + " sweep --config " + test::source_dir() + "/configs/tinystories-656k.yaml" +
         " --set model.path=" + test::data_path("models/tinystories-656k") + " --data " +
         test::data_path("text/tinystories/tinystories_train_first2MiB.txt") + " --set eval.data=[" +
         test::data_path("text/tinystories/tinystories_validation_head.txt") + "]" +
         " --targets 0.25,0.4 --baselines wanda --set data.seq_len=64 --set data.max_tokens=100000" +
         " --set prune.calib_samples=8 --set prune.calib_seq_len=64 --set train.micro_batch=4" +
         " --set train.global_batch=4 --set train.steps=40 --set train.eval_every=0 --set train.checkpoint_every=5" +
         " --set eval.max_windows=8 --out " + out + " " + extra;
}


double mtime(const std::string& path) {
  struct stat st {};
  ::stat(path.c_str(), &st);
  return static_cast<double>(st.st_mtim.tv_sec) + 1e-9 * static_cast<double>(st.st_mtim.tv_nsec);
}

bool has_matplotlib() {
  return test::run_command(test::env_or("PATCH_PYTHON", "python3") + " -c 'import matplotlib'").exit_code == 0;
}

}  // namespace

TEST_CASE("an interrupted sweep resumes and skips finished points", "[sweep]") {
  test::TempDir dir;
  const std::string out = dir.file("sweep");
  const pid_t pid = test::spawn(sweep_cmd(out, "-q"));
  // Stop it inside the second PATCH point, after its first checkpoint, however long that takes.
  const std::string second = out + "/points/patch-joint-0.4";
  REQUIRE(test::wait_for(pid, [&] { return test::last_step(second + "/metrics.jsonl") >= 7; }));
  REQUIRE(::kill(pid, SIGTERM) == 0);
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WEXITSTATUS(status) == 130);
  REQUIRE(fs::exists(out + "/points/patch-joint-0.25/result.json"));
  REQUIRE_FALSE(fs::exists(second + "/result.json"));
  REQUIRE(fs::exists(second + "/checkpoint.safetensors"));
  CHECK_FALSE(fs::exists(out + "/sweep.json"));
  const double first_done = mtime(out + "/points/patch-joint-0.25/result.json");

  auto again = test::run_command(sweep_cmd(out, "--resume"));
  INFO(again.err);
  REQUIRE(again.exit_code == 0);
  CHECK(again.err.find("patch-joint-0.25: done before, skipped") != std::string::npos);
  CHECK(again.err.find("resuming from step") != std::string::npos);
  CHECK(mtime(out + "/points/patch-joint-0.25/result.json") == first_done);
  auto sweep = nlohmann::json::parse(core::read_file(out + "/sweep.json"));
  REQUIRE(sweep["points"].size() == 4);  // dense, two PATCH targets, Wanda 2:4
  for (const auto& p : sweep["points"]) {
    INFO(p.dump());
    CHECK(p["perplexity"].get<double>() > 1.0);
    CHECK(std::abs(p["sparsity"].get<double>() - p["target"].get<double>()) < 0.01);
  }
  const std::string csv = core::read_file(out + "/sweep.csv");
  CHECK(csv.rfind("name,method,target,sparsity,perplexity\n", 0) == 0);
  CHECK(csv.find("wanda-2-4,wanda 2:4,0.5,0.500000,") != std::string::npos);
  // The resumed training point's metrics read as one run: every step once.
  std::ifstream in(second + "/metrics.jsonl");
  std::set<int64_t> steps;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (!j.value("final", false)) CHECK(steps.insert(j["step"].get<int64_t>()).second);
  }
  CHECK(steps.size() == 41);
  if (!has_matplotlib()) {
    WARN("matplotlib missing: sweep.png not checked");
    return;
  }
  const std::string png = core::read_file(out + "/sweep.png");
  CHECK(png.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0);
  CHECK(png.compare(12, 4, "IHDR") == 0);
}

TEST_CASE("sweep baselines: mask-only and hybrid one-shot rows equal prune + eval, learned rows their cost",
          "[sweep]") {
  test::TempDir dir;
  const std::string out = dir.file("sweep");
  const std::string common =
      " --set data.seq_len=64 --set data.max_tokens=100000 --set prune.calib_samples=8"
      " --set prune.calib_seq_len=64 --set eval.max_windows=8 --set train.micro_batch=4"
      " --set train.global_batch=4 --set train.steps=6 --set train.eval_every=0";
  const std::string config = " --config " + test::source_dir() + "/configs/tinystories-656k.yaml";
  const auto r = test::run_command(test::train_bin() + " sweep" + config + common +
                                   " --targets 0.4 --baselines sparsegpt-mask,sparsegpt,wanda-hybrid,tile@0.4 --out " +
                                   out + "");
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  std::map<std::string, nlohmann::json> rows;
  const nlohmann::json sweep = nlohmann::json::parse(core::read_file(out + "/sweep.json"));
  for (const auto& p : sweep["points"]) rows[p["name"].get<std::string>()] = p;
  for (const char* name : {"dense", "patch-joint-0.4", "sparsegpt-mask-2-4", "sparsegpt-2-4", "wanda-hybrid-0.4",
                           "patch-tile-0.4"})
    CHECK(rows.count(name) == 1);
  // The oracle of a one-shot row: the same prune written by `prune`, scored by `eval --masks`.
  auto pruned_ppl = [&](const std::string& name, const std::string& args) {
    const std::string pdir = dir.file(name), edir = dir.file(name + "-eval");
    const auto p = test::run_command(test::train_bin() + " prune" + config + common + args + " --out " + pdir + "");
    INFO(p.err);
    REQUIRE(p.exit_code == 0);
    const auto e = test::run_command(test::train_bin() + " eval" + config + common + " --masks " + pdir +
                                     "/masks.safetensors --out " + edir + "");
    INFO(e.err);
    REQUIRE(e.exit_code == 0);
    return nlohmann::json::parse(core::read_file(edir + "/eval.json"))["perplexity"].get<double>();
  };
  CHECK(rows["sparsegpt-mask-2-4"]["perplexity"].get<double>() ==
        Approx(pruned_ppl("sg", " --method sparsegpt --pattern 2:4")).epsilon(1e-9));
  CHECK(rows["wanda-hybrid-0.4"]["perplexity"].get<double>() ==
        Approx(pruned_ppl("wh", " --method wanda --pattern hybrid --target 0.4")).epsilon(1e-9));
  CHECK(rows["wanda-hybrid-0.4"]["sparsity"].get<double>() == Approx(0.4).margin(0.01));
  // SparseGPT as published keeps its updated weights: another model than the mask alone.
  CHECK(rows["sparsegpt-2-4"]["perplexity"].get<double>() != rows["sparsegpt-mask-2-4"]["perplexity"].get<double>());
  for (const char* learned : {"patch-joint-0.4", "patch-tile-0.4"}) {
    const auto& p = rows[learned];
    INFO(learned);
    CHECK(p["steps"].get<int64_t>() == 6);
    CHECK(p["train_tokens"].get<int64_t>() == 6 * 4 * 64);
    CHECK(p["tokens_per_s"].get<double>() > 0.0);
    CHECK(p["train_seconds"].get<double>() > 0.0);
    CHECK(p.contains("peak_mem_gib"));
  }
  CHECK(rows["patch-tile-0.4"]["method"] == "patch-tile");

  // Bad baseline lists fail before any work, naming the key.
  for (const char* bad : {"frobnicate", "wanda@0.3", "tile@x", "joint"}) {
    const std::string bout = dir.file(std::string("bad-") + bad);
    const auto b = test::run_command(test::train_bin() + " sweep" + config + " --targets 0.4 --baselines " + bad +
                                     " --out " + bout + "");
    INFO(bad << ": " << b.err);
    CHECK(b.exit_code == 2);
    CHECK(b.err.find("sweep.baselines") != std::string::npos);
  }
}

TEST_CASE("sweep fine-tune rows equal prune --masks with the same fine-tune beside the dense control", "[sweep]") {
  test::TempDir dir;
  const std::string out = dir.file("sweep");
  const std::string common =
      " --set data.seq_len=64 --set data.max_tokens=100000 --set prune.calib_samples=8"
      " --set prune.calib_seq_len=64 --set eval.max_windows=8 --set train.micro_batch=4"
      " --set train.global_batch=4 --set train.steps=6 --set train.eval_every=0"
      " --set prune.finetune_steps=12 --set prune.finetune_lr=1e-3";
  const std::string config = " --config " + test::source_dir() + "/configs/tinystories-656k.yaml";
  const auto r = test::run_command(test::train_bin() + " sweep" + config + common +
                                   " --targets 0.4 --baselines finetune,dense-finetune --out " + out);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  std::map<std::string, nlohmann::json> rows;
  const nlohmann::json sweep = nlohmann::json::parse(core::read_file(out + "/sweep.json"));
  for (const auto& p : sweep["points"]) rows[p["name"].get<std::string>()] = p;
  REQUIRE(rows.count("patch-joint-0.4-finetune") == 1);
  REQUIRE(rows.count("dense-finetune") == 1);
  const auto& ft = rows["patch-joint-0.4-finetune"];
  CHECK(ft["method"] == "patch-joint + fine-tune");
  CHECK(ft["finetune_steps"] == 12);
  CHECK(ft["sparsity"].get<double>() == Approx(rows["patch-joint-0.4"]["sparsity"].get<double>()).epsilon(1e-12));
  // The oracle: the same masks fine-tuned by `prune --masks`, scored on the same windows.
  const auto p = test::run_command(test::train_bin() + " prune" + config + common + " --masks " + out +
                                   "/points/patch-joint-0.4/masks.safetensors --out " + dir.file("ft"));
  INFO(p.err);
  REQUIRE(p.exit_code == 0);
  const auto pj = nlohmann::json::parse(core::read_file(dir.file("ft/prune.json")));
  CHECK(ft["perplexity"].get<double>() == Approx(pj["perplexity"].get<double>()).epsilon(1e-9));
  CHECK(ft["finetune_loss_last"].get<double>() == Approx(pj["finetune_loss_last"].get<double>()).epsilon(1e-9));
  CHECK(ft["perplexity"].get<double>() != rows["patch-joint-0.4"]["perplexity"].get<double>());
  // The control keeps every weight and trains them all: another model than the dense one.
  const auto& dense_ft = rows["dense-finetune"];
  CHECK(dense_ft["sparsity"].get<double>() == 0.0);
  CHECK(dense_ft["finetune_steps"] == 12);
  CHECK(dense_ft["perplexity"].get<double>() != rows["dense"]["perplexity"].get<double>());

  // A fine-tune baseline without steps, or the control at a target, fails before any work.
  for (const char* bad : {"finetune", "dense-finetune@0.3"}) {
    const std::string bout = dir.file(std::string("bad-") + bad);
    const auto b = test::run_command(test::train_bin() + " sweep" + config + " --targets 0.4 --baselines " + bad +
                                     " --out " + bout);
    INFO(bad << ": " << b.err);
    CHECK(b.exit_code == 2);
    CHECK(b.err.find(std::string(bad) == "finetune" ? "prune.finetune_steps" : "sweep.baselines") !=
          std::string::npos);
    CHECK_FALSE(fs::exists(bout));
  }
}
