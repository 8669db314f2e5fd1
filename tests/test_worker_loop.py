"""The queue path in-process with the echo engine: submit -> RQ chunk jobs -> BatchWorker -> results."""

import json

from batchgen.jobs import keys
from batchgen.jobs.inputs import ParamDefaults
from batchgen.jobs.states import BatchStatus
from batchgen.producer.client import BatchClient
from batchgen.producer.config import ProducerConfig
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine, echo_text
from batchgen.worker.worker import BatchWorker
from rq import Queue
from rq.serializers import JSONSerializer

from tests.cli import eventually
from tests.conftest import data_keys


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_worker(conn, model="echo-model", **kw):
    cfg = WorkerConfig(EngineConfig(model=model), engine="echo", burst=True, redis_url="unused", **kw)
    return BatchWorker(cfg, EchoEngine(model, max_batch_size=8), conn)


def test_batch_runs_through_rq_and_every_request_ends_once(redis_conn, tmp_path):
    rows = [{"custom_id": f"r{i}", "prompt": " ".join(f"w{j}" for j in range(i % 7 + 1)), "max_tokens": 4}
            for i in range(150)]
    client = BatchClient(ProducerConfig(chunk_size=16), connection=redis_conn)
    res = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-model",
                        output_dir=str(tmp_path / "out"))
    batch = res.batch
    assert batch is not None and batch.status == BatchStatus.IN_PROGRESS and batch.total == 150
    assert batch.num_chunks == 10
    queue = Queue(keys.queue_name("echo-model", "default"), connection=redis_conn, serializer=JSONSerializer)
    assert queue.count == 2  # the per-batch window; the other chunks wait in the batch's list

    done = make_worker(redis_conn).run()
    assert done == 150
    final = client.get(batch.id)
    assert final.status == BatchStatus.COMPLETED
    assert final.request_counts == {"total": 150, "completed": 150, "failed": 0}
    lines = list(client.results(batch.id, ordered=True))
    assert [ln["custom_id"] for ln in lines] == [r["custom_id"] for r in rows]
    for row, line in zip(rows, lines, strict=True):
        text, reason = echo_text(row["prompt"], 4)
        assert line["response"]["body"]["choices"][0]["text"] == text
        assert line["response"]["body"]["choices"][0]["finish_reason"] == reason
    on_disk = (tmp_path / "out" / f"{batch.id}.output.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in on_disk) == sorted(r["custom_id"] for r in rows)
    assert redis_conn.hlen(keys.claims_key()) == 0
    assert queue.finished_job_registry.count == 10


def test_restarted_worker_skips_requests_already_done(redis_conn, tmp_path):
    rows = [{"custom_id": f"r{i}", "prompt": "a b c"} for i in range(20)]
    client = BatchClient(ProducerConfig(chunk_size=20), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-model",
                          params=ParamDefaults(max_tokens=2)).batch
    # Simulate a worker that finished 5 requests and died: their outcomes exist, the chunk is queued again.
    from batchgen.jobs.schema import error_line

    client.store.record(batch.id, [(i, error_line(f"r{i}", "x", "done before the crash")) for i in range(5)])
    assert make_worker(redis_conn).run() == 15
    final = client.get(batch.id)
    assert final.status == BatchStatus.COMPLETED and final.num_done == 20


def test_cancel_keeps_finished_results_and_closes_the_rest(redis_conn, tmp_path):
    rows = [{"custom_id": f"r{i}", "prompt": "x"} for i in range(40)]
    client = BatchClient(ProducerConfig(chunk_size=10), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-model").batch
    from batchgen.jobs.schema import error_line

    client.store.record(batch.id, [(0, error_line("r0", "x", "finished earlier"))])
    cancelled = client.cancel(batch.id)
    assert cancelled.status == BatchStatus.CANCELLED
    assert cancelled.counts["num_cancelled"] == 39 and cancelled.num_done == 40
    assert make_worker(redis_conn).run() == 0  # nothing left for a worker


def test_worker_never_runs_another_models_batch(redis_conn, tmp_path):
    rows = [{"custom_id": "a", "prompt": "x"}]
    client = BatchClient(ProducerConfig(), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="model-b").batch
    assert make_worker(redis_conn, model="model-a").run() == 0
    assert client.get(batch.id).status == BatchStatus.IN_PROGRESS  # still waiting for a model-b worker


def test_overdue_batch_expires_keeping_finished_results(redis_conn, tmp_path):
    rows = [{"custom_id": f"r{i}", "prompt": "x"} for i in range(10)]
    # A window far past the test's length, so only the explicit clocks below can end it: submit's own get() sweeps
    # on the real clock (whole seconds), and with a 1 s window a second boundary crossed inside submit expired it
    client = BatchClient(ProducerConfig(chunk_size=5, completion_window_s=3600), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-model").batch
    from batchgen.jobs.schema import error_line

    client.store.record(batch.id, [(0, error_line("r0", "x", "finished before the deadline"))])
    assert client.store.expire_overdue(now=batch.timestamps["expires_at"] - 1) == []
    assert client.store.expire_overdue(now=batch.timestamps["expires_at"] + 1) == [batch.id]
    final = client.get(batch.id)
    assert final.status == BatchStatus.EXPIRED
    assert final.counts["num_expired"] == 9 and final.num_done == 10
    assert make_worker(redis_conn).run() == 0  # its chunks are skipped


def test_burst_worker_waits_for_a_dead_workers_claim_and_runs_it(redis_conn, tmp_path):
    """A burst worker must not exit while a just-killed worker's chunk is still claimed (until its TTL)."""
    import time

    from batchgen.jobs import chunks

    rows = [{"custom_id": f"r{i}", "prompt": "a b"} for i in range(8)]
    client = BatchClient(ProducerConfig(chunk_size=8), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-model").batch
    # A worker that claimed the only chunk, heartbeated once long ago, and died: its key lives 2 s more.
    queues = chunks.queues_for("echo-model", redis_conn)
    assert chunks.ChunkClaims(redis_conn).claim(queues, "dead-worker") is not None
    redis_conn.hset(keys.worker_key("dead-worker"), mapping={"last_heartbeat": int(time.time()) - 60})
    redis_conn.expire(keys.worker_key("dead-worker"), 2)

    worker = make_worker(redis_conn, worker_ttl_s=3, heartbeat_interval_s=0.5)
    assert worker.run() == 8
    assert client.get(batch.id).status == BatchStatus.COMPLETED


def test_chunk_queue_is_registered_for_rq_info(redis_conn, tmp_path):
    client = BatchClient(ProducerConfig(chunk_size=4), connection=redis_conn)
    client.submit([write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}] * 10)], model="echo-model")
    from batchgen.jobs.chunks import rq_connection
    from rq import Queue as RQQueue

    names = [q.name for q in RQQueue.all(connection=rq_connection(redis_conn))]
    assert names == [keys.queue_name("echo-model", "default")]


def test_status_expires_an_overdue_batch_even_with_no_worker(redis_conn, tmp_path):
    import time

    # Timestamps are whole seconds: a 2 s window ends at least 1 s after submit, and at most 2 s after
    client = BatchClient(ProducerConfig(completion_window_s=2), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}] * 3)], model="nobody").batch
    assert client.get(batch.id).status == BatchStatus.IN_PROGRESS
    time.sleep(3.1)
    expired = client.get(batch.id)
    assert expired.status == BatchStatus.EXPIRED and expired.counts["num_expired"] == 3


