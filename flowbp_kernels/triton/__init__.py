"""Triton kernels of the fused ops, one module per op (kernels and launchers only; imported lazily).

Working precision is fp32 (float64 calls go to another backend). bfloat16 tensors are passed as int16
views and converted by bit operations, and bf16/fp8 results are rounded by integer arithmetic: exact on a
GPU and in the interpreter (TRITON_INTERPRET=1), whose own bf16 and fp8 casts truncate.
"""
