"""
The inference engine: batched sampling with a KV cache, and the tool-use state machine (docs/DESIGN.md#engine).

`Engine.generate` is a streaming generator. It runs the prompt through the model once, with batch 1,
then copies that prefix of the KV cache into a cache with one row per sample, so N samples of one
prompt cost one prefill. Every step yields a column: one token per row, and a mask saying whether
the row sampled it (1) or was forced to emit it (0: the tool's output).

Tool use (docs/DESIGN.md#tool-use): when a row emits <|python_start|> ... <|python_end|>, the tokens in between
are decoded and passed to the tool (picochat.tools.run_tool unless another is given); the answer is
forced into that row as <|output_start|> result <|output_end|> over the following steps, and the
model carries on from there. A row ends at <|assistant_end|> or <|bos|>.

    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hi"}]})
    for tokens, masks in engine.generate(prompt, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                   # tokens[i] is row i's next token
    results, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=64)

`StreamDecoder` turns a stream of token ids into text without ever printing half a character.

The server (picochat/scheduler.py) shares the pieces: `sample_rows` samples every row with its
own temperature / top-k / top-p / generator, and `Engine.advance` + `force_output` are the tool-use
state machine of one row (the server runs the tool itself, in a worker thread).
"""
from __future__ import annotations

import codecs
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from picochat.model import CompiledDecode, CompiledPrefill, KVCache, RowKVCache, kv_cache_dtype

# -----------------------------------------------------------------------------
# Sampling


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,), each row with its own settings, (B,) tensors:
    temperature (0: greedy, argmax), top_k (keep the k likeliest; 0: all) and top_p (then keep the
    smallest set of those whose probability reaches p; 1: all). `generator` is one generator for
    every row, or one per row, so a row's draws do not depend on the other rows (serving)."""
    vocab = logits.size(-1)
    greedy = logits.argmax(dim=-1)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    top_k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    top_k = torch.where(sampling, top_k, 1)  # greedy rows need no candidates: keep k_max small
    # Only the k likeliest tokens of the widest row can be drawn: sort just those, once.
    k_max = int(top_k.max())
    scale = torch.where(sampling, temperature, 1.0).unsqueeze(1).to(logits.device, torch.float32)
    candidates, order = torch.topk(logits.float() / scale, k_max, dim=-1)  # sorted, descending
    rank = torch.arange(k_max, device=logits.device)
    candidates = candidates.masked_fill(rank >= top_k.to(logits.device).unsqueeze(1), float("-inf"))
    probs = F.softmax(candidates, dim=-1)
    # Nucleus: drop a token when the tokens ranked above it already reach top_p; the first stays.
    drop = (probs.cumsum(dim=-1) - probs) >= top_p.to(logits.device).unsqueeze(1)
    probs = F.softmax(candidates.masked_fill(drop, float("-inf")), dim=-1)
    # Inverse CDF with one uniform per row: a row's draw depends only on its own generator and
    # distribution, not on how many candidates the widest row in the batch needed.
    if isinstance(generator, torch.Generator):
        u = torch.rand(probs.size(0), generator=generator, device=generator.device)
    else:
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator])
    cdf = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cdf, u.to(cdf.device).unsqueeze(1) * cdf[:, -1:]).clamp_(max=k_max - 1)
    return torch.where(sampling.to(logits.device), order.gather(1, picks).squeeze(1), greedy)


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,), every row with the same settings (see sample_rows;
    top_k None and top_p None keep every token)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rows = logits.size(0)
    return sample_rows(logits, torch.full((rows,), float(temperature)),
                       torch.full((rows,), top_k or 0), torch.full((rows,), 1.0 if top_p is None else top_p),
                       generator)


# -----------------------------------------------------------------------------
# KV cache plumbing (kept here so picochat/model.py stays just the model)


def expand_cache(prefill: KVCache, config, num_rows: int, max_len: int) -> KVCache:
    """A new cache of `num_rows` rows and `max_len` positions, each row starting with the batch-1
    prefill's keys and values: the prompt is computed once and shared by every sample."""
    if prefill.k.size(1) != 1:
        raise ValueError(f"expand_cache takes a batch-1 cache, got batch {prefill.k.size(1)}")
    if max_len < prefill.pos:
        raise ValueError(f"max_len {max_len} is shorter than the cached prefix ({prefill.pos})")
    cache = KVCache(config, num_rows, max_len, prefill.k.device, prefill.k.dtype)
    cache.k[:, :, :, :prefill.pos] = prefill.k[:, :, :, :prefill.pos]  # broadcast over the rows
    cache.v[:, :, :, :prefill.pos] = prefill.v[:, :, :, :prefill.pos]
    cache.tokens[:, :prefill.pos] = prefill.tokens[:, :prefill.pos]
    cache.pos = prefill.pos
    return cache


