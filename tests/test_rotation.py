"""--int8-rotate down (worker/engine/rotation.py): a block Hadamard rotation of the down projections' inputs, folded
into their int8 weights, computes the same function up to int8 rounding; and on the planted-outlier model it
drifts less from fp32 than the default does (benchmarks/quality.py's default_rotated)."""

import pytest
import torch
from batchgen.worker.engine import rotation
from batchgen.worker.engine.int8_linear import OUTLIER_KERNEL, Int8Linear, convert_model

from benchmarks.quality import int8_linears, int8_state, speed_model


def test_the_hadamard_block_is_orthonormal_and_its_own_inverse():
    h = rotation.hadamard(256, torch.device("cpu"), torch.float64)
    assert torch.allclose(h @ h, torch.eye(256, dtype=torch.float64), atol=1e-12) and torch.equal(h, h.t())
    x = torch.randn(3, 5, 512, dtype=torch.float64)
    assert torch.allclose(rotation.rotate(rotation.rotate(x)), x, atol=1e-12)
    with pytest.raises(ValueError):
        rotation.hadamard(96, torch.device("cpu"), torch.float32)
    assert [rotation.block_for(n) for n in (11008, 14336, 128, 2816, 96, 4097)] == [256, 256, 128, 256, 0, 0]


@pytest.mark.parametrize("kernel", ["weight_only", "int_mm"])
def test_a_rotated_linear_computes_what_the_plain_one_does_up_to_int8_rounding(kernel):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g)
    x = torch.randn(40, 512, generator=g) * torch.randn(40, 512, generator=g)  # a gated MLP's heavy tails
    plain, rotated = Int8Linear(int8_state(w), kernel), Int8Linear(int8_state(w), kernel)
    rotated.rotate_input()
    rotated.rotate_input()  # once only: a second call leaves the weights as they are
    assert rotated.rotate_block == 256 and not torch.equal(rotated.cb, plain.cb)
    exact = x @ w.t()
    err_plain = (plain(x) - exact).abs().mean() / exact.abs().mean()
    err_rotated = (rotated(x) - exact).abs().mean() / exact.abs().mean()
    assert err_rotated < 0.02 and err_plain < 0.02
    assert torch.allclose(rotated.weight.float(), plain.weight.float(), atol=0.05)  # rotated back when read
    if kernel == "int_mm":  # per-token int8 of the heavy-tailed input: rotated, its scale is finer
        assert err_rotated < err_plain


def test_convert_model_rotates_the_down_projections_only():
    torch.manual_seed(0)
    model = speed_model(torch.device("cpu"), num_layers=1, hidden=256, intermediate=512).float()
    with pytest.raises(ValueError):
        convert_model(model, "int_mm", rotate="all")
    convert_model(model, OUTLIER_KERNEL, threshold=6.0, calibration_ids=torch.randint(8, 32000, (2, 16)),
                  rotate="down")
    rotated = {name for name, m in model.named_modules() if isinstance(m, Int8Linear) and m.rotate_block}
    assert rotated == {"model.layers.0.mlp.down_proj"}
    convert_model(model, "int_mm", rotate="down")  # converted again: still rotated once, with its weights
    assert model.model.layers[0].mlp.down_proj.rotate_block == 256


def test_auto_rotates_for_the_outlier_kernel_only():
    """--int8-rotate auto (the default): the outlier kernel's down projections rotate; int_mm, the threshold-0
    baseline, keeps LLM.int8()'s arithmetic."""
    def converted(kernel: str):
        torch.manual_seed(0)
        model = speed_model(torch.device("cpu"), num_layers=1, hidden=256, intermediate=512).float()
        convert_model(model, kernel, threshold=6.0, calibration_ids=torch.randint(8, 32000, (2, 16)), rotate="auto")
        return model.model.layers[0].mlp.down_proj.rotate_block

    assert converted(OUTLIER_KERNEL) == 256
    assert converted("int_mm") == 0


def test_an_engine_with_rotated_down_projections_answers_like_hf_generate_on_its_model(demo_model_dir):
    """The CPU engine with its default --int8-rotate auto: every down projection rotated (the demo model's
    128-wide input: one 128 block), and its greedy output equals HF generate over the same converted model."""
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.llm_engine import LLMEngine

    from tests.test_llm_engine import PROMPTS, completion, hf_greedy, run

    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4))
    layers = engine.model.model.layers
    assert engine.int8.num_rotated == len(layers) and engine.stats().extra["int8_rotated_inputs"] == len(layers)
    assert all(layer.mlp.down_proj.rotate_block == 128 for layer in layers)
    results = run(engine, [completion(f"p{i}", PROMPTS[i], max_tokens=10) for i in range(4)])
    for i in range(4):
        want = hf_greedy(engine, engine.tokenizer(PROMPTS[i])["input_ids"], 10)
        got = results[f"p{i}"]
        assert (got.text, got.finish_reason, got.completion_tokens) == want, PROMPTS[i]
    plain = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, int8_rotate="none"))
    assert plain.int8.num_rotated == 0 and plain.model.model.layers[0].mlp.down_proj.rotate_block == 0


def test_a_checkpoint_fused_gate_up_mlp_rotates_its_down_projection_too():
    """Phi-3's checkpoint holds gate and up as one gate_up_proj; act(gate)·up still feeds down_proj, which rotates
    (auto, the outlier kernel); the int8 model's logits stay near the float model's."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    ids = torch.randint(8, 256, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
    mlp = model.model.layers[0].mlp
    int8_linears(model.model.layers[0].self_attn, mlp)
    convert_model(model, OUTLIER_KERNEL, threshold=6.0, calibration_ids=ids, rotate="auto")
    assert mlp.down_proj.rotate_block == 256 and not hasattr(mlp, "up_proj")
    with torch.no_grad():
        got = model(ids).logits
    assert ((got - want).abs().mean() / want.abs().mean()).item() < 0.05
