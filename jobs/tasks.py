"""RQ entry points. `run_chunk` is the function every chunk job names (JSON-serialized args only).

`batchgen worker` claims chunk jobs itself, several at once so the engine refills finished rows
across chunk boundaries, and never calls this function through RQ.
"""

RUN_CHUNK = "batchgen.jobs.tasks.run_chunk"


def run_chunk(batch_id: str, start: int, end: int) -> None:
    """The chunk job's function; only a `batchgen worker` can run it (it holds the model)."""
    raise RuntimeError(
        f"chunk {batch_id}[{start}:{end}] must be run by `batchgen worker`, not a plain `rq worker`"
    )
