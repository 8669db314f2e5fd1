"""BatchClient: the Python API for scripts (submit, status, wait, results, cancel, list, workers).

The CLI is a thin layer over it. It imports no torch, so a producer host needs only Redis access.
"""

import json
import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
from batchgen.jobs import chunks, defaults, input_paths
from batchgen.jobs.backoff import UNAVAILABLE, Backoff
from batchgen.jobs.batch import Batch, metadata_problem
from batchgen.jobs.inputs import (
    InputLimits,
    ModelResolver,
    ParamDefaults,
    ParsedLine,
    invalid_output_line,
    read_inputs,
    validate_batch,
)
from batchgen.jobs.message_batch import result_view
from batchgen.jobs.openai_batch import save_errors
from batchgen.jobs.redis_checks import refuse_evicting
from batchgen.jobs.results_root import outside_root
from batchgen.jobs.schema import Request, outcome_of
from batchgen.jobs.states import BatchStatus, Outcome
from batchgen.jobs.store import BatchStore, now_s
from batchgen.jobs.workers import WorkerRegistry
from batchgen.producer.config import ProducerConfig
from redis import Redis

log = logging.getLogger("batchgen.client")
PAGE = 1000
VALIDATING_TTL_S = 3600  # a submit that dies mid-way leaves nothing behind for long
MAX_ERRORS_KEPT = 1000


class BatchNotFound(LookupError):
    pass


RETRIED = ("errored", "expired", "cancelled")


class BatchNotEnded(ValueError):
    """retry of a batch that still runs: its failures are not final yet."""


class OutputDirRefused(ValueError):
    """--output-dir lies outside the results root the workers (or --results-root) allow."""


@dataclass
class SourceError:
    source: str
    line: int
    custom_id: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.code}: {self.message}"


@dataclass
class SubmitResult:
    batch: Batch | None  # None when validation failed and nothing was enqueued
    errors: list[SourceError] = field(default_factory=list)
    num_errors: int = 0
    num_valid: int = 0


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


