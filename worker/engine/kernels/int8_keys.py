"""Decode attention over an int8 K/V cache where each query head has its own KV head (GROUP 1), with the keys on
the tensor-core tiles' rows: the split kernel puts the one query row of such a program on a 16-row tile, so its
scores, softmax and weights run 16 times over. Here a step's keys are the rows instead:

- scores: K [keys, head_dim] (int8, as stored) times q's two int8 terms as B's first two columns (of the 16 a tile
  wants), on the int8 tensor cores. q's second term is its rounding error over a fixed 1/128 of the first's step,
  so each score is 128 · hi + lo exactly in int32 before one conversion;
- the softmax on one value a key: the running max is over the score plus log2 of the key's V scale, so the weights
  the product takes (p times V's scale) are <= 2^SLACK_LOG2 and never fp16 subnormals where they matter; it moves
  only where a step's weights would pass that (so most steps skip rescaling the accumulator); the sum of the
  weights without V's scale is kept alongside, per key slot, and reduced once after the loop;
- P · V on the fp16 tensor cores: the weights on the first of A's 16 rows, V converted to fp16 by byte permutes
  and left 1152 over its values (the weights' sum times 1152 comes off once at the end).

attention.decode_attention launches it (and the split kernel's merge) under --int8-kv-scales v-q16-keys (auto's mode
unless the GPU's tuned table names another).

_vt_kernel is the same with V stored transposed in each block (a paged pool whose blocks hold each head's V as
[head_dim, tokens]: kv_pool(transposed=True)): P · V then runs on the int8 tensor cores as the scores do, V^T as A
(head_dim on the tiles' rows, all useful) and the weights (V's scale in them, <= 2^SLACK_LOG2) as three int8 terms on
a fixed scale in B's first three columns, accumulated in int32; no conversion of V and no round trip through shared
memory. The accumulator is rescaled (rounded) only where the lazy max moves. A row's partial last block is read as
store_kv wrote it (each key's head_dim in a run: attention.v_written) and transposed on the way: store_kv writes a
token's V in one run and turns a block into V^T where its last token lands (a token's V written straight into V^T
would be a byte in each of head_dim sectors). --int8-kv-scales v-q16-keys-vt.
"""

from batchgen.worker.engine.kernels.backend import HAS_TRITON

LO_STEPS = 128  # q's second term counts in 1/LO_STEPS of the first's step: a score is LO_STEPS · hi + lo in int32
# the running max is raised only when a step's weights would pass 2^SLACK_LOG2 (FlashAttention-4's lazy rescale):
# weights stay <= 256 in fp16, and the steps that do not raise it skip rescaling the accumulator
SLACK_LOG2 = 8.0
TINY_LOG2 = -100.0  # log2 of a zero V scale (an all-zero head) in the running max: finite, so no inf - inf
# _vt_kernel's weights (<= 2^SLACK_LOG2) as three int8 terms: the first in steps of P_STEP, each further one in steps
# LO_STEPS times finer (an absolute error under P_STEP / LO_STEPS^2 / 2 a weight)
P_STEP = 2.0**SLACK_LOG2 / 127
VT_UNITS = (P_STEP, P_STEP / LO_STEPS, P_STEP / LO_STEPS**2)
VT_MAX_PRELOAD = 64  # block ids a split of _vt_kernel sums its step's id from; past that it reads the id per step


def keys_q(q):
    """q (a torch tensor [..., head_dim]) as _keys_kernel rounds it, in float32: each head's int8 steps over its absmax,
    plus the remainder in steps LO_STEPS times finer (the reference the CPU tests hold the kernel to)."""
    qf = q.float()
    absmax = qf.abs().amax(dim=-1, keepdim=True)
    step = absmax.where(absmax > 0, 1.0) / 127.0
    hi = (qf / step).round()
    return hi * step + ((qf - hi * step) * (LO_STEPS / step)).round() * step / LO_STEPS


