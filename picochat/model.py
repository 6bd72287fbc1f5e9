"""
The GPT (nanochat's seed architecture, docs/DESIGN.md#model, and the 2026 parts switched on by
GPTConfig's later fields, docs/DESIGN.md#the-2026-recipe: sliding windows, value embeddings,
per-layer lambdas, smear, backout, RoPE base, q·k scale), in one file:

- pre-norm residual blocks with a parameter-free RMSNorm (after the embedding, before attention and
  MLP, before the head, and on q and k per head: QK-norm);
- rotary position embeddings (base 10,000 in the seed, 100,000 in 2026; half-split convention), no
  position table;
- attention through F.scaled_dot_product_attention, GQA-capable (n_kv_head <= n_head), no biases;
- a ReLU² MLP (d → 4d → d); untied embedding and head; logits softcapped at 15 in fp32;
- one dial: `config_from_depth(depth)` gives width 64·depth (rounded up to a multiple of 128) and
  heads of dimension 128.

Dtypes are explicit: master weights are fp32 and every Linear casts its weight to the activation
dtype (`compute_dtype`, bf16 on modern GPUs and fast-bf16 CPUs), so there is no autocast anywhere.
A `KVCache` turns the same forward into incremental decoding; a `RowKVCache` does it for rows
at different positions (continuous batching in picochat serve; tests/test_serve.py checks it against
running each row alone). Inference decodes through `GPT.decode_step` instead (the fast path: weights
prepared once by `prepare_for_inference`, one flat function per step, `CompiledDecode` for CUDA
graphs); tests/test_decode_fast.py pins it to the plain forward's tokens. The elementwise ops (RMSNorm, RoPE + QK-norm, ReLU²) run as fused
autograd Functions, each with its plain reference beside it (tests/test_fast_paths.py pins them
together; benchmarks/train_throughput.py times both).

    model = GPT(config_from_depth(4, vocab_size=4096, sequence_len=512)); model.init_weights()
    loss = model(idx, targets)
"""
from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    # The 2026 parts (docs/DESIGN.md#model). Every default is the seed's, so a checkpoint written
    # before these fields existed loads as the model it was.
    window_pattern: str = "L"   # per layer, tiled: L = full context, S = the last short_window tokens; last layer L
    short_window: int = 0       # how many earlier tokens an S layer sees (required when the pattern has an S)
    value_embeds: bool = False  # a second embedding table added to v on alternating layers, gated per head
    lambdas: bool = False       # learnable per-layer scales: x <- resid_lambda·x + x0_lambda·x0 before each block
    smear: bool = False         # each token's embedding blends in its predecessor's, through a small gate
    backout: bool = False       # subtract a learned fraction of the middle layer's residual before the head
    rope_base: float = 10_000.0
    qk_scale: float = 1.0       # q and k are multiplied by this after QK-norm (sharper attention above 1)
    init: str = "seed"          # "seed" or "2026": init_weights' scheme

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self):
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - set("SL"):
            raise ValueError(f"window_pattern takes the letters S and L only, got {self.window_pattern!r}")
        if "S" in pattern and self.short_window < 1:
            raise ValueError("a window pattern with S layers needs short_window >= 1")
        if self.init not in ("seed", "2026"):
            raise ValueError(f"init is 'seed' or '2026', got {self.init!r}")
        if (self.smear and self.n_embd < SMEAR_CHANNELS) or (self.value_embeds and self.n_embd < VE_GATE_CHANNELS):
            raise ValueError(f"smear needs a width of at least {SMEAR_CHANNELS} and value embeddings "
                             f"{VE_GATE_CHANNELS}; this model is {self.n_embd} wide")
        self.window_pattern = pattern

    def layer_windows(self) -> list[int | None]:
        """Per layer: None for full causal attention, else how many earlier tokens it sees."""
        tiled = [self.window_pattern[i % len(self.window_pattern)] for i in range(self.n_layer)]
        tiled[-1] = "L"  # the last layer always sees the whole context
        return [self.short_window if c == "S" else None for c in tiled]

    def has_value_embed(self, layer: int) -> bool:
        """Value embeddings on alternating layers, the last one included."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    def is_seed(self) -> bool:
        """No 2026 part switched on: the architecture of the seed (and of transformers' NanoChat)."""
        return all(w is None for w in self.layer_windows()) and not (
            self.value_embeds or self.lambdas or self.smear or self.backout) and \
            self.rope_base == 10_000.0 and self.qk_scale == 1.0


# The one dial's constants (nanochat's seed values): width per layer, and the head dimension that
# the width is rounded up to. base_train's --aspect-ratio, --head-dim and --max-seq-len default to these.
ASPECT_RATIO = 64
HEAD_DIM = 128
SEQUENCE_LEN = 2048


def config_from_depth(depth: int, vocab_size: int = 65536, sequence_len: int = SEQUENCE_LEN,
                      aspect_ratio: int = ASPECT_RATIO, head_dim: int = HEAD_DIM, **parts) -> GPTConfig:
    """Width = aspect_ratio·depth rounded up to a multiple of head_dim, so every depth works
    (d5: 320 → 384, 3 heads); heads = width / head_dim (docs/DESIGN.md#model). `parts` are the
    2026 fields of GPTConfig (picochat.recipe.model_parts gives a recipe's)."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ValueError(f"depth, aspect ratio and head dim must be positive, got {depth}, {aspect_ratio}, {head_dim}")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd, **parts)


# -----------------------------------------------------------------------------
# Building blocks

def reference_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable gain: the model keeps no norm parameters at all."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free Linear whose fp32 master weight is cast to the input's dtype in forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # already in x's dtype after GPT.prepare_for_inference: no per-call cast
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head vector; x is (B, T, H, D)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def reference_rotary_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """QK-norm after RoPE, the obvious way."""
    return reference_norm(apply_rotary(x, cos, sin))


def reference_relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


# --- Fast paths -------------------------------------------------------------------------------
# The elementwise ops around the matmuls cost as much as the matmuls on a CPU, mostly in extra
# passes over memory (F.rms_norm upcasts bf16 to fp32 and back; autograd saves and replays each
# small op). These autograd Functions do the same math in fewer passes, in the activation dtype with
# fp32 accumulation of the reductions. Each agrees with its reference above within bf16 rounding
# (tests/test_fast_paths.py); benchmarks/train_throughput.py times both.

RMS_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm uses for fp32 and (upcast) bf16 inputs


def _rms_scale(x: torch.Tensor) -> torch.Tensor:
    """1/rms over the last dim, (..., 1) in fp32; the sum of squares is accumulated in fp32."""
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return ss.square_().div_(x.size(-1)).add_(RMS_EPS).rsqrt_()


def _rms_norm_backward(grad: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/dx of y = x·rstd(x), from the output y: rstd · (g − y · mean(g·y))."""
    coef = torch.linalg.vecdot(grad, y).float().unsqueeze(-1).div_(-y.size(-1)).to(y.dtype)
    return torch.addcmul(grad, y, coef).mul_(rstd.to(y.dtype))


class RMSNorm(torch.autograd.Function):
    """norm(x) in two passes forward (sum of squares, scale) and three backward; saves only the
    output, which the next Linear saves anyway."""

    @staticmethod
    def forward(ctx, x):
        rstd = _rms_scale(x)
        y = x * rstd.to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rstd = ctx.saved_tensors
        return _rms_norm_backward(grad, y, rstd)


class RotaryNorm(torch.autograd.Function):
    """norm(apply_rotary(x, cos, sin)): the rotation written into one buffer, normalized in place.
    Backward: through the norm, then the inverse rotation (rotation by −angle)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        d = x.size(-1) // 2
        x1, x2 = x[..., :d], x[..., d:]
        y = torch.empty_like(x)
        y1, y2 = y[..., :d], y[..., d:]
        torch.mul(x1, cos, out=y1).addcmul_(x2, sin)
        torch.mul(x2, cos, out=y2).addcmul_(x1, sin, value=-1)
        rstd = _rms_scale(y)
        y.mul_(rstd.to(y.dtype))
        ctx.save_for_backward(y, rstd, cos, sin)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rstd, cos, sin = ctx.saved_tensors
        g = _rms_norm_backward(grad, y, rstd)
        d = g.size(-1) // 2
        g1, g2 = g[..., :d], g[..., d:]
        gx = torch.empty_like(g)
        torch.mul(g1, cos, out=gx[..., :d]).addcmul_(g2, sin, value=-1)
        torch.mul(g2, cos, out=gx[..., d:]).addcmul_(g1, sin)
        return gx, None, None


class ReLUSquared(torch.autograd.Function):
    """relu(x)² saving only relu(x); backward is 2·relu(x)·g."""

    @staticmethod
    def forward(ctx, x):
        h = F.relu(x)
        ctx.save_for_backward(h)
        return h * h

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return torch.mul(grad, h).mul_(2)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few new query tokens against a KV cache as two plain matmuls: on CPU in bf16,
    torch's SDPA for one query token is several times slower for a batch of rows (1.2 vs 0.17 ms per
    layer for 16 rows, docs/BENCHMARKS.md). q (B, H, T, D); k, v (B, H_kv, S, D); mask (B or 1, 1, T, S), True =
    visible. Grouped-query heads share their key/value head without copying the cache."""
    B, H, T, D = q.shape
    G = H // k.size(1)  # query heads per key/value head
    qg = q.reshape(B, k.size(1), G * T, D)  # heads h*G..h*G+G-1 read kv head h (as SDPA's enable_gqa)
    scores = (qg @ k.transpose(-1, -2)).float() * D ** -0.5  # (B, H_kv, G*T, S)
    if mask is not None:
        scores = scores.view(B, k.size(1), G, T, -1).masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores.view(B, k.size(1), G * T, -1), dim=-1).to(v.dtype)
    return (probs @ v).view(B, H, T, D)


