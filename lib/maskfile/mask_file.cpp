#include "maskfile/mask_file.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "core/strings.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "patch/version.h"
#include "sparsity/patterns.h"

namespace patch::maskfile {
namespace {

const std::string kTileSuffix = ".tile_dense";
const std::string kPatternSuffix = ".pattern_2_4";
const std::string kKeepSuffix = ".keep";

std::string label(const std::string& path) { return path.empty() ? std::string("mask file") : path; }

std::string format_double(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.10g", v);
  return buf;
}

bool parse_positive(const std::string& s, int64_t& out) {
  if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos) return false;
  out = std::stoll(s);
  return out > 0;
}

// "RxC" with positive R and C % 4 == 0.
bool parse_tile(const std::string& s, int64_t& rows, int64_t& cols) {
  auto x = s.find('x');
  return x != std::string::npos && parse_positive(s.substr(0, x), rows) && parse_positive(s.substr(x + 1), cols) &&
         cols % 4 == 0;
}

void validate_meta(const std::string& where, const MaskFileMeta& meta) {
  if (meta.tile_rows <= 0 || meta.tile_cols <= 0 || meta.tile_cols % 4 != 0)
    throw core::Error(core::str(where, ": tile ", meta.tile_rows, "x", meta.tile_cols,
                                " is invalid (expected positive rows and cols a multiple of 4)"));
  if (meta.mode != "joint" && meta.mode != "tile" && meta.mode != "maskllm" && meta.mode != "oneshot")
    throw core::Error(
        core::str(where, ": unknown mode '", meta.mode, "' (expected joint, tile, maskllm or oneshot)"));
  if (meta.structure != "hybrid" && meta.structure != "unstructured")
    throw core::Error(
        core::str(where, ": unknown structure '", meta.structure, "' (expected hybrid or unstructured)"));
  if (meta.structure == "unstructured" && meta.mode != "oneshot")
    throw core::Error(core::str(where, ": unstructured masks come from mode oneshot, not '", meta.mode, "'"));
}

void validate_bitmask(const std::string& where, const std::string& name, const at::Tensor& bits) {
  if (bits.scalar_type() != at::kByte || bits.dim() != 2 || bits.size(0) == 0 || bits.size(1) == 0)
    throw core::Error(core::str(where, ": layer '", name, "': keep must be a uint8 [out, in/8] bitmask, got ",
                                bits.scalar_type(), " ", bits.sizes()));
}

// Checks one layer's tensors against each other and the tile size; returns its grid.
sparsity::TileGrid validate_layer(const std::string& where, const std::string& name, const at::Tensor& tile_dense,
                                  const at::Tensor& pattern, const MaskFileMeta& meta) {
  auto fail = [&](const std::string& msg) { throw core::Error(core::str(where, ": layer '", name, "': ", msg)); };
  if (!pattern.defined()) fail("missing " + name + kPatternSuffix);
  if (!tile_dense.defined()) fail("missing " + name + kTileSuffix);
  if (pattern.scalar_type() != at::kByte || tile_dense.scalar_type() != at::kByte)
    fail("tile_dense and pattern_2_4 must be uint8");
  if (pattern.dim() != 2 || pattern.size(0) == 0 || pattern.size(1) == 0)
    fail(core::str("pattern_2_4 has shape ", pattern.sizes(), ", expected [out, in/4]"));
  sparsity::TileGrid grid(pattern.size(0), pattern.size(1) * sparsity::kGroupSize, meta.tile_rows, meta.tile_cols);
  if (tile_dense.dim() != 2 || tile_dense.size(0) != grid.rows() || tile_dense.size(1) != grid.cols())
    fail(core::str("tile_dense has shape ", tile_dense.sizes(), ", expected [", grid.rows(), ", ", grid.cols(),
                   "] for ", grid.str()));
  const int64_t max_dense = tile_dense.max().item<int64_t>();
  if (max_dense > 1) fail(core::str("tile_dense holds ", max_dense, " (expected 0 or 1)"));
  const int64_t max_pattern = pattern.max().item<int64_t>();
  if (max_pattern >= sparsity::kNumPatterns)
    fail(core::str("pattern_2_4 holds index ", max_pattern, " (expected 0-5)"));
  return grid;
}

}  // namespace

