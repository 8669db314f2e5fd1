"""Per-row logits processors, batched: logit_bias, min_tokens, and repetition / frequency / presence penalties.

Each works on the step's [rows, vocab] fp32 logits in place, over the rows that asked for it only: parameters
become per-row tensors and generated ids a scatter, so no Python loop ever walks the vocabulary, and a step
whose rows asked for none of them costs one pass over the rows' params.
"""

from collections.abc import Sequence as Seq

import torch
from batchgen.worker.engine.sequence import Sequence


def apply(logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
    """vLLM's order: biases and bans first, then penalties (repetition, then frequency and presence)."""
    logit_bias(logits, seqs)
    ban_until_min_tokens(logits, seqs)
    penalties(logits, seqs)


def needed(seqs: Seq[Sequence]) -> bool:
    return any(s.params.logit_bias or s.params.penalised or _banning(s) for s in seqs)


def logit_bias(logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
    """OpenAI's logit_bias: adds each (token, bias) to that row's logit."""
    rows, tokens, biases = [], [], []
    for i, seq in enumerate(seqs):
        for token, bias in seq.params.logit_bias:
            rows.append(i)
            tokens.append(token)
            biases.append(bias)
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
        logits.index_put_(index, torch.tensor(biases, device=logits.device), accumulate=True)


def ban_until_min_tokens(logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
    """min_tokens: EOS and stop_token_ids cannot be sampled before the output has min_tokens tokens."""
    rows, tokens = [], []
    for i, seq in enumerate(seqs):
        if _banning(seq):
            rows += [i] * len(seq.early_ban)
            tokens += seq.early_ban
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
        logits.index_put_(index, torch.tensor(float("-inf"), device=logits.device))


def penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
    """repetition_penalty (HF's and vLLM's: divide a seen token's positive logit, multiply a negative one; seen
    in prompt or output), then OpenAI's `logit - frequency * count - presence * (count > 0)` over the output."""
    rows = [i for i, s in enumerate(seqs) if s.params.penalised]
    if not rows:
        return
    chosen = [seqs[i] for i in rows]
    device, vocab = logits.device, logits.shape[-1]
    index = torch.tensor(rows, device=device)
    sub = logits[index]
    repetition = _column([s.params.repetition_penalty for s in chosen], device)
    if (repetition != 1.0).any():
        seen = token_counts([s.prompt_ids + s.output_ids for s in chosen], vocab, device) > 0
        sub = torch.where(seen, torch.where(sub < 0, sub * repetition, sub / repetition), sub)
    frequency = _column([s.params.frequency_penalty for s in chosen], device)
    presence = _column([s.params.presence_penalty for s in chosen], device)
    if frequency.any() or presence.any():
        counts = token_counts([s.output_ids for s in chosen], vocab, device)
        sub = sub - frequency * counts - presence * (counts > 0).float()
    logits[index] = sub


def token_counts(ids: Seq[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float counts of each row's ids: one scatter_add over the ids padded into a spare column."""
    width = max(1, max(len(row) for row in ids))
    padded = torch.tensor([row + [vocab_size] * (width - len(row)) for row in ids], dtype=torch.long)
    counts = torch.zeros(len(ids), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]


def _banning(seq: Sequence) -> bool:
    return bool(seq.early_ban) and len(seq.output_ids) < seq.params.min_tokens


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)
