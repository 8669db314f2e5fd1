"""The paged KV cache on the GPU: the Triton decode kernel through a shuffled block table against the slot layout
(the same output, and its time), then the resident engine paged against the same engine over slots on a tiny
model (the same greedy tokens, also with a pool so small that blocks are recycled under CUDA graphs), with the
rows-held stats of each. Three engine configurations: fp16 compute with an fp16 ("auto") and an fp8 KV cache, and
fp32 compute over masked sdpa, where paged, small pool and slots should agree exactly or nearly (few near-ties). For
each request that differs from slots it records where: the first differing output token, both token counts and the
prompt's length (so a difference can be placed against 64-token block boundaries).

    python3 -m benchmarks.paged_kv --out $OUT/paged     # on the device (after scripts/device-setup.sh)
"""

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from benchmarks.common import write_json

ROWS, MAX_LEN, KV_HEADS, HEADS, HEAD_DIM = 256, 768, 32, 32, 128  # a 7B-shape decode step
# Engine configurations: EngineConfig fields over the demo model. fp32 runs attention "sdpa" (what "auto" resolves
# to in float32 anyway): the Triton decode kernel is for fp16/bf16 q (its tl.dot takes float32 as TF32, not exact
# fp32) and its prefill is FlashAttention, which has no float32. So fp32 checks the block table, its recycling under
# CUDA graphs and the paged writes through the sdpa path (it gathers each row's blocks), not the Triton kernel's
# paged reads (kernel_rows checks those).
ENGINE_CONFIGS = {
    "auto": {"kv_cache_dtype": "auto"},
    "fp8": {"kv_cache_dtype": "fp8"},
    "fp32": {"compute_dtype": "float32", "kv_cache_dtype": "auto", "attention": "sdpa"},
}
ROW_STATS = ("max_rows", "num_kv_blocks", "max_decode_batch", "mean_decode_batch", "mean_kv_tokens",
             "mean_kv_blocks_used", "max_kv_blocks_used")


def _torch():
    import torch

    return torch


def paged_copy(k, v, num_blocks: int, block_size: int = 64):
    """Slot caches k/v [rows, max_len, kv_heads, d] as blocks of a shuffled pool, and their block table."""
    torch = _torch()
    rows, max_len = k.shape[:2]
    per_row = max_len // block_size
    table = (torch.randperm(num_blocks - 1, device=k.device)[:rows * per_row] + 1).view(rows, per_row).int()
    blocks = [torch.zeros(num_blocks, block_size, *k.shape[2:], dtype=k.dtype, device=k.device) for _ in (k, v)]
    for pool, slots in zip(blocks, (k, v), strict=True):
        pool[table.long()] = slots.view(rows, per_row, block_size, *k.shape[2:])
    return blocks[0], blocks[1], table


def device_ms(fn, iters: int = 50) -> float:
    torch = _torch()
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iters, 4)


def kernel_rows() -> dict:
    torch = _torch()
    from batchgen.worker.engine.kernels.attention import decode_attention, fp8_kv_scale, quantize_kv

    torch.manual_seed(0)
    k = torch.randn(ROWS, MAX_LEN, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(ROWS, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    lengths = torch.randint(100, MAX_LEN + 1, (ROWS,), device="cuda", dtype=torch.int32)
    out = {}
    for name in ("fp16", "fp8"):
        scales = {}
        if name == "fp8":
            scales = {"k_scale": fp8_kv_scale(k), "v_scale": fp8_kv_scale(v)}
            k, v = quantize_kv(k, scales["k_scale"]), quantize_kv(v, scales["v_scale"])
        pool_k, pool_v, table = paged_copy(k, v, ROWS * MAX_LEN // 64 + 64)

        def slots(k=k, v=v, scales=scales):
            return decode_attention(q, k, v, lengths, HEAD_DIM**-0.5, **scales)

        def paged(pool_k=pool_k, pool_v=pool_v, table=table, scales=scales):
            return decode_attention(q, pool_k, pool_v, lengths, HEAD_DIM**-0.5, block_table=table, **scales)

        out[name] = {"paged_equals_slots": bool(torch.equal(paged(), slots())), "slots_ms": device_ms(slots),
                     "paged_ms": device_ms(paged)}
    return out


def greedy_requests(num: int) -> list:
    from batchgen.jobs.schema import Request, SamplingParams
    from batchgen.worker.engine.protocol import GenerationRequest

    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "batch", "generation",
             "keeps", "the", "gpu", "busy"]
    out = []
    for i in range(num):
        prompt = " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + (i * 13) % 60))
        params = SamplingParams(temperature=0.0, max_tokens=4 + (i * 37) % 150, ignore_eos=True)
        out.append(GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt, params=params)))
    return out