def test_chunk_on_the_wrong_models_queue_fails_loudly_instead_of_running(redis_conn, tmp_path):
    client = BatchClient(ProducerConfig(chunk_size=4), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"c{i}", "prompt": "x"}
                                                               for i in range(6)])], model="echo-model").batch
    redis_conn.hset(keys.BatchKeys(batch.id).record, "model", "another-model")  # its chunks sit on echo-model's queue
    assert make_worker(redis_conn).run() == 0
    lines = list(client.results(batch.id, ordered=True))
    assert [ln["custom_id"] for ln in lines] == [f"c{i}" for i in range(6)]
    assert {ln["response"]["body"]["error"]["code"] for ln in lines} == {"model_mismatch"}
    assert client.get(batch.id).request_counts == {"total": 6, "completed": 0, "failed": 6}


def test_the_worker_registry_lists_live_workers_and_forgets_dead_ones(redis_conn):
    from batchgen.jobs.workers import WorkerRegistry

    registry = WorkerRegistry(redis_conn)
    registry.heartbeat("w1", {"name": "w1", "last_heartbeat": 100}, ttl_s=60)
    registry.heartbeat("w2", {"name": "w2", "last_heartbeat": 200}, ttl_s=1)
    registry.register("w3")  # registered, never beat: not alive
    assert [w["name"] for w in registry.live()] == ["w1", "w2"]
    assert registry.last_heartbeats(["w1", "w3"]) == {"w1": 100, "w3": None}
    eventually(lambda: not registry.is_alive("w2"), "w2's heartbeat to expire", timeout_s=10)
    assert [w["name"] for w in registry.live()] == ["w1"]
    registry.forget(["w2", "w3"])
    registry.unregister("w1")
    assert registry.live() == [] and data_keys(redis_conn) == []


def test_a_stopped_worker_leaves_the_registry_at_once(redis_conn):
    from batchgen.jobs.workers import WorkerRegistry

    assert make_worker(redis_conn, name="leaver").run() == 0
    assert WorkerRegistry(redis_conn).live() == []
    assert not WorkerRegistry(redis_conn).is_alive("leaver")


def test_the_worker_steps_once_the_next_step_is_full_and_claims_the_rest_between_steps(redis_conn, tmp_path):
    """The first step waits for the chunks that fill it (2 of 4 rows each for the echo engine's 8 rows), not for all
    the engine wants (16 requests): the GPU starts sooner and the other claims (Redis round trips, tokenising) run
    between steps."""
    rows = [{"custom_id": f"r{i}", "prompt": "a b c", "max_tokens": 3} for i in range(24)]
    client = BatchClient(ProducerConfig(chunk_size=4), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-model").batch
    worker = make_worker(redis_conn)
    claims: list[object] = []
    claimed_before_step: list[int] = []
    claim, step = worker.claims.claim, worker.engine.step

    def counting_claim(*args, **kwargs):
        got = claim(*args, **kwargs)
        claims.extend([got] if got is not None else [])
        return got

    def counting_step():
        claimed_before_step.append(len(claims))
        return step()

    worker.claims.claim, worker.engine.step = counting_claim, counting_step
    assert worker.engine.num_wanted == 16  # four chunks wanted before the first step
    assert worker.run() == 24
    # each echo step takes all 8 pending rows, so each turn claims the two chunks that fill the next one
    assert claimed_before_step == [2, 4, 6], claimed_before_step
    assert client.get(batch.id).status == BatchStatus.COMPLETED
