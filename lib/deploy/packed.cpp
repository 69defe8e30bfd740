#include "deploy/packed.h"

#include <algorithm>
#include <map>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "patch/version.h"
#include "sparsity/patterns.h"

namespace patch::deploy {
namespace {

using sparsity::kGroupSize;
using sparsity::TileGrid;

// Visits the tiles in row-major tile order with their row and column ranges.
template <typename F>
void for_each_tile(const TileGrid& g, F&& f) {
  for (int64_t r = 0; r < g.rows(); ++r)
    for (int64_t c = 0; c < g.cols(); ++c) {
      const int64_t r0 = r * g.tile_rows(), c0 = c * g.tile_cols();
      f(r, c, r0, r0 + g.tile_height(r), c0, c0 + g.tile_width(c));
    }
}

// [6] nibble (i0 | i1 << 2) of each pattern, and its inverse (-1: not a 2:4 nibble).
const std::array<uint8_t, sparsity::kNumPatterns>& pattern_nibbles() {
  static const auto table = [] {
    std::array<uint8_t, sparsity::kNumPatterns> t{};
    for (int k = 0; k < sparsity::kNumPatterns; ++k)
      t[k] =
          static_cast<uint8_t>(sparsity::kPatternKept[k][0] | (sparsity::kPatternKept[k][1] << 2));
    return t;
  }();
  return table;
}

int64_t sparse_weights(const TileGrid& g, const at::Tensor& tile_dense) {
  auto counts = g.counts();
  return (counts * (tile_dense.to(at::kLong) == 0)).sum().item<int64_t>();
}

std::string str_of(double v) {
  return core::str(v);
}

// Throws core::Error(str(parts...)) when cond is false.
template <typename... Args>
void ensure(bool cond, const Args&... parts) {
  if (!cond) throw core::Error(core::str(parts...));
}

}  // namespace

int64_t PackedLayer::dense_tiles() const {
  return tile_dense.to(at::kLong).sum().item<int64_t>();
}

double PackedLayer::sparse_tile_fraction() const {
  return 1.0 - static_cast<double>(dense_tiles()) / static_cast<double>(grid.num_tiles());
}

int64_t PackedLayer::bytes() const {
  return dense.numel() * 2 + values.numel() * 2 + indices.numel();
}

double PackedLayer::sparsity() const {
  return static_cast<double>(values.numel()) / static_cast<double>(grid.numel());
}

PackedLayer pack_layer(const at::Tensor& weight, const maskfile::LayerMask& mask) {
  const TileGrid& g = mask.grid;
  ensure(weight.dim() == 2 && weight.size(0) == g.out() && weight.size(1) == g.in(), "pack: layer ",
         mask.name, ": weight ", core::str(weight.sizes()), " does not fit its mask ", g.str());
  const auto w = weight.to(at::kCPU, at::kBFloat16).contiguous();
  const int64_t out = g.out(), groups = g.groups();
  // Kept positions of every group, then its two values and its nibble.
  const auto& kept = sparsity::kPatternKept;
  auto table = at::empty({sparsity::kNumPatterns, 2}, at::kLong);
  auto nib = at::empty({sparsity::kNumPatterns}, at::kByte);
  for (int k = 0; k < sparsity::kNumPatterns; ++k) {
    table[k][0] = kept[k][0];
    table[k][1] = kept[k][1];
    nib[k] = pattern_nibbles()[k];
  }
  const auto pat = mask.pattern.to(at::kLong);
  const auto pos = table.index_select(0, pat.reshape(-1)).view({out, groups, 2});
  const auto kept_values = w.view({out, groups, kGroupSize}).gather(2, pos);  // [out, groups, 2]
  const auto nibbles = nib.index_select(0, pat.reshape(-1)).view({out, groups});

  const auto td = mask.tile_dense.to(at::kCPU, at::kByte).contiguous();
  const auto* dense_flag = td.data_ptr<uint8_t>();
  std::vector<at::Tensor> dense, values, nibs;
  for_each_tile(g, [&](int64_t r, int64_t c, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    if (dense_flag[r * g.cols() + c]) {
      dense.push_back(w.slice(0, r0, r1).slice(1, c0, c1).reshape(-1));
    } else {
      values.push_back(
          kept_values.slice(0, r0, r1).slice(1, c0 / kGroupSize, c1 / kGroupSize).reshape(-1));
      nibs.push_back(
          nibbles.slice(0, r0, r1).slice(1, c0 / kGroupSize, c1 / kGroupSize).reshape(-1));
    }
  });
  PackedLayer p;
  p.name = mask.name;
  p.grid = g;
  p.tile_dense = td.clone();
  p.dense = dense.empty() ? at::empty({0}, at::kBFloat16) : at::cat(dense);
  p.values = values.empty() ? at::empty({0}, at::kBFloat16) : at::cat(values);
  auto all = nibs.empty() ? at::empty({0}, at::kByte) : at::cat(nibs);
  if (all.numel() % 2) all = at::cat({all, at::zeros({1}, at::kByte)});
  auto pairs = all.view({-1, 2});
  p.indices = pairs.select(1, 0).bitwise_or(pairs.select(1, 1).bitwise_left_shift(4)).contiguous();
  return p;
}

at::Tensor group_nibbles(const PackedLayer& layer) {
  const TileGrid& g = layer.grid;
  const auto idx = layer.indices.contiguous();
  // Unpack two nibbles per byte back to one per group, in stream order.
  auto stream = at::stack({idx.bitwise_and(0xF), idx.bitwise_right_shift(4)}, 1).reshape(-1);
  auto out = at::zeros({g.out(), g.groups()}, at::kByte);
  const auto* dense_flag = layer.tile_dense.data_ptr<uint8_t>();
  int64_t at_group = 0;
  for_each_tile(g, [&](int64_t r, int64_t c, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    if (dense_flag[r * g.cols() + c]) return;
    const int64_t n = (r1 - r0) * (c1 - c0) / kGroupSize;
    out.slice(0, r0, r1)
        .slice(1, c0 / kGroupSize, c1 / kGroupSize)
        .copy_(stream.slice(0, at_group, at_group + n).view({r1 - r0, (c1 - c0) / kGroupSize}));
    at_group += n;
  });
  return out;
}

at::Tensor kept_values(const PackedLayer& layer) {
  const TileGrid& g = layer.grid;
  auto kept = at::zeros({g.out(), g.groups(), 2}, at::kBFloat16);
  const auto* dense_flag = layer.tile_dense.data_ptr<uint8_t>();
  int64_t at_value = 0;
  for_each_tile(g, [&](int64_t r, int64_t c, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    if (dense_flag[r * g.cols() + c]) return;
    const int64_t n = (r1 - r0) * (c1 - c0) / 2;
    kept.slice(0, r0, r1)
        .slice(1, c0 / kGroupSize, c1 / kGroupSize)
        .copy_(layer.values.slice(0, at_value, at_value + n)
                   .view({r1 - r0, (c1 - c0) / kGroupSize, 2}));
    at_value += n;
  });
  return kept;
}

at::Tensor unpack_layer(const PackedLayer& layer) {
  const TileGrid& g = layer.grid;
  const int64_t out = g.out();
  const auto kept = kept_values(layer);
  const auto* dense_flag = layer.tile_dense.data_ptr<uint8_t>();
  // Position p of a group holds the first kept value where i0 == p, the second
  // where i1 == p (i0 < i1), else zero: four selects, where a scatter by int64
  // indices and a select over the expanded tile map took twice as long
  // (11008x4096 at 0.45: 0.39 against 0.20 s, 2 CPU cores). Dense tiles'
  // groups (nibble 0, kept zero) come out zero and take their weights below.
  const auto nib = group_nibbles(layer);
  const auto i0 = nib.bitwise_and(3), i1 = nib.bitwise_right_shift(2);
  const auto v0 = kept.select(2, 0), v1 = kept.select(2, 1);
  std::vector<at::Tensor> at_pos;
  for (int p = 0; p < kGroupSize; ++p)
    at_pos.push_back(at::where(i0 == p, v0, at::where(i1 == p, v1, at::Scalar(0.0))));
  auto w = at::stack(at_pos, 2).view({out, g.in()});
  int64_t at_dense = 0;
  for_each_tile(g, [&](int64_t r, int64_t c, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    if (!dense_flag[r * g.cols() + c]) return;
    const int64_t n = (r1 - r0) * (c1 - c0);
    w.slice(0, r0, r1).slice(1, c0, c1).copy_(
        layer.dense.slice(0, at_dense, at_dense + n).view({r1 - r0, c1 - c0}));
    at_dense += n;
  });
  return w;
}

const PackedLayer* PackedModel::find(const std::string& name) const {
  for (const auto& l : layers)
    if (l.name == name) return &l;
  return nullptr;
}

double PackedModel::sparsity() const {
  int64_t zeros = 0, total = 0;
  for (const auto& l : layers) {
    zeros += l.values.numel();
    total += l.grid.numel();
  }
  return total ? static_cast<double>(zeros) / static_cast<double>(total) : 0.0;
}

int64_t PackedModel::bytes() const {
  int64_t b = 0;
  for (const auto& l : layers) b += l.bytes();
  return b;
}

PackedModel pack_model(const io::Checkpoint& ckpt, const maskfile::MaskFile& masks) {
  ensure(masks.meta.structure == "hybrid", "pack: ", masks.path, " holds ", masks.meta.structure,
         " masks; only hybrid (tile + 2:4) masks have a packed form");
  PackedModel m;
  m.model_source = ckpt.source;
  m.tile_rows = masks.meta.tile_rows;
  m.tile_cols = masks.meta.tile_cols;
  for (const auto& layer : masks.layers) {
    const std::string tensor = layer.name + ".weight";
    auto it = ckpt.tensors.find(tensor);
    ensure(it != ckpt.tensors.end(), "pack: ", ckpt.source, " has no tensor ", tensor,
           " (layer of ", masks.path, ")");
    const auto& w = it->second;
    maskfile::check_layer_shape(masks, layer, w.size(0), w.size(1));
    m.layers.push_back(pack_layer(w, layer));
  }
  return m;
}

void write_packed(const std::string& path, const PackedModel& model) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& l : model.layers) {
    tensors.emplace_back(l.name + ".shape", at::tensor({l.grid.out(), l.grid.in()}, at::kLong));
    tensors.emplace_back(l.name + ".tile_dense", l.tile_dense);
    tensors.emplace_back(l.name + ".dense", l.dense);
    tensors.emplace_back(l.name + ".values", l.values);
    tensors.emplace_back(l.name + ".indices", l.indices);
  }
  std::map<std::string, std::string> md{
      {"format", kPackedFormat},
      {"format_version", kPackedFormatVersion},
      {"tile", core::str(model.tile_rows, "x", model.tile_cols)},
      {"sparsity", str_of(model.sparsity())},
      {"model_source", model.model_source},
      {"created_by", model.created_by.empty() ? std::string("patch-train ") + PATCH_VERSION_STRING
                                              : model.created_by}};
  io::write_safetensors(path, tensors, md);
}

