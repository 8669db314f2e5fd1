"""Edges (issue 23): Redis that evicts or says no, poison that cannot stop a worker, a results root the
submitter cannot leave, a silent idle made loud, and errors every script can read."""

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from batchgen.jobs import chunks, keys
from batchgen.jobs.redis_checks import EvictingRedis
from batchgen.jobs.schema import error_of
from batchgen.jobs.states import BatchStatus
from batchgen.jobs.store import BatchStore
from batchgen.jobs.workers import WorkerRegistry
from batchgen.producer.client import BatchClient, OutputDirRefused
from batchgen.producer.config import ProducerConfig
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.worker import BatchWorker
from redis import Redis
from rq.job import Job

from tests.cli import BATCHGEN, batchgen, cli_env, eventually, start_worker
from tests.conftest import data_keys
from tests.redis_server import RedisServer, free_port
from tests.test_reliability import assert_exactly_once, echo_rows, stop, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def make_worker(conn: Redis, model: str = "echo-m", step_delay_s: float = 0.0, **kw) -> BatchWorker:
    kw = {"burst": True, **kw}
    cfg = WorkerConfig(EngineConfig(model=model), engine="echo", redis_url="unused", **kw)
    return BatchWorker(cfg, EchoEngine(model, max_batch_size=8, step_delay_s=step_delay_s), conn)


def submit(conn: Redis, path: Path, rows: list[dict], chunk_size: int = 64, **kw):
    client = BatchClient(ProducerConfig(chunk_size=chunk_size), connection=conn)
    result = client.submit([write_jsonl(path, rows)], model="echo-m", **kw)
    assert result.batch is not None, result.errors
    return client, result.batch


def error_json(proc: subprocess.CompletedProcess) -> dict:
    """The --json error object on stdout, and exactly one `error:` line on stderr."""
    assert len([ln for ln in proc.stderr.decode().splitlines() if ln.startswith("error:")]) == 1, proc.stderr
    assert b"Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)["error"]


# -- evicting Redis ------------------------------------------------------------------------------------

def test_submit_and_worker_refuse_an_evicting_redis_and_write_nothing(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        conn = Redis.from_url(server.url, decode_responses=True)
        conn.config_set("maxmemory-policy", "allkeys-lru")
        path = write_jsonl(tmp_path / "in.jsonl", echo_rows(3))
        sub = batchgen("submit", path, "--model", "echo-m", "--json", redis_url=server.url)
        assert sub.returncode == 8
        err = error_json(sub)
        assert err["code"] == "redis_evicts" and "allkeys-lru" in err["message"] and "noeviction" in err["message"]
        work = batchgen("worker", "--engine", "echo", "--model", "echo-m", "--burst", redis_url=server.url)
        assert work.returncode == 8 and b"maxmemory-policy" in work.stderr and b"Traceback" not in work.stderr
        assert conn.keys("*") == []
        with pytest.raises(EvictingRedis):
            make_worker(conn).run()


def test_a_user_who_may_not_read_config_is_warned_and_still_submits(tmp_path):
    users = {"batch": "on >pw ~* &* +@all -config"}
    with RedisServer(tmp_path / "redis", acl_users=users) as server:
        url = server.url_for("batch", "pw")
        sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", echo_rows(3)), "--model", "echo-m",
                       redis_url=url, check=True)
        assert b"cannot read Redis maxmemory-policy" in sub.stderr
        assert Redis.from_url(url, decode_responses=True).exists(keys.BatchKeys(sub.stdout.decode().strip()).record)


def test_a_missing_request_gets_a_request_lost_line_and_the_batch_ends(redis_conn, tmp_path):
    rows = echo_rows(6)
    client, batch = submit(redis_conn, tmp_path / "in.jsonl", rows, chunk_size=2)
    redis_conn.hdel(keys.BatchKeys(batch.id).requests, 1)  # evicted or deleted behind our back
    redis_conn.delete(Job.key_for(f"{batch.id}-4"))  # a whole chunk job gone too
    assert make_worker(redis_conn).run() == 6
    final = client.get(batch.id)
    assert final.status == BatchStatus.FAILED  # requests vanished: the batch did not complete
    assert final.request_counts == {"total": 6, "completed": 3, "failed": 3}
    lines = {ln["custom_id"]: ln for ln in client.results(batch.id)}
    lost = {cid for cid, ln in lines.items() if error_of(ln) and error_of(ln)["code"] == "request_lost"}
    assert lost == {"1", "r4", "r5"}  # a missing entry is named by its index: its custom_id went with it
    assert redis_conn.hlen(keys.claims_key()) == 0


