// The packed hybrid format loader.
#include "deploy/packed.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = patch::fuzz::input_path(".packed.safetensors");
  patch::fuzz::write_input(path, data, size);
  patch::fuzz::expect_clean([&] {
    auto packed = patch::deploy::read_packed(path);
    (void)packed.sparsity();
    (void)packed.bytes();
  });
  return 0;
}
