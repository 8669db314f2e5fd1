"""OOM fault injection (env BATCHGEN_INJECT_OOM): a test hook that fails chosen forward calls of the real model."""

import random

import torch


class FaultInjector:
    """Test hook (env BATCHGEN_INJECT_OOM): raises an OOM inside chosen forward calls of the real model.

    Spec "steps=3,7" fails the 3rd and 7th forward call (1-based); "p=0.1,seed=1" fails each call with
    probability 0.1. Installed as a forward pre-hook on the last decoder layer's MLP, so the error comes
    from the middle of the real forward, after earlier layers already wrote K/V.
    """

    def __init__(self, spec: str, device: torch.device):
        self.steps, self.p, seed = parse_oom_spec(spec)
        self._rng = random.Random(seed)
        self._error = torch.cuda.OutOfMemoryError if device.type == "cuda" else torch.OutOfMemoryError
        self.num_calls = 0
        self.num_injected = 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.num_calls += 1
        if self.num_calls in self.steps or (self.p > 0 and self._rng.random() < self.p):
            self.num_injected += 1
            raise self._error(f"injected OOM at forward call {self.num_calls} (BATCHGEN_INJECT_OOM)")


def parse_oom_spec(spec: str) -> tuple[set[int], float, int]:
    """"steps=3,7" / "p=0.1,seed=1" -> (steps, p, seed); a bare number continues the previous key's list."""
    values: dict[str, list[str]] = {}
    key = None
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        if "=" in part:
            key, _, part = part.partition("=")
            key = key.strip()
        if key not in ("steps", "p", "seed"):
            raise ValueError(f"bad BATCHGEN_INJECT_OOM spec {spec!r}: expected steps=…, p=…, seed=…")
        values.setdefault(key, []).append(part.strip())
    steps = {int(s) for s in values.get("steps", [])}
    p = float(values.get("p", ["0"])[0])
    seed = int(values.get("seed", ["0"])[0])
    return steps, p, seed
