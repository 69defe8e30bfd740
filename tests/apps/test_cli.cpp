// The command line as a user meets it: exit codes, messages, precedence and
// the run folder, by running the patch-train binary.
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "catch.h"
#include "core/atomic_file.h"
#include "core/paths.h"
#include "test_util.h"

namespace fs = std::filesystem;
using patch::test::run_command;
using patch::test::TempDir;

namespace {

std::string bin() { return patch::test::train_bin(); }
std::string model_dir() { return patch::test::data_path("models/tinystories-656k"); }
std::string valid_text() { return patch::test::data_path("text/tinystories/tinystories_validation_head.txt"); }
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
int lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

TEST_CASE("help - version and usage errors") {
  auto help = run_command(bin() + " --help");
  REQUIRE(help.exit_code == 0);
  CHECK(contains(help.out, "eval"));
  CHECK(contains(help.out, "inspect"));
  auto sub_help = run_command(bin() + " eval --help");
  REQUIRE(sub_help.exit_code == 0);
  CHECK(contains(sub_help.out, "--dump-config"));
  CHECK(contains(sub_help.out, "--set"));
  auto version = run_command(bin() + " --version");
  REQUIRE(version.exit_code == 0);
  CHECK(contains(version.out, "patch-train "));
  CHECK(run_command(bin()).exit_code == 2);                       // no subcommand
  CHECK(run_command(bin() + " eval --no-such-flag").exit_code == 2);
  CHECK(run_command(bin() + " frobnicate").exit_code == 2);
}

TEST_CASE("dump-config resolves defaults < file < command line and reloads identically") {
  TempDir dir;
  patch::core::write_file_atomic(dir.file("run.yaml"),
                                 "train:\n  lr: 0.01\n  steps: 7\nmask:\n  target_sparsity: 0.25\n");
  auto r = run_command(bin() + " eval --config " + dir.file("run.yaml") +
                       " --set train.lr=5e-4 --model /m --dump-config");
  REQUIRE(r.exit_code == 0);
  CHECK(contains(r.out, "lr: 0.0005"));                 // --set beats the file
  CHECK(contains(r.out, "steps: 7"));                   // the file beats the default
  CHECK(contains(r.out, "target_sparsity: 0.25"));
  CHECK(contains(r.out, "path: /m"));                   // shortcut
  CHECK(contains(r.out, "tile: [128, 128]"));           // default
  patch::core::write_file_atomic(dir.file("dump.yaml"), r.out);
  auto again = run_command(bin() + " eval --config " + dir.file("dump.yaml") + " --dump-config");
  REQUIRE(again.exit_code == 0);
  CHECK(again.out == r.out);
  // JSON configs work the same way.
  patch::core::write_file_atomic(dir.file("run.json"), R"({"train": {"lr": 0.01, "steps": 7}})");
  auto j = run_command(bin() + " eval --config " + dir.file("run.json") + " --model /m --dump-config");
  REQUIRE(j.exit_code == 0);
  CHECK(contains(j.out, "steps: 7"));
}

TEST_CASE("bad configurations exit 2 with one line naming file and key - and write nothing") {
  TempDir dir;
  const std::string out = dir.file("run");
  patch::core::write_file_atomic(dir.file("bad.yaml"), "mask:\n  target_sparsty: 0.3\n");
  auto r = run_command(bin() + " eval --config " + dir.file("bad.yaml") + " --model " + model_dir() +
                       " --out " + out);
  CHECK(r.exit_code == 2);
  CHECK(contains(r.err, "bad.yaml"));
  CHECK(contains(r.err, "mask.target_sparsity"));  // the suggestion
  CHECK(lines(r.err) == 1);
  CHECK_FALSE(fs::exists(out));

  auto range = run_command(bin() + " eval --model " + model_dir() + " --set mask.target_sparsity=0.7 --out " + out);
  CHECK(range.exit_code == 2);
  CHECK(contains(range.err, "--set"));
  CHECK(contains(range.err, "[0, 0.5]"));
  CHECK_FALSE(fs::exists(out));

  auto tile = run_command(bin() + " eval --model " + model_dir() + " --set mask.tile=[64,30] --out " + out);
  CHECK(tile.exit_code == 2);
  CHECK(contains(tile.err, "mask.tile"));

  auto missing = run_command(bin() + " eval --data x.txt --out " + out);
  CHECK(missing.exit_code == 2);
  CHECK(contains(missing.err, "model.path"));
  CHECK_FALSE(fs::exists(out));

  auto no_file = run_command(bin() + " eval --config " + dir.file("nope.yaml"));
  CHECK(no_file.exit_code == 2);
  CHECK(contains(no_file.err, "nope.yaml"));
}

TEST_CASE("bench-deploy --layers takes only the names of a block's seven linears") {
  auto bad = run_command(bin() + " bench-deploy --layers gate_proj,gate");
  CHECK(bad.exit_code == 2);
  CHECK(contains(bad.err, "deploy.layers[1]"));
  CHECK(contains(bad.err, "down_proj"));  // the names it takes
  CHECK(lines(bad.err) == 1);
  auto dump = run_command(bin() + " bench-deploy --layers gate_proj,down_proj --dump-config");
  REQUIRE(dump.exit_code == 0);
  CHECK(contains(dump.out, "layers: [gate_proj, down_proj]"));
}

TEST_CASE("bench-deploy --shapes takes model shapes or OUTxIN") {
  for (const std::string shape : {"11008x", "0x4096", "llama-2-70b"}) {
    auto bad =
        run_command(bin() + " bench-deploy --set model.device=cpu --shapes llama-2-7b," + shape);
    INFO(bad.err);
    CHECK(bad.exit_code == 2);
    CHECK(contains(bad.err, "deploy.shapes"));
    CHECK(contains(bad.err, "'" + shape + "'"));
    CHECK(lines(bad.err) == 1);
  }
}

TEST_CASE("a non-empty output directory needs --overwrite or --resume") {
  TempDir dir;
  const std::string out = dir.file("run");
  fs::create_directories(out);
  std::ofstream(out + "/keep.txt") << "x";
  auto r = run_command(bin() + " eval --model " + model_dir() + " --data " + valid_text() +
                       " --set eval.max_windows=1 --out " + out);
  CHECK(r.exit_code == 2);
  CHECK(contains(r.err, "--overwrite"));
  CHECK_FALSE(fs::exists(out + "/config.resolved.yaml"));
}

TEST_CASE("a corrupt checkpoint is a one-line error with exit status 1") {
  TempDir dir;
  fs::create_directories(dir.file("model"));
  fs::copy_file(model_dir() + "/config.json", dir.file("model/config.json"));
  fs::copy_file(model_dir() + "/tokenizer.json", dir.file("model/tokenizer.json"));
  {
    auto bytes = patch::core::read_file(model_dir() + "/model.safetensors");
    patch::core::write_file_atomic(dir.file("model/model.safetensors"), bytes.substr(0, bytes.size() / 2));
  }
  auto r = run_command(bin() + " eval --model " + dir.file("model") + " --data " + valid_text() +
                       " --out " + dir.file("run"));
  CHECK(r.exit_code == 1);
  CHECK(contains(r.err, "model.safetensors"));
  CHECK(lines(r.err) == 1);
}

TEST_CASE("eval of TinyStories-656K matches transformers' perplexity within 0.5%") {
  TempDir dir;
  const std::string out = dir.file("run");
  auto r = run_command(bin() + " eval --model " + model_dir() + " --data " + valid_text() +
                       " --set data.seq_len=256 --set eval.max_windows=64 --out " + out);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto got = nlohmann::json::parse(r.out);
  auto ref = nlohmann::json::parse(patch::core::read_file(patch::test::fixtures_dir() + "/apps/hf_ppl.json"));
  double ppl = got["perplexity"].get<double>();
  double ref_ppl = ref["perplexity"].get<double>();
  INFO("patch " << ppl << " transformers " << ref_ppl);
  CHECK(got["windows"].get<int64_t>() == 64);
  CHECK(got["tokens_scored"].get<int64_t>() == ref["predictions"].get<int64_t>());
  CHECK(got["seq_len"].get<int64_t>() == 256);
  CHECK(std::abs(ppl / ref_ppl - 1.0) < 0.005);
  // The run folder holds the resolved configuration, the log and the result.
  CHECK(fs::exists(out + "/config.resolved.yaml"));
  CHECK(fs::exists(out + "/run.log"));
  CHECK(nlohmann::json::parse(patch::core::read_file(out + "/eval.json"))["perplexity"].get<double>() == ppl);
}

TEST_CASE("inspect lists every linear layer with the checkpoint's shapes") {
  auto r = run_command(bin() + " inspect --model " + model_dir());
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  // TinyStories-656K (PROVENANCE.md): 2 layers of q/k/v/o and gate/up/down.
  CHECK(contains(r.out, "model.layers.1.mlp.down_proj"));
  CHECK(contains(r.out, "[128, 384]"));
  CHECK(contains(r.out, "[64, 128]"));
  CHECK(contains(r.out, "14 linear layers, " + std::to_string(2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 384 * 128)) +
                            " parameters"));
  CHECK_FALSE(contains(r.out, "lm_head"));
}

