"""Small-VRAM mode's embeddings and output head in host memory: the head streams in chunks each forward.

A large vocabulary's head is a large share of a small card: BLOOM's 250,880 x 5,120 fp16 matrix (tied with its
input embeddings) is 2.6 GB of a 6 GiB cap, the K/V of ~15 rows at 192 tokens. Under the cap every forward already
streams each decoder layer over PCIe, and rows are what amortise that stream, so the head moves to host memory too:
the input embedding runs on the host (a gather, then only [tokens, hidden] crosses the bus), and the output head
multiplies chunk by chunk while the next chunk's rows copy in on a side stream (double buffered, like the layers).
It costs the head's bytes over the bus per forward (for BLOOM's shape a fifth of what its layers already move)
and frees its memory for rows.
"""

import torch
from batchgen.worker.offload.side_copy import copy_ahead

CHUNK_BYTES = 64 * 2**20  # one chunk's weight rows: small next to the cap, large enough to run at the copy rate


class HostEmbedding(torch.nn.Module):
    """An input embedding module run on the host, its looked-up rows sent to the device (scaled embeddings keep
    their scale): both small-VRAM paths keep the table off the card. CUDA token ids cost one sync."""

    def __init__(self, inner: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner, self.device = inner, device

    @property
    def weight(self) -> torch.Tensor:  # what forwards read off the module (its dtype, e.g.); it stays on the host
        return self.inner.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids.cpu()).to(self.device, non_blocking=True)


class StreamedHead(torch.nn.Module):
    """A Linear output head whose weight stays in (pinned) host memory and streams in chunks of rows."""

    def __init__(self, inner: torch.nn.Linear, device: torch.device):
        super().__init__()
        self.inner, self.device = inner, device
        self.cuda = device.type == "cuda"
        weight = inner.weight.data
        self.rows_per_chunk = max(1, CHUNK_BYTES // (weight.shape[1] * weight.element_size()))
        self.buffers = [torch.empty(min(self.rows_per_chunk, weight.shape[0]), weight.shape[1], dtype=weight.dtype,
                                    device=device) for _ in range(2)]
        self.bias = None if inner.bias is None else inner.bias.data.to(device)
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.num_bytes = weight.numel() * weight.element_size()
        self.copied_bytes = 0

    @property
    def weight(self) -> torch.Tensor:  # e.g. Mamba casts its input to lm_head.weight.dtype; it stays on the host
        return self.inner.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.inner.weight.data
        vocab = weight.shape[0]
        out = torch.empty(*hidden.shape[:-1], vocab, dtype=hidden.dtype, device=hidden.device)
        starts = list(range(0, vocab, self.rows_per_chunk))
        events = [self._copy(weight, starts[0], 0)]
        for i, start in enumerate(starts):
            if i + 1 < len(starts):  # the next chunk copies in while this one multiplies
                events.append(self._copy(weight, starts[i + 1], (i + 1) % 2))
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(events[i])
            end = min(start + self.rows_per_chunk, vocab)
            out[..., start:end] = hidden @ self.buffers[i % 2][: end - start].t()
        self.copied_bytes += self.num_bytes
        return out if self.bias is None else out + self.bias

    def _copy(self, weight: torch.Tensor, start: int, slot: int):
        """Rows [start, start + chunk) into buffer slot, after everything queued so far (its last reader)."""
        rows = weight[start : start + self.rows_per_chunk]
        return copy_ahead(self.copy_stream, self.device, [(self.buffers[slot][: rows.shape[0]], rows)])


def keep_head_on_host(model: torch.nn.Module, device: torch.device) -> list[torch.nn.Module]:
    """Wraps the model's input embedding (host gather) and, where it is a plain Linear, its output head
    (streamed); their weights (one tensor where tied) pinned on CUDA. Returns the wrapped modules, which stay
    where they are when the rest moves to the device. Models whose head is not a Linear keep it on the device."""
    kept = []
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        _pin(head.weight, device)
        model.set_output_embeddings(StreamedHead(head, device))
        kept.append(head)
    embedding = model.get_input_embeddings()
    if embedding is not None:
        for param in embedding.parameters():
            _pin(param, device)
        model.set_input_embeddings(HostEmbedding(embedding, device))
        kept.append(embedding)
    return kept


def _pin(param: torch.nn.Parameter, device: torch.device) -> None:
    if device.type == "cuda" and not param.data.is_pinned():
        param.data = param.data.pin_memory()
