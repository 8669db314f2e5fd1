"""What the queue costs next to the GPU: submit time, drain rate, Redis work per request.

CPU only, echo engine (no step delay), so everything measured is queue overhead. Side by side in one
run: batchgen (64-request chunk jobs, atomic Lua claims, batched HSETNX outcomes) and the naive
design of one plain RQ job per prompt (enqueue_many, SimpleWorker in burst mode, JSON serializer).

Redis work is measured twice: server side (INFO stats total_commands_processed, which also counts
the commands a Lua script runs) and client side (socket writes of redis-py, i.e. round trips: a
pipeline or a script call is one). Workers are separate processes that import and connect first and
start together, so process start-up is not timed.

    .venv/bin/python benchmarks/queue_overhead.py                 # own redis-server on a free port
    .venv/bin/python benchmarks/queue_overhead.py --quick         # 10k requests, 2k naive jobs
    .venv/bin/python benchmarks/queue_overhead.py --redis-url redis://host:6379/9   # flushes that db!
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_module
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.connection
from batchgen.jobs import defaults
from batchgen.jobs.states import BatchStatus
from batchgen.producer.client import BatchClient
from batchgen.producer.config import ProducerConfig
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

MODEL = "echo-bench"
ECHO_FN = "batchgen.worker.engine.echo.echo_text"  # the naive job: one prompt in, its echo out
MAX_TOKENS = 16


# -- measuring Redis work ----------------------------------------------------------------------------
class RoundTrips:
    """Counts redis-py socket writes in this process: one per command, pipeline or script call."""

    count = 0

    @classmethod
    def install(cls) -> None:
        original = redis.connection.AbstractConnection.send_packed_command
        if getattr(original, "_counted", False):
            return

        def counted(self, command, check_health=True):
            cls.count += 1
            return original(self, command, check_health)

        counted._counted = True  # type: ignore[attr-defined]
        redis.connection.AbstractConnection.send_packed_command = counted


def server_commands(conn: redis.Redis) -> int:
    return int(conn.info("stats")["total_commands_processed"])


def server_cpu_s(conn: redis.Redis) -> float:
    cpu = conn.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def top_commands(conn: redis.Redis, n: int = 8) -> dict[str, int]:
    stats = conn.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    return dict(sorted(calls.items(), key=lambda kv: -kv[1])[:n])


def measured(conn: redis.Redis, fn: Callable[[], Any]) -> tuple[Any, float, int, dict[str, int]]:
    """Runs fn; returns its value, seconds, server commands and the busiest commands (stats reset first)."""
    conn.config_resetstat()
    before = server_commands(conn)
    t0 = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - t0
    commands = server_commands(conn) - before - 1  # minus the INFO that read `before`
    return value, elapsed, commands, top_commands(conn)


# -- Redis to run against ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A private redis-server without persistence, so other users' traffic does not pollute the counts."""
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not on PATH: install it or pass --redis-url")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    conn = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            conn.ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


# -- inputs ------------------------------------------------------------------------------------------
def prompt(i: int) -> str:
    return f"summarise item number {i} of the overnight batch in a few words please"


