"""What a user moving an Anthropic Message Batches script over meets: {"custom_id", "params"} lines are read as
the Messages API reads them, and a batch of them answers in Anthropic's result shape (validated as the anthropic
package's own types) from `run`, from a worker's files and from `results`."""

import json

import pytest
from anthropic.types import Message
from anthropic.types.messages import MessageBatchIndividualResponse
from batchgen.jobs.message_batch import result_line
from batchgen.jobs.schema import Choice, error_line, success_line
from batchgen.producer.client import BatchClient
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.engine.requests import prompt_ids
from batchgen.worker.worker import BatchWorker
from transformers import AutoTokenizer

from tests.cli import batchgen
from tests.test_strict_input import parse

MESSAGES = "/v1/messages"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def anthropic_line(params, custom_id="r1", **extra) -> str:
    return json.dumps({"custom_id": custom_id, "params": params, **extra})


def test_a_message_batches_request_is_the_chat_request_it_amounts_to():
    """system leads as a system message, text blocks join, stop_sequences are stop strings, output_config.format
    the JSON schema mode; cache_control marks and metadata change nothing and are accepted."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    [line, blocks] = parse(
        anthropic_line({"model": "m", "max_tokens": 20, "system": "Be brief", "temperature": 0.5, "top_p": 0.9,
                        "top_k": 5, "stop_sequences": ["\n\n", "END"], "metadata": {"user_id": "u"},
                        "messages": [{"role": "user", "content": "Say hi"}],
                        "output_config": {"format": {"type": "json_schema", "schema": schema}}}),
        anthropic_line({"max_tokens": 5, "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
                        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                  {"type": "text", "text": "b", "citations": None}]},
                                     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "go on"}]},
                       custom_id="r2"))
    request = line.request
    assert request.url == MESSAGES and [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief"), ("user", "Say hi")]
    params = request.params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (20, 0.5, 0.9, 5)
    assert params.stop == ("\n\n", "END") and line.ignored == ("metadata",)
    assert params.response_format == "json_schema" and json.loads(params.json_schema) == schema
    assert [(m.role, m.content) for m in blocks.request.messages] == [
        ("system", "S"), ("user", "a\nb"), ("assistant", "ok"), ("user", "go on")]


@pytest.mark.parametrize(("line", "code", "message"), [
    ({"params": {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}}, "missing_field",
     "custom_id: required"),
    ({"custom_id": "r", "params": {"messages": [{"role": "user", "content": "x"}]}}, "missing_field",
     "params.max_tokens: required"),
    ({"custom_id": "r", "params": {"max_tokens": 5}}, "missing_field", "params.messages: required"),
    ({"custom_id": "r", "params": [1]}, "invalid_type", "params: must be an object, not an array"),
    ({"custom_id": "r", "max_tokens": 5, "params": {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}},
     "misplaced_parameter", "max_tokens: belongs inside params (params.max_tokens), not next to it"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}},
     "invalid_value", "params.messages.0.role: must be 'user' or 'assistant' (the system prompt is params.system)"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "temperature": 1.5,
                                   "messages": [{"role": "user", "content": "x"}]}},
     "invalid_value", "params.temperature: must be <= 1"),
    ({"custom_id": "r", "params": {"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}},
     "invalid_value", "params.max_tokens: must be >= 1"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]}},
     "unsupported_parameter", "params.messages.0.content.0: image parts are not supported (text parts only)"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "tools": [{"name": "f", "input_schema": {}}],
                                   "messages": [{"role": "user", "content": "x"}]}},
     "unsupported_parameter", "params.tools: only [] is supported"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "thinking": {"type": "enabled", "budget_tokens": 1024},
                                   "messages": [{"role": "user", "content": "x"}]}},
     "unsupported_parameter", "params.thinking: only {'type': 'disabled'} is supported"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "n": 2, "messages": [{"role": "user", "content": "x"}]}},
     "unsupported_parameter", "params.n: unknown parameter"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "stop_sequences": [""],
                                   "messages": [{"role": "user", "content": "x"}]}},
     "invalid_value", "params.stop_sequences: stop sequences must not be empty"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "output_config": {"format": {"type": "text"}},
                                   "messages": [{"role": "user", "content": "x"}]}},
     "invalid_value", "params.output_config.format.type: must be 'json_schema'"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "output_config": {"effort": "high"},
                                   "messages": [{"role": "user", "content": "x"}]}},
     "unsupported_parameter", "params.output_config.effort: not supported"),
    ({"custom_id": "r", "params": {"max_tokens": 5, "messages": [{"role": "user", "content": " "}]}}, "invalid_value",
     "params.messages.0.content: must not be empty (it has only whitespace or control characters)"),
])
def test_a_bad_message_batches_request_is_refused_by_its_own_field_names(line, code, message):
    [ok, refused] = parse('{"prompt": "fine"}', json.dumps(line))
    assert ok.ok and (refused.line, refused.error.code, refused.error.message) == (2, code, message)


def test_a_final_assistant_message_is_a_prefill_the_reply_continues(demo_model_dir):
    """Anthropic's prefill: the prompt ends inside the assistant's turn, with no new turn opened after it."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    [line] = parse(anthropic_line({"max_tokens": 5, "messages": [{"role": "user", "content": "Name a colour."},
                                                                 {"role": "assistant", "content": "The colour is"}]}))
    text = tokenizer.decode(prompt_ids(tokenizer, line.request, "demo"))
    assert text.rstrip().endswith("The colour is")
    answered = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    closed = tokenizer.apply_chat_template(answered, add_generation_prompt=True, tokenize=False)
    assert text != closed and closed.startswith(text.rstrip())  # the open turn is a prefix of the closed one


