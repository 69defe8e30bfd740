// HybridGemmWeight (cutlass_hybrid_gemm.h) and its split kernel: CUTLASS's SM90
// sparse main loop (wgmma.sp, TMA, warp-specialized, non-persistent) with a
// producer that walks each row block's step list instead of the k tiles of
// one matrix. The consumer is CUTLASS's own, run for that row block's step
// count. The mixed kernel is in cutlass_hybrid_mixed_gemm_cuda.cu.
#include "deploy/cutlass_hybrid_gemm.h"

#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "deploy/cutlass_hybrid_stock.cuh"
#include "deploy/cutlass_sparse_gemm_impl.cuh"
#include "deploy/hybrid_split_plan.h"

namespace patch::deploy::cutlass_sm90 {
namespace detail {

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)

// Base: the stock sparse collective for the non-persistent schedule. A is the
// pool of 2:4 tiles (SplitPlan::pool, compressed), one 128-row block per tile;
// B is x. Step j of row block r multiplies pool tile steps[r][j][0] by the
// input block steps[r][j][1] of x.
template <class Base>
struct SplitHybridMainloop : Base {
  using ElementA = typename Base::ElementA;
  using ElementB = typename Base::ElementB;
  using ElementE = typename Base::ElementE;
  using LayoutA = typename Base::LayoutA;
  using LayoutE = typename Base::LayoutE;
  using StrideB = typename Base::StrideB;
  using TileShape = typename Base::TileShape;
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using MainloopPipeline = typename Base::MainloopPipeline;
  using PipelineState = typename Base::PipelineState;
  using TensorStorage = typename Base::TensorStorage;
  static_assert(std::is_same_v<typename Base::DispatchPolicy::Schedule, cutlass::gemm::KernelTmaWarpSpecialized>,
                "mma() takes its row block from blockIdx.x: one output tile per CTA (the non-persistent kernel)");

  struct Arguments {
    const ElementA* ptr_pool = nullptr;  // compressed pool values
    LayoutA layout_pool{};
    const ElementE* ptr_e = nullptr;  // the pool's metadata
    LayoutE layout_e{};
    const ElementB* ptr_B = nullptr;
    StrideB dB{};
    const int32_t* steps = nullptr;   // device [row blocks, max_steps, 2]
    const int32_t* counts = nullptr;  // device [row blocks]
    int max_steps = 0;
  };

  struct Params : Base::Params {
    const int32_t* steps;
    const int32_t* counts;
    int max_steps;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    // The base builds the TMA descriptors: A and E from the pool's own layouts, B from the problem's N, K, L.
    typename Base::Arguments base{args.ptr_pool, args.layout_pool, args.ptr_B, args.dB, args.ptr_e, args.layout_e};
    return Params{Base::to_underlying_arguments(problem_shape, base, workspace), args.steps, args.counts,
                  args.max_steps};
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    constexpr int kAlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
    return M % cute::size<0>(TileShape{}) == 0 && K % cute::size<2>(TileShape{}) == 0 && args.max_steps > 0 &&
           cutlass::detail::check_alignment<kAlignB>(cute::make_shape(N, K, L), args.dB);
  }

  // The kernel reads the row-block count and the step count (as k tiles) from
  // the first tensor: a counting tensor of M x (max_steps tiles).
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = cute::Underscore;
    using cute::_;
    using cute::_1;
    auto [M, N, K, L] = problem_shape_MNKL;
    auto mS = cute::make_identity_tensor(cute::make_shape(M, params.max_steps * cute::size<2>(TileShape{}), L));
    auto mA = params.tma_load_a.get_tma_tensor(params.layout_a.shape());  // (pool rows, 128, 1)
    auto mE = params.tma_load_e.get_tma_tensor(params.layout_e.shape());
    auto mB = params.tma_load_b.get_tma_tensor(cute::make_shape(N, K, L));
    auto gS = cute::local_tile(mS, TileShape{}, cute::make_coord(_, _, _), cute::Step<_1, X, _1>{});
    auto gB = cute::local_tile(mB, TileShape{}, cute::make_coord(_, _, _), cute::Step<X, _1, _1>{});
    auto gA = cute::local_tile(mA, TileShape{}, cute::make_coord(_, _, _), cute::Step<_1, X, _1>{});
    auto gE = cute::local_tile(mE, TileShape{}, cute::make_coord(_, _, _), cute::Step<_1, X, _1>{});
    return cute::make_tuple(gS, gB, gA, gE);
  }

