"""The small-row int8 GEMV (kernels.int8_gemv) under Triton's interpreter, and Int8Linear's dispatch to it.

The kernel is weight-only arithmetic: x @ (cb · scb / 127).T (+ bias), float32 accumulation. Int8Linear takes
it at <= 16 rows (forced here with USE_GEMV, since the default runs it on CUDA only) and int_mm above; the
outlier guard keeps recording on it, and the engine's greedy output with it equals the weight-only kernel's.
"""

import pytest
import torch
from batchgen.worker.engine import int8_linear
from batchgen.worker.engine.int8_linear import (
    OUTLIER_KERNEL,
    FusedInt8Linear,
    Int8Linear,
    Int8Runtime,
    Int8State,
    convert_model,
    dequantize_weight,
    outlier_guard,
)
from batchgen.worker.engine.kernels.int8_gemv import (
    MAX_ROWS,
    GuardBuffers,
    gemv_config,
    int8_gemv,
    int8_gemv_reference,
)

TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float32: dict(rtol=1e-5, atol=1e-4)}


def _weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cb = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return cb, torch.rand(n, generator=g) * 0.2 + 0.01, torch.randn(n, generator=g)


def _expected(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ dequantize_weight(cb, scb, torch.float64).T
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_equals_the_dequantised_matmul(dtype, m):
    n, k = 45, 200  # neither a multiple of the blocks below
    cb, scb, bias = _weights(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(10 + m)).to(dtype)
    for split_k, with_bias in ((None, True), (1, False), (3, True)):
        b = bias.to(dtype) if with_bias else None
        out = int8_gemv(x, cb, scb, b, block_n=16, block_k=64, split_k=split_k)
        assert out.shape == (m, n) and out.dtype == dtype
        torch.testing.assert_close(out.double(), _expected(x, cb, scb, b), **TOL[dtype])
        torch.testing.assert_close(out, int8_gemv_reference(x, cb, scb, b), **TOL[dtype])


@pytest.mark.parametrize("m", [1, 4])
def test_whole_tiles_and_both_ways_of_widening_the_weights(m):
    n, k = 32, 128  # multiples of the blocks: the unmasked loads
    cb = torch.randint(-128, 128, (n, k), generator=torch.Generator().manual_seed(30), dtype=torch.int8)
    cb[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)  # the ends of the int8 range
    scb = torch.rand(n, generator=torch.Generator().manual_seed(31)) + 0.5
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(32)).half()
    for bits in (True, False):
        out = int8_gemv(x, cb, scb, block_n=16, block_k=64, bits=bits)
        torch.testing.assert_close(out.double(), _expected(x, cb, scb, None), **TOL[torch.float16])


def test_gemv_default_launch_and_float32_rows():
    n, k = 33, 130
    cb, scb, bias = _weights(n, k, seed=4)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(int8_gemv(x, cb, scb, bias).double(), _expected(x, cb, scb, bias),
                               **TOL[torch.float32])
    with pytest.raises(ValueError):
        int8_gemv(torch.randn(MAX_ROWS + 1, k), cb, scb)


def test_gemv_reads_a_row_slice_of_a_fused_matrix():
    cb, scb, bias = _weights(48, 70, seed=6)
    x = torch.randn(2, 70, generator=torch.Generator().manual_seed(7)).half()
    start, size = 16, 20  # k_proj of a fused qkv: rows 16..35, the row stride still the whole matrix's
    view = int8_gemv(x, cb[start:start + size], scb[start:start + size], bias[start:start + size], block_k=32)
    whole = int8_gemv(x, cb, scb, bias, block_k=32)
    assert torch.equal(view, whole[:, start:start + size])


