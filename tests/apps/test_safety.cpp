// Nothing lost, nothing overwritten, nothing left half-done: the patch-train
// binary under a second run on the same folder, signals, kills, resumes with
// another meaning, outputs over inputs and inputs that make no sense.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "catch.h"
#include "core/atomic_file.h"
#include "test_util.h"

namespace fs = std::filesystem;
using patch::test::run_command;
using patch::test::TempDir;

namespace {

std::string bin() { return patch::test::train_bin(); }
std::string model_dir() { return patch::test::data_path("models/tinystories-656k"); }
std::string train_text() { return patch::test::data_path("text/tinystories/tinystories_train_first2MiB.txt"); }
std::string valid_text() { return patch::test::data_path("text/tinystories/tinystories_validation_head.txt"); }
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
int lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// A small training run of the toy model (CPU, seconds per step budget).
std::string train_cmd(const std::string& out, int steps, const std::string& extra = "") {
  return bin() + " train --model " + model_dir() + " --data " + train_text() +
         " --set data.document_separator='<|endoftext|>' --set data.seq_len=64 --set data.max_tokens=200000"
         " --set mask.tile=[32,32] --set prune.calib_samples=16 --set prune.calib_seq_len=64"
         " --set train.micro_batch=4 --set train.global_batch=8 --set train.eval_every=0"
         " --set train.checkpoint_every=2 --set train.steps=" +
         std::to_string(steps) + " " + extra + " --out " + out + " -q";
}


bool file_has(const std::string& path, const std::string& part) {
  std::error_code ec;
  return fs::exists(path, ec) && contains(patch::core::read_file(path), part);
}

// Every file under `dir` with its contents, to show a folder was not touched.
std::string snapshot(const std::string& dir) {
  std::ostringstream s;
  std::set<std::string> names;
  for (const auto& e : fs::recursive_directory_iterator(dir)) names.insert(e.path().string());
  for (const auto& n : names)
    s << n << "\n" << (fs::is_regular_file(n) ? patch::core::read_file(n) : std::string()) << "\n";
  return s.str();
}

void copy_dir(const std::string& from, const std::string& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from)) fs::copy_file(e.path(), fs::path(to) / e.path().filename());
}

}  // namespace

TEST_CASE("a run folder belongs to one run: a second run on it fails at once naming the other's pid") {
  TempDir dir;
  const std::string out = dir.file("run");
  const int pid = patch::test::spawn(train_cmd(out, 100000));
  // The first run holds the folder once it logs its first step.
  REQUIRE(patch::test::wait_for(pid, [&] { return patch::test::last_step(out + "/metrics.jsonl") >= 1; }));
  for (const char* flag : {"--overwrite", "--resume"}) {
    auto second = run_command(train_cmd(out, 3, flag));
    INFO(second.err);
    CHECK(second.exit_code == 2);
    CHECK(contains(second.err, "output.dir: '" + out + "' is in use by another run (pid " + std::to_string(pid) + ")"));
    CHECK(lines(second.err) == 1);
  }
  // run.log is written line by line: a killed run keeps its log.
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  CHECK(file_has(out + "/run.log", "data: "));
  CHECK(file_has(out + "/run.log", "masks: "));
  // With its owner gone, the folder is free again.
  auto next = run_command(train_cmd(out, 3, "--overwrite"));
  INFO(next.err);
  CHECK(next.exit_code == 0);
}

TEST_CASE("overwrite clears the previous run's outputs, and only in a run folder") {
  TempDir dir;
  const std::string out = dir.file("run");
  auto first = run_command(bin() + " prune --model " + model_dir() + " --method magnitude --pattern 2:4 --out " + out);
  REQUIRE(first.exit_code == 0);
  REQUIRE(fs::exists(out + "/masks.safetensors"));
  // Stale temporaries of a killed run, in the one pattern the tool uses.
  patch::core::write_file_atomic(out + "/.masks.safetensors.tmp.99999", "x");
  fs::create_directories(out + "/.partial-99999/model");
  auto second = run_command(bin() + " eval --model " + model_dir() + " --data " + valid_text() +
                            " --set eval.max_windows=2 --out " + out + " --overwrite");
  INFO(second.err);
  REQUIRE(second.exit_code == 0);
  CHECK_FALSE(fs::exists(out + "/masks.safetensors"));  // not a stale output beside the new run
  CHECK_FALSE(fs::exists(out + "/prune.json"));
  CHECK_FALSE(fs::exists(out + "/.masks.safetensors.tmp.99999"));
  CHECK_FALSE(fs::exists(out + "/.partial-99999"));
  CHECK(fs::exists(out + "/eval.json"));

  // A folder that no run made is never cleared.
  const std::string mine = dir.file("mine");
  fs::create_directories(mine);
  patch::core::write_file_atomic(mine + "/thesis.tex", "precious");
  auto refused = run_command(bin() + " eval --model " + model_dir() + " --data " + valid_text() + " --out " + mine +
                             " --overwrite");
  CHECK(refused.exit_code == 2);
  CHECK(contains(refused.err, "not a patch-train run folder"));
  CHECK(patch::core::read_file(mine + "/thesis.tex") == "precious");
}

