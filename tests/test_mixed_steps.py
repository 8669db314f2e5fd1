"""Mixed steps (--mixed-steps): the fast path decodes its running rows in the forward that prefills newly admitted
prompts. Greedy output must stay HF generate's (fp32, exact) with rows joining while others decode, on both KV
layouts, for sliding windows, soft-capping and q/k norms; the prompts get what the decode rows leave of the prefill
token budget."""

import pytest
from batchgen.jobs.schema import SamplingParams
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.scheduler import Scheduler
from batchgen.worker.engine.sequence import Sequence
from batchgen.worker.factory import build_llm_engine
from batchgen.worker.startup import startup_block

from tests.models import write_tiny_model
from tests.test_models import hf_greedy, oracle, requests, run_engine

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch,layout", [("llama", "paged"), ("llama", "slots"), ("mistral_window", "paged"),
                                         ("gemma2", "paged"), ("qwen3", "slots")])
def test_mixed_steps_answer_like_hf_generate(arch, layout, demo_model_dir, tmp_path):
    path = demo_model_dir if arch == "llama" else write_tiny_model(tmp_path, arch, demo_model_dir)
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=3, mixed_steps=True,
                                           kv_layout=layout))
    assert isinstance(engine, LLMEngine)
    texts = run_engine(engine, requests())
    stats = engine.stats().extra
    assert stats["num_mixed_steps"] > 0, stats  # rows joined while others decoded, in the same forward
    assert stats["num_prefill_steps"] > stats["num_mixed_steps"]  # the first prefill had no rows to decode
    assert texts == hf_greedy(path, int8=False), arch


def test_mixed_steps_on_the_int8_default_kernel(demo_model_dir):
    """The default int8 kernel (int_mm with the outlier guard) over a mixed forward: rows quantise per token, so
    HF generate on the engine's own int8 model is still the oracle."""
    engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), max_batch_size=3, mixed_steps=True))
    texts = run_engine(engine, requests())
    assert engine.int8 is not None and engine.stats().extra["num_mixed_steps"] > 0
    assert texts == oracle(demo_model_dir, engine)
    block = startup_block(engine.stats(), WorkerConfig(engine.cfg)).splitlines()
    assert "  decode steps   eager, mixed into prefills" in block  # eager: CUDA graphs need a GPU


def test_without_mixed_steps_prefill_and_decode_stay_apart(demo_model_dir):
    engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), load_in_8bit=False, max_batch_size=3))
    run_engine(engine, requests())
    assert engine.stats().extra["num_mixed_steps"] == 0


def test_the_decode_rows_take_their_share_of_the_prefill_budget():
    sched = Scheduler(4, max_prefill_tokens=10)
    for i in range(3):
        sched.add(Sequence(f"s{i}", list(range(4)), SamplingParams(max_tokens=2), seed=i))
    assert [s.key for s in sched.admit(max_tokens=9)] == ["s0", "s1"]  # 8 of 9 tokens; a third would need 12
    assert [s.key for s in sched.admit(max_tokens=1)] == ["s2"]  # the first always goes in: no starving



def test_a_streamed_model_mixes_its_rows_in_as_one_more_prompt_group(tmp_path, monkeypatch):
    """Small VRAM (layers streamed, K/V on the device): the rows run as a group of their own inside each streamed
    layer, beside prompt groups of at most the streamer's group size; output as the resident engine's."""
    from batchgen.worker.demo_model import write_demo_model
    from batchgen.worker.offload import build

    model = write_demo_model(tmp_path / "demo4", num_layers=4)
    # the resident engine: the streamed fast path runs its int8 arithmetic (tests/test_offload.py's `resident`)
    want = run_engine(LLMEngine.from_config(EngineConfig(model=str(model), max_batch_size=3)), requests())
    monkeypatch.setattr(build, "STREAMING_PREFILL_GROUP_TOKENS", 8)  # several prompt groups per prefill
    engine = build.build_streaming_engine(EngineConfig(model=str(model), max_batch_size=3, offload=True,
                                                       mixed_steps=True), kv_placement="device", num_resident=0)
    assert engine.runner.prefill_group_tokens == 8 and engine.runner.parts.layer_executor is not None
    assert run_engine(engine, requests()) == want
    assert engine.stats().extra["num_mixed_steps"] > 0