# -----------------------------------------------------------------------------
# The engine


def compile_decode(device: torch.device) -> CompiledDecode:
    """The compiled decode step for `device`: CUDA graphs on CUDA, plain inductor elsewhere."""
    if torch.device(device).type == "cuda":
        return CompiledDecode(mode="reduce-overhead")
    return CompiledDecode()


def reference_generate(model, tokens: list[int], num_samples: int, max_tokens: int) -> list[list[int]]:
    """The slow, obvious greedy decode loop that the fast path is checked and timed against
    (tests/test_decode_fast.py, benchmarks/decode_speed.py): the model's own forward with a KVCache,
    one step at a time, every Linear casting its weight per call as before prepare_for_inference,
    no stop tokens, no tools. Returns num_samples rows of max_tokens tokens."""
    device = next(model.parameters()).device
    with torch.no_grad():
        prefill = KVCache(model.config, 1, len(tokens), device, model.compute_dtype)
        logits = model(torch.tensor([tokens], device=device), kv_cache=prefill)[:, -1, :]
        cache = expand_cache(prefill, model.config, num_samples, len(tokens) + max_tokens)
        logits = logits.expand(num_samples, -1)
        out = []
        for _ in range(max_tokens):
            ids = logits.argmax(dim=-1)
            out.append(ids.tolist())
            logits = model(ids.unsqueeze(1), kv_cache=cache)[:, -1, :]
    return [list(row) for row in zip(*out)]


@dataclass
class RowState:
    """Where one sample is in the tool-use state machine."""
    forced: deque = field(default_factory=deque)  # tokens to emit next instead of sampling
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)  # the expression being collected
    done: bool = False