TEST_CASE("no command writes into or over its own inputs") {
  TempDir dir;
  const std::string model = dir.file("model");
  copy_dir(model_dir(), model);
  const std::string runs = dir.file("runs");
  auto pruned = run_command(bin() + " prune --model " + model + " --method magnitude --pattern 2:4 --out " + runs);
  REQUIRE(pruned.exit_code == 0);
  const std::string before = snapshot(model), masks_before = snapshot(runs);
  const std::string masks = runs + "/masks.safetensors";
  struct Case {
    std::string cmd, key;
  };
  for (const Case& c : {Case{" export --model " + model + " --masks " + masks + " --out " + model, "model.path"},
                        Case{" pack --model " + model + " --masks " + masks + " --out " + model, "model.path"},
                        Case{" prune --model " + model + " --method sparsegpt --pattern 2:4 --set "
                             "prune.update_weights=true --set prune.calib_samples=4 --set prune.calib_seq_len=32 "
                             "--data " + train_text() + " --out " + dir.path(),
                             "model.path"},
                        Case{" eval --model " + model_dir() + " --masks " + masks + " --data " + valid_text() +
                                 " --out " + runs,
                             "model.masks"}}) {
    auto r = run_command(bin() + c.cmd + " --overwrite");
    INFO(c.cmd << "\n" << r.err);
    CHECK(r.exit_code == 2);
    CHECK(contains(r.err, "the input " + c.key));
    CHECK(lines(r.err) == 1);
  }
  CHECK(snapshot(model) == before);
  CHECK(snapshot(runs) == masks_before);
}

TEST_CASE("resume refuses a changed meaning, naming the key and both values") {
  TempDir dir;
  const std::string out = dir.file("run");
  auto first = run_command(train_cmd(out, 4));
  INFO(first.err);
  REQUIRE(first.exit_code == 0);
  const std::string masks = patch::core::read_file(out + "/masks.safetensors");
  struct Case {
    std::string set, key, now, then;
  };
  for (const Case& c : {Case{"mask.mode=maskllm", "mask.mode", "\"maskllm\"", "\"joint\""},
                        Case{"mask.target_sparsity=0.25", "mask.target_sparsity", "0.25", "0.45"},
                        Case{"train.lr=0.01", "train.lr", "0.01", "0.05"},
                        Case{"train.seed=3", "train.seed", "3", "0"},
                        Case{"data.seq_len=32", "data.seq_len", "32", "64"}}) {
    auto r = run_command(train_cmd(out, 4, "--resume --set " + c.set));
    INFO(c.set << ": " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(contains(r.err, c.key + ": " + c.now + " differs from " + c.then + " in the checkpoint"));
    CHECK(lines(r.err) == 1);
  }
  CHECK(patch::core::read_file(out + "/masks.safetensors") == masks);  // untouched
  // What only changes cadence or logging may change.
  auto ok = run_command(train_cmd(out, 4, "--resume --set train.eval_every=1 --set train.log_every=2"));
  INFO(ok.err);
  CHECK(ok.exit_code == 0);
}

TEST_CASE("SIGTERM during evaluation and calibration stops with 130 and writes no result") {
  TempDir dir;
  // Evaluation: thousands of windows of the training text.
  const std::string eval_out = dir.file("eval");
  int pid = patch::test::spawn(bin() + " eval --model " + model_dir() + " --data " + train_text() +
                               " --set data.seq_len=64 --set eval.batch_size=1 --out " + eval_out);
  REQUIRE(patch::test::wait_for(pid, [&] { return file_has(eval_out + "/run.log", "tokens"); }));
  REQUIRE(::kill(pid, SIGTERM) == 0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 130);
  CHECK_FALSE(fs::exists(eval_out + "/eval.json"));
  CHECK(file_has(eval_out + "/run.log", "stopped by signal 15"));

  // Calibration: a SparseGPT prune over many calibration sequences.
  const std::string prune_out = dir.file("prune");
  pid = patch::test::spawn(bin() + " prune --model " + model_dir() + " --method sparsegpt --pattern 2:4 --data " +
                           train_text() + " --set prune.calib_samples=4096 --set prune.calib_seq_len=256 --out " +
                           prune_out);
  REQUIRE(patch::test::wait_for(pid, [&] { return file_has(prune_out + "/run.log", "calibration"); }));
  REQUIRE(::kill(pid, SIGTERM) == 0);
  ::waitpid(pid, &status, 0);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 130);
  CHECK_FALSE(fs::exists(prune_out + "/masks.safetensors"));
  CHECK_FALSE(fs::exists(prune_out + "/prune.json"));
  // Nothing half-written is left: no temporaries, no staging folder.
  for (const auto& e : fs::directory_iterator(prune_out)) {
    const std::string name = e.path().filename().string();
    CHECK((name == "run.log" || name == "config.resolved.yaml" || name == ".patch-run.lock"));
  }
}

