"""Reliability: every request of an accepted batch ends exactly once, whatever happens to workers or Redis.

Faults are real: `kill -9` of worker subprocesses, SIGTERM with a shutdown bound, a private
redis-server (AOF, appendfsync always) stopped and started again mid-run, OOMs injected into the real
8-bit model's forward, poison requests written straight into Redis. Workers run with a 3 s TTL and
0.5 s heartbeats so the reaper notices dead ones quickly. docs/reliability.md has the chaos numbers.
"""

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from batchgen.jobs import keys
from batchgen.jobs.states import BatchStatus
from batchgen.producer.client import BatchClient
from batchgen.producer.config import ProducerConfig
from batchgen.worker.engine.echo import echo_text
from redis import Redis

from tests.cli import batchgen, eventually, start_worker
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
FAST_TTL = ("--worker-ttl", "3", "--heartbeat-interval", "0.5")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def echo_rows(n: int, prefix: str = "r") -> list[dict]:
    return [{"custom_id": f"{prefix}{i}", "prompt": " ".join(f"w{j}" for j in range(i % 9 + 1)),
             "max_tokens": 1 + i % 6} for i in range(n)]


def echo_worker(redis_url: str, log: Path, *extra: str, model: str = "echo-m", delay: float = 0.05,
                **env: str) -> subprocess.Popen:
    return start_worker("--engine", "echo", "--model", model, "--max-batch", "4", "--echo-step-delay", str(delay),
                        *FAST_TTL, *extra, redis_url=redis_url, log=log, **env)


def assert_exactly_once(client: BatchClient, batch_id: str, rows: list[dict]) -> list[dict]:
    """Every custom_id once in results, with the echo engine's deterministic output."""
    lines = list(client.results(batch_id))
    counts = Counter(ln["custom_id"] for ln in lines)
    assert sorted(counts) == sorted(r["custom_id"] for r in rows), "lost or unknown custom_ids"
    assert max(counts.values()) == 1, f"duplicated: {[c for c, n in counts.items() if n > 1]}"
    by_id = {ln["custom_id"]: ln for ln in lines}
    for r in rows:
        line = by_id[r["custom_id"]]
        assert line["error"] is None, line
        assert line["response"]["body"]["choices"][0]["text"] == echo_text(r["prompt"], r["max_tokens"])[0]
    batch = client.get(batch_id)
    assert batch.status == BatchStatus.COMPLETED
    assert batch.request_counts == {"total": len(rows), "completed": len(rows), "failed": 0}
    return lines


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


