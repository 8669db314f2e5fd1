"""The decode step's Triton kernels equal their plain-torch references: run on the CPU by Triton's interpreter.

Decode attention over a ragged slot cache (rows of length 1, 2, odd and max), GQA ratios 1/4/8, head_dim 64 and
128, fp16/bf16, fp8-e4m3 K/V and int8 K/V (a scale per token) against the dequantised reference; the fused int8 quantise / dequantise / GEMM
against int8_linear's own arithmetic, bit for bit.
"""

import json
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: the kernels run on CPU tensors

import math

import pytest
import torch

pytest.importorskip("triton")

from batchgen.worker.engine import int8_linear  # noqa: E402
from batchgen.worker.engine.kernels import (  # noqa: E402
    attention,
    decode_attention,
    decode_attention_reference,
    dequantize_acc,
    int8_matmul_dequant,
    num_kv_splits,
    outlier_mask,
    quantize_kv,
    quantize_rows,
    quantize_rows_reference,
)
from batchgen.worker.engine.kernels import int8_linear as fused_int8_linear  # noqa: E402
from batchgen.worker.engine.kernels.attention import fp8_kv_scale  # noqa: E402

MAX_LEN = 80  # spans two 64-key blocks, so the kernel's inner loop runs more than once


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same inputs whichever tests ran before


def _cache(num_rows: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_rows, MAX_LEN, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_rows, MAX_LEN, num_kv_heads, head_dim, generator=g).to(dtype)
    return k, v


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # an output ulp or two
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype", [
    (4, 4, 64, torch.float16), (8, 2, 128, torch.float16), (16, 2, 64, torch.bfloat16), (8, 1, 128, torch.bfloat16)])
def test_decode_attention_reads_each_rows_own_length(num_heads, num_kv_heads, head_dim, dtype):
    lengths = torch.tensor([1, 2, 37, MAX_LEN], dtype=torch.int32)  # one key, two, odd across a block, the whole row
    k, v = _cache(len(lengths), num_kv_heads, head_dim, dtype)
    q = torch.randn(len(lengths), num_heads, head_dim).to(dtype)
    ref = decode_attention_reference(q, k, v, lengths, head_dim**-0.5)
    for splits in (1, 3):  # one split, and splits that leave the short rows' later splits empty
        _close(decode_attention(q, k, v, lengths, head_dim**-0.5, num_splits=splits), ref, dtype)


def test_one_split_writes_the_output_itself_and_an_empty_row_reads_zeros():
    """At one split (every batch of more than 32 rows) stage one stores the output and no merge runs: the result
    equals the merged three-split one, a row of no keys (a graph's padding row) is zeros either way, and out=
    is filled in place."""
    lengths = torch.tensor([0, 5, MAX_LEN], dtype=torch.int32)
    k, v = _cache(3, 2, 64, torch.float16)
    q = torch.randn(3, 8, 64).to(torch.float16)
    out = torch.full((3, 8, 64), float("nan"), dtype=torch.float16)
    one = decode_attention(q, k, v, lengths, 0.125, num_splits=1, out=out)
    three = decode_attention(q, k, v, lengths, 0.125, num_splits=3)
    assert one.data_ptr() == out.data_ptr() and not out.isnan().any()
    assert torch.equal(one[0], torch.zeros_like(one[0])) and torch.equal(three[0], torch.zeros_like(three[0]))
    _close(one[1:], three[1:], torch.float16)
    _close(one[1:], decode_attention_reference(q, k, v, lengths, 0.125)[1:], torch.float16)


def test_decode_attention_tuning_keeps_the_result():
    lengths = torch.tensor([1, 33, MAX_LEN], dtype=torch.int32)
    k, v = _cache(3, 2, 64, torch.float16)
    q = torch.randn(3, 8, 64).to(torch.float16)
    ref = decode_attention_reference(q, k, v, lengths, 0.125)
    for block_n in (32, 128):  # 128 > MAX_LEN: one masked block; 32: three blocks, the last one ragged
        _close(decode_attention(q, k, v, lengths, 0.125, num_splits=2, block_n=block_n, num_warps=8), ref, torch.float16)


def test_keys_past_a_rows_length_do_not_change_its_output():
    k, v = _cache(2, 2, 64, torch.float16)
    q = torch.randn(2, 4, 64).to(torch.float16)
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    before = decode_attention(q, k, v, lengths, 0.125, num_splits=2)
    k[:, 9:], v[:, 9:] = 1e4, -1e4  # stale K/V of a previous occupant
    assert torch.equal(decode_attention(q, k, v, lengths, 0.125, num_splits=2), before)
    ref_one_key = v[:, 0, [0, 0, 1, 1]]  # a row of length 1 attends to its one key: the output is its value
    out = decode_attention(q, k, v, torch.tensor([1, 1], dtype=torch.int32), 0.125)
    torch.testing.assert_close(out, ref_one_key, atol=1e-3, rtol=0)


def test_query_strides_and_cache_rows_follow_the_runner_layout():
    """q may be a slice of a fused q/k/v output (row stride > heads * d); cache_rows maps rows to cache slots."""
    k, v = _cache(5, 2, 64, torch.float16)
    qkv = torch.randn(3, (8 + 2 * 2) * 64).to(torch.float16)
    q = qkv[:, :8 * 64].view(3, 8, 64)
    assert not q.is_contiguous()
    lengths = torch.tensor([3, 80, 17], dtype=torch.int32)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32)
    ref = decode_attention_reference(q, k, v, lengths, 0.125, cache_rows=rows)
    _close(decode_attention(q, k, v, lengths, 0.125, cache_rows=rows), ref, torch.float16)
    assert not torch.allclose(ref, decode_attention_reference(q, k, v, lengths, 0.125), atol=1e-2)


@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_kv_equals_the_dequantised_reference(per_head):
    k, v = _cache(4, 2, 128, torch.float16)
    v[:, :, 1] *= 8  # heads of different ranges: what a per-head scale is for
    q = torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    lengths = torch.tensor([1, 2, 37, MAX_LEN], dtype=torch.int32)
    k_scale, v_scale = fp8_kv_scale(k, per_head), fp8_kv_scale(v, per_head)
    assert k_scale.numel() == (2 if per_head else 1)
    k8, v8 = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
    assert k8.dtype == torch.float8_e4m3fn
    ref = decode_attention_reference(q, k8, v8, lengths, 128**-0.5, k_scale=k_scale, v_scale=v_scale)
    out = decode_attention(q, k8, v8, lengths, 128**-0.5, k_scale=k_scale, v_scale=v_scale, num_splits=2)
    _close(out, ref, torch.float16)
    exact = decode_attention_reference(q, k, v, lengths, 128**-0.5)
    relative = (ref.float() - exact.float()).abs().max() / exact.float().abs().max()
    assert relative < 0.07  # e4m3 rounds each value within 2^-4 of itself (3 mantissa bits); fp16 adds a little


def test_split_count_comes_from_shapes_and_fills_small_batches():
    assert num_kv_splits(768, 260, 32) == 1
    assert num_kv_splits(768, 1, 32) == 12  # 768 / 64 key blocks
    assert num_kv_splits(768, 4, 8) == 12
    assert num_kv_splits(64, 1, 1) == 1


def _spy_launches(monkeypatch, attention, kernel: str = "_split_kernel") -> list[dict]:
    """The constexprs and arguments of each launch of attention's kernel (the split kernel's unless named) from here
    on (the launch itself still runs)."""
    launches, split_kernel = [], getattr(attention, kernel)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return split_kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attention, kernel, Spy())
    return launches


def test_a_paged_launch_preloads_a_splits_block_ids_where_it_pipelines_deeper(monkeypatch):
    """The split's block ids are held ahead of the loop at 3 stages or more (the compiler then pipelines the K/V
    loads that deep, compile_check asserts it), as many as a split spans rounded up to a power of two; a split past
    MAX_PRELOAD blocks reads them per step. Every choice gives the reference's output."""
    from batchgen.worker.engine.kernels import attention

    assert attention.preload_pages(768, 1, 128, 64) == 16  # 12 blocks
    assert attention.preload_pages(768, 12, 64, 64) == 1
    assert attention.preload_pages(770, 3, 128, 64) == 8  # 257 keys a split -> three 128-key steps: 6 blocks
    assert attention.preload_pages(1 << 17, 1, 128, 64) == 0  # 2,048 blocks: past MAX_PRELOAD
    launches = _spy_launches(monkeypatch, attention)
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(9, 16, 2, 64, generator=g).half() for _ in range(2))
    q = torch.randn(3, 4, 64, generator=g).half()
    table = torch.tensor([[3, 1, 4, 0, 0], [8, 2, 6, 5, 7], [1, 0, 0, 0, 0]], dtype=torch.int32)
    lengths = torch.tensor([40, 80, 9], dtype=torch.int32)
    ref = decode_attention_reference(q, k, v, lengths, 0.125, block_table=table)
    for stages, limit, want in ((2, 1024, 0), (3, 1024, 8), (3, 4, 0)):  # 5 blocks of 16 keys at one split
        monkeypatch.setattr(attention, "MAX_PRELOAD", limit)
        out = decode_attention(q, k, v, lengths, 0.125, block_table=table, num_splits=1, block_n=16,
                               num_stages=stages)
        assert launches[-1]["PRELOAD"] == want
        _close(out, ref, torch.float16)