TEST_CASE("prune sparsegpt 2:4 writes masks and a pruned checkpoint that transformers scores the same") {
  TempDir dir;
  const std::string out = dir.file("run");
  const std::string train_text = patch::test::data_path("text/tinystories/tinystories_train_first2MiB.txt");
  auto r = run_command(bin() + " prune --model " + model_dir() + " --data " + train_text +
                       " --method sparsegpt --pattern 2:4 --set prune.update_weights=true --set model.device=cpu" +
                       " --set prune.calib_samples=16 --set prune.calib_seq_len=256 --set mask.tile=[32,32]" +
                       " --set eval.data=[" + valid_text() + "] --set data.seq_len=256 --set eval.max_windows=16" +
                       " --set data.document_separator='<|endoftext|>' --out " + out);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto rep = nlohmann::json::parse(patch::core::read_file(out + "/prune.json"));
  CHECK(rep["method"] == "sparsegpt");
  CHECK(rep["sparsity"].get<double>() == 0.5);
  CHECK(rep["calibration_sequences"].get<int64_t>() == 16);
  CHECK(fs::exists(out + "/masks.safetensors"));
  CHECK(fs::exists(out + "/model/masks.safetensors"));
  CHECK(fs::exists(out + "/model/tokenizer.json"));
  CHECK_FALSE(fs::exists(out + "/model.partial"));
  CHECK(contains(patch::core::read_file(out + "/model/config.json"), "\"patch_masks\": \"masks.safetensors\""));

  // transformers loads the pruned directory as it is; its perplexity equals ours.
  auto hf = run_command(patch::test::env_or("PATCH_PYTHON", "python3") + " " + patch::test::source_dir() +
                        "/scripts/hf_perplexity.py --model " + out + "/model --data " + valid_text() +
                        " --seq-len 256 --max-windows 16 --out " + dir.file("hf.json"));
  INFO(hf.err);
  REQUIRE(hf.exit_code == 0);
  const double ref = nlohmann::json::parse(patch::core::read_file(dir.file("hf.json")))["perplexity"].get<double>();
  const double ours = rep["perplexity"].get<double>();
  INFO("patch " << ours << " transformers " << ref);
  CHECK(std::abs(ours / ref - 1.0) < 1e-3);
  // Our eval of the exported checkpoint agrees as well.
  auto ev = run_command(bin() + " eval --model " + out + "/model --data " + valid_text() +
                        " --set model.device=cpu --set data.seq_len=256 --set eval.max_windows=16 --out " +
                        dir.file("ev"));
  REQUIRE(ev.exit_code == 0);
  CHECK(std::abs(nlohmann::json::parse(ev.out)["perplexity"].get<double>() / ours - 1.0) < 1e-4);

  // Bad choices are one-line configuration errors.
  auto bad = run_command(bin() + " prune --model " + model_dir() + " --method obs --out " + dir.file("bad"));
  CHECK(bad.exit_code == 2);
  CHECK(contains(bad.err, "prune.method"));
  auto no_data = run_command(bin() + " prune --model " + model_dir() + " --method wanda --out " + dir.file("nd"));
  CHECK(no_data.exit_code == 2);
  CHECK(contains(no_data.err, "data.train"));
}

