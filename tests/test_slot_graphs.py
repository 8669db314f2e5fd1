"""The generic path's static-shape decode (what its CUDA graphs capture): fixed rows and attended columns, the new
column at a device index and as the cache's query offset, free rows attending to themselves. On CPU the same
forward runs eagerly; greedy output must stay HF generate's (fp32, exact) through joins, leaves and window moves,
for ALiBi, learned and rotary positions, multi-query, parallel-attention, MoE and sliding-window layers."""

import inspect

import pytest
import torch
from batchgen.jobs.schema import Request, SamplingParams
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.cuda_graphs import end_capture
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.protocol import GenerationRequest
from batchgen.worker.engine.slot_batch import SlotBatch
from batchgen.worker.engine.slot_graphs import SlotDecodeGraphs, graphable
from batchgen.worker.factory import build_llm_engine
from batchgen.worker.startup import startup_block
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig
from transformers.cache_utils import Cache
from transformers.utils import import_utils

from tests.models import write_tiny_model
from tests.test_slot_batch import MAX_MODEL_LEN, fresh, hf_greedy, prompt, wanted


@pytest.mark.parametrize("arch", ["bloom", "gpt2", "opt", "gpt_neox", "falcon", "gpt_bigcode", "mpt", "gptj",
                                  "gemma3_text",  # sliding layers (window 8) beside full ones, prompts past it
                                  "mixtral", "qwen2_moe", "starcoder2", "cohere", "phi", "persimmon", "granite",
                                  "olmo2", "stablelm", "codegen"])  # every other generic-path architecture tested
def test_static_decode_answers_like_hf_generate(arch, demo_model_dir, tmp_path, monkeypatch):
    path = write_tiny_model(tmp_path, arch, demo_model_dir)
    monkeypatch.setattr(GenericEngine, "_why_eager", lambda self: "")  # CPU: the static forward, uncaptured
    runs = []
    run = SlotDecodeGraphs.run
    monkeypatch.setattr(SlotDecodeGraphs, "run", lambda self, tokens: runs.append(self.width()) or run(self, tokens))
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=12,
                                           max_model_len=MAX_MODEL_LEN, max_prefill_tokens=96))
    assert isinstance(engine, GenericEngine)
    num, texts, graphs = 30, {}, []
    for wave in (range(24), range(24, num)):  # a drain between: the second wave reuses the slots and graphs
        reqs = [GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
            max_tokens=wanted(i), temperature=0, ignore_eos=True))) for i in wave]
        assert engine.add(reqs) == []
        while engine.num_unfinished:
            for r in engine.step():
                assert r.error is None, r.error
                texts[r.key] = r.text
        graphs.append(engine.graphs)
    # every decode went through the static forward, over more than one width, with rows joining and windows moving
    assert len(set(runs)) > 1 and engine.stats().extra["num_joins"] > 0
    assert graphs[0] is graphs[1] is not None and engine.graphs.columns > MAX_MODEL_LEN
    for i in range(num):
        ids = engine.tokenizer(prompt(i))["input_ids"]
        expected = engine.tokenizer.decode(hf_greedy(path, ids, wanted(i)), skip_special_tokens=True)
        assert texts[f"r{i}"] == expected, (arch, i)


@pytest.mark.parametrize("arch,reason", [("mistral_window", None), ("gemma3_text", None),
                                         ("gpt_neo", "local attention layers"), ("bloom", None)])
def test_only_attention_counted_from_the_last_key_stays_eager(arch, reason, demo_model_dir, tmp_path, monkeypatch):
    """Sliding windows count from the cache's query offset (the new column); GPT-Neo's local attention from the
    last key, which the static decode's new column is not. Without the offset hook, windows stay eager too."""
    path = write_tiny_model(tmp_path, arch, demo_model_dir, weights=False)
    config = AutoConfig.from_pretrained(path).get_text_config()
    assert graphable(config) == reason
    monkeypatch.delattr(Cache, "get_query_offset")
    assert graphable(config) == ("sliding-window attention (CUDA graphs of it need transformers >= 5.24)"
                                 if arch in ("mistral_window", "gemma3_text") else reason)


def test_cpu_engine_decodes_eagerly(demo_model_dir, tmp_path):
    path = write_tiny_model(tmp_path, "bloom", demo_model_dir)
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_model_len=64))
    engine.add([GenerationRequest("a", Request(custom_id="a", prompt="the quick fox", params=SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True)))])
    while engine.num_unfinished:
        engine.step()
    assert engine._eager_reason == "no CUDA" and engine.graphs is None
    cfg = WorkerConfig(EngineConfig(model=str(path)))
    assert "  decode steps   eager (no CUDA)" in startup_block(engine.stats(), cfg).splitlines()


