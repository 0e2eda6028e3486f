// Helpers every flowbp kernel shares: dtype codes, the working dtype, bit-exact bfloat16 roundings, block
// loads and stores for the CPU kernels. The roundings are those of c10 (round to nearest even; bf16 NaN ->
// quiet NaN), written branch-free so that the CPU loops vectorize and the CUDA kernels share them. An op's
// own host code (argument checks, output shapes, its formats) lives in its folder: csrc/<op>/<op>.h.
// Limits: float, double, half and bfloat16 inputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace flowbp {

// Dtype codes passed to the CUDA kernels (one switch per load, uniform across a launch).
enum DtypeCode : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "flowbp: unsupported dtype ", t);
  }
  return kF32;
}

// Working dtype of the surrogate arithmetic: float64 stays, everything else is fp32 (reference.py).
inline at::ScalarType working_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

C10_HOST_DEVICE inline uint32_t f32_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

C10_HOST_DEVICE inline float f32_from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// float -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16).
C10_HOST_DEVICE inline uint16_t bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

C10_HOST_DEVICE inline float bf16_to_f32(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

#ifndef __CUDACC__
// ---- CPU block helpers: convert a span of any supported dtype to the working type W in a buffer ----

template <typename W, typename S>
inline void convert_span(const S* src, int64_t n, W* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<W>(static_cast<float>(src[i]));
}

template <typename W>
inline void convert_bf16_span(const uint16_t* src, int64_t n, W* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<W>(bf16_to_f32(src[i]));
}

// Returns a pointer to n values of the tensor data `p` (dtype t) from element `begin`, as W: the data
// itself when it is already W, else converted into `tmp`.
template <typename W>
inline const W* load_span(const void* p, at::ScalarType t, int64_t begin, int64_t n, W* tmp) {
  switch (t) {
    case at::kFloat:
      if constexpr (std::is_same_v<W, float>) return static_cast<const float*>(p) + begin;
      for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<W>(static_cast<const float*>(p)[begin + i]);
      return tmp;
    case at::kDouble:
      if constexpr (std::is_same_v<W, double>) return static_cast<const double*>(p) + begin;
      for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<W>(static_cast<const double*>(p)[begin + i]);
      return tmp;
    case at::kHalf:
      convert_span<W>(static_cast<const c10::Half*>(p) + begin, n, tmp);
      return tmp;
    case at::kBFloat16:
      convert_bf16_span<W>(static_cast<const uint16_t*>(p) + begin, n, tmp);
      return tmp;
    default:
      TORCH_CHECK(false, "flowbp: unsupported dtype ", t);
  }
  return tmp;
}

// Stores n values of W to tensor data `p` (dtype t) from element `begin`, rounding as torch's .to().
template <typename W>
inline void store_span(void* p, at::ScalarType t, int64_t begin, int64_t n, const W* vals) {
  switch (t) {
    case at::kFloat: {
      float* d = static_cast<float*>(p) + begin;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(vals[i]);
      return;
    }
    case at::kDouble: {
      double* d = static_cast<double*>(p) + begin;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(vals[i]);
      return;
    }
    case at::kHalf: {
      c10::Half* d = static_cast<c10::Half*>(p) + begin;
      for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(static_cast<float>(vals[i]));
      return;
    }
    case at::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(p) + begin;
      for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits(static_cast<float>(vals[i]));
      return;
    }
    default:
      TORCH_CHECK(false, "flowbp: unsupported dtype ", t);
  }
}

// Elements per inner block: the block's buffers stay in L1 while every input is read once.
constexpr int64_t kBlock = 1024;
// Elements per parallel task: large enough that OpenMP scheduling costs nothing measurable.
constexpr int64_t kTaskElems = 32768;
#endif  // __CUDACC__

}  // namespace flowbp
