// The mixed kernel of HybridGemmWeight (cutlass_hybrid_gemm.h): CUTLASS's SM90
// sparse main loop (TMA, warp-specialized, non-persistent) whose producer and
// consumer walk each row block's MixedPlan: a 2:4 tile is one wgmma.sp step,
// a dense tile two dense wgmma steps of 64 inputs, all into one accumulator,
// y written once by the stock epilogue.
#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "deploy/cutlass_hybrid_gemm.h"
#include "deploy/cutlass_hybrid_stock.cuh"
#include "deploy/cutlass_sparse_gemm_impl.cuh"
#include "deploy/hybrid_split_plan.h"

namespace patch::deploy::cutlass_sm90::detail {

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)

// Base: the stock sparse collective for the non-persistent schedule and one
// consumer warpgroup. A is the pool of whole 2:4 tiles (compressed), AD the
// pool of dense tiles (bf16, [tiles * 128, 128] row-major), B is x.
//
// A stage holds either a 2:4 step (compressed 128 x 128 A, its metadata, an
// N x 128 block of x) or a dense half step (128 x 64 of a dense tile in A's
// 16 KB, N x 64 of x in the first half of B's buffer). Both half operands
// have the layout of a K-major bf16 tile of 64 inputs with the 128-byte
// swizzle, which is also how the first 64 inputs of B's tile lie in shared
// memory (its atoms are tiled along N first).
//
// kInFlight 0: every step's instructions complete before its stage is
// released (as CUTLASS's sparse main loop does: wgmma.sp reads its metadata
// from registers). 1: a step's stage is released once the next step's
// instructions are issued, the metadata alternating between two register sets.
template <class Base, int kInFlight>
struct MixedHybridMainloop : Base {
  using ElementA = typename Base::ElementA;
  using ElementB = typename Base::ElementB;
  using ElementE = typename Base::ElementE;
  using ElementAMma = typename Base::ElementAMma;
  using ElementBMma = typename Base::ElementBMma;
  using ElementEMma = typename Base::ElementEMma;
  using LayoutA = typename Base::LayoutA;
  using LayoutE = typename Base::LayoutE;
  using StrideB = typename Base::StrideB;
  using TileShape = typename Base::TileShape;
  using TiledMma = typename Base::TiledMma;
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using MainloopPipeline = typename Base::MainloopPipeline;
  using PipelineState = typename Base::PipelineState;
  using TensorStorage = typename Base::TensorStorage;
  using SmemLayoutA = typename Base::SmemLayoutA;
  using SmemLayoutB = typename Base::SmemLayoutB;
  using SmemLayoutE = typename Base::SmemLayoutE;
  using Element = cutlass::bfloat16_t;
  using TmaElement = uint16_t;  // TMA moves bf16 as raw 16-bit values

  static_assert(std::is_same_v<typename Base::DispatchPolicy::Schedule, cutlass::gemm::KernelTmaWarpSpecialized>,
                "mma() takes its row block from blockIdx.x: one output tile per CTA (the non-persistent kernel)");
  static_assert(cute::size(TiledMma{}) == cutlass::NumThreadsPerWarpGroup, "one consumer warpgroup");
  static_assert(cute::size<0>(TileShape{}) == 128 && cute::size<2>(TileShape{}) == 128, "128 x N x 128 tiles");
  using TileN = cute::remove_cvref_t<decltype(cute::get<1>(TileShape{}))>;  // cute::Int<N>
  static_assert(std::is_same_v<ElementBMma, Element>, "bf16 activations");
  static_assert(kInFlight == 0 || kInFlight == 1, "0 or 1 steps in flight");

