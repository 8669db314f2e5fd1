"""Tunes the int8 kernels' launches per shape on this GPU and writes the table the engine reads
(worker/engine/kernels/tuned/<device>.json; commit it to use it):

- gemv: the small-row GEMV (kernels.int8_gemv) at 1, 4 and 16 rows: block sizes, split-K, warps, pipeline stages
  (and the one-row loop's own cp.async stages), and whether one row is better through the padded tl.dot path;
  against the rule's launch (gemv_config).
- gemm: the Triton int8 GEMM with its dequantising epilogue fused (kernels.int8_matmul_dequant) at 256 to 16,384
  rows (a large decode batch to a prefill group), after Triton's quantising kernel: tile sizes, grouped order, warps,
  stages, and whether the persistent kernel with TMA-loaded tiles serves it (tma); against what the engine runs
  without a table, the compiled quantise, torch._int_mm and the compiled epilogue (the parts timed alone too).
  Int8Linear takes the Triton chain only where a launch of it won. Each search starts from the best of the
  launches near its rows in every device's table.

A coordinate search from a starting launch (as inductor's coordinate-descent tuner walks): each axis in turn moved
to its best value with the others held, until a pass improves nothing by more than 2 % or the search's share of
--budget-s is spent. Every point is checked against the reference first, then timed replayed from a CUDA graph over
enough weight copies that they come from memory, not L2 (one copy from 1,024 rows on: compute-bound). Shapes: the
four int8 projections (q/k/v and gate/up fused) of a Llama-2-7B layer (the benchmarks' model), of --shapes
(llama3_8b, bloom7b1; a shape two models share is searched once), or of the Llama-like model whose config.json
--config names (launches are looked up by exact shape: tune the model you run). The JSON holds each search's
default and best ms, GB/s of the weights and TOPS, with the share of the copy rate measured in the same run.

    python3 -m benchmarks.int8_tune --out $OUT [--kernels gemv,gemm]   # on the GPU
    .venv/bin/python -m benchmarks.int8_tune --smoke                   # here: tiny shapes under Triton's interpreter
"""

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import copy_bandwidth, write_json


def projections(hidden: int, intermediate: int, qkv: int, gated: bool = True) -> dict[str, tuple[int, int]]:
    """A decoder layer's int8 matmuls as (out_features, in_features): q/k/v fused, o, gate/up fused (or BLOOM's
    dense_h_to_4h), down."""
    return {"qkv": (qkv, hidden), "o": (hidden, hidden),
            "gate_up": ((2 if gated else 1) * intermediate, hidden), "down": (hidden, intermediate)}


# the benchmarks' Llama-2-7B, a GQA model (Llama-3-8B), and BLOOM-7b1 (the generic path's benchmark model)
SHAPES = {"llama7b": projections(4096, 11008, 3 * 4096), "llama3_8b": projections(4096, 14336, 4096 + 2 * 1024),
          "bloom7b1": projections(4096, 16384, 3 * 4096, gated=False)}
ROWS = {"gemv": (1, 4, 16), "gemm": (256, 1024, 4096, 16384)}
AXES = {
    "gemv": {"block_n": (8, 16, 32, 64, 128), "block_k": (64, 128, 256, 512, 1024), "split_k": (1, 2, 4, 8),
             "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3, 4, 6), "dot": (False, True),
             "pipeline": (1, 2, 3, 4, 6)},
    "gemm": {"block_m": (64, 128, 256), "block_n": (64, 128, 256), "block_k": (64, 128, 256), "group_m": (1, 8, 16),
             "num_warps": (4, 8), "num_stages": (2, 3, 4, 5), "tma": (False, True)},  # tma: the persistent kernel
}
ROTATE_BYTES = 512 * 2**20
WIN = 0.97  # a tuned launch goes in the table only where it beat the default by more than 3 %


def valid(kind: str, launch: dict, m: int, k: int) -> bool:
    if kind == "gemm":  # what fits Hopper's 227 KiB of shared memory, int8 operands
        return (launch["block_m"] + launch["block_n"]) * launch["block_k"] * launch["num_stages"] <= 227 * 1024
    dot = m > 1 or launch["dot"]
    return ((not dot or launch["block_n"] >= 16) and launch["block_n"] * launch["block_k"] <= 65536
            and k >= launch["split_k"] * launch["block_k"])


def fitted(kind: str, launch: dict, m: int, k: int) -> dict | None:
    """launch, or for a GEMM tile too big for shared memory the same tile with fewer stages, else a shorter
    block_k: one coordinate step can then reach a tile (256 × 256) that fits only with both changed."""
    if kind == "gemm":
        for block_k in sorted({v for v in AXES["gemm"]["block_k"] if v <= launch["block_k"]}, reverse=True):
            for stages in sorted({v for v in AXES["gemm"]["num_stages"] if v <= launch["num_stages"]}, reverse=True):
                cand = {**launch, "block_k": block_k, "num_stages": stages}
                if valid(kind, cand, m, k):
                    return cand
        return None
    return launch if valid(kind, launch, m, k) else None