def test_a_dead_workers_claim_whose_job_hash_is_gone_fails_its_requests_instead_of_vanishing(redis_conn, tmp_path):
    client, batch = submit(redis_conn, tmp_path / "in.jsonl", echo_rows(4), chunk_size=2)
    claimed = chunks.ChunkClaims(redis_conn).claim(chunks.queues_for("echo-m", redis_conn), "dead-worker")
    assert claimed is not None  # a worker that claimed a chunk and died (no heartbeat key at all)
    redis_conn.delete(Job.key_for(claimed[0].id))  # and the chunk's job hash was evicted
    make_worker(redis_conn).reaper.reap()
    assert redis_conn.hlen(keys.claims_key()) == 0
    make_worker(redis_conn).run()
    final = client.get(batch.id)
    assert final.status == BatchStatus.FAILED and final.request_counts["failed"] == 2
    assert {error_of(ln)["code"] for ln in client.results(batch.id) if error_of(ln)} == {"request_lost"}


def test_a_submit_that_fails_after_enqueueing_removes_its_keys_and_chunk_jobs(redis_conn, tmp_path, monkeypatch):
    """The old `KeyError: 'id'` of a large submit on an evicting Redis left its rq:job keys behind."""

    def record_gone(self, batch_id):
        raise KeyError("id")

    monkeypatch.setattr(BatchClient, "get", record_gone)
    client = BatchClient(ProducerConfig(chunk_size=2), connection=redis_conn)
    with pytest.raises(KeyError):
        client.submit([write_jsonl(tmp_path / "in.jsonl", echo_rows(20))], model="echo-m")
    assert data_keys(redis_conn) == [] or set(data_keys(redis_conn)) <= {"rq:queues"}
    assert redis_conn.keys("rq:job:*") == []


def test_a_partly_rewritten_record_reads_as_gone_not_as_a_key_error(redis_conn):
    redis_conn.hset(keys.BatchKeys("batch_x").record, mapping={"model": "m", "queue": "q"})  # id/status evicted
    assert BatchStore(redis_conn).get("batch_x") is None


# -- Redis that says no: OOM, NOPERM, READONLY ---------------------------------------------------------

def test_submit_that_runs_redis_out_of_memory_exits_7_and_leaves_nothing(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        conn = Redis.from_url(server.url, decode_responses=True)
        conn.config_set("maxmemory", int(conn.info("memory")["used_memory"]) + 300_000)
        rows = [{"custom_id": f"r{i}", "prompt": "word " * 40} for i in range(4000)]  # ~1 MB: fails part-way
        sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", rows), "--model", "echo-m", "--json",
                       redis_url=server.url)
        assert sub.returncode == 7, sub.stderr
        err = error_json(sub)
        assert err["code"] == "redis_refused" and "out of memory" in err["message"]
        assert conn.keys("batchgen:*") == [] and conn.keys("rq:job:*") == []
        conn.config_set("maxmemory", 1)  # full from the start: a starting worker says so, no traceback
        work = batchgen("worker", "--engine", "echo", "--model", "echo-m", "--burst", "--json", redis_url=server.url)
        assert work.returncode == 7 and error_json(work)["code"] == "redis_refused"


def ride_out_a_refusal(tmp_path, *, refuse, reported: str, lift, during=None, configure=None) -> None:
    """An echo worker mid-batch on a private Redis: refuse(server, conn) makes Redis refuse writes, the worker logs
    `reported` and stays up (during(server, conn) runs then), lift(server, conn) ends it; the worker then finishes
    every request exactly once, with no traceback and no claim left."""
    with RedisServer(tmp_path / "redis") as server:
        conn = Redis.from_url(server.url, decode_responses=True)
        if configure is not None:
            configure(conn)
        rows = echo_rows(24)
        client, batch = submit(conn, tmp_path / "in.jsonl", rows, chunk_size=4)
        log = tmp_path / "worker.log"
        worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", "--max-batch", "2",
                              "--echo-step-delay", "0.1", redis_url=server.url, log=log)
        try:
            eventually(lambda: client.get(batch.id).num_done >= 2, "a few outcomes")
            refuse(server, conn)
            eventually(lambda: reported in log.read_text(), "the worker to report the refusal")
            assert worker.poll() is None, log.read_text()
            if during is not None:
                during(server, conn)
            lift(server, conn)
            assert worker.wait(timeout=90) == 0, log.read_text()
        finally:
            stop(worker)
        assert "Traceback" not in log.read_text()
        assert_exactly_once(client, batch.id, rows)
        assert conn.hlen(keys.claims_key()) == 0


