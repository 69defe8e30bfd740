// End-to-end mask learning on the tiny real TinyStories-656K model on the CPU,
// through the patch-train binary as a user runs it.
#include <ATen/ATen.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <vector>

#include "catch.h"
#include "core/atomic_file.h"
#include "core/paths.h"
#include "dist/dist.h"
#include "io/safetensors.h"
#include "maskfile/mask_file.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace patch;

namespace {

std::string train_cmd(const std::string& out, int steps, const std::string& extra = "") {
  return test::train_bin() + " train --model " + test::data_path("models/tinystories-656k") +
         " --data " + test::data_path("text/tinystories/tinystories_train_first2MiB.txt") +
         " --set data.document_separator='<|endoftext|>' --set data.seq_len=64 --set "
         "data.max_tokens=200000"
         " --set data.valid_blocks=16 --set train.eval_blocks=16 --set mask.tile=[32,32]"
         " --set mask.target_sparsity=0.35 --set prune.calib_samples=16 --set "
         "prune.calib_seq_len=64"
         " --set train.micro_batch=4 --set train.global_batch=8"
         " --set train.steps=" +
         std::to_string(steps) +
         " --set train.eval_every=0 --set train.checkpoint_every=5 --set train.seed=11 " + extra +
         " --out " + out + " -q";
}

std::vector<json> read_metrics(const std::string& path) {
  std::vector<json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

void require_same_masks(const std::string& a, const std::string& b) {
  auto fa = maskfile::read_mask_file(a), fb = maskfile::read_mask_file(b);
  REQUIRE(fa.layers.size() == fb.layers.size());
  for (size_t i = 0; i < fa.layers.size(); ++i) {
    INFO(fa.layers[i].name);
    CHECK(fa.layers[i].name == fb.layers[i].name);
    CHECK(at::equal(fa.layers[i].tile_dense, fb.layers[i].tile_dense));
    CHECK(at::equal(fa.layers[i].pattern, fb.layers[i].pattern));
  }
}

// Every checkpoint tensor of two runs equal to the bit; returns false at the first difference.
bool same_checkpoints(const std::string& a_path, const std::string& b_path) {
  io::SafetensorsFile a(a_path), b(b_path);
  if (a.entries().size() != b.entries().size()) return false;
  for (const auto& e : a.entries())
    if (!b.contains(e.name) || !at::equal(a.tensor(e.name), b.tensor(e.name))) return false;
  return true;
}

// Runs `cmd` (exec'd, so the pid is patch-train itself), sends `sig` once the
// run has passed its first periodic checkpoint (step 5) and returns the wait status.
// Sends `sig` once the run has logged step 7 (however long that takes); -1
// when the run ended before.
int run_until_step_7(const std::string& cmd, const std::string& out, int sig) {
  const pid_t pid = test::spawn(cmd);
  const bool reached = test::wait_for(pid, [&] {
    auto m = read_metrics(out + "/metrics.jsonl");
    return !m.empty() && m.back().value("step", 0) >= 7;
  });
  if (!reached || ::kill(pid, sig) != 0) return -1;
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

}  // namespace

TEST_CASE("training lowers the masked loss - hits the budget and writes a reloadable mask file") {
  test::TempDir dir;
  const std::string out = dir.file("run");
  auto r = test::run_command(train_cmd(out, 30));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto metrics = read_metrics(out + "/metrics.jsonl");
  REQUIRE(metrics.size() >= 3);
  // Step 0 is the hardened starting point (prior + random init); the last line the end.
  const json& first = metrics.front();
  const json& last = metrics.back();
  REQUIRE(first["step"] == 0);
  REQUIRE(last.value("final", false));
  INFO("valid loss " << first["valid_loss"] << " -> " << last["valid_loss"]);
  CHECK(last["valid_loss"].get<double>() < first["valid_loss"].get<double>());
  for (const auto& k : {"lr", "ce", "sparsity_reg", "soft_density", "hard_density", "tau_24",
                        "scale_tile", "tokens_per_s", "peak_mem_gib"})
    CHECK(metrics[1].contains(k));

  auto file = maskfile::read_mask_file(out + "/masks.safetensors");
  CHECK(file.layers.size() == 2 * 7);
  CHECK(std::abs(file.sparsity() - 0.35) < 0.005);
  auto report = json::parse(core::read_file(out + "/report.json"));
  CHECK(report["achieved_sparsity"].get<double>() == Approx(file.sparsity()).margin(1e-12));
  // The result in three numbers on the same named windows: the prior alone is
  // step 0's hardened mask, the learned one the final line; the unmasked model
  // beats both, and the learned mask beats the prior it started from.
  const json& v = report["validation"];
  CHECK(v["windows"].get<int64_t>() > 0);
  CHECK(v["tokens_scored"].get<int64_t>() == v["windows"].get<int64_t>() * v["seq_len"].get<int64_t>());
  CHECK(v["prior_perplexity"].get<double>() == Approx(std::exp(first["valid_loss"].get<double>())));
  CHECK(v["perplexity"].get<double>() == Approx(std::exp(last["valid_loss"].get<double>())));
  CHECK(v["dense_perplexity"].get<double>() < v["perplexity"].get<double>());
  CHECK(v["perplexity"].get<double>() < v["prior_perplexity"].get<double>());
  // The log ends with them (the console too, without -q).
  const std::string log = core::read_file(out + "/run.log");
  REQUIRE(log.rfind("validation perplexity on") != std::string::npos);
  const std::string tail = log.substr(log.rfind("validation perplexity on"));
  CHECK(tail.find("dense ") != std::string::npos);
  CHECK(tail.find("learned ") != std::string::npos);

  // Reloaded through eval --masks, the mask gives the loss the trainer measured.
  auto ev = test::run_command(
      test::train_bin() + " eval --model " + test::data_path("models/tinystories-656k") +
      " --masks " + out + "/masks.safetensors --data " +
      test::data_path("text/tinystories/tinystories_validation_head.txt") +
      " --set data.seq_len=64 --set eval.max_windows=8 --out " + dir.file("ev") + " -q");
  INFO(ev.err);
  REQUIRE(ev.exit_code == 0);
  auto evj = json::parse(ev.out);
  CHECK(evj["sparsity"].get<double>() == Approx(file.sparsity()));
  // A masked model is worse than the dense one but far from random (vocab 2048).
  CHECK(evj["perplexity"].get<double>() < 200.0);
}

TEST_CASE("fused kernels and the ATen reference learn the same mask") {
  // Same seed, same noise: the two paths differ only in float rounding order.
  std::vector<std::string> devices = {"cpu"};
  if (at::hasCUDA()) devices.push_back("cuda");
  for (const auto& device : devices) {
    test::TempDir dir;
    // float32 on both devices: in bf16 the reference path also rounds the mask
    // to bf16 before multiplying, so the two would not be the same computation.
    const std::string dev = " --set model.dtype=float32 --set model.device=" + device;
    auto fused = test::run_command(train_cmd(dir.file("fused"), 10, dev));
    auto ref =
        test::run_command(train_cmd(dir.file("ref"), 10, dev + " --set mask.kernel=reference"));
    INFO(device << ": " << fused.err << ref.err);
    REQUIRE(fused.exit_code == 0);
    REQUIRE(ref.exit_code == 0);
    require_same_masks(dir.file("fused") + "/masks.safetensors",
                       dir.file("ref") + "/masks.safetensors");
  }
}

TEST_CASE("compact state learns a mask and checks its limits") {
  test::TempDir dir;
  const std::string compact = " --set train.state=compact --set train.micro_batch=8";
  auto r = test::run_command(train_cmd(dir.file("run"), 20, compact));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto metrics = read_metrics(dir.file("run") + "/metrics.jsonl");
  CHECK(metrics.back()["valid_loss"].get<double>() < metrics.front()["valid_loss"].get<double>());
  auto file = maskfile::read_mask_file(dir.file("run") + "/masks.safetensors");
  CHECK(std::abs(file.sparsity() - 0.35) < 0.005);
  // The in-backward update runs once per backward pass: one micro-batch per step.
  auto bad = test::run_command(train_cmd(dir.file("bad"), 2, " --set train.state=compact"));
  CHECK(bad.exit_code == 2);
  CHECK(bad.err.find("train.global_batch = train.micro_batch") != std::string::npos);
  auto bad2 =
      test::run_command(train_cmd(dir.file("bad2"), 2, compact + " --set mask.kernel=reference"));
  CHECK(bad2.exit_code == 2);
  CHECK(bad2.err.find("mask.kernel=fused") != std::string::npos);
}

TEST_CASE("CUDA graph steps learn what eager steps learn", "[cuda]") {
  test::TempDir dir;
  // Refused where a replay could not run the step as the eager code does.
  auto cpu = test::run_command(
      train_cmd(dir.file("cpu"), 2, " --set model.device=cpu --set train.cuda_graph=true"));
  CHECK(cpu.exit_code == 2);
  CHECK(cpu.err.find("train.cuda_graph: needs model.device=cuda") != std::string::npos);
  auto ref = test::run_command(train_cmd(
      dir.file("ref"), 2, " --set train.cuda_graph=true --set mask.kernel=reference"));
  CHECK(ref.exit_code == 2);
  CHECK(ref.err.find("mask.kernel=fused") != std::string::npos);
  if (!at::hasCUDA()) {
    SUCCEED("no CUDA device");
    return;
  }
  // Full and compact state, with clipping active (a small clip) and the
  // temperatures, learning rate and noise changing every step: each replay
  // must read its step's values from the device. A hardened validation runs
  // eagerly between replays. Same seed, same kernels, so the checkpoints of
  // the two runs must agree to rounding.
  for (const std::string state : {"", " --set train.state=compact --set train.micro_batch=8"}) {
    const std::string common = " --set model.dtype=float32 --set model.device=cuda"
                               " --set train.grad_clip=0.05 --set train.warmup_steps=2"
                               " --set train.eval_every=5" + state;
    auto eager = test::run_command(train_cmd(dir.file("eager"), 10, common + " --overwrite"));
    auto graph = test::run_command(
        train_cmd(dir.file("graph"), 10, common + " --set train.cuda_graph=true --overwrite"));
    INFO(state << ": " << eager.err << graph.err);
    REQUIRE(eager.exit_code == 0);
    REQUIRE(graph.exit_code == 0);
    require_same_masks(dir.file("eager") + "/masks.safetensors",
                       dir.file("graph") + "/masks.safetensors");
    auto me = read_metrics(dir.file("eager") + "/metrics.jsonl");
    auto mg = read_metrics(dir.file("graph") + "/metrics.jsonl");
    REQUIRE(me.size() == mg.size());
    for (size_t i = 0; i < me.size(); ++i)
      for (const char* key : {"loss", "grad_norm", "soft_density", "valid_loss"})
        if (me[i].contains(key)) CHECK(mg[i][key].get<double>() == Approx(me[i][key].get<double>()).epsilon(1e-4));
    io::SafetensorsFile a(dir.file("eager") + "/checkpoint.safetensors"),
        b(dir.file("graph") + "/checkpoint.safetensors");
    for (const auto& e : a.entries()) {
      INFO(e.name);
      REQUIRE(b.contains(e.name));
      const auto x = a.tensor(e.name).to(at::kDouble), y = b.tensor(e.name).to(at::kDouble);
      CHECK(at::allclose(x, y, 1e-3, 1e-4));
    }
  }
}

TEST_CASE("a run stopped by SIGTERM or killed resumes to the same mask file") {
  test::TempDir dir;
  // Long enough that a fast machine is still running when the signal comes.
  const int steps = 30;
  // Full state is stopped both ways; compact state (bf16 logits and moments,
  // the clip factor carried across steps) by SIGTERM.
  struct Case {
    std::string name, extra;
    int sig;
  };
  const std::string compact = "--set train.state=compact --set train.micro_batch=8";
  for (const auto& c :
       {Case{"term", "", SIGTERM}, Case{"kill", "", SIGKILL}, Case{"compact", compact, SIGTERM}}) {
    const std::string full_dir = dir.file(c.extra.empty() ? "full" : "full-compact");
    if (!fs::exists(full_dir + "/masks.safetensors")) {
      auto full = test::run_command(train_cmd(full_dir, steps, c.extra));
      INFO(full.err);
      REQUIRE(full.exit_code == 0);
    }
    const std::string out = dir.file(c.name);
    const int status = run_until_step_7(train_cmd(out, steps, c.extra), out, c.sig);
    REQUIRE(status != -1);
    if (c.sig == SIGTERM) CHECK(WEXITSTATUS(status) == 130);
    REQUIRE_FALSE(fs::exists(out + "/masks.safetensors"));
    REQUIRE(fs::exists(out + "/checkpoint.safetensors"));
    auto resumed = test::run_command(train_cmd(out, steps, c.extra + " --resume"));
    INFO(c.name << ": " << resumed.err);
    REQUIRE(resumed.exit_code == 0);
    require_same_masks(full_dir + "/masks.safetensors", out + "/masks.safetensors");
    // The metrics read as one run: every step once.
    auto m = read_metrics(out + "/metrics.jsonl");
    std::set<int64_t> seen;
    std::string steps;
    for (const auto& j : m) steps += j.dump() + "\n";
    INFO(steps);
    for (const auto& j : m)
      if (!j.value("final", false)) CHECK(seen.insert(j["step"].get<int64_t>()).second);
  }
}

namespace {

// The child processes of `pid` (Linux /proc).
std::vector<int> children_of(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  std::vector<int> out;
  for (int c; in >> c;) out.push_back(c);
  return out;
}

// Gone, or a zombie that nobody has reaped yet: either way no longer running.
bool exited(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(in, stat)) return true;
  const size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z';
}

}  // namespace

TEST_CASE("ranks stop when their launcher is killed with SIGKILL, leaving a resumable checkpoint") {
  if (!dist::has_backend("gloo")) {
    SUCCEED("this build has no Gloo headers");
    return;
  }
  test::TempDir dir;
  const std::string out = dir.file("orphaned");
  const int launcher = test::spawn(train_cmd(out, 100000, "--nproc 2"));
  REQUIRE(test::wait_for(launcher, [&] {
    auto m = read_metrics(out + "/metrics.jsonl");
    return !m.empty() && m.back().value("step", 0) >= 3;
  }));
  const std::vector<int> ranks = children_of(launcher);
  REQUIRE(ranks.size() == 2);
  REQUIRE(::kill(launcher, SIGKILL) == 0);
  int status = 0;
  ::waitpid(launcher, &status, 0);
  // However long it takes: each rank gets SIGTERM, checkpoints at its next step and ends.
  for (int r : ranks)
    while (!exited(r)) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const auto m = read_metrics(out + "/metrics.jsonl");
  REQUIRE(fs::exists(out + "/checkpoint.safetensors"));
  CHECK(m.back().value("step", 0) < 100000);
}

TEST_CASE("two Gloo ranks learn what one process learns and resume together") {
  if (!dist::has_backend("gloo")) {
    SUCCEED("this build has no Gloo headers");
    return;
  }
  test::TempDir dir;
  const int steps = 12;
  // Two micro-batches per step: one per rank, so the summed gradient is
  // a + b in both runs, exactly.
  const std::string extra = "--set train.eval_every=4";
  auto one = test::run_command(train_cmd(dir.file("one"), steps, extra));
  INFO(one.err);
  REQUIRE(one.exit_code == 0);
  auto two = test::run_command(train_cmd(dir.file("two"), steps, extra + " --nproc 2"));
  INFO(two.err);
  REQUIRE(two.exit_code == 0);
  require_same_masks(dir.file("one/masks.safetensors"), dir.file("two/masks.safetensors"));
  // Not only the hardened masks: every logit and optimizer moment, to the bit.
  CHECK(same_checkpoints(dir.file("one/checkpoint.safetensors"), dir.file("two/checkpoint.safetensors")));
  // One metrics file, written by rank 0, with the same losses.
  auto ma = read_metrics(dir.file("one/metrics.jsonl")), mb = read_metrics(dir.file("two/metrics.jsonl"));
  REQUIRE(ma.size() == mb.size());
  for (size_t i = 0; i < ma.size(); ++i) {
    CHECK(ma[i].value("step", -1) == mb[i].value("step", -2));
    if (ma[i].contains("ce")) CHECK(ma[i]["ce"].get<double>() == mb[i]["ce"].get<double>());
  }

  // SIGTERM to the launcher: both ranks stop at the same step, rank 0 writes
  // the checkpoint, and a two-rank --resume ends with the same masks.
  const std::string out = dir.file("stopped");
  const int status = run_until_step_7(train_cmd(out, 30, extra + " --nproc 2"), out, SIGTERM);
  REQUIRE(status != -1);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 130);
  REQUIRE(fs::exists(out + "/checkpoint.safetensors"));
  REQUIRE_FALSE(fs::exists(out + "/masks.safetensors"));
  auto resumed = test::run_command(train_cmd(out, 30, extra + " --nproc 2 --resume"));
  INFO(resumed.err);
  REQUIRE(resumed.exit_code == 0);
  auto full = test::run_command(train_cmd(dir.file("full"), 30, extra));
  REQUIRE(full.exit_code == 0);
  require_same_masks(dir.file("full/masks.safetensors"), out + "/masks.safetensors");
}