class BatchClient:
    def __init__(self, cfg: ProducerConfig | None = None, connection: Redis | None = None):
        self.cfg = cfg or ProducerConfig()
        self.connection = connection or Redis.from_url(self.cfg.redis_url, decode_responses=True)
        self.store = BatchStore(self.connection)

    # -- submit ----------------------------------------------------------------------------------------
    def submit(
        self,
        paths: Sequence[str],
        *,
        model: str | None = None,
        params: ParamDefaults | None = None,
        priority: str = "default",
        output_dir: str | None = None,
        skip_invalid: bool = False,
        metadata: dict[str, str] | None = None,
        stdin: IO[bytes] | None = None,
        on_line: Callable[[int], None] | None = None,
        results_root: str | None = None,
        result_ttl_s: int = 0,
    ) -> SubmitResult:
        """Validates every line, then enqueues; with errors and no skip_invalid, nothing is enqueued.

        A submit that fails part-way (Redis out of memory, refused, gone) removes what it wrote.
        results_root: refuse an output_dir outside it (else the live workers' advertised roots decide).
        result_ttl_s: how long the batch's results are kept once it ends (0: the store's default).
        """
        if priority not in defaults.PRIORITIES:
            raise ValueError(f"priority must be one of {defaults.PRIORITIES}")
        if metadata and (problem := metadata_problem(metadata)):
            raise ValueError(problem)
        if output_dir and results_root and (problem := outside_root(output_dir, results_root)):
            raise OutputDirRefused(problem)
        limits = InputLimits(self.cfg.max_requests, self.cfg.max_line_bytes, self.cfg.max_tokens_limit)
        batch = Batch(
            id=new_batch_id(), status=BatchStatus.VALIDATING, model=model or "", priority=priority,
            output_dir=str(Path(output_dir).resolve()) if output_dir else None,
            # undecodable bytes in a file name as \\xNN: the record must be encodable to be stored
            input_file=",".join(input_paths.shown_name(p) for p in paths), metadata=metadata or {},
            timestamps={"created_at": now_s(), "expires_at": now_s() + self.cfg.completion_window_s},
            result_ttl_s=result_ttl_s,  # on the record from the start: a fast worker may end the batch at once
        )
        resolver = ModelResolver(model)
        return self._submit(batch, lambda: validate_batch(read_inputs(
            paths, defaults=params or ParamDefaults(), limits=limits, stdin=stdin), resolver), resolver,
            skip_invalid, on_line, results_root)

    def _submit(self, batch: Batch, lines: Callable[[], Iterator[ParsedLine]], resolver: ModelResolver,
                skip_invalid: bool, on_line: Callable[[int], None] | None, results_root: str | None) -> SubmitResult:
        """Stores and enqueues the lines as batch; with a failure part-way, nothing of it is left."""
        refuse_evicting(self.connection)
        try:
            self.store.create(batch, ttl_s=VALIDATING_TTL_S)
            result = self._ingest(batch, lines(), resolver, skip_invalid, on_line, results_root)
        except BaseException:
            self._undo(batch)
            raise
        if result.batch is None:
            self.store.discard(batch.id)
        return result

    def retry(self, batch_id: str, outcomes: Collection[str] = RETRIED,
              priority: str | None = None) -> tuple[SubmitResult, int]:
        """A new batch of an ended batch's requests whose outcome is one of outcomes (same custom_ids, model,
        output dir and metadata, with retry_of); also how many such requests had nothing stored to run again
        (lines --skip-invalid rejected, entries missing or unreadable in Redis)."""
        old = self.get(batch_id)
        if not old.status.is_terminal:
            raise BatchNotEnded(f"batch {batch_id} is {old.status.value}: retry it once it has ended")
        indexes = sorted(i for i, line in self.store.iter_outcomes(batch_id) if outcome_of(line) in outcomes)
        requests = [r for page in range(0, len(indexes), PAGE)
                    for r in self.store.requests(batch_id, indexes[page:page + PAGE])]
        metadata = {**old.metadata, "retry_of": batch_id}
        if len(metadata) > defaults.MAX_METADATA_PAIRS:
            metadata = {"retry_of": batch_id}
        batch = Batch(
            id=new_batch_id(), status=BatchStatus.VALIDATING, model=old.model, priority=priority or old.priority,
            output_dir=old.output_dir, input_file=f"retry of {batch_id}", metadata=metadata,
            timestamps={"created_at": now_s(), "expires_at": now_s() + self.cfg.completion_window_s},
            result_ttl_s=old.result_ttl_s, endpoint=old.endpoint)
        resolver = ModelResolver(old.model)
        lines = [ParsedLine(batch_id, r.line, r, None, r.custom_id) for r in requests if r is not None]
        result = self._submit(batch, lambda: iter(lines), resolver, False, None, None)
        return result, len(requests) - len(lines)

    def _undo(self, batch: Batch) -> None:
        """Removes a failed submit's keys and chunk jobs; never hides the error that made it fail."""
        try:
            self.store.discard(batch.id)
            if batch.num_chunks:
                chunks.remove_jobs(chunks.make_queue(batch.model, batch.priority, self.connection),
                                   chunks.split(batch.id, batch.total, batch.chunk_size))
        except redis.RedisError as exc:  # e.g. a read-only replica, which took none of them either
            log.debug("could not remove the keys of failed submit %s: %s", batch.id, exc)

    def _check_output_dir(self, batch: Batch) -> None:
        """With no --results-root given, the roots the model's live workers advertise decide."""
        if not batch.output_dir:
            return
        roots = [w["results_root"] for w in self.serving_workers(batch.model) if w.get("results_root")]
        if roots and all(outside_root(batch.output_dir, root) for root in roots):
            raise OutputDirRefused(outside_root(batch.output_dir, roots[0]))

    def _ingest(self, batch: Batch, lines: Iterator[ParsedLine], resolver: ModelResolver, skip_invalid: bool,
                on_line: Callable[[int], None] | None, results_root: str | None = None) -> SubmitResult:
        result = SubmitResult(batch=None)
        page: list[Request] = []
        invalid: list[tuple[int, dict[str, Any]]] = []
        endpoints: set[str] = set()
        index = first = 0
        for parsed in lines:
            if on_line:
                on_line(parsed.line)
            if parsed.error is not None:
                result.num_errors += 1
                if len(result.errors) < MAX_ERRORS_KEPT:
                    result.errors.append(SourceError(parsed.source, parsed.line, parsed.custom_id,
                                                     parsed.error.code, parsed.error.message))
                if skip_invalid:
                    if page:  # a page is stored at contiguous indexes: the skipped line ends it
                        self.store.add_requests(batch.id, first, page, ttl_s=VALIDATING_TTL_S)
                        page = []
                    invalid.append((index, invalid_output_line(parsed)))
                    index += 1
                continue
            assert parsed.request is not None
            if not page:
                first = index
            page.append(parsed.request)
            endpoints.add(parsed.request.url)
            index += 1
            if len(page) >= PAGE:
                self.store.add_requests(batch.id, first, page, ttl_s=VALIDATING_TTL_S)
                page = []
        if page:
            self.store.add_requests(batch.id, first, page, ttl_s=VALIDATING_TTL_S)
        result.num_valid = index - len(invalid)
        if (result.num_errors and not skip_invalid) or index == 0:
            return result
        if resolver.model is None:
            result.errors.append(SourceError(batch.input_file, 0, "", "missing_model",
                                             "no model given: pass --model or set body.model"))
            result.num_errors += 1
            return result
        batch.model = resolver.model
        if not results_root:
            self._check_output_dir(batch)
        batch.endpoint = ",".join(sorted(endpoints))
        batch.total = index
        batch.chunk_size = self.cfg.chunk_size
        batch_chunks = chunks.split(batch.id, batch.total, batch.chunk_size)
        batch.num_chunks = len(batch_chunks)
        queue = chunks.make_queue(batch.model, batch.priority, self.connection)
        batch.queue = queue.name
        self.store.route(batch)
        save_errors(self.connection, batch.id, result.errors)  # --skip-invalid's rejects: the object's errors.data
        for start in range(0, len(invalid), PAGE):
            self.store.record(batch.id, invalid[start:start + PAGE])
        with chunks.rq_connection(self.connection).pipeline() as pipe:
            self.store.activate(batch, pipeline=pipe)
            chunks.enqueue(queue, batch_chunks, pipeline=pipe)
            pipe.execute()
        if invalid and len(invalid) == batch.total:  # nothing left to run
            self.store.transition(batch.id, BatchStatus.COMPLETED, "completed_at", [BatchStatus.IN_PROGRESS])
            self.store.expire_results(batch.id)
        result.batch = self.get(batch.id)
        return result

    # -- follow ----------------------------------------------------------------------------------------
    def get(self, batch_id: str) -> Batch:
        # Expiry must not depend on a worker being alive (OpenAI expires batches server-side too):
        # whoever looks first ends overdue batches. One ZRANGEBYSCORE when nothing is overdue.
        self.expire_overdue()
        batch = self.store.get(batch_id)
        if batch is None:
            raise BatchNotFound(f"no batch {batch_id!r} (expired or never submitted)")
        return batch

    def recent(self, limit: int = 100) -> list[Batch]:
        self.expire_overdue()  # as get(): a listed batch must not show in_progress past its window
        return self.store.recent(limit)

    def wait(self, batch_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
             on_poll: Callable[[Batch], None] | None = None,
             on_unavailable: Callable[[Exception, float], None] | None = None) -> Batch:
        """Polls until the batch reaches a terminal status or the timeout passes; returns the last state.

        A Redis outage after the first poll (restart, failover) is waited out with back-off until the
        deadline; on_unavailable(exc, retry_in_s) hears about each failed poll.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        batch = self.get(batch_id)
        backoff = Backoff()
        while True:
            try:
                batch = self.get(batch_id)
                if on_poll:  # inside: its own reads (the progress bar's worker rates) meet the same outages
                    on_poll(batch)
                backoff.reset()
            except redis.AuthenticationError:
                raise
            except UNAVAILABLE as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    return batch
                if on_unavailable:
                    on_unavailable(exc, backoff.delay_s)
                backoff.sleep(deadline)
                continue
            if batch.status.is_terminal:
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                return batch
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def results(self, batch_id: str, ordered: bool = False) -> Iterator[dict[str, Any]]:
        """Every output line recorded so far (successes and errors), optionally in input order."""
        self.get(batch_id)
        for _, line in self.store.iter_outcomes(batch_id, ordered=ordered):
            yield line

    def export(self, batch_id: str, out: IO[str], errors: IO[str] | None = None, ordered: bool = False) -> tuple[int, int]:
        """Writes output lines to out and error lines to errors (or to out when None); returns counts."""
        n_ok = n_err = 0
        view = result_view(self.get(batch_id).endpoint)  # get: as results() does, the batch must exist
        for _, line in self.store.iter_outcomes(batch_id, ordered=ordered):
            text = json.dumps(view(line), ensure_ascii=False) + "\n"
            if outcome_of(line) != "succeeded":
                n_err += 1
                (errors or out).write(text)
            else:
                n_ok += 1
                out.write(text)
        return n_ok, n_err

    def expire_overdue(self) -> list[str]:
        """Ends the batches whose completion window passed (their chunks off the queues); returns their ids."""
        return chunks.expire_overdue(self.store)

    def cancel(self, batch_id: str) -> Batch:
        """Stops a batch: queued requests become cancelled at once; finished results are kept."""
        batch = self.get(batch_id)
        if batch.status.is_terminal:
            return batch
        self.store.transition(batch_id, BatchStatus.CANCELLING, "cancelling_at",
                              [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING])
        chunks.unqueue(batch, self.connection)
        self.store.close_remaining(batch_id, Outcome.CANCELLED, "the batch was cancelled")
        batch = self.get(batch_id)
        if batch.status == BatchStatus.CANCELLING and batch.num_done >= batch.total:
            self.store.transition(batch_id, BatchStatus.CANCELLED, "cancelled_at", [BatchStatus.CANCELLING])
        return self.get(batch_id)

    def workers(self) -> list[dict[str, str]]:
        """Live workers (their heartbeat key has not expired) with model, batch size, tok/s, VRAM."""
        return WorkerRegistry(self.connection).live()

    def serving_workers(self, model: str) -> list[dict[str, str]]:
        return [w for w in self.workers() if w.get("model") == model]

    def idle_warning(self, batch: Batch) -> str | None:
        """"no live worker serves model X" for an unfinished batch nobody can run; else None."""
        if batch.status.is_terminal or not batch.model or self.serving_workers(batch.model):
            return None
        return (f"no live worker serves model {batch.model!r}; the batch waits until one starts "
                f"(batchgen worker --model ... --served-model-name {batch.model})")
