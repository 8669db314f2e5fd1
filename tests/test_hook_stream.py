"""Small-VRAM mode on the generic path: a model's decoder layers live in host tensors and forward pre-hooks copy
each one into a working slot before it runs (on CPU the "device" slots are host tensors too, so the copies are
plain copies). The streamed model answers exactly like the same model resident. The models have one layer more
than there are slots, so every forward copies every layer in again."""

import pytest
import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.int8_linear import Int8Linear
from batchgen.worker.engine.loader import load_model
from batchgen.worker.factory import build_llm_engine
from batchgen.worker.offload import host_head
from batchgen.worker.offload.hook_stream import NUM_SLOTS, decoder_layers, int8_model_bytes, stream_layers

from tests.models import write_tiny_model
from tests.test_models import requests, run_engine

NUM_LAYERS = NUM_SLOTS + 1


@pytest.fixture(scope="module")
def model_dir(demo_model_dir, tmp_path_factory):
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = write_tiny_model(tmp_path_factory.mktemp(arch), arch, demo_model_dir, num_layers=NUM_LAYERS)
        return built[arch]

    return get


def resident_texts(path, *, int8: bool) -> dict[str, str]:
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=int8, max_batch_size=3, offload=False))
    return run_engine(engine, requests())


@pytest.mark.parametrize(("arch", "int8"), [("bloom", True), ("bloom", False), ("mixtral", True), ("gemma2", True),
                                           ("gpt_bigcode", True), ("mpt", True)])
def test_streamed_layers_answer_like_the_resident_model(arch, int8, model_dir):
    """BLOOM, Mixtral, GPTBigCode (multi-query) and MPT (generic path) and Gemma2 (a fast-path family the fast
    streamer does not rebuild)."""
    path = model_dir(arch)
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=int8, max_batch_size=3, offload=True))
    assert isinstance(engine, GenericEngine)
    streamer = engine.streamer
    calibration_copies = streamer.num_copies  # int8: the outlier calibration pass streamed the layers once
    assert calibration_copies == (NUM_LAYERS + 1 if int8 else 0)
    if not calibration_copies:
        for slot in streamer.slots:  # what a slot holds before the first copy must not matter
            slot.zero_()
    forwards = []
    engine.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    assert run_engine(engine, requests()) == resident_texts(path, int8=int8)
    # every forward copies each layer in once; the first also the second forward's first layer (which the
    # calibration pass already did)
    copies = streamer.num_copies - calibration_copies
    assert copies == NUM_LAYERS * len(forwards) + (0 if calibration_copies else 1) and len(forwards) > 1


def test_the_output_head_streams_in_chunks_and_the_embeddings_run_on_the_host(model_dir, monkeypatch):
    """BLOOM ties its head to its input embeddings: one host tensor serves the host gather and the chunked head."""
    path = model_dir("bloom")
    monkeypatch.setattr(host_head, "CHUNK_BYTES", 4096)  # a handful of vocabulary rows per chunk
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=True, max_batch_size=3, offload=True))
    head, embedding = engine.model.get_output_embeddings(), engine.model.get_input_embeddings()
    assert isinstance(head, host_head.StreamedHead) and isinstance(embedding, host_head.HostEmbedding)
    assert head.inner.weight is embedding.inner.weight
    assert head.weight is embedding.weight is head.inner.weight  # forwards that read the modules' weight dtype
    vocab = head.inner.weight.shape[0]
    assert vocab > 4 * head.rows_per_chunk
    hidden = torch.randn(2, 1, head.inner.weight.shape[1])
    assert torch.allclose(head(hidden), head.inner(hidden), rtol=1e-5, atol=1e-5)
    before = head.copied_bytes
    assert run_engine(engine, requests()) == resident_texts(path, int8=True)
    assert (head.copied_bytes - before) % head.num_bytes == 0 and head.copied_bytes > before


