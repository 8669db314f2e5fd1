"""The LLM engine: continuous batching over a slot KV cache, on a resident (8-bit) HF model.

Step loop (nano-vllm's): the scheduler admits pending sequences into free rows (refilling rows that
finished last step), the model runner prefills them or runs one decode step over the running rows,
the sampler picks tokens, and the engine checks EOS / stop strings / max_tokens. An OOM halves the
max batch size and restarts the evicted rows from scratch; nothing is lost.
"""

import json
import logging
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from batchgen.jobs.schema import ErrorInfo, Request
from batchgen.worker.engine import budget as budget_math
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.int8_linear import Int8Runtime
from batchgen.worker.engine.loader import SUPPORTED_MODEL_TYPES, load_model, resolve_device, resolve_dtype
from batchgen.worker.engine.model_runner import ModelRunner, flash_works
from batchgen.worker.engine.protocol import EngineStats, GenerationRequest, GenerationResult
from batchgen.worker.engine.sampler import sample
from batchgen.worker.engine.scheduler import Scheduler
from batchgen.worker.engine.sequence import Sequence

DEFAULT_MAX_MODEL_LEN = 4096
CUDA_ALLOCATOR_SLACK = 0.03
CUDA_MIN_PREFILL_TOKENS = 4096  # a packed prefill of a few thousand tokens keeps the tensor cores busy
CPU_MAX_BATCH_SIZE = 64  # without a cap, CPU batches are limited by cores long before memory
INJECT_OOM_ENV = "BATCHGEN_INJECT_OOM"
TOKENS_PER_S_WINDOW_S = 30.0
STEP_LOG_INTERVAL_S = 30.0

log = logging.getLogger("batchgen.engine")


def _error(key: str, code: str, message: str) -> GenerationResult:
    return GenerationResult(key, error=ErrorInfo(code=code, message=message))


