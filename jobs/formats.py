"""Turn one decoded input record (a JSON object or a text prompt) into a validated Request.

Every way a record can be wrong becomes a LineError with a stable code, so the CLI can print
"line 12: invalid_value: body.temperature: must be <= 2" and the batch error file can say the same.
Three line shapes are accepted: OpenAI batch lines ({"custom_id", "method", "url", "body"}), Anthropic
Message Batches requests ({"custom_id", "params"}) and simple lines ({"prompt" | "messages", params at top level}). Whatever is accepted here is stored,
serialised and run as it is, so nothing the engine would drop or the worker could not encode passes:
unknown keys at any level, repeated keys, lone surrogates, deep nesting and empty prompts are errors.
"""

import json
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from batchgen.jobs import strict_json
from batchgen.jobs.embeddings import embeddings_request
from batchgen.jobs.line_error import LineError, is_blank  # noqa: F401 - is_blank: callers read the rule from here
from batchgen.jobs.line_error import check_model as _model
from batchgen.jobs.line_error import json_type as _json_type
from batchgen.jobs.line_error import not_blank as _not_blank
from batchgen.jobs.schema import (
    CHAT_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
    MAX_LOGIT_BIAS,
    MAX_TOP_LOGPROBS,
    MESSAGES_URL,
    RESPONSES_URL,
    ChatMessage,
    Request,
    SamplingParams,
)
from pydantic import ValidationError

# Our own sampling parameters; null means "not given" (OpenAI accepts null for all of them).
PARAM_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos", "n", "presence_penalty",
              "frequency_penalty", "repetition_penalty", "top_k", "min_p", "min_tokens", "stop_token_ids",
              "include_stop_str_in_output", "skip_special_tokens")
# vLLM's structured outputs: the older guided_* fields and the newer structured_outputs object.
STRUCTURED_KEYS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
GUIDE_KINDS = ("json", "regex", "choice", "grammar")
MAX_GUIDED_CHOICES = 1000
MAX_TOKEN_ID_DIGITS = 18  # a logit_bias key: far above any vocabulary, far below int()'s 4300-digit limit
# vLLM's chat fields: how the chat template renders the messages.
CHAT_TEMPLATE_KEYS = ("chat_template_kwargs", "add_generation_prompt", "continue_final_message")
# apply_chat_template's own parameters: passed as template variables they would change how it runs, not what the
# template sees (a template of the request's own is refused, as `chat_template`).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})
# Ours too, but their JSON shape differs from the stored one (or by endpoint): _given_params converts them.
SHAPED_KEYS = ("logprobs", "top_logprobs", "logit_bias", "response_format", *STRUCTURED_KEYS, *CHAT_TEMPLATE_KEYS)
# Accepted and ignored: they change bookkeeping on OpenAI's side, never the generated text.
IGNORED_KEYS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"})
# Accepted only with the value that means "feature off", since we cannot honour anything else.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "stream": (False, None),
    "echo": (False, None),
    "best_of": (1, None),
    "suffix": ("", None),
    "tools": ([], None),
    "tool_choice": ("none", None),
    "modalities": (["text"], None),
}
KNOWN_KEYS = frozenset({"model", "prompt", "messages", "max_completion_tokens", *PARAM_KEYS, *SHAPED_KEYS})
BATCH_KEYS = frozenset({"custom_id", "method", "url", "body"})
URLS = (CHAT_URL, COMPLETIONS_URL, RESPONSES_URL, EMBEDDINGS_URL)
# The Responses API's request fields we honour: input and instructions become chat messages, max_output_tokens
# max_tokens, text.format response_format's JSON modes; the rest of its fields are refused (or ignored, as above).
RESPONSES_KEYS = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text"})
RESPONSES_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (False, None), "background": (False, None), "tools": ([], None), "tool_choice": ("none", None),
    "truncation": ("disabled", None),
}
# Anthropic's Messages API: the params we honour (system a leading system message, stop_sequences stop,
# output_config.format the JSON schema mode); its bookkeeping fields are ignored, its features refused unless off.
MESSAGES_KEYS = frozenset({"model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k",
                           "stop_sequences", "output_config"})
MESSAGES_IGNORED = frozenset({"metadata", "service_tier", "cache_control", "inference_geo", "speed"})
MESSAGES_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (False, None), "tools": ([], None), "tool_choice": ({"type": "none"}, {"type": "auto"}, None),
    "thinking": ({"type": "disabled"}, None),
}
MESSAGE_BATCH_KEYS = frozenset({"custom_id", "params"})
INPUT_ROLES = ("user", "system", "developer", "assistant")
INPUT_PART_TYPES = ("input_text", "output_text")
MESSAGE_KEYS = frozenset(ChatMessage.model_fields)
MAX_CUSTOM_ID_CHARS = 512


