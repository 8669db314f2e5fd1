"""Which engine step first leaves an int8 KV pool's blocks not as the store wrote them: profile_steps' scenarios
(one row decoding, aborted; many rows admitted and decoding; their abort) stepped one engine step at a time, and
after each step every live row's whole blocks checked. An int8 cache quantises each token's head on its own absmax,
so each (token, head) of a sound block holds a 127 or -127; a block sealed twice (V^T) or written over by another
row's token does not. V^T (--int8-kv-scales v-q16-keys-vt) opened hundreds of int8 outlier columns in
profile_steps' decode at 614 rows where the keys kernel opened none (docs/benchmarks.md, "A step at the bulk state
under MPS"); this names the step and the pool where it starts.

    python3 -m benchmarks.kv_faults --out $OUT/kv_faults --engine-options int8_kv_scales=v-q16-keys-vt \
        --rows 614 --prompt 352 --max-model-len 416 --steps 40                    # on the device
"""

import argparse
import json
from pathlib import Path

from benchmarks.common import write_json

CHUNK = 256  # blocks read at once (Llama-7B's: 64 MiB of int8, twice over; the engine leaves ~500 MiB free)


def block_faults(cache, blocks) -> int:
    """(token, head) pairs of an int8 pool's layer cache [blocks, tokens, kv_heads, head_dim] (any strides: V^T's
    view reads its whole blocks as values) at these block ids whose largest |value| is not 127."""
    faults = 0
    for chunk in blocks.split(CHUNK):
        peak = cache[chunk].abs().amax(dim=-1)  # [blocks, tokens, kv_heads]
        faults = faults + (peak != 127).sum()  # summed on the device: one sync a layer, not one a chunk
    return int(faults)


def pool_faults(engine) -> dict:
    """K and V faults (block_faults) over every layer, in the whole blocks of the engine's running rows (a block
    counts once the row holds a token past it: the steps queued before the check have written it)."""
    import torch

    runner, blocks = engine.runner, engine.blocks
    page = runner.k_cache.shape[2]
    ids = [b for row, seq in engine.scheduler.running.items()
           for b in blocks.rows.get(row, [])[:max(0, seq.num_tokens - 2) // page]]
    if runner.k_cache.is_cuda:
        torch.cuda.synchronize()
    at = torch.tensor(ids, dtype=torch.long, device=runner.k_cache.device)
    return {"blocks": len(ids),
            "k": sum(block_faults(runner.k_cache[layer], at) for layer in range(runner.k_cache.shape[0])),
            "v": sum(block_faults(runner.v_cache[layer], at) for layer in range(runner.v_cache.shape[0]))}


def scenario(engine, vocab: int, *, rows: int, prompt: int, steps: int, max_model_len: int) -> dict:
    """profile_steps.scenarios' decode phases without the profiler, each step checked: each phase's first faulty
    step and its worst one."""
    from benchmarks.profile_steps import _add, _prompts, _requests

    out = {}

    def phase(name: str, num_steps: int) -> None:
        first, worst, most, ran = None, {"k": 0, "v": 0}, 0, 0
        for step in range(num_steps):
            if not engine.num_unfinished:
                break
            engine.step()
            ran += 1
            now = pool_faults(engine)
            most = max(most, now["blocks"])
            if now["k"] + now["v"] > worst["k"] + worst["v"]:
                worst = now | {"step": step}
            if first is None and (now["k"] or now["v"]):
                first = step
        out[name] = {"steps": ran, "first_faulty_step": first, "worst": worst, "most_blocks_checked": most,
                     "rows": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}
        print(name, json.dumps(out[name]), flush=True)

    single = min(128, max_model_len // 2)
    _add(engine, _requests(_prompts(1, single, vocab, 0), max_model_len - single, "s"))
    phase("single", 4 + steps)
    engine.abort(["s0"])
    _add(engine, _requests(_prompts(rows, prompt, vocab, 1), max_model_len - prompt, "d"))
    phase("decode", 10 * (max_model_len - prompt) + steps)  # admission, every row to its end, the refills
    engine.abort([f"d{i}" for i in range(rows)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=614)
    parser.add_argument("--prompt", type=int, default=352)
    parser.add_argument("--max-model-len", type=int, default=416)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--engine-options", default="", help="EngineConfig fields as key=value pairs")
    args = parser.parse_args()
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from benchmarks import bulk
    from benchmarks.common import VOCAB_SIZE, build_llama7b
    from benchmarks.profile_steps import _options

    if not (bulk.MODEL_DIR / "config.json").exists():
        build_llama7b(bulk.MODEL_DIR)
    engine = build_llm_engine(EngineConfig(model=str(bulk.MODEL_DIR), device="cuda", max_model_len=args.max_model_len,
                                           **_options(args.engine_options)))
    report = {"engine_options": args.engine_options, "v_transposed": bool(getattr(engine.runner, "v_transposed", 0)),
              **scenario(engine, VOCAB_SIZE, rows=args.rows, prompt=args.prompt, steps=args.steps,
                         max_model_len=args.max_model_len)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "kv_faults.json", report)


if __name__ == "__main__":
    main()
