#pragma once
// The CUTLASS side of cutlass_sparse_gemm.h: one SparseGemmImpl per variant
// (the CollectiveBuilder types, the compressor, the GEMM launch), behind the
// small ImplBase interface that the dispatch file sees. Each variant's
// make_impl<V> is explicitly instantiated in its own .cu so that the four
// heavy TUs compile in parallel; everywhere else they are extern.
//
// The kernels are built when nvcc targets arch 90 and CUDA is 12.2 or newer;
// otherwise make_impl throws. Host and device passes have to agree on that,
// and the host pass sees no __CUDA_ARCH__, only __CUDA_ARCH_LIST__ (900 for
// sm_90 and sm_90a alike). The kernels need sm_90a (wgmma): in a device pass
// without it (plain sm_90, or the compute_90 PTX that nvcc 13 adds to
// -arch=sm_90a) CUTLASS compiles them to a stub that reports the arch mismatch.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cutlass/arch/config.h"  // CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED
#include "cutlass/cutlass.h"
#include "deploy/cutlass_sparse_gemm.h"

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"
#endif

namespace patch::deploy::cutlass_sm90::detail {

struct ImplBase {
  virtual ~ImplBase() = default;
  virtual void run(const void* x, void* y, int64_t tokens, cudaStream_t stream) = 0;
  virtual size_t bytes() const = 0;
};

// Whether nvcc compiles this TU for `arch` (any variant of it), in every pass.
constexpr bool arch_listed(int arch) {
#if defined(__CUDA_ARCH_LIST__)
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int a : archs) {
    if (a == arch) return true;
  }
#endif
  (void)arch;
  return false;
}

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
inline constexpr bool kKernelsBuilt = arch_listed(900);
#else
inline constexpr bool kKernelsBuilt = false;
#endif

// Defined in each variant's .cu (explicit instantiation).
template <Variant V>
std::unique_ptr<ImplBase> make_impl(const void* w, int64_t out, int64_t in, cudaStream_t stream);

extern template std::unique_ptr<ImplBase> make_impl<Variant::kCooperative128x128x128Cluster1x2>(
    const void*, int64_t, int64_t, cudaStream_t);
extern template std::unique_ptr<ImplBase> make_impl<Variant::kPingpong128x128x128Cluster1x2>(
    const void*, int64_t, int64_t, cudaStream_t);
extern template std::unique_ptr<ImplBase> make_impl<Variant::kCooperative128x256x128Cluster1x2>(
    const void*, int64_t, int64_t, cudaStream_t);
extern template std::unique_ptr<ImplBase> make_impl<Variant::kCooperative128x128x128Cluster2x1>(
    const void*, int64_t, int64_t, cudaStream_t);
extern template std::unique_ptr<ImplBase> make_impl<Variant::kCooperative128x128x128StreamK>(
    const void*, int64_t, int64_t, cudaStream_t);
extern template std::unique_ptr<ImplBase> make_impl<Variant::kCooperative128x64x128StreamK>(
    const void*, int64_t, int64_t, cudaStream_t);

inline std::string shape_text(Variant v, int64_t out, int64_t in) {
  return std::string(variant_name(v)) + " [out " + std::to_string(out) + ", in " + std::to_string(in) + "]";
}

inline void check_aligned(const void* p, const char* name, Variant v, int64_t out, int64_t in) {
  // TMA descriptors need 16-byte aligned global addresses.
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    throw std::runtime_error("CUTLASS sparse GEMM " + shape_text(v, out, in) + ": " + name +
                             " is not 16-byte aligned");
  }
}

// Defined only where the kernels are built (kKernelsBuilt).
template <Variant V>
class SparseGemmImpl;

// Device memory freed with cudaFree, which waits for the work in flight.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }
  cudaError_t allocate(size_t bytes) {
    reset();
    cudaError_t e = bytes == 0 ? cudaSuccess : cudaMalloc(&ptr_, bytes);
    if (e != cudaSuccess) {
      ptr_ = nullptr;
      return e;
    }
    bytes_ = bytes;
    return cudaSuccess;
  }
  void reset() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)

