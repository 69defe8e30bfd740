// The mask file loader, then every layer's [out, in] mask built from it.
#include "maskfile/mask_file.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = patch::fuzz::input_path(".masks.safetensors");
  patch::fuzz::write_input(path, data, size);
  patch::fuzz::expect_clean([&] {
    auto file = patch::maskfile::read_mask_file(path);
    (void)file.sparsity();
    for (const auto& l : file.layers) (void)patch::maskfile::layer_mask(file, l.name).sum();
    for (const auto& b : file.bitmasks) (void)patch::maskfile::layer_mask(file, b.name).sum();
  });
  return 0;
}
