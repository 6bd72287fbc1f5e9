"""
picochat's GPT and tokenizer in the layouts transformers loads.

A model of the seed architecture goes to the class transformers ships for it (config model_type
"nanochat": parameter-free RMSNorm after the embedding, before each sublayer and before the head;
RoPE base 10,000 rotating (first half, second half) by −angle, then QK-norm; ReLU² MLP of width 4d;
untied head; 15·tanh(logits/15); no biases; grouped-query heads), with no remote code. The mapping
is one-to-one, weight for weight; the one number that has to be set explicitly is the norm's
epsilon, which transformers defaults to 1e-6 while picochat's F.rms_norm uses float32's machine
epsilon.

A model with any 2026 part (sliding windows, value embeddings, lambdas, smear, backout, another
RoPE base or q·k scale) has no class in transformers: it goes out with its own (model_type
"picochat": the two files in picochat/interop/remote/, named in config.json's auto_map, loaded with
trust_remote_code=True), under picochat's own tensor names and GPTConfig's field names.

The tokenizer becomes a `tokenizers` byte-level BPE: the same tokens with the same ids, merges
derived from the ranks, picochat's split pattern, and the nine special tokens after the ranks.
The chat template renders conversations to the very tokens `Tokenizer.render_conversation` gives.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from picochat.common import PicochatError
from picochat.interop import check_config, check_single_bytes
from picochat.model import ROPE_BASE, GPTConfig
from picochat.ops import RMS_EPS, SOFTCAP
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

MODEL_TYPE = "nanochat"
ARCHITECTURE = "NanoChatForCausalLM"
REMOTE_MODEL_TYPE = "picochat"
REMOTE_ARCHITECTURE = "PicochatForCausalLM"
REMOTE_CODE = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_picochat.py", "modeling_picochat.py")
# GPTConfig's fields the remote model implements ("init" only matters for training).
REMOTE_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
                 "short_window", "value_embeds", "lambdas", "smear", "backout", "rope_base", "qk_scale")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded checkpoints (as published on the Hub)

# picochat name (per block: {i}) -> transformers name
_GLOBAL_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "lm_head.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}
_PICO_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def optional_import(name: str, purpose: str):
    """Import one of the packages only export/import need, or say how to get it."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise PicochatError(f"{purpose} needs the {name.split('.')[0]} package: "
                            f"pip install safetensors tokenizers") from None


# -----------------------------------------------------------------------------
# Weights

def hf_name(name: str) -> str:
    """transformers' name of one picochat tensor (the state dict was checked beforehand)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer, rest = _PICO_BLOCK.match(name).groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[rest]}"


def picochat_name(name: str, origin: str) -> str:
    """picochat's name of one transformers tensor; a tensor picochat has no place for is refused."""
    by_hf = {v: k for k, v in _GLOBAL_NAMES.items()}
    if name in by_hf:
        return by_hf[name]
    match = _HF_BLOCK.match(name)
    by_hf_block = {v: k for k, v in _BLOCK_NAMES.items()}
    if not match or match.group(2) not in by_hf_block:
        raise PicochatError(f"{origin}: unexpected tensor {name}; this is not picochat's "
                            f"(nanochat seed) architecture")
    return f"transformer.h.{match.group(1)}.{by_hf_block[match.group(2)]}"


