"""Reaper: requeues the chunks held by workers whose heartbeat key expired (killed, lost power),
and expires batches whose completion window passed.

Any live worker runs it every few seconds. A requeued chunk re-runs only its requests that have no
outcome yet, so a dead worker costs at most what it had in flight.
"""

import logging
import time

from batchgen.jobs.chunks import (
    ChunkClaims,
    UnreadableJob,
    expire_overdue,
    fail_chunk,
    fail_lost_chunk,
    fetch_claimed,
)
from batchgen.jobs.store import BatchStore
from batchgen.jobs.workers import WorkerRegistry
from redis import Redis

log = logging.getLogger("batchgen.reaper")


class Reaper:
    def __init__(self, connection: Redis, claims: ChunkClaims, interval_s: float):
        self.connection = connection
        self.claims = claims
        self.store = BatchStore(connection)
        self.workers = WorkerRegistry(connection)
        self.interval_s = interval_s
        self._last = 0.0

    def maybe_reap(self, self_name: str) -> int:
        if time.monotonic() - self._last < self.interval_s:
            return 0
        self._last = time.monotonic()
        return self.reap(self_name)

    def reap(self, self_name: str = "") -> int:
        expire_overdue(self.store)
        return self.requeue_dead(self_name)

    def num_stale_claims(self, self_name: str, stale_after_s: float) -> int:
        """Claims held by other workers that missed heartbeats: maybe dead, not yet past their TTL."""
        holders = self.claims.holders()
        beats = self.workers.last_heartbeats(sorted(set(holders.values()) - {self_name}))
        cutoff = time.time() - stale_after_s
        return sum(1 for w in holders.values() if w != self_name and (beats[w] is None or beats[w] < cutoff))

    def requeue_dead(self, self_name: str = "") -> int:
        """Requeues chunks claimed by dead workers; returns how many."""
        holders = self.claims.holders()
        dead = {w for w in set(holders.values()) - {self_name} if not self.workers.is_alive(w)}
        requeued = 0
        for job_id, worker in holders.items():
            if worker not in dead:
                continue
            try:
                job = fetch_claimed(job_id, self.connection)
            except UnreadableJob as unreadable:  # requeued, it would only fail its next holder
                exc = unreadable.cause
                if num_failed := fail_chunk(self.store, job_id, "invalid_chunk_job",
                                            f"the chunk job could not run: {type(exc).__name__}"):
                    log.error("chunk job %s of dead worker %s cannot be read (%s: %s): %d request(s) fail",
                              job_id, worker, type(exc).__name__, exc, num_failed)
                self.claims.release(job_id, worker)
                continue
            if job is None:  # job hash gone (batch ended, or evicted): drop the claim
                if num_failed := fail_lost_chunk(self.store, job_id):
                    log.error("chunk job %s of dead worker %s is missing from Redis: %d request(s) fail",
                              job_id, worker, num_failed)
                self.claims.release(job_id, worker)
                continue
            if self.claims.requeue(job_id, job.origin, worker):
                log.warning("requeued chunk %s of dead worker %s", job_id, worker)
                requeued += 1
        self.workers.forget(dead)
        return requeued
