"""The request features an OpenAI or vLLM user reaches for: n choices, logprobs, penalties and the other sampling
controls, JSON mode, stop details. Each is refused at submit when malformed (a line-numbered error), and run by
both engine paths (the fast Llama path on the demo model, the generic path on a tiny GPT-2, both 8-bit) against
an oracle: HF generate with transformers' own logits processors, or HF's log-softmax, on the very same model.
Output lines validate as the openai package's ChatCompletion / Completion.
"""

import json

import jsonschema
import pytest
import torch
from batchgen.jobs.formats import LineError, object_request
from batchgen.jobs.schema import (
    CHAT_URL,
    ChatMessage,
    Choice,
    Request,
    SamplingParams,
    TokenLogprob,
    success_line,
)
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.protocol import GenerationRequest, GenerationResult
from batchgen.worker.engine.sampler import min_p_filter, top_k_filter
from batchgen.worker.factory import build_llm_engine
from openai.types import Completion
from openai.types.chat import ChatCompletion
from transformers import LogitsProcessor, LogitsProcessorList, MinPLogitsWarper, TopKLogitsWarper

from tests.cli import batchgen, start_worker
from tests.models import write_tiny_model
from tests.test_llm_engine import run

PROMPT = "write a short poem about the sea and the stars"
OTHER = "the quick brown fox jumps over the lazy dog"


# -- submit: each feature is validated, with the field named ---------------------------------------------------

def chat_line(**body) -> dict:
    return {"custom_id": "a", "method": "POST", "url": CHAT_URL,
            "body": {"messages": [{"role": "user", "content": "hi"}], **body}}


