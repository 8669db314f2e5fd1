"""vLLM's request fields that a run-batch file carries: structured outputs (guided_choice / _regex / _grammar /
_json and the newer structured_outputs object), the chat template's options (chat_template_kwargs,
add_generation_prompt, continue_final_message), include_stop_str_in_output and skip_special_tokens."""

import json
import re

import pytest
from batchgen.jobs.schema import SamplingParams
from batchgen.worker.engine.requests import Finisher, prompt_ids
from transformers import AutoTokenizer

from tests.cli import batchgen
from tests.test_strict_input import parse

CHOICES = ["positive", "negative", "neutral"]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**body) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "Classify: great film"}], **body})


@pytest.mark.parametrize(("body", "kind", "guide"), [
    ({"guided_choice": CHOICES}, "choice", json.dumps(CHOICES)),
    ({"guided_regex": "[0-9]{3}"}, "regex", "[0-9]{3}"),
    ({"guided_grammar": 'root ::= "a" | "b"'}, "grammar", 'root ::= "a" | "b"'),
    ({"structured_outputs": {"choice": CHOICES}}, "choice", json.dumps(CHOICES)),
    ({"structured_outputs": {"regex": "x+", "grammar": None}}, "regex", "x+"),
    ({"guided_choice": CHOICES, "response_format": {"type": "text"}}, "choice", json.dumps(CHOICES)),
])
def test_structured_outputs_are_stored_as_their_constraint(body, kind, guide):
    [line] = parse(chat(**body))
    assert (line.request.params.response_format, line.request.params.guide) == (kind, guide)


@pytest.mark.parametrize("body", [{"guided_json": SCHEMA}, {"guided_json": json.dumps(SCHEMA)},
                                  {"structured_outputs": {"json": SCHEMA}}])
def test_guided_json_is_the_json_schema_mode(body):
    [line] = parse(chat(**body))
    params = line.request.params
    assert params.response_format == "json_schema" and json.loads(params.json_schema) == SCHEMA


@pytest.mark.parametrize(("body", "code", "message"), [
    ({"guided_choice": CHOICES, "guided_regex": "a"}, "invalid_value", "guided_regex, guided_choice: give only one"),
    ({"guided_choice": CHOICES, "response_format": {"type": "json_object"}}, "invalid_value",
     "response_format, guided_choice: give only one"),
    ({"guided_choice": []}, "invalid_value", "guided_choice: must be a non-empty list of non-empty strings"),
    ({"guided_choice": ["a", ""]}, "invalid_value", "guided_choice: must be a non-empty list of non-empty strings"),
    ({"guided_regex": 3}, "invalid_type", "guided_regex: must be a non-empty string"),
    ({"guided_json": "{not json"}, "invalid_value", "guided_json: not valid JSON"),
    ({"guided_json": [1]}, "invalid_type", "guided_json: must be an object (a JSON Schema)"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "unsupported_parameter",
     "structured_outputs.whitespace_pattern: not supported"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "invalid_value",
     "structured_outputs: give exactly one of json, regex, choice, grammar"),
    ({"chat_template_kwargs": {"tokenize": True}}, "unsupported_parameter",
     "chat_template_kwargs.tokenize: not a template variable (it is apply_chat_template's own parameter)"),
    ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "unsupported_parameter",
     "chat_template_kwargs.chat_template: not a template variable (it is apply_chat_template's own parameter)"),
    ({"chat_template_kwargs": {"a-b": 1}}, "invalid_value", "chat_template_kwargs.a-b: must be a template variable name"),
    ({"chat_template_kwargs": []}, "invalid_type", "chat_template_kwargs: must be an object, not an array"),
    ({"continue_final_message": True}, "invalid_value",
     "continue_final_message: needs a final assistant message to continue"),
    ({"add_generation_prompt": "no"}, "invalid_type", "add_generation_prompt: must be true or false"),
    ({"include_stop_str_in_output": 1}, "invalid_type", "include_stop_str_in_output: must be true or false"),
])
def test_a_bad_vllm_field_is_refused_by_name(body, code, message):
    [refused] = parse(chat(**body))
    assert refused.error.code == code and refused.error.message.startswith(message)  # JSON's reason follows