# What breaks a CUDA graph capture, seen on CPU: a host read of a device value, or a tensor made from Python data
# (on CUDA a copy from pageable memory).
CAPTURE_BREAKERS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::lift_fresh"}


class _CaptureBreakers(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in CAPTURE_BREAKERS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _falcon_breakers() -> list[str]:
    """Falcon's K/V split indexed with Python lists (one tensor made per layer and call) until transformers 5.25
    rewrote it as views."""
    from transformers.models.falcon import modeling_falcon
    return ["aten::lift_fresh"] * 4 if "[-2]]" in inspect.getsource(modeling_falcon.FalconAttention) else []


@pytest.mark.parametrize("arch,breakers", [(arch, []) for arch in ("bloom", "gpt2", "opt", "gpt_neox", "gpt_bigcode",
                                                                   "mpt", "gptj", "gemma3_text")]
                         + [("falcon", _falcon_breakers())])
def test_static_decode_forward_is_capturable(arch, breakers, demo_model_dir, tmp_path, monkeypatch):
    """The static forward, int8 kernels included, neither syncs with the host nor copies Python data in (Falcon's
    did before transformers 5.25: its capture fails on CUDA, and the engine decodes eagerly)."""
    path = write_tiny_model(tmp_path, arch, demo_model_dir)
    monkeypatch.setattr(GenericEngine, "_why_eager", lambda self: "")
    spies = []
    forward = SlotDecodeGraphs._forward

    def spied(self, ids, positions, width):
        # transformers skips its data-dependent mask shortcuts while a CUDA stream captures: as it would be then
        with monkeypatch.context() as capturing, _CaptureBreakers() as spy:
            capturing.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
            out = forward(self, ids, positions, width)
        spies.append(spy.seen)
        return out

    monkeypatch.setattr(SlotDecodeGraphs, "_forward", spied)
    engine = build_llm_engine(EngineConfig(model=str(path), max_model_len=64, int8_threshold=0.5))
    engine.add([GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True))) for i in range(3)])
    while engine.num_unfinished:
        engine.step()
    assert engine.int8 is not None and len(spies) == 2
    assert spies == [breakers, breakers], spies


def _four_greedy(path) -> tuple:
    """A generic-path engine on the model at path, four greedy requests run to the end: (engine, texts)."""
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_model_len=MAX_MODEL_LEN))
    engine.add([GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
        max_tokens=wanted(i), temperature=0, ignore_eos=True))) for i in range(4)])
    texts = {}
    while engine.num_unfinished:
        texts |= {r.key: r.text for r in engine.step()}
    return engine, texts


def _assert_like_hf(engine, path, texts: dict) -> None:
    for i in range(4):
        ids = engine.tokenizer(prompt(i))["input_ids"]
        assert texts[f"r{i}"] == engine.tokenizer.decode(hf_greedy(path, ids, wanted(i)), skip_special_tokens=True)


def test_failed_capture_goes_on_eagerly(demo_model_dir, tmp_path, monkeypatch):
    """A forward that cannot be captured costs one warning: that step and the rest run eagerly, output unchanged."""
    path = write_tiny_model(tmp_path, "gpt2", demo_model_dir)
    monkeypatch.setattr(GenericEngine, "_why_eager", lambda self: "")

    def fails(self, tokens):
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    monkeypatch.setattr(SlotDecodeGraphs, "run", fails)
    engine, texts = _four_greedy(path)
    assert engine.stats().extra["decode_steps"].startswith("eager (capture failed: RuntimeError: Cannot copy")
    _assert_like_hf(engine, path, texts)


class _Graph:
    """A CUDA graph whose capture_end fails as the named error: a graph's instantiation out of memory comes as a
    torch.AcceleratorError (a RuntimeError) saying so, not as an OutOfMemoryError."""

    def __init__(self, message: str):
        self.message = message

    def capture_end(self) -> None:
        raise RuntimeError(self.message)


def test_capture_end_out_of_memory_is_an_oom():
    with pytest.raises(torch.OutOfMemoryError, match="CUDA graph capture: CUDA error: out of memory"):
        end_capture(_Graph("CUDA error: out of memory"))
    with pytest.raises(RuntimeError, match="operation not permitted") as raised:  # any other failure as it was
        end_capture(_Graph("CUDA error: operation not permitted when stream is capturing"))
    assert not isinstance(raised.value, torch.OutOfMemoryError)