@pytest.mark.parametrize("m", [1, 6])
def test_gemv_records_the_rows_for_the_outlier_guard_as_record_does(m):
    from batchgen.worker.engine.int8_outliers import OutlierColumns

    n, k = 24, 150
    cb, scb, _ = _weights(n, k, seed=20 + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(21)).half() * 3
    x[0, 11] = 50.0  # a dense column already: the guard looks past it
    x[-1, 140] = -8.0  # past the first guard block; the threshold counts |x|
    guards = []
    for _ in range(2):
        o = OutlierColumns(k, 6.0, torch.device("cpu"))
        o.keep[11] = 0
        o.seen[:] = torch.rand(k, generator=torch.Generator().manual_seed(22))  # folds into what is there
        guards.append(o)
    ours = int8_gemv(x, cb, scb, None, GuardBuffers(guards[0].keep, guards[0].seen, guards[0].hits, 6.0), split_k=2,
                     block_k=32)
    absmax, argmax = (x.to(torch.float16) * guards[1].keep).abs().max(dim=-1, keepdim=True)
    guards[1].record(absmax.float(), argmax)  # what the int_mm path records
    assert torch.equal(guards[0].seen, guards[1].seen) and torch.equal(guards[0].hits, guards[1].hits)
    assert guards[0].hits[140] >= 1 and guards[0].seen[11] < 1
    torch.testing.assert_close(ours.double(), _expected(x, cb, scb, None), **TOL[torch.float16])


def test_the_default_launch_fills_a_large_gpu():
    for m, n, k in ((1, 4096, 4096), (16, 4096, 4096), (1, 4096, 11008), (8, 12288, 4096), (4, 22016, 4096)):
        cfg = gemv_config(m, n, k, num_sms=132)
        assert -(-n // cfg["block_n"]) * cfg["split_k"] >= 2 * 132
        assert k // cfg["split_k"] >= cfg["block_k"]  # every split has work


def test_a_tuned_table_sets_the_launch_near_the_rows_it_was_timed_at(tmp_path, monkeypatch):
    """benchmarks.int8_tune's table (kernels.tuned): the launch timed at the row count nearest m, within a factor
    of two (the larger on a tie); the rule elsewhere and for shapes never tuned; what int8_gemv then runs still
    computes the same product, one row through the padded dot path included."""
    import json

    from batchgen.worker.engine.kernels import tuned

    n, k = 64, 96
    entries = [{"n": n, "k": k, "rows": 4, "launch": {"block_n": 16, "block_k": 32, "split_k": 2, "dot": True}},
               {"n": n, "k": k, "rows": 1, "launch": {"block_n": 4, "block_k": 32}}]
    monkeypatch.setattr(tuned, "TABLES", tmp_path)
    path = tuned.table_path("Some GPU (80GB)")
    assert path.name == "Some_GPU_80GB.json"
    path.write_text(json.dumps(tuned.merge(path, "gemv", entries)))
    path.write_text(json.dumps(tuned.merge(path, "gemm", [])))  # another kernel's section
    other = {"n": 2 * n, "k": k, "rows": 1, "launch": {"block_n": 32}}  # another model's shape, tuned later
    retuned = {**entries[1], "launch": {"block_n": 8, "block_k": 64, "num_warps": 2, "pipeline": 3}}
    path.write_text(json.dumps(tuned.merge(path, "gemv", [other, retuned])))
    assert len(json.loads(path.read_text())["gemv"]) == 3  # added to, and the same (n, k, rows) replaced
    path.write_text(json.dumps(tuned.merge(path, "gemv", [], {(2 * n, k, 1)})))
    assert len(json.loads(path.read_text())["gemv"]) == 2  # timed again without a win: the default serves it
    tuned.forget()
    table = tuned.launches("Some GPU (80GB)", "gemv")
    rule = gemv_config(1, n, k, 132)
    assert gemv_config(1, n, k, 132, tuned.pick(table, 1, n, k)) == {**rule, "block_n": 8, "block_k": 64,
                                                                      "num_warps": 2, "pipeline": 3}
    for m in (2, 3, 8):  # 2: as near 1 as 4, the larger wins
        assert tuned.pick(table, m, n, k) == entries[0]["launch"]
    assert tuned.pick(table, 9, n, k) is None  # more than twice the rows it was timed at
    assert tuned.pick(table, 1, n, 2 * k) is None and tuned.launches("Never Tuned", "gemv") == {}
    # every device's table, by file: where the tuner starts a search on another device
    assert tuned.every_device("gemv") == {path.stem: table} and tuned.every_device("gemm") == {path.stem: {}}
    cb, scb, bias = _weights(n, k, seed=40)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(41)).half()
    for m in (1, 3):
        xm = x.expand(m, k).contiguous()
        out = int8_gemv(xm, cb, scb, bias, **gemv_config(m, n, k, 132, tuned.pick(table, m, n, k)))
        torch.testing.assert_close(out.double(), _expected(xm, cb, scb, bias), **TOL[torch.float16])
    one_row_by_dot = int8_gemv(x, cb, scb, bias, dot=True, block_n=16, block_k=32)  # padded to 16 rows
    torch.testing.assert_close(one_row_by_dot.double(), _expected(x, cb, scb, bias), **TOL[torch.float16])
    tuned.forget()


