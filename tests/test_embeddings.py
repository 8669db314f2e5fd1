"""/v1/embeddings lines, as OpenAI's Batch API and `vllm run-batch` run them: parsed and refused by field name,
embedded by a base model loaded in 8-bit (a tiny random Llama and a tiny random BERT, saved to disk and loaded by
path), each vector equal to one computed with HF directly, answered as OpenAI's CreateEmbeddingResponse."""

import base64
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from batchgen.jobs.embeddings import embeddings_request
from batchgen.jobs.formats import LineError
from batchgen.jobs.schema import EMBEDDINGS_URL, Request, encode_embedding, success_line, usage_of
from batchgen.worker.engine.embed_planner import plan
from batchgen.worker.engine.pooling import UnsupportedPooling, read_pooling
from batchgen.worker.engine.task import embedding_evidence
from openai.types import Batch, CreateEmbeddingResponse
from pydantic import ValidationError

from tests.cli import batchgen, start_worker
from tests.test_serve import Server
from tests.test_strict_input import parse

# An 8-bit vector against the same 8-bit load's, one text at a time: batch shapes may move it a little; float32's is
# about 4e-4 away in cosine, so this tells the two loads apart.
SAME = 1 - 1e-5
TEXTS = ["the quick brown fox", "write a short poem about the sea and the stars and the night", "hello",
         "what is the capital of france and why is it famous", "list three prime numbers"]


def line(custom_id: str, body: dict, url: str = EMBEDDINGS_URL) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> dict[str, dict]:
    return {x["custom_id"]: x for x in map(json.loads, path.read_text().splitlines())}


# -- parsing ---------------------------------------------------------------------------------------------------

def test_an_embeddings_line_is_its_inputs_format_and_dimensions():
    [one, many] = parse(json.dumps(line("a", {"model": "m", "input": "hello", "user": "u-1"})),
                        json.dumps(line("b", {"input": ["x", "y z"], "encoding_format": "base64", "dimensions": 32})))
    assert (one.request.inputs, one.request.encoding_format, one.request.dimensions) == (("hello",), "float", None)
    assert one.ignored == ("user",)  # OpenAI's abuse-monitoring field: accepted, logged, no effect
    assert (many.request.inputs, many.request.encoding_format, many.request.dimensions) == (("x", "y z"), "base64", 32)


@pytest.mark.parametrize(("body", "code", "message"), [
    ({}, "missing_field", "body.input: required"),
    ({"input": [1, 2, 3]}, "unsupported_parameter", "body.input: token-id inputs are not supported"),
    ({"input": [[1, 2], [3]]}, "unsupported_parameter", "body.input: token-id inputs are not supported"),
    ({"input": ""}, "invalid_value", "body.input: must not be empty"),
    ({"input": []}, "invalid_value", "body.input: must not be empty"),
    ({"input": ["a", " \u200b"]}, "invalid_value", "body.input.1: must not be empty"),
    ({"input": ["a", 3]}, "invalid_type", "body.input.1: must be a string, not a number"),
    ({"input": {"text": "a"}}, "invalid_type", "body.input: must be a string or a list of strings, not an object"),
    ({"input": ["a"] * 2049}, "invalid_value", "body.input: at most 2048 inputs, not 2049"),
    ({"input": "a", "encoding_format": "int8"}, "invalid_value", "body.encoding_format: must be 'float' or 'base64'"),
    ({"input": "a", "dimensions": 0}, "invalid_value", "body.dimensions: must be >= 1"),
    ({"input": "a", "dimensions": "8"}, "invalid_type", "body.dimensions: must be an integer"),
    ({"input": "a", "dimensions": True}, "invalid_type", "body.dimensions: must be an integer"),
    ({"input": "a", "model": 7}, "invalid_type", "body.model: must be a string"),
    ({"input": "a", "normalize": False}, "unsupported_parameter", "body.normalize: unknown parameter"),
    ({"input": "a", "truncate_prompt_tokens": 8}, "unsupported_parameter", "body.truncate_prompt_tokens: unknown"),
    ({"input": "a", "max_tokens": 8}, "unsupported_parameter", "body.max_tokens: unknown parameter"),
    ({"input": "a", "metadata": {}}, "unsupported_parameter", "body.metadata: unknown parameter"),
])
def test_a_bad_embeddings_field_is_refused_by_name(body, code, message):
    [refused] = parse(json.dumps(line("a", body)))
    assert refused.error.code == code and refused.error.message.startswith(message), refused.error


