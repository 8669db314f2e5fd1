"""Any causal LM transformers loads in 8-bit answers a batch: tiny random models of each architecture, through the
engine, `batchgen run` and a real queue worker, against HF `generate` (greedy, one prompt at a time, same model).

The path (fast or generic) is chosen from config.json before any weight loads; encoders are refused and a
missing model is a one-line error, both before any engine work. Qwen3, Gemma, Gemma2, Phi-3 and windowed
Mistral run on the fast path (Llama's forward plus a FamilySpec); the int8 oracle is HF generate
on the engine's own converted model (its linears run the engine's int8 kernels), the fp32 one a fresh load.
"""

import json
import logging

import pytest
import torch
from batchgen.jobs.schema import CHAT_URL, ChatMessage, Request, SamplingParams
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.families import FAST, GENERIC, ModelNotFound, UnsupportedModel, choose_family
from batchgen.worker.engine.generic import GenericEngine, prefill_cache_bytes
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.padded_batch import prefill
from batchgen.worker.engine.protocol import GenerationRequest
from batchgen.worker.factory import build_llm_engine

from tests.cli import batchgen, start_worker
from tests.models import ARCHITECTURES, WINDOW, write_tiny_model

PROMPTS = [
    "the quick brown fox jumps over the lazy dog and then the sea",  # longer than WINDOW tokens
    "hello",
    "write a short poem about the sea and the stars",
    "list three prime numbers larger than one hundred",
    "what is the capital of france",
    "explain how a queue of jobs works in redis please",
    "batch generation keeps the gpu busy",
]
CHAT = [{"role": "user", "content": "translate hello world into french"}]
FAST_ARCHITECTURES = {"qwen3", "gemma", "gemma2", "phi3", "mistral_window"}  # the rest take the generic path


def max_tokens(i: int) -> int:
    return 4 + 3 * (i % 4)  # rows finish at different steps, so freed rows are refilled mid-flight


@pytest.fixture(scope="module")
def model_dir(demo_model_dir, tmp_path_factory):
    """arch -> a saved tiny random model of it (built once per module)."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = write_tiny_model(tmp_path_factory.mktemp(arch), arch, demo_model_dir)
        return built[arch]

    return get


def hf_greedy(path, *, int8: bool, model=None) -> dict[str, str]:
    """The oracle: HF generate per prompt (and the chat), greedy, on the model loaded as the engine loads it
    (or on `model` itself: the fast path's int8 model, whose linears run the engine's int8 kernels)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "cpu"} if int8 else {}
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(path)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())

    def generate(ids: list[int], n: int) -> str:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode([t for t in out[0, len(ids):].tolist() if t not in eos], skip_special_tokens=True)

    expected = {f"p{i}": generate(tok(p)["input_ids"], max_tokens(i)) for i, p in enumerate(PROMPTS)}
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    expected["chat"] = generate(tok(chat, add_special_tokens=False)["input_ids"], 9)
    return expected


def requests() -> list[GenerationRequest]:
    reqs = [GenerationRequest(f"p{i}", Request(custom_id=f"p{i}", prompt=p,
                                               params=SamplingParams(max_tokens=max_tokens(i), temperature=0)))
            for i, p in enumerate(PROMPTS)]
    reqs.append(GenerationRequest("chat", Request(custom_id="chat", url=CHAT_URL, messages=tuple(ChatMessage(**m) for m in CHAT),
                                                  params=SamplingParams(max_tokens=9, temperature=0))))
    return reqs


def run_engine(engine, reqs: list[GenerationRequest]) -> dict[str, str]:
    assert engine.add(reqs) == []
    texts = {}
    while engine.num_unfinished:
        for r in engine.step():
            assert r.error is None, r.error
            texts[r.key] = r.text
    return texts


def oracle(path, engine) -> dict[str, str]:
    """HF generate on the same model: the engine's own int8 model (its linears run the engine's int8 kernels on
    either path), else a fresh load as the engine loads it."""
    int8 = engine.cfg.load_in_8bit
    return hf_greedy(path, int8=int8, model=engine.model if int8 else None)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_answers_like_hf_generate(arch, model_dir):
    path = model_dir(arch)
    for int8 in (True, False):  # fp32: exact equality even where int8 batch shapes could flip a near-tie
        engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=int8, max_batch_size=3))
        assert isinstance(engine, LLMEngine if arch in FAST_ARCHITECTURES else GenericEngine)
        assert run_engine(engine, requests()) == oracle(path, engine), f"int8={int8}"
        extra = engine.stats().extra
        if isinstance(engine, GenericEngine):
            assert extra["num_joins"] > 0  # rows were refilled while others decoded
        else:
            assert extra["num_prefill_steps"] > 1 and extra["num_decode_steps"] > 0


