"""New K/V into the cache: token t's [kv_heads, head_dim] goes to cache slot slots[t], a slot being one
[kv_heads, head_dim] entry of a layer's cache seen as [slots, kv_heads, head_dim] (row × max_len for row slots,
block × block_size for blocks). One program per token copies its contiguous row (as vLLM's reshape_and_cache
does): advanced-index assignment over two index tensors runs an element-wise kernel that computes an offset per
element and reached a tenth of the copy rate in prefills.
"""

import torch
from batchgen.worker.engine.kernels.backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _store_kernel(Dest, Slots, Src, stride_t, stride_h, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(Slots + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HEADS) & (d < HEAD_DIM)
        x = tl.load(Src + t.to(tl.int64) * stride_t + h * stride_h + d, mask=mask)
        tl.store(Dest + slot * (HEADS * HEAD_DIM) + h * HEAD_DIM + d, x, mask=mask)


def cache_slots(cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Where (row, position) lives in a layer's cache: row slots [rows, max_len, kv_heads, head_dim], or with a
    block table blocks [num_blocks, block_size, kv_heads, head_dim], the row's block for that position."""
    width = cache.shape[1]
    if block_table is None:
        return rows.long() * width + positions.long()
    return block_table[rows, positions // width].long() * width + positions % width


def store_kv(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, triton_kernel: bool | None = None) -> None:
    """cache [.., .., kv_heads, head_dim] (one layer, contiguous) at slots [T] (cache_slots) = x [T, kv_heads,
    head_dim] of the cache's dtype. triton_kernel: None runs Triton on CUDA and index_copy_ elsewhere (the CPU
    tests' interpreter would run a program per token); True forces Triton (its tests)."""
    heads, head_dim = cache.shape[-2:]
    x = x.to(cache.dtype)
    if x.dtype.itemsize == 1:  # fp8: the bytes are what move (index_copy_ has no float8 kernel)
        cache, x = cache.view(torch.uint8), x.view(torch.uint8)
    use_triton = HAS_TRITON and (x.is_cuda if triton_kernel is None else triton_kernel)
    if not use_triton:
        cache.view(-1, heads * head_dim).index_copy_(0, slots, x.reshape(-1, heads * head_dim))
        return
    if x.stride(-1) != 1:
        x = x.contiguous()
    _store_kernel[(x.shape[0],)](cache, slots, x, x.stride(0), x.stride(1), HEADS=heads, HEAD_DIM=head_dim,
                                 BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim))
