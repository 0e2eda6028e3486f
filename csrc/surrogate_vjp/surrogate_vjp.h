// Host side of flowbp::surrogate_vjp shared by its CPU and CUDA launchers: the argument checks that do not
// depend on the device (each launcher checks its device first) and the shape of the stacked cotangents.
// Limits: the dtypes of common.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../common.h"

namespace flowbp {

inline void check_surrogate_vjp_args(const at::Tensor& up, const std::optional<at::Tensor>& adj,
                                     at::ArrayRef<double> coefs, at::ScalarType out_dtype) {
  TORCH_CHECK(supported_dtype(up.scalar_type()) && supported_dtype(out_dtype),
              "flowbp::surrogate_vjp: upstream and out_dtype must be float32/float64/float16/bfloat16");
  for (double c : coefs) TORCH_CHECK(std::isfinite(c), "flowbp::surrogate_vjp: coefs must be finite");
  if (adj) {
    TORCH_CHECK(adj->device() == up.device(), "flowbp::surrogate_vjp: adjoint must be on ", up.device());
    TORCH_CHECK(adj->sizes() == up.sizes(), "flowbp::surrogate_vjp: adjoint must have the upstream's shape ",
                up.sizes(), ", got ", adj->sizes());
    TORCH_CHECK(supported_dtype(adj->scalar_type()), "flowbp::surrogate_vjp: unsupported adjoint dtype");
  }
}

// [p, *t.shape]: one cotangent per coefficient.
inline std::vector<int64_t> stacked_size(const at::Tensor& t, int64_t p) {
  std::vector<int64_t> s{p};
  for (auto d : t.sizes()) s.push_back(d);
  return s;
}

}  // namespace flowbp
