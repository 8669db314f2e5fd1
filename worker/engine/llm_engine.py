"""The LLM engine: continuous batching over a KV cache (paged where the runner pages it), on an (8-bit) HF model.

Step loop (nano-vllm's): the scheduler admits pending sequences into free rows (refilling rows that
finished last step), the model runner prefills them or runs one decode step over the running rows,
the sampler picks tokens, and the engine checks EOS / stop strings / max_tokens. An OOM halves the
max batch size and restarts the evicted rows from scratch; nothing is lost. With a paged cache the scheduler
admits a sequence only when KV blocks for its prompt + max_tokens are free (kv_blocks.BlockPool), and the
engine copies rows' block changes into the runner's block table before each forward.

Overlapped decode (SGLang's overlap scheduling): while no row needs the host to choose its token (greedy and
sampling rows do not: their noise is a function of seed and index; logprobs, logits processors and grammars do)
and nothing waits for admission, the engine queues the next decode step, fed on the device with this step's
picks, before it reads this step's tokens, so the host's bookkeeping (reading tokens, stop checks, results) runs
while the GPU computes. A row that ends on EOS or a stop string meanwhile has computed one token too many,
dropped unread.

Overlapped prefill (--overlap-prefill): a prefill step whose prompts need nothing from the host to choose their
first token is launched and queued the same way; reading it first launches the next prefill when admission wants
one, so across a run of prefill steps the host packs and launches step N+1 while the GPU computes step N. A
refill (the prefill of the prompts admitted into rows finished sequences freed) is launched the same way behind
the decode step still running, instead of after the queue of decode steps has drained. Row compaction
(--compact-rows, paged KV): before each decode launch the highest running rows move down into freed rows (their
block-table rows only), so the step computes the running rows and no holes.
"""

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from batchgen.worker.engine import budget as budget_math
from batchgen.worker.engine import logits_processors
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.fused import fuse_layers
from batchgen.worker.engine.host_copy import to_device
from batchgen.worker.engine.int8_linear import Int8Runtime
from batchgen.worker.engine.int8_outliers import calibration_ids
from batchgen.worker.engine.kernels import attention as attention_kernels
from batchgen.worker.engine.kv_blocks import BlockPool
from batchgen.worker.engine.llama import LlamaParts, decode_path
from batchgen.worker.engine.loader import load_model
from batchgen.worker.engine.model_runner import ModelRunner
from batchgen.worker.engine.protocol import EngineStats, GenerationRequest, GenerationResult
from batchgen.worker.engine.requests import (
    Finisher,
    Intake,
    TokenRate,
    eos_ids,
    vocab_size_of,
)
from batchgen.worker.engine.sampler import pick, sample
from batchgen.worker.engine.scheduler import Scheduler
from batchgen.worker.engine.sequence import SeqStatus, Sequence
from batchgen.worker.engine.setup import (
    FAST_CUDA_MIN_PREFILL_TOKENS,
    max_model_len_for,
    resident_budget,
    resident_max_prefill_tokens,
    resolve_attention,
    resolve_device_dtype,
    resolve_kv_cache_dtype,
)
from batchgen.worker.engine.step_clock import Mark, StepClock
from batchgen.worker.engine.step_stats import StepStats
from batchgen.worker.engine.warm_up import run as run_warm_up

TOKENS_PER_S_WINDOW_S = 30.0
# The int8 outlier guard snapshots its counters (a few small kernels and a copy of a byte per int8 input column, no
# sync) after every synchronous step and every this many queued steps; the queued steps between only read a snapshot
# the device has finished.
GUARD_POLL_STEPS = 16

log = logging.getLogger("batchgen.engine")



class Reporter(Protocol):
    def stats(self) -> dict: ...

    def reset_timing(self) -> None: ...


class Runner(Reporter, Protocol):
    """What the engine drives: ModelRunner (KV on the device), or small-VRAM's HostAttentionRunner."""

    parts: LlamaParts
    device: torch.device
    max_model_len: int
    attention: str
    use_graphs: bool
    block_size: int | None  # a paged cache's tokens per block (see PagedRunner); None: slots of max_model_len
    v_transposed: bool  # V^T in each block: a decode step's stores are not idempotent (kv_store.seal_blocks)

    def allocate_kv(self, max_rows: int) -> None: ...

    def capture_graphs(self) -> float: ...

    def drop_graphs(self) -> None: ...

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor: ...

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor: ...

    def free_cached_memory(self) -> None: ...

    def memory_info(self) -> tuple[int, int]: ...