def completion_line(**body) -> dict:
    return {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", **body}}


def parse(line: dict) -> SamplingParams:
    return object_request(line, line=7, default_id="7", fill={}, max_tokens=1024).params


@pytest.mark.parametrize("line, field", [
    (chat_line(n=0), "body.n: must be >= 1"),
    (chat_line(n=17), "body.n: must be <= 16"),
    (chat_line(top_logprobs=3), "body.top_logprobs: needs body.logprobs: true"),
    (chat_line(logprobs=True, top_logprobs=21), "body.top_logprobs: must be between 0 and 20"),
    (chat_line(logprobs=2), "body.logprobs: must be true or false"),
    (completion_line(logprobs=True), "body.logprobs: must be an integer"),
    (completion_line(top_logprobs=2), "body.top_logprobs: chat only"),
    (chat_line(presence_penalty=2.5), "body.presence_penalty: must be <= 2"),
    (chat_line(frequency_penalty=-3), "body.frequency_penalty: must be >= -2"),
    (chat_line(repetition_penalty=0), "body.repetition_penalty: must be > 0"),
    (chat_line(top_k=-2), "body.top_k: must be >= -1"),
    (chat_line(min_p=1.5), "body.min_p: must be <= 1"),
    (chat_line(min_tokens=9, max_tokens=4), "body.min_tokens: must be <= max_tokens (4)"),
    (chat_line(stop_token_ids=[-1]), "body.stop_token_ids.0: must be >= 0"),
    (chat_line(stop_token_ids="2"), "body.stop_token_ids: must be a list"),
    (chat_line(logit_bias={"x": 1}), "body.logit_bias.x: keys must be token ids"),
    (chat_line(logit_bias={"5": 101}), "body.logit_bias.5: must be between -100 and 100"),
    (chat_line(logit_bias=[5]), "body.logit_bias: must be an object"),
    (chat_line(response_format={"type": "xml"}), "body.response_format.type: must be one of"),
    (chat_line(response_format={"type": "json_object", "schema": {}}), "body.response_format.schema: not supported"),
    (chat_line(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "body.response_format.json_schema.schema: must be an object"),
    (chat_line(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
     "body.response_format.json_schema.name: required"),
])
def test_a_malformed_feature_is_refused_at_submit_naming_its_field(line, field):
    with pytest.raises(LineError) as exc:
        parse(line)
    assert exc.value.message.startswith(field), exc.value.message


def test_features_are_stored_in_one_shape_whatever_the_endpoint():
    chat = parse(chat_line(n=2, logprobs=True, top_logprobs=3, presence_penalty=0.5, top_k=-1, min_tokens=2,
                           stop_token_ids=[4, 9], logit_bias={"12": -100, "3": 5.5},
                           response_format={"type": "json_schema", "json_schema": {
                               "name": "x", "strict": True, "schema": {"type": "object"}}}))
    assert (chat.n, chat.logprobs, chat.presence_penalty, chat.min_tokens) == (2, 3, 0.5, 2)
    assert chat.stop_token_ids == (4, 9) and chat.logit_bias == ((3, 5.5), (12, -100.0))
    assert (chat.response_format, json.loads(chat.json_schema)) == ("json_schema", {"type": "object"})
    assert parse(chat_line(logprobs=True)).logprobs == 0
    assert parse(chat_line(logprobs=False, top_logprobs=None)).logprobs is None
    assert parse(completion_line(logprobs=2)).logprobs == 2
    assert parse(completion_line(response_format={"type": "json_object"})).response_format == "json_object"
    stored = Request(custom_id="a", prompt="hi", params=chat)
    assert Request.model_validate_json(stored.model_dump_json()) == stored  # what the worker reads back


# -- output lines: OpenAI's shape -------------------------------------------------------------------------------

def test_success_lines_validate_as_openai_types_with_n_choices_logprobs_and_stop_reason():
    tokens = (TokenLogprob("he", -0.5, (("he", -0.5), ("é", -1.25))), TokenLogprob("llo", -0.1, (("llo", -0.1),)))
    choices = [Choice("hello", "stop", "</s>", 3, tokens), Choice("hi", "length", None, 2, tokens),
               Choice("hey", "stop", 7, 2, None)]
    chat = Request(custom_id="c", url=CHAT_URL, messages=(ChatMessage(role="user", content="hi"),))
    body = success_line(chat, model="m", prompt_tokens=4, completion_tokens=7, choices=choices)["response"]["body"]
    parsed = ChatCompletion.model_validate(body)
    assert [c.index for c in parsed.choices] == [0, 1, 2]
    assert [c.message.content for c in parsed.choices] == ["hello", "hi", "hey"]
    assert [c.stop_reason for c in parsed.choices] == ["</s>", None, 7]  # vLLM's field, kept as an extra
    first = parsed.choices[0].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("he", -0.5, [104, 101])
    assert [(t.token, t.logprob, t.bytes) for t in first.top_logprobs] == [("he", -0.5, [104, 101]),
                                                                           ("é", -1.25, [195, 169])]
    assert parsed.choices[2].logprobs is None

    plain = Request(custom_id="p", prompt="hi")
    body = success_line(plain, model="m", prompt_tokens=1, completion_tokens=5, choices=choices[:2])["response"]["body"]
    parsed = Completion.model_validate(body)
    assert parsed.choices[1].logprobs.model_dump() == {
        "tokens": ["he", "llo"], "token_logprobs": [-0.5, -0.1], "text_offset": [0, 2],
        "top_logprobs": [{"he": -0.5, "é": -1.25}, {"llo": -0.1}]}


def test_an_impossible_token_reports_a_finite_logprob():
    line = success_line(Request(custom_id="p", prompt="hi"), model="m", prompt_tokens=1, completion_tokens=1,
                        choices=[Choice("x", "length", None, 1, (TokenLogprob("x", float("-inf")),))])
    assert json.loads(json.dumps(line, allow_nan=False))["response"]["body"]["choices"][0]["logprobs"][
        "token_logprobs"] == [-9999.0]


# -- sampler filters: transformers' warpers are the oracle ------------------------------------------------------

def test_top_k_and_min_p_keep_what_transformers_warpers_keep():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    logits[1, :5] = logits[1, 0]  # ties at the k-th value stay, as in HF
    for k in (1, 3, 5, 17):
        ours = top_k_filter(logits, torch.full((4,), k))
        assert torch.equal(ours.isinf(), TopKLogitsWarper(k)(None, logits.clone()).isinf()), k
    assert not top_k_filter(logits, torch.zeros(4, dtype=torch.long)).isinf().any()  # 0: every token
    probs = logits.softmax(-1)
    for min_p in (0.05, 0.3, 1.0):
        ours = min_p_filter(probs, torch.full((4,), min_p)) == 0
        assert torch.equal(ours, MinPLogitsWarper(min_p)(None, logits.clone()).isinf()), min_p
    mixed = top_k_filter(logits, torch.tensor([0, 2, 0, 7]))  # per row: rows without top_k are untouched
    assert torch.equal(mixed[[0, 2]], logits[[0, 2]]) and (~mixed[3].isinf()).sum() == 7


# -- both engine paths, against HF generate ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_paths(demo_model_dir, tmp_path_factory) -> dict[str, str]:
    """Engine path -> a model it serves: the demo Llama (fast path), a tiny GPT-2 (generic path)."""
    return {"fast": str(demo_model_dir),
            "generic": str(write_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2", demo_model_dir))}


def build(path: str, **cfg):
    built = build_llm_engine(EngineConfig(model=path, **cfg))
    assert isinstance(built, LLMEngine if "demo" in path else GenericEngine)
    return built


@pytest.fixture(scope="module", params=["fast", "generic"])
def engine(request, model_paths):
    return build(model_paths[request.param], max_batch_size=4)


def completion(key: str, prompt: str = PROMPT, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 16)
    return GenerationRequest(key, Request(custom_id=key, prompt=prompt, params=SamplingParams(**params)))


def ids_of(engine, prompt: str = PROMPT) -> list[int]:
    return engine.tokenizer(prompt)["input_ids"]


def hf_generate(engine, max_tokens: int = 16, prompt: str = PROMPT, **kwargs) -> list[int]:
    """HF greedy generate on the engine's own model: the generated ids (an ending EOS included)."""
    ids = ids_of(engine, prompt)
    kwargs.setdefault("eos_token_id", engine.model.generation_config.eos_token_id)
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=max_tokens,
                                    pad_token_id=engine.tokenizer.pad_token_id, **kwargs)
    return out[0, len(ids):].tolist()


def text_of(engine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's documented formula over the generated tokens: logit - frequency * count - presence * (count > 0)."""

    def __init__(self, num_prompt: int, presence: float, frequency: float):
        self.num_prompt, self.presence, self.frequency = num_prompt, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.num_prompt:]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones(out.shape, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@pytest.mark.slow
def test_penalties_and_logit_bias_steer_greedy_output_as_transformers_processors_do(engine):
    plain = hf_generate(engine)
    biased_token = plain[2]
    requests = [completion("rep", repetition_penalty=1.8), completion("pen", presence_penalty=1.5, frequency_penalty=2.0),
                completion("bias", logit_bias=((biased_token, -100.0), (plain[0], 3.0))), completion("plain")]
    got = run(engine, requests)
    n = len(ids_of(engine))
    expected = {
        "rep": hf_generate(engine, repetition_penalty=1.8),
        "pen": hf_generate(engine, logits_processor=LogitsProcessorList([OpenAIPenalties(n, 1.5, 2.0)])),
        "bias": hf_generate(engine, sequence_bias={(biased_token,): -100.0, (plain[0],): 3.0}),
        "plain": plain,
    }
    for key, ids in expected.items():
        assert (got[key].text, got[key].completion_tokens) == (text_of(engine, ids), len(ids)), key
    assert expected["rep"] != plain and expected["pen"] != plain and biased_token not in expected["bias"]


@pytest.mark.slow
def test_min_tokens_holds_eos_back_and_stop_token_ids_end_with_stop_reason(engine, monkeypatch):
    plain = hf_generate(engine, max_tokens=24)
    eos = plain[1]  # declare a token the model emits early to be EOS
    monkeypatch.setattr(engine.finisher, "eos_ids", frozenset({eos}))
    monkeypatch.setattr(engine.intake, "eos", frozenset({eos}))
    got = run(engine, [completion("eos", max_tokens=24), completion("min", max_tokens=24, min_tokens=6),
                       completion("stop_id", max_tokens=24, ignore_eos=True, stop_token_ids=(plain[3],))])
    assert (got["eos"].finish_reason, got["eos"].completion_tokens) == ("stop", 2)
    assert got["eos"].choices[0].stop_reason is None  # EOS: no stop_reason, as vLLM
    expected = hf_generate(engine, max_tokens=24, min_new_tokens=6, eos_token_id=eos)
    assert len(expected) > 6
    assert (got["min"].text, got["min"].completion_tokens) == (text_of(engine, [t for t in expected if t != eos]),
                                                               len(expected))
    stopped = got["stop_id"]
    cut = plain.index(plain[3]) + 1
    assert (stopped.text, stopped.finish_reason, stopped.completion_tokens) == (text_of(engine, plain[:cut - 1]),
                                                                                "stop", cut)
    assert stopped.choices[0].stop_reason == plain[3]


@pytest.mark.slow
def test_a_stop_string_is_the_stop_reason(engine):
    free = run(engine, [completion("free")])["free"].text
    stop = free[4:7]
    got = run(engine, [completion("cut", stop=("zzzz", stop))])["cut"]
    assert (got.text, got.finish_reason, got.choices[0].stop_reason) == (free[: free.find(stop)], "stop", stop)
    assert run(engine, [completion("long", max_tokens=3)])["long"].choices[0].stop_reason is None


@pytest.mark.slow
def test_top_k_1_and_min_p_1_sample_what_greedy_picks(engine):
    greedy = run(engine, [completion("g")])["g"].text
    got = run(engine, [completion("k", temperature=1.5, top_k=1, seed=3),
                       completion("p", temperature=1.5, min_p=1.0, seed=4),
                       completion("free", temperature=1.5, seed=3)])
    assert got["k"].text == greedy and got["p"].text == greedy
    assert got["free"].text != greedy  # the same temperature without them does sample


@pytest.mark.slow
def test_n_choices_are_seeded_apart_and_reproducibly(engine):
    params = dict(temperature=1.0, max_tokens=10, seed=42)
    first = run(engine, [completion("n", n=4, **params), completion("one", **params),
                         completion("greedy", n=2, max_tokens=6, temperature=0.0)])
    again = run(engine, [completion("n", OTHER, max_tokens=5), completion("n2", n=4, **params)])
    texts = [c.text for c in first["n"].choices]
    assert len(first["n"].choices) == 4 and len(set(texts)) > 1
    assert texts == [c.text for c in again["n2"].choices]  # reproducible, whatever the batch mates
    assert texts[0] == first["one"].text  # choice 0 keeps the request's seed
    assert first["n"].completion_tokens == sum(c.num_tokens for c in first["n"].choices)
    assert first["greedy"].choices[0].text == first["greedy"].choices[1].text


@pytest.mark.slow
def test_logprobs_are_hf_log_softmax_of_the_same_logits(engine):
    got = run(engine, [completion("lp", max_tokens=6, logprobs=3), completion("sampled", max_tokens=6,
                                                                            temperature=0.8, seed=5, logprobs=0)])
    ids = ids_of(engine)
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=6, eos_token_id=None, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=engine.tokenizer.pad_token_id)
    tokens = out.sequences[0, len(ids):].tolist()
    choice = got["lp"].choices[0]
    assert [t.token for t in choice.logprobs] == [engine.tokenizer.decode([t]) for t in tokens]
    for step, (token, entry) in enumerate(zip(tokens, choice.logprobs, strict=True)):
        oracle = out.logits[step][0].float().log_softmax(-1)
        assert entry.logprob == pytest.approx(oracle[token].item(), abs=2e-3)
        top = oracle.topk(3)
        assert [s for s, _ in entry.top] == [engine.tokenizer.decode([t]) for t in top.indices.tolist()]
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=2e-3)
    sampled = got["sampled"].choices[0].logprobs
    assert len(sampled) == 6 and all(t.top == () and t.logprob <= 0 for t in sampled)
    line = success_line(Request(custom_id="lp", prompt=PROMPT), model="m", prompt_tokens=1,
                        completion_tokens=6, choices=got["lp"].choices)
    Completion.model_validate(line["response"]["body"])


SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["colour", "ok", "size"], "additionalProperties": False}


@pytest.mark.slow
def test_json_schema_output_parses_and_validates(engine):
    schema = json.dumps(SCHEMA)
    got = run(engine, [completion(f"s{i}", prompt, max_tokens=80, temperature=t, seed=i, response_format="json_schema",
                                  json_schema=schema) for i, (prompt, t) in enumerate([(PROMPT, 0.0), (OTHER, 1.0),
                                                                                      (PROMPT, 1.0)])]
                  + [completion("free", max_tokens=20)])
    for key in ("s0", "s1", "s2"):
        assert got[key].finish_reason == "stop", got[key]
        jsonschema.validate(json.loads(got[key].text), SCHEMA)
    with pytest.raises(ValueError):
        json.loads(got["free"].text)  # the same model unconstrained writes no JSON


@pytest.mark.slow
def test_json_object_mode_writes_one_json_object(engine):
    chat = GenerationRequest("chat", Request(custom_id="chat", url=CHAT_URL,
                                             messages=(ChatMessage(role="user", content="reply in json"),),
                                             params=SamplingParams(temperature=0, max_tokens=64,
                                                                   response_format="json_object")))
    got = run(engine, [chat])["chat"]
    assert got.finish_reason == "stop" and isinstance(json.loads(got.text), dict), got


@pytest.mark.slow
def test_a_schema_the_compiler_refuses_and_an_out_of_vocabulary_token_fail_that_request_only(engine):
    bad_schema = json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]})
    rejected = engine.add([completion("schema", response_format="json_schema", json_schema=bad_schema),
                           completion("token", stop_token_ids=(10**6,)), completion("ok", max_tokens=2)])
    assert {r.key: r.error.code for r in rejected} == {"schema": "invalid_value", "token": "invalid_value"}
    assert "response_format.json_schema" in rejected[0].error.message
    assert run(engine, [])["ok"].completion_tokens == 2