def test_worker_waits_out_redis_oom_mid_batch_and_finishes_exactly_once(tmp_path):
    ride_out_a_refusal(tmp_path, refuse=lambda server, conn: conn.config_set("maxmemory", 1),  # every write refused
                       reported="Redis is out of memory", lift=lambda server, conn: conn.config_set("maxmemory", 0))


def test_worker_waits_out_redis_unable_to_persist_and_submit_exits_7(tmp_path):
    """MISCONF: an RDB save failed (here its file's name is taken by a directory) and Redis refuses writes until one
    succeeds. A running worker waits, as for OOM, and finishes exactly once after; submit meanwhile exits 7."""

    def refuse(server, conn) -> None:
        (server.dir / "dump.rdb").mkdir()
        conn.bgsave()
        eventually(lambda: conn.info("persistence")["rdb_last_bgsave_status"] == "err", "the save to fail")

    def submit_meanwhile(server, conn) -> None:
        sub = batchgen("submit", write_jsonl(tmp_path / "more.jsonl", echo_rows(2)), "--model", "echo-m", "--json",
                       redis_url=server.url)
        assert sub.returncode == 7 and error_json(sub)["code"] == "redis_refused", sub.stderr

    def lift(server, conn) -> None:
        (server.dir / "dump.rdb").rmdir()
        conn.bgsave()

    # writes stop on a failed save only where saves are configured
    ride_out_a_refusal(tmp_path, configure=lambda conn: conn.config_set("save", "3600 1"), refuse=refuse,
                       reported="Redis cannot save to disk", during=submit_meanwhile, lift=lift)


def test_nopermission_and_readonly_each_exit_7_with_one_line(tmp_path):
    users = {"nohset": "on >pw ~* &* +@all -hset"}
    path = write_jsonl(tmp_path / "in.jsonl", echo_rows(3))
    with RedisServer(tmp_path / "acl", acl_users=users) as server:
        sub = batchgen("submit", path, "--model", "echo-m", "--json", redis_url=server.url_for("nohset", "pw"))
        assert sub.returncode == 7
        err = error_json(sub)
        assert err["code"] == "redis_refused" and "permission" in err["message"] and "hset" in err["message"]
    with RedisServer(tmp_path / "replica") as server:
        Redis.from_url(server.url).replicaof("127.0.0.1", free_port())  # a replica of nobody: read-only
        sub = batchgen("submit", path, "--model", "echo-m", redis_url=server.url)
        assert sub.returncode == 7 and b"read-only replica" in sub.stderr and b"Traceback" not in sub.stderr
        work = batchgen("worker", "--engine", "echo", "--model", "echo-m", "--burst", redis_url=server.url)
        assert work.returncode == 7 and b"read-only replica" in work.stderr and b"Traceback" not in work.stderr


# -- poison ----------------------------------------------------------------------------------------------

def test_a_request_nested_10000_deep_fails_alone_and_the_worker_goes_on(redis_conn, tmp_path):
    rows = echo_rows(4)
    client, batch = submit(redis_conn, tmp_path / "in.jsonl", rows)
    deep = '{"custom_id": ' + "[" * 10_000 + "]" * 10_000 + ', "prompt": "x"}'
    redis_conn.hset(keys.BatchKeys(batch.id).requests, 2, deep)
    assert make_worker(redis_conn).run() == 4
    lines = {ln["custom_id"]: ln for ln in client.results(batch.id)}
    assert error_of(lines["2"])["code"] == "invalid_request"  # named by its index: its custom_id is unreadable
    assert [cid for cid, ln in lines.items() if error_of(ln) is None] and len(lines) == 4
    assert client.get(batch.id).status == BatchStatus.COMPLETED


