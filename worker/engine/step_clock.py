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
        self.cuda = device.type == "cuda"
        self._last_end: Mark | None = None  # the previous step's end, while the engine has had work since
        self.device_s = {"prefill": 0.0, "decode": 0.0}
        self.gap_s = 0.0
        self.num_gaps = 0

    def mark(self) -> Mark:
        """A mark recorded now on the current stream (after the work launched so far)."""
        if not self.cuda:
            return _HostMark()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def settle(self, start: Mark, end: Mark, *, prefill: bool) -> None:
        """A step whose launches lie between start and end, read (end completed): its device seconds, and the gap
        from the previous step's end to its start. A step launched before the previous one ended starts when
        that one ends (stream order): no gap."""
        end.synchronize()
        self.device_s["prefill" if prefill else "decode"] += start.elapsed_time(end) / 1000.0
        if self._last_end is not None:
            self.gap_s += max(0.0, self._last_end.elapsed_time(start) / 1000.0)
            self.num_gaps += 1
        self._last_end = end

    def idle(self) -> None:
        """The engine ran out of work: the time until its next step is waiting for requests, not a gap."""
        self._last_end = None

    def reset(self) -> None:
        self.device_s = {"prefill": 0.0, "decode": 0.0}
        self.gap_s, self.num_gaps, self._last_end = 0.0, 0, None

    def as_stats(self) -> dict[str, float | int]:
        return {"prefill_device_s": round(self.device_s["prefill"], 3),
                "decode_device_s": round(self.device_s["decode"], 3),
                "device_gap_s": round(self.gap_s, 3), "num_device_gaps": self.num_gaps}
