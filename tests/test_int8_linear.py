"""The fast int8 linears run on bitsandbytes' own int8 weights and compute bnb's own numbers.

int_mm is bnb's LLM.int8() arithmetic without the outlier decomposition: on activations below the
outlier threshold (the demo model's) it equals bnb's Linear8bitLt bit for bit; with outliers it equals
bnb at threshold 0 (checked against a float64 reference of that arithmetic). int_mm_outliers, the default,
keeps the decomposition: its outlier columns go through bnb's dequantised weight rows, as bnb at threshold 6
does, and a guard adds columns that reach the threshold later. The engine's greedy output is the same with
every kernel.
"""

import pytest
import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.int8_linear import (
    OUTLIER_KERNEL,
    FusedInt8Linear,
    Int8Linear,
    Int8Runtime,
    Int8State,
    convert_model,
    int_mm_works,
    outlier_guard,
    quantize_rows,
    resolve_int8_kernel,
)
from batchgen.worker.engine.int8_outliers import (
    GUARD_WINDOW_TOKENS,
    MASSIVE_FACTOR,
    SYSTEMATIC_RATE,
    OutlierColumns,
    calibration_ids,
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


def test_engine_output_is_the_same_with_bnb_int_mm_and_the_unrotated_outlier_kernel(demo_model_dir):
    from tests.test_llm_engine import MAX_TOKENS, PROMPTS, completion, run

    def outputs(kernel: str) -> dict[str, str]:  # LLM.int8()'s arithmetic: the default's rotation off
        engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=3, int8_kernel=kernel,
                                                    int8_rotate="none"))
        if kernel == "bnb":
            assert bnb_linears(engine.model)
        extra = engine.stats().extra
        assert extra["int8_kernel"] == (OUTLIER_KERNEL if kernel == "auto" else kernel)
        assert extra["int8_outlier_columns"] == 0  # the demo model's activations stay below 6
        reqs = [completion(f"k{i}", PROMPTS[i], max_tokens=MAX_TOKENS[i]) for i in range(6)]
        return {k: r.text for k, r in run(engine, reqs).items()}

    assert outputs("bnb") == outputs("int_mm") == outputs("auto")


def test_auto_is_the_outlier_kernel_unless_the_threshold_is_zero():
    cpu = torch.device("cpu")
    assert resolve_int8_kernel("auto", cpu, 6.0) == OUTLIER_KERNEL
    assert resolve_int8_kernel("auto", cpu, 0.0) == "int_mm"
    assert resolve_int8_kernel(OUTLIER_KERNEL, cpu, 0.0) == "int_mm"  # nothing is held back at threshold 0
    assert resolve_int8_kernel("weight_only", cpu, 6.0) == "weight_only"
    assert EngineConfig(model="m", int8_kernel=OUTLIER_KERNEL).int8_kernel == OUTLIER_KERNEL


def _with_outliers(module, columns: list[int], threshold: float = 6.0) -> Int8Linear:
    fast = Int8Linear(Int8State.from_bnb(module), OUTLIER_KERNEL)
    outliers = OutlierColumns(fast.in_features, threshold, fast.cb.device)
    outliers.resize(8)
    fast.attach(outliers, torch.float32)
    outliers.add(columns)
    return fast


def test_outlier_columns_go_through_the_dequantised_weights_exactly(bnb_model):
    module = bnb_linears(bnb_model)[0]  # bnb at threshold 6
    fast = _with_outliers(module, [3, 17])
    x = torch.randn(9, module.in_features, generator=torch.Generator().manual_seed(4)).clamp(-5.9, 5.9)
    x[:, 3], x[:, 17] = 40.0, -25.0 * torch.rand(9, generator=torch.Generator().manual_seed(5)) - 6.5
    with torch.inference_mode():
        out = fast(x)
        bnb_out = module(x)
    weight = fast.cb.double() * fast.scb.double()[:, None] * 7.874015718698502e-3  # bnb's dequantised rows
    rest = x.clone()
    rest[:, [3, 17]] = 0
    xq, absmax = quantize_rows(rest)
    ref = (xq.double() @ fast.cb.double().T) * absmax.double() * fast.scb.double() * 6.200124e-05
    ref += x[:, [3, 17]].double() @ weight[:, [3, 17]].T
    assert (out.double() - ref).norm() / ref.norm() < 1e-6  # float32 rounding only
    assert (out - bnb_out).abs().max() < 1e-4 * bnb_out.abs().max()  # bnb decomposes the same columns
    assert fast.dense.shape == (8, module.out_features)  # only the slots, not the whole weight in float