template <class TileShape_, class ClusterShape_, class KernelSchedule_, class EpilogueSchedule_,
          class TileScheduler_ = void>
struct Sm90SparseConfig {
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using KernelSchedule = KernelSchedule_;
  using EpilogueSchedule = EpilogueSchedule_;
  using TileScheduler = TileScheduler_;  // void: the schedule's own
};

// What a CUTLASS step that failed said: "<step> failed[ for N tokens]: CUTLASS
// status '...'[, CUDA error '...']".
inline std::string status_text(const char* step, cutlass::Status status, cudaError_t cuda = cudaSuccess,
                               int64_t tokens = -1) {
  std::string why = std::string(step) + " failed";
  if (tokens >= 0) why += " for " + std::to_string(tokens) + " tokens";
  why += ": CUTLASS status '" + std::string(cutlass::cutlassGetStatusString(status)) + "'";
  if (cuda != cudaSuccess) why += ", CUDA error '" + std::string(cudaGetErrorString(cuda)) + "'";
  return why;
}

inline std::string cuda_text(cudaError_t e, const char* what) {
  return e == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(e);
}

// Copies `host` into a new device buffer on `stream` (the host vector must
// outlive the copy). Returns "" or what failed.
template <class T>
std::string upload(const std::vector<T>& host, DeviceBuffer& dev, cudaStream_t stream) {
  std::string e = cuda_text(dev.allocate(host.size() * sizeof(T)), "cudaMalloc");
  if (e.empty())
    e = cuda_text(cudaMemcpyAsync(dev.get(), host.data(), dev.bytes(), cudaMemcpyHostToDevice, stream),
                  "cudaMemcpyAsync");
  return e;
}

// The current device as the kernels need it (an sm_90 GPU, its SM count); ""
// or what is wrong.
inline std::string sm90_device(cutlass::KernelHardwareInfo& hw) {
  std::string e = cuda_text(cudaGetDevice(&hw.device_id), "cudaGetDevice");
  int major = 0, minor = 0;
  if (e.empty()) e = cuda_text(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, hw.device_id), "device query");
  if (e.empty()) e = cuda_text(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, hw.device_id), "device query");
  if (e.empty() && (major != 9 || minor != 0))
    e = "needs an sm_90 GPU, device " + std::to_string(hw.device_id) + " is sm_" + std::to_string(major) +
        std::to_string(minor);
  if (e.empty())
    e = cuda_text(cudaDeviceGetAttribute(&hw.sm_count, cudaDevAttrMultiProcessorCount, hw.device_id), "device query");
  return e;
}

// A 2:4 matrix in the layout of the sparse main loop Mainloop: the compressed
// values and the metadata.
template <class Mainloop>
struct CompressedSparse {
  DeviceBuffer values, metadata;
  typename Mainloop::LayoutA layout_a{};
  typename Mainloop::LayoutE layout_e{};
  size_t bytes() const { return values.bytes() + metadata.bytes(); }
};

