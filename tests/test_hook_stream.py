"""Small-VRAM mode on the generic path: a model's decoder layers live in host tensors and forward pre-hooks copy
each one into a working slot before it runs (on CPU the "device" slots are host tensors too, so the copies are
plain copies). The streamed model answers exactly like the same model resident. The models have one layer more
than there are slots, so every forward copies every layer in again."""

import pytest
import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.loader import load_model
from batchgen.worker.factory import build_llm_engine
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


@pytest.mark.parametrize(("arch", "int8"), [("bloom", True), ("bloom", False), ("mixtral", True), ("gemma2", True)])
def test_streamed_layers_answer_like_the_resident_model(arch, int8, model_dir):
    """BLOOM and Mixtral (generic path) and Gemma2 (a fast-path family the fast streamer does not rebuild)."""
    path = model_dir(arch)
    engine = build_llm_engine(EngineConfig(model=str(path), load_in_8bit=int8, max_batch_size=3, offload=True))
    assert isinstance(engine, GenericEngine)
    streamer = engine.streamer
    for slot in streamer.slots:  # what a slot holds before the first copy must not matter
        for t in slot:
            t.zero_()
    forwards = []
    engine.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    assert run_engine(engine, requests()) == resident_texts(path, int8=int8)
    # every forward copies each layer in once; the first also the second forward's first layer
    assert streamer.num_copies == NUM_LAYERS * len(forwards) + 1 and len(forwards) > 1


def test_a_layer_reads_its_weights_from_a_slot_not_the_host_copy(model_dir):
    loaded = load_model(str(model_dir("opt")), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                        int8_threshold=6.0)
    streamer = stream_layers(loaded.model, torch.device("cpu"))
    assert len(streamer.layers) == NUM_LAYERS and len(streamer.slots) == NUM_SLOTS
    slot_ptrs = {t.data_ptr() for slot in streamer.slots for t in slot}
    host_ptrs = {t.data_ptr() for layer in streamer.host for t in layer}
    seen = []

    def record(module, args):
        seen.append({p.data_ptr() for p in module.parameters()})

    for layer in streamer.layers:
        layer.register_forward_pre_hook(record)  # runs after the streamer's hook
    with torch.inference_mode():
        loaded.model(torch.tensor([[1, 2, 3]]))
    assert len(seen) == NUM_LAYERS
    for ptrs in seen:
        assert ptrs <= slot_ptrs and not ptrs & host_ptrs
    assert seen[0] == seen[2] != seen[1]  # layers take turns in the two slots
    assert streamer.holding == [2, 0]  # the last layer ran from slot 0; the next forward's first is in slot 1


def test_the_layer_list_is_found_past_an_expert_list(model_dir):
    """Mixtral's tiny model has more experts (4) than layers (3): the layer list is the one holding the most."""
    loaded = load_model(str(model_dir("mixtral")), device=torch.device("cpu"), dtype=torch.float32,
                        load_in_8bit=False, int8_threshold=6.0)
    assert decoder_layers(loaded.model) is loaded.model.model.layers


def test_the_int8_size_estimate_is_what_the_8bit_load_weighs(model_dir):
    from transformers import AutoConfig

    path = model_dir("bloom")
    loaded = load_model(str(path), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                        int8_threshold=6.0)
    layers = decoder_layers(loaded.model)
    inside = {id(p) for p in layers.parameters()}
    measured = sum(p.numel() * p.element_size() + (4 * p.shape[0] if p.dtype == torch.int8 else 0)
                   for p in {id(p): p for p in loaded.model.parameters()}.values()
                   if id(p) in inside or p.dtype != torch.int8)
    assert int8_model_bytes(AutoConfig.from_pretrained(path), 4) == measured
