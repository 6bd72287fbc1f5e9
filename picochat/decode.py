"""
Inference: one cache and one forward for every decode in picochat (docs/DESIGN.md#engine).

- `Cache` holds keys, values and tokens for up to `max_rows` rows, each row at its own length: a
  prompt prefilled alone is a one-row cache, the server's continuous batch is a many-row one, and
  `load_row` / `move_row` move prefixes between them.
- `forward` runs the model over T new tokens of each of the first B rows (T = the prompt for a
  prefill, 1 for a decode step) straight from weights prepared once (`DecodeWeights`: q/k/v as one
  matmul, cast to the compute dtype, prepacked for oneDNN on CPUs) and returns the last position's
  logits. Every recipe part is here once: sliding windows, value embeddings, lambdas, smear, backout.
- `CompiledDecode` / `CompiledPrefill` run the same forward compiled with static shapes (CUDA graphs
  for the step on CUDA), a bounded set of graphs (rows and lengths in power-of-two buckets).

The Engine (picochat/engine.py) owns one of each per model and is the only caller; the Scheduler
(picochat/scheduler.py) is the only decode loop. The slow reference they are tested against is the
model's own training forward over the whole sequence (engine.reference_generate).

    cache = Cache(model.config, max_rows=8, max_len=512, device="cpu", dtype=torch.float32)
    logits = forward(decode_weights(model), ids, pos, cache.k, cache.v, cache.tokens, end, masked=True)
"""
from __future__ import annotations

import threading
import time
import weakref

import torch
import torch.nn.functional as F

from picochat.common import resolve_dtype
from picochat.model import SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig, window_mask
from picochat.ops import RMS_EPS, SOFTCAP


