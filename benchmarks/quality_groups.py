"""What finer activation scales would buy the default int8 kernel (issue #20's ≤ 2× weight-only goal), simulated.

The default quantises each token's activations to int8 with one scale over its columns (LLM.int8()'s outlier
columns left exact). Against weight-only that is about 2× the KL on quality.py's planted model: the activation
noise is about the size of the weight noise. This benchmark replaces the default's product with a simulation of
per-group scales (each token's columns in groups of G, one absmax each; kept columns exact; the same int8 weights),
to see how far each G lands from weight-only before any kernel is written. G = 0: one scale a token, which must
reproduce the real default's KL (the check that the simulation is right). A variant may group only the inputs of
one width (the down projection's, `intermediate` columns): there the activations are heavy-tailed, and there a
grouped GEMM costs least (benchmarks/int8_groups.py times it).

    .venv/bin/python -m benchmarks.quality_groups --out docs/benchmarks/quality_groups_cpu.json   # CPU, fp32

The model is quality.py's GPU shape (hidden 1,024) in fp32: on it the CPU gives the GPU's ratios.
"""

import argparse
import datetime
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks import quality

# (name, G, the input width grouped: None for every input)
VARIANTS = (("token", 0, None), ("128", 128, None), ("32", 32, None), ("256", 256, None),
            ("128_down", 128, quality.GPU_SHAPE.intermediate), ("256_down", 256, quality.GPU_SHAPE.intermediate))
STRENGTHS = (0.0, 10.0, 20.0)


@contextmanager
def simulated_groups(group: int, only_width: int | None = None):
    """Within it, Int8Linear's outlier-aware forward is per-group fake quantisation times the dequantised weight
    (only_width: at the inputs of that many columns; the others keep one scale a token)."""
    from batchgen.worker.engine import int8_linear

    real = int8_linear.Int8Linear._forward_outliers

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        if self.outliers.calibrating:
            return real(self, x2)
        keep = self.outliers.keep.to(torch.bool)
        grouped = group and x2.shape[1] % group == 0 and only_width in (None, x2.shape[1])
        size = group if grouped else x2.shape[1]
        rest = torch.where(keep, x2, torch.zeros_like(x2)).float().view(x2.shape[0], -1, size)
        scale = rest.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        quantised = (torch.round(rest / scale) * scale).view_as(x2).to(x2.dtype)
        return self._forward_weight_only(torch.where(keep, quantised, x2))

    int8_linear.Int8Linear._forward_outliers = forward
    try:
        yield
    finally:
        int8_linear.Int8Linear._forward_outliers = real


def parse_args(doc: str, out: str) -> argparse.Namespace:
    """--out and --seed, and the quiet logging of a CPU simulation (this one and quality_smooth)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--seed", type=int, default=0)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    return parser.parse_args()


def report(rows: list[dict], out: Path, seed: int) -> None:
    """Each row's KL ÷ its strength's weight-only, printed as a table and written to out."""
    weight_only = {r["strength"]: r["kl"] for r in rows if r["variant"] == "weight_only"}
    for r in rows:
        r["vs_weight_only"] = round(r["kl"] / weight_only[r["strength"]], 3)
    print("| S | variant | KL | ÷ weight-only | outlier columns |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strength']:g} | {r['variant']} | {r['kl']:.4f} | {r['vs_weight_only']:.2f} | "
              f"{r.get('outlier_columns', '')} |")
    out.write_text(json.dumps({"device": "cpu", "date": datetime.date.today().isoformat(), "shape": "quality.GPU_SHAPE",
                               "compute_dtype": "float32", "seed": seed, "rows": rows}, indent=1))


def main() -> None:
    args = parse_args(__doc__, "/tmp/quality_groups.json")
    device, rows = torch.device("cpu"), []
    for strength in STRENGTHS:
        rows += quality.run_strength(quality.GPU_SHAPE, strength, device, torch.float32, ("default", "weight_only"),
                                     args.seed)
        for name, group, width in VARIANTS:
            with simulated_groups(group, width):
                (row,) = quality.run_strength(quality.GPU_SHAPE, strength, device, torch.float32, ("default",),
                                              args.seed)
            rows.append({**row, "variant": f"simulated_groups_{name}"})
    report(rows, args.out, args.seed)


if __name__ == "__main__":
    main()
