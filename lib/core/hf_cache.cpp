#include "core/hf_cache.h"

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include "core/error.h"
#include "core/paths.h"

namespace patch::core {
namespace fs = std::filesystem;
namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : "";
}

bool is_name_part(const std::string& s) {
  if (s.empty() || s[0] == '.') return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return false;
  return true;
}

std::string read_ref(const fs::path& file) {
  std::ifstream in(file);
  std::string hash;
  in >> hash;
  return hash;
}

std::string download_hint(const std::string& repo, const std::string& revision) {
  return str("download it with: huggingface-cli download ", repo,
             revision.empty() ? "" : " --revision " + revision);
}

// The snapshot folder of `revision` (a branch or tag under refs/, or a commit
// hash under snapshots/); empty revision = main, or the only snapshot.
fs::path snapshot_of(const fs::path& repo_dir, const std::string& repo,
                     const std::string& revision) {
  std::error_code ec;
  const fs::path snapshots = repo_dir / "snapshots";
  const std::string rev = revision.empty() ? "main" : revision;
  if (fs::is_regular_file(repo_dir / "refs" / rev, ec)) {
    const std::string hash = read_ref(repo_dir / "refs" / rev);
    if (!hash.empty() && fs::is_directory(snapshots / hash, ec)) return snapshots / hash;
  }
  if (!revision.empty() && fs::is_directory(snapshots / revision, ec)) return snapshots / revision;
  std::vector<fs::path> all;
  if (fs::is_directory(snapshots, ec))
    for (const auto& e : fs::directory_iterator(snapshots, ec))
      if (e.is_directory(ec)) all.push_back(e.path());
  if (revision.empty() && all.size() == 1) return all.front();
  if (all.empty())
    throw ConfigError(str("model.path: '", repo, "' has no snapshot in the Hugging Face cache (",
                          repo_dir.string(), "); ", download_hint(repo, revision)));
  throw ConfigError(str("model.path: revision '", rev, "' of '", repo,
                        "' is not in the Hugging Face cache (", snapshots.string(), " holds ",
                        all.size(), " snapshots); name one as ", repo, "@<revision>, or ",
                        download_hint(repo, revision)));
}

// A snapshot is a checkpoint folder (config.json) or holds one GGUF file.
std::string checkpoint_in(const fs::path& snapshot, const std::string& spec) {
  std::error_code ec;
  if (fs::exists(snapshot / "config.json", ec)) return snapshot.string();
  std::vector<std::string> ggufs;
  for (const auto& e : fs::directory_iterator(snapshot, ec))
    if (e.path().extension() == ".gguf") ggufs.push_back(e.path().filename().string());
  if (ggufs.size() == 1) return (snapshot / ggufs.front()).string();
  if (ggufs.empty())
    throw ConfigError(str("model.path: the cached snapshot of '", spec, "' (", snapshot.string(),
                          ") has neither config.json nor a .gguf file; is the download complete?"));
  throw ConfigError(str("model.path: the cached snapshot of '", spec, "' holds ", ggufs.size(),
                        " GGUF files; name one, e.g. --model ",
                        (snapshot / ggufs.front()).string()));
}

}  // namespace

std::string hf_hub_cache_dir() {
  if (std::string d = env("HF_HUB_CACHE"); !d.empty()) return d;
  if (std::string d = env("HUGGINGFACE_HUB_CACHE"); !d.empty()) return d;
  if (std::string d = env("HF_HOME"); !d.empty()) return d + "/hub";
  if (std::string d = env("XDG_CACHE_HOME"); !d.empty()) return d + "/huggingface/hub";
  return env("HOME") + "/.cache/huggingface/hub";
}

bool is_hub_name(const std::string& spec) {
  // A revision may itself hold slashes ("refs/pr/1"): only the part before '@' is the repo.
  const size_t at = spec.find('@');
  if (at != std::string::npos && at + 1 == spec.size()) return false;
  const std::string repo = spec.substr(0, at);
  const size_t slash = repo.find('/');
  if (slash == std::string::npos || repo.find('/', slash + 1) != std::string::npos) return false;
  return is_name_part(repo.substr(0, slash)) && is_name_part(repo.substr(slash + 1));
}

std::string resolve_model_path(const std::string& spec) {
  const std::string path = resolve_path(spec);
  std::error_code ec;
  if (path != spec || fs::exists(path, ec) || !is_hub_name(spec)) return path;
  const size_t at = spec.find('@');
  const std::string repo = spec.substr(0, at);
  const std::string revision = at == std::string::npos ? "" : spec.substr(at + 1);
  const std::string org = repo.substr(0, repo.find('/')), name = repo.substr(repo.find('/') + 1);
  const fs::path repo_dir = fs::path(hf_hub_cache_dir()) / ("models--" + org + "--" + name);
  if (!fs::is_directory(repo_dir, ec))
    throw ConfigError(str("model.path: '", spec,
                          "' is neither a file or folder here nor a model in the Hugging Face "
                          "cache (",
                          hf_hub_cache_dir(), "); ", download_hint(repo, revision)));
  return checkpoint_in(snapshot_of(repo_dir, repo, revision), spec);
}

}  // namespace patch::core