def parse_json(text: str) -> Any:
    """One line's JSON value; repeated keys are remembered for object_request to reject by path."""
    try:
        return strict_json.loads(text)
    except strict_json.StrictJsonError as exc:
        raise LineError(exc.code, exc.message) from None


def is_batch_line(obj: Mapping[str, Any]) -> bool:
    """OpenAI batch lines wrap the request in body; any of their envelope keys marks one."""
    return bool(BATCH_KEYS.intersection(obj) - {"custom_id"})


def is_message_batch_line(obj: Mapping[str, Any]) -> bool:
    """Anthropic's Message Batches request: {"custom_id", "params"}, without OpenAI's envelope keys."""
    return "params" in obj and not is_batch_line(obj)


def identity(obj: Any, default_id: str, unreadable_id: str) -> tuple[str, str | None]:
    """Best-effort (custom_id, model) of a record, for naming it even when it is invalid."""
    if not isinstance(obj, dict):
        return unreadable_id, None
    batch, anthropic = is_batch_line(obj), is_message_batch_line(obj)
    custom_id = obj.get("custom_id")
    if not (isinstance(custom_id, str) and 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS
            and strict_json.is_encodable(custom_id)):  # error lines echo it: it must be storable
        custom_id = unreadable_id if batch or anthropic else default_id
    body = obj.get("body") if batch else obj.get("params") if anthropic else obj
    model = body.get("model") if isinstance(body, dict) else None
    return custom_id, model if isinstance(model, str) and model and strict_json.is_encodable(model) else None


def object_request(
    obj: Any, *, line: int, default_id: str, fill: Mapping[str, Any], max_tokens: int
) -> Request:
    """Validate a parsed JSON line (either shape) and build its Request."""
    try:
        strict_json.check(obj)
    except strict_json.StrictJsonError as exc:
        raise LineError(exc.code, exc.message) from None
    if not isinstance(obj, dict):
        hint = " (JSONL holds one object per line, not an array of them)" if isinstance(obj, list) else ""
        raise LineError("invalid_type", f"each line must be a JSON object, not {_json_type(obj)}{hint}")
    if is_message_batch_line(obj):
        return _message_batch_request(obj, line=line, fill=fill, max_tokens=max_tokens)
    if is_batch_line(obj):
        _check_envelope_keys(obj)
        custom_id = _custom_id(obj, "custom_id", required=True) or default_id
        url = _envelope_url(obj)
        body = obj.get("body")
        if body is None and "body" not in obj:
            raise LineError("missing_field", "body: required")
        if not isinstance(body, dict):
            raise LineError("invalid_type", f"body: must be an object, not {_json_type(body)}")
        prefix, extra_keys = "body.", frozenset()
        if url == RESPONSES_URL:
            return _responses_request(body, custom_id=custom_id, line=line, fill=fill, max_tokens=max_tokens)
        if url == EMBEDDINGS_URL:
            return embeddings_request(body, custom_id=custom_id, line=line)
    else:
        custom_id = _custom_id(obj, "custom_id", required=False) or default_id
        url = CHAT_URL if "messages" in obj else COMPLETIONS_URL
        body, prefix, extra_keys = obj, "", frozenset({"custom_id"})
    _check_keys(body, prefix, extra_keys)
    _model(body, prefix)
    prompt, messages = _content(body, url, prefix)
    written = {"max_tokens": "max_completion_tokens"} if body.get("max_completion_tokens") is not None else {}
    params = sampling_params(_given_params(body, url, prefix), fill, max_tokens=max_tokens, prefix=prefix,
                             written=written)
    return Request(custom_id=custom_id, url=url, prompt=prompt, messages=messages, params=params, line=line,
                   **_chat_options(body, url, prefix, messages))


def prompt_request(
    prompt: str, *, custom_id: str, line: int, fill: Mapping[str, Any], max_tokens: int
) -> Request:
    """A bare prompt (text-file line or .txt file) as a completions Request with the CLI defaults."""
    _not_blank(prompt, "prompt")
    params = sampling_params({}, fill, max_tokens=max_tokens, prefix="")
    return Request(custom_id=custom_id, url=COMPLETIONS_URL, prompt=prompt, params=params, line=line)