def test_the_guard_adds_a_column_that_reaches_the_threshold(demo_model_dir):
    model = load_model(str(demo_model_dir), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                       int8_threshold=6.0).model
    convert_model(model, OUTLIER_KERNEL, threshold=6.0)  # no calibration: every slot free
    guard = outlier_guard(model, 6.0)
    attn = model.model.layers[0].self_attn
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(6)).clamp(-5.9, 5.9)
    with torch.inference_mode():
        attn.qkv_proj(x)
        assert guard.poll(5) == 0 and guard.num_columns == 0
        x[:, 11] = 30.0
        first = attn.qkv_proj(x)  # this forward still quantises column 11 with the rest
        assert attn.qkv_proj.outliers.columns == []
        assert guard.poll(5) == 1
        assert attn.qkv_proj.outliers.columns == [11] and guard.num_columns == 1
        second = attn.qkv_proj(x)
        q, k, v = second.split(attn.qkv_proj.split_sizes, dim=-1)
        assert torch.equal(q, attn.q_proj(x)) and torch.equal(v, attn.v_proj(x))  # the views share the columns
    exact = x.double() @ (attn.qkv_proj.cb.double() * attn.qkv_proj.scb.double()[:, None] / 127).T
    assert (second.double() - exact).norm() < 0.5 * (first.double() - exact).norm()
    assert attn.o_proj.outliers.columns == []  # other inputs untouched


def test_calibration_finds_the_outlier_columns_of_each_input(demo_model_dir):
    model = load_model(str(demo_model_dir), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                       int8_threshold=6.0).model
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.input_layernorm.weight[[7, 40]] = 50.0  # q/k/v input columns 7 and 40 carry |x| >> 6
    from transformers import AutoTokenizer

    ids = calibration_ids(AutoTokenizer.from_pretrained(demo_model_dir), torch.device("cpu"), num_seqs=2, seq_len=32)
    assert ids.shape == (2, 32) and (ids[:, 0] == model.config.bos_token_id).all()
    convert_model(model, OUTLIER_KERNEL, threshold=6.0, calibration_ids=ids)
    assert sorted(layer.self_attn.qkv_proj.outliers.columns) == [7, 40]
    assert layer.self_attn.q_proj.outliers is layer.self_attn.qkv_proj.outliers
    assert layer.mlp.gate_up_proj.outliers.columns == []  # post_attention_layernorm was left alone
    assert model.model.layers[0].self_attn.qkv_proj.outliers.columns == []
    # v carries the planted columns on to o_proj's input: most of its 64 columns reach 6 there, and the
    # calibration keeps the largest quarter (the rest stay int8, as in int_mm)
    assert len(layer.self_attn.o_proj.outliers.columns) == 64 // 4
    assert outlier_guard(model, 6.0).num_columns == 2 + 64 // 4


def _guarded_linear(demo_model_dir):
    model = load_model(str(demo_model_dir), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                       int8_threshold=6.0).model
    convert_model(model, OUTLIER_KERNEL, threshold=6.0)
    return outlier_guard(model, 6.0), model.model.layers[0].self_attn.qkv_proj