def test_quantize_rows_equals_int8_linear_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 300, generator=g) * 4).to(torch.float16)
    x[0, :4] = torch.tensor([254.0, 1.0, 3.0, 5.0])  # scale 0.5: ties at .5, 1.5, 2.5 round to even (0, 2, 2)
    x[0, 4:] = 0
    xq, absmax = quantize_rows(x)
    ref_q, ref_absmax = int8_linear.quantize_rows(x)
    assert torch.equal(xq, ref_q) and torch.equal(absmax, ref_absmax)
    assert xq[0, :4].tolist() == [127, 0, 2, 2]
    xq, _ = quantize_rows(x.to(torch.bfloat16))  # bf16 activations go through fp16 as bnb's do
    assert torch.equal(xq, int8_linear.quantize_rows(x.to(torch.bfloat16))[0])


def test_quantize_rows_leaves_outlier_columns_out():
    x = torch.randn(3, 64).to(torch.float16)
    x[:, 5] = 100.0  # an outlier column would otherwise set every row's scale
    mask = outlier_mask(torch.tensor([5, 9]), 64)
    xq, absmax = quantize_rows(x, mask)
    ref_q, ref_absmax = quantize_rows_reference(x, mask)
    assert torch.equal(xq, ref_q) and torch.equal(absmax, ref_absmax)
    assert (xq[:, [5, 9]] == 0).all() and (absmax < 100).all()


def test_quantize_argmax_equals_the_guarded_quantisers_bit_for_bit():
    """One kernel for int8_linear.quantize_argmax and quantize_outliers' int8/absmax/argmax: x16 · keep, its row
    absmax and the first column holding it (a tie between two columns goes to the first, as torch's max does)."""
    from batchgen.worker.engine.kernels.int8_ops import quantize_argmax

    g = torch.Generator().manual_seed(12)
    x = torch.randn(7, 80, generator=g) * 3
    x[0, [5, 9]] = torch.tensor([-11.0, 11.0])  # a tie
    x[1, 70] = 40.0  # an outlier column, left out below
    keep = torch.ones(80, dtype=torch.float16)
    keep[70] = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        assert all(torch.equal(a, b) for a, b in zip(quantize_argmax(xd), int8_linear.quantize_argmax(xd), strict=True))
        ref = int8_linear.quantize_outliers(xd, keep, torch.tensor([70]))[:3]
        assert all(torch.equal(a, b) for a, b in zip(quantize_argmax(xd, keep), ref, strict=True))
    assert quantize_argmax(x)[2][0, 0] == 5 and quantize_argmax(x, keep)[2][1, 0] != 70


def test_the_guarded_quantiser_records_what_the_guard_would_after_it():
    """quantize_guarded: quantize_argmax's int8 and absmax, and the guard's seen (max) and hits at each row's argmax
    column folded in by atomics, equal to OutlierColumns.record of the separate quantiser's outputs, rows sharing a
    column included; keep=False quantises every column."""
    from batchgen.worker.engine.int8_outliers import OutlierColumns
    from batchgen.worker.engine.kernels.int8_gemv import GuardBuffers
    from batchgen.worker.engine.kernels.int8_ops import quantize_argmax, quantize_guarded

    g = torch.Generator().manual_seed(13)
    x = (torch.randn(9, 80, generator=g) * 2).to(torch.float16)
    x[[0, 3, 4], 11] = torch.tensor([7.0, -9.0, 5.0], dtype=torch.float16)  # three rows' max in one column
    x[1, 70] = 40.0  # a dense column: left out when keep applies
    for keep in (True, False):
        ours, ref = OutlierColumns(80, 6.0, x.device), OutlierColumns(80, 6.0, x.device)
        for o in (ours, ref):
            o.resize(8)
            o.add([70]) if keep else None
            o.seen.fill_(0.5)
            o.hits.fill_(2.0)
        xq, absmax = quantize_guarded(x, GuardBuffers(ours.keep, ours.seen, ours.hits, 6.0), keep=keep)
        want_q, want_absmax, argmax = quantize_argmax(x, ref.keep if keep else None)
        ref.record(want_absmax, argmax)
        assert torch.equal(xq, want_q) and torch.equal(absmax, want_absmax)
        assert torch.equal(ours.seen, ref.seen) and torch.equal(ours.hits, ref.hits), keep
        assert ours.seen[11] == 9.0 and ours.hits[11] == 4.0  # 2 before, two rows at or above 6 (7 and -9)
        assert (ours.seen[70] == 40.0) != keep


def test_the_guarded_quantisers_record_a_nan_row_inside_the_guard():
    """A row holding NaN (an fp16 overflow upstream) is recorded inside its input's guard by each fused quantiser
    and by the GEMV (the quantisers put a row NaN throughout at its first column, where torch's max, which
    propagates NaN, puts it; the GEMV's running max passes over NaN). The quantisers' search for the absmax's column
    found none in a row NaN throughout (its absmax NaN, or 0 from the masked lanes past K) and wrote seen/hits at
    BLOCK_K or K: past the input's own, into the next input's of the flat buffers that hold every input's
    (int8_outliers), or past them. The guard here is the first half of larger buffers; the second half must stay
    as it was."""
    from batchgen.worker.engine.kernels.int8_gemv import GuardBuffers, int8_gemv
    from batchgen.worker.engine.kernels.int8_ops import (
        gated_quantize,
        norm_quantize,
        quantize_argmax,
        quantize_guarded,
    )

    k, nan = 80, float("nan")
    g = torch.Generator().manual_seed(14)
    x = (torch.rand(3, k, generator=g) * 2 - 1).to(torch.float16)  # |x| < 1: no row reaches the threshold
    x[:, 0] = 0.0  # no finite row's record at column 0, where the row NaN throughout records
    x[0, [7, 30]] = nan  # NaN among finite values
    x[1] = nan  # a row NaN throughout (what the layers after one NaN see)
    gate_up = torch.cat([x, torch.ones(3, k, dtype=torch.float16)], 1)  # SiLU(x) · 1: NaN where x has it
    runs = {"quantize_guarded": lambda guard: quantize_guarded(x, guard),
            "norm_quantize": lambda guard: norm_quantize(x, torch.ones(k, dtype=torch.float16), 1e-6, False,
                                                         guard=guard),
            "gated_quantize": lambda guard: gated_quantize(gate_up, k, "SiLU", guard=guard),
            "int8_gemv": lambda guard: int8_gemv(x, torch.ones(16, k, dtype=torch.int8), torch.ones(16), guard=guard)}
    for name, run in runs.items():
        seen, hits = torch.full((2, 2 * k), -1.0).unbind()  # below any |x|: a record anywhere shows
        run(GuardBuffers(torch.ones(k, dtype=torch.float16), seen[:k], hits[:k], 6.0))
        assert torch.equal(seen[k:], torch.full((k,), -1.0)) and torch.equal(hits, torch.full((2 * k,), -1.0)), name
        assert seen[0] != -1 and (seen[:k] != -1).sum() <= 3, name  # three rows, three records at most
    # the same search gives quantize_argmax's columns, which a caller scatters into a guard as OutlierColumns.record
    cols = quantize_argmax(x)[2].flatten()
    assert cols[1] == 0 and (cols < k).all() and cols[2] == x[2].abs().argmax()


def test_dequantize_and_int8_gemm_equal_int8_linear():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 96, generator=g).to(torch.float16)
    cb = torch.randint(-127, 128, (48, 96), dtype=torch.int8, generator=g)
    scb = torch.rand(48, generator=g) + 0.5
    bias = torch.randn(48, generator=g).to(torch.float16)
    xq, absmax = quantize_rows(x)
    acc = torch._int_mm(xq, cb.t())
    for b in (None, bias):
        ref = int8_linear.dequantize(acc, absmax, scb, b, torch.float16)
        assert torch.equal(dequantize_acc(acc, absmax, scb, b, torch.float16), ref)
        fused = int8_matmul_dequant(xq, absmax, cb, scb, b, torch.float16, block_m=16, block_n=32, block_k=64)
        assert torch.equal(fused, ref)  # int32 accumulation is exact; the epilogue is the same float32 arithmetic
    dense = torch.randn(20, 48, generator=g).to(torch.float16)  # the outlier columns' dense product
    ref = (int8_linear.dequantize(acc, absmax, scb, bias, torch.float32) + dense.float()).to(torch.float16)
    assert torch.equal(dequantize_acc(acc, absmax, scb, bias, torch.float16, dense), ref)
    assert torch.equal(fused_int8_linear(x, cb, scb, bias, addend=dense), ref)


