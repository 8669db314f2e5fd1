"""V^T (--int8-kv-scales v-q16-keys-vt) against the keys kernel through the engine's own prefill stores and decode
steps, at a real model's head shapes: the same random Llama layers over two int8 pools (one heads-major, one with V
transposed in each block), a prefill's K/V stored into both (store_kv: runs, then the grouped seal), then decode
steps through llama.decode_step (on CUDA RoPE and the store in one launch, rope_store, then the seal), rows filling
and starting blocks. Each step's logits are compared (max abs difference, argmax agreement) and, at the end, the
values both pools hold (attention.v_values). A whole bulk run on V^T agreed with the defaults on no request and
set off int8 outlier columns the defaults never saw (docs/benchmarks.md, "An H200's bus per SM under MPS"); the
CPU tests pass at toy shapes. This is the check between the two.

    python3 -m benchmarks.vt_check --out $OUT                       # on the GPU: Llama-7B's heads, 4 layers
    .venv/bin/python -m benchmarks.vt_check --smoke --out /tmp/vt   # here: interpreted, 2 heads of 32
"""

import argparse
import os
from pathlib import Path

from benchmarks.common import write_json


def check(device: str, heads: int, head_dim: int, layers: int, steps: int, seed: int = 0) -> dict:
    import torch
    from batchgen.worker.engine.kernels.attention import v_transposed, v_values
    from batchgen.worker.engine.llama import LlamaParts, cache_store, decode_step
    from batchgen.worker.engine.model_runner import KV_BLOCK_SIZE, kv_pool
    from transformers import LlamaConfig, LlamaForCausalLM

    page = KV_BLOCK_SIZE
    torch.manual_seed(seed)
    lens = torch.tensor([page - 2, page - 1, 10, 2 * page - 3, 3 * page + 5, 1, page, 5 * page - 1])
    per_row = -(-(int(lens.max()) + steps) // page)
    config = LlamaConfig(vocab_size=256, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=per_row * page)
    parts = LlamaParts.from_hf(LlamaForCausalLM(config).eval().half().to(device))
    rows = len(lens)
    g = torch.Generator().manual_seed(seed + 1)
    table = (torch.randperm(rows * per_row, generator=g) + 1).view(rows, per_row).to(torch.int32)  # 0: scratch
    shape = (layers, rows * per_row + 1, page, heads, head_dim)
    token_rows = torch.arange(rows).repeat_interleave(lens)
    positions = torch.cat([torch.arange(n) for n in lens.tolist()])
    prompt_kv = [torch.randn(layers, len(token_rows), heads, head_dim, generator=g).half() for _ in range(2)]
    pools = []
    for transposed in (False, True):
        k, v = (kv_pool(shape, torch.int8, torch.device(device), True, t) for t in (False, transposed))
        scales = [torch.zeros(layers, rows * per_row + 1, heads, page, device=device) for _ in range(2)]
        store = cache_store(k, v, token_rows.to(device), positions.to(device), *scales, table.to(device))
        for layer in range(layers):
            store(layer, slice(None), prompt_kv[0][layer].to(device), prompt_kv[1][layer].to(device))
        pools.append((k, v, *scales))
    assert v_transposed(pools[1][1][0]) and not v_transposed(pools[0][1][0])
    table, lens = table.to(device), lens.to(device)
    per_step = []
    with torch.inference_mode():
        for step in range(steps):
            ids = torch.randint(0, 256, (rows,), generator=g).to(device)
            plain, vt = (decode_step(parts, ids, lens + step, k, v, per_row * page, "triton", ks, vs, table).float()
                         for k, v, ks, vs in pools)
            per_step.append({"max_abs_diff": round((vt - plain).abs().max().item(), 5),
                             "logits_abs_max": round(plain.abs().max().item(), 3),
                             "argmax_agree": (vt.argmax(-1) == plain.argmax(-1)).float().mean().item()})
    held = (lens + steps).to(torch.int32)
    # layer 0's K/V come from the same embeddings in both: its values must be equal; later layers' an int8 step apart
    v0 = v_values(pools[1][1][0], held, table)
    worst = max(per_step, key=lambda s: s["max_abs_diff"])
    return {"device": device, "heads": heads, "head_dim": head_dim, "layers": layers, "rows": rows,
            "lens": lens.tolist(), "steps": steps, "layer0_v_equal": bool(torch.equal(v0, pools[0][1][0])),
            "worst_step": worst, "mean_argmax_agree": round(sum(s["argmax_agree"] for s in per_step) / steps, 4),
            "per_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, 2 heads of 32")
    parser.add_argument("--heads", type=int, default=32, help="with --head-dim: the model's attention heads")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from batchgen.worker.engine import llama

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        llama.ROPE_STORE = True  # the decode steps rope and store in one launch, as on CUDA
    heads, head_dim, layers, steps = (2, 32, 2, 8) if args.smoke else (args.heads, args.head_dim, args.layers,
                                                                       args.steps)
    res = check(device, heads, head_dim, layers, steps)
    print({k: v for k, v in res.items() if k != "per_step"}, flush=True)
    write_json(args.out / "vt_check.json", res)


if __name__ == "__main__":
    main()
