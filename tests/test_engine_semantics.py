"""Per-request semantics of the engine against vLLM's SamplingParams, on the demo model (CPU, 8-bit).

The oracle is the engine's own unconstrained greedy output (its token ids recorded as each choice ends) and the
rule vLLM's detokenizer applies to it, computed by hand here: a stop string counts only where it ends after the
text of the first min_tokens tokens, and include_stop_str_in_output keeps the text of the stop token that ended
a completion.
"""

import pytest
from batchgen.jobs.schema import Request, SamplingParams
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.protocol import GenerationRequest, GenerationResult
from batchgen.worker.engine.requests import Finisher
from batchgen.worker.engine.sequence import Sequence

from tests.test_llm_engine import run

PROMPT = "the quick brown fox"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model_dir))


def finish(tokenizer, text: str, **params) -> tuple[str | None, int, str | None]:
    """Feeds text's tokens to a Finisher one by one: (finish reason, tokens taken, the choice's text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = Sequence("k", [1], SamplingParams(max_tokens=len(ids), **params), seed=0)
    finisher = Finisher(tokenizer, frozenset({tokenizer.eos_token_id}))
    for token in ids:
        if (reason := finisher.append(seq, token)) is not None:
            return reason, len(seq.output_ids), seq.text
    return None, len(seq.output_ids), seq.text


@pytest.mark.parametrize("text, stop, min_tokens, expected", [
    ("xaxb", "x", 0, ("stop", 1, "")),
    ("xaxb", "x", 2, ("stop", 3, "xa")),  # the first x is within the first 2 tokens
    ("xaxb", "ax", 2, ("stop", 3, "x")),  # it may begin there, as long as it ends after them
    ("xaxb", "xa", 2, ("length", 4, "xaxb")),
    ("xéb", "é", 2, ("stop", 3, "x")),  # tokens x, é's first byte: é is not whole within the first 2 tokens
])
def test_min_tokens_hides_the_stop_strings_that_end_within_its_tokens_text(tokenizer, text, stop, min_tokens,
                                                                           expected):
    assert finish(tokenizer, text, stop=(stop,), min_tokens=min_tokens) == expected


@pytest.fixture(scope="module")
def engine(demo_model_dir) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4))


def completion(key: str, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", MAX_TOKENS)
    return GenerationRequest(key, Request(custom_id=key, prompt=PROMPT, params=SamplingParams(**params)))


def run_recording(engine: LLMEngine, monkeypatch, requests: list[GenerationRequest]
                  ) -> tuple[dict[str, GenerationResult], dict[str, list[int]]]:
    """run(), and each request's choice-0 output ids as the engine ended it."""
    ids: dict[str, list[int]] = {}
    choice = Finisher.choice

    def recording(self, seq, reason):
        if seq.choice == 0:
            ids[seq.key] = list(seq.output_ids)
        return choice(self, seq, reason)

    monkeypatch.setattr(Finisher, "choice", recording)
    return run(engine, requests), ids


@pytest.fixture(scope="module")
def free_ids(engine) -> list[int]:
    """The greedy output ids of PROMPT, without EOS or stop of any kind."""
    with pytest.MonkeyPatch.context() as mp:
        results, ids = run_recording(engine, mp, [completion("free", ignore_eos=True)])
    assert results["free"].finish_reason == "length" and len(ids["free"]) == MAX_TOKENS
    return ids["free"]


def decode(engine: LLMEngine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def text_floor(engine: LLMEngine, ids: list[int], min_tokens: int) -> int:
    """Characters of the first min_tokens tokens' text (whole characters: a character they end inside is not)."""
    return len(decode(engine, ids[:min_tokens]).rstrip("\ufffd"))


def stop_inside_min_tokens(engine: LLMEngine, ids: list[int]) -> tuple[str, int]:
    """A stop string and a min_tokens such that the string appears within the text of the first min_tokens tokens
    and again after it."""
    full = decode(engine, ids)
    for min_tokens in range(2, MAX_TOKENS // 2):
        floor = text_floor(engine, ids, min_tokens)
        for token in ids[:min_tokens]:
            stop = decode(engine, [token])
            first = full.find(stop) if stop.strip() and "\ufffd" not in stop else -1
            if first >= 0 and first + len(stop) <= floor and full.find(stop, floor - len(stop) + 1) >= 0:
                return stop, min_tokens
    raise AssertionError(f"no repeated token text in {full!r}")


@pytest.mark.slow
def test_a_stop_string_within_the_first_min_tokens_does_not_end_the_completion(engine, free_ids, monkeypatch):
    stop, min_tokens = stop_inside_min_tokens(engine, free_ids)
    floor = text_floor(engine, free_ids, min_tokens)
    # vLLM: the stop string must end after the first min_tokens tokens' text; the completion ends at the first
    # token whose text completes such an occurrence
    cut = next(k for k in range(min_tokens + 1, MAX_TOKENS + 1)
               if decode(engine, free_ids[:k]).find(stop, floor - len(stop) + 1) >= 0)
    text = decode(engine, free_ids[:cut])
    index = text.find(stop, floor - len(stop) + 1)
    results, ids = run_recording(engine, monkeypatch, [
        completion("min", min_tokens=min_tokens, stop=(stop,), ignore_eos=True),
        completion("inc", min_tokens=min_tokens, stop=(stop,), ignore_eos=True, include_stop_str_in_output=True)])
    got = results["min"]
    assert (got.text, got.finish_reason, got.completion_tokens, got.choices[0].stop_reason) == (
        text[:index], "stop", cut, stop)
    assert ids["min"] == free_ids[:cut]
    assert len(engine.tokenizer(got.text, add_special_tokens=False)["input_ids"]) >= min_tokens
    assert results["inc"].text == text[:index + len(stop)]


@pytest.mark.slow
def test_a_stop_string_is_still_caught_right_after_min_tokens(engine, free_ids):
    stop, min_tokens = stop_inside_min_tokens(engine, free_ids)
    full = decode(engine, free_ids)
    got = run(engine, [completion("zero", stop=(stop,), ignore_eos=True)])["zero"]
    assert (got.text, got.finish_reason) == (full[:full.find(stop)], "stop")  # min_tokens 0: the first one


@pytest.mark.slow
def test_include_stop_str_in_output_keeps_the_stop_tokens_text(engine, free_ids):
    stop_id = free_ids[3]
    cut = free_ids.index(stop_id) + 1
    results = run(engine, [
        completion("inc", stop_token_ids=(stop_id,), include_stop_str_in_output=True, ignore_eos=True, logprobs=0),
        completion("exc", stop_token_ids=(stop_id,), ignore_eos=True, logprobs=0)])
    inc, exc = results["inc"].choices[0], results["exc"].choices[0]
    assert (inc.text, inc.finish_reason, inc.stop_reason, inc.num_tokens) == (
        decode(engine, free_ids[:cut]), "stop", stop_id, cut)
    assert [t.token for t in inc.logprobs] == [engine.tokenizer.decode([t]) for t in free_ids[:cut]]
    assert (exc.text, exc.num_tokens, len(exc.logprobs)) == (decode(engine, free_ids[:cut - 1]), cut, cut - 1)
