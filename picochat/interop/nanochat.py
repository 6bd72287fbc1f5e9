"""
nanochat's own checkpoints, read without running code from them.

A nanochat checkpoint directory (e.g. ~/.cache/nanochat/chatsft_checkpoints/d20/) holds, per step:
  model_NNNNNN.pt    the model's state dict (torch.save), under the same names picochat uses;
                     a save of a torch.compile'd model prefixes every name with "_orig_mod."
  meta_NNNNNN.json   "model_config": sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd
and its tokenizer lives in ~/.cache/nanochat/tokenizer/: tokenizer.pkl, a pickled tiktoken
Encoding, and token_bytes.pt.

Pickles run code when loaded, so the state dict goes through torch.load(weights_only=True) (safe
only from torch 2.6 on, CVE-2025-32434, so older torch is refused) and tokenizer.pkl through an
unpickler that knows one class, a stand-in for tiktoken's Encoding that only keeps the state
handed to it; the Tokenizer is then rebuilt from that state's ranks.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch
from torch.torch_version import TorchVersion

from picochat.common import PicochatError
from picochat.interop import check_config, check_single_bytes
from picochat.model import GPTConfig
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

MODEL_FILE = re.compile(r"^model_(\d{6,})\.pt$")
COMPILED_PREFIX = "_orig_mod."
TOKENIZER_PICKLE = "tokenizer.pkl"
CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
SAFE_TORCH = "2.6"  # torch.load(weights_only=True) can run code before this (CVE-2025-32434)


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and any(MODEL_FILE.match(p.name) for p in path.iterdir())


def steps(path: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in path.iterdir() if (m := MODEL_FILE.match(p.name)))


def read_meta(path: Path, step: int) -> tuple[dict, GPTConfig]:
    """meta_NNNNNN.json and the GPTConfig in it. Any model_config field beyond the seed's six is
    a later nanochat architecture (sliding windows, value embeddings, ...) and is refused."""
    meta_path = path / f"meta_{step:06d}.json"
    try:
        meta = json.loads(meta_path.read_text())
        model_config = meta["model_config"]
        extra = sorted(set(model_config) - set(CONFIG_KEYS))
        config = GPTConfig(**{k: int(model_config[k]) for k in CONFIG_KEYS})
    except FileNotFoundError:
        raise PicochatError(f"no {meta_path.name} next to model_{step:06d}.pt in {path}") from None
    except OSError as e:
        raise PicochatError(f"{meta_path} is unreadable ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PicochatError(f"{meta_path} is unreadable or has no complete model_config ({e})") from None
    if extra:
        raise PicochatError(f"{meta_path}: model_config has {', '.join(extra)}, which picochat's "
                            f"(nanochat seed) architecture does not; this checkpoint is a later design")
    check_config(config, str(meta_path))
    return meta, config


def read_state(path: Path, step: int) -> dict:
    """model_NNNNNN.pt as a picochat state dict in fp32 (nanochat keeps wte in bf16 on CUDA;
    widening bf16 to fp32 is exact). weights_only: tensors and containers, no code."""
    file = path / f"model_{step:06d}.pt"
    if TorchVersion(torch.__version__) < SAFE_TORCH:
        raise PicochatError(f"importing {file.name} needs torch >= {SAFE_TORCH} (older torch.load can run "
                            f"code from the file, CVE-2025-32434); this is torch {torch.__version__}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated zips, foreign pickles: all one message)
        raise PicochatError(f"{file} is truncated or not a weights-only torch checkpoint "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(state, dict):
        raise PicochatError(f"{file} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix(COMPILED_PREFIX): v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in state.items()}


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state it is given."""

    def __setstate__(self, state):
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    """Resolves tiktoken's Encoding to the stand-in above and refuses every other global, so a
    tampered tokenizer.pkl cannot call anything."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise PicochatError(f"{TOKENIZER_PICKLE} refers to {module}.{name}; a tiktoken Encoding does not")


def read_tokenizer(directory: Path) -> Tokenizer:
    """The Tokenizer of a nanochat tokenizer directory, from tokenizer.pkl's name-free state:
    pattern, mergeable ranks, special tokens (which must be picochat's nine, after the ranks)."""
    path = directory / TOKENIZER_PICKLE
    if not path.is_file():
        raise PicochatError(f"no {TOKENIZER_PICKLE} in {directory}; pass nanochat's tokenizer "
                            f"directory with --tokenizer")
    try:
        obj = _EncodingUnpickler(io.BytesIO(path.read_bytes())).load()
    except PicochatError:
        raise
    except Exception as e:  # noqa: BLE001 (a truncated pickle raises any of several types)
        raise PicochatError(f"{path} is truncated or not a pickled tiktoken Encoding ({type(e).__name__}: {e})") from None
    state = getattr(obj, "state", None)
    if not isinstance(obj, _EncodingState) or not isinstance(state, dict):
        raise PicochatError(f"{path} holds {type(obj).__name__}, not a tiktoken Encoding with its own ranks")
    ranks, pattern, specials = state.get("mergeable_ranks"), state.get("pat_str"), state.get("special_tokens")
    if (not isinstance(ranks, dict) or not isinstance(pattern, str) or not isinstance(specials, dict)
            or not all(isinstance(k, bytes) and isinstance(v, int) for k, v in ranks.items())):
        raise PicochatError(f"{path}: the Encoding's ranks, pattern or special tokens are malformed")
    n = len(ranks)
    wanted = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != wanted:
        raise PicochatError(f"{path}: special tokens {specials} are not picochat's nine at ids {n}..{n + 8}")
    check_single_bytes(ranks, str(path))
    try:
        return Tokenizer(ranks, pattern, SPECIAL_TOKENS)
    except ValueError as e:
        raise PicochatError(f"{path}: {e}") from None


def find_tokenizer_dir(checkpoint: Path) -> Path:
    """Where nanochat keeps the tokenizer of a checkpoint: beside it, or in its cache layout
    (<cache>/<stage>_checkpoints/<tag>/ next to <cache>/tokenizer/)."""
    for candidate in (checkpoint, checkpoint.parent.parent / "tokenizer"):
        if (candidate / TOKENIZER_PICKLE).is_file():
            return candidate
    raise PicochatError(f"no {TOKENIZER_PICKLE} in {checkpoint} or {checkpoint.parent.parent / 'tokenizer'}; "
                        f"pass nanochat's tokenizer directory with --tokenizer")
