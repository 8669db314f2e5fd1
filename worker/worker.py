"""BatchWorker: the resident-model work loop (SimpleWorker-style: never forks, one process per GPU).

Each turn of the loop: heartbeat, reap dead workers' chunks, claim chunk jobs while the engine
wants more requests, run one engine step, write the results that finished in it. Holding several
chunks at once is what lets finished rows be refilled across chunk boundaries. RQ's own worker
registry, StartedJobRegistry and job results are kept up to date, so `rq info` shows the work.
"""

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from batchgen.jobs import chunks
from batchgen.jobs.backoff import UNAVAILABLE, Backoff
from batchgen.jobs.batch import Batch
from batchgen.jobs.schema import Request, error_line, success_line
from batchgen.jobs.states import BatchStatus
from batchgen.jobs.store import BatchStore
from batchgen.jobs.workers import WorkerRegistry
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.protocol import Engine, GenerationRequest, GenerationResult
from batchgen.worker.reaper import Reaper
from batchgen.worker.result_files import write_results
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now

log = logging.getLogger("batchgen.worker")
MAX_IDLE_SLEEP_S = 0.1


@dataclass
class HeldChunk:
    """A claimed chunk job and the request indexes of it still in the engine."""

    chunk: chunks.Chunk
    job: Job
    queue: Queue
    execution: Execution
    open: set[int] = field(default_factory=set)


@dataclass
class InFlight:
    batch: Batch
    index: int
    request: Request
    job_id: str


def result_line(flight: InFlight, res: GenerationResult) -> dict[str, Any]:
    if res.error is not None:
        return error_line(flight.request.custom_id, res.error.code, res.error.message)
    return success_line(
        flight.request, model=flight.batch.model, text=res.text, finish_reason=res.finish_reason,
        prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens, choices=res.choices,
    )


def parse_stored_request(raw: str | None) -> tuple[Request | None, str]:
    """A request as stored by submit, or None and why (hand-written or corrupted hash entries)."""
    if raw is None:
        return None, "the request is missing from Redis"
    try:
        return Request.model_validate_json(raw), ""
    except ValueError as exc:  # pydantic's ValidationError, also for invalid JSON
        detail = "; ".join(" ".join(line.split()) for line in str(exc).splitlines()[1:3]) or str(exc)
        return None, f"the stored request is invalid: {detail}"


def stored_custom_id(raw: str | None, index: int) -> str:
    try:
        custom_id = json.loads(raw)["custom_id"] if raw else None
    except (ValueError, TypeError, KeyError):
        custom_id = None
    return custom_id if isinstance(custom_id, str) and custom_id else str(index)


