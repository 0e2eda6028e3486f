// CPU kernel of flowbp::euler_cache_step: x_next = x + h v, x_cached = x.to(latent_dtype), and v
// compressed (fp32 copy / bf16 / e4m3fn with one fp32 scale per row of the last dimension), in one
// pass over x and v. Math: ops/reference.py euler_cache_step_ref (same fp32 operations in the same
// order, so results are bit-identical when the compiler does not contract a*b+c, see setup.py).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "euler_cache_step.h"

namespace flowbp {
namespace {

template <typename W>
void euler_rows(const at::Tensor& x, const at::Tensor& v, double h, int64_t fmt, bool write_cached, bool write_data,
                at::Tensor& x_next, at::Tensor& x_cached, at::Tensor& v_data, at::Tensor& v_scale) {
  const int64_t numel = x.numel();
  const int64_t cols = x.dim() == 0 ? 1 : x.size(-1);
  const int64_t rows = cols == 0 ? 0 : numel / cols;
  const W hw = static_cast<W>(h);
  const void* xp = x.data_ptr();
  const void* vp = v.data_ptr();
  const auto xt = x.scalar_type(), vt = v.scalar_type(), lt = x_cached.scalar_type();
  W* np = x_next.data_ptr<W>();
  void* cp = write_cached ? x_cached.data_ptr() : nullptr;
  void* dp = write_data ? v_data.data_ptr() : nullptr;
  const auto dt = v_data.scalar_type();
  const bool raw_copy = fmt == kFormatFp32 && (vt == at::kFloat || vt == at::kDouble);
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(cols, 1));

  // Blocks hold whole rows (about kBlock elements), so the fp8 rows are quantized while the block's
  // velocities are still in L1.
  const int64_t rows_per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(cols, 1));
  const int64_t buf = rows_per_block * cols;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<W> xb(buf), vb(buf);
    std::vector<float> vf(buf);
    for (int64_t rb = r0; rb < r1; rb += rows_per_block) {
      const int64_t nrows = std::min(rows_per_block, r1 - rb);
      const int64_t b = rb * cols, n = nrows * cols;
      const W* xs = load_span<W>(xp, xt, b, n, xb.data());
      const W* vs = load_span<W>(vp, vt, b, n, vb.data());
      W* out = np + b;
      for (int64_t i = 0; i < n; ++i) out[i] = xs[i] + hw * vs[i];
      if (write_cached) store_span<W>(cp, lt, b, n, xs);
      if (!write_data) continue;
      if (raw_copy) {
        const int64_t es = v.element_size();
        std::memcpy(static_cast<char*>(dp) + b * es, static_cast<const char*>(vp) + b * es, n * es);
      } else if (fmt == kFormatFp32) {
        store_span<W>(dp, dt, b, n, vs);  // half/bf16 -> fp32 is exact through W
      } else if (fmt == kFormatBf16) {
        const float* v32 = load_span<float>(vp, vt, b, n, vf.data());
        uint16_t* d = static_cast<uint16_t*>(dp) + b;
        for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits(v32[i]);
      } else {
        const float* v32 = load_span<float>(vp, vt, b, n, vf.data());
        float* sp = v_scale.data_ptr<float>() + rb;
        uint8_t* q = static_cast<uint8_t*>(dp) + b;
        for (int64_t r = 0; r < nrows; ++r) {
          const float* row = v32 + r * cols;
          float amax = 0.0f;
          uint32_t nan = 0;
          // max of non-NaN values is order-free, so the SIMD reduction is exact; NaN is tracked apart
          // because torch's amax() propagates it and the max idiom does not.
#pragma omp simd reduction(max : amax) reduction(| : nan)
          for (int64_t i = 0; i < cols; ++i) {
            const float a = std::fabs(row[i]);
            amax = a > amax ? a : amax;
            nan |= static_cast<uint32_t>(f32_bits(a) > 0x7F800000u);
          }
          const float scale = nan ? NAN : std::max(amax / kFp8Max, kFp8MinScale);
          sp[r] = scale;
          uint8_t* qr = q + r * cols;
          // qr (uint8_t) may alias anything for the compiler, which then keeps this loop scalar
#pragma omp simd
          for (int64_t i = 0; i < cols; ++i) qr[i] = e4m3fn_bits(row[i] / scale);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> euler_cache_step_cpu(const at::Tensor& x_in,
                                                                                const at::Tensor& v_in, double h,
                                                                                int64_t fmt,
                                                                                at::ScalarType latent_dtype,
                                                                                bool write_cached, bool write_data) {
  TORCH_CHECK(x_in.device().is_cpu() && v_in.device().is_cpu(), "flowbp::euler_cache_step: x and v must be on CPU");
  check_euler_cache_step_args(x_in, v_in, h, fmt, latent_dtype, write_data);
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  const auto wd = working_dtype(x.scalar_type());
  at::Tensor x_next, x_cached, v_data, v_scale;
  std::tie(x_next, x_cached, v_data, v_scale) =
      euler_cache_step_outputs(x, v, fmt, latent_dtype, write_cached, write_data);
  if (x.numel() == 0) return {x_next, x_cached, v_data, v_scale};
  if (wd == at::kDouble) {
    euler_rows<double>(x, v, h, fmt, write_cached, write_data, x_next, x_cached, v_data, v_scale);
  } else {
    euler_rows<float>(x, v, h, fmt, write_cached, write_data, x_next, x_cached, v_data, v_scale);
  }
  return {x_next, x_cached, v_data, v_scale};
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CPU, m) { m.impl("euler_cache_step", &flowbp::euler_cache_step_cpu); }
