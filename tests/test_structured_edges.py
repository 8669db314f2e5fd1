"""Structured output at its edges: every completed JSON output parses and validates, on both engine paths, for
length-bounded strings (where xgrammar's own rule admits raw control characters), a schema keyword xgrammar would
ignore is refused up front, and a row whose grammar has ended (ignore_eos) runs on instead of failing the step."""

import json
from pathlib import Path

import jsonschema
import pytest
from batchgen.jobs.schema import SamplingParams
from batchgen.worker.engine.structured import InvalidSchema, StructuredOutput, enforceable
from transformers import AutoTokenizer

from tests.models import write_tiny_model
from tests.test_features import build, completion
from tests.test_llm_engine import run

BOUNDED = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 4},
                                            "n": {"type": "integer"}},
           "required": ["s", "n"], "additionalProperties": False}
SMALL = {"type": "object", "properties": {"a": {"enum": ["x", "yy"]}}, "required": ["a"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_paths(demo_model_dir: Path, tmp_path_factory) -> dict[str, str]:
    return {"fast": str(demo_model_dir),
            "generic": str(write_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2", demo_model_dir))}


@pytest.fixture(scope="module", params=["fast", "generic"])
def engine(request, model_paths: dict[str, str]):
    return build(model_paths[request.param], max_batch_size=6)


@pytest.mark.slow
def test_length_bounded_strings_hold_no_raw_control_characters(engine):
    schema = json.dumps(BOUNDED)
    requests = [completion(f"b{i}", f"prompt {i} " * (1 + i % 5), max_tokens=60, temperature=1.5, seed=i,
                           response_format="json_schema", json_schema=schema) for i in range(12)]
    got = run(engine, requests)
    done = [c.text for r in got.values() for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 6
    for text in done:
        jsonschema.validate(json.loads(text), BOUNDED)


@pytest.mark.slow
def test_ignore_eos_runs_a_finished_grammar_on_without_failing_its_batch(engine):
    got = run(engine, [completion("ign", max_tokens=15, ignore_eos=True, response_format="json_schema",
                                  json_schema=json.dumps(SMALL)),
                       completion("mate", max_tokens=40, response_format="json_schema", json_schema=json.dumps(SMALL))])
    assert got["ign"].finish_reason == "length" and got["ign"].completion_tokens == 15
    assert got["ign"].text.startswith(('{"a": "x"}', '{"a": "yy"}'))
    assert got["mate"].finish_reason == "stop"
    jsonschema.validate(json.loads(got["mate"].text), SMALL)


@pytest.fixture(scope="module")
def structured(demo_model_dir: Path) -> StructuredOutput:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    return StructuredOutput(tokenizer, vocab_size=len(tokenizer), eos_ids=frozenset({tokenizer.eos_token_id}))


def matcher(structured: StructuredOutput, schema: dict):
    return structured.matcher(SamplingParams(response_format="json_schema", json_schema=json.dumps(schema)))


@pytest.mark.parametrize("schema, reason", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"l": {"type": "array", "contains": {"const": 5}}}}, "contains"),
    ({"type": "object", "properties": {"s": {"not": {"const": 1}}}}, "not"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 2}, "pattern with minLength or maxLength"),
])
def test_keywords_xgrammar_would_ignore_are_refused(structured, schema, reason):
    with pytest.raises(InvalidSchema, match=reason):
        matcher(structured, schema)


def test_property_names_and_values_that_look_like_keywords_are_left_alone(structured):
    schema = {"type": "object", "properties": {"not": {"type": "boolean"}, "e": {"enum": [{"uniqueItems": 1}]}},
              "$defs": {"contains": {"type": "integer"}}}
    assert enforceable(schema) == schema
    assert matcher(structured, schema).accept_string('{"not": true}')


@pytest.mark.parametrize("value, ok", [("abcd", True), ("é😀", True), ("", False), ("abcde", False),
                                       ("a\x07", False), ("\x1f", False)])
def test_bounded_strings_keep_their_length_and_refuse_control_characters(structured, value, ok):
    assert matcher(structured, BOUNDED).accept_string(f'{{"s": "{value}", "n": 1}}') is ok


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_past_the_grammars_end_ends_the_output_instead_of_padding_it(engine, temperature):
    got = run(engine, [completion("min", max_tokens=30, min_tokens=15, temperature=temperature, seed=1,
                                  skip_special_tokens=False, response_format="json_schema",
                                  json_schema=json.dumps(SMALL))])["min"]
    assert got.finish_reason == "stop"
    jsonschema.validate(json.loads(got.text), SMALL)  # no filler token (id 0, here <unk>) after the object