def test_the_guard_adds_a_systematic_column_once_its_window_is_full(demo_model_dir):
    guard, qkv = _guarded_linear(demo_model_dir)
    rows = 512
    x = torch.randn(rows, qkv.in_features, generator=torch.Generator().manual_seed(6)).clamp(-4, 4)
    x[::10, 5] = 9.0  # 10% of the tokens: an outlier feature, though never massive (< 4 x 6)
    with torch.inference_mode():
        for _ in range(GUARD_WINDOW_TOKENS // rows - 1):
            qkv(x)
            assert guard.poll(rows) == 0  # judged only once the window is full
        qkv(x)
        assert guard.poll(rows) == 1 and qkv.outliers.columns == [5]


def test_the_guard_leaves_sporadic_columns_in_int8(demo_model_dir):
    guard, qkv = _guarded_linear(demo_model_dir)
    rows = 512
    x = torch.randn(rows, qkv.in_features, generator=torch.Generator().manual_seed(7)).clamp(-4, 4)
    x[0, 9] = 9.0  # one token in 512: below the systematic rate, and not massive
    with torch.inference_mode():
        for _ in range(2 * GUARD_WINDOW_TOKENS // rows):
            qkv(x)
            assert guard.poll(rows) == 0
    assert qkv.outliers.columns == []
    assert MASSIVE_FACTOR * 6.0 > 9.0 and 1 / rows < SYSTEMATIC_RATE


def test_bad_kernel_names_are_rejected():
    with pytest.raises(ValueError):
        EngineConfig(model="m", int8_kernel="fp4")
    with pytest.raises(ValueError):
        EngineConfig(model="m", attention="xformers")


def test_weight_only_in_fp16_survives_large_activations(bnb_model):
    # x @ CB.T in fp16 overflowed once |x| reached a few tens (CB is the weight x 127 / its row's absmax):
    # the quality benchmark's weight-only row and the outlier kernel's calibration pass read inf there.
    module = bnb_linears(bnb_model)[0]
    fast = Int8Linear(Int8State.from_bnb(module), "weight_only")
    x = torch.randn(4, module.in_features, generator=torch.Generator().manual_seed(3))
    x[:, :8] = 300.0
    with torch.inference_mode():
        out = fast(x.half())
    exact = x.double() @ (fast.cb.double() * fast.scb.double()[:, None] / 127).T
    assert torch.isfinite(out).all()
    assert (out.double() - exact).norm() / exact.norm() < 1e-2


def test_an_input_without_columns_is_int_mm_until_the_guard_opens_it(demo_model_dir):
    guard, qkv = _guarded_linear(demo_model_dir)
    plain = Int8Linear(qkv.state, "int_mm")
    x = torch.randn(6, qkv.in_features, generator=torch.Generator().manual_seed(8)).clamp(-4, 4)
    with torch.inference_mode():
        assert torch.equal(qkv(x), plain(x))  # no dense part while the input has no outlier column
        x[:, 2] = 40.0  # massive: the guard opens the input at once
        qkv(x)
        runtime = Int8Runtime(OUTLIER_KERNEL, guard)
        assert runtime.poll(6) is True and qkv.outliers.columns == [2]
        assert not torch.equal(qkv(x), plain(x))  # column 2 goes through the dense weights now
        x[:, 3] = 40.0
        qkv(x)
        assert runtime.poll(6) is False and qkv.outliers.columns == [2, 3]  # in place: graphs stay valid


def test_a_converted_linear_still_has_a_weight_for_forwards_that_read_it(bnb_model):
    """Some HF forwards multiply by a linear's weight themselves or read its dtype: the dequantized weight, in
    the model's compute dtype, serves them."""
    import copy

    model = copy.deepcopy(bnb_model)
    convert_model(model, "int_mm", compile_kernels=False)
    linear = next(m for m in model.modules() if isinstance(m, Int8Linear))
    assert linear.weight.dtype == model.dtype == torch.float32
    x = torch.randn(3, linear.in_features)
    torch.testing.assert_close(x @ linear.weight.t(), linear._forward_weight_only(x))


@pytest.mark.parametrize("tma", [False, True])
def test_a_tuned_triton_gemm_computes_what_int_mm_and_its_epilogue_do(bnb_model, tmp_path, monkeypatch, tma):
    """Where benchmarks.int8_tune's table has a GEMM launch for a linear's shape near the batch's rows, Int8Linear
    quantises in one Triton kernel and runs the Triton int8 GEMM with the epilogue fused (here under Triton's
    interpreter; tma: the persistent kernel the launch may name): the same numbers bit for bit (to float32 rounding
    where the epilogue accumulates the outlier columns' product) and the same guard records, with and without outlier
    columns; batches more than twice the tuned rows away keep torch._int_mm."""
    import json

    from batchgen.worker.engine import int8_linear
    from batchgen.worker.engine.kernels import tuned

    module = bnb_linears(bnb_model)[0]
    n, k = module.out_features, module.in_features
    launch = {"block_m": 32, "block_n": 32, "block_k": 32, "group_m": 2, "num_warps": 4, "num_stages": 2, "tma": tma}
    monkeypatch.setattr(tuned, "TABLES", tmp_path)
    tuned.table_path("cpu").write_text(json.dumps({"gemm": [{"n": n, "k": k, "rows": 40, "launch": launch}]}))
    tuned.forget()
    calls = []
    fused = int8_linear.int8_matmul_dequant
    monkeypatch.setattr(int8_linear, "int8_matmul_dequant",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or fused(*a, **kw))
    pairs = [(Int8Linear(Int8State.from_bnb(module), "int_mm"), Int8Linear(Int8State.from_bnb(module), "int_mm")),
             (_with_outliers(module, []), _with_outliers(module, [])),  # the guard only
             (_with_outliers(module, [3, 17]), _with_outliers(module, [3, 17]))]
    for m in (40, 25, 90):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).clamp(-5.9, 5.9)
        x[:, 3], x[m // 2, 40] = 30.0, -9.0
        for untuned, tuned_linear in pairs:
            with torch.inference_mode():
                monkeypatch.setattr(int8_linear, "USE_TUNED_GEMM", False)
                want = untuned(x)
                monkeypatch.setattr(int8_linear, "USE_TUNED_GEMM", True)
                got = tuned_linear(x)
            if untuned.outliers is not None and untuned.outliers.columns:
                # the outlier columns' product accumulated into the epilogue's tile (tl.dot with an accumulator)
                # against added after it: the same float32 values summed in another order, an ulp or two apart
                torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6, msg=str((m, untuned.kernel)))
            else:
                assert torch.equal(got, want), (m, untuned.kernel)
    from batchgen.worker.engine.kernels import int8_ops

    monkeypatch.setattr(int8_ops, "FUSE_DENSE", False)  # the dense product computed apart: the same numbers
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(7)).clamp(-5.9, 5.9)
    with torch.inference_mode():
        monkeypatch.setattr(int8_linear, "USE_TUNED_GEMM", False)
        want = pairs[2][0](x)
        monkeypatch.setattr(int8_linear, "USE_TUNED_GEMM", True)
        assert torch.equal(pairs[2][1](x), want)
    monkeypatch.setattr(int8_ops, "FUSE_DENSE", True)
    calls.pop()
    for untuned, tuned_linear in pairs[1:]:
        assert torch.equal(untuned.outliers.seen, tuned_linear.outliers.seen)
        assert torch.equal(untuned.outliers.hits, tuned_linear.outliers.hits)
    assert pairs[1][1].outliers.hits[3] > 0 and pairs[2][1].outliers.seen[40] == 9.0  # what each guard saw
    assert calls == [40, 40, 40, 25, 25, 25]  # 90 rows: more than twice the 40 it was tuned at
    monkeypatch.setattr(tuned, "ENABLED", False)  # --no-tuned-kernels
    with torch.inference_mode():
        pairs[0][1](torch.randn(40, k))
    assert len(calls) == 6 and tuned.describe("cpu") == "off (--no-tuned-kernels)"
    monkeypatch.setattr(tuned, "ENABLED", True)
    assert tuned.describe("cpu") == "cpu.json: gemv 0, gemm 1, gated 0"
    tuned.forget()
