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
This is the training forward, over whole sequences; decoding runs picochat/decode.py's flat forward
over weights prepared once, with a cache (tests/test_decode_fast.py pins its tokens to this forward).
The elementwise ops and the fused head loss come from picochat/ops.py, each with its reference.

    model = GPT(config_from_depth(4, vocab_size=4096, sequence_len=512)); model.init_weights()
    loss = model(idx, targets)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.ops import SOFTCAP, head_loss, norm, relu_squared, rotary_norm


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

class Linear(nn.Linear):
    """A bias-free Linear whose fp32 master weight is cast to the input's dtype in forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # already in x's dtype after GPT.prepare_for_inference: no per-call cast
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


def building_on_meta() -> bool:
    """Whether modules are being built on the meta device (`with torch.device("meta")`)."""
    return torch.empty(0).is_meta


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, without its own N(0, 1) draw on the meta device (a model built there is loaded
    or initialized next): torch runs that draw through a Python reference that imports its
    compiler, ~1.4 s of every process that loads a checkpoint. Elsewhere exactly nn.Embedding."""
    if building_on_meta():
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


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

    def forward(self, x, ve, cos, sin):
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
        gqa = self.n_kv_head != self.n_head
        if self.window is None or T - 1 <= self.window:  # every query sees all of its past
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # a windowed layer: the token itself and `window` before it
            mask = window_mask(torch.arange(T, device=q.device), T, self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


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

    def forward(self, x, ve, cos, sin):
        x = x + self.attn(norm(x), ve, cos, sin)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The model

ROPE_BASE = 10_000


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.transformer = nn.ModuleDict(dict(
            wte=embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        # The 2026 parts, present only when switched on (their names are nanochat HEAD's, so its
        # checkpoints map over one to one).
        kv_dim = config.n_kv_head * config.head_dim
        if config.value_embeds:
            self.value_embeds = nn.ModuleDict({str(i): embedding(config.vocab_size, kv_dim)
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
        if device is None and building_on_meta():
            # built on the meta device: the shapes only (torch's meta arange imports its compiler)
            shape = (1, length, 1, d // 2)
            return torch.empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.float32)
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"):
        """idx (B, T) → loss if targets are given, else fp32 logits (B, T, V)."""
        x = self.trunk(idx)
        if targets is None:
            return self.logits(x)
        return head_loss(x, self.lm_head.weight, targets, loss_reduction)

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        """Everything but the head: the final normalized hidden states (B, T, d). This is the
        part base_train compiles; the head loss stays eager (it is already one fused pass)."""
        c, T = self.config, idx.size(1)
        if T > self.rotary_len:
            raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rotary_len})")
        cos, sin = self.cos[:, :T].to(self.compute_dtype), self.sin[:, :T].to(self.compute_dtype)  # (1, T, 1, D/2)
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        if c.smear:  # x_t + λ·sigmoid(w·x_t[:24])·x_{t−1}: the previous token blended in (none at t = 0)
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, mid = x, None
        for i, block in enumerate(self.transformer.h):
            if c.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if c.has_value_embed(i) else None
            x = block(x, ve, cos, sin)
            if c.backout and i == c.n_layer // 2:
                mid = x
        if mid is not None:  # take out part of the middle layer's residual before the head
            x = x - self.backout_lambda.to(x.dtype) * mid
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
        self.prepared = True  # weights frozen: picochat.decode.decode_weights stops checking them
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Softcapped fp32 logits of final hidden states (any leading shape)."""
        logits = self.lm_head(x).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)
