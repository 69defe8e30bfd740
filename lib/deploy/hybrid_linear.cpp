#include "deploy/hybrid_linear.h"

#include <cstring>
#include <limits>
#include <map>
#include <vector>

#include "core/error.h"

namespace patch::deploy {
namespace {

using sparsity::TileGrid;

constexpr int64_t kSlab = 16, kBlockK = 32;  // rows and columns of one decode block
constexpr int64_t kDenseBlockBytes = 1024, kSparseBlockBytes = 576;

at::Tensor bytes_of(const at::Tensor& t) {
  return t.contiguous().view(at::kByte);
}

#if PATCH_WITH_CUDA
cutlass_sm90::HybridKernel split_kernel(bool mixed) {
  return mixed ? cutlass_sm90::HybridKernel::kMixed : cutlass_sm90::HybridKernel::kSplit;
}
#endif

}  // namespace

int64_t split_loses_from(bool mixed, double sparse_fraction) {
  constexpr int64_t kExpansionFromTokens = 1024;
  constexpr double kMinSparseFraction = 0.7;
  if (mixed || sparse_fraction >= kMinSparseFraction) return std::numeric_limits<int64_t>::max();
  return kExpansionFromTokens;
}

const char* path_name(HybridPath p) {
  switch (p) {
    case HybridPath::kDecode:
      return "decode";
    case HybridPath::kSparse:
      return "sparse";
    case HybridPath::kSplit:
      return "split";
    case HybridPath::kExpand:
      return "expand";
    case HybridPath::kDense:
      return "dense";
  }
  return "?";
}

bool decode_supported(const TileGrid& g) {
  return g.out() % kSlab == 0 && g.in() % kBlockK == 0 && g.tile_rows() % kSlab == 0 &&
         g.tile_cols() % kBlockK == 0 && g.cols() <= kMaxTileColumns;
}

bool sparse_supported(const TileGrid& g) {
  return g.out() % 64 == 0 && g.in() % 32 == 0;
}

#if !PATCH_WITH_CUDA
bool split_supported(const TileGrid&, at::Device) {
  return false;
}
#endif

DecodeFormat build_decode_format(const PackedLayer& layer) {
  const TileGrid& g = layer.grid;
  core::check(decode_supported(g), layer.name,
              "decode format needs out % 16, in % 32, tile rows % 16 and tile cols % 32 == 0");
  const int64_t S = g.out() / kSlab, KB = g.in() / kBlockK;
  const auto nib = group_nibbles(layer).to(at::kInt);  // [out, groups]

  // Each layout is one strided copy straight from the packed layer: of each
  // dense tile, of every group's kept values, and of every group's nibble into
  // metadata words. With gathers by index instead (fragment permutations, kept
  // values from the unpacked weight by their positions) an 11008x4096 layer
  // took 0.87-1.03 s here; with the dense layout of the whole unpacked weight
  // and int64 metadata arithmetic, 0.40 (2 CPU cores).
  // The mma A fragment of lane (g, t) holds register a_{2j+e} at row g + 8 j0
  // and column 2t + 8 j1 + e (j = 2 j1 + j0) of a 16-column half (PTX ISA,
  // m16n8k16 .bf16).
  // Dense: per 16x32 block, element h*256 + lane*8 + j*2 + e is row j0*8 + g,
  // column h*16 + j1*8 + t*2 + e: dims (h, g, t, j1, j0, e) of the weight's
  // (slab: j0, g; block column: h, j1, t, e).
  int64_t at_dense = 0;  // dense tiles are stored in row-major tile order
  auto dense_blocks = [&](int64_t s0, int64_t s1, int64_t k0, int64_t k1) {
    const int64_t n = (s1 - s0) * kSlab * (k1 - k0) * kBlockK;
    const auto tile = layer.dense.slice(0, at_dense, at_dense + n);
    at_dense += n;
    return tile.view({s1 - s0, 2, 8, k1 - k0, 2, 2, 4, 2})
        .permute({0, 3, 4, 2, 6, 5, 1, 7})
        .reshape({s1 - s0, k1 - k0, 512});  // bf16
  };
  // 2:4: the compressed 16x16 values (per row, each group's two kept values)
  // in the same A layout, mma.sp.m16n8k32 taking them as m16n8k16 does: row
  // j0*8 + g, compressed column j1*8 + t*2 + e.
  const auto sparse_frag = kept_values(layer)
                               .view({S, 2, 8, KB, 2, 4, 2})
                               .permute({0, 3, 2, 5, 4, 1, 6})
                               .reshape({S, KB, 256});  // bf16
  // Metadata word of lane (g, tig < 2): nibbles of groups 4*tig .. 4*tig+3 of
  // row g in bits 0-15 and of row g+8 in bits 16-31, four bits per group; its
  // four little-endian bytes are taken from the two 16-bit halves.
  const auto nb = nib.view({S, kSlab, KB, 8}).permute({0, 2, 1, 3});  // [S, KB, 16, 8]
  const auto shifts = at::tensor({0, 4, 8, 12}, at::kInt);
  const auto lo = nb.slice(2, 0, 8)
                      .reshape({S, KB, 8, 2, 4})
                      .bitwise_left_shift(shifts)
                      .sum(-1, false, at::kInt);
  const auto hi = nb.slice(2, 8, 16)
                      .reshape({S, KB, 8, 2, 4})
                      .bitwise_left_shift(shifts)
                      .sum(-1, false, at::kInt);
  const auto words = at::stack({lo.bitwise_and(255), lo.bitwise_right_shift(8), hi.bitwise_and(255),
                                hi.bitwise_right_shift(8)},
                               -1)
                         .to(at::kByte)
                         .reshape({S, KB, 64});

  DecodeFormat f;
  f.tile_dense = layer.tile_dense.reshape(-1).contiguous();
  f.tile_offset = at::empty({g.num_tiles()}, at::kLong);
  auto* off = f.tile_offset.data_ptr<int64_t>();
  const auto* dense_flag = f.tile_dense.data_ptr<uint8_t>();
  std::vector<at::Tensor> parts;
  int64_t at_byte = 0;
  for (int64_t r = 0; r < g.rows(); ++r)
    for (int64_t c = 0; c < g.cols(); ++c) {
      const int64_t s0 = r * g.tile_rows() / kSlab, s1 = s0 + g.tile_height(r) / kSlab;
      const int64_t k0 = c * g.tile_cols() / kBlockK, k1 = k0 + g.tile_width(c) / kBlockK;
      at::Tensor part;
      if (dense_flag[r * g.cols() + c]) {
        part = bytes_of(dense_blocks(s0, s1, k0, k1));
      } else {
        part = at::cat({bytes_of(sparse_frag.slice(0, s0, s1).slice(1, k0, k1)),
                        words.slice(0, s0, s1).slice(1, k0, k1)},
                       2);
      }
      off[r * g.cols() + c] = at_byte;
      at_byte += part.numel();
      parts.push_back(part.reshape(-1));
    }
  f.blocks = at::cat(parts);
  return f;
}

at::Tensor decode_format_weight(const DecodeFormat& fmt, const TileGrid& g) {
  auto w = at::zeros({g.out(), g.in()}, at::kBFloat16);
  auto* out = w.data_ptr<at::BFloat16>();
  const auto* bytes = fmt.blocks.data_ptr<uint8_t>();
  const auto* off = fmt.tile_offset.data_ptr<int64_t>();
  const auto* dense = fmt.tile_dense.data_ptr<uint8_t>();
  auto value = [&](const uint8_t* p) {
    at::BFloat16 v;
    std::memcpy(&v, p, 2);
    return v;
  };
  for (int64_t r = 0; r < g.rows(); ++r)
    for (int64_t c = 0; c < g.cols(); ++c) {
      const int64_t tile = r * g.cols() + c, nk = g.tile_width(c) / kBlockK;
      for (int64_t sl = 0; sl < g.tile_height(r) / kSlab; ++sl)
        for (int64_t kb = 0; kb < nk; ++kb) {
          const int64_t R = r * g.tile_rows() + sl * kSlab, K = c * g.tile_cols() + kb * kBlockK;
          const uint8_t* blk =
              bytes + off[tile] +
              (sl * nk + kb) * (dense[tile] ? kDenseBlockBytes : kSparseBlockBytes);
          for (int lane = 0; lane < 32; ++lane) {
            const int gid = lane >> 2, t = lane & 3;
            for (int i = 0; i < 8; ++i) {  // fragment element a_i
              const int row = (i & 2) ? gid + 8 : gid;
              const int col = 2 * t + (i & 1) + ((i & 4) ? 8 : 0);
              if (dense[tile]) {
                for (int h = 0; h < 2; ++h)
                  out[(R + row) * g.in() + K + 16 * h + col] =
                      value(blk + h * 512 + lane * 16 + i * 2);
              } else {
                // Compressed column col is element col % 2 of group col / 2;
                // its position is in the metadata word of lane (row % 8, group / 4).
                const int group = col / 2, v = col % 2;
                uint32_t word;
                std::memcpy(&word, blk + 512 + ((row % 8) * 2 + group / 4) * 4, 4);
                const int shift = (row >= 8 ? 16 : 0) + 4 * (group % 4) + 2 * v;
                const int pos = (word >> shift) & 3;
                out[(R + row) * g.in() + K + 4 * group + pos] = value(blk + lane * 16 + i * 2);
              }
            }
          }
        }
    }
  return w;
}

struct HybridLinear::Impl {
  std::string name;
  TileGrid grid;
  at::Device device = at::kCPU;
  bool decode = false;  // decode blocks on the device: the decode and expand paths
  at::Tensor weight;    // W ⊙ M, where the decode blocks are not, or beside them (prefill_dense_copy)
  DecodeFormat dec;
  bool overlap = true;  // the decode kernel's launch (set_overlap)
  bool overlap_expansion = false;
#if PATCH_WITH_CUDA
  std::unique_ptr<cuda::SparseGemm> sparse;  // a layer of 2:4 tiles only, more than kDecodeMaxTokens
  std::unique_ptr<cuda::SplitGemm> split;    // prefill_split, more than kDecodeMaxTokens
  int64_t split_until = 0;                   // and fewer than these tokens (split_loses_from)
  std::shared_ptr<cuda::ExpandPipeline> pipeline;

