"""`batchgen workers`: a worker's heartbeat hash (Redis keeps only strings) as the numbers and names it holds."""

from typing import Any

WORKER_TEXT_FIELDS = frozenset({"name", "model", "engine", "queues", "device", "device_name", "cuda_visible_devices",
                                "state", "int8_kernel", "results_root"})


def worker_view(info: dict[str, str]) -> dict[str, Any]:
    """A heartbeat hash (Redis keeps only strings) with its numbers as numbers ("" as null) and the device named:
    the worker's own device name when it writes one, else what its flag and its VRAM reading say."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if key in WORKER_TEXT_FIELDS:
            out[key] = value
        elif value == "":
            out[key] = None
        else:
            try:
                number = float(value)
                out[key] = int(number) if number.is_integer() and "." not in value else number
            except ValueError:
                out[key] = value
    device = out.pop("device_name", None) or out.get("device") or "auto"
    if device == "auto":
        on_gpu = (out.get("vram_used_bytes") or 0) + (out.get("vram_free_bytes") or 0) > 0
        device = "cuda" if on_gpu else "cpu"
    visible = out.get("cuda_visible_devices")
    out["device"] = f"{device} (CUDA_VISIBLE_DEVICES={visible})" if visible and device.startswith("cuda") else device
    return out
