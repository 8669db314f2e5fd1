"""Structured output (response_format json_object / json_schema) with xgrammar: a grammar matcher per row, and
one batched bitmask fill + apply per step over the rows that have one.

The compiler is built once per tokenizer, on the first request that needs it (a worker that never sees JSON mode
never imports xgrammar), and caches compiled grammars, so a batch of lines sharing a schema compiles it once.
"""

from collections.abc import Sequence as Seq

import torch
from batchgen.jobs.schema import SamplingParams
from batchgen.worker.engine.sequence import Sequence

JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's JSON mode: the output is one JSON object


class InvalidSchema(ValueError):
    """A json_schema the grammar compiler refuses."""


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
        schema = params.json_schema if params.response_format == "json_schema" else JSON_OBJECT_SCHEMA
        try:
            compiled = self.compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses with the reason
            raise InvalidSchema(str(exc).splitlines()[0][:300]) from None
        return self._xgr.GrammarMatcher(compiled)

    def mask(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
        """Sets to -inf every token the row's grammar cannot take next (rows without a matcher are untouched)."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return
        bitmask = self._xgr.allocate_token_bitmask(len(seqs), self.vocab_size)
        self.batch.batch_fill_next_token_bitmask([seqs[i].matcher for i in rows], bitmask, indices=rows)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                              indices=rows)
