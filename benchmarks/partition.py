"""Can a decode step's attention and its int8 projections share the GPU by its SMs?

Two half-batches on two streams lost (docs/benchmarks.md, "Two half-batches on two streams: slower"): both kernels
ran side by side and each slowed. This asks the question under it with the SMs split between them by green contexts
(cuGreenCtxCreate over disjoint SM groups), before any engine code is written for it:

- side A: one layer's decode attention over half the bulk state's rows (the default kernel over an int8 pool laid
  out as the engine lays it: paged, each block's heads outermost);
- side B: one layer's four int8 projections at the other half's rows (the quantising kernel and the tuned GEMM,
  as Int8Linear runs them, without the outlier columns);

each LAYERS times back to back in a CUDA graph captured on the stream it runs on. Timed: each alone on the whole GPU
(their sum is what a step pays today); both on two ordinary streams; then for each split, each alone in its share and
both at once. A split pays where both at once take less than the sum.

    python3 -m benchmarks.partition --out $OUT        # on the GPU
    .venv/bin/python -m benchmarks.partition --smoke  # here: both sides built and checked under the interpreter
"""

import argparse
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import GreenSplit, write_json


def attention_side(rows: int, mean_ctx: int, max_len: int, heads: int, head_dim: int, device: str):
    """() -> one layer's decode attention over `rows` rows of a random paged int8 pool; and its max abs error
    against the reference on the first rows."""
    import torch
    from batchgen.worker.engine.kernels import decode_attention, decode_attention_reference
    from batchgen.worker.engine.model_runner import KV_BLOCK_SIZE, kv_pool

    g = torch.Generator(device=device).manual_seed(0)
    page = KV_BLOCK_SIZE if max_len % KV_BLOCK_SIZE == 0 else 16
    per_row = max_len // page
    low = max(1, 2 * mean_ctx - max_len)
    lens = torch.randint(low, max_len + 1, (rows,), generator=g, device=device, dtype=torch.int32)
    table = torch.randperm(rows * per_row, generator=g, device=device).view(rows, per_row).to(torch.int32)
    k, v = (kv_pool((1, rows * per_row, page, heads, head_dim), torch.int8, torch.device(device),
                    heads_major=True)[0] for _ in range(2))
    for cache in (k, v):
        cache.copy_(torch.randint(-127, 128, cache.shape, generator=g, device=device, dtype=torch.int8))
    k_scale, v_scale = (torch.rand(rows * per_row, heads, page, generator=g, device=device) / 127 + 1e-4
                        for _ in range(2))
    q = torch.randn(rows, heads, head_dim, generator=g, device=device, dtype=torch.float16)
    out = torch.empty_like(q)
    scale = head_dim**-0.5

    def run():
        decode_attention(q, k, v, lens, scale, k_scale=k_scale, v_scale=v_scale, block_table=table, out=out)

    n = min(rows, 8)
    got = decode_attention(q[:n], k, v, lens[:n], scale, k_scale=k_scale, v_scale=v_scale, block_table=table[:n])
    ref = decode_attention_reference(q[:n], k, v, lens[:n], scale, k_scale=k_scale, v_scale=v_scale,
                                     block_table=table[:n])
    return run, float((got.float() - ref.float()).abs().max())


def projection_side(rows: int, shape, device: str):
    """() -> one layer's four int8 projections at `rows` rows (quantise, then the tuned GEMM with its epilogue);
    and their largest max abs error against quantise + torch._int_mm + the reference epilogue."""
    import torch
    from batchgen.worker.engine.kernels import (
        dequantize_acc_reference,
        int8_matmul_dequant,
        quantize_rows,
        tuned,
    )

    g = torch.Generator(device=device).manual_seed(1)
    table = tuned.launches(tuned.device_name(torch.device(device)), "gemm") if device == "cuda" else None
    layer = []
    for n, k in shape.projections().values():
        layer.append(dict(x=torch.randn(rows, k, generator=g, device=device, dtype=torch.float16),
                          cb=torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int8),
                          scb=torch.rand(n, generator=g, device=device) + 0.5,
                          launch=(tuned.pick(table, rows, n, k) if table else None) or {}))

    def one(p):
        xq, absmax = quantize_rows(p["x"])
        return int8_matmul_dequant(xq, absmax, p["cb"], p["scb"], None, torch.float16, **p["launch"])

    def run():
        for p in layer:
            one(p)

    err = 0.0
    for p in layer:
        xq, absmax = quantize_rows(p["x"])
        ref = dequantize_acc_reference(torch._int_mm(xq, p["cb"].t()), absmax, p["scb"], None, torch.float16)
        err = max(err, float((one(p).float() - ref.float()).abs().max()))
    return run, err, [p["launch"] for p in layer]