TEST_CASE("inputs that make no sense stop before any work, naming the key or file") {
  TempDir dir;
  const std::string out = dir.file("run");
  SECTION("a tile larger than every layer") {
    auto r = run_command(train_cmd(out, 2, "--set mask.tile=[100000,100000]"));
    CHECK(r.exit_code == 2);
    CHECK(contains(r.err, "mask.tile: [100000, 100000] is larger than every masked layer"));
    CHECK(lines(r.err) == 1);
  }
  SECTION("windows longer than the model's context") {
    auto r = run_command(bin() + " eval --model " + model_dir() + " --data " + valid_text() +
                         " --set data.seq_len=2048 --out " + out);
    CHECK(r.exit_code == 2);
    CHECK(contains(r.err, "data.seq_len: 2048 tokens exceed the context of"));
    CHECK(contains(r.err, "512 positions"));
    auto allowed = run_command(bin() + " eval --model " + model_dir() + " --data " + valid_text() +
                               " --set data.seq_len=1024 --set eval.max_windows=1 --set data.beyond_context=true --out " +
                               dir.file("allowed"));
    CHECK(allowed.exit_code == 0);
    CHECK(contains(allowed.err, "data.beyond_context is set"));
    auto prior = run_command(train_cmd(out, 2, "--set prune.calib_seq_len=4096 --overwrite"));
    CHECK(prior.exit_code == 2);
    CHECK(contains(prior.err, "prune.calib_seq_len: 4096 tokens exceed the context"));
  }
  SECTION("an empty training file, a directory as data") {
    patch::core::write_file_atomic(dir.file("empty.txt"), "\n\n");
    auto empty = run_command(bin() + " train --model " + model_dir() + " --data " + dir.file("empty.txt") +
                             " --set train.steps=1 --set mask.prior=magnitude --out " + out);
    CHECK(empty.exit_code == 1);
    CHECK(contains(empty.err, "data.train: '" + dir.file("empty.txt") + "' holds no tokens"));
    auto folder = run_command(bin() + " train --model " + model_dir() + " --data " + dir.path() +
                              " --set train.steps=1 --set mask.prior=magnitude --out " + out + " --overwrite");
    CHECK(folder.exit_code == 2);
    CHECK(contains(folder.err, "data.train: '" + dir.path() + "' is a folder; expected a file"));
    auto eval_folder = run_command(bin() + " eval --model " + model_dir() + " --data " + dir.path() + " --out " +
                                   dir.file("e"));
    CHECK(eval_folder.exit_code == 2);
    CHECK(contains(eval_folder.err, "eval.data: '" + dir.path() + "' is a folder; expected a file"));
  }
  SECTION("a JSONL file whose lines are not JSON") {
    patch::core::write_file_atomic(dir.file("broken.jsonl"), "{\"text\": \"Once upon a time.\"}\nnot json\n");
    auto r = run_command(bin() + " eval --model " + model_dir() + " --data " + dir.file("broken.jsonl") + " --out " +
                         out);
    CHECK(r.exit_code == 1);
    CHECK(contains(r.err, dir.file("broken.jsonl") + ":2: invalid JSON"));
    CHECK(lines(r.err) == 1);
  }
  SECTION("a mask prior from another model names the file and the stray layer") {
    // stories260K's layers are 64 wide: its masks do not fit TinyStories-656K.
    const std::string other = dir.file("other");
    auto p = run_command(bin() + " prune --model " + patch::test::data_path("models/stories260K/stories260K.gguf") +
                         " --method magnitude --pattern 2:4 --out " + other);
    REQUIRE(p.exit_code == 0);
    const std::string before = fs::exists(out) ? snapshot(out) : "";
    auto r = run_command(train_cmd(out, 2, "--set mask.prior=file --set mask.prior_file=" + other +
                                               "/masks.safetensors --overwrite"));
    // Found before the run folder is touched (--overwrite would have cleared it).
    CHECK((fs::exists(out) ? snapshot(out) : "") == before);
    INFO(r.err);
    CHECK(r.exit_code == 1);
    CHECK(contains(r.err, other + "/masks.safetensors: "));
    CHECK(contains(r.err, "model.layers."));
    CHECK(lines(r.err) == 1);
  }
}
