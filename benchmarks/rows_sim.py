"""The rows a decode step computes on the bulk workload, without a model or a GPU: the engine's own Scheduler and
BlockPool replay benchmarks.bulk's 2,048 requests (each prefill fills what admission takes, each decode step adds
a token to every running row, rows end at max_tokens), with and without row compaction.

A decode step computes rows [0, highest running row] (holes included) and replays the graph of the next bucket
(cuda_graphs.batch_buckets), so rows above the running ones cost GEMM, norm and LM-head work. prefill_runs: the
runs of prefill steps between decode steps (the first fill, then refills), each a transition the GPU may idle at.

decode_model_s: the decode's time under a cost model fitted to the 384-row step profile (STEP_MS a step, ROW_MS a
row computed, KV_MS a K/V token read), split into those three terms. --longest-first admits the pending sequences
with the most max_tokens first (all of the workload pending: the order's best case) instead of in arrival order.

    .venv/bin/python -m benchmarks.rows_sim [--rows 1024 --blocks 4023 --block-size 64 --max-prefill-tokens 4096]
"""

import argparse
import json

from batchgen.worker.engine.cuda_graphs import batch_buckets
from batchgen.worker.engine.kv_blocks import BlockPool
from batchgen.worker.engine.scheduler import Scheduler
from batchgen.worker.engine.sequence import SamplingParams, Sequence

from benchmarks.common import workload

STEP_MS, ROW_MS, KV_MS = 3.2, 0.0146, 1.3e-4  # a one-row step; (25.2 - 17.8 - 3.2) / 384; attention 17.8 / 137k


def simulate(rows: int, num_blocks: int, block_size: int, max_prefill_tokens: int, max_model_len: int,
             compact: bool, longest_first: bool = False) -> dict:
    blocks = BlockPool(num_blocks, block_size, -(-max_model_len // block_size))
    scheduler = Scheduler(rows, max_prefill_tokens=max_prefill_tokens, blocks=blocks)
    reqs = workload()
    if longest_first:  # the scheduler admits in arrival order: arriving longest first is admitting them first
        reqs = sorted(reqs, key=lambda r: -r.max_tokens)
    for i, req in enumerate(reqs):
        scheduler.add(Sequence(req.custom_id, list(req.prompt_ids), SamplingParams(max_tokens=req.max_tokens), seed=i))
    buckets = batch_buckets(rows)
    steps = prefills = runs = running = computed = replayed = kv_read = 0
    last_prefill = False
    while scheduler.num_unfinished:
        if compact:
            scheduler.compact()
        admitted = scheduler.admit()
        if admitted:  # a prefill: each prompt's first token
            prefills += 1
            runs += not last_prefill  # a run of prefills between decode steps: a refill, or the first fill
            last_prefill = True
            for seq in admitted:
                seq.output_ids.append(0)
            continue
        n = scheduler.num_decode_rows
        last_prefill = False
        steps += 1
        running += len(scheduler.running)
        computed += n
        replayed += next(b for b in buckets if b >= n)
        kv_read += sum(seq.num_tokens for seq in scheduler.running.values())
        for seq in list(scheduler.running.values()):
            seq.output_ids.append(0)
            if len(seq.output_ids) >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
    model_s = {"steps": steps * STEP_MS / 1e3, "rows": computed * ROW_MS / 1e3, "kv": kv_read * KV_MS / 1e3}
    model_s["total"] = sum(model_s.values())
    return {"compact_rows": compact, "decode_steps": steps, "prefill_steps": prefills, "prefill_runs": runs,
            "mean_running_rows": round(running / steps, 1), "mean_rows_computed": round(computed / steps, 1),
            "mean_graph_rows": round(replayed / steps, 1), "longest_first": longest_first,
            "decode_model_s": {k: round(v, 2) for k, v in model_s.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="the engine's max rows (the bulk run's: 1,024)")
    parser.add_argument("--blocks", type=int, default=4023, help="KV blocks in the pool (the bulk run's: 4,023)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--max-prefill-tokens", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=768)
    parser.add_argument("--longest-first", action="store_true", help="admit the most max_tokens first")
    args = parser.parse_args()
    for compact in (False, True):
        print(json.dumps(simulate(args.rows, args.blocks, args.block_size, args.max_prefill_tokens,
                                  args.max_model_len, compact, args.longest_first)))


if __name__ == "__main__":
    main()
