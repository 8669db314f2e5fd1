"""OpenAI's Batch.usage: the tokens of a batch's succeeded requests, summed in Redis exactly once per request."""

import json

import openai.types
from batchgen.jobs.keys import BatchKeys
from batchgen.jobs.openai_batch import render
from batchgen.jobs.schema import usage_of
from batchgen.producer.cli import describe
from batchgen.producer.client import BatchClient
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.worker import BatchWorker


def test_usage_sums_the_succeeded_requests_tokens_once_each(redis_conn, tmp_path):
    rows = [{"custom_id": "c", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 2},
            {"custom_id": "p", "prompt": "four five six seven"},
            {"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {"input": "eight nine"}},
            {"custom_id": "m", "params": {"max_tokens": 5, "messages": [{"role": "user", "content": "ten"}]}}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    client = BatchClient(connection=redis_conn)
    batch = client.submit([str(src)], model="echo-m").batch
    fresh = openai.types.Batch.model_validate(render(batch))
    assert (fresh.usage.input_tokens, fresh.usage.output_tokens, fresh.usage.total_tokens) == (0, 0, 0)
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    assert BatchWorker(cfg, EchoEngine("echo-m"), redis_conn).run() == len(rows)

    lines = list(client.results(batch.id))
    tokens = [usage_of(line) for line in lines]
    assert all(i > 0 and o > 0 for i, o in tokens)  # every API's usage shape is read
    expected = (sum(i for i, _ in tokens), sum(o for _, o in tokens))
    usage = openai.types.Batch.model_validate(render(client.get(batch.id))).usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (*expected, sum(expected))

    client.store.record(batch.id, [(0, lines[0])])  # a second delivery of a recorded outcome adds nothing
    assert client.get(batch.id).usage["input_tokens"] == expected[0]
    assert describe(client.get(batch.id)).endswith(f"{expected[0]:,} in / {expected[1]:,} out tokens")  # status


def test_a_failed_or_cancelled_request_uses_no_tokens(redis_conn, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x y"}) + "\n")
    client = BatchClient(connection=redis_conn)
    batch = client.submit([str(src)], model="echo-m").batch
    client.cancel(batch.id)
    assert [usage_of(line) for line in client.results(batch.id)] == [(0, 0)]
    assert client.get(batch.id).usage["total_tokens"] == 0


def test_a_batch_whose_every_line_was_skipped_still_expires_with_its_results(redis_conn, tmp_path):
    """Its outcomes are recorded before the keys are made persistent, so the record script's TTL was undone."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x", "top_p": 7}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    client = BatchClient(connection=redis_conn)
    batch = client.submit([str(src)], model="echo-m", skip_invalid=True).batch
    assert batch.status == "completed" and batch.request_counts["failed"] == 2
    k = BatchKeys(batch.id)
    assert all(0 < redis_conn.ttl(key) <= client.store.result_ttl_s for key in (k.record, k.outcomes))
