"""Host-to-device copies ahead of the compute that reads them: the double-buffering step every streamer shares."""

import torch


def copy_ahead(copy_stream: torch.cuda.Stream | None, device: torch.device,
               pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event | None:
    """dst.copy_(src) for each pair on copy_stream, after all compute queued so far on the device's current stream
    (the last reader of dst is queued before this); returns the event the reader waits on. Without a stream (CPU):
    plain copies, and None."""
    if copy_stream is None:
        for dst, src in pairs:
            dst.copy_(src)
        return None
    copy_stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(copy_stream):
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        return copy_stream.record_event()
