"""The engine's warm-up: prompts cut from the calibration text through the engine's own steps, once, before its first
job, so that job does not pay the one-time costs of a step's first run.

Those costs are the host's, and a step's device time waits on them: Triton compiles a kernel again for a row count
that is not a multiple of 16 (it specialises integer arguments on that), and compiled functions make their first
dynamic-shape graphs. The budget's measurement and the graph capture run prefills of other sizes only, so the first
job's first prefill step held the device while the host compiled (docs/benchmarks.md). So two prefills here: one
of an odd token count at the prefill budget, one of a multiple of 16 at half of it, each prompt wanting two tokens
so a decode step follows, with the engine's own admission, overlap and sampling.
"""

import time

import torch
from batchgen.jobs.schema import SamplingParams
from batchgen.worker.engine.int8_outliers import calibration_ids
from batchgen.worker.engine.sequence import Sequence

NEW_TOKENS = 2  # a prefill, then a decode step


def prefill_sizes(max_prefill_tokens: int) -> list[int]:
    """The warm-up prefills' token counts: the budget's largest count that is not a multiple of 16, then half the
    budget rounded down to a multiple of 16 (where the budget allows one)."""
    odd = max_prefill_tokens - 1 if (max_prefill_tokens - 1) % 16 else max_prefill_tokens - 2
    sizes = [max(1, odd)]
    if max_prefill_tokens >= 32:
        sizes.append(max_prefill_tokens // 32 * 16)
    return sizes


def prompts(text_ids: list[int], total: int, max_len: int) -> list[list[int]]:
    """Prompts of at most max_len tokens, taken in turn from text_ids (repeated), holding total tokens together."""
    out, at = [], 0
    while total > 0:
        n = min(max_len, total)
        out.append([text_ids[(at + i) % len(text_ids)] for i in range(n)])
        at, total = at + n, total - n
    return out


def run(engine) -> float:
    """Steps the warm-up's prompts through engine to the end; returns its seconds. The engine resets its own
    statistics afterwards (LLMEngine.warm_up)."""
    start = time.perf_counter()
    text_ids = calibration_ids(engine.tokenizer, torch.device("cpu"), num_seqs=1, seq_len=512)[0].tolist()
    max_len = max(1, engine.max_model_len - NEW_TOKENS)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for size in prefill_sizes(engine.scheduler.max_prefill_tokens):
        for i, ids in enumerate(prompts(text_ids, size, max_len)):
            engine.scheduler.add(Sequence(f"warm-up-{size}-{i}", ids, params, seed=i))
        while engine.num_unfinished:
            engine.step()
    return time.perf_counter() - start