def run(engine, requests) -> tuple[dict, dict]:
    """Each request's (text, completion tokens, error code), and its output token ids (read off the finisher as each
    sequence ends: results carry text only)."""
    ids = {}
    choice = engine.finisher.choice

    def recording_choice(seq, reason):
        ids[seq.key] = list(seq.output_ids)
        return choice(seq, reason)

    engine.finisher.choice = recording_choice
    results = {r.key: r for r in engine.add(requests)}
    while engine.num_unfinished:
        results.update({r.key: r for r in engine.step()})
    out = {k: (r.text, r.completion_tokens, r.error and r.error.code) for k, r in results.items()}
    prompt_tokens = {k: r.prompt_tokens for k, r in results.items()}
    return out, {"ids": ids, "prompt_tokens": prompt_tokens}


def first_difference(a: list, b: list) -> int | None:
    """Index of the first output token where a and b differ (the shorter length if one is a prefix of the other);
    None where they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def differing(out: dict, tokens: dict, slots_out: dict, slots_tokens: dict) -> list[dict]:
    """The requests whose output differs from the slot engine's, each with where: the first differing output token,
    both token counts (this engine's, the slot engine's) and the prompt's length."""
    rows = []
    for key in sorted(slots_out, key=lambda k: int(k[1:])):
        if out.get(key) == slots_out[key]:
            continue
        a, b = tokens["ids"].get(key, []), slots_tokens["ids"].get(key, [])
        rows.append({"request": key, "first_differing_token": first_difference(a, b),
                     "completion_tokens": [out[key][1] if key in out else None, slots_out[key][1]],
                     "prompt_tokens": slots_tokens["prompt_tokens"].get(key)})
    return rows


def slot_engine(paged, cfg):
    """The engine over paged's model with a slot cache (the runner as it was before paging)."""
    from batchgen.worker.engine.llm_engine import LLMEngine
    from batchgen.worker.engine.model_runner import ModelRunner
    from batchgen.worker.engine.setup import resident_budget, resident_max_prefill_tokens

    r = paged.runner
    runner = ModelRunner(r.parts, device=r.device, dtype=r.dtype, max_model_len=r.max_model_len,
                         attention=r.attention, cuda_graphs=cfg.cuda_graphs, kv_cache_dtype=r.kv_cache_dtype)
    if r.k_scale is not None:
        runner.k_scale, runner.v_scale = r.k_scale.clone(), r.v_scale.clone()
    max_prefill = resident_max_prefill_tokens(cfg, r.device, r.max_model_len)
    budget = resident_budget(cfg, runner, paged.model.config, 0, max_prefill)
    return LLMEngine(cfg, paged.model, paged.tokenizer, runner, budget, max_prefill_tokens=max_prefill)


def engine_rows(num_requests: int) -> dict:
    from batchgen.worker.demo_model import write_demo_model
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.llm_engine import LLMEngine

    model_dir = write_demo_model(tempfile.mkdtemp())
    requests = greedy_requests(num_requests)
    out = {}
    for name, fields in ENGINE_CONFIGS.items():
        cfg = EngineConfig(model=str(model_dir), load_in_8bit=False, max_model_len=512, **fields)
        paged = LLMEngine.from_config(cfg)
        paged_out, paged_tokens = run(paged, requests)
        row = {"compute_dtype": str(paged.runner.dtype).removeprefix("torch."), "kv_cache_dtype": cfg.kv_cache_dtype,
               "attention": paged.attention, "cuda_graphs": paged.runner.use_graphs,
               "paged": {k: paged.stats().extra.get(k) for k in ROW_STATS}}
        small = LLMEngine(cfg, paged.model, paged.tokenizer, paged.runner,
                          dataclasses.replace(paged.budget, max_rows=24, num_kv_blocks=16),
                          max_prefill_tokens=paged.scheduler.max_prefill_tokens)
        small_out, small_tokens = run(small, requests)
        row["small_pool"] = {k: small.stats().extra.get(k) for k in ROW_STATS}
        slots = slot_engine(paged, cfg)
        slots_out, slots_tokens = run(slots, requests)
        differ = differing(paged_out, paged_tokens, slots_out, slots_tokens)
        differ_small = differing(small_out, small_tokens, slots_out, slots_tokens)
        row.update(slots_max_rows=slots.budget.max_rows,
                   num_differ=sum(paged_out[k] != slots_out[k] for k in slots_out),
                   num_differ_small_pool=sum(small_out[k] != slots_out[k] for k in slots_out),
                   num_errors=sum(bool(v[2]) for v in paged_out.values()),
                   differ=differ, differ_small_pool=differ_small)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--engine-requests", type=int, default=300)
    args = parser.parse_args()
    result = {"kernel": kernel_rows()}
    print("kernel", json.dumps(result["kernel"]), flush=True)
    result["engine"] = engine_rows(args.engine_requests)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "paged_kv.json", result)


if __name__ == "__main__":
    main()
