// CUDA kernel of flowbp::lagrange_leap_fwd: one pass reads anchor, base, the P nodes (up to kMaxNodes
// per launch, passed by value) and target, writes out and adds each block's residual partial sum to a
// per-sample double accumulator (atomicAdd: the residual's last bits may vary run to run; the value
// is a diagnostic/weight, compared with a tolerance). Grid: (blocks per sample, batch). More than
// kMaxNodes nodes: the extra ones are folded into base on the host first (one extra pass, rare).
#include <torch/library.h>

#include "../cuda_common.cuh"

namespace flowbp {
namespace {

template <typename W>
struct Nodes {
  const void* ptr[kMaxNodes];
  int code[kMaxNodes];
  W weight[kMaxNodes];
  int count;
};

template <typename W>
__device__ __forceinline__ W rn_add(W a, W b) {
  if constexpr (std::is_same_v<W, float>) return __fadd_rn(a, b); else return __dadd_rn(a, b);
}
template <typename W>
__device__ __forceinline__ W rn_mul(W a, W b) {
  if constexpr (std::is_same_v<W, float>) return __fmul_rn(a, b); else return __dmul_rn(a, b);
}

template <typename W>
__global__ void leap_kernel(const void* __restrict__ anchor, int ac, const void* __restrict__ base, int bc,
                            Nodes<W> nodes, const void* __restrict__ target, int tc, int64_t per,
                            W* __restrict__ out, double* __restrict__ res_sum) {
  const int64_t b = blockIdx.y;
  const int64_t off = b * per;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  W local = 0;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < per; j += stride) {
    const int64_t i = off + j;
    W x = load_as<W>(anchor, ac, i);
    if (base != nullptr) x = rn_add(x, load_as<W>(base, bc, i));
#pragma unroll
    for (int m = 0; m < kMaxNodes; ++m) {
      if (m < nodes.count) x = rn_add(x, rn_mul(nodes.weight[m], load_as<W>(nodes.ptr[m], nodes.code[m], i)));
    }
    if (target != nullptr) {
      const W t = load_as<W>(target, tc, i);
      out[i] = t;
      local += x > t ? x - t : t - x;
    } else {
      out[i] = x;
    }
  }
  if (target == nullptr) return;
  __shared__ W warp_sums[kThreads / 32];
  local = warp_sum(local);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = local;
  __syncthreads();
  if (threadIdx.x < 32) {
    W s = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : W(0);
    s = warp_sum(s);
    if (threadIdx.x == 0) atomicAdd(res_sum + b, static_cast<double>(s));
  }
}

constexpr const char* kOp = "flowbp::lagrange_leap_fwd";

std::tuple<at::Tensor, at::Tensor> lagrange_leap_fwd_cuda(const at::Tensor& anchor_in, at::TensorList nodes_in,
                                                          at::ArrayRef<double> weights,
                                                          const std::optional<at::Tensor>& target_in,
                                                          const std::optional<at::Tensor>& base_in) {
  TORCH_CHECK(anchor_in.is_cuda(), "flowbp::lagrange_leap_fwd: anchor must be a CUDA tensor");
  TORCH_CHECK(anchor_in.dim() >= 1, "flowbp::lagrange_leap_fwd: anchor needs a batch dimension");
  TORCH_CHECK(nodes_in.size() == weights.size(), "flowbp::lagrange_leap_fwd: one weight per node expected, got ",
              weights.size(), " weights for ", nodes_in.size(), " nodes");
  check_like(kOp, "anchor", anchor_in, anchor_in);
  for (double w : weights) TORCH_CHECK(std::isfinite(w), "flowbp::lagrange_leap_fwd: weights must be finite");
  const c10::cuda::CUDAGuard guard(anchor_in.device());
  const auto wd = working_dtype(anchor_in.scalar_type());
  const at::Tensor anchor = anchor_in.contiguous();
  std::vector<at::Tensor> nodes;
  for (const auto& u : nodes_in) {
    check_like(kOp, "nodes[m]", u, anchor_in);
    nodes.push_back(u.contiguous());
  }
  at::Tensor target, base;
  if (target_in) {
    check_like(kOp, "target", *target_in, anchor_in);
    target = target_in->contiguous();
  }
  if (base_in) {
    check_like(kOp, "base", *base_in, anchor_in);
    base = base_in->contiguous();
  }
  const int64_t batch = anchor.size(0);
  const int64_t per = batch == 0 ? 0 : anchor.numel() / batch;
  const int64_t p = static_cast<int64_t>(nodes.size());
  // Nodes past kMaxNodes: folded into base in the reference's order (they are added last there, so the
  // rounding differs from the reference only in the order of the additions).
  if (p > kMaxNodes) {
    at::Tensor extra = base.defined() ? base.to(wd) : at::zeros(anchor.sizes(), anchor.options().dtype(wd));
    for (int64_t m = kMaxNodes; m < p; ++m) extra.add_(nodes[m].to(wd), weights[m]);
    base = extra;
  }
  at::Tensor out = at::empty(anchor.sizes(), anchor.options().dtype(wd));
  at::Tensor res_sum = at::zeros({target_in ? batch : 0}, anchor.options().dtype(at::kDouble));
  if (anchor.numel() > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t bx = blocks_for(per, kThreads * kUnroll, 1 << 16);
    auto launch = [&](auto w_tag) {
      using W = decltype(w_tag);
      Nodes<W> nd{};
      nd.count = static_cast<int>(std::min<int64_t>(p, kMaxNodes));
      for (int m = 0; m < nd.count; ++m) {
        nd.ptr[m] = nodes[m].data_ptr();
        nd.code[m] = dtype_code(nodes[m].scalar_type());
        nd.weight[m] = static_cast<W>(weights[m]);
      }
      dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(batch));
      leap_kernel<W><<<grid, kThreads, 0, stream>>>(
          anchor.data_ptr(), dtype_code(anchor.scalar_type()), base.defined() ? base.data_ptr() : nullptr,
          base.defined() ? dtype_code(base.scalar_type()) : 0, nd, target.defined() ? target.data_ptr() : nullptr,
          target.defined() ? dtype_code(target.scalar_type()) : 0, per, out.data_ptr<W>(),
          target.defined() ? res_sum.data_ptr<double>() : nullptr);
    };
    TORCH_CHECK(batch <= 65535, "flowbp::lagrange_leap_fwd: batch must be at most 65535 on CUDA, got ", batch);
    if (wd == at::kDouble) launch(double{}); else launch(float{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor residual = target_in ? res_sum.div(static_cast<double>(per)).to(wd) : res_sum.to(wd);
  return {out, residual};
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CUDA, m) { m.impl("lagrange_leap_fwd", &flowbp::lagrange_leap_fwd_cuda); }