# -- Int8Linear's dispatch --------------------------------------------------------------------------------
@pytest.fixture
def gemv_calls(monkeypatch) -> list[int]:
    """Forces the GEMV (the interpreter runs it on the CPU) and counts its calls by rows."""
    calls: list[int] = []

    def counted(x, *args, **kw):
        calls.append(x.shape[0])
        return int8_gemv(x, *args, **kw)

    monkeypatch.setattr(int8_linear, "int8_gemv", counted)
    monkeypatch.setattr(int8_linear, "USE_GEMV", True)
    return calls


def _linear(kernel: str, n: int = 40, k: int = 72, seed: int = 8) -> Int8Linear:
    cb, scb, bias = _weights(n, k, seed)
    return Int8Linear(Int8State(cb, scb, bias), kernel)


@pytest.mark.parametrize("kernel", ["int_mm", "weight_only"])
def test_a_few_rows_take_the_gemv_and_more_take_the_kernel(kernel, gemv_calls, monkeypatch):
    lin = _linear(kernel)
    g = torch.Generator().manual_seed(9)
    few, many = torch.randn(2, 3, lin.in_features, generator=g), torch.randn(MAX_ROWS + 1, lin.in_features, generator=g)
    with torch.inference_mode():
        out = lin(few)
        assert gemv_calls == [6] and out.shape == (2, 3, lin.out_features)
        torch.testing.assert_close(out.double(), _expected(few, lin.cb, lin.scb, lin.bias), **TOL[torch.float32])
        big = lin(many)
        assert gemv_calls == [6]  # 17 rows: the kernel's own path
        monkeypatch.setattr(int8_linear, "USE_GEMV", False)
        assert torch.equal(big, lin(many))
        before = lin(few)  # the GEMV off: int_mm quantises the activations, weight_only rounds nothing else
    assert gemv_calls == [6]
    if kernel == "weight_only":
        torch.testing.assert_close(out, before, **TOL[torch.float32])


def test_the_default_runs_the_gemv_on_cuda_only():
    lin = _linear("int_mm")
    x = torch.randn(2, lin.in_features)
    assert int8_linear.USE_GEMV is None and not int8_linear.takes_gemv(x)  # the CPU: int_mm as before
    assert not int8_linear.takes_gemv(torch.randn(0, lin.in_features))


def test_fused_projections_and_their_views_take_the_gemv(demo_model_dir, gemv_calls):
    from batchgen.worker.engine.loader import load_model

    model = load_model(str(demo_model_dir), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                       int8_threshold=6.0).model
    convert_model(model, "int_mm")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, FusedInt8Linear)
    x = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        q, k, v = attn.qkv_proj(x).split(attn.qkv_proj.split_sizes, dim=-1)
        views = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert gemv_calls == [3] * 4
    for fused, view in zip((q, k, v), views, strict=True):
        torch.testing.assert_close(fused, view, rtol=1e-6, atol=1e-6)