// The end-to-end fine-tune of the kept weights under given masks: it lowers
// the perplexity of the masks alone, its zeros are exactly the mask's
// (verify --pruned), and transformers scores the written model as we do.
TEST_CASE("prune --masks --set prune.finetune_steps: the kept weights trained end to end, loaded by transformers") {
  TempDir dir;
  const std::string train_text = patch::test::data_path("text/tinystories/tinystories_train_first2MiB.txt");
  const std::string common = " --model " + model_dir() + " --data " + train_text +
                             " --set model.device=cpu --set prune.calib_samples=16 --set prune.calib_seq_len=256"
                             " --set mask.tile=[32,32] --set data.document_separator='<|endoftext|>'";
  const std::string eval = " --set eval.data=[" + valid_text() + "] --set data.seq_len=256 --set eval.max_windows=16";
  auto hyb = run_command(bin() + " prune" + common + " --method wanda --pattern hybrid --target 0.35" + eval +
                         " --out " + dir.file("hyb"));
  INFO(hyb.err);
  REQUIRE(hyb.exit_code == 0);
  auto ft = run_command(bin() + " prune" + common + " --masks " + dir.file("hyb/masks.safetensors") +
                        " --set prune.finetune_steps=40 --set prune.finetune_lr=1e-3" + eval + " --out " +
                        dir.file("ft"));
  INFO(ft.err);
  REQUIRE(ft.exit_code == 0);
  const auto mask_only = nlohmann::json::parse(hyb.out)["perplexity"].get<double>();
  const auto rep = nlohmann::json::parse(ft.out);
  const double tuned = rep["perplexity"].get<double>();
  INFO("mask only " << mask_only << ", fine-tuned " << tuned);
  CHECK(tuned < mask_only);
  CHECK(rep["finetune_steps"] == 40);
  CHECK(rep["finetune_loss_last"].get<double>() < rep["finetune_loss_first"].get<double>());
  auto ver = run_command(bin() + " verify --masks " + dir.file("ft/masks.safetensors") + " --model " + model_dir() +
                         " --pruned " + dir.file("ft/model"));
  INFO(ver.out);
  CHECK(ver.exit_code == 0);
  auto hf = run_command(patch::test::env_or("PATCH_PYTHON", "python3") + " " + patch::test::source_dir() +
                        "/scripts/hf_perplexity.py --model " + dir.file("ft/model") + " --data " + valid_text() +
                        " --seq-len 256 --max-windows 16 --out " + dir.file("hf.json"));
  INFO(hf.err);
  REQUIRE(hf.exit_code == 0);
  const double ref = nlohmann::json::parse(patch::core::read_file(dir.file("hf.json")))["perplexity"].get<double>();
  CHECK(std::abs(tuned / ref - 1.0) < 1e-3);
}

