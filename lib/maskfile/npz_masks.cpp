#include "maskfile/npz_masks.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <regex>
#include <set>

#include "core/strings.h"
#include "core/error.h"
#include "io/npz.h"
#include "patch/version.h"
#include "sparsity/linear_mask.h"
#include "sparsity/patterns.h"

namespace patch::maskfile {
namespace {

const std::string kShapeSuffix = ".__shape__";
const std::string kMetaKey = "__meta__";
const std::string kWeightSuffix = ".weight";
const std::string kMaskSuffix = ".mask";

std::string strip(const std::string& s, const std::string& suffix) {
  return core::ends_with(s, suffix) ? s.substr(0, s.size() - suffix.size()) : s;
}

// A decoder linear's Hugging Face module name (LLaMA, Mistral, Qwen, SmolLM).
bool is_decoder_linear(const std::string& name) {
  static const std::regex re(R"(model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))");
  return std::regex_match(name, re);
}

// Where a decoder linear comes in the model: its block, then its place in the block.
std::pair<int64_t, int> module_order(const std::string& name) {
  static const char* const kOrder[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  int place = 7;
  for (int i = 0; i < 7; ++i)
    if (core::ends_with(name, std::string(".") + kOrder[i])) place = i;
  return {sparsity::block_index(name), place};
}

// One layer's entry of the archive: our name, its packed bits and its shape.
struct Entry {
  std::string key, name;
  int64_t out = 0, in = 0;
};

// The tile size the PATCH file's __meta__ names, if any: "tile_size",
// "tile" or "tile_shape" as N, [R, C] or "RxC".
bool meta_tile(const nlohmann::json& meta, int64_t& rows, int64_t& cols, const std::string& where) {
  for (const char* k : {"tile_size", "tile", "tile_shape"}) {
    if (!meta.contains(k)) continue;
    const auto& v = meta[k];
    const std::string bad = core::str(where, ": __meta__ \"", k, "\" is ", v.dump(),
                                      "; expected N, [rows, cols] or \"RxC\" with positive sizes");
    if (v.is_number_integer()) {
      rows = cols = v.get<int64_t>();
    } else if (v.is_array() && v.size() == 2 && v[0].is_number_integer() && v[1].is_number_integer()) {
      rows = v[0].get<int64_t>();
      cols = v[1].get<int64_t>();
    } else if (v.is_string()) {
      const std::string s = v.get<std::string>();
      const auto x = s.find('x');
      if (x == std::string::npos || s.find_first_not_of("0123456789x") != std::string::npos || x == 0 ||
          x + 1 == s.size() || s.size() > 19)
        throw core::Error(bad);
      rows = std::stoll(s.substr(0, x));
      cols = std::stoll(s.substr(x + 1));
    } else {
      throw core::Error(bad);
    }
    if (rows <= 0 || cols <= 0 || rows > (int64_t{1} << 30) || cols > (int64_t{1} << 30)) throw core::Error(bad);
    return true;
  }
  return false;
}

// Lookup: a group's keep bits (bit j = position j) -> 2:4 pattern, or -1.
at::Tensor pattern_lookup() {
  auto t = at::full({16}, -1, at::kLong);
  for (int bits = 0; bits < 16; ++bits) t[bits] = sparsity::pattern_index(static_cast<uint8_t>(bits));
  return t;
}

// [out, G] values -> [R, tile_rows, C, tile_cols/4], padded with `pad` past ragged edges.
at::Tensor by_tile(const at::Tensor& groups, const sparsity::TileGrid& g, bool pad) {
  // A tile larger than the layer is the whole layer: pad to the layer, not the tile.
  const int64_t th = std::min(g.tile_rows(), g.out()), tg = std::min(g.tile_cols() / 4, g.groups());
  auto padded = at::full({g.rows() * th, g.cols() * tg}, pad, groups.options());
  padded.slice(0, 0, g.out()).slice(1, 0, g.groups()).copy_(groups);
  return padded.view({g.rows(), th, g.cols(), tg});
}

// The 2:4 pattern per group of a sparse tile that must be repaired: the two
// weights of largest magnitude among those kept (kept ones first).
at::Tensor repair_patterns(const at::Tensor& keep, const at::Tensor& weight) {
  const int64_t out = keep.size(0), groups = keep.size(1) / 4;
  auto mag = weight.to(at::kDouble).abs();
  // Kept weights outrank every dropped one: add more than the largest magnitude.
  auto score = (mag + keep.to(at::kDouble) * (mag.max().item<double>() + 1.0)).view({out, groups, 4});
  auto table = sparsity::pattern_table(at::TensorOptions().dtype(at::kDouble));  // [6, 4]
  return at::matmul(score, table.t()).argmax(-1).to(at::kByte);                 // [out, G]
}

}  // namespace

NpzLayout parse_npz_layout(const std::string& name, const std::string& key) {
  if (name == "patch-npz") return NpzLayout::kPatch;
  if (name == "maskllm-npz") return NpzLayout::kMaskLLM;
  throw core::ConfigError(core::str(key, ": unknown format '", name, "' (expected patch-npz or maskllm-npz)"));
}

const char* npz_layout_name(NpzLayout layout) { return layout == NpzLayout::kPatch ? "patch-npz" : "maskllm-npz"; }

std::string packbits_big_endian(const at::Tensor& keep) {
  auto flat = keep.reshape({-1}).ne(0).to(at::kByte).cpu();
  const int64_t n = flat.numel(), bytes = (n + 7) / 8;
  auto padded = at::zeros({bytes * 8}, at::kByte);
  padded.slice(0, 0, n).copy_(flat);
  auto weights = at::tensor({128, 64, 32, 16, 8, 4, 2, 1}, at::kInt);
  auto packed = (padded.view({bytes, 8}).to(at::kInt) * weights).sum(1).to(at::kByte).contiguous();
  return std::string(reinterpret_cast<const char*>(packed.data_ptr<uint8_t>()), bytes);
}

at::Tensor unpackbits_big_endian(const std::string& bits, int64_t out, int64_t in) {
  const int64_t n = out * in;
  auto packed = at::from_blob(const_cast<char*>(bits.data()), {static_cast<int64_t>(bits.size())}, at::kByte);
  auto shifts = at::tensor({7, 6, 5, 4, 3, 2, 1, 0}, at::kByte);
  auto unpacked = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and(1).reshape({-1});
  return unpacked.slice(0, 0, n).reshape({out, in}).clone();
}

MaskFile import_npz(const std::string& path, const NpzImportOptions& opts, NpzImportReport* report) {
  io::NpzFile npz(path);
  NpzImportReport rep;
  const bool maskllm = std::any_of(npz.keys().begin(), npz.keys().end(),
                                   [](const std::string& k) { return core::ends_with(k, kMaskSuffix); });
  rep.layout = maskllm ? NpzLayout::kMaskLLM : NpzLayout::kPatch;
  const std::string layout = npz_layout_name(rep.layout);

  nlohmann::json meta = nlohmann::json::object();
  if (npz.contains(kMetaKey)) {
    const std::string text = io::npy_text(npz.array(kMetaKey), path + ": " + kMetaKey);
    meta = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (!meta.is_object()) throw core::Error(core::str(path, ": ", kMetaKey, " is not a JSON object"));
  }
  int64_t tile_rows = opts.tile_rows, tile_cols = opts.tile_cols, meta_rows = 0, meta_cols = 0;
  if (meta_tile(meta, meta_rows, meta_cols, path)) {
    if (!opts.tile_given) {
      tile_rows = meta_rows;
      tile_cols = meta_cols;
    } else if (meta_rows % tile_rows != 0 || meta_cols % tile_cols != 0) {
      throw core::Error(core::str(path, ": mask.tile ", tile_rows, "x", tile_cols, " does not divide the tile ",
                                  meta_rows, "x", meta_cols, " its __meta__ claims"));
    }
  }
  if (tile_cols % 4 != 0)
    throw core::Error(core::str(path, ": tile ", tile_rows, "x", tile_cols, " splits 2:4 groups (cols must be a "
                                "multiple of 4)"));
  if (opts.repair && opts.weights.empty())
    throw core::ConfigError("convert.repair: repairing by magnitude needs the model's weights (--model)");

  // The layer entries, with their shapes.
  std::vector<Entry> entries;
  std::set<std::string> names;
  for (const auto& key : npz.keys()) {
    if (key == kMetaKey || core::ends_with(key, kShapeSuffix)) continue;
    const std::string where = core::str(path, ": ", key);
    Entry e{key, maskllm ? strip(strip(key, kMaskSuffix), kWeightSuffix) : strip(key, kWeightSuffix)};
    if (maskllm && !core::ends_with(key, kMaskSuffix))
      throw core::Error(core::str(where, ": unexpected entry in a MaskLLM file (every mask is <layer>.mask)"));
    if (!is_decoder_linear(e.name) || (!opts.weights.empty() && !opts.weights.count(e.name)))
      throw core::Error(core::str(where, ": unknown layer '", e.name, "' (expected a decoder linear",
                                  opts.weights.empty() ? ", e.g. model.layers.0.mlp.down_proj.weight" : " of the model",
                                  ")"));
    if (!names.insert(e.name).second) throw core::Error(core::str(where, ": layer '", e.name, "' appears twice"));
    if (!maskllm) {
      if (!npz.contains(key + kShapeSuffix))
        throw core::Error(core::str(where, ": no ", key, kShapeSuffix, " entry (PATCH masks carry their shape)"));
      const auto shape = io::npy_integers(npz.array(key + kShapeSuffix), where + kShapeSuffix);
      if (shape.size() != 2 || shape[0] <= 0 || shape[1] <= 0 || shape[0] > (int64_t{1} << 31) ||
          shape[1] > (int64_t{1} << 31))
        throw core::Error(core::str(where, kShapeSuffix, ": expected [out, in] with positive sizes"));
      e.out = shape[0];
      e.in = shape[1];
    }
    if (!opts.weights.empty()) {
      const auto& w = opts.weights.at(e.name);
      if (maskllm) {
        e.out = w.size(0);
        e.in = w.size(1);
      } else if (e.out != w.size(0) || e.in != w.size(1)) {
        throw core::Error(core::str(where, kShapeSuffix, ": shape [", e.out, ", ", e.in, "] but the model's '",
                                    e.name, "' is [", w.size(0), ", ", w.size(1), "]"));
      }
    } else if (maskllm) {
      throw core::ConfigError(core::str(path, ": a MaskLLM file holds no shapes: give the model (--model)"));
    }
    entries.push_back(e);
  }
  for (const auto& key : npz.keys())
    if (core::ends_with(key, kShapeSuffix) && !names.count(strip(strip(key, kShapeSuffix), kWeightSuffix)))
      throw core::Error(core::str(path, ": ", key, ": a shape without its mask"));
  if (entries.empty()) throw core::Error(core::str(path, ": no masks in the file"));
  // Module order (block, then q k v o gate up down), as our files list layers.
  std::stable_sort(entries.begin(), entries.end(),
                   [](const Entry& a, const Entry& b) { return module_order(a.name) < module_order(b.name); });
  for (const auto& kv : opts.weights)
    if (!names.count(kv.first)) rep.absent.push_back(kv.first);

  const auto lookup = pattern_lookup();
  MaskFile file;
  for (const Entry& e : entries) {
    const std::string where = core::str(path, ": ", e.key);
    const io::NpyArray bits = npz.array(e.key);
    at::Tensor keep;
    if (bits.descr == "|u1" || bits.descr == "<u1") {
      const int64_t want = (e.out * e.in + 7) / 8;
      if (bits.shape.size() != 1 || bits.numel() != want)
        throw core::Error(core::str(where, ": holds ", bits.numel(), " packed bytes, its shape [", e.out, ", ", e.in,
                                    "] needs ", want, " (np.packbits of the flattened mask)"));
      keep = unpackbits_big_endian(bits.data, e.out, e.in);
    } else if (bits.descr == "|b1") {
      if (bits.numel() != e.out * e.in)
        throw core::Error(core::str(where, ": a boolean mask of ", bits.numel(), " elements, its shape needs ",
                                    e.out * e.in));
      keep = at::from_blob(const_cast<char*>(bits.data.data()), {e.out, e.in}, at::kByte).ne(0).to(at::kByte);
    } else {
      throw core::Error(core::str(where, ": dtype '", bits.descr,
                                  "' is not a mask (expected np.packbits output, uint8, or a boolean array)"));
    }
    if (e.in % 4 != 0) throw core::Error(core::str(where, ": ", e.in, " inputs do not form 2:4 groups of four"));
    sparsity::TileGrid grid(e.out, e.in, tile_rows, tile_cols);
    // Each group's keep bits (position j -> bit j) and what they make.
    auto g4 = keep.view({e.out, e.in / 4, 4}).to(at::kLong);
    auto code = g4.select(2, 0) + g4.select(2, 1) * 2 + g4.select(2, 2) * 4 + g4.select(2, 3) * 8;  // [out, G]
    auto pattern = lookup.index({code});                                                          // -1: not 2:4
    auto full = by_tile(code.eq(15), grid, true).all(3).all(1);                                   // [R, C]
    auto two = by_tile(pattern.ge(0), grid, true).all(3).all(1);
    auto tile_dense = full.to(at::kByte);
    auto neither = full.logical_not().logical_and(two.logical_not());
    const int64_t bad = neither.sum().item<int64_t>();
    if (bad > 0 && !opts.repair) {
      const auto first = neither.nonzero()[0];
      const int64_t r = first[0].item<int64_t>(), c = first[1].item<int64_t>();
      const int64_t kept = keep.slice(0, r * tile_rows, std::min(e.out, (r + 1) * tile_rows))
                               .slice(1, c * tile_cols, std::min(e.in, (c + 1) * tile_cols))
                               .sum()
                               .item<int64_t>();
      throw core::Error(core::str(where, ": ", bad, " of ", grid.num_tiles(), " tiles (", tile_rows, "x", tile_cols,
                                  ") are neither dense nor 2:4, the first at tile (", r, ", ", c, ") keeping ", kept,
                                  " of ", grid.tile_count(r, c), " weights (--set convert.repair=true repairs them by "
                                  "magnitude; check mask.tile)"));
    }
    if (bad > 0) {  // repair: dense or 2:4, whichever changes fewer bits of the tile
      const auto& w = opts.weights.at(e.name);
      auto repaired = repair_patterns(keep, w);  // [out, G]
      auto expanded = sparsity::expand_patterns(repaired, at::kByte);
      // Bits a tile would change to become dense (its zeros) or 2:4 (the repaired pattern).
      auto tile_sum = [&](const at::Tensor& per_weight) {
        auto groups = per_weight.view({e.out, e.in / 4, 4}).sum(2);
        return by_tile(groups.to(at::kLong), grid, false).sum(3).sum(1);
      };
      auto to_dense = tile_sum(keep.eq(0));
      auto to_sparse = tile_sum(keep.ne(expanded));
      auto make_dense = neither.logical_and(to_dense.le(to_sparse));
      tile_dense = tile_dense.logical_or(make_dense).to(at::kByte);
      auto make_sparse = neither.logical_and(make_dense.logical_not());
      auto sparse_groups = grid.expand(make_sparse.to(at::kFloat)).view({e.out, e.in / 4, 4}).select(2, 0).ne(0);
      pattern = at::where(sparse_groups, repaired.to(at::kLong), pattern);
      rep.repaired_tiles += bad;
      rep.changed_weights += at::where(make_dense, to_dense, to_sparse).masked_select(neither).sum().item<int64_t>();
    }
    // Dense tiles keep pattern 0: a consumer of the tile map never reads it.
    auto final_pattern = pattern.clamp_min(0).to(at::kByte).contiguous();
    final_pattern.masked_fill_(grid.expand(tile_dense.to(at::kFloat)).view({e.out, e.in / 4, 4}).select(2, 0).ne(0), 0);
    rep.dense_tiles += tile_dense.sum().item<int64_t>();
    rep.sparse_tiles += grid.num_tiles() - tile_dense.sum().item<int64_t>();
    file.layers.push_back({e.name, grid, sparsity::block_index(e.name), tile_dense.contiguous(), final_pattern});
  }

  file.meta.structure = "hybrid";
  file.meta.mode = maskllm || rep.dense_tiles == 0 ? "maskllm" : "joint";
  file.meta.tile_rows = tile_rows;
  file.meta.tile_cols = tile_cols;
  if (meta.contains("sparsity") && meta["sparsity"].is_number()) file.meta.target_sparsity = meta["sparsity"].get<double>();
  else if (maskllm) file.meta.target_sparsity = 0.5;
  file.meta.model_source = !opts.model_source.empty() ? opts.model_source
                           : meta.contains("base_model") && meta["base_model"].is_string()
                               ? meta["base_model"].get<std::string>()
                               : "";
  file.meta.model_config_hash = opts.model_config_hash;
  nlohmann::ordered_json provenance{{"imported_from", path}, {"format", layout}, {"meta", meta}};
  file.meta.training_config = provenance.dump();
  file.meta.achieved_sparsity = file.sparsity();
  if (report) *report = rep;
  return file;
}

void export_npz(const MaskFile& file, const std::string& path, NpzLayout layout) {
  std::vector<std::pair<std::string, io::NpyArray>> arrays;
  auto add = [&](const std::string& name, const at::Tensor& keep) {
    const int64_t out = keep.size(0), in = keep.size(1);
    if (layout == NpzLayout::kMaskLLM) {
      arrays.emplace_back(name + kMaskSuffix, io::npy_uint8({(out * in + 7) / 8}, packbits_big_endian(keep)));
    } else {
      arrays.emplace_back(name + kWeightSuffix, io::npy_uint8({(out * in + 7) / 8}, packbits_big_endian(keep)));
      arrays.emplace_back(name + kWeightSuffix + kShapeSuffix, io::npy_int64({out, in}));
    }
  };
  for (const auto& l : file.layers) add(l.name, l.mask(at::kByte));
  for (const auto& b : file.bitmasks) add(b.name, b.mask(at::kByte));
  if (layout == NpzLayout::kPatch) {
    nlohmann::ordered_json meta{{"base_model", file.meta.model_source},
                                {"sparsity", file.sparsity()},
                                {"pattern", file.meta.structure == "hybrid" ? "2:4" : "unstructured"},
                                {"tile_size", {file.meta.tile_rows, file.meta.tile_cols}},
                                {"mode", file.meta.mode},
                                {"created_by", std::string("patch-train ") + PATCH_VERSION_STRING}};
    if (!std::isnan(file.meta.target_sparsity)) meta["target_sparsity"] = file.meta.target_sparsity;
    arrays.emplace_back(kMetaKey, io::npy_unicode(meta.dump()));
  }
  io::write_npz(path, arrays);
}

}  // namespace patch::maskfile
