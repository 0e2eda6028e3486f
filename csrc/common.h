// Shared helpers of the flowbp kernels: dtype codes, bit-exact roundings, block loads for the CPU kernels.
// The roundings are those of c10 (round to nearest even; bf16 NaN -> quiet NaN; e4m3fn: NaN stays NaN and
// magnitudes from 464 up, the first value that does not round to 448, saturate to +-448, as torch's cast
// does since it stopped giving NaN there), written branch-free so that the CPU loops vectorize and the CUDA
// kernels share them. Limits: float, double, half and bfloat16 inputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

namespace flowbp {

constexpr int64_t kFormatFp32 = 0;
constexpr int64_t kFormatBf16 = 1;
constexpr int64_t kFormatFp8 = 2;
// Largest finite float8 e4m3fn; a row's absmax maps to it (ops/reference.py FP8_E4M3_MAX).
constexpr float kFp8Max = 448.0f;
// Smallest scale, so an all-zero row dequantizes to zeros instead of 0/0 (ops/reference.py).
constexpr float kFp8MinScale = 1e-30f;

// Dtype codes passed to the CUDA kernels (one switch per load, uniform across a launch).
enum DtypeCode : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Host check shared by the CPU and CUDA launchers: `t` (argument `name` of op `op`) must sit on the
// anchor's device, with its shape and a supported dtype.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& anchor) {
  TORCH_CHECK(t.device() == anchor.device(), op, ": ", name, " must be on ", anchor.device(), ", got ", t.device());
  TORCH_CHECK(t.sizes() == anchor.sizes(), op, ": ", name, " must have the anchor's shape ", anchor.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name, " must be float32/float64/float16/bfloat16, got ",
              t.scalar_type());
}

// Device-independent argument checks of flowbp::euler_cache_step (each launcher checks its device).
inline void check_euler_cache_step_args(const at::Tensor& x, const at::Tensor& v, double h, int64_t fmt,
                                        at::ScalarType latent_dtype, bool write_data) {
  TORCH_CHECK(x.sizes() == v.sizes(), "flowbp::euler_cache_step: v must have the shape of x ", x.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()) && supported_dtype(v.scalar_type()) && supported_dtype(latent_dtype),
              "flowbp::euler_cache_step: x, v and latent_dtype must be float32/float64/float16/bfloat16");
  TORCH_CHECK(fmt == kFormatFp32 || fmt == kFormatBf16 || fmt == kFormatFp8,
              "flowbp::euler_cache_step: velocity_format must be 0 (fp32), 1 (bf16) or 2 (fp8), got ", fmt);
  TORCH_CHECK(fmt != kFormatFp8 || x.dim() >= 1, "flowbp::euler_cache_step: fp8 needs at least one dimension");
  TORCH_CHECK(std::isfinite(h), "flowbp::euler_cache_step: h must be finite");
  TORCH_CHECK(write_data || fmt == kFormatFp32, "flowbp::euler_cache_step: write_data=False needs format 0 (fp32)");
}

// Device-independent argument checks of flowbp::surrogate_vjp (each launcher checks its device).
inline void check_surrogate_vjp_args(const at::Tensor& up, const std::optional<at::Tensor>& adj,
                                     at::ArrayRef<double> coefs, at::ScalarType out_dtype) {
  TORCH_CHECK(supported_dtype(up.scalar_type()) && supported_dtype(out_dtype),
              "flowbp::surrogate_vjp: upstream and out_dtype must be float32/float64/float16/bfloat16");
  for (double c : coefs) TORCH_CHECK(std::isfinite(c), "flowbp::surrogate_vjp: coefs must be finite");
  if (adj) {
    TORCH_CHECK(adj->device() == up.device(), "flowbp::surrogate_vjp: adjoint must be on ", up.device());
    TORCH_CHECK(adj->sizes() == up.sizes(), "flowbp::surrogate_vjp: adjoint must have the upstream's shape ",
                up.sizes(), ", got ", adj->sizes());
    TORCH_CHECK(supported_dtype(adj->scalar_type()), "flowbp::surrogate_vjp: unsupported adjoint dtype");
  }
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

// float -> float8 e4m3fn bits, round to nearest even (as c10::Float8_e4m3fn): NaN gives NaN (0x7F),
// magnitudes >= 464 (infinity included) saturate to 448 (0x7E); below 2^-6 the subnormal grid 2^-9 is
// reached by adding 2^14 (denorm trick). The op only quantizes v / scale with |v / scale| <= 448.
C10_HOST_DEVICE inline uint8_t e4m3fn_bits(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = u & 0x80000000u;
  uint32_t a = u ^ sign;
  const uint32_t kSaturateFrom = 0x43E80000u;  // 464.0f, halfway from 448 to the next (absent) step
  const uint32_t kInfBits = 0x7F800000u;       // above it: NaN
  const uint32_t kNormalFrom = 121u << 23;     // 2^-6
  const uint32_t kDenormMagic = 141u << 23;    // 2^14
  uint32_t sub = f32_bits(f32_from_bits(a) + f32_from_bits(kDenormMagic)) - kDenormMagic;
  uint32_t norm = (a + ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
  uint32_t r = a > kInfBits ? 0x7Fu : (a >= kSaturateFrom ? 0x7Eu : (a < kNormalFrom ? sub : norm));
  return static_cast<uint8_t>(r | (sign >> 24));
}

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
