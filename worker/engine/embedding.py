"""The embedding engine: /v1/embeddings on a base model (transformers' AutoModel, no LM head) loaded in 8-bit.

A request's inputs wait as separate rows; each step the planner (embed_planner.py) picks the oldest and the inputs
nearest its length within a token budget, one right-padded forward embeds them, the pooling (pooling.py) makes
one vector per row, and a request is answered once all its inputs are. An OOM halves the budget and retries.
"""

import inspect
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from batchgen.jobs.schema import EMBEDDINGS_URL, ErrorInfo, Request
from batchgen.worker.engine.config import EngineConfig, kv_cache_quantised
from batchgen.worker.engine.embed_planner import plan
from batchgen.worker.engine.loader import load_weights, resolve_device, resolve_dtype, weights_bytes
from batchgen.worker.engine.pooling import Pooling, normalise, pool, read_pooling
from batchgen.worker.engine.protocol import EngineStats, GenerationRequest, GenerationResult
from batchgen.worker.engine.requests import TokenRate
from batchgen.worker.engine.setup import CPU_MAX_BATCH_SIZE
from batchgen.worker.engine.task import is_decoder_only

CUDA_MAX_ROWS = 256
# Padded tokens (rows x longest input) per forward when --max-prefill-tokens is not given: activations only, no
# KV cache, so a forward may take many; on the CPU cores bound it long before memory does.
CUDA_MAX_BATCH_TOKENS = 16384
CPU_MAX_BATCH_TOKENS = 2048
DEFAULT_MAX_MODEL_LEN = 8192  # OpenAI's limit per input, for a config that names no positions
PLAN_WINDOW_ROWS = 8  # the planner looks this many max_rows deep into the waiting inputs
TOKENS_PER_S_WINDOW_S = 30.0
# Position ids of these encoders start after the padding index: pad_token_id + 1 of their positions never hold a token
OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                              "data2vec-text", "mpnet"})

log = logging.getLogger("batchgen.engine")


