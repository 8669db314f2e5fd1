"""The decode step's kernels alone, one Llama-2-7B layer at the engine's batch: are they at the memory bound?

(a) decode attention over the slot cache [rows, max_len, kv_heads, head_dim]: ours (Triton split-KV, fp16, int8 and
    fp8-e4m3 K/V; eager and replayed from a CUDA graph) against what the engine runs today (aten's
    FlashAttention varlen with seqused_k), flash_attn's flash_attn_with_kvcache when that package imports, and
    SDPA over the padded cache; ms per layer and GB/s of the K/V bytes each row actually needs.
(b) the four int8 projections of a layer (q/k/v fused, o, gate/up fused, down) at the same rows: per-token
    quantise + torch._int_mm + dequantise as separate torch ops (eager, and torch.compile'd as the engine does)
    against the Triton pieces (fused quantise + _int_mm + fused dequantise; fused quantise + Triton int8 GEMM
    with the dequantise in its epilogue). Run back to back as in a layer, so 202 MB of weights stream through
    L2 instead of sitting in it.
(c) the device's bandwidth: a large device-to-device copy (bytes read + written).
(d) --gemv: the int8 projections of Llama-7B (q/k/v fused, o, gate/up fused, down) at 1, 2, 4, 8, 16 rows:
    the small-row GEMV (kernels.int8_gemv; its default launch and a sweep of others) against Int8Linear as the
    engine ran it before (int_mm_outliers and int_mm, the GEMV off) and an fp16 torch.matmul; each replayed
    from a CUDA graph over enough copies of the weights that they stream from memory, not from L2. GB/s of
    the weight bytes read, and its share of the measured copy rate.

Each kernel's output is checked against the plain-torch reference first (max abs error in the JSON).

    python3 -m benchmarks.kernels --out $OUT          # on the GPU: torch + triton, nothing else
    .venv/bin/python -m benchmarks.kernels --smoke    # here: tiny shapes on the CPU under Triton's interpreter
    python3 -m benchmarks.kernels --gemv --out $OUT   # (c) and (d) only, to $OUT/gemv.json
"""

import argparse
import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import GreenSplit, copy_bandwidth, write_json


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int

    def projections(self) -> dict[str, tuple[int, int]]:
        """name: (out_features, in_features) of a layer's four int8 matmuls (q/k/v and gate/up fused)."""
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        return {"qkv": (qkv, self.hidden), "o": (self.hidden, self.heads * self.head_dim),
                "gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}


LLAMA2_7B = Shape(heads=32, kv_heads=32, head_dim=128, hidden=4096, intermediate=11008)
SMOKE = Shape(heads=4, kv_heads=4, head_dim=64, hidden=128, intermediate=256)  # no GQA, as Llama-2-7B
ATTENTION_CONFIGS = [(32, 4, 2), (128, 4, 2), (64, 8, 3)]  # (block_n, num_warps, num_stages) besides (64, 4, 2)
# fp8 K/V alone: its tiles carry half the bytes (2.0-2.4 TB/s at the default launch): deeper pipelines, fewer warps,
# longer tiles, more splits
FP8_CONFIGS = [(64, 4, 3), (64, 4, 4), (64, 2, 2), (128, 4, 3), (256, 4, 2), (256, 8, 3)]
INT8_CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (64, 8, 3), (32, 4, 2)]
INT8_MATHS = [("fp16", False), ("fp16", True), ("fp32", False), ("fp32", True)]  # v, p, v32, p32
BIAS_CONFIGS = [(128, 4, 2), (128, 4, 3), (256, 4, 2), (64, 2, 3), (128, 2, 2), (128, 2, 3)]  # early, biased: the
# fewest instructions a KB (two warps need fewer: a program's row reductions cross fewer warps)
# q rounded to int8, K unconverted (qk_int8; V converted late or early): the launches compile_check finds with more
# programs an SM (fewer registers or less shared memory a program) besides int8's default
Q8_CONFIGS = [(128, 4, 3), (64, 4, 3), (64, 2, 3), (128, 4, 2), (32, 4, 3)]
# the keys on the tiles' rows (int8_keys, v-q16-keys, the default where a query head has its own KV head)
KEYS_CONFIGS = [(32, 2, 3), (16, 1, 3), (16, 1, 4), (16, 1, 5), (32, 1, 3), (32, 1, 4), (32, 2, 4), (16, 2, 3), (16, 2, 4),
                (64, 2, 3), (64, 4, 3)]
# over the heads-major pool: deeper pipelines too (an H200's bus wants more bytes in flight than an H100's)
HEADS_MAJOR_CONFIGS = [(32, 1, 4), (32, 1, 3), (32, 1, 5), (16, 1, 3), (16, 1, 4), (16, 1, 5), (64, 2, 3),
                       (64, 1, 3)]
# q16 early (the int8 cache's default under GQA): fewer warps a program were faster (4 -> 2), so one warp too
Q16_CONFIGS = [(128, 4, 3), (64, 4, 3), (64, 2, 3), (64, 1, 3), (32, 1, 3), (64, 2, 4), (32, 2, 3), (128, 2, 3)]
EARLY_CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (256, 4, 2), (256, 8, 2)]
PAGED_CONFIGS = [(64, 4, 2), (64, 4, 3), (64, 2, 3), (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 3),
                 (256, 4, 2), (256, 4, 3), (256, 8, 3)]
GEMV_ROWS = (1, 2, 4, 8, 16)
GEMV_CONFIGS = [  # (block_n, block_k, split_k, num_warps) besides gemv_config's: a hand sweep
    (16, 256, 1, 4), (16, 256, 2, 4), (32, 256, 1, 4), (32, 256, 2, 4), (32, 256, 4, 4), (32, 512, 1, 4),
    (64, 256, 1, 8), (32, 128, 1, 2), (32, 256, 8, 4)]
