// tokenizer.json: the model, normalizer, pre-tokenizer, decoder, added tokens
// and post-processor, then an encode/decode round of a few texts.
#include <nlohmann/json.hpp>

#include "text/hf_pipeline.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;  // the JSON parser itself is nlohmann's
  patch::fuzz::expect_clean([&] {
    auto tok = patch::text::tokenizer_from_json(j, "fuzz tokenizer.json", nullptr, nullptr, text, "fuzz:");
    for (const char* s : {"Hello world", "  tabs\tand\nnewlines 1234 \xF0\x9F\x98\x80", "", "\xFF\xFE bad utf8"})
      (void)tok->decode(tok->encode(s, true), true);
  });
  return 0;
}