TEST_CASE("two NCCL ranks on two GPUs learn what one GPU learns") {
  if (!dist::has_backend("nccl") || at::getNumGPUs() < 2) {
    SUCCEED("needs the NCCL backend and two GPUs");
    return;
  }
  test::TempDir dir;
  const std::string extra = "--set train.eval_every=4 --set model.device=cuda";
  auto one = test::run_command(train_cmd(dir.file("one"), 12, extra));
  auto again = test::run_command(train_cmd(dir.file("again"), 12, extra));
  auto two = test::run_command(train_cmd(dir.file("two"), 12, extra + " --nproc 2"));
  INFO(one.err << again.err << two.err);
  REQUIRE(one.exit_code == 0);
  REQUIRE(again.exit_code == 0);
  REQUIRE(two.exit_code == 0);
  require_same_masks(dir.file("one/masks.safetensors"), dir.file("two/masks.safetensors"));
  // Two micro-batches, one per rank: the all-reduced gradient is a + b as in
  // one process, so where one GPU repeats itself bit for bit, so do two.
  if (same_checkpoints(dir.file("one/checkpoint.safetensors"), dir.file("again/checkpoint.safetensors")))
    CHECK(same_checkpoints(dir.file("one/checkpoint.safetensors"), dir.file("two/checkpoint.safetensors")));
  else
    WARN("one GPU does not repeat itself bit for bit; only the masks were compared");
  auto ma = read_metrics(dir.file("one/metrics.jsonl")), mb = read_metrics(dir.file("two/metrics.jsonl"));
  REQUIRE(ma.size() == mb.size());
  for (size_t i = 0; i < ma.size(); ++i)
    if (ma[i].contains("ce")) CHECK(mb[i]["ce"].get<double>() == Approx(ma[i]["ce"].get<double>()).epsilon(1e-4));
}