ROTATE_BYTES = 512 * 2**20  # weights cycled through per timed replay: well past any L2
GEMM_CONFIGS = [  # (block_m, block_n, block_k, num_warps, num_stages): a hand sweep, not an autotuner
    (64, 128, 128, 4, 4), (32, 128, 256, 4, 3), (64, 64, 256, 4, 3), (128, 128, 128, 8, 3)]


def by_block_n(configs: list, smoke: bool) -> list:
    """The launches to time; under the interpreter (--smoke) the first of each block_n, the only parameter it runs
    differently (warps and stages are the compiler's)."""
    if not smoke:
        return configs
    first: dict = {}
    for config in configs:
        first.setdefault(config[0], config)
    return list(first.values())


def shape_and_device(smoke: bool) -> tuple[Shape, str]:
    """Llama-2-7B's layer on the GPU; --smoke: the tiny shape on the CPU, Triton's interpreter switched on (read
    when the kernels module is first imported, so call this before)."""
    if not smoke:
        return LLAMA2_7B, "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    return SMOKE, "cpu"


def _torch():
    import torch

    return torch


class Stamp:
    """A point in device time: a recorded CUDA event, or the host clock on the CPU (where kernels are synchronous)."""

    def __init__(self, device: str):
        self.event = None
        if device == "cuda":
            self.event = _torch().cuda.Event(enable_timing=True)
            self.event.record()
        self.host_s = time.perf_counter()

    def ms_until(self, later: "Stamp") -> float:
        if self.event is None:
            return 1000 * (later.host_s - self.host_s)
        later.event.synchronize()
        return self.event.elapsed_time(later.event)


ITERS = {"cuda": 50, "cpu": 1}


def time_ms(fn, device: str, warmup: int = 3, iters: int | None = None) -> float:
    """Mean device ms per call over back-to-back calls."""
    for _ in range(warmup if device == "cuda" else min(warmup, 1)):
        fn()
    iters = iters or ITERS[device]
    start = Stamp(device)
    for _ in range(iters):
        fn()
    return start.ms_until(Stamp(device)) / iters


def capture(fn):
    """fn captured in a CUDA graph (after one warm-up run on a side stream, as torch's docs ask)."""
    torch = _torch()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def copies_ms(call, copies: int, device: str) -> float:
    """Mean device ms of call(i) over i < copies (each call reading its own copy of the weights, so that they come
    from memory, not L2), replayed from one CUDA graph for about 20 ms (timed eagerly off CUDA)."""
    def all_copies():
        for i in range(copies):
            call(i)
    if device != "cuda":
        return time_ms(all_copies, device) / copies
    graph = capture(all_copies)
    graph.replay()
    once = time_ms(graph.replay, device, warmup=0, iters=1)
    iters = max(3, min(50, int(20 / max(once, 1e-3))))
    return time_ms(graph.replay, device, warmup=0, iters=iters) / copies


def graph_ms(fn, device: str) -> float:
    """fn captured in a CUDA graph and replayed: proves it captures (no host sync) and drops launch overhead."""
    if device != "cuda":
        raise RuntimeError("CUDA graphs need a GPU")
    return time_ms(capture(fn).replay, device)


