"""Split-KV decode attention (FlashDecoding) over the KV cache: one query token per row.

Cache layout is the runner's per layer: slots k/v [rows, max_len, kv_heads, head_dim], query row i reading
cache row i (or cache_rows[i]) and its first seq_lens[i] keys; or blocks k/v [num_blocks, BLOCK_N, kv_heads,
head_dim] with a block table [rows, max_blocks]: key t of cache row r is block_table[r, t // BLOCK_N], slot
t % BLOCK_N (one inner step reads block_n // BLOCK_N blocks, each key at its own; a split's block ids are read
once ahead of its loop, so the K/V loads' addresses come from registers and the compiler pipelines them
num_stages deep, as over a slot cache, where ids read inside the loop make it wait for every load each step).
Stage one: one program per (row, kv head, split) runs every query head of that KV group against its share of the
row's keys (GQA without copying K/V), whole steps without masks and the ragged last one masked, and writes a
partial output and its log-sum-exp; stage two merges the splits (at one split, as large batches have, stage one
writes the output and no merge runs). The grid depends only on the row
count and the split count (chosen from max_len), and each row's split length is computed on the device
from seq_lens, so the launch is the same every step and a CUDA graph can hold it.

fp8-e4m3 K/V: the cache holds x / scale (quantize_kv); the scale, one per tensor or per KV head, is a
scalar inside a program, so it multiplies the scores (K) and the output (V) instead of every element.
int8 K/V: the cache holds round(x · 127 / absmax) per token and KV head (quantize_kv_int8), the scales absmax / 127
beside it as [rows or blocks, kv_heads, tokens] (a block's 64 scales of one head are one contiguous load); a key's
scale multiplies its score column, a value's scale its row of V before the product (p · scale would fall into
fp16's subnormals).

Follows the structure of SGLang's triton_ops/decode_attention.py (grouped stage 1 + softmax-merge stage 2).
"""

import functools
import math

import torch
from batchgen.worker.engine.kernels.backend import HAS_TRITON, interpreting, triton_available
from batchgen.worker.engine.kernels.int8_keys import keys_apply

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per inner step
# How an int8 cache's V scales apply when a call does not say (process-wide, set from the engine's config as
# tuned.ENABLED is): "v" multiplies each V element, "p" the softmax weights (scales_in_p); both in fp16 after an
# exact conversion, or with "32" (v32, p32) through float32 as the first kernel did (f16_int8=False), or with
# "-early" (v-early, p-early) converted where each tile is loaded (cvt_early), or with "-bias" (v-bias, p-bias) as
# "-early" and left 1152 over their values (biased); "v-q8": K unconverted against q rounded to int8 per head, on
# the int8 tensor cores (qk_int8), V as "v"; "v-q16": q as two int8 terms, its rounding error the second; with
# "-early" (v-q8-early, v-q16-early) V converted where it is loaded; "v-q16-keys" (DEFAULT_INT8_V_SCALES):
# int8_keys' kernel (the keys on the tiles' rows) where each query head has its own KV head, else as v-q16-early;
# "v-q16-keys-vt" as v-q16-keys with a paged pool's V transposed in each block (int8_keys._vt_kernel;
# model_runner.kv_pool).
# EngineConfig's "auto" is the mode the device's tuned table names (tuned.int8_kv_scales), else DEFAULT_INT8_V_SCALES.
DEFAULT_INT8_V_SCALES = "v-q16-keys"
INT8_V_SCALES = DEFAULT_INT8_V_SCALES
# int8_keys' (block_n, num_warps, num_stages) where a call does not say: as fast as any where the kernel reaches the
# bus, and the fastest where the card has few SMs for its bus (docs/benchmarks.md, "... fewer SMs than the bus wants")
KEYS_LAUNCH = (32, 1, 3)
MIN_BLOCK = 16  # tl.dot wants every dimension >= 16
# (block_n, num_warps, num_stages) when a call does not say. An int8 tile carries half fp16's bytes: a wider block
# and a deeper pipeline keep as many bytes in flight (benchmarks.kernels times the sweep)
LAUNCH = (BLOCK_N, 4, 2)
INT8_LAUNCH = (128, 4, 3)
# q rounded to int8 (qk_int8), by its number of int8 terms: no K conversion left a key, so smaller programs share an
# SM; the fastest of the launches timed (docs/benchmarks.md, "#22's table again", "The int8 cache by default")
INT8_QK_LAUNCHES = {1: (64, 2, 3), 2: (64, 2, 3)}
# A 2-byte cache over blocks, where an SM gives a program the shared memory: a third stage, with the split's block ids
# read ahead of its loop (preload), keeps a step's K/V copies in flight (faster a layer than LAUNCH: docs/benchmarks.md,
# "The warm-up's outlier columns"). It holds two steps' K and V tiles (sm_75 gives a program 64 KB, sm_86 99 KB).
PAGED_LAUNCH = (BLOCK_N, 4, 3)
PAGED_LAUNCH_SLACK = 8192  # bytes beside the tiles (Triton 3.6: 6,144 at 16 block ids ahead, 8,192 at MAX_PRELOAD)
MAX_PRELOAD = 1024  # block ids of a split held ahead of its loop (64k keys at 64-key blocks); longer: read per step