@pytest.mark.slow
@pytest.mark.parametrize("how", ["run", "queue"])
def test_run_and_a_queue_worker_write_every_feature_in_openai_types(how, demo_model_dir, redis_url, redis_conn,
                                                                    tmp_path):
    schema = {"name": "pick", "strict": True, "schema": SCHEMA}
    lines = [
        chat_line(n=2, seed=1, max_tokens=80, logprobs=True, top_logprobs=2,
                  response_format={"type": "json_schema", "json_schema": schema}),
        {**completion_line(n=3, seed=2, max_tokens=6, logprobs=1, presence_penalty=1.0, top_k=5, min_p=0.05,
                           repetition_penalty=1.2, min_tokens=2, logit_bias={"5": -100}, stop=["zz"]),
         "custom_id": "b"},
    ]
    src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    serve = ("--model", str(demo_model_dir), "--served-model-name", "demo", "--max-batch", "4")
    if how == "run":
        run_ = batchgen("run", str(src), "-o", str(out), *serve, "--json", redis_url=redis_url, timeout=300)
        assert run_.returncode == 0, run_.stderr[-3000:]
    else:  # stored in Redis as submitted, read back by the worker
        batch_id = json.loads(batchgen("submit", str(src), "--model", "demo", "--json", redis_url=redis_url,
                                       check=True).stdout)["id"]
        worker = start_worker(*serve, "--burst", redis_url=redis_url, log=tmp_path / "worker.log")
        assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        batchgen("results", batch_id, "-o", str(out), redis_url=redis_url, check=True)
    written = {line["custom_id"]: line["response"]["body"] for line in map(json.loads, out.read_text().splitlines())}
    chat, plain = ChatCompletion.model_validate(written["a"]), Completion.model_validate(written["b"])
    assert [c.index for c in chat.choices] == [0, 1] and [c.index for c in plain.choices] == [0, 1, 2]
    for choice in chat.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) + 1 for c in chat.choices)  # + each EOS
    for choice in plain.choices:
        assert len(choice.logprobs.tokens) == 6 and choice.finish_reason == "length" and choice.stop_reason is None
        assert "".join(choice.logprobs.tokens) == choice.text