def test_the_tma_persistent_gemm_equals_the_pointer_one():
    """int8_matmul_dequant(tma=True): tiles loaded through tensor descriptors (zero-filled past every edge: 37 rows,
    80 columns and 176 inputs, none a multiple of its block), 132 programs walking the 3 × 3 tiles (grouped
    order, fewer tiles than programs), bias and addend: bit-equal to the pointer-loading kernel and int8_linear's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 176, generator=g).to(torch.float16)
    cb = torch.randint(-127, 128, (80, 176), dtype=torch.int8, generator=g)
    scb = torch.rand(80, generator=g) + 0.5
    bias = torch.randn(80, generator=g).to(torch.float16)
    dense = torch.randn(37, 80, generator=g).to(torch.float16)
    xq, absmax = quantize_rows(x)
    acc = torch._int_mm(torch.nn.functional.pad(xq, (0, 0, 0, 3)), cb.t())[:37]  # _int_mm wants rows > 16, even
    launch = dict(block_m=16, block_n=32, block_k=64, group_m=2)
    for b, add in ((None, None), (bias, dense)):
        ref = int8_matmul_dequant(xq, absmax, cb, scb, b, torch.float16, add, **launch)
        tma = int8_matmul_dequant(xq, absmax, cb, scb, b, torch.float16, add, tma=True, **launch)
        assert torch.equal(tma, ref)
    assert torch.equal(tma, dequantize_acc(acc, absmax, scb, bias, torch.float16, dense))


def test_the_gemms_epilogue_computes_the_outlier_columns_dense_part():
    """int8_matmul_dequant(dense=...): the pointer kernel computes the activations' outlier columns times their
    weight rows in its epilogue, equal to the dense product added to the reference epilogue in float32: 24 slots
    (16 used, the free ones at column 0 with zero weights), the weight rows a view of a wider buffer (a fused
    projection's), 37 rows. The persistent TMA kernel has no shared memory left for them: it adds the fp16 product
    computed apart, bit for bit as the untuned path does."""
    from batchgen.worker.engine.kernels.int8_ops import DenseColumns, dense_product

    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 176, generator=g).to(torch.float16)
    cb = torch.randint(-127, 128, (80, 176), dtype=torch.int8, generator=g)
    scb = torch.rand(80, generator=g) + 0.5
    bias = torch.randn(80, generator=g).to(torch.float16)
    idx = torch.zeros(24, dtype=torch.long)
    idx[:16] = torch.randperm(176, generator=g)[:16]
    wide = torch.zeros(24, 200, dtype=torch.float16)
    wide[:16, 40:120] = torch.randn(16, 80, generator=g).to(torch.float16)
    dense = DenseColumns(x, idx, wide[:, 40:120])
    xq, absmax = quantize_rows(x, outlier_mask(idx[:16], 176))
    launch = dict(block_m=16, block_n=32, block_k=64, group_m=2)
    product = dense_product(dense)
    acc = torch._int_mm(torch.nn.functional.pad(xq, (0, 0, 0, 3)), cb.t())[:37]
    got = int8_matmul_dequant(xq, absmax, cb, scb, bias, torch.float16, dense=dense, **launch)
    _close(got, dequantize_acc(acc, absmax, scb, bias, torch.float16, product), torch.float16)
    tma = int8_matmul_dequant(xq, absmax, cb, scb, bias, torch.float16, dense=dense, tma=True, **launch)
    apart = x.index_select(1, idx) @ dense.weights
    assert torch.equal(tma, dequantize_acc(acc, absmax, scb, bias, torch.float16, apart))
    # the dense part is there: without it the result moves by the product
    plain = int8_matmul_dequant(xq, absmax, cb, scb, bias, torch.float16, **launch)
    assert (got.float() - plain.float() - product).abs().max() < 0.05 * product.abs().max()
    with pytest.raises(ValueError, match="not both"):
        int8_matmul_dequant(xq, absmax, cb, scb, bias, torch.float16, product, dense=dense)
    # more slots than the epilogue takes: the product computed apart, as for the TMA kernel
    from batchgen.worker.engine.kernels.int8_ops import MAX_FUSED_SLOTS

    many = DenseColumns(x, torch.zeros(MAX_FUSED_SLOTS + 8, dtype=torch.long),
                        torch.zeros(MAX_FUSED_SLOTS + 8, 80, dtype=torch.float16))
    many.idx[:16], many.weights[:16] = idx[:16], dense.weights[:16]
    got = int8_matmul_dequant(xq, absmax, cb, scb, bias, torch.float16, dense=many, **launch)
    apart = x.index_select(1, many.idx) @ many.weights
    assert torch.equal(got, dequantize_acc(acc, absmax, scb, bias, torch.float16, apart))


_PER_KB_SCRIPT = """
import json, torch
from batchgen.worker.engine.kernels import attention
from batchgen.worker.engine.kernels.compile_check import build_split, loop_instructions
import benchmarks.kernels as bench
kernel = build_split(90, "*i8", dict(GROUP=4, BLOCK_H=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=128, NUM_SPLITS=1,
                                     HAS_ROWS=False, HAS_BLOCKS=True, DOT_F32=False, TOKEN_SCALES=True,
                                     SCALES_IN_P=False, F16_INT8=True, ASM_CVT=True, PAGE=64, CVT_EARLY=True,
                                     PRELOAD=16, BIAS=True), num_warps=4, num_stages=3)
class Launcher:  # what a CUDA launch of the split kernel returns: the compiled kernel
    def __getitem__(self, grid):
        return lambda *args, **kwargs: kernel
attention._split_kernel = Launcher()
torch.cuda.get_device_capability, torch.cuda.is_available = lambda: (9, 0), lambda: True
q, cache = torch.zeros(2, 8, 128, dtype=torch.float16), torch.zeros(2, 64, 2, 128, dtype=torch.int8)
per_kb = bench.loop_instructions_per_kb(lambda: attention._split_kernel[(1,)](q, cache, BLOCK_N=128, num_warps=4))
print(json.dumps({"bench": per_kb, "body": loop_instructions(kernel.asm["cubin"], 90)}))
"""


def test_the_kernel_benchmark_counts_a_launchs_loop_instructions_a_kb():
    """benchmarks.kernels' instruction count beside each bandwidth: the loop of the kernel a variant launched (here
    the biased int8 launch, compiled for sm_90 as on the GPU) times its warps, over the K/V bytes of one step."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PER_KB_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["body"] > 0 and got["bench"] == round(got["body"] * 4 / (128 * 128 * 2 / 1024), 1), got


