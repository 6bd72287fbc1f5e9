"""
The GPT (nanochat's seed architecture, docs/DESIGN.md#model), in one file:

- pre-norm residual blocks with a parameter-free RMSNorm (after the embedding, before attention and
  MLP, before the head, and on q and k per head: QK-norm);
- rotary position embeddings (base 10,000, half-split convention), no position table;
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

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# The one dial's constants (nanochat's seed values): width per layer, and the head dimension that
# the width is rounded up to. base_train's --aspect-ratio, --head-dim and --max-seq-len default to these.
ASPECT_RATIO = 64
HEAD_DIM = 128
SEQUENCE_LEN = 2048


def config_from_depth(depth: int, vocab_size: int = 65536, sequence_len: int = SEQUENCE_LEN,
                      aspect_ratio: int = ASPECT_RATIO, head_dim: int = HEAD_DIM) -> GPTConfig:
    """Width = aspect_ratio·depth rounded up to a multiple of head_dim, so every depth works
    (d5: 320 → 384, 3 heads); heads = width / head_dim (docs/DESIGN.md#model)."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ValueError(f"depth, aspect ratio and head dim must be positive, got {depth}, {aspect_ratio}, {head_dim}")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd)


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
    """Preallocated keys and values for every layer: (n_layer, B, H_kv, T_max, D).

    Layers write their new keys/values at [pos, pos+T); `pos` advances once the last layer is done.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        self.n_layer = config.n_layer

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
    Keys and values (n_layer, max_rows, H_kv, T_max, D) and a per-row length.

    A forward uses the first `rows` rows (the server keeps its active requests at the front; see
    move_row), writes each row's new keys at that row's own length, and attends through a per-row
    mask that hides everything past it. Rows at equal lengths give what KVCache gives (tests)."""

    def __init__(self, config: GPTConfig, max_rows: int, max_len: int, device, dtype):
        shape = (config.n_layer, max_rows, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
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
        # query t of row b sees the keys up to its own position: (rows, 1, T, end)
        self._mask = (torch.arange(self.end, device=self.k.device) <= self._pos.unsqueeze(-1)).unsqueeze(1)
        return self._pos

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (rows, H_kv, T, D) at each row's positions; return this layer's keys, values
        and the attention mask."""
        pos, rows = self._pos, torch.arange(self.rows, device=k.device).unsqueeze(1)
        self.k[layer, rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # (rows, T) index -> (rows, T, H_kv, D)
        self.v[layer, rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        if layer == self.n_layer - 1:
            self.lengths[:self.rows] = [n + k.size(2) for n in self.lengths[:self.rows]]
        keys, values = self.k[layer, :self.rows, :, :self.end], self.v[layer, :self.rows, :, :self.end]
        return keys.to(k.dtype), values.to(v.dtype), self._mask  # (an fp32 cache of a bf16 model: kv_cache_dtype)

    def load_row(self, row: int, prefill: "KVCache") -> None:
        """Copy a batch-1 cache (a prompt prefilled alone) into `row`."""
        n = prefill.pos
        if n > self.max_len:
            raise RuntimeError(f"a prefix of {n} tokens does not fit a cache of {self.max_len}")
        self.k[:, row, :, :n] = prefill.k[:, 0, :, :n]
        self.v[:, row, :, :n] = prefill.v[:, 0, :, :n]
        self.lengths[row] = n

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src over row dst (to fill a hole left by a finished request)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
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
        self.versions = model._weight_versions()
        self.linear = F.linear
        if packed and packed_linear(wte):
            self.layers = [tuple(torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in layer)
                           for layer in self.layers]
            self.lm_head = torch.ops.mkldnn._reorder_linear_weight(self.lm_head, 1)
            self.linear = _mkldnn_linear

    def __deepcopy__(self, memo):  # prepacked oneDNN tensors cannot be copied: a copied model rebuilds
        return None


def decode_forward(w: DecodeWeights, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, end: int, masked: bool) -> torch.Tensor:
    """One token for each of B rows: ids (B,) at positions pos (B,), long. k_cache, v_cache
    (n_layer, >=B, H_kv, T_max, D) get this step's keys and values at pos; each row attends to
    its first end positions, and with `masked` only to those <= its own position (rows at
    different positions); without, every row must be at position end - 1. Returns fp32 softcapped
    logits (B, V). Static shapes for fixed (B, end): what the compiled / CUDA-graph path captures.
    RoPE and QK-norm run in fp32, the matmuls in w.dtype, attention in the cache's dtype. On a CPU
    a step is mostly the ~30 Python-level torch calls per layer (a few µs each: a width-8 model
    decodes at ~1 ms per step there), so this counts calls: views are taken once per step, not
    per layer, and casts that would be no-ops are skipped."""
    B, n_layer, T_max = ids.size(0), k_cache.size(0), k_cache.size(3)
    H, Hkv, D = w.n_head, w.n_kv_head, w.head_dim
    linear, cdtype = w.linear, k_cache.dtype
    cos, sin = w.cos2[pos].unsqueeze(1), w.sin2[pos].unsqueeze(1)  # (B, 1, D)
    # Row b, kv head h writes its key at row (b·H_kv + h)·T_max + pos[b] of a layer's (rows·H_kv·T_max, D) view.
    slots = torch.arange(B * Hkv, device=ids.device).mul_(T_max).add_(pos.repeat_interleave(Hkv))
    k_rows, v_rows = k_cache.view(n_layer, -1, D).unbind(0), v_cache.view(n_layer, -1, D).unbind(0)
    keys, values = k_cache[:, :B, :, :end].unbind(0), v_cache[:, :B, :, :end].unbind(0)
    mask = None
    if masked:  # (B, 1, 1, end): row b sees keys up to its own position
        mask = (torch.arange(end, device=ids.device) <= pos.unsqueeze(1)).view(B, 1, 1, end)
    x = w.wte_normed[ids]  # norm(embedding), precomputed per token
    for i, (w_qkv, w_o, w_fc, w_proj) in enumerate(w.layers):
        qkv = linear(F.rms_norm(x, (x.size(-1),), eps=RMS_EPS), w_qkv)
        if qkv.dtype != torch.float32:
            qkv = qkv.float()
        qkv = qkv.view(B, -1, D)  # (B, H + 2·H_kv, D): q heads, k heads, v heads
        qk = qkv[:, :H + Hkv]
        swapped = qk.unflatten(2, (2, D // 2)).flip(2).flatten(2)
        qk = F.rms_norm(torch.addcmul(qk * cos, swapped, sin), (D,), eps=RMS_EPS)  # RoPE, then QK-norm
        v = qkv[:, H + Hkv:]
        if qk.dtype != cdtype:  # a bf16 cache (GPUs)
            qk, v = qk.to(cdtype), v.to(cdtype)
        k_rows[i].index_copy_(0, slots, qk[:, H:].reshape(-1, D))
        v_rows[i].index_copy_(0, slots, v.reshape(-1, D))
        y = F.scaled_dot_product_attention(qk[:, :H].unsqueeze(2), keys[i], values[i], attn_mask=mask,
                                           enable_gqa=H != Hkv).reshape(B, -1)
        if y.dtype != w.dtype:
            y = y.to(w.dtype)
        x = x + linear(y, w_o)
        x = x + linear(F.relu(linear(F.rms_norm(x, (x.size(-1),), eps=RMS_EPS), w_fc)).square_(), w_proj)
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
        self._static = weakref.WeakSet()  # not ids: a freed tensor's id can come back on a new one

    def _mark_static(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.is_cuda and t not in self._static:
                torch._dynamo.mark_static_address(t)
                self._static.add(t)

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
                self._mark_static(cache.k, cache.v, w.wte_normed, w.lm_head, w.cos2, w.sin2,
                                  *(t for layer in w.layers for t in layer))
                return self.fn(w, ids, pos, cache.k, cache.v, Lb, True)[:B].clone()
            except Exception as e:  # no compiler on this machine, an unsupported op: stay eager
                self.failed = e
                ids = ids[:B]
                pos = pos[:B]
        return decode_forward(w, ids, pos, cache.k, cache.v, end, True)


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head (GQA)"
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, cos, sin, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = rotary_norm(q, cos, sin), rotary_norm(k, cos, sin)  # RoPE first, then QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(kv_cache, RowKVCache):  # each row at its own position
            k, v, mask = kv_cache.insert(self.layer_idx, k, v)
            if T == 1 and prefer_decode_attention(q):
                y = decode_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            prefix = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)
            if prefix == 0:  # a fresh prompt: plain causal attention
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif T == 1 and prefer_decode_attention(q):  # one new token sees everything cached
                y = decode_attention(q, k, v)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # a chunk after a prefix: prefix fully visible, causal within the chunk
                mask = torch.ones(T, prefix + T, dtype=torch.bool, device=q.device)
                mask[:, prefix:] = torch.tril(mask[:, prefix:])
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)


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

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
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
        # RoPE tables for 10x the training length, so decoding past it keeps working.
        self.rotary_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length: int, device=None):
        d = self.config.head_dim
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """The seed's init (docs/DESIGN.md#initialization): Linear ~ N(0, 1/√fan_in · min(1,
        √(fan_out/fan_in))); the head and both output projections zero (each block starts as the
        identity); embedding ~ N(0, 1)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for module in self.modules():
            if isinstance(module, Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                module.weight.normal_(0.0, std, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        cos, sin = self._rotary_tables(self.rotary_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # --- accounting -----------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight for every matmul (head included, embedding
        lookup not) plus the attention score and value matmuls, 12·L·H·D·T (PaLM appendix B)."""
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def setup_optimizer(self, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                        matrix_lr: float = 0.02, weight_decay: float = 0.0):
        """AdamW for the embedding and the head, Muon for every block matrix (docs/DESIGN.md#optimizer).
        AdamW LRs were tuned at width 768 and scale as (d/768)^-0.5."""
        from picochat.optim import MuonAdamW
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, **adamw),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale, **adamw),
            dict(kind="muon", params=list(self.transformer.h.parameters()), lr=matrix_lr,
                 momentum=0.95, nesterov=True, ns_steps=5),
        ]
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
        B, T = idx.shape
        if isinstance(kv_cache, RowKVCache):  # each row at its own positions
            pos = kv_cache.positions(T)
            self._check_length(kv_cache.end)
            cos, sin = self.cos[0, pos], self.sin[0, pos]  # (B, T, 1, D/2)
        else:
            t0 = kv_cache.pos if kv_cache is not None else 0
            self._check_length(t0 + T)
            cos, sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]  # (1, T, 1, D/2)
        cos, sin = cos.to(self.compute_dtype), sin.to(self.compute_dtype)
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        return norm(x)

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
            logits = decode_forward(self.decode_weights(), ids, pos, cache.k, cache.v, end, masked)
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