def search(kind: str, starts: list[dict], m: int, k: int, cost_of: Callable[[dict], float], deadline: float) -> dict:
    """From the fastest of starts, coordinate steps until none gains 2 % or the deadline passes."""
    tried: dict[str, float | None] = {}

    def cost(launch: dict) -> float:
        key = json.dumps(launch, sort_keys=True)
        if key not in tried:
            try:
                tried[key] = cost_of(launch)
            except Exception as exc:  # a launch that does not compile or fit is just not a candidate
                print("  failed", key, type(exc).__name__, str(exc)[:160], flush=True)
                tried[key] = None
        return tried[key] if tried[key] is not None else float("inf")

    best = dict(min(starts, key=cost))  # a start that fails costs inf; each is timed once (tried)
    best_ms = cost(best)
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for axis, values in AXES[kind].items():
            if axis in ("dot", "pipeline") and m > 1:  # more rows always take the dot path
                continue
            for value in values:
                cand = fitted(kind, {**best, axis: value}, m, k)
                if cand is None or cand == best or time.monotonic() > deadline:
                    continue
                ms = cost(cand)
                if ms < best_ms * 0.98:
                    best, best_ms, improved = cand, ms, True
    # each start's own time (timed once, above): what the engine ran here before, beside what the search found
    return {"best": best, "best_ms": best_ms, "points": len(tried),
            "starts": [{"launch": s, "ms": None if cost(s) == float("inf") else round(cost(s), 5)} for s in starts]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--kernels", default="gemv,gemm")
    parser.add_argument("--shapes", default="llama7b", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--config", type=Path, help="a model's config.json: tune its shapes instead of --shapes")
    parser.add_argument("--budget-s", type=float, default=420, help="the whole search's wall-clock budget")
    parser.add_argument("--rows", help=f"the GEMM's row counts to tune (default {','.join(map(str, ROWS['gemm']))});"
                        " a search starts from the best launch any device's table holds nearest them")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from batchgen.worker.engine import int8_linear
    from batchgen.worker.engine.int8_linear import KERNELS
    from batchgen.worker.engine.kernels import int8_matmul_dequant, tuned
    from batchgen.worker.engine.kernels.int8_gemv import _num_sms, gemv_config, int8_gemv, int8_gemv_reference
    from batchgen.worker.engine.kernels.int8_ops import quantize_argmax

    from benchmarks.kernels import copies_ms

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        int8_linear.KERNELS.compile()  # the engine's epilogue, as convert_model compiles it on CUDA
    began = time.monotonic()
    deadline = began + args.budget_s
    bw = copy_bandwidth(device, 2**32 if device == "cuda" else 2**20)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)"
    res: dict = {"device": name, "torch": torch.__version__, "bandwidth": bw, "kernels": {}}
    path = args.out if args.out.suffix == ".json" else args.out / "int8_tune.json"
    table_file = path.parent / tuned.table_path(name).name
    g = torch.Generator(device=device).manual_seed(3)
    shapes = {"smoke": projections(64, 96, 192)} if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    if args.config:
        c = json.loads(args.config.read_text())
        c = c.get("text_config", c)
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
        shapes = {args.config.parent.name or "model": projections(
            c["hidden_size"], c["intermediate_size"], (c["num_attention_heads"] + 2 * kv_heads) * head_dim)}
    kinds = args.kernels.split(",")
    rows_of = {"gemv": (1, 3), "gemm": (40,)} if args.smoke else dict(ROWS)
    if args.rows:
        rows_of["gemm"] = tuple(int(r) for r in args.rows.split(","))
    searches = sum(len(rows_of[kind]) for kind in kinds) * len({nk for p in shapes.values() for nk in p.values()})
    sms = _num_sms(torch.device(device))

    seen: set[tuple[int, int]] = set()
    for shape, projs in shapes.items():
        for proj, (n, k) in projs.items():
            if (n, k) in seen:
                continue
            seen.add((n, k))
            nbytes = n * k + 4 * n
            rotate = max(1, -(-ROTATE_BYTES // nbytes)) if device == "cuda" else 1
            cbs = [torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int8)
                   for _ in range(rotate)]
            scbs = [torch.rand(n, generator=g, device=device) + 0.5 for _ in range(rotate)]
            for kind in kinds:
                for m in rows_of[kind]:
                    copies = 1 if m >= 1024 else rotate
                    x = torch.randn(m, k, generator=g, device=device, dtype=torch.float16)
                    if kind == "gemv":
                        ref = int8_gemv_reference(x, cbs[0], scbs[0]).float()
                        starts = [gemv_config(m, n, k, sms)]

                        def run(launch: dict, i: int, x=x, cbs=cbs, scbs=scbs):
                            return int8_gemv(x, cbs[i], scbs[i], **launch)

                        default_ms = None
                    else:  # the default kernel's chain with no outlier column yet (random weights have none)
                        def engine(i: int, x=x, cbs=cbs, scbs=scbs):
                            xq, absmax, _ = KERNELS.quantize_argmax(x)
                            return KERNELS.dequantize(int8_linear.int_mm(xq, cbs[i]), absmax, scbs[i], None, torch.float16)

                        def run(launch: dict, i: int, x=x, cbs=cbs, scbs=scbs):
                            xq, absmax, _ = quantize_argmax(x)
                            return int8_matmul_dequant(xq, absmax, cbs[i], scbs[i], None, torch.float16, **launch)

                        ref = engine(0).float()
                        # the search starts from the best of the launches near these rows in every device's table, this
                        # one's included (a coordinate search stays near where it starts)
                        picks = {name: tuned.pick(t, m, n, k) for name, t in tuned.every_device("gemm").items()}
                        starts = [s for s in picks.values() if s] or [{
                            "block_m": 128 if m >= 128 else 64, "block_n": 128, "block_k": 128, "group_m": 8,
                            "num_warps": 8, "num_stages": 4}]
                        default_ms = copies_ms(engine, copies, device)
                        xq0, absmax0, _ = quantize_argmax(x)
                        def int_mm_epilogue(i: int, q=xq0, a=absmax0, cbs=cbs, scbs=scbs):
                            return KERNELS.dequantize(int8_linear.int_mm(q, cbs[i]), a, scbs[i], None, torch.float16)

                        parts = {"compiled quantise": copies_ms(lambda i, x=x: KERNELS.quantize_argmax(x), 1, device),
                                 "triton quantise": copies_ms(lambda i, x=x: quantize_argmax(x), 1, device),
                                 "int_mm + compiled epilogue": copies_ms(int_mm_epilogue, copies, device)}
                    tol = 1e-2 * float(ref.abs().max())

                    def cost_of(launch: dict, run=run, ref=ref, tol=tol, copies=copies) -> float:
                        err = float((run(launch, 0).float() - ref).abs().max())
                        if err > tol:
                            raise ValueError(f"wrong result: max abs error {err}")
                        return copies_ms(lambda i: run(launch, i), copies, device)

                    # each search gets an equal share of what is left of the budget
                    r = search(kind, starts, m, k, cost_of, time.monotonic() + (deadline - time.monotonic()) / searches)
                    searches -= 1
                    r["default"] = starts[0] if kind == "gemv" else "compiled quantise + torch._int_mm + compiled epilogue"
                    if kind == "gemm":
                        r["parts_ms"] = {name: round(ms, 5) for name, ms in parts.items()}
                        r["table_picks"] = picks  # each device's table's launch at these rows (the starts)
                    r["default_ms"] = cost_of(starts[0]) if default_ms is None else default_ms
                    for key in ("default", "best"):
                        ms = r[f"{key}_ms"]
                        r[f"{key}_gb_s"] = round(nbytes / ms / 1e6, 1)
                        r[f"{key}_pct_of_copy"] = round(100 * nbytes / ms / 1e6 / bw["gb_s"], 1)
                        r[f"{key}_tops"] = round(2 * m * n * k / ms / 1e9, 1)
                        r[f"{key}_ms"] = round(ms, 5)
                    res["kernels"].setdefault(kind, {}).setdefault(shape, {}).setdefault(
                        proj, {"n": n, "k": k, "rows": {}})["rows"][m] = r
                    print(kind, shape, proj, m, json.dumps(r), flush=True)
                    write_outputs(res, path, table_file, began)
            del cbs, scbs
            if device == "cuda":
                torch.cuda.empty_cache()
    write_outputs(res, path, table_file, began, final=True)


def write_outputs(res: dict, path: Path, table_file: Path, began: float, *, final: bool = False) -> None:
    """The JSON and the table so far: written after every search, so a run cut short keeps what it found."""
    from batchgen.worker.engine.kernels import tuned

    res["wall_s"] = round(time.monotonic() - began, 1)
    write_json(path, res)
    for kind, by_shape in res["kernels"].items():
        timed = [(p["n"], p["k"], m, r) for shape in by_shape.values() for p in shape.values()
                 for m, r in p["rows"].items()]
        entries = [{"n": n, "k": k, "rows": m, "launch": r["best"]} for n, k, m, r in timed
                   if r["best_ms"] < WIN * r["default_ms"]]
        searched = {(n, k, m) for n, k, m, _ in timed}
        write_json(table_file, tuned.merge(table_file, kind, entries, searched))
        if final:
            print(f"{kind}: {len(entries)} tuned launches")
    if final:
        print(f"wall {res['wall_s']} s; wrote {path} and {table_file}")

if __name__ == "__main__":
    main()