def kv_cache_dtype(compute_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The decode cache's dtype. fp32 on CPUs whatever the weights: torch's bf16 attention for one
    query token is 3-5x slower than fp32 there (d4, 8 rows: 267 vs 45 µs per layer,
    docs/BENCHMARKS.md), and the cache is small next to the weights. The compute dtype elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else compute_dtype


class Cache:
    """Keys and values (n_layer, max_rows, H_kv, max_len, D), the token at each position (max_rows,
    max_len; smear reads each token's predecessor from it) and each row's length, kept on the host
    so that no step waits on the device to read them. A forward uses the first `rows` rows (the
    Scheduler keeps its active rows at the front: see move_row)."""

    def __init__(self, config: GPTConfig, max_rows: int, max_len: int, device, dtype: torch.dtype):
        shape = (config.n_layer, max_rows, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.tokens = torch.zeros(max_rows, max_len, dtype=torch.long, device=device)
        self.lengths = [0] * max_rows
        self.rows = 0
        self.max_len = max_len

    def load_row(self, row: int, src: "Cache", src_row: int = 0) -> None:
        """Copy row src_row of another cache (a prompt prefilled alone) into `row`."""
        n = src.lengths[src_row]
        if n > self.max_len:
            raise RuntimeError(f"a prefix of {n} tokens does not fit a cache of {self.max_len}")
        self.k[:, row, :, :n] = src.k[:, src_row, :, :n]
        self.v[:, row, :, :n] = src.v[:, src_row, :, :n]
        self.tokens[row, :n] = src.tokens[src_row, :n]
        self.lengths[row] = n

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src over row dst (to fill a hole left by a finished request)."""
        self.load_row(dst, self, src)


# --- Weights prepared once -------------------------------------------------------------------


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
    """The model's weights arranged for `forward`, in `dtype`: per layer (w_qkv, w_o, w_fc,
    w_proj), the normalized embedding table, the head, fp32 RoPE tables as (T, D) with the halves'
    signs folded in, and the recipe parts (None where off). `packed`: oneDNN's prepacked layout
    where packed_linear allows (eager CPU; a compiled step needs plain tensors)."""

    def __init__(self, model, dtype: torch.dtype, packed: bool = True):
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
        self.windows, self.qk_scale = c.layer_windows(), c.qk_scale
        self.value_embeds = [(cast(model.value_embeds[str(i)].weight), cast(block.attn.ve_gate.weight))
                             if c.has_value_embed(i) else None for i, block in enumerate(model.transformer.h)]
        self.lambdas = list(zip(cast(model.resid_lambdas), cast(model.x0_lambdas))) if c.lambdas else None
        self.smear = (cast(model.smear_gate.weight), cast(model.smear_lambda)) if c.smear else None
        self.backout = (c.n_layer // 2, cast(model.backout_lambda)) if c.backout else None
        self.versions = weight_versions(model)
        self.prepared = getattr(model, "prepared", False)
        self.linear = F.linear
        if packed and packed_linear(wte):
            self.layers = [tuple(torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in layer)
                           for layer in self.layers]
            self.lm_head = torch.ops.mkldnn._reorder_linear_weight(self.lm_head, 1)
            # (oneDNN's fused matmul + ReLU and matmul + add post-ops measured slower than the two
            # calls here: d4, 8 rows, 60 vs 53 µs per matmul; docs/LOG.md)
            self.linear = _mkldnn_linear

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a step reads (the compiled step marks them static for CUDA graphs)."""
        out = [t for layer in self.layers for t in layer] + [self.wte_normed, self.lm_head, self.cos2, self.sin2]
        out += [t for ve in self.value_embeds if ve is not None for t in ve]
        out += [t for pair in self.lambdas or [] for t in pair]
        return out + list(self.smear or []) + ([self.backout[1]] if self.backout else [])


def weight_versions(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (packed, DecodeWeights)


def decode_weights(model, packed: bool = True) -> DecodeWeights:
    """The model's DecodeWeights in its compute_dtype, built once and rebuilt when a parameter
    changed in place (an optimizer step, load_state_dict: an engine over a model that is still
    being trained, as in RL, never decodes stale weights). Weights built from a model prepared for
    inference (GPT.prepare_for_inference: frozen) are not checked again."""
    packed = packed and packed_linear(model.lm_head.weight.new_empty(0, dtype=model.compute_dtype))
    entry = _WEIGHTS.get(model)  # (packing does not apply on GPUs: there the two layouts are one)
    w = entry[1] if entry is not None and entry[0] == packed else None
    if w is None or w.dtype != model.compute_dtype or not (w.prepared or w.versions == weight_versions(model)):
        w = DecodeWeights(model, model.compute_dtype, packed)
        _WEIGHTS[model] = (packed, w)  # one layout at a time: a model decodes one way
    return w


# --- The forward -----------------------------------------------------------------------------


def forward(w: DecodeWeights, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, tokens: torch.Tensor, end: int, masked: bool,
            last: torch.Tensor | None = None) -> torch.Tensor:
    """T new tokens for each of B rows: ids (B, T), row b's at positions pos[b] .. pos[b] + T - 1
    (pos (B,), long), keys and values written into k_cache, v_cache (n_layer, >= B, H_kv, T_max, D)
    and ids into `tokens` (>= B, T_max); each row attends to the first `end` positions, causally.
    `masked`: rows may be at different positions (a per-row mask in every layer); without it every
    row starts at end - T. Returns fp32 softcapped logits (B, V) of each row's last new token (or of
    position `last` (B,), for a right-padded prefill). Static shapes for fixed (B, T, end), for the
    compiled / CUDA-graph path. RoPE and QK-norm in fp32, matmuls in w.dtype, attention in the
    cache's dtype; positions, slots and masks built once per call (a CPU step is mostly its calls)."""
    B, T = ids.shape
    n_layer, T_max = k_cache.size(0), k_cache.size(3)
    H, Hkv, D = w.n_head, w.n_kv_head, w.head_dim
    linear, cdtype = w.linear, k_cache.dtype
    P = pos.unsqueeze(1) if T == 1 else pos.unsqueeze(1) + torch.arange(T, device=ids.device)  # (B, T)
    flat = P.view(-1)
    cos, sin = w.cos2[flat].unsqueeze(1), w.sin2[flat].unsqueeze(1)  # (B·T, 1, D)
    # Row b's kv head h writes token t's key at row (b·H_kv + h)·T_max + P[b, t] of a layer's
    # (rows·H_kv·T_max, D) view, in the (b, t, h) order of the computed keys.
    slots = (torch.arange(B * Hkv, device=ids.device).mul_(T_max).view(B, 1, Hkv) + P.unsqueeze(2)).view(-1)
    k_rows, v_rows = k_cache.view(n_layer, -1, D).unbind(0), v_cache.view(n_layer, -1, D).unbind(0)
    keys, values = k_cache[:, :B, :, :end].unbind(0), v_cache[:, :B, :, :end].unbind(0)
    masks = {}  # per window: (B, 1, T, end), True = visible
    for window in set(w.windows):
        if masked or (T > 1 and end > T) or (window is not None and end - 1 > window):
            masks[window] = window_mask(P, end, window).unsqueeze(1)
    causal = T > 1  # where no mask was needed: a prefill from position 0 (keys = its own T)
    ids_flat = ids.reshape(-1)
    x = w.wte_normed[ids_flat]  # norm(embedding), precomputed per token: (B·T, d)
    if w.smear is not None:  # blend in the previous token's normalized embedding (none at position 0)
        gate_w, lam = w.smear
        rows = torch.arange(B, device=ids.device).unsqueeze(1)
        tokens[rows, P] = ids
        prev = w.wte_normed[tokens[rows, (P - 1).clamp(min=0)].view(-1)]
        x = x + lam * torch.sigmoid(F.linear(x[:, :SMEAR_CHANNELS], gate_w)) * prev * (flat > 0).unsqueeze(1).to(x.dtype)
    x0, mid = x, None
    for i, (w_qkv, w_o, w_fc, w_proj) in enumerate(w.layers):
        if w.lambdas is not None:
            x = w.lambdas[i][0] * x + w.lambdas[i][1] * x0
        xn = F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)
        qkv = linear(xn, w_qkv)
        if qkv.dtype != torch.float32:
            qkv = qkv.float()
        qkv = qkv.view(B * T, -1, D)  # (B·T, H + 2·H_kv, D): q heads, k heads, v heads
        qk = qkv[:, :H + Hkv]
        swapped = qk.roll(D // 2, -1)  # the two halves of each head swapped
        qk = F.rms_norm(torch.addcmul(qk * cos, swapped, sin), (D,), eps=RMS_EPS)  # RoPE, then QK-norm
        if w.qk_scale != 1.0:
            qk = qk * w.qk_scale
        v = qkv[:, H + Hkv:]
        if w.value_embeds[i] is not None:  # value embedding, gated per kv head in (0, 3)
            table, gate_w = w.value_embeds[i]
            gate = 3 * torch.sigmoid(F.linear(xn[:, :VE_GATE_CHANNELS], gate_w).float())
            v = v + gate.unsqueeze(-1) * table[ids_flat].view(B * T, Hkv, D)
        if qk.dtype != cdtype:  # a bf16 cache (GPUs)
            qk, v = qk.to(cdtype), v.to(cdtype)
        k_rows[i].index_copy_(0, slots, qk[:, H:].reshape(-1, D))
        v_rows[i].index_copy_(0, slots, v.reshape(-1, D))
        # (B, H, T, D); for one token per row the plain unsqueeze: SDPA's CPU kernel is ~1.6x slower
        # on the transposed view's strides (d4, 8 rows: 162 vs 98 µs per layer)
        q = qk[:, :H].unsqueeze(2) if T == 1 else qk[:, :H].view(B, T, H, D).transpose(1, 2)
        mask = masks.get(w.windows[i])
        y = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask, is_causal=causal and mask is None,
                                           enable_gqa=H != Hkv)
        y = y.transpose(1, 2).reshape(B * T, -1)
        if y.dtype != w.dtype:
            y = y.to(w.dtype)
        x = x + linear(y, w_o)
        x = x + linear(F.relu(linear(F.rms_norm(x, (x.size(-1),), eps=RMS_EPS), w_fc)).square_(), w_proj)
        if w.backout is not None and i == w.backout[0]:
            mid = x
    if T > 1:  # only the last (or `last`) position of each row goes through the head
        at = torch.arange(B, device=ids.device) * T + (T - 1 if last is None else last)
        x = x.index_select(0, at)
        mid = mid.index_select(0, at) if mid is not None else None
    if mid is not None:
        x = x - w.backout[1] * mid
    logits = linear(F.rms_norm(x, (x.size(-1),), eps=RMS_EPS), w.lm_head).float()
    return logits.div_(SOFTCAP).tanh_().mul_(SOFTCAP)


# --- Compiled: static shapes in power-of-two buckets ----------------------------------------


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The next power of two >= n (at least floor), capped at cap."""
    b = floor
    while b < n:
        b *= 2
    return min(b, cap)


def _buckets(cap: int, floor: int = 1) -> int:
    """How many values bucket(n, cap, floor) takes for n in 1..cap."""
    count, b = 1, floor
    while b < cap:
        b, count = 2 * b, count + 1
    return count


_GRAPHS = {"allowed": 0}  # graphs promised by every compiled step and prefill of this process
_GRAPHS_LOCK = threading.Lock()


def _allow_graphs(n: int) -> None:
    """torch.compile keeps at most `recompile_limit` graphs per function (8 by default), counted
    over every caller of that function in the process, and past it runs eagerly (or, fullgraph,
    raises). Each new cache shape a compiled step or prefill meets promises its buckets' graphs;
    the limit is raised to the process's total, once, never lowered (threads may compile at once)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with _GRAPHS_LOCK:
        _GRAPHS["allowed"] += n
        setattr(config, name, max(getattr(config, name), 8 + _GRAPHS["allowed"]))


def _step(w, ids, pos, k_cache, v_cache, tokens, end):  # one frame of its own: its own graph budget
    return forward(w, ids, pos, k_cache, v_cache, tokens, end, True)


def _prefill(w, ids, pos, k_cache, v_cache, tokens, end, last):
    return forward(w, ids, pos, k_cache, v_cache, tokens, end, False, last)


class CompiledDecode:
    """`forward` for one token per row, compiled with static shapes: rows padded to a power of two
    (the padding rows write into free cache rows at position 0, which a later load_row overwrites),
    attention over a power-of-two prefix (>= min_len) of the cache with a per-row mask. So a cache
    of R rows and L positions needs at most log2(R)+1 by log2(L/min_len)+1 graphs, and the compiler's
    graph limit is raised by that for each cache shape met (`_allow_graphs`). On CUDA mode
    "reduce-overhead" captures each bucket as a CUDA graph (inputs are copied into static buffers;
    the cache and weights are marked static). A failure to compile falls back to the eager step,
    once and for good (`self.failed`).

        compiled = CompiledDecode(mode="reduce-overhead")          # CUDA (the Engine's default)
        compiled = CompiledDecode(backend="aot_eager")             # CPU tests
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, min_len: int = 64):
        self.fn = torch.compile(_step, backend=backend, mode=mode, dynamic=False, fullgraph=True)
        self.min_len = min_len
        self.failed: Exception | None = None
        # id -> weak reference: the reference tells a live tensor from a new one that reuses a freed
        # one's id. (A WeakSet would compare tensors with ==, which raises for a tensor.)
        self._static: dict[int, weakref.ref] = {}
        self._shapes: set[tuple[int, int]] = set()  # the (rows, length) cache shapes met so far

    def _mark_static(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            ref = self._static.get(id(t))
            if t.is_cuda and (ref is None or ref() is not t):
                torch._dynamo.mark_static_address(t)
                self._static[id(t)] = weakref.ref(t)

    def __call__(self, w: DecodeWeights, ids: torch.Tensor, lengths: list[int], cache: Cache, end: int) -> torch.Tensor:
        B, max_rows = ids.size(0), cache.k.size(1)
        pos = torch.tensor(lengths, device=ids.device)
        if self.failed is None:
            try:
                Bb, Lb = bucket(B, max_rows), bucket(end, cache.max_len, self.min_len)
                if Bb > B:
                    ids = torch.cat([ids, ids.new_zeros(Bb - B, 1)])
                    pos = torch.cat([pos, pos.new_zeros(Bb - B)])
                self._mark_static(cache.k, cache.v, cache.tokens, *w.tensors())
                if (max_rows, cache.max_len) not in self._shapes:
                    self._shapes.add((max_rows, cache.max_len))
                    _allow_graphs(_buckets(max_rows) * _buckets(cache.max_len, min(self.min_len, cache.max_len)))
                return self.fn(w, ids, pos, cache.k, cache.v, cache.tokens, Lb)[:B].clone()
            except Exception as e:  # no compiler on this machine, an unsupported op: stay eager
                self.failed = e
                ids, pos = ids[:B], pos[:B]
        return forward(w, ids, pos, cache.k, cache.v, cache.tokens, end, True)


class CompiledPrefill:
    """A prompt's forward compiled with static shapes, one graph per power-of-two length (>=
    min_len, at most the model's context). The prompt is padded on the right: causal attention never
    lets a real position see the padding, only the last real position reaches the head, and the
    cache's length is the prompt's, so the padding's keys are overwritten by the tokens decoded
    there. No CUDA graphs: a prefill writes a fresh cache each time and is long enough to keep a GPU
    busy without them. The first failure falls back to eager for good (`self.failed`; the call
    returns None)."""

    def __init__(self, backend: str = "inductor", mode: str | None = None, min_len: int = 64):
        self.fn = torch.compile(_prefill, backend=backend, mode=mode, dynamic=False)
        self.min_len = min_len
        self.failed: Exception | None = None
        self._limits: set[int] = set()  # the contexts met so far

    def __call__(self, w: DecodeWeights, tokens: list[int], config: GPTConfig, device, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, Cache] | None:
        """(logits (1, V), a one-row Cache holding the prompt), or None once compiling failed."""
        n, limit = len(tokens), config.sequence_len
        if self.failed is not None or not 0 < n <= limit:
            return None
        length = bucket(n, limit, min(self.min_len, limit))
        cache = Cache(config, 1, length, device, dtype)
        ids = torch.tensor([tokens + [0] * (length - n)], dtype=torch.long, device=device)
        if limit not in self._limits:
            self._limits.add(limit)
            _allow_graphs(_buckets(limit, min(self.min_len, limit)))
        try:
            logits = self.fn(w, ids, torch.zeros(1, dtype=torch.long, device=device), cache.k, cache.v,
                             cache.tokens, length, torch.tensor([n - 1], device=device))
        except Exception as e:  # no compiler here, an unsupported op: eager from now on
            self.failed = e
            return None
        cache.lengths[0], cache.rows = n, 1
        return logits, cache


# --- Which dtype decodes faster here ---------------------------------------------------------


def decode_speedup(model, rows: int = 1, steps: int = 6, rounds: int = 3, cached: int = 64) -> float:
    """Measured ratio of fp32 to bf16 time for decode steps of this model (one token for `rows`
    rows against `cached` cached positions), the two dtypes alternated, best of `rounds`. The model
    must still hold its fp32 master weights; its compute_dtype is restored."""
    device, dtype = next(model.parameters()).device, model.compute_dtype
    ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
    pos = torch.full((rows,), cached, dtype=torch.long, device=device)
    best = {}
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for d in (torch.float32, torch.bfloat16):
                    model.compute_dtype = d
                    cache = Cache(model.config, rows, cached + 1, device, kv_cache_dtype(d, device))
                    w = decode_weights(model)
                    forward(w, ids, pos, cache.k, cache.v, cache.tokens, cached + 1, False)  # warm-up
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        forward(w, ids, pos, cache.k, cache.v, cache.tokens, cached + 1, False)
                    best[d] = min(best.get(d, float("inf")), time.perf_counter() - t0)
    finally:
        model.compute_dtype = dtype
        _WEIGHTS.pop(model, None)  # do not keep a bf16 copy around
    return best[torch.float32] / best[torch.bfloat16]


def decode_dtype(model, requested: str, device: torch.device) -> torch.dtype:
    """Inference dtype for chat and serve: as common.resolve_dtype, except that 'auto' on a CPU
    times decode steps of this very model in both dtypes (decode_speedup) and takes bf16 only when
    it is clearly faster (> 1.2x), measured at start-up on the machine that will decode (with the
    weights prepared once, bf16 won at d4 batch 1 on the dev CPU: docs/BENCHMARKS.md#decode-speed-benchmarksdecode_speedpy;
    fp32 keeps a row's tokens independent of the batch). Call before prepare_for_inference()."""
    if requested != "auto" or device.type != "cpu":
        return resolve_dtype(requested, device)
    return torch.bfloat16 if decode_speedup(model) > 1.2 else torch.float32