def _try(results: dict, name: str, fn) -> None:
    """Records fn()'s result under name, or the error: one failing variant must not cost the others."""
    try:
        results[name] = fn()
    except Exception as exc:  # the benchmark runs once on a borrowed GPU: keep every other number
        results[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    print(name, json.dumps(results[name]), flush=True)


# -- (a) attention -----------------------------------------------------------------------------------------
def loop_instructions_per_kb(fn) -> float | None:
    """Warp instructions a KB of K/V in the inner loop of the split kernel fn launches (compile_check's SASS
    count, with the launch's block_n, warps and cache dtype): beside each bandwidth (docs/benchmarks.md sets the
    two side by side). None where fn launches no compiled split kernel (the interpreter, aten)."""
    import torch
    from batchgen.worker.engine.kernels import attention as kernels
    from batchgen.worker.engine.kernels.backend import interpreting

    if interpreting() or not torch.cuda.is_available():  # nothing compiled: not worth another interpreted run
        return None
    from batchgen.worker.engine.kernels.compile_check import instructions_per_kb

    seen, split_kernel = [], kernels._split_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                compiled = split_kernel[grid](*args, **kwargs)
                seen.append((compiled, args, kwargs))
                return compiled
            return launch

    kernels._split_kernel = Spy()
    try:
        fn()
    finally:
        kernels._split_kernel = split_kernel
    if not seen or not hasattr(seen[0][0], "asm"):
        return None
    compiled, args, kwargs = seen[0]
    major, minor = torch.cuda.get_device_capability()
    step_bytes = kwargs["BLOCK_N"] * args[0].shape[-1] * 2 * args[1].element_size()  # K and V a step
    return instructions_per_kb(compiled.asm["cubin"], 10 * major + minor, kwargs["num_warps"], step_bytes)


def attention(args, shape: Shape, device: str) -> dict:
    torch = _torch()
    from batchgen.worker.engine.kernels import (
        decode_attention,
        decode_attention_reference,
        num_kv_splits,
        quantize_kv,
    )
    from batchgen.worker.engine.kernels.attention import INT8_LAUNCH, fp8_kv_scale, quantize_kv_int8
    from batchgen.worker.engine.kernels.int8_keys import keys_apply

    g = torch.Generator(device=device).manual_seed(0)
    rows, max_len, kv_heads, head_dim = args.rows, args.max_len, shape.kv_heads, shape.head_dim
    low = max(1, 2 * args.mean_ctx - max_len)  # uniform lengths with the asked mean, capped by max_len
    lens = torch.randint(low, max_len + 1, (rows,), generator=g, device=device, dtype=torch.int32)
    cache_shape = (rows, max_len, kv_heads, head_dim)
    k = torch.randn(cache_shape, generator=g, device=device, dtype=torch.float16)
    v = torch.randn(cache_shape, generator=g, device=device, dtype=torch.float16)
    q = torch.randn(rows, shape.heads, head_dim, generator=g, device=device, dtype=torch.float16)
    scale = head_dim**-0.5
    k_scale, v_scale = fp8_kv_scale(k), fp8_kv_scale(v)
    k8, v8 = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
    (ki8, k_tokens), (vi8, v_tokens) = quantize_kv_int8(k), quantize_kv_int8(v)
    int8 = dict(k_scale=k_tokens.transpose(1, 2).contiguous(), v_scale=v_tokens.transpose(1, 2).contiguous())
    num_tokens = int(lens.sum())
    needed = {"fp16": num_tokens * kv_heads * head_dim * 2 * 2, "fp8": num_tokens * kv_heads * head_dim * 2 * 1,
              "int8": num_tokens * kv_heads * (head_dim + 4) * 2}  # a float32 scale per token and head
    out: dict = {"rows": rows, "max_len": max_len, "mean_ctx": round(num_tokens / rows, 1),
                 "kv_bytes_needed_fp16": needed["fp16"], "kv_bytes_needed_fp8": needed["fp8"],
                 "kv_bytes_needed_int8": needed["int8"],
                 "default_splits": num_kv_splits(max_len, rows, kv_heads), "variants": {}}
    variants = out["variants"]

    def attempt(name: str, fn) -> None:  # --match: only the variants named so (a short call on a borrowed GPU)
        if args.match is None or re.search(args.match, name):
            _try(variants, name, fn)

    def row(fn, kv: str, *, graph: bool = False) -> dict:
        ms = graph_ms(fn, device) if graph else time_ms(fn, device)
        timed = {"ms": round(ms, 4), "kv_gb_s": round(needed[kv] / ms / 1e6, 1), "layers_32_ms": round(32 * ms, 2)}
        per_kb = None if graph else loop_instructions_per_kb(fn)
        return timed | ({"warp_instructions_per_kb": per_kb} if per_kb else {})

    check = slice(0, min(rows, 32))  # the float32 reference over every row would need ~10 GB

    def checked(kv_k, kv_v, k_scale=None, v_scale=None, **tune) -> float:
        scales = {name: s[check] if isinstance(s, torch.Tensor) and s.dim() == 3 else s  # int8's, per row
                  for name, s in (("k_scale", k_scale), ("v_scale", v_scale))}
        ours = decode_attention(q[check], kv_k[check], kv_v[check], lens[check], scale, **scales, **tune)
        ref = decode_attention_reference(q[check], kv_k[check], kv_v[check], lens[check], scale, **scales)
        return round(float((ours.float() - ref.float()).abs().max()), 5)

    out["max_abs_err_fp16"] = checked(k, v)
    out["max_abs_err_fp8"] = checked(k8, v8, k_scale=k_scale, v_scale=v_scale)
    out["max_abs_err_int8"] = checked(ki8, vi8, **int8)
    for splits in sorted({out["default_splits"], 1, 2}):
        attempt(f"triton int8, splits {splits}",
             lambda s=splits: row(lambda: decode_attention(q, ki8, vi8, lens, scale, num_splits=s, **int8), "int8"))
    attempt("triton int8, graph",
         lambda: row(lambda: decode_attention(q, ki8, vi8, lens, scale, **int8), "int8", graph=True))
    for math, in_p in INT8_MATHS:  # the V scales' variants (--int8-kv-scales), each at int8's launches
        for block_n, warps, stages in by_block_n(INT8_CONFIGS, args.smoke):
            tune = dict(block_n=block_n, num_warps=warps, num_stages=stages, f16_int8=math == "fp16",
                        scales_in_p=in_p)
            attempt(f"triton int8 {math}, V scales in {'p' if in_p else 'v'}, block_n {block_n}, "
                           f"warps {warps}, stages {stages}", lambda t=tune: row(
                lambda: decode_attention(q, ki8, vi8, lens, scale, **int8, **t), "int8")
                | {"max_abs_err": checked(ki8, vi8, **int8, **t)})
    # the engine's paged cache: 64-token blocks behind a block table, the blocks shuffled over the pool
    page = 64 if max_len % 64 == 0 else 32  # (--smoke's max_len: 96)
    if max_len % page == 0:
        blocks_per_row = max_len // page
        perm = torch.randperm(rows * blocks_per_row, generator=g, device=device)
        table = perm.view(rows, blocks_per_row).to(torch.int32)

        def paged(x):  # [rows, max_len, ...] -> [blocks, page, ...] with row r's block j at table[r, j]
            pool = torch.empty_like(x).view(rows * blocks_per_row, page, *x.shape[2:])
            pool[perm] = x.view(rows * blocks_per_row, page, *x.shape[2:])
            return pool

        def paged_scales(sc):  # [rows, kv_heads, max_len] -> [blocks, kv_heads, page]
            by_block = sc.view(rows, kv_heads, blocks_per_row, page).permute(0, 2, 1, 3).reshape(-1, kv_heads, page)
            pool = torch.empty_like(by_block)
            pool[perm] = by_block
            return pool

        kp, vp, kip, vip = paged(k), paged(v), paged(ki8), paged(vi8)
        int8_paged = dict(k_scale=paged_scales(int8["k_scale"]), v_scale=paged_scales(int8["v_scale"]))
        ref16 = decode_attention_reference(q[check], k[check], v[check], lens[check], scale)
        ref8 = decode_attention_reference(q[check], ki8[check], vi8[check], lens[check], scale, **{
            n: t[check] for n, t in int8.items()})

        def paged_err(kc, vc, ref, **kw) -> float:
            got = decode_attention(q[check], kc, vc, lens[check], scale, block_table=table[check], **kw)
            return round(float((got.float() - ref.float()).abs().max()), 5)

        for block_n, warps, stages in by_block_n(PAGED_CONFIGS, args.smoke):
            tune = dict(block_n=block_n, num_warps=warps, num_stages=stages)
            attempt(f"paged fp16, block_n {block_n}, warps {warps}, stages {stages}", lambda t=tune: row(
                lambda: decode_attention(q, kp, vp, lens, scale, block_table=table, **t), "fp16")
                | {"max_abs_err": paged_err(kp, vp, ref16, **t)})
            attempt(f"paged int8, block_n {block_n}, warps {warps}, stages {stages}", lambda t=tune: row(
                lambda: decode_attention(q, kip, vip, lens, scale, block_table=table, **int8_paged, **t), "int8")
                | {"max_abs_err": paged_err(kip, vip, ref8, **int8_paged, **t)})
        for block_n, warps, stages in by_block_n(EARLY_CONFIGS, args.smoke):  # int8 converted where it is loaded
            tune = dict(block_n=block_n, num_warps=warps, num_stages=stages, cvt_early=True)
            attempt(f"paged int8 early, block_n {block_n}, warps {warps}, stages {stages}", lambda t=tune: row(
                lambda: decode_attention(q, kip, vip, lens, scale, block_table=table, **int8_paged, **t), "int8")
                | {"max_abs_err": paged_err(kip, vip, ref8, **int8_paged, **t)})
        q8_launches = Q8_CONFIGS[:1] if args.smoke else Q8_CONFIGS  # (the interpreter: the block_n sweeps run above)
        q16_launches = Q16_CONFIGS[:1] if args.smoke else Q16_CONFIGS
        q8_runs = [(c, e, 1) for c in q8_launches for e in (False, True)] + [(c, True, 2) for c in q16_launches]
        for (block_n, warps, stages), early, terms in q8_runs:  # q in one int8 term (q8) or two (q16)
            tune = dict(block_n=block_n, num_warps=warps, num_stages=stages, cvt_early=early, qk_int8=terms)
            attempt(f"paged int8 q{8 * terms}{' early' if early else ''}, block_n {block_n}, warps {warps}, "
                    f"stages {stages}",
                    lambda t=tune: row(
                        lambda: decode_attention(q, kip, vip, lens, scale, block_table=table, **int8_paged, **t),
                        "int8") | {"max_abs_err_vs_int8": paged_err(kip, vip, ref8, **int8_paged, **t)})
        # and over the same pools with each block's heads outermost ([blocks, heads, page, d] seen as [blocks, page,
        # heads, d], as model_runner.kv_pool lays an int8 pool out): a head's keys of a block are one run of
        # page * head_dim bytes, not head_dim-byte pieces a token apart
        kih, vih, kph, vph = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (kip, vip, kp, vp))
        keys_layouts = (("", (kip, vip), KEYS_CONFIGS), (" heads-major", (kih, vih), HEADS_MAJOR_CONFIGS))
        for layout, (kc, vc), configs in keys_layouts if keys_apply(shape.heads, kv_heads, head_dim) else ():
            for block_n, warps, stages in configs[:1] if args.smoke else configs:
                tune = dict(block_n=block_n, num_warps=warps, num_stages=stages, keys=True)
                attempt(f"paged int8 keys{layout}, block_n {block_n}, warps {warps}, stages {stages}",
                        lambda t=tune, kc=kc, vc=vc: row(
                            lambda: decode_attention(q, kc, vc, lens, scale, block_table=table, **int8_paged, **t),
                            "int8") | {"max_abs_err_vs_int8": paged_err(kc, vc, ref8, **int8_paged, **t)})
        attempt("paged fp16 heads-major, the default launch", lambda: row(
            lambda: decode_attention(q, kph, vph, lens, scale, block_table=table), "fp16")
            | {"max_abs_err": paged_err(kph, vph, ref16)})
        del kih, vih, kph, vph
        # early, left 1152 over the values; and with the V scales in p at int8's launch
        # (under the interpreter one launch of each: the other sweeps run every block_n there already)
        for (block_n, warps, stages), in_p in ([(c, False) for c in BIAS_CONFIGS[:1 if args.smoke else None]]
                                               + [(INT8_LAUNCH, True)]):
            tune = dict(block_n=block_n, num_warps=warps, num_stages=stages, cvt_early=True, bias=True,
                        scales_in_p=in_p)
            attempt(f"paged int8 {'p' if in_p else 'v'}-bias, block_n {block_n}, warps {warps}, "
                 f"stages {stages}", lambda t=tune: row(
                     lambda: decode_attention(q, kip, vip, lens, scale, block_table=table, **int8_paged, **t),
                     "int8") | {"max_abs_err": paged_err(kip, vip, ref8, **int8_paged, **t)})
        # the split's block ids read ahead of its loop (the default at 3 stages or more) against read each step; fp16
        # at 2 stages (LAUNCH, the default where a program's shared memory cannot hold PAGED_LAUNCH's 3; --smoke: the
        # interpreter runs stages alike)
        for name, tune in (("paged int8, the default launch, ids in the loop", dict(preload=False)),
                           ("paged fp16, 3 stages, ids ahead", dict(num_stages=3)),
                           ("paged fp16, 3 stages, ids in the loop", dict(num_stages=3, preload=False)),
                           *([] if args.smoke else [("paged fp16, 2 stages", dict(num_stages=2))])):
            cache, ref, kw = ((kip, vip), ref8, int8_paged) if "int8" in name else ((kp, vp), ref16, {})
            attempt(name, lambda c=cache, r=ref, kw=kw, t=tune: row(
                lambda: decode_attention(q, *c, lens, scale, block_table=table, **kw, **t), "int8" if kw else "fp16")
                | {"max_abs_err": paged_err(*c, r, **kw, **t)})
        # the int8 cache's bytes read by the fp16 kernel (as fp16 at half the head size: the same bytes a key, no
        # conversion, 2-byte tiles): at the bus, the int8 kernel is held by what its 1-byte tiles cost; near the
        # int8 kernel's rate, by what a key costs whatever its bytes
        q_half, kh, vh = q[..., :head_dim // 2].contiguous(), kip.view(torch.float16), vip.view(torch.float16)
        for block_n, warps, stages in ((64, 4, 3), (128, 4, 3), (64, 4, 2))[:1 if args.smoke else None]:
            tune = dict(block_n=block_n, num_warps=warps, num_stages=stages)
            attempt(f"paged int8 bytes as fp16, block_n {block_n}, warps {warps}, stages {stages}",
                 lambda t=tune: row(lambda: decode_attention(q_half, kh, vh, lens, scale, block_table=table, **t),
                                    "fp8"))
        attempt("paged int8, the default launch", lambda: row(
            lambda: decode_attention(q, kip, vip, lens, scale, block_table=table, **int8_paged), "int8"))
        attempt("paged fp16, the default launch", lambda: row(
            lambda: decode_attention(q, kp, vp, lens, scale, block_table=table), "fp16"))
        del kp, vp, kip, vip
    for splits in sorted({out["default_splits"], 1, 2, 4}):
        attempt(f"triton fp16, splits {splits}",
             lambda s=splits: row(lambda: decode_attention(q, k, v, lens, scale, num_splits=s), "fp16"))
    attempt("triton fp16, graph", lambda: row(lambda: decode_attention(q, k, v, lens, scale), "fp16", graph=True))
    fp8 = dict(k_scale=k_scale, v_scale=v_scale)
    for splits in (2, 4):
        attempt(f"triton fp8, splits {splits}",
             lambda s=splits: row(lambda: decode_attention(q, k8, v8, lens, scale, num_splits=s, **fp8), "fp8"))
    for block_n, warps, stages in FP8_CONFIGS:
        tune = dict(block_n=block_n, num_warps=warps, num_stages=stages)
        attempt(f"triton fp8, block_n {block_n}, warps {warps}, stages {stages}", lambda t=tune: row(
            lambda: decode_attention(q, k8, v8, lens, scale, **fp8, **t), "fp8") | {"max_abs_err": checked(k8, v8, **fp8, **t)})
    for block_n, warps, stages in ATTENTION_CONFIGS:  # the default launch is timed above
        tune = dict(block_n=block_n, num_warps=warps, num_stages=stages)
        attempt(f"triton fp16, block_n {block_n}, warps {warps}, stages {stages}", lambda t=tune: row(
            lambda: decode_attention(q, k, v, lens, scale, **t), "fp16") | {"max_abs_err": checked(k, v, **t)})
        attempt(f"triton fp8, block_n {block_n}, warps {warps}, stages {stages}", lambda t=tune: row(
            lambda: decode_attention(q, k8, v8, lens, scale, k_scale=k_scale, v_scale=v_scale, **t), "fp8")
            | {"max_abs_err": checked(k8, v8, k_scale=k_scale, v_scale=v_scale, **t)})
    attempt("triton fp8 per-head scale", lambda: row(
        lambda: decode_attention(q, k8, v8, lens, scale, k_scale=k_scale, v_scale=v_scale), "fp8"))
    attempt("triton fp8 per-head scale, graph", lambda: row(
        lambda: decode_attention(q, k8, v8, lens, scale, k_scale=k_scale, v_scale=v_scale), "fp8", graph=True))

    cu_q = torch.arange(rows + 1, device=device, dtype=torch.int32)
    cu_k = cu_q * max_len
    keys, values = k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)

    def aten_flash():  # model_runner.flash_varlen, the engine's decode attention today
        return torch.ops.aten._flash_attention_forward(q, keys, values, cu_q, cu_k, 1, max_len, 0.0, False, False,
                                                       scale=scale, seqused_k=lens)[0]

    attempt("aten flash varlen seqused_k (engine today)", lambda: row(aten_flash, "fp16"))
    attempt("aten flash varlen seqused_k, graph", lambda: row(aten_flash, "fp16", graph=True))

    def flash_attn_kvcache():
        from flash_attn import flash_attn_with_kvcache

        return lambda: flash_attn_with_kvcache(q[:, None], k, v, cache_seqlens=lens, softmax_scale=scale)

    try:
        fa = flash_attn_kvcache()
        attempt("flash_attn with_kvcache", lambda: row(fa, "fp16"))
    except ImportError:
        variants["flash_attn with_kvcache"] = {"error": "flash_attn does not import"}

    mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
    q4 = q[:, :, None]

    def sdpa():  # reads every row's whole max_len: its GB/s is counted on the bytes needed, like the others
        return torch.nn.functional.scaled_dot_product_attention(q4, k.transpose(1, 2), v.transpose(1, 2),
                                                                attn_mask=mask, scale=scale,
                                                                enable_gqa=shape.heads != kv_heads)

    attempt("sdpa padded cache + mask", lambda: row(sdpa, "fp16"))
    return out


