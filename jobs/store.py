"""BatchStore: every read and write of a batch's record, requests and outcomes, and of the batch indexes.

A batch's list of chunks not yet queued belongs to jobs/chunks.py, live workers to jobs/workers.py.
Writes take an optional pipeline and execute only a pipeline they created themselves (the RQ
convention), so callers can compose several writes into one round trip.
"""

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from batchgen.jobs import defaults, keys
from batchgen.jobs.batch import Batch
from batchgen.jobs.schema import Request, error_line, error_of, outcome_of, usage_of
from batchgen.jobs.states import BatchStatus, Outcome
from redis import Redis
from redis.client import Pipeline

# Records terminal outcomes: HSETNX makes each request terminal exactly once, and the batch moves to
# its final status atomically with the outcome that completes it: `failed` when any request was lost from
# Redis (data loss is not a completed batch), else `completed`.
# Each newly recorded success adds its tokens to the batch's usage (OpenAI's Batch.usage).
# Once every request has one, the keys expire after the record's result_ttl_s (the batch's own, from the API's
# output_expires_after) when it has one, else after ARGV's ttl.
# KEYS: record, outcomes, requests. ARGV: now, ttl, then (index, line, counter field, lost 0/1, input tokens,
# output tokens).
# Returns the indexes that were newly recorded.
_RECORD_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local accepted = {}
for i = 3, #ARGV, 6 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 2], 1)
    if ARGV[i + 3] == '1' then redis.call('HINCRBY', KEYS[1], 'num_lost', 1) end
    if ARGV[i + 4] ~= '0' then redis.call('HINCRBY', KEYS[1], 'usage.input_tokens', ARGV[i + 4]) end
    if ARGV[i + 5] ~= '0' then redis.call('HINCRBY', KEYS[1], 'usage.output_tokens', ARGV[i + 5]) end
    accepted[#accepted + 1] = ARGV[i]
  end
end
local total = tonumber(redis.call('HGET', KEYS[1], 'total')) or math.huge  -- a record missing it never completes
if #accepted > 0 and redis.call('HLEN', KEYS[2]) >= total then
  local status = redis.call('HGET', KEYS[1], 'status')
  if status == 'cancelling' then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1])
  elseif status == 'in_progress' or status == 'finalizing' then
    if redis.call('HEXISTS', KEYS[1], 'num_lost') == 1 then
      redis.call('HSET', KEYS[1], 'status', 'failed', 'finalizing_at', ARGV[1], 'failed_at', ARGV[1])
    else
      redis.call('HSET', KEYS[1], 'status', 'completed', 'finalizing_at', ARGV[1], 'completed_at', ARGV[1])
    end
  end
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'result_ttl_s') or ARGV[2])
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[2], ttl)
    redis.call('EXPIRE', KEYS[3], ttl)
  end
end
return accepted
"""

# Moves a batch to a new status only from one of the allowed ones; returns 1 if it moved.
# KEYS: record. ARGV: new status, timestamp field ('' for none), now, allowed statuses...
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for i = 4, #ARGV do
  if status == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
    return 1
  end
end
return 0
"""