// A GGUF model as people have it: the fine-tune's model/ is one
// model.safetensors with a generated config.json, which transformers loads and
// scores (with the GGUF's own tokenizer) as prune did.
TEST_CASE("prune --masks on a GGUF model: the fine-tuned checkpoint is scored by transformers as by prune") {
  if (patch::test::skip_without_smollm2()) return;
  TempDir dir;
  const std::string gguf = patch::test::smollm2_gguf();
  const std::string common = " --model " + gguf + " --data " +
                             patch::test::data_path("text/tinystories/tinystories_train_first2MiB.txt") +
                             " --set model.device=cpu --set prune.calib_samples=4 --set prune.calib_seq_len=64"
                             " --set prune.micro_batch=2 --set eval.data=[" + valid_text() +
                             "] --set data.seq_len=64 --set eval.max_windows=4";
  auto m = run_command(bin() + " prune" + common + " --method magnitude --pattern hybrid --target 0.35 --out " +
                       dir.file("m"));
  REQUIRE(m.exit_code == 0);
  auto ft = run_command(bin() + " prune" + common + " --masks " + dir.file("m/masks.safetensors") +
                        " --set prune.finetune_steps=2 --set prune.finetune_lr=1e-4 --out " + dir.file("ft"));
  INFO(ft.err);
  REQUIRE(ft.exit_code == 0);
  CHECK(contains(ft.err, "the tokenizer stays in"));
  CHECK(fs::exists(dir.file("ft/model/model.safetensors")));
  CHECK(fs::exists(dir.file("ft/model/config.json")));
  auto ver = run_command(bin() + " verify --masks " + dir.file("ft/masks.safetensors") + " --model " + gguf +
                         " --pruned " + dir.file("ft/model"));
  INFO(ver.out);
  CHECK(ver.exit_code == 0);
  auto hf = run_command(patch::test::env_or("PATCH_PYTHON", "python3") + " " + patch::test::source_dir() +
                        "/scripts/hf_perplexity.py --model " + dir.file("ft/model") + " --tokenizer-gguf " + gguf +
                        " --data " + valid_text() + " --seq-len 64 --max-windows 4 --out " + dir.file("hf.json"));
  INFO(hf.err);
  REQUIRE(hf.exit_code == 0);
  const double ours = nlohmann::json::parse(ft.out)["perplexity"].get<double>();
  const double ref = nlohmann::json::parse(patch::core::read_file(dir.file("hf.json")))["perplexity"].get<double>();
  INFO("patch " << ours << " transformers " << ref);
  CHECK(std::abs(ours / ref - 1.0) < 1e-4);
  CHECK(ours != nlohmann::json::parse(m.out)["perplexity"].get<double>());  // the weights moved
}

