"""New K/V into the cache: token t's [kv_heads, head_dim] goes to cache slot slots[t], a slot being one
[kv_heads, head_dim] entry of a layer's cache seen as [slots, kv_heads, head_dim] (row × max_len for row slots,
block × block_size for blocks). One program per token copies its contiguous row (as vLLM's reshape_and_cache
does): advanced-index assignment over two index tensors runs an element-wise kernel that computes an offset per
element and reached a tenth of the copy rate in prefills. An int8 cache quantises each token's head in the same
program and writes its scale beside it (attention.quantize_kv_int8's arithmetic).
"""

import torch
from batchgen.worker.engine.kernels.attention import (
    FP8_MAX,
    quantize_kv,
    quantize_kv_int8,
    v_transposed,
    v_written,
)
from batchgen.worker.engine.kernels.backend import HAS_TRITON, interpreting

SEAL_GROUP = 32  # tokens a seal program looks through

if HAS_TRITON:
    import triton
    import triton.language as tl
    from batchgen.worker.engine.kernels.int8_cvt import int8_heads, store_head_scales

    _FP8_MAX = tl.constexpr(FP8_MAX)  # a Triton function reads module globals only as constexpr

    @triton.jit
    def _e4m3_bits(v):
        """float32 v (|v| <= 448) -> its float8_e4m3fn byte, rounded half to even as torch's cast. Integer
        arithmetic on the float's bits rather than Triton's fp8 cast: the interpreter's cast rounds half up and
        drops the carry into the exponent (126.5 became 64), so the CPU tests could not check the real one."""
        bits = v.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = bits & 0x7FFFFFFF
        # normal (>= 2^-6): keep 3 mantissa bits, round half to even (a carry moves the exponent up), rebias 127 -> 7
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        # below 2^-6, steps of 2^-9 (8 is 2^-6, the first normal): the 24-bit significand shifted right, half to even
        shift = tl.minimum(tl.maximum(141 - (a >> 23), 1), 31)
        significand = (a & 0x7FFFFF) | 0x800000
        q = significand >> shift
        rem = significand - (q << shift)
        half = 1 << (shift - 1)
        subnormal = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        code = tl.where(a >= 0x3C800000, normal, subnormal)
        code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
        return (code | sign).to(tl.uint8)

    @triton.jit
    def _store_kernel(Dest, Slots, Src, Scale, stride_t, stride_h, scale_stride, width, stride_cb, stride_ct,
                      stride_ch, HEADS: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
                      INT8: tl.constexpr, INTERPRETED: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(Slots + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HEADS) & (d < HEAD_DIM)
        x = tl.load(Src + t.to(tl.int64) * stride_t + h * stride_h + d, mask=mask)
        if INT8:  # each head's absmax -> 127, rounded half to even; its scale to [slot // width, head, slot % width]
            xf = tl.where(mask, x.to(tl.float32), 0.0)
            absmax = tl.max(tl.abs(xf), 1)[:, None]
            x = int8_heads(xf, absmax, INTERPRETED)
            store_head_scales(Scale, slot, width, h, HEADS, absmax)
        elif QUANT:  # an fp8 cache (Dest its bytes): x / its head's scale, saturated, as float8_e4m3fn bits
            scale = tl.load(Scale + h * scale_stride, mask=h < HEADS, other=1.0)
            x = _e4m3_bits(tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -_FP8_MAX, _FP8_MAX))
        tl.store(Dest + slot // width * stride_cb + slot % width * stride_ct + h * stride_ch + d, x,
                 mask=mask)

    @triton.jit
    def _seal_kernel(Cache, Slots, num_tokens, stride_cb, stride_ch, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                     GROUP: tl.constexpr):
        """Program (g, h): of tokens [g * GROUP, (g + 1) * GROUP), each that filled its block's last place has its
        block's head h rewritten in place from v_written's arrangement into V^T. The group's slots are read at once
        (a prefill's programs are mostly idle: a program a token left thousands of them); one program a token looping
        over the heads left a step waiting on the few that worked (32 dependent read-then-write rounds each). The loop
        visits the group's ends alone, found by their rank (a prefix sum), not each of its GROUP lanes by a
        reduction."""
        first = tl.program_id(0) * GROUP
        lane = tl.arange(0, GROUP)
        slots = tl.load(Slots + first + lane, mask=first + lane < num_tokens, other=0).to(tl.int64)
        ends = ((first + lane < num_tokens) & (slots % PAGE == PAGE - 1)).to(tl.int32)
        rank = tl.cumsum(ends, 0) - 1  # each end's place among the group's ends
        t = tl.arange(0, PAGE)[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        for i in range(tl.sum(ends, 0)):
            slot = tl.sum(tl.where((ends > 0) & (rank == i), slots, 0), 0)
            head = Cache + slot // PAGE * stride_cb + tl.program_id(1) * stride_ch
            x = tl.load(head + t * HEAD_DIM + d)
            tl.debug_barrier()  # every thread's reads of the head done before any write over them
            tl.store(head + t + d * PAGE, x)


def seal_blocks(cache: torch.Tensor, slots: torch.Tensor, triton_kernel: bool) -> None:
    """A V^T cache's blocks whose last place one of slots just wrote, turned from v_written's arrangement into V^T
    (int8_keys._vt_kernel reads a row's whole blocks transposed, its partial last block as written). On the device,
    one program per SEAL_GROUP tokens and head (no host sync: which tokens fill a block is read on the device)."""
    page = cache.shape[1]
    if triton_kernel:
        _seal_kernel[(triton.cdiv(slots.numel(), SEAL_GROUP), cache.shape[2])](
            cache, slots, slots.numel(), cache.stride(0), cache.stride(2), HEAD_DIM=cache.shape[3], PAGE=page,
            GROUP=SEAL_GROUP, num_warps=4)
        return
    ends = slots[slots % page == page - 1] // page
    cache[ends] = v_written(cache)[ends]


def cache_slots(cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Where (row, position) lives in a layer's cache: row slots [rows, max_len, kv_heads, head_dim], or with a
    block table blocks [num_blocks, block_size, kv_heads, head_dim], the row's block for that position."""
    width = cache.shape[1]
    if block_table is None:
        return rows.long() * width + positions.long()
    return block_table[rows, positions // width].long() * width + positions % width


def store_kv(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
             triton_kernel: bool | None = None) -> None:
    """cache [.., .., kv_heads, head_dim] (one layer; a pool whose blocks hold their heads outermost, too; V^T in
    each block: written as attention.v_written sees it, then seal_blocks) at slots [T] (cache_slots) = x [T, kv_heads,
    head_dim]. An fp8 cache takes
    x / scale (its per-head scales [kv_heads], or one) saturated to float8_e4m3fn, quantised inside the store's own launch on
    the Triton path (a prefill's separate divide, clamp and cast kernels cost more than the store). An int8 cache
    takes each token's heads quantised on their own absmax (quantize_kv_int8), their scales written into scale
    [.., kv_heads, ..] (the layer's, contiguous, as attention._token_scales). triton_kernel: None runs Triton on CUDA
    and an indexed assignment elsewhere (the CPU tests' interpreter would run a program per token); True forces
    Triton (its tests)."""
    if v_transposed(cache):  # written in runs, turned into V^T where a block fills
        triton_kernel = HAS_TRITON and (x.is_cuda if triton_kernel is None else triton_kernel)
        store_kv(v_written(cache), slots, x, scale, triton_kernel)
        seal_blocks(cache, slots, triton_kernel)
        return
    heads, head_dim = cache.shape[-2:]
    int8 = cache.dtype == torch.int8
    quant = cache.dtype == torch.float8_e4m3fn and x.dtype != cache.dtype
    if (quant or int8) and scale is None:
        raise ValueError("a quantised KV cache needs its scales (ModelRunner.calibrate_kv, or an int8 cache's own)")
    width = cache.shape[1]
    if not (HAS_TRITON and (x.is_cuda if triton_kernel is None else triton_kernel)):
        if int8:
            x, scale.transpose(1, 2)[slots // width, slots % width] = quantize_kv_int8(x)
        else:
            x = quantize_kv(x, scale) if quant else x.to(cache.dtype)
        if x.dtype.itemsize == 1:  # index_put_ has no float8 kernel: the bytes are what move
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache[slots // width, slots % width] = x
        return
    if not (quant or int8):
        x = x.to(cache.dtype)
    if cache.dtype.itemsize == 1 and not int8:  # fp8: the kernel writes bytes (the e4m3 bits it computed, or x's own)
        cache, x = cache.view(torch.uint8), x if quant else x.view(torch.uint8)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if quant:
        scale = scale.to(device=x.device, dtype=torch.float32).reshape(-1)
    elif not int8:
        scale = cache  # unread without QUANT or INT8
    _store_kernel[(x.shape[0],)](cache, slots, x, scale, x.stride(0), x.stride(1),
                                 1 if quant and scale.numel() > 1 else 0, width, cache.stride(0), cache.stride(1),
                                 cache.stride(2), HEADS=heads, HEAD_DIM=head_dim,
                                 BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim),
                                 QUANT=quant, INT8=int8, INTERPRETED=interpreting())
