"""Overlapped decode (llm_engine.py): the next greedy step is queued, fed on the device with the unread step's picks,
before that step is read. Against the same engine with it off (and HF generate, in test_llm_engine.py): the same
tokens, rows ending on a stop token or string mid-queue without the extra token leaking, newcomers admitted, seeded
samples drawn alike, rows needing the host (logprobs) served synchronously, and the int8 outlier guard polled for
every token (CPU, the tiny 8-bit demo Llama)."""

import pytest
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.llm_engine import GUARD_POLL_STEPS, LLMEngine

from tests.test_llm_engine import PROMPTS, completion, hf_generate_ids, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engines(demo_model_dir) -> tuple[LLMEngine, LLMEngine]:
    on = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4))
    off = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, overlap_decode=False))
    return on, off


def outputs(results) -> dict:
    return {k: (r.error, r.text, r.finish_reason, r.completion_tokens) for k, r in results.items()}


def overlapped(engine: LLMEngine) -> int:
    return engine.step_stats.num_overlapped_steps


def test_same_tokens_as_synchronous_steps_with_rows_ending_mid_queue(engines):
    on, off = engines
    plain = [completion(f"p{i}", p, max_tokens=24) for i, p in enumerate(PROMPTS[:6])]
    first = run(off, plain)
    # ends on a token id / a string the greedy output first reaches mid-run: unknowable when the next step is queued
    token_key, token = next((f"p{i}", ids[j]) for i, p in enumerate(PROMPTS[:6])
                            for ids in [hf_generate_ids(on, on.tokenizer(p)["input_ids"], 24)]
                            for j in range(3, len(ids) - 3) if ids[j] not in ids[:j])
    text_key, stop = next((k, t[j:j + 2]) for k in sorted(first) if k != token_key for t in [first[k].text]
                          for j in range(4, len(t) - 4) if t[j:j + 2].isalnum() and t[j:j + 2] not in t[:j + 1])
    reqs = [completion(f"p{i}", p, max_tokens=24) for i, p in enumerate(PROMPTS[:6])]
    reqs[int(token_key[1:])] = completion(token_key, PROMPTS[int(token_key[1:])], max_tokens=24,
                                          stop_token_ids=[token])
    reqs[int(text_key[1:])] = completion(text_key, PROMPTS[int(text_key[1:])], max_tokens=24, stop=[stop])
    before = overlapped(on)
    want, got = run(off, reqs), run(on, reqs)
    assert outputs(got) == outputs(want)
    assert got[token_key].finish_reason == "stop" and got[token_key].completion_tokens < 24
    assert got[text_key].finish_reason == "stop" and stop not in got[text_key].text
    assert overlapped(on) > before and overlapped(off) == 0


def test_newcomers_are_admitted_during_queued_steps(demo_model_dir):
    """In float32: the newcomers join the long row at other steps than in the synchronous run, and int8 rounding
    could turn other batch mates into a flip where two tokens all but tie (test_llm_engine.py's docstring)."""
    fp32 = {"model": str(demo_model_dir), "max_batch_size": 4, "load_in_8bit": False}
    on = LLMEngine.from_config(EngineConfig(**fp32))
    off = LLMEngine.from_config(EngineConfig(**fp32, overlap_decode=False))
    long = [completion("long", PROMPTS[4], max_tokens=40)]
    later = [completion(f"n{i}", PROMPTS[i], max_tokens=10 + i) for i in range(3)]
    want = run(off, long + later)
    results = {r.key: r for r in on.add(long)}
    before = overlapped(on)
    for _ in range(6):
        results.update({r.key: r for r in on.step()})
    assert overlapped(on) > before  # the lone row runs ahead
    results.update({r.key: r for r in on.add(later)})
    for _ in range(2):  # the queued step is read, then the newcomers are prefilled
        results.update({r.key: r for r in on.step()})
    assert len(on.scheduler.running) == 4
    results.update(run(on, []))
    assert outputs(results) == outputs(want)


def test_sampled_rows_draw_the_same_tokens_queued(engines):
    """Seeded sampling (temperature, top-k, top-p, min-p) picks on the device in queued steps: the same draws as
    the synchronous sampler's, whose noise is a function of (seed, output index)."""
    on, off = engines
    reqs = [completion("t", PROMPTS[2], max_tokens=20, temperature=0.9, seed=3),
            completion("k", PROMPTS[5], max_tokens=18, temperature=1.3, top_k=5, seed=4),
            completion("p", PROMPTS[7], max_tokens=22, temperature=0.8, top_p=0.7, min_p=0.05, seed=5),
            completion("g", PROMPTS[8], max_tokens=16)]
    before = overlapped(on)
    assert outputs(run(on, reqs)) == outputs(run(off, reqs))
    assert overlapped(on) > before


def test_rows_needing_the_host_step_synchronously(engines):
    on, _ = engines
    before = overlapped(on)
    reqs = [completion("l", PROMPTS[2], max_tokens=12, logprobs=2),
            completion("g", PROMPTS[5], max_tokens=12)]
    results = run(on, reqs)
    assert overlapped(on) == before and all(r.error is None for r in results.values())


def guard_accounting(engine: LLMEngine, monkeypatch, requests) -> tuple[list[int], int]:
    """Runs requests with the outlier guard's polls recorded: (each poll's token count, the tokens the steps ran
    over less those polled, which must be 0: every token counted once, the unpolled ones still owed)."""
    assert engine.int8 is not None and engine.int8.guard is not None
    polled = []
    poll = engine.int8.poll
    monkeypatch.setattr(engine.int8, "poll", lambda num_tokens: polled.append(num_tokens) or poll(num_tokens))
    stats = engine.step_stats
    tokens_before, unpolled_before = stats.num_prefill_tokens + stats.num_decode_rows, engine._unpolled_tokens
    run(engine, requests)
    tokens = stats.num_prefill_tokens + stats.num_decode_rows - tokens_before
    return polled, tokens + unpolled_before - sum(polled) - engine._unpolled_tokens


def test_outlier_guard_polls_every_token(engines, monkeypatch):
    on, _ = engines
    queued_before = overlapped(on)
    polled, unaccounted = guard_accounting(on, monkeypatch, [completion("g", PROMPTS[5], max_tokens=60)])
    queued = overlapped(on) - queued_before
    assert queued > GUARD_POLL_STEPS  # so the guard was due while steps ran ahead
    assert unaccounted == 0
    assert len(polled) >= queued // GUARD_POLL_STEPS
