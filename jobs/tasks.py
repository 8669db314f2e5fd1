"""RQ entry points. A batch becomes one chunk job per CHUNK_SIZE requests on its model's queue.

Jobs are serialized with RQ's JSONSerializer: nothing on Redis is ever a pickle. The chunk job's
function is `run_chunk`; `batchgen worker` claims these jobs itself (several at once, so the engine
refills finished rows across chunk boundaries) and never calls the function through RQ.
"""

from dataclasses import dataclass

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from batchgen.jobs import defaults, keys

RUN_CHUNK = "batchgen.jobs.tasks.run_chunk"


@dataclass(frozen=True)
class Chunk:
    """A contiguous range of request indexes of one batch: the unit of claim, lease and requeue."""

    batch_id: str
    start: int
    end: int

    @property
    def job_id(self) -> str:
        return chunk_job_id(self.batch_id, self.start)

    @classmethod
    def from_args(cls, args: list | tuple) -> "Chunk":
        batch_id, start, end = args
        return cls(str(batch_id), int(start), int(end))


def chunk_job_id(batch_id: str, start: int) -> str:
    # Deterministic ids make re-enqueueing a chunk idempotent.
    return f"{batch_id}.{start}"


def run_chunk(batch_id: str, start: int, end: int) -> None:
    """The chunk job's function; only a `batchgen worker` can run it (it holds the model)."""
    raise RuntimeError(
        f"chunk {batch_id}[{start}:{end}] must be run by `batchgen worker`, not a plain `rq worker`"
    )


def queues_for(model: str, connection: Redis, priorities: tuple[str, ...] = defaults.PRIORITIES) -> list[Queue]:
    """The model's queues, highest priority first (RQ's dequeue order)."""
    return [
        Queue(keys.queue_name(model, p), connection=connection, serializer=JSONSerializer,
              default_timeout=defaults.JOB_TIMEOUT_S)
        for p in priorities
    ]


def enqueue_chunks(queue: Queue, chunks: list[Chunk], pipeline=None) -> None:
    """Enqueues chunk jobs in one round trip (or on the caller's pipeline)."""
    datas = [
        Queue.prepare_data(
            RUN_CHUNK,
            args=(c.batch_id, c.start, c.end),
            job_id=c.job_id,
            timeout=defaults.JOB_TIMEOUT_S,
            result_ttl=defaults.RESULT_TTL_S,
            failure_ttl=defaults.RESULT_TTL_S,
            description=f"batch {c.batch_id} requests [{c.start}:{c.end})",
        )
        for c in chunks
    ]
    queue.enqueue_many(datas, pipeline=pipeline)


def split(batch_id: str, total: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(batch_id, s, min(total, s + chunk_size)) for s in range(0, total, chunk_size)]
