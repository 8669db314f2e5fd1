"""Weight-only int8 GEMV for a few rows: y [m, n] = x [m, k] @ (cb [n, k] · scb[n] / 127).T (+ bias), m <= 16.

Decode at small batches is bound by reading the weights once; torch._int_mm (cuBLASLt wants m > 16, so tiny
batches are padded) does not stream them at the bus rate there. Here the activations stay in their dtype,
each int8 weight tile is widened in registers and multiplied in float32 accumulation, and the per-row scale
is applied once after the K sum (it factors out): the weight arithmetic is exact, so no outlier decomposition
is needed on this path.

- One row (m == 1): a multiply-add into a [BLOCK_N, BLOCK_K] float32 accumulator reduced once at the end; its
  loop's weight loads can be multi-buffered with cp.async (`pipeline` stages), or the row can take the dot path.
- More rows: tl.dot of the rows (padded to 16, the smallest dot) with the widened tile.
- Launch: gemv_config's rule, or the launch benchmarks.int8_tune measured best on this GPU (kernels.tuned).
- The outlier guard (int8_outliers): given its buffers, the first programs also fold each row's largest |x|
  among the int8 columns into the guard's seen/hits (what OutlierColumns.record does), in the same launch.
- Split-K: SPLIT_K programs share an output tile's K range and write float32 partials; a second kernel sums
  them in a fixed order (deterministic) and applies scale and bias. The grid comes from the shapes only and
  nothing syncs with the host, so a CUDA graph can hold the launch.
"""

import functools
from typing import NamedTuple

import torch
from batchgen.worker.engine.kernels import tuned
from batchgen.worker.engine.kernels.backend import HAS_TRITON, interpreting, triton_available

INV_127 = 7.874015718698502e-3  # bnb's int8_vectorwise_dequant constant, as int8_linear.dequantize_weight uses it
MAX_ROWS = 16  # the dot path pads the rows to 16: beyond that a GEMM is the better kernel
DOT_ROWS = 16  # tl.dot's smallest M

