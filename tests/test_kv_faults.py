"""benchmarks/kv_faults' check of an int8 pool: every (token, head) of a sound block holds a +-127 (each token's
head quantised on its own absmax); a V^T block sealed a second time does not."""

import pytest
import torch

from benchmarks.kv_faults import block_counts

BS = 64


@pytest.mark.parametrize("transposed", [False, True])
def test_a_sound_int8_pool_has_no_faults_and_a_block_sealed_twice_has(transposed):
    pytest.importorskip("triton")
    from batchgen.worker.engine.kernels.kv_store import cache_slots, seal_blocks, store_kv
    from batchgen.worker.engine.model_runner import kv_pool

    g = torch.Generator().manual_seed(0)
    table = torch.tensor([[3, 1], [2, 4]], dtype=torch.int32)
    lens = torch.tensor([BS + 5, 2 * BS])  # row 0: one whole block and a partial one; row 1: two whole blocks
    v = kv_pool((1, 5, BS, 2, 32), torch.int8, torch.device("cpu"), True, transposed)[0]
    scale = torch.zeros(5, 2, BS)
    positions = torch.cat([torch.arange(n) for n in lens.tolist()])
    slots = cache_slots(v, torch.arange(2).repeat_interleave(lens), positions, table)
    store_kv(v, slots, torch.randn(len(positions), 2, 32, generator=g).half(), scale, triton_kernel=True)
    whole = torch.tensor([3, 2, 4])
    assert block_counts(v, whole) == (0, 0)
    assert block_counts(v, torch.tensor([], dtype=torch.long)) == (0, 0)
    if transposed:  # block 4's last slot sealed again: V^T turned over a second time
        seal_blocks(v, torch.tensor([4 * BS + BS - 1]), True)
        assert block_counts(v, whole)[0] > 0
        assert block_counts(v, torch.tensor([3, 2])) == (0, 0)
    else:  # one (token, head) written over without its absmax: one fault
        v[3, 0, 0] = v[3, 0, 0] // 2
        assert block_counts(v, whole) == (1, 0)


def test_fault_sites_places_each_fault_and_tells_what_it_holds():
    """kv_faults.fault_sites over an engine's running rows: a (token, head) zeroed in V (peak 0, its scale as the
    store wrote it) and one in K whose store saw a NaN (the store's zeros, a NaN scale) are faults, each counted in
    its layer and placed at its request, block, position and token id; a zero head (zeros, scale 0: an all-zero
    input) is placed too but pool_faults counts it apart; the rows' partial blocks are not read."""
    from types import SimpleNamespace

    from batchgen.worker.engine.kernels.kv_store import cache_slots, store_kv
    from batchgen.worker.engine.model_runner import kv_pool

    from benchmarks.kv_faults import fault_sites, pool_faults

    g = torch.Generator().manual_seed(1)
    table = torch.tensor([[3, 1, 4], [2, 0, 0]], dtype=torch.int32)
    lens = [2 * BS + 5, BS + 3]  # whole blocks checked: row 0's 3 and 1, row 1's 2
    shape = (2, 5, BS, 2, 32)
    k, v = kv_pool(shape, torch.int8, torch.device("cpu"), True), kv_pool(shape, torch.int8, torch.device("cpu"), True)
    k_scale, v_scale = torch.zeros(2, 5, 2, BS), torch.zeros(2, 5, 2, BS)
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = cache_slots(k[0], torch.arange(2).repeat_interleave(torch.tensor(lens)), positions, table)
    for layer in range(2):
        for cache, scale in ((k, k_scale), (v, v_scale)):
            store_kv(cache[layer], slots, torch.randn(len(slots), 2, 32, generator=g).half(), scale[layer],
                     triton_kernel=False)
    v[1, 1, 5, 1] = 0  # row 0's second block, its token 5, head 1
    k[0, 2, 7, 0], k_scale[0, 2, 0, 7] = 0, float("nan")  # row 1's first block, token 7, head 0
    k[0, 4, 9, 1] = 0  # row 0's partial third block: not checked
    k[1, 3, 2, 0], k_scale[1, 3, 0, 2] = 0, 0.0  # row 0's first block, token 2: a zero head (an all-zero input)
    g = torch.Generator().manual_seed(2)
    seqs = [SimpleNamespace(key=key, prompt_ids=torch.randint(3, 100, (n,), generator=g).tolist(), output_ids=[7])
            for key, n in (("a", lens[0]), ("b", lens[1]))]
    for seq in seqs:
        seq.num_tokens = len(seq.prompt_ids) + 1
    engine = SimpleNamespace(
        runner=SimpleNamespace(k_cache=k, v_cache=v, k_scale=k_scale, v_scale=v_scale),
        blocks=SimpleNamespace(rows={0: [3, 1, 4], 1: [2]}), scheduler=SimpleNamespace(running=dict(enumerate(seqs))))
    assert pool_faults(engine) == {"blocks": 3, "k": 1, "v": 1, "k_zero": 1, "v_zero": 0}
    sites = fault_sites(engine)
    assert sites["v"]["per_layer"] == [0, 1] and sites["k"]["per_layer"] == [1, 1]
    assert sites["v"]["peaks"] == {"0": 1, "128": 0, "1-126": 0}
    assert sites["v"]["scales"] == {"nan": 0, "inf": 0, "zero": 0, "finite": 1}
    assert sites["k"]["scales"] == {"nan": 1, "inf": 0, "zero": 1, "finite": 0}
    (at_v,), (at_k, zero_k) = sites["v"]["sites"], sites["k"]["sites"]
    assert at_v == {"layer": 1, "block": 1, "request": "a", "block_in_row": 1, "token_in_block": 5,
                    "position": BS + 5, "token": seqs[0].prompt_ids[BS + 5], "row_tokens": lens[0] + 1, "head": 1,
                    "peak": 0, "scale": pytest.approx(float(v_scale[1, 1, 1, 5]))}
    assert (at_k["request"], at_k["block"], at_k["position"], at_k["head"], at_k["peak"]) == ("b", 2, 7, 0, 0)
    assert (zero_k["layer"], zero_k["request"], zero_k["position"], zero_k["scale"]) == (1, "a", 2, 0.0)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama (4 heads of 32) with the benchmarks' tokenizer; pad id 0, whose embedding HF zeroes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.common import VOCAB_SIZE, write_tokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(out)
    write_tokenizer(out)
    return out


