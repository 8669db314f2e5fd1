"""Chunk jobs on RQ: enqueue with a per-batch window, claim atomically, requeue, finish.

A batch becomes one RQ job per CHUNK_SIZE requests on its model's priority queue. Only WINDOW
chunks of a batch sit in the queue at a time; claiming one feeds the batch's next chunk to the tail.
So batches of one priority interleave round-robin: a small batch submitted after a huge one waits
behind at most WINDOW chunks of each active batch, not behind the whole huge batch.

A claim pops the job id and records it in the claims hash in one Lua script, so a worker killed at
any instant leaves every chunk either queued or claimed; the reaper requeues claims of dead workers.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from batchgen.jobs import defaults, keys
from batchgen.jobs.backoff import REFUSED, UNAVAILABLE
from batchgen.jobs.batch import Batch
from batchgen.jobs.states import BatchStatus
from batchgen.jobs.store import BatchStore
from batchgen.jobs.tasks import RUN_CHUNK
from redis import ConnectionPool, Redis
from redis.client import Pipeline
from rq import Queue
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

WINDOW = 2

# KEYS: claims hash, queue keys in priority order. ARGV: worker name, batch key prefix.
_CLAIM = """
for i = 2, #KEYS do
  local id = redis.call('LPOP', KEYS[i])
  if id then
    redis.call('HSET', KEYS[1], id, ARGV[1])
    local batch = string.match(id, "^(.*)%-%d+$")
    if batch then
      local nxt = redis.call('LPOP', ARGV[2] .. '{' .. batch .. '}:chunks')
      if nxt then redis.call('RPUSH', KEYS[i], nxt) end
    end
    return {KEYS[i], id}
  end
end
return false
"""

# Gives a claimed chunk back to the front of its queue in one step, so a process killed in between
# cannot leave it neither claimed nor queued; only while `owner` still holds it. KEYS: claims hash, queue, job hash.
# ARGV: job id, owner.
_REQUEUE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HSET', KEYS[3], 'status', 'queued') end
return 1
"""

# Drops a claim only while `owner` holds it. KEYS: claims hash. ARGV: job id, owner.
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True)
class Chunk:
    """A contiguous range of request indexes of one batch: the unit of claim, lease and requeue."""

    batch_id: str
    start: int
    end: int

    @property
    def job_id(self) -> str:
        # Deterministic ids make re-enqueueing a chunk idempotent.
        return f"{self.batch_id}-{self.start}"

    @classmethod
    def from_args(cls, args: Sequence) -> "Chunk":
        """ValueError/TypeError for anything but (batch_id, start, end) with start <= end."""
        batch_id, start, end = args
        chunk = cls(str(batch_id), int(start), int(end))
        if not 0 <= chunk.start <= chunk.end:
            raise ValueError(f"bad chunk range [{start}:{end})")
        return chunk

    @classmethod
    def from_job_id(cls, job_id: str, total: int, chunk_size: int) -> "Chunk | None":
        """The chunk a job id names, given its batch's size: for a chunk whose job hash is gone."""
        batch_id, _, start = job_id.rpartition("-")
        if not batch_id or not start.isdigit() or chunk_size <= 0:
            return None
        return cls(batch_id, int(start), min(total, int(start) + chunk_size))


def split(batch_id: str, total: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(batch_id, s, min(total, s + chunk_size)) for s in range(0, total, chunk_size)]


def pending_chunks_key(batch_id: str) -> str:
    return keys.BatchKeys(batch_id).chunks


def rq_connection(connection: Redis) -> Redis:
    """RQ stores compressed bytes: it needs a client that does not decode responses (same server, db, auth)."""
    if not connection.get_encoder().decode_responses:
        return connection
    cached = getattr(connection, "_batchgen_rq_connection", None)
    if cached is None:
        pool = connection.connection_pool
        kwargs = {**pool.connection_kwargs, "decode_responses": False}
        cached = Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class, **kwargs))
        connection._batchgen_rq_connection = cached  # type: ignore[attr-defined]
    return cached


