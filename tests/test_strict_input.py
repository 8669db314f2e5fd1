"""Strict input: what a user wrote is run as written or refused with a line number, never silently dropped.

One reader (batchgen.jobs.inputs) serves `submit`, `run` and the worker's stored requests, so a file gets
one verdict everywhere: a line that passes never fails later because of its form, and a line that fails
never blocks the valid lines next to it under --skip-invalid.
"""

import io
import json
import os
from pathlib import Path

import pytest
from batchgen.jobs.inputs import read_inputs
from batchgen.jobs.schema import ChatMessage
from pydantic import ValidationError

from tests.cli import batchgen, start_worker
from tests.conftest import data_keys

CHAT = "/v1/chat/completions"


def parse(*lines: str, name: str = "-", tmp_path: Path | None = None):
    """The ParsedLines of the given input lines, from stdin or from a file called name."""
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    if tmp_path is None:
        return list(read_inputs(["-"], stdin=io.BytesIO(data)))
    (tmp_path / name).write_bytes(data)
    return list(read_inputs([str(tmp_path / name)]))


def verdicts(lines):
    return [(p.line, p.error.code if p.error else "ok") for p in lines]


def batch_line(body, custom_id="r1", url=CHAT, **envelope) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **envelope})


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]  # strict UTF-8


# -- 1: nothing that cannot be encoded is echoed, so one bad line never blocks the valid results -----------

SURROGATE_ID = ['{"prompt": "ok"}', '{"custom_id": "id-\\ud800", "prompt": "x"}']


def test_a_surrogate_custom_id_leaves_run_skip_invalid_results_writable(tmp_path):
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    proc = batchgen("run", write_lines(tmp_path / "s.jsonl", SURROGATE_ID), "--model", "demo", "--engine", "echo",
                    "--skip-invalid", "-o", str(out), "--errors", str(errors), "--json", redis_url="redis://unused")
    assert proc.returncode == 0, proc.stderr
    assert [line["custom_id"] for line in read_jsonl(out)] == ["1"]
    [error] = read_jsonl(errors)
    assert error["response"]["body"]["error"]["code"] == "invalid_encoding"
    assert error["response"]["body"]["error"]["message"].startswith("line 2: custom_id: contains a lone surrogate (\\ud800")


