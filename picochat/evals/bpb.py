"""
Bits per byte (docs/DESIGN.md#bits-per-byte): the model's cross-entropy in bits, divided by the number of UTF-8 bytes
the targets stand for. Independent of the vocabulary, so tokenizers of any size compare.

    bpb = Σ nats(target) / (ln 2 · Σ bytes(target)),   over targets with bytes > 0

Special tokens have 0 bytes and so are left out, as are ignored targets (-1). Sums are all-reduced
across ranks, so every rank returns the same number.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model_loss, batches, token_bytes: torch.Tensor) -> float:
    """model_loss(inputs, targets) -> per-token nats (flat); batches: iterable of (inputs, targets)."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets in batches:
        nats = model_loss(inputs, targets).reshape(-1).double()
        flat = targets.reshape(-1)
        nbytes = token_bytes[flat.clamp(min=0)] * (flat >= 0)
        counted = nbytes > 0
        total_nats += (nats * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return (total_nats / (math.log(2) * total_bytes)).item()