def test_run_answers_a_message_batches_file_in_anthropics_result_shape(demo_model_dir, tmp_path):
    """On the 8-bit demo model: each line validates as the anthropic package's MessageBatchIndividualResponse, its
    text and usage are the chat twin's, max_tokens ends as stop_reason max_tokens; a refused line (under
    --skip-invalid) is an errored result naming its field."""
    system, ask = "Answer briefly.", "the quick brown fox"
    rows = [{"custom_id": f"a{n}", "params": {"model": "m", "max_tokens": n, "temperature": 0, "system": system,
                                              "messages": [{"role": "user", "content": ask}]}} for n in (1, 12)]
    rows.append({"custom_id": "bad", "params": {"max_tokens": 3, "temperature": 2,
                                                "messages": [{"role": "user", "content": ask}]}})
    chat = [{"role": "system", "content": system}, {"role": "user", "content": ask}]
    twins = [{"custom_id": f"c{n}", "messages": chat, "max_tokens": n, "temperature": 0} for n in (1, 12)]
    out, twin_out = tmp_path / "out.jsonl", tmp_path / "twin.jsonl"
    batchgen("run", write_jsonl(tmp_path / "in.jsonl", rows), "-o", str(out), "--errors", str(out), "--skip-invalid",
             "--model", str(demo_model_dir), redis_url="x", check=True)
    batchgen("run", write_jsonl(tmp_path / "twin.jsonl", twins), "-o", str(twin_out), "--model", str(demo_model_dir),
             redis_url="x", check=True)
    lines = {line["custom_id"]: MessageBatchIndividualResponse.model_validate(line) for line in read_jsonl(out)}
    twin = {line["custom_id"]: line["response"]["body"] for line in read_jsonl(twin_out)}
    assert sorted(lines) == ["a1", "a12", "bad"]
    for n in (1, 12):
        result = lines[f"a{n}"].result
        assert result.type == "succeeded"
        message, choice = result.message, twin[f"c{n}"]["choices"][0]
        assert [block.text for block in message.content] == [choice["message"]["content"]]
        assert (message.usage.input_tokens, message.usage.output_tokens) == (
            twin[f"c{n}"]["usage"]["prompt_tokens"], twin[f"c{n}"]["usage"]["completion_tokens"])
        assert message.stop_reason == ("max_tokens" if choice["finish_reason"] == "length" else "end_turn")
    assert lines["a1"].result.message.stop_reason == "max_tokens"
    refused = lines["bad"].result
    assert refused.type == "errored" and refused.error.error.type == "invalid_request_error"
    assert "params.temperature: must be <= 1" in refused.error.error.message