def test_kernels_compile_for_hopper():
    """The interpreter runs the kernels' Python, not Triton's compiler: compile each for sm_90 (Triton's own
    ptxas, no GPU) in a process without TRITON_INTERPRET, so a GPU run does not meet a compile error first."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "batchgen.worker.engine.kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(compiled) == {"split fp16", "split fp8", "split paged fp16", "split paged fp8", "one split paged fp16",
                             "one split paged fp8", "merge", "quantize", "int8 gemm tma",
                             "dequantize", "int8 gemm", "int8 gemm 256x128", "int8 gemm 256x128 dense",
                             "int8 gemm 256x128 residual", "int8 gemm 256x64", "int8 gemm 256x64 dense",
                             "gemv 1 row", "gemv 16 rows",
                             "kv store fp16", "kv store fp8", "rope", "rope store", "rope store int8", "split int8",
                             "one split paged int8",
                             "one split paged int8 scales in p", "one split paged int8 f32",
                             "one split paged int8 f32 scales in p", "one split paged int8 early", "kv store int8",
                             "paged int8 launch", "paged int8 launch, ids ahead", "paged int8 launch early, ids ahead",
                             "paged int8 launch biased, ids ahead", "paged int8 launch q8, ids ahead",
                             "paged int8 launch q16 early, ids ahead", "paged fp16 launch", "paged fp16 3 stages",
                             "paged fp16 3 stages, ids ahead", "paged int8 keys launch, ids ahead",
                             "paged int8 keys launch, V transposed", "kv seal", "norm quantize",
                             "norm quantize gemma", "gated quantize", "gated quantize rotated"}
    # the int8 cache's fp16 path converts by byte permutes (none of the quarter-rate s8 conversions), the
    # float32 path by conversions
    for name in ("split int8", "one split paged int8", "one split paged int8 scales in p"):
        assert compiled[name]["prmt"] > 0 and compiled[name]["cvt_from_s8"] == 0, (name, compiled[name])
    assert all(compiled[f"one split paged int8 f32{p}"]["cvt_from_s8"] > 0 for p in ("", " scales in p"))
    # converted where it was loaded (cvt_early), the fp16 tile reaches the dot by ldmatrix; converted late, the int8
    # tile is read from shared memory a byte at a time
    early, late = compiled["one split paged int8 early"], compiled["one split paged int8"]
    assert early["byte_shared_loads"] == 0 < late["byte_shared_loads"] and early["ldmatrix"] > late["ldmatrix"]
    assert early["prmt"] > 0 and early["cvt_from_s8"] == 0
    # over the paged cache, block ids read in the loop make each step wait for all of its loads; read ahead of it,
    # the K/V tiles (16-byte copies) are in flight num_stages - 1 steps ahead, as over a slot cache
    for launch in ("paged int8 launch", "paged fp16 3 stages"):
        inline, ahead = compiled[launch], compiled[f"{launch}, ids ahead"]
        assert inline["loads_in_flight"] == 0 < ahead["loads_in_flight"], (launch, inline, ahead)
        assert ahead["vector_loads"] > 0 and ahead["shared_bytes"] > inline["shared_bytes"]  # a buffer a stage
    assert compiled["paged int8 launch early, ids ahead"]["loads_in_flight"] > 0
    # default_launch's count of PAGED_LAUNCH's shared memory covers what the compiler gives it
    assert compiled["paged fp16 3 stages, ids ahead"]["shared_bytes"] <= attention.paged_launch_bytes(128)
    # converted early, then left biased, the int8 kernel needs fewer instructions a KB of K/V (fp16's a third of those)
    per_kb = {name: compiled[name]["warp_instructions_per_kb"] for name in compiled if "launch" in name}
    assert all(per_kb.values()), per_kb  # nvdisasm found the loop of each
    assert (per_kb["paged int8 launch biased, ids ahead"] < per_kb["paged int8 launch early, ids ahead"]
            < per_kb["paged int8 launch, ids ahead"]), per_kb
    assert per_kb["paged fp16 launch"] * 2 < per_kb["paged int8 launch early, ids ahead"], per_kb
    # q rounded to int8 (qk_int8): K meets it on the int8 tensor cores unconverted, V alone is converted
    q8, plain = compiled["paged int8 launch q8, ids ahead"], compiled["paged int8 launch, ids ahead"]
    assert q8["int8_mma"] > 0 == plain["int8_mma"] and 0 < q8["prmt"] < plain["prmt"], (q8, plain)
    assert per_kb["paged int8 launch q8, ids ahead"] < per_kb["paged int8 launch, ids ahead"], per_kb
    q16 = compiled["paged int8 launch q16 early, ids ahead"]  # q's second term: a second MMA, the same K
    assert q16["loads_in_flight"] > 0 and q16["int8_mma"] > 0, q16
    # the keys on the tiles' rows (int8_keys): one int8 MMA for both of q's terms, no padded rows' softmax, V's scale
    # in the weights and V left biased: fewer instructions a KB than q16 early's, pipelined, nothing spilled
    keys = compiled["paged int8 keys launch, ids ahead"]
    assert keys["loads_in_flight"] > 0 and keys["int8_mma"] > 0 and keys["spill_bytes"] in (0, None), keys
    assert keys["warp_instructions_per_kb"] < per_kb["paged int8 launch q16 early, ids ahead"], (keys, per_kb)
    assert keys["lg2_approx"] > 0  # V's scales in log2 by the SFU, not libdevice's polynomial
    # over V^T in each block: P · V as int8 MMAs too (twice the scores'), V^T's rows copied 16 bytes at a time as K's
    # (a V^T load the compiler cannot prove contiguous compiles to byte loads: 128 a step under Triton 3.6)
    vt = compiled["paged int8 keys launch, V transposed"]
    assert vt["int8_mma"] == 2 * keys["int8_mma"] and vt["vector_loads"] == keys["vector_loads"], (vt, keys)
    assert vt["loads_in_flight"] > 0 and vt["spill_bytes"] in (0, None) and vt["programs_per_sm"] >= 8, vt
    # its count is of the pipelined loop (the whole blocks), not of the longer one over a row's partial block
    assert vt["warp_instructions_per_kb"] < 1.2 * keys["warp_instructions_per_kb"], (vt, keys)
    assert compiled["rope"]["vectorised"] and compiled["rope store"]["vectorised"]
    # a decode step's RoPE and int8 K/V store as one launch: 16-byte accesses, IEEE division as the store's
    assert compiled["rope store int8"]["vectorised"] and compiled["rope store int8"]["div_rn"]
    assert all(compiled[f"kv store {kv}"]["vectorised"] for kv in ("fp16", "fp8", "int8"))
    # a V^T block's seal reads its tokens' runs and writes V^T's rows 16 bytes at a time, its reads of a head done
    # before its writes over them
    seal = compiled["kv seal"]
    assert seal["vector_loads"] > 0 and seal["vector_stores"] > 0 and seal["barriers"] > 0, seal
    assert compiled["kv store fp8"]["div_rn"] and compiled["kv store int8"]["div_rn"]  # the quantising stores
    # divide as torch does (int8: 127 by the absmax, as quantize_kv_int8)
    assert compiled["quantize"]["round_half_even"] and compiled["int8 gemm"]["int8_tensor_cores"]
    assert compiled["quantize"]["guard_atomics"]
    for name in ("norm quantize", "norm quantize gemma"):  # the quantiser's rounding and guard after the norm
        found = compiled[name]
        assert all(found[key] for key in ("round_half_even", "guard_atomics", "rsqrt", "vectorised")), found
        assert found["spill_bytes"] in (0, None), found
    for name in ("gated quantize", "gated quantize rotated"):  # act · up (rotated), quantised, recorded by the guard
        found = compiled[name]
        assert all(found[key] for key in ("round_half_even", "guard_atomics", "vectorised")), found
        assert found["spill_bytes"] in (0, None), found
    assert compiled["gated quantize rotated"]["tf32_mma"] > 0 == compiled["gated quantize"]["tf32_mma"]
    # Hopper's warpgroup MMA, and weight tiles loaded asynchronously a few steps ahead (cp.async): the GEMV has no
    # tl.dot at one row, so its loop asks for that itself
    assert compiled["int8 gemm"]["wgmma"]
    assert compiled["int8 gemm tma"]["wgmma"] and compiled["int8 gemm tma"]["tma"]  # tiles as bulk tensor copies
    assert all(compiled[name]["pipelined"] for name in ("int8 gemm", "gemv 1 row", "gemv 16 rows"))
    # the GEMV's dot path widens its weights to fp16 by byte permutes, converted where loaded (no byte reads), in
    # about 60 % of the instructions the exponent-bit widening took (177 a KB at this 32 x 256 tile)
    gemv = compiled["gemv 16 rows"]
    assert gemv["prmt"] > 0 and gemv["byte_shared_loads"] == 0 and gemv["warp_instructions_per_kb"] < 130, gemv
    # the dense columns' operands reuse the main loop's shared memory: each launch fits where it did without them.
    # At MAX_FUSED_SLOTS the epilogue may spill a few registers once per tile (stored and loaded back): under half
    # the bytes the [m, n] fp16 product computed apart writes and reads back for that tile (128 slots: 4× more)
    for tile in ("256x128", "256x64"):
        plain, dense = compiled[f"int8 gemm {tile}"], compiled[f"int8 gemm {tile} dense"]
        assert dense["shared_bytes"] == plain["shared_bytes"] and dense["wgmma"] and plain["spill_bytes"] == 0
        block_m, block_n = dense["tile"]
        assert 2 * dense["spill_bytes"] * dense["threads"] < (2 * block_m * block_n * 2) / 2
    # likewise the residual: what its load spills is under half of the bytes the add apart reads and writes
    residual = compiled["int8 gemm 256x128 residual"]
    assert residual["shared_bytes"] == compiled["int8 gemm 256x128"]["shared_bytes"], residual
    assert 2 * residual["spill_bytes"] * residual["threads"] < (3 * 256 * 128 * 2) / 2, residual


@pytest.mark.parametrize("batch,tokens,q_heads,k_heads,head_dim,dtype", [
    (1, 37, 8, 2, 64, torch.float16),  # a packed prefill: one sequence of tokens, GQA
    (5, 1, 4, 4, 128, torch.float16),  # a decode step: a token per row
    (2, 3, 6, 3, 80, torch.bfloat16)])  # a head size that is no power of two (masked lanes)
def test_rope_kernel_rotates_views_of_the_fused_projection_as_its_reference(batch, tokens, q_heads, k_heads,
                                                                            head_dim, dtype):
    from batchgen.worker.engine.fused import rope_qk as compiled_function
    from batchgen.worker.engine.kernels.rope import rope_qk, rope_qk_reference

    g = torch.Generator().manual_seed(3)
    width = (q_heads + 2 * k_heads) * head_dim
    qkv = (torch.randn(batch, tokens, width, generator=g) * 3).to(dtype)  # q, k, v side by side, as qkv_proj gives
    q, k, _ = qkv.split([q_heads * head_dim, k_heads * head_dim, k_heads * head_dim], dim=-1)
    q, k = q.view(batch, tokens, q_heads, head_dim), k.view(batch, tokens, k_heads, head_dim)
    angles = torch.randn(batch, tokens, head_dim // 2, generator=g) * 4
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)[:, :, None]
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)[:, :, None]
    got_q, got_k = rope_qk(q, k, cos, sin)
    want_q, want_k = rope_qk_reference(q, k, cos, sin)
    assert got_q.is_contiguous() and got_q.shape == q.shape and got_k.shape == k.shape
    if dtype == torch.float16:  # float32 arithmetic, one rounding
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    else:  # the interpreter casts float32 to bfloat16 by truncation, the GPU to nearest: an ulp apart
        _close(got_q, want_q, dtype)
        _close(got_k, want_k, dtype)
    eager_q, eager_k = compiled_function(q, k, cos, sin)  # the fused function's eager form rounds each op: a few
    ulp = torch.finfo(dtype).eps * qkv.abs().max().float()  # ulps of the inputs' size apart
    torch.testing.assert_close(got_q.float(), eager_q.float(), atol=4 * ulp, rtol=0)
    torch.testing.assert_close(got_k.float(), eager_k.float(), atol=4 * ulp, rtol=0)
    assert not torch.equal(got_q, q.contiguous())  # it rotated


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("triton_kernel", [True, False])
def test_kv_store_writes_each_token_to_its_slot_and_nothing_else(dtype, triton_kernel):
    """store_kv (Triton under the interpreter, index_copy_ otherwise): tokens of a strided K (a view of a wider
    projection, as the runner's are) land at their flat slots of a paged layer [blocks, block_size, heads, dim],
    the rest of the cache untouched; 3 heads of 24 pad to blocks of 4 and 32."""
    from batchgen.worker.engine.kernels.kv_store import cache_slots, store_kv

    g = torch.Generator().manual_seed(5)
    cache = torch.randn(6, 8, 3, 24, generator=g).to(dtype)
    before = cache.clone()
    wide = torch.randn(5, 3, 40, generator=g).to(dtype)
    x = wide[:, :, 8:32]  # last dim contiguous, rows strided
    blocks, offsets = torch.tensor([4, 0, 4, 2, 5]), torch.tensor([7, 0, 1, 3, 6])
    store_kv(cache, cache_slots(cache, blocks, offsets), x, triton_kernel=triton_kernel)
    expected = before.clone()
    expected.view(torch.uint8)[blocks, offsets] = x.contiguous().view(torch.uint8)  # bytes: fp8 has no index_put
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("triton_kernel", [True, False])
def test_kv_store_quantises_into_an_fp8_cache_as_torch_casts(triton_kernel):
    """store_kv of fp16 K into a float8_e4m3fn cache with a scale per head: the bytes equal quantize_kv's (torch's
    divide, clamp and round-half-to-even cast), the Triton launch's own integer rounding included. Head 0 holds
    every finite fp16 value (scale 1: ties at every exponent, fp8 subnormals, saturation past 448, signed zeros);
    heads 1-2 random values over 30 binades under uneven scales; bf16 input too."""
    from batchgen.worker.engine.kernels.attention import quantize_kv
    from batchgen.worker.engine.kernels.kv_store import store_kv

    every = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    every = every[torch.isfinite(every)]
    tokens = -(-every.numel() // 64)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, 3, 64, generator=g) * torch.exp2(torch.randint(-20, 10, (tokens, 3, 64), generator=g))
    head0 = torch.zeros(tokens * 64)
    head0[: every.numel()] = every.float()
    x[:, 0] = head0.view(tokens, 64)
    scale = torch.tensor([1.0, 0.0371, 3.3])
    slots = torch.randperm(tokens, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        src = x.to(dtype)
        cache = torch.zeros(tokens, 1, 3, 64, dtype=torch.float8_e4m3fn)
        store_kv(cache, slots, src, scale, triton_kernel=triton_kernel)
        expected = torch.zeros_like(cache)
        expected.view(torch.uint8).view(tokens, 3, 64)[slots] = quantize_kv(src, scale).view(torch.uint8)
        assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8)), dtype
    with pytest.raises(ValueError, match="scales"):
        store_kv(cache, slots, x.half(), triton_kernel=triton_kernel)


def _tiny_parts(rows: int = 5):
    """A 2-layer fp16 Llama's LlamaParts (4 heads over 2 KV heads of 16), and the rows and head_dim a step uses."""
    from batchgen.worker.engine.llama import LlamaParts
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN)
    return LlamaParts.from_hf(LlamaForCausalLM(config).eval().to(torch.float16)), rows, 64 // 4


