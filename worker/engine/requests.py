"""What turns a request into a Sequence and a finished Sequence into a result, the same on every engine path:
prompt tokens (chat template), EOS ids (generation_config may list several), stop strings, max_tokens.
"""

import random
import time
from collections import deque

from batchgen.jobs.schema import ErrorInfo, Request
from batchgen.worker.engine.protocol import GenerationRequest, GenerationResult
from batchgen.worker.engine.sequence import Sequence


class Rejected(Exception):
    """A request refused before it runs; code is the OpenAI-style error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def error_result(key: str, code: str, message: str) -> GenerationResult:
    return GenerationResult(key, error=ErrorInfo(code=code, message=message))


def eos_ids(model, tokenizer) -> frozenset[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def prompt_ids(tokenizer, request: Request, model_name: str) -> list[int]:
    if request.messages is None:
        return list(tokenizer(request.prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise Rejected("no_chat_template", f"model {model_name!r} has no chat template; "
                       "send a prompt to /v1/completions instead")
    messages = [m.model_dump() for m in request.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_sequence(r: GenerationRequest, tokenizer, *, model_name: str, max_model_len: int) -> Sequence:
    ids = prompt_ids(tokenizer, r.request, model_name)
    params = r.request.params
    if not ids:
        raise Rejected("invalid_prompt", "the prompt encodes to zero tokens")
    if len(ids) + params.max_tokens > max_model_len:
        raise Rejected("context_length_exceeded",
                       f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                       f"model's context length of {max_model_len} tokens")
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    return Sequence(r.key, ids, params, seed)


class Finisher:
    """Appends a sampled token and says whether the sequence ended (EOS, a stop string, max_tokens)."""

    def __init__(self, tokenizer, eos: frozenset[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos

    def append(self, seq: Sequence, token: int) -> str | None:
        """Returns the finish reason ("stop" | "length") and sets seq.text, or None while it runs on."""
        seq.output_ids.append(token)
        is_eos = token in self.eos_ids and not seq.params.ignore_eos
        reason = None
        if is_eos or (seq.params.stop and self._truncate_at_stop(seq)):
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is not None and seq.text is None:
            seq.text = self.decode(seq.output_ids[:-1] if is_eos else seq.output_ids)
        return reason

    def finish_step(self, seq: Sequence, token: int, scheduler, keys: set[str]) -> GenerationResult | None:
        """append(), and for an ended sequence: frees its row and key and returns its result (a detokenizer
        error fails this request only)."""
        try:
            reason = self.append(seq, token)
            if reason is None:
                return None
            scheduler.finish(seq, reason)
            keys.discard(seq.key)
            return self.result(seq, reason)
        except Exception as exc:
            scheduler.finish(seq, None)
            keys.discard(seq.key)
            return error_result(seq.key, "internal_error", f"{type(exc).__name__}: {exc}")

    def result(self, seq: Sequence, reason: str) -> GenerationResult:
        return GenerationResult(seq.key, seq.text or "", reason, seq.num_prompt_tokens, len(seq.output_ids))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _truncate_at_stop(self, seq: Sequence) -> bool:
        """Sets seq.text to the output before the earliest stop string, if one has appeared."""
        # Whole-output detokenization each step is O(n²) in the output length; fine for few-hundred-token outputs.
        text = self.decode(seq.output_ids)
        hits = [i for i in (text.find(s) for s in seq.params.stop if s) if i >= 0]
        if not hits:
            return False
        seq.text = text[: min(hits)]
        return True


class TokenRate:
    """Generated tokens per second over a sliding window: what `batchgen workers` shows."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self._counts: deque[tuple[float, int]] = deque()

    def add(self, n: int) -> None:
        now = time.monotonic()
        self._counts.append((now, n))
        while self._counts and now - self._counts[0][0] > self.window_s:
            self._counts.popleft()

    def per_s(self) -> float:
        if len(self._counts) < 2:
            return 0.0
        elapsed = self._counts[-1][0] - self._counts[0][0]
        return sum(n for _, n in list(self._counts)[1:]) / elapsed if elapsed > 0 else 0.0