at::Tensor BitmaskLayer::mask(at::ScalarType dtype) const {
  auto shifts = at::arange(8, bits.options().dtype(at::kByte));
  return bits.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1).reshape({out, in}).to(dtype);
}

int64_t BitmaskLayer::zero_weights() const { return out * in - mask(at::kLong).sum().item<int64_t>(); }

at::Tensor pack_bits(const at::Tensor& keep) {
  core::check(keep.dim() == 2 && keep.size(1) % 8 == 0, "pack_bits",
              core::str("expected [out, in] with in a multiple of 8, got ", keep.sizes()));
  auto weights = at::pow(2, at::arange(8, keep.options().dtype(at::kLong)));
  return (keep.ne(0).to(at::kLong).view({keep.size(0), keep.size(1) / 8, 8}) * weights).sum(-1).to(at::kByte);
}

const LayerMask* MaskFile::find(const std::string& name) const {
  for (const auto& l : layers)
    if (l.name == name) return &l;
  return nullptr;
}

int64_t MaskFile::total_weights() const {
  int64_t n = 0;
  for (const auto& l : layers) n += l.grid.numel();
  for (const auto& b : bitmasks) n += b.out * b.in;
  return n;
}

double MaskFile::sparsity() const {
  int64_t zeros = 0;
  for (const auto& l : layers) zeros += l.zero_weights();
  for (const auto& b : bitmasks) zeros += b.zero_weights();
  const int64_t total = total_weights();
  return total ? static_cast<double>(zeros) / static_cast<double>(total) : 0.0;
}

MaskFile from_hardened(const sparsity::Hardened& hard, MaskFileMeta meta) {
  MaskFile f;
  meta.mode = sparsity::mask_mode_name(hard.mode);
  if (!hard.layers.empty()) {
    meta.tile_rows = hard.layers.front().grid.tile_rows();
    meta.tile_cols = hard.layers.front().grid.tile_cols();
  }
  meta.target_sparsity = hard.target_sparsity;
  meta.achieved_sparsity = hard.achieved_sparsity();
  f.meta = std::move(meta);
  f.layers = hard.layers;
  return f;
}

void write_mask_file(const std::string& path, const MaskFile& file) {
  const auto& meta = file.meta;
  validate_meta(path, meta);
  const bool unstructured = meta.structure == "unstructured";
  core::check(unstructured ? !file.bitmasks.empty() && file.layers.empty()
                           : !file.layers.empty() && file.bitmasks.empty(),
              path, core::str("a ", meta.structure, " mask file needs ", unstructured ? "bitmask" : "hybrid",
                              " layers and no others"));
  std::set<std::string> names;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& b : file.bitmasks) {
    core::check(names.insert(b.name).second, path, core::str("layer '", b.name, "' appears twice"));
    auto bits = b.bits.to(at::kCPU).contiguous();
    validate_bitmask(path, b.name, bits);
    core::check(bits.size(0) == b.out && bits.size(1) * 8 == b.in, path,
                core::str("layer '", b.name, "': keep ", bits.sizes(), " does not describe [", b.out, ", ", b.in, "]"));
    tensors.emplace_back(b.name + kKeepSuffix, bits);
  }
  for (const auto& l : file.layers) {
    core::check(names.insert(l.name).second, path, core::str("layer '", l.name, "' appears twice"));
    auto tile_dense = l.tile_dense.to(at::kCPU).contiguous();
    auto pattern = l.pattern.to(at::kCPU).contiguous();
    auto grid = validate_layer(path, l.name, tile_dense, pattern, meta);
    core::check(grid == l.grid, path, core::str("layer '", l.name, "': tensors describe ", grid.str(),
                                                " but the layer is ", l.grid.str()));
    tensors.emplace_back(l.name + kTileSuffix, tile_dense);
    tensors.emplace_back(l.name + kPatternSuffix, pattern);
  }
  std::map<std::string, std::string> md{
      {"format", kFormat},
      {"format_version", kFormatVersion},
      {"tile", core::str(meta.tile_rows, "x", meta.tile_cols)},
      {"mode", meta.mode},
      {"structure", meta.structure},
      {"model_config_hash", meta.model_config_hash},
      {"model_source", meta.model_source},
      {"training_config", meta.training_config},
      {"created_by", meta.created_by.empty() ? std::string("patch-train ") + PATCH_VERSION_STRING : meta.created_by}};
  if (!meta.method.empty()) md["method"] = meta.method;
  if (!std::isnan(meta.target_sparsity)) md["target_sparsity"] = format_double(meta.target_sparsity);
  if (!std::isnan(meta.achieved_sparsity)) md["achieved_sparsity"] = format_double(meta.achieved_sparsity);
  io::write_safetensors(path, tensors, md);
}

