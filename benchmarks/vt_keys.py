"""A prototype of the keys kernel with V stored transposed in each block (keys contiguous for each dimension), so that
P·V runs on the int8 tensor cores as the scores do: the weights (at most 2^8 under the lazy max, V's scale in them)
as three int8 terms on a fixed scale, accumulated in int32 and rescaled (rounded) only where the running max moves.
No conversion of V, no round trip through shared memory. Not in the engine: this times it against the engine's keys
kernel over the heads-major pool at the int8 bulk state (docs/benchmarks.md, "... fewer SMs than the bus wants").

    python3 -m benchmarks.vt_keys --sms 0 96 88 --out $OUT/vt_keys.json   # on the GPU (0: every SM)
    .venv/bin/python -m benchmarks.vt_keys --smoke                        # here: against the reference, interpreted
"""

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.kernels import shape_and_device

SMOKE = "--smoke" in sys.argv
shape_and_device(SMOKE)  # the interpreter is read when Triton first imports

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from batchgen.worker.engine.kernels.int8_keys import LO_STEPS, SLACK_LOG2, keys_scores, q_columns  # noqa: E402
from batchgen.worker.engine.kernels.int8_ops import round_half_even  # noqa: E402
from batchgen.worker.engine.kernels.splits import preload_ids, split_bounds  # noqa: E402

P_STEP = 2.0**SLACK_LOG2 / 127  # the weights' first int8 term counts in these (a weight is <= 2^SLACK_LOG2)
_LO = tl.constexpr(LO_STEPS)  # each further term counts in 1/LO_STEPS of the one before
_SLACK = tl.constexpr(SLACK_LOG2)
_PQ = tl.constexpr(1 / P_STEP)
_UNITS = tl.constexpr((P_STEP, P_STEP / LO_STEPS, P_STEP / LO_STEPS**2))  # the three terms' units


