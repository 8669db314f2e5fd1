"""Host values onto the device without waiting for it: what a step queued behind another may do."""

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list (or a CPU tensor) on the device, staged through pinned memory and copied asynchronously: a pageable
    copy, as torch.tensor(..., device=cuda) makes, waits for all work queued before it."""
    cuda = device.type == "cuda"
    if isinstance(values, torch.Tensor):
        host = values.to(dtype).pin_memory() if cuda else values.to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=cuda)
    return host.to(device, non_blocking=True)
