"""
nanochat's own checkpoints, from its first (seed) design to HEAD's, read without running code.

A nanochat checkpoint directory (e.g. ~/.cache/nanochat/chatsft_checkpoints/d20/) holds, per step:
  model_NNNNNN.pt    the model's state dict (torch.save), under the same names picochat uses;
                     a save of a torch.compile'd model prefixes every name with "_orig_mod."
  meta_NNNNNN.json   "model_config": sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd,
                     and window_pattern from 2026-01-11 on
and its tokenizer lives in ~/.cache/nanochat/tokenizer/: tokenizer.pkl, a pickled tiktoken
Encoding, and token_bytes.pt.

nanochat's architecture changed after the seed, and neither file records which version wrote it;
the tensors tell (git history of nanochat/gpt.py, nanochat's commit and date):
  f1bf69d 2025-12-09  wte and lm_head padded to a multiple of 64 rows (sliced back here)
  aa530cd 2026-01-11  resid_lambdas, x0_lambdas
  fbc1484 2026-01-11  window_pattern; an S layer sees sequence_len // 2 earlier tokens
  a91743c 2026-01-18  value embeddings, gates of 32 channels and range (0, 2): refused, picochat's
                      gate reads 12 channels with range (0, 3)
  6ed7d1d 2026-03-09  12-channel gates, range (0, 3); q, k × 1.15; RoPE base 100,000; S = a third
                      of the context rounded up to a multiple of 128
  a825e63 2026-03-14  smear and backout; q, k × 1.2; S = a quarter of the context rounded up to a
                      multiple of 128 (HEAD)
Each maps onto GPTConfig's fields exactly, with HEAD's loader's patches (a missing window_pattern
is "L", missing resid_lambdas ones, missing x0_lambdas zeros); any other tensor is refused.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
PAD_VOCAB_TO = 64  # nanochat pads wte, lm_head and value embeddings to a multiple of this (f1bf69d)


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and any(MODEL_FILE.match(p.name) for p in path.iterdir())


def steps(path: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in path.iterdir() if (m := MODEL_FILE.match(p.name)))


def read_meta(path: Path, step: int) -> tuple[dict, dict]:
    """meta_NNNNNN.json and its model_config: the six sizes (integers) and, from 2026-01-11 on,
    window_pattern. Any other field is a design after HEAD's and is refused."""
    meta_path = path / f"meta_{step:06d}.json"
    try:
        meta = json.loads(meta_path.read_text())
        model_config = meta["model_config"]
        extra = sorted(set(model_config) - set(CONFIG_KEYS) - {"window_pattern"})
        sizes = {k: int(model_config[k]) for k in CONFIG_KEYS}
    except FileNotFoundError:
        raise PicochatError(f"no {meta_path.name} next to model_{step:06d}.pt in {path}") from None
    except OSError as e:
        raise PicochatError(f"{meta_path} is unreadable ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PicochatError(f"{meta_path} is unreadable or has no complete model_config ({e})") from None
    if extra:
        raise PicochatError(f"{meta_path}: model_config has {', '.join(extra)}, which no nanochat design "
                            f"picochat knows (up to HEAD's) has; this checkpoint is a later design")
    pattern = model_config.get("window_pattern", "L")  # HEAD's loader: a checkpoint from before windows is all L
    if not isinstance(pattern, str):
        raise PicochatError(f"{meta_path}: window_pattern is {pattern!r}, not a string of S and L")
    return meta, {**sizes, "window_pattern": pattern}


# -----------------------------------------------------------------------------
# nanochat's designs, told apart by their tensors

@dataclass(frozen=True)
class Design:
    name: str
    rope_base: float
    qk_scale: float
    short_window: Callable[[int], int]  # sequence_len -> how many earlier tokens an S layer sees
    value_embeds: bool
    smear_backout: bool


# FA3's tile is 128, so HEAD rounds its short window up to a multiple of it: -(-T // 4 // 128) * 128.
HEAD = Design("nanochat HEAD (2026-03-14 on)", 100_000.0, 1.2, lambda T: -(-T // 4 // 128) * 128, True, True)
ROUND_1 = Design("nanochat of 2026-03-09 to 03-14", 100_000.0, 1.15, lambda T: -(-T // 3 // 128) * 128, True, False)
EARLY = Design("nanochat before value embeddings (to 2026-01-18)", 10_000.0, 1.0, lambda T: T // 2, False, False)


def design_of(state: dict, origin: str) -> Design:
    """Which nanochat design wrote this state dict: smear or backout tensors are HEAD's, value
    embeddings with 12-channel gates the design before it, no value embeddings an earlier one.
    Value embeddings of any other kind (32-channel gates, nanochat's experimental branches) have
    no place in picochat's GPT."""
    if {"smear_gate.weight", "smear_lambda", "backout_lambda"} & state.keys():
        return HEAD
    gates = {k: t for k, t in state.items() if k.endswith(".attn.ve_gate.weight")}
    if gates or any(k.startswith("value_embeds.") for k in state):
        widths = {tuple(getattr(t, "shape", ()))[1:] for t in gates.values()}
        if widths == {(12,)}:
            return ROUND_1
        found = f"gates reading {' or '.join(str(w[0]) if w else '?' for w in widths)} channels" if widths \
            else "no gates"
        raise PicochatError(f"{origin}: value embeddings with {found}; picochat's GPT holds only nanochat's "
                            f"12-channel gates of range (0, 3) (from 2026-03-09 on). The 32-channel design of "
                            f"2026-01-18 to 03-09 (range (0, 2)) cannot be imported")
    return EARLY


def to_picochat(model_config: dict, state: dict, origin: str) -> tuple[GPTConfig, dict, Design]:
    """A nanochat state dict (prefix stripped, fp32) and model_config as picochat's: the GPTConfig
    of its design, the padded vocabulary rows sliced off, HEAD's loader's patches applied; and the
    design. The state dict still goes through check_state_dict, which names any tensor left
    without a place."""
    design = design_of(state, origin)
    T, V, n_layer = model_config["sequence_len"], model_config["vocab_size"], model_config["n_layer"]
    pattern = model_config["window_pattern"]
    lambdas = "resid_lambdas" in state or "x0_lambdas" in state
    try:
        config = GPTConfig(**{k: model_config[k] for k in CONFIG_KEYS}, window_pattern=pattern,
                           short_window=design.short_window(T) if "S" in pattern.upper() else 0,
                           value_embeds=design.value_embeds, lambdas=lambdas, smear=design.smear_backout,
                           backout=design.smear_backout, rope_base=design.rope_base, qk_scale=design.qk_scale)
    except ValueError as e:
        raise PicochatError(f"{origin}: {e}") from None
    check_config(config, origin)
    state = dict(state)
    if lambdas:  # as HEAD's loader patches a checkpoint from before one of them
        state.setdefault("resid_lambdas", torch.ones(n_layer))
        state.setdefault("x0_lambdas", torch.zeros(n_layer))
    padded = -(-V // PAD_VOCAB_TO) * PAD_VOCAB_TO
    for name, tensor in state.items():
        vocab_table = name in ("transformer.wte.weight", "lm_head.weight") or name.startswith("value_embeds.")
        if vocab_table and isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.size(0) == padded != V:
            state[name] = tensor[:V].clone()  # a copy: a view would keep (and save) the padded rows
    return config, state, design


def read_state(path: Path, step: int) -> dict:
    """model_NNNNNN.pt with its names unprefixed and its tensors in fp32 (nanochat keeps wte and
    the value embeddings in bf16 on CUDA; widening bf16 to fp32 is exact). weights_only: tensors
    and containers, no code."""
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
