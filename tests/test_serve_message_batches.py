"""`batchgen serve` through Anthropic's SDK: its Message Batches calls (create, retrieve, list, cancel, results)
against a real server subprocess, a real Redis and real worker subprocesses."""

import json
import subprocess

import anthropic
import pytest
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from tests.cli import BATCHGEN, cli_env, start_worker
from tests.test_serve import PROMPTS, Server, run_until_done, write_jsonl


def requests_for(model: str, prompts=PROMPTS) -> list[dict]:
    return [{"custom_id": f"m{i}", "params": {"model": model, "max_tokens": 4 + 3 * (i % 4), "temperature": 0,
                                              "system": "Answer briefly.",
                                              "messages": [{"role": "user", "content": p}]}}
            for i, p in enumerate(prompts)]


def sdk_of(server: Server, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base, api_key=api_key, max_retries=0, timeout=120)


def test_an_anthropic_sdk_batch_script_runs_to_completion_and_matches_run(server, demo_model_dir, redis_url,
                                                                           tmp_path):
    """The 8-bit demo model in a worker subprocess: the batch object validates as the anthropic package's
    MessageBatch at every poll, results() streams one MessageBatchIndividualResponse per request, and each text is
    what `batchgen run` gives for the same requests."""
    sdk = sdk_of(server)
    requests = requests_for("demo")
    batch = sdk.messages.batches.create(requests=requests)
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == len(PROMPTS) and batch.id in [b.id for b in sdk.messages.batches.list()]
    with pytest.raises(anthropic.AnthropicError, match="finished processing"):  # the SDK waits for results_url
        sdk.messages.batches.results(batch.id)

    src, oracle_out = write_jsonl(tmp_path / "requests.jsonl", requests), tmp_path / "oracle.jsonl"
    oracle = subprocess.Popen([*BATCHGEN, "run", str(src), "-o", str(oracle_out), "--model", str(demo_model_dir),
                               "--served-model-name", "demo"], env=cli_env(redis_url),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    worker = start_worker("--model", str(demo_model_dir), "--served-model-name", "demo", "--max-batch", "2",
                          "--burst", redis_url=redis_url, log=tmp_path / "worker.log")

    def poll() -> MessageBatch | None:
        now = sdk.messages.batches.retrieve(batch.id)
        MessageBatch.model_validate(server.get_json(f"/v1/messages/batches/{batch.id}"))
        counts = now.request_counts
        assert counts.processing + counts.succeeded == len(PROMPTS) and not counts.errored
        return now if now.processing_status == "ended" else None

    batch = run_until_done(poll, worker, oracle, tmp_path / "worker.log")

    assert batch.request_counts.succeeded == len(PROMPTS) and batch.ended_at is not None and batch.results_url
    results = {r.custom_id: r.result for r in sdk.messages.batches.results(batch.id)}
    expected = {line["custom_id"]: line["result"]["message"] for line in map(json.loads, oracle_out.read_text().splitlines())}
    assert sorted(results) == sorted(expected) == [f"m{i}" for i in range(len(PROMPTS))]
    for custom_id, result in results.items():
        assert result.type == "succeeded" and result.message.model == "demo"
        assert result.message.content[0].text == expected[custom_id]["content"][0]["text"]
        assert result.message.usage.output_tokens == expected[custom_id]["usage"]["output_tokens"]
        assert result.message.stop_reason in ("end_turn", "max_tokens")


def test_a_bad_request_refuses_the_whole_batch_in_anthropics_error_shape(server, redis_conn):
    sdk = sdk_of(server)
    good = requests_for("echo-m")[:1]
    bad = {"custom_id": "b", "params": {"model": "echo-m", "messages": [{"role": "user", "content": "hi"}]}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.batches.create(requests=[*good, bad])
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "invalid_request_error"
    assert "requests.1: missing_field: params.max_tokens: required" in refused.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="requests.0: must be an object with custom_id and params"):
        sdk.messages.batches.create(requests=[{"custom_id": "o", "prompt": "an OpenAI-style line"}])
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.batches.retrieve("batch_nope")
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert not [b for b in sdk.messages.batches.list()]  # nothing was enqueued


def test_cancel_ends_a_batch_whose_requests_become_canceled_results(server):
    sdk = sdk_of(server)
    batch = sdk.messages.batches.create(requests=requests_for("echo-m"))
    cancelled = sdk.messages.batches.cancel(batch.id)
    assert cancelled.cancel_initiated_at is not None and cancelled.processing_status == "ended"
    assert cancelled.request_counts.canceled == len(PROMPTS) and cancelled.request_counts.processing == 0
    results = list(sdk.messages.batches.results(batch.id))
    assert all(isinstance(r, MessageBatchIndividualResponse) and r.result.type == "canceled" for r in results)
    assert sorted(r.custom_id for r in results) == [f"m{i}" for i in range(len(PROMPTS))]


def test_list_pages_through_message_batches_only_newest_first(server, tmp_path):
    sdk = sdk_of(server)
    made = [sdk.messages.batches.create(requests=requests_for("echo-m")[:1]).id for _ in range(3)]
    openai_sdk = server.sdk()  # a batch of OpenAI lines is not a Message Batch
    rows = [{"custom_id": "o", "method": "POST", "url": "/v1/completions", "body": {"model": "echo-m", "prompt": "x"}}]
    with open(write_jsonl(tmp_path / "o.jsonl", rows), "rb") as fh:
        upload = openai_sdk.files.create(file=fh, purpose="batch").id
    other = openai_sdk.batches.create(input_file_id=upload, endpoint="/v1/completions", completion_window="24h").id
    for call in (sdk.messages.batches.retrieve, sdk.messages.batches.cancel):  # not a Message Batch: not found here
        with pytest.raises(anthropic.NotFoundError):
            call(other)
    with pytest.raises(anthropic.BadRequestError, match="before_id"):
        sdk.messages.batches.list(before_id=made[0])
    with pytest.raises(anthropic.BadRequestError, match="requests_per_minute"):
        sdk.messages.batches.create(requests=requests_for("echo-m")[:1], extra_body={"requests_per_minute": 5})
    page = sdk.messages.batches.list(limit=2)
    assert len(page.data) == 2 and set(b.id for b in page.data) < set(made) and page.has_more
    listed = list(sdk.messages.batches.list(limit=2))  # the SDK follows after_id to the last page
    assert sorted(b.id for b in listed) == sorted(made)  # each once; ties in one second keep one order
    assert [b.created_at for b in listed] == sorted((b.created_at for b in listed), reverse=True)


def test_an_api_key_is_taken_as_anthropics_sdk_sends_it(redis_url, redis_conn, tmp_path):
    srv = Server(redis_url, tmp_path / "files", tmp_path / "serve.log", "--api-key", "sekret").start()
    try:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            sdk_of(srv, "wrong").messages.batches.list()
        assert refused.value.body["error"]["type"] == "authentication_error"
        assert list(sdk_of(srv, "sekret").messages.batches.list()) == []
    finally:
        srv.stop()