def test_the_envelope_names_embeddings_among_its_urls_and_a_chat_body_there_is_refused():
    [unknown, chat] = parse(json.dumps(line("a", {"input": "x"}, url="/v1/moderations")),
                            json.dumps(line("b", {"messages": [{"role": "user", "content": "x"}]})))
    assert unknown.error.code == "unknown_url" and "/v1/embeddings" in unknown.error.message
    assert (chat.error.code, chat.error.message) == ("unsupported_parameter", "body.messages: unknown parameter")


def test_a_stored_request_holds_inputs_only_with_the_embeddings_url():
    with pytest.raises(ValidationError, match="inputs go with url /v1/embeddings"):
        Request(custom_id="a", url="/v1/completions", prompt=None, inputs=("x",))
    with pytest.raises(ValidationError, match="encoding_format and dimensions need url"):
        Request(custom_id="a", prompt="x", encoding_format="base64")
    with pytest.raises(LineError):
        embeddings_request({"input": None}, custom_id="a", line=1)


def test_float_and_base64_hold_the_same_float32_values_and_usage_counts_input_tokens_only():
    vector = np.random.default_rng(0).standard_normal(48).astype("<f4")
    floats = encode_embedding(vector.tobytes(), "float")
    assert np.array_equal(np.array(floats, dtype=np.float32), vector)  # 9 digits read back as the same float32
    assert np.array_equal(np.frombuffer(base64.b64decode(encode_embedding(vector.tobytes(), "base64")), "<f4"), vector)
    request = Request(custom_id="a", url=EMBEDDINGS_URL, inputs=("x", "y"))
    out = success_line(request, model="m", prompt_tokens=7, completion_tokens=0, embeddings=[vector.tobytes()] * 2)
    body = CreateEmbeddingResponse.model_validate(out["response"]["body"])
    assert [d.index for d in body.data] == [0, 1] and body.usage.prompt_tokens == body.usage.total_tokens == 7
    assert usage_of(out) == (7, 0)


# -- batching and the model's own configuration ----------------------------------------------------------------

def test_the_oldest_input_always_runs_with_the_inputs_nearest_its_length_within_the_budget():
    assert plan([10, 90, 11, 40, 9, 12], max_tokens=40, max_rows=8) == [0, 2, 4]  # 3 rows x 11 tokens; 12 breaks it
    assert plan([10, 10, 10, 10], max_tokens=1000, max_rows=2) == [0, 1]
    assert plan([500, 10, 10], max_tokens=100, max_rows=8) == [0]  # too long for the budget: alone, never starved
    assert plan([], max_tokens=100, max_rows=8) == []


def write_st_config(model_dir: Path, pooling: dict, modules: tuple[str, ...] = ("Pooling", "Normalize"),
                    **bert_config) -> Path:
    """sentence-transformers' files as it saves them: modules.json, 1_Pooling/config.json, sentence_bert_config."""
    entries = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    entries += [{"idx": i, "name": str(i), "path": f"{i}_{kind}", "type": f"sentence_transformers.models.{kind}"}
                for i, kind in enumerate(modules, start=1)]
    (model_dir / "modules.json").write_text(json.dumps(entries))
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    flags = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, **{f"pooling_mode_{f}": f in pooling for f in flags}, "include_prompt": True}))
    if bert_config:
        (model_dir / "sentence_bert_config.json").write_text(json.dumps(bert_config))
    return model_dir


def test_a_sentence_transformers_config_sets_the_pooling_else_the_model_kind_does(tmp_path):
    (tmp_path / "st").mkdir()
    st = write_st_config(tmp_path / "st", {"cls_token"}, max_seq_length=16, do_lower_case=True)
    pooling = read_pooling(str(st), decoder_only=True)
    assert (pooling.mode, pooling.max_seq_length, pooling.lowercase) == ("cls", 16, True)
    assert read_pooling(str(tmp_path), decoder_only=True).mode == "lasttoken"
    assert read_pooling(str(tmp_path), decoder_only=False).mode == "mean"


@pytest.mark.parametrize(("pooling", "modules", "message"), [
    ({"max_tokens"}, ("Pooling",), "pooling max is not supported"),
    ({"cls_token", "mean_tokens"}, ("Pooling",), "pooling cls+mean is not supported"),
    ({"mean_tokens"}, ("Pooling", "Dense"), "module '2_Dense' (sentence_transformers.models.Dense) is not supported"),
])
def test_a_sentence_transformers_pipeline_we_would_not_reproduce_is_refused_at_start_up(tmp_path, pooling, modules,
                                                                                        message):
    write_st_config(tmp_path, pooling, modules)
    with pytest.raises(UnsupportedPooling, match=re.escape(message)):
        read_pooling(str(tmp_path), decoder_only=False)