  // A dense half step: M 128, N of the tile, K 64.
  using HalfShape = cute::Shape<cute::_128, TileN, cute::_64>;
  using SmemLayoutHalfA = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                       cute::Shape<cute::_128, cute::_64>{}));
  using SmemLayoutHalfB = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                       cute::Shape<TileN, cute::_64>{}));
  using DenseMma = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, HalfShape, cute::GMMA::Major::K, cute::GMMA::Major::K>(),
      cute::Layout<cute::Shape<cute::_1, cute::_1, cute::_1>>{}));

  static constexpr int kHalfElementsA = 128 * 64, kHalfElementsB = TileN::value * 64;
  static constexpr uint32_t kStageBytesA =
      cutlass::bits_to_bytes(cute::cosize(cute::take<0, 2>(SmemLayoutA{})) * cute::sizeof_bits_v<ElementAMma>);
  static constexpr uint32_t kStageBytesB =
      cutlass::bits_to_bytes(cute::cosize(cute::take<0, 2>(SmemLayoutB{})) * cute::sizeof_bits_v<ElementBMma>);
  static_assert(kStageBytesA == kHalfElementsA * sizeof(Element), "a compressed A stage holds a dense half tile");
  static_assert(kStageBytesB == 2 * kHalfElementsB * sizeof(Element), "a B stage holds two halves of 64 inputs");
  static constexpr uint32_t kHalfBytes = (kHalfElementsA + kHalfElementsB) * sizeof(Element);  // A half + x half
  static constexpr uint32_t kSparseExtraBytes = Base::TmaTransactionBytes - kHalfBytes;  // a 2:4 step's rest

  using StrideAD = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;
  using GmemTiledCopyA = typename Base::GmemTiledCopyA;
  using GmemTiledCopyB = typename Base::GmemTiledCopyB;
  using TMA_AD = decltype(cute::make_tma_copy_A_sm90<TmaElement>(
      GmemTiledCopyA{},
      cute::make_tensor(static_cast<const TmaElement*>(nullptr), cute::repeat_like(StrideAD{}, int32_t(0)), StrideAD{}),
      SmemLayoutHalfA{}, HalfShape{}, ClusterShape{}));
  using TMA_BH = decltype(cute::make_tma_copy_B_sm90<TmaElement>(
      GmemTiledCopyB{},
      cute::make_tensor(static_cast<const TmaElement*>(nullptr), cute::repeat_like(StrideB{}, int32_t(0)), StrideB{}),
      SmemLayoutHalfB{}, HalfShape{}, ClusterShape{}));

  struct Arguments {
    const ElementA* ptr_sparse = nullptr;  // compressed pool of 2:4 tiles
    LayoutA layout_sparse{};
    const ElementE* ptr_e = nullptr;  // its metadata
    LayoutE layout_e{};
    const Element* ptr_dense = nullptr;  // pool of dense tiles
    int dense_tiles = 0;
    const ElementB* ptr_B = nullptr;
    StrideB dB{};
    const int32_t* steps = nullptr;   // device [row blocks, max_steps, 2] (MixedPlan::steps)
    const int32_t* counts = nullptr;  // device [row blocks]
    int max_steps = 0;
  };

  struct Params : Base::Params {
    TMA_AD tma_load_ad;
    TMA_BH tma_load_bh;
    int dense_rows;
    const int32_t* steps;
    const int32_t* counts;
    int max_steps;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    typename Base::Arguments base{args.ptr_sparse, args.layout_sparse, args.ptr_B, args.dB, args.ptr_e, args.layout_e};
    Params p;
    static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(problem_shape, base, workspace);
    // The pipeline expects a dense half step's bytes; a 2:4 step adds the rest.
    p.tma_transaction_bytes = kHalfBytes;
    const int dense_rows = args.dense_tiles * 128;
    auto dense = cute::make_tensor(reinterpret_cast<const TmaElement*>(args.ptr_dense),
                                   cute::make_layout(cute::make_shape(dense_rows, 128, 1),
                                                     StrideAD{int64_t(128), cute::_1{}, int64_t(dense_rows) * 128}));
    auto x = cute::make_tensor(reinterpret_cast<const TmaElement*>(args.ptr_B),
                               cute::make_layout(cute::make_shape(N, K, L), args.dB));
    p.tma_load_ad = cute::make_tma_copy_A_sm90<TmaElement>(GmemTiledCopyA{}, dense, SmemLayoutHalfA{}, HalfShape{},
                                                           ClusterShape{});
    p.tma_load_bh =
        cute::make_tma_copy_B_sm90<TmaElement>(GmemTiledCopyB{}, x, SmemLayoutHalfB{}, HalfShape{}, ClusterShape{});
    p.dense_rows = dense_rows;
    p.steps = args.steps;
    p.counts = args.counts;
    p.max_steps = args.max_steps;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    constexpr int kAlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
    return M % 128 == 0 && K % 128 == 0 && args.max_steps > 0 && args.dense_tiles > 0 &&
           cutlass::detail::check_alignment<kAlignB>(cute::make_shape(N, K, L), args.dB);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_ad.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_bh.get_tma_descriptor());
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
    auto mA = params.tma_load_a.get_tma_tensor(params.layout_a.shape());
    auto mE = params.tma_load_e.get_tma_tensor(params.layout_e.shape());
    auto mB = params.tma_load_b.get_tma_tensor(cute::make_shape(N, K, L));
    auto mAD = params.tma_load_ad.get_tma_tensor(cute::make_shape(params.dense_rows, 128, 1));
    auto mBH = params.tma_load_bh.get_tma_tensor(cute::make_shape(N, K, L));
    auto gS = cute::local_tile(mS, TileShape{}, cute::make_coord(_, _, _), cute::Step<_1, X, _1>{});
    auto gB = cute::local_tile(mB, TileShape{}, cute::make_coord(_, _, _), cute::Step<X, _1, _1>{});
    auto gA = cute::local_tile(mA, TileShape{}, cute::make_coord(_, _, _), cute::Step<_1, X, _1>{});
    auto gE = cute::local_tile(mE, TileShape{}, cute::make_coord(_, _, _), cute::Step<_1, X, _1>{});
    auto gAD = cute::local_tile(mAD, HalfShape{}, cute::make_coord(_, _, _), cute::Step<_1, X, _1>{});
    auto gBH = cute::local_tile(mBH, HalfShape{}, cute::make_coord(_, _, _), cute::Step<X, _1, _1>{});
    return cute::make_tuple(gS, gB, gA, gE, gAD, gBH);
  }

  // Shared memory of a stage seen as dense half operands.
  CUTLASS_DEVICE static auto half_a(TensorStorage& s, int stage) {
    auto* base = reinterpret_cast<Element*>(&s.smem_A) + stage * kHalfElementsA;
    return cute::make_tensor(cute::make_smem_ptr(base), SmemLayoutHalfA{});
  }
  CUTLASS_DEVICE static auto half_b(TensorStorage& s, int stage) {
    auto* base = reinterpret_cast<Element*>(&s.smem_B) + stage * 2 * kHalfElementsB;
    return cute::make_tensor(cute::make_smem_ptr(base), SmemLayoutHalfB{});
  }

  template <class TensorS, class TensorB, class TensorA, class TensorE, class TensorAD, class TensorBH,
            class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorS, TensorB, TensorA, TensorE, TensorAD, TensorBH> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator, int, int, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using cute::_;
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    const int row_block = static_cast<int>(m_coord);
    const int count = params.counts[row_block];
    produced_ = count;
    if (!cute::elect_one_sync()) return;

    auto sA = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_A.begin()), SmemLayoutA{});
    auto sE = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_E.begin()), SmemLayoutE{});
    auto sB = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_B.begin()), SmemLayoutB{});
    auto [gS, gB_nkl, gA_pool, gE_pool, gAD_pool, gBH_nkl] = load_inputs;

    // A, E and AD are shared by the CTAs of a cluster along N (same row block), B along M.
    auto cta_layout_mnk = cute::make_layout(ClusterShape{});
    auto cta_coord_mnk = cta_layout_mnk.get_flat_coord(block_rank_in_cluster);
    const uint16_t mcast_mask_a = cute::create_tma_multicast_mask<1>(cta_layout_mnk, cta_coord_mnk);
    const uint16_t mcast_mask_b = cute::create_tma_multicast_mask<0>(cta_layout_mnk, cta_coord_mnk);
    auto block_tma_a = params.tma_load_a.get_slice(cute::get<1>(cta_coord_mnk));
    auto block_tma_e = params.tma_load_e.get_slice(cute::get<1>(cta_coord_mnk));
    auto block_tma_b = params.tma_load_b.get_slice(cute::get<0>(cta_coord_mnk));
    auto block_tma_ad = params.tma_load_ad.get_slice(cute::get<1>(cta_coord_mnk));
    auto block_tma_bh = params.tma_load_bh.get_slice(cute::get<0>(cta_coord_mnk));

    auto tAgA = block_tma_a.partition_S(gA_pool(_, _, _, 0, l_coord));  // (TMA, TMA_M, TMA_K, sparse tile)
    auto tAsA = block_tma_a.partition_D(sA);
    auto tEgE = block_tma_e.partition_S(gE_pool(_, _, _, 0, l_coord));
    auto tEsE = block_tma_e.partition_D(sE);
    auto tBgB = block_tma_b.partition_S(gB_nkl(_, _, n_coord, _, l_coord));  // (..., input block of 128)
    auto tBsB = block_tma_b.partition_D(sB);
    auto tADgAD = block_tma_ad.partition_S(gAD_pool(_, _, _, _, 0));       // (..., dense tile, half)
    auto tBHgBH = block_tma_bh.partition_S(gBH_nkl(_, _, n_coord, _, l_coord));  // (..., input block of 64)

    const int32_t* step = params.steps + static_cast<int64_t>(row_block) * params.max_steps * 2;
    CUTLASS_PRAGMA_NO_UNROLL
    for (int j = 0; j < count; ++j, step += 2) {
      const int a = step[0], b = step[1];
      pipeline.producer_acquire(smem_pipe_write);
      auto* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      if (a >= 0) {
        // Before this CTA's own copies are issued, so the phase cannot complete early.
        pipeline.producer_expect_transaction(smem_pipe_write, kSparseExtraBytes);
        cute::copy(params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, a), tAsA(_, _, _, stage));
        cute::copy(params.tma_load_e.with(*tma_barrier, mcast_mask_a), tEgE(_, _, _, a), tEsE(_, _, _, stage));
        cute::copy(params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, b), tBsB(_, _, _, stage));
      } else {
        const int dense_tile = -1 - a, half = b & 1;
        cute::copy(params.tma_load_ad.with(*tma_barrier, mcast_mask_a), tADgAD(_, _, _, dense_tile, half),
                   block_tma_ad.partition_D(half_a(shared_tensors, stage)));
        cute::copy(params.tma_load_bh.with(*tma_barrier, mcast_mask_b), tBHgBH(_, _, _, b),
                   block_tma_bh.partition_D(half_b(shared_tensors, stage)));
      }
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

  // The wgmma.sp atom's metadata layout: (thread, value) -> (m, k) of a 64 x 32 atom.
  using AtomShape = typename TiledMma::AtomShape_MNK;
  using ELayout = typename TiledMma::Atom::Traits::ELayout;

  // The shape of a thread's metadata for one CTA tile, (value, atom along M,
  // atom along K): e viewed as atoms, each through ELayout, sliced at `thread`.
  template <class ETensor>
  CUTLASS_DEVICE static auto metadata_of_thread(ETensor&& e, int thread) {
    auto atoms = cute::zipped_divide(e, cute::make_tile(cute::make_layout(cute::size<0>(AtomShape{})),
                                                        cute::make_layout(cute::size<2>(AtomShape{}))));
    auto tv = atoms.compose(ELayout{}, cute::_);  // ((thread, value), (atoms M, atoms K))
    return tv(cute::make_coord(thread, cute::_), cute::make_coord(cute::_, cute::_));
  }

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int,
                          int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    using cute::_;
    const int row_block = blockIdx.x;
    const int count = params.counts[row_block];
    consumed_ = count;
    const int thread = thread_idx % cutlass::NumThreadsPerWarpGroup;

    auto sA = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_A.begin()), SmemLayoutA{});
    auto sB = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_B.begin()), SmemLayoutB{});
    auto sE = cute::as_position_independent_swizzle_tensor(
        cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_E.begin()), SmemLayoutE{}));

    // The warpgroup's threads share the A and B descriptors: slice 0.
    TiledMma sparse_mma;
    DenseMma dense_mma;
    auto sparse_thr = sparse_mma.get_thread_slice(0);
    auto dense_thr = dense_mma.get_thread_slice(0);
    auto tCrA = sparse_thr.make_fragment_A(sparse_thr.partition_A(sA));  // (MMA, MMA_M, MMA_K, PIPE)
    auto tCrB = sparse_thr.make_fragment_B(sparse_thr.partition_B(sB));  // (MMA, MMA_N, MMA_K, PIPE)
    // Metadata goes through registers, 32 bits at a time, one atom's layout repeated over the tile.
    auto copy_e = cute::make_tiled_copy_impl(cute::Copy_Atom<cute::AutoVectorizingCopy, uint32_t>{}, ELayout{},
                                             cute::make_shape(cute::size<0>(AtomShape{}), cute::size<2>(AtomShape{})));
    auto thr_copy_e = copy_e.get_thread_slice(thread);
    auto tEsE = thr_copy_e.partition_S(sE);  // (CPY, CPY_M, CPY_K, PIPE)
    auto tCrE = cute::make_fragment_like<ElementEMma>(metadata_of_thread(sE(_, _, 0), 0));  // (value, M, K)
    auto tErE = thr_copy_e.retile_D(tCrE);
    CUTE_STATIC_ASSERT_V(cute::size<1>(tCrA) == cute::size<1>(accum));
    CUTE_STATIC_ASSERT_V(cute::size<1>(tCrB) == cute::size<2>(accum));

    // Both instructions accumulate onto the same fragment (their C layouts are
    // those of a 64 x 128 wgmma), started at zero.
    cute::clear(accum);
    sparse_mma.accumulate_ = cute::GMMA::ScaleOut::One;
    dense_mma.accumulate_ = cute::GMMA::ScaleOut::One;
    cute::warpgroup_fence_operand(accum);

    // Issues step j's instructions as one batch (its metadata through e / e_copy).
    // Each branch commits its own batch: a commit after the branches join makes
    // ptxas add an empty wgmma group (C7519), and warpgroup_wait<1> then waits
    // for the step itself.
    const int32_t* steps = params.steps + static_cast<int64_t>(row_block) * params.max_steps * 2;
    auto issue = [&](int j, auto& e, auto& e_copy) {
      const bool sparse = steps[2 * j] >= 0;
      auto token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, token);
      const int stage = smem_pipe_read.index();
      if (sparse) {
        cute::copy(copy_e, tEsE(_, _, _, stage), e_copy);
        cute::warpgroup_fence_operand(accum);
        cute::warpgroup_arrive();
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < cute::size<2>(tCrA); ++k_block)
          cute::gemm(sparse_mma, cute::make_zip_tensor(tCrA(_, _, k_block, stage), e(_, _, k_block)),
                     tCrB(_, _, k_block, stage), accum);
        cute::warpgroup_commit_batch();
      } else {
        auto tDrA = dense_thr.make_fragment_A(dense_thr.partition_A(half_a(shared_tensors, stage)));
        auto tDrB = dense_thr.make_fragment_B(dense_thr.partition_B(half_b(shared_tensors, stage)));
        cute::warpgroup_fence_operand(accum);
        cute::warpgroup_arrive();
        CUTLASS_PRAGMA_UNROLL
        for (int k_block = 0; k_block < cute::size<2>(tDrA); ++k_block)
          cute::gemm(dense_mma, tDrA(_, _, k_block), tDrB(_, _, k_block), accum);
        cute::warpgroup_commit_batch();
      }
      ++smem_pipe_read;
    };

    if constexpr (kInFlight == 0) {
      PipelineState release = smem_pipe_read;
      CUTLASS_PRAGMA_NO_UNROLL
      for (int j = 0; j < count; ++j) {
        issue(j, tCrE, tErE);
        cute::warpgroup_wait<0>();
        cute::warpgroup_fence_operand(accum);
        pipeline.consumer_release(release);
        ++release;
      }
    } else {
      auto tCrE2 = cute::make_fragment_like(tCrE);
      auto tErE2 = thr_copy_e.retile_D(tCrE2);
      PipelineState release = smem_pipe_read;
      // After step j is issued, step j - 1 has completed: its stage and its
      // metadata registers (the other set) are free.
      auto step = [&](int j, auto& e, auto& e_copy) {
        issue(j, e, e_copy);
        cute::warpgroup_wait<1>();
        cute::warpgroup_fence_operand(accum);
        if (j > 0) {
          pipeline.consumer_release(release);
          ++release;
        }
      };
      CUTLASS_PRAGMA_NO_UNROLL
      for (int j = 0; j < count; j += 2) {
        step(j, tCrE, tErE);
        if (j + 1 < count) step(j + 1, tCrE2, tErE2);
      }
      cute::warpgroup_wait<0>();
      cute::warpgroup_fence_operand(accum);
      if (count > 0) pipeline.consumer_release(release);
    }
    cute::warpgroup_fence_operand(accum);
  }

  // Every step's stage was released in mma().
  CUTLASS_DEVICE void mma_tail(MainloopPipeline, PipelineState, int) {}

  int produced_ = 0;  // steps loaded (producer threads' copy of the collective)
  int consumed_ = 0;  // steps multiplied (consumer threads' copy)
};