def sampling_params(
    given: Mapping[str, Any], fill: Mapping[str, Any], *, max_tokens: int, prefix: str,
    written: Mapping[str, str] | None = None,
) -> SamplingParams:
    """The line's own values win over the CLI defaults (fill); the schema default applies last. written: the
    line's own name of a stored field (max_completion_tokens for max_tokens), which its errors use."""
    merged = {**fill, **given}
    merged.setdefault("max_tokens", min(SamplingParams.model_fields["max_tokens"].default, max_tokens))
    try:
        params = SamplingParams.model_validate(merged, strict=True)
    except ValidationError as exc:
        raise _as_written(pydantic_error(exc, prefix), prefix, written or {}) from None
    if params.max_tokens > max_tokens:
        raise _as_written(LineError("invalid_value", f"{prefix}max_tokens: must be <= {max_tokens}"), prefix,
                          written or {})
    if params.min_tokens > params.max_tokens:
        raise LineError("invalid_value", f"{prefix}min_tokens: must be <= max_tokens ({params.max_tokens})")
    return params


def _as_written(exc: LineError, prefix: str, written: Mapping[str, str]) -> LineError:
    """An error about a stored field, named as the line wrote it (its param must be a field the line has)."""
    for stored, name in written.items():
        if exc.message.startswith((f"{prefix}{stored}:", f"{prefix}{stored}.")):
            return LineError(exc.code, f"{prefix}{name}{exc.message[len(prefix + stored):]}")
    return exc


def pydantic_error(exc: ValidationError, prefix: str) -> LineError:
    """Map the first pydantic error to (code, "field: what is wrong")."""
    err = exc.errors(include_url=False)[0]
    field = prefix + ".".join(str(part) for part in err["loc"])
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "missing":
        return LineError("missing_field", f"{field}: required")
    if kind == "extra_forbidden":
        return LineError("unsupported_parameter", f"{field}: not supported")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        shown = f"{bound:g}" if isinstance(bound, float) else str(bound)
        return LineError("invalid_value", f"{field}: must be {bounds[kind]} {shown}")
    if kind == "too_long":
        return LineError("invalid_value", f"{field}: at most {ctx['max_length']} items")
    if kind == "string_too_long":
        return LineError("invalid_value", f"{field}: at most {ctx['max_length']} characters")
    if kind == "finite_number":
        return LineError("invalid_value", f"{field}: must be a finite number")
    if kind == "literal_error":
        return LineError("invalid_value", f"{field}: must be one of {ctx['expected']}")
    type_names = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
                  "bool_type": "true or false", "tuple_type": "a list", "dict_type": "an object"}
    if kind in type_names:
        return LineError("invalid_type", f"{field}: must be {type_names[kind]}")
    return LineError("invalid_value", f"{field}: {err['msg']}")


