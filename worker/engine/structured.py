"""Structured output (response_format json_object / json_schema; vLLM's regex, choice and grammar) with xgrammar: a grammar matcher per row, and
one batched bitmask fill + apply per step over the rows that have one.

The compiler is built once per tokenizer, on the first request that needs it (a worker that never sees JSON mode
never imports xgrammar), and caches compiled grammars, so a batch of lines sharing a schema compiles it once.
"""

import json
import re
from collections.abc import Sequence as Seq
from typing import Any

import torch
from batchgen.jobs.schema import SamplingParams
from batchgen.worker.engine.sequence import Sequence

JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's JSON mode: the output is one JSON object
# keywords xgrammar accepts but does not enforce: a schema using them could get output that fails validation
_UNENFORCED = ("uniqueItems", "contains", "minContains", "maxContains", "not")
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_VALUES = frozenset({"enum", "const", "default", "examples"})  # JSON values, not subschemas


class InvalidSchema(ValueError):
    """A json_schema, regex or grammar the grammar compiler refuses."""


class StructuredOutput:
    def __init__(self, tokenizer, *, vocab_size: int, eos_ids: frozenset[int]):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        self.compiler = xgr.GrammarCompiler(info)
        self.batch = xgr.BatchGrammarMatcher()
        self.vocab_size = vocab_size

    def matcher(self, params: SamplingParams):
        """A fresh matcher for params' response_format. Compact separators: whitespace is the one thing a grammar
        lets a weak model repeat until max_tokens."""
        try:
            compiled = self._compile(params)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses with the reason
            raise InvalidSchema(_reason(exc)) from None
        return self._xgr.GrammarMatcher(compiled)

    def _compile(self, params: SamplingParams):
        kind, guide = params.response_format, params.guide or ""
        if kind == "regex":
            return self.compiler.compile_regex(guide)
        if kind == "grammar":  # xgrammar's EBNF (GBNF's dialect: root ::= ...)
            return self.compiler.compile_grammar(guide)
        if kind == "choice":  # each choice a string literal; JSON's escapes are EBNF's
            literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(guide))
            return self.compiler.compile_grammar(f"root ::= {literals}")
        schema = json.dumps(enforceable(json.loads(params.json_schema))) if kind == "json_schema" else JSON_OBJECT_SCHEMA
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def mask(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
        """Sets to -inf every token the row's grammar cannot take next. Rows without a matcher, or whose matcher
        has taken its stop token (ignore_eos runs on past it), are untouched, as vLLM leaves them."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None and not s.matcher.is_terminated()]
        if not rows:
            return
        bitmask = self._xgr.allocate_token_bitmask(len(seqs), self.vocab_size)
        self.batch.batch_fill_next_token_bitmask([seqs[i].matcher for i in rows], bitmask, indices=rows)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                              indices=rows)


def enforceable(schema: Any) -> Any:
    """schema as xgrammar enforces it: a length-bounded string without a pattern gets one excluding control
    characters (xgrammar's length rule lets raw ones through, which no JSON parser takes; its pattern rule does
    not). InvalidSchema for keywords xgrammar would silently ignore, and a pattern with a length."""
    if isinstance(schema, list):
        return [enforceable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    unenforced = [k for k in _UNENFORCED if k in schema]
    if unenforced:
        raise InvalidSchema(f"{unenforced[0]} is not supported")
    out = {k: _subschemas(k, v) for k, v in schema.items()}
    types = schema.get("type")
    bounded = "minLength" in schema or "maxLength" in schema
    if bounded and (types == "string" or isinstance(types, list) and "string" in types):
        if "pattern" in schema:
            raise InvalidSchema("pattern with minLength or maxLength is not supported")
        if "format" not in schema:
            low, high = schema.get("minLength", 0), schema.get("maxLength", "")
            out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{low},{high}}}$'
    return out


def _subschemas(keyword: str, value: Any) -> Any:
    if keyword in _VALUES:
        return value
    if keyword in _SCHEMA_MAPS and isinstance(value, dict):  # name -> schema
        return {name: enforceable(sub) for name, sub in value.items()}
    return enforceable(value)


def _reason(exc: Exception) -> str:
    """xgrammar's first message line without its "[time] file.cc:line: " prefix."""
    return re.sub(r"^\[[^\]]*\] \S+:\d+: ", "", str(exc).splitlines()[0])[:300]
