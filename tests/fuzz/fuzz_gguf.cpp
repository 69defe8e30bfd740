// The GGUF reader: metadata, tensor infos, every tensor (quant blocks
// dequantized), the vocabulary when there is one, and the model mapping.
#include "io/checkpoint.h"
#include "io/gguf.h"
#include "text/tokenizer.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = patch::fuzz::input_path(".gguf");
  patch::fuzz::write_input(path, data, size);
  patch::fuzz::expect_clean([&] {
    patch::io::GgufFile g(path);
    for (const auto& t : g.tensors()) {
      // Bound the work per input: dequantizing gigabytes teaches nothing new.
      int64_t n = 1;
      for (int64_t d : t.dims) n *= d;
      if (n <= (int64_t{1} << 22)) (void)g.tensor(t.name).sum();
    }
    if (g.metadata().contains("tokenizer.ggml.model")) {
      auto tok = patch::text::load_gguf_tokenizer(g);
      (void)tok->decode(tok->encode("Hello world, 123 \xC3\xA9t\xC3\xA9 <s>", true), false);
    }
  });
  patch::fuzz::expect_clean([&] { (void)patch::io::load_checkpoint(path); });
  return 0;
}
