"""`batchgen retry`: an ended batch's failed requests run again as a new batch, as a script would otherwise rebuild
from the error file; and `submit --results-ttl`, OpenAI's output_expires_after from the CLI."""

import json

from batchgen.jobs.keys import BatchKeys
from batchgen.producer.client import BatchClient
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.worker import BatchWorker

from tests.cli import batchgen


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_worker(redis_conn) -> int:
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    return BatchWorker(cfg, EchoEngine("echo-m"), redis_conn).run()


def test_retry_runs_the_cancelled_requests_again_under_their_custom_ids(redis_url, redis_conn, tmp_path):
    rows = [{"custom_id": f"r{i}", "prompt": f"one two {i}", "max_tokens": 2} for i in range(3)]
    client = BatchClient(connection=redis_conn)
    old = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m", metadata={"job": "nightly"},
                        output_dir=str(tmp_path / "out"), priority="high").batch
    client.cancel(old.id)
    proc = batchgen("retry", old.id, "--json", redis_url=redis_url, check=True)
    new = json.loads(proc.stdout)
    assert new["id"] != old.id and new["request_counts"]["total"] == 3
    assert new["metadata"] == {"job": "nightly", "retry_of": old.id}
    assert (new["output_dir"], new["priority"], new["model"]) == (str(tmp_path / "out"), "high", "echo-m")
    assert run_worker(redis_conn) == 3
    lines = {line["custom_id"]: line for line in client.results(new["id"])}
    assert sorted(lines) == ["r0", "r1", "r2"]
    assert all(line["response"]["body"]["choices"][0]["text"] == "one two" for line in lines.values())
    assert client.get(new["id"]).status == "completed" and client.get(old.id).status == "cancelled"

    again = batchgen("retry", new["id"], "--json", redis_url=redis_url)  # nothing failed: nothing to run
    assert again.returncode == 3 and json.loads(again.stdout)["error"]["code"] == "nothing_to_retry"


def test_retry_takes_only_the_outcomes_asked_for_and_skips_lines_rejected_at_submit(redis_url, redis_conn, tmp_path):
    rows = [{"custom_id": "ok", "prompt": "a b"}, {"custom_id": "bad", "prompt": "x", "top_p": 9}]
    client = BatchClient(connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m", skip_invalid=True).batch
    running = batchgen("retry", batch.id, "--json", redis_url=redis_url)
    assert running.returncode == 2 and json.loads(running.stdout)["error"]["code"] == "batch_not_ended"
    assert run_worker(redis_conn) == 1
    proc = batchgen("retry", batch.id, redis_url=redis_url)  # its one failure was never stored
    assert proc.returncode == 3 and b"1 request(s) rejected at submit" in proc.stderr
    expired_only = batchgen("retry", batch.id, "--outcome", "expired", redis_url=redis_url)
    assert expired_only.returncode == 3 and b"has no expired request" in expired_only.stderr


def test_submit_results_ttl_keeps_the_results_that_long_after_the_batch_ends(redis_url, redis_conn, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a b"}])
    proc = batchgen("submit", src, "--model", "echo-m", "--results-ttl", "2h", "--json", redis_url=redis_url,
                    check=True)
    batch_id = json.loads(proc.stdout)["id"]
    assert run_worker(redis_conn) == 1
    assert 7100 < redis_conn.ttl(BatchKeys(batch_id).record) <= 7200
    bad = batchgen("submit", src, "--model", "echo-m", "--results-ttl", "soon", redis_url=redis_url)
    assert bad.returncode == 2 and b"--results-ttl: 'soon' is not a duration" in bad.stderr
