"""The fast int8 linears run on bitsandbytes' own int8 weights and compute bnb's own numbers.

int_mm is bnb's LLM.int8() arithmetic without the outlier decomposition: on activations below the
outlier threshold (the demo model's) it equals bnb's Linear8bitLt bit for bit; with outliers it equals
bnb at threshold 0 (checked against a float64 reference of that arithmetic). The engine's greedy output
is the same with either kernel.
"""

import pytest
import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.int8_linear import (
    FusedInt8Linear,
    Int8Linear,
    Int8State,
    convert_model,
    int_mm_works,
    quantize_rows,
)
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.loader import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bnb_model(demo_model_dir):
    return load_model(str(demo_model_dir), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                      int8_threshold=6.0).model


def bnb_linears(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]


def test_int_mm_runs_on_cpu():
    assert int_mm_works(torch.device("cpu"))


def test_int_mm_equals_bnb_below_the_outlier_threshold(bnb_model):
    gen = torch.Generator().manual_seed(0)
    for module in bnb_linears(bnb_model):
        fast = Int8Linear(Int8State.from_bnb(module), "int_mm")
        assert fast.cb.data_ptr() == module.weight.data_ptr()  # the same int8 tensor, not a copy
        for rows in (1, 5, 33):
            x = (torch.randn(rows, module.in_features, generator=gen) * 1.5).clamp(-5.9, 5.9)
            with torch.inference_mode():
                assert torch.equal(fast(x), module(x))


def test_int_mm_with_outliers_is_bnb_threshold_zero_arithmetic(bnb_model):
    module = bnb_linears(bnb_model)[0]
    fast = Int8Linear(Int8State.from_bnb(module), "int_mm")
    x = torch.randn(7, module.in_features, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 40.0  # an outlier column: bnb at threshold 6 would run it in fp16
    xq, absmax = quantize_rows(x)
    # bnb's 1/127² constant is 6.200124e-05 (1/127² is 6.2000124e-05): copied as is, to equal bnb bit for bit.
    ref = (xq.double() @ fast.cb.double().T) * absmax.double() * fast.scb.double() * 6.200124e-05
    with torch.inference_mode():
        out = fast(x)
    assert (out.double() - ref).norm() / ref.norm() < 1e-6  # float32 dequantisation rounding only
    exact = x.double() @ (fast.cb.double() * fast.scb.double()[:, None] / 127).T
    # One outlier coarsens its whole row (step 40/127): ~2% error, the cost that bnb's threshold-6 path avoids.
    assert (out.double() - exact).norm() / exact.norm() < 0.05


def test_weight_only_is_the_dequantised_matmul(bnb_model):
    module = bnb_linears(bnb_model)[1]
    slow = Int8Linear(Int8State.from_bnb(module), "weight_only")
    x = torch.randn(4, 3, module.in_features, generator=torch.Generator().manual_seed(2))
    weight = slow.cb.double() * slow.scb.double()[:, None] / 127
    with torch.inference_mode():
        out = slow(x)
    assert out.shape == (4, 3, module.out_features)
    assert torch.allclose(out.double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)


def test_fused_projections_equal_the_separate_ones(demo_model_dir):
    model = load_model(str(demo_model_dir), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                       int8_threshold=6.0).model
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp(x)]
        assert convert_model(model, "int_mm") == 7 * model.config.num_hidden_layers
        assert isinstance(attn.qkv_proj, FusedInt8Linear) and isinstance(mlp.gate_up_proj, FusedInt8Linear)
        assert attn.q_proj.cb.data_ptr() == attn.qkv_proj.cb.data_ptr()  # views, one copy in memory
        q, k, v = attn.qkv_proj(x).split(attn.qkv_proj.split_sizes, dim=-1)
        after = [q, k, v, mlp(x)]
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert not bnb_linears(model)


def test_engine_output_is_the_same_with_bnb_and_int_mm(demo_model_dir):
    from tests.test_llm_engine import MAX_TOKENS, PROMPTS, completion, run

    def outputs(kernel: str) -> dict[str, str]:
        engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=3, int8_kernel=kernel))
        if kernel == "bnb":
            assert bnb_linears(engine.model)
        reqs = [completion(f"k{i}", PROMPTS[i], max_tokens=MAX_TOKENS[i]) for i in range(6)]
        return {k: r.text for k, r in run(engine, reqs).items()}

    assert outputs("bnb") == outputs("int_mm")


def test_bad_kernel_names_are_rejected():
    with pytest.raises(ValueError):
        EngineConfig(model="m", int8_kernel="fp4")
    with pytest.raises(ValueError):
        EngineConfig(model="m", attention="xformers")