def test_a_workers_files_and_results_answer_a_message_batch_in_anthropics_shape(redis_conn, tmp_path):
    """Through Redis and a worker (echo engine): the batch's files on disk and `results` hold Anthropic's
    lines; cancelled requests are canceled results."""
    rows = [{"custom_id": "s", "params": {"max_tokens": 8,
                                          "messages": [{"role": "user", "content": "the quick brown fox"}]}},
            {"custom_id": "l", "params": {"max_tokens": 2, "messages": [{"role": "user", "content": "one two three"}]}}]
    client = BatchClient(connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m",
                          output_dir=str(tmp_path / "out")).batch
    assert batch.endpoint == MESSAGES
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    assert BatchWorker(cfg, EchoEngine("echo-m"), redis_conn).run() == 2
    on_disk = read_jsonl(tmp_path / "out" / f"{batch.id}.output.jsonl")
    exported = tmp_path / "exported.jsonl"
    with exported.open("w") as fh:
        client.export(batch.id, fh)
    for lines in (on_disk, read_jsonl(exported)):
        results = {line["custom_id"]: MessageBatchIndividualResponse.model_validate(line).result for line in lines}
        assert {cid: r.type for cid, r in results.items()} == {"s": "succeeded", "l": "succeeded"}
        assert (results["s"].message.stop_reason, results["s"].message.content[0].text) == (
            "end_turn", "the quick brown fox")
        assert (results["l"].message.stop_reason, results["l"].message.stop_sequence) == ("max_tokens", None)

    cancelled = client.submit([write_jsonl(tmp_path / "more.jsonl", rows)], model="echo-m").batch
    client.cancel(cancelled.id)
    with exported.open("w") as fh:
        client.export(cancelled.id, fh)
    assert [MessageBatchIndividualResponse.model_validate(line).result.type for line in read_jsonl(exported)] == [
        "canceled", "canceled"]


def test_errors_keep_their_code_and_are_the_servers_fault_only_when_ours():
    ours = result_line(error_line("x", "out_of_memory", "no room"))
    theirs = result_line(error_line("y", "context_length_exceeded", "too long"))
    lost = result_line(error_line("z", "lost", "its worker died", status_code=None))
    expired = result_line(error_line("w", "batch_expired", "window ended", status_code=None))
    shapes = [MessageBatchIndividualResponse.model_validate(line).result for line in (ours, theirs, lost, expired)]
    assert [(r.type, getattr(r, "error", None) and r.error.error.type) for r in shapes] == [
        ("errored", "api_error"), ("errored", "invalid_request_error"), ("errored", "api_error"), ("expired", None)]
    assert shapes[1].error.error.message == "context_length_exceeded: too long"


def test_a_stop_sequence_is_the_messages_stop_sequence():
    [line] = parse(anthropic_line({"max_tokens": 9, "stop_sequences": ["END"],
                                   "messages": [{"role": "user", "content": "x"}]}))
    ends = [Choice("a", "stop", "END", 2), Choice("b", "stop", None, 2), Choice("c", "length", None, 9)]
    bodies = [Message.model_validate(success_line(line.request, model="m", prompt_tokens=3, completion_tokens=2,
                                                  choices=[c])["response"]["body"]) for c in ends]
    assert [(b.stop_reason, b.stop_sequence, b.content[0].text) for b in bodies] == [
        ("stop_sequence", "END", "a"), ("end_turn", None, "b"), ("max_tokens", None, "c")]
