"""What turns a request into Sequences and finished Sequences into a result, the same on every engine path:
prompt tokens (chat template), EOS ids (generation_config may list several), n choices, token-id parameters,
response_format grammars, stop strings and stop token ids, max_tokens, logprobs.
"""

import json
import random
import time
from collections import deque
from collections.abc import Iterable

from batchgen.jobs.schema import Choice, ErrorInfo, Request, SamplingParams, TokenLogprob
from batchgen.worker.engine.protocol import GenerationRequest, GenerationResult
from batchgen.worker.engine.sampler import choice_seed
from batchgen.worker.engine.sequence import SeqStatus, Sequence
from batchgen.worker.engine.structured import InvalidSchema, StructuredOutput


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
    variables = json.loads(request.chat_template_kwargs) if request.chat_template_kwargs else {}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=request.add_generation_prompt,
                                         continue_final_message=request.continue_final_message, tokenize=False,
                                         **variables)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def vocab_size_of(model) -> int:
    """Width of the logits: token ids in a request must be below it."""
    return model.config.get_text_config().vocab_size


class Intake:
    """Turns a request into its n sequences (checked against the model: context length, token ids, schema)."""

    def __init__(self, tokenizer, *, model_name: str, max_model_len: int, eos: frozenset[int], vocab_size: int):
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, model_name, max_model_len
        self.eos, self.vocab_size = eos, vocab_size
        self.structured: StructuredOutput | None = None  # built on the first response_format request

    def admit(self, requests: Iterable[GenerationRequest], keys: set[str], scheduler) -> list[GenerationResult]:
        """Both engines' add(): each request's sequences go to the scheduler, its key into keys; a request that
        cannot run comes back as an error result at once (a poison request must not take the worker down)."""
        rejected = []
        for r in requests:
            try:
                if r.key in keys:
                    raise Rejected("duplicate_key", f"request key {r.key!r} is already in the engine")
                seqs = self.sequences(r)
            except Rejected as exc:
                rejected.append(error_result(r.key, exc.code, str(exc)))
            except Exception as exc:  # noqa: BLE001
                rejected.append(error_result(r.key, "invalid_request", f"{type(exc).__name__}: {exc}"))
            else:
                keys.add(r.key)
                for seq in seqs:  # n choices: n rows, batched like any others
                    scheduler.add(seq)
        return rejected

    def sequences(self, r: GenerationRequest) -> list[Sequence]:
        ids = prompt_ids(self.tokenizer, r.request, self.model_name)
        params = r.request.params
        if not ids:
            raise Rejected("invalid_prompt", "the prompt encodes to zero tokens")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise Rejected("context_length_exceeded",
                           f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                           f"model's context length of {self.max_model_len} tokens")
        self._check_token_ids(params)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        early_ban = tuple(sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos)))
        gathered: dict[int, Choice] = {}
        return [Sequence(r.key, ids, params, choice_seed(seed, i), choice=i, gathered=gathered,
                         early_ban=early_ban if params.min_tokens else (), matcher=self._matcher(params))
                for i in range(params.n)]

    def _check_token_ids(self, params: SamplingParams) -> None:
        for field, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise Rejected("invalid_value", f"{field}: token id {bad[0]} is not below the model's vocabulary "
                                                f"size {self.vocab_size}")

    def _matcher(self, params: SamplingParams):
        if params.response_format == "text":
            return None
        if self.structured is None:
            self.structured = StructuredOutput(self.tokenizer, vocab_size=self.vocab_size, eos_ids=self.eos)
        try:
            return self.structured.matcher(params)
        except InvalidSchema as exc:
            field = {"json_schema": "response_format.json_schema"}.get(params.response_format, params.response_format)
            raise Rejected("invalid_value", f"{field}: {exc}") from None