def test_out_of_memory_in_a_capture_backs_off_and_goes_on(demo_model_dir, tmp_path, monkeypatch):
    """A decode step whose graph ran out of memory where it was instantiated (end_capture's OOM): the engine backs
    off as for any OOM and goes on replaying graphs (not eager from then on); output unchanged. A worker died of
    it under MPS, the error not being an OutOfMemoryError."""
    path = write_tiny_model(tmp_path, "gpt2", demo_model_dir)
    monkeypatch.setattr(GenericEngine, "_why_eager", lambda self: "")
    real_run, runs = SlotDecodeGraphs.run, []

    def run(self, tokens):
        runs.append(len(tokens))
        if len(runs) == 2:
            end_capture(_Graph("CUDA error: out of memory"))
        return real_run(self, tokens)

    monkeypatch.setattr(SlotDecodeGraphs, "run", run)
    engine, texts = _four_greedy(path)
    extra = engine.stats().extra
    assert extra["num_ooms"] == 1 and not extra["decode_steps"].startswith("eager"), extra
    assert len(runs) > 2
    _assert_like_hf(engine, path, texts)


def test_a_new_outlier_path_drops_the_decode_graphs(demo_model_dir, tmp_path, monkeypatch):
    """An input's first outlier column sends its linears down the dense path, which graphs captured before skip."""
    path = write_tiny_model(tmp_path, "bloom", demo_model_dir)
    monkeypatch.setattr(GenericEngine, "_why_eager", lambda self: "")
    engine = build_llm_engine(EngineConfig(model=str(path), max_model_len=64))
    opened = iter([False, False, True])  # the guard opens a column after the second decode step
    monkeypatch.setattr(engine.int8, "poll", lambda num_tokens: next(opened, False))
    engine.add([GenerationRequest("a", Request(custom_id="a", prompt="the quick fox", params=SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True)))])
    seen = []
    while engine.num_unfinished:
        engine.step()
        seen.append(engine.graphs)
    # the prefill (no graphs yet), a decode on the first graphs, the one after which the guard opens, a recapture
    assert seen[0] is None and seen[1] is not None and seen[2] is None
    assert seen[3] is not None and seen[3] is not seen[1]


@pytest.mark.parametrize("arch", ["bloom", "gpt2"])
def test_static_decode_with_fp8_slots_answers_like_the_eager_one(arch, demo_model_dir, tmp_path, monkeypatch):
    """fp8 slots: the new column quantized into place (as bytes), the attended width dequantized; same tokens as the
    eager step over the same fp8 slots."""
    path = write_tiny_model(tmp_path, arch, demo_model_dir)
    texts = {}
    for mode in ("eager", "static"):
        if mode == "static":
            monkeypatch.setattr(GenericEngine, "_why_eager", lambda self: "")
        engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=12,
                                               max_model_len=MAX_MODEL_LEN, kv_cache_dtype="fp8"))
        engine.add([GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=prompt(i), params=SamplingParams(
            max_tokens=wanted(i), temperature=0, ignore_eos=True))) for i in range(16)])
        texts[mode] = {}
        while engine.num_unfinished:
            texts[mode] |= {r.key: r.text for r in engine.step()}
        assert (engine.graphs is not None) == (mode == "static")
        assert engine.batch is None and engine._idle.layers[0].key_slots.dtype == torch.float8_e4m3fn
    assert texts["static"] == texts["eager"]


def test_a_draining_batch_reuses_a_captured_bucket_up_to_twice_its_rows():
    """Rows falling from 64 to 1 would cross every bucket below 64, a capture each; a bucket already held at this
    width serves down to half its size."""
    batch = SlotBatch(fresh(3, [4, 2, 3]), max_rows=64, max_model_len=32)
    graphs = SlotDecodeGraphs(torch.nn.Identity(), None, batch, capture=False)
    assert graphs.buckets == [1, 2, 4, 8, 16, 32, 48, 64]
    width = graphs.width()
    assert graphs.rows_bucket(40, width) == 48  # nothing held: the smallest bucket that fits
    graphs.used |= {(48, width), (16, width + 1)}
    assert graphs.rows_bucket(30, width) == graphs.rows_bucket(24, width) == 48  # held, at most twice the rows
    assert graphs.rows_bucket(23, width) == 32  # 48 rows for 23: a capture of its own
    assert graphs.rows_bucket(10, width) == 16  # 16 is held at another width only