  ~Impl() {
    if (pipeline) pipeline->remove(this);
  }
#endif
};

HybridLinear::HybridLinear(const PackedLayer& layer, at::Device device, const HybridOptions& options)
    : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  m.name = layer.name;
  m.grid = layer.grid;
  m.device = device;
  core::check(!(options.prefill_split && options.prefill_dense_copy), layer.name,
              "prefill_split and prefill_dense_copy exclude each other");
#if PATCH_WITH_CUDA
  if (device.is_cuda() && decode_supported(layer.grid)) {
    m.decode = true;
    auto f = build_decode_format(layer);
    m.dec = {f.blocks.to(device), f.tile_offset.to(device), f.tile_dense.to(device)};
    if (layer.dense_tiles() == 0 && sparse_supported(layer.grid)) {
      m.sparse = std::make_unique<cuda::SparseGemm>(unpack_layer(layer).to(device));
    } else if (options.prefill_split && layer.grid.tile_rows() == 128 && layer.grid.tile_cols() == 128) {
      core::check(split_supported(layer.grid, device), layer.name,
                  "prefill_split needs an sm_90 GPU, a build with the CUTLASS kernels and out and in multiples of "
                  "128");
      m.split = std::make_unique<cuda::SplitGemm>(unpack_layer(layer), f.tile_dense, device,
                                                  split_kernel(options.prefill_mixed));
      m.split_until = split_loses_from(options.prefill_mixed, layer.sparse_tile_fraction());
    }
  }
#endif
  if (!m.decode || options.prefill_dense_copy) m.weight = unpack_layer(layer).to(device);
  m.overlap_expansion = options.overlap_expansion;
}