def keys_apply(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether _keys_kernel takes a model: one query head a KV head, a head_dim that is a power of two >= 16."""
    return num_heads == num_kv_heads and head_dim >= 16 and not head_dim & (head_dim - 1)


if HAS_TRITON:
    import triton
    import triton.language as tl
    from batchgen.worker.engine.kernels.int8_cvt import I8_BIAS, int8_to_f16, round_half_even
    from batchgen.worker.engine.kernels.splits import preload_ids, split_bounds

    _LO = tl.constexpr(LO_STEPS)  # a Triton function reads module globals only as constexpr
    _TINY = tl.constexpr(TINY_LOG2)
    _SLACK = tl.constexpr(SLACK_LOG2)
    _PQ = tl.constexpr(1 / P_STEP)
    _UNITS = tl.constexpr(VT_UNITS)

    @triton.jit
    def fast_log2(x, ASM: tl.constexpr):
        """log2 of float32 x by the SFU's approximation (tl.log2 is libdevice's exact one: a polynomial, ~20
        instructions a value): its error is far under the fp16 rounding of the weights it feeds."""
        if ASM:
            out = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                            pack=1)
        else:
            out = tl.log2(x)
        return out

    @triton.jit
    def q_columns(q_at, qk_scale, INTERPRETED: tl.constexpr):
        """A query head as the scores' B tile: its two int8 terms (keys_q) as columns 0 and 1 of 16; and the scale
        that takes a score's int32 (LO_STEPS · hi + lo products) to log2 units (qk_scale holds log2(e))."""
        qf = tl.load(q_at).to(tl.float32)
        absmax = tl.max(tl.abs(qf), 0)
        step = tl.where(absmax > 0.0, absmax, 1.0) / 127.0
        hi = round_half_even(qf / step, INTERPRETED)
        lo = round_half_even((qf - hi * step) * (_LO / step), INTERPRETED)  # |lo| <= LO_STEPS / 2
        cols = tl.arange(0, 16)
        qcols = tl.where(cols[None, :] == 0, hi[:, None], tl.where(cols[None, :] == 1, lo[:, None], 0.0)).to(tl.int8)
        return qcols, qk_scale * step / _LO

    @triton.jit
    def keys_scores(k_at, s_at, d, t_mask, qcols, KScale, VScale, s_scale, ASM: tl.constexpr):
        """A step's keys (at k_at, their scales at s_at) against q's columns: the scores in log2 units (-inf past
        t_mask) and the same plus log2 of each key's V scale (the weight the product takes, before the max)."""
        k = tl.load(k_at[:, None] + d[None, :], mask=t_mask[:, None], other=0)
        # column 0: LO_STEPS times the first term's products, column 1 the second's, the rest zero
        cols = tl.arange(0, 16)
        weight = tl.where(cols == 0, _LO, tl.where(cols == 1, 1, 0))
        s = tl.sum(tl.dot(k, qcols) * weight[None, :], 1).to(tl.float32)
        ks = tl.load(KScale + s_at, mask=t_mask, other=0.0)
        vs = tl.load(VScale + s_at, mask=t_mask, other=0.0)
        s = tl.where(t_mask, s * (ks * s_scale), float("-inf"))
        return s, s + tl.maximum(fast_log2(vs, ASM), _TINY)

    @triton.jit
    def _keys_step(block, start, end, qcols, m, l_vec, w_vec, acc, k_base, v_base, pages, BlockTable, KScale, VScale,
                   cache_row, kv_head, stride_kr, stride_kt, stride_vr, stride_vt, stride_bt, stride_sr, stride_sh,
                   s_scale, d, BLOCK_N: tl.constexpr, HAS_BLOCKS: tl.constexpr, PAGE: tl.constexpr,
                   PRELOAD: tl.constexpr, ASM: tl.constexpr, MASKED: tl.constexpr):
        """Keys block .. block + BLOCK_N of the split start .. end folded into the running max m, the per-slot sums
        l_vec (weights) and w_vec (weights times V's scale, as fp16 rounds them) and acc [16, HEAD_DIM] (the product
        in its first row, zeros below). MASKED: the split's ragged last step."""
        j = tl.arange(0, BLOCK_N)
        t = block + j
        t_mask = t < end if MASKED else tl.full([BLOCK_N], 1, tl.int1)
        if HAS_BLOCKS:  # block is a multiple of PAGE or BLOCK_N a divisor of it: slots and ids from j's constants
            slot = block % PAGE + j % PAGE
            if PRELOAD:
                page = tl.gather(pages, (block - start) // PAGE + j // PAGE, 0).to(tl.int64)
            else:
                page = tl.load(BlockTable + cache_row.to(tl.int64) * stride_bt + block // PAGE + j // PAGE,
                               mask=t_mask, other=0).to(tl.int64)
            k_at = k_base + page * stride_kr + slot * stride_kt
            v_at = v_base + page * stride_vr + slot * stride_vt
            s_at = page * stride_sr + kv_head * stride_sh + slot
        else:
            k_at = k_base + t * stride_kt
            v_at = v_base + t * stride_vt
            s_at = cache_row.to(tl.int64) * stride_sr + kv_head * stride_sh + t
        s, sv = keys_scores(k_at, s_at, d, t_mask, qcols, KScale, VScale, s_scale, ASM)
        m_step = tl.max(sv, 0)
        if m_step > m + _SLACK:  # lazily: the running max moves (and the sums are rescaled) only when a weight would
            # pass 2^SLACK, so most steps skip the rescale of acc
            alpha = tl.exp2(m - m_step)
            l_vec *= alpha
            w_vec *= alpha
            acc *= alpha
            m = m_step
        p = tl.exp2(s - m)
        pv = tl.exp2(sv - m).to(tl.float16)  # <= 2^SLACK
        l_vec += p
        w_vec += pv.to(tl.float32)
        v = tl.load(v_at[:, None] + d[None, :], mask=t_mask[:, None], other=0)
        v = int8_to_f16(v, ASM, True, True)  # 1152 + v, exact: the weights' sum times 1152 comes off at the end
        rows = tl.where(tl.arange(0, 16)[:, None] == 0, pv[None, :], 0.0).to(tl.float16)  # row 0: the weights
        acc = tl.dot(rows, v, acc)
        return m, l_vec, w_vec, acc

    @triton.jit
    def _finish(o, l_sum, m, row, kv_head, split, MidO, MidLse, Out, stride_mn, stride_mh, stride_ms, stride_ln,
                stride_lh, stride_on, stride_oh, d, NUM_SPLITS: tl.constexpr):
        """A split's product o (over its weights, l_sum their sum, m the running max) written: the output itself
        (one split) or its partial and log-sum-exp for the merge."""
        has_keys = l_sum > 0.0  # an empty split (short row) contributes nothing to the merge
        out = o / tl.where(has_keys, l_sum, 1.0)
        if NUM_SPLITS == 1:
            tl.store(Out + row * stride_on + kv_head * stride_oh + d, out.to(Out.dtype.element_ty))
        else:
            lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l_sum, 1.0)), float("-inf"))
            tl.store(MidO + row * stride_mn + kv_head * stride_mh + split * stride_ms + d, out)
            tl.store(MidLse + row * stride_ln + kv_head * stride_lh + split, lse)

    @triton.jit
    def _keys_kernel(Q, K, V, SeqLens, CacheRows, BlockTable, KScale, VScale, MidO, MidLse, Out,
                     stride_qn, stride_qh, stride_kr, stride_kt, stride_kh, stride_vr, stride_vt, stride_vh,
                     stride_bt, stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh,
                     stride_sr, stride_sh, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     NUM_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_BLOCKS: tl.constexpr, PAGE: tl.constexpr,
                     WHOLE: tl.constexpr, PRELOAD: tl.constexpr, ASM: tl.constexpr, INTERPRETED: tl.constexpr):
        """Program (row, head, split); the grid, splits, block ids ahead (PRELOAD) and outputs are
        attention._split_kernel's."""
        # WHOLE: a split starts on a cache block and a step
        row, kv_head, split, cache_row, start, end = split_bounds(SeqLens, CacheRows, HAS_ROWS, NUM_SPLITS, WHOLE)

        d = tl.arange(0, HEAD_DIM)
        qcols, s_scale = q_columns(Q + row * stride_qn + kv_head * stride_qh + d, qk_scale, INTERPRETED)
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
        if not HAS_BLOCKS:
            k_base += cache_row.to(tl.int64) * stride_kr
            v_base += cache_row.to(tl.int64) * stride_vr
        pages = 0
        if PRELOAD:
            pages = preload_ids(BlockTable, cache_row, stride_bt, start, end, PAGE, PRELOAD)

        m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        l_vec = tl.zeros([BLOCK_N], tl.float32)
        w_vec = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([16, HEAD_DIM], tl.float32)
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for block in range(start, full_end, BLOCK_N):
            m, l_vec, w_vec, acc = _keys_step(block, start, end, qcols, m, l_vec, w_vec, acc, k_base, v_base, pages,
                                              BlockTable, KScale, VScale, cache_row, kv_head, stride_kr, stride_kt,
                                              stride_vr, stride_vt, stride_bt, stride_sr, stride_sh, s_scale, d,
                                              BLOCK_N, HAS_BLOCKS, PAGE, PRELOAD, ASM, False)
        if full_end < end:
            m, l_vec, w_vec, acc = _keys_step(full_end, start, end, qcols, m, l_vec, w_vec, acc, k_base, v_base,
                                              pages, BlockTable, KScale, VScale, cache_row, kv_head, stride_kr,
                                              stride_kt, stride_vr, stride_vt, stride_bt, stride_sr, stride_sh,
                                              s_scale, d, BLOCK_N, HAS_BLOCKS, PAGE, PRELOAD, ASM, True)

        # the product is acc's first row, zeros below; the weights' sum times 1152 comes off
        _finish(tl.sum(acc, 0) - I8_BIAS * tl.sum(w_vec, 0), tl.sum(l_vec, 0), m, row, kv_head, split, MidO, MidLse,
                Out, stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh, d, NUM_SPLITS)

    @triton.jit
    def _vt_step(block, start, end, qcols, m, l_vec, acc, k_base, v_base, pages, BlockTable, KScale, VScale,
                 cache_row, kv_head, stride_kr, stride_kt, stride_vr, stride_vd, stride_bt, stride_sr, stride_sh,
                 s_scale, d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                 PRELOAD: tl.constexpr, ASM: tl.constexpr, WRITTEN: tl.constexpr, INTERPRETED: tl.constexpr):
        """_keys_step over V^T: acc [HEAD_DIM, 16] int32 holds the product's three terms in its first three
        columns. WRITTEN: a row's partial last block, its V as store_kv wrote it (attention.v_written), keys past
        end masked."""
        j = tl.arange(0, BLOCK_N)
        t_mask = block + j < end if WRITTEN else tl.full([BLOCK_N], 1, tl.int1)
        if PRELOAD:  # one block a step (BLOCK_N divides PAGE): its id as one value, so V^T's rows load contiguous
            page = tl.sum(tl.where(tl.arange(0, PRELOAD) == (block - start) // PAGE, pages, 0), 0).to(tl.int64)
        else:
            page = tl.load(BlockTable + cache_row.to(tl.int64) * stride_bt + block // PAGE).to(tl.int64)
        slot = tl.multiple_of(block % PAGE, BLOCK_N) + j  # aligned: Triton 3.6 proves V^T's load contiguous only so
        s, sv = keys_scores(k_base + page * stride_kr + slot * stride_kt, page * stride_sr + kv_head * stride_sh + slot,
                            d, t_mask, qcols, KScale, VScale, s_scale, ASM)
        m_step = tl.max(sv, 0)
        if m_step > m + _SLACK:  # lazily, as _keys_step
            alpha = tl.exp2(m - m_step)
            l_vec *= alpha
            acc = round_half_even(acc.to(tl.float32) * alpha, INTERPRETED).to(tl.int32)
            m = m_step
        l_vec += tl.exp2(s - m)
        x = tl.exp2(sv - m) * _PQ  # the weights with V's scale, <= 127 in units of P_STEP
        t0 = round_half_even(x, INTERPRETED)
        r = (x - t0) * _LO
        t1 = round_half_even(r, INTERPRETED)
        t2 = round_half_even((r - t1) * _LO, INTERPRETED)
        cols = tl.arange(0, 16)[None, :]
        terms = tl.where(cols == 0, t0[:, None], tl.where(cols == 1, t1[:, None], tl.where(cols == 2, t2[:, None], 0.0)))
        if WRITTEN:  # each key's head_dim in a run
            vt = tl.load((v_base + page * stride_vr + slot * HEAD_DIM)[None, :] + d[:, None], mask=t_mask[None, :],
                         other=0)
        else:
            vt = tl.load((v_base + page * stride_vr + slot)[None, :] + d[:, None] * stride_vd)
        return m, l_vec, tl.dot(vt, terms.to(tl.int8), acc, out_dtype=tl.int32)

    @triton.jit
    def _vt_kernel(Q, K, V, SeqLens, BlockTable, KScale, VScale, MidO, MidLse, Out,
                   stride_qn, stride_qh, stride_kr, stride_kt, stride_kh, stride_vr, stride_vd, stride_vh,
                   stride_bt, stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh,
                   stride_sr, stride_sh, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, PAGE: tl.constexpr, WHOLE: tl.constexpr, PRELOAD: tl.constexpr,
                   ASM: tl.constexpr, INTERPRETED: tl.constexpr):
        """_keys_kernel over a paged pool with V^T in each block (stride_vd between a head's dimensions, its tokens
        contiguous); each row reads its own cache row (no CacheRows)."""
        row, kv_head, split, cache_row, start, end = split_bounds(SeqLens, SeqLens, False, NUM_SPLITS, WHOLE)
        d = tl.arange(0, HEAD_DIM)
        qcols, s_scale = q_columns(Q + row * stride_qn + kv_head * stride_qh + d, qk_scale, INTERPRETED)
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
        pages = 0
        if PRELOAD:
            pages = preload_ids(BlockTable, cache_row, stride_bt, start, end, PAGE, PRELOAD)
        m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        l_vec = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([HEAD_DIM, 16], tl.int32)
        # the row's whole blocks are V^T (a split's part of them whole steps: it starts on a block, it ends on one
        # or at the row's end); its partial last block, from `written`, is as store_kv wrote it
        written = tl.load(SeqLens + row) // PAGE * PAGE
        for block in range(start, tl.minimum(end, tl.maximum(written, start)), BLOCK_N):
            m, l_vec, acc = _vt_step(block, start, end, qcols, m, l_vec, acc, k_base, v_base, pages, BlockTable,
                                     KScale, VScale, cache_row, kv_head, stride_kr, stride_kt, stride_vr, stride_vd,
                                     stride_bt, stride_sr, stride_sh, s_scale, d, HEAD_DIM, BLOCK_N, PAGE, PRELOAD,
                                     ASM, False, INTERPRETED)
        for block in tl.range(tl.maximum(written, start), end, BLOCK_N, num_stages=1):
            m, l_vec, acc = _vt_step(block, start, end, qcols, m, l_vec, acc, k_base, v_base, pages, BlockTable,
                                     KScale, VScale, cache_row, kv_head, stride_kr, stride_kt, stride_vr, stride_vd,
                                     stride_bt, stride_sr, stride_sh, s_scale, d, HEAD_DIM, BLOCK_N, PAGE, PRELOAD,
                                     ASM, True, INTERPRETED)
        cols = tl.arange(0, 16)[None, :]
        unit = tl.where(cols == 0, _UNITS[0], tl.where(cols == 1, _UNITS[1], tl.where(cols == 2, _UNITS[2], 0.0)))
        _finish(tl.sum(acc.to(tl.float32) * unit, 1), tl.sum(l_vec, 0), m, row, kv_head, split, MidO, MidLse, Out,
                stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh, d, NUM_SPLITS)
