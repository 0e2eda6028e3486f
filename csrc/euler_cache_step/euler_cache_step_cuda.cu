// CUDA kernels of flowbp::euler_cache_step. fp32/bf16 formats: one elementwise pass, kGroup elements per
// thread; fp8: `lanes` threads per row of the last dimension (absmax by shuffles within the row's lanes,
// then quantize in a second sweep over the row, which finds it in L1/L2). Arithmetic avoids contraction
// (__fmul_rn/__fadd_rn, __fdiv_rn) to match ops/reference.py euler_cache_step_ref exactly. Dtypes are
// template parameters chosen on the host: an fp32 state with an fp32/fp16/bf16 velocity and latent takes
// 128-bit loads when every pointer is 16-byte aligned and the size a multiple of kGroup (rows, for fp8);
// anything else (float64, fp16/bf16 states) runs the generic kernel.
#include <torch/library.h>

#include "../cuda_common.cuh"
#include "euler_cache_step.h"

namespace flowbp {
namespace {

// X, V, L: storage types of x, v and the cached latent (all Dyn in the generic kernel). The fp32-format
// data is v in its working dtype (float here, or the exact copy of a float64 v in the generic kernel).
template <typename W, typename X, typename V, typename L, bool kVector>
__global__ void __launch_bounds__(kThreads) euler_elementwise_kernel(
    const void* __restrict__ x, int xc, const void* __restrict__ v, int vc, W h, int64_t n, W* __restrict__ x_next,
    void* __restrict__ x_cached, int lc, void* __restrict__ v_data, int dc, int64_t fmt) {
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t i = g * kGroup;
    W xv[kGroup], vv[kGroup], nx[kGroup];
    load_group<X, kVector>(x, xc, i, n, xv);
    load_group<V, kVector>(v, vc, i, n, vv);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) nx[k] = add_rn(xv[k], mul_rn(h, vv[k]));
    store_group<W, kVector>(x_next, 0, i, n, nx);
    if (x_cached != nullptr) store_group<L, kVector>(x_cached, lc, i, n, xv);
    if (v_data == nullptr) continue;
    if (fmt == kFormatFp32) {
      if constexpr (std::is_same_v<V, Dyn>) {
        double vd[kGroup];  // through double: a float64 v is copied exactly
        load_group<Dyn, false>(v, vc, i, n, vd);
        store_group<Dyn, false>(v_data, dc, i, n, vd);
      } else {
        store_group<float, kVector>(v_data, 0, i, n, vv);  // fp16/bf16 -> fp32 is exact
      }
    } else {
      float vf[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) vf[k] = static_cast<float>(vv[k]);
      store_group<Bf16, kVector>(v_data, 0, i, n, vf);
    }
  }
}

