"""fbserve's quantized-linear kernels: packing, Triton kernels, CPU path, references.

Public API:
  pack, unpack, PackedWeight          the fbq1 packed layout (packing.py)
  quant_matmul                        Triton decode/prefill kernels, fused low-rank branch (launch.py)
  prepare_cpu, cpu_matmul             torch int4 CPU path (cpu.py)
  cpu_native.NativeGroup / NativeLayers   fbserve's AVX-512 BF16 CPU kernel (cpu_native.c; built on first use)
  dequantize, dequantize_packed, quant_matmul_ref, branch_down_ref, block_diagonal_b   references (reference.py)
"""
from .cpu import CpuInt4Weight, cpu_matmul, prepare_cpu
from .launch import branch_down, interpreting, quant_matmul
from .packing import FORMAT_VERSION, PackedWeight, layout_dims, pack, unpack
from .reference import block_diagonal_b, branch_down_ref, dequantize, dequantize_packed, quant_matmul_ref

__all__ = [
    "FORMAT_VERSION", "PackedWeight", "layout_dims", "pack", "unpack",
    "quant_matmul", "branch_down", "interpreting",
    "CpuInt4Weight", "prepare_cpu", "cpu_matmul",
    "dequantize", "dequantize_packed", "quant_matmul_ref", "branch_down_ref", "block_diagonal_b",
]