def test_a_sliding_window_limits_attention_not_the_prompt_length(model_dir):
    path = model_dir("mistral_window")
    family = choose_family(str(path))
    assert (family.model_type, family.path) == ("mistral", FAST)
    assert f"window {WINDOW}" in family.reason
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=3))
    assert len(engine.tokenizer(PROMPTS[0])["input_ids"]) > WINDOW
    assert engine.max_model_len > WINDOW
    assert engine.runner.parts.spec.sliding_layers == {0, 1}
    assert run_engine(engine, requests()[:1]) == {"p0": oracle(path, engine)["p0"]}


def test_gemma2_alternates_sliding_and_full_layers(model_dir):
    engine = build_llm_engine(EngineConfig(model=str(model_dir("gemma2")), load_in_8bit=False))
    spec = engine.runner.parts.spec
    assert (spec.window, spec.sliding_layers, spec.post_norms) == (WINDOW, {0}, True)
    assert spec.attn_softcap and spec.final_softcap


def test_batch_dependent_rope_takes_the_generic_path_with_the_reason(demo_model_dir, tmp_path):
    """Phi-3's longrope switches frequencies on the batch's longest sequence: the packed fast path cannot match."""
    path = write_tiny_model(tmp_path / "phi3", "phi3", demo_model_dir, weights=False)
    config = json.loads((path / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * (head_dim // 2),
            "long_factor": [2.0] * (head_dim // 2), "original_max_position_embeddings": 64}
    config.pop("rope_scaling", None)
    config["rope_parameters"] = rope
    (path / "config.json").write_text(json.dumps(config))
    family = choose_family(str(path))
    assert (family.model_type, family.path) == ("phi3", GENERIC)
    assert "longrope RoPE scaling" in family.reason


def test_the_path_is_chosen_from_config_and_logged_in_one_line(demo_model_dir, model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="batchgen.engine"):
        assert choose_family(str(demo_model_dir)).path == FAST
        assert choose_family(str(model_dir("bloom"))).path == GENERIC
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine path:")]
    assert len(lines) == 2 and all("\n" not in ln for ln in lines)
    assert "(llama): fast path" in lines[0] and "(bloom): generic path" in lines[1]


def test_the_budget_holds_the_prefills_own_cache_under_a_cap(model_dir):
    """A prefill keeps every layer's K/V of its tokens on the device until the join: the budget counts what a real
    prefill's cache holds, and a cap leaves rows only beyond it."""
    path, tokens = model_dir("bloom"), 96
    base = dict(model=str(path), load_in_8bit=False, max_model_len=64, max_prefill_tokens=tokens, vram_reserve_bytes=0)
    engine = build_llm_engine(EngineConfig(**base))
    with torch.inference_mode():
        _, batch = prefill(engine.model, engine.calls, [[5] * 32] * (tokens // 32), engine.device)
    held = sum(t.numel() * t.element_size() for layer in batch.cache.layers for t in (layer.keys, layer.values))
    assert prefill_cache_bytes(engine.model.config, 4, tokens) == held
    b = engine.budget
    assert b.prefill_bytes > held
    weights = sum(t.numel() * t.element_size() for t in (*engine.model.parameters(), *engine.model.buffers()))
    row = b.kv_bytes_per_row + b.activation_bytes_per_row
    capped = build_llm_engine(EngineConfig(**base, max_vram_bytes=weights + b.prefill_bytes + 2 * row))
    assert capped.budget.max_rows == 2
    with pytest.raises(ValueError, match="not enough memory for one row"):
        build_llm_engine(EngineConfig(**base, max_vram_bytes=weights + b.prefill_bytes + row // 2))


def test_continuous_batching_refills_rows_and_survives_an_oom(model_dir):
    """Seven requests through three rows, an OOM injected in the middle of a forward: same answers as HF."""
    path = model_dir("gpt2")
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=3,
                                           inject_oom="steps=4"))
    texts = run_engine(engine, requests())
    assert texts == hf_greedy(path, int8=False)
    assert engine.fault.num_injected == 1 and engine.stats().extra["num_ooms"] == 1
    assert engine.scheduler.max_batch_size == 1  # halved, then the rest ran one row at a time


def test_seeded_sampling_does_not_depend_on_batch_mates(model_dir):
    path = model_dir("qwen3")

    def sampled(max_batch: int) -> dict[str, str]:
        engine = build_llm_engine(EngineConfig(model=str(path), max_batch_size=max_batch))
        reqs = [GenerationRequest(f"s{i}", Request(custom_id=f"s{i}", prompt=p, params=SamplingParams(
            max_tokens=8, temperature=0.9, top_p=0.9, seed=i))) for i, p in enumerate(PROMPTS)]
        return run_engine(engine, reqs)

    assert sampled(1) == sampled(4)


def test_stop_strings_cut_the_text(model_dir):
    path = model_dir("phi3")
    free = run_engine(build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False)), requests()[:1])["p0"]
    stop = free[len(free) // 2:][:3]
    assert stop.strip(), free
    req = GenerationRequest("x", Request(custom_id="x", prompt=PROMPTS[0],
                                         params=SamplingParams(max_tokens=max_tokens(0), temperature=0, stop=[stop])))
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False))
    engine.add([req])
    result = []
    while engine.num_unfinished:
        result += engine.step()
    assert (result[0].text, result[0].finish_reason) == (free[: free.find(stop)], "stop")


def test_any_of_a_list_of_eos_ids_ends_a_request(model_dir, tmp_path):
    """generation_config.eos_token_id may be a list (Llama 3, Gemma): each id in it stops the row, like generate."""
    import shutil

    path = shutil.copytree(model_dir("gemma"), tmp_path / "gemma")
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False))
    free = run_engine(engine, [GenerationRequest("f", Request(custom_id="f", prompt=PROMPTS[2], params=SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True)))])
    third = engine.tokenizer(free["f"], add_special_tokens=False)["input_ids"][2]
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], third]
    (path / "generation_config.json").write_text(json.dumps(gen))
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False))
    assert engine.add(requests()) == []
    results = []
    while engine.num_unfinished:
        results += engine.step()
    assert "stop" in {r.finish_reason for r in results}
    assert {r.key: r.text for r in results} == hf_greedy(path, int8=False)


