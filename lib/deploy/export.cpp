#include "deploy/export.h"

#include <ATen/core/grad_mode.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "core/paths.h"
#include "io/safetensors.h"

namespace patch::deploy {
namespace {

namespace fs = std::filesystem;

std::string layer_of(const std::string& tensor) {
  const std::string suffix = ".weight";
  if (tensor.size() <= suffix.size() || tensor.compare(tensor.size() - suffix.size(), suffix.size(), suffix) != 0)
    return {};
  return tensor.substr(0, tensor.size() - suffix.size());
}

bool has_layer(const maskfile::MaskFile& masks, const std::string& name) {
  if (masks.find(name)) return true;
  for (const auto& b : masks.bitmasks)
    if (b.name == name) return true;
  return false;
}

}  // namespace

void export_checkpoint(const io::Checkpoint& ckpt, const maskfile::MaskFile& masks,
                       const std::map<std::string, at::Tensor>& replace, const std::string& out_dir) {
  if (ckpt.format != "safetensors")
    throw core::Error(core::str(ckpt.source, ": exporting a pruned checkpoint needs a Hugging Face safetensors input, not ",
                          ckpt.format));
  const fs::path src(ckpt.source);
  // Every masked layer and replaced weight must exist with the right shape.
  auto check_layer = [&](const std::string& name, int64_t out, int64_t in) {
    auto it = ckpt.tensors.find(name + ".weight");
    if (it == ckpt.tensors.end())
      throw core::Error(core::str(masks.path.empty() ? "masks" : masks.path, ": layer '", name, "' is not in ", ckpt.source));
    if (it->second.dim() != 2 || it->second.size(0) != out || it->second.size(1) != in)
      throw core::Error(core::str(masks.path.empty() ? "masks" : masks.path, ": layer '", name, "' is [", out, ", ", in,
                            "] but the checkpoint's weight is ", it->second.sizes()));
  };
  for (const auto& l : masks.layers) check_layer(l.name, l.grid.out(), l.grid.in());
  for (const auto& b : masks.bitmasks) check_layer(b.name, b.out, b.in);
  for (const auto& [name, t] : replace) {
    auto it = ckpt.tensors.find(name);
    if (it == ckpt.tensors.end() || !it->second.sizes().equals(t.sizes()))
      throw core::Error(core::str("export: replacement '", name, "' ", t.sizes(), " does not match a tensor of ", ckpt.source));
  }

  const std::string tmp = out_dir + ".partial";
  core::remove_tree(tmp);
  std::error_code ec;
  fs::create_directories(tmp, ec);
  if (ec) throw core::Error(core::str("export: cannot create '", tmp, "': ", ec.message()));

  at::NoGradGuard no_grad;
  std::set<std::string> shards;
  for (const auto& [name, file] : ckpt.tensor_file) shards.insert(file);
  for (const auto& shard : shards) {
    io::SafetensorsFile in(shard);
    auto entries = in.entries();
    std::stable_sort(entries.begin(), entries.end(),
                     [](const io::SafetensorsEntry& a, const io::SafetensorsEntry& b) { return a.begin < b.begin; });
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& e : entries) {
      at::Tensor t = in.tensor(e.name);
      auto rep = replace.find(e.name);
      if (rep != replace.end()) t = rep->second.to(at::kCPU, e.dtype);
      const std::string layer = layer_of(e.name);
      if (!layer.empty() && has_layer(masks, layer))
        t = t * maskfile::layer_mask(masks, layer, at::kFloat).to(e.dtype);
      tensors.emplace_back(e.name, t);
    }
    io::write_safetensors((fs::path(tmp) / fs::path(shard).filename()).string(), tensors, in.metadata());
    core::log::info(core::str("export: wrote ", fs::path(shard).filename().string(), " (", tensors.size(), " tensors)"));
  }
  // Everything else of the input directory, config.json with the mask reference.
  for (const auto& entry : fs::directory_iterator(src)) {
    if (!entry.is_regular_file()) continue;
    const auto name = entry.path().filename().string();
    if (name == "config.json" || entry.path().extension() == ".safetensors") continue;
    fs::copy_file(entry.path(), fs::path(tmp) / name, fs::copy_options::overwrite_existing, ec);
    if (ec) throw core::Error(core::str("export: cannot copy '", entry.path().string(), "': ", ec.message()));
  }
  auto config = nlohmann::ordered_json::parse(core::read_file((src / "config.json").string()));
  config["patch_masks"] = "masks.safetensors";
  core::write_file_atomic((fs::path(tmp) / "config.json").string(), config.dump(2) + "\n");
  maskfile::write_mask_file((fs::path(tmp) / "masks.safetensors").string(), masks);

  core::remove_tree(out_dir);
  fs::rename(tmp, out_dir, ec);
  if (ec) throw core::Error(core::str("export: cannot rename '", tmp, "' to '", out_dir, "': ", ec.message()));
}

}  // namespace patch::deploy