def mixed_features() -> list[GenerationRequest]:
    schema = json.dumps(SCHEMA)
    return [completion("n", n=3, seed=11, temperature=1.0, max_tokens=12, logprobs=2),
            completion("json", seed=12, temperature=1.0, max_tokens=80, response_format="json_schema",
                       json_schema=schema),
            completion("pen", OTHER, repetition_penalty=1.5, presence_penalty=1.0, min_tokens=4, max_tokens=10),
            completion("plain", OTHER, max_tokens=14)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fast", "generic"])
def test_an_oom_restarts_choices_grammars_and_penalties_and_changes_nothing(kind, model_paths):
    baseline = run(build(model_paths[kind], max_batch_size=4), mixed_features())
    engine = build(model_paths[kind], max_batch_size=4, inject_oom="steps=3,9")
    results = run(engine, mixed_features())
    assert engine.stats().extra["num_ooms"] == 2 and engine.stats().max_batch_size == 1
    assert {k: outline(r) for k, r in results.items()} == {k: outline(r) for k, r in baseline.items()}
    assert len(results["n"].choices) == 3
    for got, expected in zip(results["n"].choices, baseline["n"].choices, strict=True):  # other batch mates:
        assert [t.logprob for t in got.logprobs] == pytest.approx([t.logprob for t in expected.logprobs], abs=1e-4)


def outline(result: GenerationResult) -> list:
    """Each choice as text, finish, stop reason, tokens and the tokens its logprobs name (numbers apart)."""
    return [(c.text, c.finish_reason, c.stop_reason, c.num_tokens,
             c.logprobs and [(t.token, [s for s, _ in t.top]) for t in c.logprobs]) for c in result.choices]


@pytest.mark.slow
def test_an_oom_at_one_row_fails_a_request_once_with_all_its_choices(model_paths):
    engine = build(model_paths["fast"], max_batch_size=1, inject_oom="steps=2")
    results = run(engine, [completion("pair", n=2, seed=1, temperature=1.0, max_tokens=6),
                           completion("solo", max_tokens=3)])
    assert results["pair"].error.code == "out_of_memory" and results["solo"].completion_tokens == 3
    assert engine.num_unfinished == 0