def test_an_oom_in_a_mixed_step_requeues_its_prompts_and_loses_nothing(demo_model_dir):
    """The prompts of a failed mixed forward may have half-written K/V: they start again (the batch halves, as
    after any OOM); the rows it decoded rewrite their position on the next step. Output unchanged."""
    import torch

    engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), load_in_8bit=False, max_batch_size=4,
                                           mixed_steps=True))
    calls, mixed = [], engine.runner.mixed

    def first_fails(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("injected")
        return mixed(*args, **kwargs)

    engine.runner.mixed = first_fails
    assert run_engine(engine, requests()) == hf_greedy(demo_model_dir, int8=False)
    stats = engine.stats().extra
    assert stats["num_ooms"] == 1 and engine.scheduler.max_batch_size == 2
    assert len(calls) > 1 and stats["num_mixed_steps"] == len(calls) - 1


def test_rows_with_logprobs_penalties_and_a_grammar_mix_like_the_rest(demo_model_dir):
    """Rows whose tokens the host picks (logprobs, a repetition penalty, JSON mode) sample from a mixed step's
    logits as from a decode step's: the same texts and logprob tokens with and without mixing."""
    from batchgen.jobs.schema import Request
    from batchgen.worker.engine.protocol import GenerationRequest

    features = [dict(logprobs=2), dict(frequency_penalty=1.5), dict(response_format="json_object"), {}]
    reqs = [GenerationRequest(f"f{i}", Request(custom_id=f"f{i}", prompt=f"the quick fox {i} jumps",
                                               params=SamplingParams(max_tokens=6 + i % 5, temperature=0,
                                                                     **features[i % 4])))
            for i in range(12)]
    results = {}
    for mixed in (False, True):
        engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), load_in_8bit=False, max_batch_size=3,
                                               mixed_steps=mixed))
        assert engine.add(reqs) == []
        out = {}
        while engine.num_unfinished:
            for r in engine.step():
                assert r.error is None, r.error
                out[r.key] = (r.text, [t.token for t in r.choices[0].logprobs or ()])
        results[mixed] = out
        assert (engine.stats().extra["num_mixed_steps"] > 0) == mixed
    assert results[True] == results[False]
    assert all(tokens for key, (_, tokens) in results[True].items() if int(key[1:]) % 4 == 0)


def test_a_mixed_step_that_runs_out_of_memory_restarts_its_decoding_rows_only_over_v_transposed(
        demo_model_dir, monkeypatch):
    """An OOM in a mixed step's forward, after its stores: its prompts start again, and over a V^T pool (stores that
    are not idempotent) so do the rows it decoded, where over a plain pool they decode that step again. Greedy
    output is HF generate's either way."""
    def engine_failing_at(call: int, v_transposed: bool) -> LLMEngine:
        engine = build_llm_engine(EngineConfig(model=str(demo_model_dir), load_in_8bit=False, max_batch_size=3,
                                               mixed_steps=True, inject_oom=f"steps={call}"))
        monkeypatch.setattr(engine.runner, "v_transposed", v_transposed)
        return engine

    dry, kinds = engine_failing_at(10**6, False), []
    forward = dry._forward
    monkeypatch.setattr(dry, "_forward", lambda a, d: kinds.append(bool(a and d)) or forward(a, d))
    expected = hf_greedy(demo_model_dir, int8=False)
    assert run_engine(dry, requests()) == expected
    first_mixed = kinds.index(True) + 1  # forward calls, 1-based, as the fault injector counts them
    prefilled = {}
    for v_transposed in (False, True):
        engine = engine_failing_at(first_mixed, v_transposed)
        assert run_engine(engine, requests()) == expected
        stats = engine.stats().extra
        assert engine.runner.fault.num_injected == 1 and stats["num_ooms"] == 1
        prefilled[v_transposed] = stats["num_prefill_tokens"]
    assert prefilled[True] > prefilled[False], prefilled
