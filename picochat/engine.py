"""
The inference engine: a model, its tokenizer and its tools (docs/DESIGN.md#engine).

`Engine` holds what one model replica needs to decode: `prefill` (a prompt through the model alone,
into a one-row picochat.decode.Cache), `forward` (new tokens for the first rows of a cache: the one
call into picochat.decode's forward, eager or compiled), and the tool-use state machine of a row
(`advance`, `force_output`, `run_tool`). It has no decode loop of its own: picochat/scheduler.py's
Scheduler is the only one, and its `generate` / `generate_batch` are what chat, the evals, RL and the
base model's samples call.

Tool use (docs/DESIGN.md#tool-use): when a row emits <|python_start|> ... <|python_end|>, the tokens in
between are decoded and passed to the tools (picochat.toolbox.run_tool, unless another is given); the
answer is forced into that row as <|output_start|> result <|output_end|> over the following steps,
and the model carries on from there. A row ends at <|assistant_end|> or <|bos|>.

`sample_rows` samples every row with its own temperature / top-k / top-p / random number;
`StreamDecoder` turns a stream of token ids into text without ever printing half a character;
`reference_generate` is the slow, obvious greedy loop the fast path is tested and timed against.
"""
from __future__ import annotations

import codecs
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from picochat.decode import Cache, CompiledDecode, CompiledPrefill, decode_weights, forward, kv_cache_dtype

# -----------------------------------------------------------------------------
# Sampling


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,), each row with its own settings, (B,) tensors:
    temperature (0: greedy, argmax), top_k (keep the k likeliest; 0: all) and top_p (then keep the
    smallest set of those whose probability reaches p; 1: all). `draws`: one uniform number in
    [0, 1) per row, from whichever generator the caller keeps for that row (the Scheduler keeps
    one per choice, or one per request), so the sample is a plain function of them."""
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
    # Inverse CDF with one uniform per row: a row's draw depends only on its own number and
    # distribution, not on how many candidates the widest row in the batch needed.
    cdf = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cdf, draws.to(cdf.device).unsqueeze(1) * cdf[:, -1:]).clamp_(max=k_max - 1)
    return torch.where(sampling.to(logits.device), order.gather(1, picks).squeeze(1), greedy)


# -----------------------------------------------------------------------------
# The engine


def compile_decode(device: torch.device) -> CompiledDecode:
    """The compiled decode step for `device`: CUDA graphs on CUDA, plain inductor elsewhere."""
    if torch.device(device).type == "cuda":
        return CompiledDecode(mode="reduce-overhead")
    return CompiledDecode()


def reference_generate(model, tokens: list[int], num_samples: int, max_tokens: int) -> list[list[int]]:
    """The slow, obvious greedy decode loop that the fast path is checked and timed against
    (tests/test_decode_fast.py, benchmarks/decode_speed.py): the model's own training forward over
    the whole sequence for every new token, no cache, no stop tokens, no tools. Returns num_samples
    rows of max_tokens tokens (the rows are the same: greedy)."""
    device = next(model.parameters()).device
    seq = list(tokens)
    with torch.no_grad():
        for _ in range(max_tokens):
            seq.append(int(model(torch.tensor([seq], device=device))[0, -1].argmax()))
    return [seq[len(tokens):] for _ in range(num_samples)]


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
        # The decode step compiled with static shapes and captured as CUDA graphs (picochat.decode.
        # CompiledDecode), and the prefill compiled per power-of-two prompt length (CompiledPrefill).
        # Opt-in (compile=True, or PICOCHAT_COMPILE_DECODE=1 with compile=None): on the dev CPU inductor's step was slower than eager (2.9 vs 2.3 ms at d4, after 11 s of
        # compiling per bucket: docs/BENCHMARKS.md#decode-speed-benchmarksdecode_speedpy), and the
        # CUDA-graph path has not yet been timed on a GPU (benchmarks/gpu_check.py will).
        if compile is None:
            compile = os.environ.get("PICOCHAT_COMPILE_DECODE") == "1"
        self.compiled = compile_decode(next(model.parameters()).device) if compile else None
        self.compiled_prefill = CompiledPrefill() if compile else None  # inductor; no CUDA graphs
        self._tool = tool  # None: picochat.toolbox.run_tool (the tool registry), imported on the first tool call
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.bos_id}
        # The tokens that move a row's state machine when it is not inside a tool call; any other
        # token of such a row changes nothing, so the hot loops skip advance() for it.
        self.watch_tokens = self.stop_tokens | {self.python_start, self.python_end}

    def run_tool(self, expr: str) -> str:
        if self._tool is None:
            from picochat.toolbox import run_tool  # lazily: the sandbox loads on the first tool call
            self._tool = run_tool
        try:
            return str(self._tool(expr))
        except Exception as e:  # a tool is meant to answer with an error string; a buggy one
            return f"Error: {type(e).__name__}: {e}"  # must still not end the whole generation

    def new_cache(self, rows: int, max_len: int) -> Cache:
        """An empty decode cache for `rows` rows of up to `max_len` positions, in the cache dtype."""
        model = self.model
        device = next(model.parameters()).device
        return Cache(model.config, rows, max_len, device, kv_cache_dtype(model.compute_dtype, device))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: Cache, masked: bool = True) -> torch.Tensor:
        """ids (B, T): the next T tokens of each of the first B rows of `cache`, each row at its
        own length. Returns fp32 logits (B, V) of each row's last token and advances the lengths.
        masked=False promises that every row is at the same length (no mask is built then). The
        one call into the model for decoding; tests fake the model's logits here. Inference mode,
        not just no_grad: it skips autograd's bookkeeping on each of the ~100 small ops of a step."""
        model = self.model
        B, T = ids.shape
        lengths = cache.lengths[:B]
        end = max(lengths) + T
        if end > cache.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {cache.max_len} allocated")
        if end > model.rotary_len:
            raise ValueError(f"sequence of {end} tokens exceeds the rotary table ({model.rotary_len})")
        if self.compiled is not None and T == 1:
            logits = self.compiled(decode_weights(model, packed=False), ids, lengths, cache, end)
        else:
            masked = masked or min(lengths) != max(lengths)
            pos = torch.tensor(lengths, device=ids.device)
            weights = decode_weights(model, packed=self.compiled is None)  # the compiled step's layout, if any
            logits = forward(weights, ids, pos, cache.k, cache.v, cache.tokens, end, masked)
        cache.lengths[:B] = [n + T for n in lengths]
        return logits

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> tuple[torch.Tensor, Cache]:
        """The prompt through the model, alone: (last position's logits (1, V), a one-row Cache)."""
        model = self.model
        device = next(model.parameters()).device
        if self.compiled_prefill is not None:
            out = self.compiled_prefill(decode_weights(model, packed=False), tokens, model.config, device,
                                        kv_cache_dtype(model.compute_dtype, device))
            if out is not None:
                return out
        cache = self.new_cache(1, len(tokens))
        cache.rows = 1
        return self.forward(torch.tensor([tokens], dtype=torch.long, device=device), cache, masked=False), cache

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
