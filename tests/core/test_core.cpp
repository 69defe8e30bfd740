#include <ATen/ATen.h>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include <filesystem>
#include <fstream>

#include "catch.h"
#include "core/atomic_file.h"
#include "core/cuda_graph.h"
#include "core/error.h"
#include "core/hf_cache.h"
#include "core/paths.h"
#include "core/progress.h"
#include "core/run_dir.h"
#include "core/sha256.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace patch;

TEST_CASE("atomic file appears only on commit and leaves no temporary") {
  test::TempDir dir;
  const std::string target = dir.file("out.txt");
  {
    core::AtomicFile f(target);
    f.write("hello", 5);
    REQUIRE_FALSE(fs::exists(target));
  }  // destroyed without commit
  REQUIRE_FALSE(fs::exists(target));
  REQUIRE(fs::is_empty(dir.path()));

  core::write_file_atomic(target, "abc");
  REQUIRE(core::read_file(target) == "abc");
  core::write_file_atomic(target, "replaced");
  REQUIRE(core::read_file(target) == "replaced");
  REQUIRE(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()) == 1);
}

TEST_CASE("output directory rules") {
  test::TempDir dir;
  const std::string out = dir.file("run");
  core::prepare_output_dir(out, /*overwrite=*/false, /*resume=*/false);  // created
  REQUIRE(fs::is_directory(out));
  core::prepare_output_dir(out, /*overwrite=*/false, /*resume=*/false);  // empty: fine
  std::ofstream(out + "/x") << "1";
  REQUIRE_THROWS_AS(core::prepare_output_dir(out, false, false), core::ConfigError);
  REQUIRE_NOTHROW(core::prepare_output_dir(out, /*overwrite=*/true, /*resume=*/false));
  REQUIRE_NOTHROW(core::prepare_output_dir(out, /*overwrite=*/false, /*resume=*/true));
  try {
    core::prepare_output_dir(out, false, false);
  } catch (const core::Error& e) {
    REQUIRE(e.exit_code() == core::kExitUsage);
    REQUIRE(std::string(e.what()).find("--overwrite") != std::string::npos);
  }
}

TEST_CASE("a run folder: claimed by one process, temporaries of killed runs removed, overwrite clears") {
  test::TempDir dir;
  const std::string out = dir.file("run");
  core::claim_output_dir(out, false, false);
  REQUIRE(fs::exists(out + "/" + core::kRunLockName));
  // (A second process is refused: test_safety runs two patch-train processes.)
  core::write_file_atomic(out + "/masks.safetensors", "old");
  core::write_file_atomic(out + "/.report.json.tmp.12345", "half");
  fs::create_directories(out + "/.partial-12345/model");
  CHECK(core::remove_stale_temporaries(out) == 2);
  CHECK_FALSE(fs::exists(out + "/.report.json.tmp.12345"));
  CHECK_FALSE(fs::exists(out + "/.partial-12345"));
  CHECK(fs::exists(out + "/masks.safetensors"));
  REQUIRE_THROWS_AS(core::claim_output_dir(out, false, false), core::ConfigError);  // not empty
  core::claim_output_dir(out, /*overwrite=*/false, /*resume=*/true);  // resume keeps outputs
  CHECK(fs::exists(out + "/masks.safetensors"));
  core::claim_output_dir(out, /*overwrite=*/true, /*resume=*/false);  // overwrite clears them
  CHECK_FALSE(fs::exists(out + "/masks.safetensors"));
  CHECK(fs::exists(out + "/" + core::kRunLockName));
}

TEST_CASE("path_within: the folder itself and what lies under it") {
  test::TempDir dir;
  const std::string d = dir.file("a");
  fs::create_directories(d + "/b");
  CHECK(core::path_within(d, d));
  CHECK(core::path_within(d + "/b/c.txt", d));
  CHECK(core::path_within(d + "/b/../b", d + "/"));
  CHECK_FALSE(core::path_within(dir.file("ab"), d));
  CHECK_FALSE(core::path_within(dir.path(), d));
  fs::create_directory_symlink(d + "/b", dir.file("link"));
  CHECK(core::path_within(dir.file("link") + "/x", d));
}