def test_auto_embeds_with_a_sentence_transformers_model_an_encoder_or_a_base_model_only(tmp_path):
    from transformers import BertConfig, LlamaConfig

    assert embedding_evidence(str(tmp_path), LlamaConfig(architectures=["LlamaForCausalLM"])) is None
    assert embedding_evidence(str(tmp_path), BertConfig()) == "bert is not a decoder-only causal LM"
    assert "MistralModel" in embedding_evidence(str(tmp_path), LlamaConfig(architectures=["MistralModel"]))
    assert embedding_evidence(str(tmp_path), LlamaConfig(architectures=["GPT2LMHeadModel"])) is None
    write_st_config(tmp_path, {"lasttoken"})
    assert "modules.json" in embedding_evidence(str(tmp_path), LlamaConfig(architectures=["Qwen3ForCausalLM"]))


# -- through `batchgen run`, against HF ------------------------------------------------------------------------

def write_bert(out: Path, tokenizer_dir: Path, **config) -> Path:
    """A tiny random BertModel (no head, as embedding models are saved) with the demo model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                 **config))
    with torch.no_grad():  # larger than the default init, so 8-bit rounding does not decide the vectors
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert_dir(demo_model_dir, tmp_path_factory) -> Path:
    return write_bert(tmp_path_factory.mktemp("bert"), demo_model_dir, is_matryoshka=True)


def oracle(model_dir: Path, texts: list[str], mode: str, *, int8: bool, dimensions: int | None = None,
           lowercase: bool = False) -> list[np.ndarray]:
    """Each text alone through HF's AutoModel (the same 8-bit load, or float32), pooled, cut and normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": "cpu"}} if int8 else {}
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    vectors = []
    for text in texts:
        with torch.no_grad():
            states = model(**tok(text.lower() if lowercase else text, return_tensors="pt")).last_hidden_state[0]
        vector = {"mean": states.mean(0), "cls": states[0], "lasttoken": states[-1]}[mode][:dimensions]
        vectors.append(torch.nn.functional.normalize(vector, dim=0).numpy())
    return vectors


def run(tmp_path: Path, rows: list[dict], redis_url: str, *args: str) -> dict[str, dict]:
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    batchgen("run", str(src), "-o", str(out), *args, redis_url=redis_url, check=True, timeout=300)
    return read_jsonl(out)


def vectors_of(result: dict) -> list[np.ndarray]:
    body = result["response"]["body"]
    CreateEmbeddingResponse.model_validate(body)
    return [np.array(d["embedding"], dtype=np.float32) for d in body["data"]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.slow
def test_a_decoder_embeds_with_its_last_token_in_8bit_and_a_generation_line_fails_alone(demo_model_dir, redis_url,
                                                                                      tmp_path):
    rows = [line("one", {"model": "m", "input": TEXTS[0]}), line("many", {"model": "m", "input": TEXTS[1:]}),
            line("b64", {"model": "m", "input": TEXTS[1:], "encoding_format": "base64"}),
            line("gen", {"model": "m", "prompt": "hello", "max_tokens": 4}, url="/v1/completions")]
    results = run(tmp_path, rows, redis_url, "--model", str(demo_model_dir), "--task", "embed")
    got = vectors_of(results["one"]) + vectors_of(results["many"])
    want = oracle(demo_model_dir, TEXTS, "lasttoken", int8=True)
    assert min(cosine(g, w) for g, w in zip(got, want, strict=True)) > SAME
    assert all(abs(np.linalg.norm(g) - 1) < 1e-5 for g in got)
    b64 = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in results["b64"]["response"]["body"]["data"]]
    assert all(np.array_equal(a, b) for a, b in zip(b64, vectors_of(results["many"]), strict=True))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    assert usage_of(results["many"]) == (sum(len(tok(t)["input_ids"]) for t in TEXTS[1:]), 0)
    error = results["gen"]["response"]["body"]["error"]
    assert error["code"] == "unsupported_endpoint" and "/v1/embeddings only" in error["message"]


