"""End to end on the real 8-bit model: CLI submit -> Redis/RQ -> subprocess worker -> results.

Oracle: HF `generate` per prompt, greedy, on the same tiny model loaded in 8-bit in this process.
The worker runs with --max-batch 3 so rows finish and are refilled mid-flight across chunks.
"""

import json

import pytest

from tests.cli import batchgen, start_worker

pytestmark = pytest.mark.slow

PROMPTS = [
    "the quick brown fox",
    "write a short poem about the sea and the stars",
    "hello",
    "what is the capital of france and why is it famous",
    "list three prime numbers",
    "explain how a queue of jobs works in redis please",
    "batch generation keeps the gpu busy",
]
CHAT = [{"role": "user", "content": "translate hello world into french"}]


@pytest.fixture(scope="module")
def oracle(demo_model_dir):
    """Greedy HF generate, one prompt at a time, on the same model in 8-bit as the engine converts it (its int8
    kernels, the down projections' inputs rotated by default)."""
    import torch
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=1))
    model, tok = engine.model, engine.tokenizer

    def generate(ids: list[int], max_tokens: int) -> str:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = [t for t in out[0, len(ids):].tolist() if t != tok.eos_token_id]
        return tok.decode(new, skip_special_tokens=True)

    def for_prompt(prompt: str, max_tokens: int) -> str:
        return generate(tok(prompt)["input_ids"], max_tokens)

    def for_chat(messages, max_tokens: int) -> str:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return generate(tok(text, add_special_tokens=False)["input_ids"], max_tokens)

    return for_prompt, for_chat


def mixed_batch(model: str) -> list[dict]:
    rows = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": p, "max_tokens": 4 + 3 * (i % 4), "temperature": 0}}
            for i, p in enumerate(PROMPTS)]
    rows.append({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": model, "messages": CHAT, "max_tokens": 9, "temperature": 0}})
    return rows


def texts(lines: list[dict]) -> dict[str, str]:
    out = {}
    for ln in lines:
        choice = ln["response"]["body"]["choices"][0]
        out[ln["custom_id"]] = choice["message"]["content"] if "message" in choice else choice["text"]
    return out


def test_queue_results_equal_the_oracle_and_local_run(demo_model_dir, oracle, redis_url, redis_conn, tmp_path):
    for_prompt, for_chat = oracle
    rows = mixed_batch("demo")
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sub = batchgen("submit", str(src), "--json", "--output-dir", str(tmp_path / "out"),
                   redis_url=redis_url, check=True, BATCHGEN_CHUNK_SIZE="3")
    batch = json.loads(sub.stdout)
    assert batch["model"] == "demo"

    worker = start_worker("--model", str(demo_model_dir), "--served-model-name", "demo", "--max-batch", "3",
                          "--burst", redis_url=redis_url, log=tmp_path / "worker.log")
    assert worker.wait(timeout=240) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert batchgen("wait", batch["id"], "--timeout", "10", redis_url=redis_url).returncode == 0

    out = tmp_path / "results.jsonl"
    batchgen("results", batch["id"], "-o", str(out), redis_url=redis_url, check=True)
    got = texts([json.loads(x) for x in out.read_text().splitlines()])
    expected = {r["custom_id"]: for_prompt(r["body"]["prompt"], r["body"]["max_tokens"])
                for r in rows if "prompt" in r["body"]}
    expected["chat"] = for_chat(CHAT, 9)
    assert got == expected

    on_disk = texts([json.loads(x) for x in (tmp_path / "out" / f"{batch['id']}.output.jsonl").read_text().splitlines()])
    assert on_disk == expected

    local = tmp_path / "local.jsonl"
    run = batchgen("run", str(src), "-o", str(local), "--model", str(demo_model_dir), "--served-model-name", "demo",
                   "--max-batch", "2", "--json", redis_url=redis_url, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert texts([json.loads(x) for x in local.read_text().splitlines()]) == expected


def test_text_and_directory_inputs_run_on_the_model(demo_model_dir, redis_url, redis_conn, tmp_path):
    (tmp_path / "prompts.txt").write_text("the quick brown fox\n\nhello there\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("write a short poem")
    (docs / "b.txt").write_text("list three prime numbers")
    ids = []
    for src in (tmp_path / "prompts.txt", docs):
        sub = batchgen("submit", str(src), "--model", "demo", "--max-tokens", "5", "--temperature", "0",
                       redis_url=redis_url, check=True)
        ids.append(sub.stdout.decode().strip())
    worker = start_worker("--model", str(demo_model_dir), "--served-model-name", "demo", "--burst",
                          redis_url=redis_url, log=tmp_path / "worker.log")
    assert worker.wait(timeout=240) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    custom_ids = set()
    for batch_id in ids:
        status = json.loads(batchgen("status", batch_id, "--json", redis_url=redis_url, check=True).stdout)
        assert status["status"] == "completed" and status["request_counts"]["failed"] == 0
        out = tmp_path / f"{batch_id}.jsonl"
        batchgen("results", batch_id, "-o", str(out), redis_url=redis_url, check=True)
        for ln in out.read_text().splitlines():
            line = json.loads(ln)
            custom_ids.add(line["custom_id"])
            assert line["response"]["body"]["usage"]["completion_tokens"] == 5
    assert custom_ids == {"1", "3", "a.txt", "b.txt"}
