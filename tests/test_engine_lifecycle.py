"""Engine lifecycle edges: out-of-memory back-offs that strike midway through the host's own bookkeeping, against
the same requests through an engine without faults (greedy, float32 on the CPU)."""

import dataclasses

import pytest
import torch
from batchgen.jobs.schema import Request, SamplingParams
from batchgen.worker.engine import slot_batch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.protocol import GenerationRequest, GenerationResult
from batchgen.worker.factory import build_llm_engine

from tests.models import write_tiny_model
from tests.test_llm_engine import MAX_TOKENS, PROMPTS, completion, run
from tests.test_slot_batch import prompt, wanted

pytestmark = pytest.mark.slow


def generic_request(i: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=wanted(i) // 3, temperature=0, ignore_eos=True)
    return GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=params))


def drive(engine, first: list[GenerationRequest], later: list[GenerationRequest],
          max_steps: int = 5000) -> dict[str, GenerationResult]:
    """first, one step, then later (rows joining a running batch), to the end; each key returned once."""
    done = {r.key: r for r in engine.add(first)}
    done.update({r.key: r for r in engine.step()})
    done.update({r.key: r for r in engine.add(later)})
    for _ in range(max_steps):
        if not engine.num_unfinished:
            return done
        for r in engine.step():
            assert r.key not in done, f"{r.key} returned twice"
            done[r.key] = r
    raise AssertionError("engine did not finish")


def test_an_oom_cut_short_growing_the_slots_leaves_them_usable(demo_model_dir, tmp_path, monkeypatch):
    """On the CPU the slots grow as rows join: an OOM after some layers' slots grew and before the others did is
    the usual back-off, and the rows that join later find every layer's slots large enough."""
    path = write_tiny_model(tmp_path, "gpt2", demo_model_dir)
    cfg = EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=32, max_model_len=160)
    first, later = [generic_request(i) for i in range(2)], [generic_request(i) for i in range(2, 30)]
    baseline = drive(build_llm_engine(cfg), first, later)
    engine = build_llm_engine(cfg)
    assert isinstance(engine, GenericEngine)
    zeros, grown = slot_batch._zeros, []

    def oom_on_the_second_grown_tensor(like, rows, columns, dtype=None, host=False):
        if rows > slot_batch.CPU_INITIAL_ROWS:
            grown.append(rows)
            if len(grown) == 2:  # layer 0's keys grew, its values did not
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return zeros(like, rows, columns, dtype, host)

    monkeypatch.setattr(slot_batch, "_zeros", oom_on_the_second_grown_tensor)
    results = drive(engine, first, later)
    assert engine.stats().extra["num_ooms"] == 1 and engine.scheduler.max_batch_size == 16
    assert {k: (r.error, r.text) for k, r in results.items()} == {k: (None, r.text) for k, r in baseline.items()}
    assert len(results) == 30


def test_a_decode_step_that_ran_out_of_memory_counts_no_rows_computed(demo_model_dir):
    """Compacted rows leave no holes, so the decode steps computed exactly the rows they decoded; a forward that
    raised is no step (the back-off runs it again), and its rows are not counted either."""
    cfg = EngineConfig(model=str(demo_model_dir), load_in_8bit=False, attention="sdpa", max_batch_size=8,
                       compact_rows=True)
    requests = [completion(f"d{i}", PROMPTS[i], max_tokens=MAX_TOKENS[i]) for i in range(8)]
    baseline = run(LLMEngine.from_config(cfg), requests)
    engine = LLMEngine.from_config(dataclasses.replace(cfg, inject_oom="steps=3,6"))  # decode steps of 8, 4 rows
    results = run(engine, requests)
    assert engine.blocks is not None and engine.stats().extra["num_ooms"] == 2
    assert {k: r.text for k, r in results.items()} == {k: r.text for k, r in baseline.items()}
    stats = engine.step_stats
    assert stats.num_rows_computed == stats.num_decode_rows