// Compresses w (device bf16 [m, k], row-major, at most two nonzeros in every
// four consecutive entries of a row: the compressor keeps the first two it
// finds) on `stream` into `out`; w must stay valid until the stream reaches
// that point. Returns "" or what failed.
template <class Mainloop>
std::string compress_sparse(const void* w, int m, int k, const cutlass::KernelHardwareInfo& hw, cudaStream_t stream,
                            CompressedSparse<Mainloop>& out) {
  using Element = cutlass::bfloat16_t;
  using Layout = cutlass::layout::RowMajor;
  using ProblemShape = cute::Shape<int, int, int, int>;
  using SparseConfig = typename Mainloop::SparseConfig;
  using Utility = cutlass::transform::kernel::StructuredSparseCompressorUtility<ProblemShape, Element, Layout,
                                                                                SparseConfig>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<
      cutlass::transform::kernel::StructuredSparseCompressor<ProblemShape, Element, Layout, SparseConfig,
                                                             cutlass::arch::Sm90>>;
  using Stride = cutlass::gemm::TagToStrideA_t<Layout>;
  // The compressed layouts depend on M, K and L only; N = 1 stands for any token count.
  const ProblemShape shape{m, 1, k, 1};
  out.layout_a = SparseConfig::fill_layoutA(shape);
  out.layout_e = SparseConfig::fill_layoutE(shape);
  const Stride stride = cutlass::make_cute_packed_stride(Stride{}, cute::make_shape(m, k, 1));
  typename Compressor::Arguments args{shape, {w, stride, nullptr, nullptr}, {}};
  cutlass::Status status = Compressor::can_implement(args);
  if (status != cutlass::Status::kSuccess) return status_text("compressor can_implement", status);
  Utility utility(shape, stride);
  const size_t a_bytes =
      size_t(utility.get_tensorA_m_physical()) * size_t(utility.get_tensorA_k_physical()) * sizeof(Element);
  const size_t e_bytes = size_t(utility.get_metadata_m_physical()) * size_t(utility.get_metadata_k_physical()) *
                         sizeof(typename Mainloop::ElementE);
  std::string e = cuda_text(out.values.allocate(a_bytes), "cudaMalloc (compressed values)");
  if (e.empty()) e = cuda_text(out.metadata.allocate(e_bytes), "cudaMalloc (metadata)");
  // The padding (K rounded up to the metadata atom) must read as zeros.
  if (e.empty()) e = cuda_text(cudaMemsetAsync(out.values.get(), 0, a_bytes, stream), "cudaMemsetAsync");
  if (e.empty()) e = cuda_text(cudaMemsetAsync(out.metadata.get(), 0, e_bytes, stream), "cudaMemsetAsync");
  if (!e.empty()) return e;
  args.transform.ptr_ACompress = out.values.get();
  args.transform.ptr_E = out.metadata.get();
  args.hw_info = hw;
  // The compressor asks for a workspace it does not touch; stream-ordered so nothing waits for it.
  const size_t ws_bytes = Compressor::get_workspace_size(args);
  void* ws = nullptr;
  if (ws_bytes > 0) {
    e = cuda_text(cudaMallocAsync(&ws, ws_bytes, stream), "cudaMallocAsync");
    if (!e.empty()) return e;
  }
  Compressor compressor;
  status = compressor.initialize(args, ws, stream);
  if (status == cutlass::Status::kSuccess) status = compressor.run(stream);
  if (ws != nullptr) cudaFreeAsync(ws, stream);
  if (status != cutlass::Status::kSuccess) return status_text("compressor launch", status, cudaGetLastError());
  return "";
}

// The arguments every GEMM here shares: y = x · Wᵀ as D = W · Xᵀ with M = out,
// N = tokens, K = in, x the K-major B, y the M-major D, no source C, alpha 1.
// The caller adds its main loop's A (and metadata).
template <class Gemm>
typename Gemm::Arguments gemm_arguments(const void* x, void* y, int out, int tokens, int in,
                                        const cutlass::KernelHardwareInfo& hw) {
  using Kernel = typename Gemm::GemmKernel;
  using Element = cutlass::bfloat16_t;
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {out, tokens, in, 1};
  args.mainloop.ptr_B = static_cast<const Element*>(x);
  args.mainloop.dB = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(tokens, in, 1));
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, cute::make_shape(out, tokens, 1));
  args.epilogue.ptr_D = static_cast<Element*>(y);
  args.epilogue.dD = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(out, tokens, 1));
  args.hw_info = hw;
  return args;
}