  template <class TensorS, class TensorB, class TensorA, class TensorE, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorS, TensorB, TensorA, TensorE> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator, int, int, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using cute::_;
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    const int row_block = static_cast<int>(m_coord);
    const int count = params.counts[row_block];
    produced_ = count;
    if (!cute::elect_one_sync()) return;

    auto sA = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_A.begin()), typename Base::SmemLayoutA{});
    auto sE = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_E.begin()), typename Base::SmemLayoutE{});
    auto sB = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_B.begin()), typename Base::SmemLayoutB{});
    auto [gS, gB_nkl, gA_pool, gE_pool] = load_inputs;

    // A and E are shared by the CTAs of a cluster along N (same row block), B along M.
    auto cta_layout_mnk = cute::make_layout(ClusterShape{});
    auto cta_coord_mnk = cta_layout_mnk.get_flat_coord(block_rank_in_cluster);
    const uint16_t mcast_mask_a = cute::create_tma_multicast_mask<1>(cta_layout_mnk, cta_coord_mnk);
    const uint16_t mcast_mask_b = cute::create_tma_multicast_mask<0>(cta_layout_mnk, cta_coord_mnk);
    auto block_tma_a = params.tma_load_a.get_slice(cute::get<1>(cta_coord_mnk));
    auto block_tma_e = params.tma_load_e.get_slice(cute::get<1>(cta_coord_mnk));
    auto block_tma_b = params.tma_load_b.get_slice(cute::get<0>(cta_coord_mnk));

    auto gA = gA_pool(_, _, _, 0, l_coord);  // (BLK_M, BLK_K, pool tile)
    auto gE = gE_pool(_, _, _, 0, l_coord);
    auto gB = gB_nkl(_, _, n_coord, _, l_coord);  // (BLK_N, BLK_K, input block)
    auto tAgA = block_tma_a.partition_S(gA);
    auto tAsA = block_tma_a.partition_D(sA);
    auto tEgE = block_tma_e.partition_S(gE);
    auto tEsE = block_tma_e.partition_D(sE);
    auto tBgB = block_tma_b.partition_S(gB);
    auto tBsB = block_tma_b.partition_D(sB);

    const int32_t* step = params.steps + static_cast<int64_t>(row_block) * params.max_steps * 2;
    CUTLASS_PRAGMA_NO_UNROLL
    for (int j = 0; j < count; ++j, step += 2) {
      const int tile = step[0], input_block = step[1];
      pipeline.producer_acquire(smem_pipe_write);
      auto* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      cute::copy(params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, tile), tAsA(_, _, _, stage));
      cute::copy(params.tma_load_e.with(*tma_barrier, mcast_mask_a), tEgE(_, _, _, tile), tEsE(_, _, _, stage));
      cute::copy(params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, input_block),
                 tBsB(_, _, _, stage));
      ++smem_pipe_write;
    }
  }

  // The kernel advanced its copy of the producer state by its own k count
  // (max_steps); the drain must start where this row block's steps ended.
  CUTLASS_DEVICE void load_tail(MainloopPipeline pipeline, PipelineState) {
    PipelineState state = cutlass::make_producer_start_state<MainloopPipeline>();
    state.advance(produced_);
    Base::load_tail(pipeline, state);
  }

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int,
                          int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    consumed_ = params.counts[blockIdx.x];
    Base::mma(pipeline, smem_pipe_read, accum, consumed_, thread_idx, shared_tensors, params);
  }

  // The kernel passes its own k count here too: the stages to release are
  // those of this row block's last steps, or the producer's drain waits on
  // stages never released.
  CUTLASS_DEVICE void mma_tail(MainloopPipeline pipeline, PipelineState smem_pipe_release, int) {
    Base::mma_tail(pipeline, smem_pipe_release, consumed_);
  }

  int produced_ = 0;  // steps loaded (producer threads' copy of the collective)
  int consumed_ = 0;  // steps multiplied (consumer threads' copy)
};

class HybridSplitImpl final : public ImplBase {
  using Element = cutlass::bfloat16_t;
  using StockMainloop = HybridStock<128>::Mainloop;
  using Mainloop = SplitHybridMainloop<StockMainloop>;
  using ProblemShape = cute::Shape<int, int, int, int>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, HybridStock<128>::Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

