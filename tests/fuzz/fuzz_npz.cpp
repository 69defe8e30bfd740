// The .npz reader and the PATCH/MaskLLM mask import (no model: shapes from the
// file), then every imported layer's mask.
#include "fuzz_util.h"
#include "io/npz.h"
#include "maskfile/npz_masks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = patch::fuzz::input_path(".npz");
  patch::fuzz::write_input(path, data, size);
  patch::fuzz::expect_clean([&] {
    patch::io::NpzFile npz(path);
    for (const auto& key : npz.keys()) (void)npz.array(key).numel();
  });
  patch::fuzz::expect_clean([&] {
    patch::maskfile::NpzImportOptions opts;
    opts.tile_rows = opts.tile_cols = 16;
    auto file = patch::maskfile::import_npz(path, opts);
    for (const auto& l : file.layers) (void)l.mask().sum();
  });
  return 0;
}
