#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>

#include "catch.h"
#include "core/atomic_file.h"
#include "core/cuda_graph.h"
#include "core/error.h"
#include "core/paths.h"
#include "core/progress.h"
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
