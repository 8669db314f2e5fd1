"""BatchWorker: the resident-model work loop (SimpleWorker-style: never forks, one process per GPU).

Each turn of the loop: reap dead workers' chunks, claim chunk jobs while the engine
wants more requests, run one engine step, write the results that finished in it. Holding several
chunks at once is what lets finished rows be refilled across chunk boundaries. RQ's own worker
registry, StartedJobRegistry and job results are kept up to date, so `rq info` shows the work.
The heartbeat runs on its own thread (worker/heartbeat.py), so a long engine step cannot outlast it.

Nothing read from Redis stops the loop: an unreadable request fails alone, a malformed chunk job
fails alone, and Redis refusing writes (OOM, READONLY, NOPERM, MISCONF) is waited out like an outage.
"""

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from batchgen.jobs import chunks
from batchgen.jobs.backoff import REFUSED, UNAVAILABLE, Backoff, refusal_reason
from batchgen.jobs.batch import Batch
from batchgen.jobs.message_batch import result_view
from batchgen.jobs.redis_checks import refuse_evicting
from batchgen.jobs.results_root import outside_root
from batchgen.jobs.schema import Request, error_line, success_line
from batchgen.jobs.states import BatchStatus
from batchgen.jobs.store import BatchStore, parse_stored_request, stored_custom_id
from batchgen.jobs.workers import WorkerRegistry
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.protocol import Engine, GenerationRequest, GenerationResult
from batchgen.worker.heartbeat import HeartbeatThread
from batchgen.worker.reaper import Reaper
from batchgen.worker.result_files import write_results
from batchgen.worker.startup import log_startup
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now