using MixedElementE = HybridStock<128>::ElementE;  // named outside a template (HybridStock)
static_assert(std::is_same_v<HybridStock<128>::Mainloop::LayoutA, HybridStock<64>::Mainloop::LayoutA> &&
                  std::is_same_v<HybridStock<128>::Mainloop::LayoutE, HybridStock<64>::Mainloop::LayoutE>,
              "both tile widths read the same compressed pool");

template <int kInFlight, int kTileN>
using MixedGemm = cutlass::gemm::device::GemmUniversalAdapter<cutlass::gemm::kernel::GemmUniversal<
    cute::Shape<int, int, int, int>, MixedHybridMainloop<typename HybridStock<kTileN>::Mainloop, kInFlight>,
    typename HybridStock<kTileN>::Epilogue>>;

// The pools (compressed 2:4 tiles, dense tiles, steps) once, and the kernels
// that read them: tiles of 128 or 64 tokens, or 128 with each step completed
// before the next (kMixedSerial).
class HybridMixedImpl final : public ImplBase {
  using Element = cutlass::bfloat16_t;

 public:
  HybridMixedImpl(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense, int64_t out, int64_t in,
                  HybridKernel kernel, cudaStream_t stream)
      : out_(out), in_(in), kernel_(kernel) {
    if (out <= 0 || in <= 0 || out % kSplitTile != 0 || in % kSplitTile != 0 || out > INT_MAX || in > INT_MAX)
      fail("out and in must be positive multiples of 128");
    const int64_t row_blocks = out / kSplitTile, k_tiles = in / kSplitTile;
    const MixedPlan plan = make_mixed_plan(tile_dense, row_blocks, k_tiles);
    max_steps_ = static_cast<int>(plan.max_steps);
    dense_tiles_ = static_cast<int>(std::max<size_t>(plan.dense.size(), 1));
    const int sparse_tiles = static_cast<int>(std::max<size_t>(plan.sparse.size(), 1));
    std::string e = sm90_device(hw_info_);
    if (e.empty()) e = upload(plan.steps, steps_, stream);
    if (e.empty()) e = upload(plan.counts, counts_, stream);
    if (e.empty()) e = upload(gather_tiles(plan.dense, w, row_blocks, k_tiles), dense_, stream);
    DeviceBuffer sparse_values;
    if (e.empty()) e = upload(gather_tiles(plan.sparse, w, row_blocks, k_tiles), sparse_values, stream);
    if (e.empty())
      e = compress_sparse(sparse_values.get(), sparse_tiles * static_cast<int>(kSplitTile),
                          static_cast<int>(kSplitTile), hw_info_, stream, sparse_);
    // The uploads read host vectors that die here.
    if (e.empty()) e = cuda_text(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (!e.empty()) fail(e);
  }

  void run(const void* x, void* y, int64_t tokens, cudaStream_t stream) override {
    std::string e;
    if (kernel_ == HybridKernel::kMixedSerial)
      e = serial_.run(x, y, tokens, stream, [&](int n) { return arguments<MixedGemm<0, 128>>(x, y, n); });
    else if (narrow(tokens))
      e = narrow_.run(x, y, tokens, stream, [&](int n) { return arguments<MixedGemm<1, 64>>(x, y, n); });
    else
      e = wide_.run(x, y, tokens, stream, [&](int n) { return arguments<MixedGemm<1, 128>>(x, y, n); });
    if (!e.empty()) fail(e);
  }

  size_t bytes() const override { return sparse_.bytes() + dense_.bytes() + steps_.bytes() + counts_.bytes(); }

 private:
  // Tiles of 64 tokens where tiles of 128 leave SMs without a tile (kMixed),
  // or as asked (kMixed128, kMixed64).
  bool narrow(int64_t tokens) const {
    if (kernel_ != HybridKernel::kMixed) return kernel_ == HybridKernel::kMixed64;
    return mixed_narrow(out_, tokens, hw_info_.sm_count);
  }

  template <class Gemm>
  typename Gemm::Arguments arguments(const void* x, void* y, int tokens) const {
    auto args = gemm_arguments<Gemm>(x, y, static_cast<int>(out_), tokens, static_cast<int>(in_), hw_info_);
    args.mainloop.ptr_sparse = static_cast<const Element*>(sparse_.values.get());
    args.mainloop.layout_sparse = sparse_.layout_a;
    args.mainloop.ptr_e = static_cast<const MixedElementE*>(sparse_.metadata.get());
    args.mainloop.layout_e = sparse_.layout_e;
    args.mainloop.ptr_dense = static_cast<const Element*>(dense_.get());
    args.mainloop.dense_tiles = dense_tiles_;
    args.mainloop.steps = static_cast<const int32_t*>(steps_.get());
    args.mainloop.counts = static_cast<const int32_t*>(counts_.get());
    args.mainloop.max_steps = max_steps_;
    return args;
  }

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("CUTLASS mixed hybrid GEMM [out " + std::to_string(out_) + ", in " +
                             std::to_string(in_) + "]: " + why);
  }

  int64_t out_, in_;
  HybridKernel kernel_;
  int max_steps_ = 0, dense_tiles_ = 0;
  cutlass::KernelHardwareInfo hw_info_{};
  CompressedSparse<HybridStock<128>::Mainloop> sparse_;
  DeviceBuffer dense_, steps_, counts_;
  CachedGemm<MixedGemm<1, 128>> wide_;
  CachedGemm<MixedGemm<1, 64>> narrow_;
  CachedGemm<MixedGemm<0, 128>> serial_;
};

#endif  // CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED

std::unique_ptr<ImplBase> make_mixed_impl(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense,
                                          int64_t out, int64_t in, HybridKernel kernel, cudaStream_t stream) {
#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
  if constexpr (kKernelsBuilt) return std::make_unique<HybridMixedImpl>(w, tile_dense, out, in, kernel, stream);
#endif
  (void)kernel;
  (void)w;
  (void)tile_dense;
  (void)stream;
  throw std::runtime_error("CUTLASS mixed hybrid GEMM [out " + std::to_string(out) + ", in " + std::to_string(in) +
                           "]: built without sm_90a CUTLASS kernels");
}

}  // namespace patch::deploy::cutlass_sm90::detail
