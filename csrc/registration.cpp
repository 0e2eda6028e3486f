// Schemas of the flowbp ops (namespace `flowbp`); the CPU and CUDA kernels register their
// implementations in their own files, the fake (meta) implementations live in flowbp_kernels/_ext.py
// so that torch.compile can trace the ops. Semantics: flowbp_kernels/ops/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(flowbp, m) {
  // velocity_format: 0 fp32, 1 bf16, 2 fp8 (e4m3fn + one fp32 scale per row of the last dimension).
  // Returns (x_next, x_cached, v_data, v_scale); v_scale is empty ([0]) unless fp8. write_cached=False /
  // write_data=False (fp32 format) return empty x_cached / v_data: the caller keeps x / v itself when the
  // cast would be the identity, as torch's .to() does, instead of copying them.
  m.def(
      "euler_cache_step(Tensor x, Tensor v, float h, int velocity_format, ScalarType latent_dtype, "
      "bool write_cached=True, bool write_data=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (out, residual): out = target (pinned) or xhat; residual [B] (empty without a target).
  m.def(
      "lagrange_leap_fwd(Tensor anchor, Tensor[] nodes, float[] weights, Tensor? target, Tensor? base) "
      "-> (Tensor, Tensor)");
  // Returns [P, *upstream.shape]: coefs[m] * (upstream + adjoint) in out_dtype.
  m.def("surrogate_vjp(Tensor upstream, Tensor? adjoint, float[] coefs, ScalarType out_dtype) -> Tensor");
}
