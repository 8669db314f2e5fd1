"""What a scale per group of activation columns costs the int8 GEMM (issue #20's ≤ 2× weight-only goal).

quality_groups.py simulates the gain: one scale per token and group of 128 columns instead of one per token.
This times the price on the GPU, per projection of a Llama-2-7B and a Llama-3-8B layer, at a decode batch (256
rows) and a prefill group (4,096): Triton's per-token quantise + the int8 GEMM at the launch the engine's table
picks, against quantize_groups + the same GEMM with each block's int32 product scaled into float32 in its main loop
(int8_matmul_dequant(group_k=128)), whose launch a short coordinate search picks (int8_tune's, block_k ≤ the group).
Prints and writes per shape the two times and their ratio, and a layer's ratio with every input grouped or only
the down projection's (where the simulation finds most of the gain).

    python3 -m benchmarks.int8_groups --out $OUT/int8_groups.json     # on the GPU
"""

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.int8_tune import AXES, SHAPES, fitted, search

GROUP = 128
ROTATE_BYTES = 512 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")) / "int8_groups.json")
    parser.add_argument("--shapes", default="llama7b,llama3_8b")
    parser.add_argument("--rows", default="256,4096")
    parser.add_argument("--search-s", type=float, default=8.0, help="each grouped search's budget")
    args = parser.parse_args()
    import torch
    from batchgen.worker.engine.kernels import int8_ops, tuned

    from benchmarks.kernels import copies_ms

    name = torch.cuda.get_device_name(0)
    table = tuned.launches(name, "gemm")
    g = torch.Generator(device="cuda").manual_seed(3)
    AXES["gemm"]["block_k"] = (64, GROUP)  # a block never straddles two groups
    res: dict = {"device": name, "torch": torch.__version__, "group": GROUP, "rows": []}

    for shape in args.shapes.split(","):
        for proj, (n, k) in SHAPES[shape].items():
            rotate = max(1, -(-ROTATE_BYTES // (n * k)))
            cbs = [torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8) for _ in range(rotate)]
            scbs = [torch.rand(n, generator=g, device="cuda") + 0.5 for _ in range(rotate)]
            for m in (int(r) for r in args.rows.split(",")):
                copies = 1 if m >= 1024 else rotate
                x = torch.randn(m, k, generator=g, device="cuda", dtype=torch.float16)
                launch = tuned.pick(table, m, n, k) or {"block_m": 128 if m >= 128 else 64, "block_n": 128,
                                                         "block_k": 128, "group_m": 8, "num_warps": 8, "num_stages": 4}

                def per_token(i: int, x=x, cbs=cbs, scbs=scbs, launch=launch):
                    xq, absmax = int8_ops.quantize_rows(x)
                    return int8_ops.int8_matmul_dequant(xq, absmax, cbs[i], scbs[i], None, torch.float16, **launch)

                def grouped(lc: dict, i: int, x=x, cbs=cbs, scbs=scbs):
                    xq, absmax = int8_ops.quantize_groups(x, GROUP)
                    return int8_ops.int8_matmul_dequant(xq, absmax, cbs[i], scbs[i], None, torch.float16,
                                                        group_k=GROUP, **lc)

                xr, ar = int8_ops.quantize_groups_reference(x, GROUP)
                w = cbs[0].float() * scbs[0][:, None] / 127
                ref = ((xr.float().view(m, -1, GROUP) * (ar[:, :, None] / 127)).view(m, k) @ w.T)
                tol = 1e-2 * float(ref.abs().max())

                def cost_of(lc: dict, copies=copies, ref=ref, tol=tol, grouped=grouped) -> float:
                    err = float((grouped(lc, 0).float() - ref).abs().max())
                    if err > tol:
                        raise ValueError(f"wrong result: max abs error {err}")
                    return copies_ms(lambda i: grouped(lc, i), copies, "cuda")

                token_ms = copies_ms(per_token, copies, "cuda")
                start = fitted("gemm", {**launch, "block_k": min(launch["block_k"], GROUP)}, m, k) or launch
                found = search("gemm", start, m, k, cost_of, time.monotonic() + args.search_s)
                row = {"shape": shape, "proj": proj, "n": n, "k": k, "m": m, "token_launch": launch,
                       "token_ms": round(token_ms, 5), "grouped_launch": found["best"],
                       "grouped_ms": round(found["best_ms"], 5), "points": found["points"],
                       "ratio": round(found["best_ms"] / token_ms, 3),
                       "grouped_tops": round(2 * m * n * k / found["best_ms"] / 1e9, 1),
                       "token_tops": round(2 * m * n * k / token_ms / 1e9, 1)}
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                write_json(args.out, res)
            del cbs, scbs
            torch.cuda.empty_cache()
    layers = {}
    for shape in args.shapes.split(","):
        for m in (int(r) for r in args.rows.split(",")):
            rows = [r for r in res["rows"] if r["shape"] == shape and r["m"] == m]
            token = sum(r["token_ms"] for r in rows)
            layers[f"{shape}@{m}"] = {
                "token_ms": round(token, 4),
                "all_grouped": round(sum(r["grouped_ms"] for r in rows) / token, 3),
                "down_grouped": round(sum(r["grouped_ms" if r["proj"] == "down" else "token_ms"] for r in rows) / token, 3)}
    res["layers"] = layers
    print(json.dumps(layers, indent=1))
    write_json(args.out, res)


if __name__ == "__main__":
    main()