def write_batch(path: Path, n: int) -> None:
    """OpenAI batch lines, the format the README leads with."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}],
                         "max_tokens": MAX_TOKENS},
            }) + "\n")


# -- worker processes --------------------------------------------------------------------------------
def _batchgen_worker(url: str, ready, start, results) -> None:
    from batchgen.worker.config import WorkerConfig
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.echo import EchoEngine
    from batchgen.worker.worker import BatchWorker

    RoundTrips.install()
    conn = redis.Redis.from_url(url, decode_responses=True)
    cfg = WorkerConfig(EngineConfig(model=MODEL), engine="echo", burst=True, redis_url=url)
    worker = BatchWorker(cfg, EchoEngine(MODEL), conn)
    conn.ping()
    ready.release()
    start.wait()
    RoundTrips.count = 0
    done = worker.run()
    results.put((done, RoundTrips.count, time.perf_counter()))


def _naive_worker(url: str, ready, start, results) -> None:
    RoundTrips.install()
    conn = redis.Redis.from_url(url)
    queue = Queue("naive", connection=conn, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=conn, serializer=JSONSerializer, log_job_description=False)
    conn.ping()
    ready.release()
    start.wait()
    RoundTrips.count = 0
    worker.work(burst=True, logging_level="WARNING", with_scheduler=False)
    results.put((0, RoundTrips.count, time.perf_counter()))  # jobs done: the finished registry says


def drain(url: str, target: Callable, num_workers: int) -> dict[str, Any]:
    """Starts num_workers processes together and times them until the last one exits (burst)."""
    ctx = mp.get_context("fork")
    ready, start, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, ready, start, results)) for _ in range(num_workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    conn = redis.Redis.from_url(url)
    conn.config_resetstat()
    before, cpu_before = server_commands(conn), server_cpu_s(conn)
    t0 = time.perf_counter()
    start.set()
    reports = []
    while len(reports) < len(procs):
        try:
            reports.append(results.get(timeout=1))
        except queue_module.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError("a worker process failed (see its traceback above)") from None
    elapsed = max(end for _, _, end in reports) - t0
    for p in procs:
        p.join()
    commands = server_commands(conn) - before - 1
    cpu_s = server_cpu_s(conn) - cpu_before
    done = sum(d for d, _, _ in reports)
    return {"workers": num_workers, "requests": done, "elapsed_s": elapsed, "req_s": done / elapsed, "redis_cpu_s": cpu_s,
            "commands": commands, "round_trips": sum(r for _, r, _ in reports), "top_commands": top_commands(conn)}


# -- the two designs ---------------------------------------------------------------------------------
def bench_submit(url: str, src: Path, n: int) -> dict[str, Any]:
    conn = redis.Redis.from_url(url, decode_responses=True)
    conn.flushdb()
    client = BatchClient(ProducerConfig(redis_url=url), connection=conn)
    RoundTrips.install()
    RoundTrips.count = 0
    memory_before = conn.info("memory")["used_memory"]
    result, elapsed, commands, top = measured(conn, lambda: client.submit([str(src)]))
    trips = RoundTrips.count
    assert result.batch is not None and result.batch.total == n, result.errors[:3]
    return {"batch_id": result.batch.id, "elapsed_s": elapsed, "commands": commands, "round_trips": trips,
            "top_commands": top, "memory_before": memory_before, "memory": conn.info("memory")["used_memory"]}


def bench_batchgen(url: str, src: Path, n: int, num_workers: int) -> dict[str, Any]:
    submitted = bench_submit(url, src, n)
    out = drain(url, _batchgen_worker, num_workers)
    conn = redis.Redis.from_url(url, decode_responses=True)
    batch = BatchClient(ProducerConfig(redis_url=url), connection=conn).get(submitted["batch_id"])
    assert batch.status == BatchStatus.COMPLETED and batch.num_done == n, batch
    assert out["requests"] == n, out
    submitted["memory_done"] = conn.info("memory")["used_memory"]
    return {**out, "submit": submitted}


def bench_naive(url: str, n: int, num_workers: int) -> dict[str, Any]:
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    queue = Queue("naive", connection=conn, serializer=JSONSerializer)
    RoundTrips.install()
    RoundTrips.count = 0

    def enqueue() -> None:
        for start in range(0, n, 10_000):  # one pipeline per 10k jobs, as a careful user would
            queue.enqueue_many([Queue.prepare_data(ECHO_FN, args=(prompt(i), MAX_TOKENS), job_id=f"req-{i}")
                                for i in range(start, min(n, start + 10_000))])

    _, submit_s, submit_commands, _ = measured(conn, enqueue)
    submit_trips = RoundTrips.count
    assert queue.count == n, queue.count
    out = drain(url, _naive_worker, num_workers)
    finished = queue.finished_job_registry.count
    assert finished == n and queue.count == 0, (finished, out)
    out.update(requests=finished, req_s=finished / out["elapsed_s"])
    return {**out, "submit": {"elapsed_s": submit_s, "commands": submit_commands, "round_trips": submit_trips}}


# -- report ------------------------------------------------------------------------------------------
def per(x: float, n: int) -> float:
    return round(x / n, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000, help="batchgen batch size (submit and drain)")
    ap.add_argument("--naive-jobs", type=int, default=20_000, help="plain RQ jobs for the naive design")
    ap.add_argument("--workers", default="1,2,4", help="worker process counts to drain with")
    ap.add_argument("--redis-url", help="use this Redis (its database is FLUSHED); default: a private redis-server")
    ap.add_argument("--out", type=Path, help="write the JSON here (e.g. docs/benchmarks/queue.json)")
    ap.add_argument("--quick", action="store_true", help="10k requests, 2k naive jobs, workers 1,2")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.naive_jobs, args.workers = 10_000, 2_000, "1,2"
    worker_counts = [int(w) for w in args.workers.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the private redis-server

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.redis_url
        if url is None:
            server, url = start_redis(Path(tmp))
        try:
            src = Path(tmp) / "batch.jsonl"
            write_batch(src, args.requests)
            rows = []
            for w in worker_counts:
                ours = bench_batchgen(url, src, args.requests, w)
                naive = bench_naive(url, args.naive_jobs, w)
                rows.append((w, ours, naive))
                print(f"workers={w}: batchgen {ours['req_s']:>9,.0f} req/s "
                      f"({per(ours['commands'], args.requests)} cmds, {per(ours['round_trips'], args.requests)} "
                      f"round trips/req) | naive RQ {naive['req_s']:>7,.0f} req/s "
                      f"({per(naive['commands'], args.naive_jobs)} cmds, "
                      f"{per(naive['round_trips'], args.naive_jobs)} round trips/req) | "
                      f"ratio {ours['req_s'] / naive['req_s']:.1f}x", flush=True)
            server_info = redis.Redis.from_url(url).info("server")
        finally:
            if server is not None:
                server.terminate()
                server.wait()

    submits = [o["submit"] for _, o, _ in rows]
    best_submit = min(submits, key=lambda s: s["elapsed_s"])
    n, m = args.requests, args.naive_jobs
    report = {
        "benchmark": "queue_overhead",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "requests": n,
        "naive_jobs": m,
        "chunk_size": defaults.CHUNK_SIZE,
        "workers": worker_counts,
        f"submit_{n // 1000}k_s": round(best_submit["elapsed_s"], 3),
        "submit_req_s": round(n / best_submit["elapsed_s"]),
        "naive_submit_req_s": round(m / rows[0][2]["submit"]["elapsed_s"]),
        "drain_req_s": {str(w): round(o["req_s"]) for w, o, _ in rows},
        "naive_drain_req_s": {str(w): round(nv["req_s"]) for w, _, nv in rows},
        "ratio": {str(w): round(o["req_s"] / nv["req_s"], 1) for w, o, nv in rows},
        "redis_commands_per_request": {
            "submit": per(best_submit["commands"], n),
            "drain": {str(w): per(o["commands"], n) for w, o, _ in rows},
            "naive_submit": per(rows[0][2]["submit"]["commands"], m),
            "naive_drain": {str(w): per(nv["commands"], m) for w, _, nv in rows},
        },
        "redis_round_trips_per_request": {
            "submit": per(best_submit["round_trips"], n),
            "drain": {str(w): per(o["round_trips"], n) for w, o, _ in rows},
            "naive_submit": per(rows[0][2]["submit"]["round_trips"], m),
            "naive_drain": {str(w): per(nv["round_trips"], m) for w, _, nv in rows},
        },
        # Redis CPU time per request while draining: 1 / this is what one Redis core could sustain.
        "redis_cpu_us_per_request": {
            "drain": {str(w): round(o["redis_cpu_s"] / n * 1e6, 1) for w, o, _ in rows},
            "naive_drain": {str(w): round(nv["redis_cpu_s"] / m * 1e6, 1) for w, _, nv in rows},
        },
        "redis_memory_bytes_per_request": {
            "queued": round((best_submit["memory"] - best_submit["memory_before"]) / n),
            "with_results": round((best_submit["memory_done"] - best_submit["memory_before"]) / n),
        },
        "top_commands": {"submit": best_submit["top_commands"], "drain": rows[0][1]["top_commands"],
                         "naive_drain": rows[0][2]["top_commands"]},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "redis": server_info.get("redis_version"), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