def batch_lines(model: str) -> list[dict]:
    rows = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": p, "max_tokens": max_tokens(i), "temperature": 0}}
            for i, p in enumerate(PROMPTS)]
    rows.append({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": model, "messages": CHAT, "max_tokens": 9, "temperature": 0}})
    return rows


def texts_of(path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        choice = json.loads(line)["response"]["body"]["choices"][0]
        out[json.loads(line)["custom_id"]] = choice["message"]["content"] if "message" in choice else choice["text"]
    return out


def int8_oracle(path) -> dict[str, str]:
    """HF generate on the 8-bit model as a worker process loads it (its linears run the engine's int8 kernels)."""
    return oracle(path, build_llm_engine(EngineConfig(model=str(path), max_batch_size=3)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bloom", "gemma2", "mixtral", "phi3", "mistral_window"])
def test_batchgen_run_answers_like_hf_generate(arch, model_dir, redis_url, tmp_path):
    path = model_dir(arch)
    src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in batch_lines("tiny")))
    run = batchgen("run", str(src), "-o", str(out), "--model", str(path), "--served-model-name", "tiny",
                   "--max-batch", "3", "--json", redis_url=redis_url, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert texts_of(out) == int8_oracle(path)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "line"), [("opt", "(opt): generic path"), ("gemma", "(gemma): fast path"),
                                            ("qwen3", "(qwen3): fast path")])
def test_a_queue_worker_serves_each_path(arch, line, model_dir, redis_url, redis_conn, tmp_path):
    path = model_dir(arch)
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in batch_lines("tiny")))
    sub = batchgen("submit", str(src), "--json", redis_url=redis_url, check=True, BATCHGEN_CHUNK_SIZE="3")
    batch_id = json.loads(sub.stdout)["id"]
    worker = start_worker("--model", str(path), "--served-model-name", "tiny", "--max-batch", "3", "--burst",
                          redis_url=redis_url, log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert line in (tmp_path / "worker.log").read_text()
    out = tmp_path / "results.jsonl"
    batchgen("results", batch_id, "-o", str(out), redis_url=redis_url, check=True)
    assert texts_of(out) == int8_oracle(path)


def test_an_encoder_is_refused_before_any_weight_loads(demo_model_dir, tmp_path):
    path = write_tiny_model(tmp_path / "bert", "bert", demo_model_dir, weights=False)
    assert not [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]  # nothing to load
    with pytest.raises(UnsupportedModel, match=r"\(bert\) is an encoder"):
        build_llm_engine(EngineConfig(model=str(path)))


def test_an_attention_free_model_is_refused_before_any_weight_loads(tmp_path):
    """Mamba is a causal LM transformers loads, but its rows hold a recurrent state, not a K/V cache."""
    from transformers import MambaConfig

    MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match=r"\(mamba\) has no attention heads"):
        build_llm_engine(EngineConfig(model=str(tmp_path)))


def test_a_missing_local_model_is_a_one_line_error(tmp_path, redis_url):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFound) as exc:
        build_llm_engine(EngineConfig(model=str(missing)))
    assert str(missing) in str(exc.value) and "\n" not in str(exc.value)
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    run = batchgen("run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--model", str(missing),
                   redis_url=redis_url, timeout=120)
    assert run.returncode == 10  # EXIT_MODEL_NOT_FOUND
    assert run.stderr.decode().strip().splitlines() == [f"error: {exc.value}"]


def test_a_config_that_needs_remote_code_is_refused_without_running_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_model", "auto_map": {"AutoConfig": "m.C"}}))
    with pytest.raises(UnsupportedModel, match="custom code") as exc:
        build_llm_engine(EngineConfig(model=str(tmp_path)))
    assert "\n" not in str(exc.value)
