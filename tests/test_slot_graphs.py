"""The generic path's static-shape decode (what its CUDA graphs capture): fixed rows and attended columns, the new
column at a device index, free rows attending to themselves. On CPU the same forward runs eagerly; greedy output
must stay HF generate's (fp32, exact) through joins, leaves and window moves, for ALiBi, learned and rotary
positions, multi-query and parallel-attention layers."""

import pytest
from batchgen.jobs.schema import Request, SamplingParams
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.protocol import GenerationRequest
from batchgen.worker.engine.slot_graphs import SlotDecodeGraphs, graphable
from batchgen.worker.factory import build_llm_engine
from transformers import AutoConfig

from tests.models import write_tiny_model
from tests.test_slot_batch import MAX_MODEL_LEN, hf_greedy, prompt, wanted


@pytest.mark.parametrize("arch", ["bloom", "gpt2", "opt", "gpt_neox", "falcon", "gpt_bigcode", "mpt", "gptj"])
def test_static_decode_answers_like_hf_generate(arch, demo_model_dir, tmp_path, monkeypatch):
    path = write_tiny_model(tmp_path, arch, demo_model_dir)
    monkeypatch.setattr(GenericEngine, "_why_eager", lambda self: "")  # CPU: the static forward, uncaptured
    runs = []
    run = SlotDecodeGraphs.run
    monkeypatch.setattr(SlotDecodeGraphs, "run", lambda self, tokens: runs.append(self.width()) or run(self, tokens))
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=12,
                                           max_model_len=MAX_MODEL_LEN, max_prefill_tokens=96))
    assert isinstance(engine, GenericEngine)
    num, texts, graphs = 30, {}, []
    for wave in (range(24), range(24, num)):  # a drain between: the second wave reuses the slots and graphs
        reqs = [GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
            max_tokens=wanted(i), temperature=0, ignore_eos=True))) for i in wave]
        assert engine.add(reqs) == []
        while engine.num_unfinished:
            for r in engine.step():
                assert r.error is None, r.error
                texts[r.key] = r.text
        graphs.append(engine.graphs)
    # every decode went through the static forward, over more than one width, with rows joining and windows moving
    assert len(set(runs)) > 1 and engine.stats().extra["num_joins"] > 0
    assert graphs[0] is graphs[1] is not None and engine.graphs.columns > MAX_MODEL_LEN
    for i in range(num):
        ids = engine.tokenizer(prompt(i))["input_ids"]
        expected = engine.tokenizer.decode(hf_greedy(path, ids, wanted(i)), skip_special_tokens=True)
        assert texts[f"r{i}"] == expected, (arch, i)


@pytest.mark.parametrize("arch,reason", [("mistral_window", "sliding-window attention"),
                                         ("gemma3_text", "sliding-window attention"),
                                         ("gpt_neo", "local attention layers"), ("bloom", None)])
def test_windowed_attention_stays_eager(arch, reason, demo_model_dir, tmp_path):
    """A window is measured from the last attended column, which the static decode's new column is not."""
    path = write_tiny_model(tmp_path, arch, demo_model_dir, weights=False)
    assert graphable(AutoConfig.from_pretrained(path).get_text_config()) == reason


def test_cpu_engine_decodes_eagerly(demo_model_dir, tmp_path):
    path = write_tiny_model(tmp_path, "bloom", demo_model_dir)
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_model_len=64))
    engine.add([GenerationRequest("a", Request(custom_id="a", prompt="the quick fox", params=SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True)))])
    while engine.num_unfinished:
        engine.step()
    assert engine._eager_reason == "no CUDA" and engine.graphs is None
