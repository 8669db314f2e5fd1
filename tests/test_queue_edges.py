"""The queue side against what Redis may hold: chunk job hashes with unreadable fields (claimed by a live worker or
left by a dead one), stored requests nothing can parse, a Redis that answers a command with an error; and the
export paths that must neither lose nor duplicate a line."""

import json
import subprocess
from pathlib import Path

from batchgen.jobs import chunks, keys
from batchgen.jobs.schema import error_of
from batchgen.jobs.states import BatchStatus
from batchgen.producer.client import BatchClient
from batchgen.producer.config import ProducerConfig
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.worker import BatchWorker
from redis import Redis
from rq.job import Job

from tests.cli import BATCHGEN, batchgen, cli_env
from tests.test_reliability import echo_rows, write_jsonl


def make_worker(conn: Redis, **kw) -> BatchWorker:
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused", **kw)
    return BatchWorker(cfg, EchoEngine("echo-m", max_batch_size=8), conn)


def submit(conn: Redis, tmp_path: Path, rows: list[dict], chunk_size: int = 2, **kw) -> tuple[BatchClient, str]:
    client = BatchClient(ProducerConfig(chunk_size=chunk_size), connection=conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m", **kw).batch
    assert batch is not None
    return client, batch.id


def error_codes(client: BatchClient, batch_id: str) -> dict[str, str]:
    return {ln["custom_id"]: error_of(ln)["code"] for ln in client.results(batch_id) if error_of(ln)}


# -- chunk job hashes RQ cannot restore ----------------------------------------------------------------

def test_a_claimed_chunk_job_whose_hash_has_a_malformed_field_fails_alone_and_the_worker_goes_on(redis_conn, tmp_path):
    client, batch_id = submit(redis_conn, tmp_path, echo_rows(6))
    redis_conn.hset(Job.key_for(f"{batch_id}-0"), "status", "bogus")  # Job.fetch: ValueError, not NoSuchJobError
    assert make_worker(redis_conn).run() == 6
    assert error_codes(client, batch_id) == {"r0": "invalid_chunk_job", "r1": "invalid_chunk_job"}
    assert client.get(batch_id).status == BatchStatus.COMPLETED
    assert redis_conn.hlen(keys.claims_key()) == 0


def test_a_dead_workers_claim_on_a_malformed_job_hash_does_not_crash_the_reaper(redis_conn, tmp_path):
    client, batch_id = submit(redis_conn, tmp_path, echo_rows(4))
    claimed = chunks.ChunkClaims(redis_conn).claim(chunks.queues_for("echo-m", redis_conn), "dead-worker")
    assert claimed is not None  # claimed by a worker that died (no heartbeat key)
    redis_conn.hset(Job.key_for(claimed[0].id), "created_at", "not a date")
    make_worker(redis_conn).reaper.reap()
    assert redis_conn.hlen(keys.claims_key()) == 0
    assert make_worker(redis_conn).run() == 2
    assert set(error_codes(client, batch_id).values()) == {"invalid_chunk_job"}
    assert client.get(batch_id).num_done == 4 and client.get(batch_id).status.is_terminal


def test_after_an_outage_our_claim_on_a_malformed_job_hash_fails_instead_of_crashing_reconciliation(redis_conn,
                                                                                                   tmp_path):
    client, batch_id = submit(redis_conn, tmp_path, echo_rows(4))
    worker = make_worker(redis_conn)
    # Claimed in Redis but never started here: what a claim whose reply an outage cut off leaves behind.
    claimed = chunks.ChunkClaims(redis_conn).claim(chunks.queues_for("echo-m", redis_conn), worker.cfg.name)
    assert claimed is not None
    redis_conn.hset(Job.key_for(claimed[0].id), "result_ttl", "forever")
    worker._reconcile_needed = True  # as the loop sets it after an outage
    assert worker.run() == 4
    assert set(error_codes(client, batch_id).values()) == {"invalid_chunk_job"}
    assert len(error_codes(client, batch_id)) == 2 and client.get(batch_id).status.is_terminal
    assert redis_conn.hlen(keys.claims_key()) == 0


# -- stored requests nothing can parse -----------------------------------------------------------------

def test_unreadable_stored_requests_get_their_error_lines_in_the_output_dir_too(redis_conn, tmp_path):
    out = tmp_path / "out"
    client, batch_id = submit(redis_conn, tmp_path, echo_rows(6), chunk_size=6, output_dir=str(out))
    redis_conn.hset(keys.BatchKeys(batch_id).requests, 2, '{"custom_id": "r2", "prompt": 5')
    redis_conn.hdel(keys.BatchKeys(batch_id).requests, 4)
    assert make_worker(redis_conn).run() == 6
    on_disk = [json.loads(x) for x in (out / f"{batch_id}.errors.jsonl").read_text().splitlines()]
    assert sorted(ln["custom_id"] for ln in on_disk) == ["2", "4"]  # named by index: their custom_id is unreadable
    assert len((out / f"{batch_id}.output.jsonl").read_text().splitlines()) == 4


def test_retry_skips_a_request_whose_stored_entry_is_unreadable(redis_url, redis_conn, tmp_path):
    client, batch_id = submit(redis_conn, tmp_path, echo_rows(4), chunk_size=4)
    redis_conn.hset(keys.BatchKeys(batch_id).requests, 1, '{"custom_id": "r1", "prompt": 5')
    client.cancel(batch_id)
    proc = batchgen("retry", batch_id, "--json", redis_url=redis_url)
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout)
    assert new["request_counts"]["total"] == 3 and b"1 request(s)" in proc.stderr
    assert make_worker(redis_conn).run() == 3
    assert sorted(ln["custom_id"] for ln in client.results(new["id"])) == ["r0", "r2", "r3"]


