"""Request and result schema: what the producer stores and what the worker writes back.

A stored Request is already validated and normalised (OpenAI batch line, simple line, text file or
directory all become the same shape). Output lines follow the OpenAI Batch API output file format.
"""

import time
import uuid
from typing import Annotated, Any, Literal

from batchgen.jobs import defaults
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
Url = Literal["/v1/chat/completions", "/v1/completions"]
CustomId = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class SamplingParams(BaseModel):
    """Per-request generation parameters. temperature 0 means greedy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_tokens: int = Field(defaults.DEFAULT_MAX_TOKENS, ge=1, le=defaults.MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: tuple[str, ...] = Field((), max_length=defaults.MAX_STOP_SEQUENCES)
    ignore_eos: bool = False  # benchmarks: fixed output lengths on random weights

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ChatMessage(BaseModel):
    """Role and content only: the engine hands the chat template nothing else, so nothing else is accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class Request(BaseModel):
    """One validated request, as stored in Redis and handed to the engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    custom_id: CustomId
    url: Url = COMPLETIONS_URL
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    params: SamplingParams = SamplingParams()
    line: int = 0  # input line number (1-based), for error messages

    @model_validator(mode="after")
    def _one_input(self) -> "Request":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt and messages is required")
        if self.messages is not None and self.url != CHAT_URL:
            raise ValueError(f"messages need url {CHAT_URL}")
        if self.prompt is not None and self.url != COMPLETIONS_URL:
            raise ValueError(f"prompt needs url {COMPLETIONS_URL}")
        return self


class ErrorInfo(BaseModel):
    """A rejected input line or a failed request; the fields of OpenAI's BatchError (param: the field at fault)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


def _new_id(prefix: str, sep: str = "_") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def success_line(
    request: Request,
    *,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """An OpenAI batch output line for a request that produced a completion."""
    chat = request.url == CHAT_URL
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body = {
        "id": _new_id("chatcmpl" if chat else "cmpl", "-"),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return {
        "id": _new_id("batch_req"),
        "custom_id": request.custom_id,
        "response": {"status_code": 200, "request_id": _new_id("req"), "body": body},
        "error": None,
    }


def error_line(custom_id: str, code: str, message: str, *, status_code: int | None = 400,
               param: str | None = None) -> dict[str, Any]:
    """An OpenAI batch error-file line, in OpenAI's (and vLLM's) two shapes.

    A request that ran and failed answers like the API would: `response` holds the HTTP status and an
    error body, `error` is null. status_code None is a batch-level failure (cancelled, expired, lost):
    the request never ran, so `response` is null and `error` says why. A failure of ours rather than the
    request's (out of memory, an engine fault) answers 500, so a script retries it as it would OpenAI's.
    """
    if status_code == 400 and code in ("out_of_memory", "internal_error"):
        status_code = 500
    if status_code is None:
        return {"id": _new_id("batch_req"), "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": message}}
    body = {"error": {"message": message, "type": "server_error" if status_code >= 500 else "invalid_request_error",
                      "param": param, "code": code}}
    response = {"status_code": status_code, "request_id": _new_id("req"), "body": body}
    return {"id": _new_id("batch_req"), "custom_id": custom_id, "response": response, "error": None}


def outcome_of(line: dict[str, Any]) -> str:
    """The Outcome value of an output line: batch-level errors by code, else the response's status."""
    error = line.get("error")
    if error:
        return {"batch_cancelled": "cancelled", "batch_expired": "expired"}.get(error["code"], "errored")
    response = line.get("response") or {}
    return "succeeded" if response.get("status_code") == 200 else "errored"


def error_of(line: dict[str, Any]) -> dict[str, Any] | None:
    """A failed line's error object ({code, message, ...}) whichever shape it has; None for a success."""
    if line.get("error"):
        return line["error"]
    response = line.get("response") or {}
    return None if response.get("status_code") == 200 else response.get("body", {}).get("error")
