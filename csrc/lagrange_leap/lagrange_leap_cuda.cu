// CUDA kernel of flowbp::lagrange_leap_fwd: one pass reads anchor, base, up to kMaxNodes nodes and target,
// writes out and one partial residual sum per block; a second, one-block-per-sample launch adds the partials
// in a fixed order (run-to-run identical residuals, unlike atomics). More than kMaxNodes nodes chain
// launches through `out` (the next launch takes out as its anchor), so the additions keep the order of
// ops/reference.py lagrange_leap_ref and no input is ever written. Dtypes are template parameters chosen
// on the host: fp32 anchor/base/target with fp32/fp16/bf16 nodes of one dtype take 128-bit loads when
// every pointer is 16-byte aligned; anything else (float64, mixed node dtypes) runs the generic kernel.
#include <torch/library.h>

#include "../cuda_common.cuh"
#include "lagrange_leap.h"

namespace flowbp {
namespace {

template <typename W>
struct Nodes {
  const void* ptr[kMaxNodes];
  int code[kMaxNodes];
  W weight[kMaxNodes];
  int count;
};

struct Operand {
  const void* ptr;
  int code;
};

// S: storage type of anchor, base and target (W, or Dyn); U: of the nodes. anchor may alias out (chained
// launches): each thread reads its group before writing it, and neither pointer is __restrict__.
template <typename W, typename S, typename U, bool kVector>
__global__ void __launch_bounds__(kThreads) leap_kernel(Operand anchor, Operand base, Nodes<W> nodes, Operand target,
                                                        int64_t per, W* out, double* __restrict__ partial) {
  const int64_t b = blockIdx.y;
  const int64_t off = b * per;
  const int64_t groups = (per + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  W local = 0;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t i = off + g * kGroup, end = off + per;
    W x[kGroup], t[kGroup];
    load_group<S, kVector>(anchor.ptr, anchor.code, i, end, x);
    if (base.ptr != nullptr) {
      load_group<S, kVector>(base.ptr, base.code, i, end, t);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) x[k] = add_rn(x[k], t[k]);
    }
#pragma unroll
    for (int m = 0; m < kMaxNodes; ++m) {
      if (m < nodes.count) {
        load_group<U, kVector>(nodes.ptr[m], nodes.code[m], i, end, t);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) x[k] = add_rn(x[k], mul_rn(nodes.weight[m], t[k]));
      }
    }
    if (target.ptr != nullptr) {
      load_group<S, kVector>(target.ptr, target.code, i, end, t);
      store_group<W, kVector>(out, 0, i, end, t);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) local += x[k] > t[k] ? x[k] - t[k] : t[k] - x[k];  // tail: 0 - 0
    } else {
      store_group<W, kVector>(out, 0, i, end, x);
    }
  }
  if (target.ptr == nullptr) return;
  const W s = block_sum(local);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = static_cast<double>(s);
}

// residual[b] = sum of the sample's `parts` partials (fixed order) / per.
template <typename W>
__global__ void __launch_bounds__(kThreads) residual_kernel(const double* __restrict__ partial, int64_t parts,
                                                            int64_t per, W* __restrict__ residual) {
  const int64_t b = blockIdx.x;
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < parts; j += blockDim.x) s += partial[b * parts + j];
  s = block_sum(s);
  if (threadIdx.x == 0) residual[b] = static_cast<W>(s / static_cast<double>(per));
}

template <typename W, typename S, typename U>
void launch_leap(bool vector, dim3 grid, cudaStream_t stream, Operand a, Operand bs, const Nodes<W>& nd, Operand t,
                 int64_t per, W* out, double* partial) {
  if constexpr (!std::is_same_v<S, Dyn> && !std::is_same_v<U, Dyn>) {
    if (vector) {
      leap_kernel<W, S, U, true><<<grid, kThreads, 0, stream>>>(a, bs, nd, t, per, out, partial);
      return;
    }
  }
  leap_kernel<W, S, U, false><<<grid, kThreads, 0, stream>>>(a, bs, nd, t, per, out, partial);
}