def test_the_outlier_kernel_keeps_its_guard_on_the_gemv(demo_model_dir, gemv_calls):
    from batchgen.worker.engine.loader import load_model

    model = load_model(str(demo_model_dir), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                       int8_threshold=6.0).model
    convert_model(model, OUTLIER_KERNEL, threshold=6.0)  # no calibration ids: no column yet
    assert gemv_calls == []
    runtime = Int8Runtime(OUTLIER_KERNEL, outlier_guard(model, 6.0))
    qkv = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(2, qkv.in_features, generator=torch.Generator().manual_seed(12)).clamp(-4, 4)
    with torch.inference_mode():
        small = qkv(x)
        assert gemv_calls == [2] and runtime.poll(2) is False
        torch.testing.assert_close(small.double(), _expected(x, qkv.cb, qkv.scb, qkv.bias), **TOL[torch.float32])
        x[:, 5] = 40.0  # massive, seen on the GEMV path: the guard opens the column for the larger batches
        qkv(x)
        assert runtime.poll(2) is True and qkv.outliers.columns == [5]
        qkv.outliers.calibrating = True  # calibration observes exact activations, as before
        qkv(x)
        qkv.outliers.calibrating = False
    assert gemv_calls == [2, 2]


@pytest.mark.slow
def test_engine_greedy_output_with_the_gemv_equals_weight_only(demo_model_dir, monkeypatch):
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.llm_engine import LLMEngine

    from tests.test_llm_engine import MAX_TOKENS, PROMPTS, completion, run

    calls: list[int] = []

    def counted(x, *args, **kw):
        calls.append(x.shape[0])
        return int8_gemv(x, *args, **kw)

    monkeypatch.setattr(int8_linear, "int8_gemv", counted)

    def outputs(use_gemv: bool) -> dict[str, str]:
        monkeypatch.setattr(int8_linear, "USE_GEMV", use_gemv)
        engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=3,
                                                    int8_kernel="weight_only"))
        reqs = [completion(f"k{i}", PROMPTS[i], max_tokens=MAX_TOKENS[i]) for i in range(4)]
        return {k: r.text for k, r in run(engine, reqs).items()}

    plain = outputs(False)
    assert calls == []
    assert outputs(True) == plain
    assert calls and max(calls) <= 3  # the decode steps of up to 3 rows took it; prefills did not


def test_the_tuner_writes_the_table_the_engine_reads(tmp_path, monkeypatch):
    """benchmarks.int8_tune --smoke (tiny shapes, Triton's interpreter): its table loads through kernels.tuned, and
    each launch in it runs and computes the product."""
    import subprocess
    import sys

    from batchgen.worker.engine.kernels import tuned

    proc = subprocess.run([sys.executable, "-m", "benchmarks.int8_tune", "--smoke", "--kernels", "gemv", "--budget-s",
                           "10", "--out", str(tmp_path / "int8_tune.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.setattr(tuned, "TABLES", tmp_path)
    tuned.forget()
    table = tuned.launches("cpu (smoke)", "gemv")
    assert table, proc.stdout[-2000:]  # on the interpreter some launch always beats the rule's by far
    for (n, k), found in table.items():
        cb, scb, bias = _weights(n, k, seed=50)
        for rows, launch in found:
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(51)).half()
            out = int8_gemv(x, cb, scb, bias, **gemv_config(rows, n, k, 132, launch))
            torch.testing.assert_close(out.double(), _expected(x, cb, scb, bias), **TOL[torch.float16])
    tuned.forget()


def test_the_tuners_gemm_steps_shrink_a_tile_until_it_fits_shared_memory():
    """A coordinate step to a tile too big for Hopper's shared memory keeps its tile with fewer stages (or a
    shorter block_k), so 256 × 256 is reachable from 256 × 128 in one step; a fitting launch is unchanged."""
    from benchmarks.int8_tune import fitted, valid

    start = {"block_m": 256, "block_n": 128, "block_k": 128, "group_m": 8, "num_warps": 8, "num_stages": 4}
    assert fitted("gemm", start, 4096, 4096) == start
    wide = fitted("gemm", {**start, "block_n": 256}, 4096, 4096)
    assert wide == {**start, "block_n": 256, "num_stages": 3} and valid("gemm", wide, 4096, 4096)
    assert not valid("gemm", {**start, "block_n": 256}, 4096, 4096)
