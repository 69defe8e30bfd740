// CUTLASS SM90 sparse GEMM: cooperative schedule, 128x128x128 tile, 1x1 cluster, stream-K.
// One variant per TU so that the variants compile in parallel.
#include "deploy/cutlass_sparse_gemm_impl.cuh"

namespace patch::deploy::cutlass_sm90::detail {

template std::unique_ptr<ImplBase> make_impl<Variant::kCooperative128x128x128StreamK>(const void*, int64_t, int64_t, cudaStream_t);

}  // namespace patch::deploy::cutlass_sm90::detail
