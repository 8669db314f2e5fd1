"""Kernel launches measured best on a device, read from kernels/tuned/<device name>.json (as vLLM ships its fused-MoE
configs per device). benchmarks.int8_tune writes the file: one section per kernel ("gemv": the small-row GEMV,
"gemm": the int8 GEMM with its dequantising epilogue; benchmarks.gated adds "gated", int8_ops.gated_quantize's
launch at n = k = the MLP's width), each a list of {n, k, rows, launch}: the launch that won at
that output/input size and row count. A shape never tuned on a device has no launch there and keeps its default.
A table may also name the int8 KV cache's decode kernel that won end to end on its device ("int8_kv_scales", one of
EngineConfig's modes): the engine's "auto" takes it.
"""

import functools
import json
import math
import re
from pathlib import Path

import torch

TABLES = Path(__file__).with_name("tuned")
ENABLED = True  # EngineConfig.tuned_kernels (--no-tuned-kernels): False leaves every kernel at its default launch
Launches = dict[tuple[int, int], list[tuple[int, dict]]]  # (n, k) -> [(rows, launch)] by rows


def table_path(device_name: str) -> Path:
    return TABLES / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@functools.cache
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def launches(device: str, kind: str) -> Launches:
    """The tuned launches of one kernel on the device named device; empty where it was never tuned (or tuning is
    switched off)."""
    return _read(device, kind) if ENABLED else {}


def every_device(kind: str) -> dict[str, Launches]:
    """One kernel's launches in every table here, by the table's file name: where a tuner may start a search on a
    device from what won on another."""
    return {path.stem: _read_path(path, kind) for path in sorted(TABLES.glob("*.json"))} if ENABLED else {}


def describe(device: str) -> str:
    """For the start-up log: which table serves this device and how many launches of each kernel it holds."""
    if not ENABLED:
        return "off (--no-tuned-kernels)"
    kinds = {kind: sum(len(v) for v in _read(device, kind).values()) for kind in ("gemv", "gemm", "gated")}
    if not any(kinds.values()):
        return f"none for {device} (defaults; benchmarks.int8_tune writes {table_path(device).name})"
    return f"{table_path(device).name}: " + ", ".join(f"{kind} {n}" for kind, n in kinds.items())


def int8_kv_scales(mode: str, device: str, default: str, choices: tuple[str, ...]) -> str:
    """EngineConfig.int8_kv_scales as the kernels run it: "auto" is the mode the device's table names (one of
    choices), else default (so is every "auto" with tuning switched off); any other mode is itself."""
    if mode != "auto":
        return mode
    named = _choice(device, "int8_kv_scales") if ENABLED else None
    if named is not None and (named == "auto" or named not in choices):
        raise ValueError(f"{table_path(device).name} names int8_kv_scales {named!r}, not one of {choices}")
    return named or default


def forget() -> None:
    """Read the tables again on the next lookup (after a tuner or a test wrote one)."""
    _read.cache_clear()
    _choice.cache_clear()


@functools.cache
def _read(device: str, kind: str) -> Launches:
    return _read_path(table_path(device), kind)


@functools.cache
def _choice(device: str, key: str) -> str | None:
    path = table_path(device)
    return json.loads(path.read_text()).get(key) if path.is_file() else None


def _read_path(path: Path, kind: str) -> Launches:
    if not path.is_file():
        return {}
    table: Launches = {}
    for entry in json.loads(path.read_text()).get(kind, []):
        table.setdefault((entry["n"], entry["k"]), []).append((entry["rows"], entry["launch"]))
    return {shape: sorted(found, key=lambda e: e[0]) for shape, found in table.items()}


def pick(table: Launches, m: int, n: int, k: int) -> dict | None:
    """The launch tuned at the row count nearest m (on a log scale, the larger on a tie), if that is within a factor
    of two of m: a launch is not carried to batches it was never timed near."""
    best, best_distance = None, 1.0 + 1e-9
    for rows, launch in table.get((n, k), []):
        distance = abs(math.log2(m / rows))
        if distance <= best_distance:
            best, best_distance = launch, distance
    return best


def merge(path: Path, kind: str, entries: list[dict],
          searched: set[tuple[int, int, int]] = frozenset()) -> dict:
    """The table at path with entries in kind's section: they replace the launches at their (n, k, rows) and at
    every (n, k, rows) in searched (timed again, no launch beat the default there); the other shapes' launches
    and the other kernels' sections are kept (one model's tuning adds to another's)."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    new = {(e["n"], e["k"], e["rows"]) for e in entries} | set(searched)
    kept = [e for e in table.get(kind, []) if (e["n"], e["k"], e["rows"]) not in new]
    table.update({kind: sorted(kept + entries, key=lambda e: (e["n"], e["k"], e["rows"]))})
    return table
