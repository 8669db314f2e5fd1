"""StepClock: the device's own time for each engine step, and the device's idle time between consecutive steps
while the engine had work (the host late with the next launch). Marks are timing events recorded on the stream
around each step's launches, so they time the work itself, whether the host waited for it or queued the next
step first. On the CPU, where work runs as it is called, a mark is the host clock at the same point.
"""

import time

import torch


class _HostMark:
    """A CPU mark: the work before it has finished when the call returns, so its record time is that work's end."""

    def __init__(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_HostMark") -> float:
        return 1000.0 * (end.at - self.at)


Mark = torch.cuda.Event | _HostMark


class StepClock:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._last_end: Mark | None = None  # the previous step's end, while the engine has had work since
        self._last_kind = ""
        self.device_s = {"prefill": 0.0, "decode": 0.0}
        self.gap_s = 0.0
        self.num_gaps = 0
        # the gaps by transition ("decode>prefill": a refill's prompts launched after the last decode drained)
        self.gaps_by_kind: dict[str, float] = {}
        self.gaps_n_by_kind: dict[str, int] = {}
        # a list to record every step in: (kind, the kind before it, its tokens, its rows, device ms, gap ms before
        # it); None: not kept (a benchmark sets it to see which steps are slow, not only their sum)
        self.trace: list[tuple[str, str, int, int, float, float]] | None = None

    def mark(self) -> Mark:
        """A mark recorded now on the device's current stream (after the work launched so far): reading a step
        waits on its end mark, so the mark must follow the step's copies on their stream."""
        if not self.cuda:
            return _HostMark()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def settle(self, start: Mark, end: Mark, *, prefill: bool, tokens: int = 0, rows: int = 0) -> None:
        """A step whose launches lie between start and end, read (end completed): its device seconds, and the gap
        from the previous step's end to its start. A step launched before the previous one ended starts when
        that one ends (stream order): no gap."""
        end.synchronize()
        kind = "prefill" if prefill else "decode"
        device_s = start.elapsed_time(end) / 1000.0
        self.device_s[kind] += device_s
        gap, before = 0.0, ""
        if self._last_end is not None:
            gap, before = max(0.0, self._last_end.elapsed_time(start) / 1000.0), self._last_kind
            self.gap_s += gap
            self.num_gaps += 1
            transition = f"{before}>{kind}"
            self.gaps_by_kind[transition] = self.gaps_by_kind.get(transition, 0.0) + gap
            self.gaps_n_by_kind[transition] = self.gaps_n_by_kind.get(transition, 0) + 1
        if self.trace is not None:
            self.trace.append((kind, before, tokens, rows, round(1e3 * device_s, 3), round(1e3 * gap, 3)))
        self._last_end, self._last_kind = end, kind

    def idle(self) -> None:
        """The engine ran out of work: the time until its next step is waiting for requests, not a gap."""
        self._last_end = None

    def reset(self) -> None:
        self.device_s = {"prefill": 0.0, "decode": 0.0}
        self.gap_s, self.num_gaps, self._last_end = 0.0, 0, None
        self.gaps_by_kind, self.gaps_n_by_kind = {}, {}

    def as_stats(self) -> dict[str, float | int]:
        return {"prefill_device_s": round(self.device_s["prefill"], 3),
                "decode_device_s": round(self.device_s["decode"], 3),
                "device_gap_s": round(self.gap_s, 3), "num_device_gaps": self.num_gaps,
                "device_gaps_s": {k: round(v, 4) for k, v in sorted(self.gaps_by_kind.items())},
                "device_gaps_n": dict(sorted(self.gaps_n_by_kind.items()))}