class Engine:
    def __init__(self, model, tokenizer, tool: Callable[[str], str] | None = None,
                 compile: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        # The decode step compiled with static shapes and captured as CUDA graphs (picochat.model.
        # CompiledDecode), and the prefill compiled per power-of-two prompt length (CompiledPrefill).
        # Opt-in (compile=True, or PICOCHAT_COMPILE_DECODE=1 with compile=None): on the dev CPU inductor's step was slower than eager (2.9 vs 2.3 ms at d4, after 11 s of
        # compiling per bucket: docs/BENCHMARKS.md#decode-speed-benchmarksdecode_speedpy), and the
        # CUDA-graph path has not yet been timed on a GPU (benchmarks/gpu_check.py will).
        if compile is None:
            compile = os.environ.get("PICOCHAT_COMPILE_DECODE") == "1"
        self.compiled = compile_decode(next(model.parameters()).device) if compile else None
        self.compiled_prefill = CompiledPrefill() if compile else None  # inductor; no CUDA graphs
        self._tool = tool  # None: picochat.tools.run_tool, imported on the first tool call
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.bos_id}
        # The tokens that move a row's state machine when it is not inside a tool call; any other
        # token of such a row changes nothing, so the hot loops skip advance() for it.
        self.watch_tokens = self.stop_tokens | {self.python_start, self.python_end}

    def run_tool(self, expr: str) -> str:
        if self._tool is None:
            from picochat.tools import run_tool  # lazily: the engine works without a tool module
            self._tool = run_tool
        try:
            return str(self._tool(expr))
        except Exception as e:  # a tool is meant to answer with an error string; a buggy one
            return f"Error: {type(e).__name__}: {e}"  # must still not end the whole generation

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column) per step for `num_samples` continuations of `tokens`.

        Stops after max_tokens steps (default: until prompt + reply fill the model's sequence_len)
        or once every row has ended; rows that ended still get tokens in later columns, to ignore."""
        model = self.model
        if not tokens:
            raise ValueError("the prompt is empty; start it with <|bos|>")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        prompt_len, limit = len(tokens), model.rotary_len
        if prompt_len > limit:
            raise ValueError(f"the prompt has {prompt_len} tokens; the model's limit is {limit}")
        if max_tokens is None:  # fill the context the model was trained on (nanochat HEAD)
            max_tokens = model.config.sequence_len - prompt_len
        # The last sampled token is never fed back, so the cache needs prompt + max_tokens - 1
        # positions; the rotary table bounds how far the model can go at all.
        steps = min(max_tokens, limit - prompt_len + 1)
        if steps <= 0:
            return
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)

        # 1) Prefill the prompt once, batch 1 (its cache ends at the prompt: prefill.pos).
        logits, prefill = self.prefill(tokens)
        # 2) Share the prefix with every row. The prefill logits are expanded too, so even the
        #    first token is sampled per row (nanochat's seed sampled it once for all; fixed 8f979a8).
        cache = RowKVCache(model.config, num_samples, prompt_len + steps - 1, device,
                           kv_cache_dtype(prefill.k.dtype, device))
        for row in range(num_samples):
            cache.load_row(row, prefill)
        cache.rows = num_samples
        del prefill
        logits = logits.expand(num_samples, -1)
        rows = [RowState() for _ in range(num_samples)]
        greedy = temperature == 0 and not top_k and top_p in (None, 1.0)
        busy: set[int] = set()  # rows with forced tokens queued or inside a tool call
        watch = self.watch_tokens
        done = 0

        # 3) Decode: sample, let forced tokens override, advance the state machines, feed back.
        #    The per-row state machine runs only for rows that emitted a stop or tool token, are
        #    collecting a tool call or have forced tokens queued; the others just stream.
        for step in range(steps):
            if greedy:
                ids = logits.argmax(dim=-1)
            else:
                ids = sample_next_token(logits, generator, temperature, top_k, top_p)
            token_column = ids.tolist()
            mask_column = [1] * num_samples
            if busy or not watch.isdisjoint(token_column):
                changed = False
                for i, row in enumerate(rows):
                    token = token_column[i]
                    if row.forced:
                        token_column[i] = token = row.forced.popleft()
                        mask_column[i], changed = 0, True
                    elif not (row.in_python or token in watch):
                        continue
                    if not row.done:
                        if (code := self.advance(row, token)) is not None:
                            self.force_output(row, self.run_tool(code))
                        done += row.done
                    if row.forced or row.in_python:
                        busy.add(i)
                    else:
                        busy.discard(i)
                if changed:
                    ids = torch.tensor(token_column, dtype=torch.long, device=device)
            yield token_column, mask_column
            if done == num_samples or step == steps - 1:
                return
            logits = model.decode_step(ids, cache, masked=False, compiled=self.compiled)

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> tuple[torch.Tensor, KVCache]:
        """The prompt through the model, batch 1: (last position's logits (1, V), its KVCache)."""
        model = self.model
        if self.compiled_prefill is not None:
            out = self.compiled_prefill(model, tokens, model.compute_dtype)
            if out is not None:
                return out
        device = next(model.parameters()).device
        cache = KVCache(model.config, 1, len(tokens), device, model.compute_dtype)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        return model(ids, kv_cache=cache)[:, -1, :], cache

    def advance(self, row: RowState, token: int) -> str | None:
        """The tool-use state machine of one row, after it emitted `token`. When the token closes
        a tool call, returns the call's code for the caller to run (here in line; the server in a
        worker thread) and hand back through force_output; None otherwise."""
        if token in self.stop_tokens:
            row.done = True
        elif token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            return self.tokenizer.decode(row.python_tokens)
        elif row.in_python:
            row.python_tokens.append(token)
        return None

    def force_output(self, row: RowState, result: str) -> None:
        """Queue <|output_start|> result <|output_end|> as the row's next tokens."""
        row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs
                       ) -> tuple[list[list[int]], list[list[int]]]:
        """All samples at once: (results, masks), each row the prompt plus its generated tokens
        (without the token that ended it); masks are 0 over the prompt and forced tokens."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, mask_column)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks


# -----------------------------------------------------------------------------
# Streaming text


class StreamDecoder:
    """Token ids in, complete text out. A byte-level BPE token can hold part of a UTF-8 character
    (an emoji is 4 bytes, often split over 2-3 tokens); decoding token by token would print U+FFFD
    for each piece. An incremental UTF-8 decoder keeps the unfinished bytes until the character is
    complete, at O(1) cost per token. Bytes that can never form a character still come out as
    U+FFFD, as in Tokenizer.decode.

        stream = StreamDecoder(tokenizer)
        for token in tokens: print(stream.feed(token), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: int | list[int]) -> str:
        """The text completed by these tokens ('' while a character is still unfinished)."""
        token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
        return "".join(self._utf8.decode(self.tokenizer.id_to_bytes(t)) for t in token_ids)

    def flush(self) -> str:
        """Whatever is left at the end of the stream (U+FFFD for an unfinished character)."""
        return self._utf8.decode(b"", final=True)