log = logging.getLogger("batchgen.worker")
MAX_IDLE_SLEEP_S = 0.1
IDLE_REPORT_INTERVAL_S = 60.0


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
        embeddings=res.embeddings,
    )


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
        self._held_lock = threading.RLock()  # the heartbeat thread reads held chunks while the loop ends them
        self.inflight: dict[str, InFlight] = {}
        self.unwritten: list[tuple[InFlight, dict[str, Any]]] = []
        self.batches: dict[str, Batch] = {}
        self.stop_requested_at: float | None = None
        self.shutdown_grace_s = cfg.shutdown_grace_s  # a second stop signal cuts it to 0; the config stays as built
        self.num_requests_done = 0
        self._last_cancel_check = 0.0
        self._idle_sleep_s = 0.05
        self._reconcile_needed = False
        self._last_idle_report = 0.0
        self._last_stats = engine.stats()
        self._heartbeats = HeartbeatThread(self._heartbeat, cfg.heartbeat_interval_s)

    # -- lifecycle -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Works until stopped (or, with burst, until the queues are empty); returns requests finished."""
        self._install_signal_handlers()
        refuse_evicting(self.connection)  # EvictingRedis: the CLI exits with its own code
        self.rq.register_birth()
        self.workers.register(self.cfg.name)
        self._heartbeat()
        log.info("worker %s serving %r on %s", self.cfg.name, self.cfg.served_name,
                 ", ".join(q.name for q in self.queues))
        log_startup(self.engine, self.cfg)
        self._heartbeats.start()
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
                except REFUSED as exc:  # results stay unwritten and are flushed once Redis accepts them
                    log.warning("%s; retrying in %.1fs, engine state kept", refusal_reason(exc), backoff.delay_s)
                    self._reconcile_needed = True
                    backoff.sleep()
        finally:
            self._heartbeats.stop()
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
                self._report_idle()
                log.info("worker %s: queues empty, burst done", self.cfg.name)
                self.stop_requested_at = time.monotonic()
                return
            if not self.held:
                self._report_idle()
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
                self.claims.requeue(job_id, held.queue.name, self.cfg.name)
            self.rq.register_death()
            self.workers.unregister(self.cfg.name)
        except redis.RedisError as exc:
            log.error("could not hand back held chunks (%s); the reaper will requeue them", exc)

    def _report_idle(self) -> None:
        """Says what this worker serves and what waits for other models, so a name typo is not a silent idle."""
        if self._last_idle_report and time.monotonic() - self._last_idle_report < IDLE_REPORT_INTERVAL_S:
            return
        self._last_idle_report = time.monotonic()
        waiting = chunks.waiting_by_model(self.connection)
        others = {m: n for m, n in waiting.items() if m != self.cfg.served_name}
        if waiting.get(self.cfg.served_name) or not others:
            return
        log.warning("worker %s serves model %r: nothing is queued for it; waiting for other models: %s",
                    self.cfg.name, self.cfg.served_name,
                    ", ".join(f"{m!r} ({n} chunk{'s' * (n != 1)})" for m, n in sorted(others.items())))

    # -- claiming ------------------------------------------------------------------------------------
    def _claim_while_wanted(self) -> None:
        # Once the next step is full, the rest is claimed a chunk a turn while steps run: each claim is Redis round
        # trips and tokenising, and an engine that waited for all it wants left the GPU idle meanwhile.
        while self.engine.num_wanted > 0:
            try:
                got = self.claims.claim(self.queues, self.cfg.name, on_lost=self._chunk_job_lost)
            except chunks.UnreadableJob as exc:  # a job hash RQ cannot restore (a malformed field): it fails alone
                self._fail_chunk_job(exc.job_id, exc.cause)
                continue
            if got is None:
                return
            self._start_chunk(*got)
            if self.engine.next_step_is_full:
                return

    def _reconcile_claims(self) -> None:
        """After a Redis outage: the claims hash, not our memory, says which chunks we hold.

        A claim whose reply was lost, or a chunk whose start was cut off, is ours in Redis but not
        here: requeue it. A chunk the reaper gave away while our heartbeat was gone is no longer ours:
        drop it without touching the new holder's claim (its outcomes are written once either way).
        """
        holders = self.claims.holders()
        for job_id, worker in holders.items():
            if worker == self.cfg.name and job_id not in self.held:
                try:
                    job = chunks.fetch_claimed(job_id, self.connection)
                except chunks.UnreadableJob as exc:  # requeued, it would only fail again
                    self._fail_chunk_job(job_id, exc.cause)
                    continue
                if job is None:
                    self.claims.release(job_id, self.cfg.name)
                    self._chunk_job_lost(job_id)
                    continue
                if self.claims.requeue(job_id, job.origin, self.cfg.name):
                    log.warning("requeued chunk %s whose claim was interrupted by the outage", job_id)
        for job_id in [j for j in self.held if holders.get(j) != self.cfg.name]:
            log.warning("chunk %s was reaped during the outage; leaving it to its new holder", job_id)
            self._drop(job_id)

    def _chunk_job_lost(self, job_id: str) -> None:
        num_failed = chunks.fail_lost_chunk(self.store, job_id)
        if num_failed:
            log.error("chunk job %s is missing from Redis: its %d unfinished request(s) fail", job_id, num_failed)
        self.num_requests_done += num_failed

    def _start_chunk(self, job: Job, queue: Queue) -> None:
        try:
            self._start_chunk_unguarded(job, queue)
        except UNAVAILABLE + REFUSED:
            # Half-started: forget it here; the claim stays in Redis and _reconcile_claims requeues it.
            self._drop(job.id)
            raise
        except Exception as exc:  # a malformed job or a stored payload nothing can read: fail it, keep serving
            self._fail_chunk_job(job.id, exc, job, queue)

    def _fail_chunk_job(self, job_id: str, exc: Exception, job: Job | None = None, queue: Queue | None = None) -> None:
        """Fails one chunk job that cannot run: its unfinished requests get error lines, its claim goes."""
        log.error("chunk job %s cannot run (%s: %s); it fails, the worker goes on",
                  job_id, type(exc).__name__, exc)
        self._drop(job_id)
        try:
            self.num_requests_done += chunks.fail_chunk(self.store, job_id, "invalid_chunk_job",
                                                        f"the chunk job could not run: {type(exc).__name__}")
            if job is not None and queue is not None:  # else RQ could not even read it
                self.rq.handle_job_failure(job, queue, exc_string=f"{type(exc).__name__}: {exc}")
        except UNAVAILABLE + REFUSED:
            raise  # the claim stays: the loop backs off and reconciliation requeues it
        except Exception as fail_exc:  # noqa: BLE001 - the batch's own keys are unreadable too: log, go on
            log.error("could not record the failure of chunk job %s: %s", job_id, fail_exc)
        self.claims.release(job_id, self.cfg.name)

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
        root = self.cfg.results_root
        if batch.output_dir and root and (problem := outside_root(batch.output_dir, root)):
            # The submitter does not choose where this host writes: the batch fails, nothing is written.
            log.error("batch %s: %s; the batch fails", chunk.batch_id, problem)
            self.num_requests_done += self.store.fail_batch(chunk.batch_id, "output_dir_not_allowed", problem)
            self._finish_chunk(job.id)
            return
        if batch.timestamps.get("expires_at", 0) and time.time() > batch.timestamps["expires_at"]:
            chunks.expire_overdue(self.store)
            self._finish_chunk(job.id)
            return
        if "in_progress_at" not in batch.timestamps:  # the batch's first chunk to run: it starts processing now
            self.store.mark_started(chunk.batch_id)
        pending = self.store.pending(chunk.batch_id, chunk.start, chunk.end)
        raws = self.store.raw_requests(chunk.batch_id, pending)
        gen, poison = [], []
        for index, raw in zip(pending, raws, strict=True):
            request, code, problem = parse_stored_request(raw)
            if request is None:
                # Unreadable or missing in Redis: an error line, never a crash loop over the same chunk.
                poison.append((index, error_line(stored_custom_id(raw, index), code, problem)))
                continue
            key = f"{chunk.batch_id}:{index}"
            self.inflight[key] = InFlight(batch, index, request, job.id)
            held.open.add(index)
            gen.append(GenerationRequest(key, request))
        if poison:
            log.warning("chunk %s: %d stored request(s) are missing or unreadable; they get error lines",
                        job.id, len(poison))
            accepted = set(self.store.record(chunk.batch_id, poison))
            self._write_files(batch, [line for index, line in poison if index in accepted])
            self.num_requests_done += len(accepted)
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
            self._write_files(items[0][0].batch, [line for f, line in items if f.index in accepted])
            for flight, _ in items:
                self._settle(flight)
            self.num_requests_done += len(accepted)
        self.unwritten.clear()

    def _write_files(self, batch: Batch, lines: list[dict[str, Any]]) -> None:
        """Appends lines Redis just accepted to the batch's --output-dir files, if it has them."""
        if not batch.output_dir or not lines:
            return
        try:
            write_results(batch.output_dir, batch.id, lines, result_view(batch.endpoint))
        except OSError as exc:
            log.error("could not append results of %s to %s: %s (they are in Redis)", batch.id, batch.output_dir, exc)

    def _settle(self, flight: InFlight) -> None:
        self.inflight.pop(f"{flight.batch.id}:{flight.index}", None)
        held = self.held.get(flight.job_id)
        if held is not None:
            held.open.discard(flight.index)
            if not held.open:
                self._finish_chunk(flight.job_id)

    def _finish_chunk(self, job_id: str) -> None:
        with self._held_lock:
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
            self.claims.release(job_id, self.cfg.name)

    def _drop(self, job_id: str) -> HeldChunk | None:
        """Drops a held chunk here only: its engine rows, in-flight entries and unwritten results."""
        with self._held_lock:
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
        """Drops in-flight requests of batches that were cancelled, expired or failed (their outcomes are set)."""
        if time.monotonic() - self._last_cancel_check < 1.0 or not self.held:
            return
        self._last_cancel_check = time.monotonic()
        statuses = self.store.statuses(sorted({h.chunk.batch_id for h in self.held.values()}))
        for batch_id, status in statuses.items():
            if status in (None, BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.EXPIRED, BatchStatus.FAILED):
                log.info("batch %s is %s: dropping its in-flight requests", batch_id, status and status.value)
                for job_id in [j for j, h in self.held.items() if h.chunk.batch_id == batch_id]:
                    self._finish_chunk(job_id)

    def _heartbeat(self) -> None:
        """One heartbeat; runs on the heartbeat thread, so it reads held chunks under the lock."""
        with self._held_lock:
            for held in list(self.held.values()):
                self.rq.maintain_heartbeats(held.job, held.execution)
        self.rq.heartbeat()
        try:
            stats = self._last_stats = self.engine.stats()
        except Exception:  # noqa: BLE001 - read while the loop steps; a failed read must not stop the beat
            log.debug("engine stats unavailable this beat", exc_info=True)
            stats = self._last_stats
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
            "last_heartbeat": int(time.time()), "results_root": self.cfg.results_root or "",
            # which int8 kernel runs, how many LLM.int8() outlier columns it keeps in the compute dtype, and how
            # many linears rotate their input (--int8-rotate)
            "int8_kernel": stats.extra.get("int8_kernel") or "",
            "int8_outlier_columns": stats.extra.get("int8_outlier_columns", ""),
            "int8_rotated_inputs": stats.extra.get("int8_rotated_inputs", ""),
        }
        self.workers.heartbeat(self.cfg.name, info, self.cfg.worker_ttl_s)
