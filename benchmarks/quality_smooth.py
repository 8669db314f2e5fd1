"""Whether SmoothQuant-style smoothing (Xiao et al., 2022) would bring the default int8 kernel within issue #20's
≤ 2× weight-only KL, simulated on quality.py's planted model.

Smoothing divides an input's activation columns by s and multiplies the weight columns that read them by s (exact
in floating point): s = max|x|^α / max|W|^(1-α) per column, from the calibration ids. Folded into what feeds the
input (the norm before q/k/v and gate/up; the up projection's rows before down), it costs nothing at run time.
Here it is applied to the fp32 model before it is saved, so bnb quantises the smoothed weights from fp32 (the
best case: the engine would have to re-read the checkpoint to do as well). The default kernel then runs on it
with its calibration as usual; KL is against the unsmoothed fp32 model.

    .venv/bin/python -m benchmarks.quality_smooth --out docs/benchmarks/quality_smooth_cpu.json   # CPU, fp32
"""

import copy
import json
import tempfile
from pathlib import Path

import torch

from benchmarks import quality, quality_groups

# (α, the inputs smoothed: qkv = q/k/v's, gu = gate/up's, down = the down projection's)
VARIANTS = ((0.5, ("qkv", "gu", "down")), (0.5, ("down",)), (0.3, ("qkv", "gu", "down")))
STRENGTHS = (0.0, 10.0)  # where the default misses ≤ 2× weight-only


@torch.no_grad()
def input_absmax(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each decoder linear's largest |x| per input column over ids."""
    seen, hooks = {}, []

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0)
            seen[name] = x if name not in seen else torch.maximum(seen[name], x)
        return record

    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def smooth(model, ids: torch.Tensor, alpha: float, inputs: tuple[str, ...]) -> None:
    """Smooths the chosen inputs of every layer in place (the model computes the same function)."""
    amax = input_absmax(model, ids)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups = {"qkv": (layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj], f"{i}.self_attn.q_proj"),
                  "gu": (layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj], f"{i}.mlp.gate_proj"),
                  "down": (mlp.up_proj.weight, [mlp.down_proj], f"{i}.mlp.down_proj")}
        for name in inputs:
            before, linears, key = groups[name]
            wmax = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
            s = (amax[key].clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
            before.div_(s if before.dim() == 1 else s[:, None])  # a norm's weight, or the up projection's rows
            for lin in linears:
                lin.weight.mul_(s[None, :])


def run_strength(shape: quality.Shape, strength: float, seed: int) -> list[dict]:
    device = torch.device("cpu")
    ref = quality.build_planted(shape, strength, seed=seed, device=device)
    ids = quality.eval_ids(shape, seed=2)
    prompts = quality.eval_ids(shape, seed=3, num_seqs=shape.num_prompts, seq_len=shape.prompt_len)
    calibration = quality.eval_ids(shape, seed=4, num_seqs=4, seq_len=shape.seq_len)
    ref_logits = quality.logits_of(ref, ids, device)
    ref_greedy = quality.greedy(ref, prompts, shape.new_tokens, device)
    rows = []

    def measure(model_dir: str, variant: str, name: str) -> None:
        model = quality.load_variant(Path(model_dir), variant, device, torch.float32, calibration)
        row = {"strength": strength, "variant": name, "seed": seed,
               **quality.compare(ref_logits, quality.logits_of(model, ids, device), ref_greedy,
                                 quality.greedy(model, prompts, shape.new_tokens, device))}
        if variant == "default":
            row["outlier_columns"] = quality._num_outlier_columns(model)
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        measure(tmp, "default", "default")
        measure(tmp, "weight_only", "weight_only")
        for alpha, inputs in VARIANTS:
            smoothed = copy.deepcopy(ref)
            smooth(smoothed, calibration, alpha, inputs)
            with tempfile.TemporaryDirectory() as tmp2:
                smoothed.save_pretrained(tmp2)
                measure(tmp2, "default", f"smoothed_{alpha:g}_{'_'.join(inputs)}")
    return rows


def main() -> None:
    args = quality_groups.parse_args(__doc__, "/tmp/quality_smooth.json")
    quality_groups.report([r for s in STRENGTHS for r in run_strength(quality.GPU_SHAPE, s, args.seed)], args.out,
                          args.seed)


if __name__ == "__main__":
    main()
