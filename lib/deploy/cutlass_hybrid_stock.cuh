#pragma once
// The CUTLASS types the hybrid kernels (cutlass_hybrid_gemm.h) build on.
#include "deploy/cutlass_sparse_gemm_impl.cuh"

namespace patch::deploy::cutlass_sm90::detail {

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)

// The stock parts of the hybrid kernels: CUTLASS's sparse main loop (the base
// of their main loops) and epilogue for 128 x kTileN x 128 tiles, a 1 x 2
// cluster and the non-persistent schedule.
template <int kTileN>
struct HybridStock {
  using Element = cutlass::bfloat16_t;
  using Accumulator = float;
  using TileShape = cute::Shape<cute::_128, cute::Int<kTileN>, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::ColumnMajor;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator, void, LayoutD, kAlignment, Element,
      LayoutD, kAlignment, cutlass::epilogue::TmaWarpSpecialized>::CollectiveOp;
  // A constant, not the sizeof expression: nvcc's host pass cannot spell the
  // latter inside a template.
  static constexpr int kEpilogueBytes = static_cast<int>(sizeof(typename Epilogue::SharedStorage));
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutA, kAlignment, Element, LayoutB,
      kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<kEpilogueBytes>,
      cutlass::gemm::KernelTmaWarpSpecialized>::CollectiveOp;
  using ElementE = typename Mainloop::ElementE;
};

#endif  // CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED

}  // namespace patch::deploy::cutlass_sm90::detail
