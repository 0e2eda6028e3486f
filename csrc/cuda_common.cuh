// Device helpers of the flowbp CUDA kernels: loads and stores by dtype code (a switch on a value that
// is uniform across the launch, so it costs no divergence), block reductions, launch checks.
// Limits: float/double/half/bfloat16 tensors, contiguous (the host functions make them so).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace flowbp {

constexpr int kThreads = 256;
// Elements per thread per loop iteration: enough independent loads in flight for memory-bound ops.
constexpr int kUnroll = 4;
// Largest number of node pointers passed by value in one launch; more are folded on the host.
constexpr int kMaxNodes = 8;

template <typename W>
__device__ __forceinline__ W load_as(const void* p, int code, int64_t i) {
  switch (code) {
    case kF32: return static_cast<W>(static_cast<const float*>(p)[i]);
    case kF64: return static_cast<W>(static_cast<const double*>(p)[i]);
    case kF16: return static_cast<W>(__half2float(static_cast<const __half*>(p)[i]));
    default: return static_cast<W>(bf16_to_f32(static_cast<const uint16_t*>(p)[i]));
  }
}

template <typename W>
__device__ __forceinline__ void store_as(void* p, int code, int64_t i, W v) {
  switch (code) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case kF64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    default: static_cast<uint16_t*>(p)[i] = bf16_bits(static_cast<float>(v)); break;
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

inline int64_t blocks_for(int64_t n, int64_t per_block, int64_t cap = 65535) {
  return std::max<int64_t>(1, std::min<int64_t>(cap, (n + per_block - 1) / per_block));
}

}  // namespace flowbp
