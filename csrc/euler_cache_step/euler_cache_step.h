// Shared by the CPU and CUDA launchers of flowbp::euler_cache_step: the velocity formats, the float8
// e4m3fn rounding of the fp8 cache, the argument checks that do not depend on the device (each launcher
// checks its device first) and the outputs' shapes and dtypes (flowbp_kernels/_ext.py's fake mirrors them).
// The rounding is c10's (round to nearest even; NaN stays NaN; magnitudes from 464 up, the first value that
// does not round to 448, saturate to +-448, as torch's cast does since it stopped giving NaN there), written
// branch-free so that the CPU loop vectorizes and the CUDA kernel shares it.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../common.h"

namespace flowbp {

constexpr int64_t kFormatFp32 = 0;
constexpr int64_t kFormatBf16 = 1;
constexpr int64_t kFormatFp8 = 2;
// Largest finite float8 e4m3fn; a row's absmax maps to it (ops/reference.py FP8_E4M3_MAX).
constexpr float kFp8Max = 448.0f;
// Smallest scale, so an all-zero row dequantizes to zeros instead of 0/0 (ops/reference.py).
constexpr float kFp8MinScale = 1e-30f;

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

// (x_next, x_cached, v_data, v_scale), allocated on x's device: x_next in the working dtype; x_cached in
// latent_dtype (empty [0] unless write_cached); v_data in v's working dtype (fp32 format; empty unless
// write_data), bfloat16 or float8 e4m3fn; v_scale one fp32 per row of the last dimension (fp8), else empty.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> euler_cache_step_outputs(
    const at::Tensor& x, const at::Tensor& v, int64_t fmt, at::ScalarType latent_dtype, bool write_cached,
    bool write_data) {
  const std::vector<int64_t> none{0};
  at::Tensor x_next = at::empty(x.sizes(), x.options().dtype(working_dtype(x.scalar_type())));
  at::Tensor x_cached = at::empty(write_cached ? x.sizes() : at::IntArrayRef(none), x.options().dtype(latent_dtype));
  at::Tensor v_data, v_scale = at::empty({0}, x.options().dtype(at::kFloat));
  if (fmt == kFormatFp32) {
    v_data = at::empty(write_data ? x.sizes() : at::IntArrayRef(none), x.options().dtype(working_dtype(v.scalar_type())));
  } else if (fmt == kFormatBf16) {
    v_data = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  } else {
    v_data = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
    auto ssize = x.sizes().vec();
    ssize.back() = 1;
    v_scale = at::empty(ssize, x.options().dtype(at::kFloat));
  }
  return {x_next, x_cached, v_data, v_scale};
}

}  // namespace flowbp