// A long fine-tune stopped by a signal keeps its state in the run folder, and
// --resume ends it exactly where an unstopped run of the same settings ends;
// a resume with another learning rate is refused.
TEST_CASE("prune's fine-tune stopped by SIGTERM resumes from its state and ends as an unstopped one") {
  TempDir dir;
  const std::string train_text = patch::test::data_path("text/tinystories/tinystories_train_first2MiB.txt");
  const std::string common = " --model " + model_dir() + " --data " + train_text +
                             " --set model.device=cpu --set prune.calib_samples=16 --set prune.calib_seq_len=64"
                             " --set prune.micro_batch=2 --set mask.tile=[32,32]";
  auto masks = run_command(bin() + " prune" + common + " --method magnitude --pattern hybrid --target 0.35 --out " +
                           dir.file("m"));
  REQUIRE(masks.exit_code == 0);
  const std::string ft = bin() + " prune" + common + " --masks " + dir.file("m/masks.safetensors") +
                         " --set prune.finetune_steps=300 --set prune.finetune_checkpoint_every=25";
  auto whole = run_command(ft + " --set prune.finetune_lr=1e-3 --out " + dir.file("whole"));
  INFO(whole.err);
  REQUIRE(whole.exit_code == 0);
  CHECK_FALSE(fs::exists(dir.file("whole/finetune_state.safetensors")));  // removed once the outputs are out

  const std::string state = dir.file("stopped/finetune_state.safetensors");
  const int pid = patch::test::spawn(ft + " --set prune.finetune_lr=1e-3 -q --out " + dir.file("stopped"));
  REQUIRE(patch::test::wait_for(pid, [&] { return fs::exists(state); }));
  REQUIRE(::kill(pid, SIGTERM) == 0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  CHECK(WEXITSTATUS(status) == 130);
  REQUIRE(fs::exists(state));
  CHECK_FALSE(fs::exists(dir.file("stopped/prune.json")));

  auto changed = run_command(ft + " --set prune.finetune_lr=2e-3 --resume --out " + dir.file("stopped"));
  CHECK(changed.exit_code == 2);
  CHECK(contains(changed.err, "prune.finetune_lr"));
  auto resumed = run_command(ft + " --set prune.finetune_lr=1e-3 --resume --out " + dir.file("stopped"));
  INFO(resumed.err);
  REQUIRE(resumed.exit_code == 0);
  CHECK(contains(resumed.err, "resumed at step"));
  const auto a = nlohmann::json::parse(whole.out), b = nlohmann::json::parse(resumed.out);
  CHECK(b["finetune_loss_first"] == a["finetune_loss_first"]);
  CHECK(b["finetune_loss_last"] == a["finetune_loss_last"]);
  CHECK(patch::core::read_file(dir.file("stopped/model/model.safetensors")) ==
        patch::core::read_file(dir.file("whole/model/model.safetensors")));
  CHECK_FALSE(fs::exists(state));
}

TEST_CASE("prune --masks: SparseGPT's weight update under given masks, loaded by transformers") {
  TempDir dir;
  const std::string train_text = patch::test::data_path("text/tinystories/tinystories_train_first2MiB.txt");
  const std::string common = " --model " + model_dir() + " --data " + train_text +
                             " --method sparsegpt --set model.device=cpu --set prune.calib_samples=16"
                             " --set prune.calib_seq_len=256 --set mask.tile=[32,32]"
                             " --set data.document_separator='<|endoftext|>'";
  const std::string eval = " --set eval.data=[" + valid_text() + "] --set data.seq_len=256 --set eval.max_windows=16";
  // SparseGPT 2:4 with its own selection, then the update under that same mask: the same weights.
  auto own = run_command(bin() + " prune" + common + " --pattern 2:4 --set prune.update_weights=true --out " +
                         dir.file("own"));
  INFO(own.err);
  REQUIRE(own.exit_code == 0);
  auto fixed = run_command(bin() + " prune" + common + " --masks " + dir.file("own/masks.safetensors") +
                           " --set prune.update_weights=true" + eval + " --out " + dir.file("fixed"));
  INFO(fixed.err);
  REQUIRE(fixed.exit_code == 0);
  auto diff = run_command(patch::test::env_or("PATCH_PYTHON", "python3") + " -c \"import sys; "
                          "from safetensors.numpy import load_file as l; import numpy as np; "
                          "a = l(sys.argv[1]); b = l(sys.argv[2]); "
                          "print(max(float(np.abs(a[k] - b[k]).max()) for k in a if k.endswith('_proj.weight')))\" " +
                          dir.file("own/model/model.safetensors") + " " + dir.file("fixed/model/model.safetensors"));
  INFO(diff.err);
  REQUIRE(diff.exit_code == 0);
  CHECK(std::stod(diff.out) < 1e-5);
  // A hybrid mask (here a one-shot one, mask only): reconstruction beats the mask alone,
  // its zeros are exactly the mask's, and transformers scores it as we do.
  auto hyb = run_command(bin() + " prune" + common + " --pattern hybrid --target 0.35" + eval + " --out " +
                         dir.file("hyb"));
  REQUIRE(hyb.exit_code == 0);
  auto rec = run_command(bin() + " prune" + common + " --masks " + dir.file("hyb/masks.safetensors") +
                         " --set prune.update_weights=true --set prune.refine_iters=200" + eval + " --out " +
                         dir.file("rec"));
  INFO(rec.err);
  REQUIRE(rec.exit_code == 0);
  const auto mask_only = nlohmann::json::parse(hyb.out)["perplexity"].get<double>();
  const auto rep = nlohmann::json::parse(rec.out);
  const double recon = rep["perplexity"].get<double>();
  INFO("mask only " << mask_only << ", reconstructed " << recon);
  CHECK(recon < mask_only);
  CHECK(rep["refine_iters"] == 200);
  CHECK(contains(rep["pattern"].get<std::string>(), "given masks"));
  auto ver = run_command(bin() + " verify --masks " + dir.file("rec/masks.safetensors") + " --model " + model_dir() +
                         " --pruned " + dir.file("rec/model"));
  INFO(ver.out);
  CHECK(ver.exit_code == 0);
  auto hf = run_command(patch::test::env_or("PATCH_PYTHON", "python3") + " " + patch::test::source_dir() +
                        "/scripts/hf_perplexity.py --model " + dir.file("rec/model") + " --data " + valid_text() +
                        " --seq-len 256 --max-windows 16 --out " + dir.file("hf.json"));
  INFO(hf.err);
  REQUIRE(hf.exit_code == 0);
  const double ref = nlohmann::json::parse(patch::core::read_file(dir.file("hf.json")))["perplexity"].get<double>();
  CHECK(std::abs(recon / ref - 1.0) < 1e-3);
  // Reconstruction is SparseGPT's update: other methods, or masks only, are refused in one line.
  auto bad = run_command(bin() + " prune" + common + " --masks " + dir.file("hyb/masks.safetensors") + " --out " +
                         dir.file("bad"));
  CHECK(bad.exit_code == 2);
  CHECK(contains(bad.err, "prune.update_weights=true"));
  CHECK(contains(bad.err, "prune.finetune_steps"));
  CHECK_FALSE(fs::exists(dir.file("bad")));
}

namespace {

bool has_matplotlib() {
  return run_command(patch::test::env_or("PATCH_PYTHON", "python3") + " -c 'import matplotlib'").exit_code == 0;
}

// A PNG: the 8-byte signature, then an IHDR chunk with a non-zero width and height.
bool is_png(const std::string& path) {
  const std::string b = fs::exists(path) ? patch::core::read_file(path) : "";
  if (b.size() < 33 || b.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0 || b.compare(12, 4, "IHDR") != 0) return false;
  auto be32 = [&](size_t at) {
    return (uint32_t(uint8_t(b[at])) << 24) | (uint32_t(uint8_t(b[at + 1])) << 16) |
           (uint32_t(uint8_t(b[at + 2])) << 8) | uint32_t(uint8_t(b[at + 3]));
  };
  return be32(16) > 0 && be32(20) > 0;
}

}  // namespace

TEST_CASE("export - verify - inspect: transformers scores the export like eval --masks and verify catches corruption") {
  TempDir dir;
  const std::string train_text = patch::test::data_path("text/tinystories/tinystories_train_first2MiB.txt");
  const std::string common = " --set model.device=cpu --set mask.tile=[32,32] --set data.seq_len=256"
                             " --set eval.max_windows=16 --set data.document_separator='<|endoftext|>'";
  auto pr = run_command(bin() + " prune --model " + model_dir() + " --data " + train_text +
                        " --method wanda --pattern hybrid --target 0.35 --set prune.calib_samples=16" +
                        " --set prune.calib_seq_len=256" + common + " --out " + dir.file("p"));
  INFO(pr.err);
  REQUIRE(pr.exit_code == 0);
  const std::string masks = dir.file("p/masks.safetensors");
  auto ev = run_command(bin() + " eval --model " + model_dir() + " --masks " + masks + " --data " + valid_text() +
                        common + " --out " + dir.file("ev"));
  REQUIRE(ev.exit_code == 0);
  const double ours = nlohmann::json::parse(ev.out)["perplexity"].get<double>();

  auto ex = run_command(bin() + " export --model " + model_dir() + " --masks " + masks + " --out " + dir.file("x"));
  INFO(ex.err);
  REQUIRE(ex.exit_code == 0);
  auto hf = run_command(patch::test::env_or("PATCH_PYTHON", "python3") + " " + patch::test::source_dir() +
                        "/scripts/hf_perplexity.py --model " + dir.file("x") + " --data " + valid_text() +
                        " --seq-len 256 --max-windows 16 --out " + dir.file("hf.json"));
  INFO(hf.err);
  REQUIRE(hf.exit_code == 0);
  const double ref = nlohmann::json::parse(patch::core::read_file(dir.file("hf.json")))["perplexity"].get<double>();
  INFO("eval --masks " << ours << ", transformers on the export " << ref);
  CHECK(std::abs(ours / ref - 1.0) < 1e-3);

  // verify: the good pair passes.
  auto ok = run_command(bin() + " verify --masks " + masks + " --model " + model_dir() + " --pruned " + dir.file("x"));
  INFO(ok.out);
  CHECK(ok.exit_code == 0);
  CHECK(contains(ok.out, "verify: OK"));

  // A pattern index out of range, a tile map of the wrong shape, a declared
  // sparsity that lies: each fails with its reason.
  const std::string py = patch::test::env_or("PATCH_PYTHON", "python3");
  auto corrupt = [&](const std::string& name, const std::string& edit) {
    const std::string out = dir.file(name + ".safetensors");
    auto r = run_command(py + " -c \"from safetensors.numpy import load_file, save_file; "
                              "from safetensors import safe_open; import numpy as np; "
                              "m = safe_open('" + masks + "', 'np').metadata(); t = load_file('" + masks + "'); " +
                         edit + "; save_file(t, '" + out + "', metadata=m)\"");
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    return run_command(bin() + " verify --masks " + out);
  };
  auto pat = corrupt("pattern", "t['model.layers.0.mlp.up_proj.pattern_2_4'][3, 2] = 6");
  CHECK(pat.exit_code == 1);
  CHECK(contains(pat.out, "FAIL  mask file is valid"));
  CHECK(contains(pat.out, "pattern_2_4 holds index 6"));
  auto tiles = corrupt("tiles", "k = 'model.layers.1.self_attn.q_proj.tile_dense'; t[k] = t[k][:, :-1].copy()");
  CHECK(tiles.exit_code == 1);
  CHECK(contains(tiles.out, "tile_dense has shape"));
  auto lie = corrupt("lie", "m['achieved_sparsity'] = '0.45'");
  CHECK(lie.exit_code == 1);
  CHECK(contains(lie.out, "FAIL  declared sparsity"));

  // A pruned checkpoint where a 2:4 group keeps three weights.
  auto three = run_command(py + " -c \"from safetensors.numpy import load_file, save_file; import numpy as np; "
                                "from safetensors import safe_open; p = '" + dir.file("x/model.safetensors") +
                           "'; m = safe_open(p, 'np').metadata(); t = load_file(p); "
                           "w = t['model.layers.0.mlp.up_proj.weight']; "
                           "r, c = [int(v) for v in np.argwhere(w == 0)[0]]; w[r, c] = 0.5; "
                           "save_file(t, p, metadata=m)\"");
  REQUIRE(three.exit_code == 0);
  auto bad = run_command(bin() + " verify --masks " + masks + " --pruned " + dir.file("x"));
  CHECK(bad.exit_code == 1);
  CHECK(contains(bad.out, "FAIL  pruned weights are zero where masked"));
  CHECK(contains(bad.out, "model.layers.0.mlp.up_proj: 1 nonzero"));

  // inspect --masks: the density table; --plot: a PNG.
  auto in = run_command(bin() + " inspect --masks " + masks);
  REQUIRE(in.exit_code == 0);
  CHECK(contains(in.out, "block 1"));
  CHECK(contains(in.out, "model.layers.1.mlp.down_proj"));
  CHECK(contains(in.out, "total"));
  if (!has_matplotlib()) {
    WARN("matplotlib missing: --plot not tested");
    return;
  }
  auto pl = run_command(bin() + " inspect --masks " + masks + " --plot " + dir.file("m.png"));
  INFO(pl.err);
  CHECK(pl.exit_code == 0);
  CHECK(is_png(dir.file("m.png")));
}

TEST_CASE("every bundled configuration validates, and @assets/ names the fetched SmolLM2 GGUF") {
  const std::string dir = patch::test::source_dir() + "/configs";
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".yaml") continue;
    ++n;
    const auto r = run_command(bin() + " train --config " + e.path().string() + " --dump-config");
    INFO(e.path() << ": " << r.err);
    CHECK(r.exit_code == 0);
    CHECK(contains(r.out, "target_sparsity"));
  }
  CHECK(n >= 2);
  const auto r = run_command(bin() + " train --config " + dir + "/smollm2-135m.yaml --dump-config");
  CHECK(contains(r.out, "@assets/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"));
  CHECK(patch::core::resolve_path("@assets/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf") ==
        patch::test::smollm2_gguf());
}

