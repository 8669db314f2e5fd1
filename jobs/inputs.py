"""Read every input the CLI accepts as one stream of validated lines.

Inputs can be far larger than memory, so files are read in binary one bounded line at a time and
decoded per line: a bad byte or an over-long line costs one error, never the whole file, and only the
set of seen custom_ids grows with the input. Every problem, including whole-input ones (empty input,
too many requests), arrives as a ParsedLine with an error, so the CLI reports all of them one way.

Formats, chosen per path: "-" is stdin; a directory holds one prompt per *.txt file; .jsonl/.json/
.ndjson files hold OpenAI batch lines or simple lines; .txt files hold one prompt per line; any other
file is JSONL when its first non-blank line starts a JSON object or array, else text (as stdin).
"""

import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO

from batchgen.jobs import defaults as limits_default
from batchgen.jobs import formats, input_paths, strict_json
from batchgen.jobs.formats import LineError, identity, object_request, prompt_request, pydantic_error
from batchgen.jobs.schema import ErrorInfo, Request, SamplingParams, error_line
from pydantic import ValidationError

BOM = b"\xef\xbb\xbf"
JSONL_SUFFIXES = frozenset({".jsonl", ".json", ".ndjson"})
TEXT_SUFFIXES = frozenset({".txt"})
SKIP_CHUNK_BYTES = 1 << 16
log = logging.getLogger("batchgen.inputs")
LINE_NUMBER = "its line number"  # ParsedLine.default_id: where a custom_id the line did not set came from
FILE_NAME = "its file name"
PARAM = re.compile(r"([A-Za-z_][\w]*(?:\.[\w]+)*): ")  # formats.py's messages start with the field at fault


@dataclass(frozen=True)
class InputLimits:
    max_requests: int = limits_default.MAX_REQUESTS_PER_BATCH
    max_line_bytes: int = limits_default.MAX_LINE_BYTES
    max_tokens: int = limits_default.MAX_TOKENS_LIMIT


