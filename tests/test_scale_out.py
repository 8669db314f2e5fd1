"""Scale-out: many workers on one Redis share batches, stay fair across batches and models, and
`batchgen worker --gpus 0,1` runs one worker per GPU.

Every assertion is about order or counts (which batch finished while how much of another was still
pending, which custom_ids came back how often), never about wall-clock time.
"""

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from batchgen.jobs import chunks, keys
from batchgen.jobs.states import BatchStatus
from batchgen.producer.client import BatchClient
from batchgen.producer.config import ProducerConfig
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.launcher import child_specs, parse_gpus
from batchgen.worker.worker import BatchWorker

from tests.cli import batchgen, eventually, start_worker

FAST_REAP = ("--worker-ttl", "3", "--heartbeat-interval", "1")  # a kill -9'd worker is reaped in ~3-5 s


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prompts(prefix: str, n: int, words: int = 3) -> list[dict]:
    return [{"custom_id": f"{prefix}-{i}", "prompt": " ".join(f"{prefix}{i}w{j}" for j in range(words))}
            for i in range(n)]


def stop(procs, logs) -> None:
    """SIGTERM, then every worker must exit 0 (it finished or handed back its chunks)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p, log in zip(procs, logs, strict=True):
        assert p.wait(timeout=60) in (0, -signal.SIGKILL), log.read_text()[-3000:]


def assert_exactly_once(client: BatchClient, batch_id: str, rows: list[dict], output_dir: Path) -> None:
    batch = client.get(batch_id)
    assert batch.status == BatchStatus.COMPLETED, batch
    assert batch.request_counts == {"total": len(rows), "completed": len(rows), "failed": 0}
    expected = sorted(r["custom_id"] for r in rows)
    assert sorted(ln["custom_id"] for ln in client.results(batch_id)) == expected
    # The result file gets only the lines Redis accepted, so a re-run request is never appended twice.
    on_disk = (output_dir / f"{batch_id}.output.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in on_disk) == expected


def kill_a_worker_holding_chunks(conn, procs, names) -> str:
    """kill -9 of a worker while it holds claimed chunks; returns its name."""
    def holder():
        held = set(conn.hvals(keys.claims_key()))
        return next((n for n in names if n in held), None)

    victim = eventually(holder, "a worker holding chunks", poll_s=0.005)
    os.kill(procs[names.index(victim)].pid, signal.SIGKILL)
    procs[names.index(victim)].wait(timeout=10)
    return victim


# -- many workers, one kill -9 ------------------------------------------------------------------------
def test_three_echo_workers_share_two_batches_and_lose_nothing_when_one_is_killed(redis_url, redis_conn, tmp_path):
    client = BatchClient(ProducerConfig(redis_url=redis_url, chunk_size=8), connection=redis_conn)
    out = tmp_path / "out"
    rows_a, rows_b = prompts("a", 480), prompts("b", 320)
    a = client.submit([write_jsonl(tmp_path / "a.jsonl", rows_a)], model="echo-m", output_dir=str(out)).batch
    b = client.submit([write_jsonl(tmp_path / "b.jsonl", rows_b)], model="echo-m", output_dir=str(out)).batch

    names = [f"echo-{i}" for i in range(3)]
    logs = [tmp_path / f"{n}.log" for n in names]
    procs = [start_worker("--engine", "echo", "--model", "echo-m", "--max-batch", "8", "--echo-step-delay", "0.05",
                          *FAST_REAP, "--name", n, redis_url=redis_url, log=log) for n, log in zip(names, logs, strict=True)]
    try:
        victim = kill_a_worker_holding_chunks(redis_conn, procs, names)
        orphaned = [j for j, w in redis_conn.hgetall(keys.claims_key()).items() if w == victim]
        eventually(lambda: all(client.get(x.id).status.is_terminal for x in (a, b)), "both batches to end")
    finally:
        stop(procs, logs)

    assert_exactly_once(client, a.id, rows_a, out)
    assert_exactly_once(client, b.id, rows_b, out)
    survivors = [log.read_text() for n, log in zip(names, logs, strict=True) if n != victim]
    assert all("claimed" in text for text in survivors), "every live worker took part"
    if orphaned:  # the victim died holding these: a survivor's reaper put them back
        reaped = "".join(survivors)
        assert all(f"requeued chunk {j} of dead worker {victim}" in reaped for j in orphaned)
    assert redis_conn.hlen(keys.claims_key()) == 0


@pytest.mark.slow
def test_tiny_model_workers_share_a_batch_and_survive_a_kill(demo_model_dir, redis_url, redis_conn, tmp_path):
    names = [f"llm-{i}" for i in range(3)]
    logs = [tmp_path / f"{n}.log" for n in names]
    procs = [start_worker("--model", str(demo_model_dir), "--served-model-name", "demo", "--max-batch", "2",
                          *FAST_REAP, "--name", n, redis_url=redis_url, log=log) for n, log in zip(names, logs, strict=True)]
    try:
        # Submit once every model is loaded (a worker registers after its load), so all three share it.
        eventually(lambda: all(redis_conn.exists(keys.worker_key(n)) for n in names), "three loaded workers",
                   timeout_s=240, poll_s=0.2)
        listed = json.loads(batchgen("workers", "--json", redis_url=redis_url, check=True).stdout)
        # `batchgen workers` says which int8 kernel runs, how many outlier columns it keeps (the demo model's
        # activations stay below the threshold: none) and how many inputs it rotates (each layer's down projection)
        num_layers = json.loads((demo_model_dir / "config.json").read_text())["num_hidden_layers"]
        assert {(w["int8_kernel"], w["int8_outlier_columns"], w["int8_rotated_inputs"]) for w in listed} == {
            ("int_mm_outliers", 0, num_layers)}
        client = BatchClient(ProducerConfig(redis_url=redis_url, chunk_size=2), connection=redis_conn)
        rows = [{"custom_id": f"t-{i}", "prompt": f"tell me about the number {i}", "max_tokens": 12,
                 "temperature": 0} for i in range(24)]
        batch = client.submit([write_jsonl(tmp_path / "t.jsonl", rows)], model="demo",
                              output_dir=str(tmp_path / "out")).batch
        kill_a_worker_holding_chunks(redis_conn, procs, names)
        eventually(lambda: client.get(batch.id).status.is_terminal, "the batch to end", timeout_s=120)
    finally:
        stop(procs, logs)
    assert_exactly_once(client, batch.id, rows, tmp_path / "out")


# -- fairness across batches and priorities ----------------------------------------------------------
class RecordingEcho(EchoEngine):
    """Echo that logs which batch each finished request belonged to, step by step, and can act between steps."""

    def __init__(self, on_step: Callable[[int], None], **kw):
        super().__init__(**kw)
        self.on_step = on_step
        self.steps: list[list[str]] = []

    def step(self):
        self.on_step(len(self.steps))
        results = super().step()
        self.steps.append([r.key.split(":")[0] for r in results])
        return results


def done_by_step(steps: list[list[str]], batch_id: str) -> list[int]:
    """How many requests of batch_id had finished after each step."""
    total, out = 0, []
    for finished in steps:
        total += finished.count(batch_id)
        out.append(total)
    return out


def test_small_batches_submitted_after_a_huge_one_finish_first_and_high_priority_first_of_all(redis_conn, tmp_path):
    client = BatchClient(ProducerConfig(chunk_size=8), connection=redis_conn)

    def submit(name: str, n: int, priority: str) -> str:
        return client.submit([write_jsonl(tmp_path / f"{name}.jsonl", prompts(name, n))], model="echo-m",
                             priority=priority).batch.id

    huge = submit("huge", 800, "default")
    huge_low = submit("huge-low", 160, "low")
    late: dict[str, str] = {}

    def submit_late(step: int) -> None:
        if step == 5:  # the huge batch is running: now a small batch, then a small urgent one
            late["small"] = submit("small", 24, "default")
            late["urgent"] = submit("urgent", 24, "high")

    engine = RecordingEcho(submit_late, model_name="echo-m", max_batch_size=8)
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    assert BatchWorker(cfg, engine, redis_conn).run() == 800 + 160 + 24 + 24

    huge_done = done_by_step(engine.steps, huge)
    small_end = done_by_step(engine.steps, late["small"]).index(24)
    urgent_end = done_by_step(engine.steps, late["urgent"]).index(24)
    # Round-robin: the small batch waits for the chunks the worker holds and the huge batch's window,
    # then the two alternate chunk by chunk; it never waits for the huge batch to end.
    before, held, window, alternating = 5 * 8, 2 * 8, chunks.WINDOW * 8, 2 * 8
    assert huge_done[small_end] <= before + held + window + alternating, huge_done[small_end]
    assert huge_done[small_end] < 800 // 8
    # Priority: the urgent batch, submitted last, is served before the small default one.
    assert urgent_end < small_end
    # Strictly by priority: the low batch starts only when the default queue has run dry.
    low_start = next(i for i, n in enumerate(done_by_step(engine.steps, huge_low)) if n)
    assert huge_done[low_start] >= 800 - 2 * 8


def test_a_small_batch_starts_within_a_chunk_on_a_busy_worker_process(redis_url, redis_conn, tmp_path):
    client = BatchClient(ProducerConfig(redis_url=redis_url, chunk_size=8), connection=redis_conn)
    huge = client.submit([write_jsonl(tmp_path / "huge.jsonl", prompts("h", 2400))], model="echo-m").batch
    log = tmp_path / "worker.log"
    proc = start_worker("--engine", "echo", "--model", "echo-m", "--max-batch", "8", "--echo-step-delay", "0.02",
                        redis_url=redis_url, log=log)
    try:
        eventually(lambda: client.get(huge.id).num_done > 0, "the huge batch to start")
        small = client.submit([write_jsonl(tmp_path / "small.jsonl", prompts("s", 16))], model="echo-m").batch
        eventually(lambda: client.get(small.id).status == BatchStatus.COMPLETED, "the small batch")
        huge_done = client.get(huge.id).num_done
        assert huge_done < huge.total // 2, f"the small batch waited for {huge_done} of the huge one"
        client.cancel(huge.id)
    finally:
        stop([proc], [log])


# -- one Redis, several models -----------------------------------------------------------------------
def test_workers_of_different_models_never_take_each_others_work(redis_conn, tmp_path):
    client = BatchClient(ProducerConfig(chunk_size=8), connection=redis_conn)
    ids = {m: client.submit([write_jsonl(tmp_path / f"{m}.jsonl", prompts(m, n))], model=m).batch.id
           for m, n in (("alpha", 40), ("beta", 24), ("gamma", 16))}

    def worker(model: str) -> BatchWorker:
        cfg = WorkerConfig(EngineConfig(model=model), engine="echo", burst=True, redis_url="unused")
        return BatchWorker(cfg, EchoEngine(model, max_batch_size=8), redis_conn)

    assert worker("beta").run() == 24
    assert worker("alpha").run() == 40
    for model in ("alpha", "beta"):
        batch = client.get(ids[model])
        assert batch.status == BatchStatus.COMPLETED and batch.request_counts["failed"] == 0
        assert {ln["response"]["body"]["model"] for ln in client.results(ids[model])} == {model}
    gamma = client.get(ids["gamma"])  # nobody serves gamma: untouched, still queued for its own workers
    assert gamma.status == BatchStatus.IN_PROGRESS and gamma.num_done == 0
    assert chunks.make_queue("gamma", "default", redis_conn).count == 2


# -- one worker per GPU ------------------------------------------------------------------------------
def test_gpus_flag_means_one_child_per_gpu_with_its_own_name_and_device():
    assert parse_gpus("0, 1,3") == ["0", "1", "3"]
    for bad in ("", ",", "0,0"):
        with pytest.raises(ValueError):
            parse_gpus(bad)
    specs = child_specs(["0", "1"], ["--model", "m", "--burst"], base_name="box")
    assert [s.name for s in specs] == ["box.gpu0", "box.gpu1"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1"]
    assert specs[1].argv[-5:] == ["--model", "m", "--burst", "--name", "box.gpu1"]


def test_launcher_runs_a_worker_per_gpu_and_forwards_sigterm(redis_url, redis_conn, tmp_path):
    log = tmp_path / "launcher.log"
    parent = start_worker("--engine", "echo", "--model", "echo-m", "--gpus", "0,1", "--name", "box",
                          redis_url=redis_url, log=log)
    try:
        def two_workers():
            infos = json.loads(batchgen("workers", "--json", redis_url=redis_url, check=True).stdout)
            return infos if len(infos) == 2 else None

        infos = eventually(two_workers, "two workers in `batchgen workers`", timeout_s=60, poll_s=0.2)
        assert {(w["name"], w["cuda_visible_devices"]) for w in infos} == {("box.gpu0", "0"), ("box.gpu1", "1")}
        assert {w["queues"] for w in infos} == {"batchgen:echo-m:high,batchgen:echo-m:default,batchgen:echo-m:low"}

        client = BatchClient(ProducerConfig(redis_url=redis_url, chunk_size=8), connection=redis_conn)
        rows = prompts("g", 64)
        batch = client.submit([write_jsonl(tmp_path / "g.jsonl", rows)], model="echo-m").batch
        eventually(lambda: client.get(batch.id).status == BatchStatus.COMPLETED, "the batch")
        assert sorted(ln["custom_id"] for ln in client.results(batch.id)) == sorted(r["custom_id"] for r in rows)
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "worker box.gpu0 exited with 0" in text and "worker box.gpu1 exited with 0" in text
    assert json.loads(batchgen("workers", "--json", redis_url=redis_url, check=True).stdout) == []


def test_launcher_exits_when_its_workers_exit(redis_url, redis_conn, tmp_path):
    log = tmp_path / "launcher.log"
    parent = start_worker("--engine", "echo", "--model", "echo-m", "--gpus", "0,1", "--burst",
                          redis_url=redis_url, log=log)
    assert parent.wait(timeout=60) == 0, log.read_text()[-3000:]  # burst: queues empty, both children done
    assert log.read_text().count("burst done") == 2
