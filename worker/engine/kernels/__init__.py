"""Triton kernels for the decode step, each with a pure-torch reference that runs where Triton does not.

- attention.decode_attention: split-KV (FlashDecoding) attention of one new token per row over the slot KV cache,
  each row reading only its own length; fp16/bf16 or fp8-e4m3 K/V with a per-tensor or per-head scale.
- kv_store.store_kv: new K/V into their cache slots, a contiguous row copied per token.
- rope.rope_qk: RoPE on a token's query and key heads in one program (the fast path's, on CUDA).
- int8_ops: the pieces around an int8 GEMM: fused per-token activation quantisation (optionally zeroing
  outlier columns), the fused dequantise epilogue, and a Triton int8 GEMM with that epilogue built in.

Every entry point takes tensors already on the device and launches a fixed grid with no host sync, so a
CUDA graph can hold it.
"""

from batchgen.worker.engine.kernels.attention import (
    decode_attention,
    decode_attention_reference,
    fp8_kv_scale,
    num_kv_splits,
    quantize_kv,
)
from batchgen.worker.engine.kernels.backend import triton_available
from batchgen.worker.engine.kernels.int8_ops import (
    dequantize_acc,
    dequantize_acc_reference,
    int8_linear,
    int8_matmul_dequant,
    outlier_mask,
    quantize_rows,
    quantize_rows_reference,
)

__all__ = [
    "decode_attention", "decode_attention_reference", "fp8_kv_scale", "dequantize_acc", "dequantize_acc_reference",
    "int8_linear", "int8_matmul_dequant", "num_kv_splits", "outlier_mask", "quantize_kv", "quantize_rows", "quantize_rows_reference",
    "triton_available",
]
