"""One choice of a request inside the engine: its prompt tokens, its output so far, its logits processors' state,
and where it sits (pending or in a row). A request with n choices is n sequences sharing one key."""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from batchgen.jobs.schema import Choice, SamplingParams


class SeqStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprobs:
    """The raw distribution's log-probability of a sampled token, and its top alternatives (ids, logprobs)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(eq=False)
class Sequence:
    key: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # sampling noise is a pure function of (seed, output index): restarts and batch mates change nothing
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    row: int | None = None  # KV-cache row while running
    finish_reason: str | None = None
    text: str | None = None  # set on finish (truncated before a stop string when one matched)
    arrival: int = 0  # admission order into the engine; requeued sequences keep their place
    choice: int = 0  # index among the request's n choices
    gathered: dict[int, Choice] = field(default_factory=dict)  # finished choices, shared by the n siblings
    early_ban: tuple[int, ...] = ()  # EOS and stop token ids, masked while output is shorter than min_tokens
    matcher: Any = None  # structured output: the grammar matcher (xgrammar) of this row's response_format
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per output token, when params.logprobs is set
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_position(self) -> int:
        """Position of the newest token: the one the next decode step feeds in."""
        return self.num_tokens - 1

    def restart(self) -> None:
        """Back to pending with nothing generated: after an OOM the sequence is re-prefilled from scratch."""
        self.output_ids.clear()
        self.logprobs.clear()
        self.status = SeqStatus.WAITING
        self.row = None
        self.finish_reason = None
        self.text = None
        self.stop_reason = None
        if self.matcher is not None:
            self.matcher.reset()
