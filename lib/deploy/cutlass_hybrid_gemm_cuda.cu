// HybridSplitWeight (cutlass_hybrid_gemm.h): CUTLASS's SM90 sparse main loop
// (wgmma.sp, TMA, warp-specialized, non-persistent) with a producer that walks
// each row block's step list instead of the k tiles of one matrix. The
// consumer is CUTLASS's own, run for that row block's step count.
#include "deploy/cutlass_hybrid_gemm.h"

#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

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
    Base::mma(pipeline, smem_pipe_read, accum, params.counts[blockIdx.x], thread_idx, shared_tensors, params);
  }

  int produced_ = 0;
};

class HybridSplitImpl {
  using Element = cutlass::bfloat16_t;
  using Accumulator = float;
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::ColumnMajor;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator, void, LayoutD, kAlignment, Element,
      LayoutD, kAlignment, cutlass::epilogue::TmaWarpSpecialized>::CollectiveOp;
  using StockMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutA, kAlignment, Element, LayoutB,
      kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecialized>::CollectiveOp;
  using Mainloop = SplitHybridMainloop<StockMainloop>;
  using ProblemShape = cute::Shape<int, int, int, int>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using SparseConfig = typename StockMainloop::SparseConfig;
  using ElementE = typename StockMainloop::ElementE;
  using LayoutACompressed = typename StockMainloop::LayoutA;
  using LayoutE = typename StockMainloop::LayoutE;
  using StrideA = cutlass::gemm::TagToStrideA_t<LayoutA>;
  using StrideB = typename GemmKernel::StrideB;
  using StrideC = typename GemmKernel::StrideC;
  using StrideD = typename GemmKernel::StrideD;
  using CompressorUtility =
      cutlass::transform::kernel::StructuredSparseCompressorUtility<ProblemShape, Element, LayoutA, SparseConfig>;
  using CompressorKernel = cutlass::transform::kernel::StructuredSparseCompressor<ProblemShape, Element, LayoutA,
                                                                                  SparseConfig, cutlass::arch::Sm90>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<CompressorKernel>;

