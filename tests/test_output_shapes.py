"""Output lines as the openai SDK's own types read them, with their values consistent with each other."""

from batchgen.jobs.schema import Choice, Request, TokenLogprob, success_line
from openai.types import Completion


def test_completion_top_logprobs_keep_the_best_logprob_of_alternatives_that_read_alike():
    # Two alternatives decode to the same string (halves of multi-byte characters both read U+FFFD): the legacy
    # dict holds one entry for them, which must be the more likely one, not whichever came last.
    token = TokenLogprob("b", -3.0, (("\ufffd", -1.0), ("a", -1.5), ("\ufffd", -2.0)))
    line = success_line(Request(custom_id="p", prompt="hi"), model="m", prompt_tokens=1, completion_tokens=1,
                        choices=[Choice("b", "length", None, 1, (token,))])
    logprobs = Completion.model_validate(line["response"]["body"]).choices[0].logprobs
    assert logprobs.top_logprobs == [{"\ufffd": -1.0, "a": -1.5, "b": -3.0}]
    assert logprobs.top_logprobs[0][logprobs.tokens[0]] == logprobs.token_logprobs[0]