MaskFile read_mask_file(const std::string& path) {
  io::SafetensorsFile st(path);
  const auto& md = st.metadata();
  auto required = [&](const std::string& key) -> const std::string& {
    auto it = md.find(key);
    if (it == md.end()) throw core::Error(core::str(path, ": missing metadata key '", key, "' (not a patch mask file?)"));
    return it->second;
  };
  auto optional = [&](const std::string& key) {
    auto it = md.find(key);
    return it == md.end() ? std::string() : it->second;
  };
  auto number = [&](const std::string& key) {
    auto it = md.find(key);
    if (it == md.end()) return std::numeric_limits<double>::quiet_NaN();
    char* end = nullptr;
    double v = std::strtod(it->second.c_str(), &end);
    if (it->second.empty() || *end != '\0')
      throw core::Error(core::str(path, ": metadata '", key, "' is '", it->second, "', expected a number"));
    return v;
  };

  MaskFile f;
  f.path = path;
  if (required("format") != kFormat)
    throw core::Error(core::str(path, ": metadata format is '", md.at("format"), "', expected '", kFormat, "'"));
  if (required("format_version") != kFormatVersion)
    throw core::Error(core::str(path, ": unsupported format_version '", md.at("format_version"), "' (this build reads ",
                                kFormatVersion, ")"));
  const auto& tile = required("tile");
  if (!parse_tile(tile, f.meta.tile_rows, f.meta.tile_cols))
    throw core::Error(core::str(path, ": metadata tile is '", tile, "', expected ROWSxCOLS with COLS a multiple of 4"));
  f.meta.mode = required("mode");
  if (auto st = optional("structure"); !st.empty()) f.meta.structure = st;
  f.meta.method = optional("method");
  validate_meta(path, f.meta);
  f.meta.target_sparsity = number("target_sparsity");
  f.meta.achieved_sparsity = number("achieved_sparsity");
  f.meta.model_config_hash = optional("model_config_hash");
  f.meta.model_source = optional("model_source");
  f.meta.training_config = optional("training_config");
  f.meta.created_by = optional("created_by");

  // Layers in file order (by data offset), each from its two tensors.
  auto entries = st.entries();
  std::stable_sort(entries.begin(), entries.end(),
                   [](const io::SafetensorsEntry& a, const io::SafetensorsEntry& b) { return a.begin < b.begin; });
  std::vector<std::string> order;
  std::set<std::string> seen;
  if (f.meta.structure == "unstructured") {
    for (const auto& e : entries) {
      if (!core::ends_with(e.name, kKeepSuffix))
        throw core::Error(core::str(path, ": unexpected tensor '", e.name, "' (expected <layer>", kKeepSuffix, ")"));
      const std::string name = e.name.substr(0, e.name.size() - kKeepSuffix.size());
      auto bits = st.tensor(e.name);
      validate_bitmask(path, name, bits);
      f.bitmasks.push_back({name, bits.size(0), bits.size(1) * 8, bits});
    }
    core::check(!f.bitmasks.empty(), path, "no masked layers");
    return f;
  }
  for (const auto& e : entries) {
    std::string layer;
    if (core::ends_with(e.name, kTileSuffix)) {
      layer = e.name.substr(0, e.name.size() - kTileSuffix.size());
    } else if (core::ends_with(e.name, kPatternSuffix)) {
      layer = e.name.substr(0, e.name.size() - kPatternSuffix.size());
    } else {
      throw core::Error(core::str(path, ": unexpected tensor '", e.name, "' (expected <layer>", kTileSuffix, " or <layer>",
                                  kPatternSuffix, ")"));
    }
    if (seen.insert(layer).second) order.push_back(layer);
  }
  core::check(!order.empty(), path, "no masked layers");
  for (const auto& name : order) {
    auto tensor = [&](const std::string& key) { return st.contains(key) ? st.tensor(key) : at::Tensor(); };
    auto tile_dense = tensor(name + kTileSuffix);
    auto pattern = tensor(name + kPatternSuffix);
    auto grid = validate_layer(path, name, tile_dense, pattern, f.meta);
    f.layers.push_back({name, grid, sparsity::block_index(name), tile_dense, pattern});
  }
  return f;
}