TEST_CASE("a new user's command line: unknown commands named, each command's own options, defaults browsable") {
  auto unknown = run_command(bin() + " frobnicate");
  CHECK(unknown.exit_code == 2);
  CHECK(contains(unknown.err, "unknown command 'frobnicate'"));
  CHECK(contains(unknown.err, "train, prune"));
  CHECK(lines(unknown.err) == 1);
  // Options a command does not use are not offered to it.
  const auto help_of = [](const std::string& cmd) { return run_command(bin() + " " + cmd + " --help").out; };
  CHECK(contains(help_of("train"), "--resume"));
  CHECK(contains(help_of("sweep"), "--resume"));
  CHECK(contains(help_of("prune"), "--resume"));  // a stopped fine-tune
  for (const char* cmd : {"eval", "export", "pack", "verify", "inspect", "bench", "bench-deploy"})
    CHECK_FALSE(contains(help_of(cmd), "--resume"));
  for (const char* cmd : {"verify", "inspect", "bench", "bench-deploy"}) CHECK_FALSE(contains(help_of(cmd), "--overwrite"));
  for (const char* cmd : {"bench", "bench-deploy"}) {
    CHECK_FALSE(contains(help_of(cmd), "--model"));
    CHECK_FALSE(contains(help_of(cmd), "--masks"));
  }
  CHECK_FALSE(contains(help_of("train"), "--masks"));
  CHECK(contains(help_of("eval"), "--masks"));
  // The defaults can be browsed without a model.
  auto dump = run_command(bin() + " train --dump-config");
  CHECK(dump.exit_code == 0);
  CHECK(contains(dump.out, "target_sparsity:"));
}