def prefer_decode_attention(q: torch.Tensor) -> bool:
    """Where decode_attention replaces SDPA for one query token, as measured by
    benchmarks/decode_step.py (d4, 2-core CPU): bf16 on CPU, 1.15-1.26x per 16-row step (0.93x
    with 1-2 rows, and slower in fp32, where SDPA stays). Not switched by batch size: a row must
    compute the same numbers alone or in a full batch, or a seeded reply would change with load."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


# Under torch.compile (CUDA) the references are traced instead: the compiler fuses them and
# derives their backward itself, and the hand-written Functions above would break the graph
# (writes into non-contiguous halves with out=). tests/test_compile.py counts the graphs.

def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learnable gain (the fast path of reference_norm)."""
    if torch.compiler.is_compiling():
        return reference_norm(x)
    return RMSNorm.apply(x)


def rotary_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return reference_rotary_norm(x, cos, sin)
    return RotaryNorm.apply(x, cos, sin)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return reference_relu_squared(x)
    return ReLUSquared.apply(x)


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, H_kv, T_max, D), and the token
    at each position (B, T_max), which smear reads its predecessor from.

    Layers write their new keys/values at [pos, pos+T); `pos` advances once the last layer is done.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.pos = 0
        self.max_len = max_len
        self.n_layer = config.n_layer

    def positions(self, T: int) -> torch.Tensor:
        """(1, T): the positions of the next T tokens (the same for every row)."""
        if self.pos + T > self.max_len:  # before anything is written (an index past the end is a CUDA assert)
            raise RuntimeError(f"KV cache full: {self.pos + T} positions needed, {self.max_len} allocated")
        return torch.arange(self.pos, self.pos + T, device=self.k.device).unsqueeze(0)

    def previous_tokens(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Record idx (B, T) at positions pos and return each one's predecessor (0 at position 0)."""
        self.tokens[:, pos[0]] = idx
        return self.tokens[:, (pos[0] - 1).clamp(min=0)]

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v of shape (B, H_kv, T, D); return all keys/values so far for this layer."""
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.max_len:
            raise RuntimeError(f"KV cache full: {t1} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        if layer == self.n_layer - 1:
            self.pos = t1
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


class RowKVCache:
    """A decode cache whose rows are each at their own position, for continuous batching: requests
    join and leave between steps, so one row may be 300 tokens in while its neighbour has 12.
    Keys and values (n_layer, max_rows, H_kv, T_max, D), the tokens (max_rows, T_max) and a per-row
    length.

    A forward uses the first `rows` rows (the server keeps its active requests at the front; see
    move_row), writes each row's new keys at that row's own length, and attends through a per-row
    mask that hides everything past it. Rows at equal lengths give what KVCache gives (tests)."""

    def __init__(self, config: GPTConfig, max_rows: int, max_len: int, device, dtype):
        shape = (config.n_layer, max_rows, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.tokens = torch.zeros(max_rows, max_len, dtype=torch.long, device=device)
        self.lengths = [0] * max_rows  # host-side, so no step waits on the device to read them
        self.rows = 0
        self.max_len = max_len
        self.n_layer = config.n_layer

    def positions(self, T: int) -> torch.Tensor:
        """(rows, T): the positions the next T tokens of each row will take. Called once per
        forward (by GPT.trunk), before the layers insert."""
        lengths = self.lengths[:self.rows]
        if max(lengths) + T > self.max_len:
            raise RuntimeError(f"KV cache full: {max(lengths) + T} positions needed, {self.max_len} allocated")
        start = torch.tensor(lengths, device=self.k.device)
        self._pos = start.unsqueeze(1) + torch.arange(T, device=self.k.device)
        self.end = max(lengths) + T
        self._masks = {}  # per window: query t of row b sees keys up to its own position, (rows, 1, T, end)
        return self._pos

    def previous_tokens(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.rows, device=idx.device).unsqueeze(1)
        self.tokens[rows, pos] = idx
        return self.tokens[rows, (pos - 1).clamp(min=0)]

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int | None = None):
        """Store k, v (rows, H_kv, T, D) at each row's positions; return this layer's keys, values
        and the attention mask (for a layer that sees `window` earlier tokens, or all)."""
        pos, rows = self._pos, torch.arange(self.rows, device=k.device).unsqueeze(1)
        self.k[layer, rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # (rows, T) index -> (rows, T, H_kv, D)
        self.v[layer, rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        if layer == self.n_layer - 1:
            self.lengths[:self.rows] = [n + k.size(2) for n in self.lengths[:self.rows]]
        if window not in self._masks:
            self._masks[window] = window_mask(pos, self.end, window).unsqueeze(1)
        keys, values = self.k[layer, :self.rows, :, :self.end], self.v[layer, :self.rows, :, :self.end]
        return keys.to(k.dtype), values.to(v.dtype), self._masks[window]  # (an fp32 cache of a bf16 model: kv_cache_dtype)

    def load_row(self, row: int, prefill: "KVCache") -> None:
        """Copy a batch-1 cache (a prompt prefilled alone) into `row`."""
        n = prefill.pos
        if n > self.max_len:
            raise RuntimeError(f"a prefix of {n} tokens does not fit a cache of {self.max_len}")
        self.k[:, row, :, :n] = prefill.k[:, 0, :, :n]
        self.v[:, row, :, :n] = prefill.v[:, 0, :, :n]
        self.tokens[row, :n] = prefill.tokens[0, :n]
        self.lengths[row] = n

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src over row dst (to fill a hole left by a finished request)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.tokens[dst, :n] = self.tokens[src, :n]
        self.lengths[dst] = n


# --- Fast decoding (docs/BENCHMARKS.md#decode-speed-benchmarksdecode_speedpy) ---------------------
# One decode step of the whole model as a flat function over prepared weights: no module dispatch,
# no autograd, q/k/v as one matmul, RoPE + QK-norm of q and k in four ops, weights in the compute
# dtype (cast and, on CPUs, prepacked once; rebuilt only if the model's weights change), positions,
# cache slots and the mask built once per step rather than per layer. Rows are independent (row-wise
# ops and the same batched matmuls for every row), so a row's tokens do not depend on the batch (fp32).


def kv_cache_dtype(compute_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The decode cache's dtype. fp32 on CPUs whatever the weights: torch's bf16 attention for one
    query token is 3-5x slower than fp32 there (d4, 8 rows: 267 vs 45 µs per layer,
    docs/BENCHMARKS.md), and the cache is small next to the weights. The compute dtype elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else compute_dtype


def packed_linear(w: torch.Tensor) -> bool:
    """Whether decode matmuls use oneDNN's prepacked weights: on CPUs, fp32 always and bf16 with
    native bf16 support (d4, 2 cores: the 17 matmuls of an fp32 step take 0.75 vs 1.03 ms at batch 1,
    1.23 vs 1.86 ms at batch 8; bf16 about 1.5-2x faster than F.linear, bitwise the same)."""
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        return w.dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without these oneDNN ops: plain F.linear
        return False


def _mkldnn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


class DecodeWeights:
    """The model's weights arranged for decode_forward, in `dtype`: per layer (w_qkv, w_o, w_fc,
    w_proj), the normalized embedding table, the head, and fp32 RoPE tables as (T, D) with the halves' signs folded
    in. `packed`: oneDNN's prepacked layout where packed_linear allows (eager CPU; a compiled step
    needs plain tensors). Built by GPT.decode_weights, which rebuilds them when a parameter was
    changed in place (its _version moved), so an engine over a model that is still being trained
    never decodes stale weights."""

    def __init__(self, model: "GPT", dtype: torch.dtype, packed: bool = True):
        c = model.config
        cast = lambda w: w.detach().to(dtype)  # noqa: E731 (a no-op view when already in dtype)
        self.dtype = dtype
        self.layers = []
        for block in model.transformer.h:
            a, m = block.attn, block.mlp
            qkv = torch.cat([cast(a.c_q.weight), cast(a.c_k.weight), cast(a.c_v.weight)])
            self.layers.append((qkv, cast(a.c_proj.weight), cast(m.c_fc.weight), cast(m.c_proj.weight)))
        wte = cast(model.transformer.wte.weight)
        self.wte_normed = F.rms_norm(wte, (wte.size(1),), eps=RMS_EPS)  # a step's first op, done for every token at once
        self.lm_head = cast(model.lm_head.weight)
        cos, sin = model.cos[0, :, 0], model.sin[0, :, 0]  # (T, D/2), fp32
        self.cos2 = torch.cat([cos, cos], -1)  # y = x·cos2 + swap_halves(x)·sin2
        self.sin2 = torch.cat([sin, -sin], -1)
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        # the 2026 parts (None where off): per layer window, value embedding (table, gate), lambdas
        self.windows, self.qk_scale = c.layer_windows(), c.qk_scale
        self.value_embeds = [(cast(model.value_embeds[str(i)].weight), cast(block.attn.ve_gate.weight))
                             if c.has_value_embed(i) else None for i, block in enumerate(model.transformer.h)]
        self.lambdas = list(zip(cast(model.resid_lambdas), cast(model.x0_lambdas))) if c.lambdas else None
        self.smear = (cast(model.smear_gate.weight), cast(model.smear_lambda)) if c.smear else None
        self.backout = (c.n_layer // 2, cast(model.backout_lambda)) if c.backout else None
        self.versions = model._weight_versions()
        self.linear = F.linear
        if packed and packed_linear(wte):
            self.layers = [tuple(torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in layer)
                           for layer in self.layers]
            self.lm_head = torch.ops.mkldnn._reorder_linear_weight(self.lm_head, 1)
            self.linear = _mkldnn_linear

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a step reads (the compiled step marks them static for CUDA graphs)."""
        out = [t for layer in self.layers for t in layer] + [self.wte_normed, self.lm_head, self.cos2, self.sin2]
        out += [t for ve in self.value_embeds if ve is not None for t in ve]
        out += [t for pair in self.lambdas or [] for t in pair]
        out += list(self.smear or []) + ([self.backout[1]] if self.backout else [])
        return out

    def __deepcopy__(self, memo):  # prepacked oneDNN tensors cannot be copied: a copied model rebuilds
        return None