# -- (b) int8 projections ----------------------------------------------------------------------------------
def _layer_ms(steps: list, device: str) -> tuple[float, list[float]]:
    """The projections back to back, as in a layer: (total ms, ms of each) from stamps between them."""
    for _ in range(3 if device == "cuda" else 1):
        for fn in steps:
            fn()
    iters = ITERS[device]
    stamps = [Stamp(device)]
    for _ in range(iters):
        for fn in steps:
            fn()
            stamps.append(Stamp(device))
    each = [0.0] * len(steps)
    for j in range(1, len(stamps)):
        each[(j - 1) % len(steps)] += stamps[j - 1].ms_until(stamps[j]) / iters
    return sum(each), each


def projections(args, shape: Shape, device: str, deadline: float) -> dict:
    torch = _torch()
    from batchgen.worker.engine import int8_linear
    from batchgen.worker.engine.kernels import (
        dequantize_acc,
        dequantize_acc_reference,
        int8_matmul_dequant,
        quantize_rows,
    )

    g = torch.Generator(device=device).manual_seed(1)
    m = args.rows
    layer = {}
    for name, (n, k) in shape.projections().items():
        layer[name] = {"x": torch.randn(m, k, generator=g, device=device, dtype=torch.float16),
                       "cb": torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int8),
                       "scb": torch.rand(n, generator=g, device=device) + 0.5,
                       "xq": torch.randint(-127, 128, (m, k), generator=g, device=device, dtype=torch.int8)}
    weight_bytes = sum(n * k for n, k in shape.projections().values())
    out: dict = {"rows": m, "weight_bytes": weight_bytes, "goal_ms": 0.25, "variants": {}, "max_abs_err": {}}

    def separate_steps(quant, dequant):
        def one(p):
            def step():
                xq, absmax = quant(p["x"])
                return dequant(torch._int_mm(xq, p["cb"].t()), absmax, p["scb"], None, torch.float16)
            return step
        return [one(p) for p in layer.values()]

    def triton_epilogue_steps(cfg=None):
        def one(p):
            def step():
                xq, absmax = quantize_rows(p["x"])
                if cfg is None:
                    return dequantize_acc(torch._int_mm(xq, p["cb"].t()), absmax, p["scb"], None, torch.float16)
                bm, bn, bk, w, s = cfg
                return int8_matmul_dequant(xq, absmax, p["cb"], p["scb"], None, torch.float16, block_m=bm, block_n=bn,
                                           block_k=bk, num_warps=w, num_stages=s)
            return step
        return [one(p) for p in layer.values()]

    def record(steps: list) -> dict:
        total, each = _layer_ms(steps, device)
        return {"ms": round(total, 4), "each_ms": dict(zip(layer, (round(e, 4) for e in each), strict=True)),
                "weights_gb_s": round(weight_bytes / total / 1e6, 1), "layers_32_ms": round(32 * total, 2)}

    def graph_record(steps: list) -> dict:
        def layer_fn():
            for s in steps:
                s()
        ms = graph_ms(layer_fn, device)
        return {"ms": round(ms, 4), "weights_gb_s": round(weight_bytes / ms / 1e6, 1), "layers_32_ms": round(32 * ms, 2)}

    for name, p in layer.items():  # correctness first: every Triton variant against the torch arithmetic
        xq, absmax = int8_linear.quantize_rows(p["x"])
        ref = dequantize_acc_reference(torch._int_mm(xq, p["cb"].t()), absmax, p["scb"], None, torch.float16).float()
        tq, ta = quantize_rows(p["x"])
        errs = {"quantize_mismatches": int((tq != xq).sum()),
                "epilogue": float((dequantize_acc(torch._int_mm(tq, p["cb"].t()), ta, p["scb"], None,
                                                  torch.float16).float() - ref).abs().max())}
        try:
            errs["triton_gemm"] = float((int8_matmul_dequant(tq, ta, p["cb"], p["scb"], None, torch.float16).float()
                                         - ref).abs().max())
        except Exception as exc:
            errs["triton_gemm"] = f"{type(exc).__name__}: {exc}"[:300]
        out["max_abs_err"][name] = errs
    print("projection errors", json.dumps(out["max_abs_err"]), flush=True)

    variants = out["variants"]
    _try(variants, "torch eager: quantise, _int_mm, dequantise",
         lambda: record(separate_steps(int8_linear.quantize_rows, int8_linear.dequantize)))
    _try(variants, "_int_mm alone", lambda: record([
        lambda p=p: torch._int_mm(p["xq"], p["cb"].t()) for p in layer.values()]))
    _try(variants, "triton quantise + _int_mm + triton dequantise", lambda: record(triton_epilogue_steps()))
    _try(variants, "triton quantise + _int_mm + triton dequantise, graph", lambda: graph_record(triton_epilogue_steps()))
    for cfg in GEMM_CONFIGS:
        _try(variants, f"triton quantise + triton int8 GEMM (epilogue fused) {cfg}",
             lambda c=cfg: record(triton_epilogue_steps(c)))
    if args.compiled and time.monotonic() < deadline:
        def compiled():
            quant = torch.compile(int8_linear.quantize_rows, dynamic=True)
            dequant = torch.compile(int8_linear.dequantize, dynamic=True)
            start = time.perf_counter()
            for step in separate_steps(quant, dequant):
                step()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            res = record(separate_steps(quant, dequant))
            res["compile_s"] = round(compile_s, 1)
            return res

        _try(variants, "torch.compile'd quantise + _int_mm + dequantise (engine today)", compiled)
    elif args.compiled:
        variants["torch.compile'd quantise + _int_mm + dequantise (engine today)"] = {"error": "skipped: time budget"}

    ok = {k: v["ms"] for k, v in variants.items() if k.startswith("triton") and "ms" in v}
    if ok:
        best = min(ok, key=ok.get)
        out["best_triton"] = {"variant": best, "ms": ok[best], "meets_goal": ok[best] <= out["goal_ms"]}
    gemms = {k: v["each_ms"] for k, v in variants.items() if "int8 GEMM" in k and "each_ms" in v}
    if gemms:  # each projection with its own best GEMM config: what a per-shape config table would give
        pick = {name: min(gemms, key=lambda k, n=name: gemms[k][n]) for name in layer}
        total = sum(gemms[pick[name]][name] for name in layer)
        out["best_gemm_per_projection"] = {"ms": round(total, 4), "meets_goal": total <= out["goal_ms"],
                                           "configs": pick}
    return out