# -- export --------------------------------------------------------------------------------------------

def test_results_with_the_errors_going_to_the_output_file_keeps_every_line(redis_url, redis_conn, tmp_path):
    client, batch_id = submit(redis_conn, tmp_path, echo_rows(20), chunk_size=5)
    redis_conn.hset(keys.BatchKeys(batch_id).requests, 3, "not json")  # one error line among the results
    redis_conn.hset(keys.BatchKeys(batch_id).requests, 11, "not json")
    assert make_worker(redis_conn).run() == 20
    out = tmp_path / "all.jsonl"
    proc = batchgen("results", batch_id, "-o", str(out), "--errors", str(out), "--ordered", "--json",
                    redis_url=redis_url, check=True)
    assert json.loads(proc.stdout)["results"] == 18 and json.loads(proc.stdout)["errors"] == 2
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [ln["custom_id"] for ln in lines] == ["3" if i == 3 else "11" if i == 11 else f"r{i}" for i in range(20)]


def test_results_for_a_mistyped_id_leaves_an_earlier_export_whole(redis_url, redis_conn, tmp_path):
    client, batch_id = submit(redis_conn, tmp_path, echo_rows(4))
    assert make_worker(redis_conn).run() == 4
    out, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    batchgen("results", batch_id, "-o", str(out), "--errors", str(errors), redis_url=redis_url, check=True)
    kept = out.read_text()
    assert len(kept.splitlines()) == 4 and errors.read_text() == ""  # made, though no error line came
    typo = batchgen("results", batch_id + "x", "-o", str(out), "--errors", str(errors), "--json",
                    redis_url=redis_url)
    assert typo.returncode == 4 and json.loads(typo.stdout)["error"]["code"] == "not_found"
    assert out.read_text() == kept
    (tmp_path / "dir").mkdir()
    bad = batchgen("results", batch_id, "-o", str(tmp_path / "dir"), "--json", redis_url=redis_url)
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr
    unwritable = batchgen("results", batch_id, "-o", str(tmp_path / "no" / "such" / "dir.jsonl"), "--json",
                          redis_url=redis_url)
    assert unwritable.returncode == 2 and json.loads(unwritable.stdout)["error"]["code"] == "unwritable_output"


def test_list_reads_past_batches_whose_keys_expired(redis_url, redis_conn, tmp_path):
    """A batch's keys expire with its results while its id stays in the index: `list --limit 2` still shows the two
    newest batches that remain."""
    for _ in range(4):
        submit(redis_conn, tmp_path, echo_rows(2))
    newest_first = redis_conn.zrevrange(keys.batches_index(), 0, -1)
    for batch_id in newest_first[:2]:
        redis_conn.delete(*keys.BatchKeys(batch_id).all())
    proc = batchgen("list", "--limit", "2", "--json", redis_url=redis_url, check=True)
    assert [b["id"] for b in json.loads(proc.stdout)] == newest_first[2:]