def save_weights(state: dict, path: Path, native: bool = True) -> None:
    """picochat state dict -> model.safetensors under transformers' NanoChat names (native) or
    picochat's own (the remote-code model). Contiguous copies: safetensors refuses views and
    shared storage."""
    st = optional_import("safetensors.torch", "picochat export")
    tensors = {(hf_name(k) if native else k): v.detach().to("cpu").contiguous() for k, v in state.items()}
    st.save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights(folder: Path, native: bool = True) -> dict:
    """model.safetensors (or its shards) -> picochat state dict in fp32 (as picochat checkpoints
    are; widening bf16 or fp16 is exact), from NanoChat's names (native) or picochat's own.
    safetensors holds raw tensors only, so reading it runs no code; a truncated or corrupt file is
    refused in one line."""
    st = optional_import("safetensors.torch", "picochat import")
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise PicochatError(f"{index} is unreadable ({e})") from None
        for name in files:  # shards live in the folder itself, never elsewhere
            if not isinstance(name, str) or name != Path(name).name or name in (".", ".."):
                raise PicochatError(f"{index} names a shard {name!r} that is not a file name in {folder}")
    elif (folder / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise PicochatError(f"no {WEIGHTS_FILE} in {folder} (only safetensors weights are read, "
                            f"never pickled .bin files)")
    state = {}
    for name in files:
        path = folder / name
        try:
            tensors = st.load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types, and OSError)
            raise PicochatError(f"{path} is truncated or not a safetensors file "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        for key, tensor in tensors.items():
            state[picochat_name(key, str(path)) if native else key] = tensor.float() if tensor.is_floating_point() else tensor
    return state


# -----------------------------------------------------------------------------
# config.json and generation_config.json

def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """config.json for transformers' NanoChat class holding this GPT exactly. The context length
    is the one the model was trained on (picochat itself will decode up to 10x further)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(ROPE_BASE)},
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        **token_fields(tokenizer),
    }


def token_fields(tokenizer: Tokenizer) -> dict:
    """The config.json fields about tokens and defaults that both exported kinds share."""
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.encode_special("<|assistant_end|>"),
        # No pad id on the model: transformers would make it the embedding's padding_idx, which
        # freezes that token's embedding if anyone fine-tunes the export. Padding is masked anyway.
        "pad_token_id": None,
        "use_cache": True,
        "dtype": "float32",
    }


def remote_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """config.json for picochat's own modeling file (remote code): GPTConfig's fields, the softcap,
    and the auto_map that tells transformers which classes to load. Refuses a config with a field
    the modeling file does not implement set to anything but its default."""
    defaults = GPTConfig().to_dict()
    unknown = [k for k, v in config.to_dict().items() if k not in REMOTE_FIELDS + ("init",) and v != defaults[k]]
    if unknown:
        raise PicochatError(f"the model sets {', '.join(unknown)}, which the exported modeling file does not "
                            f"implement; it cannot be exported")
    fields = {k: v for k, v in config.to_dict().items() if k in REMOTE_FIELDS}
    return {
        "architectures": [REMOTE_ARCHITECTURE],
        "model_type": REMOTE_MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_picochat.PicochatConfig",
                     "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM"},
        **fields,
        "softcap": SOFTCAP,
        "tie_word_embeddings": False,
        **token_fields(tokenizer),
    }


def gpt_config_from_remote(cfg: dict, origin: str) -> GPTConfig:
    """The GPTConfig of a config.json that remote_config wrote (read as JSON; its modeling file is
    never run). A softcap other than picochat's, or a field of the wrong kind, is refused."""
    if cfg.get("softcap", SOFTCAP) != SOFTCAP:
        raise PicochatError(f"{origin}: softcap is {cfg.get('softcap')!r}, picochat's architecture has {SOFTCAP}")
    try:
        config = GPTConfig(**{k: cfg[k] for k in REMOTE_FIELDS if k in cfg})
    except (TypeError, ValueError, AttributeError) as e:
        raise PicochatError(f"{origin}: not a picochat model config ({e})") from None
    kinds = {int: ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "short_window"),
             bool: ("value_embeds", "lambdas", "smear", "backout"), float: ("rope_base", "qk_scale")}
    for kind, names in kinds.items():
        for name in names:  # JSON numbers: 100000 for a float is fine, true for an int is not
            value = getattr(config, name)
            if type(value) is not kind and not (kind is float and type(value) is int):
                raise PicochatError(f"{origin}: {name} is {value!r}, not a {kind.__name__}")
    check_config(config, origin)
    return config


def generation_config(tokenizer: Tokenizer) -> dict:
    """Stop where picochat's Engine stops: at <|assistant_end|>, or at <|bos|> (a new document)."""
    end = tokenizer.encode_special("<|assistant_end|>")
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": [end, tokenizer.bos_id], "pad_token_id": end}


SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
OPTIONAL_SIZE_FIELDS = ("num_key_value_heads", "head_dim", "intermediate_size")


def _rope(cfg: dict, origin: str) -> tuple[str, str, float | None, float]:
    """(rope type, legacy rope_scaling type, base, partial rotary factor) from the current
    rope_parameters or the older top-level rope_scaling, rope_theta and partial_rotary_factor."""
    params, legacy = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise PicochatError(f"{origin}: rope_parameters and rope_scaling must be JSON objects")
    return (params.get("rope_type", "default"), legacy.get("rope_type", legacy.get("type", "default")),
            params.get("rope_theta", cfg.get("rope_theta")),
            params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))


