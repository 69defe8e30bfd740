// SparseWeight: the variant dispatch of cutlass_sparse_gemm.h. The kernels
// live in the cutlass_sparse_gemm_<variant>_cuda.cu files.
#include "deploy/cutlass_sparse_gemm.h"

#include <stdexcept>
#include <string>
#include <utility>

#include "deploy/cutlass_sparse_gemm_impl.cuh"

namespace patch::deploy::cutlass_sm90 {

std::vector<Variant> variants() {
  if (!PATCH_CUTLASS_SCHEDULES) return {};
  return {Variant::kCooperative128x128x128Cluster1x2, Variant::kPingpong128x128x128Cluster1x2,
          Variant::kCooperative128x256x128Cluster1x2, Variant::kCooperative128x128x128Cluster2x1,
          Variant::kCooperative128x128x128StreamK,     Variant::kCooperative128x64x128StreamK};
}

const char* variant_name(Variant v) {
  switch (v) {
    case Variant::kCooperative128x128x128Cluster1x2:
      return "cutlass_coop_128x128_1x2";
    case Variant::kPingpong128x128x128Cluster1x2:
      return "cutlass_pingpong_128x128_1x2";
    case Variant::kCooperative128x256x128Cluster1x2:
      return "cutlass_coop_128x256_1x2";
    case Variant::kCooperative128x128x128Cluster2x1:
      return "cutlass_coop_128x128_2x1";
    case Variant::kCooperative128x128x128StreamK:
      return "cutlass_coop_128x128_streamk";
    case Variant::kCooperative128x64x128StreamK:
      return "cutlass_coop_128x64_streamk";
  }
  return "cutlass_unknown";
}

bool available() { return detail::kKernelsBuilt; }

struct SparseWeight::Impl {
  Variant variant;
  std::unique_ptr<detail::ImplBase> gemm;
};

namespace {

std::unique_ptr<detail::ImplBase> make(Variant v, const void* w, int64_t out, int64_t in, cudaStream_t stream) {
#if !PATCH_CUTLASS_SCHEDULES
  throw std::runtime_error(std::string("CUTLASS sparse GEMM: ") + variant_name(v) +
                           " is not built (PATCH_CUTLASS_SCHEDULES=OFF)");
#else
  switch (v) {
    case Variant::kCooperative128x128x128Cluster1x2:
      return detail::make_impl<Variant::kCooperative128x128x128Cluster1x2>(w, out, in, stream);
    case Variant::kPingpong128x128x128Cluster1x2:
      return detail::make_impl<Variant::kPingpong128x128x128Cluster1x2>(w, out, in, stream);
    case Variant::kCooperative128x256x128Cluster1x2:
      return detail::make_impl<Variant::kCooperative128x256x128Cluster1x2>(w, out, in, stream);
    case Variant::kCooperative128x128x128Cluster2x1:
      return detail::make_impl<Variant::kCooperative128x128x128Cluster2x1>(w, out, in, stream);
    case Variant::kCooperative128x128x128StreamK:
      return detail::make_impl<Variant::kCooperative128x128x128StreamK>(w, out, in, stream);
    case Variant::kCooperative128x64x128StreamK:
      return detail::make_impl<Variant::kCooperative128x64x128StreamK>(w, out, in, stream);
  }
  throw std::runtime_error("CUTLASS sparse GEMM: unknown variant " + std::to_string(static_cast<int>(v)));
#endif
}

}  // namespace

SparseWeight::SparseWeight(const void* w, int64_t out, int64_t in, Variant v, void* stream)
    : impl_(std::make_unique<Impl>(Impl{v, make(v, w, out, in, static_cast<cudaStream_t>(stream))})) {}

SparseWeight::~SparseWeight() = default;
SparseWeight::SparseWeight(SparseWeight&&) noexcept = default;
SparseWeight& SparseWeight::operator=(SparseWeight&&) noexcept = default;

void SparseWeight::run(const void* x, void* y, int64_t tokens, void* stream) {
  if (!impl_) throw std::runtime_error("CUTLASS sparse GEMM: run() on a moved-from SparseWeight");
  impl_->gemm->run(x, y, tokens, static_cast<cudaStream_t>(stream));
}

size_t SparseWeight::bytes() const { return impl_ ? impl_->gemm->bytes() : 0; }

Variant SparseWeight::variant() const {
  if (!impl_) throw std::runtime_error("CUTLASS sparse GEMM: variant() on a moved-from SparseWeight");
  return impl_->variant;
}

}  // namespace patch::deploy::cutlass_sm90
