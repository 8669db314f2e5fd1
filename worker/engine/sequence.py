"""One request inside the engine: its prompt tokens, its output so far, and where it sits (pending or in a row)."""

from dataclasses import dataclass, field
from enum import StrEnum

from batchgen.jobs.schema import SamplingParams


class SeqStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


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
        self.status = SeqStatus.WAITING
        self.row = None
        self.finish_reason = None
        self.text = None