class BatchWorker:
    def __init__(self, cfg: WorkerConfig, engine: Engine, connection: redis.Redis):
        self.cfg = cfg
        self.engine = engine
        self.connection = connection
        self.store = BatchStore(connection)
        self.workers = WorkerRegistry(connection)
        self.claims = chunks.ChunkClaims(connection)
        self.queues = chunks.queues_for(cfg.served_name, connection, cfg.priorities)
        self.rq = SimpleWorker(self.queues, connection=chunks.rq_connection(connection), name=cfg.name, serializer=JSONSerializer,
                               worker_ttl=cfg.worker_ttl_s)
        self.reaper = Reaper(connection, self.claims, interval_s=cfg.worker_ttl_s / 2)
        self.held: dict[str, HeldChunk] = {}
        self.inflight: dict[str, InFlight] = {}
        self.unwritten: list[tuple[InFlight, dict[str, Any]]] = []
        self.batches: dict[str, Batch] = {}
        self.stop_requested_at: float | None = None
        self.shutdown_grace_s = cfg.shutdown_grace_s  # a second stop signal cuts it to 0; the config stays as built
        self.num_requests_done = 0
        self._last_heartbeat = 0.0
        self._last_cancel_check = 0.0
        self._idle_sleep_s = 0.05
        self._reconcile_needed = False

    # -- lifecycle -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Works until stopped (or, with burst, until the queues are empty); returns requests finished."""
        self._install_signal_handlers()
        self.rq.register_birth()
        self.workers.register(self.cfg.name)
        self._heartbeat(force=True)
        log.info("worker %s serving %r on %s", self.cfg.name, self.cfg.served_name,
                 ", ".join(q.name for q in self.queues))
        backoff = Backoff()
        try:
            while not self._should_exit():
                try:
                    self._turn()
                    backoff.reset()
                except UNAVAILABLE as exc:
                    log.warning("Redis unavailable (%s); retrying in %.1fs, engine state kept", exc, backoff.delay_s)
                    self._reconcile_needed = True
                    backoff.sleep()
        finally:
            self._shutdown()
        return self.num_requests_done

    def _should_exit(self) -> bool:
        if self.stop_requested_at is not None:
            drained = self.engine.num_unfinished == 0 and not self.unwritten
            return drained or time.monotonic() - self.stop_requested_at > self.shutdown_grace_s
        return False

    def _turn(self) -> None:
        if self._reconcile_needed:
            self._reconcile_claims()
            self._reconcile_needed = False
        self._heartbeat()
        self._flush()
        if self.stop_requested_at is None:
            self.reaper.maybe_reap(self.cfg.name)
            self._claim_while_wanted()
        self._check_cancelled()
        if self.engine.num_unfinished == 0:
            if self.cfg.burst and not self.held and self.stop_requested_at is None:
                # A just-killed worker's chunks come back after its TTL: wait for them rather than
                # leave them to nobody (bounded by worker_ttl_s).
                if self.reaper.num_stale_claims(self.cfg.name, 2 * self.cfg.heartbeat_interval_s + 1):
                    self.reaper.reap(self.cfg.name)
                    time.sleep(min(0.5, self.cfg.heartbeat_interval_s))
                    return
                log.info("worker %s: queues empty, burst done", self.cfg.name)
                self.stop_requested_at = time.monotonic()
                return
            time.sleep(self._idle_sleep_s)
            # Idle polling is one Lua call per turn; capping the back-off at 0.1 s keeps a lone request's
            # queue latency small next to its generation time.
            self._idle_sleep_s = min(self._idle_sleep_s * 2, MAX_IDLE_SLEEP_S)
            return
        self._idle_sleep_s = 0.05
        results = self.engine.step()
        self._collect(results)
        self._flush()

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        if self.stop_requested_at is not None:
            log.warning("second stop signal: requeueing in-flight work now")
            self.shutdown_grace_s = 0.0
            return
        log.info("stop requested: finishing in-flight requests (up to %.0fs), taking no new work",
                 self.shutdown_grace_s)
        self.stop_requested_at = time.monotonic()

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _shutdown(self) -> None:
        """Hands every chunk still held back to its queue; finished requests are skipped on re-run."""
        try:
            self._flush()
            for job_id, held in list(self.held.items()):
                self._drop(job_id)
                self.claims.requeue(job_id, held.queue.name)
            self.rq.register_death()
            self.workers.unregister(self.cfg.name)
        except redis.RedisError as exc:
            log.error("could not hand back held chunks (%s); the reaper will requeue them", exc)

    # -- claiming ------------------------------------------------------------------------------------
    def _claim_while_wanted(self) -> None:
        while self.engine.num_wanted > 0:
            got = self.claims.claim(self.queues, self.cfg.name)
            if got is None:
                return
            self._start_chunk(*got)

    def _reconcile_claims(self) -> None:
        """After a Redis outage: the claims hash, not our memory, says which chunks we hold.

        A claim whose reply was lost, or a chunk whose start was cut off, is ours in Redis but not
        here: requeue it. A chunk the reaper gave away while our heartbeat was gone is no longer ours:
        drop it without touching the new holder's claim (its outcomes are written once either way).
        """
        holders = self.claims.holders()
        for job_id, worker in holders.items():
            if worker == self.cfg.name and job_id not in self.held:
                origin = chunks.fetch_job(job_id, self.connection).origin
                if self.claims.requeue(job_id, origin):
                    log.warning("requeued chunk %s whose claim was interrupted by the outage", job_id)
        for job_id in [j for j in self.held if holders.get(j) != self.cfg.name]:
            log.warning("chunk %s was reaped during the outage; leaving it to its new holder", job_id)
            self._drop(job_id)

    def _start_chunk(self, job: Job, queue: Queue) -> None:
        try:
            self._start_chunk_unguarded(job, queue)
        except UNAVAILABLE:
            # Half-started: forget it here; the claim stays in Redis and _reconcile_claims requeues it.
            self._drop(job.id)
            raise

    def _start_chunk_unguarded(self, job: Job, queue: Queue) -> None:
        chunk = chunks.Chunk.from_args(job.args)
        execution = self.rq.prepare_execution(job)
        self.rq.prepare_job_execution(job)
        job.started_at = now()
        held = HeldChunk(chunk, job, queue, execution)
        self.held[job.id] = held
        batch = self._batch(chunk.batch_id, refresh=True)
        if batch is None or batch.status.is_terminal or batch.status == BatchStatus.CANCELLING:
            self._finish_chunk(job.id)
            return
        if batch.model != self.cfg.served_name:
            # Never run a batch on the wrong model: its requests fail loudly instead.
            msg = f"batch asks for model {batch.model!r}, this worker serves {self.cfg.served_name!r}"
            self.store.fail(chunk.batch_id, self.store.pending(chunk.batch_id, chunk.start, chunk.end),
                            "model_mismatch", msg)
            self._finish_chunk(job.id)
            return
        if batch.timestamps.get("expires_at", 0) and time.time() > batch.timestamps["expires_at"]:
            self.store.expire_overdue()
            self._finish_chunk(job.id)
            return
        pending = self.store.pending(chunk.batch_id, chunk.start, chunk.end)
        raws = self.store.raw_requests(chunk.batch_id, pending)
        gen, poison = [], []
        for index, raw in zip(pending, raws, strict=True):
            request, problem = parse_stored_request(raw)
            if request is None:
                # Unreadable or missing in Redis: an error line, never a crash loop over the same chunk.
                poison.append((index, error_line(stored_custom_id(raw, index), "invalid_request", problem)))
                continue
            key = f"{chunk.batch_id}:{index}"
            self.inflight[key] = InFlight(batch, index, request, job.id)
            held.open.add(index)
            gen.append(GenerationRequest(key, request))
        if poison:
            log.warning("chunk %s: %d stored request(s) could not be parsed; they get error lines",
                        job.id, len(poison))
            self.num_requests_done += len(self.store.record(chunk.batch_id, poison))
        log.info("claimed %s: %d of %d requests still to do", job.id, len(gen), chunk.end - chunk.start)
        self._collect(self.engine.add(gen))
        if not held.open:
            self._finish_chunk(job.id)

    def _batch(self, batch_id: str, refresh: bool = False) -> Batch | None:
        if refresh or batch_id not in self.batches:
            batch = self.store.get(batch_id)
            if batch is None:
                return None
            self.batches[batch_id] = batch
        return self.batches[batch_id]

    # -- results ---------------------------------------------------------------------------------------
    def _collect(self, results: list[GenerationResult]) -> None:
        for res in results:
            flight = self.inflight.get(res.key)
            if flight is not None:
                self.unwritten.append((flight, result_line(flight, res)))

    def _flush(self) -> None:
        """Writes finished results: Redis first (exactly once), then the batch's files."""
        if not self.unwritten:
            return
        by_batch: dict[str, list[tuple[InFlight, dict[str, Any]]]] = {}
        for flight, line in self.unwritten:
            by_batch.setdefault(flight.batch.id, []).append((flight, line))
        for batch_id, items in by_batch.items():
            accepted = set(self.store.record(batch_id, [(f.index, line) for f, line in items]))
            output_dir = items[0][0].batch.output_dir
            if output_dir:
                try:
                    write_results(output_dir, batch_id, [line for f, line in items if f.index in accepted])
                except OSError as exc:
                    log.error("could not append results of %s to %s: %s (they are in Redis)",
                              batch_id, output_dir, exc)
            for flight, _ in items:
                self._settle(flight)
            self.num_requests_done += len(accepted)
        self.unwritten.clear()

    def _settle(self, flight: InFlight) -> None:
        self.inflight.pop(f"{flight.batch.id}:{flight.index}", None)
        held = self.held.get(flight.job_id)
        if held is not None:
            held.open.discard(flight.index)
            if not held.open:
                self._finish_chunk(flight.job_id)

    def _finish_chunk(self, job_id: str) -> None:
        held = self.held.get(job_id)
        if held is None:
            return
        job = held.job
        job.ended_at = now()
        job._result = {"requests": held.chunk.end - held.chunk.start}
        self.rq.handle_job_success(job, held.queue, held.queue.started_job_registry, held.execution)
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        """Drops a held chunk here and releases its claim in Redis."""
        if self._drop(job_id) is not None:
            self.claims.release(job_id)

    def _drop(self, job_id: str) -> HeldChunk | None:
        """Drops a held chunk here only: its engine rows, in-flight entries and unwritten results."""
        held = self.held.pop(job_id, None)
        if held is None:
            return None
        keys_open = [f"{held.chunk.batch_id}:{i}" for i in held.open]
        self.engine.abort(keys_open)
        for key in keys_open:
            self.inflight.pop(key, None)
        self.rq.executions.pop(held.execution.id, None)
        self.unwritten = [(f, line) for f, line in self.unwritten if f.job_id != job_id]
        return held

    # -- cancellation, heartbeat ---------------------------------------------------------------------
    def _check_cancelled(self) -> None:
        """Drops in-flight requests of batches that were cancelled or expired (their outcomes are set)."""
        if time.monotonic() - self._last_cancel_check < 1.0 or not self.held:
            return
        self._last_cancel_check = time.monotonic()
        statuses = self.store.statuses(sorted({h.chunk.batch_id for h in self.held.values()}))
        for batch_id, status in statuses.items():
            if status in (None, BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.EXPIRED):
                log.info("batch %s is %s: dropping its in-flight requests", batch_id, status and status.value)
                for job_id in [j for j, h in self.held.items() if h.chunk.batch_id == batch_id]:
                    self._finish_chunk(job_id)

    def _heartbeat(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_heartbeat < self.cfg.heartbeat_interval_s:
            return
        self._last_heartbeat = time.monotonic()
        for held in self.held.values():
            self.rq.maintain_heartbeats(held.job, held.execution)
        self.rq.heartbeat()
        stats = self.engine.stats()
        info = {
            "name": self.cfg.name, "model": self.cfg.served_name, "engine": self.cfg.engine,
            "queues": ",".join(q.name for q in self.queues), "device": self.cfg.engine_config.device,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "batch_size": stats.batch_size, "max_batch_size": stats.max_batch_size,
            "tokens_per_s": round(stats.tokens_per_s, 1), "num_unfinished": stats.num_unfinished,
            "vram_used_bytes": stats.vram_used_bytes, "vram_free_bytes": stats.vram_free_bytes,
            "gpu_temperature_c": "" if stats.gpu_temperature_c is None else stats.gpu_temperature_c,
            "requests_done": self.num_requests_done, "chunks_held": len(self.held),
            "state": "stopping" if self.stop_requested_at else ("busy" if self.held else "idle"),
            "last_heartbeat": int(time.time()),
        }
        self.workers.heartbeat(self.cfg.name, info, self.cfg.worker_ttl_s)