def test_a_layer_reads_its_weights_from_a_slot_not_the_host_copy(model_dir):
    loaded = load_model(str(model_dir("opt")), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                        int8_threshold=6.0)
    streamer = stream_layers(loaded.model, torch.device("cpu"))
    assert len(streamer.layers) == NUM_LAYERS and len(streamer.slots) == NUM_SLOTS
    slots = [range(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer.slots]
    hosts = [range(h.data_ptr(), h.data_ptr() + h.numel()) for h in streamer.host]
    seen = []

    def record(module, args):
        seen.append({p.data_ptr() for p in module.parameters()})

    for layer in streamer.layers:
        layer.register_forward_pre_hook(record)  # runs after the streamer's hook
    with torch.inference_mode():
        loaded.model(torch.tensor([[1, 2, 3]]))
    assert len(seen) == NUM_LAYERS
    inside = [[next((k for k, r in enumerate(slots) if p in r), None) for p in sorted(ptrs)] for ptrs in seen]
    assert all(not any(p in r for r in hosts) for ptrs in seen for p in ptrs)
    assert [set(slot) for slot in inside] == [{0}, {1}, {0}]  # every tensor in a slot; layers take turns
    assert streamer.holding == [2, 0]  # the last layer ran from slot 0; the next forward's first is in slot 1


def test_the_layer_list_is_found_past_an_expert_list(model_dir):
    """Mixtral's tiny model has more experts (4) than layers (3): the layer list is the one holding the most."""
    loaded = load_model(str(model_dir("mixtral")), device=torch.device("cpu"), dtype=torch.float32,
                        load_in_8bit=False, int8_threshold=6.0)
    assert decoder_layers(loaded.model) is loaded.model.model.layers


@pytest.mark.parametrize("fp16_modules", [(), ("transformer.h.0", "transformer.h.2.mlp.dense_4h_to_h"),
                                          ("dense_4h_to_h",)])  # a suffix, as transformers matches it
def test_the_int8_size_estimate_is_what_the_8bit_load_weighs(model_dir, fp16_modules):
    """Also with --fp16-modules: what they name weighs the compute dtype (auto small-VRAM counts it)."""
    from transformers import AutoConfig

    path = model_dir("bloom")
    loaded = load_model(str(path), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                        int8_threshold=6.0, fp16_modules=fp16_modules)
    layers = decoder_layers(loaded.model)
    inside = {id(p) for p in layers.parameters()}
    measured = sum(p.numel() * p.element_size() + (4 * p.shape[0] if p.dtype == torch.int8 else 0)
                   for p in {id(p): p for p in loaded.model.parameters()}.values()
                   if id(p) in inside or p.dtype != torch.int8)
    assert int8_model_bytes(AutoConfig.from_pretrained(path), 4, fp16_modules) == measured


@pytest.mark.parametrize("fp16_module", ["transformer.h.1", "transformer.h.0.mlp.dense_4h_to_h"])
def test_fp16_modules_stream_at_their_own_size_and_answer_like_the_resident_model(fp16_module, model_dir):
    """--fp16-modules on the generic path: the named linears stay in the compute dtype, their layer streams at its
    own, larger size through slots that hold the largest layer, and the output is the resident model's with the
    same modules kept."""
    cfg = dict(model=str(model_dir("bloom")), load_in_8bit=True, max_batch_size=3, fp16_modules=(fp16_module,))
    engine = build_llm_engine(EngineConfig(**cfg, offload=True))
    streamer, index = engine.streamer, int(fp16_module.split(".")[2])
    kept = [m for m in engine.model.get_submodule(fp16_module).modules() if isinstance(m, torch.nn.Linear)]
    assert kept and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in kept)
    others = [m for i, layer in enumerate(streamer.layers) if i != index for m in layer.modules()
              if isinstance(m, torch.nn.Linear | Int8Linear)]
    assert others and all(type(m) is Int8Linear for m in others)  # bnb's linears, swapped for the int8 kernel
    sizes = streamer.layer_bytes
    assert sizes[index] == max(sizes) > max(b for i, b in enumerate(sizes) if i != index)
    assert all(slot.numel() == max(sizes) for slot in streamer.slots)
    assert run_engine(engine, requests()) == run_engine(build_llm_engine(EngineConfig(**cfg, offload=False)),
                                                        requests())
    slots = [range(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer.slots]
    assert all(any(m.weight.data_ptr() in r for r in slots) for m in kept)  # it ran from a slot


def _stream_kv_texts(path, kv: str, stream_kv: bool, inject_oom: str | None = None,
                     reserve: bool = False) -> tuple[dict, object]:
    """14 requests through a small-VRAM engine (on CPU) with at most 10 rows: joins, leaves and window moves."""
    from batchgen.jobs.schema import Request, SamplingParams
    from batchgen.worker.engine.protocol import GenerationRequest
    from batchgen.worker.engine.slot_batch import SlotBatch

    from tests.test_slot_batch import WORDS

    reqs = [GenerationRequest(f"r{i}", Request(custom_id=f"r{i}", prompt=" ".join(WORDS[: 1 + (5 * i) % 14]),
                                               params=SamplingParams(max_tokens=6 + (7 * i) % 30, temperature=0,
                                                                     ignore_eos=True))) for i in range(14)]
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=False, max_batch_size=10, offload=True,
                                           max_model_len=80, max_prefill_tokens=48, kv_cache_dtype=kv,
                                           stream_kv=stream_kv, inject_oom=inject_oom))
    if reserve:  # what build_llm_engine does on CUDA
        engine.reserve_host_slots()
    assert engine.add(reqs) == []
    out, hosted = {}, False
    while engine.num_unfinished:
        out.update({r.key: r.text for r in engine.step()})
        if isinstance(engine.batch, SlotBatch):
            hosted |= engine.batch.host and engine.batch.num_window_moves > 0
    assert hosted == stream_kv
    return out, engine


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_stream_kv_keeps_the_slots_on_the_host_and_answers_like_device_slots(kv, model_dir):
    """--stream-kv: each layer's K/V copied into a stage before it runs, new columns landed in the host slots;
    rows join, leave and the window moves as with device slots, and the output is the same."""
    path = model_dir("bloom")
    streamed, engine = _stream_kv_texts(path, kv, True)
    assert engine.stats().extra["kv_stream_copied_gib"] > 0 and engine.stats().extra["num_joins"] > 0
    assert streamed == _stream_kv_texts(path, kv, False)[0]
    # an OOM mid-decode (after some layers wrote their stage) is the usual back-off: nothing lost, nothing changed
    recovered, engine = _stream_kv_texts(path, kv, True, inject_oom="steps=12,30")
    assert engine.stats().extra["num_ooms"] == 2 and recovered == streamed


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_stream_kv_host_slots_reserved_at_load_are_the_batchs(kv, model_dir):
    """As on CUDA: every row's host slots allocated at load from a one-token probe's cache shape; the first prefill
    takes them (no growth inside the steps), and the output is that of slots grown on demand."""
    path = model_dir("bloom")
    grown, _ = _stream_kv_texts(path, kv, True)
    reserved, engine = _stream_kv_texts(path, kv, True, reserve=True)
    assert reserved == grown
    assert engine.kv_stream.reserved == []  # handed over to the batch
    slots = engine._idle.layers[0].key_slots
    assert slots.shape[0] == engine.scheduler.max_batch_size == 10
    assert slots.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.float32)
    stats = engine.step_stats
    assert stats.step_host_n["slot_alloc"] == 1 and "slot_grow" not in stats.step_host_n