 public:
  HybridSplitImpl(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense, int64_t out, int64_t in,
                  cudaStream_t stream)
      : out_(out), in_(in) {
    if (out <= 0 || in <= 0 || out % kSplitTile != 0 || in % kSplitTile != 0 || out > INT_MAX || in > INT_MAX)
      fail("out and in must be positive multiples of 128");
    const SplitPlan plan = make_split_plan(tile_dense, out / kSplitTile, in / kSplitTile);
    const std::vector<uint16_t> pool = gather_split_pool(plan, w);
    max_steps_ = static_cast<int>(plan.max_steps);

    check(cudaGetDevice(&hw_info_.device_id), "cudaGetDevice");
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, hw_info_.device_id), "device query");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, hw_info_.device_id), "device query");
    if (major != 9 || minor != 0) fail("needs an sm_90 GPU");
    check(cudaDeviceGetAttribute(&hw_info_.sm_count, cudaDevAttrMultiProcessorCount, hw_info_.device_id),
          "device query");

    // The step table and the uncompressed pool, uploaded; the pool is freed once compressed.
    check(steps_.allocate(plan.steps.size() * sizeof(int32_t)), "cudaMalloc (steps)");
    check(counts_.allocate(plan.counts.size() * sizeof(int32_t)), "cudaMalloc (counts)");
    check(cudaMemcpyAsync(steps_.get(), plan.steps.data(), steps_.bytes(), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (steps)");
    check(cudaMemcpyAsync(counts_.get(), plan.counts.data(), counts_.bytes(), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (counts)");
    DeviceBuffer dense_pool;
    check(dense_pool.allocate(pool.size() * sizeof(uint16_t)), "cudaMalloc (pool)");
    check(cudaMemcpyAsync(dense_pool.get(), pool.data(), dense_pool.bytes(), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (pool)");

    const int pool_rows = static_cast<int>(plan.pool.size() * kSplitTile), k = static_cast<int>(kSplitTile);
    const ProblemShape pool_shape{pool_rows, 1, k, 1};
    layout_a_ = SparseConfig::fill_layoutA(pool_shape);
    layout_e_ = SparseConfig::fill_layoutE(pool_shape);
    const StrideA stride_pool = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(pool_rows, k, 1));
    typename Compressor::Arguments compress_args{pool_shape, {dense_pool.get(), stride_pool, nullptr, nullptr}, {}};
    cutlass::Status status = Compressor::can_implement(compress_args);
    if (status != cutlass::Status::kSuccess) fail_status("compressor can_implement", status);
    CompressorUtility utility(pool_shape, stride_pool);
    const size_t a_bytes = size_t(utility.get_tensorA_m_physical()) * size_t(utility.get_tensorA_k_physical()) *
                           sizeof(Element);
    const size_t e_bytes = size_t(utility.get_metadata_m_physical()) * size_t(utility.get_metadata_k_physical()) *
                           sizeof(ElementE);
    check(a_.allocate(a_bytes), "cudaMalloc (compressed pool)");
    check(e_.allocate(e_bytes), "cudaMalloc (metadata)");
    check(cudaMemsetAsync(a_.get(), 0, a_bytes, stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(e_.get(), 0, e_bytes, stream), "cudaMemsetAsync");
    compress_args.transform.ptr_ACompress = a_.get();
    compress_args.transform.ptr_E = e_.get();
    compress_args.hw_info = hw_info_;
    const size_t compress_ws_bytes = Compressor::get_workspace_size(compress_args);
    void* compress_ws = nullptr;
    if (compress_ws_bytes > 0) check(cudaMallocAsync(&compress_ws, compress_ws_bytes, stream), "cudaMallocAsync");
    Compressor compressor;
    status = compressor.initialize(compress_args, compress_ws, stream);
    if (status == cutlass::Status::kSuccess) status = compressor.run(stream);
    if (compress_ws != nullptr) cudaFreeAsync(compress_ws, stream);
    if (status != cutlass::Status::kSuccess) fail_status("compressor launch", status, cudaGetLastError());
    // dense_pool is freed here, after the stream's work on it (cudaFree waits).
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }

  void run(const void* x, void* y, int64_t tokens, cudaStream_t stream) {
    if (tokens < 0 || tokens > INT_MAX) fail("tokens " + std::to_string(tokens) + " out of range");
    if (tokens == 0) return;
    if (!(initialized_ && x == last_x_ && y == last_y_ && tokens == last_tokens_)) {
      if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(y) % 16 != 0)
        fail("x and y must be 16-byte aligned");
      initialized_ = false;
      typename Gemm::Arguments args = arguments(x, y, static_cast<int>(tokens));
      cutlass::Status status = Gemm::can_implement(args);
      if (status != cutlass::Status::kSuccess) fail_status("can_implement", status, cudaSuccess, tokens);
      if (Gemm::get_workspace_size(args) != 0) fail("the kernel asks for a workspace");
      status = gemm_.initialize(args, nullptr, stream);
      if (status != cutlass::Status::kSuccess) fail_status("initialize", status, cudaGetLastError(), tokens);
      initialized_ = true;
      last_x_ = x;
      last_y_ = y;
      last_tokens_ = tokens;
    }
    const cutlass::Status status = gemm_.run(stream);
    if (status != cutlass::Status::kSuccess) fail_status("launch", status, cudaGetLastError(), tokens);
  }

  size_t bytes() const { return a_.bytes() + e_.bytes() + steps_.bytes() + counts_.bytes(); }

 private:
  typename Gemm::Arguments arguments(const void* x, void* y, int tokens) const {
    const int m = static_cast<int>(out_), k = static_cast<int>(in_);
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = ProblemShape{m, tokens, k, 1};
    args.mainloop.ptr_pool = static_cast<const Element*>(a_.get());
    args.mainloop.layout_pool = layout_a_;
    args.mainloop.ptr_e = static_cast<const ElementE*>(e_.get());
    args.mainloop.layout_e = layout_e_;
    args.mainloop.ptr_B = static_cast<const Element*>(x);
    args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(tokens, k, 1));
    args.mainloop.steps = static_cast<const int32_t*>(steps_.get());
    args.mainloop.counts = static_cast<const int32_t*>(counts_.get());
    args.mainloop.max_steps = max_steps_;
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = cutlass::make_cute_packed_stride(StrideC{}, cute::make_shape(m, tokens, 1));
    args.epilogue.ptr_D = static_cast<Element*>(y);
    args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, tokens, 1));
    args.hw_info = hw_info_;
    return args;
  }

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("CUTLASS hybrid GEMM [out " + std::to_string(out_) + ", in " + std::to_string(in_) +
                             "]: " + why);
  }
  [[noreturn]] void fail_status(const char* step, cutlass::Status status, cudaError_t cuda = cudaSuccess,
                                int64_t tokens = -1) const {
    std::string why = std::string(step) + " failed";
    if (tokens >= 0) why += " for " + std::to_string(tokens) + " tokens";
    why += ": CUTLASS status '" + std::string(cutlass::cutlassGetStatusString(status)) + "'";
    if (cuda != cudaSuccess) why += ", CUDA error '" + std::string(cudaGetErrorString(cuda)) + "'";
    fail(why);
  }
  void check(cudaError_t e, const char* what) const {
    if (e != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(e));
  }

  int64_t out_, in_;
  int max_steps_ = 0;
  cutlass::KernelHardwareInfo hw_info_{};
  DeviceBuffer a_, e_, steps_, counts_;
  LayoutACompressed layout_a_{};
  LayoutE layout_e_{};
  Gemm gemm_;
  bool initialized_ = false;
  const void* last_x_ = nullptr;
  void* last_y_ = nullptr;
  int64_t last_tokens_ = 0;
};