TEST_CASE("a model by hub name comes from the local Hugging Face cache and a missing one names the download command") {
  TempDir dir;
  const std::string hub = dir.file("hub");
  const std::string snap = hub + "/models--patch-test--tiny/snapshots/0123abcd";
  fs::create_directories(snap);
  for (const auto& e : fs::directory_iterator(model_dir())) fs::create_symlink(e.path(), snap + "/" + e.path().filename().string());
  fs::create_directories(hub + "/models--patch-test--tiny/refs");
  std::ofstream(hub + "/models--patch-test--tiny/refs/main") << "0123abcd";
  const std::string env = "HF_HUB_CACHE=" + hub + " ";
  auto r = run_command(env + bin() + " inspect --model patch-test/tiny");
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(contains(r.out, snap));
  CHECK(contains(r.out, "linear layers"));
  // The resolved snapshot is what a run records.
  auto ev = run_command("cd " + dir.path() + " && " + env + bin() + " eval --model patch-test/tiny@0123abcd --data " +
                        valid_text() + " --set data.seq_len=64 --set eval.max_windows=2 --out " + dir.file("ev"));
  INFO(ev.err);
  REQUIRE(ev.exit_code == 0);
  CHECK(contains(patch::core::read_file(dir.file("ev/config.resolved.yaml")), snap));

  auto missing = run_command(env + bin() + " inspect --model patch-test/absent");
  CHECK(missing.exit_code == 2);
  CHECK(contains(missing.err, "huggingface-cli download patch-test/absent"));
  CHECK(lines(missing.err) == 1);
}

