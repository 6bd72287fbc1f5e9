"""
Moving models between picochat and other formats (`picochat export`, `picochat import`).

  hf.py        the transformers layout: config.json (model_type "nanochat"), model.safetensors,
               tokenizer.json + tokenizer_config.json (chat template), generation_config.json
  nanochat.py  nanochat's own checkpoint directories (model_NNNNNN.pt, meta_NNNNNN.json,
               tokenizer.pkl), read without running any code from them

Both directions go through picochat's own state-dict names (transformer.h.0.attn.c_q.weight, ...),
and every state dict is checked against a GPT built from its config before anything is written,
so a model of another architecture is refused rather than converted wrong.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from picochat.common import PicochatError, fsync_dir
from picochat.model import GPT, GPTConfig


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a picochat GPT of this config holds, with its shape (built on the meta
    device: no memory, no init)."""
    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state_dict(state: dict, config: GPTConfig, origin: str) -> None:
    """Refuse, naming the first difference, a state dict that is not exactly this architecture:
    a missing tensor, a tensor of another shape or a non-float dtype, or a tensor it doesn't have."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise PicochatError(f"{origin}: missing tensor {name} (expected shape {list(shape)})")
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise PicochatError(f"{origin}: {name} is not a floating-point tensor")
        if tuple(tensor.shape) != shape:
            raise PicochatError(f"{origin}: {name} has shape {list(tensor.shape)}, "
                                f"expected {list(shape)} for this model config")
    for name in state:
        if name not in expected:
            raise PicochatError(f"{origin}: unexpected tensor {name}; picochat's GPT of this config "
                                f"has no place for it")


def check_config(config: GPTConfig, origin: str) -> None:
    """The shape rules a GPTConfig must meet before a GPT can even be built from it."""
    sizes = (config.vocab_size, config.n_layer, config.n_head, config.n_kv_head, config.n_embd,
             config.sequence_len)
    if min(sizes) <= 0:
        raise PicochatError(f"{origin}: model sizes must be positive, got {config}")
    if config.n_embd % config.n_head:
        raise PicochatError(f"{origin}: width {config.n_embd} is not divisible by {config.n_head} heads")
    if config.n_head % config.n_kv_head:
        raise PicochatError(f"{origin}: {config.n_head} heads are not a multiple of "
                            f"{config.n_kv_head} key/value heads")
    if config.head_dim % 2:
        raise PicochatError(f"{origin}: head dimension {config.head_dim} is odd; rotary embeddings need it even")


def check_single_bytes(tokens, origin: str) -> None:
    """Byte-level BPE needs every one of the 256 bytes as a token of its own (tiktoken panics on
    text it cannot otherwise encode): refuse a vocabulary that lacks any."""
    missing = sorted(set(range(256)) - {token[0] for token in tokens if len(token) == 1})
    if missing:
        raise PicochatError(f"{origin}: {len(missing)} single bytes are not tokens (first: {missing[0]:#04x}); "
                            f"a byte-level BPE needs all 256")


def swap_into_place(new: Path, dest: Path, aside: Path) -> None:
    """Rename the complete folder `new` to `dest`. An existing `dest` is first renamed to `aside`
    and removed only once `new` is in place; if that last rename fails, it is put back. The three
    paths share a parent folder's filesystem, so each rename is atomic."""
    shutil.rmtree(aside, ignore_errors=True)
    if dest.exists():
        os.replace(dest, aside)
    try:
        os.replace(new, dest)
    except BaseException:
        if aside.exists():
            os.replace(aside, dest)
        raise
    fsync_dir(dest.parent)
    shutil.rmtree(aside, ignore_errors=True)
