"""The echo engine: a real Engine with no model. It answers each prompt with its own words, up to
max_tokens of them (as each of n choices, in the LLM engines' result shape), so queue tests, chaos runs and the
queue benchmark run in milliseconds.
"""

import time
from collections import OrderedDict
from collections.abc import Iterable

from batchgen.jobs.schema import Choice, ErrorInfo
from batchgen.worker.engine.protocol import EngineStats, GenerationRequest, GenerationResult


def echo_text(prompt: str, max_tokens: int) -> tuple[str, str]:
    words = prompt.split()
    return " ".join(words[:max_tokens]), ("length" if len(words) > max_tokens else "stop")


class EchoEngine:
    def __init__(self, model_name: str = "echo", max_batch_size: int = 64, step_delay_s: float = 0.0):
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.step_delay_s = step_delay_s  # simulates GPU time per step
        self._pending: OrderedDict[str, GenerationRequest] = OrderedDict()
        self._last_batch = 0
        self._tokens = 0
        self._started = time.monotonic()

    def add(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        rejected = []
        for r in requests:
            if r.request.prompt is not None and "\x00" in r.request.prompt:
                rejected.append(GenerationResult(r.key, error=ErrorInfo(code="invalid_prompt",
                                                                        message="prompt contains NUL")))
            else:
                self._pending[r.key] = r
        return rejected

    def step(self) -> list[GenerationResult]:
        keys = list(self._pending)[: self.max_batch_size]
        self._last_batch = len(keys)
        if self.step_delay_s and keys:
            time.sleep(self.step_delay_s)
        results = []
        for k in keys:
            req = self._pending.pop(k).request
            prompt = req.prompt if req.prompt is not None else "\n".join(m.content for m in req.messages or ())
            text, reason = echo_text(prompt, req.params.max_tokens)
            choices = [Choice(text, reason, num_tokens=len(text.split())) for _ in range(req.params.n)]
            result = GenerationResult.of_choices(k, len(prompt.split()), choices)
            self._tokens += result.completion_tokens
            results.append(result)
        return results

    def abort(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._pending.pop(k, None)

    @property
    def num_unfinished(self) -> int:
        return len(self._pending)

    @property
    def num_wanted(self) -> int:
        return max(0, 2 * self.max_batch_size - len(self._pending))

    @property
    def next_step_is_full(self) -> bool:
        return len(self._pending) >= self.max_batch_size

    def stats(self) -> EngineStats:
        elapsed = max(1e-9, time.monotonic() - self._started)
        return EngineStats(self.model_name, self._last_batch, self.max_batch_size, self._tokens / elapsed,
                           len(self._pending))
