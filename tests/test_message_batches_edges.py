"""Edges of the Anthropic Message Batches side met through its SDK and its request shape: deleting a batch, and
consecutive turns of one role (which Anthropic's Messages API combines into one turn)."""

import json

import anthropic
import pytest
from anthropic.types.messages import DeletedMessageBatch

from tests.test_serve_message_batches import requests_for, sdk_of
from tests.test_strict_input import parse


def test_delete_removes_an_ended_message_batch_and_refuses_one_still_processing(server):
    sdk = sdk_of(server)
    batch = sdk.messages.batches.create(requests=requests_for("echo-m"))
    with pytest.raises(anthropic.BadRequestError, match="cancel") as refused:  # no worker: still in progress
        sdk.messages.batches.delete(batch.id)
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert sdk.messages.batches.retrieve(batch.id).processing_status == "in_progress"

    sdk.messages.batches.cancel(batch.id)
    deleted = sdk.messages.batches.delete(batch.id)
    assert isinstance(deleted, DeletedMessageBatch)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    for call in (sdk.messages.batches.retrieve, sdk.messages.batches.delete, sdk.messages.batches.results):
        with pytest.raises(anthropic.NotFoundError):
            call(batch.id)
    assert batch.id not in [b.id for b in sdk.messages.batches.list()]


def message_batch_line(messages: list[dict], custom_id: str = "r1") -> str:
    return json.dumps({"custom_id": custom_id, "params": {"max_tokens": 5, "messages": messages}})


def test_consecutive_turns_of_one_role_are_one_turn():
    """Anthropic combines consecutive user (or assistant) turns into one: the prompt holds one turn, as if its
    blocks were one message's, so a chat template that insists on alternation still renders it."""
    [split, blocks, prefill] = parse(
        message_batch_line([{"role": "user", "content": "a"},
                            {"role": "user", "content": [{"type": "text", "text": "b"}]},
                            {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]),
        message_batch_line([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                            {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}], "r2"),
        message_batch_line([{"role": "user", "content": "q"}, {"role": "assistant", "content": "The"},
                            {"role": "assistant", "content": "answer is"}], "r3"))
    turns = [(m.role, m.content) for m in split.request.messages]
    assert turns == [(m.role, m.content) for m in blocks.request.messages] == [
        ("user", "a\nb"), ("assistant", "c"), ("user", "d")]
    assert [(m.role, m.content) for m in prefill.request.messages] == [("user", "q"), ("assistant", "The\nanswer is")]
    assert prefill.request.continue_final_message and not prefill.request.add_generation_prompt