def _int8_engine(model_dir):
    """The tiny model 8-bit on the CPU over an int8 paged KV cache, masked attention."""
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    return build_llm_engine(EngineConfig(model=str(model_dir), device="cpu", max_model_len=160,
                                         kv_cache_dtype="int8", attention="sdpa", max_batch_size=12))


def test_a_pad_token_is_a_zero_head_in_layer_0_only(tiny_llama):
    """A prompt holding the pad token (id 0, embedded as zeros): its K and V in layer 0 are zero heads (zeros, scale
    0), not faults; from layer 1 on they are sound (its attention output is the other tokens' V). The find the
    GPU runs made, on every SM with V^T, had this signature."""
    from batchgen.jobs.schema import SamplingParams
    from batchgen.worker.engine.sequence import Sequence

    from benchmarks.kv_faults import fault_sites, pool_faults

    engine = _int8_engine(tiny_llama)
    ids = [1] + [5 + i % 90 for i in range(99)]
    ids[70] = 0  # in the row's second whole block
    engine.scheduler.add(Sequence("pad", ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), seed=0))
    engine.step()
    assert pool_faults(engine) == {"blocks": 1, "k": 0, "v": 0, "k_zero": 0, "v_zero": 0}  # block 0 alone is whole
    (seq,) = engine.scheduler.running.values()
    while seq.num_tokens < 2 * 64 + 2:  # the second block whole, as pool_faults counts it
        engine.step()
    assert pool_faults(engine) == {"blocks": 2, "k": 0, "v": 0, "k_zero": 4, "v_zero": 4}
    sites = fault_sites(engine)
    for c in "kv":
        assert sites[c]["per_layer"] == [4, 0] and sites[c]["scales"]["zero"] == 4
        assert {(s["position"], s["token"], s["peak"]) for s in sites[c]["sites"]} == {(70, 0, 0)}


def test_scale_peaks_names_an_outsized_token(tiny_llama):
    """scale_peaks over a row just prefilled: every stored token (the partial block too) counts, each layer's largest
    K and V scale sits at a position the row holds and above its median; a V scale planted at position 90 of layer 0
    (in the row's unsealed second block) is named with its request and position, a NaN one is passed over."""
    from batchgen.jobs.schema import SamplingParams
    from batchgen.worker.engine.sequence import Sequence

    from benchmarks.kv_faults import scale_peaks

    engine = _int8_engine(tiny_llama)
    ids = [1] + [5 + i % 90 for i in range(99)]
    engine.scheduler.add(Sequence("big", ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), seed=0))
    engine.step()
    peaks = scale_peaks(engine)
    for c in "kv":
        assert len(peaks[c]) == 2
        assert all(0 < p["median"] < p["max"] and p["request"] == "big" and p["position"] < 99 for p in peaks[c])
    (row,) = engine.scheduler.running
    block = engine.blocks.rows[row][1]
    with torch.inference_mode():  # the pools were made in it
        engine.runner.v_scale[0][block, 2, 90 - 64] = 1e4
        engine.runner.v_scale[0][block, 1, 91 - 64] = float("nan")
    found = scale_peaks(engine)
    assert {k: found["v"][0][k] for k in ("max", "request", "position")} == {"max": 1e4, "request": "big",
                                                                           "position": 90}
    assert found["k"] == peaks["k"] and found["v"][1] == peaks["v"][1]


