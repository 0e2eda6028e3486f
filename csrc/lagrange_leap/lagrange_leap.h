// Host side of flowbp::lagrange_leap_fwd shared by its CPU and CUDA launchers: the argument checks that do
// not depend on the device (each launcher checks its device first), so both reject the same calls with the
// same messages. Limits: the dtypes of common.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "../common.h"

namespace flowbp {

constexpr const char* kLagrangeLeapOp = "flowbp::lagrange_leap_fwd";

// `t` (argument `name`) must sit on the anchor's device, with its shape and a supported dtype.
inline void check_like_anchor(const char* name, const at::Tensor& t, const at::Tensor& anchor) {
  TORCH_CHECK(t.device() == anchor.device(), kLagrangeLeapOp, ": ", name, " must be on ", anchor.device(), ", got ",
              t.device());
  TORCH_CHECK(t.sizes() == anchor.sizes(), kLagrangeLeapOp, ": ", name, " must have the anchor's shape ",
              anchor.sizes(), ", got ", t.sizes());
  TORCH_CHECK(supported_dtype(t.scalar_type()), kLagrangeLeapOp, ": ", name,
              " must be float32/float64/float16/bfloat16, got ", t.scalar_type());
}

inline void check_lagrange_leap_fwd_args(const at::Tensor& anchor, at::TensorList nodes, at::ArrayRef<double> weights,
                                         const std::optional<at::Tensor>& target,
                                         const std::optional<at::Tensor>& base) {
  TORCH_CHECK(anchor.dim() >= 1, "flowbp::lagrange_leap_fwd: anchor needs a batch dimension");
  TORCH_CHECK(nodes.size() == weights.size(), "flowbp::lagrange_leap_fwd: one weight per node expected, got ",
              weights.size(), " weights for ", nodes.size(), " nodes");
  check_like_anchor("anchor", anchor, anchor);
  for (double w : weights) TORCH_CHECK(std::isfinite(w), "flowbp::lagrange_leap_fwd: weights must be finite");
  for (const auto& u : nodes) check_like_anchor("nodes[m]", u, anchor);
  if (target) check_like_anchor("target", *target, anchor);
  if (base) check_like_anchor("base", *base, anchor);
}

}  // namespace flowbp
