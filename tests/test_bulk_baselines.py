"""benchmarks.bulk --fp16-repeats: the HF row it reports is the median run, each run's figures and clocks beside it.

The clock sampler reads NVML, which a CPU host has not: a stand-in records a sample per run, so each run's clocks
come from its own samples only."""

import benchmarks.bulk as bulk


class Sampler:
    """PeakVram's interface as repeated uses it: clock_samples grows while a run goes, clocks(since) reads them."""

    def __init__(self):
        self.clock_samples: list[int] = []
        self.entered = self.exited = 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc):
        self.exited += 1

    def clocks(self, since: int) -> dict:
        return {"samples": self.clock_samples[since:]}


def test_repeated_reports_the_median_run_with_every_run_beside_it(monkeypatch):
    sampler = Sampler()
    monkeypatch.setattr(bulk, "PeakVram", lambda: sampler)
    runs = iter([(3400.0, 28.3, 1850), (3590.0, 25.8, 1980), (3380.0, 28.4, 1830)])

    def run() -> dict:
        tok_s, step_ms, mhz = next(runs)
        sampler.clock_samples += [mhz, mhz]  # what the sampler's thread would add while the run goes
        return {"bs": 256, "tok_s": tok_s, "step_ms": step_ms}

    row = bulk.repeated(run, 3)
    assert row["tok_s"] == 3400.0 and row["step_ms"] == 28.3  # the median of 3380, 3400, 3590
    assert row["tok_s_runs"] == [3400.0, 3590.0, 3380.0]
    assert row["step_ms_runs"] == [28.3, 25.8, 28.4]
    assert row["clocks_runs"] == [{"samples": [1850, 1850]}, {"samples": [1980, 1980]}, {"samples": [1830, 1830]}]
    assert row["clocks"] == {"samples": [1850, 1850]}
    assert (sampler.entered, sampler.exited) == (1, 1)


def test_one_run_is_reported_as_it_was_without_a_sampler(monkeypatch):
    def no_sampler():
        raise AssertionError("one run samples no clocks")

    monkeypatch.setattr(bulk, "PeakVram", no_sampler)
    assert bulk.repeated(lambda: {"tok_s": 3453.5, "step_ms": 27.3}, 1) == {"tok_s": 3453.5, "step_ms": 27.3}
