"""`batchgen serve` with odd requests: what a client sends gets OpenAI's (or Anthropic's) 4xx error object, never a
bare 500 or a torn response, and pages, file ids and messages stay what api.openai.com would give."""

import json
import urllib.error
import urllib.request

import openai
import pytest
from batchgen.jobs.keys import BatchKeys
from openai.types import Batch

from tests.test_serve import PROMPTS, Server, completion_lines, write_jsonl


def upload(sdk: openai.OpenAI, tmp_path, name: str = "b.jsonl") -> str:
    with open(write_jsonl(tmp_path / name, completion_lines("m", PROMPTS[:2])), "rb") as fh:
        return sdk.files.create(file=fh, purpose="batch").id


def post_raw(server: Server, path: str, body: bytes) -> tuple[int, dict]:
    """A JSON body as bytes, as a client other than the SDK may send it (e.g. with a lone surrogate escape)."""
    request = urllib.request.Request(server.base + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def get_raw(server: Server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.base + path, timeout=60) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_a_lone_surrogate_in_a_batch_body_is_refused_by_field_not_a_500(server, tmp_path):
    file_id = upload(server.sdk(), tmp_path)
    create = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    for body, param in [({**create, "metadata": {"k": "\ud800"}}, "metadata.k"),
                        ({**create, "metadata": {"\udfff": "v"}}, "metadata"),
                        ({**create, "input_file_id": file_id + "\ud800"}, "input_file_id")]:
        status, answer = post_raw(server, "/v1/batches", json.dumps(body).encode())  # sent as a \ud800 escape
        assert status == 400, answer
        error = answer["error"]
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_encoding", param)
        assert "surrogate" in error["message"]
    assert list(server.sdk().batches.list()) == []


@pytest.mark.parametrize("request_", [
    {"custom_id": "\ud800", "params": {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}},
    {"custom_id": "a", "params": {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "\udc80"}]}},
])
def test_a_lone_surrogate_in_a_message_batch_is_refused_in_anthropics_shape(server, request_):
    status, answer = post_raw(server, "/v1/messages/batches", json.dumps({"requests": [request_]}).encode())
    assert status == 400, answer
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert "surrogate" in answer["error"]["message"] and "requests.0" in answer["error"]["message"]


