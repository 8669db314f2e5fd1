"""The request pool and row planner, without a model: admission, refill order, OOM shrink, abort."""

import pytest
from batchgen.jobs.schema import SamplingParams
from batchgen.worker.engine.scheduler import Scheduler
from batchgen.worker.engine.sequence import SeqStatus, Sequence


def seq(key: str, num_prompt_tokens: int = 4) -> Sequence:
    return Sequence(key, list(range(num_prompt_tokens)), SamplingParams(max_tokens=8), seed=0)


def scheduler_with(keys, max_rows=4, max_prefill_tokens=100, **kwargs) -> tuple[Scheduler, dict[str, Sequence]]:
    sched = Scheduler(max_rows, max_prefill_tokens=max_prefill_tokens, **kwargs)
    seqs = {k: seq(k) for k in keys}
    for s in seqs.values():
        sched.add(s)
    return sched, seqs


def rows(sched: Scheduler) -> dict[int, str]:
    return {r: s.key for r, s in sched.running.items()}


def test_admits_in_arrival_order_into_the_lowest_rows_up_to_the_batch_size():
    sched, seqs = scheduler_with("abcdef")
    assert [s.key for s in sched.admit()] == ["a", "b", "c", "d"]
    assert rows(sched) == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert seqs["a"].status == SeqStatus.RUNNING and seqs["e"].status == SeqStatus.WAITING
    assert sched.admit() == []  # no free row


def test_finished_rows_are_refilled_lowest_first_so_rows_stay_packed():
    sched, seqs = scheduler_with("abcdef")
    sched.admit()
    sched.finish(seqs["c"], "stop")
    sched.finish(seqs["a"], "length")
    assert seqs["c"].status == SeqStatus.FINISHED and seqs["c"].finish_reason == "stop"
    assert sched.num_decode_rows == 4
    assert [s.key for s in sched.admit()] == ["e", "f"]
    assert rows(sched) == {0: "e", 1: "b", 2: "f", 3: "d"}


def test_decode_covers_rows_up_to_the_highest_running_one():
    sched, seqs = scheduler_with("abc")
    assert sched.num_decode_rows == 0
    sched.admit()
    sched.finish(seqs["b"], "stop")
    assert sched.num_decode_rows == 3 and [s.key for s in sched.running_seqs()] == ["a", "c"]
    sched.finish(seqs["c"], "stop")
    assert sched.num_decode_rows == 1


def test_prefill_token_budget_limits_admission_but_never_starves_a_long_prompt():
    sched = Scheduler(8, max_prefill_tokens=10)
    for key, n in [("long", 30), ("a", 4), ("b", 4), ("c", 4)]:
        sched.add(seq(key, n))
    assert [s.key for s in sched.admit()] == ["long"]  # over budget alone, admitted anyway
    assert [s.key for s in sched.admit()] == ["a", "b"]  # 4 + 4 <= 10 < 12
    assert [s.key for s in sched.admit()] == ["c"]


def test_num_wanted_is_free_rows_plus_prefetch_minus_pending():
    sched = Scheduler(4, max_prefill_tokens=100, prefetch=2)
    assert sched.num_wanted == 6
    for k in "abc":
        sched.add(seq(k))
    assert sched.num_wanted == 3
    sched.admit()
    assert sched.num_wanted == 3  # 1 free row + 2 prefetch, nothing pending
    for k in "defgh":
        sched.add(seq(k))
    assert sched.num_wanted == 0
    assert sched.num_unfinished == 8


def test_the_next_prefill_is_full_at_its_token_budget_or_at_every_row_it_could_admit():
    sched = Scheduler(8, max_prefill_tokens=10, prefetch=2)
    assert not sched.next_prefill_is_full
    sched.add(seq("a", 4))
    sched.add(seq("b", 4))
    assert not sched.next_prefill_is_full and sched.num_wanted > 0  # 8 tokens of 10: one more chunk fits
    sched.add(seq("c", 2))
    assert sched.next_prefill_is_full  # the budget
    sched.admit()
    for k in "defgh":
        sched.add(seq(k, 1))
    assert sched.num_admittable == 5 and sched.next_prefill_is_full  # 5 tokens, but every free row


def test_oom_shrink_halves_the_batch_and_requeues_the_rows_that_no_longer_fit_in_arrival_order():
    sched, seqs = scheduler_with("abcdef")
    sched.admit()
    seqs["c"].output_ids += [7, 8]
    evicted = sched.shrink()
    assert sched.max_batch_size == 2
    assert sorted(s.key for s in evicted) == ["c", "d"]
    assert rows(sched) == {0: "a", 1: "b"}
    assert [s.key for s in sched.waiting] == ["c", "d", "e", "f"]
    assert seqs["c"].output_ids == [] and seqs["c"].row is None and seqs["c"].status == SeqStatus.WAITING
    sched.finish(seqs["a"], "stop")
    assert [s.key for s in sched.admit()] == ["c"]  # only rows below the new limit are used
    assert rows(sched) == {0: "c", 1: "b"}


def test_shrink_also_requeues_a_failed_prefill_and_stops_at_one():
    sched, seqs = scheduler_with("abcd")
    sched.admit()
    sched.shrink(also_requeue=[seqs["a"]])
    assert rows(sched) == {1: "b"} and [s.key for s in sched.waiting] == ["a", "c", "d"]
    sched.shrink()
    sched.shrink()
    assert sched.max_batch_size == 1 and rows(sched) == {}
    assert [s.key for s in sched.waiting] == ["a", "b", "c", "d"]


def test_abort_drops_pending_and_running_and_frees_their_rows():
    sched, seqs = scheduler_with("abcdef")
    sched.admit()
    dropped = sched.abort(["b", "f", "nope"])
    assert sorted(s.key for s in dropped) == ["b", "f"]
    assert rows(sched) == {0: "a", 2: "c", 3: "d"} and [s.key for s in sched.waiting] == ["e"]
    assert [s.key for s in sched.admit()] == ["e"] and sched.running[1].key == "e"
    assert sched.num_unfinished == 4


@pytest.mark.parametrize("kwargs", [{"max_rows": 0, "max_prefill_tokens": 8}, {"max_rows": 2, "max_prefill_tokens": 0}])
def test_rejects_impossible_limits(kwargs):
    with pytest.raises(ValueError):
        Scheduler(**kwargs)
