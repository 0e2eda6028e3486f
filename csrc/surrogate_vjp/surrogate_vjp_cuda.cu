// CUDA kernel of flowbp::surrogate_vjp: reads upstream (and adjoint) once per element and writes the
// P cotangents c_m = coefs[m] * (upstream + adjoint), up to kMaxNodes per launch (more: further
// launches over the same inputs). Math: ops/reference.py surrogate_vjp_ref.
#include <torch/library.h>

#include "../cuda_common.cuh"

namespace flowbp {
namespace {

template <typename W>
struct Coefs {
  W c[kMaxNodes];
  int count;
};

template <typename W>
__global__ void vjp_kernel(const void* __restrict__ up, int uc, const void* __restrict__ adj, int adc, Coefs<W> cs,
                           int64_t n, void* __restrict__ out, int oc) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    W g = load_as<W>(up, uc, i);
    if (adj != nullptr) g = g + load_as<W>(adj, adc, i);
#pragma unroll
    for (int m = 0; m < kMaxNodes; ++m) {
      if (m < cs.count) store_as<W>(out, oc, static_cast<int64_t>(m) * n + i, cs.c[m] * g);
    }
  }
}

at::Tensor surrogate_vjp_cuda(const at::Tensor& up_in, const std::optional<at::Tensor>& adj_in,
                              at::ArrayRef<double> coefs, at::ScalarType out_dtype) {
  TORCH_CHECK(up_in.is_cuda(), "flowbp::surrogate_vjp: upstream must be a CUDA tensor");
  check_surrogate_vjp_args(up_in, adj_in, coefs, out_dtype);
  const c10::cuda::CUDAGuard guard(up_in.device());
  at::Tensor up = up_in.contiguous(), adj;
  bool wide = up.scalar_type() == at::kDouble;
  if (adj_in) {
    adj = adj_in->contiguous();
    wide = wide || adj.scalar_type() == at::kDouble;
  }
  const int64_t p = static_cast<int64_t>(coefs.size());
  std::vector<int64_t> size{p};
  for (auto d : up.sizes()) size.push_back(d);
  at::Tensor out = at::empty(size, up.options().dtype(out_dtype));
  const int64_t n = up.numel();
  if (p == 0 || n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int oc = dtype_code(out_dtype);
  const int64_t osize = out.element_size();
  auto launch = [&](auto w_tag) {
    using W = decltype(w_tag);
    for (int64_t m0 = 0; m0 < p; m0 += kMaxNodes) {
      Coefs<W> cs{};
      cs.count = static_cast<int>(std::min<int64_t>(kMaxNodes, p - m0));
      for (int m = 0; m < cs.count; ++m) cs.c[m] = static_cast<W>(coefs[m0 + m]);
      vjp_kernel<W><<<blocks_for(n, kThreads * kUnroll, 1 << 20), kThreads, 0, stream>>>(
          up.data_ptr(), dtype_code(up.scalar_type()), adj.defined() ? adj.data_ptr() : nullptr,
          adj.defined() ? dtype_code(adj.scalar_type()) : 0, cs, n,
          static_cast<char*>(out.data_ptr()) + m0 * n * osize, oc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (wide) launch(double{}); else launch(float{});
  return out;
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CUDA, m) { m.impl("surrogate_vjp", &flowbp::surrogate_vjp_cuda); }
