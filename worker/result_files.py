"""Result files on disk: `<batch_id>.output.jsonl` and `<batch_id>.errors.jsonl` in the batch's output dir.

Each line goes out in one O_APPEND write, so a crash leaves no torn line, and only after Redis
accepted the outcome (HSETNX), so a line is written at most once. Redis stays the source of truth:
`batchgen results` exports the complete set from there. `batchgen run` (no Redis) writes its two files
through a LineSink, in input order by default.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from batchgen.jobs.schema import outcome_of


def result_paths(output_dir: str | Path, batch_id: str) -> tuple[Path, Path]:
    out = Path(output_dir)
    return out / f"{batch_id}.output.jsonl", out / f"{batch_id}.errors.jsonl"


def append_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _jsonl(lines)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _jsonl(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n" for line in lines)


def write_lines(target: Path | TextIO, lines: list[dict[str, Any]]) -> None:
    """A file gets whole-line appends; a stream (`run -o -`) gets the lines flushed at once, for a reader piping them."""
    if isinstance(target, Path):
        append_lines(target, lines)
    elif lines:
        target.write(_jsonl(lines))
        target.flush()


View = Callable[[dict[str, Any]], dict[str, Any]]  # a stored line as it leaves us (message_batch.result_view)


def write_results(output_dir: str | Path, batch_id: str, lines: list[dict[str, Any]], view: View) -> None:
    ok_path, err_path = result_paths(output_dir, batch_id)
    ok, failed = split_lines(lines)
    append_lines(ok_path, list(map(view, ok)))
    append_lines(err_path, list(map(view, failed)))


def split_lines(lines: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(successes, failures): a failed request answers with a non-200 response or a batch-level error."""
    ok = [line for line in lines if outcome_of(line) == "succeeded"]
    return ok, [line for line in lines if outcome_of(line) != "succeeded"]


class LineSink:
    """`batchgen run`'s two files, created (truncated) up front so both exist even when one stays empty;
    either may be a stream instead (stdout, for `-o -`).

    Ordered (vLLM's run-batch order): a line waits until every line before it in the input is written,
    so memory holds only the lines that finished ahead of a slower one. Unordered: lines go out as they finish.
    """

    def __init__(self, output: Path | TextIO, errors: Path | TextIO, ordered: bool, view: View):
        self.output, self.errors, self.ordered, self.view = output, errors, ordered, view
        # one file however the two are spelled (relative and absolute, through a symlink): one stream of lines
        self.one_file = output is errors or (isinstance(output, Path) and isinstance(errors, Path)
                                             and output.resolve() == errors.resolve())
        self.held: dict[int, dict[str, Any]] = {}
        self.next_position = 0
        for path in {output, errors}:
            if isinstance(path, Path):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("")

    def put(self, lines: list[tuple[int, dict[str, Any]]]) -> None:
        """(input position, output line) pairs; positions count from 0 over every input line, valid or not."""
        if not self.ordered:
            self._write([line for _, line in lines])
            return
        self.held.update(lines)
        ready = []
        while self.next_position in self.held:
            ready.append(self.held.pop(self.next_position))
            self.next_position += 1
        self._write(ready)

    def close(self) -> None:
        """Writes what is still held (a position that never finished must not hide the lines after it)."""
        self._write([self.held[p] for p in sorted(self.held)])
        self.held.clear()

    def _write(self, lines: list[dict[str, Any]]) -> None:
        if self.one_file:  # keep the lines' own order
            write_lines(self.output, list(map(self.view, lines)))
            return
        ok, failed = split_lines(lines)
        write_lines(self.output, list(map(self.view, ok)))
        write_lines(self.errors, list(map(self.view, failed)))