class _Rejected(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class LLMEngine:
    int8: Int8Runtime | None = None  # from_config's int8 kernel (its guard polls after each step)

    def __init__(self, cfg: EngineConfig, model: torch.nn.Module, tokenizer, *, device: torch.device,
                 dtype: torch.dtype, weights_bytes: int):
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {model_type!r} is not supported (supported: {sorted(SUPPORTED_MODEL_TYPES)})")
        self.cfg = cfg
        self.model_name = cfg.served_model_name or cfg.model
        self.model, self.tokenizer, self.device = model, tokenizer, device
        max_pos = model.config.max_position_embeddings
        self.max_model_len = min(cfg.max_model_len or min(max_pos, DEFAULT_MAX_MODEL_LEN), max_pos)
        window = _sliding_window(model.config)
        if window is not None:  # the runner attends to the whole row: stay inside the window, where that is exact
            self.max_model_len = min(self.max_model_len, window)
        self.eos_ids = self._eos_ids()
        self.attention = _resolve_attention(cfg.attention, device, dtype)
        self.runner = self._make_runner(model, device, dtype)
        max_prefill = cfg.max_prefill_tokens or (
            max(self.max_model_len, CUDA_MIN_PREFILL_TOKENS) if device.type == "cuda" else self.max_model_len)
        self.budget = self._plan_budget(weights_bytes, max_prefill)
        if self.budget.max_rows < 1:
            raise ValueError(f"not enough memory for one row of {self.max_model_len} tokens: {self.budget}")
        with torch.inference_mode():
            self.runner.allocate_kv(self.budget.max_rows)
            self.graph_capture_s = self.runner.capture_graphs()
        self.scheduler = Scheduler(self.budget.max_rows, max_prefill_tokens=max_prefill)
        self.step_stats = StepStats()
        self._keys: set[str] = set()
        self._last_batch = 0
        self._num_ooms = 0
        self._num_generated: deque[tuple[float, int]] = deque()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "LLMEngine":
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.compute_dtype, device)
        loaded = load_model(cfg.model, device=device, dtype=dtype, load_in_8bit=cfg.load_in_8bit,
                            int8_threshold=cfg.int8_threshold)
        int8 = None
        if cfg.load_in_8bit:  # converts the model's linears and logs the kernel
            int8 = Int8Runtime.load(loaded.model, cfg.int8_kernel, threshold=cfg.int8_threshold, device=device,
                                    tokenizer=loaded.tokenizer)
        engine = cls(cfg, loaded.model, loaded.tokenizer, device=device, dtype=dtype,
                     weights_bytes=loaded.weights_bytes)
        engine.int8 = int8
        return engine

    # -- setup ------------------------------------------------------------------------------------

    def _make_runner(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> ModelRunner:
        return ModelRunner(model, device=device, dtype=dtype, max_model_len=self.max_model_len,
                           inject_oom=self.cfg.inject_oom, attention=self.attention, cuda_graphs=self.cfg.cuda_graphs)

    def _eos_ids(self) -> frozenset[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)

    def _plan_budget(self, weights_bytes: int, max_prefill_tokens: int) -> budget_math.Budget:
        cfg, c = self.cfg, self.model.config
        parts = self.runner.parts
        kv_per_token = budget_math.kv_bytes_per_token(parts.num_layers, parts.num_kv_heads, parts.head_dim,
                                                      self.runner.kv_dtype_bytes)
        if self.device.type == "cuda":
            with torch.inference_mode():
                prefill_bytes, act_per_row = self.runner.measure_cuda(
                    num_probe_rows=min(8, cfg.max_batch_size or 8), prefill_tokens=max_prefill_tokens)
            _, free = self.runner.memory_info()
            free -= int(CUDA_ALLOCATOR_SLACK * free)  # fragmentation: the allocator never packs perfectly
            weights_bytes = torch.cuda.memory_allocated(self.device)
        else:
            act_per_row = budget_math.estimate_decode_activation_bytes(
                hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                num_heads=parts.num_heads, max_model_len=self.max_model_len, dtype_bytes=self.runner.kv_dtype_bytes)
            prefill_bytes = budget_math.estimate_prefill_bytes(
                hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_heads=parts.num_heads,
                num_tokens=max_prefill_tokens, dtype_bytes=self.runner.kv_dtype_bytes)
            free = budget_math.available_ram_bytes()
        total = budget_math.budget_bytes(free_bytes=free, reserve_bytes=cfg.vram_reserve_bytes,
                                         max_bytes=cfg.max_vram_bytes, weights_bytes=weights_bytes)
        cap = cfg.max_batch_size
        if cap is None and self.device.type != "cuda":
            cap = CPU_MAX_BATCH_SIZE
        return budget_math.plan(budget_bytes=total, kv_bytes_per_token=kv_per_token,
                                max_model_len=self.max_model_len, activation_bytes_per_row=act_per_row,
                                prefill_bytes=prefill_bytes, max_batch_size=cap)

    # -- Engine protocol ----------------------------------------------------------------------------

    def add(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        rejected = []
        for r in requests:
            try:
                seq = self._make_sequence(r)
            except _Rejected as exc:
                rejected.append(_error(r.key, exc.code, str(exc)))
            except Exception as exc:  # a poison request must not take the worker down
                rejected.append(_error(r.key, "invalid_request", f"{type(exc).__name__}: {exc}"))
            else:
                self._keys.add(r.key)
                self.scheduler.add(seq)
        return rejected

    def step(self) -> list[GenerationResult]:
        with torch.inference_mode():
            admitted = self.scheduler.admit()
            seqs = admitted or self.scheduler.running_seqs()
            if not seqs:
                self._last_batch = 0
                return []
            start = time.perf_counter()
            try:
                logits = self._forward(admitted)
                tokens = sample(logits, [s.params for s in seqs], [s.seed for s in seqs],
                                [len(s.output_ids) for s in seqs])
            except torch.OutOfMemoryError:  # torch.cuda.OutOfMemoryError is the same class
                return self._on_oom(seqs, prefill=bool(admitted))
        self.step_stats.add(time.perf_counter() - start, len(seqs),
                            sum(s.num_prompt_tokens for s in admitted) if admitted else 0)
        if self.int8 is not None:  # sampling synced: reading the outlier guard costs no GPU time
            self.int8.poll()
        self._last_batch = len(seqs)
        self._count_tokens(len(seqs))
        results = []
        for seq, token in zip(seqs, tokens, strict=True):
            result = self._append(seq, token)
            if result is not None:
                results.append(result)
        if not self.num_unfinished:  # drained: say where the time went (benchmarks read this line)
            log.info("engine steps: %s", json.dumps(self.step_stats.as_stats()))
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

    def stats(self) -> EngineStats:
        used, free = self.runner.memory_info()
        extra: dict[str, float | int | str] = dict(self.budget.as_stats())
        extra.update(max_model_len=self.max_model_len, num_ooms=self._num_ooms, device=str(self.device),
                     attention=self.attention, cuda_graphs=int(self.runner.use_graphs),
                     graph_capture_s=round(self.graph_capture_s, 2), **self.step_stats.as_stats(),
                     **(self.int8.stats() if self.int8 is not None else {}))
        return EngineStats(self.model_name, self._last_batch, self.scheduler.max_batch_size, self._tokens_per_s(),
                           self.num_unfinished, used, free, _gpu_temperature_c(self.device), extra)

    # -- internals --------------------------------------------------------------------------------

    def _make_sequence(self, r: GenerationRequest) -> Sequence:
        if r.key in self._keys:
            raise _Rejected("duplicate_key", f"request key {r.key!r} is already in the engine")
        prompt_ids = self._prompt_ids(r.request)
        params = r.request.params
        if not prompt_ids:
            raise _Rejected("invalid_prompt", "the prompt encodes to zero tokens")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise _Rejected("context_length_exceeded",
                            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                          f"model's context length of {self.max_model_len} tokens")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Sequence(r.key, prompt_ids, params, seed)

    def _prompt_ids(self, request: Request) -> list[int]:
        if request.messages is None:
            return list(self.tokenizer(request.prompt)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise _Rejected("no_chat_template", f"model {self.model_name!r} has no chat template; "
                            "send a prompt to /v1/completions instead")
        messages = [m.model_dump() for m in request.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _forward(self, admitted: list[Sequence]) -> torch.Tensor:
        if admitted:
            return self.runner.prefill([s.row for s in admitted], [s.prompt_ids for s in admitted])
        n = self.scheduler.num_decode_rows
        tokens, positions = [0] * n, [0] * n
        for seq in self.scheduler.running_seqs():
            tokens[seq.row], positions[seq.row] = seq.output_ids[-1], seq.last_position
        logits = self.runner.decode(tokens, positions)
        return logits[[s.row for s in self.scheduler.running_seqs()]]

    def _on_oom(self, seqs: list[Sequence], *, prefill: bool) -> list[GenerationResult]:
        """Free cached memory, halve the batch, restart the rows that no longer fit; at batch size 1 the
        sequences of the failed forward get an out_of_memory error instead."""
        self._num_ooms += 1
        self.runner.free_cached_memory()
        if self.scheduler.max_batch_size > 1:
            # Prefilled sequences may have half-written K/V: they start again too.
            self.scheduler.shrink(also_requeue=seqs if prefill else ())
            return []
        results = []
        for seq in seqs:
            self.scheduler.finish(seq, None)
            self._keys.discard(seq.key)
            results.append(_error(seq.key, "out_of_memory",
                                  "out of GPU memory even at batch size 1; try a shorter prompt or max_tokens"))
        return results

    def _append(self, seq: Sequence, token: int) -> GenerationResult | None:
        try:
            seq.output_ids.append(token)
            is_eos = token in self.eos_ids and not seq.params.ignore_eos
            reason = None
            if is_eos or (seq.params.stop and self._truncate_at_stop(seq)):
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                reason = "length"
            if reason is None:
                return None
            if seq.text is None:
                seq.text = self._decode(seq.output_ids[:-1] if is_eos else seq.output_ids)
            self.scheduler.finish(seq, reason)
            self._keys.discard(seq.key)
            return GenerationResult(seq.key, seq.text, reason, seq.num_prompt_tokens, len(seq.output_ids))
        except Exception as exc:  # e.g. a detokenizer error: fail this request only
            self.scheduler.finish(seq, None)
            self._keys.discard(seq.key)
            return _error(seq.key, "internal_error", f"{type(exc).__name__}: {exc}")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _truncate_at_stop(self, seq: Sequence) -> bool:
        """Sets seq.text to the output before the earliest stop string, if one has appeared."""
        # Detokenizing the whole output each step is O(n²) in the output length; fine for the usual
        # few-hundred-token outputs, incremental detokenization is the fix if stop strings get hot.
        text = self._decode(seq.output_ids)
        hits = [i for i in (text.find(s) for s in seq.params.stop if s) if i >= 0]
        if not hits:
            return False
        seq.text = text[: min(hits)]
        return True

    def _count_tokens(self, n: int) -> None:
        now = time.monotonic()
        self._num_generated.append((now, n))
        while self._num_generated and now - self._num_generated[0][0] > TOKENS_PER_S_WINDOW_S:
            self._num_generated.popleft()

    def _tokens_per_s(self) -> float:
        if len(self._num_generated) < 2:
            return 0.0
        elapsed = self._num_generated[-1][0] - self._num_generated[0][0]
        return sum(n for _, n in list(self._num_generated)[1:]) / elapsed if elapsed > 0 else 0.0


@dataclass
class StepStats:
    """Where the engine's time goes: forward + sampling per step (it ends in a host sync, so this is GPU
    time plus launch overhead); the worker's wall time minus this is queue and bookkeeping time."""

    num_prefill_steps: int = 0
    num_decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_rows: int = 0
    last_log: float = field(default_factory=time.monotonic)

    def add(self, seconds: float, num_rows: int, num_prefill_tokens: int) -> None:
        if num_prefill_tokens:
            self.num_prefill_steps += 1
            self.prefill_s += seconds
            self.num_prefill_tokens += num_prefill_tokens
        else:
            self.num_decode_steps += 1
            self.decode_s += seconds
            self.num_decode_rows += num_rows
        if time.monotonic() - self.last_log > STEP_LOG_INTERVAL_S:
            self.last_log = time.monotonic()
            log.info("engine steps: %s", json.dumps(self.as_stats()))

    def as_stats(self) -> dict[str, float | int]:
        return {
            "num_prefill_steps": self.num_prefill_steps, "num_decode_steps": self.num_decode_steps,
            "prefill_s": round(self.prefill_s, 3), "decode_s": round(self.decode_s, 3),
            "num_prefill_tokens": self.num_prefill_tokens,
            "mean_decode_batch": round(self.num_decode_rows / max(1, self.num_decode_steps), 1),
            "decode_ms_per_step": round(1000 * self.decode_s / max(1, self.num_decode_steps), 2),
        }






def _resolve_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_works(device, dtype):
        return "flash"
    return "sdpa"


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)




def _gpu_temperature_c(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    except Exception:  # no NVML (driver, container): the stat is optional
        return None
