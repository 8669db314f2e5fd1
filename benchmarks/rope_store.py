"""A Llama-2-7B decode step's RoPE and K/V store for one layer, at the bulk run's rows: the Triton rope (q and k)
then two store_kv launches, as the engine ran them, against kernels/rope.rope_store (one launch). Each replayed
from a CUDA graph; the roped q and the cache after each are compared first (bit for bit).

    python3 -m benchmarks.rope_store --out $OUT        # on the GPU
    .venv/bin/python -m benchmarks.rope_store --smoke  # here: small shapes under Triton's interpreter
"""

import argparse
import os
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.kernels import graph_ms, time_ms


def run(rows: int, heads: int, head_dim: int, blocks: int, device: str) -> dict:
    import torch
    from batchgen.worker.engine.kernels.kv_store import store_kv
    from batchgen.worker.engine.kernels.rope import rope_qk, rope_store

    width = 16
    qkv = torch.randn(rows, 3 * heads * head_dim, device=device).half()
    q, k, v = (t.view(rows, heads, head_dim) for t in qkv.split(heads * head_dim, dim=-1))
    angles = torch.randn(rows, head_dim // 2, device=device)
    cos = torch.cat([angles.cos()] * 2, dim=-1).half()
    sin = torch.cat([angles.sin()] * 2, dim=-1).half()
    slots = torch.randperm(blocks * width, device=device)[:rows] + width  # block 0 is scratch
    k_cache = torch.zeros(blocks + 1, width, heads, head_dim, device=device).half()
    v_cache = torch.zeros_like(k_cache)
    k2, v2 = k_cache.clone(), v_cache.clone()

    def apart() -> torch.Tensor:
        q_out, k_out = rope_qk(q[:, None], k[:, None], cos[:, None, None], sin[:, None, None])
        store_kv(k2, slots, k_out[:, 0], triton_kernel=True)
        store_kv(v2, slots, v, triton_kernel=True)
        return q_out[:, 0]

    def fused() -> torch.Tensor:
        return rope_store(q, k, v, cos, sin, k_cache, v_cache, slots)

    equal = torch.equal(apart(), fused()) and torch.equal(k2, k_cache) and torch.equal(v2, v_cache)
    timer = graph_ms if device == "cuda" else time_ms
    out = {"rows": rows, "equal": bool(equal), "apart_ms": round(timer(apart, device), 4),
           "fused_ms": round(timer(fused, device), 4)}
    out["speedup"] = round(out["apart_ms"] / out["fused_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--rows", default="64,384")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, 4 heads of 64")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    heads, head_dim, blocks = (4, 64, 8) if args.smoke else (32, 128, 4096)
    rows = [3] if args.smoke else [int(r) for r in args.rows.split(",")]
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "runs": [run(m, heads, head_dim, blocks, device) for m in rows]}
    for r in res["runs"]:
        print(r)
    write_json(args.out / "rope_store.json", res)


if __name__ == "__main__":
    main()