TEST_CASE("an output set appears whole or not at all, its marker last") {
  test::TempDir dir;
  {
    core::OutputSet set(dir.path());
    core::write_file_atomic(set.path("masks.safetensors"), "m");
    fs::create_directories(set.path("model"));
    core::write_file_atomic(set.path("model") + "/w.bin", "w");
    CHECK_FALSE(fs::exists(dir.file("masks.safetensors")));
  }  // abandoned: nothing of it remains
  CHECK(fs::is_empty(dir.path()));
  core::OutputSet set(dir.path());
  core::write_file_atomic(set.path("masks.safetensors"), "m");
  fs::create_directories(set.path("model"));
  core::write_file_atomic(set.path("model") + "/w.bin", "w");
  set.publish("prune.json", "{}");
  CHECK(core::read_file(dir.file("masks.safetensors")) == "m");
  CHECK(core::read_file(dir.file("model/w.bin")) == "w");
  CHECK(core::read_file(dir.file("prune.json")) == "{}");
  CHECK(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()) == 3);
}

TEST_CASE("a failed write names the file and the operating system's reason") {
  test::TempDir dir;
  const std::string path = dir.file("big.bin");
  const pid_t pid = ::fork();
  if (pid == 0) {
    // A file size limit makes the write fail as a full disk would.
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim {4096, 4096};
    ::setrlimit(RLIMIT_FSIZE, &lim);
    try {
      core::write_file_atomic(path, std::string(1 << 20, 'x'));
    } catch (const core::Error& e) {
      const std::string what = e.what();
      ::_exit(what.find(path + ": write failed (File too large)") == 0 ? 0 : 2);
    }
    ::_exit(1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(fs::is_empty(dir.path()));  // no temporary left behind
}

TEST_CASE("duration formatting") {
  REQUIRE(core::format_duration(5) == "5s");
  REQUIRE(core::format_duration(125) == "2m05s");
  REQUIRE(core::format_duration(3720) == "1h02m");
}

TEST_CASE("data directory honours PATCH_DATA_DIR") {
  ::setenv("PATCH_DATA_DIR", "/some/where", 1);
  REQUIRE(core::data_dir() == "/some/where");
  ::unsetenv("PATCH_DATA_DIR");
  REQUIRE_FALSE(core::data_dir().empty());
}

namespace {
// Sets an environment variable for one scope, restoring the old value after.
struct ScopedEnv {
  std::string name, old;
  bool had;
  ScopedEnv(const std::string& n, const std::string& value) : name(n) {
    const char* v = std::getenv(n.c_str());
    had = v != nullptr;
    if (had) old = v;
    ::setenv(n.c_str(), value.c_str(), 1);
  }
  ~ScopedEnv() { had ? (void)::setenv(name.c_str(), old.c_str(), 1) : (void)::unsetenv(name.c_str()); }
};

void touch(const std::string& path, const std::string& text = "{}") {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path) << text;
}
}  // namespace

TEST_CASE("hub names resolve through the local Hugging Face cache, as huggingface_hub lays it out") {
  test::TempDir tmp;
  const std::string hub = tmp.file("hub");
  ScopedEnv cache("HF_HUB_CACHE", hub);
  // The layout of huggingface_hub's cache: refs/<branch> holds the commit of snapshots/<commit>/.
  const std::string repo = hub + "/models--Org--Model-1.5B";
  touch(repo + "/refs/main", "aaaa1111\n");
  touch(repo + "/snapshots/aaaa1111/config.json");
  touch(repo + "/snapshots/bbbb2222/config.json");
  touch(repo + "/refs/v2", "bbbb2222");

  CHECK(core::is_hub_name("Org/Model-1.5B"));
  CHECK(core::is_hub_name("Org/Model-1.5B@refs/pr/1"));
  CHECK_FALSE(core::is_hub_name("model"));
  CHECK_FALSE(core::is_hub_name("./Org/Model"));
  CHECK_FALSE(core::is_hub_name("/abs/path"));
  CHECK_FALSE(core::is_hub_name("a/b/c"));
  CHECK_FALSE(core::is_hub_name("Org/Model@"));

  CHECK(core::resolve_model_path("Org/Model-1.5B") == repo + "/snapshots/aaaa1111");
  CHECK(core::resolve_model_path("Org/Model-1.5B@v2") == repo + "/snapshots/bbbb2222");
  CHECK(core::resolve_model_path("Org/Model-1.5B@bbbb2222") == repo + "/snapshots/bbbb2222");
  // A path on disk wins over the cache, and is returned as given.
  const std::string local = tmp.file("Org/Model-1.5B");
  fs::create_directories(local);
  CHECK(core::resolve_model_path(local) == local);

  // Not cached: one line with the download command.
  try {
    core::resolve_model_path("Org/Other");
    FAIL("expected an error");
  } catch (const core::ConfigError& e) {
    const std::string what = e.what();
    CHECK(what.find("model.path: 'Org/Other'") == 0);
    CHECK(what.find(hub) != std::string::npos);
    CHECK(what.find("huggingface-cli download Org/Other") != std::string::npos);
    CHECK(what.find('\n') == std::string::npos);
  }
  const auto error_of = [](const std::string& spec) {
    try {
      core::resolve_model_path(spec);
    } catch (const core::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  CHECK(error_of("Org/Model-1.5B@v9").find("revision 'v9'") != std::string::npos);
  CHECK(error_of("Org/Model-1.5B@v9").find("--revision v9") != std::string::npos);

  // A GGUF repository: its one .gguf is the checkpoint; several must be named.
  const std::string gguf = hub + "/models--Org--Model-GGUF/snapshots/cccc";
  touch(gguf + "/model.Q4_K_M.gguf", "GGUF");
  CHECK(core::resolve_model_path("Org/Model-GGUF") == gguf + "/model.Q4_K_M.gguf");
  touch(gguf + "/model.Q8_0.gguf", "GGUF");
  CHECK(error_of("Org/Model-GGUF").find("2 GGUF files") != std::string::npos);

  // HF_HOME is the fallback when HF_HUB_CACHE is unset.
  ::unsetenv("HF_HUB_CACHE");
  ScopedEnv home("HF_HOME", tmp.file("hf"));
  CHECK(core::hf_hub_cache_dir() == tmp.file("hf") + "/hub");
}

TEST_CASE("the shared cache honours PATCH_CACHE_DIR, then XDG_CACHE_HOME") {
  {
    ScopedEnv c("PATCH_CACHE_DIR", "/some/cache");
    CHECK(core::cache_dir() == "/some/cache");
  }
  ScopedEnv none("PATCH_CACHE_DIR", "");
  ScopedEnv xdg("XDG_CACHE_HOME", "/xdg");
  CHECK(core::cache_dir() == "/xdg/patch");
}

TEST_CASE("a CUDA graph step runs eagerly, is captured once, then replays") {
  CHECK_THROWS_AS(core::CudaGraph(at::Device(at::kCPU)), core::ConfigError);
  if (!at::hasCUDA()) {
    SUCCEED("no CUDA device");
    return;
  }
  const auto opts = at::TensorOptions().device(at::kCUDA);
  at::Tensor input = at::zeros({5}, opts), acc = at::zeros({5}, opts), twice;
  int host_runs = 0;
  core::CudaGraph graph(at::Device(at::kCUDA));
  double want = 0;
  for (int i = 1; i <= 4; ++i) {
    input.fill_(i);  // the step's input changes in place between runs
    graph.run([&] {
      ++host_runs;
      acc.add_(input);
      twice = acc * 2;  // made at the capture, rewritten by every replay
    });
    want += i;
    CHECK(graph.captured() == (i >= 2));
    CHECK(at::allclose(acc.cpu(), at::full({5}, want)));
    CHECK(at::allclose(twice.cpu(), at::full({5}, 2 * want)));
  }
  CHECK(host_runs == 2);  // the eager run and the capture
}

TEST_CASE("sha256 matches the FIPS 180-4 test vectors, in one piece and streamed") {
  using patch::core::sha256_hex;
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // One million 'a', fed in uneven pieces across block boundaries.
  patch::core::Sha256 h;
  const std::string piece(997, 'a');
  size_t fed = 0;
  while (fed + piece.size() <= 1000000) {
    h.update(piece);
    fed += piece.size();
  }
  h.update(std::string(1000000 - fed, 'a'));
  CHECK(h.hex_digest() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  patch::test::TempDir dir;
  const std::string path = dir.file("x.bin");
  patch::core::write_file_atomic(path, "abc");
  CHECK(patch::core::sha256_file(path) == sha256_hex("abc"));
  CHECK_THROWS_AS(patch::core::sha256_file(dir.file("missing")), patch::core::Error);
}