void check_layer_shape(const MaskFile& file, const LayerMask& layer, int64_t out, int64_t in) {
  if (layer.grid.out() != out || layer.grid.in() != in)
    throw core::Error(core::str(label(file.path), ": layer '", layer.name, "': mask is [", layer.grid.out(), ", ",
                                layer.grid.in(), "] but the weight is [", out, ", ", in, "]"));
}

at::Tensor layer_mask(const MaskFile& file, const std::string& name, at::ScalarType dtype) {
  if (const auto* l = file.find(name)) return l->mask(dtype);
  for (const auto& b : file.bitmasks)
    if (b.name == name) return b.mask(dtype);
  return {};
}

std::string density_table(const MaskFile& file) {
  struct Row {
    std::string name, shape, tiles;
    int64_t weights = 0, zeros = 0;
  };
  std::vector<Row> rows;
  std::map<int64_t, Row> blocks;
  Row total{"total", "", "", 0, 0};
  int64_t dense_tiles = 0, tiles = 0;
  auto add = [&](Row r, int64_t block) {
    auto& b = blocks[block];
    b.name = block >= 0 ? core::str("block ", block) : "other";
    b.weights += r.weights;
    b.zeros += r.zeros;
    total.weights += r.weights;
    total.zeros += r.zeros;
    rows.push_back(std::move(r));
  };
  for (const auto& l : file.layers) {
    const int64_t d = l.tile_dense.to(at::kLong).sum().item<int64_t>();
    dense_tiles += d;
    tiles += l.grid.num_tiles();
    add({l.name, core::str(l.grid.out(), "x", l.grid.in()), core::str(d, "/", l.grid.num_tiles()), l.grid.numel(),
         l.zero_weights()},
        l.block);
  }
  for (const auto& b : file.bitmasks)
    add({b.name, core::str(b.out, "x", b.in), "-", b.out * b.in, b.zero_weights()}, sparsity::block_index(b.name));
  if (tiles) total.tiles = core::str(dense_tiles, "/", tiles);
  size_t width = 5;
  for (const auto& r : rows) width = std::max(width, r.name.size());
  std::string out;
  char line[512];
  auto emit = [&](const Row& r) {
    const double density = r.weights ? 1.0 - static_cast<double>(r.zeros) / static_cast<double>(r.weights) : 0.0;
    std::snprintf(line, sizeof line, "%-*s  %-12s  %-11s  %12lld  %7.4f\n", static_cast<int>(width), r.name.c_str(),
                  r.shape.c_str(), r.tiles.c_str(), static_cast<long long>(r.weights), density);
    out += line;
  };
  std::snprintf(line, sizeof line, "%-*s  %-12s  %-11s  %12s  %7s\n", static_cast<int>(width), "layer", "shape",
                "dense tiles", "weights", "density");
  out += line;
  for (const auto& r : rows) emit(r);
  for (const auto& [b, r] : blocks) emit(r);
  emit(total);
  return out;
}

sparsity::Prior prior_from_layer(const LayerMask& layer) {
  return {layer.pattern, layer.tile_dense.to(at::kFloat)};
}

std::map<std::string, sparsity::Prior> priors_from_file(const MaskFile& file) {
  core::check(file.meta.structure == "hybrid", label(file.path), "an unstructured mask file cannot be a 2:4 prior");
  std::map<std::string, sparsity::Prior> out;
  for (const auto& l : file.layers) out[l.name] = prior_from_layer(l);
  return out;
}

}  // namespace patch::maskfile