 public:
  HybridSplitImpl(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense, int64_t out, int64_t in,
                  cudaStream_t stream)
      : out_(out), in_(in) {
    if (out <= 0 || in <= 0 || out % kSplitTile != 0 || in % kSplitTile != 0 || out > INT_MAX || in > INT_MAX)
      fail("out and in must be positive multiples of 128");
    const SplitPlan plan = make_split_plan(tile_dense, out / kSplitTile, in / kSplitTile);
    const std::vector<uint16_t> pool = gather_split_pool(plan, w);
    max_steps_ = static_cast<int>(plan.max_steps);
    std::string e = sm90_device(hw_info_);
    // The step table and the uncompressed pool, uploaded; the pool goes once compressed.
    if (e.empty()) e = upload(plan.steps, steps_, stream);
    if (e.empty()) e = upload(plan.counts, counts_, stream);
    DeviceBuffer dense_pool;
    if (e.empty()) e = upload(pool, dense_pool, stream);
    if (e.empty())
      e = compress_sparse(dense_pool.get(), static_cast<int>(plan.pool.size() * kSplitTile),
                          static_cast<int>(kSplitTile), hw_info_, stream, pool_);
    // dense_pool's cudaFree would wait for the stream anyway; say so here.
    if (e.empty()) e = cuda_text(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (!e.empty()) fail(e);
  }

  void run(const void* x, void* y, int64_t tokens, cudaStream_t stream) override {
    const std::string e = gemm_.run(x, y, tokens, stream, [&](int n) { return arguments(x, y, n); });
    if (!e.empty()) fail(e);
  }

  size_t bytes() const override { return pool_.bytes() + steps_.bytes() + counts_.bytes(); }

 private:
  typename Gemm::Arguments arguments(const void* x, void* y, int tokens) const {
    auto args = gemm_arguments<Gemm>(x, y, static_cast<int>(out_), tokens, static_cast<int>(in_), hw_info_);
    args.mainloop.ptr_pool = static_cast<const Element*>(pool_.values.get());
    args.mainloop.layout_pool = pool_.layout_a;
    args.mainloop.ptr_e = static_cast<const typename StockMainloop::ElementE*>(pool_.metadata.get());
    args.mainloop.layout_e = pool_.layout_e;
    args.mainloop.steps = static_cast<const int32_t*>(steps_.get());
    args.mainloop.counts = static_cast<const int32_t*>(counts_.get());
    args.mainloop.max_steps = max_steps_;
    return args;
  }

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("CUTLASS hybrid GEMM [out " + std::to_string(out_) + ", in " + std::to_string(in_) +
                             "]: " + why);
  }

  int64_t out_, in_;
  int max_steps_ = 0;
  cutlass::KernelHardwareInfo hw_info_{};
  CompressedSparse<StockMainloop> pool_;
  DeviceBuffer steps_, counts_;
  CachedGemm<Gemm> gemm_;
};

#endif  // CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED

std::unique_ptr<ImplBase> make_split_impl(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense,
                                          int64_t out, int64_t in, cudaStream_t stream) {
#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
  if constexpr (kKernelsBuilt) return std::make_unique<HybridSplitImpl>(w, tile_dense, out, in, stream);
#endif
  (void)w;
  (void)tile_dense;
  (void)stream;
  throw std::runtime_error("CUTLASS hybrid GEMM [out " + std::to_string(out) + ", in " + std::to_string(in) +
                           "]: built without sm_90a CUTLASS kernels");
}

// In cutlass_hybrid_mixed_gemm_cuda.cu.
std::unique_ptr<ImplBase> make_mixed_impl(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense,
                                          int64_t out, int64_t in, HybridKernel kernel, cudaStream_t stream);

}  // namespace detail

struct HybridGemmWeight::Impl {
  std::unique_ptr<detail::ImplBase> gemm;  // neither copied nor moved: it owns device buffers
};

HybridGemmWeight::HybridGemmWeight(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense,
                                   int64_t out, int64_t in, HybridKernel kernel, void* stream)
    : impl_(std::make_unique<Impl>()), kernel_(kernel) {
  const auto s = static_cast<cudaStream_t>(stream);
  impl_->gemm = kernel == HybridKernel::kSplit
                    ? detail::make_split_impl(w, tile_dense, out, in, s)
                    : detail::make_mixed_impl(w, tile_dense, out, in, kernel, s);
}

HybridGemmWeight::~HybridGemmWeight() = default;
HybridGemmWeight::HybridGemmWeight(HybridGemmWeight&&) noexcept = default;
HybridGemmWeight& HybridGemmWeight::operator=(HybridGemmWeight&&) noexcept = default;

void HybridGemmWeight::run(const void* x, void* y, int64_t tokens, void* stream) {
  if (!impl_) throw std::runtime_error("CUTLASS hybrid GEMM: run() on a moved-from HybridGemmWeight");
  impl_->gemm->run(x, y, tokens, static_cast<cudaStream_t>(stream));
}

size_t HybridGemmWeight::bytes() const { return impl_ ? impl_->gemm->bytes() : 0; }

}  // namespace patch::deploy::cutlass_sm90
