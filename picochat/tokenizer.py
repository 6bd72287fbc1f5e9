"""
The BPE tokenizer: trained with rustbpe, run with tiktoken.

Training (rustbpe, Rust) learns byte-level BPE merges over text split by SPLIT_PATTERN; the learned
ranks are then handed to a tiktoken Encoding, which is what encodes and decodes at run time (fast,
multithreaded batches). Nine special tokens follow the BPE ranks, so `<|bos|>` = vocab_size - 9
(docs/DESIGN.md#tokenizer); they delimit chat turns and tool calls in `render_conversation`.

Saved as one file in the tokenizer directory ($PICOCHAT_HOME/tokenizer by default):
  tokenizer.json   pattern, special token names, every BPE token as base64 in rank order, and the
                   dataset it was trained on (plain JSON rather than a pickle: readable, and
                   loading it runs no code). Bits per byte divides by `token_bytes()`, computed
                   from the tokens on load.

Usage:
    from picochat.tokenizer import get_tokenizer
    tok = get_tokenizer()                       # after `picochat tok_train`
    ids = tok.encode("hello world", prepend="<|bos|>")
    tok.decode(ids)
    ids, mask = tok.render_conversation({"messages": [...]})   # mask 1 = trained on
    # (the chat format: docs/DESIGN.md#chat-format)
"""
from __future__ import annotations

import base64
import copy
import itertools
import json
import sys
from pathlib import Path
from typing import Iterable

import tiktoken
import torch

from picochat.common import PicochatError, atomic_path, color_enabled, node_share_of_cores, styled, tokenizer_dir

# GPT-4's split pattern with numbers in groups of 1-2 digits instead of 1-3
# (nanochat LOG 2026-01-13, d12: {1,1} 0.969, {1,2} 0.965, {1,3} 0.972 val bpb).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

# Appended after the BPE ranks in exactly this order: ids are vocab_size - 9 ... vocab_size - 1.
SPECIAL_TOKENS = [
    "<|bos|>",            # starts every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",    # the assistant calls the Python tool
    "<|output_start|>", "<|output_end|>",    # the tool's answer, spliced in at inference
]

DEFAULT_VOCAB_SIZE = 65_536  # 2^16, nanochat's seed (HEAD uses 32,768)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # all bytes, the specials, and at least one merge

MAX_RENDER_TOKENS = 2048  # chat renderings are cut to nanochat's SFT sequence length (docs/DESIGN.md#chat-format)
STYLE_BY_MASK = {0: "grey", 1: "green"}  # dim grey: given to the model; green: trained on

TOKENIZER_FILE = "tokenizer.json"
FILE_FORMAT = "picochat-tokenizer/1"


def missing_tokenizer_error(directory: Path) -> PicochatError:
    return PicochatError(f"no tokenizer in {directory}; run `picochat tok_train` first")


# -----------------------------------------------------------------------------
# Training

