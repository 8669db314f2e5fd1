"""Decode attention over an int8 K/V cache where each query head has its own KV head (GROUP 1), sixteen heads a
program: the split kernel's tensor-core tiles want 16 query rows, so one head a program wastes 15 of 16 rows of its
scores, softmax and output. Here those 16 rows are 16 heads of one row, on the same keys:

- scores on the CUDA cores: each key's int8 words against q's (q as two int8 terms, as the split kernel's qk_int8
  2 rounds it) by dp4a, four products an instruction, exact in int32; K needs no conversion;
- P · V on the tensor cores with the heads block-diagonal along the contraction: A [16 heads, (key, head)] holds
  head j's weights only in head j's columns, B [(key, head), head_dim] the step's V rows, so C [16 heads, head_dim]
  is every head's output and no row is padding. V is converted to fp16 and scaled as the split kernel does.

attention.decode_attention launches it (and the split kernel's merge) under --int8-kv-scales v-q16-heads, where
heads_per_program says it applies.
"""

from batchgen.worker.engine.kernels.backend import HAS_TRITON

HEADS = 16  # heads a program: the MMA's 16 rows


def heads_per_program(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """The heads one program of _heads_kernel takes (a power of two dividing the KV heads, at most HEADS); 0 where
    the kernel does not apply (grouped heads, a head_dim that is not a power of two >= 16)."""
    if num_heads != num_kv_heads or head_dim < 16 or head_dim & (head_dim - 1):
        return 0
    per = HEADS
    while num_kv_heads % per:
        per //= 2
    return per


if HAS_TRITON:
    import triton
    import triton.language as tl
    from batchgen.worker.engine.kernels.int8_cvt import int8_to_f16
    from batchgen.worker.engine.kernels.int8_ops import round_half_even

    @triton.jit
    def round_over_absmax(x, INTERPRETED: tl.constexpr):
        """Each row of float32 x rounded to int8's steps over its absmax (as the cache rounds a key), and the scale
        that takes them back (absmax / 127; an all-zero row: zeros, scale 0)."""
        absmax = tl.max(tl.abs(x), 1)
        rounded = round_half_even(x * (127.0 / tl.where(absmax > 0.0, absmax, 1.0))[:, None], INTERPRETED)
        return rounded, absmax / 127.0

    @triton.jit
    def _heads_step(block, start, end, qh, ql, q_scale, lo_scale, m, l_sum, acc, K, V, pages, BlockTable, KScale,
                    VScale, cache_row, heads, h_mask, stride_kr, stride_kt, stride_kh, stride_vr, stride_vt,
                    stride_vh, stride_bt, stride_sr, stride_sh, qk_scale, HEAD_DIM: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_BLOCKS: tl.constexpr, PAGE: tl.constexpr, PRELOAD: tl.constexpr,
                    TERMS: tl.constexpr, LAZY: tl.constexpr, ASM: tl.constexpr, MASKED: tl.constexpr):
        """Keys block .. block + BLOCK_N (inside one cache block) for the program's heads, folded into the running
        max m, sum l_sum [HEADS] and output acc [HEADS, HEAD_DIM]. MASKED: the split's ragged last step."""
        r = tl.arange(0, BLOCK_N * 16)  # the step's (key, head) pairs, key-major
        n = r // 16
        h = r % 16
        d = tl.arange(0, HEAD_DIM)
        t = block + n
        t_mask = t < end if MASKED else tl.full([BLOCK_N * 16], 1, tl.int1)
        if HAS_BLOCKS:
            if PRELOAD:
                page = tl.gather(pages, (block - start) // PAGE + n * 0, 0).to(tl.int64)
            else:
                page = tl.load(BlockTable + cache_row.to(tl.int64) * stride_bt + block // PAGE + n * 0).to(tl.int64)
            slot = block % PAGE + n
            k_at = page * stride_kr + slot * stride_kt
            v_at = page * stride_vr + slot * stride_vt
            s_at = page * stride_sr + slot
        else:
            k_at = cache_row.to(tl.int64) * stride_kr + t * stride_kt
            v_at = cache_row.to(tl.int64) * stride_vr + t * stride_vt
            s_at = cache_row.to(tl.int64) * stride_sr + t
        head = tl.gather(heads, h, 0)
        kv_mask = t_mask & tl.gather(h_mask.to(tl.int32), h, 0).to(tl.int1)
        k = tl.load(K + (k_at + head * stride_kh)[None, :] + d[:, None], mask=kv_mask[None, :], other=0)
        # every head's q against every pair's key on the int8 tensor cores; a pair's score is its own head's row
        on_diagonal = tl.arange(0, 16)[:, None] == h[None, :]
        s = tl.sum(tl.where(on_diagonal, tl.dot(qh, k), 0), 0).to(tl.float32) * tl.gather(q_scale, h, 0)
        if TERMS == 2:
            s += tl.sum(tl.where(on_diagonal, tl.dot(ql, k), 0), 0).to(tl.float32) * tl.gather(lo_scale, h, 0)
        ks = tl.load(KScale + s_at + head * stride_sh, mask=kv_mask, other=0.0)
        vs = tl.load(VScale + s_at + head * stride_sh, mask=kv_mask, other=0.0)
        s = tl.where(t_mask, s * (ks * qk_scale), float("-inf"))
        m_step = tl.max(tl.reshape(s, [BLOCK_N, 16]), 0)
        if LAZY:  # noqa: SIM108  (the running max moves only where a step passes it by LAZY, log2: weights <= 2^LAZY)
            m_new = tl.where(m_step > m + LAZY, m_step, m)
        else:
            m_new = tl.maximum(m, m_step)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - tl.gather(m_new, h, 0))
        l_sum = l_sum * alpha + tl.sum(tl.reshape(p, [BLOCK_N, 16]), 0)
        v = tl.load(V + (v_at + head * stride_vh)[:, None] + d[None, :], mask=kv_mask[:, None], other=0)
        v = int8_to_f16(v, ASM, True, False) * vs.to(tl.float16)[:, None]
        blocks = tl.where(on_diagonal, p[None, :], 0.0).to(tl.float16)  # head j's weights in its own columns
        if LAZY:
            if tl.max(m_new - m, 0) > 0.0:  # a max moved (every head's first step: from -inf)
                acc = acc * alpha[:, None]
            acc = tl.dot(blocks, v, acc)
        else:
            acc = tl.dot(blocks, v, acc * alpha[:, None])
        return m_new, l_sum, acc

    @triton.jit
    def _heads_kernel(Q, K, V, SeqLens, CacheRows, BlockTable, KScale, VScale, MidO, MidLse, Out,
                      stride_qn, stride_qh, stride_kr, stride_kt, stride_kh, stride_vr, stride_vt, stride_vh,
                      stride_bt, stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh,
                      stride_sr, stride_sh, qk_scale, PER_PROGRAM: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr,
                      HAS_BLOCKS: tl.constexpr, PAGE: tl.constexpr, PRELOAD: tl.constexpr, TERMS: tl.constexpr,
                      LAZY: tl.constexpr, ASM: tl.constexpr, INTERPRETED: tl.constexpr):
        """Program (row, head group, split). K is the cache's int32 view (strides in words), V its int8 tensor; the
        grid, splits, block ids ahead (PRELOAD) and outputs are attention._split_kernel's."""
        row = tl.program_id(0)
        group = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(SeqLens + row)
        cache_row = row
        if HAS_ROWS:
            cache_row = tl.load(CacheRows + row)
        whole: tl.constexpr = PAGE if HAS_BLOCKS else BLOCK_N  # a split starts on a cache block (its ids read ahead)
        split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), whole) * whole
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

        j = tl.arange(0, 16)
        d = tl.arange(0, HEAD_DIM)
        h_mask = j < PER_PROGRAM
        heads = group * PER_PROGRAM + j
        qf = tl.load(Q + row * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=h_mask[:, None],
                     other=0.0).to(tl.float32)
        hi, q_scale = round_over_absmax(qf, INTERPRETED)
        qh = hi.to(tl.int8)
        ql = qh
        lo_scale = q_scale
        if TERMS == 2:  # what rounding left, over its own absmax: q to ~14 bits
            lo, lo_scale = round_over_absmax(qf - hi * q_scale[:, None], INTERPRETED)
            ql = lo.to(tl.int8)
        pages = 0
        if PRELOAD:
            ids = start // PAGE + tl.arange(0, PRELOAD)
            pages = tl.load(BlockTable + cache_row.to(tl.int64) * stride_bt + ids, mask=ids < tl.cdiv(end, PAGE),
                            other=0)

        m = tl.full([16], float("-inf"), tl.float32)
        l_sum = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, HEAD_DIM], tl.float32)
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for block in range(start, full_end, BLOCK_N):
            m, l_sum, acc = _heads_step(block, start, end, qh, ql, q_scale, lo_scale, m, l_sum, acc, K, V, pages,
                                        BlockTable, KScale, VScale, cache_row, heads, h_mask, stride_kr, stride_kt,
                                        stride_kh, stride_vr, stride_vt, stride_vh, stride_bt, stride_sr, stride_sh,
                                        qk_scale, HEAD_DIM, BLOCK_N, HAS_BLOCKS, PAGE, PRELOAD, TERMS, LAZY, ASM,
                                        False)
        if full_end < end:
            m, l_sum, acc = _heads_step(full_end, start, end, qh, ql, q_scale, lo_scale, m, l_sum, acc, K, V, pages,
                                        BlockTable, KScale, VScale, cache_row, heads, h_mask, stride_kr, stride_kt,
                                        stride_kh, stride_vr, stride_vt, stride_vh, stride_bt, stride_sr, stride_sh,
                                        qk_scale, HEAD_DIM, BLOCK_N, HAS_BLOCKS, PAGE, PRELOAD, TERMS, LAZY, ASM,
                                        True)

        has_keys = l_sum > 0.0
        out = acc / tl.where(has_keys, l_sum, 1.0)[:, None]
        if NUM_SPLITS == 1:
            tl.store(Out + row * stride_on + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                     mask=h_mask[:, None])
        else:
            lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l_sum, 1.0)), float("-inf"))
            tl.store(MidO + row * stride_mn + heads[:, None] * stride_mh + split * stride_ms + d[None, :], out,
                     mask=h_mask[:, None])
            tl.store(MidLse + row * stride_ln + heads * stride_lh + split, lse, mask=h_mask)