HybridLinear::HybridLinear(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HybridLinear HybridLinear::clone() const {
  const auto& m = *impl_;
  auto c = std::make_unique<Impl>();
  auto copy = [](const at::Tensor& t) { return t.defined() ? t.clone() : t; };
  c->name = m.name;
  c->grid = m.grid;
  c->device = m.device;
  c->decode = m.decode;
  c->overlap = m.overlap;
  c->overlap_expansion = m.overlap_expansion;  // a pipeline of its own once installed
  c->weight = copy(m.weight);
  c->dec = {copy(m.dec.blocks), copy(m.dec.tile_offset), copy(m.dec.tile_dense)};
#if PATCH_WITH_CUDA
  if (m.sparse) c->sparse = std::make_unique<cuda::SparseGemm>(*m.sparse);
  if (m.split) {
    // The pool again, from the decode blocks' W ⊙ M.
    auto w = at::empty({m.grid.out(), m.grid.in()}, at::TensorOptions(m.device).dtype(at::kBFloat16));
    cuda::expand_weight(m.dec, m.grid, w);
    c->split = std::make_unique<cuda::SplitGemm>(w.cpu(), m.dec.tile_dense.cpu(), m.device, m.split->kernel());
    c->split_until = m.split_until;
  }
#endif
  return HybridLinear(std::move(c));
}

HybridLinear::HybridLinear(HybridLinear&&) noexcept = default;
HybridLinear& HybridLinear::operator=(HybridLinear&&) noexcept = default;
HybridLinear::~HybridLinear() = default;

const std::string& HybridLinear::name() const {
  return impl_->name;
}
int64_t HybridLinear::out() const {
  return impl_->grid.out();
}
at::Device HybridLinear::device() const {
  return impl_->device;
}
int64_t HybridLinear::in() const {
  return impl_->grid.in();
}

int64_t HybridLinear::device_bytes() const {
  const auto& m = *impl_;
  int64_t n = 0;
  for (const auto* t : {&m.weight, &m.dec.blocks, &m.dec.tile_offset, &m.dec.tile_dense})
    if (t->defined()) n += t->numel() * static_cast<int64_t>(t->element_size());
#if PATCH_WITH_CUDA
  if (m.sparse) n += m.sparse->bytes();
  if (m.split) n += m.split->bytes();
#endif
  return n;
}

void HybridLinear::set_overlap(bool on) {
  impl_->overlap = on;
}

bool HybridLinear::overlaps_expansion() const {
  return impl_->overlap_expansion && path(kDecodeMaxTokens + 1) == HybridPath::kExpand;
}

int64_t HybridLinear::prefetched() const {
#if PATCH_WITH_CUDA
  if (impl_->pipeline) return impl_->pipeline->prefetched(impl_.get());
#endif
  return 0;
}

#if PATCH_WITH_CUDA
void HybridLinear::join(const std::shared_ptr<cuda::ExpandPipeline>& pipeline) {
  auto& m = *impl_;
  if (m.pipeline) m.pipeline->remove(&m);
  m.pipeline = pipeline;
  if (pipeline) pipeline->add(&m, &m.dec, &m.grid);
}
#endif

HybridPath HybridLinear::path(int64_t tokens) const {
  const auto& m = *impl_;
  if (!m.decode) return HybridPath::kDense;
  if (tokens <= (m.weight.defined() ? kDecodeMaxTokensBesideCopy : kDecodeMaxTokens)) return HybridPath::kDecode;
#if PATCH_WITH_CUDA
  if (m.sparse && (!m.weight.defined() || tokens >= kSparseMinTokensBesideCopy)) return HybridPath::kSparse;
  if (m.split && tokens < m.split_until) return HybridPath::kSplit;
#endif
  return m.weight.defined() ? HybridPath::kDense : HybridPath::kExpand;
}

at::Tensor HybridLinear::forward(const at::Tensor& x) {
  auto& m = *impl_;
  if (x.size(-1) != m.grid.in() ||
      x.device() != m.device)  // the message only on failure: this runs per token
    throw core::Error(core::str(m.name, ": input ", x.sizes(), " on ", x.device(),
                                ", expected [..., ", m.grid.in(), "] on ", m.device));
  auto shape = x.sizes().vec();
  shape.back() = m.grid.out();
  const auto x2 = x.reshape({-1, m.grid.in()});
  const int64_t tokens = x2.size(0);
  const HybridPath p = path(tokens);
  if (p == HybridPath::kDense) return at::linear(x, m.weight.to(x.scalar_type()));
#if PATCH_WITH_CUDA
  core::check(x.scalar_type() == at::kBFloat16, m.name, "the hybrid kernels take bfloat16 inputs");
  if (p == HybridPath::kExpand) {
    if (m.pipeline) {
      // Expanded ahead while the layer before ran (or now), in shared scratch.
      const auto w = m.pipeline->acquire(&m);
      if (w.defined()) {
        struct Release {  // once the GEMM is enqueued, or if it throws
          cuda::ExpandPipeline& p;
          ~Release() { p.release(); }
        } release{*m.pipeline};
        return at::linear(x, w);
      }
    }
    // Scratch from the caching allocator: one layer's dense weight at a time;
    // cuBLAS takes x as it is.
    auto w = at::empty({m.grid.out(), m.grid.in()}, x.options());
    cuda::expand_weight(m.dec, m.grid, w);
    return at::linear(x, w);
  }
  const auto xc = x2.contiguous();  // the decode kernel and cuSPARSELt read rows densely
  if (p == HybridPath::kDecode) {
    auto y = at::empty({tokens, m.grid.out()}, x.options());
    cuda::decode_matmul(xc, m.dec, m.grid, y, /*warps=*/0, m.overlap);
    return y.view(shape);
  }
  auto y = at::empty({tokens, m.grid.out()}, x.options());
  if (p == HybridPath::kSplit)
    m.split->multiply(xc, y);
  else
    m.sparse->multiply(xc, y);
  return y.view(shape);
#else
  return at::linear(x, m.weight);
#endif
}

void install_kernels(model::Decoder& decoder, const NamedKernels& kernels, const std::string& source) {
  for (const auto& named : kernels) {
    const std::string& name = named.first;
    std::shared_ptr<HybridLinear> kernel = named.second;
    auto* lin = decoder.linear(name);
    if (!lin) throw core::Error(core::str(source, ": layer ", name, " is not a linear of the model"));
    if (lin->weight().size(0) != kernel->out() || lin->weight().size(1) != kernel->in())
      throw core::Error(core::str(source, ": layer ", name, " is [", kernel->out(), ", ", kernel->in(),
                                  "], the model's is [", lin->weight().size(0), ", ", lin->weight().size(1), "]"));
    lin->set_kernel([kernel](const at::Tensor& x) { return kernel->forward(x); });
  }
#if PATCH_WITH_CUDA
  std::map<c10::DeviceIndex, std::shared_ptr<cuda::ExpandPipeline>> pipelines;
  for (const auto& named : kernels) {
    auto& k = *named.second;
    if (!k.overlaps_expansion()) continue;
    auto& pipeline = pipelines[k.device().index()];
    if (!pipeline) pipeline = std::make_shared<cuda::ExpandPipeline>(k.device());
    k.join(pipeline);
  }
#endif
}

void install_packed(model::Decoder& decoder, const PackedModel& packed, const HybridOptions& options) {
  NamedKernels kernels;
  for (const auto& layer : packed.layers)
    kernels.emplace_back(layer.name, std::make_shared<HybridLinear>(layer, decoder.options().device, options));
  install_kernels(decoder, kernels, packed.path.empty() ? std::string("packed model") : packed.path);
}

void remove_kernels(model::Decoder& decoder) {
  for (auto* lin : decoder.linears()) lin->set_kernel({});
}

}  // namespace patch::deploy