def test_a_chunk_job_with_the_wrong_arguments_fails_alone_and_its_claim_is_released(redis_conn, tmp_path):
    rows = echo_rows(6)
    client, batch = submit(redis_conn, tmp_path / "in.jsonl", rows, chunk_size=2)
    job = chunks.fetch_job(f"{batch.id}-0", redis_conn)
    assert job.func_name  # loads the stored data, so save() can rebuild it
    job.args = (batch.id, 0)  # one argument short
    job.save()
    assert make_worker(redis_conn).run() == 6
    lines = {ln["custom_id"]: ln for ln in client.results(batch.id)}
    assert {cid for cid, ln in lines.items() if error_of(ln)} == {"r0", "r1"}
    assert error_of(lines["r0"])["code"] == "invalid_chunk_job"
    assert client.get(batch.id).status == BatchStatus.COMPLETED
    assert redis_conn.hlen(keys.claims_key()) == 0
    queue = chunks.make_queue("echo-m", "default", redis_conn)
    assert job.id in queue.failed_job_registry.get_job_ids()


# -- results root --------------------------------------------------------------------------------------

def test_worker_fails_a_batch_whose_output_dir_is_outside_its_results_root(redis_conn, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere" / ".ssh"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")  # inside by name, outside in fact
    client = BatchClient(ProducerConfig(), connection=redis_conn)
    bad = client.submit([write_jsonl(tmp_path / "a.jsonl", echo_rows(3))], model="echo-m",
                        output_dir=str(outside)).batch
    linked = client.submit([write_jsonl(tmp_path / "b.jsonl", echo_rows(2))], model="echo-m",
                           output_dir=str(root / "link" / "x")).batch
    good = client.submit([write_jsonl(tmp_path / "c.jsonl", echo_rows(2))], model="echo-m",
                         output_dir=str(root / "out")).batch
    make_worker(redis_conn, results_root=str(root)).run()
    for refused in (bad, linked):
        assert client.get(refused.id).status == BatchStatus.FAILED
        codes = {error_of(ln)["code"] for ln in client.results(refused.id)}
        assert codes == {"output_dir_not_allowed"}
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").rglob("*.jsonl"))
    assert client.get(good.id).status == BatchStatus.COMPLETED
    assert (root / "out" / f"{good.id}.output.jsonl").exists()