def gpt_config_from_hf(cfg: dict, origin: str) -> tuple[GPTConfig, str | None]:
    """The GPTConfig of a transformers config.json, or a one-line refusal naming the first detail
    picochat's GPT does not have. Also returns a note when the norm epsilon differs (harmless: it
    is added to a mean square of about 1)."""
    if not isinstance(cfg, dict):
        raise PicochatError(f"{origin}: a {type(cfg).__name__}, not a JSON object")
    if cfg.get("model_type") != MODEL_TYPE:
        raise PicochatError(f"{origin}: model_type is {cfg.get('model_type')!r}; only {MODEL_TYPE!r} and "
                            f"{REMOTE_MODEL_TYPE!r} models have picochat's architecture")
    for key in SIZE_FIELDS + OPTIONAL_SIZE_FIELDS:
        value = cfg.get(key)
        if (value is not None or key in SIZE_FIELDS) and (not isinstance(value, int) or isinstance(value, bool)):
            raise PicochatError(f"{origin}: {key} is {value!r}, not an integer")
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    config = GPTConfig(sequence_len=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"],
                       n_layer=cfg["num_hidden_layers"], n_head=heads,
                       n_kv_head=cfg.get("num_key_value_heads") or heads, n_embd=width)
    check_config(config, origin)
    rope_type, scaling_type, theta, partial_rotary = _rope(cfg, origin)
    required = [  # (what, found, wanted)
        ("hidden_act", cfg.get("hidden_act", "relu2"), "relu2"),
        ("final_logit_softcapping", cfg.get("final_logit_softcapping", SOFTCAP), SOFTCAP),
        ("rope type", rope_type, "default"),
        ("rope_scaling type", scaling_type, "default"),
        ("rope theta", theta if theta is not None else ROPE_BASE, ROPE_BASE),
        ("partial_rotary_factor", partial_rotary, 1.0),
        ("attention_bias", cfg.get("attention_bias", False), False),
        ("tie_word_embeddings", cfg.get("tie_word_embeddings", False), False),
        ("intermediate_size", cfg.get("intermediate_size"), 4 * width),
        ("head_dim", cfg.get("head_dim") or config.head_dim, config.head_dim),
    ]
    for what, found, wanted in required:
        if found != wanted:
            raise PicochatError(f"{origin}: {what} is {found!r}, picochat's architecture has {wanted!r}")
    eps = cfg.get("rms_norm_eps", 1e-6)
    note = None
    if eps != RMS_EPS:
        note = (f"the model was configured with norm epsilon {eps}; picochat uses {RMS_EPS:.3g} "
                f"(logits differ by about 1e-6)")
    return config, note


# -----------------------------------------------------------------------------
# The tokenizer

def byte_to_char() -> dict[int, str]:
    """The byte-level alphabet of `tokenizers`' ByteLevel pre-tokenizer: every byte as one
    printable character. Bytes that already print as themselves (and are not space) keep their
    code point; the other 68 bytes are given code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = byte_to_char()


def derived_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Merges equivalent to tiktoken's rank-based BPE. tiktoken merges the adjacent pair whose
    concatenation has the lowest rank; `tokenizers` merges the listed pair with the lowest index.
    Listing every split (a, b) of every token into two tokens, in the order of the token's rank,
    makes the two pick the same pair at every step."""
    rank = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token in tokens:
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        found = [(rank[a], rank[b], a, b) for a, b in splits if a in rank and b in rank]
        merges += [(a, b) for _, _, a, b in sorted(found)]
    return merges


def byte_level_text(token: bytes) -> str:
    """A token as tokenizer.json spells it: each byte as its character of the byte-level alphabet."""
    return "".join(BYTE_CHARS[b] for b in token)


def text_merges(tokens: list[bytes]) -> list[tuple[str, str]]:
    """derived_merges as tokenizer.json lists them."""
    return [(byte_level_text(a), byte_level_text(b)) for a, b in derived_merges(tokens)]


# The BPE model's options that change tokenization, as build_tokenizer_json sets them (a missing,
# empty or false option counts as None). ignore_merges: a piece that is a token is taken whole, as
# tiktoken does.
BPE_OPTIONS = {"dropout": None, "continuing_subword_prefix": None, "end_of_word_suffix": None, "ignore_merges": True}


