#pragma once
// PATCH_HD marks the small math functions that a CPU reference and its CUDA
// kernel share (one header per op): __host__ __device__ under nvcc, inline
// elsewhere.
#if defined(__CUDACC__)
#define PATCH_HD __host__ __device__ __forceinline__
#else
#define PATCH_HD inline
#endif
