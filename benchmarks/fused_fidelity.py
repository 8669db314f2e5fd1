"""How far the fused elementwise kernels (worker/engine/fused.py) move the fast path's logits, against fp32.

A planted-outlier Llama (benchmarks/quality.py, S = 10) is teacher-forced through the engine's ModelRunner (first half
prefilled, then a decode step per token) in the compute dtype, three ways: unfused (the HF modules), fused eager (the
same arithmetic in fused.py's functions) and fused compiled (torch.compile: one kernel each; what CUDA runs). Each
variant runs in its own process (the compiled functions are process-wide). Reported: the largest logit difference
from unfused, mean KL(fp32 ‖ variant) and top-1 agreement with the fp32 model.

    .venv/bin/python -m benchmarks.fused_fidelity --device cpu --dtype bfloat16 --out docs/benchmarks/fused_fidelity_cpu.json
    python3 -m benchmarks.fused_fidelity --device cuda --dtype float16 --out $OUT/fused_fidelity.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VARIANTS = ("fp32", "unfused", "fused_eager", "fused_compiled")
STRENGTH = 10


def run_variant(variant: str, device: torch.device, dtype: torch.dtype, out: Path, large: bool) -> None:
    from batchgen.worker.engine import fused
    from batchgen.worker.engine.llama import LlamaParts
    from batchgen.worker.engine.model_runner import ModelRunner

    from benchmarks.quality import CPU_SHAPE, GPU_SHAPE, build_planted, eval_ids, teacher_forced

    shape = GPU_SHAPE if large else CPU_SHAPE
    model = build_planted(shape, STRENGTH, device=device).to(torch.float32 if variant == "fp32" else dtype)
    if variant.startswith("fused"):
        fused.fuse_layers(model, compile_kernels=variant == "fused_compiled")
    runner = ModelRunner(LlamaParts.from_hf(model), device=device, dtype=model.dtype, max_model_len=2 * shape.seq_len)
    torch.save(teacher_forced(runner, eval_ids(shape, seed=2)).float().cpu(), out)


def compare(logits: dict[str, torch.Tensor]) -> list[dict]:
    ref, base = logits["fp32"], logits["unfused"]
    rows = []
    for name in VARIANTS[1:]:
        x = logits[name]
        kl = torch.nn.functional.kl_div(x.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean().item()
        rows.append({"variant": name, "max_abs_diff_vs_unfused": round((x - base).abs().max().item(), 5),
                     "kl_vs_fp32": round(kl, 6), "top1_vs_fp32": round((x.argmax(-1) == ref.argmax(-1)).double().mean().item(), 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/fused_fidelity.json"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.variant:
        run_variant(args.variant, device, dtype, args.logits, device.type == "cuda")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            subprocess.run([sys.executable, "-m", "benchmarks.fused_fidelity", "--device", args.device, "--dtype",
                            args.dtype, "--variant", variant, "--logits", f"{tmp}/{variant}.pt"], check=True)
        rows = compare({v: torch.load(f"{tmp}/{v}.pt") for v in VARIANTS})
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": args.dtype, "strength": STRENGTH, "rows": rows}
    for r in rows:
        print(json.dumps(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