def pre_tokenizer_json(pattern: str) -> dict:
    """The pre-tokenizer build_tokenizer_json writes, as tokenizer.json holds it: picochat's split
    pattern, then bytes to the byte-level alphabet (no prefix space, no second regex)."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def build_tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json for transformers' fast tokenizers. Plain `tokenizer(text)` prepends <|bos|>
    as picochat does for every document (so lm-evaluation-harness scores what base_eval scores);
    chat templates add their own special tokens."""
    tk = optional_import("tokenizers", "picochat export")
    vocab = {byte_level_text(token): i for i, token in enumerate(tokenizer.tokens)}
    merges = text_merges(tokenizer.tokens)
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, ignore_merges=True))  # BPE_OPTIONS
    try:
        split = tk.pre_tokenizers.Split(tk.Regex(tokenizer.pattern), behavior="isolated", invert=False)
    except Exception as e:  # noqa: BLE001 (tokenizers raises a plain Exception for a bad regex)
        raise PicochatError(f"the tokenizer's split pattern is not supported by the tokenizers "
                            f"library ({e})") from None
    hf.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [split, tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = tk.decoders.ByteLevel()
    names = sorted(tokenizer.special_ids, key=tokenizer.special_ids.get)
    hf.add_special_tokens([tk.AddedToken(name, special=True, normalized=False) for name in names])
    for name in names:  # added tokens take the next free ids: check they landed where picochat has them
        if hf.token_to_id(name) != tokenizer.special_ids[name]:
            raise PicochatError(f"special token {name} would get id {hf.token_to_id(name)}, "
                                f"not {tokenizer.special_ids[name]}")
    hf.post_processor = tk.processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1", special_tokens=[("<|bos|>", tokenizer.bos_id)])
    return hf.to_str(pretty=False)


def tokenizer_from_hf(path: Path) -> Tokenizer:
    """A picochat Tokenizer from a tokenizer.json of the form build_tokenizer_json writes (read as
    JSON, no library code): byte-level BPE whose ids are the ranks and whose merges are derived
    from them, picochat-style pre-tokenization, no normalizer, and the nine special tokens right
    after the ranks. Anything else would tokenize differently in transformers, so it is refused."""
    origin = str(path)
    try:
        data = json.loads(path.read_text())
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"model type {model.get('type')!r}, expected BPE")
        char_to_byte = {c: b for b, c in BYTE_CHARS.items()}
        ranks = {bytes(char_to_byte[c] for c in text): i for text, i in model["vocab"].items()}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        pattern = data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
        ids = sorted(ranks.values())
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise PicochatError(f"{origin}: not a byte-level BPE tokenizer picochat can read ({e})") from None
    n = len(ranks)
    if ids != list(range(n)):
        raise PicochatError(f"{origin}: the BPE ids are not 0..{n - 1} with no gaps")
    check_single_bytes(ranks, origin)
    wanted = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != wanted:
        raise PicochatError(f"{origin}: special tokens {specials} are not picochat's nine at ids {n}..{n + 8}")
    options = {key: model.get(key) or None for key in BPE_OPTIONS}
    differences = [
        ("a normalizer", lambda: data.get("normalizer") is not None),
        ("a pre-tokenizer other than the split pattern then ByteLevel",
         lambda: data["pre_tokenizer"] != pre_tokenizer_json(pattern)),
        (f"BPE options {options}", lambda: options != BPE_OPTIONS),
        ("merges other than those derived from the ranks",
         lambda: merges != text_merges(sorted(ranks, key=ranks.get))),
    ]
    for what, differs in differences:
        if differs():
            raise PicochatError(f"{origin} has {what}: transformers would not tokenize as picochat does")
    try:
        return Tokenizer(ranks, pattern, SPECIAL_TOKENS)
    except (ValueError, TypeError) as e:  # tiktoken's errors for a split pattern it cannot compile
        raise PicochatError(f"{origin}: {str(e).splitlines()[0]}") from None


# The chat template: render_conversation and render_for_completion in Jinja. A leading system
# message is joined to the first user message by a blank line; roles alternate user, assistant;
# assistant content is a string or a list of parts {type: text | python | python_output, text}.
# Consecutive text parts are joined into one string before tokenizing (picochat encodes each
# part separately, so a word split across two parts can get other tokens: docs/EXPORT.md).
# With add_generation_prompt a final assistant message is dropped, as render_for_completion does.
CHAT_TEMPLATE = (
    "{%- set msgs = messages -%}"
    "{%- if msgs and msgs[0]['role'] == 'system' -%}"
    "{%- if msgs|length < 2 or msgs[1]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}{%- endif -%}"
    "{%- if msgs[0]['content'] is not string or msgs[1]['content'] is not string -%}"
    "{{- raise_exception('the system message and the first user message must have string content') -}}"
    "{%- endif -%}"
    "{%- set msgs = [{'role': 'user', 'content': msgs[0]['content'] ~ '\\n\\n' ~ msgs[1]['content']}]"
    " + msgs[2:] -%}"
    "{%- endif -%}"
    "{%- if add_generation_prompt and msgs and msgs[-1]['role'] == 'assistant' -%}"
    "{%- set msgs = msgs[:-1] -%}{%- endif -%}"
    "<|bos|>"
    "{%- for m in msgs -%}"
    "{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ... (a system message only first)') -}}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if m['content'] is not string -%}{{- raise_exception('user content must be a string') -}}{%- endif -%}"
    "<|user_start|>{{- m['content'] -}}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}<|python_start|>{{- part['text'] -}}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- part['text'] -}}<|output_end|>"
    "{%- else -%}{{- raise_exception('unknown content part type ' ~ part['type']) -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def tokenizer_config(tokenizer: Tokenizer, context: int) -> dict:
    """tokenizer_config.json: the fast tokenizer class, the special tokens by role, the chat
    template. Padding goes on the left for batched generation; pads are masked out. `context`
    is the model's trained sequence length."""
    end = "<|assistant_end|>"
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": end,
        "pad_token": end,
        "padding_side": "left",
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": name, "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False}
            for name, i in tokenizer.special_ids.items()},
    }