if HAS_TRITON:
    import triton
    import triton.language as tl
    from batchgen.worker.engine.kernels.int8_cvt import int8_to_f16, int8_to_f32

    @triton.jit
    def _record_rows(X, Keep, Seen, Hits, first, step, M, K, stride_xm, threshold, BLOCK: tl.constexpr):
        """Rows first, first + step, ...: the largest |x| among the int8 columns (in fp16, as the quantiser sees
        it) into seen at its column (max), and a hit there when it reaches the threshold."""
        rk = tl.arange(0, BLOCK)
        for row in range(first, M, step):
            best = tl.zeros([BLOCK], dtype=tl.float32)  # a running max per lane: one reduction at the end
            best_k = tl.zeros([BLOCK], dtype=tl.int32)
            for k0 in range(0, K, BLOCK):
                k = k0 + rk
                k_mask = k < K
                x = tl.load(X + row * stride_xm + k, mask=k_mask, other=0.0).to(tl.float16)
                keep = tl.load(Keep + k, mask=k_mask, other=0.0)
                a = tl.abs(x * keep).to(tl.float32)
                better = a > best
                best = tl.where(better, a, best)
                best_k = tl.where(better, k, best_k)
            absmax = tl.max(best, 0)
            col = tl.min(tl.where(best == absmax, best_k, K), 0)  # the first column holding it
            tl.atomic_max(Seen + col, absmax)
            tl.atomic_add(Hits + col, (absmax >= threshold).to(tl.float32))

    @triton.jit
    def _widen(w, dtype: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
        """int8 -> dtype. BITS: by exponent bits instead of a conversion instruction (which runs at a fraction
        of the ALU rate, too slow to keep up with the bus): 2^23 + 128 + w is exact in float32, 1024 + 128 + w
        in fp16, so one integer add and one subtraction give w. ASM (CUDA): those words by byte permutes instead
        (int8_cvt), fewer instructions; fp16 converted where the tile was loaded."""
        if BITS and dtype == tl.float32:
            return int8_to_f32(w, ASM)
        elif BITS and ASM and dtype == tl.float16:
            return int8_to_f16(w, True, True, False)
        elif BITS and dtype == tl.float16:
            return (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
        else:
            return w.to(dtype)

    @triton.jit
    def _gemv_kernel(X, W, Scb, Bias, Out, Partial, Keep, Seen, Hits, M, N, K, stride_xm, stride_wn, stride_om,
                     inv_127, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, GUARD: tl.constexpr,
                     GUARD_BLOCK: tl.constexpr, EVEN: tl.constexpr, BITS: tl.constexpr, PIPELINE: tl.constexpr,
                     ASM_CVT: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        if GUARD:  # noqa: SIM102  (constexpr: without a guard the branch is not compiled)
            if pid_k == 0:
                _record_rows(X, Keep, Seen, Hits, pid_n, tl.num_programs(0), M, K, stride_xm, threshold, GUARD_BLOCK)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole blocks per split
        k_start = pid_k * k_len
        k_end = tl.minimum(k_start + k_len, K)
        w_ptr = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K]: k contiguous
        if BLOCK_M == 1:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            # pipelined only when asked (PIPELINE > 1): the launch's num_stages multi-buffers only loops that feed a
            # tl.dot, and without cp.async few weight bytes are in flight (whether that wins: benchmarks.int8_tune)
            for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=PIPELINE):
                if EVEN:  # whole tiles: unmasked loads
                    x = tl.load(X + k0 + rk).to(tl.float32)
                    w = tl.load(w_ptr + k0)
                else:
                    k_mask = (k0 + rk) < k_end
                    x = tl.load(X + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)
                    w = tl.load(w_ptr + k0, mask=n_mask[:, None] & k_mask[None, :], other=0)
                acc2 += _widen(w, tl.float32, BITS, ASM_CVT) * x[None, :]
            acc = tl.sum(acc2, 1)[None, :]  # [1, BLOCK_N]
        else:
            rm = tl.arange(0, BLOCK_M)
            m_mask = rm < M
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
            for k0 in range(k_start, k_end, BLOCK_K):
                if EVEN:
                    x = tl.load(x_ptr + k0, mask=m_mask[:, None], other=0.0)
                    w = tl.load(w_ptr + k0)
                else:
                    k_mask = (k0 + rk) < k_end
                    x = tl.load(x_ptr + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                    w = tl.load(w_ptr + k0, mask=n_mask[:, None] & k_mask[None, :], other=0)
                if DOT_F32:  # float32 rows, or bf16 under the interpreter (which multiplies bf16 bits as integers)
                    acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                else:  # |cb| <= 127: exact in fp16 and bf16
                    acc = tl.dot(x, tl.trans(_widen(w, x.dtype, BITS, ASM_CVT)), acc)
        rm = tl.arange(0, BLOCK_M)
        mask = (rm < M)[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            scale = tl.load(Scb + rn, mask=n_mask, other=0.0) * inv_127
            out = acc * scale[None, :]
            if HAS_BIAS:
                out = out + tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(Out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], out.to(Out.dtype.element_ty), mask=mask)
        else:
            part = Partial + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
            tl.store(part, acc, mask=mask)

    @triton.jit
    def _split_sum_kernel(Partial, Scb, Bias, Out, M, N, stride_om, inv_127, BLOCK_N: tl.constexpr,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        row = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):  # fixed order: the same sum on every run
            acc += tl.load(Partial + (s * M + row).to(tl.int64) * N + rn, mask=n_mask, other=0.0)
        out = acc * (tl.load(Scb + rn, mask=n_mask, other=0.0) * inv_127)
        if HAS_BIAS:
            out = out + tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(Out + row.to(tl.int64) * stride_om + rn, out.to(Out.dtype.element_ty), mask=n_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any count; shapes the tests' splits like a large GPU's
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_config(m: int, n: int, k: int, num_sms: int, launch: dict | None = None) -> dict:
    """A launch for these shapes: the rule (narrow output tiles, each program streaming whole weight rows, and
    split-K only when the tiles alone leave the SMs short of two programs each), with what a tuned launch
    (kernels.tuned) sets in its place."""
    block_n = 16 if m == 1 and n >= 8192 else 32
    block_k = 256
    tiles = -(-n // block_n)
    split_k = 1
    while tiles * split_k < 2 * num_sms and k >= 2 * split_k * 4 * block_k and split_k < 16:
        split_k *= 2
    return {"block_n": block_n, "block_k": block_k, "split_k": split_k, "num_warps": 4, "num_stages": 4,
            "dot": False, "pipeline": 1, **(launch or {})}


class GuardBuffers(NamedTuple):
    """An outlier guard's view of one linear input (int8_outliers.OutlierColumns): keep (fp16 [k], 0 at the
    dense columns), seen and hits (float32 [k]) and the threshold."""

    keep: torch.Tensor
    seen: torch.Tensor
    hits: torch.Tensor
    threshold: float


def record_reference(x: torch.Tensor, guard: GuardBuffers) -> None:
    """OutlierColumns.record of quantize_outliers' absmax and argmax, in torch."""
    absmax, argmax = (x.to(torch.float16) * guard.keep).abs().max(dim=-1)
    fold(guard, absmax.float(), argmax)


def fold(guard: GuardBuffers, absmax: torch.Tensor, argmax: torch.Tensor) -> None:
    """Each row's largest |x| into seen at its column (max), and a hit there when it reaches the threshold."""
    absmax, argmax = absmax.reshape(-1), argmax.reshape(-1)
    guard.seen.scatter_reduce_(0, argmax, absmax, reduce="amax")
    guard.hits.scatter_add_(0, argmax, (absmax >= guard.threshold).float())


def int8_gemv_reference(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
                        guard: GuardBuffers | None = None) -> torch.Tensor:
    """x @ (cb · scb / 127).T (+ bias) in float32, cast to x's dtype."""
    if guard is not None:
        record_reference(x, guard)
    out = (x.float() @ cb.float().t()) * (scb.float() * INV_127)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int8_gemv(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
              guard: GuardBuffers | None = None, *, block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None, dot: bool | None = None,
              pipeline: int | None = None, bits: bool = True) -> torch.Tensor:
    """x [m, k] (m <= MAX_ROWS; fp16, bf16 or float32, unit stride over k), cb int8 [n, k] (unit stride over k;
    a row slice of a fused matrix is fine), scb float32 [n] (each row's absmax), bias [n] or None -> [m, n] in
    x's dtype. guard: also record the rows for that outlier guard. Tuning arguments left None come from
    gemv_config (dot: one row through the padded tl.dot path too; pipeline: the one-row loop's cp.async stages);
    bits=False widens the weights with conversion instructions instead of exponent bits."""
    m, k = x.shape
    n = cb.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"int8_gemv takes at most {MAX_ROWS} rows, got {m}")
    if not triton_available(x):
        return int8_gemv_reference(x, cb, scb, bias, guard)
    if x.stride(-1) != 1 or cb.stride(-1) != 1:
        raise ValueError("int8_gemv wants a unit stride over k")
    table = tuned.launches(tuned.device_name(x.device), "gemv")
    cfg = gemv_config(m, n, k, _num_sms(x.device), tuned.pick(table, m, n, k))
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    split_k = split_k or cfg["split_k"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    pipeline = pipeline or cfg["pipeline"]
    block_m = DOT_ROWS if m > 1 or (cfg["dot"] if dot is None else dot) else 1
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    scb = scb if scb.dtype == torch.float32 else scb.float()
    bias_arg = bias if bias is not None else scb
    dot_f32 = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
    keep, seen, hits, threshold = guard if guard is not None else (scb, scb, scb, 0.0)
    _gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x, cb, scb, bias_arg, out, partial, keep, seen, hits, m, n, k, x.stride(0), cb.stride(0), out.stride(0),
        INV_127, float(threshold), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        HAS_BIAS=bias is not None, DOT_F32=dot_f32, GUARD=guard is not None,
        GUARD_BLOCK=min(1024, triton.next_power_of_2(k)), EVEN=k % block_k == 0 and n % block_n == 0, BITS=bits,
        PIPELINE=pipeline, ASM_CVT=not interpreting(), num_warps=num_warps, num_stages=num_stages)
    if split_k > 1:
        sum_block = min(1024, triton.next_power_of_2(n))
        _split_sum_kernel[(m, triton.cdiv(n, sum_block))](
            partial, scb, bias_arg, out, m, n, out.stride(0), INV_127, BLOCK_N=sum_block, SPLIT_K=split_k,
            HAS_BIAS=bias is not None, num_warps=4)
    return out
