// The configuration loader: YAML (or JSON when the input starts with '{'),
// resolved against the schema and validated for `train`.
#include "config/config.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const bool json = size > 0 && data[0] == '{';
  const std::string path = patch::fuzz::input_path(json ? ".json" : ".yaml");
  patch::fuzz::write_input(path, data, size);
  patch::fuzz::expect_clean([&] {
    auto cfg = patch::config::resolve(path, {}, "train");
    (void)patch::config::dump_yaml(cfg);
  });
  return 0;
}
