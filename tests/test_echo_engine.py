"""The echo engine answers a request for n choices with n choices, in the result shape the LLM engines use, so a
queue or `run` test with n > 1 sees what a model worker would write."""

import json

from batchgen.jobs.schema import CHAT_URL, ChatMessage, Choice, Request, SamplingParams, success_line
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.engine.protocol import GenerationRequest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.cli import batchgen


def echo(engine: EchoEngine, key: str, request: Request):
    assert engine.add([GenerationRequest(key, request)]) == []
    (result,) = engine.step()
    return result


def test_n_choices_each_echo_the_prompt_and_usage_counts_them_all():
    request = Request(custom_id="a", prompt="one two three four", params=SamplingParams(n=3, max_tokens=3))
    result = echo(EchoEngine(), "k", request)
    assert result.choices == [Choice("one two three", "length", num_tokens=3)] * 3
    assert (result.text, result.finish_reason) == ("one two three", "length")  # choice 0's, as of_choices sets
    assert (result.prompt_tokens, result.completion_tokens) == (4, 9)
    body = success_line(request, model="echo", text=result.text, finish_reason=result.finish_reason,
                        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        choices=result.choices)["response"]["body"]
    completion = Completion.model_validate(body)
    assert [c.index for c in completion.choices] == [0, 1, 2] and completion.usage.completion_tokens == 9


def test_one_choice_by_default():
    chat = Request(custom_id="b", url=CHAT_URL, messages=(ChatMessage(role="user", content="hi there"),))
    result = echo(EchoEngine(), "k", chat)
    assert result.choices == [Choice("hi there", "stop", num_tokens=2)] and result.completion_tokens == 2


def test_run_with_the_echo_engine_writes_n_choices_per_line(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": "chat", "url": CHAT_URL, "body": {"messages": [{"role": "user", "content": "a b c"}],
                                                             "n": 2}},
             {"custom_id": "plain", "url": "/v1/completions", "body": {"prompt": "x y", "n": 4, "max_tokens": 1}}]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batchgen("run", str(src), "-o", str(out), "--model", "m", "--engine", "echo", redis_url="x", check=True)
    written = {line["custom_id"]: line["response"]["body"] for line in map(json.loads, out.read_text().splitlines())}
    chat, plain = ChatCompletion.model_validate(written["chat"]), Completion.model_validate(written["plain"])
    assert [(c.index, c.message.content) for c in chat.choices] == [(0, "a b c"), (1, "a b c")]
    assert [(c.index, c.text, c.finish_reason) for c in plain.choices] == [(i, "x", "length") for i in range(4)]
    assert (chat.usage.completion_tokens, plain.usage.completion_tokens) == (6, 4)