class PagedRunner(Runner, Protocol):
    """A runner whose cache is KV blocks behind a block table (ModelRunner with paged=True)."""

    max_blocks_per_row: int

    def allocate_kv(self, max_rows: int, num_blocks: int | None = None) -> None: ...

    def set_blocks(self, rows: dict[int, list[int]]) -> None: ...



class LLMEngine:
    """Continuous batching over a runner (which holds the KV cache) within a budget (how many rows fit).

    LLMEngine.from_config builds the resident engine; worker.offload.build the small-VRAM one. reporters: other
    parts the builder set up whose stats() join the engine's (and whose reset_timing() reset_timing calls).
    """

    def __init__(self, cfg: EngineConfig, model: torch.nn.Module, tokenizer, runner: Runner,
                 budget: budget_math.Budget, *, max_prefill_tokens: int, reporters: Iterable[Reporter] = (),
                 int8: Int8Runtime | None = None):
        if budget.max_rows < 1:
            raise ValueError(f"not enough memory for one row of {runner.max_model_len} tokens: {budget}")
        self.cfg = cfg
        self.model_name = cfg.served_model_name or cfg.model
        self.model, self.tokenizer, self.runner, self.budget = model, tokenizer, runner, budget
        self.reporters = tuple(reporters)
        self.int8 = int8  # the int8 kernel's runtime: its outlier guard is polled after each step
        self.device, self.max_model_len, self.attention = runner.device, runner.max_model_len, runner.attention
        self.finisher = Finisher(tokenizer, eos_ids(model, tokenizer))
        self.intake = Intake(tokenizer, model_name=self.model_name, max_model_len=self.max_model_len,
                             eos=self.finisher.eos_ids, vocab_size=vocab_size_of(model))
        self.blocks: BlockPool | None = None
        with torch.inference_mode():
            if runner.block_size and budget.num_kv_blocks:
                self.blocks = BlockPool(budget.num_kv_blocks, runner.block_size, runner.max_blocks_per_row)
                runner.allocate_kv(budget.max_rows, num_blocks=budget.num_kv_blocks)
            else:
                runner.allocate_kv(budget.max_rows)
            self.graph_capture_s = runner.capture_graphs()
        self.scheduler = Scheduler(budget.max_rows, max_prefill_tokens=max_prefill_tokens, blocks=self.blocks)
        self.step_stats = StepStats(num_kv_blocks=0 if self.blocks is None else self.blocks.num_blocks)
        self.clock = StepClock(self.device)  # device time per step and the device's gaps between steps
        self._keys: set[str] = set()
        self._last_batch = 0
        self._num_ooms = 0
        self._rate = TokenRate(TOKENS_PER_S_WINDOW_S)
        self._queued: QueuedStep | None = None  # a step launched and not yet read
        self._admit_here = False  # prompts a queued prefill could not take: the next synchronous step admits them
        # a queued decode's rows that ran out of memory over a V^T pool: the next step backs off for them (_on_oom)
        # rather than run the step again (its stores are not idempotent there)
        self._oom_rows: list[Sequence] | None = None
        self._unpolled_tokens = 0  # tokens of queued steps launched since the guard's last snapshot
        self._unpolled_steps = 0
        self._guarding = True  # off while the warm-up steps its calibration text
        self._restart_guard()  # the budget's passes and the graph captures recorded placeholder rows
        self._last_read = 0.0
        self.warm_up_s = 0.0

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "LLMEngine":
        """The resident engine: the model loaded on the device."""
        device, dtype = resolve_device_dtype(cfg)
        loaded = load_model(cfg.model, device=device, dtype=dtype, load_in_8bit=cfg.load_in_8bit,
                            int8_threshold=cfg.int8_threshold,
                            fp16_modules=cfg.fp16_modules)
        int8 = None
        if cfg.load_in_8bit:  # converts the model's linears (calibrating the outlier columns) and logs the kernel
            int8 = Int8Runtime.load(loaded.model, cfg.int8_kernel, threshold=cfg.int8_threshold, device=device,
                                    tokenizer=loaded.tokenizer, rotate=cfg.int8_rotate)
        return cls.resident(cfg, loaded.model, loaded.tokenizer, device=device, dtype=dtype,
                            weights_bytes=loaded.weights_bytes, int8=int8)

    @classmethod
    def resident(cls, cfg: EngineConfig, model: torch.nn.Module, tokenizer, *, device: torch.device,
                 dtype: torch.dtype, weights_bytes: int, int8: Int8Runtime | None = None) -> "LLMEngine":
        """The engine over a model already loaded on the device: a ModelRunner and the budget it measures."""
        max_model_len = max_model_len_for(cfg, model.config)
        attention = resolve_attention(cfg.attention, device, dtype, cfg.kv_cache_dtype)
        if cfg.fused_elementwise:
            fuse_layers(model, compile_kernels=device.type == "cuda")
        parts = LlamaParts.from_hf(model)
        kv = resolve_kv_cache_dtype(cfg.kv_cache_dtype, device, dtype, decode_path(parts.spec, attention, True))
        runner = ModelRunner(parts, device=device, dtype=dtype, max_model_len=max_model_len,
                             inject_oom=cfg.inject_oom, attention=attention, cuda_graphs=cfg.cuda_graphs,
                             kv_cache_dtype=kv, paged=cfg.kv_layout == "paged")
        if kv == "int8":
            log.info("int8 KV cache%s: K and V rounded per token and KV head, a float32 scale each (%s)",
                     " (--kv-cache-dtype auto)" if cfg.kv_cache_dtype == "auto" else "",
                     attention_kernels.INT8_V_SCALES)
        elif kv != "auto":  # before the budget's warm-up, which already writes the cache
            runner.calibrate_kv(calibration_ids(tokenizer, device))
            log.info("%s KV cache: scales per layer and KV head calibrated, K %.3g-%.3g, V %.3g-%.3g", kv,
                     runner.k_scale.min(), runner.k_scale.max(), runner.v_scale.min(), runner.v_scale.max())
        max_prefill = resident_max_prefill_tokens(cfg, device, max_model_len, FAST_CUDA_MIN_PREFILL_TOKENS)
        budget = resident_budget(cfg, runner, model.config, weights_bytes, max_prefill)
        engine = cls(cfg, model, tokenizer, runner, budget, max_prefill_tokens=max_prefill, int8=int8)
        if cfg.warm_up and device.type == "cuda":
            engine.warm_up()
        return engine


    # -- Engine protocol ----------------------------------------------------------------------------

    def add(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        return self.intake.admit(requests, self._keys, self.scheduler)

    def step(self) -> list[GenerationResult]:
        with torch.inference_mode():
            if self._queued is not None:
                return self._step_queued()
            if self._oom_rows is not None:
                seqs, self._oom_rows = self._oom_rows, None
                return self._on_oom([s for s in seqs if s.status == SeqStatus.RUNNING], prefill=False)
            # a mixed step decodes the running rows [0, n) in the prefill's forward: the prompts get what is
            # left of the prefill token budget
            self._compact()
            decoding = self.scheduler.running_seqs() if self._mixes else []
            n = self.scheduler.num_decode_rows if decoding else 0
            admitted = self.scheduler.admit(max(1, self.scheduler.max_prefill_tokens - n) if n else None)
            if admitted:
                self._admit_here = False
            decoding = decoding if admitted else []
            seqs = decoding + admitted if admitted else self.scheduler.running_seqs()
            if self.blocks is not None:  # rows admitted, finished, aborted or requeued since the last forward
                self.runner.set_blocks(self.blocks.take_changes())
            if not seqs:
                self._last_batch = 0
                self.clock.idle()
                return []
            if admitted and not decoding and self._can_queue_prefill(admitted):
                if not self._launch_prefill(admitted):
                    return self._on_oom(admitted, prefill=True)
                return self._step_queued()
            start, began = time.perf_counter(), self.clock.mark()
            try:
                logits = self._forward(admitted, decoding)
                ended = self.clock.mark()
                sampled = sample(logits, seqs, self.intake.structured)
            except torch.OutOfMemoryError:  # torch.cuda.OutOfMemoryError is the same class
                # a mixed step's decoding rows ran their stores too: over a V^T pool they start again with its prompts
                return self._on_oom(seqs if self.runner.v_transposed else admitted or seqs, prefill=bool(admitted))
            prompt_tokens = sum(s.num_prompt_tokens for s in admitted) if admitted else 0
            kv_tokens = 0 if admitted else sum(s.num_tokens for s in seqs)  # held in the cache during this decode
            self.step_stats.add(time.perf_counter() - start, len(seqs), prompt_tokens, kv_tokens,
                                0 if self.blocks is None else self.blocks.num_used, num_mixed_rows=len(decoding))
            self.clock.settle(began, ended, prefill=bool(admitted), tokens=prompt_tokens or len(seqs), rows=len(seqs))
            self._poll_int8(prompt_tokens + len(decoding) or len(seqs))
            results = self._finish_step(seqs, sampled.tokens, sampled.logprobs)
            self._queue_decode(None)
        return results

    def _finish_step(self, seqs: list[Sequence], tokens: list[int], logprobs: list) -> list[GenerationResult]:
        self._last_batch = len(seqs)
        self._rate.add(len(seqs))
        results = []
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            result = self._append(seq, token, lp)
            if result is not None:
                results.append(result)
        if not self.num_unfinished:  # drained: say where the time went (benchmarks read this line)
            if self._queued is None:
                self._flush_int8()
            self.clock.idle()
            log.info("engine steps: %s", json.dumps(  # OOM back-offs too: a run that had them ran another schedule
                self.step_stats.as_stats() | self.clock.as_stats()
                | {"kv_bytes_per_token": self.budget.kv_bytes_per_token, "num_ooms": self._num_ooms,
                   "max_batch_size": self.scheduler.max_batch_size}))
        self._last_read = time.perf_counter()
        return results

    def _restart_guard(self) -> None:
        """The outlier guard judges what follows only (Int8Runtime.restart)."""
        self._unpolled_tokens = self._unpolled_steps = 0
        if self.int8 is not None:
            self.int8.restart()

    def _poll_int8(self, num_tokens: int, *, queued: bool = False) -> None:
        """The outlier guard after a step over num_tokens tokens was launched (in stream order before the next
        one): a snapshot after a synchronous step or every GUARD_POLL_STEPS queued ones, else only a finished
        snapshot read; neither waits for the device. An input's first outlier column changes its linears' path,
        which captured graphs skipped: they are dropped here, before the next replay, and captured again."""
        if self.int8 is None or not self._guarding:
            return
        self._unpolled_tokens += num_tokens
        self._unpolled_steps += 1
        if queued and self._unpolled_steps < GUARD_POLL_STEPS:
            opened = self.int8.collect()
        else:
            opened = self.int8.poll(self._unpolled_tokens)
            self._unpolled_tokens = self._unpolled_steps = 0
        if opened:
            self.runner.drop_graphs()

    def _flush_int8(self) -> None:
        """Drained with nothing in flight: the guard judges the last steps' tokens now, waiting for its snapshot
        only, so the columns they found are in place before the next run."""
        if self.int8 is None or not self._guarding:
            return
        opened = self.int8.flush()
        if self._unpolled_steps:
            opened = self.int8.poll(self._unpolled_tokens) | self.int8.flush() | opened
            self._unpolled_tokens = self._unpolled_steps = 0
        if opened:
            self.runner.drop_graphs()

    # -- overlapped decode --------------------------------------------------------------------------

    def _host_free(self, seqs: list[Sequence]) -> bool:
        """Whether every row's next token can be picked on the device (sampler.pick): no logprobs, logits processors
        or grammars."""
        return (all(s.params.logprobs is None and s.matcher is None for s in seqs)
                and not logits_processors.needed(seqs))

    def _queues_prefills(self) -> bool:
        """--overlap-prefill, where the runner takes device tokens and prefills are not mixed into decode steps."""
        return self.cfg.overlap_prefill and not self._mixes and getattr(self.runner, "takes_device_tokens", False)

    def _can_queue_prefill(self, admitted: list[Sequence]) -> bool:
        return self._queues_prefills() and self._host_free(admitted)

    def _launch_prefill(self, admitted: list[Sequence]) -> bool:
        """Prefills the admitted prompts and queues their first tokens' picks unread; False on OOM."""
        start, began = time.perf_counter(), self.clock.mark()
        try:  # the host's launch time apart: a prefill is hundreds of launches, a decode step one graph
            with self.step_stats.timed("prefill_launch"):
                picks = pick(self._forward(admitted, []), admitted, 0, by_row=False)
        except torch.OutOfMemoryError:
            return False
        self._queued = QueuedStep.launch(admitted, picks, start, began, self.clock,
                                         sum(s.num_prompt_tokens for s in admitted))
        self._poll_int8(self._queued.prompt_tokens, queued=True)
        return True

    def _queue_prefill(self) -> bool:
        """While a step is queued (a prefill, or a decode with rows freed since it was launched): launches the next
        prefill behind it when admission wants one and its prompts allow; whether it did. The host admits, packs
        and launches while the GPU runs the queued step."""
        admitted = self.scheduler.admit()  # nothing unless admission wants it
        if not admitted:
            return False
        if self._can_queue_prefill(admitted):
            if self.blocks is not None:
                self.runner.set_blocks(self.blocks.take_changes())
            if self._launch_prefill(admitted):
                return True
        # the next synchronous step prefills them (and meets an OOM again, and backs off, if it was one): until
        # then no decode is queued, so that step comes
        self.scheduler.requeue(admitted)
        self._admit_here = True
        return False

    def _can_queue(self, ahead: int) -> bool:
        """Whether the next decode step may be queued before the unread one (ahead = 1; 0: none) is read: the
        runner takes device tokens, no row needs the host to choose its token (logprobs, processors and grammars
        do; greedy and sampling rows do not) and nothing waits for admission once the rows the unread step ends by
        length are free (that changes the rows)."""
        if not self.cfg.overlap_decode or not getattr(self.runner, "takes_device_tokens", False):
            return False
        seqs = list(self.scheduler.running.values())
        if not seqs or self._admit_here:
            return False
        # where refills can be queued, admission waits for the next read instead: its prefill is then launched
        # behind the decode step queued now (_step_queued), not after the queue has drained
        if not self._refills_queue() and self.scheduler.wants_admission(sum(self._ends_by_length(s, ahead)
                                                                             for s in seqs)):
            return False
        return self._host_free(seqs)

    def _refills_queue(self) -> bool:
        """Whether a refill's prefill can be launched behind a queued decode step (_queue_prefill)."""
        return self._queues_prefills() and not self._admit_here

    @staticmethod
    def _ends_by_length(seq: Sequence, ahead: int) -> bool:
        """Whether seq reaches max_tokens with the `ahead` tokens it has beyond its output_ids."""
        return len(seq.output_ids) + ahead >= seq.params.max_tokens

    def _queue_decode(self, picks: torch.Tensor | None) -> None:
        """Launches the next decode step without waiting for it, where _can_queue allows. picks: the unread step's
        tokens per row on the device (None: the rows' last tokens are on the host, already appended)."""
        ahead = 0 if picks is None else 1  # tokens each row has beyond its output_ids
        if not self._can_queue(ahead):
            return
        moves = self._compact()
        n = self.scheduler.num_decode_rows
        tokens, positions, seqs = [0] * n, [0] * n, []
        for seq in self.scheduler.running_seqs():
            if self._ends_by_length(seq, ahead):
                continue  # its last token is the unread step's: a hole here
            seqs.append(seq)
            positions[seq.row] = seq.last_position + ahead
            if picks is None:
                tokens[seq.row] = seq.output_ids[-1]
        if not seqs:
            return
        if picks is not None and moves:  # a moved row's token is its old row's pick
            source = list(range(n))
            for old, new in moves.items():
                source[new] = old
            picks = picks.index_select(0, to_device(source, picks.device))
        start, began = time.perf_counter(), self.clock.mark()
        try:
            logits = self.runner.decode(tokens if picks is None else picks, positions)
        except torch.OutOfMemoryError:  # the synchronous step that follows meets it again and backs off
            if self.runner.v_transposed:  # its stores ran: not again, the next step backs off for these rows
                self._oom_rows = seqs
            return
        self.step_stats.num_rows_computed += n
        self._queued = QueuedStep.launch(seqs, pick(logits, seqs, ahead), start, began, self.clock)
        self._poll_int8(len(seqs), queued=True)

    def _compact(self) -> dict[int, int]:
        """Running rows moved down into the rows finished sequences left (--compact-rows, paged KV: block-table rows
        only), so a decode step computes len(running) rows, not every row up to the highest one still running."""
        if not self.cfg.compact_rows or self.blocks is None:
            return {}
        moves = self.scheduler.compact()
        if moves:  # before the next launch, in stream order after the steps already queued (which read the old rows)
            self.runner.set_blocks(self.blocks.take_changes())
        return moves

    def _step_queued(self) -> list[GenerationResult]:
        """Queues the step after the unread one, then reads the unread one. After a prefill: the next prefill, if
        admission wants one. After a decode: a prefill into the rows finished sequences freed, if admission wants
        one (a refill, launched while this decode still runs), else the next decode fed this one's picks."""
        queued, self._queued = self._queued, None
        # after a decode: the rows its predecessors freed, refilled behind it
        refill = (queued.prompt_tokens or self._refills_queue()) and self._queue_prefill()
        self.step_stats.num_queued_refills += bool(refill and not queued.prompt_tokens)
        if not queued.prompt_tokens and self._queued is None:
            self._queue_decode(queued.picks)
        tokens = queued.read()
        self.clock.settle(queued.began, queued.done, prefill=bool(queued.prompt_tokens),
                          tokens=queued.prompt_tokens or len(queued.seqs), rows=len(queued.seqs))
        live = [(s, t) for s, t in zip(queued.seqs, tokens, strict=True)
                if s.status == SeqStatus.RUNNING and self.scheduler.running.get(s.row) is s]
        if live:  # else every row ended at the step before (the engine may have idled since): nothing to time
            start = max(queued.start, self._last_read)
            kv_tokens = 0 if queued.prompt_tokens else sum(s.num_tokens for s, _ in live)
            self.step_stats.add(time.perf_counter() - start, len(queued.seqs), queued.prompt_tokens, kv_tokens,
                                0 if self.blocks is None else self.blocks.num_used, overlapped=True)
        results = self._finish_step([s for s, _ in live], [t for _, t in live], [None] * len(live))
        if queued.prompt_tokens and self._queued is None:  # the run of prefills ended: decode, queued as after a sync step
            self._queue_decode(None)
        return results

    def abort(self, keys: Iterable[str]) -> None:
        for seq in self.scheduler.abort(keys):
            self._keys.discard(seq.key)

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    @property
    def num_wanted(self) -> int:
        return self.scheduler.num_wanted

    @property
    def next_step_is_full(self) -> bool:
        return self.scheduler.next_prefill_is_full

    def stats(self) -> EngineStats:
        used, free = self.runner.memory_info()
        extra: dict = dict(self.budget.as_stats())
        extra.update(max_model_len=self.max_model_len, num_ooms=self._num_ooms, mixed_steps=int(self._mixes),
                     device=str(self.device), attention=self.attention, cuda_graphs=int(self.runner.use_graphs),
                     graph_capture_s=round(self.graph_capture_s, 2), warm_up_s=round(self.warm_up_s, 2), **self.step_stats.as_stats(),
                     **self.clock.as_stats())
        for source in (self.runner, *self.reporters):
            extra.update(source.stats())
        if self.int8 is not None:
            extra.update(self.int8.stats())
        return EngineStats(self.model_name, self._last_batch, self.scheduler.max_batch_size, self._rate.per_s(),
                           self.num_unfinished, used, free, _gpu_temperature_c(self.device), extra)

    def warm_up(self) -> float:
        """Runs the warm-up's prompts through this engine's steps (warm_up.py), then starts its statistics afresh:
        they count jobs only. Returns the seconds it took."""
        # Its prompts repeat the calibration text, which calibration judged: judged again, their rates can open
        # columns that every later step pays for, with the decode graphs captured again mid-job.
        self._guarding = False
        try:
            seconds = run_warm_up(self)
        finally:
            self._guarding = True
        self._restart_guard()
        self.step_stats = StepStats(num_kv_blocks=0 if self.blocks is None else self.blocks.num_blocks)
        self._rate = TokenRate(TOKENS_PER_S_WINDOW_S)
        self._last_batch = 0
        self.reset_timing()
        self.warm_up_s = seconds
        log.info("warm-up: %.1f s", seconds)
        return seconds

    def reset_timing(self) -> None:
        """Zeroes the runner's, reporters' and StepClock's cumulative timings (a benchmark's timed run apart from its
        warm-up)."""
        for source in (self.runner, *self.reporters):
            source.reset_timing()
        self.clock.reset()

    # -- internals --------------------------------------------------------------------------------


    def _forward(self, admitted: list[Sequence], decoding: list[Sequence]) -> torch.Tensor:
        """Logits of the step's sequences in order: decoding rows (a mixed step's) then admitted prompts; or the
        running rows of a decode step."""
        rows, prompts = [s.row for s in admitted], [s.prompt_ids for s in admitted]
        if admitted and not decoding:
            return self.runner.prefill(rows, prompts)
        running = decoding or self.scheduler.running_seqs()
        n = max(s.row for s in running) + 1  # rows [0, n): holes (admitted rows among them) are computed, ignored
        tokens, positions = [0] * n, [0] * n
        for seq in running:
            tokens[seq.row], positions[seq.row] = seq.output_ids[-1], seq.last_position
        picks = [s.row for s in running]
        if not admitted:
            logits = self.runner.decode(tokens, positions)
            self.step_stats.num_rows_computed += n  # a forward that ran out of memory is no step: not counted
            return logits[picks]
        return self.runner.mixed(tokens, positions, rows, prompts)[picks + list(range(n, n + len(admitted)))]

    @property
    def _mixes(self) -> bool:
        return self.cfg.mixed_steps and hasattr(self.runner, "mixed")

    def _on_oom(self, seqs: list[Sequence], *, prefill: bool) -> list[GenerationResult]:
        """Free cached memory, halve the batch, restart the rows that no longer fit; at batch size 1 the
        sequences of the failed forward get an out_of_memory error instead."""
        self._num_ooms += 1
        self.runner.free_cached_memory()
        if self.scheduler.max_batch_size > 1:
            # Prefilled sequences may have half-written K/V: they start again too. So do a decode step's rows over a
            # V^T pool: the step ran its stores, and run again a block it filled would be sealed twice (garbage)
            again = prefill or self.runner.v_transposed
            self.scheduler.shrink(also_requeue=seqs if again else ())
            return []
        return self.finisher.fail(seqs, self.scheduler, self._keys, "out_of_memory",
                                  "out of GPU memory even at batch size 1; try a shorter prompt or max_tokens")

    def _append(self, seq: Sequence, token: int, logprobs) -> GenerationResult | None:
        return self.finisher.finish_step(seq, token, self.scheduler, self._keys, logprobs)



@dataclass
class QueuedStep:
    """A step launched and not read: its sequences and their picks (sampler.pick), on their way to pinned host
    memory. A decode step's picks are per row (the next step's input); a prefill's (prompt_tokens > 0) per
    sequence, in order. began/done: the StepClock's marks before its launches and after its copy."""

    seqs: list[Sequence]
    picks: torch.Tensor
    host: torch.Tensor
    began: Mark
    done: Mark
    start: float
    index: list[int]  # where each sequence's pick is: its row (decode) or its place (prefill)
    prompt_tokens: int = 0

    @classmethod
    def launch(cls, seqs: list[Sequence], picks: torch.Tensor, start: float, began: Mark, clock: StepClock,
               prompt_tokens: int = 0) -> "QueuedStep":
        host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=picks.device.type == "cuda")
        host.copy_(picks, non_blocking=True)
        index = list(range(len(seqs))) if prompt_tokens else [s.row for s in seqs]
        return cls(seqs, picks, host, began, clock.mark(), start, index, prompt_tokens)

    def read(self) -> list[int]:
        """Each sequence's token; waits for this step only (not for one queued after it)."""
        self.done.synchronize()
        tokens = self.host.tolist()
        return [tokens[i] for i in self.index]


def _gpu_temperature_c(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    # torch maps the device through CUDA_VISIBLE_DEVICES; NVML's own index is the physical GPU (--gpus 1 read GPU 0)
    try:
        return int(torch.cuda.temperature(device))
    except Exception:  # no NVML (driver, container): the stat is optional
        return None