def _custom_id(obj: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise LineError("missing_field", f"{key}: required")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise LineError("invalid_type", f"{key}: must be a string, not {_json_type(value)}")
    if not value:
        raise LineError("invalid_value", f"{key}: must not be empty")
    if len(value) > MAX_CUSTOM_ID_CHARS:
        raise LineError("invalid_value", f"{key}: at most {MAX_CUSTOM_ID_CHARS} characters")
    return value


def _envelope_url(obj: Mapping[str, Any]) -> str:
    method = obj.get("method", "POST")
    if not (isinstance(method, str) and method.upper() == "POST"):
        raise LineError("invalid_method", f"method: only POST is supported, not {method!r}")
    if "url" not in obj:
        raise LineError("missing_field", "url: required")
    url = obj["url"]
    if url not in URLS:
        raise LineError("unknown_url", f"url: must be one of {', '.join(URLS)}, not {url!r}"[:300])
    return url


def _check_envelope_keys(obj: Mapping[str, Any], envelope: frozenset[str] = BATCH_KEYS, inner: str = "body",
                         request_keys: Collection[str] = (*KNOWN_KEYS, *NEUTRAL_VALUES, *IGNORED_KEYS),
                         what: str = "a batch line has only custom_id, method, url and body") -> None:
    """A request parameter next to body (params) instead of inside it would be silently ignored: say where it goes."""
    for key in obj:
        if key in envelope:
            continue
        if key in request_keys:
            raise LineError("misplaced_parameter", f"{key}: belongs inside {inner} ({inner}.{key}), not next to it")
        raise LineError("unsupported_parameter", f"{key}: unknown field; {what}"[:300])


def _check_keys(body: Mapping[str, Any], prefix: str, extra_keys: frozenset[str], known: frozenset[str] = KNOWN_KEYS,
                neutral: Mapping[str, tuple[Any, ...]] = NEUTRAL_VALUES, ignored: frozenset[str] = IGNORED_KEYS) -> None:
    for key, value in body.items():
        if key in known or key in extra_keys or key in ignored:
            continue
        if key in neutral:
            if not any(_same(value, ok) for ok in neutral[key]):
                raise LineError("unsupported_parameter", f"{prefix}{key}: only {neutral[key][0]!r} is supported")
            continue
        raise LineError("unsupported_parameter", f"{prefix}{key}: unknown parameter"[:300])


def _same(value: Any, ok: Any) -> bool:
    """JSON equality: in Python False == 0 == 0.0, but a JSON false is not the number 0."""
    return value == ok and isinstance(value, bool) == isinstance(ok, bool)


def _content(body: Mapping[str, Any], url: str, prefix: str) -> tuple[str | None, tuple[ChatMessage, ...] | None]:
    prompt, messages = body.get("prompt"), body.get("messages")
    if prompt is not None and messages is not None:
        raise LineError("invalid_value", f"{prefix}prompt, {prefix}messages: give only one")
    if url == CHAT_URL:
        if messages is None:
            hint = f" ({url} takes messages, not prompt)" if prompt is not None else ""
            raise LineError("missing_field", f"{prefix}messages: required{hint}")
        return None, _messages(messages, prefix + "messages")
    if prompt is None:
        hint = f" ({url} takes prompt, not messages)" if messages is not None else ""
        raise LineError("missing_field", f"{prefix}prompt: required{hint}")
    return _prompt(prompt, prefix + "prompt"), None


def _responses_request(body: Mapping[str, Any], *, custom_id: str, line: int, fill: Mapping[str, Any],
                       max_tokens: int) -> Request:
    """A /v1/responses body as the chat Request it amounts to: instructions a system message ahead of input."""
    prefix = "body."
    _check_keys(body, prefix, frozenset(), RESPONSES_KEYS, RESPONSES_NEUTRAL)
    _model(body, prefix)
    if body.get("input") is None:
        raise LineError("missing_field", f"{prefix}input: required")
    messages = _input_messages(body["input"], prefix + "input")
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise LineError("invalid_type", f"{prefix}instructions: must be a string")
        messages = [ChatMessage(role="system", content=_not_blank(instructions, prefix + "instructions")), *messages]
    given = {key: body[key] for key in ("temperature", "top_p") if body.get(key) is not None}
    limit = body.get("max_output_tokens")
    if limit is not None:  # checked here: sampling_params would name it max_tokens
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise LineError("invalid_type", f"{prefix}max_output_tokens: must be an integer")
        if not 1 <= limit <= max_tokens:
            raise LineError("invalid_value", f"{prefix}max_output_tokens: must be between 1 and {max_tokens}")
        given["max_tokens"] = limit
    if body.get("text") is not None:
        given.update(_text_format(body["text"], prefix + "text"))
    params = sampling_params(given, fill, max_tokens=max_tokens, prefix=prefix)
    return Request(custom_id=custom_id, url=RESPONSES_URL, messages=tuple(messages), params=params, line=line)


def _message_batch_request(obj: Mapping[str, Any], *, line: int, fill: Mapping[str, Any],
                           max_tokens: int) -> Request:
    """An Anthropic Message Batches request: params is a Messages API body; system leads as a system message,
    and a final assistant message is a prefill the reply continues."""
    _check_envelope_keys(obj, MESSAGE_BATCH_KEYS, "params", (*MESSAGES_KEYS, *MESSAGES_NEUTRAL, *MESSAGES_IGNORED),
                         "a Message Batches request has only custom_id and params")
    custom_id = _custom_id(obj, "custom_id", required=True)
    params, prefix = obj["params"], "params."
    if not isinstance(params, dict):
        raise LineError("invalid_type", f"params: must be an object, not {_json_type(params)}")
    _check_keys(params, prefix, frozenset(), MESSAGES_KEYS, MESSAGES_NEUTRAL, MESSAGES_IGNORED)
    _model(params, prefix)
    if params.get("messages") is None:
        raise LineError("missing_field", f"{prefix}messages: required")
    messages = _anthropic_messages(params["messages"], prefix + "messages")
    if params.get("system") is not None:
        system = params["system"]
        if isinstance(system, list):
            system = _join_parts(_text_blocks(system), prefix + "system")
        if not isinstance(system, str):
            raise LineError("invalid_type", f"{prefix}system: must be a string or a list of text blocks")
        messages.insert(0, ChatMessage(role="system", content=_not_blank(system, prefix + "system")))
    if params.get("max_tokens") is None:  # Anthropic's API requires it, so a line written for it has one
        raise LineError("missing_field", f"{prefix}max_tokens: required")
    given = {key: params[key] for key in ("max_tokens", "temperature", "top_p", "top_k") if params.get(key) is not None}
    temperature = given.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature > 1:
        raise LineError("invalid_value", f"{prefix}temperature: must be <= 1")  # Anthropic's range is 0 to 1
    stop = params.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise LineError("invalid_type", f"{prefix}stop_sequences: must be a list of strings")
        if any(not s for s in stop):
            raise LineError("invalid_value", f"{prefix}stop_sequences: stop sequences must not be empty")
        given["stop"] = tuple(stop)
    if params.get("output_config") is not None:
        given.update(_output_config(params["output_config"], prefix + "output_config"))
    sampled = sampling_params(given, fill, max_tokens=max_tokens, prefix=prefix, written={"stop": "stop_sequences"})
    prefill = messages[-1].role == "assistant"
    return Request(custom_id=custom_id, url=MESSAGES_URL, messages=tuple(messages), params=sampled, line=line,
                   continue_final_message=prefill, add_generation_prompt=not prefill)


def _anthropic_messages(value: Any, field: str) -> list[ChatMessage]:
    """Messages API turns: user and assistant only (system is its own field), content a string or text blocks.
    Consecutive turns of one role are one turn, as Anthropic combines them: their texts join as blocks do."""
    messages: list[ChatMessage] = []
    for at, item in _message_items(value, field, ("role", "content")):
        role, content = item.get("role"), item.get("content")
        if role not in ("user", "assistant"):
            hint = " (the system prompt is params.system)" if role == "system" else ""
            raise LineError("invalid_value", f"{at}.role: must be 'user' or 'assistant'{hint}")
        if isinstance(content, list):
            content = _join_parts(_text_blocks(content), f"{at}.content")
        if not isinstance(content, str):
            raise LineError("missing_field" if content is None else "invalid_type",
                            f"{at}.content: must be a string or a list of text blocks")
        content = _not_blank(content, f"{at}.content")
        if messages and messages[-1].role == role:
            content = f"{messages.pop().content}\n{content}"
        messages.append(ChatMessage(role=role, content=content))
    return messages


def _text_blocks(blocks: list[Any]) -> list[Any]:
    """Anthropic text blocks without what never changes the text: cache_control marks, empty citations."""
    dropped = ("cache_control", "citations")
    return [{k: v for k, v in b.items() if k not in dropped or (k == "citations" and v)} if isinstance(b, dict) else b
            for b in blocks]


def _output_config(config: Any, field: str) -> dict[str, Any]:
    """output_config: {"format": {"type": "json_schema", "schema": {...}}}, Anthropic's structured outputs."""
    fmt = _wrapped_format(config, field, nulls_ok=True)
    if fmt is None:
        return {}
    for key in fmt:
        if key not in ("type", "schema"):
            raise LineError("unsupported_parameter", f"{field}.format.{key}: unknown field"[:300])
    if fmt.get("type") != "json_schema":
        raise LineError("invalid_value", f"{field}.format.type: must be 'json_schema'")
    if not isinstance(fmt.get("schema"), dict):
        raise LineError("missing_field" if fmt.get("schema") is None else "invalid_type",
                        f"{field}.format.schema: must be an object (a JSON Schema)")
    return {"response_format": "json_schema", "json_schema": json.dumps(fmt["schema"], ensure_ascii=False)}


def _wrapped_format(wrapper: Any, field: str, *, nulls_ok: bool) -> dict[str, Any] | None:
    """The format object of Anthropic's output_config or the Responses API's text: {"format": {...}}, where a
    sibling key is refused (nulls_ok: unless it is null); None when no format is given."""
    if not isinstance(wrapper, dict):
        raise LineError("invalid_type", f"{field}: must be an object, not {_json_type(wrapper)}")
    for key, value in wrapper.items():
        if key != "format" and not (nulls_ok and value is None):
            raise LineError("unsupported_parameter", f"{field}.{key}: not supported"[:300])
    fmt = wrapper.get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise LineError("invalid_type", f"{field}.format: must be an object, not {_json_type(fmt)}")
    return fmt


def _input_messages(value: Any, field: str) -> list[ChatMessage]:
    """input: a string (one user message) or a list of message items, each content a string or text parts."""
    if isinstance(value, str):
        return [ChatMessage(role="user", content=_not_blank(value, field))]
    messages = []
    for at, item in _message_items(value, field, ("type", "role", "content"), "a string or a list of messages",
                                   "an input message has only type, role and content"):
        if item.get("type", "message") != "message":
            raise LineError("unsupported_parameter", f"{at}.type: only message items are supported, not "
                                                     f"{item.get('type')!r}"[:300])
        role, content = item.get("role"), item.get("content")
        if role not in INPUT_ROLES:
            raise LineError("invalid_value", f"{at}.role: must be one of {', '.join(INPUT_ROLES)}")
        if isinstance(content, list):
            content = _join_parts(content, f"{at}.content", INPUT_PART_TYPES)
        if not isinstance(content, str):
            raise LineError("missing_field" if content is None else "invalid_type",
                            f"{at}.content: must be a string or a list of text parts")
        messages.append(ChatMessage(role=role, content=_not_blank(content, f"{at}.content")))
    return messages


def _text_format(text: Any, field: str) -> dict[str, Any]:
    """text: {"format": {"type": "text" | "json_object"} | {"type": "json_schema", "name", "schema", ...}}, the
    Responses API's flat form of response_format."""
    fmt = _wrapped_format(text, field, nulls_ok=False)
    if fmt is None:
        return {}
    if fmt.get("type") != "json_schema":
        return _response_format(fmt, field + ".format")
    spec = {k: v for k, v in fmt.items() if k != "type"}
    for key in spec:
        if key not in JSON_SCHEMA_KEYS:
            raise LineError("unsupported_parameter", f"{field}.format.{key}: unknown field"[:300])
    for key, kind in (("name", str), ("schema", dict)):
        if not isinstance(spec.get(key), kind) or not spec[key]:
            raise LineError("missing_field" if spec.get(key) is None else "invalid_value",
                            f"{field}.format.{key}: required, a non-empty {'string' if kind is str else 'object'}")
    return _response_format({"type": "json_schema", "json_schema": spec}, field + ".format")


def _prompt(prompt: Any, field: str) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI's list-of-prompts form, with the one prompt we allow per line
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) and prompt:
        raise LineError("invalid_value", f"{field}: one prompt per line, not a list of {len(prompt)}")
    if not isinstance(prompt, str):
        raise LineError("invalid_type", f"{field}: must be a string (token-id prompts are not supported)")
    return _not_blank(prompt, field)