class Refused(Exception):
    """A request this model cannot answer; code is the error line's code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Input:
    """One text of a request: a row of some forward."""

    key: str
    index: int
    ids: list[int]


@dataclass
class Open:
    """A request some of whose inputs are not embedded yet."""

    request: Request
    vectors: list[bytes | None]
    num_tokens: int

    @property
    def done(self) -> bool:
        return all(v is not None for v in self.vectors)


class EmbeddingEngine:
    def __init__(self, cfg: EngineConfig, model: torch.nn.Module, tokenizer, pooling: Pooling, *,
                 device: torch.device, dtype: torch.dtype, weights_bytes: int):
        self.cfg, self.model, self.tokenizer, self.pooling = cfg, model, tokenizer, pooling
        self.device, self.dtype, self.weights_bytes = device, dtype, weights_bytes
        self.model_name = cfg.served_model_name or cfg.model
        config = model.config.get_text_config()
        self.max_model_len = max_input_tokens(cfg, config, pooling)
        self.num_dimensions = config.hidden_size
        self.matryoshka = matryoshka_dimensions(config)
        cuda = device.type == "cuda"
        self.max_rows = cfg.max_batch_size or (CUDA_MAX_ROWS if cuda else CPU_MAX_BATCH_SIZE)
        self.max_batch_tokens = cfg.max_prefill_tokens or (CUDA_MAX_BATCH_TOKENS if cuda else CPU_MAX_BATCH_TOKENS)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad or 0  # padded positions are masked: any id in the vocabulary will do
        takes = inspect.signature(model.forward).parameters
        self.forward_kwargs = {"use_cache": False} if "use_cache" in takes else {}  # no K/V kept for one forward
        self.waiting: list[Input] = []
        self.open: dict[str, Open] = {}
        self._last_batch = 0
        self._num_ooms = 0
        self._rate = TokenRate(TOKENS_PER_S_WINDOW_S)

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "EmbeddingEngine":
        from batchgen.worker.engine.families import read_config
        from transformers import AutoModel, AutoTokenizer

        refuse_generation_flags(cfg)
        config = read_config(cfg.model)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"model {cfg.model!r} ({config.model_type}) is an encoder-decoder: embeddings run "
                             "encoder-only or decoder-only models")
        pooling = read_pooling(cfg.model, is_decoder_only(config))
        log.info("embeddings: %s pooling, from %s; vectors L2-normalised", pooling.mode, pooling.why)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.compute_dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        model = load_weights(AutoModel, cfg.model, device=device, dtype=dtype, load_in_8bit=cfg.load_in_8bit,
                             int8_threshold=cfg.int8_threshold, skip=list(cfg.fp16_modules) or None)
        return cls(cfg, model, tokenizer, pooling, device=device, dtype=dtype, weights_bytes=weights_bytes(model))

    # -- Engine protocol ----------------------------------------------------------------------------

    def add(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        """Tokenizes each request's inputs; one that cannot run comes back at once as an error result."""
        rejected = []
        for r in requests:
            try:
                inputs = self._inputs(r)
            except Refused as exc:
                rejected.append(_error(r.key, exc.code, str(exc)))
            except Exception as exc:  # noqa: BLE001 - a poison request must not take the worker down
                rejected.append(_error(r.key, "invalid_request", f"{type(exc).__name__}: {exc}"))
            else:
                self.open[r.key] = Open(r.request, [None] * len(inputs), sum(len(i.ids) for i in inputs))
                self.waiting.extend(inputs)
        return rejected

    def step(self) -> list[GenerationResult]:
        window = self.waiting[:PLAN_WINDOW_ROWS * self.max_rows]
        rows = [window[i] for i in plan([len(x.ids) for x in window], max_tokens=self.max_batch_tokens,
                                        max_rows=self.max_rows)]
        if not rows:
            self._last_batch = 0
            return []
        try:
            vectors = self._embed(rows)
        except torch.OutOfMemoryError:
            return self._on_oom(rows)
        except Exception as exc:  # noqa: BLE001 - these rows' requests fail; the worker and other requests go on
            log.exception("embedding forward failed for %d rows", len(rows))
            return self._fail({x.key for x in rows}, "internal_error", f"{type(exc).__name__}: {exc}")
        taken = {id(x) for x in rows}
        self.waiting = [x for x in self.waiting if id(x) not in taken]
        self._last_batch = len(rows)
        self._rate.add(sum(len(x.ids) for x in rows))
        results = []
        for x, vector in zip(rows, vectors, strict=True):
            request = self.open[x.key]
            request.vectors[x.index] = vector
            if request.done:
                del self.open[x.key]
                results.append(GenerationResult(x.key, prompt_tokens=request.num_tokens,
                                                embeddings=list(request.vectors)))
        return results

    def abort(self, keys: Iterable[str]) -> None:
        keys = set(keys)
        self.waiting = [x for x in self.waiting if x.key not in keys]
        for key in keys:
            self.open.pop(key, None)

    @property
    def num_unfinished(self) -> int:
        return len(self.open)

    @property
    def num_wanted(self) -> int:
        return max(0, 2 * self.max_rows - len(self.waiting))

    @property
    def next_step_is_full(self) -> bool:
        return len(self.waiting) >= self.max_rows

    def stats(self) -> EngineStats:
        used, free = 0, 0
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
        extra: dict[str, float | int | str | dict] = {
            "engine_path": "embed (AutoModel, no LM head)", "task": "embed", "device": str(self.device),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "int8_kernel": "bnb" if self.cfg.load_in_8bit else "none (not 8-bit)", "pooling": self.pooling.describe(),
            "max_model_len": self.max_model_len, "max_rows": self.max_rows, "max_batch_tokens": self.max_batch_tokens,
            "num_dimensions": self.num_dimensions, "num_ooms": self._num_ooms, "weights_bytes": self.weights_bytes}
        return EngineStats(self.model_name, self._last_batch, self.max_rows, self._rate.per_s(), self.num_unfinished,
                           used, free, None, extra)

    # -- internals --------------------------------------------------------------------------------

    def _inputs(self, r: GenerationRequest) -> list[Input]:
        request = r.request
        if r.key in self.open:
            raise Refused("duplicate_key", f"request key {r.key!r} is already in the engine")
        if request.url != EMBEDDINGS_URL or request.inputs is None:
            raise Refused("unsupported_endpoint", f"{request.url} is not an embeddings request")
        self._check_dimensions(request.dimensions)
        texts = [t.lower() for t in request.inputs] if self.pooling.lowercase else list(request.inputs)
        inputs = []
        for i, ids in enumerate(self.tokenizer(texts)["input_ids"]):
            if not ids:
                raise Refused("invalid_prompt", f"input {i} encodes to zero tokens")
            if len(ids) > self.max_model_len:
                raise Refused("context_length_exceeded", f"input {i} ({len(ids)} tokens) exceeds the model's "
                                                         f"context length of {self.max_model_len} tokens")
            inputs.append(Input(r.key, i, list(ids)))
        return inputs

    def _check_dimensions(self, dimensions: int | None) -> None:
        """Shortening a vector keeps its meaning only for models trained to (matryoshka), as vLLM allows it; the
        full length is no shortening, so any model takes it."""
        if dimensions is None or dimensions == self.num_dimensions:
            return
        if dimensions > self.num_dimensions:
            raise Refused("invalid_value", f"dimensions: must be <= {self.num_dimensions}, the model's vector length")
        if self.matryoshka is None:
            raise Refused("unsupported_parameter", f"dimensions: model {self.model_name!r} does not declare matryoshka "
                          "embeddings (config.json is_matryoshka or matryoshka_dimensions), so its vectors are not "
                          "shortened")
        if self.matryoshka and dimensions not in self.matryoshka:
            raise Refused("invalid_value", f"dimensions: must be one of {list(self.matryoshka)} for this model")

    @torch.inference_mode()
    def _embed(self, rows: list[Input]) -> list[bytes]:
        """One right-padded forward; each row's pooled vector, cut to its request's dimensions and L2-normalised,
        as little-endian float32 bytes."""
        longest = max(len(x.ids) for x in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, x in enumerate(rows):
            ids[row, :len(x.ids)] = torch.tensor(x.ids)
            mask[row, :len(x.ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        start = time.perf_counter()
        hidden = self.model(input_ids=ids, attention_mask=mask, **self.forward_kwargs).last_hidden_state
        pooled = pool(hidden, mask, self.pooling.mode).cpu()
        log.debug("embedded %d rows of up to %d tokens in %.3f s", len(rows), longest, time.perf_counter() - start)
        out = []
        for row, x in enumerate(rows):
            vector = pooled[row, :self.open[x.key].request.dimensions or self.num_dimensions]
            out.append(normalise(vector).numpy().astype("<f4", copy=False).tobytes())
        return out

    def _on_oom(self, rows: list[Input]) -> list[GenerationResult]:
        """Halves the token budget and leaves the rows waiting; a row too big to run alone fails its request."""
        self._num_ooms += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        longest = max(len(x.ids) for x in rows)
        if len(rows) > 1:
            self.max_batch_tokens = max(longest, self.max_batch_tokens // 2)
            log.warning("out of memory embedding %d rows: the token budget is now %d", len(rows), self.max_batch_tokens)
            return []
        return self._fail({rows[0].key}, "out_of_memory", f"out of memory embedding one input of {longest} tokens")

    def _fail(self, keys: set[str], code: str, message: str) -> list[GenerationResult]:
        self.abort(keys)
        return [_error(key, code, message) for key in sorted(keys)]


def refuse_generation_flags(cfg: EngineConfig) -> None:
    """Flags of the generation engines that would silently do nothing here."""
    for flag, on in (("--max-vram", cfg.max_vram_bytes is not None), ("--stream-kv", cfg.stream_kv),
                     ("--kv-cache-dtype", kv_cache_quantised(cfg.kv_cache_dtype))):
        if on:
            raise ValueError(f"{flag} is for generation: the embedding engine keeps the model resident and no KV cache")


def max_input_tokens(cfg: EngineConfig, config, pooling: Pooling) -> int:
    """The longest input a row takes: the model's positions, within --max-model-len and sentence-transformers'
    max_seq_length (vLLM caps at it too)."""
    positions = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                 or DEFAULT_MAX_MODEL_LEN)
    if config.model_type in OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    return min(n for n in (positions, cfg.max_model_len, pooling.max_seq_length) if n)


def matryoshka_dimensions(config) -> tuple[int, ...] | None:
    """The lengths the model's vectors may be cut to, from the config fields vLLM reads: () any, None none."""
    dimensions = getattr(config, "matryoshka_dimensions", None)
    if dimensions:
        return tuple(int(d) for d in dimensions)
    return () if getattr(config, "is_matryoshka", False) else None


def _error(key: str, code: str, message: str) -> GenerationResult:
    return GenerationResult(key, error=ErrorInfo(code=code, message=message))