def test_chat_template_fields_are_chat_only():
    [refused] = parse(json.dumps({"prompt": "x", "chat_template_kwargs": {"enable_thinking": False}}))
    assert (refused.error.code, refused.error.message) == ("unsupported_parameter", "chat_template_kwargs: chat only")


def test_chat_template_kwargs_reach_the_template_and_continue_final_message_continues(demo_model_dir):
    """A variable the template reads (as Qwen3's enable_thinking) changes the prompt; continue_final_message leaves
    the assistant's turn open (vLLM's add_generation_prompt: false beside it is accepted too)."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}"
                               "{% if thinking is defined and not thinking %}/no_think{% endif %}")
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello th"}]
    lines = parse(chat(chat_template_kwargs={"thinking": False}), chat(),
                  json.dumps({"messages": turns, "continue_final_message": True}),
                  json.dumps({"messages": turns, "continue_final_message": True, "add_generation_prompt": False}),
                  json.dumps({"messages": turns[:1], "add_generation_prompt": False}))
    texts = [tokenizer.decode(prompt_ids(tokenizer, line.request, "demo"), skip_special_tokens=True)
             for line in lines]
    assert texts[0] == "<user>Classify: great film<assistant>/no_think"
    assert texts[1] == "<user>Classify: great film<assistant>"
    assert texts[2] == texts[3] == "<user>hi<assistant>Hello th"
    assert texts[4] == "<user>hi"


def test_skip_special_tokens_false_keeps_them_in_the_text(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    ids = [tokenizer.bos_token_id, *tokenizer("hello world", add_special_tokens=False)["input_ids"]]
    finisher = Finisher(tokenizer, frozenset())
    kept = finisher.decode(ids, SamplingParams(skip_special_tokens=False))
    assert tokenizer.bos_token in kept and tokenizer.bos_token not in finisher.decode(ids, SamplingParams())


def test_the_8bit_model_answers_inside_each_constraint(demo_model_dir, tmp_path):
    """`batchgen run` on the 8-bit demo model, sampled (a random model follows no constraint by itself): every
    answer is one of the choices, matches the regex or the grammar; a stop string forced by a regex ends the
    text with or without itself; a regex xgrammar cannot compile fails that line only."""
    rows = [{"custom_id": f"c{s}", "messages": [{"role": "user", "content": "Classify: great film"}],
             "guided_choice": CHOICES, "seed": s, "max_tokens": 8} for s in range(3)]
    rows += [{"custom_id": f"r{s}", "prompt": "code:", "guided_regex": "[0-9]{3}-[a-z]{2,4}", "seed": s,
              "max_tokens": 16} for s in range(3)]
    rows += [{"custom_id": "g", "prompt": "pair:", "structured_outputs": {"grammar": 'root ::= "(" [0-9] "," [0-9] ")"'},
              "seed": 1, "max_tokens": 12},
             {"custom_id": "stop", "prompt": "x", "guided_regex": "abc;def", "stop": [";"], "max_tokens": 12},
             {"custom_id": "stop+", "prompt": "x", "guided_regex": "abc;def", "stop": [";"], "max_tokens": 12,
              "include_stop_str_in_output": True},
             {"custom_id": "bad", "prompt": "x", "guided_regex": "[a-"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batchgen("run", str(src), "-o", str(out), "--errors", str(out), "--model", str(demo_model_dir), "--temperature",
             "1", redis_url="x", check=True)
    lines = {line["custom_id"]: line for line in map(json.loads, out.read_text().splitlines())}

    def text(cid: str) -> str:
        choice = lines[cid]["response"]["body"]["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]

    assert all(text(f"c{s}") in CHOICES for s in range(3))
    assert all(re.fullmatch("[0-9]{3}-[a-z]{2,4}", text(f"r{s}")) for s in range(3))
    assert re.fullmatch(r"\([0-9],[0-9]\)", text("g"))
    assert (text("stop"), text("stop+")) == ("abc", "abc;")
    error = lines["bad"]["response"]["body"]["error"]
    assert error["code"] == "invalid_value" and error["message"].startswith("regex: Regex parsing error")
