"""Overlapped prefill (llm_engine.py, --overlap-prefill): a prefill is launched and read only after the next one is
launched. Against the same engine with it off: the same tokens (greedy, seeded samples, requests that end on their
first token by length or by a stop token), prompts needing the host (logprobs) prefilled synchronously, KV blocks all given back,
and the int8 outlier guard polled for every prompt token (CPU, the tiny 8-bit demo Llama; a prefill budget of a
few prompts, so a batch takes a run of prefill steps)."""

import pytest
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.llm_engine import LLMEngine

from tests.test_llm_engine import MAX_TOKENS, PROMPTS, completion, hf_generate_ids, run
from tests.test_overlap_decode import guard_accounting, outputs

pytestmark = pytest.mark.slow

PREFILL_TOKENS = 24  # a prompt or two per prefill step


@pytest.fixture(scope="module")
def engines(demo_model_dir) -> tuple[LLMEngine, LLMEngine]:
    common = dict(model=str(demo_model_dir), max_batch_size=6, max_prefill_tokens=PREFILL_TOKENS)
    return (LLMEngine.from_config(EngineConfig(**common, overlap_prefill=True)),
            LLMEngine.from_config(EngineConfig(**common, overlap_prefill=False)))


def queued(engine: LLMEngine) -> int:
    return engine.step_stats.num_overlapped_prefills


def test_same_tokens_as_synchronous_prefills(engines):
    on, off = engines
    reqs = [completion(f"p{i}", p, max_tokens=MAX_TOKENS[i]) for i, p in enumerate(PROMPTS)]
    reqs[3] = completion("p3", PROMPTS[3], max_tokens=1)  # ends on the token a queued prefill picked
    reqs[5] = completion("p5", PROMPTS[5], max_tokens=14, temperature=0.9, top_p=0.8, seed=11)
    reqs[7] = completion("p7", PROMPTS[7], max_tokens=18, temperature=1.2, top_k=4, seed=12)
    first_token = hf_generate_ids(off, off.tokenizer(PROMPTS[0])["input_ids"], 1)[0]
    reqs[0] = completion("p0", PROMPTS[0], max_tokens=MAX_TOKENS[0], stop_token_ids=[first_token])
    before_on, before_off = queued(on), queued(off)
    refills = on.step_stats.num_queued_refills
    want, got = run(off, reqs), run(on, reqs)
    assert outputs(got) == outputs(want)
    assert got["p3"].completion_tokens == 1 and got["p3"].finish_reason == "length"
    assert got["p0"].finish_reason == "stop" and got["p0"].completion_tokens <= 1  # its first token stops it
    assert queued(on) - before_on >= 3 and queued(off) == before_off == 0  # 12 prompts, 6 rows, ~2 per prefill
    # rows freed mid-run were refilled by prefills launched behind the decode step then running
    assert on.step_stats.num_queued_refills > refills and off.step_stats.num_queued_refills == 0
    assert on.step_stats.num_prefill_tokens == off.step_stats.num_prefill_tokens
    for engine in (on, off):
        assert not engine.scheduler.running and (engine.blocks is None or engine.blocks.num_used == 0)


def test_prompts_needing_the_host_prefill_synchronously(engines):
    on, off = engines
    reqs = [completion("l", PROMPTS[2], max_tokens=6, logprobs=2)]
    reqs += [completion(f"g{i}", PROMPTS[i], max_tokens=5 + i) for i in range(6)]
    want = run(off, reqs)
    steps_before, queued_before = on.step_stats.num_prefill_steps, queued(on)
    got = run(on, reqs)
    assert outputs(got) == outputs(want)
    assert len(got["l"].choices[0].logprobs) == 6 and got["l"].choices[0].logprobs == want["l"].choices[0].logprobs
    steps = on.step_stats.num_prefill_steps - steps_before
    assert 0 < queued(on) - queued_before < steps  # the logprobs prompt's step was not queued


def test_the_outlier_guard_sees_every_prompt_token(engines, monkeypatch):
    on, _ = engines
    queued_before = queued(on)
    polled, unaccounted = guard_accounting(on, monkeypatch, [completion(f"g{i}", p, max_tokens=3)
                                                             for i, p in enumerate(PROMPTS)])
    assert queued(on) > queued_before and polled and unaccounted == 0


def test_the_decode_after_a_queued_prefill_is_queued_too(engines):
    """A lone prompt: the step that prefills it queues it, finds nothing more to admit, reads it and queues its
    first decode step, as a synchronous prefill step does."""
    on, off = engines
    req = [completion("lone", PROMPTS[4], max_tokens=9)]
    want = run(off, req)
    prefills, results = queued(on), {r.key: r for r in on.add(req)}
    results.update({r.key: r for r in on.step()})
    assert queued(on) == prefills + 1
    assert on._queued is not None and not on._queued.prompt_tokens and [s.key for s in on._queued.seqs] == ["lone"]
    results.update(run(on, []))
    assert outputs(results) == outputs(want)