std::tuple<at::Tensor, at::Tensor> lagrange_leap_fwd_cuda(const at::Tensor& anchor_in, at::TensorList nodes_in,
                                                          at::ArrayRef<double> weights,
                                                          const std::optional<at::Tensor>& target_in,
                                                          const std::optional<at::Tensor>& base_in) {
  TORCH_CHECK(anchor_in.is_cuda(), "flowbp::lagrange_leap_fwd: anchor must be a CUDA tensor");
  check_lagrange_leap_fwd_args(anchor_in, nodes_in, weights, target_in, base_in);
  const c10::cuda::CUDAGuard guard(anchor_in.device());
  const auto wd = working_dtype(anchor_in.scalar_type());
  const at::Tensor anchor = anchor_in.contiguous();
  std::vector<at::Tensor> nodes;
  for (const auto& u : nodes_in) nodes.push_back(u.contiguous());
  at::Tensor target, base;
  if (target_in) target = target_in->contiguous();
  if (base_in) base = base_in->contiguous();
  const int64_t batch = anchor.size(0);
  const int64_t per = batch == 0 ? 0 : anchor.numel() / batch;
  const int64_t p = static_cast<int64_t>(nodes.size());
  at::Tensor out = at::empty(anchor.sizes(), anchor.options().dtype(wd));
  if (anchor.numel() == 0 || p == 0) {
    at::Tensor res = at::full({target_in ? batch : 0}, NAN, anchor.options().dtype(wd));
    if (anchor.numel() > 0) {  // no nodes: xhat = anchor + base, as the reference (never reached from Python)
      at::Tensor xhat = base.defined() ? anchor.to(wd).add(base.to(wd)) : anchor.to(wd).clone();
      if (target_in) {
        res = xhat.sub(target.to(wd)).abs_().flatten(1).mean(1);
        out.copy_(target);
      } else {
        out.copy_(xhat);
      }
    }
    return {out, res};
  }
  TORCH_CHECK(batch <= 65535, "flowbp::lagrange_leap_fwd: batch must be at most 65535 on CUDA, got ", batch);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t groups = (per + kGroup - 1) / kGroup;
  const int64_t bx = blocks_for(groups, kThreads, 1 << 16);
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(batch));
  at::Tensor partial = at::empty({target_in ? batch * bx : 0}, anchor.options().dtype(at::kDouble));
  // The fast path needs W-typed anchor/base/target and 16-byte aligned rows (per a multiple of kGroup).
  const auto same_w = [&](const at::Tensor& t) { return !t.defined() || t.scalar_type() == wd; };
  const bool s_is_w = same_w(anchor) && same_w(base) && same_w(target);
  bool aligned = per % kGroup == 0 && aligned16(out.data_ptr());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&anchor, &base, &target}) {
    aligned = aligned && (!t->defined() || aligned16(t->data_ptr()));
  }
  for (const auto& u : nodes) aligned = aligned && aligned16(u.data_ptr());

  auto run = [&](auto w_tag) {
    using W = decltype(w_tag);
    W* op = out.data_ptr<W>();
    for (int64_t m0 = 0; m0 < p; m0 += kMaxNodes) {
      const bool first = m0 == 0, last = m0 + kMaxNodes >= p;
      Nodes<W> nd{};
      nd.count = static_cast<int>(std::min<int64_t>(kMaxNodes, p - m0));
      bool uniform = true;
      for (int m = 0; m < nd.count; ++m) {
        nd.ptr[m] = nodes[m0 + m].data_ptr();
        nd.code[m] = dtype_code(nodes[m0 + m].scalar_type());
        nd.weight[m] = static_cast<W>(weights[m0 + m]);
        uniform = uniform && nodes[m0 + m].scalar_type() == nodes[m0].scalar_type();
      }
      const Operand a = first ? Operand{anchor.data_ptr(), dtype_code(anchor.scalar_type())}
                              : Operand{static_cast<const void*>(op), dtype_code(wd)};
      const Operand bs = first && base.defined() ? Operand{base.data_ptr(), dtype_code(base.scalar_type())}
                                                 : Operand{nullptr, 0};
      const Operand t = last && target.defined() ? Operand{target.data_ptr(), dtype_code(target.scalar_type())}
                                                 : Operand{nullptr, 0};
      double* part = t.ptr != nullptr ? partial.data_ptr<double>() : nullptr;
      bool done = false;
      if constexpr (std::is_same_v<W, float>) {  // float64 states are a correctness path: generic kernel
        if (s_is_w && uniform) {
          with_storage_type(nodes[m0].scalar_type(), [&](auto u_tag) {
            using U = decltype(u_tag);
            if constexpr (!std::is_same_v<U, double>) {  // fp64 nodes into an fp32 state: rare, generic
              launch_leap<W, W, U>(aligned, grid, stream, a, bs, nd, t, per, op, part);
              done = true;
            }
          });
        }
      }
      if (!done) launch_leap<W, Dyn, Dyn>(false, grid, stream, a, bs, nd, t, per, op, part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (wd == at::kDouble) run(double{}); else run(float{});
  at::Tensor residual = at::empty({target_in ? batch : 0}, anchor.options().dtype(wd));
  if (target_in) {
    auto reduce = [&](auto w_tag) {
      using W = decltype(w_tag);
      residual_kernel<W><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(partial.data_ptr<double>(), bx, per,
                                                                                residual.data_ptr<W>());
    };
    if (wd == at::kDouble) reduce(double{}); else reduce(float{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, residual};
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CUDA, m) { m.impl("lagrange_leap_fwd", &flowbp::lagrange_leap_fwd_cuda); }