@pytest.mark.slow
def test_an_encoder_is_found_by_itself_and_means_its_tokens_exactly_in_float32(bert_dir, redis_url, tmp_path):
    """No --task: a BERT is an embedding model. Matryoshka (config.is_matryoshka) vectors shorten and renormalise."""
    long_text = " ".join(TEXTS * 4)  # past the 64 positions: that line fails alone
    rows = [line("all", {"model": "m", "input": TEXTS}), line("short", {"model": "m", "input": TEXTS, "dimensions": 16}),
            line("long", {"model": "m", "input": [TEXTS[0], long_text]})]
    results = run(tmp_path, rows, redis_url, "--model", str(bert_dir), "--no-8bit")
    for got, want in zip(vectors_of(results["all"]), oracle(bert_dir, TEXTS, "mean", int8=False), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for got, want in zip(vectors_of(results["short"]), oracle(bert_dir, TEXTS, "mean", int8=False, dimensions=16),
                         strict=True):
        assert got.shape == (16,)
        np.testing.assert_allclose(got, want, atol=1e-5)
    error = results["long"]["response"]["body"]["error"]
    assert error["code"] == "context_length_exceeded" and error["message"].startswith("input 1 (")


@pytest.mark.slow
def test_a_sentence_transformers_config_chooses_the_pooling_and_the_length_in_8bit(demo_model_dir, redis_url,
                                                                                  tmp_path):
    """A decoder shipping modules.json is an embedding model without --task; its Pooling config says cls here, and
    sentence_bert_config's max_seq_length and do_lower_case apply as sentence-transformers applies them."""
    st_dir = write_st_config(Path(shutil.copytree(demo_model_dir, tmp_path / "st")), {"cls_token"},
                             max_seq_length=12, do_lower_case=True)
    texts = ["The QUICK brown fox", "Hello"]
    rows = [line("ok", {"input": texts}), line("long", {"input": TEXTS[1]}),
            line("short", {"input": "hello", "dimensions": 8})]
    results = run(tmp_path, rows, redis_url, "--model", str(st_dir))
    got, want = vectors_of(results["ok"]), oracle(st_dir, texts, "cls", int8=True, lowercase=True)
    assert min(cosine(g, w) for g, w in zip(got, want, strict=True)) > SAME
    assert results["long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    error = results["short"]["response"]["body"]["error"]  # a Llama without matryoshka: no shortened vectors
    assert error["code"] == "unsupported_parameter" and error["message"].startswith("dimensions: model")


def test_a_generation_worker_fails_an_embeddings_line_alone(redis_url, tmp_path):
    rows = [line("e", {"model": "m", "input": "hello"}),
            line("c", {"model": "m", "prompt": "hello there", "max_tokens": 4}, url="/v1/completions")]
    results = run(tmp_path, rows, redis_url, "--engine", "echo", "--model", "m")
    assert results["c"]["response"]["body"]["choices"][0]["text"] == "hello there"
    error = results["e"]["response"]["body"]["error"]
    assert error["code"] == "unsupported_endpoint" and "--task embed" in error["message"]


# -- through Redis: submit and the OpenAI SDK against a real worker --------------------------------------------

@pytest.mark.slow
def test_an_sdk_embeddings_batch_and_a_submitted_one_run_on_an_embedding_worker(bert_dir, redis_url, redis_conn,
                                                                                tmp_path):
    server = Server(redis_url, tmp_path / "files", tmp_path / "serve.log").start()
    try:
        sdk = server.sdk()
        src = write_jsonl(tmp_path / "sdk.jsonl", [line(f"s{i}", {"model": "bert", "input": t})
                                                   for i, t in enumerate(TEXTS)])
        with open(src, "rb") as fh:
            uploaded = sdk.files.create(file=fh, purpose="batch")
        with pytest.raises(openai.BadRequestError, match="endpoint"):  # every line's url must be the batch's
            sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
        batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        cli_src = write_jsonl(tmp_path / "cli.jsonl", [line("c0", {"input": TEXTS[:2], "encoding_format": "base64"})])
        submitted = batchgen("submit", str(cli_src), "--model", "bert", redis_url=redis_url, check=True)
        cli_id = submitted.stdout.decode().strip()
        worker = start_worker("--model", str(bert_dir), "--served-model-name", "bert", "--burst",
                              redis_url=redis_url, log=tmp_path / "worker.log")
        assert worker.wait(timeout=180) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        while (batch := sdk.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired"):
            time.sleep(0.2)
        Batch.model_validate(server.get_json(f"/v1/batches/{batch.id}"))
        assert batch.status == "completed" and batch.request_counts.completed == len(TEXTS)
        assert batch.endpoint == "/v1/embeddings" and batch.usage.output_tokens == 0 < batch.usage.input_tokens
        lines = {x["custom_id"]: x for x in map(json.loads, sdk.files.content(batch.output_file_id).text.splitlines())}
        want = oracle(bert_dir, TEXTS, "mean", int8=True)
        assert min(cosine(vectors_of(lines[f"s{i}"])[0], w) for i, w in enumerate(want)) > SAME

        exported = batchgen("results", cli_id, "-o", "-", redis_url=redis_url, check=True).stdout.decode()
        [result] = map(json.loads, exported.splitlines())
        b64 = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in result["response"]["body"]["data"]]
        assert min(cosine(g, w) for g, w in zip(b64, want[:2], strict=True)) > SAME
    finally:
        server.stop()
