// CPU kernel of flowbp::lagrange_leap_fwd: xhat = anchor + base + sum_m w_m u_m, the pinned value
// (a copy of target) and the per-sample residual mean |xhat - target|, in one pass that reads every
// input once (blocks of kBlock elements stay in L1). Same fp32 operations in the same order as
// ops/reference.py lagrange_leap_ref; the residual is summed per block in W and across blocks in
// double (more accurate than torch's fp32 mean), deterministically (fixed task partition).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lagrange_leap.h"

namespace flowbp {
namespace {

struct Src {
  const void* p;
  at::ScalarType t;
};

template <typename W>
void leap(const at::Tensor& anchor, const std::vector<at::Tensor>& nodes, c10::ArrayRef<double> weights,
          const at::Tensor* target, const at::Tensor* base, at::Tensor& out, at::Tensor& residual) {
  const int64_t batch = anchor.size(0);
  const int64_t per = batch == 0 ? 0 : anchor.numel() / batch;
  const int64_t chunks = std::max<int64_t>(1, (per + kTaskElems - 1) / kTaskElems);
  const Src a{anchor.data_ptr(), anchor.scalar_type()};
  const Src bs{base ? base->data_ptr() : nullptr, base ? base->scalar_type() : at::kFloat};
  const Src tg{target ? target->data_ptr() : nullptr, target ? target->scalar_type() : at::kFloat};
  std::vector<Src> us;
  std::vector<W> ws;
  for (size_t m = 0; m < nodes.size(); ++m) {
    us.push_back({nodes[m].data_ptr(), nodes[m].scalar_type()});
    ws.push_back(static_cast<W>(weights[m]));
  }
  W* op = out.data_ptr<W>();
  std::vector<double> partial(batch * chunks, 0.0);

  at::parallel_for(0, batch * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<W> acc(kBlock), tmp(kBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t lo = b * per + c * kTaskElems, hi = b * per + std::min(per, (c + 1) * kTaskElems);
      double sum = 0.0;
      for (int64_t s = lo; s < hi; s += kBlock) {
        const int64_t n = std::min(kBlock, hi - s);
        W* x = acc.data();
        const W* av = load_span<W>(a.p, a.t, s, n, tmp.data());
        for (int64_t i = 0; i < n; ++i) x[i] = av[i];
        if (bs.p) {
          const W* bv = load_span<W>(bs.p, bs.t, s, n, tmp.data());
          for (int64_t i = 0; i < n; ++i) x[i] = x[i] + bv[i];
        }
        for (size_t m = 0; m < us.size(); ++m) {
          const W* uv = load_span<W>(us[m].p, us[m].t, s, n, tmp.data());
          const W w = ws[m];
          for (int64_t i = 0; i < n; ++i) x[i] = x[i] + w * uv[i];
        }
        W* o = op + s;
        if (tg.p) {
          const W* tv = load_span<W>(tg.p, tg.t, s, n, tmp.data());
          W block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
          for (int64_t i = 0; i < n; ++i) {
            o[i] = tv[i];
            block_sum += std::abs(x[i] - tv[i]);
          }
          sum += static_cast<double>(block_sum);
        } else {
          for (int64_t i = 0; i < n; ++i) o[i] = x[i];
        }
      }
      partial[task] = sum;
    }
  });
  if (target) {
    W* rp = residual.data_ptr<W>();
    for (int64_t b = 0; b < batch; ++b) {
      double s = 0.0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
      rp[b] = static_cast<W>(per == 0 ? NAN : s / static_cast<double>(per));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> lagrange_leap_fwd_cpu(const at::Tensor& anchor_in, at::TensorList nodes_in,
                                                         at::ArrayRef<double> weights,
                                                         const std::optional<at::Tensor>& target_in,
                                                         const std::optional<at::Tensor>& base_in) {
  TORCH_CHECK(anchor_in.device().is_cpu(), "flowbp::lagrange_leap_fwd: anchor must be on CPU");
  check_lagrange_leap_fwd_args(anchor_in, nodes_in, weights, target_in, base_in);
  std::vector<at::Tensor> nodes;
  for (const auto& u : nodes_in) nodes.push_back(u.contiguous());
  at::Tensor anchor = anchor_in.contiguous();
  at::Tensor target, base;
  if (target_in) target = target_in->contiguous();
  if (base_in) base = base_in->contiguous();
  const auto wd = working_dtype(anchor.scalar_type());
  at::Tensor out = at::empty(anchor.sizes(), anchor.options().dtype(wd));
  at::Tensor residual = at::empty({target_in ? anchor.size(0) : 0}, anchor.options().dtype(wd));
  const at::Tensor* tp = target_in ? &target : nullptr;
  const at::Tensor* bp = base_in ? &base : nullptr;
  if (wd == at::kDouble) {
    leap<double>(anchor, nodes, weights, tp, bp, out, residual);
  } else {
    leap<float>(anchor, nodes, weights, tp, bp, out, residual);
  }
  return {out, residual};
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CPU, m) { m.impl("lagrange_leap_fwd", &flowbp::lagrange_leap_fwd_cpu); }
