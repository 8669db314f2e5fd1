"""The pieces of a W8A8 projection, fused: y = int_mm(q(x), W) · absmax_x · scb / 127² (+ bias) (+ addend).

- quantize_rows: one kernel per token row: absmax, scale, round, int8 cast; optionally zeroing a fixed set
  of outlier columns first (an outlier-aware linear computes those columns densely and passes the result as
  `addend`). quantize_guarded also folds each row's absmax into the outlier guard's buffers (atomics), where
  the guard would otherwise take three more launches per linear input.
- dequantize_acc: the epilogue after torch._int_mm in one pass: int32 acc · absmax · scb / 127² + bias +
  addend, cast to the output dtype.
- int8_matmul_dequant: a Triton int8 GEMM (int32 accumulation on the tensor cores) with that epilogue in
  its last step, so the int32 result never goes to memory; the epilogue can also compute an outlier-aware
  linear's dense part itself (DenseColumns: the activations' outlier columns times their fp16 weight rows).

Arithmetic equals int8_linear's quantize_rows/dequantize (bnb's): fp16 activations, round half to even,
the same 1/127² constant, float32 epilogue in the same order.
"""

from typing import NamedTuple

import torch
from batchgen.worker.engine.kernels.backend import HAS_TRITON, interpreting, triton_available
from batchgen.worker.engine.kernels.int8_gemv import GuardBuffers, _num_sms, fold

INV_127_SQ = 6.200124e-05  # bnb's 1/127² as int8_linear uses it (kept equal so results match bit for bit)
# The most outlier slots the GEMM's epilogue takes. The table's largest pointer launch (256 × 128, 8 warps, 251
# registers without them) then spills 60 bytes a thread once per tile (ptxas -v, with a bias; 976 at 128 slots):
# under half the bytes the [m, n] product computed apart writes and reads back (compile_check builds it, its
# test compares the two). An input with more slots (8 more than its columns, rounded up to 8) keeps the product apart.
MAX_FUSED_SLOTS = 32
# False: every dense product computed apart and added as an [m, n] addend (benchmarks/quality.py's A/B)
FUSE_DENSE = True

