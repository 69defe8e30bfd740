#pragma once
// The one place an op with a CUDA path chooses it: `x.cpp` calls
// core::dispatch(tensor, "op", cuda_path, cpu_path) in place of its own
// `#if PATCH_WITH_CUDA ... is_cuda()` block. In a build without
// PATCH_WITH_CUDA the CUDA path is never called, so its kernels (declared in
// `x.h` for every build) need no definition there.
#include <ATen/ATen.h>

#include "core/error.h"

namespace patch::core {

// Runs on_cuda() for a CUDA tensor in a build with PATCH_WITH_CUDA, on_cpu()
// for a CPU tensor; anything else is a one-line core::Error naming `op`.
template <class OnCuda, class OnCpu>
decltype(auto) dispatch(const at::Tensor& t, const char* op, [[maybe_unused]] OnCuda&& on_cuda, OnCpu&& on_cpu) {
#if PATCH_WITH_CUDA
  if (t.is_cuda()) return on_cuda();
#endif
  check(t.is_cpu(), op,
        t.is_cuda() ? "CUDA tensors need a build with PATCH_WITH_CUDA" : "expected a CPU or CUDA tensor, got " + t.device().str());
  return on_cpu();
}

}  // namespace patch::core
