"""The generic engine: any causal LM that transformers + bitsandbytes load in 8-bit, driven by its own HF forward.

Continuous batching the TGI CausalLM way (padded_batch.py): admitted requests are prefilled apart and their K/V
copied into the running batch's preallocated row slots (slot_batch.py); finished rows leave at once and their slots
are refilled from the next chunk. Chosen over transformers' paged continuous batching because that one needs the attention-interface
kernels (BLOOM's ALiBi and other older attentions are not on it), and over static caches because those fix one
write position for all rows; a DynamicCache with a 2-D mask runs every architecture transformers generates with.
The scheduler, sampler and request rules are the fast path's; an OOM halves the rows and requeues the evicted.
"""

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import replace

import torch
from batchgen.worker.engine import budget as budget_math
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.families import Family
from batchgen.worker.engine.fused import fuse_activations
from batchgen.worker.engine.int8_linear import Int8Runtime
from batchgen.worker.engine.loader import load_model, resolve_device, resolve_dtype
from batchgen.worker.engine.padded_batch import ModelCalls, PaddedBatch, decode, prefill
from batchgen.worker.engine.protocol import EngineStats, GenerationRequest, GenerationResult
from batchgen.worker.engine.requests import (
    Finisher,
    Intake,
    TokenRate,
    eos_ids,
    vocab_size_of,
)
from batchgen.worker.engine.sampler import sample
from batchgen.worker.engine.scheduler import Scheduler
from batchgen.worker.engine.sequence import Sequence
from batchgen.worker.engine.setup import (
    CUDA_ALLOCATOR_SLACK,
    LATE_OVERHEAD_BYTES,
    plan_rows,
    process_overhead_bytes,
    resident_max_prefill_tokens,
)
from batchgen.worker.engine.slot_batch import SlotBatch, slot_columns
from batchgen.worker.engine.slot_graphs import SlotDecodeGraphs, graphable
from batchgen.worker.engine.step_stats import StepStats

DEFAULT_MAX_MODEL_LEN = 4096
HOST_KV_SHARE = 0.5  # --stream-kv: the share of free host memory the K/V slots may take (pinned)
TOKENS_PER_S_WINDOW_S = 30.0

log = logging.getLogger("batchgen.engine")


