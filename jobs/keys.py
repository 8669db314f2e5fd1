"""The Redis key layout. One batch's keys share a hash tag, so a Redis Cluster keeps them on one slot."""

from dataclasses import dataclass

from batchgen.jobs import defaults


@dataclass(frozen=True)
class BatchKeys:
    batch_id: str
    prefix: str = defaults.KEY_PREFIX

    @property
    def _base(self) -> str:
        return f"{self.prefix}:batch:{{{self.batch_id}}}"

    @property
    def record(self) -> str:
        """HASH: the batch record (status, timestamps, counters)."""
        return self._base

    @property
    def requests(self) -> str:
        """HASH: request index -> request JSON."""
        return f"{self._base}:requests"

    @property
    def outcomes(self) -> str:
        """HASH: request index -> output line JSON; HSETNX makes each request terminal exactly once."""
        return f"{self._base}:outcomes"

    @property
    def chunks(self) -> str:
        """LIST: job ids of chunks not yet fed to the queue (see jobs/chunks.py)."""
        return f"{self._base}:chunks"

    @property
    def sizes(self) -> str:
        """HASH: result file ("output", "errors") -> its bytes, kept once the batch is final (GET /v1/files)."""
        return f"{self._base}:sizes"

    def all(self) -> list[str]:
        return [self.record, self.requests, self.outcomes, self.chunks, self.sizes]


def batches_index(prefix: str = defaults.KEY_PREFIX) -> str:
    """ZSET: batch id scored by creation time, for `batchgen list`."""
    return f"{prefix}:batches"


def expiries_index(prefix: str = defaults.KEY_PREFIX) -> str:
    """ZSET: active batch id scored by expires_at, so any worker can expire overdue batches cheaply."""
    return f"{prefix}:expiries"


def workers_index(prefix: str = defaults.KEY_PREFIX) -> str:
    """SET: names of workers that registered; liveness is the TTL of worker_key."""
    return f"{prefix}:workers"


def worker_key(name: str, prefix: str = defaults.KEY_PREFIX) -> str:
    """HASH with a TTL: a live worker's model, batch size, throughput and VRAM."""
    return f"{prefix}:worker:{name}"


def claims_key(prefix: str = defaults.KEY_PREFIX) -> str:
    """HASH: chunk job id -> worker name holding it; the reaper requeues claims of dead workers."""
    return f"{prefix}:claims"


def queue_name(model: str, priority: str) -> str:
    """RQ queue name: one queue per served model and priority, so workers never take another model's work."""
    return f"{defaults.KEY_PREFIX}:{model}:{priority}"