# -- Redis answering with an error ---------------------------------------------------------------------

def test_a_redis_error_reply_is_one_clean_error_not_a_traceback(redis_url, tmp_path):
    base = redis_url.rsplit("/", 1)[0]
    for args in (["status", "batch_x", "--json"], ["list", "--json"], ["workers", "--json"]):
        proc = subprocess.run([*BATCHGEN, *args], capture_output=True, env=cli_env(f"{base}/99"), timeout=60,
                              cwd=tmp_path)  # a database index the server does not have: an error reply
        assert b"Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == 7, (args, proc.returncode)
        err = json.loads(proc.stdout)["error"]
        assert err["code"] == "redis_refused" and "DB index is out of range" in err["message"]


def test_a_heartbeat_interval_of_zero_or_nan_is_a_usage_error(redis_url):
    for interval in ("0", "-1", "nan", "inf"):
        proc = batchgen("worker", "--engine", "echo", "--model", "echo-m", "--burst", "--heartbeat-interval", interval,
                        "--json", redis_url=redis_url)
        assert proc.returncode == 2, (interval, proc.stderr)
        assert "heartbeat_interval_s" in json.loads(proc.stdout)["error"]["message"]


def test_recording_into_a_record_that_lost_its_total_is_accepted_not_a_script_error(redis_conn, tmp_path):
    """A record rewritten in part (its `total` gone: evicted, hand-edited): the record script took tonumber(nil)
    into a comparison and Redis answered an error, which no worker catches."""
    from batchgen.jobs.schema import error_line
    from batchgen.jobs.store import BatchStore

    client, batch_id = submit(redis_conn, tmp_path, echo_rows(2))
    redis_conn.hdel(keys.BatchKeys(batch_id).record, "total")
    assert BatchStore(redis_conn).record(batch_id, [(0, error_line("r0", "x", "y"))]) == [0]


def test_wait_rides_out_an_outage_met_by_its_progress_callback(redis_conn, tmp_path):
    """`wait`'s progress bar reads the workers' rates on each poll: an outage there is waited out like one in the
    poll itself (it escaped as exit 6)."""
    import redis

    client, batch_id = submit(redis_conn, tmp_path, echo_rows(2))
    assert make_worker(redis_conn).run() == 2
    calls, outages = [], []

    def on_poll(batch) -> None:
        calls.append(batch.status)
        if len(calls) == 1:
            raise redis.ConnectionError("the progress bar's read")
    ended = client.wait(batch_id, timeout_s=30, poll_s=0.01, on_poll=on_poll,
                        on_unavailable=lambda exc, retry_in_s: outages.append(str(exc)))
    assert ended.status == BatchStatus.COMPLETED and outages == ["the progress bar's read"] and len(calls) == 2


def test_a_paused_worker_waking_up_leaves_its_reaped_chunk_to_the_new_holder(redis_conn, tmp_path):
    """Worker A stops (SIGSTOP, swap) past its TTL; a reaper requeues its chunk and worker C claims it. A wakes, ends
    or hands back the chunk: C's claim must stay (without it a C that then died would never be reaped) and the chunk
    must not go back on the queue while C runs it. The reaper itself requeues only the dead holder's claims."""
    submit(redis_conn, tmp_path, echo_rows(4))
    claims, queues = chunks.ChunkClaims(redis_conn), chunks.queues_for("echo-m", redis_conn)
    job, queue = claims.claim(queues, "worker-a")
    make_worker(redis_conn).reaper.reap()  # worker-a has no heartbeat: dead to the reaper
    assert claims.holders() == {} and redis_conn.lindex(queue.key, 0) == job.id
    again, _ = claims.claim(queues, "worker-c")
    assert again.id == job.id
    assert claims.release(job.id, "worker-a") == 0 and not claims.requeue(job.id, queue.name, "worker-a")
    assert claims.holders() == {job.id: "worker-c"} and job.id not in redis_conn.lrange(queue.key, 0, -1)
    assert claims.release(job.id, "worker-c") == 1 and claims.holders() == {}


def test_batches_made_in_one_second_list_newest_first(redis_conn, tmp_path):
    made = [submit(redis_conn, tmp_path, echo_rows(1))[1] for _ in range(5)]  # well within a second
    client = BatchClient(ProducerConfig(), connection=redis_conn)
    assert [b.id for b in client.recent(5)] == made[::-1]