def test_submit_refuses_an_output_dir_outside_a_known_results_root(redis_conn, redis_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", echo_rows(2))
    sub = batchgen("submit", path, "--model", "echo-m", "--output-dir", str(tmp_path / "x"), "--json",
                   redis_url=redis_url, BATCHGEN_RESULTS_ROOT=str(tmp_path / "root"))
    assert sub.returncode == 2 and error_json(sub)["code"] == "output_dir_not_allowed"
    # No root given: the roots the model's live workers advertise decide.
    WorkerRegistry(redis_conn).heartbeat("w1", {"name": "w1", "model": "echo-m", "results_root": str(tmp_path / "r")},
                                         ttl_s=60)
    client = BatchClient(ProducerConfig(), connection=redis_conn)
    with pytest.raises(OutputDirRefused):
        client.submit([path], model="echo-m", output_dir=str(tmp_path / "x"))
    assert client.submit([path], model="echo-m", output_dir=str(tmp_path / "r" / "x")).batch is not None
    assert data_keys(redis_conn) and len(client.recent()) == 1


# -- silent idle ---------------------------------------------------------------------------------------

def test_submit_status_and_wait_say_when_no_live_worker_serves_the_model(redis_conn, redis_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", echo_rows(2))
    sub = batchgen("submit", path, "--model", "nobody-serves", "--json", redis_url=redis_url, check=True)
    batch = json.loads(sub.stdout)
    assert "no live worker serves model 'nobody-serves'" in batch["warning"]
    assert b"warning: no live worker serves model 'nobody-serves'" in sub.stderr
    status = batchgen("status", batch["id"], redis_url=redis_url, check=True)
    assert b"no live worker serves model 'nobody-serves'" in status.stderr
    waited = batchgen("wait", batch["id"], "--timeout", "0.1", "--json", redis_url=redis_url)
    assert waited.returncode == 5 and "no live worker" in json.loads(waited.stdout)["warning"]
    WorkerRegistry(redis_conn).heartbeat("w1", {"name": "w1", "model": "nobody-serves"}, ttl_s=60)
    status = batchgen("status", batch["id"], "--json", redis_url=redis_url, check=True)
    assert "warning" not in json.loads(status.stdout) and b"warning" not in status.stderr


def test_an_idle_worker_logs_what_it_serves_and_what_waits(redis_conn, tmp_path, caplog):
    submit(redis_conn, tmp_path / "in.jsonl", echo_rows(3))
    with caplog.at_level(logging.WARNING, logger="batchgen.worker"):
        assert make_worker(redis_conn, model="echo-typo").run() == 0
    assert "serves model 'echo-typo': nothing is queued for it; waiting for other models: 'echo-m' (1 chunk)" \
        in caplog.text


def test_heartbeats_go_on_while_an_engine_step_outlasts_the_worker_ttl(redis_conn, redis_url, tmp_path):
    client, batch = submit(redis_conn, tmp_path / "in.jsonl", echo_rows(1))
    worker = make_worker(redis_conn, step_delay_s=3.0, worker_ttl_s=2, heartbeat_interval_s=0.3, name="slow-step")
    observer = Redis.from_url(redis_url)
    seen: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            alive = bool(observer.exists(keys.worker_key("slow-step")))
            if worker.num_requests_done == 0:  # still working: its clean stop (unregister) comes after
                seen.append(alive)
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    worker.workers.register("slow-step")
    watcher.start()
    try:
        assert worker.run() == 1
    finally:
        done.set()
        watcher.join()
    assert client.get(batch.id).status == BatchStatus.COMPLETED
    # from its first heartbeat until its request is done, alive throughout the 3 s step (TTL 2 s)
    alive = seen[seen.index(True):]
    assert len(alive) >= 10 and False not in alive, seen


# -- file names, CLI errors ----------------------------------------------------------------------------

def test_a_non_utf8_file_name_is_refused_by_name_not_with_a_codec_error(redis_conn, tmp_path):
    name = os.fsdecode(b"bad-\xff.jsonl")
    (tmp_path / name).write_text('{"prompt": "x"}\n')
    client = BatchClient(ProducerConfig(), connection=redis_conn)
    result = client.submit([str(tmp_path / name)], model="echo-m")
    assert result.batch is None and "\\xff" in str(result.errors[0])
    assert data_keys(redis_conn) == []


def test_json_errors_are_one_object_with_a_code_for_every_kind(redis_url, tmp_path):
    cases = [
        (["status", "batch_nope", "--json"], {}, 4, "not_found"),
        (["status", "--json"], {}, 2, "usage"),
        (["submit", "x.jsonl", "--no-such-flag", "--json"], {}, 2, "usage"),
        (["submit", "--json", "x.jsonl", "--top-p", "0", "--model", "m"], {}, 2, "usage"),
        (["status", "batch_nope", "--json"], {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, 6,
         "redis_unreachable"),
        (["submit", "--json", str(tmp_path / "absent.jsonl"), "--model", "m"], {}, 3, "invalid_input"),
    ]
    for args, env, code, kind in cases:
        proc = subprocess.run([*BATCHGEN, *args], capture_output=True, env={**cli_env(redis_url), **env}, timeout=60,
                              cwd=tmp_path)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert json.loads(proc.stdout.splitlines()[0] if kind != "invalid_input" else proc.stdout)["error"]["code"] \
            == kind, (args, proc.stdout)
        assert b"Traceback" not in proc.stderr


NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from batchgen.producer.cli import main
main(sys.argv[1:], prog_name="batchgen")
"""


@pytest.mark.parametrize("args", [
    ["demo-model", "{tmp}/dm", "--json"],
    ["worker", "--model", "m", "--burst", "--json"],
    ["run", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl", "--model", "m", "--json"],
])
def test_a_producer_only_install_is_told_to_install_the_worker_extra(args, redis_url, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    argv = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, env=cli_env(redis_url),
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 9, proc.stderr
    err = error_json(proc)
    assert err["code"] == "worker_extra_missing" and "batchgen[worker]" in err["message"]


def test_a_model_that_is_not_there_has_its_own_exit_code(redis_url, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    proc = batchgen("run", path, "-o", str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "no-model"), "--json",
                    redis_url=redis_url, HF_HUB_OFFLINE="1")
    assert proc.returncode == 10, proc.stderr
    assert error_json(proc)["code"] == "model_not_found"


def test_a_requests_key_of_the_wrong_type_does_not_stop_the_worker(redis_conn, tmp_path):
    _, broken = submit(redis_conn, tmp_path / "a.jsonl", echo_rows(2))
    client, fine = submit(redis_conn, tmp_path / "b.jsonl", echo_rows(3))
    redis_conn.delete(keys.BatchKeys(broken.id).requests)
    redis_conn.set(keys.BatchKeys(broken.id).requests, "not a hash")  # WRONGTYPE on every read
    assert make_worker(redis_conn).run() == 3
    assert client.get(fine.id).status == BatchStatus.COMPLETED
    assert redis_conn.hlen(keys.claims_key()) == 0