// One row of `cols` elements per `lanes` threads (a power of two <= 32 dividing the warp); each thread
// sweeps groups lane*kGroup, lane*kGroup + lanes*kGroup, ... of its row.
template <typename W, typename X, typename V, typename L, bool kVector>
__global__ void __launch_bounds__(kThreads, 1) euler_fp8_rows_kernel(
    const void* __restrict__ x, int xc, const void* __restrict__ v, int vc, W h, int64_t rows, int64_t cols,
    int lanes, W* __restrict__ x_next, void* __restrict__ x_cached, int lc, uint8_t* __restrict__ q,
    float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const int sub = lane & (lanes - 1);
  const int64_t rows_per_warp = 32 / lanes;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32) * rows_per_warp;
  // warp-uniform loop: every lane reaches the shuffles, lanes of rows past the end contribute nothing
  for (int64_t r0 = warp * rows_per_warp; r0 < rows; r0 += stride) {
    const int64_t r = r0 + lane / lanes;
    const bool active = r < rows;
    const int64_t begin = r * cols, end = active ? begin + cols : begin;
    float amax = 0.0f;
    bool nan = false;
    for (int64_t c = static_cast<int64_t>(sub) * kGroup; c < cols; c += static_cast<int64_t>(lanes) * kGroup) {
      if (!active) break;
      const int64_t i = begin + c;
      W xv[kGroup], vv[kGroup], nx[kGroup];
      load_group<X, kVector>(x, xc, i, end, xv);
      load_group<V, kVector>(v, vc, i, end, vv);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const float vf = static_cast<float>(vv[k]);
        amax = fmaxf(amax, fabsf(vf));  // fmaxf drops NaN: tracked apart, as torch's amax propagates it
        nan |= vf != vf;
        nx[k] = add_rn(xv[k], mul_rn(h, vv[k]));
      }
      store_group<W, kVector>(x_next, 0, i, end, nx);
      if (x_cached != nullptr) store_group<L, kVector>(x_cached, lc, i, end, xv);
    }
    int any_nan = nan ? 1 : 0;
    for (int o = lanes / 2; o > 0; o >>= 1) {  // xor partners stay inside the row's aligned lane group
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      any_nan |= __shfl_xor_sync(0xffffffffu, any_nan, o);
    }
    if (!active) continue;
    const float scale = any_nan ? __int_as_float(0x7fc00000) : fmaxf(__fdiv_rn(amax, kFp8Max), kFp8MinScale);
    if (sub == 0) scales[r] = scale;
    for (int64_t c = static_cast<int64_t>(sub) * kGroup; c < cols; c += static_cast<int64_t>(lanes) * kGroup) {
      const int64_t i = begin + c;
      float vf[kGroup];
      load_group<V, kVector>(v, vc, i, end, vf);
      uint8_t bytes[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) bytes[k] = e4m3fn_bits(__fdiv_rn(vf[k], scale));
      if constexpr (kVector) {
        uint2 packed;
        memcpy(&packed, bytes, sizeof(packed));
        *reinterpret_cast<uint2*>(q + i) = packed;
      } else {
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
          if (i + k < end) q[i + k] = bytes[k];
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> euler_cache_step_cuda(const at::Tensor& x_in,
                                                                                 const at::Tensor& v_in, double h,
                                                                                 int64_t fmt,
                                                                                 at::ScalarType latent_dtype,
                                                                                 bool write_cached, bool write_data) {
  TORCH_CHECK(x_in.is_cuda() && v_in.device() == x_in.device(),
              "flowbp::euler_cache_step: x and v must be on the same CUDA device");
  check_euler_cache_step_args(x_in, v_in, h, fmt, latent_dtype, write_data);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  const auto wd = working_dtype(x.scalar_type());
  at::Tensor x_next, x_cached, v_data, v_scale;
  std::tie(x_next, x_cached, v_data, v_scale) =
      euler_cache_step_outputs(x, v, fmt, latent_dtype, write_cached, write_data);
  const int64_t n = x.numel();
  if (n == 0) return {x_next, x_cached, v_data, v_scale};
  auto stream = at::cuda::getCurrentCUDAStream();
  const int xc = dtype_code(x.scalar_type()), vc = dtype_code(v.scalar_type()), lc = dtype_code(latent_dtype);
  const int dc = fmt == kFormatFp32 ? dtype_code(v_data.scalar_type()) : kBF16;
  void* cp = write_cached ? x_cached.data_ptr() : nullptr;
  void* dp = write_data ? v_data.data_ptr() : nullptr;
  const int64_t cols = fmt == kFormatFp8 ? x.size(-1) : n, rows = n / cols;
  bool aligned = n % kGroup == 0 && cols % kGroup == 0;
  for (const void* p : std::initializer_list<const void*>{x.data_ptr(), v.data_ptr(), x_next.data_ptr(), cp, dp}) {
    aligned = aligned && (p == nullptr || aligned16(p));
  }
  // lanes per fp8 row: enough for one group each, a power of two up to the warp
  int lanes = 1;
  while (lanes < 32 && static_cast<int64_t>(lanes) * kGroup < cols) lanes *= 2;

  auto launch = [&](auto w_tag, auto x_tag, auto v_tag, auto l_tag, auto vec_tag) {
    using W = decltype(w_tag);
    using X = decltype(x_tag);
    using V = decltype(v_tag);
    using L = decltype(l_tag);
    constexpr bool kVec = decltype(vec_tag)::value;
    if (fmt == kFormatFp8) {
      const int64_t rows_per_block = (kThreads / 32) * (32 / lanes);
      euler_fp8_rows_kernel<W, X, V, L, kVec><<<blocks_for(rows, rows_per_block, 1 << 20), kThreads, 0, stream>>>(
          x.data_ptr(), xc, v.data_ptr(), vc, static_cast<W>(h), rows, cols, lanes, x_next.data_ptr<W>(), cp, lc,
          static_cast<uint8_t*>(v_data.data_ptr()), v_scale.data_ptr<float>());
    } else {
      const int64_t groups = (n + kGroup - 1) / kGroup;
      euler_elementwise_kernel<W, X, V, L, kVec><<<blocks_for(groups, kThreads, 1 << 20), kThreads, 0, stream>>>(
          x.data_ptr(), xc, v.data_ptr(), vc, static_cast<W>(h), n, x_next.data_ptr<W>(), cp, lc, dp, dc, fmt);
    }
  };
  const auto small = [](at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; };
  if (wd == at::kFloat && x.scalar_type() == at::kFloat && small(v.scalar_type()) && small(latent_dtype)) {
    with_storage_type(v.scalar_type(), [&](auto v_tag) {
      with_storage_type(latent_dtype, [&](auto l_tag) {
        using V = decltype(v_tag);
        using L = decltype(l_tag);
        if constexpr (!std::is_same_v<V, double> && !std::is_same_v<L, double>) {
          if (aligned) launch(float{}, float{}, v_tag, l_tag, std::true_type{});
          else launch(float{}, float{}, v_tag, l_tag, std::false_type{});
        }
      });
    });
  } else if (wd == at::kDouble) {
    launch(double{}, Dyn{}, Dyn{}, Dyn{}, std::false_type{});
  } else {
    launch(float{}, Dyn{}, Dyn{}, Dyn{}, std::false_type{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_next, x_cached, v_data, v_scale};
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CUDA, m) { m.impl("euler_cache_step", &flowbp::euler_cache_step_cuda); }
