"""The dashboard's data: recent batches with progress, rate and ETA, and live workers with an hour of history.

The history is a ring per worker in this process, filled by sampling the workers' heartbeat hashes.
"""

import time
from collections import deque
from typing import Any

from batchgen.jobs.openai_batch import load_api_fields, render
from batchgen.jobs.states import BatchStatus
from batchgen.producer.client import BatchClient

HISTORY_S = 3600
SAMPLED = ("tokens_per_s", "batch_size", "vram_used_bytes", "vram_free_bytes", "gpu_temperature_c")


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


class WorkerHistory:
    """Per worker, the last hour of heartbeat samples: (time, tok/s, rows, VRAM used, VRAM free, temperature)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.samples: dict[str, deque[list[float | None]]] = {}

    def sample(self, workers: list[dict[str, str]], now: float | None = None) -> None:
        now = time.time() if now is None else now
        maxlen = max(2, int(HISTORY_S / self.interval_s))
        for info in workers:
            ring = self.samples.setdefault(info["name"], deque(maxlen=maxlen))
            ring.append([round(now, 1), *(_number(info.get(f)) for f in SAMPLED)])
        cutoff = now - HISTORY_S
        for name in [n for n, ring in self.samples.items() if not ring or ring[-1][0] < cutoff]:
            del self.samples[name]

    def of(self, name: str) -> list[list[float | None]]:
        return list(self.samples.get(name, ()))


def batch_row(batch, api_fields: dict[str, str], workers: list[dict[str, str]], now: float) -> dict[str, Any]:
    row = render(batch, api_fields)
    done, total = batch.num_done, batch.total
    started = batch.timestamps.get("in_progress_at")
    running = batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
    rate = done / max(1.0, now - started) if started and running else None  # requests per second so far
    row["progress"] = done / total if total else 0.0
    row["requests_per_s"] = rate
    row["eta_s"] = (total - done) / rate if rate else None
    # Workers serving the batch's queue; several batches on one queue share this figure.
    row["tokens_per_s"] = sum(_number(w.get("tokens_per_s")) or 0.0 for w in workers
                              if batch.queue and batch.queue in w.get("queues", "").split(",")) if running else 0.0
    row["outcome_counts"] = {o: batch.counts.get(f"num_{o}", 0) for o in ("succeeded", "errored", "cancelled", "expired")}
    return row


def dashboard_state(client: BatchClient, history: WorkerHistory, limit: int = 50) -> dict[str, Any]:
    now = time.time()
    client.expire_overdue()
    workers = client.workers()
    batches = client.recent(limit)
    fields = load_api_fields(client.connection, [b.id for b in batches])
    return {
        "now": now,
        "batches": [batch_row(b, fields[b.id], workers, now) for b in batches],
        "workers": [{**w, "history": history.of(w["name"])} for w in workers],
        "history_fields": ["t", *SAMPLED],
    }