if HAS_TRITON:
    import triton
    import triton.language as tl
    from batchgen.worker.engine.kernels.int8_cvt import I8_BIAS, int8_to_f16, round_half_even
    from batchgen.worker.engine.kernels.int8_keys import VT_MAX_PRELOAD, _keys_kernel, _vt_kernel
    from batchgen.worker.engine.kernels.splits import preload_ids, split_bounds

    @triton.jit
    def _round_over_absmax(x, INTERPRETED: tl.constexpr):
        """Each row of float32 x rounded to int8's steps over its absmax (as the cache rounds a key), and the scale
        that takes them back (absmax / 127; an all-zero row: zeros, scale 0)."""
        absmax = tl.max(tl.abs(x), 1)
        rounded = round_half_even(x * (127.0 / tl.where(absmax > 0.0, absmax, 1.0))[:, None], INTERPRETED)
        return rounded, absmax / 127.0

    @triton.jit
    def _attend(block, start, end, q, q_bias, q8, q_lo, q_scale, lo_scale, m, l_sum, acc, k_base, v_base, pages,
                BlockTable, KScale, VScale, cache_row, kv_head, stride_kr, stride_kt, stride_vr, stride_vt, stride_bt,
                stride_sr, stride_sh, s_scale, d, d_mask, BLOCK_N: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                DOT_F32: tl.constexpr,
                TOKEN_SCALES: tl.constexpr, SCALES_IN_P: tl.constexpr, F16_INT8: tl.constexpr, ASM_CVT: tl.constexpr,
                PAGE: tl.constexpr, CVT_EARLY: tl.constexpr, PRELOAD: tl.constexpr, BIAS: tl.constexpr,
                QK_INT8: tl.constexpr, MASKED: tl.constexpr):
        """One inner step of _split_kernel: keys block .. block + BLOCK_N of the split start .. end, folded into the
        running max m, sum l_sum and output acc. MASKED: the split's last, ragged step (keys from end on are masked);
        the others read whole steps without masks."""
        j = tl.arange(0, BLOCK_N)
        t = block + j
        # block is a multiple of PAGE: a key's block and slot from j, constants a thread holds, not a signed division
        # and remainder of t each (the instructions this kernel is bound by)
        slot = j % PAGE
        # unmasked, a constant: the compiler drops the masks and the select below
        t_mask = t < end if MASKED else tl.full([BLOCK_N], 1, tl.int1)
        k_ptr = k_base + t * stride_kt
        v_ptr = v_base + t * stride_vt
        if HAS_BLOCKS:  # start is a multiple of BLOCK_N, itself a multiple of PAGE: whole blocks of the cache
            if PRELOAD:
                page = tl.gather(pages, (block - start) // PAGE + j // PAGE, 0).to(tl.int64)
            elif PAGE == BLOCK_N:  # one block a step
                page = tl.load(BlockTable + cache_row.to(tl.int64) * stride_bt + block // PAGE).to(tl.int64)
            else:  # BLOCK_N // PAGE blocks a step: each key's own
                page = tl.load(BlockTable + cache_row.to(tl.int64) * stride_bt + block // PAGE + j // PAGE, mask=t_mask,
                               other=0).to(tl.int64)
            k_ptr = k_base + page * stride_kr + slot * stride_kt
            v_ptr = v_base + page * stride_vr + slot * stride_vt
        k = tl.load(k_ptr[None, :] + d[:, None], mask=d_mask[:, None] & t_mask[None, :], other=0.0)
        if F16_INT8 and not QK_INT8:  # int8 K exact in fp16 (q's dtype), without conversion instructions
            k = int8_to_f16(k, ASM_CVT, CVT_EARLY, BIAS)
        if QK_INT8:  # q in int8 (q_scale: its scale per head): K unconverted, on the int8 tensor cores
            s = tl.dot(q8, k).to(tl.float32) * q_scale[:, None]
            if QK_INT8 == 2:  # q's rounding error, itself in int8, against the same K
                s += tl.dot(q_lo, k).to(tl.float32) * lo_scale[:, None]
        elif DOT_F32:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k.to(q.dtype))
        if BIAS:
            s = s - q_bias[:, None]
        if TOKEN_SCALES:  # laid out as the keys: [rows or blocks, kv_heads, tokens]
            if HAS_BLOCKS:
                at = page * stride_sr + kv_head * stride_sh + slot
            else:
                at = cache_row.to(tl.int64) * stride_sr + kv_head * stride_sh + t
            ks = tl.load(KScale + at, mask=t_mask, other=0.0)
            vs = tl.load(VScale + at, mask=t_mask, other=0.0)
            s = s * (ks * s_scale)[None, :]  # a key's scale and the softmax's: one multiply an element
        else:
            s = s * s_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr[:, None] + d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0)
        if F16_INT8:  # V exact in fp16, its scale applied there (below): no conversion through float32
            v = int8_to_f16(v, ASM_CVT, CVT_EARLY, BIAS and SCALES_IN_P)  # biased only under unscaled V
        if TOKEN_SCALES and SCALES_IN_P:  # p · scale / the block's largest scale (in [0, 1]: no fp16 subnormals
            top = tl.max(vs, 0)  # for the weights that matter), the product times that largest scale after
            top = tl.where(top > 0.0, top, 1.0)
            pv = p * (vs / top)[None, :]
            if BIAS:  # the weights' sum as the dot reads them (in fp16): V's 1152 out of the product
                pv = pv.to(q.dtype)
                pv_bias = I8_BIAS * tl.sum(pv.to(tl.float32), 1)
            if DOT_F32:
                pv = tl.dot(pv.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(pv.to(q.dtype), v.to(q.dtype))
            if BIAS:
                pv = pv - pv_bias[:, None]
            acc = acc * alpha[:, None] + pv * top
        else:
            if F16_INT8:
                v = v * vs.to(tl.float16)[:, None]
            elif TOKEN_SCALES:
                v = v.to(tl.float32) * vs[:, None]
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        return m_new, l_sum, acc

    @triton.jit
    def _split_kernel(Q, K, V, SeqLens, CacheRows, BlockTable, KScale, VScale, MidO, MidLse, Out,
                      stride_qn, stride_qh, stride_kr, stride_kt, stride_kh, stride_vr, stride_vt, stride_vh,
                      stride_bt, stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh,
                      scale_stride, stride_sr, stride_sh, qk_scale,
                      GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr,
                      HAS_BLOCKS: tl.constexpr, DOT_F32: tl.constexpr, TOKEN_SCALES: tl.constexpr,
                      SCALES_IN_P: tl.constexpr, F16_INT8: tl.constexpr, ASM_CVT: tl.constexpr,
                      PAGE: tl.constexpr, CVT_EARLY: tl.constexpr, PRELOAD: tl.constexpr, BIAS: tl.constexpr,
                      QK_INT8: tl.constexpr, INTERPRETED: tl.constexpr):
        row, kv_head, split, cache_row, start, end = split_bounds(SeqLens, CacheRows, HAS_ROWS, NUM_SPLITS, BLOCK_N)

        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        h_mask = h < GROUP
        d_mask = d < HEAD_DIM
        heads = kv_head * GROUP + h
        q = tl.load(Q + row * stride_qn + heads[:, None] * stride_qh + d[None, :],
                    mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        if TOKEN_SCALES:  # int8: a scale per token, read with its keys
            v_scale = 1.0
            s_scale = qk_scale
        else:
            v_scale = tl.load(VScale + kv_head * scale_stride)
            s_scale = qk_scale * tl.load(KScale + kv_head * scale_stride)  # qk_scale holds log2(e): exp2 below
        q8 = q
        q_lo = q
        q_scale = tl.full([BLOCK_H], 1.0, tl.float32)
        lo_scale = q_scale
        if QK_INT8:  # each head's q rounded to int8 over its absmax, as the cache holds K
            qf = q.to(tl.float32)
            hi, q_scale = _round_over_absmax(qf, INTERPRETED)
            q8 = hi.to(tl.int8)
            if QK_INT8 == 2:  # and what that left, rounded over its own absmax: q to ~14 bits in two int8 terms
                lo, lo_scale = _round_over_absmax(qf - hi * q_scale[:, None], INTERPRETED)
                q_lo = lo.to(tl.int8)
        q_bias = 0.0
        if BIAS:  # K is 1152 + its values: q · k is the dot less 1152 · Σ q (V likewise, with its weights' sums)
            q_bias = I8_BIAS * tl.sum(q.to(tl.float32), 1)
        k_base = K + cache_row.to(tl.int64) * stride_kr + kv_head * stride_kh
        v_base = V + cache_row.to(tl.int64) * stride_vr + kv_head * stride_vh
        if HAS_BLOCKS:  # cache_row is a row of the block table; the cache's first dimension counts blocks
            k_base = K + kv_head * stride_kh
            v_base = V + kv_head * stride_vh

        pages = 0
        if PRELOAD:  # the split's block ids, once: each step's then come from shared memory (tl.gather), not a load
            pages = preload_ids(BlockTable, cache_row, stride_bt, start, end, PAGE, PRELOAD)

        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        # whole steps without masks (fewer instructions: the int8 kernel is bound by their issue), then the ragged one
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for block in range(start, full_end, BLOCK_N):
            m, l_sum, acc = _attend(block, start, end, q, q_bias, q8, q_lo, q_scale, lo_scale, m, l_sum, acc, k_base,
                                    v_base, pages, BlockTable, KScale, VScale, cache_row, kv_head, stride_kr,
                                    stride_kt, stride_vr, stride_vt, stride_bt, stride_sr, stride_sh, s_scale, d,
                                    d_mask, BLOCK_N, HAS_BLOCKS, DOT_F32, TOKEN_SCALES, SCALES_IN_P, F16_INT8,
                                    ASM_CVT, PAGE, CVT_EARLY, PRELOAD, BIAS, QK_INT8, False)
        if full_end < end:
            m, l_sum, acc = _attend(full_end, start, end, q, q_bias, q8, q_lo, q_scale, lo_scale, m, l_sum, acc,
                                    k_base, v_base, pages, BlockTable, KScale, VScale, cache_row, kv_head, stride_kr,
                                    stride_kt, stride_vr, stride_vt, stride_bt, stride_sr, stride_sh, s_scale, d,
                                    d_mask, BLOCK_N, HAS_BLOCKS, DOT_F32, TOKEN_SCALES, SCALES_IN_P, F16_INT8,
                                    ASM_CVT, PAGE, CVT_EARLY, PRELOAD, BIAS, QK_INT8, True)

        has_keys = l_sum > 0.0  # an empty split (short row) contributes nothing to the merge
        out = acc * (v_scale / tl.where(has_keys, l_sum, 1.0))[:, None]
        if NUM_SPLITS == 1:  # nothing to merge (large batches): the output itself, as the merge would write it
            tl.store(Out + row * stride_on + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                     mask=h_mask[:, None] & d_mask[None, :])
        else:
            lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l_sum, 1.0)), float("-inf"))
            tl.store(MidO + row * stride_mn + heads[:, None] * stride_mh + split * stride_ms + d[None, :], out,
                     mask=h_mask[:, None] & d_mask[None, :])
            tl.store(MidLse + row * stride_ln + heads * stride_lh + split, lse, mask=h_mask)

    @triton.jit
    def _merge_kernel(MidO, MidLse, Out, stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_mask = s < NUM_SPLITS
        d_mask = d < HEAD_DIM
        lse = tl.load(MidLse + row * stride_ln + head * stride_lh + s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
        o = tl.load(MidO + row * stride_mn + head * stride_mh + s[:, None] * stride_ms + d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        total = tl.sum(w, 0)
        out = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
        tl.store(Out + row * stride_on + head * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_mask)


def num_kv_splits(max_len: int, num_rows: int, num_kv_heads: int, target_programs: int = 1024) -> int:
    """Splits per row: enough (row, kv head, split) programs to fill the GPU at small batches, never more than
    max_len has key blocks. From shapes only, so a captured graph's launch stays valid for any lengths."""
    wanted = -(-target_programs // max(1, num_rows * num_kv_heads))
    return max(1, min(wanted, -(-max_len // BLOCK_N), 64))


def default_launch(kv_dtype: torch.dtype, paged: bool, head_dim: int, shared_per_program: int,
                   qk_int8: int = 0) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) where a call does not say: INT8_LAUNCH for an int8 cache (INT8_QK_LAUNCHES'
    with q rounded to int8); PAGED_LAUNCH for a 2-byte one over blocks where shared_per_program (the device's opt-in
    bytes a program) holds its tiles; else LAUNCH."""
    if kv_dtype == torch.int8:
        return INT8_QK_LAUNCHES.get(qk_int8, INT8_LAUNCH)
    if paged and kv_dtype.itemsize == 2 and paged_launch_bytes(head_dim) <= shared_per_program:
        return PAGED_LAUNCH
    return LAUNCH


def paged_launch_bytes(head_dim: int) -> int:
    """The shared memory a program of PAGED_LAUNCH over a 2-byte cache wants: K and V tiles for the steps in flight,
    and PAGED_LAUNCH_SLACK."""
    block_n, _, stages = PAGED_LAUNCH
    return (stages - 1) * 2 * block_n * (1 << (head_dim - 1).bit_length()) * 2 + PAGED_LAUNCH_SLACK


@functools.cache
def shared_per_program(device: torch.device) -> int:
    """The shared memory a program may opt into on device; 0 off CUDA (the interpreter, the CPU reference)."""
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)


def preload_pages(max_len: int, splits: int, block_n: int, page: int) -> int:
    """The block ids a split of a paged cache reads ahead of its loop: the most a split spans (its keys rounded up to
    whole steps, as the kernel splits them), as a power of two; 0 past MAX_PRELOAD (the kernel reads them per step)."""
    split_len = math.ceil(math.ceil(max_len / splits) / block_n) * block_n
    pages = 1 << (math.ceil(split_len / page) - 1).bit_length()
    return pages if pages <= MAX_PRELOAD else 0


def qk_int8_terms(mode: str) -> int:
    """How many int8 terms an --int8-kv-scales mode holds q in (decode_attention's qk_int8): "-q8" 1, "-q16" 2,
    else 0."""
    return 1 if "-q8" in mode else 2 if "-q16" in mode else 0


def _scale_tensor(scale: torch.Tensor | float | None, num_kv_heads: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """A float32 scale on the device and its stride over KV heads (0: one scale for every head)."""
    if scale is None:
        scale = 1.0
    if not isinstance(scale, torch.Tensor):
        return _constant_scale(float(scale), device), 0
    scale = scale.to(device=device, dtype=torch.float32).reshape(-1)
    if scale.numel() not in (1, num_kv_heads):
        raise ValueError(f"KV scale has {scale.numel()} values: use one, or one per KV head ({num_kv_heads})")
    return scale, 0 if scale.numel() == 1 else 1


@functools.lru_cache(maxsize=64)
def _constant_scale(value: float, device: torch.device) -> torch.Tensor:
    """A float scale as a float32 [1] tensor, made once per device: not a fill in every layer of a captured step."""
    return torch.full((1,), value, dtype=torch.float32, device=device)


def _token_scales(k_scale, v_scale, k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 cache's scales: float32 [rows or blocks, kv_heads, tokens] each, unit stride over tokens, as
    k_cache [rows or blocks, tokens, kv_heads, head_dim] lays them out (the kernel reads both with k's strides)."""
    want = (k_cache.shape[0], k_cache.shape[2], k_cache.shape[1])
    for s in (k_scale, v_scale):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != want or s.stride(-1) != 1:
            raise ValueError(f"an int8 KV cache wants float32 scales {list(want)} with a unit stride over tokens")
    if k_scale.stride() != v_scale.stride():
        raise ValueError("an int8 KV cache's K and V scales want the same strides")
    return k_scale, v_scale


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, *, k_scale: torch.Tensor | float | None = None,
                     v_scale: torch.Tensor | float | None = None, cache_rows: torch.Tensor | None = None,
                     block_table: torch.Tensor | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, scales_in_p: bool | None = None,
                     f16_int8: bool | None = None, cvt_early: bool | None = None,
                     preload: bool | None = None, bias: bool | None = None,
                     qk_int8: int | None = None, keys: bool | None = None) -> torch.Tensor:
    """q [n, heads, head_dim] (fp16/bf16; any strides with a unit last one), k/v_cache [rows, max_len, kv_heads,
    head_dim] (q's dtype, float8_e4m3fn or int8), seq_lens [n] int32 keys per row -> [n, heads, head_dim] in q's dtype.

    k_scale/v_scale: dequantisation scales of an fp8 cache (a float, or a tensor of 1 or kv_heads values); of an
    int8 cache, one per token and KV head ([rows or blocks, kv_heads, max_len or block_size] float32).
    cache_rows [n] int32: the cache row of each query row (default: row i reads cache row i).
    block_table [rows, max_blocks] int32: a paged cache, k/v_cache [num_blocks, block_size, kv_heads, head_dim]
    (block_n a multiple of block_size): key t of cache row r lives in block block_table[r, t // block_size].
    num_splits: default num_kv_splits(max_len, n, kv_heads); fix it per captured graph.
    block_n / num_warps / num_stages: keys per inner step (a power of two >= 16; over a paged cache a multiple of
    its block size) and the launch's tuning; None: default_launch's for the cache and device.
    scales_in_p: an int8 cache's V scales multiply the softmax weights (normalised by the block's largest) instead of
    each V element: fewer multiplies a block, the same result within fp16 rounding (benchmarks.kernels times both);
    None: as INT8_V_SCALES says.
    f16_int8: an int8 cache's K and V become fp16 exactly (on CUDA by ALU instructions rather than conversions) and
    their scales apply in fp16; False: through float32. None: as INT8_V_SCALES says (fp16 unless it ends in 32).
    An fp16 q only: bf16 takes the float32 path.
    cvt_early: with f16_int8 on CUDA, convert each int8 tile where it was loaded (see int8_cvt.int8_to_f16); the same
    values (benchmarks.kernels times it). None: as INT8_V_SCALES says (its "-early" and "-bias" variants).
    bias: with f16_int8, K (and V where scales_in_p leaves it unscaled) stay 1152 over their values in fp16 and each
    dot's result is corrected by the other operand's sum: fewer instructions a step, equal within float32 rounding.
    None: as INT8_V_SCALES says (its "-bias" variants).
    qk_int8: an int8 cache's scores as int8 · int8 on the tensor cores, K used as it is stored, with no conversion; V
    as without it. 1: each head's q rounded to int8 over its absmax (as the cache holds K), so q carries int8's error
    as K does (benchmarks.quality --kv measures it); 2: q as two int8 terms (the second its rounding error, rounded
    over its own absmax: ~14 bits), two MMAs against each K tile. 0: off. None: as INT8_V_SCALES says ("-q8": 1,
    "-q16": 2).
    keys: an int8 cache with one fp16 query head a KV head through int8_keys' kernel (KEYS_LAUNCH where the launch is
    not given); None: as INT8_V_SCALES says ("-keys"), unless qk_int8 (other than 2), scales_in_p, f16_int8 or bias
    is given (the split kernel's variants).
    preload: over a paged cache, read each split's block ids once ahead of its loop (see preload_pages); None: where
    num_stages >= 3 (a deeper pipeline is what it buys) and a split spans at most MAX_PRELOAD blocks."""
    n, num_heads, head_dim = q.shape
    rows, max_len, num_kv_heads, _ = k_cache.shape
    kv_dtype = k_cache.dtype if v_cache.dtype.itemsize >= k_cache.dtype.itemsize else v_cache.dtype  # fp8v: V's
    token_scales = k_cache.dtype == torch.int8
    if keys is None:  # the mode's kernel unless the call asks for the split kernel's arithmetic
        keys = "-keys" in INT8_V_SCALES and qk_int8 in (None, 2) and all(
            given is None for given in (scales_in_p, f16_int8, bias))
    if qk_int8 is None:
        qk_int8 = qk_int8_terms(INT8_V_SCALES)
    qk8 = int(qk_int8) if token_scales else 0
    if token_scales and q.dtype == torch.float16 and keys and keys_apply(num_heads, num_kv_heads, head_dim):
        return _keys_attention(q, k_cache, v_cache, seq_lens, scale, k_scale, v_scale, cache_rows, block_table,
                               num_splits, out, *(given or default for given, default in zip(
                                   (block_n, num_warps, num_stages), KEYS_LAUNCH, strict=True)), preload)
    if v_transposed(v_cache):
        raise ValueError("a V cache transposed in each block is read by int8_keys' kernel only: an int8 cache, an fp16 "
                         "q with one query head a KV head")
    launch = default_launch(kv_dtype, block_table is not None, head_dim, shared_per_program(q.device), qk8)
    block_n, num_warps, num_stages = (given or default for given, default in zip((block_n, num_warps, num_stages),
                                                                                 launch, strict=True))
    page = block_n
    if block_table is not None:
        page, max_len = max_len, block_table.shape[1] * max_len
        block_n = max(block_n, page)
        if block_n % page:
            raise ValueError(f"block_n {block_n} is not a multiple of the cache's {page}-token blocks")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if not _triton_runs(q, k_cache, v_cache, block_table):
        return decode_attention_reference(q, k_cache, v_cache, seq_lens, scale, k_scale=k_scale, v_scale=v_scale,
                                          cache_rows=cache_rows, block_table=block_table)
    splits = num_splits or num_kv_splits(max_len, n, num_kv_heads)
    group = num_heads // num_kv_heads
    block_h = max(MIN_BLOCK, triton.next_power_of_2(group))
    block_d = max(MIN_BLOCK, triton.next_power_of_2(head_dim))
    if token_scales:
        (ks, vs), scale_stride = _token_scales(k_scale, v_scale, k_cache), 0
    else:
        ks, scale_stride = _scale_tensor(k_scale, num_kv_heads, q.device)
        vs, v_stride = _scale_tensor(v_scale, num_kv_heads, q.device)
        if v_stride != scale_stride:  # one stride serves both: widen the per-tensor one
            ks, vs = ks.expand(num_kv_heads).contiguous(), vs.expand(num_kv_heads).contiguous()
            scale_stride = 1
    pages = _preload(block_table, num_stages, preload, max_len, splits, block_n, page)
    f16 = token_scales and q.dtype == torch.float16 and (
        not INT8_V_SCALES.endswith("32") if f16_int8 is None else f16_int8)
    mid_o, mid_lse, out = _partials(q, splits, out)
    rows_arg = cache_rows if cache_rows is not None else seq_lens  # unread when HAS_ROWS is False
    table_arg = block_table if block_table is not None else seq_lens  # unread when HAS_BLOCKS is False
    _split_kernel[(n, num_kv_heads, splits)](
        q, k_cache, v_cache, seq_lens, rows_arg, table_arg, ks, vs, mid_o, mid_lse, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table_arg.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1), out.stride(0),
        out.stride(1), scale_stride, ks.stride(0) if token_scales else 0, ks.stride(1) if token_scales else 0,
        scale * _LOG2E, GROUP=group, BLOCK_H=block_h, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        NUM_SPLITS=splits, HAS_ROWS=cache_rows is not None, HAS_BLOCKS=block_table is not None,
        DOT_F32=interpreting() and q.dtype == torch.bfloat16,  # Triton's interpreter multiplies bf16 bits as integers
        TOKEN_SCALES=token_scales,
        SCALES_IN_P=INT8_V_SCALES.startswith("p") if scales_in_p is None else scales_in_p,
        F16_INT8=f16, ASM_CVT=not interpreting(), PAGE=page,
        CVT_EARLY=INT8_V_SCALES.endswith(("-early", "-bias", "-keys", "-vt")) if cvt_early is None else cvt_early,
        PRELOAD=pages,
        BIAS=f16 and not qk8 and (INT8_V_SCALES.endswith("-bias") if bias is None else bias),
        QK_INT8=qk8, INTERPRETED=interpreting(),
        num_warps=num_warps, num_stages=num_stages)
    return _merged(mid_o, mid_lse, out, block_d)


def _preload(block_table: torch.Tensor | None, num_stages: int, preload: bool | None, max_len: int, splits: int,
             block_n: int, page: int) -> int:
    """The block ids a split kernel holds ahead of its loop (see preload_pages): over a paged cache, where preload
    says, or (None) at num_stages >= 3, the deeper pipeline that is what it buys; else 0."""
    if block_table is None or not (num_stages >= 3 if preload is None else preload):
        return 0
    return preload_pages(max_len, splits, block_n, page)


def _partials(q: torch.Tensor, splits: int,
              out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A launch's float32 partial outputs and log-sum-exps [n or 1, heads, splits, (head_dim)] and its output (out,
    or a new one like q): one split writes out itself, so no partials (a stub for the pointer) and no merge."""
    n, num_heads, head_dim = q.shape
    parts = n if splits > 1 else 1
    mid_o = torch.empty(parts, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(parts, num_heads, splits, dtype=torch.float32, device=q.device)
    return mid_o, mid_lse, torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out


def _merged(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor, block_d: int) -> torch.Tensor:
    """out, with the splits' partials merged into it where there are several (_merge_kernel)."""
    n, num_heads, splits, head_dim = mid_o.shape
    if splits > 1:
        _merge_kernel[(n, num_heads)](
            mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
            mid_lse.stride(1), out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=splits,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out


def vt_pool(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether a paged int8 pool's V is stored transposed in each block (model_runner.kv_pool): under
    --int8-kv-scales v-q16-keys-vt, where int8_keys' kernel decodes the model (fp16, one query head a KV head)."""
    return INT8_V_SCALES.endswith("-vt") and dtype == torch.float16 and keys_apply(num_heads, num_kv_heads, head_dim)


def v_transposed(v_cache: torch.Tensor) -> bool:
    """Whether a layer's V cache [blocks, tokens, kv_heads, head_dim] is a view of V^T in each block (its tokens
    contiguous: model_runner.kv_pool(transposed=True)), as int8_keys._vt_kernel reads it."""
    return v_cache.stride(-1) != 1 and v_cache.stride(-3) == 1


def v_written(v_cache: torch.Tensor) -> torch.Tensor:
    """A V^T cache seen as its blocks are written: within each head's place in a block, each token's head_dim
    contiguous. store_kv writes there (a token's V in one run, not a byte every block's width of bytes, each in its
    own sector) and turns a block into V^T once its last token is in; a row's partial last block stays as written,
    and _vt_kernel reads it so."""
    strides = list(v_cache.stride())
    strides[-3], strides[-1] = v_cache.shape[-1], 1
    return v_cache.as_strided(v_cache.shape, strides, v_cache.storage_offset())


def v_values(v_cache: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """A layer's V^T cache as plain [blocks, tokens, kv_heads, head_dim] values: its whole blocks read transposed,
    each row's partial last block (seq_lens[r] % block size keys) as written (v_written)."""
    values = v_cache.clone(memory_format=torch.contiguous_format)
    partial = partial_blocks(seq_lens, block_table, v_cache.shape[1])
    values[partial] = v_written(v_cache)[partial]
    return values


def partial_blocks(seq_lens: torch.Tensor, block_table: torch.Tensor, page: int) -> torch.Tensor:
    """The block ids of each row's partial last block (rows whose length is not a whole number of blocks)."""
    rows = (seq_lens % page).nonzero()[:, 0]
    return block_table[rows, seq_lens[rows].long() // page].long()


def _triton_runs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor | None) -> bool:
    """Whether decode_attention's kernels run on q (else its reference does), checking the strides and the block
    table's dtype they want."""
    if not triton_available(q):
        return False
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or (v_cache.stride(-1) != 1 and not v_transposed(v_cache)):
        raise ValueError("decode_attention wants a unit stride over head_dim (V: or over a block's tokens)")
    if block_table is not None and (block_table.dtype != torch.int32 or block_table.stride(-1) != 1):
        raise ValueError("decode_attention wants an int32 block table with a unit stride over blocks")
    return True


def _keys_attention(q, k_cache, v_cache, seq_lens, scale, k_scale, v_scale, cache_rows, block_table, num_splits,
                    out, block_n, num_warps, num_stages, preload) -> torch.Tensor:
    """decode_attention through int8_keys' kernel: programs (row, head, split), each split starting on a cache block
    and a step, and _split_kernel's merge."""
    n, num_heads, head_dim = q.shape
    _, page, _, _ = k_cache.shape
    max_len = page if block_table is None else block_table.shape[1] * page
    if block_table is not None and block_n % page and page % block_n:
        raise ValueError(f"block_n {block_n} and the cache's {page}-token blocks: one must divide the other")
    vt = v_transposed(v_cache)
    if vt and (block_table is None or cache_rows is not None or page % block_n or block_n < 32):
        raise ValueError("a V cache transposed in each block wants a block table, no cache_rows and block_n >= 32 "
                         f"(the int8 MMA's depth) dividing its {page}-token blocks (got block_n {block_n})")
    if not _triton_runs(q, k_cache, v_cache, block_table):
        return decode_attention_reference(q, k_cache, v_cache, seq_lens, scale, k_scale=k_scale, v_scale=v_scale,
                                          cache_rows=cache_rows, block_table=block_table)
    splits = num_splits or num_kv_splits(max_len, n, num_heads)
    ks, vs = _token_scales(k_scale, v_scale, k_cache)
    whole = max(page, block_n) if block_table is not None else block_n
    pages = _preload(block_table, num_stages, preload, max_len, splits, whole, page)
    mid_o, mid_lse, out = _partials(q, splits, out)
    if vt:
        _vt_kernel[(n, num_heads, splits)](
            q, k_cache, v_cache, seq_lens, block_table, ks, vs, mid_o, mid_lse, out, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(3),
            v_cache.stride(2), block_table.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1), ks.stride(0), ks.stride(1),
            scale * _LOG2E, HEAD_DIM=head_dim, BLOCK_N=block_n, NUM_SPLITS=splits, PAGE=page, WHOLE=whole,
            PRELOAD=pages if pages <= VT_MAX_PRELOAD else 0, ASM=not interpreting(), INTERPRETED=interpreting(),
            num_warps=num_warps, num_stages=num_stages)
        return _merged(mid_o, mid_lse, out, head_dim)
    rows_arg = cache_rows if cache_rows is not None else seq_lens
    table_arg = block_table if block_table is not None else seq_lens
    _keys_kernel[(n, num_heads, splits)](
        q, k_cache, v_cache, seq_lens, rows_arg, table_arg, ks, vs, mid_o, mid_lse, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table_arg.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1), out.stride(0),
        out.stride(1), ks.stride(0), ks.stride(1), scale * _LOG2E, HEAD_DIM=head_dim, BLOCK_N=block_n,
        NUM_SPLITS=splits, HAS_ROWS=cache_rows is not None, HAS_BLOCKS=block_table is not None, PAGE=page,
        WHOLE=whole, PRELOAD=pages, ASM=not interpreting(), INTERPRETED=interpreting(),
        num_warps=num_warps, num_stages=num_stages)
    return _merged(mid_o, mid_lse, out, head_dim)


def _per_head(scale: torch.Tensor | float | None, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    s, _ = _scale_tensor(scale, num_kv_heads, device)
    return s.expand(num_kv_heads)[:, None]  # [kv_heads, 1], broadcast over head_dim


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float, *, k_scale: torch.Tensor | float | None = None,
                               v_scale: torch.Tensor | float | None = None,
                               cache_rows: torch.Tensor | None = None,
                               block_table: torch.Tensor | None = None) -> torch.Tensor:
    """decode_attention in plain torch (float32 softmax over the padded rows, keys past seq_lens masked)."""
    n, num_heads, _ = q.shape
    num_kv_heads = k_cache.shape[2]
    rows = cache_rows.long() if cache_rows is not None else torch.arange(n, device=q.device)
    if k_cache.dtype == torch.int8:  # per-token scales, laid out as the cache: [.., tokens, kv_heads, 1]
        k_scale, v_scale = (s.transpose(1, 2)[..., None] for s in _token_scales(k_scale, v_scale, k_cache))
    else:
        k_scale, v_scale = _per_head(k_scale, num_kv_heads, q.device), _per_head(v_scale, num_kv_heads, q.device)
    if block_table is not None:  # each row's blocks side by side: the padded rows of a slot cache
        if v_transposed(v_cache):
            v_cache = v_values(v_cache, seq_lens, block_table)
        k_cache, v_cache = (c[block_table.long()].flatten(1, 2) for c in (k_cache, v_cache))
        if k_scale.dim() == 4:
            k_scale, v_scale = (s[block_table.long()].flatten(1, 2) for s in (k_scale, v_scale))
    if k_scale.dim() == 4:
        k_scale, v_scale = k_scale[rows], v_scale[rows]
    k = k_cache[rows].float() * k_scale  # [n, max_len, kv_heads, d]
    v = v_cache[rows].float() * v_scale
    group = num_heads // num_kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("nhd,nthd->nht", q.float(), k) * scale
    keep = torch.arange(k.shape[1], device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.einsum("nht,nthd->nhd", torch.softmax(scores, dim=-1), v).to(q.dtype)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x [..., kv_heads, head_dim] -> float8_e4m3fn x / scale (scale: a float or one per KV head), saturated."""
    s = scale if not isinstance(scale, torch.Tensor) else scale.to(x.device, torch.float32).reshape(-1, 1)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., kv_heads, head_dim] -> (int8 round(x · 127 / absmax), float32 absmax / 127 [..., kv_heads]) with one
    absmax per token and KV head, rounded half to even (an all-zero head: zeros, scale 0)."""
    absmax = x.float().abs().amax(dim=-1)
    # 127 / absmax correctly rounded, as the store kernel's div_rn (torch's CPU division can be an ulp off)
    inv = torch.where(absmax > 0, (127.0 / absmax.double()).float(), torch.zeros_like(absmax))
    return torch.round(x.float() * inv[..., None]).to(torch.int8), absmax / 127.0


def fp8_kv_scale(x: torch.Tensor, per_head: bool = True) -> torch.Tensor:
    """A calibration scale for x [..., kv_heads, head_dim]: absmax / 448, per KV head or for the whole tensor."""
    magnitude = x.detach().abs().float()
    amax = magnitude.transpose(-2, -1).flatten(end_dim=-2).amax(dim=0) if per_head else magnitude.amax()
    return (amax / FP8_MAX).clamp(min=math.ldexp(1.0, -20)).reshape(-1)
