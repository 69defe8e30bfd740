#include "data/corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "core/paths.h"
#include "core/progress.h"
#include "data/xz_stream.h"
#include "core/sha256.h"

namespace patch::data {

namespace {

namespace fs = std::filesystem;

enum class Format { kText, kJsonl, kBin };

Format resolve_format(const std::string& path, const std::string& format) {
  if (format == "text") return Format::kText;
  if (format == "jsonl") return Format::kJsonl;
  if (format == "bin") return Format::kBin;
  if (format != "auto")
    throw core::ConfigError(
        core::str("data format '", format, "' is not one of auto, text, jsonl, bin"));
  // "x.jsonl.xz" is JSONL: the extension under the compression's.
  fs::path p(path);
  if (is_xz(path)) p = p.stem();
  const std::string ext = p.extension().string();
  if (ext == ".jsonl" || ext == ".json") return Format::kJsonl;
  if (ext == ".bin") return Format::kBin;
  return Format::kText;
}

const char* format_name(Format f) {
  switch (f) {
    case Format::kText:
      return "text";
    case Format::kJsonl:
      return "jsonl";
    case Format::kBin:
      return "bin";
  }
  return "";
}

void check_readable_file(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec))
    throw core::Error(core::str(path, ": is a directory; expected a text, JSONL, .xz or .bin file"));
  if (!fs::exists(path, ec)) throw core::Error(core::str(path, ": no such file"));
}

bool blank(const std::string& s) {
  return s.find_first_not_of(" \t\r\n") == std::string::npos;
}

// Streams the documents of a text or JSONL file to `fn`, skipping blank ones;
// `progress` gets the bytes read so far.
void for_each_document(const std::string& path, Format format, const DataOptions& opts,
                       const std::function<void(const std::string&)>& fn,
                       const std::function<void(long)>& progress) {
  long compressed = 0;  // bytes of an .xz file consumed so far
  const bool xz = is_xz(path);
  std::unique_ptr<std::istream> input = open_input(path, &compressed);
  std::istream& in = *input;
  if (format == Format::kText && opts.document_separator.empty()) {
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) throw core::Error(core::str(path, ": read error"));
    if (!blank(all)) fn(all);
    progress(xz ? compressed : static_cast<long>(all.size()));
    return;
  }
  std::string line, doc;
  bool has_lines = false;
  long bytes = 0;
  for (long lineno = 1; std::getline(in, line); ++lineno) {
    bytes = xz ? compressed : bytes + static_cast<long>(line.size()) + 1;
    if (format == Format::kJsonl) {
      if (blank(line)) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        throw core::Error(core::str(path, ":", lineno, ": invalid JSON (", e.what(), ")"));
      }
      if (!j.is_object() || !j.contains(opts.jsonl_field) || !j.at(opts.jsonl_field).is_string())
        throw core::Error(core::str(path, ":", lineno, ": expected an object with a string field '",
                                    opts.jsonl_field, "'"));
      const std::string& text = j.at(opts.jsonl_field).get_ref<const std::string&>();
      if (!blank(text)) fn(text);
    } else {
      const bool separator = line == opts.document_separator ||
                             (!line.empty() && line.back() == '\r' &&
                              line.compare(0, line.size() - 1, opts.document_separator) == 0);
      if (separator) {
        if (!blank(doc)) fn(doc);
        doc.clear();
        has_lines = false;
        continue;
      }
      if (has_lines) doc += '\n';
      doc += line;
      has_lines = true;
    }
    if (lineno % 1024 == 0) progress(bytes);
  }
  if (in.bad()) throw core::Error(core::str(path, ": read error"));
  if (!blank(doc)) fn(doc);
  progress(bytes);
}

// Tokenizes every document of `path` and hands the ids (document + separator)
// to `sink`; returns the number of documents.
long tokenize_documents(const std::string& path, Format format, const text::Tokenizer& tok,
                        const DataOptions& opts,
                        const std::function<void(const std::vector<int32_t>&)>& sink) {
  const int32_t sep = tok.eos_id() >= 0 ? tok.eos_id() : tok.bos_id();
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  const long total = ec ? 0L : static_cast<long>(size);
  core::Progress progress("tokenizing " + fs::path(path).filename().string(), total);
  long docs = 0;
  std::vector<int32_t> ids;
  for_each_document(
      path, format, opts,
      [&](const std::string& doc) {
        ids = tok.encode(doc, /*add_special=*/false);
        if (sep >= 0) ids.push_back(sep);
        sink(ids);
        ++docs;
      },
      [&](long bytes) { progress.update(std::min(bytes, total), 0); });
  progress.finish();
  return docs;
}

// Ids of a .bin file must index the tokenizer's vocabulary.
void check_ids(const TokenStream& s, const text::Tokenizer& tok) {
  const int64_t vocab = tok.vocab_size();
  for (int64_t i = 0; i < s.size(); ++i) {
    const int32_t id = s[i];
    if (id >= vocab)
      throw core::Error(core::str(s.path(), ": token ", i, " has id ", id,
                                  ", outside the tokenizer's vocabulary of ", vocab));
  }
}

}  // namespace

