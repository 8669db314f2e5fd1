"""A Llama-2-7B MLP's tail alone (gate_up output [rows, 2 × 11008] → residual + down(·)): the pieces as the engine ran
them (the compiled act · up, the rotation's batched matmul, the guarded quantiser, the tuned GEMM, the residual add)
against worker/engine/gated_linear's (int8_ops.gated_quantize, the GEMM with the residual in its epilogue).

Each variant is replayed from a CUDA graph; outputs are checked against the pieces first (max abs difference in
the JSON). Rows: a decode step's (384) and a prefill step's (8,192). --table DIR: the fused kernel's fastest
launch (columns a step, warps) at each of --tune-rows, merged into DIR/<device>.json's "gated" section, which the
engine reads (kernels/tuned.py).

    python3 -m benchmarks.gated --out $OUT --table worker/engine/kernels/tuned   # on the GPU
    .venv/bin/python -m benchmarks.gated --smoke  # here: a narrow MLP on the CPU under Triton's interpreter
"""

import argparse
import os
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.kernels import graph_ms, time_ms

HIDDEN, INNER = 4096, 11008
LAUNCHES = [(512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (16384, 16)]


def tune(rows: int, inner: int, device: str) -> dict:
    """The fused pre-GEMM kernel's ms at each of LAUNCHES, rotated, at this many rows; the fastest under "best"."""
    import torch
    from batchgen.worker.engine import rotation
    from batchgen.worker.engine.kernels import int8_ops

    gate_up = torch.randn(rows, 2 * inner, device=device).half()
    timed = {}
    for tile, warps in LAUNCHES:
        timed[f"{tile}x{warps}"] = round(graph_ms(lambda t=tile, w=warps: int8_ops.gated_quantize(
            gate_up, inner, "SiLU", rotation.BLOCK, tile=t, num_warps=w), device), 4)
    tile, warps = map(int, min(timed, key=timed.get).split("x"))
    return {"rows": rows, "ms": timed, "best": {"tile": tile, "num_warps": warps}}


def run(rows: int, hidden: int, inner: int, device: str) -> dict:
    import torch
    from batchgen.worker.engine import fused, rotation
    from batchgen.worker.engine.gated_linear import gated_launch
    from batchgen.worker.engine.int8_linear import tuned_gemm
    from batchgen.worker.engine.kernels import int8_ops
    from batchgen.worker.engine.kernels.int8_gemv import GuardBuffers

    g = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(rows, 2 * inner, generator=g, device=device).half()
    residual = torch.randn(rows, hidden, generator=g, device=device).half()
    cb = torch.randint(-127, 128, (hidden, inner), generator=g, device=device, dtype=torch.int8)
    scb = torch.rand(hidden, generator=g, device=device) * 2
    keep = torch.ones(inner, dtype=torch.float16, device=device)
    guard = GuardBuffers(keep, torch.zeros(inner, device=device), torch.zeros(inner, device=device), 6.0)
    launch = tuned_gemm(torch.empty(rows, inner, dtype=torch.int8, device=device), cb) or {}
    if device == "cuda":
        fused.FUSED.compile()

    def pieces() -> torch.Tensor:
        x = rotation.rotate(fused.FUSED.gated(gate_up, inner, "SiLU"), rotation.BLOCK)
        xq, absmax = int8_ops.quantize_guarded(x, guard, keep=False)
        return residual + int8_ops.int8_matmul_dequant(xq, absmax, cb, scb, None, torch.float16, **launch)

    def fused_tail() -> torch.Tensor:
        gated = int8_ops.gated_quantize(gate_up, inner, "SiLU", rotation.BLOCK, guard,
                                        **gated_launch(rows, inner, device))
        return int8_ops.int8_matmul_dequant(gated.xq, gated.absmax, cb, scb, None, torch.float16, residual=residual,
                                            **launch)

    def pre_gemm() -> None:  # the activation, rotation and quantiser only
        x = rotation.rotate(fused.FUSED.gated(gate_up, inner, "SiLU"), rotation.BLOCK)
        int8_ops.quantize_guarded(x, guard, keep=False)

    def pre_gemm_fused(rotate: int = rotation.BLOCK) -> None:
        int8_ops.gated_quantize(gate_up, inner, "SiLU", rotate, guard, **gated_launch(rows, inner, device))

    want, got = pieces(), fused_tail()
    x = rotation.rotate(fused.FUSED.gated(gate_up, inner, "SiLU"), rotation.BLOCK)
    gx = int8_ops.gated_quantize(gate_up, inner, "SiLU", rotation.BLOCK, store_x=True).x
    timer = graph_ms if device == "cuda" else time_ms
    out = {"rows": rows, "launch": launch or "default",
           "max_abs_diff_x": (gx.float() - x.float()).abs().max().item(),
           "max_abs_diff_out": (got.float() - want.float()).abs().max().item(),
           "out_abs_max": want.float().abs().max().item()}
    for name, fn in (("pieces_ms", pieces), ("fused_ms", fused_tail), ("pre_gemm_pieces_ms", pre_gemm),
                     ("pre_gemm_fused_ms", pre_gemm_fused),
                     ("pre_gemm_fused_unrotated_ms", lambda: pre_gemm_fused(0))):
        out[name] = round(timer(fn, device), 4)
    # bytes the fused pre-GEMM kernel must move: gate_up read, the activations written (and read back), int8 written
    out["pre_gemm_fused_gb_s"] = round(rows * inner * (4 + 2 + 1) / out["pre_gemm_fused_ms"] / 1e6, 1)
    out["gated_launch"] = gated_launch(rows, inner, device)
    if device == "cuda":  # every launch computes the same int8 values and absmax (tiles split rows, not sums)
        ref = int8_ops.gated_quantize(gate_up, inner, "SiLU", rotation.BLOCK)
        out["launch_invariant"] = all(
            torch.equal(got.xq, ref.xq) and torch.equal(got.absmax, ref.absmax)
            for got in (int8_ops.gated_quantize(gate_up, inner, "SiLU", rotation.BLOCK, tile=t, num_warps=w)
                        for t, w in LAUNCHES))
    if device == "cuda" and int8_ops.TensorDescriptor is not None:  # the persistent TMA kernel's residual epilogue
        xq = torch.randint(-127, 128, (rows, inner), generator=g, device=device, dtype=torch.int8)
        absmax = torch.rand(rows, 1, generator=g, device=device) * 4
        tma = dict(block_m=128, block_n=256, block_k=128, group_m=8, num_warps=8, num_stages=4, tma=True)
        plain = int8_ops.int8_matmul_dequant(xq, absmax, cb, scb, None, torch.float16, **tma)
        fused_out = int8_ops.int8_matmul_dequant(xq, absmax, cb, scb, None, torch.float16, residual=residual, **tma)
        out["tma_residual_equal"] = bool(torch.equal(fused_out, residual + plain))
    out["speedup"] = round(out["pieces_ms"] / out["fused_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--rows", default="384,8192")
    parser.add_argument("--tune-rows", default="64,256,1024,4096,8192")
    parser.add_argument("--table", type=Path, help="merge the fastest launches into DIR/<device>.json (GPU only)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, a 512-wide MLP")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    hidden, inner = (64, 512) if args.smoke else (HIDDEN, INNER)
    rows = [8] if args.smoke else [int(r) for r in args.rows.split(",")]
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "hidden": hidden, "inner": inner}
    if args.table and device == "cuda":
        from batchgen.worker.engine.kernels import tuned

        res["tuned"] = [tune(int(m), inner, device) for m in args.tune_rows.split(",")]
        path = args.table / tuned.table_path(res["device"]).name
        entries = [{"n": inner, "k": inner, "rows": t["rows"], "launch": t["best"]} for t in res["tuned"]]
        write_json(path, tuned.merge(path, "gated", entries))
        tuned.forget()
    res["runs"] = [run(m, hidden, inner, device) for m in rows]
    for r in res["runs"]:
        print(r)
    write_json(args.out / "gated.json", res)


if __name__ == "__main__":
    main()