def _message_items(value: Any, field: str, keys: Collection[str], what: str = "a list",
                   holds: str = "a message has only role and content") -> Iterator[tuple[str, dict[str, Any]]]:
    """(field path, object) of each item of a non-empty message list whose items have only keys."""
    if not isinstance(value, list):
        raise LineError("invalid_type", f"{field}: must be {what}, not {_json_type(value)}")
    if not value:
        raise LineError("invalid_value", f"{field}: must not be empty")
    for i, item in enumerate(value):
        at = f"{field}.{i}"
        if not isinstance(item, dict):
            raise LineError("invalid_type", f"{at}: must be an object, not {_json_type(item)}")
        for key in item:  # name, tool_calls, tool_call_id, refusal...: the engine would drop them
            if key not in keys:
                raise LineError("unsupported_parameter", f"{at}.{key}: not supported; {holds}"[:300])
        yield at, item


def _messages(messages: Any, field: str) -> tuple[ChatMessage, ...]:
    result = []
    for at, message in _message_items(messages, field, MESSAGE_KEYS):
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": _join_parts(content, f"{at}.content")}
        try:
            parsed = ChatMessage.model_validate(message, strict=True)
        except ValidationError as exc:
            raise pydantic_error(exc, f"{at}.") from None
        _not_blank(parsed.content, f"{at}.content")
        result.append(parsed)
    return tuple(result)


