// CPU kernel of flowbp::surrogate_vjp: c_m = coefs[m] * (upstream + adjoint) for every node m, in one
// pass that reads upstream (and adjoint) once and writes the P cotangents. Math: ops/reference.py
// surrogate_vjp_ref; the sum is formed in the working dtype (fp32, or float64 when an input is).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "surrogate_vjp.h"

namespace flowbp {
namespace {

template <typename W>
void vjp(const at::Tensor& up, const at::Tensor* adj, c10::ArrayRef<double> coefs, at::Tensor& out) {
  const int64_t numel = up.numel();
  const void* upp = up.data_ptr();
  const auto upt = up.scalar_type();
  const void* adp = adj ? adj->data_ptr() : nullptr;
  const auto adt = adj ? adj->scalar_type() : at::kFloat;
  const auto ot = out.scalar_type();
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t stride_bytes = numel * out.element_size();
  std::vector<W> cs;
  for (double c : coefs) cs.push_back(static_cast<W>(c));
  at::parallel_for(0, numel, kTaskElems, [&](int64_t e0, int64_t e1) {
    std::vector<W> tot(kBlock), tmp(kBlock), prod(kBlock);
    for (int64_t s = e0; s < e1; s += kBlock) {
      const int64_t n = std::min(kBlock, e1 - s);
      const W* g = load_span<W>(upp, upt, s, n, tot.data());
      if (adp) {
        if (g != tot.data()) std::copy(g, g + n, tot.data());
        const W* a = load_span<W>(adp, adt, s, n, tmp.data());
        for (int64_t i = 0; i < n; ++i) tot[i] = tot[i] + a[i];
        g = tot.data();
      }
      for (size_t m = 0; m < cs.size(); ++m) {
        const W c = cs[m];
        if (ot == up.scalar_type() && ot == (std::is_same_v<W, double> ? at::kDouble : at::kFloat)) {
          W* d = reinterpret_cast<W*>(op + m * stride_bytes) + s;
          for (int64_t i = 0; i < n; ++i) d[i] = c * g[i];
        } else {
          for (int64_t i = 0; i < n; ++i) prod[i] = c * g[i];
          store_span<W>(op + m * stride_bytes, ot, s, n, prod.data());
        }
      }
    }
  });
}

at::Tensor surrogate_vjp_cpu(const at::Tensor& up_in, const std::optional<at::Tensor>& adj_in,
                             at::ArrayRef<double> coefs, at::ScalarType out_dtype) {
  TORCH_CHECK(up_in.device().is_cpu(), "flowbp::surrogate_vjp: upstream must be on CPU");
  check_surrogate_vjp_args(up_in, adj_in, coefs, out_dtype);
  at::Tensor up = up_in.contiguous(), adj;
  bool wide = up.scalar_type() == at::kDouble;
  if (adj_in) {
    adj = adj_in->contiguous();
    wide = wide || adj.scalar_type() == at::kDouble;
  }
  const int64_t p = static_cast<int64_t>(coefs.size());
  at::Tensor out = at::empty(stacked_size(up, p), up.options().dtype(out_dtype));
  if (p == 0 || up.numel() == 0) return out;
  const at::Tensor* ap = adj_in ? &adj : nullptr;
  if (wide) {
    vjp<double>(up, ap, coefs, out);
  } else {
    vjp<float>(up, ap, coefs, out);
  }
  return out;
}

}  // namespace
}  // namespace flowbp

TORCH_LIBRARY_IMPL(flowbp, CPU, m) { m.impl("surrogate_vjp", &flowbp::surrogate_vjp_cpu); }