def train_tokenizer(text_iterator: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> "Tokenizer":
    """Learn vocab_size - 9 BPE ranks (256 bytes + merges) from the texts, then add the specials.

    If the text runs out of pairs to merge, the vocab comes out smaller than asked; check
    `.vocab_size` of the result."""
    import rustbpe  # only training needs it; encoding runs on tiktoken

    if vocab_size < MIN_VOCAB_SIZE:
        raise PicochatError(f"vocab size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                            f"{len(SPECIAL_TOKENS)} special tokens + 1 merge), got {vocab_size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(text_iterator), vocab_size - len(SPECIAL_TOKENS),
                                pattern=SPLIT_PATTERN)
    return Tokenizer(dict(trainer.get_mergeable_ranks()), SPLIT_PATTERN)


# -----------------------------------------------------------------------------
# The tokenizer

class Tokenizer:
    """BPE ranks + split pattern + special tokens, encoding and decoding through tiktoken."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens: list[str] = SPECIAL_TOKENS, trained_on: str | None = None):
        # ids must be exactly 0..n-1 so that the specials land right after them
        by_rank = sorted(mergeable_ranks.items(), key=lambda kv: kv[1])
        if [rank for _, rank in by_rank] != list(range(len(by_rank))):
            raise ValueError("mergeable ranks must be the integers 0..n-1 with no gaps")
        self.tokens: list[bytes] = [token for token, _ in by_rank]  # id -> raw bytes
        self.pattern = pattern
        self.trained_on = trained_on  # the dataset tok_train read; later stages default to it
        self.special_ids = {name: len(self.tokens) + i for i, name in enumerate(special_tokens)}
        self.enc = tiktoken.Encoding("picochat", pat_str=pattern, mergeable_ranks=dict(mergeable_ranks),
                                     special_tokens=self.special_ids)

    # --- vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.tokens) + len(self.special_ids)

    @property
    def bos_id(self) -> int:
        return self.special_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        if name not in self.special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(self.special_ids)}")
        return self.special_ids[name]

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token gives its name's bytes)."""
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self) -> torch.Tensor:
        """int32 [vocab_size]: bytes per token, from the raw token bytes, 0 for special tokens.

        Counted from the bytes themselves, not by decoding to str and re-encoding: a token that is
        part of a UTF-8 character would decode to U+FFFD (3 bytes) and skew bits per byte
        (nanochat's seed bug, fixed at HEAD in 2ce972a)."""
        lengths = [len(token) for token in self.tokens] + [0] * len(self.special_ids)
        return torch.tensor(lengths, dtype=torch.int32)

    # --- encoding and decoding

    def _as_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text_or_list: str | list[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int | None = None,
               allowed_special: bool = False) -> list[int] | list[list[int]]:
        """str -> ids; list[str] -> list of ids (encoded in parallel threads).

        Special-token text such as "<|bos|>" inside `text` is ordinary text (so user content can't
        forge a turn boundary) unless allowed_special=True. `prepend`/`append` add one token, given as
        an id or a special token's name, to each sequence."""
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text_or_list, str):
            ids = (self.enc.encode(text_or_list, allowed_special="all") if allowed_special
                   else self.enc.encode_ordinary(text_or_list))
            return head + ids + tail
        if not isinstance(text_or_list, list):
            raise TypeError(f"encode takes a str or a list of str, got {type(text_or_list).__name__}")
        num_threads = num_threads or node_share_of_cores()  # 8 ranks on a node: 1/8 of its cores each
        if allowed_special:
            batch = self.enc.encode_batch(text_or_list, num_threads=num_threads, allowed_special="all")
        else:
            batch = self.enc.encode_ordinary_batch(text_or_list, num_threads=num_threads)
        return [head + ids + tail for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; a byte sequence that is not valid UTF-8 comes out as U+FFFD."""
        return self.enc.decode(list(ids))

    # --- saving and loading

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json atomically."""
        directory = Path(directory)
        state = {
            "format": FILE_FORMAT,
            "pattern": self.pattern,
            "special_tokens": list(self.special_ids),  # ids follow the ranks, in this order
            "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token in self.tokens],
            "trained_on": self.trained_on,
        }
        with atomic_path(directory / TOKENIZER_FILE) as tmp:
            tmp.write_text(json.dumps(state, indent=0))

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise missing_tokenizer_error(Path(directory))
        try:
            state = json.loads(path.read_text())
            if state.get("format") != FILE_FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {FILE_FORMAT!r}")
            ranks = {base64.b64decode(token): rank for rank, token in enumerate(state["mergeable_ranks"])}
            return cls(ranks, state["pattern"], state["special_tokens"], state.get("trained_on"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PicochatError(f"tokenizer file {path} is unreadable ({e}); "
                                f"run `picochat tok_train` again") from None

    # --- chat rendering (docs/DESIGN.md#chat-format)
    # mask 1 marks the tokens the model is trained to produce (the assistant's words and its tool
    # calls); mask 0 marks what it is given (the prompt, the user, the tool's output).

    def render_conversation(self, conversation: dict, max_tokens: int = MAX_RENDER_TOKENS
                            ) -> tuple[list[int], list[int]]:
        """(ids, mask) for one conversation {"messages": [...]}, both truncated to max_tokens.

        <|bos|> <|user_start|> text <|user_end|> <|assistant_start|> content <|assistant_end|> ...
        The assistant's content and its <|assistant_end|> are mask 1, everything else 0. Content is
        a string or a list of parts: text (1); python: <|python_start|> expr <|python_end|> (1);
        python_output: <|output_start|> result <|output_end|> (0)."""
        messages = merge_system_message(list(conversation["messages"]))
        skipped = len(conversation["messages"]) - len(messages)  # 1 if a system message was merged
        if not messages:
            raise ValueError("the conversation has no messages")
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], m: int):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        special = self.encode_special
        add(self.bos_id, 0)
        for n, message in enumerate(messages):
            i = n + skipped  # the index in the caller's list, for error messages
            expected = "user" if n % 2 == 0 else "assistant"
            role, content = message.get("role"), message.get("content")
            if role != expected:
                raise ValueError(f"message {i} has role {role!r} where {expected!r} was expected: roles "
                                 f"must alternate user, assistant, user, ... (a system message only first)")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string, "
                                     f"got {type(content).__name__}")
                add(special("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts, "
                                 f"got {type(content).__name__}")
            for part in parts:
                kind, text = part.get("type"), part.get("text", "")
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":  # the tool call is the model's own output: supervised
                    add(special("<|python_start|>"), 1)
                    add(self.encode(text), 1)
                    add(special("<|python_end|>"), 1)
                elif kind == "python_output":  # the tool writes these at inference: not trained on
                    add(special("<|output_start|>"), 0)
                    add(self.encode(text), 0)
                    add(special("<|output_end|>"), 0)
                else:
                    raise ValueError(f"message {i}: unknown content part type {kind!r}; "
                                     f"expected text, python or python_output")
            add(special("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt for sampling the assistant's reply: the conversation without its final
        assistant message (if it ends with one), rendered in full, then <|assistant_start|>.
        The caller's conversation is not modified."""
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        if messages and messages[-1].get("role") == "assistant":
            messages.pop()
        ids, _ = self.render_conversation(conversation, max_tokens=sys.maxsize)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids: list[int], mask: list[int], color: bool | None = None) -> str:
        """Every token, separated by '|', marked by its mask: for eyeballing a rendering.

        color=True: mask 1 green, mask 0 dim grey (ANSI). color=False: each run of mask-1 tokens is
        wrapped in [[ ]] instead. None: colour if stdout takes it (common.color_enabled). Newlines and
        tabs are shown escaped so every token stays visible."""
        color = color_enabled(sys.stdout) if color is None else color
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length: {len(ids)} vs {len(mask)}")
        runs = []
        for m, run in itertools.groupby(zip(ids, mask), key=lambda pair: int(pair[1])):
            texts = [self.id_to_bytes(token).decode("utf-8", errors="replace")
                     .replace("\n", "\\n").replace("\t", "\\t") for token, _ in run]
            if color:
                runs.append("|".join(styled(t, STYLE_BY_MASK[m], color=True) for t in texts))
            else:
                runs.append("[[" + "|".join(texts) + "]]" if m else "|".join(texts))
        return "|".join(runs)


def default_dataset(tokenizer: Tokenizer) -> str:
    """The dataset a stage reads when not given --dataset: the one the tokenizer was trained on
    (tok_train records it), so `picochat tok_train` then `picochat base_train` read the same data.
    A tokenizer saved before that was recorded means fineweb-edu, the stages' old default."""
    return tokenizer.trained_on or "fineweb-edu"


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by `picochat tok_train`, from $PICOCHAT_HOME/tokenizer."""
    return Tokenizer.load(tokenizer_dir())


# -----------------------------------------------------------------------------
# Chat rendering helpers (the methods are Tokenizer.render_conversation and friends, above)

def merge_system_message(messages: list[dict]) -> list[dict]:
    """A leading system message becomes the head of the first user message, joined by a blank
    line: the model has no system role of its own, only user and assistant turns."""
    if not messages or messages[0].get("role") != "system":
        return messages
    if len(messages) < 2 or messages[1].get("role") != "user":
        raise ValueError("a system message must be followed by a user message")
    system, user = messages[0], messages[1]
    if not isinstance(system.get("content"), str) or not isinstance(user.get("content"), str):
        raise ValueError("the system message and the first user message must have string content")
    return [dict(user, content=system["content"] + "\n\n" + user["content"])] + messages[2:]