TEST_CASE("data-parallel settings that cannot split are refused before any rank starts") {
  test::TempDir dir;
  // One micro-batch per step cannot go to two ranks; compact state cannot sum gradients.
  for (const std::string& bad : {std::string("--set train.global_batch=4"),
                                 std::string("--set train.state=compact")}) {
    auto r = test::run_command(train_cmd(dir.file("bad"), 2, bad + " --nproc 2 --overwrite"));
    INFO(r.err);
    CHECK(r.exit_code == 2);
    CHECK(r.err.find(bad.find("compact") != std::string::npos ? "train.state" : "do not split evenly") !=
          std::string::npos);
    CHECK_FALSE(fs::exists(dir.file("bad/masks.safetensors")));
  }
}

TEST_CASE("the token and prior caches live in PATCH_CACHE_DIR and a resumed run reuses its own prior") {
  test::TempDir dir;
  const std::string out = dir.file("runs/run"), cache = dir.file("cache");
  const std::string env = "PATCH_CACHE_DIR=" + cache + " ";
  auto first = test::run_command(env + train_cmd(out, 2));
  INFO(first.err);
  REQUIRE(first.exit_code == 0);
  // One shared cache, nothing beside the run folder.
  CHECK_FALSE(fs::exists(dir.file("runs/.cache")));
  int tokens = 0, priors = 0;
  for (const auto& e : fs::directory_iterator(cache + "/tokens")) tokens += e.path().string().find(".tokens.bin") != std::string::npos;
  for (const auto& e : fs::directory_iterator(cache + "/priors")) priors += e.path().filename().string().rfind("wanda-", 0) == 0;
  CHECK(tokens == 1);
  CHECK(priors == 1);
  REQUIRE(fs::exists(out + "/prior.safetensors"));
  // --resume takes the run folder's prior, even with the shared cache emptied.
  core::remove_tree(cache);  // not fs::remove_all: see core/paths.h
  auto again = test::run_command(env + train_cmd(out, 2, "--resume"));
  INFO(again.err);
  REQUIRE(again.exit_code == 0);
  const std::string log = core::read_file(out + "/run.log");
  CHECK(log.find("prior: wanda from " + out + "/prior.safetensors") != std::string::npos);
  CHECK_FALSE(fs::exists(cache + "/priors"));
  // A second run of the same settings in another folder takes the prior from the cache.
  auto other = test::run_command(env + train_cmd(dir.file("runs/other"), 2));
  REQUIRE(other.exit_code == 0);
  auto third = test::run_command(env + train_cmd(dir.file("runs/third"), 2));
  REQUIRE(third.exit_code == 0);
  CHECK(core::read_file(dir.file("runs/third/run.log")).find("prior: wanda from " + cache + "/priors/") !=
        std::string::npos);
}
