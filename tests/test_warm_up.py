"""The engine's warm-up (worker/engine/warm_up.py): two prefills of the sizes it picks, then nothing left behind."""

import pytest
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.warm_up import prefill_sizes, prompts

from tests.test_llm_engine import PROMPTS, completion, hf_greedy, run


def test_prefill_sizes_are_an_odd_count_at_the_budget_and_a_multiple_of_16():
    assert prefill_sizes(4096) == [4095, 2048]
    assert prefill_sizes(4097) == [4095, 2048]  # 4,096 is a multiple of 16
    assert prefill_sizes(48) == [47, 16]
    assert prefill_sizes(20) == [19]
    assert all(size % 16 for size in (prefill_sizes(n)[0] for n in range(2, 5000)))


def test_prompts_hold_the_total_in_pieces_of_at_most_max_len():
    got = prompts([5, 6, 7], 8, 3)
    assert got == [[5, 6, 7], [5, 6, 7], [5, 6]]


def test_warm_up_runs_its_prefills_and_leaves_the_engine_as_new(demo_model_dir):
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, max_prefill_tokens=48))
    assert engine.warm_up_s == 0.0  # on CPU the engine does not warm itself up
    engine.clock.trace = []
    seconds = engine.warm_up()
    prefills = [tokens for kind, _, tokens, *_ in engine.clock.trace if kind == "prefill"]
    decodes = [kind for kind, *_ in engine.clock.trace if kind == "decode"]
    assert prefills == [47, 16] and len(decodes) >= 2  # each prompt wants two tokens: a decode step follows
    assert seconds > 0 and engine.stats().extra["warm_up_s"] == round(seconds, 2)
    stats = engine.stats().extra
    assert stats["num_prefill_steps"] == 0 and stats["num_decode_steps"] == 0 and stats["prefill_device_s"] == 0
    assert engine.num_unfinished == 0 and not engine.scheduler.running
    if engine.blocks is not None:
        assert engine.blocks.num_free == engine.blocks.num_blocks
    # and it generates as before: greedy equals HF generate on the same model
    results = run(engine, [completion("a", PROMPTS[3], max_tokens=9)])
    text, reason, num_tokens = hf_greedy(engine, engine.tokenizer(PROMPTS[3])["input_ids"], 9)
    assert (results["a"].text, results["a"].finish_reason, results["a"].completion_tokens) == (text, reason, num_tokens)


@pytest.mark.slow
def test_the_warm_up_opens_no_outlier_column_and_leaves_the_guard_fresh(demo_model_dir):
    """Its prompts repeat the calibration text: judged, their rates opened two columns of a random 7B model, and
    every later step paid for them (docs/benchmarks.md). A column massive in every warm-up token opens none; the same
    column in a job does."""
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, max_prefill_tokens=48))
    guard = engine.int8.guard
    assert not guard.seen.any() and not guard.hits.any() and guard.num_tokens == 0  # start-up passes forgotten
    qkv = next(layer.self_attn.qkv_proj for layer in engine.model.model.layers
               if not layer.self_attn.qkv_proj.outliers.columns)
    column = 13

    def plant(module, args):
        x = args[0].clone()
        x[..., column] = 40.0
        return (x,)

    handle = qkv.register_forward_pre_hook(plant)
    try:
        engine.warm_up()
        assert column not in qkv.outliers.columns and guard.num_opened == 0
        assert not guard.pending and guard.num_tokens == 0 and not guard.seen.any() and not guard.hits.any()
        results = run(engine, [completion("a", PROMPTS[3], max_tokens=4)])
    finally:
        handle.remove()
    assert results["a"].error is None and column in qkv.outliers.columns and guard.num_opened == 1