def _join_parts(parts: list[Any], field: str, kinds: tuple[str, ...] = ("text",)) -> str:
    """OpenAI content-part lists: we take text parts only (no images, audio or files). kinds: the text parts' type
    names (chat's "text"; the Responses API's "input_text", and "output_text" in an assistant turn)."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise LineError("invalid_type", f"{field}.{j}: must be an object, not {_json_type(part)}")
        kind = part.get("type")
        if kind not in kinds and isinstance(kind, str) and kind:
            raise LineError("unsupported_parameter", f"{field}.{j}: {kind} parts are not supported "
                                                     f"({kinds[0]} parts only)"[:300])
        if kind not in kinds or set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise LineError("invalid_value", f"{field}.{j}: must be {{\"type\": \"{kinds[0]}\", \"text\": str}}")
        texts.append(part["text"])
    return "\n".join(texts)


def _given_params(body: Mapping[str, Any], url: str, prefix: str) -> dict[str, Any]:
    given = {key: body[key] for key in PARAM_KEYS if body.get(key) is not None}
    alias = body.get("max_completion_tokens")
    if alias is not None:
        if "max_tokens" in given:
            raise LineError("invalid_value", f"{prefix}max_tokens, {prefix}max_completion_tokens: give only one")
        given["max_tokens"] = alias
    stop = given.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list):
        if any(s == "" for s in stop):
            raise LineError("invalid_value", f"{prefix}stop: stop strings must not be empty")
        given["stop"] = tuple(stop)
    if isinstance(given.get("stop_token_ids"), list):
        given["stop_token_ids"] = tuple(given["stop_token_ids"])
    logprobs = _logprobs(body, url, prefix)
    if logprobs is not None:
        given["logprobs"] = logprobs
    if body.get("logit_bias") is not None:
        given["logit_bias"] = _logit_bias(body["logit_bias"], prefix + "logit_bias")
    if body.get("response_format") is not None:
        given.update(_response_format(body["response_format"], prefix + "response_format"))
    structured = _structured(body, prefix)
    if structured and given.get("response_format", "text") != "text":
        raise LineError("invalid_value", f"{prefix}response_format, {prefix}{structured.pop('field')}: give only one")
    structured.pop("field", None)
    given.update(structured)
    return given


def _structured(body: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """vLLM's structured outputs as the stored response_format and its json_schema or guide; one per request."""
    keys = [key for key in STRUCTURED_KEYS if body.get(key) is not None]
    if not keys:
        return {}
    if len(keys) > 1:
        raise LineError("invalid_value", f"{', '.join(prefix + key for key in keys)}: give only one")
    key, field = keys[0], prefix + keys[0]
    if key != "structured_outputs":
        return {**_guide(key.removeprefix("guided_"), body[key], field), "field": key}
    spec = body[key]
    if not isinstance(spec, dict):
        raise LineError("invalid_type", f"{field}: must be an object, not {_json_type(spec)}")
    set_keys = [k for k, v in spec.items() if v is not None]
    for k in set_keys:
        if k not in GUIDE_KINDS:
            raise LineError("unsupported_parameter", f"{field}.{k}: not supported"[:300])
    if len(set_keys) != 1:
        raise LineError("invalid_value", f"{field}: give exactly one of {', '.join(GUIDE_KINDS)}")
    kind = set_keys[0]
    return {**_guide(kind, spec[kind], f"{field}.{kind}"), "field": key}


