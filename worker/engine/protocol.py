"""The engine interface the worker loop drives, and the two engines: `llm` (the model) and `echo`.

The loop is nano-vllm's: add requests, call step() until nothing is unfinished; each step returns
the requests that finished in it, so results are written as they finish. `num_wanted` tells the
loop how many more requests the engine could admit now: the refill signal that lets finished rows
be replaced by requests from the next chunk.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from batchgen.jobs.schema import Choice, ErrorInfo, Request


@dataclass
class GenerationRequest:
    key: str  # unique across everything in the engine, e.g. "<batch_id>:<index>"
    request: Request


@dataclass
class GenerationResult:
    """A finished request. text and finish_reason are choice 0's; completion_tokens counts every choice's."""

    key: str
    text: str = ""
    finish_reason: str = "length"  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ErrorInfo | None = None  # a per-request failure (poison request); the rest carry on
    choices: list[Choice] = field(default_factory=list)  # all n, in index order (engines without them: none)
    embeddings: list[bytes] = field(default_factory=list)  # an embeddings request's vectors: float32, little-endian

    @classmethod
    def of_choices(cls, key: str, prompt_tokens: int, choices: list[Choice]) -> "GenerationResult":
        first = choices[0]
        return cls(key, first.text, first.finish_reason, prompt_tokens, sum(c.num_tokens for c in choices),
                   choices=choices)


@dataclass
class EngineStats:
    """What `batchgen workers` shows for a live worker."""

    model: str
    batch_size: int = 0  # rows in the last step
    max_batch_size: int = 0  # current cap from the VRAM budget
    tokens_per_s: float = 0.0
    num_unfinished: int = 0
    vram_used_bytes: int = 0
    vram_free_bytes: int = 0
    gpu_temperature_c: int | None = None
    extra: dict[str, float | int | str | dict] = field(default_factory=dict)  # StepStats' host phases are dicts


class Engine(Protocol):
    model_name: str

    def add(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        """Queues requests; returns at once the ones rejected before running (their error set)."""
        ...

    def step(self) -> list[GenerationResult]:
        """Runs one scheduling step; returns the requests that finished in it."""
        ...

    def abort(self, keys: Iterable[str]) -> None:
        """Drops requests (cancelled batch); no result is returned for them."""
        ...

    @property
    def num_unfinished(self) -> int: ...

    @property
    def num_wanted(self) -> int:
        """How many more requests the engine could use right now (free rows + a small pending pool)."""
        ...

    @property
    def next_step_is_full(self) -> bool:
        """Whether the pending requests already fill the next step: the loop then claims one chunk a turn, between
        steps, instead of all it wants before one."""
        ...

    def stats(self) -> EngineStats: ...