class GenericEngine:
    def __init__(self, cfg: EngineConfig, model: torch.nn.Module, tokenizer, *, device: torch.device,
                 dtype: torch.dtype, weights_bytes: int, int8: Int8Runtime | None = None, kv_stream=None):
        if cfg.kv_cache_dtype in ("fp8v", "int8"):  # its slot batches keep K and V in one dtype, and no scales
            raise ValueError(f"--kv-cache-dtype {cfg.kv_cache_dtype} runs on the resident fast path only: use auto "
                             "or fp8 here")
        self.cfg = cfg
        self.kv_stream = kv_stream  # small-VRAM --stream-kv: the rows' K/V in host slots, streamed per layer
        self.int8 = int8  # the fast path's int8 kernels on this model's linears; its outlier guard is polled per step
        self.model_name = cfg.served_model_name or cfg.model
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        text_config = model.config.get_text_config()
        max_pos = getattr(text_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        # No window clamp: HF's attention masks apply a sliding window, the context stays max_position_embeddings.
        self.max_model_len = min(cfg.max_model_len or min(max_pos, DEFAULT_MAX_MODEL_LEN), max_pos)
        self.finisher = Finisher(tokenizer, eos_ids(model, tokenizer))
        self.intake = Intake(tokenizer, model_name=self.model_name, max_model_len=self.max_model_len,
                             eos=self.finisher.eos_ids, vocab_size=vocab_size_of(model))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.calls = ModelCalls.of(model, pad)
        if cfg.fused_elementwise and device.type == "cuda":  # eagerly they would compute the same, in more kernels
            fuse_activations(model)
        # As the fast path packs its prefills: a prefill of one or two prompts per forward would spend each
        # forward's fixed cost (a whole weight stream, in small-VRAM mode) on a few hundred tokens.
        max_prefill = resident_max_prefill_tokens(cfg, device, self.max_model_len)
        self.budget = plan_budget(cfg, text_config, device, dtype, weights_bytes, self.max_model_len, max_prefill,
                                  host_kv=kv_stream is not None)
        if self.budget.max_rows < 1:
            raise ValueError(f"not enough memory for one row of {self.max_model_len} tokens: {self.budget}")
        self.scheduler = Scheduler(self.budget.max_rows, max_prefill_tokens=max_prefill)
        self.batch: SlotBatch | PaddedBatch | None = None
        self._idle: SlotBatch | None = None  # a drained batch, whose slots the next first prefill takes
        self._slotted: bool | None = None  # whether this model's cache goes into slots: known after its first prefill
        self.rows: list[Sequence] = []  # the batch's rows, in cache order
        self._keys: set[str] = set()
        self._last_batch = 0
        self._num_ooms = 0
        self._num_joins = 0  # rows that joined a batch already decoding: continuous batching at work
        self._rate = TokenRate(TOKENS_PER_S_WINDOW_S)
        self.step_stats = StepStats()
        self.fault = _install_fault_injector(model, cfg.inject_oom, device)
        self.streamer = None  # small-VRAM mode: the layer streamer (hook_stream.py) whose hooks copy each step
        self.graphs: SlotDecodeGraphs | None = None  # the current SlotBatch's decode graphs
        self._eager_reason: str | None = None  # why decode steps are not replayed from CUDA graphs; None: unknown

    @classmethod
    def from_config(cls, cfg: EngineConfig, family: Family | None = None) -> "GenericEngine":
        if cfg.offload:
            raise ValueError(f"small-VRAM streaming runs the fast path's families only; {cfg.model!r} is on the "
                             "generic path")
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.compute_dtype, device)
        loaded = load_model(cfg.model, device=device, dtype=dtype, load_in_8bit=cfg.load_in_8bit,
                            int8_threshold=cfg.int8_threshold,
                            fp16_modules=cfg.fp16_modules)
        int8 = None
        if cfg.load_in_8bit:  # bnb's Linear8bitLt swapped for the fast path's kernels: they know no architecture
            int8 = Int8Runtime.load(loaded.model, cfg.int8_kernel, threshold=cfg.int8_threshold, device=device,
                                    tokenizer=loaded.tokenizer, rotate=cfg.int8_rotate)
        return cls(cfg, loaded.model, loaded.tokenizer, device=device, dtype=dtype,
                   weights_bytes=loaded.weights_bytes, int8=int8)

    def reserve_host_slots(self) -> None:
        """--stream-kv: the host K/V slots for every row the budget allows, pinned at load rather than in the first
        prefill (seconds for GBs). Their shape comes from a one-token forward's cache; a cache that cannot go into
        slots (or whose layers differ) reserves nothing."""
        with torch.inference_mode():  # the engine's own prefill of one token: the cache its batches will hold
            _, probe = prefill(self.model, self.calls, [[self.tokenizer.bos_token_id or 0]], self.device)
        if not (SlotBatch.fits(probe) and SlotBatch.uniform(probe)):
            return
        keys = probe.cache.layers[0].keys
        heads, head_dim, dtype = keys.shape[1], keys.shape[3], keys.dtype
        layers = probe.cache.layers
        start = time.perf_counter()
        num_bytes = self.kv_stream.reserve(len(layers), self.scheduler.max_batch_size, heads,
                                           slot_columns(self.max_model_len, host=True), head_dim,
                                           torch.float8_e4m3fn if self.cfg.kv_cache_dtype == "fp8" else dtype)
        log.info("--stream-kv: host K/V slots for %d rows reserved at load: %.2f GiB in %.2f s",
                 self.scheduler.max_batch_size, num_bytes / 2**30, time.perf_counter() - start)

    # -- Engine protocol ----------------------------------------------------------------------------

    def add(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        with self.step_stats.engine_call(), self.step_stats.timed("intake"):
            return self.intake.admit(requests, self._keys, self.scheduler)

    def step(self) -> list[GenerationResult]:
        with self.step_stats.engine_call():
            results = self._step()
        if self._last_batch and not self.num_unfinished:  # drained: say where the time went (benchmarks read this)
            log.info("engine steps: %s", json.dumps(self.step_stats.as_stats()))
        return results

    def _step(self) -> list[GenerationResult]:
        with torch.inference_mode():
            # A cache that cannot take rows in (rolling or recurrent layers) runs its batch to the end first.
            with self.step_stats.timed("admit"):
                admitted = self.scheduler.admit() if self.batch is None or self.batch.mergeable else []
                groups = self._prefill_groups(admitted) if admitted else []
            admitted = [s for group in groups for s in group]
            seqs = admitted or self.rows
            if not seqs:
                self._last_batch = 0
                return []
            start = time.perf_counter()
            failed = False
            with self.step_stats.stepping():
                try:
                    if admitted:
                        prefilled = [prefill(self.model, self.calls, [s.prompt_ids for s in group], self.device)
                                     for group in groups]
                        logits = torch.cat([group_logits for group_logits, _ in prefilled])
                    else:
                        logits = self._decode([s.output_ids[-1] for s in self.rows])
                    sampled = sample(logits, seqs, self.intake.structured)
                    if admitted:  # the first prefill after a drain allocates the K/V slots
                        self._merge(groups, [batch for _, batch in prefilled])
                except torch.OutOfMemoryError:  # torch.cuda.OutOfMemoryError is the same class
                    failed = True
            if failed:  # no step to count it in: the failed forward and the back-off are host phases
                self.step_stats.add_host("oom_step", time.perf_counter() - start)
                with self.step_stats.timed("oom_backoff"):
                    return self._on_oom(seqs, prefill=bool(admitted))
        prompt_tokens = sum(s.num_prompt_tokens for s in admitted) if admitted else 0
        # Sampling synced, so the step's time is its GPU time plus launches, and the guard's reduction costs no GPU
        # wait; an input's first outlier column changes its linears' path, which captured decode graphs skipped:
        # they are captured again.
        self.step_stats.add(time.perf_counter() - start, len(seqs), prompt_tokens,
                            0 if admitted else sum(s.num_tokens for s in seqs))
        if self.int8 is not None:
            with self.step_stats.timed("outlier_guard"):
                if self.int8.poll(prompt_tokens or len(seqs)):
                    self.graphs = None
        self._last_batch = len(seqs)
        self._rate.add(len(seqs))
        with self.step_stats.timed("finish_rows"):  # stop checks, detokenizing, results
            results = [r for seq, token, logprobs in zip(seqs, sampled.tokens, sampled.logprobs, strict=True)
                       if (r := self._append(seq, token, logprobs))]
        self._drop_finished()
        return results

    def abort(self, keys: Iterable[str]) -> None:
        for seq in self.scheduler.abort(keys):
            self._keys.discard(seq.key)
        self._drop_finished()

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
        used, free = _memory_info(self.device)
        extra: dict[str, float | int | str | dict] = dict(self.budget.as_stats())
        extra.update(max_model_len=self.max_model_len, num_ooms=self._num_ooms, num_joins=self._num_joins,
                     device=str(self.device),
                     engine_path="generic", kv_cache_dtype=self.cfg.kv_cache_dtype,
                     decode_steps=self.decode_steps(),
                     kv_bytes=self.batch.kv_bytes() if self.batch else 0, **self.step_stats.as_stats())
        if self.graphs is not None:
            extra.update(self.graphs.stats())
        if self.int8 is not None:
            extra.update(self.int8.stats())
        if self.kv_stream is not None:
            extra.update(self.kv_stream.stats())
        return EngineStats(self.model_name, self._last_batch, self.scheduler.max_batch_size, self._rate.per_s(),
                           self.num_unfinished, used, free, None, extra)

    # -- internals --------------------------------------------------------------------------------

    def _prefill_groups(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        """The admitted prompts by length, in groups whose left-padded size stays within the prefill's token budget
        (a prompt longer than it alone): one short prompt beside a long one would otherwise pad to the long one's
        length, past what the budget set aside. A cache that cannot take rows in gets every prompt in one forward;
        before the first prefill shows which kind this model's is, the rest waits a step."""
        if self._slotted is False:
            return [admitted]
        groups: list[list[Sequence]] = []
        for seq in sorted(admitted, key=lambda s: -s.num_prompt_tokens):
            if groups and (len(groups[-1]) + 1) * groups[-1][0].num_prompt_tokens <= self.scheduler.max_prefill_tokens:
                groups[-1].append(seq)
            else:
                groups.append([seq])
        if self._slotted is None and len(groups) > 1:
            self.scheduler.requeue([s for group in groups[1:] for s in group])
            groups = groups[:1]
        return groups

    def _merge(self, groups: list[list[Sequence]], batches: list[PaddedBatch]) -> None:
        """Each group's rows into the running batch, the rows list kept in step (an OOM may stop it midway)."""
        decoding = self.batch is not None
        for group, new_batch in zip(groups, batches, strict=True):
            fits = self.batch is None and SlotBatch.fits(new_batch)
            if fits and self._idle is not None:
                self.batch, self._idle = self._idle, None  # the drained batch's slots (and decode graphs) again
                self.batch.stats = self.step_stats  # which a benchmark may have replaced since
                self.batch.restart(new_batch)
            elif self.batch is None:
                if self._slotted is None and not fits:
                    log.warning("this model's cache (%s) cannot go into K/V slots: rows join only between drains%s",
                                ", ".join(sorted({type(layer).__name__ for layer in new_batch.cache.layers})),
                                "; --kv-cache-dtype fp8 and --stream-kv do not apply"
                                if self.cfg.kv_cache_dtype == "fp8" or self.kv_stream else "")
                self._slotted = fits
                stream = self.kv_stream if self._slotted and SlotBatch.uniform(new_batch) else None
                if self.kv_stream is not None and stream is None and self._slotted:
                    log.warning("--stream-kv: this model's layers differ in K/V shape; its K/V stays on the device")
                self.batch = (SlotBatch(new_batch, max_rows=self.scheduler.max_batch_size,
                                        max_model_len=self.max_model_len, fp8=self.cfg.kv_cache_dtype == "fp8",
                                        stream=stream, expected_rows=len(self.scheduler.running)
                                        + len(self.scheduler.waiting), stats=self.step_stats)
                              if self._slotted else new_batch)
            else:
                self.batch.extend(new_batch)
                self._num_joins += len(group) if decoding else 0
            self.rows += group

    def _decode(self, tokens: list[int]) -> torch.Tensor:
        """One decode step, replayed from CUDA graphs where this model and batch allow it."""
        if self._eager_reason is None:
            self._eager_reason = self._why_eager()
            log.info("generic decode: %s", self.decode_steps())
        if self._eager_reason or not isinstance(self.batch, SlotBatch):
            return decode(self.model, self.calls, self.batch, tokens)
        if self.graphs is None or self.graphs.batch is not self.batch:
            with self.step_stats.timed("graph_setup"):
                self.graphs = SlotDecodeGraphs(self.model, self.calls, self.batch, capture=self.device.type == "cuda")
        try:
            captured = self.graphs.capture_s
            logits = self.graphs.run(tokens)
            if self.graphs.capture_s > captured:  # this step captured a graph (new rows bucket or width, or stale)
                self.step_stats.add_host("graph_capture", self.graphs.capture_s - captured)
            return logits
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a forward that cannot be captured (a host sync inside): eager from now on
            self._eager_reason = f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
            log.warning("generic decode: CUDA graph capture failed, eager from now on (%s)", self._eager_reason)
            self.graphs = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return decode(self.model, self.calls, self.batch, tokens)

    def decode_steps(self) -> str:
        """How decode steps run: "CUDA graphs", or "eager (why)"."""
        reason = self._why_eager() if self._eager_reason is None else self._eager_reason
        return "CUDA graphs" if not reason else f"eager ({reason})"

    def _why_eager(self) -> str:
        """Why decode steps run eagerly; empty where they can be captured."""
        if self.device.type != "cuda" or not self.cfg.cuda_graphs:
            return "CUDA graphs off" if self.device.type == "cuda" else "no CUDA"
        if self.fault is not None:
            return "fault injection"
        if self.streamer is not None or self.kv_stream is not None:
            return "streamed layers"
        return graphable(self.model.config.get_text_config()) or ""

    def _append(self, seq: Sequence, token: int, logprobs) -> GenerationResult | None:
        return self.finisher.finish_step(seq, token, self.scheduler, self._keys, logprobs)

    def _drop_finished(self) -> None:
        """Drops rows no longer running (finished, aborted, evicted) from the batch."""
        keep = [i for i, s in enumerate(self.rows) if self.scheduler.running.get(s.row) is s]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._idle = self.batch if isinstance(self.batch, SlotBatch) else None
            self.rows, self.batch = [], None
            return
        with torch.inference_mode():  # the slots are inference tensors
            self.rows = [self.rows[i] for i in self.batch.select(keep)]

    def _on_oom(self, seqs: list[Sequence], *, prefill: bool) -> list[GenerationResult]:
        """Halve the batch and restart the rows that no longer fit; at one row, the failed forward's sequences
        get an out_of_memory error instead."""
        self._num_ooms += 1
        if self.batch is not None:
            self.batch.crop()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.scheduler.max_batch_size > 1:
            self.scheduler.shrink(also_requeue=seqs if prefill else ())
            self._drop_finished()
            return []
        results = self.finisher.fail(seqs, self.scheduler, self._keys, "out_of_memory",
                                     "out of GPU memory even at batch size 1; try a shorter prompt or max_tokens")
        self._drop_finished()
        return results



def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V of one token over all layers, from the config (Falcon's multi-query and GQA included)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv_heads = 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return budget_math.kv_bytes_per_token(config.num_hidden_layers, kv_heads, head_dim, dtype_bytes)


def prefill_cache_bytes(config, dtype_bytes: int, num_tokens: int) -> int:
    """A prefill's own cache: every layer's K/V of its tokens in the compute dtype, on the device until the join
    (uncounted, a small-VRAM cap did not hold for long prefills)."""
    return kv_bytes_per_token(config, dtype_bytes) * num_tokens


def plan_budget(cfg: EngineConfig, config, device: torch.device, dtype: torch.dtype, weights_bytes: int,
                max_model_len: int, max_prefill_tokens: int, host_kv: bool = False) -> budget_math.Budget:
    """Rows whose full-length K/V slots and decode activations fit what is free, after one prefill peak.
    host_kv (--stream-kv): the slots are in host memory, of which they may take HOST_KV_SHARE; the device holds
    two layers' worth of them (the stages)."""
    dtype_bytes = torch.finfo(dtype).bits // 8
    kv_token = kv_bytes_per_token(config, 1 if cfg.kv_cache_dtype == "fp8" else dtype_bytes)
    hidden, heads = config.hidden_size, config.num_attention_heads
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
                    or getattr(config, "n_inner", None) or 4 * hidden)
    if isinstance(intermediate, (list, tuple)):  # per layer (Gemma 3n): the widest is the one a row's step peaks at
        intermediate = max(intermediate)
    intermediate *= max(1, getattr(config, "num_experts_per_tok", 1) or 1)
    activation = budget_math.estimate_decode_activation_bytes(
        hidden_size=hidden, intermediate_size=intermediate, vocab_size=config.vocab_size, num_heads=heads,
        max_model_len=max_model_len, dtype_bytes=dtype_bytes, head_dim=getattr(config, "head_dim", None))
    # Moving the slots' window copies one layer's active K/V through a temporary (fp8 slots: each layer's forward
    # attends over a dequantized copy of it too).
    activation += kv_bytes_per_token(config, dtype_bytes) * max_model_len // max(1, config.num_hidden_layers)
    # Prompts are padded per row, not packed: their scores are [rows, heads, len, len], each len <= max_model_len.
    prefill_bytes = budget_math.estimate_prefill_bytes(hidden_size=hidden, intermediate_size=intermediate,
                                                       num_heads=heads, num_tokens=max_prefill_tokens,
                                                       dtype_bytes=dtype_bytes,
                                                       keys_per_token=min(max_model_len, max_prefill_tokens))
    prefill_bytes += prefill_cache_bytes(config, dtype_bytes, max_prefill_tokens)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free -= int(CUDA_ALLOCATOR_SLACK * free)
        weights_bytes = torch.cuda.memory_allocated(device)
        if cfg.max_vram_bytes is not None:  # a cap models a whole card: what PyTorch does not allocate counts too
            weights_bytes += process_overhead_bytes(device) + LATE_OVERHEAD_BYTES
    else:
        free = budget_math.available_ram_bytes()
    columns = slot_columns(max_model_len, host_kv)
    on_device = 2 * kv_token // max(1, config.num_hidden_layers) if host_kv else kv_token
    budget = plan_rows(cfg, device, free_bytes=free, weights_bytes=weights_bytes, kv_bytes_per_token=on_device,
                       max_model_len=columns, activation_bytes_per_row=activation, prefill_bytes=prefill_bytes)
    if not host_kv:
        return budget
    host = budget_math.available_ram_bytes()
    host_rows = budget.max_rows if host is None else int(HOST_KV_SHARE * host) // (columns * kv_token)
    return replace(budget, kv_bytes_per_token=kv_token, kv_bytes_per_row=columns * kv_token,
                   max_rows=min(budget.max_rows, host_rows))


def _memory_info(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return 0, 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free, free


def _install_fault_injector(model: torch.nn.Module, spec: str | None, device: torch.device):
    """BATCHGEN_INJECT_OOM on this path: the fast path's injector, hooked on the last decoder layer."""
    if not spec:
        return None
    from batchgen.worker.engine.model_runner import FaultInjector

    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    injector = FaultInjector(spec, device)
    layers[-1].register_forward_pre_hook(injector)
    return injector