def _guide(kind: str, value: Any, field: str) -> dict[str, Any]:
    if kind == "json":
        if isinstance(value, str):  # vLLM takes the schema as JSON text too
            try:
                value = strict_json.loads(value)
            except strict_json.StrictJsonError as exc:
                raise LineError("invalid_value", f"{field}: not valid JSON ({exc.message})"[:300]) from None
            try:  # the line's own check saw one string: repeated keys, surrogates and depth are checked here
                strict_json.check(value)
            except strict_json.StrictJsonError as exc:
                raise LineError(exc.code, f"{field}: {exc.message}"[:300]) from None
        if not isinstance(value, dict):
            raise LineError("invalid_type", f"{field}: must be an object (a JSON Schema)")
        return {"response_format": "json_schema", "json_schema": json.dumps(value, ensure_ascii=False)}
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise LineError("invalid_value", f"{field}: must be a non-empty list of non-empty strings")
        if len(value) > MAX_GUIDED_CHOICES:
            raise LineError("invalid_value", f"{field}: at most {MAX_GUIDED_CHOICES} choices")
        return {"response_format": "choice", "guide": json.dumps(value, ensure_ascii=False)}
    if not isinstance(value, str) or not value:
        raise LineError("invalid_type", f"{field}: must be a non-empty string")
    return {"response_format": kind, "guide": value}


def _chat_options(body: Mapping[str, Any], url: str, prefix: str,
                  messages: tuple[ChatMessage, ...] | None) -> dict[str, Any]:
    """vLLM's chat template fields. continue_final_message implies no generation prompt unless one is asked for
    (vLLM makes the caller say add_generation_prompt: false; a line that does is accepted too)."""
    given = {key: body[key] for key in CHAT_TEMPLATE_KEYS if body.get(key) is not None}
    if not given:
        return {}
    if url != CHAT_URL or messages is None:
        raise LineError("unsupported_parameter", f"{prefix}{next(iter(given))}: chat only")
    for key in ("add_generation_prompt", "continue_final_message"):
        if key in given and not isinstance(given[key], bool):
            raise LineError("invalid_type", f"{prefix}{key}: must be true or false")
    options: dict[str, Any] = {}
    if given.get("continue_final_message"):
        if given.get("add_generation_prompt"):
            raise LineError("invalid_value", f"{prefix}add_generation_prompt, {prefix}continue_final_message: "
                                             "give only one")
        if messages[-1].role != "assistant":
            raise LineError("invalid_value", f"{prefix}continue_final_message: needs a final assistant message to "
                                             "continue")
        options.update(continue_final_message=True, add_generation_prompt=False)
    elif "add_generation_prompt" in given:
        options["add_generation_prompt"] = given["add_generation_prompt"]
    if "chat_template_kwargs" in given:
        options["chat_template_kwargs"] = _template_kwargs(given["chat_template_kwargs"], prefix + "chat_template_kwargs")
    return options