# -- (d) the small-row GEMV -------------------------------------------------------------------------------
def gemv(args, shape: Shape, device: str, bandwidth_gb_s: float | None) -> dict:
    torch = _torch()
    from batchgen.worker.engine import int8_linear
    from batchgen.worker.engine.int8_linear import OUTLIER_KERNEL, Int8Linear, Int8State
    from batchgen.worker.engine.int8_outliers import OutlierColumns, slots_for
    from batchgen.worker.engine.kernels.int8_gemv import _num_sms, gemv_config, int8_gemv, int8_gemv_reference

    on_gpu = device == "cuda"
    if on_gpu:
        int8_linear.KERNELS.compile()  # as convert_model does on CUDA
    g = torch.Generator(device=device).manual_seed(2)
    rows = GEMV_ROWS if on_gpu else (1, 3)
    out: dict = {"rows": list(rows), "copy_gb_s": bandwidth_gb_s, "num_sms": _num_sms(torch.device(device)),
                 "projections": {}, "per_layer": {}}

    def measured(calls, copies: int, nbytes: int) -> dict:
        def all_copies():
            for i in range(copies):
                calls(i)
        ms = (graph_ms(all_copies, device) if on_gpu else time_ms(all_copies, device)) / copies
        gb_s = nbytes / ms / 1e6
        pct = round(100 * gb_s / bandwidth_gb_s, 1) if bandwidth_gb_s else None
        return {"ms": round(ms, 5), "gb_s": round(gb_s, 1), "pct_of_copy": pct}

    def with_gemv(setting: bool | None, fn):
        def run():  # the dispatch is decided while the graph is captured
            saved, int8_linear.USE_GEMV = int8_linear.USE_GEMV, setting
            try:
                return fn()
            finally:
                int8_linear.USE_GEMV = saved
        return run

    def one_projection(n: int, k: int) -> dict:
        nbytes = n * k + 4 * n  # int8 weights and their float32 row scales
        copies = max(1, -(-ROTATE_BYTES // nbytes)) if on_gpu else 1
        cbs = [torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int8) for _ in range(copies)]
        scbs = [torch.rand(n, generator=g, device=device) + 0.5 for _ in range(copies)]
        w16 = [int8_linear.dequantize_weight(cb, scb, torch.float16) for cb, scb in zip(cbs, scbs, strict=True)]
        guarded = []
        for cb, scb in zip(cbs, scbs, strict=True):  # int_mm_outliers with no column yet (random weights have none)
            lin = Int8Linear(Int8State(cb, scb, None), OUTLIER_KERNEL)
            cols = OutlierColumns(k, 6.0, torch.device(device))
            cols.resize(slots_for(0))
            lin.attach(cols, torch.float16)
            guarded.append(lin)
        plain = [Int8Linear(Int8State(cb, scb, None), "int_mm") for cb, scb in zip(cbs, scbs, strict=True)]
        proj: dict = {"out_features": n, "in_features": k, "weight_bytes": nbytes, "copies": copies, "rows": {}}
        for m in rows:
            x = torch.randn(m, k, generator=g, device=device, dtype=torch.float16)
            ref = int8_gemv_reference(x, cbs[0], scbs[0]).float()
            res: dict = {"default_config": gemv_config(m, n, k, out["num_sms"]),
                         "max_abs_err": round(float((int8_gemv(x, cbs[0], scbs[0]).float() - ref).abs().max()), 5),
                         "ref_abs_max": round(float(ref.abs().max()), 2), "variants": {}}
            variants = res["variants"]
            _try(variants, "gemv", lambda x=x: measured(lambda i: int8_gemv(x, cbs[i], scbs[i]), copies, nbytes))
            for bn, bk, sk, w in GEMV_CONFIGS:
                tune = dict(block_n=bn, block_k=bk, split_k=sk, num_warps=w)
                _try(variants, f"gemv {bn}x{bk} split {sk} warps {w}", lambda x=x, t=tune: measured(
                    lambda i: int8_gemv(x, cbs[i], scbs[i], **t), copies, nbytes))
            _try(variants, "gemv, weights widened by conversion instructions", lambda x=x: measured(
                lambda i: int8_gemv(x, cbs[i], scbs[i], bits=False), copies, nbytes))
            on = True if not on_gpu else None
            _try(variants, "Int8Linear int_mm_outliers, gemv", lambda x=x, on=on: measured(
                lambda i: with_gemv(on, lambda: guarded[i](x))(), copies, nbytes))
            _try(variants, "Int8Linear int_mm_outliers, no gemv (before)", lambda x=x: measured(
                lambda i: with_gemv(False, lambda: guarded[i](x))(), copies, nbytes))
            _try(variants, "Int8Linear int_mm, no gemv (before)", lambda x=x: measured(
                lambda i: with_gemv(False, lambda: plain[i](x))(), copies, nbytes))
            _try(variants, "fp16 torch.matmul (2x the bytes)", lambda x=x: measured(
                lambda i: torch.matmul(x, w16[i].t()), copies, 2 * n * k))
            ok = {v: r["ms"] for v, r in variants.items() if v.startswith("gemv ") and "ms" in r}
            ok["gemv"] = variants.get("gemv", {}).get("ms", float("inf"))
            if ok:
                best = min(ok, key=ok.get)
                res["best_gemv"] = {"variant": best, **variants[best]}
            proj["rows"][m] = res
        return proj

    for name, (n, k) in shape.projections().items():
        out["projections"][name] = one_projection(n, k)
        if on_gpu:
            torch.cuda.empty_cache()  # that projection's weight copies went with its frame

    def layer_ms(m: int, variant: str) -> float | None:
        try:
            return sum(p["rows"][m]["variants"][variant]["ms"] for p in out["projections"].values())
        except (KeyError, TypeError):
            return None

    bytes_per_layer = sum(p["weight_bytes"] for p in out["projections"].values())
    for m in rows:
        best = [p["rows"][m].get("best_gemv", {}).get("ms") for p in out["projections"].values()]
        summary = {v: layer_ms(m, v) for v in ("gemv", "Int8Linear int_mm_outliers, gemv",
                                               "Int8Linear int_mm_outliers, no gemv (before)",
                                               "fp16 torch.matmul (2x the bytes)")}
        summary["gemv, best config per projection"] = sum(best) if None not in best else None
        # a decode step's linears alone over 32 layers: the step rate they allow at this batch
        out["per_layer"][m] = {v: {"ms": round(ms, 4), "weights_gb_s": round(bytes_per_layer / ms / 1e6, 1),
                                   "steps_per_s_32_layers": round(1000 / (32 * ms), 1)} if ms else None
                               for v, ms in summary.items()}
    return out


def gemv_table(res: dict) -> str:
    g = res.get("gemv") or {}
    lines = [f"(d) small-row GEMV; copy rate {g.get('copy_gb_s')} GB/s, {g.get('num_sms')} SMs",
             "| proj | rows | gemv ms | GB/s | % copy | best config (ms, %) | int_mm_outliers before ms | "
             "Int8Linear now ms | fp16 matmul ms | err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in (g.get("projections") or {}).items():
        for m, r in p["rows"].items():
            v = r["variants"]

            def ms(key: str, v=v) -> str:
                return f"{v[key]['ms']:.4f}" if "ms" in v.get(key, {}) else "–"

            d, b = v.get("gemv", {}), r.get("best_gemv", {})
            lines.append(f"| {name} | {m} | {ms('gemv')} | {d.get('gb_s', '–')} | {d.get('pct_of_copy', '–')} | "
                         f"{b.get('variant', '–')} ({b.get('ms', '–')}, {b.get('pct_of_copy', '–')}) | "
                         f"{ms('Int8Linear int_mm_outliers, no gemv (before)')} | "
                         f"{ms('Int8Linear int_mm_outliers, gemv')} | {ms('fp16 torch.matmul (2x the bytes)')} | "
                         f"{r['max_abs_err']} |")
    lines += ["", "per layer (4 projections), steps/s of 32 layers' linears:"]
    for m, s in (g.get("per_layer") or {}).items():
        lines.append(f"  rows {m}: " + "; ".join(f"{k}: {v['ms']} ms, {v['weights_gb_s']} GB/s, "
                                                 f"{v['steps_per_s_32_layers']}/s" for k, v in s.items() if v))
    return "\n".join(lines)


def table(res: dict) -> str:
    bw = (res.get("bandwidth") or {}).get("gb_s")
    lines = [f"device {res.get('device')}, torch {res.get('torch')}, triton {res.get('triton')}; D2D copy {bw} GB/s", ""]
    att = res.get("attention") or {}
    lines += [f"(a) decode attention, one layer: {att.get('rows')} rows, mean context {att.get('mean_ctx')}, "
              f"max_len {att.get('max_len')}; errors fp16 {att.get('max_abs_err_fp16')}, fp8 {att.get('max_abs_err_fp8')}",
              "| variant | ms | GB/s of K/V needed | % of copy rate | × 32 layers ms |", "|---|---|---|---|---|"]
    for name, r in (att.get("variants") or {}).items():
        if "error" in r:
            lines.append(f"| {name} | – | – | – | {r['error'][:80]} |")
            continue
        pct = f"{100 * r['kv_gb_s'] / bw:.0f}" if bw else "–"
        lines.append(f"| {name} | {r['ms']:.3f} | {r['kv_gb_s']:,.0f} | {pct} | {r['layers_32_ms']} |")
    pro = res.get("projections") or {}
    lines += ["", f"(b) a layer's four int8 projections at {pro.get('rows')} rows (goal ≤ {pro.get('goal_ms')} ms)",
              "| variant | ms | weights GB/s | × 32 layers ms | qkv / o / gate_up / down ms |", "|---|---|---|---|---|"]
    for name, r in (pro.get("variants") or {}).items():
        if "error" in r:
            lines.append(f"| {name} | – | – | – | {r['error'][:80]} |")
            continue
        each = " / ".join(f"{v:.3f}" for v in (r.get("each_ms") or {}).values())
        lines.append(f"| {name} | {r['ms']:.3f} | {r['weights_gb_s']:,.0f} | {r['layers_32_ms']} | {each} |")
    lines.append(f"best Triton: {pro.get('best_triton')}")
    lines.append(f"best GEMM config per projection: {pro.get('best_gemm_per_projection')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--rows", type=int, default=260)
    parser.add_argument("--mean-ctx", type=int, default=404)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the torch.compile'd quantise/dequantise the engine runs (skipped past 45 s)")
    parser.add_argument("--only", default="bandwidth,attention,projections")
    parser.add_argument("--match", help="a regular expression: time only the attention variants it finds in their name")
    parser.add_argument("--gemv", action="store_true", help="the small-row GEMV section alone (with the copy "
                        "rate), to gemv.json under --out (or to --out itself when it ends in .json)")
    parser.add_argument("--sms", type=int, help="run on a green context of about this many SMs (what the driver "
                        "grants): a card with fewer SMs for its bus")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under Triton's interpreter: checks the script, measures nothing")
    args = parser.parse_args()
    shape, device = shape_and_device(args.smoke)
    if args.smoke:
        args.rows, args.mean_ctx, args.max_len, args.compiled = 6, 50, 96, False
    if args.gemv:
        args.only = "bandwidth,gemv"
    torch = _torch()
    import triton

    start = time.monotonic()
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
                 "torch": torch.__version__, "triton": triton.__version__, "shape": asdict(shape)}
    phases = {"bandwidth": lambda: copy_bandwidth(device, 2**32 if device == "cuda" else 2**24), "attention": lambda: attention(args, shape, device),
              "projections": lambda: projections(args, shape, device, start + 45),
              "gemv": lambda: gemv(args, shape, device, (res.get("bandwidth") or {}).get("gb_s"))}
    stream = contextlib.nullcontext()
    if args.sms:
        split = GreenSplit(args.sms)
        res["sms"] = split.sms[0]
        stream = torch.cuda.stream(split.streams[0])
    for phase in args.only.split(","):
        with stream:
            _try(res, phase, phases[phase])
        if device == "cuda":
            torch.cuda.empty_cache()  # the phase's tensors went with its frame
    res["wall_s"] = round(time.monotonic() - start, 1)
    path = args.out if args.out.suffix == ".json" else args.out / ("gemv.json" if args.gemv else "kernels.json")
    write_json(path, res)
    print(gemv_table(res) if args.gemv else table(res))
    print(f"wall {res['wall_s']} s; wrote {path}")


if __name__ == "__main__":
    main()
