"""One input line read as strict JSON: the checks that json.loads leaves out.

json.loads lets the last of two equal keys win silently, turns "\\ud800" escapes into strings that no
encoder (Redis client, tokenizer, output file) accepts, and nests as deep as the C stack allows. Each
of those would pass validation and fail later, in the worker or in an export, so a line is checked
whole here, once, and every problem is named by its field path ("body.messages.0.content").
"""

import json
import re
from collections.abc import Iterator
from typing import Any

# A valid request nests about 6 deep (envelope, body, messages, message, content parts, part); the
# bound only has to sit far below what pydantic and json can serialise, so results stay writable.
MAX_DEPTH = 32
MAX_SHOWN_PARTS = 8  # of a field path in a message; past that it is "…"
_SURROGATE = re.compile("[\ud800-\udfff]")


class StrictJsonError(ValueError):
    """code is a documented error code; message is "field: what is wrong", always encodable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _DuplicatedKeys(dict):
    """An object whose text repeated a key; kept so that check() can name it by its path."""

    def __init__(self, pairs: list[tuple[str, Any]], duplicate: str) -> None:
        super().__init__(pairs)
        self.duplicate = duplicate


def loads(text: str) -> Any:
    """json.loads that remembers repeated keys; errors are StrictJsonError (invalid_json, nesting_too_deep)."""
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except RecursionError:
        raise StrictJsonError("nesting_too_deep", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        hint = " (a JSON array is not JSONL: write one object per line)" if text.lstrip().startswith("[") else ""
        raise StrictJsonError("invalid_json", f"not valid JSON: {escape(str(exc))[:200]}{hint}") from None


def check(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise for the first repeated key, lone surrogate or nesting past max_depth, in document order."""
    for path, depth, item in _walk(value):
        if depth > max_depth:
            raise StrictJsonError("nesting_too_deep", f"{_field(path)}: nested deeper than {max_depth} levels")
        if isinstance(item, _DuplicatedKeys):
            where = _field([*path, item.duplicate])
            raise StrictJsonError("duplicate_key", f"{where}: the key appears twice (JSON keys must be unique)")
        if isinstance(item, str) and not is_encodable(item):
            raise StrictJsonError("invalid_encoding", f"{_field(path)}: contains a lone surrogate "
                                                      "(\\ud800-\\udfff escape), which is not UTF-8 text")
        if isinstance(item, dict):
            bad_key = next((k for k in item if not is_encodable(k)), None)
            if bad_key is not None:
                raise StrictJsonError("invalid_encoding", f"{_field([*path, bad_key])}: the key contains a lone "
                                                          "surrogate (\\ud800-\\udfff escape)")


def is_encodable(text: str) -> bool:
    """Strict UTF-8 decoding yields no surrogates, so only JSON escapes (or surrogateescape) can add them."""
    return text.isascii() or _SURROGATE.search(text) is None


def escape(text: str) -> str:
    """text with each lone surrogate written as its escape, so an error message can always be stored and printed."""
    return text if is_encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _walk(value: Any) -> Iterator[tuple[list[str], int, Any]]:
    """(path, depth, value) for every value, depth-first, without recursion (so no RecursionError)."""
    stack: list[tuple[list[str], int, Any]] = [([], 0, value)]
    while stack:
        path, depth, item = stack.pop()
        yield path, depth, item  # lazily: check() stops at the first item past its bound
        if isinstance(item, dict):
            stack.extend(([*path, key], depth + 1, child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(([*path, str(i)], depth + 1, child) for i, child in reversed(list(enumerate(item))))


def _field(path: list[str]) -> str:
    shown = ".".join(path[:MAX_SHOWN_PARTS]) + (".…" if len(path) > MAX_SHOWN_PARTS else "")
    return escape(shown) if path else "the line"


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
    return _DuplicatedKeys(pairs, duplicate)


def opens_array(line: bytes) -> bool:
    """A first line that starts a JSON array ("[", "[{...", or a whole array): JSON, never a text prompt."""
    if not line.startswith(b"["):
        return False
    if line[1:].lstrip()[:1] in (b"", b"{"):
        return True
    try:
        return isinstance(json.loads(line), list)
    except (ValueError, RecursionError):
        return False  # "[INST] write a poem" is a prompt
