"""Inputs that used to escape the validator: a traceback instead of a line-numbered error, or a line accepted here
that the enqueue or the worker then could not handle."""

import io
import json
from pathlib import Path

import pytest
from batchgen.jobs.inputs import read_inputs

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def parse(*lines: str) -> list:
    return list(read_inputs(["-"], stdin=io.BytesIO("\n".join(lines).encode("utf-8", "surrogatepass"))))


def batch_line(body: dict, url: str = CHAT, custom_id: str = "r1") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def error_of(line: str) -> tuple[int, str, str]:
    [ok, refused] = parse('{"prompt": "fine"}', line)
    assert ok.ok and refused.error is not None
    return refused.line, refused.error.code, refused.error.message


@pytest.mark.parametrize("line", [
    batch_line({"messages": MESSAGES, "response_format": {"type": ["json_object"]}}),
    batch_line({"messages": MESSAGES, "response_format": {"type": {"json_object": True}}}),
    batch_line({"input": "hi", "text": {"format": {"type": ["text"]}}}, url="/v1/responses"),
])
def test_a_response_format_type_that_is_not_a_string_is_a_line_error(line):
    at, code, message = error_of(line)
    assert (at, code) == (2, "invalid_value") and ".type: must be one of" in message


def test_a_logit_bias_key_past_int_conversion_limit_is_a_line_error():
    key = "9" * 5000  # int() refuses more than 4300 digits
    at, code, message = error_of(batch_line({"messages": MESSAGES, "logit_bias": {key: 1}}))
    assert (at, code) == (2, "invalid_value") and message.startswith("body.logit_bias.999")  # the key, as written
    at, code, message = error_of(batch_line({"messages": MESSAGES, "logit_bias": {"1" * 19: 1}}))
    assert (at, code) == (2, "invalid_value") and message.endswith("keys must be token ids (non-negative integers)")


def test_one_token_named_twice_in_logit_bias_is_refused():
    """"5" and "05" are one token: the engine would add both biases to it (200, past the -100..100 range)."""
    at, code, message = error_of(batch_line({"messages": MESSAGES, "logit_bias": {"5": 100, "05": 100}}))
    assert (at, code, message) == (2, "invalid_value", "body.logit_bias.05: token 5 appears twice")
    [ok] = parse(batch_line({"messages": MESSAGES, "logit_bias": {"7": -1, "05": 2.5}}))
    assert ok.request.params.logit_bias == ((5, 2.5), (7, -1.0))


@pytest.mark.parametrize(("schema_text", "code"), [
    ('{"const": "\\ud800"}', "invalid_encoding"),  # a surrogate escape: the stored request could not be encoded
    ('{"type": "object", "type": "string"}', "duplicate_key"),  # the second one would win silently
    ('{"a": ' * 40 + "1" + "}" * 40, "nesting_too_deep"),
])
@pytest.mark.parametrize("field", ["guided_json", "structured_outputs"])
def test_a_json_schema_given_as_json_text_gets_the_checks_of_the_line(schema_text, code, field):
    body = {"guided_json": schema_text} if field == "guided_json" else {"structured_outputs": {"json": schema_text}}
    at, got, message = error_of(batch_line({"messages": MESSAGES, **body}))
    assert (at, got) == (2, code) and message.startswith(f"body.{field}")


def test_every_accepted_json_schema_text_can_be_stored():
    [ok] = parse(batch_line({"messages": MESSAGES, "guided_json": '{"const": "caf\\u00e9"}'}))
    assert json.loads(ok.request.model_dump_json())["params"]["json_schema"] == '{"const": "café"}'


@pytest.mark.parametrize("line", [
    batch_line({"messages": MESSAGES, "top_k": 10**30}),
    json.dumps({"prompt": "hi", "top_k": 2**63}),
    json.dumps({"custom_id": "a", "params": {"max_tokens": 4, "messages": MESSAGES, "top_k": 10**20}}),
])
def test_a_top_k_past_int64_is_refused_before_it_reaches_the_sampler(line):
    """The sampler moves top_k into an int64 tensor: a larger one raised there, inside an engine step, and took the
    worker (and every row batched with it) down."""
    at, code, message = error_of(line)
    assert (at, code) == (2, "invalid_value") and "top_k: must be < 9223372036854775808" in message


def test_the_largest_accepted_top_k_fits_the_samplers_tensor():
    torch = pytest.importorskip("torch")
    [ok] = parse(json.dumps({"prompt": "hi", "top_k": 2**63 - 1}))
    assert torch.tensor([ok.request.params.top_k], dtype=torch.long).item() == 2**63 - 1


def test_a_default_custom_id_too_long_for_the_schema_is_a_line_error(tmp_path):
    """Two inputs of one file name get their paths as id prefixes; a long path made a default custom_id over 512
    characters, which the Request refused with a pydantic traceback out of read_inputs."""
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200)
    deep.mkdir(parents=True)
    (deep / "x.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "x.jsonl").write_text('{"prompt": "b"}\n')
    (deep / "dir").mkdir()
    (deep / "dir" / "p.txt").write_text("c")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "p.txt").write_text("d")
    lines = list(read_inputs([str(deep / "x.jsonl"), str(tmp_path / "x.jsonl"), str(deep / "dir"),
                              str(tmp_path / "dir")]))
    assert [(p.line, p.error.code if p.error else p.request.prompt) for p in lines] == [
        (1, "invalid_value"), (1, "b"), (1, "invalid_value"), (1, "d")]
    assert lines[0].error.message.startswith("custom_id: at most 512 characters (the line sets none")
    assert Path(lines[3].source).name == "p.txt"


@pytest.mark.parametrize(("line", "message"), [
    (batch_line({"messages": MESSAGES, "max_completion_tokens": 10**6}),
     "body.max_completion_tokens: must be <= 32768"),
    (batch_line({"messages": MESSAGES, "max_completion_tokens": 0}), "body.max_completion_tokens: must be >= 1"),
    (batch_line({"messages": MESSAGES, "max_completion_tokens": "8"}),
     "body.max_completion_tokens: must be an integer"),
    (json.dumps({"custom_id": "a", "params": {"max_tokens": 4, "messages": MESSAGES, "stop_sequences": list("abcde")}}),
     "params.stop_sequences: at most 4 items"),
])
def test_an_error_names_the_field_as_the_line_wrote_it(line, message):
    """A line that sets max_completion_tokens (or Anthropic's stop_sequences) has no max_tokens (stop) to fix: the
    error and its param name the field the line has."""
    [ok, refused] = parse('{"prompt": "fine"}', line)
    assert ok.ok and (refused.error.message, refused.error.param) == (message, message.split(":")[0])