@pytest.mark.parametrize("poisoned", [False, True])
def test_the_scenario_traces_the_first_prefill_and_locates_a_nan_store(poisoned, tiny_llama):
    """kv_faults.scenario on a tiny 8-bit Llama with an int8 paged KV cache (CPU, masked attention): sound, no fault,
    the first prefill traced through both layers, the int8 state finite. With layer 0's MLP returning NaNs in
    prefills (a forward hook: the engine then calls the module), the trace names layer 0's residual stream and the
    faults are layer 1's stores of NaN (zeros, NaN scales), in K and V alike."""
    from benchmarks.common import VOCAB_SIZE
    from benchmarks.kv_faults import scenario, weights_digest

    engine = _int8_engine(tiny_llama)
    if poisoned:
        engine.model.model.layers[0].mlp.register_forward_hook(
            lambda module, args, out: out.index_fill(-2, torch.arange(5, out.shape[-2]), float("nan"))
            if out.shape[-2] > 1 else out)
    out = scenario(engine, VOCAB_SIZE, rows=12, prompt=100, steps=2, max_model_len=160)
    assert out["first_prefill"]["calls"] == 2 and out["int8_state_built"]["linears"] > 0
    assert out["weights_built"] == out["weights_after_first_step"] and out["weights_built"]["nonfinite"] == 0
    assert out["int8_state_built"]["dense_nonfinite"] == out["int8_state_built"]["keep_nonfinite"] == 0
    if not poisoned:
        assert out["first_prefill"]["first_nonfinite"] == {"attention": None, "residual": None}
        finite = {"input": None, "attention": None, "residual": None}
        assert out["first_prefill"]["first_nonfinite_token"] == [finite, finite]
        assert len(out["first_prefill"]["attention_inputs"]) == 2
        assert set(out["first_prefill"]["first_attention_input"].values()) == {None}
        assert out["first step"]["first_faulty_step"] is None and out["decode"]["first_faulty_step"] is None
        norm = engine.model.model.norm.weight  # a weight written over shows in the digest
        norm.data[0] = float("inf")
        assert weights_digest(engine)["nonfinite"] == 1
        norm.data[0] = 2.0
        assert weights_digest(engine)["sum"] != out["weights_built"]["sum"]
        return
    assert out["first_prefill"]["first_nonfinite"] == {"attention": 1, "residual": 0}
    layer_0, layer_1 = out["first_prefill"]["first_nonfinite_token"]
    assert layer_0 == {"input": None, "attention": None, "residual": 5} and layer_1["input"] == 5
    assert layer_1["attention"] is not None and layer_1["attention"] <= 5  # a NaN V meets masked queries as 0 · NaN
    assert out["scales_after_first_step"]["v"][1]["position"] < 5  # the NaN scales from 5 on passed over
    assert out["first step"]["first_faulty_step"] == 0
    found = out["first step"]["diagnosed"][0]
    assert found["counts"]["k"] == found["counts"]["v"] > 0
    for c in "kv":
        assert found[c]["per_layer"][0] == 0 and found[c]["per_layer"][1] == found["counts"][c]
        assert found[c]["scales"]["nan"] == found["counts"][c] and found[c]["peaks"]["0"] == found["counts"][c]


def test_the_prefill_trace_names_a_store_that_writes_over_its_input(tiny_llama, monkeypatch):
    """A stray store: layer 0's V store writes NaN over the v it was given from token 7 on, which the prefill's
    attention then reads. The trace names v changed at token 7 in call 0 while every input came finite, q and k
    unchanged; layer 0's attention output is NaN and layer 1's q/k/v come non-finite."""
    from batchgen.jobs.schema import SamplingParams
    from batchgen.worker.engine import llama
    from batchgen.worker.engine.sequence import Sequence

    from benchmarks.kv_faults import PrefillTrace

    engine = _int8_engine(tiny_llama)
    real, calls = llama.store_kv, []

    def stray(cache, slots, x, *args, **kwargs):
        real(cache, slots, x, *args, **kwargs)
        calls.append(x.shape[0])
        if len(calls) == 2:  # layer 0's V (each layer stores K, then V)
            x[7:] = float("nan")
    monkeypatch.setattr(llama, "store_kv", stray)
    ids = [1] + [5 + i % 90 for i in range(99)]
    engine.scheduler.add(Sequence("s", ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), seed=0))
    with PrefillTrace() as trace:
        engine.step()
    assert llama._prefill_attention is trace.inner_attention  # put back
    found = trace.summary()
    first, second = found["attention_inputs"]
    assert first == {"q_nonfinite": None, "k_nonfinite": None, "v_nonfinite": None, "q_changed": None,
                     "k_changed": None, "v_changed": 7}
    assert found["first_attention_input"]["v_changed"] == [0, 7]
    assert found["first_nonfinite_token"][0]["attention"] is not None and found["first_nonfinite"]["attention"] == 0
    assert all(second[f"{t}_nonfinite"] is not None for t in "qkv")