def _template_kwargs(kwargs: Any, field: str) -> str:
    """Extra chat template variables (e.g. Qwen3's enable_thinking) as JSON text, the stored form."""
    if not isinstance(kwargs, dict):
        raise LineError("invalid_type", f"{field}: must be an object, not {_json_type(kwargs)}")
    for key in kwargs:
        if not key.isidentifier():
            raise LineError("invalid_value", f"{field}.{key}: must be a template variable name"[:300])
        if key in RESERVED_TEMPLATE_KWARGS:
            raise LineError("unsupported_parameter", f"{field}.{key}: not a template variable (it is "
                                                     "apply_chat_template's own parameter)"[:300])
    return json.dumps(kwargs, ensure_ascii=False)


def _logprobs(body: Mapping[str, Any], url: str, prefix: str) -> int | None:
    """Alternatives per token, or None for no logprobs. Chat says `logprobs: true, top_logprobs: k`;
    completions say `logprobs: k`."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if url == COMPLETIONS_URL:
        if top is not None:
            raise LineError("unsupported_parameter", f"{prefix}top_logprobs: chat only; completions take "
                                                     f"{prefix}logprobs: k")
        return None if logprobs is None else _count(logprobs, prefix + "logprobs", MAX_TOP_LOGPROBS)
    if logprobs is not None and not isinstance(logprobs, bool):
        raise LineError("invalid_type", f"{prefix}logprobs: must be true or false")
    if top is not None:
        top = _count(top, prefix + "top_logprobs", MAX_TOP_LOGPROBS)
        if not logprobs:
            raise LineError("invalid_value", f"{prefix}top_logprobs: needs {prefix}logprobs: true")
    return (top or 0) if logprobs else None


def _count(value: Any, field: str, most: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LineError("invalid_type", f"{field}: must be an integer")
    if not 0 <= value <= most:
        raise LineError("invalid_value", f"{field}: must be between 0 and {most}")
    return value


def _logit_bias(bias: Any, field: str) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} object as sorted (id, bias) pairs; the bounds are SamplingParams'."""
    if not isinstance(bias, dict):
        raise LineError("invalid_type", f"{field}: must be an object mapping token ids to biases")
    if len(bias) > MAX_LOGIT_BIAS:
        raise LineError("invalid_value", f"{field}: at most {MAX_LOGIT_BIAS} tokens")
    pairs: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > MAX_TOKEN_ID_DIGITS:
            raise LineError("invalid_value", f"{field}.{key}: keys must be token ids (non-negative integers)"[:300])
        if int(key) in pairs:  # "5" and "05": the engine would add both biases to one token
            raise LineError("invalid_value", f"{field}.{key}: token {int(key)} appears twice")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise LineError("invalid_type", f"{field}.{key}: must be a number")
        if not -100 <= value <= 100:
            raise LineError("invalid_value", f"{field}.{key}: must be between -100 and 100")
        pairs[int(key)] = float(value)
    return tuple(sorted(pairs.items()))


RESPONSE_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
JSON_SCHEMA_KEYS = frozenset({"name", "description", "schema", "strict"})


def _response_format(fmt: Any, field: str) -> dict[str, Any]:
    """{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", ...}} as the stored
    response_format and json_schema (the schema's JSON text). Whether the schema compiles is the worker's check."""
    if not isinstance(fmt, dict):
        raise LineError("invalid_type", f"{field}: must be an object, not {_json_type(fmt)}")
    kind = fmt.get("type")
    if not isinstance(kind, str) or kind not in RESPONSE_FORMAT_KEYS:
        raise LineError("invalid_value", f"{field}.type: must be one of 'text', 'json_object', 'json_schema'")
    for key in fmt:
        if key not in RESPONSE_FORMAT_KEYS[kind]:
            raise LineError("unsupported_parameter", f"{field}.{key}: not supported with type {kind!r}"[:300])
    if kind != "json_schema":
        return {"response_format": kind}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise LineError("missing_field" if spec is None else "invalid_type", f"{field}.json_schema: must be an object")
    for key in spec:
        if key not in JSON_SCHEMA_KEYS:
            raise LineError("unsupported_parameter", f"{field}.json_schema.{key}: unknown field"[:300])
    name = spec.get("name")
    if not (isinstance(name, str) and name):
        raise LineError("missing_field" if name is None else "invalid_value",
                        f"{field}.json_schema.name: required, a non-empty string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise LineError("invalid_type", f"{field}.json_schema.strict: must be true or false")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise LineError("missing_field" if schema is None else "invalid_type",
                        f"{field}.json_schema.schema: must be an object (a JSON Schema)")
    return {"response_format": kind, "json_schema": json.dumps(schema, ensure_ascii=False)}