PackedModel read_packed(const std::string& path) {
  io::SafetensorsFile st(path);
  const auto& md = st.metadata();
  auto meta = [&](const std::string& key) {
    auto it = md.find(key);
    return it == md.end() ? std::string() : it->second;
  };
  ensure(meta("format") == kPackedFormat, path, ": metadata format is '", meta("format"),
         "', expected '", kPackedFormat, "' (write one with patch-train pack)");
  ensure(meta("format_version") == kPackedFormatVersion, path, ": unsupported format_version '",
         meta("format_version"), "' (this build reads ", kPackedFormatVersion, ")");
  PackedModel m;
  m.path = path;
  m.model_source = meta("model_source");
  m.created_by = meta("created_by");
  const std::string tile = meta("tile");
  const auto x = tile.find('x');
  try {
    if (x == std::string::npos) throw std::invalid_argument("no x");
    m.tile_rows = std::stoll(tile.substr(0, x));
    m.tile_cols = std::stoll(tile.substr(x + 1));
  } catch (const std::exception&) {
    throw core::Error(core::str(path, ": metadata tile is '", tile, "', expected ROWSxCOLS"));
  }
  ensure(m.tile_rows > 0 && m.tile_cols > 0 && m.tile_cols % kGroupSize == 0, path,
         ": metadata tile is '", tile, "', expected ROWSxCOLS with COLS a multiple of 4");

  // Layers in file order, each from its five tensors.
  auto entries = st.entries();
  std::stable_sort(entries.begin(), entries.end(),
                   [](const io::SafetensorsEntry& a, const io::SafetensorsEntry& b) {
                     return a.begin < b.begin;
                   });
  const std::string suffix = ".shape";
  for (const auto& e : entries) {
    if (e.name.size() <= suffix.size() ||
        e.name.compare(e.name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    PackedLayer l;
    l.name = e.name.substr(0, e.name.size() - suffix.size());
    auto get = [&](const char* what, at::ScalarType dtype) {
      const std::string n = l.name + what;
      ensure(st.contains(n), path, ": layer ", l.name, " has no tensor ", n);
      auto t = st.tensor(n);
      ensure(t.scalar_type() == dtype, path, ": ", n, " is ", t.scalar_type(), ", expected ",
             dtype);
      return t;
    };
    auto shape = get(".shape", at::kLong);
    ensure(shape.numel() == 2, path, ": ", l.name, ".shape has ", shape.numel(),
           " values, expected 2");
    try {
      l.grid =
          TileGrid(shape[0].item<int64_t>(), shape[1].item<int64_t>(), m.tile_rows, m.tile_cols);
    } catch (const core::Error& err) {
      throw core::Error(core::str(path, ": layer ", l.name, ": ", err.what()));
    }
    l.tile_dense = get(".tile_dense", at::kByte);
    ensure(l.tile_dense.dim() == 2 && l.tile_dense.size(0) == l.grid.rows() &&
               l.tile_dense.size(1) == l.grid.cols(),
           path, ": ", l.name, ".tile_dense is ", core::str(l.tile_dense.sizes()), ", expected [",
           l.grid.rows(), ", ", l.grid.cols(), "] for ", l.grid.str());
    ensure(l.tile_dense.le(1).all().item<bool>(), path, ": ", l.name,
           ".tile_dense holds values other than 0/1");
    l.dense = get(".dense", at::kBFloat16);
    l.values = get(".values", at::kBFloat16);
    l.indices = get(".indices", at::kByte);
    const int64_t sparse = sparse_weights(l.grid, l.tile_dense);
    const int64_t sparse_groups = sparse / kGroupSize;
    ensure(l.dense.numel() == l.grid.numel() - sparse && l.values.numel() == sparse / 2 &&
               l.indices.numel() == (sparse_groups + 1) / 2,
           path, ": ", l.name, ": dense/values/indices hold ", l.dense.numel(), "/",
           l.values.numel(), "/", l.indices.numel(), " entries, expected ", l.grid.numel() - sparse,
           "/", sparse / 2, "/", (sparse_groups + 1) / 2, " for its tile map");
    // Every group's nibble must name two distinct positions in increasing order.
    auto stream =
        at::stack({l.indices.bitwise_and(0xF), l.indices.bitwise_right_shift(4)}, 1).reshape(-1);
    auto ok = at::zeros_like(stream, at::kBool);
    for (uint8_t n : pattern_nibbles()) ok = ok.logical_or(stream.eq(n));
    ensure(ok.slice(0, 0, sparse_groups).all().item<bool>(), path, ": ", l.name,
           ".indices holds a group whose positions are not two distinct increasing 2:4 positions");
    m.layers.push_back(std::move(l));
  }
  ensure(!m.layers.empty(), path, ": no packed layers");
  return m;
}

}  // namespace patch::deploy
