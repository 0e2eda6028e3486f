// CUDA kernel of flowbp::surrogate_vjp: reads upstream (and adjoint) once per element and writes the
// P cotangents c_m = coefs[m] * (upstream + adjoint), up to kMaxNodes per launch (more: further
// launches over the same inputs). Math: ops/reference.py surrogate_vjp_ref. Dtypes are template
// parameters chosen on the host: fp32 upstream/adjoint with fp32/fp16/bf16 cotangents take 128-bit
// loads and stores when every pointer is 16-byte aligned and the size a multiple of kGroup; anything
// else (float64, a low-precision adjoint) runs the generic kernel.
#include <torch/library.h>

#include "../cuda_common.cuh"
#include "surrogate_vjp.h"

namespace flowbp {
namespace {

template <typename W>
struct Coefs {
  W c[kMaxNodes];
  int count;
};

// G, A, O: storage types of upstream, adjoint and the cotangents (all Dyn in the generic kernel).
template <typename W, typename G, typename A, typename O, bool kVector>
__global__ void __launch_bounds__(kThreads) vjp_kernel(const void* __restrict__ up, int uc,
                                                       const void* __restrict__ adj, int adc, Coefs<W> cs, int64_t n,
                                                       void* __restrict__ out, int oc) {
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t i = g * kGroup;
    W gv[kGroup], c[kGroup];
    load_group<G, kVector>(up, uc, i, n, gv);
    if (adj != nullptr) {
      load_group<A, kVector>(adj, adc, i, n, c);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) gv[k] = add_rn(gv[k], c[k]);
    }
#pragma unroll
    for (int m = 0; m < kMaxNodes; ++m) {
      if (m < cs.count) {
#pragma unroll
        for (int k = 0; k < kGroup; ++k) c[k] = mul_rn(cs.c[m], gv[k]);
        // cotangent m starts at element m * n: 16-byte aligned because n is a multiple of kGroup
        store_group<O, kVector>(static_cast<char*>(out) + static_cast<int64_t>(m) * n * bytes_of<O>(oc), oc, i,
                                n, c);
      }
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
  at::Tensor out = at::empty(stacked_size(up, p), up.options().dtype(out_dtype));
  const int64_t n = up.numel();
  if (p == 0 || n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int oc = dtype_code(out_dtype);
  const int64_t osize = out.element_size();
  const bool fast = !wide && up.scalar_type() == at::kFloat && (!adj.defined() || adj.scalar_type() == at::kFloat) &&
                    out_dtype != at::kDouble;
  bool aligned = n % kGroup == 0 && aligned16(up.data_ptr()) && aligned16(out.data_ptr());
  if (adj.defined()) aligned = aligned && aligned16(adj.data_ptr());
  auto launch = [&](auto w_tag, auto g_tag, auto o_tag, auto vec_tag) {
    using W = decltype(w_tag);
    using G = decltype(g_tag);
    using O = decltype(o_tag);
    constexpr bool kVec = decltype(vec_tag)::value;
    for (int64_t m0 = 0; m0 < p; m0 += kMaxNodes) {
      Coefs<W> cs{};
      cs.count = static_cast<int>(std::min<int64_t>(kMaxNodes, p - m0));
      for (int m = 0; m < cs.count; ++m) cs.c[m] = static_cast<W>(coefs[m0 + m]);
      vjp_kernel<W, G, G, O, kVec><<<blocks_for((n + kGroup - 1) / kGroup, kThreads, 1 << 20), kThreads, 0, stream>>>(
          up.data_ptr(), dtype_code(up.scalar_type()), adj.defined() ? adj.data_ptr() : nullptr,
          adj.defined() ? dtype_code(adj.scalar_type()) : 0, cs, n, static_cast<char*>(out.data_ptr()) + m0 * n * osize,
          oc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (fast) {
    with_storage_type(out_dtype, [&](auto o_tag) {
      if constexpr (!std::is_same_v<decltype(o_tag), double>) {
        if (aligned) launch(float{}, float{}, o_tag, std::true_type{});
        else launch(float{}, float{}, o_tag, std::false_type{});
      }
    });
  } else if (wide) {
    launch(double{}, Dyn{}, Dyn{}, std::false_type{});
  } else {
    launch(float{}, Dyn{}, Dyn{}, std::false_type{});
  }
  return out;
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CUDA, m) { m.impl("surrogate_vjp", &flowbp::surrogate_vjp_cuda); }
