"""VRAM budget arithmetic with given numbers: how many KV-cache rows a worker runs."""

from batchgen.worker.engine import budget

GiB = 1024**3
MiB = 1024**2


def test_kv_bytes_per_token_is_k_and_v_over_all_layers():
    # Llama-2-7B: 32 layers, 32 KV heads of 128, fp16 -> 512 KiB per token
    assert budget.kv_bytes_per_token(32, 32, 128, 2) == 512 * 1024
    # Llama-3-8B (GQA, 8 KV heads) -> 128 KiB per token
    assert budget.kv_bytes_per_token(32, 8, 128, 2) == 128 * 1024


def test_budget_is_free_memory_minus_reserve():
    assert budget.budget_bytes(free_bytes=70 * GiB, reserve_bytes=500 * MiB) == 70 * GiB - 500 * MiB


def test_a_cap_limits_the_budget_to_cap_minus_weights_minus_reserve():
    got = budget.budget_bytes(free_bytes=70 * GiB, reserve_bytes=1 * GiB, max_bytes=24 * GiB, weights_bytes=7 * GiB)
    assert got == 16 * GiB
    # the free memory still wins when it is tighter than the cap
    assert budget.budget_bytes(free_bytes=5 * GiB, reserve_bytes=1 * GiB, max_bytes=24 * GiB,
                               weights_bytes=7 * GiB) == 4 * GiB


def test_budget_without_a_reading_uses_the_cap_only_and_never_goes_negative():
    assert budget.budget_bytes(free_bytes=None, reserve_bytes=0, max_bytes=8 * GiB, weights_bytes=2 * GiB) == 6 * GiB
    assert budget.budget_bytes(free_bytes=None, reserve_bytes=0) == 0
    assert budget.budget_bytes(free_bytes=100 * MiB, reserve_bytes=500 * MiB) == 0


def test_rows_are_what_fits_after_the_prefill_peak():
    # 7B GQA model, 4096 tokens per row: 512 MiB KV + 16 MiB activations per row
    plan = budget.plan(budget_bytes=60 * GiB, kv_bytes_per_token=128 * 1024, max_model_len=4096,
                       activation_bytes_per_row=16 * MiB, prefill_bytes=4 * GiB)
    assert plan.kv_bytes_per_row == 512 * MiB
    assert plan.max_rows == (56 * GiB) // (528 * MiB) == 108
    assert plan.as_stats()["max_rows"] == 108 and plan.as_stats()["budget_bytes"] == 60 * GiB


def test_the_hard_cap_and_the_ceiling_bound_the_rows():
    kwargs = dict(budget_bytes=60 * GiB, kv_bytes_per_token=1024, max_model_len=1024,
                  activation_bytes_per_row=0, prefill_bytes=0)
    assert budget.plan(**kwargs, max_batch_size=32).max_rows == 32
    assert budget.plan(**kwargs).max_rows == budget.MAX_ROWS_CEILING


def test_no_room_means_zero_rows():
    plan = budget.plan(budget_bytes=1 * GiB, kv_bytes_per_token=512 * 1024, max_model_len=4096,
                       activation_bytes_per_row=MiB, prefill_bytes=2 * GiB)
    assert plan.max_rows == 0


def test_cpu_estimates_grow_with_the_context_and_the_prefill_is_quadratic():
    shape = dict(hidden_size=4096, intermediate_size=11008, vocab_size=32000, num_heads=32, dtype_bytes=2)
    short = budget.estimate_decode_activation_bytes(**shape, max_model_len=1024)
    long = budget.estimate_decode_activation_bytes(**shape, max_model_len=4096)
    assert 0 < short < long
    prefill = dict(hidden_size=4096, intermediate_size=11008, num_heads=32, dtype_bytes=2)
    p1 = budget.estimate_prefill_bytes(**prefill, num_tokens=1024)
    p4 = budget.estimate_prefill_bytes(**prefill, num_tokens=4096)
    assert 4 * p1 < p4 < 16 * p1


def test_a_flash_prefill_is_budgeted_without_scores():
    shape = dict(hidden_size=5120, intermediate_size=13824, num_heads=40, num_tokens=1024, dtype_bytes=2)
    masked, flash = budget.estimate_prefill_bytes(**shape), budget.estimate_prefill_bytes(**shape, scores=False)
    assert masked - flash > 300 * 10**6  # the T×T mask and fp32 scores of 40 heads
    # activations, gate/up's int32 accumulators, a float per token and head; measured on an H100 (13B int8, 2026-11-25
    # 13:10 UTC, flash): 424 MB allocated over the loaded model for 1024-token groups and an 8192-token batch
    assert flash == 1024 * ((8 * 5120 + 3 * 13824) * 2 + 2 * 13824 * 4) + 1024 * 40 * 4
    assert 424 * 10**6 <= flash + 2 * 8192 * 5120 * 2 < masked + 2 * 8192 * 5120 * 2


def test_the_attention_share_of_a_decode_row_is_what_the_row_estimate_counts_for_it():
    """Small-VRAM subtracts attention's share where the host attends: with a model's own head_dim (wider than
    hidden_size // num_heads here) the part it subtracts is the part the row estimate added."""
    shape = dict(hidden_size=3072, intermediate_size=24576, vocab_size=256000, num_heads=16, dtype_bytes=2,
                 max_model_len=1024)
    attention = dict(num_heads=16, max_model_len=1024, dtype_bytes=2)
    rest = (budget.estimate_decode_activation_bytes(**shape, head_dim=256)
            - budget.estimate_decode_attention_bytes(**attention, head_dim=256))
    assert rest == (budget.estimate_decode_activation_bytes(**shape)
                    - budget.estimate_decode_attention_bytes(**attention, head_dim=3072 // 16)) > 0
