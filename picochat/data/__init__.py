"""Training data: shards on disk, downloads (Hub shards, files from PyPI), offline sources, the
packing loader for pretraining and the conversation packer for midtraining and SFT."""
from __future__ import annotations

import torch


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A freshly packed host batch, moved to `device`. On CUDA it goes through a new pinned buffer
    and is copied without blocking, so the next batch can be packed while this copy is in flight.
    Each batch is packed into new host memory and this buffer is never written again; torch's
    pinned-memory allocator hands a freed block out again only after the copies that read it have
    run. (tests/test_loader.py checks the loaders' side: packing later batches never touches an
    earlier batch's host memory.)"""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