class Finisher:
    """Appends a sampled token and says whether the sequence ended (EOS, a stop string or token id, max_tokens);
    gathers a request's n choices into one result when the last of them ends."""

    def __init__(self, tokenizer, eos: frozenset[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos

    def append(self, seq: Sequence, token: int, logprobs=None) -> str | None:
        """Returns the finish reason ("stop" | "length") and sets seq.text, or None while it runs on."""
        seq.output_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if seq.matcher is not None and not seq.matcher.is_terminated():
            seq.matcher.accept_token(token)
        params = seq.params
        may_stop = len(seq.output_ids) >= params.min_tokens  # vLLM's rule; EOS is masked before it
        is_eos = token in self.eos_ids and not params.ignore_eos
        is_stop_token = token in params.stop_token_ids and may_stop
        reason = None
        if is_eos or is_stop_token:
            reason, seq.stop_reason = "stop", token if is_stop_token and not is_eos else None
        elif params.stop and may_stop and self._truncate_at_stop(seq):
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens:
            reason = "length"
        if reason is not None and seq.text is None:  # vLLM's: the ending EOS / stop token's text only on request
            drop_last = (is_eos or is_stop_token) and not params.include_stop_str_in_output
            seq.text = self.decode(seq.output_ids[:-1] if drop_last else seq.output_ids, params)
        return reason

    def finish_step(self, seq: Sequence, token: int, scheduler, keys: set[str],
                    logprobs=None) -> GenerationResult | None:
        """append(), and for an ended sequence: frees its row; when it was the request's last choice, frees the key
        and returns the result (a detokenizer error fails this request only, its other choices included)."""
        if seq.status != SeqStatus.RUNNING:  # a sibling's failure aborted it earlier in this step
            return None
        try:
            reason = self.append(seq, token, logprobs)
            if reason is None:
                return None
            scheduler.finish(seq, reason)
            seq.gathered[seq.choice] = self.choice(seq, reason)
            if len(seq.gathered) < seq.params.n:
                return None
            keys.discard(seq.key)
            return self.result(seq)
        except Exception as exc:
            return self.fail([seq], scheduler, keys, "internal_error", f"{type(exc).__name__}: {exc}")[0]

    def fail(self, seqs: list[Sequence], scheduler, keys: set[str], code: str, message: str) -> list[GenerationResult]:
        """Ends seqs and their sibling choices; one error result per request."""
        results = []
        for seq in seqs:
            if seq.key not in keys:
                continue
            scheduler.finish(seq, None)
            scheduler.abort([seq.key])
            keys.discard(seq.key)
            results.append(error_result(seq.key, code, message))
        return results

    def result(self, seq: Sequence) -> GenerationResult:
        return GenerationResult.of_choices(seq.key, seq.num_prompt_tokens,
                                           [seq.gathered[i] for i in range(seq.params.n)])

    def choice(self, seq: Sequence, reason: str) -> Choice:
        logprobs = None
        if seq.params.logprobs is not None:
            ended_by_token = reason == "stop" and not isinstance(seq.stop_reason, str)  # EOS or a stop token id
            dropped = ended_by_token and not seq.params.include_stop_str_in_output
            kept = seq.logprobs[:-1] if dropped else seq.logprobs  # as the text: with EOS / stop token only if it is
            logprobs = tuple(self._token_logprob(seq.output_ids[i], lp) for i, lp in enumerate(kept))
        return Choice(seq.text or "", reason, seq.stop_reason, len(seq.output_ids), logprobs)

    def decode(self, ids: list[int], params: SamplingParams) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    def _token_logprob(self, token: int, lp) -> TokenLogprob:
        return TokenLogprob(self.tokenizer.decode([token]), lp.logprob,
                            tuple((self.tokenizer.decode([t]), v) for t, v in zip(lp.top_ids, lp.top_logprobs,
                                                                                  strict=True)))

    def _truncate_at_stop(self, seq: Sequence) -> bool:
        """Sets seq.text to the output before the earliest stop string, if one has appeared. As vLLM's, one that
        ends within the text of the first min_tokens tokens (their whole characters) does not count."""
        # Whole-output detokenization each step is O(n²) in the output length; fine for few-hundred-token outputs.
        params = seq.params
        text = self.decode(seq.output_ids, params)
        floor = 0  # a stop string must end after this many characters of text
        if params.min_tokens:
            floor = len(self.decode(seq.output_ids[:params.min_tokens], params).rstrip("\ufffd"))
        hits = [(i, s) for s in params.stop if s and (i := text.find(s, max(0, floor - len(s) + 1))) >= 0]
        if not hits:
            return False
        index, seq.stop_reason = min(hits)
        seq.text = text[:index + len(seq.stop_reason) if params.include_stop_str_in_output else index]
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
        """Up to now: an idle worker's rate falls as its last tokens leave the window (it held the last rate)."""
        now = time.monotonic()
        counts = [(t, n) for t, n in list(self._counts) if now - t <= self.window_s]  # a copy: heartbeats read it
        if len(counts) < 2:
            return 0.0
        elapsed = now - counts[0][0]
        return sum(n for _, n in counts[1:]) / elapsed if elapsed > 0 else 0.0