class UnreadableJob(Exception):
    """A claimed chunk job whose hash RQ cannot restore (a malformed field): the claim stands, named here."""

    def __init__(self, job_id: str, cause: Exception):
        super().__init__(f"chunk job {job_id}: {type(cause).__name__}: {cause}")
        self.job_id, self.cause = job_id, cause


def fetch_job(job_id: str, connection: Redis) -> Job:
    """A chunk job as RQ stored it; NoSuchJobError / DeserializationError when its hash is gone."""
    return Job.fetch(job_id, connection=rq_connection(connection), serializer=JSONSerializer)


def fetch_claimed(job_id: str, connection: Redis) -> Job | None:
    """A claimed chunk job; None when its hash is gone (expired, deleted: a cancelled batch), UnreadableJob when RQ
    cannot restore it (a malformed field). Only then: a Redis outage or refusal here must not cost a claim whose
    chunk is still owed, so it propagates."""
    try:
        return fetch_job(job_id, connection)
    except (NoSuchJobError, DeserializationError):
        return None
    except UNAVAILABLE + REFUSED:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Job.fetch makes of a malformed field
        raise UnreadableJob(job_id, exc) from exc


def make_queue(model: str, priority: str, connection: Redis) -> Queue:
    return Queue(keys.queue_name(model, priority), connection=rq_connection(connection), serializer=JSONSerializer,
                 default_timeout=defaults.JOB_TIMEOUT_S)


def queues_for(model: str, connection: Redis, priorities: Sequence[str] = defaults.PRIORITIES) -> list[Queue]:
    """The model's queues, highest priority first."""
    return [make_queue(model, p, connection) for p in priorities]


def fail_chunk(store: BatchStore, job_id: str, code: str, message: str) -> int:
    """A chunk that cannot run while its batch does: its unfinished requests get batch-level error lines (they
    never ran), so the batch still ends. Returns how many; 0 when the batch is over or gone."""
    batch = store.get(job_id.rpartition("-")[0])
    if batch is None or batch.status not in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING):
        return 0  # cancelled or ended: nothing is owed
    chunk = Chunk.from_job_id(job_id, batch.total, batch.chunk_size)
    if chunk is None:
        return 0
    return store.fail(chunk.batch_id, store.pending(chunk.batch_id, chunk.start, chunk.end), code, message,
                      status_code=None)


def fail_lost_chunk(store: BatchStore, job_id: str) -> int:
    """A chunk whose job hash is gone (evicted, deleted): `request_lost` lines, and the batch ends failed."""
    return fail_chunk(store, job_id, "request_lost",
                      "the chunk job holding this request is missing from Redis (evicted or deleted)")


def waiting_by_model(connection: Redis, prefix: str = defaults.KEY_PREFIX) -> dict[str, int]:
    """Queued chunk jobs per model, over every batchgen queue RQ knows: what an idle worker reports."""
    conn = rq_connection(connection)
    queue_keys = sorted(k.decode() if isinstance(k, bytes) else k for k in conn.smembers(Queue.redis_queues_keys))
    mine = [k for k in queue_keys if k.startswith(f"{Queue.redis_queue_namespace_prefix}{prefix}:")]
    with conn.pipeline(transaction=False) as pipe:
        for key in mine:
            pipe.llen(key)
        lengths = pipe.execute()
    waiting: dict[str, int] = {}
    for key, n in zip(mine, lengths, strict=True):
        model = key.removeprefix(f"{Queue.redis_queue_namespace_prefix}{prefix}:").rpartition(":")[0]
        if n:
            waiting[model] = waiting.get(model, 0) + n
    return waiting


def remove_jobs(queue: Queue, chunks: Sequence[Chunk]) -> None:
    """Undoes `enqueue` for a submit that failed after it: the job hashes and their queue entries."""
    with queue.connection.pipeline(transaction=False) as pipe:
        for c in chunks:
            pipe.lrem(queue.key, 0, c.job_id)
            pipe.delete(Job.key_for(c.job_id))
        pipe.execute()


