"""Request and result schema: what the producer stores and what the worker writes back.

A stored Request is already validated and normalised (OpenAI batch line, simple line, text file or
directory all become the same shape). Output lines follow the OpenAI Batch API output file format.
"""

import base64
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from batchgen.jobs import defaults
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
RESPONSES_URL = "/v1/responses"  # OpenAI's Responses API: messages in, one output message out
MESSAGES_URL = "/v1/messages"  # Anthropic's Messages API, as its Message Batches send it
EMBEDDINGS_URL = "/v1/embeddings"  # one vector per input text, from an embedding model
Url = Literal["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/embeddings"]
MESSAGE_URLS = (CHAT_URL, RESPONSES_URL, MESSAGES_URL)  # the urls whose requests hold messages
GENERATION_URLS = (CHAT_URL, COMPLETIONS_URL, RESPONSES_URL, MESSAGES_URL)  # the urls a text generator answers
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
EncodingFormat = Literal["float", "base64"]
CustomId = Annotated[str, StringConstraints(min_length=1, max_length=512)]
TokenId = Annotated[int, Field(ge=0)]
MAX_CHOICES = 16  # n: each choice is its own row, so n multiplies a request's cost
MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit (completions: 5); vLLM's default max_logprobs
MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 16
# OpenAI's response_format kinds, and vLLM's structured outputs (guided_regex / _choice / _grammar)
ResponseFormat = Literal["text", "json_object", "json_schema", "regex", "choice", "grammar"]
GUIDED_FORMATS = ("regex", "choice", "grammar")