TEST_CASE("commands that read write nothing unless --out asks, and a run that fails its checks writes nothing") {
  TempDir dir;
  const std::string cd = "cd " + dir.path() + " && ";
  auto ev = run_command(cd + bin() + " eval --model " + model_dir() + " --data " + valid_text() +
                        " --set data.seq_len=64 --set eval.max_windows=2");
  INFO(ev.err);
  REQUIRE(ev.exit_code == 0);
  CHECK(contains(ev.out, "\"tokens_scored\""));
  REQUIRE(run_command(cd + bin() + " inspect --model " + model_dir()).exit_code == 0);
  run_command(cd + bin() + " verify --masks /no/such.safetensors");
  CHECK(fs::is_empty(dir.path()));  // no runs/latest, no cache beside it

  // Bad inputs and limits found before anything is created.
  const std::string out = dir.file("never");
  const std::string train = cd + bin() + " train --model " + model_dir() + " --out " + out + " --set train.steps=1 ";
  auto no_data = run_command(train + "--data " + dir.file("absent.txt"));
  CHECK(no_data.exit_code == 2);
  CHECK(contains(no_data.err, "data.train: no such file or folder"));
  auto too_long = run_command(train + "--data " + valid_text() + " --set data.seq_len=100000");
  CHECK(too_long.exit_code == 2);
  CHECK(contains(too_long.err, "data.seq_len"));
  auto big_tile = run_command(train + "--data " + valid_text() +
                              " --set data.seq_len=64 --set prune.calib_seq_len=64 --set mask.tile=[4096,4096]");
  CHECK(big_tile.exit_code == 2);
  CHECK(contains(big_tile.err, "mask.tile"));
  CHECK_FALSE(fs::exists(out));
}

TEST_CASE("inspect --metrics summarizes a run's metrics.jsonl and --plot draws its curves") {
  TempDir dir;
  const std::string m = dir.file("metrics.jsonl");
  patch::core::write_file_atomic(
      m, "{\"step\":0,\"valid_loss\":4.5,\"valid_ppl\":90.0,\"hard_sparsity\":0.35,\"windows\":4}\n"
         "{\"step\":1,\"lr\":0.1,\"loss\":4.6,\"ce\":4.4,\"soft_density\":0.66,\"hard_density\":0.65,\"tokens_per_s\":1000}\n"
         "{\"step\":2,\"lr\":0.1,\"loss\":4.2,\"ce\":4.1,\"soft_density\":0.65,\"hard_density\":0.65,\"tokens_per_s\":1200,"
         "\"valid_loss\":4.0,\"valid_ppl\":54.6,\"hard_sparsity\":0.35}\n");
  auto r = run_command(bin() + " inspect --metrics " + m);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(contains(r.out, "54.6"));
  CHECK(contains(r.out, "last training line: step 2, loss 4.1"));
  auto bad = run_command(bin() + " inspect --metrics " + dir.file("absent.jsonl"));
  CHECK(bad.exit_code == 2);
  CHECK(contains(bad.err, "inspect.metrics: no such file"));
  if (!has_matplotlib()) {
    WARN("matplotlib missing: --plot not tested");
    return;
  }
  auto pl = run_command(bin() + " inspect --metrics " + m + " --plot " + dir.file("curves.png"));
  INFO(pl.err);
  CHECK(pl.exit_code == 0);
  CHECK(is_png(dir.file("curves.png")));
}
