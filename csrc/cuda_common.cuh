// Device helpers of the flowbp CUDA kernels: element types chosen on the host (templates), 16-byte
// vector loads and stores of a group of kGroup elements, fixed-order block reductions, launch sizes.
// An element type is a storage type (float, double, __half, Bf16) or Dyn, the generic fallback that
// switches on a dtype code per element (float64 states, mixed node dtypes). Every kernel maps the same
// kGroup contiguous elements to the same thread whatever the path (vector, scalar, Dyn), so sums come out
// bit-identical across paths, layouts and runs. Limits: contiguous tensors (the host makes them so).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace flowbp {

constexpr int kThreads = 256;
// Elements per thread per iteration: 16 bytes of a 2-byte type (one 128-bit load), 32 bytes of fp32
// (two independent 128-bit loads in flight per operand).
constexpr int kGroup = 8;
// Largest number of node pointers passed by value in one launch; more nodes chain launches.
constexpr int kMaxNodes = 8;
// Alignment of a 128-bit access.
constexpr int64_t kVecBytes = 16;

// bfloat16 as raw bits: the conversions are our bit-exact ones (common.h), not the intrinsics'.
struct Bf16 {
  uint16_t bits;
};
// The generic element type: the dtype code is passed at run time.
struct Dyn {};

template <typename T>
struct Elem;  // load(p, code, i) -> W; store(p, code, i, W)

template <>
struct Elem<float> {
  template <typename W>
  __device__ static W load(const void* p, int, int64_t i) { return static_cast<W>(static_cast<const float*>(p)[i]); }
  template <typename W>
  __device__ static void store(void* p, int, int64_t i, W v) { static_cast<float*>(p)[i] = static_cast<float>(v); }
};
template <>
struct Elem<double> {
  template <typename W>
  __device__ static W load(const void* p, int, int64_t i) { return static_cast<W>(static_cast<const double*>(p)[i]); }
  template <typename W>
  __device__ static void store(void* p, int, int64_t i, W v) { static_cast<double*>(p)[i] = static_cast<double>(v); }
};
template <>
struct Elem<__half> {
  template <typename W>
  __device__ static W load(const void* p, int, int64_t i) {
    return static_cast<W>(__half2float(static_cast<const __half*>(p)[i]));
  }
  template <typename W>
  __device__ static void store(void* p, int, int64_t i, W v) {
    static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v));
  }
};
template <>
struct Elem<Bf16> {
  template <typename W>
  __device__ static W load(const void* p, int, int64_t i) {
    return static_cast<W>(bf16_to_f32(static_cast<const uint16_t*>(p)[i]));
  }
  template <typename W>
  __device__ static void store(void* p, int, int64_t i, W v) {
    static_cast<uint16_t*>(p)[i] = bf16_bits(static_cast<float>(v));
  }
};
template <>
struct Elem<Dyn> {
  template <typename W>
  __device__ static W load(const void* p, int code, int64_t i) {
    switch (code) {
      case kF32: return Elem<float>::load<W>(p, code, i);
      case kF64: return Elem<double>::load<W>(p, code, i);
      case kF16: return Elem<__half>::load<W>(p, code, i);
      default: return Elem<Bf16>::load<W>(p, code, i);
    }
  }
  template <typename W>
  __device__ static void store(void* p, int code, int64_t i, W v) {
    switch (code) {
      case kF32: Elem<float>::store<W>(p, code, i, v); break;
      case kF64: Elem<double>::store<W>(p, code, i, v); break;
      case kF16: Elem<__half>::store<W>(p, code, i, v); break;
      default: Elem<Bf16>::store<W>(p, code, i, v); break;
    }
  }
};

// Bytes of one element of a storage type (Dyn is never vectorized).
template <typename T>
constexpr int elem_bytes() {
  return std::is_same_v<T, Bf16> ? 2 : static_cast<int>(sizeof(T));
}

// Bytes of one element of storage type T, or of dtype `code` when T is Dyn.
template <typename T>
__device__ __forceinline__ int64_t bytes_of(int code) {
  if constexpr (std::is_same_v<T, Dyn>) return code == kF64 ? 8 : (code == kF32 ? 4 : 2);
  else return elem_bytes<T>();
}

// Group g of a tensor of storage type T as W: elements [i, i + kGroup). kVector: i is a multiple of
// kGroup and the pointer 16-byte aligned, so the group is read with 128-bit loads; else element by
// element, only those below `end` (the tail of a row or tensor), the rest left at zero.
template <typename T, bool kVector, typename W>
__device__ __forceinline__ void load_group(const void* p, int code, int64_t i, int64_t end, W (&out)[kGroup]) {
  if constexpr (kVector && !std::is_same_v<T, Dyn>) {
    constexpr int kChunks = kGroup * elem_bytes<T>() / 16;
    constexpr int kPer = 16 / elem_bytes<T>();
    const uint4* q = reinterpret_cast<const uint4*>(static_cast<const char*>(p) + i * elem_bytes<T>());
    uint4 raw[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) raw[c] = q[c];  // all loads issued before the first conversion
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const void* words = &raw[c];
#pragma unroll
      for (int k = 0; k < kPer; ++k) out[c * kPer + k] = Elem<T>::template load<W>(words, code, k);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) out[k] = i + k < end ? Elem<T>::template load<W>(p, code, i + k) : W(0);
  }
}

// Stores group [i, i + kGroup) (only the elements below `end` on the scalar path).
template <typename T, bool kVector, typename W>
__device__ __forceinline__ void store_group(void* p, int code, int64_t i, int64_t end, const W (&v)[kGroup]) {
  if constexpr (kVector && !std::is_same_v<T, Dyn>) {
    constexpr int kChunks = kGroup * elem_bytes<T>() / 16;
    constexpr int kPer = 16 / elem_bytes<T>();
    uint4* q = reinterpret_cast<uint4*>(static_cast<char*>(p) + i * elem_bytes<T>());
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      uint4 raw;
      void* words = &raw;
#pragma unroll
      for (int k = 0; k < kPer; ++k) Elem<T>::template store<W>(words, code, k, v[c * kPer + k]);
      q[c] = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (i + k < end) Elem<T>::template store<W>(p, code, i + k, v[k]);
    }
  }
}

template <typename W>
__device__ __forceinline__ W add_rn(W a, W b) {
  if constexpr (std::is_same_v<W, float>) return __fadd_rn(a, b); else return __dadd_rn(a, b);
}
template <typename W>
__device__ __forceinline__ W mul_rn(W a, W b) {
  if constexpr (std::is_same_v<W, float>) return __fmul_rn(a, b); else return __dmul_rn(a, b);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of `v` over the block (kThreads threads) in a fixed order; the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[kThreads / 32];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  T s = T(0);
  if (threadIdx.x < 32) {
    s = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : T(0);
    s = warp_sum(s);
  }
  return s;
}

inline int64_t blocks_for(int64_t n, int64_t per_block, int64_t cap = 65535) {
  return std::max<int64_t>(1, std::min<int64_t>(cap, (n + per_block - 1) / per_block));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Host: call f(tag) with a value of the storage type of dtype t (float, double, __half or Bf16).
template <typename F>
inline void with_storage_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(Bf16{}); break;
    default: TORCH_CHECK(false, "flowbp: unsupported dtype ", t);
  }
}

}  // namespace flowbp