# -- 1. chaos ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_chaos_script_loses_and_duplicates_nothing():
    """scripts/chaos.py, small N: random kill -9 / SIGTERM of 1-2 workers, restarts, until the batch ends."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--trials", "3", "--seed", "11",
                           "--requests", "32", "--kills", "2"],
                          capture_output=True, text=True, timeout=240)
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "trials=3 lost=0 duplicated=0 mismatched=0", proc.stdout + proc.stderr
    assert proc.returncode == 0


# -- 2. dead workers -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_worker_its_unfinished_requests_are_requeued_and_done_once(redis_url, redis_conn, tmp_path):
    rows = echo_rows(64)
    client = BatchClient(ProducerConfig(chunk_size=8), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m",
                          output_dir=str(tmp_path / "out")).batch
    victim = echo_worker(redis_url, tmp_path / "victim.log", delay=0.2)
    # Kill it mid-batch: some requests recorded, chunks still claimed by it.
    eventually(lambda: redis_conn.hlen(keys.BatchKeys(batch.id).outcomes) >= 4, "first results", 30)
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    done_before = redis_conn.hlen(keys.BatchKeys(batch.id).outcomes)
    held = [j for j, w in redis_conn.hgetall(keys.claims_key()).items()]
    assert held, "the killed worker held no chunk"
    assert done_before < len(rows)

    # Not --burst: a burst worker would see empty queues and exit before the victim's TTL runs out.
    rescuer = echo_worker(redis_url, tmp_path / "rescuer.log", delay=0.01)
    eventually(lambda: client.get(batch.id).status.is_terminal, "the rescuer to finish the batch", 60, 0.2)
    assert stop(rescuer) == 0
    log = (tmp_path / "rescuer.log").read_text()
    assert "requeued chunk" in log and "of dead worker" in log
    # The re-run only did what the dead worker had not finished.
    worker_info = [ln for ln in log.splitlines() if "still to do" in ln]
    assert worker_info
    assert_exactly_once(client, batch.id, rows)
    assert redis_conn.hlen(keys.claims_key()) == 0
    on_disk = (tmp_path / "out" / f"{batch.id}.output.jsonl").read_text().splitlines()
    assert len(on_disk) == len(set(json.loads(x)["custom_id"] for x in on_disk))  # whole lines, never twice


# -- 3. Redis restarts ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_redis_restart_mid_run_loses_nothing_and_worker_and_wait_reconnect(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        conn = Redis.from_url(server.url, decode_responses=True)
        rows = echo_rows(80)
        client = BatchClient(ProducerConfig(chunk_size=4), connection=conn)
        batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m").batch
        num_clients = len(conn.client_list())
        waiter = subprocess.Popen([sys.executable, "-m", "batchgen.producer.cli", "wait", batch.id, "--timeout", "90",
                                   "--poll", "0.2"], env={**os.environ, "REDIS_URL": server.url},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # `wait` fails fast when Redis is down at its first poll (a wrong URL); it rides out outages after it.
        # A slow start on a busy machine must not land that first poll in the restart below.
        eventually(lambda: len(conn.client_list()) > num_clients, "the waiter's first poll", 60, 0.05)
        worker = echo_worker(server.url, tmp_path / "worker.log", delay=0.05)
        eventually(lambda: conn.hlen(keys.BatchKeys(batch.id).outcomes) >= 8, "first results", 30)
        server.restart(down_s=1.5)  # SIGTERM: AOF fsynced; the script cache is empty after the restart
        num_before = conn.hlen(keys.BatchKeys(batch.id).outcomes)  # reconnects after the restart
        assert num_before < len(rows)  # so the worker ran the Lua scripts on a server with an empty script cache
        eventually(lambda: client.get(batch.id).status.is_terminal, "the batch to end after the restart", 90, 0.2)
        assert worker.poll() is None, "the worker died with Redis"
        assert_exactly_once(client, batch.id, rows)
        assert conn.script_exists(client.store._record.sha) == [True]  # re-loaded on NoScriptError
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, out + err
        assert "Redis unavailable" in err and "retrying" in err
        assert stop(worker) == 0
        log = (tmp_path / "worker.log").read_text()
        assert "Redis unavailable" in log and "retrying in" in log
        assert conn.hlen(keys.claims_key()) == 0


# -- 4. SIGTERM ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_worker_exits_within_grace_and_a_second_worker_completes_the_batch(redis_url, redis_conn, tmp_path):
    rows = echo_rows(60)
    client = BatchClient(ProducerConfig(chunk_size=6), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m").batch
    # Slow steps, a short grace: in-flight work cannot all finish, so the rest must be handed back.
    first = echo_worker(redis_url, tmp_path / "first.log", "--shutdown-grace", "1", delay=0.4)
    eventually(lambda: redis_conn.hlen(keys.BatchKeys(batch.id).outcomes) >= 4, "first results", 30)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0  # grace 1 s + a step; generous bound, no timing assertion
    log = (tmp_path / "first.log").read_text()
    assert "stop requested" in log
    assert redis_conn.hlen(keys.claims_key()) == 0  # every held chunk was requeued, none left claimed
    assert redis_conn.hlen(keys.BatchKeys(batch.id).outcomes) < len(rows)

    second = echo_worker(redis_url, tmp_path / "second.log", "--burst", delay=0.01)
    assert second.wait(timeout=60) == 0, (tmp_path / "second.log").read_text()
    assert_exactly_once(client, batch.id, rows)


# -- 5. OOM on the real model --------------------------------------------------------------------------

@pytest.mark.slow
def test_injected_ooms_on_the_8bit_model_lose_nothing_and_change_no_output(demo_model_dir, redis_url, redis_conn,
                                                                          tmp_path):
    rows = [{"custom_id": f"p{i}", "prompt": f"the quick brown fox number {i}", "max_tokens": 3 + i % 5,
             "temperature": 0} for i in range(12)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    base = tmp_path / "base.jsonl"
    run = batchgen("run", src, "-o", str(base), "--model", str(demo_model_dir), "--served-model-name", "demo",
                   "--max-batch", "4", redis_url=redis_url, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = {json.loads(x)["custom_id"]: json.loads(x)["response"]["body"]["choices"][0]["text"]
                for x in base.read_text().splitlines()}

    client = BatchClient(ProducerConfig(chunk_size=4), connection=redis_conn)
    batch = client.submit([src], model="demo").batch
    # Forward calls 2 and 5 fail inside the last layer: the batch halves 4 -> 2 -> 1 and evicted rows restart.
    worker = start_worker("--model", str(demo_model_dir), "--served-model-name", "demo", "--max-batch", "4",
                          *FAST_TTL, redis_url=redis_url, log=tmp_path / "worker.log",
                          BATCHGEN_INJECT_OOM="steps=2,5")
    eventually(lambda: client.get(batch.id).status.is_terminal, "the batch to end", 240, 0.2)
    # The OOMs really happened: the worker's heartbeat shows the batch cap halved twice.
    eventually(lambda: any(w.get("max_batch_size") == "1" for w in client.workers()), "max_batch_size 1", 30)
    assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    # and the log says so: each back-off, and the drained engine's line (which benchmarks read) counts them
    log_text = (tmp_path / "worker.log").read_text()
    assert all(f"a batch holds at most {n} rows now" in log_text for n in (2, 1)), log_text[-3000:]
    drained = [json.loads(x.split("engine steps: ", 1)[1]) for x in log_text.splitlines() if "engine steps: " in x]
    assert drained and drained[-1]["num_ooms"] == 2 and drained[-1]["max_batch_size"] == 1, drained[-1:]
    lines = list(client.results(batch.id))
    assert sorted(ln["custom_id"] for ln in lines) == sorted(expected)  # each exactly once
    got = {ln["custom_id"]: ln["response"]["body"]["choices"][0]["text"] for ln in lines}
    assert got == expected
    assert client.get(batch.id).status == BatchStatus.COMPLETED


# -- 6. poison requests --------------------------------------------------------------------------------

@pytest.mark.slow
def test_poison_requests_get_an_error_line_and_the_rest_of_the_batch_runs(demo_model_dir, redis_url, redis_conn,
                                                                         tmp_path):
    rows = [{"custom_id": "ok-1", "prompt": "hello there", "max_tokens": 3, "temperature": 0},
            {"custom_id": "too-long", "prompt": " ".join(["word"] * 200), "max_tokens": 8, "temperature": 0},
            {"custom_id": "ok-2", "prompt": "the quick brown fox", "max_tokens": 3, "temperature": 0},
            {"custom_id": "bad-params", "prompt": "x"},
            {"custom_id": "not-json", "prompt": "x"},
            {"custom_id": "ok-3", "prompt": "list three prime numbers", "max_tokens": 3, "temperature": 0}]
    client = BatchClient(ProducerConfig(chunk_size=2), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="demo").batch
    # Requests that slipped past validation: written straight into the batch's requests hash.
    requests_key = keys.BatchKeys(batch.id).requests
    redis_conn.hset(requests_key, "3", json.dumps({"custom_id": "bad-params", "prompt": "x",
                                                   "params": {"max_tokens": -5, "temperature": 9}}))
    redis_conn.hset(requests_key, "4", '{"custom_id": "not-json", "prompt": ')
    worker = start_worker("--model", str(demo_model_dir), "--served-model-name", "demo", "--max-model-len", "64",
                          "--burst", *FAST_TTL, redis_url=redis_url, log=tmp_path / "worker.log")
    assert worker.wait(timeout=240) == 0, (tmp_path / "worker.log").read_text()[-3000:]  # it survived
    lines = {ln["custom_id"]: ln for ln in client.results(batch.id)}
    # The corrupted line's custom_id cannot be read back: its input index stands in for it.
    assert sorted(lines) == sorted(["ok-1", "too-long", "ok-2", "bad-params", "4", "ok-3"])
    assert lines["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert lines["bad-params"]["response"]["body"]["error"]["code"] == "invalid_request"
    assert "max_tokens" in lines["bad-params"]["response"]["body"]["error"]["message"]
    assert lines["4"]["response"]["body"]["error"]["code"] == "invalid_request"
    for ok in ("ok-1", "ok-2", "ok-3"):
        assert lines[ok]["error"] is None and lines[ok]["response"]["status_code"] == 200
    final = client.get(batch.id)
    assert final.status == BatchStatus.COMPLETED
    assert final.request_counts == {"total": 6, "completed": 3, "failed": 3}


def test_echo_engine_poison_prompt_errors_alone(redis_conn, tmp_path):
    """A prompt the engine rejects (NUL byte) errors; the worker carries on in-process."""
    from batchgen.worker.config import WorkerConfig
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.echo import EchoEngine
    from batchgen.worker.worker import BatchWorker

    rows = [{"custom_id": "a", "prompt": "one two"}, {"custom_id": "nul", "prompt": "bad\u0000byte"},
            {"custom_id": "b", "prompt": "three"}]
    client = BatchClient(ProducerConfig(chunk_size=2), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m").batch
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    assert BatchWorker(cfg, EchoEngine("echo-m"), redis_conn).run() == 3
    lines = {ln["custom_id"]: ln for ln in client.results(batch.id)}
    assert lines["nul"]["response"]["body"]["error"]["code"] == "invalid_prompt"
    assert lines["a"]["error"] is None and lines["b"]["error"] is None