@pytest.mark.parametrize("window", ["9" * 400 + "h", "9" * 5000 + "h", "24h\n", "\u0662\u0664h"])
def test_a_completion_window_past_any_sane_bound_is_a_400_not_a_500(server, tmp_path, window):
    file_id = upload(server.sdk(), tmp_path)
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": window}
    status, answer = post_raw(server, "/v1/batches", json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["param"] == "completion_window"
    assert list(server.sdk().batches.list()) == []


def test_an_upload_expiry_of_thousands_of_digits_is_a_400_not_a_500(server, tmp_path):
    line = json.dumps(completion_lines("m", PROMPTS[:1])[0]).encode()
    fields = [(b'name="purpose"', b"batch"), (b'name="expires_after[anchor]"', b"created_at"),
              (b'name="expires_after[seconds]"', b"9" * 5000), (b'name="file"; filename="b.jsonl"', line)]
    body = b"".join(b"--B\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n" + value + b"\r\n"
                    for head, value in fields) + b"--B--\r\n"
    request = urllib.request.Request(server.base + "/v1/files", data=body, method="POST",
                                     headers={"Content-Type": "multipart/form-data; boundary=B"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400 and json.load(err.value)["error"]["param"] == "expires_after.seconds"
    assert list(server.sdk().files.list()) == []


def test_batches_page_past_batches_whose_results_expired(server, redis_conn, tmp_path):
    """A batch's keys expire with its results (output_expires_after) while its id stays in the index: a page must
    still hold `limit` live batches, and has_more/last_id must lead to the rest, never to an empty page."""
    sdk = server.sdk()
    file_id = upload(sdk, tmp_path)
    created = [sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id
               for _ in range(7)]
    newest_first = [b.id for b in sdk.batches.list(limit=100)]
    assert sorted(newest_first) == sorted(created)
    gone = newest_first[1:5]  # as when these had a shorter output_expires_after
    for batch_id in gone:
        redis_conn.delete(*BatchKeys(batch_id).all())
    live = [b for b in newest_first if b not in gone]

    first = server.get_json("/v1/batches?limit=2")
    assert [b["id"] for b in first["data"]] == live[:2] and first["has_more"]
    assert first["last_id"] == live[1]
    rest = server.get_json(f"/v1/batches?limit=2&after={first['last_id']}")
    assert [b["id"] for b in rest["data"]] == live[2:] and not rest["has_more"]
    assert [b.id for b in sdk.batches.list(limit=1)] == live  # the SDK's cursor reaches every live batch


def test_a_batch_of_a_changed_file_does_not_show_the_servers_path(server, tmp_path):
    sdk = server.sdk()
    file_id = upload(sdk, tmp_path)
    (server.files_dir / f"{file_id}.jsonl").write_bytes(b"")  # the bytes on disk are no longer what was checked
    with pytest.raises(openai.BadRequestError) as err:
        sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    assert err.value.body["param"] == "input_file_id"
    assert str(server.files_dir) not in err.value.body["message"] and "b.jsonl" in err.value.body["message"]


def test_the_content_of_an_upload_whose_bytes_are_gone_is_an_error_object_not_a_torn_stream(server, tmp_path):
    sdk = server.sdk()
    file_id = upload(sdk, tmp_path)
    (server.files_dir / f"{file_id}.jsonl").unlink()  # e.g. a server restarted on another --files-dir
    status, body = get_raw(server, f"/v1/files/{file_id}/content")
    assert status >= 400 and json.loads(body)["error"]["message"]
    assert str(server.files_dir) not in body.decode()


def test_a_batch_output_file_is_refused_as_batch_input_by_its_purpose(server, tmp_path):
    sdk = server.sdk()
    file_id = upload(sdk, tmp_path)
    cancelled = sdk.batches.cancel(sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                                      completion_window="24h").id)
    assert sdk.files.retrieve(cancelled.error_file_id).purpose == "batch_output"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.batches.create(input_file_id=cancelled.error_file_id, endpoint="/v1/completions",
                           completion_window="24h")
    assert err.value.body["param"] == "input_file_id" and "batch_output" in err.value.body["message"]


def test_a_result_file_the_batch_does_not_name_is_not_found(server, tmp_path):
    """OpenAI's output_file_id is null when no request succeeded: there is no such file to retrieve or read."""
    sdk = server.sdk()
    file_id = upload(sdk, tmp_path)
    cancelled = Batch.model_validate(sdk.batches.cancel(sdk.batches.create(
        input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id).model_dump())
    assert cancelled.output_file_id is None and cancelled.error_file_id
    missing = f"file-output-{cancelled.id}"
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(missing)
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(missing)
    assert sdk.files.retrieve(cancelled.error_file_id).bytes > 0
    with pytest.raises(openai.NotFoundError):
        sdk.files.delete("file-output-batch_nosuchbatch")


def test_a_files_list_order_other_than_asc_or_desc_is_a_400(server, tmp_path):
    sdk = server.sdk()
    uploaded = {upload(sdk, tmp_path, "a.jsonl"), upload(sdk, tmp_path, "b.jsonl")}
    newest_first = [f.id for f in sdk.files.list()]
    assert set(newest_first) == uploaded and [f.id for f in sdk.files.list(order="asc")] == newest_first[::-1]
    status, body = get_raw(server, "/v1/files?order=newest")
    assert status == 400 and json.loads(body)["error"]["param"] == "order"


@pytest.mark.parametrize("interval", ["0", "-1", "nan"])
def test_a_history_interval_that_is_no_positive_number_is_a_usage_error(interval, redis_url):
    """0 divided the charts' length by zero and spun the sampler; NaN passed the range check and did the same."""
    from tests.cli import batchgen

    proc = batchgen("serve", "--history-interval", interval, redis_url=redis_url, timeout=30)
    assert proc.returncode == 2 and b"history-interval" in proc.stderr, proc.stderr
