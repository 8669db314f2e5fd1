"""`batchgen serve` through the OpenAI SDK: what a client sends is honoured or refused by name. Batches: unknown
fields are refused, output_expires_after sets how long the results stay; uploads: expires_after sets expires_at,
and an expired upload is gone for every call, its bytes removed."""

import openai
import pytest
from batchgen.jobs.defaults import RESULT_TTL_S
from batchgen.jobs.files import file_key, files_index
from batchgen.jobs.keys import BatchKeys
from openai.types import FileObject

from tests.cli import eventually, start_worker
from tests.test_serve import PROMPTS, completion_lines, write_jsonl

HOUR = 3600


def upload(sdk: openai.OpenAI, tmp_path, model: str = "echo-m", **kw) -> FileObject:
    with open(write_jsonl(tmp_path / "b.jsonl", completion_lines(model, PROMPTS[:2])), "rb") as fh:
        return sdk.files.create(file=fh, purpose="batch", **kw)


def refusal(call, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as err:
        call(**kw)
    assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    return err.value.body


def test_a_batch_field_we_do_not_serve_and_a_bad_output_expiry_are_refused_by_name(server, tmp_path):
    sdk = server.sdk()
    create = {"input_file_id": upload(sdk, tmp_path).id, "endpoint": "/v1/completions", "completion_window": "24h"}
    body = refusal(sdk.batches.create, **create, extra_body={"priority": "high"})
    assert (body["param"], body["code"]) == ("priority", "unknown_parameter") and "'priority'" in body["message"]
    nested = {"anchor": "created_at", "seconds": HOUR, "unit": "s"}
    assert refusal(sdk.batches.create, **create, output_expires_after=nested)["param"] == "output_expires_after.unit"
    for policy, param in [({"anchor": "last_active_at", "seconds": HOUR}, "output_expires_after.anchor"),
                          ({"anchor": "created_at", "seconds": HOUR - 1}, "output_expires_after.seconds"),
                          ({"anchor": "created_at", "seconds": 30 * 24 * HOUR + 1}, "output_expires_after.seconds"),
                          ({"anchor": "created_at"}, "output_expires_after.seconds")]:
        body = refusal(sdk.batches.create, **create, output_expires_after=policy)
        assert body["param"] == param, body
    assert list(sdk.batches.list()) == []  # nothing refused was enqueued


def test_output_expires_after_sets_how_long_a_batchs_results_stay_once_it_ends(server, redis_url, redis_conn,
                                                                                tmp_path):
    sdk = server.sdk()
    create = {"input_file_id": upload(sdk, tmp_path).id, "endpoint": "/v1/completions", "completion_window": "24h"}
    short = sdk.batches.create(**create, output_expires_after={"anchor": "created_at", "seconds": 2 * HOUR})
    default = sdk.batches.create(**create)
    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    short, default = sdk.batches.retrieve(short.id), sdk.batches.retrieve(default.id)
    assert short.status == default.status == "completed"
    k = BatchKeys(short.id)
    for key in (k.record, k.outcomes, k.requests):
        assert 2 * HOUR - 60 < redis_conn.ttl(key) <= 2 * HOUR, key
    assert RESULT_TTL_S - 60 < redis_conn.ttl(BatchKeys(default.id).record) <= RESULT_TTL_S  # the default stays
    output = sdk.files.retrieve(short.output_file_id)  # the output file says when it goes, as OpenAI's does
    assert abs(output.expires_at - (short.completed_at + 2 * HOUR)) <= 2
    assert abs(redis_conn.ttl(k.sizes) - redis_conn.ttl(k.record)) <= 1  # its kept size goes with it
    assert sdk.files.retrieve(default.output_file_id).expires_at > short.completed_at + 6 * 24 * HOUR


def test_an_uploads_expires_after_sets_expires_at_and_bad_ones_are_refused_by_name(server, redis_conn, tmp_path):
    sdk = server.sdk()
    kept = upload(sdk, tmp_path)  # no policy: OpenAI's default for batch files, 30 days
    assert kept.expires_at == kept.created_at + 30 * 24 * HOUR
    assert 30 * 24 * HOUR - 60 < redis_conn.ttl(file_key(kept.id)) <= 30 * 24 * HOUR
    expiring = upload(sdk, tmp_path, expires_after={"anchor": "created_at", "seconds": HOUR})
    assert expiring.expires_at == expiring.created_at + HOUR
    assert sdk.files.retrieve(expiring.id).expires_at == expiring.expires_at
    assert HOUR - 60 < redis_conn.ttl(file_key(expiring.id)) <= HOUR
    for policy, param in [({"anchor": "last_active_at", "seconds": HOUR}, "expires_after.anchor"),
                          ({"anchor": "created_at", "seconds": 60}, "expires_after.seconds"),
                          ({"anchor": "created_at", "seconds": 30 * 24 * HOUR + 1}, "expires_after.seconds")]:
        assert refusal(upload, sdk=sdk, tmp_path=tmp_path, expires_after=policy)["param"] == param
    body = refusal(upload, sdk=sdk, tmp_path=tmp_path, extra_body={"retention": "forever"})
    assert (body["param"], body["code"]) == ("retention", "unknown_parameter")
    assert {f.id for f in sdk.files.list()} == {kept.id, expiring.id}  # nothing refused was stored
    assert len(list((tmp_path / "files").iterdir())) == 2


def test_an_expired_upload_is_gone_for_every_call_and_its_bytes_are_removed(server, redis_conn, tmp_path):
    """Redis expires the record at expires_at; an hour is too long to wait, so the test moves that moment to now."""
    sdk = server.sdk()
    policy = {"anchor": "created_at", "seconds": HOUR}
    met, listed, kept = (upload(sdk, tmp_path, expires_after=policy) for _ in range(3))
    on_disk = {f.id: tmp_path / "files" / f"{f.id}.jsonl" for f in (met, listed, kept)}
    for f in (met, listed):
        redis_conn.pexpire(file_key(f.id), 1)
    eventually(lambda: not redis_conn.exists(file_key(met.id), file_key(listed.id)), "Redis to expire the records")
    assert on_disk[met.id].exists()  # removed lazily: when a call meets the expired id

    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id=met.id, endpoint="/v1/completions", completion_window="24h")
    assert not on_disk[met.id].exists()
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(met.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(met.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.delete(met.id)

    assert on_disk[listed.id].exists()
    assert [f.id for f in sdk.files.list()] == [kept.id]
    assert not on_disk[listed.id].exists() and redis_conn.zrange(files_index(), 0, -1) == [kept.id]
    assert on_disk[kept.id].exists() and sdk.files.content(kept.id).content == on_disk[kept.id].read_bytes()
