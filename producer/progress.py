"""What `batchgen wait` shows beside its bar: the batch's request rate, token rate and ETA.

Rates count from the batch's start, not from when `wait` began (a bar joining a running batch would
otherwise see its first poll as a burst).

Tokens are not counted per batch: the workers' heartbeats carry tok/s, and the batch gets the sum over
workers serving its queue (as the dashboard shows it; batches sharing a queue share that figure).
"""

from dataclasses import dataclass
from typing import Any

from batchgen.jobs.batch import Batch
from batchgen.jobs.states import BatchStatus


@dataclass(frozen=True)
class BatchRates:
    requests_per_s: float | None
    tokens_per_s: float
    eta_s: float | None


def batch_rates(batch: Batch, workers: list[dict[str, Any]], now: float) -> BatchRates:
    running = batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
    started = batch.timestamps.get("in_progress_at")
    done, total = batch.num_done, batch.total
    rate = done / max(1.0, now - started) if started and running and done else None
    tokens = sum(_number(w.get("tokens_per_s")) for w in workers
                 if batch.queue and batch.queue in str(w.get("queues", "")).split(",")) if running else 0.0
    return BatchRates(rate, tokens, (total - done) / rate if rate else None)


def postfix(batch: Batch, rates: BatchRates) -> str:
    """e.g. "in_progress, 0.80 req/s, 1,234 tok/s, ETA 12m05s"; an ended batch shows its status alone."""
    if batch.status.is_terminal:
        return batch.status.value
    rate = "? req/s" if rates.requests_per_s is None else f"{rates.requests_per_s:.2f} req/s"
    return f"{batch.status.value}, {rate}, {rates.tokens_per_s:,.0f} tok/s, ETA {format_eta(rates.eta_s)}"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
