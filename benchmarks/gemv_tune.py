"""Tunes the small-row GEMV's launch (kernels.int8_gemv) per shape: which block sizes, split-K, warps and pipeline
stages stream the int8 weights closest to the bus rate, and whether one row is better through the padded tl.dot
path. A coordinate search from gemv_config's launch (as inductor's coordinate-descent tuner walks), each point
timed replayed from a CUDA graph over enough weight copies that they come from memory, not L2.

Shapes: the four int8 projections of a Llama-2-7B and a Llama-2-13B layer (q/k/v and gate/up fused), at 1, 4
and 16 rows. Writes the default's and the best launch's GB/s (and share of the measured copy rate) per shape,
and the table int8_gemv reads (kernels/gemv_tables/<device>.json): the best launch of each shape and row count
that beat the rule's by more than 3 %. Copy it there to use it.

    python3 -m benchmarks.gemv_tune --out $OUT           # on the GPU
    .venv/bin/python -m benchmarks.gemv_tune --smoke     # here: tiny shapes under Triton's interpreter
"""

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import copy_bandwidth, write_json

SHAPES = {"llama7b": (4096, 11008, 4096 * 3), "llama13b": (5120, 13824, 5120 * 3)}  # hidden, intermediate, qkv
AXES = {"block_n": (8, 16, 32, 64, 128), "block_k": (64, 128, 256, 512, 1024), "split_k": (1, 2, 4, 8),
        "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3, 4, 6), "dot": (False, True)}
ROTATE_BYTES = 512 * 2**20


def projections(hidden: int, intermediate: int, qkv: int) -> dict[str, tuple[int, int]]:
    return {"qkv": (qkv, hidden), "o": (hidden, hidden), "gate_up": (2 * intermediate, hidden),
            "down": (hidden, intermediate)}


def valid(cfg: dict, m: int, k: int) -> bool:
    dot = m > 1 or cfg["dot"]
    return ((not dot or cfg["block_n"] >= 16) and cfg["block_n"] * cfg["block_k"] <= 65536
            and k >= cfg["split_k"] * cfg["block_k"] and (dot or m == 1))


def tune(m: int, n: int, k: int, timer, deadline: float) -> dict:
    """Coordinate descent: each axis in turn moved to its best value with the others held, until a pass over all
    axes improves nothing by more than 2 % (or the deadline)."""
    import torch
    from batchgen.worker.engine.kernels.int8_gemv import _num_sms, gemv_config

    start = gemv_config(m, n, k, _num_sms(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    tried: dict[str, float | None] = {}

    def cost(cfg: dict) -> float:
        key = json.dumps(cfg, sort_keys=True)
        if key not in tried:
            try:
                tried[key] = timer(cfg)
            except Exception as exc:  # a launch that does not compile (too many registers...) is just not a candidate
                print("  failed", key, type(exc).__name__, str(exc)[:120], flush=True)
                tried[key] = None
        return tried[key] if tried[key] is not None else float("inf")

    best, best_ms = dict(start), cost(start)
    default_ms = best_ms
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for axis, values in AXES.items():
            if axis == "dot" and m > 1:  # more rows always take the dot path
                continue
            for value in values:
                cand = {**best, axis: value}
                if cand == best or not valid(cand, m, k) or time.monotonic() > deadline:
                    continue
                ms = cost(cand)
                if ms < best_ms * 0.98:
                    best, best_ms, improved = cand, ms, True
    return {"default": start, "default_ms": default_ms, "best": best, "best_ms": best_ms, "points": len(tried)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--budget-s", type=float, default=400, help="stop searching after this long (wall)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from batchgen.worker.engine.kernels.int8_gemv import int8_gemv, int8_gemv_reference, table_path

    from benchmarks.kernels import graph_ms, time_ms

    device = "cpu" if args.smoke else "cuda"
    began = time.monotonic()
    deadline = began + args.budget_s
    bw = copy_bandwidth(device, 2**32 if device == "cuda" else 2**20)
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
                 "torch": torch.__version__, "bandwidth": bw, "shapes": {}}
    g = torch.Generator(device=device).manual_seed(3)
    shapes = {"smoke": (64, 96, 192)} if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    rows = (1, 3) if args.smoke else tuple(int(r) for r in args.rows.split(","))
    searches = len(shapes) * 4 * len(rows)
    for shape, dims in shapes.items():
        for proj, (n, k) in projections(*dims).items():
            nbytes = n * k + 4 * n
            copies = max(1, -(-ROTATE_BYTES // nbytes)) if device == "cuda" else 1
            cbs = [torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int8)
                   for _ in range(copies)]
            scbs = [torch.rand(n, generator=g, device=device) + 0.5 for _ in range(copies)]
            for m in rows:
                x = torch.randn(m, k, generator=g, device=device, dtype=torch.float16)
                ref = int8_gemv_reference(x, cbs[0], scbs[0]).float()
                tol = 1e-2 * float(ref.abs().max())

                def timer(cfg: dict, x=x, ref=ref, tol=tol, cbs=cbs, scbs=scbs, copies=copies) -> float:
                    err = float((int8_gemv(x, cbs[0], scbs[0], **cfg).float() - ref).abs().max())
                    if err > tol:
                        raise ValueError(f"wrong result: max abs error {err}")

                    def all_copies():
                        for i in range(copies):
                            int8_gemv(x, cbs[i], scbs[i], **cfg)
                    return (graph_ms(all_copies, device) if device == "cuda" else time_ms(all_copies, device)) / copies

                # each search gets an equal share of what is left of the budget
                r = tune(m, n, k, timer, time.monotonic() + (deadline - time.monotonic()) / searches)
                searches -= 1
                for key in ("default", "best"):
                    gb_s = nbytes / r[f"{key}_ms"] / 1e6
                    r[f"{key}_gb_s"] = round(gb_s, 1)
                    r[f"{key}_pct_of_copy"] = round(100 * gb_s / bw["gb_s"], 1)
                    r[f"{key}_ms"] = round(r[f"{key}_ms"], 5)
                res["shapes"].setdefault(shape, {}).setdefault(proj, {"n": n, "k": k, "rows": {}})["rows"][m] = r
                print(shape, proj, m, json.dumps(r), flush=True)
            del cbs, scbs
            if device == "cuda":
                torch.cuda.empty_cache()
    res["wall_s"] = round(time.monotonic() - began, 1)
    path = args.out if args.out.suffix == ".json" else args.out / "gemv_tune.json"
    write_json(path, res)
    launches = [{"n": p["n"], "k": p["k"], "rows": m, "launch": r["best"]}
                for shape in res["shapes"].values() for p in shape.values() for m, r in p["rows"].items()
                if r["best_ms"] < 0.97 * r["default_ms"]]
    table = path.parent / table_path(res["device"]).name
    write_json(table, {"device": res["device"], "tuned_by": "benchmarks.gemv_tune", "launches": launches})
    print(f"wall {res['wall_s']} s; wrote {path} and {table} ({len(launches)} launches)")


if __name__ == "__main__":
    main()