TokenStream load_tokens(const std::string& path, const text::Tokenizer& tok,
                        const DataOptions& opts) {
  check_readable_file(path);
  const Format format = resolve_format(path, opts.format);
  if (format == Format::kBin) {
    TokenStream s = TokenStream::open(path);
    check_ids(s, tok);
    return s;
  }
  if (opts.cache_dir.empty()) {
    std::vector<int32_t> all;
    tokenize_documents(path, format, tok, opts, [&](const std::vector<int32_t>& ids) {
      all.insert(all.end(), ids.begin(), ids.end());
    });
    return TokenStream(std::move(all));
  }

  // The cache key covers everything that changes the tokens.
  const std::string key = core::sha256_hex(
      core::str("patch token cache v1\n", tok.fingerprint(), "\n", format_name(format), "\n",
                opts.jsonl_field, "\n", opts.document_separator, "\n", core::sha256_file(path)));
  std::error_code ec;
  fs::create_directories(opts.cache_dir, ec);
  if (ec)
    throw core::Error(
        core::str(opts.cache_dir, ": cannot create the cache directory (", ec.message(), ")"));
  const std::string cache = (fs::path(opts.cache_dir) / (fs::path(path).filename().string() + "." +
                                                         key.substr(0, 16) + ".tokens.bin"))
                                .string();
  if (fs::exists(cache)) {
    try {
      TokenStream s = TokenStream::open(cache);
      core::log::info(
          core::str("tokens of ", path, " from cache ", cache, " (", s.size(), " tokens)"));
      return s;
    } catch (const core::Error& e) {
      core::log::warn(core::str("ignoring a broken token cache: ", e.what()));
    }
  }
  TokenFileWriter writer(cache, dtype_for_vocab(tok.vocab_size()));
  const long docs = tokenize_documents(
      path, format, tok, opts, [&](const std::vector<int32_t>& ids) { writer.append(ids); });
  writer.commit();
  core::log::info(core::str("tokenized ", path, ": ", docs, " documents, ", writer.count(),
                            " tokens, cached in ", cache));
  return TokenStream::open(cache);
}

std::vector<int32_t> tokenize_eval_text(const std::string& path, const text::Tokenizer& tok) {
  check_readable_file(path);
  std::string text;
  if (resolve_format(path, "auto") == Format::kJsonl) {
    // A JSONL file is scored on its documents' text (each line checked), one
    // blank line between documents; never on the JSON syntax itself.
    DataOptions opts;
    for_each_document(
        path, Format::kJsonl, opts,
        [&](const std::string& doc) { text += (text.empty() ? "" : "\n\n") + doc; }, [](long) {});
  } else {
    std::unique_ptr<std::istream> in = open_input(path);
    text.assign(std::istreambuf_iterator<char>(*in), std::istreambuf_iterator<char>());
  }
  std::vector<int32_t> ids = tok.encode(text, /*add_special=*/false);
  if (ids.empty()) throw core::Error(core::str(path, ": holds no text to evaluate"));
  return ids;
}

namespace {

TokenStream load_token_files(const std::string& key, const std::vector<std::string>& paths,
                             const text::Tokenizer& tok, const DataOptions& opts, int64_t cap) {
  std::vector<TokenStream> parts;
  for (const auto& f : paths) {
    parts.push_back(load_tokens(f, tok, opts));
    if (parts.back().size() == 0)
      throw core::Error(core::str(key, ": '", f, "' holds no tokens (an empty file, or blank documents only)"));
  }
  if (parts.size() == 1 && (cap <= 0 || parts[0].size() <= cap)) return parts[0];
  std::vector<int32_t> all;
  for (const auto& p : parts) {
    const int64_t n = cap > 0 ? std::min<int64_t>(p.size(), cap - static_cast<int64_t>(all.size())) : p.size();
    std::vector<int64_t> buf(static_cast<size_t>(n));
    p.read(0, n, buf.data());
    all.insert(all.end(), buf.begin(), buf.end());
    if (cap > 0 && static_cast<int64_t>(all.size()) >= cap) break;
  }
  return TokenStream(std::move(all));
}

}  // namespace

TokenStream load_config_tokens(const config::Config& cfg, const std::string& key, const text::Tokenizer& tok,
                               int64_t cap) {
  std::vector<std::string> files = cfg.get_string_list(key);
  for (auto& f : files) f = core::resolve_path(f);
  DataOptions opts = data_options(cfg);
  if (opts.cache_dir.empty()) opts.cache_dir = core::cache_dir() + "/tokens";
  return load_token_files(key, files, tok, opts, cap);
}

DataOptions data_options(const config::Config& cfg) {
  DataOptions o;
  o.format = cfg.get_string("data.format");
  o.jsonl_field = cfg.get_string("data.jsonl_field");
  o.document_separator = cfg.get_string("data.document_separator");
  o.cache_dir = cfg.get_string("data.cache_dir");
  return o;
}

}  // namespace patch::data
