"""An OpenAI /v1/embeddings body ({model, input, encoding_format, dimensions, user}) as a validated Request.

input is one string or a list of up to MAX_EMBEDDING_INPUTS strings (one embedding each, in order); token-id inputs
are refused by name. Any field the Embeddings API does not define, and vLLM's extra ones (truncate_prompt_tokens,
normalize, ...), is unsupported_parameter: nothing is dropped silently.
"""

from collections.abc import Mapping
from typing import Any

from batchgen.jobs.line_error import LineError, check_model, json_type, not_blank
from batchgen.jobs.schema import EMBEDDINGS_URL, MAX_EMBEDDING_INPUTS, Request

EMBEDDINGS_KEYS = frozenset({"model", "input", "encoding_format", "dimensions"})
EMBEDDINGS_IGNORED = frozenset({"user"})  # OpenAI's abuse monitoring: never changes a vector
ENCODING_FORMATS = ("float", "base64")
PREFIX = "body."


def embeddings_request(body: Mapping[str, Any], *, custom_id: str, line: int) -> Request:
    for key in body:
        if key not in EMBEDDINGS_KEYS and key not in EMBEDDINGS_IGNORED:
            raise LineError("unsupported_parameter", f"{PREFIX}{key}: unknown parameter"[:300])
    check_model(body, PREFIX)
    if body.get("input") is None:
        raise LineError("missing_field", f"{PREFIX}input: required")
    return Request(custom_id=custom_id, url=EMBEDDINGS_URL, inputs=_inputs(body["input"], PREFIX + "input"),
                   encoding_format=_encoding_format(body.get("encoding_format")),
                   dimensions=_dimensions(body.get("dimensions")), line=line)


def _inputs(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (not_blank(value, field),)
    if not isinstance(value, list):
        raise LineError("invalid_type", f"{field}: must be a string or a list of strings, not {json_type(value)}")
    if not value:
        raise LineError("invalid_value", f"{field}: must not be empty")
    if all(_is_int(v) or isinstance(v, list) for v in value):  # [1, 2] or [[1, 2], [3]]: OpenAI's token-id forms
        raise LineError("unsupported_parameter", f"{field}: token-id inputs are not supported; send the text")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise LineError("invalid_value", f"{field}: at most {MAX_EMBEDDING_INPUTS} inputs, not {len(value)}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise LineError("invalid_type", f"{field}.{i}: must be a string, not {json_type(text)}")
        not_blank(text, f"{field}.{i}")
    return tuple(value)


def _encoding_format(value: Any) -> str:
    if value is None:
        return "float"
    if value not in ENCODING_FORMATS:
        raise LineError("invalid_value", f"{PREFIX}encoding_format: must be 'float' or 'base64', not {value!r}"[:300])
    return value


def _dimensions(value: Any) -> int | None:
    """Checked here for shape only: whether the model can shorten its vectors is the worker's check."""
    if value is None:
        return None
    if not _is_int(value):
        raise LineError("invalid_type", f"{PREFIX}dimensions: must be an integer")
    if value < 1:
        raise LineError("invalid_value", f"{PREFIX}dimensions: must be >= 1")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