def test_the_runners_triton_decode_step_equals_masked_attention():
    """decode_step with attention="triton" (what auto picks on CUDA where Triton runs) against "sdpa" on the same
    cache: the same logits and K/V written, rows of different lengths in one step."""
    from batchgen.worker.engine.llama import decode_step

    parts, rows, head_dim = _tiny_parts()
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 2, rows + 1, MAX_LEN, 2, head_dim, generator=g).to(torch.float16)  # one spare row
    ids = torch.randint(0, 128, (rows,), generator=g)
    positions = torch.tensor([0, 5, 17, MAX_LEN - 1, 63])
    out = {}
    with torch.inference_mode():
        for attention in ("triton", "sdpa"):
            k, v = cache[0].clone(), cache[1].clone()
            out[attention] = decode_step(parts, ids, positions, k, v, MAX_LEN, attention), k, v
    torch.testing.assert_close(out["triton"][0].float(), out["sdpa"][0].float(), atol=2e-2, rtol=2e-2)
    for t, s in ((out["triton"][1], out["sdpa"][1]), (out["triton"][2], out["sdpa"][2])):
        assert torch.equal(t[0], s[0])  # layer 0's new K/V come before any attention
        torch.testing.assert_close(t[1].float(), s[1].float(), atol=2e-2, rtol=2e-2)
        assert not torch.equal(t[1], cache[0][1])  # written


def test_the_runners_triton_decode_step_over_an_fp8_cache_equals_masked_attention_over_it():
    """--kv-cache-dtype fp8: decode_step with attention="triton" reads the e4m3 cache with its per-head scales
    in the kernel; "sdpa" dequantises the slice it reads. Same logits, same quantised K/V written."""
    from batchgen.worker.engine.llama import decode_step

    parts, rows, head_dim = _tiny_parts()
    g = torch.Generator().manual_seed(4)
    exact = torch.randn(2, 2, rows, MAX_LEN, 2, head_dim, generator=g)
    exact[:, :, :, :, 1] *= 6  # KV heads of different ranges: a scale per layer and head
    scales = exact.abs().amax(dim=(2, 3, 5)) / 224  # [k/v, layers, kv_heads]: what calibration's 2x margin leaves
    cache = torch.stack([torch.stack([quantize_kv(exact[i, layer], scales[i, layer]) for layer in range(2)])
                         for i in range(2)])
    assert cache.dtype == torch.float8_e4m3fn
    ids = torch.randint(0, 128, (rows,), generator=g)
    positions = torch.tensor([0, 5, 17, MAX_LEN - 1, 63])
    out = {}
    with torch.inference_mode():
        for attention in ("triton", "sdpa"):
            k, v = cache[0].clone(), cache[1].clone()
            out[attention] = decode_step(parts, ids, positions, k, v, MAX_LEN, attention, scales[0], scales[1]), k, v
    torch.testing.assert_close(out["triton"][0].float(), out["sdpa"][0].float(), atol=2e-2, rtol=2e-2)
    for t, s, before in ((out["triton"][1], out["sdpa"][1], cache[0]), (out["triton"][2], out["sdpa"][2], cache[1])):
        assert t.dtype == torch.float8_e4m3fn and torch.equal(t[0].float(), s[0].float())  # layer 0: same inputs
        assert not torch.equal(t[0].float(), before[0].float())  # written
    # and both equal masked attention over the dequantised cache in fp16 (the new token's K/V there unrounded)
    dequantised = (cache.float() * scales[:, :, None, None, :, None]).to(torch.float16)
    with torch.inference_mode():
        plain = decode_step(parts, ids, positions, dequantised[0].clone(), dequantised[1].clone(), MAX_LEN, "sdpa")
    torch.testing.assert_close(out["sdpa"][0].float(), plain.float(), atol=2e-2, rtol=2e-2)


def test_the_kernel_benchmark_smoke_runs_every_triton_attention_variant(tmp_path):
    """benchmarks.kernels --smoke (tiny shapes, the interpreter): each Triton decode attention variant it times on a
    GPU, each launch with fp16, fp8 and int8 K/V, runs and agrees with the reference; only the CUDA-only rows fail."""
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--smoke", "--only", "attention", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    variants = json.loads(out.read_text())["attention"]["variants"]
    triton = {name: v for name, v in variants.items() if name.startswith("triton") and "graph" not in name}
    from benchmarks.kernels import (
        ATTENTION_CONFIGS,
        EARLY_CONFIGS,
        FP8_CONFIGS,
        INT8_CONFIGS,
        INT8_MATHS,
        PAGED_CONFIGS,
    )

    int8_launches = {config[0] for config in INT8_CONFIGS}  # one per block_n under the interpreter
    paged_launches = {config[0] for config in PAGED_CONFIGS}
    assert len(int8_launches) == 3 and len(paged_launches) == 3
    launches = 2 * len(ATTENTION_CONFIGS) + len(FP8_CONFIGS) + len(INT8_MATHS) * len(int8_launches)
    assert sum("block_n" in name for name in triton) == launches and all("error" not in v for v in triton.values()), \
        triton
    paged = {name: v for name, v in variants.items() if name.startswith("paged")}
    early_launches = {config[0] for config in EARLY_CONFIGS}
    bias_launches = 2  # v-bias at BIAS_CONFIGS' first launch, p-bias at the int8 one
    # and the defaults (int8, fp16), int8's ids in the loop, fp16 at 3 stages (ids ahead, in the loop); int8's
    # bytes through the fp16 kernel, q8 (late, early) and q16 (early) at one launch, and int8_keys at one; over the
    # pools with each block's heads outermost, int8_keys at one launch and fp16's default
    assert len(paged) == 2 * len(paged_launches) + len(early_launches) + bias_launches + 5 + 5 + 2
    assert sum("q8" in name for name in paged) == 2 and sum("q16" in name for name in paged) == 1
    assert sum("keys" in name for name in paged) == 2 and sum("heads-major" in name for name in paged) == 2
    assert sum("bytes as fp16" in name for name in paged) == 1
    assert all("error" not in v for v in paged.values()), paged
    assert {int(name.split("block_n ")[1].split(",")[0]) for name in paged
            if "block_n" in name and "keys" not in name} == paged_launches  # (int8_keys' at its own first launch)
    assert all(v["max_abs_err"] < 1e-3 for v in paged.values() if "max_abs_err" in v)
    assert all(v["max_abs_err"] < 1e-3 for name, v in triton.items() if "max_abs_err" in v)


def test_per_group_activation_scales_quantise_and_multiply_as_their_reference():
    """quantize_groups (one absmax per token and group of columns, outlier columns zeroed) equals its torch
    reference; int8_matmul_dequant(group_k=...) scales each block's int32 product by its group's absmax in the main
    loop (pointer and TMA kernels, a block the size of the group or half of it): the float64 sum of the exact group
    products, to float32 rounding. benchmarks/int8_groups.py times what that costs against one scale a token."""
    from batchgen.worker.engine.kernels.int8_ops import quantize_groups, quantize_groups_reference

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(37, 256, generator=g) * (torch.rand(256, generator=g) * 4)).to(torch.float16)
    cb = torch.randint(-127, 128, (80, 256), dtype=torch.int8, generator=g)
    scb = torch.rand(80, generator=g) + 0.5
    mask = outlier_mask(torch.tensor([3, 130]), 256)
    xq, absmax = quantize_groups(x, 128, mask)
    want_q, want_absmax = quantize_groups_reference(x, 128, mask)
    assert torch.equal(xq, want_q) and torch.equal(absmax, want_absmax)
    assert absmax.shape == (37, 2) and (xq[:, [3, 130]] == 0).all()
    parts = torch.einsum("mgk,ngk->mng", xq.view(37, 2, 128).double(), cb.view(80, 2, 128).double())
    ref = ((parts * absmax.double()[:, None, :]).sum(-1) * scb.double() * 6.200124e-05).to(torch.float16)
    for block_k in (64, 128):
        for tma in (False, True):
            got = int8_matmul_dequant(xq, absmax, cb, scb, None, torch.float16, group_k=128, block_m=16, block_n=32,
                                      block_k=block_k, group_m=2, tma=tma)
            _close(got, ref, torch.float16)
    with pytest.raises(ValueError, match="groups of 128"):
        int8_matmul_dequant(xq, absmax, cb, scb, None, torch.float16, group_k=128, block_k=256)