def decode_forward(w: DecodeWeights, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, end: int, masked: bool, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """One token for each of B rows: ids (B,) at positions pos (B,), long. k_cache, v_cache
    (n_layer, >=B, H_kv, T_max, D) get this step's keys and values at pos (and `tokens` (>=B,
    T_max), the cache's token record, gets ids, for smear); each row attends to its first end
    positions, and with `masked` only to those <= its own position (rows at different positions);
    without, every row must be at position end - 1. Returns fp32 softcapped logits (B, V). Static
    shapes for fixed (B, end): what the compiled / CUDA-graph path captures. RoPE and QK-norm run
    in fp32, the matmuls in w.dtype, attention in the cache's dtype. On a CPU a step is mostly the
    ~30 Python-level torch calls per layer (a few µs each: a width-8 model decodes at ~1 ms per
    step there), so this counts calls: views are taken once per step, not per layer, and casts
    that would be no-ops are skipped."""
    B, n_layer, T_max = ids.size(0), k_cache.size(0), k_cache.size(3)
    H, Hkv, D = w.n_head, w.n_kv_head, w.head_dim
    linear, cdtype = w.linear, k_cache.dtype
    cos, sin = w.cos2[pos].unsqueeze(1), w.sin2[pos].unsqueeze(1)  # (B, 1, D)
    # Row b, kv head h writes its key at row (b·H_kv + h)·T_max + pos[b] of a layer's (rows·H_kv·T_max, D) view.
    slots = torch.arange(B * Hkv, device=ids.device).mul_(T_max).add_(pos.repeat_interleave(Hkv))
    k_rows, v_rows = k_cache.view(n_layer, -1, D).unbind(0), v_cache.view(n_layer, -1, D).unbind(0)
    keys, values = k_cache[:, :B, :, :end].unbind(0), v_cache[:, :B, :, :end].unbind(0)
    masks = {}  # per window: (B, 1, 1, end), row b sees keys up to its own position (and within its window)
    for window in set(w.windows):
        if masked or (window is not None and end - 1 > window):
            masks[window] = window_mask(pos.unsqueeze(1), end, window).view(B, 1, 1, end)
    x = w.wte_normed[ids]  # norm(embedding), precomputed per token
    if w.smear is not None:  # blend in the previous token's normalized embedding (none at position 0)
        gate_w, lam = w.smear
        rows = torch.arange(B, device=ids.device)
        tokens[rows, pos] = ids
        prev = w.wte_normed[tokens[rows, (pos - 1).clamp(min=0)]]
        x = x + lam * torch.sigmoid(F.linear(x[:, :SMEAR_CHANNELS], gate_w)) * prev * (pos > 0).unsqueeze(1).to(x.dtype)
    x0, mid = x, None
    for i, (w_qkv, w_o, w_fc, w_proj) in enumerate(w.layers):
        if w.lambdas is not None:
            x = w.lambdas[i][0] * x + w.lambdas[i][1] * x0
        xn = F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)
        qkv = linear(xn, w_qkv)
        if qkv.dtype != torch.float32:
            qkv = qkv.float()
        qkv = qkv.view(B, -1, D)  # (B, H + 2·H_kv, D): q heads, k heads, v heads
        qk = qkv[:, :H + Hkv]
        swapped = qk.unflatten(2, (2, D // 2)).flip(2).flatten(2)
        qk = F.rms_norm(torch.addcmul(qk * cos, swapped, sin), (D,), eps=RMS_EPS)  # RoPE, then QK-norm
        if w.qk_scale != 1.0:
            qk = qk * w.qk_scale
        v = qkv[:, H + Hkv:]
        if w.value_embeds[i] is not None:  # value embedding, gated per kv head in (0, 3)
            table, gate_w = w.value_embeds[i]
            gate = 3 * torch.sigmoid(F.linear(xn[:, :VE_GATE_CHANNELS], gate_w).float())
            v = v + gate.unsqueeze(-1) * table[ids].view(B, Hkv, D)
        if qk.dtype != cdtype:  # a bf16 cache (GPUs)
            qk, v = qk.to(cdtype), v.to(cdtype)
        k_rows[i].index_copy_(0, slots, qk[:, H:].reshape(-1, D))
        v_rows[i].index_copy_(0, slots, v.reshape(-1, D))
        y = F.scaled_dot_product_attention(qk[:, :H].unsqueeze(2), keys[i], values[i],
                                           attn_mask=masks.get(w.windows[i]), enable_gqa=H != Hkv).reshape(B, -1)
        if y.dtype != w.dtype:
            y = y.to(w.dtype)
        x = x + linear(y, w_o)
        x = x + linear(F.relu(linear(F.rms_norm(x, (x.size(-1),), eps=RMS_EPS), w_fc)).square_(), w_proj)
        if w.backout is not None and i == w.backout[0]:
            mid = x
    if mid is not None:
        x = x - w.backout[1] * mid
    logits = linear(F.rms_norm(x, (x.size(-1),), eps=RMS_EPS), w.lm_head).float()
    return logits.div_(SOFTCAP).tanh_().mul_(SOFTCAP)


def _bucket(n: int, cap: int, floor: int = 1) -> int:
    """The next power of two >= n (at least floor), capped at cap."""
    b = floor
    while b < n:
        b *= 2
    return min(b, cap)


class CompiledDecode:
    """decode_forward compiled with static shapes, one graph per (rows, cache length) bucket:
    rows padded to a power of two (the padding rows write into free cache rows at position 0, which
    a later load_row overwrites), attention over a power-of-two prefix (>= 64) of the cache with a
    per-row mask. On CUDA mode "reduce-overhead" captures each bucket as a CUDA graph (the step's
    inputs are copied into static buffers; the cache and weights are marked static). Anything that
    fails to compile falls back to the eager step, once and for good (`self.failed`).

        compiled = CompiledDecode(mode="reduce-overhead")          # CUDA (Engine/Scheduler default)
        compiled = CompiledDecode(backend="aot_eager")             # CPU tests
        logits = model.decode_step(ids, cache, compiled=compiled)
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, min_len: int = 64):
        self.fn = torch.compile(decode_forward, backend=backend, mode=mode, dynamic=False, fullgraph=True)
        self.min_len = min_len
        self.failed: Exception | None = None
        # id -> weak reference: the reference tells a live tensor from a new one that reuses a freed
        # one's id. (A WeakSet would compare tensors with ==, which raises for a tensor.)
        self._static: dict[int, weakref.ref] = {}

    def _mark_static(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            ref = self._static.get(id(t))
            if t.is_cuda and (ref is None or ref() is not t):
                torch._dynamo.mark_static_address(t)
                self._static[id(t)] = weakref.ref(t)

    def __call__(self, w: DecodeWeights, ids: torch.Tensor, lengths: list[int], cache: "RowKVCache",
                 end: int) -> torch.Tensor:
        B, max_rows = ids.size(0), cache.k.size(1)
        pos = torch.tensor(lengths, device=ids.device)
        if self.failed is None:
            try:
                Bb = _bucket(B, max_rows)
                Lb = _bucket(end, cache.max_len, self.min_len)
                if Bb > B:
                    ids = torch.cat([ids, ids.new_zeros(Bb - B)])
                    pos = torch.cat([pos, pos.new_zeros(Bb - B)])
                self._mark_static(cache.k, cache.v, cache.tokens, *w.tensors())
                return self.fn(w, ids, pos, cache.k, cache.v, Lb, True, cache.tokens)[:B].clone()
            except Exception as e:  # no compiler on this machine, an unsupported op: stay eager
                self.failed = e
                ids = ids[:B]
                pos = pos[:B]
        return decode_forward(w, ids, pos, cache.k, cache.v, end, True, cache.tokens)


class CompiledPrefill:
    """A prompt's forward pass compiled with static shapes, one graph per power-of-two length (>=
    min_len, at most the model's context). The prompt is padded on the right: causal attention never
    lets a real position see the padding, and the returned cache ends at the prompt (pos = its
    length), so the padding's keys are overwritten by the tokens decoded there. Only the last real
    position's logits are computed. No CUDA graphs: a prefill writes a fresh cache each time and is
    long enough to keep a GPU busy without them. The first failure falls back to eager for good
    (`self.failed`, and the call returns None).

        out = CompiledPrefill(backend="aot_eager")(model, tokens, cache_dtype)  # (logits (1, V), KVCache) or None
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, min_len: int = 64):
        self.fn = torch.compile(self._forward, backend=backend, mode=mode, dynamic=False)
        self.min_len = min_len
        self.failed: Exception | None = None

    @staticmethod
    def _forward(model: "GPT", ids: torch.Tensor, last: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return model.logits(model.trunk(ids, cache).index_select(1, last))[:, 0]

    def __call__(self, model: "GPT", tokens: list[int], dtype: torch.dtype):
        n, limit = len(tokens), model.config.sequence_len
        if self.failed is not None or not 0 < n <= limit:
            return None
        device = model.lm_head.weight.device
        length = _bucket(n, limit, min(self.min_len, limit))
        cache = KVCache(model.config, 1, length, device, dtype)
        ids = torch.tensor([tokens + [0] * (length - n)], dtype=torch.long, device=device)
        last = torch.tensor([n - 1], device=device)
        try:
            with torch.inference_mode():  # as Engine.prefill: no autograd graph to trace
                logits = self.fn(model, ids, last, cache)
        except Exception as e:  # no compiler here, an unsupported op: eager from now on
            self.failed = e
            return None
        cache.pos = n
        return logits, cache


VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24    # the smear gate reads the first 24 channels of the token's embedding


def window_mask(q_pos: torch.Tensor, end: int, window: int | None) -> torch.Tensor:
    """(..., T, end) bool, True = visible: key j is visible to the query at position p when
    j <= p and, for a windowed layer, p - j <= window (the token itself and `window` before it)."""
    keys = torch.arange(end, device=q_pos.device)
    p = q_pos.unsqueeze(-1)
    mask = keys <= p
    if window is not None:
        mask &= keys >= p - window
    return mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head (GQA)"
        self.window = config.layer_windows()[layer_idx]
        self.qk_scale = config.qk_scale
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        if config.has_value_embed(layer_idx):
            self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head)

    def forward(self, x, ve, cos, sin, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding, scaled per head by a gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = rotary_norm(q, cos, sin), rotary_norm(k, cos, sin)  # RoPE first, then QK-norm
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = self.attend(q, k, v, kv_cache)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)

    def attend(self, q, k, v, kv_cache):
        """Causal attention of q (B, H, T, D) over this forward's keys and, with a cache, the cached
        ones; a windowed layer sees only its last `window` positions and itself."""
        T, window, gqa = q.size(2), self.window, self.n_kv_head != self.n_head
        if isinstance(kv_cache, RowKVCache):  # each row at its own position
            k, v, mask = kv_cache.insert(self.layer_idx, k, v, window)
            if T == 1 and prefer_decode_attention(q):
                return decode_attention(q, k, v, mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        prefix = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        if window is not None and prefix + T - 1 <= window:
            window = None  # every query sees all of its past anyway
        if window is None and prefix == 0:  # a whole sequence or a fresh prompt
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if window is None and T == 1:  # one new token sees everything cached
            if prefer_decode_attention(q):
                return decode_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        # a chunk after a prefix, or a windowed layer: an explicit mask
        mask = window_mask(torch.arange(prefix, prefix + T, device=q.device), prefix + T, window)
        if T == 1 and prefer_decode_attention(q):
            return decode_attention(q, k, v, mask.view(1, 1, T, -1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The model

SOFTCAP = 15.0  # logits = 15·tanh(logits/15) (docs/DESIGN.md#model)
ROPE_BASE = 10_000


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        # The 2026 parts, present only when switched on (their names are nanochat HEAD's, so its
        # checkpoints map over one to one).
        kv_dim = config.n_kv_head * config.head_dim
        if config.value_embeds:
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                               for i in range(config.n_layer) if config.has_value_embed(i)})
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = Linear(SMEAR_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # RoPE tables for 10x the training length, so decoding past it keeps working.
        self.rotary_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length: int, device=None):
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """config.init "seed" (docs/DESIGN.md#initialization): Linear ~ N(0, 1/√fan_in · min(1,
        √(fan_out/fan_in))); the head and both output projections zero (each block starts as the
        identity); embedding ~ N(0, 1). "2026": q, k, v ~ U(±√3/√d) (the same std, no outliers),
        c_fc at 0.4× that, projections zero, embedding ~ N(0, 0.8), head ~ N(0, 0.001). The 2026
        parts start the same under either: value embeddings ~ U(±√3/√d), their gates and the smear
        gate ~ U(0, 0.02), smear off (λ 0), backout λ 0.2, resid λ 1.15 → 1.05 and x0 λ
        0.20 → 0.05 from the first layer to the last."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        c = self.config
        s = math.sqrt(3.0 / c.n_embd)
        blocks = self.transformer.h
        if c.init == "seed":  # every module in order, as the seed did (same draws, same models)
            for module in self.modules():
                if isinstance(module, Linear):
                    fan_out, fan_in = module.weight.shape
                    std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                    module.weight.normal_(0.0, std, generator=gen)
                elif isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, 1.0, generator=gen)
            self.lm_head.weight.zero_()
        else:
            for block in blocks:
                for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
                    w.uniform_(-s, s, generator=gen)
                block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s, generator=gen)
            self.transformer.wte.weight.normal_(0.0, 0.8, generator=gen)
            self.lm_head.weight.normal_(0.0, 0.001, generator=gen)
        for block in blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if hasattr(block.attn, "ve_gate"):
                block.attn.ve_gate.weight.uniform_(0.0, 0.02, generator=gen)
        if c.value_embeds:
            for table in self.value_embeds.values():
                table.weight.uniform_(-s, s, generator=gen)
        if c.lambdas:
            depth = torch.arange(c.n_layer, dtype=torch.float32) / max(c.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        if c.smear:
            self.smear_gate.weight.uniform_(0.0, 0.02, generator=gen)
            self.smear_lambda.zero_()
        if c.backout:
            self.backout_lambda.fill_(0.2)
        cos, sin = self._rotary_tables(self.rotary_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # --- accounting -----------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self) -> int:
        """Weights that take part in a matmul: every Linear (blocks, gates, head); not the
        embedding tables (lookups) nor the scalar lambdas."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))

    def scaling_params(self) -> int:
        """What the horizon rule counts (nanochat HEAD's 'Kaplan-style' count): the block
        matrices plus the head."""
        return sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matmul weight (matmul_params) plus the attention score
        and value matmuls, 12·H·D·(keys seen) per layer, where a windowed layer sees at most its
        window (PaLM appendix B). For the seed architecture: 6·(params − embedding) + 12·L·H·D·T."""
        c = self.config
        seen = sum(c.sequence_len if w is None else min(w, c.sequence_len) for w in c.layer_windows())
        return 6 * self.matmul_params() + 12 * c.n_head * c.head_dim * seen

    def setup_optimizer(self, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                        matrix_lr: float = 0.02, weight_decay: float = 0.0, scalar_lr: float = 0.5,
                        lr_scale: float = 1.0, adam: dict | None = None, muon: dict | None = None,
                        lr_frac: float = 1.0):
        """AdamW for the embeddings, the head and the scalars, Muon for every block matrix
        (docs/DESIGN.md#optimizer). AdamW LRs were tuned at width 768 and scale as (d/768)^-0.5;
        `lr_scale` multiplies every LR but the smear/backout group's (the batch-size correction);
        `lr_frac` every LR (a finetuning stage's --init-lr-frac, applied by the caller to the first
        three rates it passes, and here to the rates it does not: scalars, value embeddings, smear).
        `adam` overrides the head's and embedding's settings per group ({"lm_head": {...},
        "wte": {...}}: betas, weight_decay), `muon` adds options to the Muon group (momentum,
        ortho, normuon, weight_decay, ...). The 2026 parts get nanochat HEAD's groups: value
        embeddings at half the embedding LR, resid λ at 0.01·scalar_lr, x0 λ at scalar_lr with
        beta1 0.96, smear and backout at a fixed 0.2."""
        from picochat.optim import MuonAdamW
        c, adam = self.config, adam or {}
        scale = (c.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        group = lambda params, lr, name="", **kw: dict(params=params, lr=lr, **{**adamw, **kw, **adam.get(name, {})})  # noqa: E731
        groups = [
            group([self.lm_head.weight], unembedding_lr * scale * lr_scale, "lm_head"),
            group([self.transformer.wte.weight], embedding_lr * scale * lr_scale, "wte"),
            dict(kind="muon", params=list(self.transformer.h.parameters()), lr=matrix_lr * lr_scale,
                 momentum=0.95, nesterov=True, ns_steps=5, **(muon or {})),
        ]
        if c.value_embeds:  # embedding_lr already carries lr_frac
            groups.append(group(list(self.value_embeds.parameters()), 0.5 * embedding_lr * scale * lr_scale,
                                "value_embeds", betas=(0.8, 0.995), weight_decay=0.01))
        if c.lambdas:
            groups.append(group([self.resid_lambdas], 0.01 * scalar_lr * lr_scale * lr_frac, weight_decay=0.05))
            groups.append(group([self.x0_lambdas], scalar_lr * lr_scale * lr_frac, betas=(0.96, 0.95),
                                weight_decay=0.0))
        fixed = ([self.smear_gate.weight, self.smear_lambda] if c.smear else []) + \
            ([self.backout_lambda] if c.backout else [])
        if fixed:
            groups.append(group(fixed, 0.2 * lr_frac, weight_decay=0.0))
        return MuonAdamW(groups)

    # --- forward --------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean"):
        """idx (B, T) → loss if targets are given, else fp32 logits (B, T, V)."""
        x = self.trunk(idx, kv_cache)
        if targets is None:
            return self.logits(x)
        return head_loss(x, self.lm_head.weight, targets, loss_reduction)

    def trunk(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Everything but the head: the final normalized hidden states (B, T, d). This is the
        part base_train compiles; the head loss stays eager (it is already one fused pass)."""
        c, B, T = self.config, *idx.shape
        pos = None
        if kv_cache is not None:  # each row's positions: (1, T) for a KVCache, (B, T) for a RowKVCache
            pos = kv_cache.positions(T)
            end = kv_cache.end if isinstance(kv_cache, RowKVCache) else kv_cache.pos + T
            self._check_length(end)
            cos, sin = self.cos[0, pos], self.sin[0, pos]  # (B or 1, T, 1, D/2)
        else:
            self._check_length(T)
            cos, sin = self.cos[:, :T], self.sin[:, :T]  # (1, T, 1, D/2)
        cos, sin = cos.to(self.compute_dtype), sin.to(self.compute_dtype)
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        if c.smear:
            x = self.smear(x, idx, kv_cache, pos)
        x0, mid = x, None
        for i, block in enumerate(self.transformer.h):
            if c.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if c.has_value_embed(i) else None
            x = block(x, ve, cos, sin, kv_cache)
            if c.backout and i == c.n_layer // 2:
                mid = x
        if mid is not None:  # take out part of the middle layer's residual before the head
            x = x - self.backout_lambda.to(x.dtype) * mid
        return norm(x)

    def smear(self, x: torch.Tensor, idx: torch.Tensor, kv_cache, pos) -> torch.Tensor:
        """x_t + λ·sigmoid(w·x_t[:24])·x_{t−1}: a gated blend of the previous token's normalized
        embedding into each token's own (none at position 0). With a cache the predecessor of the
        first new token comes from the cache's token record."""
        gate = lambda x: self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # noqa: E731
        if kv_cache is None:
            return torch.cat([x[:, :1], x[:, 1:] + gate(x[:, 1:]) * x[:, :-1]], dim=1)
        prev = norm(self.transformer.wte(kv_cache.previous_tokens(idx, pos)).to(x.dtype))
        return x + gate(x) * prev * (pos > 0).unsqueeze(-1).to(x.dtype)

    # --- inference ----------------------------------------------------------------------

    @torch.no_grad()
    def prepare_for_inference(self) -> "GPT":
        """Cast the fp32 master weights to compute_dtype once, for a model that will only run
        (picochat.checkpoint.load_model's, in chat and serve): every Linear then skips its per-call
        cast, and the weights take half the memory in bf16. Irreversible: never call it on a model
        you train (it refuses one in training mode). Returns the model."""
        if self.training:
            raise RuntimeError("prepare_for_inference casts the master weights: call it only on an "
                               "inference model in eval mode, never on one being trained")
        self.requires_grad_(False)
        for p in self.parameters():
            p.data = p.data.to(self.compute_dtype)
        self._decode_weights = None
        self.prepared = True  # weights frozen: decode_weights stops checking them for changes
        return self

    @torch.inference_mode()
    def decode_step(self, ids: torch.Tensor, cache: "RowKVCache", masked: bool = True,
                    compiled: "CompiledDecode | None" = None) -> torch.Tensor:
        """One token for each of the first ids.size(0) rows of `cache`, each at its own length
        (the fast path of forward(ids[:, None], kv_cache=cache)[:, -1]): fp32 logits (B, V).
        masked=False when every row is at the same length (Engine): no mask is built. `compiled`
        runs the step through a CompiledDecode (static shapes, CUDA graphs on CUDA). Inference
        mode, not just no_grad: it skips autograd's bookkeeping on each of the ~100 small ops."""
        rows = ids.size(0)
        if getattr(self.forward, "__func__", None) is not GPT.forward:  # a forward of its own (tests): use it
            cache.rows = rows
            return self(ids.unsqueeze(1), kv_cache=cache)[:, -1, :]
        lengths = cache.lengths[:rows]
        end = max(lengths) + 1
        if end > cache.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {cache.max_len} allocated")
        self._check_length(end)
        if compiled is not None:
            logits = compiled(self.decode_weights(packed=False), ids, lengths, cache, end)
        else:
            if masked or min(lengths) != end - 1:
                pos, masked = torch.tensor(lengths, device=ids.device), True
            else:
                pos = torch.full((rows,), end - 1, dtype=torch.long, device=ids.device)
            logits = decode_forward(self.decode_weights(), ids, pos, cache.k, cache.v, end, masked, cache.tokens)
        cache.lengths[:rows] = [n + 1 for n in lengths]
        return logits

    def _weight_versions(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def decode_weights(self, packed: bool = True) -> "DecodeWeights":
        """The weights arranged for decode_forward in compute_dtype (prepacked for eager CPU
        matmuls unless packed=False), built once and rebuilt only when a parameter changed (in
        place: an optimizer step, load_state_dict)."""
        cached = getattr(self, "_decode_weights", None) or {}
        w = cached.get(packed)
        if w is None or w.dtype != self.compute_dtype or (
                not getattr(self, "prepared", False) and w.versions != self._weight_versions()):
            w = DecodeWeights(self, self.compute_dtype, packed)
            self._decode_weights = {packed: w}  # one layout at a time: a model decodes one way
        return w

    def _check_length(self, end: int) -> None:
        if end > self.rotary_len:
            raise ValueError(f"sequence of {end} tokens exceeds the rotary table ({self.rotary_len})")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Softcapped fp32 logits of final hidden states (any leading shape)."""
        logits = self.lm_head(x).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)


# -----------------------------------------------------------------------------
# Loss: head + softcap + cross-entropy

def reference_head_loss(x: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """The slow, obvious version: full fp32 logits, softcap, F.cross_entropy (ignore_index -1)."""
    logits = F.linear(x.reshape(-1, x.size(-1)), head_weight.to(x.dtype)).float()
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1, reduction=reduction)


def _chunk_loss_and_grad(xc: torch.Tensor, w: torch.Tensor, tc: torch.Tensor):
    """One chunk of rows of the fused head: (summed loss in fp32, d(loss)/d(logits) in x's dtype).
    Rows whose target is -1 add no loss; their logit gradient is left as is and masked by the
    caller on the (rows, d) side, which is V/d times cheaper. Written as in-place steps on
    chunk-sized buffers: few passes over memory eagerly, and one fused kernel or two compiled."""
    valid = (tc != -1).unsqueeze(1)
    tanh = F.linear(xc, w).float().div_(SOFTCAP).tanh_()
    logits = tanh * SOFTCAP
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    tgt = tc.clamp(min=0).unsqueeze(1)
    loss = ((lse - logits.gather(1, tgt)) * valid).sum()
    # d(loss)/d(logits) = softmax − one-hot, then through the softcap: × (1 − tanh²)
    g = logits.sub_(lse).exp_()
    g.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=g.dtype))
    g.addcmul_(g, tanh.square_(), value=-1)
    return loss, g.to(xc.dtype)


_compiled_chunk = None


def compiled_chunk_fn():
    """_chunk_loss_and_grad under torch.compile, built once (for CUDA: the ~10 elementwise fp32
    passes over each chunk's logits become one or two kernels)."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk


class FusedHeadLoss(torch.autograd.Function):
    """Head matmul, softcap and cross-entropy over chunks of rows, with the gradients computed in
    the same pass. The (B·T, V) fp32 logits never exist all at once and nothing is recomputed:
    backward only scales the stored input and weight gradients. Agrees with reference_head_loss
    (tests/test_model.py). No host synchronization: the valid-row count stays on the device."""

    @staticmethod
    def forward(ctx, x, weight, targets, reduction: str, chunk_rows: int, chunk_fn):
        w = weight.to(x.dtype)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for i in range(0, x.size(0), chunk_rows):
            xc, tc = x[i:i + chunk_rows], targets[i:i + chunk_rows]
            loss, g = chunk_fn(xc, w, tc)
            total += loss
            keep = (tc != -1).unsqueeze(1).to(x.dtype)  # ignored rows get no gradient
            torch.mul(g @ w, keep, out=grad_x[i:i + chunk_rows])
            grad_w += (g.t() @ (xc * keep)).float()
        if reduction == "mean":
            scale = 1.0 / (targets != -1).sum().clamp(min=1).float()
        else:
            scale = torch.ones((), device=x.device)
        ctx.save_for_backward(grad_x, grad_w, scale)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, scale = ctx.saved_tensors
        s = grad_out * scale
        return (grad_x * s.to(grad_x.dtype)), (grad_w * s).to(ctx.weight_dtype), None, None, None, None


def chunked_row_losses(x: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int) -> torch.Tensor:
    """Per-row cross-entropy (0 where the target is -1) without gradients, chunk by chunk: what
    evaluation needs, in chunk_rows × V of logits instead of (B·T) × V (at d20, batch 32 and
    vocab 65,536 the full fp32 logits alone would be 17 GiB)."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    w = head_weight.to(x.dtype)
    out = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    for i in range(0, x.size(0), chunk_rows):
        logits = F.linear(x[i:i + chunk_rows], w).float().div_(SOFTCAP).tanh_().mul_(SOFTCAP)
        out[i:i + chunk_rows] = F.cross_entropy(logits, targets[i:i + chunk_rows], ignore_index=-1,
                                                reduction="none")
    return out


def head_chunk_rows(device: torch.device | str) -> int:
    """Rows of the head per chunk. 512 was fastest on the dev CPU (benchmarks/train_throughput.py;
    docs/LOG.md). On GPUs bigger chunks mean fewer, fuller kernels; 4096 rows at vocab 65,536 is
    1 GiB of fp32 logits per buffer (benchmarks/gpu_check.py times the alternatives)."""
    return 4096 if torch.device(device).type == "cuda" else 512


def head_loss(x: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
              reduction: str = "mean", chunk_rows: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Cross-entropy of the softcapped head, never materializing the full logits: the fused
    chunked path when training, chunked per-row losses under no_grad (evaluation). `compiled`
    compiles each chunk's elementwise work (used on CUDA with --compile). reduction "none" with
    gradients enabled falls back to the reference (nothing in training needs it)."""
    chunk_rows = chunk_rows or head_chunk_rows(x.device)
    if not torch.is_grad_enabled():
        rows = chunked_row_losses(x, head_weight, targets, chunk_rows)
        if reduction == "none":
            return rows
        total = rows.sum()
        return total / (targets != -1).sum().clamp(min=1) if reduction == "mean" else total
    if reduction == "none":
        return reference_head_loss(x, head_weight, targets, reduction)
    chunk_fn = compiled_chunk_fn() if compiled else _chunk_loss_and_grad
    x = x.reshape(-1, x.size(-1))
    return FusedHeadLoss.apply(x, head_weight, targets.reshape(-1), reduction, chunk_rows, chunk_fn)
