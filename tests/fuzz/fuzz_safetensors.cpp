// The safetensors reader: header JSON, dtypes, shapes, offsets, then every tensor read.
#include "io/safetensors.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = patch::fuzz::input_path(".safetensors");
  patch::fuzz::write_input(path, data, size);
  patch::fuzz::expect_clean([&] {
    patch::io::SafetensorsFile f(path);
    for (const auto& e : f.entries()) (void)f.tensor(e.name).sum();
  });
  return 0;
}
