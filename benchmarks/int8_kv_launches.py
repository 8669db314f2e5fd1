"""The int8 K/V decode kernel's launches compiled for sm_90 without a GPU (Triton's own ptxas and nvdisasm): each
launch's registers, the programs an SM holds at once, shared memory and warp instructions a KB of its loop, beside
the time the twelfth session measured where it has one (docs/benchmarks/bulk_guard_warm_up.json, paged cache,
614 rows, mean context 360, Triton 3.6). Which of those tracks the measured time says what a faster launch needs.

    .venv/bin/python -m benchmarks.int8_kv_launches --out docs/benchmarks/int8_kv_launches_cpu.json
    PYTHONPATH=<triton 3.6 folder> .venv/bin/python -m benchmarks.int8_kv_launches ...   # the GPU image's compiler
"""

import argparse
import json
import os
from pathlib import Path

MEASURED = Path(__file__).parents[1] / "docs/benchmarks/bulk_guard_warm_up.json"
# (name, cvt_early, bias, qk_int8): the kernel's int8 variants (--int8-kv-scales v, v-early, v-bias, v-q8,
# v-q8-early, v-q16-early), each at the launches benchmarks.kernels times
VARIANTS = [("paged int8", False, False, 0), ("paged int8 early", True, False, 0),
            ("paged int8 v-bias", True, True, 0), ("paged int8 q8", False, False, 1),
            ("paged int8 q8 early", True, False, 1), ("paged int8 q16 early", True, False, 2)]
LAUNCHES = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (64, 2, 3), (128, 2, 2), (32, 4, 3), (128, 8, 3)]


def measured_ms() -> dict[str, float]:
    """The twelfth session's paged int8 timings by benchmarks.kernels' variant name."""
    if not MEASURED.is_file():
        return {}
    variants = json.loads(MEASURED.read_text()).get("kernels_614_rows", {})
    return {name: v["ms"] for name, v in variants.items() if isinstance(v, dict) and "ms" in v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")) / "int8_kv_launches.json")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted
    import triton
    from batchgen.worker.engine.kernels import attention
    from batchgen.worker.engine.kernels.compile_check import build_split, instructions_per_kb, programs_per_sm

    times, rows = measured_ms(), []
    for name, early, bias, q8 in VARIANTS:
        for block_n, warps, stages in LAUNCHES:
            kernel = build_split(90, "*i8", dict(
                GROUP=1, BLOCK_H=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=block_n, NUM_SPLITS=1, HAS_ROWS=False,
                HAS_BLOCKS=True, DOT_F32=False, TOKEN_SCALES=True, SCALES_IN_P=False, F16_INT8=True, ASM_CVT=True,
                PAGE=attention.BLOCK_N, CVT_EARLY=early, PRELOAD=attention.preload_pages(768, 1, block_n, attention.BLOCK_N),
                BIAS=bias, QK_INT8=q8), num_warps=warps, num_stages=stages)
            ptx, shared = kernel.asm["ptx"], kernel.metadata.shared
            variant = f"{name}, block_n {block_n}, warps {warps}, stages {stages}"
            rows.append({"variant": variant, "shared_bytes": shared, **programs_per_sm(ptx, 90, warps, shared),
                         "warp_instructions_per_kb": instructions_per_kb(kernel.asm["cubin"], 90, warps,
                                                                         block_n * 128 * 2),
                         "measured_ms": times.get(variant)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"triton": triton.__version__, "arch": 90, "head_dim": 128, "group": 1,
                                    "launches": rows}, indent=1) + "\n")
    print("| variant | registers | programs an SM | warps an SM | shared KB | warp instructions a KB | measured ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        warps = int(r["variant"].split("warps ")[1].split(",")[0])
        print(f"| {r['variant']} | {r.get('registers')} | {r.get('programs_per_sm')} | "
              f"{(r.get('programs_per_sm') or 0) * warps} | {r['shared_bytes'] / 1024:.1f} | "
              f"{r['warp_instructions_per_kb']} | {r['measured_ms'] or ''} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