#else

class HybridSplitImpl {
 public:
  HybridSplitImpl(const std::vector<uint16_t>&, const std::vector<uint8_t>&, int64_t out, int64_t in, cudaStream_t) {
    throw std::runtime_error("CUTLASS hybrid GEMM [out " + std::to_string(out) + ", in " + std::to_string(in) +
                             "]: built without sm_90a CUTLASS kernels");
  }
  void run(const void*, void*, int64_t, cudaStream_t) {}
  size_t bytes() const { return 0; }
};

#endif  // CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED

}  // namespace detail

struct HybridSplitWeight::Impl {
  Impl(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense, int64_t out, int64_t in,
       cudaStream_t stream)
      : gemm(w, tile_dense, out, in, stream) {}
  detail::HybridSplitImpl gemm;  // neither copied nor moved: it owns device buffers
};

HybridSplitWeight::HybridSplitWeight(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense,
                                     int64_t out, int64_t in, void* stream)
    : impl_(std::make_unique<Impl>(w, tile_dense, out, in, static_cast<cudaStream_t>(stream))) {}

HybridSplitWeight::~HybridSplitWeight() = default;
HybridSplitWeight::HybridSplitWeight(HybridSplitWeight&&) noexcept = default;
HybridSplitWeight& HybridSplitWeight::operator=(HybridSplitWeight&&) noexcept = default;

void HybridSplitWeight::run(const void* x, void* y, int64_t tokens, void* stream) {
  if (!impl_) throw std::runtime_error("CUTLASS hybrid GEMM: run() on a moved-from HybridSplitWeight");
  impl_->gemm.run(x, y, tokens, static_cast<cudaStream_t>(stream));
}

size_t HybridSplitWeight::bytes() const { return impl_ ? impl_->gemm.bytes() : 0; }

}  // namespace patch::deploy::cutlass_sm90