def test_the_kernel_reads_exact_keys_beside_e4m3_values():
    """--kv-cache-dtype fp8v: K in fp16 (its scale 1), V in e4m3 with per-head scales, one launch."""
    k, v = _cache(4, 2, 128, torch.float16)
    q = torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    lengths = torch.tensor([1, 2, 37, MAX_LEN], dtype=torch.int32)
    v_scale = fp8_kv_scale(v, True)
    v8 = quantize_kv(v, v_scale)
    ref = decode_attention_reference(q, k, v8, lengths, 128**-0.5, v_scale=v_scale)
    _close(decode_attention(q, k, v8, lengths, 128**-0.5, v_scale=v_scale, num_splits=2), ref, torch.float16)
    exact = decode_attention_reference(q, k, v, lengths, 128**-0.5)
    assert not torch.equal(ref, exact)
    assert (ref.float() - exact.float()).abs().max() / exact.float().abs().max() < 0.07


def _int8_cache(k: torch.Tensor, v: torch.Tensor):
    """K/V [rows, len, kv_heads, d] as an int8 cache: the values, and scales [rows, kv_heads, len] as the runner
    lays them out."""
    from batchgen.worker.engine.kernels.attention import quantize_kv_int8

    (kq, ks), (vq, vs) = quantize_kv_int8(k), quantize_kv_int8(v)
    return kq, vq, ks.transpose(1, 2).contiguous(), vs.transpose(1, 2).contiguous()


@pytest.mark.parametrize("math", ["f32", "f16", "bias"])
@pytest.mark.parametrize("scales_in_p", [False, True])
@pytest.mark.parametrize("splits", [1, 2])
def test_int8_kv_with_a_scale_per_token_equals_the_dequantised_reference(splits, scales_in_p, math):
    """--kv-cache-dtype int8: each token's head rounded on its own absmax; the kernel scales a key's score column and
    a value's row by that token's scale, through float32 or in fp16 (f16: K and V made fp16 exactly, V's scale
    applied there; bias: K, and V under scales_in_p, 1152 over their values, each dot corrected by the other
    operand's sum). Within an output ulp of the reference, and within int8 rounding of exact."""
    k, v = _cache(4, 2, 128, torch.float16)
    v[:, :, 1] *= 8  # heads of different ranges
    k[:, 5] *= 30  # a token far larger than the rest: its scale is its own
    q = torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    lengths = torch.tensor([1, 2, 37, MAX_LEN], dtype=torch.int32)
    kq, vq, ks, vs = _int8_cache(k, v)
    assert kq.dtype == torch.int8 and ks.shape == (4, 2, MAX_LEN)
    ref = decode_attention_reference(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs)
    out = decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs, num_splits=splits,
                           scales_in_p=scales_in_p, f16_int8=math != "f32", bias=math == "bias")
    ulp = 2.0**-10 * ref.float().abs().amax(dim=-1, keepdim=True)  # V (or p) rounded to fp16 before the product
    assert ((out.float() - ref.float()).abs() <= 2 * ulp + 1e-3).all()
    exact = decode_attention_reference(q, k, v, lengths, 128**-0.5)
    relative = (ref.float() - exact.float()).abs().max() / exact.float().abs().max()
    assert 0 < relative < 0.02  # a step of absmax / 127 per value; fp8's bound above is 0.07
    with pytest.raises(ValueError, match="float32 scales"):
        decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks[:, :, :8], v_scale=vs, num_splits=splits)


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("paged", [False, True])
def test_int8_kv_scores_on_int8_tensor_cores_equal_the_reference_with_q_rounded(paged, terms):
    """qk_int8 (--int8-kv-scales v-q8, v-q16): each head's q rounded to int8 as the cache rounds K (terms 2: its
    rounding error too, as a second int8 term), the scores int8 · int8 (exact in int32) times both scales: the
    reference over that q, within an output ulp, for GQA and MHA, over a slot cache (1 or 2 splits) and a paged one
    (one block a step or two, V converted late or early). One term: within int8 rounding of the fp16 q's output;
    two: closer to it by far."""
    from batchgen.worker.engine.kernels.kv_store import cache_slots, store_kv

    from benchmarks.quality import int8_terms

    for q_heads, kv_heads in ((8, 2), (2, 2)):
        k, v = _cache(4, kv_heads, 128, torch.float16, seed=5)
        k[:, 5] *= 30
        q = torch.randn(4, q_heads, 128, generator=torch.Generator().manual_seed(3)).to(torch.float16)
        q[1, 0] = 0  # a head of zeros: scale 0, scores 0
        lengths = torch.tensor([1, 2, 37, MAX_LEN], dtype=torch.int32)
        kq, vq, ks, vs = _int8_cache(k, v)
        cache, scales, tables = (kq, vq), (ks, vs), [dict()]
        if paged:
            table = torch.tensor([[1, 2], [3, 0], [4, 5], [6, 7]], dtype=torch.int32)
            blocks = [torch.zeros(8, 64, kv_heads, 128, dtype=torch.int8) for _ in range(2)]
            block_scales = [torch.zeros(8, kv_heads, 64) for _ in range(2)]
            rows, positions = torch.arange(4).repeat_interleave(MAX_LEN), torch.arange(MAX_LEN).repeat(4)
            keep = positions < lengths[rows]
            slots = cache_slots(blocks[0], rows[keep], positions[keep], table)
            for c, sc, x in zip(blocks, block_scales, (k, v), strict=True):
                store_kv(c, slots, x.reshape(-1, kv_heads, 128)[keep], sc, triton_kernel=True)
            cache, scales = tuple(blocks), tuple(block_scales)
            tables = [dict(block_table=table, block_n=n, cvt_early=early) for n in (64, 128) for early in (False, True)]
        ref = decode_attention_reference(int8_terms(q.float(), terms), *cache, lengths, 128**-0.5, k_scale=scales[0],
                                         v_scale=scales[1], **({"block_table": tables[0]["block_table"]} if paged else {}))
        plain = decode_attention(q, *cache, lengths, 128**-0.5, k_scale=scales[0], v_scale=scales[1],
                                 **({"block_table": tables[0]["block_table"]} if paged else {}))
        for tune in tables:
            for splits in (1, 2):
                out = decode_attention(q, *cache, lengths, 128**-0.5, k_scale=scales[0], v_scale=scales[1],
                                       num_splits=splits, qk_int8=terms, **tune)
                _close(out, ref.to(torch.float16), torch.float16)
        drift = (out.float() - plain.float()).abs().max() / plain.float().abs().max()
        assert 0 < drift < 0.05 if terms == 1 else drift < 0.004, drift


def test_auto_int8_kv_scales_take_the_mode_the_devices_table_names(tmp_path, monkeypatch, demo_model_dir):
    """--int8-kv-scales auto (the default): the mode a device's tuned table names (a card where another kernel won
    end to end), else the kernel's default; a mode given is kept, and with tuning off auto is the default too. A
    tuner's later merge into the table keeps the name."""
    import json

    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.kernels import attention, tuned
    from batchgen.worker.factory import build_llm_engine

    monkeypatch.setattr(tuned, "TABLES", tmp_path)
    monkeypatch.setattr(attention, "INT8_V_SCALES", attention.INT8_V_SCALES)  # restored after the builds below
    path = tuned.table_path("Some GPU")
    path.write_text(json.dumps({"int8_kv_scales": "v-q16-keys-vt"}))
    path.write_text(json.dumps(tuned.merge(path, "gemm", [{"n": 8, "k": 8, "rows": 4, "launch": {}}])))
    tuned.forget()
    modes = ("v", "v-q16-keys", "v-q16-keys-vt")
    assert tuned.int8_kv_scales("auto", "Some GPU", "v-q16-keys", modes) == "v-q16-keys-vt"
    assert tuned.int8_kv_scales("v", "Some GPU", "v-q16-keys", modes) == "v"
    assert tuned.int8_kv_scales("auto", "Never Tuned", "v-q16-keys", modes) == "v-q16-keys"
    with pytest.raises(ValueError, match="Some_GPU.json names int8_kv_scales 'v-q16-keys-vt'"):
        tuned.int8_kv_scales("auto", "Some GPU", "v-q16-keys", ("v", "v-q16-keys"))  # a mode this tree lacks
    monkeypatch.setattr(tuned, "ENABLED", False)
    assert tuned.int8_kv_scales("auto", "Some GPU", "v-q16-keys", modes) == "v-q16-keys"
    monkeypatch.setattr(tuned, "ENABLED", True)
    # the engine: this device is "cpu" (kernels.tuned.device_name), its table the same way
    tuned.table_path("cpu").write_text(json.dumps({"int8_kv_scales": "p"}))
    tuned.forget()
    build_llm_engine(EngineConfig(model=str(demo_model_dir)))
    assert attention.INT8_V_SCALES == "p"
    build_llm_engine(EngineConfig(model=str(demo_model_dir), int8_kv_scales="v-q16-keys"))
    assert attention.INT8_V_SCALES == "v-q16-keys"
    build_llm_engine(EngineConfig(model=str(demo_model_dir), tuned_kernels=False))
    assert attention.INT8_V_SCALES == attention.DEFAULT_INT8_V_SCALES
    tuned.forget()