@dataclass(frozen=True)
class ParamDefaults:
    """Sampling values from CLI flags; they fill only what a line omits.

    Validated here, so a bad flag fails once up front instead of once per line.
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        try:
            SamplingParams.model_validate(self.fill(), strict=True)
        except ValidationError as exc:
            flag, problem = pydantic_error(exc, "--").message.split(":", 1)
            raise ValueError(f"{flag.replace('_', '-')}:{problem}") from None

    def fill(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if value is not None}


@dataclass(frozen=True)
class ParsedLine:
    """One input line: exactly one of request and error is set."""

    source: str  # file path, or "-" for stdin
    line: int  # 1-based line number in source; 1 for a .txt file of a directory; 0 for whole-input errors
    request: Request | None
    error: ErrorInfo | None
    custom_id: str  # the line's custom_id, else its default id, else "line-N" when unreadable
    model: str | None = None  # body.model, when the line names one
    ignored: tuple[str, ...] = ()  # accepted fields without effect here (formats.IGNORED_KEYS) that the line sets
    default_id: str | None = None  # how custom_id was derived ("its line number") when the line set none
    result_id: str | None = None  # the custom_id its error line carries when an earlier line owns custom_id

    @property
    def ok(self) -> bool:
        return self.error is None


NO_DEFAULTS = ParamDefaults()
DEFAULT_LIMITS = InputLimits()


def read_inputs(
    paths: Sequence[str],
    *,
    defaults: ParamDefaults = NO_DEFAULTS,
    limits: InputLimits = DEFAULT_LIMITS,
    stdin: BinaryIO | None = None,
) -> Iterator[ParsedLine]:
    """Yield one ParsedLine per non-blank input line, in input order, across all paths.

    Stops after the first line over limits.max_requests (reported as too_many_requests).
    """
    if not paths:
        yield _whole_input_error("-", "empty_input", "no input given")
        return
    seen: dict[str, ParsedLine] = {}
    num_lines = 0
    paths = input_paths.unique_paths(paths)  # "d" and "d/" must not submit the same prompts twice
    for path, prefix in zip(paths, _id_prefixes(paths), strict=True):
        ctx = _Context(path, prefix, defaults.fill(), limits)
        num_in_source = 0
        for parsed in _read_path(ctx, stdin):
            num_lines += 1
            num_in_source += 1
            if num_lines > limits.max_requests:
                msg = f"more than {limits.max_requests} requests; split the input into several batches"
                error = ErrorInfo(code="too_many_requests", message=msg, line=parsed.line)
                yield _check_duplicate(ParsedLine(parsed.source, parsed.line, None, error, parsed.custom_id,
                                                  parsed.model), seen, ctx.unreadable_id(parsed.line))
                return
            yield _check_duplicate(parsed, seen, ctx.unreadable_id(parsed.line))
        if num_in_source == 0:
            empty = _whole_input_error(path, "empty_input", f"{path}: no requests (empty input)")
            yield _check_duplicate(empty, seen, empty.custom_id)


class ModelResolver:
    """One batch runs one model: --model wins; otherwise every line must name the same one."""

    def __init__(self, cli_model: str | None) -> None:
        self.cli_model = cli_model
        self._first: tuple[str, str, int] | None = None  # model, source, line
        self.num_overridden = 0  # valid lines whose body.model --model replaced

    @property
    def model(self) -> str | None:
        return self.cli_model or (self._first[0] if self._first else None)

    def see(self, parsed: ParsedLine) -> ErrorInfo | None:
        """An error when this line names a different model than the first line that named one."""
        if parsed.model is None or parsed.error is not None:
            return None  # an invalid line's model must not become the batch's model
        if self.cli_model:
            self.num_overridden += int(parsed.model != self.cli_model)
            return None
        if self._first is None:
            self._first = (parsed.model, parsed.source, parsed.line)
            return None
        first, source, line = self._first
        if parsed.model == first:
            return None
        where = f"line {line}" if source == parsed.source else f"{source} line {line}"
        msg = (f"body.model: {parsed.model!r} differs from {first!r} ({where}); "
               "a batch runs one model (pass --model to override the lines)")
        return ErrorInfo(code="mixed_models", message=msg, line=parsed.line, param="body.model")


def validate_batch(lines: Iterable[ParsedLine], resolver: ModelResolver) -> Iterator[ParsedLine]:
    """The lines with the batch-level check added (one model a batch); submit and run share it, so both
    accept exactly the same inputs. A line that fails it comes back as an error line."""
    ignored: Counter[str] = Counter()
    for parsed in lines:
        error = parsed.error or resolver.see(parsed)
        if error is parsed.error:
            ignored.update(parsed.ignored if error is None else ())
            yield parsed
        else:
            yield ParsedLine(parsed.source, parsed.line, None, error, parsed.custom_id, parsed.model)
    if ignored:  # accepted for OpenAI compatibility, but the user should know they change nothing here
        shown = ", ".join(f"{key} ({n} line{'s' if n > 1 else ''})" for key, n in sorted(ignored.items()))
        log.warning("ignored (no effect on generation): %s", shown)
    if resolver.num_overridden:  # a user moving a file between models should hear that its lines were rewritten
        log.warning("--model %s overrides body.model on %d line(s)", resolver.cli_model, resolver.num_overridden)


def invalid_output_line(parsed: ParsedLine) -> dict[str, Any]:
    """The output error line of an invalid input line (what --skip-invalid writes and `run` reports); one whose
    custom_id an earlier line owns is named by its result_id (its message names the custom_id)."""
    assert parsed.error is not None
    return error_line(parsed.result_id or parsed.custom_id, parsed.error.code,
                      f"line {parsed.line}: {parsed.error.message}", param=parsed.error.param)


def param_of(message: str) -> str | None:
    """The field a line error names ("body.top_p: must be <= 1" -> "body.top_p"); None when it names none."""
    match = PARAM.match(message)
    return match[1] if match else None


@dataclass(frozen=True)
class _Context:
    source: str
    prefix: str  # prepended to generated custom_ids so that several inputs stay unique
    fill: dict[str, Any] = field(repr=False)
    limits: InputLimits

    def default_id(self, n: int) -> str:
        return f"{self.prefix}{n}"

    def unreadable_id(self, n: int) -> str:
        return f"{self.prefix}line-{n}"


def _id_prefixes(paths: Sequence[str]) -> list[str]:
    """No prefix for one input; else the file name, or the path as given when file names collide."""
    if len(paths) == 1:
        return [""]
    names = ["stdin" if p == "-" else Path(p).name or p for p in paths]
    if len(set(names)) < len(names):
        names = ["stdin" if p == "-" else p for p in paths]
    return [f"{name}:" for name in names]


def _read_path(ctx: _Context, stdin: BinaryIO | None) -> Iterator[ParsedLine]:
    if ctx.source == "-":
        yield from _read_stream(stdin or sys.stdin.buffer, ctx, kind=None)
        return
    if (problem := input_paths.name_problem(ctx.source)) is not None:
        yield _whole_input_error(input_paths.shown_name(ctx.source), "invalid_file_name", problem)
        return
    path = Path(ctx.source)
    try:
        if path.is_dir():
            yield from _read_directory(path, ctx)
            return
        suffix = path.suffix.lower()
        kind = "jsonl" if suffix in JSONL_SUFFIXES else "text" if suffix in TEXT_SUFFIXES else None
        with path.open("rb") as stream:
            yield from _read_stream(stream, ctx, kind)
    except OSError as exc:
        yield _whole_input_error(ctx.source, "unreadable_input", f"{ctx.source}: {exc.strerror or exc}")


def _read_stream(stream: BinaryIO, ctx: _Context, kind: str | None) -> Iterator[ParsedLine]:
    lines = _iter_lines(stream, ctx.limits.max_line_bytes)
    if kind is None:
        kind, lines = _sniff(lines)
    for n, raw in lines:
        parsed = _parse_line(ctx, n, raw, kind)
        if parsed is not None:
            yield parsed


def _iter_lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, content without line ending) with None for lines over the limit, never buffered whole."""
    read_bytes = max_line_bytes + 2  # room for the "\r\n" that does not count
    n = 0
    while raw := stream.readline(read_bytes):
        n += 1
        if n == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]  # the BOM's bytes are not counted against the limit
            if not raw.endswith(b"\n"):
                raw += stream.readline(len(BOM))
        if len(raw) >= read_bytes and not raw.endswith(b"\n"):  # stopped mid-line: drop the rest unread
            while (rest := stream.readline(SKIP_CHUNK_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield n, None
            continue
        content = raw[:-1] if raw.endswith(b"\n") else raw
        content = content[:-1] if content.endswith(b"\r") else content
        yield n, content if len(content) <= max_line_bytes else None


def _sniff(lines: Iterator[tuple[int, bytes | None]]) -> tuple[str, Iterator[tuple[int, bytes | None]]]:
    """JSONL when the first non-blank line is a JSON object or array (refused there), else text.

    The lines peeked at are replayed.
    """
    peeked = []
    for item in lines:
        peeked.append(item)
        content = item[1].lstrip() if item[1] is not None else b""
        if content:
            jsonl = content.startswith(b"{") or strict_json.opens_array(content)
            return ("jsonl" if jsonl else "text"), chain(peeked, lines)
    return "text", iter(peeked)


def _parse_line(ctx: _Context, n: int, raw: bytes | None, kind: str) -> ParsedLine | None:
    """None for a blank line; otherwise the line's request or its first error."""
    if raw is None:
        msg = f"line is longer than {ctx.limits.max_line_bytes} bytes"
        return _error(ctx, n, "line_too_long", msg, ctx.unreadable_id(n))
    try:
        text = _decode(raw)
    except LineError as exc:
        return _error(ctx, n, exc.code, exc.message, ctx.unreadable_id(n))
    if not text.strip():
        return None
    if kind == "text":
        return _build(ctx, n, ctx.default_id(n), None, lambda: prompt_request(
            text, custom_id=ctx.default_id(n), line=n, fill=ctx.fill, max_tokens=ctx.limits.max_tokens),
            default_id=LINE_NUMBER)
    try:
        obj = formats.parse_json(text)
    except LineError as exc:
        return _error(ctx, n, exc.code, exc.message, ctx.unreadable_id(n))
    custom_id, model = identity(obj, ctx.default_id(n), ctx.unreadable_id(n))
    return _build(ctx, n, custom_id, model, lambda: object_request(
        obj, line=n, default_id=ctx.default_id(n), fill=ctx.fill, max_tokens=ctx.limits.max_tokens),
        ignored=_ignored_keys(obj), default_id=_default_id_rule(obj))


def _default_id_rule(obj: Any) -> str | None:
    """LINE_NUMBER when a valid line's custom_id is its default one (only simple lines may omit it)."""
    return LINE_NUMBER if isinstance(obj, dict) and obj.get("custom_id") is None else None


def _build(ctx: _Context, n: int, custom_id: str, model: str | None, make: Callable[[], Request],
           ignored: tuple[str, ...] = (), default_id: str | None = None) -> ParsedLine:
    try:
        request = make()
    except LineError as exc:
        return _error(ctx, n, exc.code, exc.message, custom_id, model)
    except ValidationError as exc:  # what a line did not write: a default custom_id from a long path, say
        error = pydantic_error(exc, "")
        hint = (f" (the line sets none: its default one, from the input's path and {default_id}, is too long)"
                if default_id else "")
        return _error(ctx, n, error.code, error.message + hint, custom_id, model)
    return ParsedLine(ctx.source, n, request, None, request.custom_id, model, ignored, default_id)


def _ignored_keys(obj: Any) -> tuple[str, ...]:
    if not isinstance(obj, dict):
        return ()
    if formats.is_message_batch_line(obj):
        body, ignored = obj.get("params"), formats.MESSAGES_IGNORED
    else:
        body, ignored = obj.get("body") if formats.is_batch_line(obj) else obj, formats.IGNORED_KEYS
    return tuple(sorted(ignored.intersection(body))) if isinstance(body, dict) else ()


def _decode(raw: bytes) -> str:
    if b"\x00" in raw:
        raise LineError("invalid_encoding", f"NUL byte at offset {raw.index(0)}: binary data, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError("invalid_encoding", f"not valid UTF-8 at byte {exc.start}") from None


def _read_directory(path: Path, ctx: _Context) -> Iterator[ParsedLine]:
    """Each *.txt file (see input_paths.prompt_files) is one prompt named by its file name."""
    dir_prefix = ctx.prefix[:-1] + "/" if ctx.prefix else ""  # "prompts/a.txt" rather than "prompts:a.txt"
    for entry in input_paths.prompt_files(path):
        custom_id = dir_prefix + entry.shown
        file_ctx = _Context(str(path / entry.shown), ctx.prefix, ctx.fill, ctx.limits)
        if entry.code is not None and entry.problem is not None:
            yield _error(file_ctx, 1, entry.code, entry.problem, custom_id)
            continue
        yield _read_prompt_file(entry.path, custom_id, file_ctx)


def _read_prompt_file(path: Path, custom_id: str, ctx: _Context) -> ParsedLine:
    max_bytes = ctx.limits.max_line_bytes
    try:
        with path.open("rb") as stream:
            raw = stream.read(max_bytes + len(BOM) + 1)
    except OSError as exc:
        return _error(ctx, 1, "unreadable_input", f"{path}: {exc.strerror or exc}", custom_id)
    raw = raw.removeprefix(BOM)
    if len(raw) > max_bytes:
        return _error(ctx, 1, "line_too_long", f"file is longer than {max_bytes} bytes", custom_id)
    try:
        prompt = _decode(raw).strip()
    except LineError as exc:
        return _error(ctx, 1, exc.code, exc.message, custom_id)
    return _build(ctx, 1, custom_id, None, lambda: prompt_request(
        prompt, custom_id=custom_id, line=1, fill=ctx.fill, max_tokens=ctx.limits.max_tokens),
        default_id=FILE_NAME)


def _check_duplicate(parsed: ParsedLine, seen: dict[str, ParsedLine], line_id: str) -> ParsedLine:
    """custom_ids name results, so each names one line's: the first line with an id owns it, an invalid one too
    (--skip-invalid gives it an error line under that id). A later valid line with it is a duplicate_custom_id
    error (the message points at the first); any later line's error line is named after its line (line_id,
    unused so far), so a script mapping custom_id -> result never finds two results for one id."""
    first = seen.setdefault(parsed.custom_id, parsed)
    if first is parsed:
        return parsed
    error = parsed.error
    if error is None:
        error = ErrorInfo(code="duplicate_custom_id", message=_duplicate_message(parsed, first), line=parsed.line,
                          param="custom_id")
    elif parsed.custom_id != line_id:  # its own error stays; told too, as its error line cannot carry that id
        error = error.model_copy(update={"message": f"{error.message}; and {_duplicate_message(parsed, first)}"})
    renamed = ParsedLine(parsed.source, parsed.line, None, error, parsed.custom_id, parsed.model,
                         result_id=_unused_id(line_id, seen))
    seen[renamed.result_id] = renamed
    return renamed


def _unused_id(base: str, seen: dict[str, ParsedLine]) -> str:
    """base, else base#2, base#3, ...: the first that no line's result is named by yet."""
    result_id, n = base, 1
    while result_id in seen:
        n += 1
        result_id = f"{base}#{n}"
    return result_id


def _duplicate_message(parsed: ParsedLine, first: ParsedLine) -> str:
    """Names a default custom_id as one: a user who set no custom_id must see where the id came from."""
    where = f"line {first.line}" if first.source == parsed.source else f"{first.source} line {first.line}"
    if parsed.default_id:
        msg = (f"custom_id {parsed.custom_id!r}, this line's default custom_id ({parsed.default_id}: "
               f"the line sets none), was already used on {where}")
    else:
        msg = f"custom_id {parsed.custom_id!r} was already used on {where}"
    if first.default_id:
        msg += f" as that line's default custom_id ({first.default_id}: {where} sets none)"
    elif first.result_id == parsed.custom_id:
        msg += " to name that skipped line's error line"
    return msg


def _error(ctx: _Context, n: int, code: str, message: str, custom_id: str, model: str | None = None) -> ParsedLine:
    error = ErrorInfo(code=code, message=message, line=n, param=param_of(message))
    return ParsedLine(ctx.source, n, None, error, custom_id, model)


def _whole_input_error(source: str, code: str, message: str) -> ParsedLine:
    return ParsedLine(source, 0, None, ErrorInfo(code=code, message=message, line=0), "line-0")
