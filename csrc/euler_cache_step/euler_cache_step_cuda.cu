// CUDA kernels of flowbp::euler_cache_step. fp32/bf16 formats: one elementwise pass (grid-stride);
// fp8: one warp per row of the last dimension (absmax by warp shuffle, then quantize in the same
// pass over the row, which the second read finds in L1/L2). Arithmetic avoids contraction
// (__fmul_rn/__fadd_rn) to match ops/reference.py euler_cache_step_ref exactly.
#include <torch/library.h>

#include "../cuda_common.cuh"

namespace flowbp {
namespace {

template <typename W>
__device__ __forceinline__ W mul_rn(W a, W b) {
  if constexpr (std::is_same_v<W, float>) return __fmul_rn(a, b); else return __dmul_rn(a, b);
}
template <typename W>
__device__ __forceinline__ W add_rn(W a, W b) {
  if constexpr (std::is_same_v<W, float>) return __fadd_rn(a, b); else return __dadd_rn(a, b);
}

template <typename W>
__global__ void euler_elementwise_kernel(const void* __restrict__ x, int xc, const void* __restrict__ v, int vc,
                                         W h, int64_t n, W* __restrict__ x_next, void* __restrict__ x_cached, int lc,
                                         void* __restrict__ v_data, int dc, int64_t fmt) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const W xv = load_as<W>(x, xc, i);
    const W vv = load_as<W>(v, vc, i);
    x_next[i] = add_rn(xv, mul_rn(h, vv));
    if (x_cached != nullptr) store_as<W>(x_cached, lc, i, xv);
    if (v_data == nullptr) continue;
    if (fmt == kFormatFp32) {
      if (vc == kF64) static_cast<double*>(v_data)[i] = static_cast<const double*>(v)[i];
      else store_as<W>(v_data, dc, i, vv);
    } else {
      static_cast<uint16_t*>(v_data)[i] = bf16_bits(load_as<float>(v, vc, i));
    }
  }
}

template <typename W>
__global__ void euler_fp8_rows_kernel(const void* __restrict__ x, int xc, const void* __restrict__ v, int vc, W h,
                                      int64_t rows, int64_t cols, W* __restrict__ x_next, void* __restrict__ x_cached,
                                      int lc, uint8_t* __restrict__ q, float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t base = r * cols;
    float amax = 0.0f;
    bool nan = false;
    for (int64_t c = lane; c < cols; c += 32) {
      const int64_t i = base + c;
      const float vf = load_as<float>(v, vc, i);
      amax = fmaxf(amax, fabsf(vf));
      nan |= vf != vf;
      const W xv = load_as<W>(x, xc, i);
      x_next[i] = add_rn(xv, mul_rn(h, load_as<W>(v, vc, i)));
      if (x_cached != nullptr) store_as<W>(x_cached, lc, i, xv);
    }
    amax = warp_max(amax);
    nan = __any_sync(0xffffffffu, nan);
    const float scale = nan ? __int_as_float(0x7fc00000) : fmaxf(__fdiv_rn(amax, kFp8Max), kFp8MinScale);
    if (lane == 0) scales[r] = scale;
    for (int64_t c = lane; c < cols; c += 32) q[base + c] = e4m3fn_bits(__fdiv_rn(load_as<float>(v, vc, base + c), scale));
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
  at::Tensor x_next = at::empty(x.sizes(), x.options().dtype(wd));
  const std::vector<int64_t> none{0};
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
  const int64_t n = x.numel();
  if (n == 0) return {x_next, x_cached, v_data, v_scale};
  auto stream = at::cuda::getCurrentCUDAStream();
  const int xc = dtype_code(x.scalar_type()), vc = dtype_code(v.scalar_type()), lc = dtype_code(latent_dtype);
  auto launch = [&](auto w_tag) {
    using W = decltype(w_tag);
    if (fmt == kFormatFp8) {
      const int64_t cols = x.size(-1), rows = n / cols;
      euler_fp8_rows_kernel<W><<<blocks_for(rows, kThreads / 32, 1 << 20), kThreads, 0, stream>>>(
          x.data_ptr(), xc, v.data_ptr(), vc, static_cast<W>(h), rows, cols, x_next.data_ptr<W>(),
          write_cached ? x_cached.data_ptr() : nullptr, lc, static_cast<uint8_t*>(v_data.data_ptr()), v_scale.data_ptr<float>());
    } else {
      const int dc = fmt == kFormatFp32 ? dtype_code(v_data.scalar_type()) : kBF16;
      euler_elementwise_kernel<W><<<blocks_for(n, kThreads * kUnroll, 1 << 20), kThreads, 0, stream>>>(
          x.data_ptr(), xc, v.data_ptr(), vc, static_cast<W>(h), n, x_next.data_ptr<W>(),
          write_cached ? x_cached.data_ptr() : nullptr, lc, write_data ? v_data.data_ptr() : nullptr, dc, fmt);
    }
  };
  if (wd == at::kDouble) launch(double{}); else launch(float{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_next, x_cached, v_data, v_scale};
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CUDA, m) { m.impl("euler_cache_step", &flowbp::euler_cache_step_cuda); }