if HAS_TRITON:
    import triton
    import triton.language as tl
    from batchgen.worker.engine.kernels.int8_cvt import round_half_even
    from triton.language.extra import libdevice

    try:  # host-side TMA descriptors (Triton >= 3.3); without them the tma launch is refused, the rest runs
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        TensorDescriptor = None

    @triton.jit
    def _absmax_column(a, absmax16, k, none):
        """The first column k where |x| a (fp16) holds the row's absmax, or a NaN (as torch's max: a row NaN throughout,
        whose absmax is NaN or the masked lanes' 0, matches no column and was recorded at `none`, past the input's
        guard); none where neither (tl.min over it and the other lanes' k)."""
        return tl.min(tl.where((a == absmax16) | (a != a), k, none), 0)

    @triton.jit
    def _quantize_row(x, row, k, k_mask, Xq, Absmax, Outliers, Argmax, Seen, Hits, stride_qm, threshold,
                      BLOCK_K: tl.constexpr, HAS_OUTLIERS: tl.constexpr, KEEP: tl.constexpr,
                      HAS_ARGMAX: tl.constexpr, GUARD: tl.constexpr, INTERPRETED: tl.constexpr):
        """One token row x (fp16 [BLOCK_K], zero past K) quantised: its absmax, int8 values and the guard's record."""
        if HAS_OUTLIERS:
            if KEEP:  # an fp16 multiplier, 0 at the outlier columns (int8_outliers' keep): x * keep as torch does
                x = (x * tl.load(Outliers + k, mask=k_mask, other=0.0)).to(tl.float16)
            else:
                x = tl.where(tl.load(Outliers + k, mask=k_mask, other=0) != 0, 0.0, x).to(tl.float16)
        a = tl.abs(x)
        absmax = tl.max(a, 0).to(tl.float32)
        if HAS_ARGMAX or GUARD:  # where the absmax is, the first such column (what the outlier guard records)
            col = _absmax_column(a, absmax.to(tl.float16), k, BLOCK_K)
            if HAS_ARGMAX:
                tl.store(Argmax + row, col.to(tl.int64))
            if GUARD:  # OutlierColumns.record in this launch: no argmax tensor, no scatters after it
                tl.atomic_max(Seen + col, absmax)
                tl.atomic_add(Hits + col, (absmax >= threshold).to(tl.float32))
        inv = 127.0 / absmax
        inv = tl.where(absmax > 0.0, inv, 0.0)  # an all-zero row quantises to zeros, not NaN
        xq = round_half_even(x.to(tl.float32) * inv, INTERPRETED)
        tl.store(Xq + row.to(tl.int64) * stride_qm + k, xq.to(tl.int8), mask=k_mask)
        tl.store(Absmax + row, absmax)

    @triton.jit
    def _quantize_kernel(X, Xq, Absmax, Outliers, Argmax, Seen, Hits, stride_xm, stride_qm, K, threshold,
                         BLOCK_K: tl.constexpr, HAS_OUTLIERS: tl.constexpr, KEEP: tl.constexpr,
                         HAS_ARGMAX: tl.constexpr, GUARD: tl.constexpr, INTERPRETED: tl.constexpr):
        row = tl.program_id(0)
        k = tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(X + row.to(tl.int64) * stride_xm + k, mask=k_mask, other=0.0).to(tl.float16)
        _quantize_row(x, row, k, k_mask, Xq, Absmax, Outliers, Argmax, Seen, Hits, stride_qm, threshold, BLOCK_K,
                      HAS_OUTLIERS, KEEP, HAS_ARGMAX, GUARD, INTERPRETED)

    @triton.jit
    def _norm_quantize_kernel(H, Delta, HOut, W, X, Xq, Absmax, Outliers, Seen, Hits, stride_hm, stride_dm,
                              stride_om, stride_xm, stride_qm, K, eps, threshold, BLOCK_K: tl.constexpr,
                              ADD: tl.constexpr, GEMMA: tl.constexpr, STORE_X: tl.constexpr,
                              HAS_OUTLIERS: tl.constexpr, GUARD: tl.constexpr, INTERPRETED: tl.constexpr):
        """fused.add_rms_norm (ADD) or fused.rms_norm, then _quantize_kernel's row, from one read of the row."""
        row = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BLOCK_K)
        k_mask = k < K
        h = tl.load(H + row * stride_hm + k, mask=k_mask, other=0.0)
        if ADD:  # the residual stream's add in its dtype, as torch's (one rounding of the float32 sum)
            h = (h.to(tl.float32) + tl.load(Delta + row * stride_dm + k, mask=k_mask, other=0.0).to(tl.float32))
            h = h.to(HOut.dtype.element_ty)
            tl.store(HOut + row * stride_om + k, h, mask=k_mask)
        hf = h.to(tl.float32)
        mean_sq = tl.sum(hf * hf, 0) / K
        if INTERPRETED:  # noqa: SIM108  (no libdevice there)
            inv_rms = 1.0 / tl.sqrt(mean_sq + eps)
        else:
            inv_rms = libdevice.rsqrt(mean_sq + eps)
        w = tl.load(W + k, mask=k_mask, other=0.0).to(tl.float32)
        if GEMMA:  # (x · (1 + w)) in float32, then the cast
            x = (hf * inv_rms * (1.0 + w)).to(X.dtype.element_ty)
        else:  # the cast, then w times it in the dtype
            x = (w * (hf * inv_rms).to(X.dtype.element_ty).to(tl.float32)).to(X.dtype.element_ty)
        if STORE_X:
            tl.store(X + row * stride_xm + k, x, mask=k_mask)
        _quantize_row(x.to(tl.float16), row, k, k_mask, Xq, Absmax, Outliers, Absmax, Seen, Hits, stride_qm,
                      threshold, BLOCK_K, HAS_OUTLIERS, True, False, GUARD, INTERPRETED)

    @triton.jit
    def _hadamard_256(x, BLOCK_K: tl.constexpr):
        """x [BLOCK_K] (float32 holding values of the compute dtype) times the block-diagonal 256-wide Sylvester
        Hadamard matrix (rotation.rotate's), as H16 ⊗ H16: each 256-run seen as a 16 × 16 tile X becomes
        H16ᵀ·X·H16, two tf32 dots with K = 16 against a ±1/4 matrix made in registers. fp16 and bf16 values are
        exact in tf32, so the first dot is exact up to its float32 sums; the second takes its operand as a tf32
        part and the float32 rest (tf32x3's split, two dots: the ±1/4 are exact), ~21 bits in all."""
        CHUNKS: tl.constexpr = BLOCK_K // 256
        i = tl.arange(0, 16)[:, None] & tl.arange(0, 16)[None, :]
        parity = (i ^ (i >> 1) ^ (i >> 2) ^ (i >> 3)) & 1
        h = 0.25 - 0.5 * parity.to(tl.float32)  # H16 / 4
        y = tl.dot(tl.reshape(x, [CHUNKS * 16, 16]), h, input_precision="tf32")  # X·H16 / 4, rows (chunk, i)
        y = tl.reshape(tl.permute(tl.reshape(y, [CHUNKS, 16, 16]), (0, 2, 1)), [CHUNKS * 16, 16])  # rows (chunk, l)
        hi = (y.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # the 10 bits tf32 keeps
        z = tl.dot(y - hi, h, tl.dot(hi, h, input_precision="tf32"), input_precision="tf32")  # (H16ᵀ·X·H16)ᵀ / 16
        return tl.reshape(tl.permute(tl.reshape(z, [CHUNKS, 16, 16]), (0, 2, 1)), [BLOCK_K])

    @triton.jit
    def _gated_quantize_kernel(GateUp, X, Xq, Absmax, Outliers, Seen, Hits, stride_gm, stride_xm, stride_qm, K,
                               threshold, TILE: tl.constexpr, ACT: tl.constexpr, ROTATE: tl.constexpr,
                               HAS_OUTLIERS: tl.constexpr, GUARD: tl.constexpr, INTERPRETED: tl.constexpr):
        """fused.gated (act(gate) · up over a gate_up row [2K]), rotation.rotate where ROTATE, then
        _quantize_kernel's row: TILE columns at a time, twice. The first pass computes the activations, writes them
        to X and keeps the running absmax; the second reads them back (from L2: the program wrote them a moment
        before) and quantises. A row in registers at once (16,384 values for Llama-7B's 11,008) left one program
        an SM and ran at a quarter of the copy rate."""
        row = tl.program_id(0).to(tl.int64)
        t = tl.arange(0, TILE)
        dtype = GateUp.dtype.element_ty
        running = tl.zeros([TILE], dtype=tl.float16)
        for k0 in range(0, K, TILE):
            k = k0 + t
            k_mask = k < K
            gate = tl.load(GateUp + row * stride_gm + k, mask=k_mask, other=0.0).to(tl.float32)
            up = tl.load(GateUp + row * stride_gm + K + k, mask=k_mask, other=0.0).to(tl.float32)
            if ACT == 0:  # SiLU
                act = gate / (1.0 + tl.exp(-gate))
            else:  # tanh GELU, its tanh(u) as 1 - 2 / (1 + e^2u)
                u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
                act = 0.5 * gate * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))
            x = (act.to(dtype).to(tl.float32) * up).to(dtype)  # as eager: the activation rounded, then the product
            if ROTATE:
                x = _hadamard_256(x.to(tl.float32), TILE).to(dtype)
            tl.store(X + row * stride_xm + k, x, mask=k_mask)
            x16 = x.to(tl.float16)
            if HAS_OUTLIERS:  # the dense path's columns left out of the int8 input, as _quantize_row's KEEP
                x16 = (x16 * tl.load(Outliers + k, mask=k_mask, other=0.0)).to(tl.float16)
            running = tl.maximum(running, tl.abs(x16))
        absmax16 = tl.max(running, 0)
        absmax = absmax16.to(tl.float32)
        inv = tl.where(absmax > 0.0, 127.0 / absmax, 0.0)  # an all-zero row quantises to zeros, not NaN
        tl.debug_barrier()  # the first pass's stores seen by every thread of the program
        first = K
        for k0 in range(0, K, TILE):
            k = k0 + t
            k_mask = k < K
            x16 = tl.load(X + row * stride_xm + k, mask=k_mask, other=0.0).to(tl.float16)
            if HAS_OUTLIERS:
                x16 = (x16 * tl.load(Outliers + k, mask=k_mask, other=0.0)).to(tl.float16)
            xq = round_half_even(x16.to(tl.float32) * inv, INTERPRETED)
            tl.store(Xq + row * stride_qm + k, xq.to(tl.int8), mask=k_mask)
            if GUARD:  # the first column holding the absmax, as _quantize_row finds it
                first = tl.minimum(first, _absmax_column(tl.abs(x16), absmax16, k, K))
        if GUARD:
            tl.atomic_max(Seen + first, absmax)
            tl.atomic_add(Hits + first, (absmax >= threshold).to(tl.float32))
        tl.store(Absmax + row, absmax)

    @triton.jit
    def _quantize_groups_kernel(X, Xq, Scales, Outliers, stride_xm, stride_qm, stride_sm, NUM_GROUPS,
                                GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                                INTERPRETED: tl.constexpr):
        # one program per token row, BLOCK_G groups of GROUP columns at a time: each group's absmax, then its int8
        row = tl.program_id(0)
        rg = tl.arange(0, BLOCK_G)
        rc = tl.arange(0, GROUP)
        for g0 in range(0, NUM_GROUPS, BLOCK_G):
            g_mask = (g0 + rg) < NUM_GROUPS
            cols = (g0 + rg)[:, None] * GROUP + rc[None, :]
            x = tl.load(X + row.to(tl.int64) * stride_xm + cols, mask=g_mask[:, None], other=0.0).to(tl.float16)
            if HAS_OUTLIERS:
                x = tl.where(tl.load(Outliers + cols, mask=g_mask[:, None], other=0) != 0, 0.0, x).to(tl.float16)
            absmax = tl.max(tl.abs(x), 1).to(tl.float32)
            inv = tl.where(absmax > 0.0, 127.0 / absmax, 0.0)
            xq = round_half_even(x.to(tl.float32) * inv[:, None], INTERPRETED)
            tl.store(Xq + row.to(tl.int64) * stride_qm + cols, xq.to(tl.int8), mask=g_mask[:, None])
            tl.store(Scales + row.to(tl.int64) * stride_sm + g0 + rg, absmax, mask=g_mask)

    @triton.jit
    def _plus_dense_columns(out, rm, rn, M, N, X, Idx, Dense, stride_xm, stride_dn, S, BLOCK_S: tl.constexpr):
        """out + the outlier columns' product X[rm, Idx] @ Dense[:, rn], accumulated into out itself (float32; no
        second tile of registers beside it): the activations gathered by column and the dequantised weight rows,
        S slots of them (free slots: column 0, zero weights)."""
        rs = tl.arange(0, BLOCK_S)
        s_mask = rs < S
        cols = tl.load(Idx + rs, mask=s_mask, other=0)
        xd = tl.load(X + (rm % M)[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=s_mask[None, :], other=0.0)
        wd = tl.load(Dense + rs[:, None].to(tl.int64) * stride_dn + (rn % N)[None, :], mask=s_mask[:, None], other=0.0)
        return tl.dot(xd, wd, out)

    @triton.jit
    def _epilogue(acc, rm, rn, M, N, Absmax, Scb, Bias, Addend, Residual, X, Idx, Dense, Out, stride_am, stride_rm,
                  stride_xm, stride_dn, S, stride_om, inv_sq, HAS_BIAS: tl.constexpr, HAS_ADDEND: tl.constexpr,
                  HAS_RESIDUAL: tl.constexpr, HAS_DENSE: tl.constexpr, BLOCK_S: tl.constexpr,
                  ROW_SCALE: tl.constexpr):
        m_mask = rm < M
        n_mask = rn < N
        mask = m_mask[:, None] & n_mask[None, :]
        scb = tl.load(Scb + rn, mask=n_mask, other=0.0)
        if ROW_SCALE:
            absmax = tl.load(Absmax + rm, mask=m_mask, other=0.0)
            out = acc.to(tl.float32) * (absmax[:, None] * scb[None, :]) * inv_sq
        else:  # per-group scales: acc already holds them (float32)
            out = acc * scb[None, :] * inv_sq
        if HAS_BIAS:
            out = out + tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_ADDEND:
            out = out + tl.load(Addend + rm[:, None].to(tl.int64) * stride_am + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DENSE:
            out = _plus_dense_columns(out, rm, rn, M, N, X, Idx, Dense, stride_xm, stride_dn, S, BLOCK_S)
        if HAS_RESIDUAL:  # residual + the linear's output as torch adds them: the output rounded to its dtype first
            out = out.to(Out.dtype.element_ty).to(tl.float32) + tl.load(
                Residual + rm[:, None].to(tl.int64) * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], out.to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequantize_kernel(Acc, Absmax, Scb, Bias, Addend, Out, M, N, stride_cm, stride_am, stride_om, inv_sq,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_ADDEND: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.load(Acc + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], mask=(rm < M)[:, None] & (rn < N)[None, :],
                      other=0)
        _epilogue(acc, rm, rn, M, N, Absmax, Scb, Bias, Addend, Out, Out, Out, Out, Out, stride_am, 0, 0, 0, 0,
                  stride_om, inv_sq, HAS_BIAS, HAS_ADDEND, False, False, 16, True)

    @triton.jit
    def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """Tile number -> (row block, column block), walking GROUP_M row blocks down one column block before the
        next: the weight tiles they share are still in L2 (Triton's matmul tutorial)."""
        group = GROUP_M * num_n
        first_m = (tile // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % group) % size_m, (tile % group) // size_m

    @triton.jit
    def _int8_mm_kernel(A, B, Absmax, Scb, Bias, Addend, Residual, X, Idx, Dense, Out, M, N, K, stride_am_,
                        stride_bn, stride_add, stride_rm, stride_xm, stride_dn, S, stride_om, stride_sm, inv_sq,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADDEND: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, HAS_DENSE: tl.constexpr, BLOCK_S: tl.constexpr,
                        GROUP_K: tl.constexpr):
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # rows and columns past the ends wrap (and are masked at the store): the loads need no M/N mask
        a_ptr = A + (rm % M)[:, None].to(tl.int64) * stride_am_ + rk[None, :]
        b_ptr = B + (rn % N)[None, :].to(tl.int64) * stride_bn + rk[:, None]
        if GROUP_K:  # a scale per token and group of GROUP_K columns: each block's int32 product scaled into float32
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            s_ptr = Absmax + (rm % M).to(tl.int64) * stride_sm
            for k0 in range(0, K, BLOCK_K):
                a = tl.load(a_ptr)
                b = tl.load(b_ptr)
                part = tl.dot(a, b, out_dtype=tl.int32)
                acc += part.to(tl.float32) * tl.load(s_ptr + k0 // GROUP_K)[:, None]
                a_ptr += BLOCK_K
                b_ptr += BLOCK_K
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptr)
                    b = tl.load(b_ptr)
                else:
                    k_mask = (k0 + rk) < K
                    a = tl.load(a_ptr, mask=k_mask[None, :], other=0)
                    b = tl.load(b_ptr, mask=k_mask[:, None], other=0)
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
                a_ptr += BLOCK_K
                b_ptr += BLOCK_K
        _epilogue(acc, rm, rn, M, N, Absmax, Scb, Bias, Addend, Residual, X, Idx, Dense, Out, stride_add, stride_rm,
                  stride_xm, stride_dn, S, stride_om, inv_sq, HAS_BIAS, HAS_ADDEND, HAS_RESIDUAL, HAS_DENSE, BLOCK_S,
                  GROUP_K == 0)

    @triton.jit
    def _int8_mm_tma_kernel(ADesc, BDesc, Absmax, Scb, Bias, Addend, Residual, Out, M, N, K, stride_add, stride_rm,
                            stride_om, stride_sm, inv_sq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                            HAS_BIAS: tl.constexpr, HAS_ADDEND: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                            GROUP_K: tl.constexpr):
        # Persistent (one program per SM walking tiles in the grouped order) with the operand tiles brought in by
        # Hopper's tensor memory accelerator: the loads are bulk copies that zero-fill past the edges, not address
        # arithmetic per thread (Triton's persistent-matmul tutorial). The epilogue is _int8_mm_kernel's, without
        # the dense columns: the stages' shared memory stays allocated across tiles, leaving no room for them.
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            if GROUP_K:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                s_ptr = Absmax + (rm % M).to(tl.int64) * stride_sm
                for k0 in range(0, K, BLOCK_K):
                    a = ADesc.load([pid_m * BLOCK_M, k0])
                    b = BDesc.load([pid_n * BLOCK_N, k0])
                    part = tl.dot(a, b.T, out_dtype=tl.int32)
                    acc += part.to(tl.float32) * tl.load(s_ptr + k0 // GROUP_K)[:, None]
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
                for k0 in range(0, K, BLOCK_K):
                    a = ADesc.load([pid_m * BLOCK_M, k0])
                    b = BDesc.load([pid_n * BLOCK_N, k0])
                    acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
            _epilogue(acc, rm, rn, M, N, Absmax, Scb, Bias, Addend, Residual, Out, Out, Out, Out, stride_add,
                      stride_rm, 0, 0, 0, stride_om, inv_sq, HAS_BIAS, HAS_ADDEND, HAS_RESIDUAL, False, 16, GROUP_K == 0)


def outlier_mask(cols: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [in_features], 1 at the outlier columns: made once per layer, passed to every quantize_rows."""
    mask = torch.zeros(in_features, dtype=torch.uint8, device=cols.device)
    mask[cols.long()] = 1
    return mask


def quantize_rows_reference(x: torch.Tensor, outliers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] -> (int8 [m, k], absmax float32 [m, 1]); int8_linear.quantize_rows with outlier columns zeroed."""
    x16 = x.to(torch.float16)
    if outliers is not None:
        x16 = x16.masked_fill(outliers.bool(), 0.0)
    absmax = x16.abs().amax(dim=-1, keepdim=True).float()
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    return torch.round(x16 * inv).to(torch.int8), absmax


def quantize_rows(x: torch.Tensor, outliers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] (unit stride over k) -> (int8 [m, k], absmax float32 [m, 1]) in one kernel; outliers: uint8/bool
    [k] (outlier_mask), 1 where the column is left out of the quantised input (zeroed)."""
    if not triton_available(x):
        return quantize_rows_reference(x, outliers)
    xq, absmax, _ = _quantize(x, outliers.view(torch.uint8) if outliers is not None else None, keep=False,
                              argmax=False)
    return xq, absmax


def quantize_groups_reference(x: torch.Tensor, group: int, outliers: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] -> (int8 [m, k], absmax float32 [m, k // group]): quantize_rows_reference per group of columns."""
    x16 = x.to(torch.float16)
    if outliers is not None:
        x16 = x16.masked_fill(outliers.bool(), 0.0)
    m, k = x16.shape
    grouped = x16.view(m, k // group, group)
    absmax = grouped.abs().amax(dim=-1, keepdim=True).float()
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    return torch.round(grouped * inv).to(torch.int8).view(m, k), absmax.view(m, k // group)


def quantize_groups(x: torch.Tensor, group: int, outliers: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] (k a multiple of group, a power of two) -> (int8 [m, k], absmax float32 [m, k // group]): one scale
    per token and group of columns, the scales int8_matmul_dequant(group_k=group) takes; outliers as quantize_rows."""
    m, k = x.shape
    if k % group:
        raise ValueError(f"{k} columns are not groups of {group}")
    if not triton_available(x):
        return quantize_groups_reference(x, group, outliers)
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    absmax = torch.empty(m, k // group, dtype=torch.float32, device=x.device)
    block_g = max(1, min(triton.next_power_of_2(k // group), 4096 // group))
    _quantize_groups_kernel[(m,)](x, xq, absmax, outliers.view(torch.uint8) if outliers is not None else xq,
                                  x.stride(0), xq.stride(0), absmax.stride(0), k // group, GROUP=group, BLOCK_G=block_g,
                                  HAS_OUTLIERS=outliers is not None, INTERPRETED=interpreting(), num_warps=4)
    return xq, absmax


def quantize_argmax(x: torch.Tensor, keep: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8_linear.quantize_argmax (keep None) or quantize_outliers' first three (keep: fp16 [k], 0 at the outlier
    columns) in one kernel: (int8 [m, k] of x16 · keep, its row absmax float32 [m, 1], where that is int64 [m, 1])."""
    if not triton_available(x):
        x16 = x.to(torch.float16) if keep is None else x.to(torch.float16) * keep
        absmax, argmax = x16.abs().max(dim=-1, keepdim=True)
        absmax = absmax.float()
        return torch.round(x16 * (127.0 / absmax)).to(torch.int8), absmax, argmax
    return _quantize(x, keep, keep=True, argmax=True)


def quantize_guarded(x: torch.Tensor, guard: GuardBuffers, *, keep: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_argmax followed by OutlierColumns.record of its absmax and argmax into guard's seen and hits, in
    one kernel: (int8 [m, k] of x16 · guard.keep, its row absmax float32 [m, 1]). keep=False: every column is
    quantised (an input with no outlier column yet, whose keep is all ones: the same numbers, one load fewer)."""
    if not triton_available(x):
        xq, absmax, argmax = quantize_argmax(x, guard.keep if keep else None)
        fold(guard, absmax, argmax)
        return xq, absmax
    xq, absmax, _ = _quantize(x, guard.keep if keep else None, keep=True, argmax=False, guard=guard)
    return xq, absmax


def quantize_input(x: torch.Tensor, guard: GuardBuffers | None, *, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 linear's input quantised as its plan asks: quantize_guarded(x, guard, keep=keep) with an outlier
    guard, else quantize_rows(x)."""
    return quantize_guarded(x, guard, keep=keep) if guard is not None else quantize_rows(x)


class NormedInput(NamedTuple):
    """norm_quantize's results: the residual stream (h + delta, or h), the normed rows (None unless asked for), and
    their int8 values and row absmax as quantize_rows / quantize_guarded give them."""

    h: torch.Tensor
    x: torch.Tensor | None
    xq: torch.Tensor
    absmax: torch.Tensor


def norm_quantize(h: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, delta: torch.Tensor | None = None,
                  guard: GuardBuffers | None = None, *, keep: bool = False, store_x: bool = False) -> NormedInput:
    """fused.add_rms_norm(h, delta, ...) (or fused.rms_norm(h, ...) without delta) and the quantisation of its
    output in one kernel: quantize_guarded(x, guard, keep=keep) with a guard, else quantize_rows(x). h, delta [m, k]
    with unit stride over k, weight [k] in h's dtype. Where Triton does not run: the same functions one by one."""
    if not triton_available(h):
        from batchgen.worker.engine.fused import add_rms_norm, rms_norm

        h, x = add_rms_norm(h, delta, weight, eps, gemma) if delta is not None else (h, rms_norm(h, weight, eps, gemma))
        xq, absmax = quantize_input(x, guard, keep=keep)
        return NormedInput(h, x if store_x else None, xq, absmax)
    m, k = h.shape
    h_out = torch.empty_like(h) if delta is not None else h
    x = torch.empty_like(h) if store_x else h_out
    xq = torch.empty(m, k, dtype=torch.int8, device=h.device)
    absmax = torch.empty(m, 1, dtype=torch.float32, device=h.device)
    keep_cols, seen, hits, threshold = guard if guard is not None else (absmax, absmax, absmax, 0.0)
    block_k = triton.next_power_of_2(k)
    _norm_quantize_kernel[(m,)](
        h, delta if delta is not None else h, h_out, weight, x, xq, absmax, keep_cols, seen, hits, h.stride(0),
        delta.stride(0) if delta is not None else 0, h_out.stride(0), x.stride(0), xq.stride(0), k, float(eps),
        float(threshold), BLOCK_K=block_k, ADD=delta is not None, GEMMA=gemma, STORE_X=store_x,
        HAS_OUTLIERS=guard is not None and keep, GUARD=guard is not None, INTERPRETED=interpreting(),
        num_warps=max(4, min(16, block_k // 1024)))
    return NormedInput(h_out, x if store_x else None, xq, absmax)


GATED_ACTS = {"SiLU": 0, "SiLUActivation": 0, "GELUTanh": 1, "PytorchGELUTanh": 1}  # fused.ACTIVATIONS' names
ROTATE_BLOCK = 256  # the one rotation block the kernel builds (H16 ⊗ H16)


class GatedInput(NamedTuple):
    """gated_quantize's results: the activations (rotated where asked; None unless asked for), their int8 values
    and row absmax as quantize_rows / quantize_guarded give them."""

    x: torch.Tensor | None
    xq: torch.Tensor
    absmax: torch.Tensor


GATED_TILE, GATED_WARPS = 2048, 8  # gated_quantize's launch: columns a step, warps a program (near the best of
# benchmarks/gated.py's launches at every row count it timed; kernels/tuned/<device>.json may hold better)


def gated_quantize(gate_up: torch.Tensor, gate_size: int, act: str, rotate_block: int = 0,
                   guard: GuardBuffers | None = None, *, keep: bool = False, store_x: bool = False,
                   tile: int = GATED_TILE, num_warps: int = GATED_WARPS) -> GatedInput:
    """fused.gated(gate_up, gate_size, act), rotation.rotate(·, rotate_block) where rotate_block, and the
    quantisation of the result (quantize_guarded(x, guard, keep=keep) with a guard, else quantize_rows(x)) in one
    kernel. gate_up [m, 2 * gate_size] with unit stride over its columns; act one of GATED_ACTS; rotate_block 0 or
    ROTATE_BLOCK; tile (a power of two) and num_warps the launch. Where Triton does not run: the same functions one
    by one."""
    if act not in GATED_ACTS or rotate_block not in (0, ROTATE_BLOCK) or gate_up.shape[-1] != 2 * gate_size:
        raise ValueError(f"gated_quantize takes {sorted(GATED_ACTS)}, rotation 0 or {ROTATE_BLOCK} and gate = up; "
                         f"got {act}, {rotate_block}, {gate_size} of {gate_up.shape[-1]}")
    if not triton_available(gate_up):
        from batchgen.worker.engine import rotation
        from batchgen.worker.engine.fused import gated

        x = gated(gate_up, gate_size, act)
        x = rotation.rotate(x, rotate_block) if rotate_block else x
        xq, absmax = quantize_input(x, guard, keep=keep)
        return GatedInput(x if store_x else None, xq, absmax)
    m = gate_up.shape[0]
    k = gate_size
    x = torch.empty(m, k, dtype=gate_up.dtype, device=gate_up.device)  # the second pass reads it back
    xq = torch.empty(m, k, dtype=torch.int8, device=gate_up.device)
    absmax = torch.empty(m, 1, dtype=torch.float32, device=gate_up.device)
    keep_cols, seen, hits, threshold = guard if guard is not None else (absmax, absmax, absmax, 0.0)
    tile = max(tile, ROTATE_BLOCK) if rotate_block else tile
    _gated_quantize_kernel[(m,)](
        gate_up, x, xq, absmax, keep_cols, seen, hits, gate_up.stride(0), x.stride(0), xq.stride(0), k,
        float(threshold), TILE=tile, ACT=GATED_ACTS[act], ROTATE=bool(rotate_block),
        HAS_OUTLIERS=guard is not None and keep, GUARD=guard is not None, INTERPRETED=interpreting(),
        num_warps=num_warps)
    x = x if store_x else None
    return GatedInput(x, xq, absmax)


def _quantize(x: torch.Tensor, columns: torch.Tensor | None, *, keep: bool, argmax: bool,
              guard: GuardBuffers | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    absmax = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    where = torch.empty(m, 1, dtype=torch.int64, device=x.device) if argmax else None
    seen, hits, threshold = (guard.seen, guard.hits, guard.threshold) if guard is not None else (absmax, absmax, 0.0)
    block_k = triton.next_power_of_2(k)
    _quantize_kernel[(m,)](x, xq, absmax, columns if columns is not None else xq, where if argmax else absmax,
                           seen, hits, x.stride(0), xq.stride(0), k, float(threshold), BLOCK_K=block_k,
                           HAS_OUTLIERS=columns is not None, KEEP=keep, HAS_ARGMAX=argmax, GUARD=guard is not None,
                           INTERPRETED=interpreting(), num_warps=max(4, min(16, block_k // 1024)))
    return xq, absmax, where


def dequantize_acc_reference(acc: torch.Tensor, absmax: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                             dtype: torch.dtype, addend: torch.Tensor | None = None, *,
                             inv_sq: float = INV_127_SQ) -> torch.Tensor:
    """int8_linear.dequantize (+ addend)."""
    out = acc * (absmax * scb) * inv_sq
    if bias is not None:
        out = out + bias
    if addend is not None:
        out = out + addend.float()
    return out.to(dtype)


class DenseColumns(NamedTuple):
    """An outlier-aware linear's dense part, which the GEMM's epilogue adds: the activations x [m, k] at the columns
    idx [S] (int64; a free slot points at column 0) times weights [S, n], the dequantised weight rows of those
    columns (a fused projection's view may have wider rows)."""

    x: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor


def dense_product(dense: DenseColumns) -> torch.Tensor:
    """The dense part in float32, as the epilogue computes it (fp16 operands, float32 accumulation)."""
    return dense.x.index_select(1, dense.idx).float() @ dense.weights.float()


def _launch_args(absmax: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, addend: torch.Tensor | None,
                 out: torch.Tensor) -> tuple:
    return (absmax, scb, bias if bias is not None else scb, addend if addend is not None else out)


def _dense_args(dense: DenseColumns | None, out: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """The GEMM's dense pointers (X, Idx, Dense), their ints (stride_xm, stride_dn, S) and constexprs."""
    if dense is None:
        return (out, out, out), (0, 0, 0), dict(HAS_DENSE=False, BLOCK_S=16)
    x, idx, weights = (t if t.stride(-1) == 1 else t.contiguous() for t in dense)
    slots = idx.numel()
    return ((x, idx, weights), (x.stride(0), weights.stride(0), slots),
            dict(HAS_DENSE=True, BLOCK_S=max(16, triton.next_power_of_2(slots))))


def dequantize_acc(acc: torch.Tensor, absmax: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype, addend: torch.Tensor | None = None, *, inv_sq: float = INV_127_SQ) -> torch.Tensor:
    """acc int32 [m, n] (torch._int_mm's), absmax float32 [m, 1] contiguous, scb float32 [n] (weight row absmax),
    bias [n] or None, addend [m, n] or None (e.g. the outlier columns' dense product) -> [m, n] dtype, one pass:
    acc · absmax · scb · inv_sq (+ bias) (+ addend). With scales instead of absmaxes (absmax / 127), inv_sq=1."""
    if not triton_available(acc):
        return dequantize_acc_reference(acc, absmax, scb, bias, dtype, addend, inv_sq=inv_sq)
    m, n = acc.shape
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    block_m, block_n = 8, 512
    args = _launch_args(absmax, scb, bias, addend, out)
    _dequantize_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        acc, *args, out, m, n, acc.stride(0), addend.stride(0) if addend is not None else 0, out.stride(0), inv_sq,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None, HAS_ADDEND=addend is not None, num_warps=4)
    return out


def int8_matmul_dequant(xq: torch.Tensor, absmax: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                        bias: torch.Tensor | None, dtype: torch.dtype, addend: torch.Tensor | None = None, *,
                        dense: DenseColumns | None = None, residual: torch.Tensor | None = None,
                        inv_sq: float = INV_127_SQ, block_m: int | None = None,
                        block_n: int = 128, block_k: int = 128, group_m: int = 8, num_warps: int = 4,
                        num_stages: int = 4, tma: bool = False, group_k: int = 0) -> torch.Tensor:
    """xq int8 [m, k] @ cb int8 [n, k].T with dequantize_acc's epilogue fused: -> [m, n] dtype. No padding for
    small m (unlike cuBLASLt's torch._int_mm). Falls back to torch._int_mm + the reference epilogue.
    dense: the outlier columns' product, computed in the pointer kernel's epilogue (no [m, n] fp16 product written
    and read back); apart for the TMA kernel, past MAX_FUSED_SLOTS, or without FUSE_DENSE.
    tma: the persistent kernel whose tiles Hopper's TMA loads (xq and cb contiguous, k a multiple of 16), a
    launch benchmarks.int8_tune weighs against the pointer-loading one.
    group_k: absmax is [m, k // group_k] (quantize_groups'), one scale per token and group of columns, applied to
    each block's int32 product in the main loop (block_k must divide group_k).
    residual: [m, n] in dtype (unit stride over n): the result is residual + the product, added as torch adds two
    tensors of dtype (the product rounded first), in the epilogue: the residual stream's add without a launch."""
    if addend is not None and dense is not None:
        raise ValueError("an addend or the dense columns, not both")
    m, k = xq.shape
    n = cb.shape[0]
    if group_k and (k % group_k or group_k % block_k):
        raise ValueError(f"groups of {group_k} need k ({k}) a multiple of it and block_k ({block_k}) dividing it")
    if not triton_available(xq):
        addend = dense_product(dense) if dense is not None else addend
        if group_k:  # exact: each group's int8 product fits float64's mantissa many times over
            parts = torch.einsum("mgk,ngk->mng", xq.view(m, -1, group_k).double(), cb.view(n, -1, group_k).double())
            acc = (parts * absmax.double()[:, None, :]).sum(-1).float()
            out = dequantize_acc_reference(acc, torch.ones_like(absmax[:, :1]), scb, bias, dtype, addend,
                                           inv_sq=inv_sq)
        else:
            out = dequantize_acc_reference(torch._int_mm(xq, cb.t()), absmax, scb, bias, dtype, addend, inv_sq=inv_sq)
        return out if residual is None else residual + out
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if dense is not None and (tma or dense.idx.numel() > MAX_FUSED_SLOTS or not FUSE_DENSE):
        # the persistent kernel keeps its stages' shared memory across tiles, so the dense operands would come on
        # top: 288 KiB at its largest launch, over the 227 KiB a block may have; more slots spill registers. There
        # the product is computed apart, as the untuned path does
        addend, dense = dense.x.index_select(1, dense.idx) @ dense.weights, None
    out = torch.empty(m, n, dtype=dtype, device=xq.device)
    args = (*_launch_args(absmax, scb, bias, addend, out), residual if residual is not None else out)
    strides = (addend.stride(0) if addend is not None else 0, residual.stride(0) if residual is not None else 0)
    flags = dict(HAS_BIAS=bias is not None, HAS_ADDEND=addend is not None, HAS_RESIDUAL=residual is not None)
    if tma:
        if TensorDescriptor is None:
            raise RuntimeError(f"this Triton ({triton.__version__}) has no host tensor descriptors: no tma launch")
        num_sms = _num_sms(xq.device)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        _int8_mm_tma_kernel[(min(num_sms, tiles),)](
            TensorDescriptor.from_tensor(xq, [block_m, block_k]), TensorDescriptor.from_tensor(cb, [block_n, block_k]),
            *args, out, m, n, k, *strides, out.stride(0), absmax.stride(0), inv_sq, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, NUM_SMS=num_sms, **flags, GROUP_K=group_k,
            num_warps=num_warps, num_stages=num_stages)
        return out
    dense_pointers, dense_ints, dense_flags = _dense_args(dense, out)
    _int8_mm_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        xq, cb, *args, *dense_pointers, out, m, n, k, xq.stride(0), cb.stride(0), *strides, *dense_ints,
        out.stride(0), absmax.stride(0), inv_sq, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        EVEN_K=k % block_k == 0, **flags, **dense_flags, GROUP_K=group_k, num_warps=num_warps, num_stages=num_stages)
    return out


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None, *,
                outliers: torch.Tensor | None = None, addend: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] -> [m, n] in x's dtype: quantize_rows, then the int8 GEMM with its dequantising epilogue."""
    xq, absmax = quantize_rows(x, outliers)
    return int8_matmul_dequant(xq, absmax, cb, scb, bias, x.dtype, addend)