def test_a_surrogate_custom_id_leaves_a_queued_batch_exportable(redis_url, redis_conn, tmp_path):
    sub = batchgen("submit", write_lines(tmp_path / "s.jsonl", SURROGATE_ID), "--model", "demo", "--skip-invalid",
                   "--json", redis_url=redis_url, check=True)
    batch = json.loads(sub.stdout)
    worker = start_worker("--model", "demo", "--engine", "echo", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    exported = batchgen("results", batch["id"], "-o", str(out), "--errors", str(errors), "--json",
                        redis_url=redis_url)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["results"] == 1
    assert [line["custom_id"] for line in read_jsonl(out)] == ["1"]
    assert [line["response"]["body"]["error"]["code"] for line in read_jsonl(errors)] == ["invalid_encoding"]


# -- 6: one validator, one answer, with a line number -----------------------------------------------------

def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


DISAGREEING = [
    batch_line({"messages": [{"role": "user", "content": "fine"}]}, custom_id="ok"),
    batch_line({"messages": [{"role": "user", "content": "x", "extra": "DEEP"}]}, "d250").replace(
        '"DEEP"', nested(250)),
    batch_line({"messages": [{"role": "user", "content": "DEEP"}]}, "d400").replace('"DEEP"', nested(400)),
    batch_line({"model": "demo\ud800", "messages": [{"role": "user", "content": "x"}]}, "model-surrogate"),
    batch_line({"messages": [{"role": "user", "content": "x \udfff"}]}, "content-surrogate"),
]
VERDICT = [":2: nesting_too_deep", ":3: nesting_too_deep", ":4: invalid_encoding", ":5: invalid_encoding"]


def test_deep_nesting_and_surrogates_get_one_verdict_from_submit_run_and_the_worker(
        redis_url, redis_conn, tmp_path):
    path = write_lines(tmp_path / "deep.jsonl", DISAGREEING)
    submitted = batchgen("submit", path, "--model", "demo", redis_url=redis_url)
    assert submitted.returncode == 3, submitted.stderr
    assert all(where in submitted.stderr.decode() for where in VERDICT), submitted.stderr
    assert data_keys(redis_conn) == []
    ran = batchgen("run", path, "--model", "demo", "--engine", "echo", "-o", str(tmp_path / "run.jsonl"),
                   redis_url="redis://unused")
    assert ran.returncode == 3, ran.stderr
    assert all(where in ran.stderr.decode() for where in VERDICT), ran.stderr

    sub = batchgen("submit", path, "--model", "demo", "--skip-invalid", "--json", redis_url=redis_url, check=True)
    batch_id = json.loads(sub.stdout)["id"]
    worker = start_worker("--model", "demo", "--engine", "echo", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    batchgen("results", batch_id, "-o", str(out), "--errors", str(errors), "--ordered", redis_url=redis_url,
             check=True)
    assert [line["custom_id"] for line in read_jsonl(out)] == ["ok"]
    assert [(e["custom_id"], e["response"]["body"]["error"]["code"], e["response"]["body"]["error"]["message"].split(":")[0]) for e in read_jsonl(errors)] == [
        ("d250", "nesting_too_deep", "line 2"), ("d400", "nesting_too_deep", "line 3"),
        ("model-surrogate", "invalid_encoding", "line 4"), ("content-surrogate", "invalid_encoding", "line 5")]


def test_nesting_is_bounded_without_recursion_and_named_by_field():
    [deep, very_deep] = parse(DISAGREEING[1], '{"prompt": ' + nested(100_000) + "}")
    assert deep.error.message == "body.messages.0.extra.0.0.0.0.…: nested deeper than 32 levels"
    assert (very_deep.error.code, very_deep.line) == ("nesting_too_deep", 2)


# -- 5: what the user wrote is never silently dropped or misread -------------------------------------------

COMPLETION = {"model": "m", "prompt": "p"}


@pytest.mark.parametrize(("line", "code", "message"), [
    (batch_line(COMPLETION, url="/v1/completions", max_tokens=5), "misplaced_parameter",
     "max_tokens: belongs inside body (body.max_tokens), not next to it"),
    (batch_line(COMPLETION, url="/v1/completions", temperature=0), "misplaced_parameter",
     "temperature: belongs inside body (body.temperature), not next to it"),
    (batch_line({"prompt": "p"}, url="/v1/completions", model="m"), "misplaced_parameter",
     "model: belongs inside body (body.model), not next to it"),
    (batch_line(COMPLETION, url="/v1/completions").replace('"body"', '"bodyy"'), "unsupported_parameter",
     "bodyy: unknown field; a batch line has only custom_id, method, url and body"),
    ('{"prompt": "a", "max_tokens": 4, "max_tokens": 400}', "duplicate_key",
     "max_tokens: the key appears twice (JSON keys must be unique)"),
    (batch_line({"messages": [{"role": "user", "content": "a"}]}).replace('"content": "a"',
                                                                          '"content": "a", "content": "b"'),
     "duplicate_key", "body.messages.0.content: the key appears twice (JSON keys must be unique)"),
    (batch_line({"messages": [{"role": "user", "content": "a", "name": "bob"}]}), "unsupported_parameter",
     "body.messages.0.name: not supported; a message has only role and content"),
    (batch_line({"messages": [{"role": "assistant", "content": "a", "tool_calls": []}]}), "unsupported_parameter",
     "body.messages.0.tool_calls: not supported; a message has only role and content"),
    (batch_line({"messages": [{"role": "tool", "content": "4", "tool_call_id": "c1"}]}), "unsupported_parameter",
     "body.messages.0.tool_call_id: not supported; a message has only role and content"),
    (batch_line({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
     "unsupported_parameter", "body.messages.0.content.1: image_url parts are not supported (text parts only)"),
])
def test_ignored_or_misplaced_fields_are_refused_by_field_path(line, code, message):
    [ok, refused] = parse('{"prompt": "fine"}', line)
    assert ok.ok and (refused.line, refused.error.code, refused.error.message) == (2, code, message)


def test_a_json_array_without_a_json_suffix_is_refused_not_read_as_one_prompt(tmp_path):
    assert verdicts(parse('[{"prompt": "a"}, {"prompt": "b"}]', name="queue", tmp_path=tmp_path)) == [
        (1, "invalid_type")]
    pretty = parse("[", '  {"prompt": "a"}', "]", name="pretty", tmp_path=tmp_path)
    assert verdicts(pretty)[0] == (1, "invalid_json") and "not JSONL" in pretty[0].error.message
    assert verdicts(parse('[{"prompt": "a"}]')) == [(1, "invalid_type")]  # stdin sniffs the same way


def test_a_text_prompt_that_starts_with_a_bracket_is_still_a_prompt():
    lines = parse("[INST] write a haiku [/INST]", "[1] second prompt")
    assert [p.request.prompt for p in lines] == ["[INST] write a haiku [/INST]", "[1] second prompt"]


def test_a_stored_message_has_only_role_and_content():
    """The worker hands model_dump() of each message to the chat template: nothing else may ride along."""
    with pytest.raises(ValidationError, match="name"):
        ChatMessage.model_validate({"role": "user", "content": "a", "name": "bob"})


# -- 10: one rule for empty prompts -------------------------------------------------------------------------

BLANKS = ["", "   ", "\n\n", "\u0000", "\t\u200b\ufeff", "\u0007"]


@pytest.mark.parametrize("blank", BLANKS)
def test_a_blank_prompt_is_refused_in_every_form_with_one_code(blank, tmp_path):
    lines = [
        json.dumps({"prompt": blank}),
        batch_line({"prompt": [blank]}, url="/v1/completions"),
        json.dumps({"messages": [{"role": "user", "content": blank}]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": blank}]}]}),
        json.dumps({"messages": [{"role": "system", "content": blank}, {"role": "user", "content": blank}]}),
    ]
    parsed = parse(*lines)
    assert verdicts(parsed) == [(n, "invalid_value") for n in range(1, 6)]
    assert all("must not be empty" in p.error.message for p in parsed)
    if blank.strip() and "\x00" not in blank:  # in files: whitespace-only lines separate, a NUL byte is binary
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.txt").write_text(blank)
        (tmp_path / "t.txt").write_text(f"fine\n{blank}\n")
        [in_dir] = read_inputs([str(tmp_path / "d")])
        assert (in_dir.error.code, in_dir.error.message.split(":")[0]) == ("invalid_value", "prompt")
        assert verdicts(read_inputs([str(tmp_path / "t.txt")])) == [(1, "ok"), (2, "invalid_value")]


def test_a_chat_with_one_blank_message_is_refused_at_that_message():
    [parsed] = parse(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": " \n"}]}))
    assert parsed.error.message.startswith("messages.1.content: must not be empty")


@pytest.mark.parametrize("prompt", ["0", ".", "\u00a0x", "é", "\U0001f600", " padded "])
def test_any_visible_character_makes_a_prompt(prompt):
    [parsed] = parse(json.dumps({"prompt": prompt}))
    assert parsed.request.prompt == prompt


# -- 7: directories and file names --------------------------------------------------------------------------

def test_directory_prompts_match_the_txt_suffix_in_any_case(tmp_path):
    for name in ("a.txt", "B.TXT", "c.Txt", "notes.md", ".hidden.txt"):
        (tmp_path / name).write_text(f"prompt {name}")
    assert [p.custom_id for p in read_inputs([str(tmp_path)])] == ["B.TXT", "a.txt", "c.Txt"]


def test_a_symlink_loop_in_a_directory_is_named_and_the_rest_is_read(tmp_path):
    (tmp_path / "a.txt").write_text("a prompt")
    os.symlink("loop.txt", tmp_path / "loop.txt")
    os.symlink("other", tmp_path / "other")  # not a *.txt entry: never looked at
    ok, loop = read_inputs([str(tmp_path)])
    assert ok.request.prompt == "a prompt"
    assert (loop.custom_id, loop.error.code) == ("loop.txt", "unreadable_input")
    assert loop.error.message == "loop.txt: Too many levels of symbolic links"


def test_the_same_input_given_twice_is_read_once(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a prompt")
    (tmp_path / "x.jsonl").write_text('{"prompt": "x"}\n')
    paths = [str(tmp_path / "d"), str(tmp_path / "d") + "/", str(tmp_path / "x.jsonl"),
             str(tmp_path / "d" / ".." / "x.jsonl")]
    assert [p.custom_id for p in read_inputs(paths)] == ["d/a.txt", "x.jsonl:1"]


def test_a_file_name_that_is_not_utf8_is_a_clear_error(tmp_path):
    name = os.fsdecode(b"\xff.jsonl")
    (tmp_path / name).write_text('{"prompt": "x"}\n')
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a prompt")
    (tmp_path / "d" / os.fsdecode(b"caf\xe9.txt")).write_text("latin-1 name")
    file_error, ok, dir_error = read_inputs([str(tmp_path / name), str(tmp_path / "d")])
    assert (file_error.line, file_error.error.code) == (0, "invalid_file_name")
    assert file_error.error.message.endswith("\\xff.jsonl: the file name is not valid UTF-8; rename the file")
    assert ok.custom_id == "d/a.txt"
    assert (dir_error.custom_id, dir_error.error.code) == ("d/caf\\xe9.txt", "invalid_file_name")
    for parsed in (file_error, dir_error):  # everything echoed is storable text
        (parsed.source + parsed.custom_id + parsed.error.model_dump_json()).encode("utf-8")


def test_run_names_an_undecodable_file_instead_of_failing_on_a_codec(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / os.fsdecode(b"\xfe.txt")).write_text("hello")
    proc = batchgen("run", str(tmp_path / "d"), "--model", "demo", "--engine", "echo", "-o",
                    str(tmp_path / "out.jsonl"), redis_url="redis://unused")
    assert proc.returncode == 3, proc.stderr
    assert b"invalid_file_name: \\xfe.txt: the file name is not valid UTF-8" in proc.stderr


RESPONSES = "/v1/responses"


def test_a_responses_line_is_the_chat_request_it_amounts_to():
    """OpenAI's Responses API: instructions become a system message ahead of input, max_output_tokens max_tokens,
    text.format response_format's JSON modes."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    [line, parts] = parse(
        batch_line({"model": "m", "input": "Say hi", "instructions": "Be brief", "max_output_tokens": 20,
                    "temperature": 0.5, "top_p": 0.9, "store": True,
                    "text": {"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}}},
                   url=RESPONSES),
        batch_line({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                            {"type": "input_text", "text": "b"}]},
                              {"type": "message", "role": "assistant", "content": "ok"},
                              {"role": "developer", "content": "go on"}]}, custom_id="r2", url=RESPONSES))
    request = line.request
    assert request.url == RESPONSES and [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief"), ("user", "Say hi")]
    params = request.params
    assert (params.max_tokens, params.temperature, params.top_p) == (20, 0.5, 0.9)
    assert params.response_format == "json_schema" and json.loads(params.json_schema) == schema
    assert [(m.role, m.content) for m in parts.request.messages] == [
        ("user", "a\nb"), ("assistant", "ok"), ("developer", "go on")]


@pytest.mark.parametrize(("body", "code", "message"), [
    ({"model": "m"}, "missing_field", "body.input: required"),
    ({"input": "x", "n": 2}, "unsupported_parameter", "body.n: unknown parameter"),
    ({"input": "x", "max_tokens": 5}, "unsupported_parameter", "body.max_tokens: unknown parameter"),
    ({"input": "x", "max_output_tokens": 0}, "invalid_value", "body.max_output_tokens: must be between 1 and 32768"),
    ({"input": "x", "stream": True}, "unsupported_parameter", "body.stream: only False is supported"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "unsupported_parameter", "body.tools: only [] is supported"),
    ({"input": " "}, "invalid_value",
     "body.input: must not be empty (it has only whitespace or control characters)"),
    ({"input": []}, "invalid_value", "body.input: must not be empty"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "unsupported_parameter", "body.input.0.content.0: input_image parts are not supported (input_text parts only)"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]}, "unsupported_parameter",
     "body.input.0.call_id: not supported; an input message has only type, role and content"),
    ({"input": [{"role": "tool", "content": "4"}]}, "invalid_value",
     "body.input.0.role: must be one of user, system, developer, assistant"),
    ({"input": "x", "instructions": 3}, "invalid_type", "body.instructions: must be a string"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "missing_field",
     "body.text.format.name: required, a non-empty string"),
    ({"input": "x", "text": {"verbosity": "low"}}, "unsupported_parameter", "body.text.verbosity: not supported"),
    ({"input": "x", "temperature": 3}, "invalid_value", "body.temperature: must be <= 2"),
])
def test_a_bad_responses_line_is_refused_by_its_own_field_names(body, code, message):
    [ok, refused] = parse('{"prompt": "fine"}', batch_line(body, url=RESPONSES))
    assert ok.ok and (refused.line, refused.error.code, refused.error.message) == (2, code, message)


def test_an_unknown_url_names_the_four_endpoints():
    [refused] = parse(batch_line({"input": "x"}, url="/v1/moderations"))
    assert refused.error.code == "unknown_url" and refused.error.message == (
        "url: must be one of /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, not "
        "'/v1/moderations'")