def layers(fn, count: int):
    def run():
        for _ in range(count):
            fn()
    return run


class Timer:
    """Replays of each side's graph on given streams, timed from the current stream; graphs captured per stream."""

    def __init__(self, sides: dict, repeats: int):
        self.sides, self.repeats, self.graphs = sides, repeats, {}

    def graph(self, side: str, stream):
        import torch

        key = (side, stream.cuda_stream)
        if key not in self.graphs:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.sides[side]()  # warm: compiles and allocates outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self.sides[side]()
            self.graphs[key] = graph
        return self.graphs[key]

    def ms(self, work: list) -> float:
        """Median ms of the (side, stream) pairs in `work` started together, each on its stream."""
        import torch

        graphs = [(self.graph(side, stream), stream) for side, stream in work]
        main = torch.cuda.current_stream()
        times = []
        for _ in range(self.repeats + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(main)
            for graph, stream in graphs:
                stream.wait_event(start)
                with torch.cuda.stream(stream):
                    graph.replay()
            for _, stream in graphs:
                main.wait_stream(stream)
            end.record(main)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return round(statistics.median(times[2:]), 4)


def measure(args, sides: dict) -> dict:
    import torch

    total_sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = Timer(sides, args.repeats)
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    alone_a, alone_b = timer.ms([("attention", a)]), timer.ms([("projections", b)])
    res: dict = {"sms": total_sms, "whole_gpu": {
        "attention_ms": alone_a, "projections_ms": alone_b, "sum_ms": round(alone_a + alone_b, 4),
        "two_streams_ms": timer.ms([("attention", a), ("projections", b)])}, "splits": []}
    for share in args.attention_shares:
        want = int(round(share * total_sms))
        row: dict = {"attention_share": share}
        try:
            split = GreenSplit(want)
            sa, sb = split.streams
            row |= {"attention_sms": split.sms[0], "projection_sms": split.sms[1],
                    "attention_ms": timer.ms([("attention", sa)]), "projections_ms": timer.ms([("projections", sb)])}
            row["together_ms"] = timer.ms([("attention", sa), ("projections", sb)])
            row["together_vs_sum"] = round(row["together_ms"] / res["whole_gpu"]["sum_ms"], 4)
        except Exception as exc:  # a driver without green contexts, a capture refused: the row says so
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        res["splits"].append(row)
        print(row, flush=True)
    return res


def main() -> None:
    from benchmarks.kernels import shape_and_device

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--rows", type=int, default=614, help="the whole batch; each side takes half")
    parser.add_argument("--mean-ctx", type=int, default=360)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8, help="layers a graph replay runs of each side")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--attention-shares", type=float, nargs="+", default=[0.5, 0.625, 0.75, 0.875],
                        help="the attention's share of the SMs in each split (rounded to what the driver grants)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under Triton's interpreter: builds and checks both sides")
    args = parser.parse_args()
    shape, device = shape_and_device(args.smoke)
    if args.smoke:
        args.rows, args.mean_ctx, args.max_len = 8, 50, 128
    import torch

    start = time.monotonic()
    half = args.rows // 2
    attention, attention_err = attention_side(half, args.mean_ctx, args.max_len, shape.heads, shape.head_dim, device)
    projections, projection_err, launches = projection_side(args.rows - half, shape, device)
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
                 "torch": torch.__version__, "rows_each_side": [half, args.rows - half], "mean_ctx": args.mean_ctx,
                 "layers": args.layers, "max_abs_err": {"attention": attention_err, "projections": projection_err},
                 "gemm_launches": launches}
    if device == "cuda":
        res |= measure(args, {"attention": layers(attention, args.layers),
                              "projections": layers(projections, args.layers)})
    res["wall_s"] = round(time.monotonic() - start, 1)
    path = args.out if args.out.suffix == ".json" else args.out / "partition.json"
    write_json(path, res)
    print({k: v for k, v in res.items() if k != "splits"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