class SamplingParams(BaseModel):
    """Per-request generation parameters. temperature 0 means greedy; every other default means "off"."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_tokens: int = Field(defaults.DEFAULT_MAX_TOKENS, ge=1, le=defaults.MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: tuple[str, ...] = Field((), max_length=defaults.MAX_STOP_SEQUENCES)
    ignore_eos: bool = False  # benchmarks: fixed output lengths on random weights
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token; None: no logprobs
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    top_k: int = Field(0, ge=-1, lt=2**63)  # 0 or -1 (vLLM's spelling): every token; the sampler's int64
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0, le=defaults.MAX_TOKENS_LIMIT)
    stop_token_ids: tuple[TokenId, ...] = Field((), max_length=MAX_STOP_TOKEN_IDS)
    logit_bias: tuple[tuple[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]], ...] = Field(
        (), max_length=MAX_LOGIT_BIAS)  # (token id, bias) pairs: a tuple keeps the model hashable
    response_format: ResponseFormat = "text"
    json_schema: str | None = None  # the schema as JSON text, with response_format "json_schema"
    guide: str | None = None  # the regex, the EBNF grammar or the choices (a JSON list), with those formats
    include_stop_str_in_output: bool = False  # vLLM's: a stop string that ended the text stays in it
    skip_special_tokens: bool = True  # vLLM's: special tokens are left out of the text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @model_validator(mode="after")
    def _schema_with_its_format(self) -> "SamplingParams":
        if (self.response_format == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with response_format json_schema, and only with it")
        if (self.response_format in GUIDED_FORMATS) != (self.guide is not None):
            raise ValueError(f"guide goes with response_format {', '.join(GUIDED_FORMATS)}, and only with them")
        return self


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
    # How the chat template renders messages (vLLM's chat fields): extra template variables as a JSON object,
    # the assistant turn opened after them, or the final assistant message continued (a prefill).
    chat_template_kwargs: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # /v1/embeddings: the texts to embed, how their vectors are written, and the length they are cut to
    inputs: tuple[str, ...] | None = Field(None, min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_input(self) -> "Request":
        if sum(x is not None for x in (self.prompt, self.messages, self.inputs)) != 1:
            raise ValueError("exactly one of prompt, messages and inputs is required")
        if (self.inputs is not None) != (self.url == EMBEDDINGS_URL):
            raise ValueError(f"inputs go with url {EMBEDDINGS_URL}, and only with it")
        if self.url != EMBEDDINGS_URL and (self.encoding_format != "float" or self.dimensions is not None):
            raise ValueError(f"encoding_format and dimensions need url {EMBEDDINGS_URL}")
        if self.continue_final_message and (self.add_generation_prompt or not self.messages
                                            or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final_message needs a final assistant message and no generation prompt")
        if self.messages is not None and self.url not in MESSAGE_URLS:
            raise ValueError(f"messages need url {', '.join(MESSAGE_URLS)}")
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


LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens at this floor too


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability (of the model's raw distribution) and the top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Choice:
    """One of a request's n completions. stop_reason is vLLM's: the stop string or stop token id that ended it,
    None for EOS or length. finish_reason is "stop" or "length": nothing filters content, so never
    "content_filter"."""

    text: str
    finish_reason: str
    stop_reason: str | int | None = None
    num_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None


def success_line(
    request: Request,
    *,
    model: str,
    text: str = "",
    finish_reason: str = "length",
    prompt_tokens: int,
    completion_tokens: int,
    choices: Sequence[Choice] = (),
    embeddings: Sequence[bytes] = (),
) -> dict[str, Any]:
    """An OpenAI batch output line for a request that produced its completions (choices; without them, the one
    choice of text and finish_reason), or, for an embeddings request, its vectors (little-endian float32 each)."""
    chat = request.url == CHAT_URL
    choices = choices or (Choice(text, finish_reason, num_tokens=completion_tokens),)
    if request.url == EMBEDDINGS_URL:
        body = _embeddings_body(request, model, embeddings, prompt_tokens)
    elif request.url == RESPONSES_URL:
        body = _response_body(request, model, choices[0], prompt_tokens, completion_tokens)
    elif request.url == MESSAGES_URL:
        body = _message_body(model, choices[0], prompt_tokens, completion_tokens)
    else:
        body = _completion_body(chat, model, choices, prompt_tokens, completion_tokens)
    return {
        "id": _new_id("batch_req"),
        "custom_id": request.custom_id,
        "response": {"status_code": 200, "request_id": _new_id("req"), "body": body},
        "error": None,
    }


def _completion_body(chat: bool, model: str, choices: Sequence[Choice], prompt_tokens: int,
                     completion_tokens: int) -> dict[str, Any]:
    return {
        "id": _new_id("chatcmpl" if chat else "cmpl", "-"),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [_choice_body(i, c, chat) for i, c in enumerate(choices)],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _response_body(request: Request, model: str, choice: Choice, prompt_tokens: int,
                   completion_tokens: int) -> dict[str, Any]:
    """The Responses API's response object: one assistant message holding the text; a length stop is an
    incomplete response (max_output_tokens), as OpenAI reports it."""
    done = choice.finish_reason == "stop"
    params = request.params
    message = {"type": "message", "id": _new_id("msg"), "status": "completed" if done else "incomplete",
               "role": "assistant", "content": [{"type": "output_text", "text": choice.text, "annotations": []}]}
    return {
        "id": _new_id("resp"), "object": "response", "created_at": int(time.time()), "model": model,
        "status": "completed" if done else "incomplete",
        "incomplete_details": None if done else {"reason": "max_output_tokens"},
        "error": None, "instructions": None, "metadata": None, "output": [message],
        "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
        "temperature": params.temperature, "top_p": params.top_p, "max_output_tokens": params.max_tokens,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }


def _message_body(model: str, choice: Choice, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Anthropic's Message: one text block; a stop string is its stop_sequence, EOS its end_turn."""
    if choice.finish_reason == "length":
        stop_reason, sequence = "max_tokens", None
    elif isinstance(choice.stop_reason, str):
        stop_reason, sequence = "stop_sequence", choice.stop_reason
    else:
        stop_reason, sequence = "end_turn", None
    return {
        "id": _new_id("msg"), "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": choice.text, "citations": None}],
        "stop_reason": stop_reason, "stop_sequence": sequence,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def _embeddings_body(request: Request, model: str, vectors: Sequence[bytes], prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's CreateEmbeddingResponse: one embedding per input, in input order."""
    data = [{"object": "embedding", "index": i, "embedding": encode_embedding(v, request.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def encode_embedding(vector: bytes, encoding_format: str) -> list[float] | str:
    """base64: the float32 bytes, as OpenAI sends them. float: each value to 9 significant digits, which read back as
    the same float32 (a third shorter than the double's 17)."""
    if encoding_format == "base64":
        return base64.b64encode(vector).decode("ascii")
    return [float(f"{x:.9g}") for x in struct.unpack(f"<{len(vector) // 4}f", vector)]


def _choice_body(index: int, choice: Choice, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"index": index, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
    if chat:
        body["message"] = {"role": "assistant", "content": choice.text}
        body["logprobs"] = None if choice.logprobs is None else _chat_logprobs(choice.logprobs)
    else:
        body["text"] = choice.text
        body["logprobs"] = None if choice.logprobs is None else _completion_logprobs(choice.logprobs)
    return body


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _floor(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}


def _chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    content = [{**_token_entry(t.token, t.logprob), "top_logprobs": [_token_entry(s, lp) for s, lp in t.top]}
               for t in tokens]
    return {"content": content, "refusal": None}


def _completion_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The legacy shape: parallel lists; top_logprobs also holds the sampled token (up to logprobs + 1 entries)."""
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [_floor(t.logprob) for t in tokens],
        "top_logprobs": [{**_best_by_text(t.top), t.token: _floor(t.logprob)} for t in tokens],
        "text_offset": offsets,
    }


def _best_by_text(top: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Alternatives keyed by their text: tokens that decode alike (U+FFFD halves of characters) share one key,
    which holds the best of their logprobs."""
    best: dict[str, float] = {}
    for text, logprob in top:
        best[text] = max(best.get(text, LOGPROB_FLOOR), _floor(logprob))
    return best


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


def usage_of(line: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens of a success line, whichever API's usage its body has; (0, 0) for a failure."""
    response = line.get("response") or {}
    if response.get("status_code") != 200:
        return 0, 0
    usage = response.get("body", {}).get("usage") or {}
    return (int(usage.get("prompt_tokens", usage.get("input_tokens", 0))),
            int(usage.get("completion_tokens", usage.get("output_tokens", 0))))


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
