"""`batchgen run`: one batch in-process, no Redis, same engine and output lines as the queue path.

Reading and validating come first (`read_local`, no engine needed), so a rejected file costs no model load.
"""

import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from batchgen.jobs.batch import Batch
from batchgen.jobs.inputs import (
    InputLimits,
    ModelResolver,
    ParamDefaults,
    invalid_output_line,
    read_inputs,
    validate_batch,
)
from batchgen.jobs.message_batch import result_view
from batchgen.jobs.schema import Request, outcome_of
from batchgen.jobs.states import BatchStatus
from batchgen.worker.engine.protocol import Engine, GenerationRequest
from batchgen.worker.result_files import LineSink
from batchgen.worker.worker import InFlight, result_line
from tqdm import tqdm

STDOUT = "-"  # -o - / --errors -: the lines go to stdout, as `batchgen results -o -` writes them


@dataclass
class LocalBatch:
    """A run's validated input: the requests and the rejected lines, each at its input position."""

    requests: list[tuple[int, Request]] = field(default_factory=list)
    invalid: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # one "source:line: code: message" per rejected line
    num_overridden: int = 0  # lines whose body.model --model replaced

    @property
    def total(self) -> int:
        return len(self.requests) + len(self.invalid)

    def summary(self, output: str) -> dict[str, Any]:
        return {"total": self.total, "invalid": len(self.invalid), "errors": self.messages, "succeeded": 0,
                "errored": 0, "output": output, "model_overridden": self.num_overridden}


def read_local(inputs: Sequence[str], *, model: str, params: ParamDefaults, limits: InputLimits) -> LocalBatch:
    """Every input line validated exactly as `submit` validates it."""
    local = LocalBatch()
    resolver = ModelResolver(model)
    for position, parsed in enumerate(validate_batch(read_inputs(inputs, defaults=params, limits=limits), resolver)):
        if parsed.error is not None:
            local.messages.append(f"{parsed.source}:{parsed.line}: {parsed.error.code}: {parsed.error.message}")
            local.invalid.append((position, invalid_output_line(parsed)))
        else:
            assert parsed.request is not None
            local.requests.append((position, parsed.request))
    local.num_overridden = resolver.num_overridden
    return local


def check_writable(paths: Sequence[str | None]) -> None:
    """Opens each output file as LineSink will, so an unwritable -o fails before the model loads (OSError)."""
    for path in map(Path, (p for p in paths if p and p != STDOUT)):
        existed = path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
        if not existed:  # only a test: a run that fails to load its model leaves no empty file behind
            path.resolve().unlink()  # the file created, not a symlink naming it


@contextmanager
def results_stdout() -> Iterator[TextIO]:
    """A stream on the process's stdout for the result lines, with file descriptor 1 pointed at stderr meanwhile:
    whatever else writes to stdout (a library's print, a compiler's output) cannot mix with the JSON lines."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        yield stream
    finally:
        stream.flush()
        sys.stdout.flush()
        os.dup2(stream.fileno(), 1)
        stream.close()


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM (kill, timeout, docker stop) ends the run as ctrl-C does, through run_local's cleanup, so the
    finished lines held for input order are written; the exit status stays 128 + SIGTERM."""

    def exit_now(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local(local: LocalBatch, output: str, errors: str | None, engine: Engine, *, model: str,
              ordered: bool = True, progress: bool = True, stdout: TextIO | None = None) -> dict[str, Any]:
    """Generates every request of local and writes its lines (the rejected ones too, at their positions);
    an output or errors of STDOUT goes to the stream stdout."""
    summary = local.summary(output)

    def target(path: str) -> Path | TextIO:
        return (stdout or sys.stdout) if path == STDOUT else Path(path)

    endpoint = ",".join(sorted({request.url for _, request in local.requests}))  # as submit records it
    sink = LineSink(target(output), target(errors or output), ordered=ordered, view=result_view(endpoint))
    sink.put(local.invalid)
    summary["errored"] = len(local.invalid)
    batch = Batch(id="local", status=BatchStatus.IN_PROGRESS, model=model)
    flights = {str(pos): InFlight(batch, pos, request, "local") for pos, request in local.requests}
    pending = [GenerationRequest(str(pos), request) for pos, request in reversed(local.requests)]
    bar = tqdm(total=len(local.requests), unit="req", disable=not progress)
    start = time.monotonic()
    try:
        while pending or engine.num_unfinished:
            take = max(engine.num_wanted, 0 if engine.num_unfinished else 1)
            batch_in = [pending.pop() for _ in range(min(take, len(pending)))]
            results = engine.add(batch_in) if batch_in else []
            if engine.num_unfinished:
                results += engine.step()
            lines = [(flights[r.key].index, result_line(flights[r.key], r)) for r in results]
            sink.put(lines)
            num_ok = sum(1 for _, line in lines if outcome_of(line) == "succeeded")
            summary["succeeded"] += num_ok
            summary["errored"] += len(lines) - num_ok
            bar.update(len(lines))
    finally:  # ctrl-C or a failing step: the finished lines held behind an unfinished one are still written
        bar.close()
        sink.close()
    summary["generate_s"] = round(time.monotonic() - start, 3)  # elapsed_s less the model's load
    return summary
