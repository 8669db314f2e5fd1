"""Chaos trials: kill -9 workers (and optionally restart Redis) at random moments; count lost/duplicated.

Each trial submits a batch, keeps 1-2 real `batchgen worker` subprocesses running, kills them with
SIGKILL (sometimes SIGTERM) at random moments (model load, prefill, decode, result writing), starts
replacements, and waits for the batch to end. Then every custom_id must appear exactly once in
`client.results()` with the output of an uninterrupted run (echo is deterministic; the LLM runs greedy
and its baseline is an uninterrupted `batchgen run` of the same file).

    python scripts/chaos.py --trials 100                                  # echo engine
    python scripts/chaos.py --trials 10 --engine llm --model demo-model --inject-oom
    python scripts/chaos.py --trials 20 --redis-restarts                  # also SIGTERM/restart Redis
    python scripts/chaos.py --trials 20 --redis-oom                       # Redis refuses writes a while

--redis-oom sets `maxmemory 1` (every write refused with OOM under noeviction) for 0.5-3 s at a random
moment in half the trials; workers must wait it out and lose nothing. Before the trials, the script
checks that `submit` and `worker` both refuse a Redis whose maxmemory-policy evicts (exit 8).

The last line is exactly `trials=N lost=L duplicated=D mismatched=X`; the exit status is 1 if any is
non-zero. Without --redis-url a private redis-server (AOF, appendfsync always) is started in a temp dir.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/redis_server.py: the private redis-server helper

from batchgen.jobs.inputs import ParamDefaults  # noqa: E402
from batchgen.jobs.schema import error_of  # noqa: E402
from batchgen.jobs.states import BatchStatus  # noqa: E402
from batchgen.producer.client import BatchClient  # noqa: E402
from batchgen.producer.config import ProducerConfig  # noqa: E402
from batchgen.worker.engine.echo import echo_text  # noqa: E402
from redis import Redis  # noqa: E402

from tests.redis_server import RedisServer  # noqa: E402

BATCHGEN = [sys.executable, "-m", "batchgen.producer.cli"]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma"]
LLM_PROMPTS = [
    "the quick brown fox", "write a short poem about the sea", "hello", "what is the capital of france",
    "list three prime numbers", "explain how a queue of jobs works", "batch generation keeps the gpu busy",
    "once upon a time", "redis is an in memory data store", "the weather today is",
]


@dataclass
class Totals:
    trials: int = 0
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    kills: int = 0
    terms: int = 0
    redis_restarts: int = 0
    redis_ooms: int = 0
    file_missing: int = 0
    torn: int = 0


@dataclass
class Fleet:
    """The worker subprocesses of one trial."""

    cmd: list[str]
    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    started: int = 0

    def alive(self) -> list[subprocess.Popen]:
        self.procs = [p for p in self.procs if p.poll() is None]
        return self.procs

    def start(self, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        self.started += 1
        log = open(self.log_dir / f"worker-{self.started}.log", "ab")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(extra_env or {})},
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def stop_all(self, timeout_s: float = 30.0) -> None:
        for p in self.alive():
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def echo_rows(rng: random.Random, trial: int, n: int) -> list[dict]:
    return [{"custom_id": f"t{trial}-r{i}", "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
             "max_tokens": rng.randint(1, 10)} for i in range(n)]


def llm_rows(n: int) -> list[dict]:
    rng = random.Random(1234)  # one fixed set: its uninterrupted baseline is computed once
    return [{"custom_id": f"r{i}", "prompt": LLM_PROMPTS[i % len(LLM_PROMPTS)] + f" {i}",
             "max_tokens": rng.randint(2, 12), "temperature": 0} for i in range(n)]


def comparable(line: dict) -> tuple:
    """What must equal the uninterrupted run: text, finish reason, token counts (ids and timestamps differ)."""
    if (error := error_of(line)) is not None:
        return ("error", error["code"])
    body = line["response"]["body"]
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return (text, choice["finish_reason"], body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])


def echo_expected(rows: list[dict]) -> dict[str, tuple]:
    out = {}
    for r in rows:
        text, reason = echo_text(r["prompt"], r["max_tokens"])
        out[r["custom_id"]] = (text, reason, len(r["prompt"].split()), len(text.split()))
    return out


def llm_baseline(src: Path, args: argparse.Namespace, work: Path) -> dict[str, tuple]:
    out = work / "baseline.jsonl"
    cmd = [*BATCHGEN, "run", str(src), "-o", str(out), "--model", args.model, "--served-model-name", args.served,
           "--max-batch", str(args.max_batch), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BATCHGEN_INJECT_OOM": ""})
    if proc.returncode != 0:
        sys.exit(f"baseline run failed: {proc.stderr[-2000:]}")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    return {ln["custom_id"]: comparable(ln) for ln in lines}


def random_oom_spec(rng: random.Random) -> str:
    # Two OOMs per worker at random forward calls: the batch halves twice (4 -> 2 -> 1) and never
    # reaches the batch-size-1 OOM that fails a request by design.
    a = rng.randint(1, 15)
    return f"steps={a},{a + rng.randint(1, 15)}"


def check(client: BatchClient, batch_id: str, expected: dict[str, tuple], output_dir: Path) -> dict[str, int]:
    lines = list(client.results(batch_id))
    seen = Counter(ln["custom_id"] for ln in lines)
    by_id = {ln["custom_id"]: ln for ln in lines}
    lost = sum(1 for cid in expected if seen[cid] == 0)
    duplicated = sum(c - 1 for c in seen.values() if c > 1) + sum(1 for cid in seen if cid not in expected)
    mismatched = sum(1 for cid, want in expected.items() if cid in by_id and comparable(by_id[cid]) != want)
    # The output-dir files are at most once (a line is appended only after Redis accepted it; a kill
    # between the two loses the file line, never Redis's): duplicates or torn lines there are bugs.
    torn = 0
    file_ids: Counter = Counter()
    for path in output_dir.glob(f"{batch_id}.*.jsonl"):
        for raw in path.read_bytes().splitlines():
            try:
                file_ids[json.loads(raw)["custom_id"]] += 1
            except ValueError:
                torn += 1
    duplicated += sum(c - 1 for c in file_ids.values() if c > 1)
    return {"lost": lost, "duplicated": duplicated, "mismatched": mismatched, "torn": torn,
            "file_missing": sum(1 for cid in expected if file_ids[cid] == 0)}


def check_evicting_policy(redis_url: str, work: Path) -> bool:
    """submit and worker must both refuse an allkeys-lru Redis with exit 8 and write nothing."""
    conn = Redis.from_url(redis_url, decode_responses=True)
    before = conn.config_get("maxmemory-policy")["maxmemory-policy"]
    src = work / "evict.jsonl"
    src.write_text('{"prompt": "hello"}\n')
    env = {**os.environ, "REDIS_URL": redis_url}
    conn.config_set("maxmemory-policy", "allkeys-lru")
    try:
        keys_before = conn.dbsize()
        sub = subprocess.run([*BATCHGEN, "submit", str(src), "--model", "chaos-evict"], capture_output=True, env=env)
        wrk = subprocess.run([*BATCHGEN, "worker", "--engine", "echo", "--model", "chaos-evict", "--burst"],
                             capture_output=True, env=env)
        wrote = conn.dbsize() - keys_before
    finally:
        conn.config_set("maxmemory-policy", before)
        conn.close()
    ok = sub.returncode == 8 and wrk.returncode == 8 and wrote == 0
    print(f"evicting-policy check: submit exit {sub.returncode}, worker exit {wrk.returncode}, keys written {wrote}"
          f" -> {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def run_trial(trial: int, args: argparse.Namespace, rng: random.Random, totals: Totals, redis_url: str,
              server: RedisServer | None, work: Path, llm: tuple[Path, dict] | None) -> None:
    tdir = work / f"trial-{trial}"
    (tdir / "out").mkdir(parents=True)
    conn = Redis.from_url(redis_url, decode_responses=True)
    client = BatchClient(ProducerConfig(redis_url=redis_url, chunk_size=args.chunk_size), connection=conn)
    if llm is None:
        rows = echo_rows(rng, trial, args.requests)
        expected = echo_expected(rows)
        src = tdir / "in.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        src, expected = llm
    batch = client.submit([str(src)], model=args.served, params=ParamDefaults(temperature=0),
                          output_dir=str(tdir / "out")).batch
    assert batch is not None, "submit rejected the chaos batch"

    cmd = [*BATCHGEN, "worker", "--model", args.model or args.served, "--served-model-name", args.served,
           "--engine", args.engine, "--max-batch", str(args.max_batch), "--worker-ttl", str(args.worker_ttl),
           "--heartbeat-interval", str(args.heartbeat), "--shutdown-grace", "5"]
    if args.engine == "echo":
        cmd += ["--echo-step-delay", str(args.step_delay)]
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    env.pop("BATCHGEN_INJECT_OOM", None)
    fleet = Fleet(cmd, env, tdir)
    num_workers = rng.randint(1, args.workers)
    kills_left = rng.randint(1, args.kills)
    restarts_left = 1 if server is not None and args.redis_restarts and rng.random() < 0.5 else 0
    ooms_left = 1 if args.redis_oom and rng.random() < 0.5 else 0
    t0 = time.monotonic()
    next_kill = t0 + rng.uniform(0.0, args.kill_window)
    next_restart = t0 + rng.uniform(0.0, args.kill_window * 2)
    next_oom = t0 + rng.uniform(0.0, args.kill_window * 2)
    oom_ends = None
    kills = terms = restarts = ooms = 0
    status = None
    while time.monotonic() - t0 < args.trial_timeout:
        while len(fleet.alive()) < num_workers:
            fleet.start({"BATCHGEN_INJECT_OOM": random_oom_spec(rng)} if args.inject_oom else None)
        now = time.monotonic()
        if kills_left and now >= next_kill:
            victim = rng.choice(fleet.alive())
            if rng.random() < args.sigterm_fraction:
                victim.send_signal(signal.SIGTERM)  # graceful: finishes or requeues in-flight work
                terms += 1
            else:
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                kills += 1
            kills_left -= 1
            next_kill = now + rng.uniform(0.0, args.kill_window)
        if ooms_left and now >= next_oom:
            conn.config_set("maxmemory", 1)  # under noeviction every write is refused with OOM
            oom_ends = now + rng.uniform(0.5, 3.0)
            ooms_left -= 1
            ooms += 1
        if oom_ends is not None and now >= oom_ends:
            conn.config_set("maxmemory", 0)
            oom_ends = None
        if restarts_left and now >= next_restart:
            server.restart(down_s=rng.uniform(0.0, 2.0))
            restarts_left -= 1
            restarts += 1
        try:
            status = conn.hget(f"batchgen:batch:{{{batch.id}}}", "status")
        except Exception:  # Redis restarting: keep the fleet alive and look again
            status = None
        if status and BatchStatus(status).is_terminal:
            break
        time.sleep(0.05)
    if oom_ends is not None:
        conn.config_set("maxmemory", 0)
    fleet.stop_all()
    res = check(client, batch.id, expected, tdir / "out")
    elapsed = time.monotonic() - t0
    print(f"trial {trial}: status={status} workers={num_workers} started={fleet.started} sigkill={kills} "
          f"sigterm={terms} redis_restarts={restarts} redis_ooms={ooms} elapsed={elapsed:.1f}s "
          + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    if res["lost"] or res["duplicated"] or res["mismatched"] or res["torn"]:
        print(f"  logs kept in {tdir}", flush=True)
        args.keep = True
    totals.trials += 1
    totals.kills += kills
    totals.terms += terms
    totals.redis_restarts += restarts
    totals.redis_ooms += ooms
    for k in ("lost", "duplicated", "mismatched", "torn", "file_missing"):
        setattr(totals, k, getattr(totals, k) + res[k])
    conn.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--requests", type=int, default=None, help="requests per batch (echo 48, llm 16)")
    p.add_argument("--engine", choices=["echo", "llm"], default="echo")
    p.add_argument("--model", help="model dir for --engine llm (e.g. from `batchgen demo-model DIR`)")
    p.add_argument("--redis-url", help="use this Redis (keys of other models are left alone); "
                                       "default: a private redis-server with AOF")
    p.add_argument("--redis-restarts", action="store_true",
                   help="also restart the private redis-server at a random moment in half the trials")
    p.add_argument("--redis-oom", action="store_true",
                   help="also make Redis refuse every write (maxmemory 1) for 0.5-3 s in half the trials")
    p.add_argument("--inject-oom", action="store_true", help="llm: each worker OOMs at two random forward calls")
    p.add_argument("--workers", type=int, default=2, help="at most this many workers at once (1..N per trial)")
    p.add_argument("--kills", type=int, default=3, help="at most this many kills per trial (1..N)")
    p.add_argument("--sigterm-fraction", type=float, default=0.15, help="share of kills that are SIGTERM")
    p.add_argument("--kill-window", type=float, default=None, help="seconds; kills land uniformly in it")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--step-delay", type=float, default=0.1, help="echo: seconds per engine step")
    p.add_argument("--worker-ttl", type=int, default=3)
    p.add_argument("--heartbeat", type=float, default=0.5)
    p.add_argument("--trial-timeout", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work dir (kept anyway when a trial fails)")
    args = p.parse_args(argv)
    if args.engine == "llm" and not args.model:
        p.error("--engine llm needs --model DIR")
    if args.inject_oom and args.engine != "llm":
        p.error("--inject-oom needs --engine llm")
    args.requests = args.requests or (48 if args.engine == "echo" else 16)
    args.kill_window = args.kill_window or (1.2 if args.engine == "echo" else 8.0)
    args.served = "chaos-echo" if args.engine == "echo" else "chaos-llm"
    args.seed = args.seed if args.seed is not None else random.randrange(2**31)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="batchgen-chaos-"))
    print(f"chaos: seed={args.seed} engine={args.engine} requests={args.requests} work={work}", flush=True)
    server = None
    if args.redis_url:
        redis_url = args.redis_url
    else:
        server = RedisServer(work / "redis").start()
        redis_url = server.url
    llm = None
    if args.engine == "llm":
        src = work / "llm.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in llm_rows(args.requests)))
        llm = (src, llm_baseline(src, args, work))
    totals = Totals()
    # it flips the server's policy for a moment: only on the private server this script owns
    eviction_ok = check_evicting_policy(redis_url, work) if server is not None else True
    try:
        for trial in range(args.trials):
            run_trial(trial, args, rng, totals, redis_url, server, work, llm)
    finally:
        if server is not None:
            server.stop()
    print(f"sigkill={totals.kills} sigterm={totals.terms} redis_restarts={totals.redis_restarts} "
          f"redis_ooms={totals.redis_ooms} "
          f"torn={totals.torn} file_missing={totals.file_missing} (file lines are at-most-once; Redis is exact)")
    print(f"trials={totals.trials} lost={totals.lost} duplicated={totals.duplicated} mismatched={totals.mismatched}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if (totals.lost or totals.duplicated or totals.mismatched or totals.torn or not eviction_ok) else 0


if __name__ == "__main__":
    sys.exit(main())
