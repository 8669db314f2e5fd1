"""Multi-GPU scaling: N workers (one per GPU, `batchgen worker --gpus 0,...`) on one Redis.

One command on a multi-GPU device: builds the 7B-shape random int8 model once, starts a carried
valkey-server, then runs the bulk workload of benchmarks/bulk.py with 1 GPU and, scaled xN, with all
N GPUs, in the same run. It checks every custom_id exactly once (Redis outcomes and the workers'
output files) and writes docs/benchmarks/multigpu.json:
device, gpus, tok_s_1, tok_s_n, efficiency = tok_s_n / (N * tok_s_1), duplicates, lost.

    python3 -m benchmarks.multigpu                            # all visible GPUs
    python3 -m benchmarks.multigpu --gpus 1 --requests 256    # dry run on one GPU
"""

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bulk import MAX_MODEL_LEN, MODEL_DIR, SERVED, _start_valkey, _write_jsonl
from benchmarks.common import build_llama7b, stop_process, workload, write_json

REPO = Path(__file__).resolve().parents[1]


def start_workers(gpus: list[int], url: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, REDIS_URL=url, BATCHGEN_MAX_MODEL_LEN=str(MAX_MODEL_LEN))
    cmd = [sys.executable, "-m", "batchgen.producer.cli", "worker", "--model", str(MODEL_DIR),
           "--served-model-name", SERVED, "--gpus", ",".join(map(str, gpus))]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(client, n: int, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(1 for w in client.workers() if w.get("model") == SERVED) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"workers not ready: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def check_once(client, batch_id: str, ids: list[str], output_dir: Path) -> dict:
    """Counts, per custom_id, its lines in Redis and in the workers' files."""
    in_redis = collections.Counter(line["custom_id"] for line in client.results(batch_id))
    in_files = collections.Counter()
    for path in output_dir.glob(f"{batch_id}.*.jsonl"):
        in_files.update(json.loads(line)["custom_id"] for line in path.read_text().splitlines())
    return {
        "lost": sum(1 for i in ids if in_redis[i] == 0),
        "duplicates": sum(c - 1 for c in in_redis.values() if c > 1) + sum(c - 1 for c in in_files.values() if c > 1),
        "missing_from_files": sum(1 for i in ids if in_files[i] == 0),
    }


def run_phase(gpus: list[int], reqs, url: str, tmp: Path) -> dict:
    from batchgen.jobs.schema import outcome_of
    from batchgen.producer.client import BatchClient
    from batchgen.producer.config import ProducerConfig

    client = BatchClient(ProducerConfig(redis_url=url))
    log = tmp / f"workers-{len(gpus)}.log"
    proc = start_workers(gpus, url, log)
    try:
        wait_ready(client, len(gpus), proc, log)
        path = tmp / f"batch-{len(gpus)}.jsonl"
        _write_jsonl(path, reqs)
        out_dir = tmp / f"out-{len(gpus)}"
        start = time.perf_counter()
        batch = client.submit([str(path)], model=SERVED, output_dir=str(out_dir)).batch
        batch = client.wait(batch.id, timeout_s=1800, poll_s=0.05)
        wall = time.perf_counter() - start
        tokens = sum(line["response"]["body"]["usage"]["completion_tokens"]
                     for line in client.results(batch.id) if outcome_of(line) == "succeeded")
        once = check_once(client, batch.id, [r.custom_id for r in reqs], out_dir)
        return {"gpus": len(gpus), "requests": len(reqs), "status": batch.status.value, "tokens": tokens,
                "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1), **once}
    finally:
        stop_process(proc, 90)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--requests", type=int, default=2048, help="per GPU")
    parser.add_argument("--out", type=Path, default=REPO / "docs/benchmarks/multigpu.json")
    args = parser.parse_args()
    n = args.gpus
    print("build", build_llama7b(MODEL_DIR), flush=True)
    port = 6391
    _start_valkey(port)
    url = f"redis://127.0.0.1:{port}/0"
    tmp = Path(tempfile.mkdtemp())
    base = workload(args.requests)
    one = run_phase([0], base, url, tmp)
    print("1 gpu", json.dumps(one), flush=True)
    scaled = [r.__class__(f"{r.custom_id}.{k}", r.prompt_ids, r.max_tokens) for k in range(n) for r in base]
    many = run_phase(list(range(n)), scaled, url, tmp) if n > 1 else one
    print(f"{n} gpus", json.dumps(many), flush=True)
    result = {
        "device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "gpus": n,
        "requests_per_gpu": args.requests, "tok_s_1": one["tok_s"], "tok_s_n": many["tok_s"],
        "efficiency": round(many["tok_s"] / (n * one["tok_s"]), 3),
        "duplicates": one["duplicates"] + (many["duplicates"] if n > 1 else 0),
        "lost": one["lost"] + (many["lost"] if n > 1 else 0), "runs": {"1": one, str(n): many},
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