# Stamps in_progress_at once, when a worker first starts a chunk of a batch still in progress (OpenAI's
# "started processing"); a gone, cancelled or expired batch is left without it. KEYS: record. ARGV: now.
_STARTED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
return redis.call('HSETNX', KEYS[1], 'in_progress_at', ARGV[1])
"""

PAGE = 500
LOST_CODE = "request_lost"  # a request or chunk job that vanished from Redis: its batch ends failed


def now_s() -> int:
    return int(time.time())


def stored_custom_id(raw: str | None, index: int) -> str:
    """The custom_id of a stored request, or its index when the entry is missing or unreadable.

    Never raises: a hand-written or corrupted entry (invalid JSON, not an object, nested past the
    parser's recursion limit) must fail alone, not crash the worker that reads it.
    """
    try:
        custom_id = json.loads(raw)["custom_id"] if raw else None
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        custom_id = None
    return custom_id if isinstance(custom_id, str) and custom_id else str(index)


def _batch_of(raw: dict[str, str]) -> Batch | None:
    """A record read back; one without its id was evicted and partly re-written (a field set after): gone."""
    return Batch.from_hash(raw) if raw and "id" in raw and "status" in raw else None


def parse_stored_request(raw: str | None) -> tuple[Request | None, str, str]:
    """A request as stored by submit, or None with an error code and why (missing, corrupted, hand-written)."""
    if raw is None:
        return None, "request_lost", "the stored request is missing from Redis (evicted or deleted)"
    try:
        return Request.model_validate_json(raw), "", ""
    except RecursionError:
        return None, "invalid_request", "the stored request is nested too deep to read"
    except ValueError as exc:  # pydantic's ValidationError, also for invalid JSON
        detail = "; ".join(" ".join(line.split()) for line in str(exc).splitlines()[1:3]) or str(exc)
        return None, "invalid_request", f"the stored request is invalid: {detail}"


def page_of_index(connection: Redis, index: str, limit: int, after: str | None) -> tuple[list[str], bool]:
    """One cursor page of a time-scored ZSET, newest first: up to limit ids after the id `after`, and whether more
    follow."""
    start = 0
    if after:
        rank = connection.zrevrank(index, after)
        if rank is None:
            return [], False
        start = rank + 1
    ids = connection.zrevrange(index, start, start + limit)  # one extra tells whether another page exists
    return ids[:limit], len(ids) > limit


class BatchStore:
    def __init__(self, connection: Redis, result_ttl_s: int = defaults.RESULT_TTL_S):
        self.connection = connection
        self.result_ttl_s = result_ttl_s
        self._record = connection.register_script(_RECORD_SCRIPT)
        self._transition = connection.register_script(_TRANSITION)
        self._started = connection.register_script(_STARTED)

    # -- producer side -------------------------------------------------------------------------------
    def create(self, batch: Batch, ttl_s: int | None = None, pipeline: Pipeline | None = None) -> None:
        """Writes the record; with ttl_s it disappears unless `activate` persists it (crashed submits)."""
        pipe = pipeline if pipeline is not None else self.connection.pipeline()
        k = keys.BatchKeys(batch.id)
        pipe.hset(k.record, mapping=batch.to_hash())
        if ttl_s:
            pipe.expire(k.record, ttl_s)
        if pipeline is None:
            pipe.execute()

    def add_requests(
        self, batch_id: str, first_index: int, requests: Sequence[Request], ttl_s: int | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        pipe = pipeline if pipeline is not None else self.connection.pipeline(transaction=False)
        k = keys.BatchKeys(batch_id)
        mapping = {first_index + i: r.model_dump_json(exclude_defaults=True) for i, r in enumerate(requests)}
        if mapping:
            pipe.hset(k.requests, mapping=mapping)
            if ttl_s:
                pipe.expire(k.requests, ttl_s)
        if pipeline is None:
            pipe.execute()

    def activate(self, batch: Batch, pipeline: Pipeline | None = None) -> None:
        """validating -> in_progress; the keys stop expiring and the batch shows in `list`.

        in_progress_at waits for the first chunk a worker starts (`mark_started`): queued is not processing.
        """
        pipe = pipeline if pipeline is not None else self.connection.pipeline()
        k = keys.BatchKeys(batch.id)
        for key in k.all():
            pipe.persist(key)
        pipe.hset(k.record, mapping={"total": batch.total, "num_chunks": batch.num_chunks,
                                     "chunk_size": batch.chunk_size})
        # scored by the time it shows, to the microsecond: batches made in one second list newest first too
        pipe.zadd(keys.batches_index(), {batch.id: max(time.time(), batch.timestamps.get("created_at", 0))})
        if batch.timestamps.get("expires_at"):
            pipe.zadd(keys.expiries_index(), {batch.id: batch.timestamps["expires_at"]})
        self.transition(batch.id, BatchStatus.IN_PROGRESS, None, [BatchStatus.VALIDATING], pipe)
        if pipeline is None:
            pipe.execute()

    def expire_results(self, batch_id: str) -> None:
        """The TTL the record script gives an ended batch's keys, for a batch that ended without it (every line
        rejected by --skip-invalid: recorded before `activate` persisted its keys)."""
        k = keys.BatchKeys(batch_id)
        ttl = int(self.connection.hget(k.record, "result_ttl_s") or self.result_ttl_s)
        if ttl > 0:
            pipe = self.connection.pipeline()
            for key in (k.record, k.outcomes, k.requests):
                pipe.expire(key, ttl)
            pipe.execute()

    def route(self, batch: Batch) -> None:
        """Writes what validation settled: the batch's model, endpoints and queue."""
        self.connection.hset(keys.BatchKeys(batch.id).record,
                             mapping={"model": batch.model, "endpoint": batch.endpoint, "queue": batch.queue})

    def discard(self, batch_id: str) -> None:
        """Deletes a batch's keys; DEL and ZREM are allowed even when Redis is out of memory."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.delete(*keys.BatchKeys(batch_id).all())
            pipe.zrem(keys.batches_index(), batch_id)
            pipe.zrem(keys.expiries_index(), batch_id)
            pipe.execute()

    def expire_overdue(self, now: int | None = None) -> list[str]:
        """Ends batches whose completion window passed: status expired, unfinished requests expired.

        Finished results are kept (as OpenAI does). Returns the ids that this call expired.
        """
        now = now_s() if now is None else now
        expired = []
        for batch_id in self.connection.zrangebyscore(keys.expiries_index(), "-inf", now):
            if self.connection.zrem(keys.expiries_index(), batch_id) == 0:
                continue  # another worker is on it
            if self.transition(batch_id, BatchStatus.EXPIRED, "expired_at",
                               [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING]):
                self.close_remaining(batch_id, Outcome.EXPIRED, "the batch's completion window ended")
                expired.append(batch_id)
        return expired

    # -- reads ---------------------------------------------------------------------------------------
    def get(self, batch_id: str) -> Batch | None:
        raw = self.connection.hgetall(keys.BatchKeys(batch_id).record)
        return _batch_of(raw)

    def recent(self, limit: int = 100) -> list[Batch]:
        return self.page(limit)[0]

    def page(self, limit: int, after: str | None = None,
             keep: Callable[[Batch], bool] = lambda batch: True) -> tuple[list[Batch], bool]:
        """Newest first: up to limit batches that keep accepts, after the id `after` (a cursor page), and whether
        more follow. Ids whose record has gone (expired with its results) stay in the index and are read past, so a
        page is never short while older batches remain."""
        found: list[Batch] = []
        cursor, more = after, True
        while more and len(found) <= limit:  # one beyond limit tells whether more follow
            ids, more = page_of_index(self.connection, keys.batches_index(), limit, cursor)
            pipe = self.connection.pipeline(transaction=False)
            for batch_id in ids:
                pipe.hgetall(keys.BatchKeys(batch_id).record)
            found += [batch for raw in pipe.execute() if (batch := _batch_of(raw)) is not None and keep(batch)]
            cursor = ids[-1] if ids else None
        return found[:limit], len(found) > limit

    def statuses(self, batch_ids: Sequence[str]) -> dict[str, BatchStatus | None]:
        """Each batch's status in one round trip; None for a batch that is gone."""
        pipe = self.connection.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hget(keys.BatchKeys(batch_id).record, "status")
        return {batch_id: None if status is None else BatchStatus(status)
                for batch_id, status in zip(batch_ids, pipe.execute(), strict=True)}

    def raw_requests(self, batch_id: str, indexes: Sequence[int]) -> list[str | None]:
        """The stored request JSON, unparsed: a worker turns an unreadable one into an error line."""
        if not indexes:
            return []
        return self.connection.hmget(keys.BatchKeys(batch_id).requests, list(indexes))

    def requests(self, batch_id: str, indexes: Sequence[int]) -> list[Request | None]:
        """The stored requests, None where one is missing or nothing can read it (parse_stored_request)."""
        return [parse_stored_request(r)[0] for r in self.raw_requests(batch_id, indexes)]

    def pending(self, batch_id: str, start: int, end: int) -> list[int]:
        """Indexes in [start, end) that have no outcome yet: what a (re)started worker still owes."""
        indexes = list(range(start, end))
        if not indexes:
            return []
        done = self.connection.hmget(keys.BatchKeys(batch_id).outcomes, indexes)
        return [i for i, d in zip(indexes, done, strict=True) if d is None]

    def file_size(self, batch: Batch, name: str, measure: Callable[[], int]) -> int:
        """A result file's bytes (name: "output" or "errors"), from measure(). Once the batch is final its lines no
        longer change, so the size is kept (expiring with the record) and listing files does not read them again."""
        k = keys.BatchKeys(batch.id)
        kept = self.connection.hget(k.sizes, name)
        if kept is not None:
            return int(kept)
        size = measure()
        if batch.status.is_terminal:
            ttl_ms = self.connection.pttl(k.record)
            pipe = self.connection.pipeline()
            pipe.hset(k.sizes, name, size)
            if ttl_ms > 0:
                pipe.pexpire(k.sizes, ttl_ms)
            pipe.execute()
        return size

    def iter_outcomes(self, batch_id: str, ordered: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, output line) pairs; ordered sorts by input position (memory ~ batch size)."""
        key = keys.BatchKeys(batch_id).outcomes
        items: Iterable[tuple[str, str]] = self.connection.hscan_iter(key, count=1000)
        if ordered:
            items = sorted(items, key=lambda kv: int(kv[0]))
        for index, line in items:
            yield int(index), json.loads(line)

    # -- terminal outcomes ---------------------------------------------------------------------------
    def record(
        self, batch_id: str, lines: Sequence[tuple[int, dict[str, Any]]], pipeline: Pipeline | None = None
    ) -> list[int]:
        """Records output lines for requests; returns the indexes newly recorded (others were already)."""
        k = keys.BatchKeys(batch_id)
        argv: list[Any] = [now_s(), self.result_ttl_s]
        for index, line in lines:
            lost = (error_of(line) or {}).get("code") == LOST_CODE
            argv += [index, json.dumps(line, separators=(",", ":")), Outcome(outcome_of(line)).counter, int(lost),
                     *usage_of(line)]
        accepted = self._record(keys=[k.record, k.outcomes, k.requests], args=argv, client=pipeline)
        return [int(i) for i in accepted] if pipeline is None else []

    def transition(
        self, batch_id: str, to: BatchStatus, stamp_field: str | None, allowed: Iterable[BatchStatus],
        pipeline: Pipeline | None = None,
    ) -> bool:
        args = [to.value, stamp_field or "", now_s(), *[s.value for s in allowed]]
        return bool(self._transition(keys=[keys.BatchKeys(batch_id).record], args=args, client=pipeline))

    def mark_started(self, batch_id: str) -> bool:
        """Stamps in_progress_at if the batch is in progress and has none yet; True if this call stamped it."""
        return bool(self._started(keys=[keys.BatchKeys(batch_id).record], args=[now_s()]))

    def close_remaining(self, batch_id: str, outcome: Outcome, message: str) -> int:
        """Marks every request without an outcome as cancelled or expired; returns how many."""
        code = {Outcome.CANCELLED: "batch_cancelled", Outcome.EXPIRED: "batch_expired"}[outcome]
        return self.fail(batch_id, self._without_outcome(batch_id), code, message, status_code=None)

    def fail_batch(self, batch_id: str, code: str, message: str) -> int:
        """Ends an active batch `failed`: every request without an outcome gets this error line."""
        self.transition(batch_id, BatchStatus.FAILED, "failed_at",
                        [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING])
        return self.fail(batch_id, self._without_outcome(batch_id), code, message, status_code=None)  # never ran

    def _without_outcome(self, batch_id: str) -> list[int]:
        batch = self.get(batch_id)
        if batch is None:
            return []
        done = {int(i) for i in self.connection.hkeys(keys.BatchKeys(batch_id).outcomes)}
        return [i for i in range(batch.total) if i not in done]

    def fail(self, batch_id: str, indexes: Sequence[int], code: str, message: str,
             status_code: int | None = 400) -> int:
        """Records one error line per request index (named by its stored custom_id); returns how many were new."""
        recorded = 0
        for page_start in range(0, len(indexes), PAGE):
            page = indexes[page_start : page_start + PAGE]
            raws = self.raw_requests(batch_id, page)  # unparsed: one corrupted entry must not stop the rest
            lines = [
                (i, error_line(stored_custom_id(raw, i), code, message, status_code=status_code))
                for i, raw in zip(page, raws, strict=True)
            ]
            recorded += len(self.record(batch_id, lines))
        return recorded