@triton.jit
def _step(block, start, end, qcols, m, l_vec, acc, k_base, v_base, pages, BlockTable, KScale, VScale, cache_row,
          kv_head, stride_kr, stride_kt, stride_vr, stride_vs, stride_vd, stride_bt, stride_sr, stride_sh, s_scale, d,
          BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRELOAD: tl.constexpr, ASM: tl.constexpr,
          MASKED: tl.constexpr, INTERPRETED: tl.constexpr, SUB: tl.constexpr):
    j = tl.arange(0, BLOCK_N)
    t = block + j
    t_mask = t < end if MASKED else tl.full([BLOCK_N], 1, tl.int1)
    slot = tl.multiple_of(block % PAGE, BLOCK_N) + j  # BLOCK_N <= PAGE: a step reads one block (aligned: Triton 3.6
    # proves the V^T load contiguous only so)
    within = tl.multiple_of(block % PAGE % SUB, BLOCK_N)  # V^T is stored in pieces of SUB keys (BLOCK_N <= SUB)
    page = tl.sum(tl.where(tl.arange(0, PRELOAD) == (block - start) // PAGE, pages, 0), 0).to(tl.int64)
    k_at = k_base + page * stride_kr + slot * stride_kt
    v_at = v_base + page * stride_vr + block % PAGE // SUB * stride_vs + within + j
    s_at = page * stride_sr + kv_head * stride_sh + slot
    s, sv = keys_scores(k_at, s_at, d, t_mask, qcols, KScale, VScale, s_scale, ASM)
    m_step = tl.max(sv, 0)
    if m_step > m + _SLACK:
        alpha = tl.exp2(m - m_step)
        l_vec *= alpha
        acc = round_half_even(acc.to(tl.float32) * alpha, INTERPRETED).to(tl.int32)
        m = m_step
    p = tl.exp2(s - m)
    l_vec += p
    x = tl.exp2(sv - m) * _PQ  # <= 127: in units of P_STEP
    t0 = round_half_even(x, INTERPRETED)
    r = (x - t0) * _LO
    t1 = round_half_even(r, INTERPRETED)
    t2 = round_half_even((r - t1) * _LO, INTERPRETED)
    c16 = tl.arange(0, 16)[None, :]
    b = tl.where(c16 == 0, t0[:, None], tl.where(c16 == 1, t1[:, None], tl.where(c16 == 2, t2[:, None], 0.0)))
    vt = tl.load(v_at[None, :] + d[:, None] * stride_vd, mask=t_mask[None, :], other=0)
    acc = tl.dot(vt, b.to(tl.int8), acc, out_dtype=tl.int32)
    return m, l_vec, acc


@triton.jit
def _vt_kernel(Q, K, V, SeqLens, CacheRows, BlockTable, KScale, VScale, MidO, MidLse, Out,
               stride_qn, stride_qh, stride_kr, stride_kt, stride_kh, stride_vr, stride_vs, stride_vh, stride_vd,
               stride_bt, stride_mn, stride_mh, stride_ms, stride_ln, stride_lh, stride_on, stride_oh,
               stride_sr, stride_sh, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               NUM_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_BLOCKS: tl.constexpr, PAGE: tl.constexpr,
               WHOLE: tl.constexpr, PRELOAD: tl.constexpr, ASM: tl.constexpr, INTERPRETED: tl.constexpr,
               SUB: tl.constexpr):
    row, kv_head, split, cache_row, start, end = split_bounds(SeqLens, CacheRows, HAS_ROWS, NUM_SPLITS, WHOLE)
    d = tl.arange(0, HEAD_DIM)
    qcols, s_scale = q_columns(Q + row * stride_qn + kv_head * stride_qh + d, qk_scale, INTERPRETED)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    pages = preload_ids(BlockTable, cache_row, stride_bt, start, end, PAGE, PRELOAD)
    m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_vec = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([HEAD_DIM, 16], tl.int32)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for block in range(start, full_end, BLOCK_N):
        m, l_vec, acc = _step(block, start, end, qcols, m, l_vec, acc, k_base, v_base, pages, BlockTable, KScale,
                              VScale, cache_row, kv_head, stride_kr, stride_kt, stride_vr, stride_vs, stride_vd,
                              stride_bt, stride_sr, stride_sh, s_scale, d, BLOCK_N, PAGE, PRELOAD, ASM, False,
                              INTERPRETED, SUB)
    if full_end < end:
        m, l_vec, acc = _step(full_end, start, end, qcols, m, l_vec, acc, k_base, v_base, pages, BlockTable, KScale,
                              VScale, cache_row, kv_head, stride_kr, stride_kt, stride_vr, stride_vs, stride_vd,
                              stride_bt, stride_sr, stride_sh, s_scale, d, BLOCK_N, PAGE, PRELOAD, ASM, True,
                              INTERPRETED, SUB)
    l_sum = tl.sum(l_vec, 0)
    has_keys = l_sum > 0.0
    rows = tl.arange(0, 16)[None, :]
    unit = tl.where(rows == 0, _UNITS[0], tl.where(rows == 1, _UNITS[1], tl.where(rows == 2, _UNITS[2], 0.0)))
    o = tl.sum(acc.to(tl.float32) * unit, 1)
    out = o / tl.where(has_keys, l_sum, 1.0)
    tl.store(Out + row * stride_on + kv_head * stride_oh + d, out.to(Out.dtype.element_ty))


LAUNCHES = [(32, 1, 3), (32, 1, 4), (32, 1, 5), (32, 2, 3), (64, 2, 3)]


def state(rows: int, heads: int, d: int, page: int, per_row: int, mean_ctx: int, device: str,
          q_scale: float = 1.0, subs: tuple[int, ...] = (64,)) -> dict:
    """Random int8 pools as the engine lays K out (each block's heads outermost) and V as the prototype wants it
    (transposed in pieces of `sub` keys of each block, one pool a piece size), the same values in every V layout;
    scales, a shuffled block table, lengths (the first row one key). q_scale: wider scores, so the running max moves
    (the smoke run)."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    blocks, max_len = rows * per_row, page * per_row
    lens = torch.randint(max(1, 2 * mean_ctx - max_len), max_len + 1, (rows,), generator=g, device=device,
                         dtype=torch.int32)
    lens[0] = 1
    pool = (blocks, heads, page, d)
    k = torch.randint(-127, 128, pool, generator=g, device=device, dtype=torch.int8).transpose(1, 2)
    v_pool = torch.randint(-127, 128, pool, generator=g, device=device, dtype=torch.int8)
    v_t = {sub: v_pool.view(blocks, heads, page // sub, sub, d).transpose(3, 4).contiguous() for sub in subs}
    scales = [torch.rand(blocks, heads, page, generator=g, device=device) / 127 + 1e-4 for _ in range(2)]
    return dict(q=torch.randn(rows, heads, d, generator=g, device=device, dtype=torch.float16) * q_scale, k=k,
                v=v_pool.transpose(1, 2), v_t=v_t, ks=scales[0], vs=scales[1], lens=lens, max_len=max_len, page=page,
                table=torch.randperm(blocks, generator=g, device=device).view(rows, per_row).to(torch.int32))


def vt_attention(s: dict, out, block_n: int, num_warps: int, num_stages: int, interpreted: bool,
                 sub: int = 64) -> None:
    from batchgen.worker.engine.kernels.attention import preload_pages

    q, k, v, table, page = s["q"], s["k"], s["v_t"][sub], s["table"], s["page"]
    whole = max(page, block_n)
    _vt_kernel[(q.shape[0], q.shape[1], 1)](
        q, k, v, s["lens"], s["lens"], table, s["ks"], s["vs"], out, out, out, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), k.stride(2), v.stride(0), v.stride(2), v.stride(1), v.stride(3), table.stride(0), 0, 0, 0, 0,
        0, out.stride(0), out.stride(1), s["ks"].stride(0), s["ks"].stride(1), q.shape[2] ** -0.5 * 1.4426950408889634,
        HEAD_DIM=q.shape[2], BLOCK_N=block_n, NUM_SPLITS=1, HAS_ROWS=False, HAS_BLOCKS=True, PAGE=page, WHOLE=whole,
        PRELOAD=preload_pages(s["max_len"], 1, whole, page), ASM=not interpreted, INTERPRETED=interpreted, SUB=sub,
        num_warps=num_warps, num_stages=num_stages)


def engine_attention(s: dict, out, launch=None, vt: bool = False) -> None:
    """The engine's decode attention over the state: int8_keys' kernel, or (vt) its _vt_kernel over V^T in each
    block, the pool model_runner.kv_pool(transposed=True) lays out."""
    from batchgen.worker.engine.kernels import decode_attention

    tune = dict(block_n=launch[0], num_warps=launch[1], num_stages=launch[2], keys=True) if launch else {}
    v = s["v_t"][s["page"]][:, :, 0].permute(0, 3, 1, 2) if vt else s["v"]  # [blocks, tokens, heads, d]
    decode_attention(s["q"], s["k"], v, s["lens"], s["q"].shape[2] ** -0.5, k_scale=s["ks"], v_scale=s["vs"],
                     block_table=s["table"], out=out, **tune)


def smoke() -> dict:
    """Both kernels against the float32 reference at tiny shapes under the interpreter."""
    import torch
    from batchgen.worker.engine.kernels import decode_attention_reference

    s = state(rows=5, heads=2, d=64, page=64, per_row=4, mean_ctx=150, device="cpu", q_scale=4.0, subs=(64, 32))
    ref = decode_attention_reference(s["q"], s["k"], s["v"], s["lens"], 64**-0.5, k_scale=s["ks"], v_scale=s["vs"],
                                     block_table=s["table"])
    out, res = torch.empty_like(s["q"]), {}
    engine_attention(s, out)
    res["engine keys kernel"] = float((out.float() - ref.float()).abs().max())
    engine_attention(s, out, vt=True)
    res["engine V^T kernel"] = float((out.float() - ref.float()).abs().max())
    for block_n, sub in ((32, 64), (64, 64), (32, 32)):
        vt_attention(s, out, block_n, 1, 3, interpreted=True, sub=sub)
        res[f"prototype, block_n {block_n}, V^T in pieces of {sub}"] = float((out.float() - ref.float()).abs().max())
    return {"max_abs_err": res, "ref_max": float(ref.abs().max())}


def timed(args) -> dict:
    import torch

    from benchmarks.common import GreenSplit
    from benchmarks.kernels import time_ms

    s = state(rows=args.rows, heads=32, d=128, page=64, per_row=args.max_len // 64, mean_ctx=args.mean_ctx,
              device="cuda", subs=(64, 32))
    needed = int(s["lens"].sum()) * 32 * (128 + 4) * 2  # int8 K and V and a float32 scale each, per token and head
    ref, out = torch.empty_like(s["q"]), torch.empty_like(s["q"])
    engine_attention(s, ref)
    res = {"device": torch.cuda.get_device_name(0), "rows": args.rows, "runs": []}
    variants = [("engine keys kernel, KEYS_LAUNCH", lambda: engine_attention(s, ref)),
                ("engine V^T kernel, KEYS_LAUNCH", lambda: engine_attention(s, out, vt=True)),
                ("engine V^T kernel, 32 x 1 x 4", lambda: engine_attention(s, out, (32, 1, 4), vt=True))]
    variants += [(f"prototype, {b} x {w} x {st}, V^T in pieces of {sub}",
                  lambda b=b, w=w, st=st, sub=sub: vt_attention(s, out, b, w, st, False, sub))
                 for b, w, st in LAUNCHES for sub in (64, 32) if b <= sub]
    for sms in args.sms:
        stream = GreenSplit(sms).streams[0] if sms else torch.cuda.current_stream()
        run = {"sms": sms or torch.cuda.get_device_properties(0).multi_processor_count, "variants": {}}
        with torch.cuda.stream(stream):
            for name, fn in variants:
                ms = time_ms(fn, "cuda")
                run["variants"][name] = {"ms": round(ms, 4), "kv_gb_s": round(needed / ms / 1e6, 1)} | (
                    {"max_abs_diff": float((out.float() - ref.float()).abs().max())} if "V^T" in name else {})
                print(run["sms"], name, run["variants"][name], flush=True)
        res["runs"].append(run)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")) / "vt_keys.json")
    parser.add_argument("--rows", type=int, default=614)
    parser.add_argument("--mean-ctx", type=int, default=360)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--sms", type=int, nargs="+", default=[0, 96], help="0: every SM; else a green context")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()
    res = smoke() if args.smoke else timed(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res if args.smoke else {"wrote": str(args.out)}))


if __name__ == "__main__":
    main()