def enqueue(queue: Queue, chunks: Sequence[Chunk], pipeline: Pipeline) -> None:
    """Creates every chunk job; the first WINDOW go on the queue, the rest wait in the batch's list."""
    pipeline.sadd(queue.redis_queues_keys, queue.key)  # registers the queue, so `rq info` lists it
    for n, c in enumerate(chunks):
        job = queue.create_job(
            RUN_CHUNK, args=(c.batch_id, c.start, c.end), job_id=c.job_id, timeout=defaults.JOB_TIMEOUT_S,
            result_ttl=defaults.RESULT_TTL_S, failure_ttl=defaults.RESULT_TTL_S,
            description=f"batch {c.batch_id} requests [{c.start}:{c.end})",
        )
        if n < WINDOW:
            queue._enqueue_job(job, pipeline=pipeline)
        else:
            job.save(pipeline=pipeline)
            pipeline.rpush(pending_chunks_key(c.batch_id), c.job_id)


class ChunkClaims:
    """Which worker holds which chunk job; the lease the reaper checks against worker liveness."""

    def __init__(self, connection: Redis):
        self.connection = connection
        self.key = keys.claims_key()
        self._claim = connection.register_script(_CLAIM)
        self._requeue = connection.register_script(_REQUEUE)
        self._release = connection.register_script(_RELEASE)

    def claim(self, queues: Sequence[Queue], worker_name: str,
              on_lost: Callable[[str], None] | None = None) -> tuple[Job, Queue] | None:
        """Claims the next chunk job; a job whose hash is gone is released and named to on_lost(job_id), one RQ
        cannot restore raises UnreadableJob (still claimed: the caller fails it)."""
        by_key = {q.key: q for q in queues}
        prefix = f"{defaults.KEY_PREFIX}:batch:"
        got = self._claim(keys=[self.key, *by_key], args=[worker_name, prefix])
        if not got:
            return None
        queue_key, job_id = got
        job_id = job_id if isinstance(job_id, str) else job_id.decode()
        job = fetch_claimed(job_id, self.connection)
        if job is None:
            self.release(job_id, worker_name)
            if on_lost is not None:
                on_lost(job_id)
            return None
        return job, by_key[queue_key]

    def release(self, job_id: str, owner: str) -> int:
        """Drops owner's claim on job_id; 0 if another worker holds it now (a paused worker's chunk, reaped and
        claimed again while it slept, stays with its new holder)."""
        return self._release(keys=[self.key], args=[job_id, owner])

    def holders(self) -> dict[str, str]:
        return self.connection.hgetall(self.key)

    def requeue(self, job_id: str, queue_name: str, owner: str) -> bool:
        """Puts owner's claimed chunk back at the front of its queue; False if owner no longer holds it (another
        reaper got it first, and maybe another worker claimed it since)."""
        queue = Queue(queue_name, connection=rq_connection(self.connection), serializer=JSONSerializer)
        if not self._requeue(keys=[self.key, queue.key, Job.key_for(job_id)], args=[job_id, owner]):
            return False
        try:
            job = fetch_job(job_id, self.connection)
            queue.started_job_registry.remove_executions(job)  # bookkeeping for `rq info` only
        except (NoSuchJobError, DeserializationError):
            pass
        return True

    def remove_queued(self, batch_id: str, queue: Queue, job_ids: Sequence[str]) -> None:
        """Cancel, expiry: takes a batch's chunks off its queue and its pending list."""
        with self.connection.pipeline() as pipe:
            for job_id in job_ids:
                pipe.lrem(queue.key, 0, job_id)
            pipe.delete(pending_chunks_key(batch_id))
            pipe.execute()


def unqueue(batch: Batch, connection: Redis) -> None:
    """Takes an ended batch's chunks off its queue (cancel, expiry): a worker would only skip them, and `rq info`
    and idle workers would count them as waiting."""
    if not batch.queue:
        return
    job_ids = [c.job_id for c in split(batch.id, batch.total, max(1, batch.chunk_size))]
    ChunkClaims(connection).remove_queued(batch.id, make_queue(batch.model, batch.priority, connection), job_ids)


def expire_overdue(store: BatchStore, now: int | None = None) -> list[str]:
    """store.expire_overdue, the expired batches' chunks taken off their queues; returns the ids it expired."""
    expired = store.expire_overdue(now)
    for batch in filter(None, map(store.get, expired)):
        unqueue(batch, store.connection)
    return expired