// A GEMM whose parameters (TMA descriptors built on the host) are rebuilt only
// for a new x, y or token count; a workspace, where the kernel asks for one,
// is owned here and re-initialized every time.
template <class Gemm>
class CachedGemm {
 public:
  // make_args(tokens) gives the GEMM's arguments. Returns "" or what failed.
  template <class MakeArgs>
  std::string run(const void* x, void* y, int64_t tokens, cudaStream_t stream, MakeArgs&& make_args) {
    if (tokens < 0 || tokens > INT_MAX) return "tokens " + std::to_string(tokens) + " out of range";
    if (tokens == 0) return "";
    if (!(initialized_ && x == last_x_ && y == last_y_ && tokens == last_tokens_ && workspace_.bytes() == 0)) {
      // TMA descriptors need 16-byte aligned global addresses.
      if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return "x is not 16-byte aligned";
      if (reinterpret_cast<uintptr_t>(y) % 16 != 0) return "y is not 16-byte aligned";
      initialized_ = false;
      typename Gemm::Arguments args = make_args(static_cast<int>(tokens));
      cutlass::Status status = Gemm::can_implement(args);
      if (status != cutlass::Status::kSuccess) return status_text("can_implement", status, cudaSuccess, tokens);
      const size_t ws_bytes = Gemm::get_workspace_size(args);
      if (ws_bytes > workspace_.bytes()) {
        const std::string e = cuda_text(workspace_.allocate(ws_bytes), "cudaMalloc (workspace)");
        if (!e.empty()) return e;
      }
      status = gemm_.initialize(args, workspace_.get(), stream);
      if (status != cutlass::Status::kSuccess) return status_text("initialize", status, cudaGetLastError(), tokens);
      initialized_ = true;
      last_x_ = x;
      last_y_ = y;
      last_tokens_ = tokens;
    }
    const cutlass::Status status = gemm_.run(stream);
    return status == cutlass::Status::kSuccess ? "" : status_text("launch", status, cudaGetLastError(), tokens);
  }

 private:
  Gemm gemm_;
  DeviceBuffer workspace_;
  bool initialized_ = false;
  const void* last_x_ = nullptr;
  void* last_y_ = nullptr;
  int64_t last_tokens_ = 0;
};

template <Variant V>
struct VariantConfig;

// The sparse builder (sm90_sparse_gmma_builder.inl) takes the plain
// KernelTmaWarpSpecialized{,Cooperative,Pingpong} schedules; there are no
// separate ...Sparse schedule tags for SM90.
template <>
struct VariantConfig<Variant::kCooperative128x128x128Cluster1x2>
    : Sm90SparseConfig<cute::Shape<cute::_128, cute::_128, cute::_128>, cute::Shape<cute::_1, cute::_2, cute::_1>,
                       cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                       cutlass::epilogue::TmaWarpSpecializedCooperative> {};

template <>
struct VariantConfig<Variant::kPingpong128x128x128Cluster1x2>
    : Sm90SparseConfig<cute::Shape<cute::_128, cute::_128, cute::_128>, cute::Shape<cute::_1, cute::_2, cute::_1>,
                       cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized> {};

template <>
struct VariantConfig<Variant::kCooperative128x256x128Cluster1x2>
    : Sm90SparseConfig<cute::Shape<cute::_128, cute::_256, cute::_128>, cute::Shape<cute::_1, cute::_2, cute::_1>,
                       cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                       cutlass::epilogue::TmaWarpSpecializedCooperative> {};

template <>
struct VariantConfig<Variant::kCooperative128x128x128Cluster2x1>
    : Sm90SparseConfig<cute::Shape<cute::_128, cute::_128, cute::_128>, cute::Shape<cute::_2, cute::_1, cute::_1>,
                       cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                       cutlass::epilogue::TmaWarpSpecializedCooperative> {};

// Stream-K: the persistent CTAs share the k tiles of all output tiles evenly,
// for layers with fewer output tiles than SMs (a few hundred tokens and less).
template <>
struct VariantConfig<Variant::kCooperative128x128x128StreamK>
    : Sm90SparseConfig<cute::Shape<cute::_128, cute::_128, cute::_128>, cute::Shape<cute::_1, cute::_1, cute::_1>,
                       cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                       cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler> {};

template <>
struct VariantConfig<Variant::kCooperative128x64x128StreamK>
    : Sm90SparseConfig<cute::Shape<cute::_128, cute::_64, cute::_128>, cute::Shape<cute::_1, cute::_1, cute::_1>,
                       cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                       cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler> {};