def test_the_engines_int8_v_scales_choose_the_kernels_variant(monkeypatch, demo_model_dir):
    """--int8-kv-scales p: a call that does not say scales the softmax weights, as scales_in_p=True does (the two
    variants differ in their fp16 rounding, so the default is told apart from it)."""
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.kernels import attention
    from batchgen.worker.factory import build_llm_engine

    assert EngineConfig.int8_kv_scales == "auto"  # no table names a mode for the CPU: the kernel's default
    assert attention.INT8_V_SCALES == attention.DEFAULT_INT8_V_SCALES == "v-q16-keys"
    monkeypatch.setattr(attention, "INT8_V_SCALES", "v")  # exact q: the variants below differ in fp16 rounding only
    k, v = _cache(4, 2, 128, torch.float16)
    v[:, :, 1] *= 8
    q = torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    lengths = torch.tensor([1, 2, 37, MAX_LEN], dtype=torch.int32)
    kq, vq, ks, vs = _int8_cache(k, v)
    run = {flag: decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs, scales_in_p=flag)
           for flag in (False, True)}
    assert not torch.equal(run[False], run[True])
    through_f32 = decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs, f16_int8=False)
    assert not torch.equal(run[False], through_f32)  # the default scales V in fp16
    monkeypatch.setattr(attention, "INT8_V_SCALES", "v32")
    assert torch.equal(decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs), through_f32)
    monkeypatch.setattr(attention, "INT8_V_SCALES", "v")
    build_llm_engine(EngineConfig(model=str(demo_model_dir), int8_kv_scales="p"))
    assert attention.INT8_V_SCALES == "p"
    assert torch.equal(decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs), run[True])
    with pytest.raises(ValueError, match="int8_kv_scales"):
        EngineConfig(model="m", int8_kv_scales="q")
    # "-early": the kernel converts each tile where it is loaded (on CUDA; the interpreter computes the same values)
    launches = _spy_launches(monkeypatch, attention)
    build_llm_engine(EngineConfig(model=str(demo_model_dir), int8_kv_scales="p-early"))
    assert torch.equal(decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs), run[True])
    assert launches[-1]["CVT_EARLY"] and launches[-1]["SCALES_IN_P"] and launches[-1]["F16_INT8"]
    decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs, cvt_early=False)
    assert not launches[-1]["CVT_EARLY"] and not launches[-1]["BIAS"]
    # "-bias": converted early and left biased, each dot corrected (equal within float32 rounding, not bit for bit)
    build_llm_engine(EngineConfig(model=str(demo_model_dir), int8_kv_scales="p-bias"))
    _close(decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs), run[True], torch.float16)
    assert launches[-1]["BIAS"] and launches[-1]["CVT_EARLY"] and launches[-1]["SCALES_IN_P"]
    # "-q8": q rounded to int8 against K as stored, V as "v" (converted early with "-early"); "-q16": two int8 terms
    for mode, early, terms in (("v-q8", False, 1), ("v-q8-early", True, 1), ("v-q16-early", True, 2),
                               ("v-q16-keys", True, 2)):  # (GQA here: the keys mode's split-kernel fallback)
        build_llm_engine(EngineConfig(model=str(demo_model_dir), int8_kv_scales=mode))
        decode_attention(q, kq, vq, lengths, 128**-0.5, k_scale=ks, v_scale=vs)
        assert launches[-1]["QK_INT8"] == terms and launches[-1]["CVT_EARLY"] == early
        assert not launches[-1]["SCALES_IN_P"]
        assert not launches[-1]["BIAS"]


def test_int8_kv_in_blocks_reads_each_rows_blocks_as_the_slot_cache():
    """A paged int8 cache (64-token blocks behind a block table, scales [blocks, kv_heads, 64]) written by store_kv's
    Triton launch gives the slot cache's output: the same values and scales at each row's blocks, read one block
    an inner step or several (block_n a multiple of the block size), as a paged fp16 cache is."""
    from batchgen.worker.engine.kernels.kv_store import cache_slots, store_kv

    k, v = _cache(4, 2, 64, torch.float16, seed=9)
    q = torch.randn(4, 4, 64, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    lengths = torch.tensor([70, 50, 80, 10], dtype=torch.int32)
    table = torch.tensor([[1, 2], [3, 0], [4, 5], [6, 0]], dtype=torch.int32)
    kp, vp = torch.zeros(7, 64, 2, 64, dtype=torch.int8), torch.zeros(7, 64, 2, 64, dtype=torch.int8)
    ksp, vsp = torch.zeros(7, 2, 64), torch.zeros(7, 2, 64)
    rows, positions = torch.arange(4).repeat_interleave(MAX_LEN), torch.arange(MAX_LEN).repeat(4)
    keep = positions < lengths[rows]
    slots = cache_slots(kp, rows[keep], positions[keep], table)
    store_kv(kp, slots, k.reshape(-1, 2, 64)[keep], ksp, triton_kernel=True)
    store_kv(vp, slots, v.reshape(-1, 2, 64)[keep], vsp, triton_kernel=True)
    kq, vq, ks, vs = _int8_cache(k, v)
    slot_ref = decode_attention_reference(q, kq, vq, lengths, 0.125, k_scale=ks, v_scale=vs)
    paged_ref = decode_attention_reference(q, kp, vp, lengths, 0.125, k_scale=ksp, v_scale=vsp, block_table=table)
    assert torch.equal(paged_ref, slot_ref)  # the store quantised as quantize_kv_int8, into the right slots
    for block_n in (64, 128, 256):  # one block a step, or several, each key at its own block (128: the default)
        for early, preload, bias in ((False, False, False), (False, True, False), (True, True, False),
                                     (True, True, True)):
            for in_p in (False, True) if bias else (False,):
                out = decode_attention(q, kp, vp, lengths, 0.125, k_scale=ksp, v_scale=vsp, block_table=table,
                                       num_splits=2, block_n=block_n, cvt_early=early, preload=preload, bias=bias,
                                       scales_in_p=in_p)
                _close(out, paged_ref, torch.float16)
    fp16_cache = (torch.zeros(7, 64, 2, 64, dtype=torch.float16), torch.zeros(7, 64, 2, 64, dtype=torch.float16))
    for cache, x in zip(fp16_cache, (k, v), strict=True):
        store_kv(cache, slots, x.reshape(-1, 2, 64)[keep], triton_kernel=True)
    fp16_ref = decode_attention_reference(q, k, v, lengths, 0.125)
    for block_n, preload in ((64, False), (64, True), (128, True)):
        _close(decode_attention(q, *fp16_cache, lengths, 0.125, block_table=table, block_n=block_n,
                                preload=preload), fp16_ref, torch.float16)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q, kp, vp, lengths, 0.125, k_scale=ksp, v_scale=vsp, block_table=table, block_n=96)


@pytest.mark.parametrize("triton_kernel", [True, False])
def test_kv_store_rounds_each_tokens_heads_into_an_int8_cache(triton_kernel):
    """store_kv into an int8 cache: the values equal quantize_kv_int8's (127 / absmax correctly rounded, half to
    even) at each token's slot, its scales at [slot // width, head, slot % width]; an all-zero head stores zeros and
    scale 0; the rest of the cache untouched."""
    from batchgen.worker.engine.kernels.attention import quantize_kv_int8
    from batchgen.worker.engine.kernels.kv_store import store_kv

    g = torch.Generator().manual_seed(11)
    x = (torch.randn(40, 3, 24, generator=g) * torch.exp2(torch.randint(-8, 8, (40, 3, 1), generator=g))).half()
    x[3, 1] = 0
    cache, scales = torch.full((6, 8, 3, 24), 5, dtype=torch.int8), torch.full((6, 3, 8), -1.0)
    slots = torch.randperm(48, generator=g)[:40]
    store_kv(cache, slots, x, scales, triton_kernel=triton_kernel)
    want, want_scale = quantize_kv_int8(x)
    assert torch.equal(cache.view(48, 3, 24)[slots], want)
    assert torch.equal(scales.transpose(1, 2).reshape(48, 3)[slots], want_scale)
    assert want_scale[3, 1] == 0 and (want[3, 1] == 0).all()
    untouched = torch.ones(48, dtype=torch.bool)
    untouched[slots] = False
    assert (cache.view(48, 3, 24)[untouched] == 5).all() and (scales.transpose(1, 2).reshape(48, 3)[untouched] == -1).all()
    with pytest.raises(ValueError, match="scales"):
        store_kv(cache, slots, x, triton_kernel=triton_kernel)


def test_the_runners_triton_decode_step_over_an_int8_cache_equals_masked_attention_over_it():
    """--kv-cache-dtype int8: decode_step with attention="triton" reads the int8 cache and its per-token scales in
    the kernel; "sdpa" dequantises the slice it reads. Same logits, same K/V and scales written."""
    from batchgen.worker.engine.llama import decode_step

    parts, rows, head_dim = _tiny_parts()
    g = torch.Generator().manual_seed(4)
    exact = torch.randn(2, 2, rows, MAX_LEN, 2, head_dim, generator=g)
    exact[:, :, :, :, 1] *= 6
    quantised = [[_int8_cache(exact[0, layer], exact[1, layer]) for layer in range(2)]]
    cache = torch.stack([torch.stack([quantised[0][layer][i] for layer in range(2)]) for i in range(2)])
    scales = torch.stack([torch.stack([quantised[0][layer][2 + i] for layer in range(2)]) for i in range(2)])
    ids = torch.randint(0, 128, (rows,), generator=g)
    positions = torch.tensor([0, 5, 17, MAX_LEN - 1, 63])
    out = {}
    with torch.inference_mode():
        for attention in ("triton", "sdpa"):
            k, v, ks, vs = cache[0].clone(), cache[1].clone(), scales[0].clone(), scales[1].clone()
            out[attention] = decode_step(parts, ids, positions, k, v, MAX_LEN, attention, ks, vs), k, v, ks, vs
    torch.testing.assert_close(out["triton"][0].float(), out["sdpa"][0].float(), atol=2e-2, rtol=2e-2)
    for i in (1, 2, 3, 4):  # layer 0's K/V and scales: the same inputs, written the same
        assert torch.equal(out["triton"][i][0], out["sdpa"][i][0])
        assert not torch.equal(out["triton"][i][0], (cache if i < 3 else scales)[(i - 1) % 2][0])