def test_reserved_host_slots_that_do_not_fit_are_left_alone():
    from batchgen.worker.offload.kv_stream import KVStream

    stream = KVStream(torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()]), torch.device("cpu"))
    assert stream.reserve(2, rows=4, heads=3, columns=20, head_dim=8, dtype=torch.float16) == 2 * 2 * 4 * 3 * 20 * 8 * 2
    assert stream.take_slots(5, [(3, 20, 8)] * 2, torch.float16) is None  # more rows than reserved
    assert stream.take_slots(4, [(3, 20, 8)] * 2, torch.float32) is None  # another dtype
    assert stream.take_slots(4, [(3, 24, 8)] * 2, torch.float16) is None  # other columns
    slots = stream.take_slots(2, [(3, 20, 8)] * 2, torch.float16)
    assert len(slots) == 2 and slots[0][0].shape == (4, 3, 20, 8) and not slots[0][0].any()
    assert stream.take_slots(2, [(3, 20, 8)] * 2, torch.float16) is None  # handed over once


def test_stream_kv_is_refused_where_nothing_streams(model_dir):
    with pytest.raises(ValueError, match="stream-kv"):
        build_llm_engine(EngineConfig(model=str(model_dir("bloom")), load_in_8bit=False, offload=False,
                                      stream_kv=True))