template <Variant V>
class SparseGemmImpl final : public ImplBase {
  using Config = VariantConfig<V>;
  using Element = cutlass::bfloat16_t;
  using Accumulator = float;
  using LayoutA = cutlass::layout::RowMajor;     // W [out, in]: K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // x [tokens, in] as K x N: K contiguous
  using LayoutD = cutlass::layout::ColumnMajor;  // y [tokens, out] as M x N: M contiguous
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA accesses

  // No source C: ElementC void drops its loads and shared memory.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, typename Config::TileShape,
      typename Config::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator, void,
      LayoutD, kAlignment, Element, LayoutD, kAlignment, typename Config::EpilogueSchedule>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutA, kAlignment, Element, LayoutB,
      kAlignment, Accumulator, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;

  using ProblemShape = cute::Shape<int, int, int, int>;  // M, N, K, L
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue,
                                                          typename Config::TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

 public:
  SparseGemmImpl(const void* w, int64_t out, int64_t in, cudaStream_t stream) : out_(out), in_(in) {
    if (out <= 0 || in <= 0 || out > INT_MAX || in > INT_MAX) fail("shape out of range");
    check_aligned(w, "w", V, out_, in_);
    // Refuse shapes the GEMM cannot take (host-side checks) before touching the
    // device; it checks the compressed layouts too, which depend on M and K only.
    const ProblemShape shape{static_cast<int>(out), 1, static_cast<int>(in), 1};
    weight_.layout_a = CollectiveMainloop::SparseConfig::fill_layoutA(shape);
    weight_.layout_e = CollectiveMainloop::SparseConfig::fill_layoutE(shape);
    const cutlass::Status status = Gemm::can_implement(arguments(nullptr, nullptr, 1));
    if (status != cutlass::Status::kSuccess) fail(with_hint(status_text("can_implement", status)));
    std::string e = sm90_device(hw_info_);
    if (e.empty()) e = compress_sparse(w, static_cast<int>(out), static_cast<int>(in), hw_info_, stream, weight_);
    if (!e.empty()) fail(e);
  }

  void run(const void* x, void* y, int64_t tokens, cudaStream_t stream) override {
    const std::string e = gemm_.run(x, y, tokens, stream, [&](int n) { return arguments(x, y, n); });
    if (!e.empty()) fail(with_hint(e));
  }

  size_t bytes() const override { return weight_.bytes(); }

 private:
  typename Gemm::Arguments arguments(const void* x, void* y, int tokens) const {
    auto args = gemm_arguments<Gemm>(x, y, static_cast<int>(out_), tokens, static_cast<int>(in_), hw_info_);
    args.mainloop.ptr_A = static_cast<const Element*>(weight_.values.get());
    args.mainloop.layout_a = weight_.layout_a;
    args.mainloop.ptr_E = static_cast<const typename CollectiveMainloop::ElementE*>(weight_.metadata.get());
    args.mainloop.layout_e = weight_.layout_e;
    return args;
  }

  // can_implement says only 'Invalid status'; these are the checks it makes on our shapes.
  static std::string with_hint(const std::string& why) {
    return why.rfind("can_implement", 0) == 0 ? why + " (the kernel's TMA needs in % 16 == 0 and out % 8 == 0)"
                                               : why;
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("CUTLASS sparse GEMM " + shape_text(V, out_, in_) + ": " + why);
  }

  int64_t out_, in_;
  cutlass::KernelHardwareInfo hw_info_{};
  CompressedSparse<CollectiveMainloop> weight_;
  CachedGemm<Gemm> gemm_;
};

#endif  // CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED

template <Variant V>
std::unique_ptr<ImplBase> make_impl(const void* w, int64_t out, int64_t in, cudaStream_t stream) {
  // The discarded branch is not instantiated, so SparseGemmImpl may stay undefined there.
  if constexpr (kKernelsBuilt) {
    return std::make_unique<SparseGemmImpl<V>>(w, out, in, stream);
  } else {
    (void)w;
    (void)stream;
    throw std::runtime_error("CUTLASS sparse GEMM " + shape_text(V, out, in) +
                             ": built without sm_90a CUTLASS kernels");
  }
}

}  // namespace patch::deploy::cutlass_sm90::detail