def test_the_default_launch_takes_a_third_stage_where_a_program_holds_its_tiles():
    h200, sm86, sm75 = 232448, 101376, 65536  # shared memory a program may opt into
    launch = attention.default_launch
    assert launch(torch.float16, True, 128, h200) == attention.PAGED_LAUNCH
    assert launch(torch.bfloat16, True, 128, sm86) == attention.PAGED_LAUNCH
    assert launch(torch.float16, True, 128, sm75) == attention.LAUNCH
    assert launch(torch.float16, True, 256, sm86) == attention.LAUNCH  # twice the tiles
    assert launch(torch.float16, False, 128, h200) == attention.LAUNCH  # a slot cache pipelines at 2 stages already
    assert launch(torch.float8_e4m3fn, True, 128, h200) == attention.LAUNCH
    assert launch(torch.int8, True, 128, h200) == attention.INT8_LAUNCH
    assert launch(torch.int8, True, 128, h200, 1) == attention.INT8_QK_LAUNCHES[1] == (64, 2, 3)
    assert launch(torch.int8, True, 128, h200, 2) == attention.INT8_QK_LAUNCHES[2] == (64, 2, 3)
    assert launch(torch.float16, True, 128, h200, 1) == attention.PAGED_LAUNCH  # q8 rounds q against an int8 K only
    assert launch(torch.float16, True, 128, attention.shared_per_program(torch.device("cpu"))) == attention.LAUNCH


@pytest.mark.parametrize("paged", [False, "tokens", "heads", "vt"])
def test_int8_kv_with_the_keys_on_the_tiles_rows_equals_the_reference_with_q_rounded(paged):
    """int8_keys (--int8-kv-scales v-q16-keys): one query head a KV head, the step's keys on the tensor-core tiles'
    rows, q as two int8 terms (the second in 1/128 of the first's step), V's scale in the running max: the reference
    over that q within an output ulp, over a slot cache (1, 2 or 3 splits, several keys a step) and a paged one
    (one block a step, several, or a part of one; the block ids ahead or in the loop; each block's tokens or its
    heads outermost, as model_runner.kv_pool lays an int8 pool out, written by store_kv's kernel as a prefill and a
    decode step; "vt": V transposed in each whole block, the partial ones as written, _vt_kernel's P · V on the int8
    tensor cores); a head of zeros, and a token whose V is all zeros (its
    scale 0). Close to the fp16 q's output, as q16's two terms are."""
    from batchgen.worker.engine.kernels.int8_keys import keys_q
    from batchgen.worker.engine.kernels.kv_store import cache_slots, store_kv
    from batchgen.worker.engine.model_runner import kv_pool

    k, v = _cache(4, 2, 128, torch.float16, seed=5)
    k[:, 5] *= 30
    v[:, :, 1] *= 8
    v[2, 7] = 0  # scale 0: its weight is kept in the sum, its product is zero
    q = torch.randn(4, 2, 128, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    q[1, 0] = 0
    lengths = torch.tensor([1, 2, 37, MAX_LEN], dtype=torch.int32)
    kq, vq, ks, vs = _int8_cache(k, v)
    cache, scales, tunes = (kq, vq), dict(k_scale=ks, v_scale=vs), [dict(block_n=n) for n in (16, 64)]
    if paged:
        table = torch.tensor([[1, 2], [3, 0], [4, 5], [6, 7]], dtype=torch.int32)
        blocks = [kv_pool((1, 8, 64, 2, 128), torch.int8, torch.device("cpu"), heads_major=paged != "tokens",
                          transposed=paged == "vt" and i == 1)[0] for i in range(2)]
        block_scales = [torch.zeros(8, 2, 64) for _ in range(2)]
        rows, positions = torch.arange(4).repeat_interleave(MAX_LEN), torch.arange(MAX_LEN).repeat(4)
        keep = positions < lengths[rows]
        for last in (False, True):  # as a prefill, then a decode step: each row's last token alone
            these = keep & ((positions == lengths[rows] - 1) == last)
            slots = cache_slots(blocks[0], rows[these], positions[these], table)
            for c, sc, x in zip(blocks, block_scales, (k, v), strict=True):
                store_kv(c, slots, x.reshape(-1, 2, 128)[these], sc, triton_kernel=True)
        cache, scales = tuple(blocks), dict(k_scale=block_scales[0], v_scale=block_scales[1], block_table=table)
        tunes = [dict(block_n=n, preload=ahead) for n in ((32, 64) if paged == "vt" else (32, 64, 128))
                 for ahead in (False, True)]
        assert attention.v_transposed(blocks[1]) == (blocks[1].stride(1) == 1) == (paged == "vt")
        for pool, values in zip(blocks, (kq, vq), strict=True):  # each token where the table says, in either layout
            if paged == "vt" and pool is blocks[1]:  # whole blocks turned into V^T, the partial ones as written
                assert not torch.equal(pool, attention.v_values(pool, lengths, table))
                pool = attention.v_values(pool, lengths, table)
            held = pool[table.long()].flatten(1, 2)[:, :MAX_LEN]
            assert torch.equal(held[keep.view(4, MAX_LEN)], values[keep.view(4, MAX_LEN)])
    ref = decode_attention_reference(keys_q(q), *cache, lengths, 128**-0.5, **scales)
    for tune in tunes:
        for splits in (1, 2, 3):
            out = decode_attention(q, *cache, lengths, 128**-0.5, num_splits=splits, keys=True, **tune, **scales)
            _close(out, ref.to(torch.float16), torch.float16)
    plain = decode_attention_reference(q, *cache, lengths, 128**-0.5, **scales)
    drift = (out.float() - plain.float()).abs().max() / plain.float().abs().max()
    assert drift < 0.004, drift
    assert not torch.equal(keys_q(q), q.float())  # q's rounding is what the reference holds the kernel to
    if paged:  # the block table the split kernel wants, int32
        with pytest.raises(ValueError, match="int32 block table"):
            decode_attention(q, *cache, lengths, 128**-0.5, keys=True, **(scales | {"block_table": table.long()}))
    if paged == "vt":  # only _vt_kernel reads V^T, and over whole steps of a block
        with pytest.raises(ValueError, match="transposed in each block"):
            decode_attention(q, *cache, lengths, 128**-0.5, keys=False, **scales)
        with pytest.raises(ValueError, match="transposed in each block"):
            decode_attention(q, *cache, lengths, 128**-0.5, keys=True, block_n=128, **scales)
        with pytest.raises(ValueError, match="transposed in each block"):  # the int8 MMA's K is 32
            decode_attention(q, *cache, lengths, 128**-0.5, keys=True, block_n=16, **scales)


def test_the_keys_kernels_lazy_max_rescales_only_past_its_slack():
    """int8_keys raises its running max only where a step's weights would pass 2^SLACK_LOG2: scores that climb a
    little each step (under the slack: the sums run on at the old max, the weights above 1) and jump once (past it:
    rescaled) give the reference's output, at 16 and 32 keys a step and 1 or 2 splits."""
    from batchgen.worker.engine.kernels.int8_keys import SLACK_LOG2, keys_q

    scale = 64**-0.5
    k, v = _cache(2, 1, 64, torch.float16, seed=11)
    q = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(12)).to(torch.float16)
    t = torch.arange(MAX_LEN, dtype=torch.float32)
    climb = 0.25 * t + 20.0 * (t >= 48)  # log2 of each key's weight: +4 a 16-key step, +20 at key 48
    for row in range(2):
        unit = q[row, 0].float() / q[row, 0].float().norm()
        lift = climb[:, None] / (q[row, 0].float().norm() * scale * math.log2(math.e)) * unit
        k[row, :, 0] = (k[row, :, 0].float() * 0.1 + lift).to(torch.float16)
    kq, vq, ks, vs = _int8_cache(k, v)
    lengths = torch.tensor([MAX_LEN, 61], dtype=torch.int32)
    # the data holds both cases: a step whose max rises by at most the slack, and one that rises past it
    qk = (keys_q(q)[:, 0, None, :] * (kq[:, :, 0].float() * ks[:, 0, :, None])).sum(-1)
    weights = qk * scale * math.log2(math.e) + vs[:, 0].log2()
    rises = weights[0].reshape(-1, 16).amax(1).cummax(0).values.diff()
    assert ((rises > 0) & (rises <= SLACK_LOG2)).any() and (rises > SLACK_LOG2).any(), rises
    ref = decode_attention_reference(keys_q(q), kq, vq, lengths, scale, k_scale=ks, v_scale=vs)
    for block_n in (16, 32):
        for splits in (1, 2):
            out = decode_attention(q, kq, vq, lengths, scale, k_scale=ks, v_scale=vs, num_splits=splits, keys=True,
                                   block_n=block_n)
            _close(out, ref.to(torch.float16), torch.float16)


def test_the_keys_mode_takes_one_query_head_a_kv_head_and_leaves_groups_to_q16(monkeypatch):
    """--int8-kv-scales v-q16-keys: int8_keys' kernel where heads == kv_heads (Llama-2's layout), the split kernel
    with q16 early where query heads share a KV head."""
    from batchgen.worker.engine.kernels import attention

    k, v = _cache(2, 2, 64, torch.float16)
    kq, vq, ks, vs = _int8_cache(k, v)
    lengths = torch.tensor([5, MAX_LEN], dtype=torch.int32)
    monkeypatch.setattr(attention, "INT8_V_SCALES", "v-q16-keys")
    launches = _spy_launches(monkeypatch, attention)
    keys_launches = _spy_launches(monkeypatch, attention, "_keys_kernel")
    for heads in (2, 4):
        q = torch.randn(2, heads, 64, generator=torch.Generator().manual_seed(heads)).to(torch.float16)
        decode_attention(q, kq, vq, lengths, 0.125, k_scale=ks, v_scale=vs)
    assert len(keys_launches) == 1 and keys_launches[0]["BLOCK_N"] == attention.KEYS_LAUNCH[0]
    assert len(launches) == 1 and launches[0]["QK_INT8"] == 2 and launches[0]["CVT_EARLY"]
